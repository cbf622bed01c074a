"""SageMaker data parallel's TensorFlow spelling, over `tf_smdist.horovod`.

A script written for `smdistributed.dataparallel.tensorflow` changes one line,

    import smdistributed.dataparallel.tensorflow as sdp
    ->  import tf_smdist.sdp as sdp

and runs on tf_smdist's MPI engine. As in that library, all-reduces average
by default and small tensors are fused into buffers of 25 MB
(`SMDIST_FUSION_THRESHOLD` / `HOROVOD_FUSION_THRESHOLD`, in bytes, override
it when set before `init`).

Example:
>>> import tf_smdist.sdp as sdp
>>> sdp.init()
>>> sdp.allreduce(tf.constant([2.0]), param_index=0, num_params=1).numpy()
array([2.], dtype=float32)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import tensorflow as tf

from tf_smdist import horovod as _hvd
from tf_smdist.horovod import mpi_ops as _mpi_ops
from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.global_variables import BroadcastGlobalVariablesHook
from tf_smdist.horovod.tape import DistributedGradientTape

__all__ = [
    "BroadcastGlobalVariablesHook",
    "Compression",
    "DEFAULT_FUSION_BYTES",
    "DistributedGradientTape",
    "ReduceOp",
    "allreduce",
    "barrier",
    "broadcast",
    "broadcast_global_variables",
    "broadcast_variables",
    "init",
    "is_initialized",
    "local_rank",
    "local_size",
    "oob_allreduce",
    "rank",
    "shutdown",
    "size",
]

# SageMaker data parallel's default fusion buffer.
DEFAULT_FUSION_BYTES = 25 * 1024 * 1024
_FUSION_VARS = ("SMDIST_FUSION_THRESHOLD", "HOROVOD_FUSION_THRESHOLD")


class ReduceOp:
    """The reductions of SageMaker data parallel: AVERAGE (default), SUM, MIN, MAX.

    Example:
    >>> import tf_smdist.horovod as hvd, tf_smdist.sdp as sdp
    >>> sdp.ReduceOp.AVERAGE == hvd.Average
    True
    """

    AVERAGE = _mpi_ops.Average
    SUM = _mpi_ops.Sum
    MIN = _mpi_ops.Min
    MAX = _mpi_ops.Max


def init() -> None:
    """Starts the engine with a 25 MB fusion buffer unless one is configured.

    Example:
    >>> import tf_smdist.sdp as sdp
    >>> sdp.init(); sdp.size()
    1
    """
    if not any(os.environ.get(v) for v in _FUSION_VARS):
        os.environ["SMDIST_FUSION_THRESHOLD"] = str(DEFAULT_FUSION_BYTES)
    _hvd.init()


shutdown = _hvd.shutdown
is_initialized = _hvd.is_initialized
size = _hvd.size
rank = _hvd.rank
local_size = _hvd.local_size
local_rank = _hvd.local_rank
broadcast = _hvd.broadcast
barrier = _hvd.barrier
broadcast_global_variables = _hvd.broadcast_global_variables


def allreduce(
    tensor: Any,
    param_index: int,
    num_params: int,
    compression: type[Compressor] = Compression.none,
    op: int = ReduceOp.AVERAGE,
) -> Any:
    """All-reduces one gradient of a model's `num_params` gradients.

    `param_index` names the collective, so each gradient of every rank is
    matched with the same gradient elsewhere whatever order they are ready
    in. Use `oob_allreduce` for tensors that are not gradients.

    Args:
        tensor: the gradient (a tensor or `tf.IndexedSlices`).
        param_index: its position among the model's gradients, in
            `[0, num_params)`.
        num_params: the number of gradients reduced per step.
        compression: `sdp.Compression.none` or `.fp16`. Defaults to
            `Compression.none`.
        op: a `ReduceOp`. Defaults to `ReduceOp.AVERAGE`.

    Raises:
        ValueError: `param_index` is outside `[0, num_params)`.

    Example:
    >>> import tf_smdist.sdp as sdp
    >>> sdp.init()
    >>> sdp.allreduce(tf.ones([2]), 0, 1, op=sdp.ReduceOp.SUM).numpy()
    array([1., 1.], dtype=float32)
    """
    if not 0 <= int(param_index) < int(num_params):
        raise ValueError(
            "`param_index` must be in [0, num_params). Received: "
            f"param_index={param_index}, num_params={num_params}. Number the "
            "gradients 0..num_params-1 in the same order on every rank.")
    return _hvd.allreduce(tensor, compression=compression, op=op,
                          name=f"sdp.allreduce.{int(param_index)}of{int(num_params)}")


def oob_allreduce(
    tensor: Any,
    compression: type[Compressor] = Compression.none,
    op: int = ReduceOp.AVERAGE,
) -> tf.Tensor:
    """All-reduces a tensor that is not a gradient (metrics, counters, ...).

    Args:
        tensor: the tensor, the same shape and dtype on every rank.
        compression: a `Compression`. Defaults to `Compression.none`.
        op: a `ReduceOp`. Defaults to `ReduceOp.AVERAGE`.

    Example:
    >>> import tf_smdist.sdp as sdp
    >>> sdp.init()
    >>> sdp.oob_allreduce(tf.constant([4.0])).numpy()
    array([4.], dtype=float32)
    """
    return _hvd.allreduce(tensor, compression=compression, op=op)


def broadcast_variables(variables: Iterable[Any], root_rank: int) -> Any:
    """Assigns `root_rank`'s values to `variables` on every rank.

    Args:
        variables: variables in the same order on every rank.
        root_rank: the rank whose values are kept.

    Example:
    >>> import tf_smdist.sdp as sdp
    >>> sdp.init()
    >>> v = tf.Variable([1.0]); sdp.broadcast_variables([v], root_rank=0)
    """
    return _hvd.broadcast_variables(variables, root_rank)
