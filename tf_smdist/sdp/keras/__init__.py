"""SageMaker data parallel's Keras spelling.

The names of `smdistributed.dataparallel.tensorflow.keras` over
`tf_smdist.horovod.keras`.

Example:
>>> import keras, tf_smdist.sdp as sdp, tf_smdist.sdp.keras as sdp_keras
>>> sdp.init()
>>> opt = sdp_keras.DistributedOptimizer(keras.optimizers.SGD(0.1 * sdp.size()))
>>> cb = sdp_keras.callbacks.BroadcastGlobalVariablesCallback(0)
"""

from __future__ import annotations

from typing import Any

import keras

from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.keras import DistributedOptimizer as _DistributedOptimizer
from tf_smdist.sdp import (
    ReduceOp,
    init,
    local_rank,
    local_size,
    rank,
    shutdown,
    size,
)
from tf_smdist.sdp.keras import callbacks

__all__ = [
    "Compression",
    "DistributedOptimizer",
    "ReduceOp",
    "callbacks",
    "init",
    "local_rank",
    "local_size",
    "rank",
    "shutdown",
    "size",
]


def DistributedOptimizer(  # noqa: N802 (the library's name)
    optimizer: keras.optimizers.Optimizer,
    name: str | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    sparse_as_dense: bool = False,
    op: int = ReduceOp.AVERAGE,
    **kwargs: Any,
) -> keras.optimizers.Optimizer:
    """A Keras 3 optimizer whose gradients are averaged over the ranks first.

    Same as `tf_smdist.horovod.keras.DistributedOptimizer` (which takes more
    options, passed through `**kwargs`).

    Args:
        optimizer: a Keras 3 optimizer.
        name: a name for the new optimizer. Defaults to `None`.
        device_dense: accepted for compatibility. Defaults to `""`.
        device_sparse: accepted for compatibility. Defaults to `""`.
        compression: a `Compression`. Defaults to `Compression.none`.
        sparse_as_dense: densify sparse gradients. Defaults to `False`.
        op: a `ReduceOp`. Defaults to `ReduceOp.AVERAGE`.
        **kwargs: other `tf_smdist.horovod.keras.DistributedOptimizer`
            arguments.

    Example:
    >>> import tf_smdist.sdp.keras as sdp_keras
    >>> opt = sdp_keras.DistributedOptimizer(keras.optimizers.Adam())
    """
    return _DistributedOptimizer(
        optimizer, name=name, device_dense=device_dense, device_sparse=device_sparse,
        compression=compression, sparse_as_dense=sparse_as_dense, op=op, **kwargs)
