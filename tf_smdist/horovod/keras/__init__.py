"""Horovod's Keras API (`horovod.tensorflow.keras`) for Keras 3 on tf_smdist.

A Horovod Keras script changes its import,

    import horovod.tensorflow.keras as hvd   ->   import tf_smdist.horovod.keras as hvd

and runs with `model.fit` as before: wrap the optimizer in
`hvd.DistributedOptimizer`, add `hvd.callbacks.BroadcastGlobalVariablesCallback(0)`
(and `MetricAverageCallback`), and let each rank read its own shard of the data.

Example:
>>> import keras, tf_smdist.horovod.keras as hvd
>>> hvd.init()
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
>>> model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)),
...               loss="mse")
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.horovod import collectives
from tf_smdist.horovod.basics import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    rocm_built,
    shutdown,
    size,
    start_timeline,
    stop_timeline,
    sycl_built,
)
from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.global_variables import (
    broadcast_global_variables as _broadcast_global_variables,
)
from tf_smdist.horovod.keras import callbacks, elastic
from tf_smdist.horovod.keras.optimizer import (
    DistributedOptimizer,
    PartialDistributedOptimizer,
    is_distributed,
)
from tf_smdist.horovod.process_sets import (
    ProcessSet,
    add_process_set,
    global_process_set,
    remove_process_set,
)
from tf_smdist.horovod.sync_batch_norm import SyncBatchNormalization

# Horovod's Keras scripts compile with tf.keras 2's
# `experimental_run_tf_function=False` and broadcast `opt.variables()`, which
# Keras 3 rejects (see `horovod.basics.init`): accepted from the import on.
_compat.accept_tf_keras_spellings()

__all__ = [
    "Adasum",
    "Average",
    "Compression",
    "DistributedOptimizer",
    "Max",
    "Min",
    "PartialDistributedOptimizer",
    "ProcessSet",
    "Product",
    "Sum",
    "SyncBatchNormalization",
    "add_process_set",
    "allgather",
    "allreduce",
    "broadcast",
    "broadcast_global_variables",
    "callbacks",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "elastic",
    "gloo_built",
    "gloo_enabled",
    "global_process_set",
    "init",
    "is_homogeneous",
    "is_initialized",
    "load_model",
    "local_rank",
    "local_size",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "rank",
    "reducescatter",
    "remove_process_set",
    "rocm_built",
    "shutdown",
    "size",
    "start_timeline",
    "stop_timeline",
    "sycl_built",
]


def broadcast_global_variables(root_rank: int) -> Any:
    """Horovod's Keras `broadcast_global_variables`: TF1 graphs only.

    With Keras 3 use `hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank)`
    in `fit`, or `tf_smdist.horovod.broadcast_variables(model.variables, root_rank)`.

    Args:
        root_rank: the rank whose values are kept.

    Raises:
        RuntimeError: called eagerly (always, in TensorFlow 2 scripts).

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> with tf.Graph().as_default():
    ...     op = hvd.broadcast_global_variables(0)
    """
    return _broadcast_global_variables(root_rank)


def _evaluated(result: tf.Tensor) -> Any:
    """`result` itself eagerly and in a `tf.function`; its value in a TF1 session.

    Horovod's Keras collectives return the op's result as it is when TensorFlow
    runs eagerly (an eager tensor) and run it in the session of a TF1 graph.
    """
    if tf.executing_eagerly() or tf.inside_function():
        return result
    session = tf.compat.v1.get_default_session()
    return result if session is None else session.run(result)


def allreduce(
    value: Any,
    name: str | None = None,
    average: bool | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    op: int | None = None,
    compression: type[Compressor] = Compression.none,
) -> Any:
    """Reduces a tensor-compatible value over the ranks.

    As in Horovod, the result is a `tf.Tensor` (eagerly, an eager tensor:
    `.numpy()` gives its value); in a TF1 graph with a default session, its
    value.

    Args:
        value: a tensor-compatible value (NumPy array, list, tensor).
        name: the collective's name. Defaults to `None`.
        average: legacy flag; use `op`. Defaults to `None` (Average).
        prescale_factor: multiplies the input. Defaults to `1.0`.
        postscale_factor: multiplies the result. Defaults to `1.0`.
        op: the reduction. Defaults to `None` (Average).
        compression: a `hvd.Compression`. Defaults to `Compression.none`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> hvd.allreduce(np.array([1.0, 3.0])).numpy()
    array([1., 3.])
    """
    return _evaluated(collectives.allreduce(
        tf.convert_to_tensor(value), average=average, compression=compression, op=op,
        prescale_factor=prescale_factor, postscale_factor=postscale_factor,
        name=name))


def allgather(value: Any, name: str | None = None) -> Any:
    """Concatenates every rank's value along the first axis.

    Returns a `tf.Tensor`, as `allreduce` does.

    Args:
        value: a tensor-compatible value of rank >= 1.
        name: the collective's name. Defaults to `None`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> hvd.allgather(np.array([1, 2])).numpy()
    array([1, 2])
    """
    return _evaluated(collectives.allgather(tf.convert_to_tensor(value), name=name))


def broadcast(value: Any, root_rank: int, name: str | None = None) -> Any:
    """Returns `root_rank`'s value on every rank.

    Returns a `tf.Tensor`, as `allreduce` does.

    Args:
        value: a tensor-compatible value, the same shape on every rank.
        root_rank: the sending rank.
        name: the collective's name. Defaults to `None`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> hvd.broadcast(np.array([5]), root_rank=0).numpy()
    array([5])
    """
    return _evaluated(collectives.broadcast(tf.convert_to_tensor(value), root_rank,
                                            name=name))


def reducescatter(value: Any, name: str | None = None, op: int = Average) -> Any:
    """Reduces a value over the ranks and gives each rank its share of the rows.

    Rank r receives rows of the reduced value (the first axis split over the
    ranks, the first ranks one row more when it does not divide). Returns a
    `tf.Tensor`, as `allreduce` does.

    Args:
        value: a tensor-compatible value of rank >= 1, the same shape on
            every rank.
        name: the collective's name. Defaults to `None`.
        op: `hvd.Average` or `hvd.Sum`. Defaults to `hvd.Average`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> hvd.reducescatter(np.array([1.0, 3.0]), op=hvd.Sum).numpy()
    array([1., 3.])
    """
    return _evaluated(collectives.reducescatter(tf.convert_to_tensor(value), op=op,
                                                name=name))


def load_model(
    filepath: str,
    custom_optimizers: list[type] | None = None,
    custom_objects: dict[str, Any] | None = None,
    compression: type[Compressor] = Compression.none,
    **kwargs: Any,
) -> keras.Model:
    """Loads a saved Keras model and wraps its optimizer in `DistributedOptimizer`.

    The optimizer's state (iterations, slots) is kept.

    Args:
        filepath: a `.keras` file written by `model.save`.
        custom_optimizers: optimizer classes the file refers to that Keras
            does not know. Defaults to `None`.
        custom_objects: other custom classes and functions. Defaults to `None`.
        compression: the `DistributedOptimizer`'s compression.
            Defaults to `Compression.none`.
        **kwargs: other `DistributedOptimizer` arguments (e.g. `op`).

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> model = hvd.load_model("model.keras")  # doctest: +SKIP
    """
    objects = dict(custom_objects or {})
    for cls in custom_optimizers or []:
        objects[cls.__name__] = cls
    model = keras.models.load_model(filepath, custom_objects=objects or None)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or is_distributed(optimizer):
        return model
    distributed = DistributedOptimizer(optimizer, compression=compression, **kwargs)
    if optimizer.built:
        distributed.build(model.trainable_variables)
        old = {v.path: v for v in optimizer.variables}
        for v in distributed.variables:
            if v.path in old:
                v.assign(old[v.path])
    model.optimizer = distributed
    return model
