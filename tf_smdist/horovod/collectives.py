"""Horovod's collectives as TensorFlow ops: argument handling over `mpi_ops`.

Every function works eagerly, inside `tf.function` and in `tf.compat.v1`
graphs, and has a gradient (through the raw ops of `mpi_ops`). Collectives
are matched across ranks by name, so independent ones may run in any order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from tf_smdist.horovod import basics, mpi_ops
from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.process_sets import (
    ProcessSet,
    global_process_set,
    process_set_id_of,
)

__all__ = [
    "allgather",
    "allreduce",
    "alltoall",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_variables",
    "grouped_allgather",
    "grouped_allreduce",
    "grouped_reducescatter",
    "join",
    "reducescatter",
    "resolve_op",
]

logger = logging.getLogger(__name__)

_OP_NAMES = {
    mpi_ops.Average: "Average",
    mpi_ops.Sum: "Sum",
    mpi_ops.Adasum: "Adasum",
    mpi_ops.Min: "Min",
    mpi_ops.Max: "Max",
    mpi_ops.Product: "Product",
}


def resolve_op(op: int | None, average: bool | None = None) -> int:
    """Returns the reduce op from Horovod's `op` and legacy `average` arguments.

    Args:
        op: `hvd.Average`, `hvd.Sum`, `hvd.Min`, `hvd.Max`, `hvd.Product` or
            `None` (Average, unless `average` says otherwise).
        average: Horovod's legacy flag (True: Average, False: Sum).
            Defaults to `None`.

    Raises:
        ValueError: both are given, or `op` is unknown.
        NotImplementedError: `op` is `hvd.Adasum`.

    Example:
    >>> resolve_op(None, average=False) == mpi_ops.Sum
    True
    """
    if average is not None:
        if op is not None:
            raise ValueError(
                "Pass either `op` or the legacy `average`, not both. Received: "
                f"op={_OP_NAMES.get(op, op)}, average={average}. Use `op` only.")
        op = mpi_ops.Average if average else mpi_ops.Sum
    if op is None:
        return mpi_ops.Average
    if op == mpi_ops.Adasum:
        raise NotImplementedError(
            "Adasum is not supported by tf_smdist.horovod. Received: op=Adasum. "
            "Use op=hvd.Average (or hvd.Sum).")
    if op not in _OP_NAMES:
        raise ValueError(
            "`op` must be one of hvd.Average, hvd.Sum, hvd.Min, hvd.Max, "
            f"hvd.Product. Received: op={op!r}")
    return int(op)


def _set_size(process_set: ProcessSet) -> int:
    if process_set is None or process_set.process_set_id == 0:
        return basics.size()
    return process_set.size()


def _sparse_allreduce(
    tensor: tf.IndexedSlices,
    *,
    op: int,
    prescale_factor: float,
    postscale_factor: float,
    name: str | None,
    process_set: ProcessSet,
) -> tf.IndexedSlices:
    if op not in (mpi_ops.Average, mpi_ops.Sum):
        # NotImplementedError, as Horovod raises for this case.
        raise NotImplementedError(
            "A tf.IndexedSlices is all-reduced by gathering its rows, which "
            "only sums or averages. Received: "
            f"op={_OP_NAMES.get(op, op)}. Densify it first "
            "(tf.convert_to_tensor) or use op=hvd.Sum / hvd.Average.")
    if float(prescale_factor) != 1.0 or float(postscale_factor) != 1.0:
        # NotImplementedError, as Horovod raises for this case.
        raise NotImplementedError(
            "Pre/postscale_factor are not supported with tf.IndexedSlices. "
            f"Received: prescale_factor={prescale_factor}, "
            f"postscale_factor={postscale_factor}. Scale the values yourself, or "
            "densify it first (tf.convert_to_tensor).")
    set_id = process_set_id_of(process_set)
    values_name = None if name is None else f"{name}.values"
    indices_name = None if name is None else f"{name}.indices"
    values = mpi_ops.allgather(tensor.values, name=values_name,
                               process_set_id=set_id)
    indices = mpi_ops.allgather(tensor.indices, name=indices_name,
                                process_set_id=set_id)
    if op == mpi_ops.Average:
        # Horovod's true division: integer values become floating point
        # (int8/16 -> float32, int32/64 -> float64) rather than truncating.
        values = values / tf.cast(_set_size(process_set), values.dtype)
    return tf.IndexedSlices(values, indices, dense_shape=tensor.dense_shape)


def allreduce(
    tensor: Any,
    average: bool | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
    ignore_name_scope: bool = False,
) -> Any:
    """Reduces `tensor` over the ranks and returns the result on every rank.

    A `tf.IndexedSlices` (a sparse gradient) is all-gathered instead: its
    values and indices from every rank are concatenated, and for `Average`
    the values are divided by the number of ranks, as in Horovod (a true
    division: integer values come back as floating point).

    Args:
        tensor: a tensor (uint8, int8, int16, uint16, int32, int64, float16,
            bfloat16, float32, float64) or a `tf.IndexedSlices`.
        average: legacy flag; use `op`. Defaults to `None`.
        device_dense: accepted for compatibility; the reduction runs on the
            host. Defaults to `""`.
        device_sparse: accepted for compatibility. Defaults to `""`.
        compression: `hvd.Compression.none` or `hvd.Compression.fp16`.
            Defaults to `Compression.none`.
        op: the reduction. Defaults to `None` (Average).
        prescale_factor: multiplies the input before the reduction.
            Defaults to `1.0`.
        postscale_factor: multiplies the result. Defaults to `1.0`.
        name: the name that matches this collective across ranks; every
            rank must use the same one. Defaults to `None` (derived from the
            op's name in a graph, from call order eagerly).
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.
        ignore_name_scope: accepted for compatibility. Defaults to `False`.

    Returns:
        The reduced tensor (same shape and dtype), or a `tf.IndexedSlices`.

    Raises:
        NotImplementedError: `op` is `hvd.Adasum`, or a `tf.IndexedSlices`
            with an op other than `hvd.Sum` / `hvd.Average` or with a pre- or
            postscale factor (as in Horovod).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.allreduce(tf.constant([1.0, 2.0]), op=hvd.Sum).numpy()
    array([1., 2.], dtype=float32)
    """
    del device_dense, device_sparse, ignore_name_scope
    op = resolve_op(op, average)
    if isinstance(tensor, tf.IndexedSlices):
        return _sparse_allreduce(
            tensor, op=op, prescale_factor=prescale_factor,
            postscale_factor=postscale_factor, name=name, process_set=process_set)
    compressed, ctx = compression.compress(tf.convert_to_tensor(tensor))
    reduced = mpi_ops.allreduce(
        compressed, name=name, op=op, prescale_factor=float(prescale_factor),
        postscale_factor=float(postscale_factor),
        process_set_id=process_set_id_of(process_set))
    return compression.decompress(reduced, ctx)


def grouped_allreduce(
    tensors: Sequence[Any],
    average: bool | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
) -> list[Any]:
    """All-reduces a list of tensors as one unit (one fused transfer).

    `tf.IndexedSlices` entries are all-gathered as in `allreduce`.

    Args:
        tensors: tensors (and/or `tf.IndexedSlices`).
        average: legacy flag; use `op`. Defaults to `None`.
        device_dense: accepted for compatibility. Defaults to `""`.
        device_sparse: accepted for compatibility. Defaults to `""`.
        compression: a `hvd.Compression`. Defaults to `Compression.none`.
        op: the reduction. Defaults to `None` (Average).
        prescale_factor: multiplies the inputs. Defaults to `1.0`.
        postscale_factor: multiplies the results. Defaults to `1.0`.
        name: the group's name, the same on every rank. Defaults to `None`.
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.

    Returns:
        The reduced tensors, in order.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> [t.numpy() for t in hvd.grouped_allreduce([tf.ones([2]), tf.zeros([1])])]
    [array([1., 1.], dtype=float32), array([0.], dtype=float32)]
    """
    del device_dense, device_sparse
    op = resolve_op(op, average)
    tensors = list(tensors)
    results: list[Any] = [None] * len(tensors)
    dense_index, dense, ctxs = [], [], []
    for i, t in enumerate(tensors):
        if isinstance(t, tf.IndexedSlices):
            results[i] = _sparse_allreduce(
                t, op=op, prescale_factor=prescale_factor,
                postscale_factor=postscale_factor,
                name=None if name is None else f"{name}.{i}", process_set=process_set)
        else:
            compressed, ctx = compression.compress(tf.convert_to_tensor(t))
            dense_index.append(i)
            dense.append(compressed)
            ctxs.append(ctx)
    if dense:
        reduced = mpi_ops.grouped_allreduce(
            dense, name=name, op=op, prescale_factor=float(prescale_factor),
            postscale_factor=float(postscale_factor),
            process_set_id=process_set_id_of(process_set))
        for i, r, ctx in zip(dense_index, reduced, ctxs):
            results[i] = compression.decompress(r, ctx)
    return results


def allgather(
    tensor: Any,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> tf.Tensor:
    """Concatenates every rank's `tensor` along the first dimension.

    The first dimension may differ per rank; the others must agree.

    Args:
        tensor: a tensor of rank >= 1 (a scalar is treated as shape `[1]`).
        name: the name that matches it across ranks. Defaults to `None`.
        ignore_name_scope: accepted for compatibility. Defaults to `False`.
        process_set: the ranks to gather from. Defaults to
            `global_process_set`.

    Returns:
        The rank-ordered concatenation.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.allgather(tf.constant([[1, 2]])).numpy()
    array([[1, 2]], dtype=int32)
    """
    del ignore_name_scope
    return mpi_ops.allgather(tf.convert_to_tensor(tensor), name=name,
                             process_set_id=process_set_id_of(process_set))


def grouped_allgather(
    tensors: Sequence[Any],
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> list[tf.Tensor]:
    """All-gathers a list of tensors as one unit.

    Args:
        tensors: tensors of rank >= 1.
        name: the group's name. Defaults to `None`.
        ignore_name_scope: accepted for compatibility. Defaults to `False`.
        process_set: the ranks to gather from. Defaults to
            `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> out = hvd.grouped_allgather([tf.constant([1]), tf.constant([2.0])])
    >>> [t.numpy() for t in out]
    [array([1], dtype=int32), array([2.], dtype=float32)]
    """
    del ignore_name_scope
    return list(mpi_ops.grouped_allgather(
        [tf.convert_to_tensor(t) for t in tensors], name=name,
        process_set_id=process_set_id_of(process_set)))


def broadcast(
    tensor: Any,
    root_rank: int,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> tf.Tensor:
    """Returns `root_rank`'s value of `tensor` on every rank.

    Args:
        tensor: a tensor of the same shape and dtype on every rank.
        root_rank: the rank whose value is kept: a rank of the job (also
            with a process set, as in Horovod), which must belong to it.
        name: the name that matches it across ranks. Defaults to `None`.
        ignore_name_scope: accepted for compatibility. Defaults to `False`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.broadcast(tf.constant([3.0]), root_rank=0).numpy()
    array([3.], dtype=float32)
    """
    del ignore_name_scope
    return mpi_ops.broadcast(tf.convert_to_tensor(tensor),
                             _root_in_set(root_rank, process_set), name=name,
                             process_set_id=process_set_id_of(process_set))


def _root_in_set(root_rank: int, process_set: ProcessSet) -> int:
    """The engine's root (a rank within the set) for Horovod's `root_rank`,
    which is a rank of the job also when a process set is given."""
    root_rank = int(root_rank)
    if process_set is None or process_set_id_of(process_set) == 0:
        return root_rank
    ranks = process_set.ranks
    if root_rank not in ranks:
        raise ValueError(
            "`root_rank` is a rank of the job and must belong to the process set. "
            f"Received: root_rank={root_rank}, process_set ranks={ranks}. Pass one "
            "of the set's ranks.")
    return ranks.index(root_rank)


def broadcast_(
    variables: Any,
    root_rank: int,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
) -> Any:
    """Broadcasts variables in place: each takes `root_rank`'s value.

    Args:
        variables: a variable or a list of variables (Keras or TensorFlow),
            in the same order on every rank.
        root_rank: the rank whose values are kept.
        name: a prefix for the collectives' names. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Returns:
        Eagerly, the variables (a single one if one was passed), already
        updated. In a `tf.compat.v1` graph, as in Horovod, the updated values:
        tensors whose evaluation runs the broadcast and the assignment.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> v = tf.Variable([1.0])
    >>> hvd.broadcast_(v, root_rank=0) is v
    True
    """
    single = not isinstance(variables, (list, tuple))
    var_list = [variables] if single else list(variables)
    # Unnamed in a graph: each op's unique name names it (see
    # `broadcast_variables`).
    prefix = name or ("broadcast_" if tf.executing_eagerly() else None)
    updated = []
    for i, var in enumerate(var_list):
        assigned = var.assign(broadcast(
            var, root_rank, name=None if prefix is None else f"{prefix}.{i}",
            process_set=process_set))
        if tf.executing_eagerly() or assigned is None:
            updated.append(var)
        else:  # the value read after the assignment (depends on it)
            updated.append(tf.convert_to_tensor(assigned))
    return updated[0] if single else updated


def broadcast_variables(
    variables: Iterable[Any],
    root_rank: int,
    process_set: ProcessSet = global_process_set,
    inplace: bool = False,
) -> Any:
    """Assigns `root_rank`'s values to `variables` on every rank.

    Call it after creating the model (and the optimizer's variables) so that
    every rank starts from the same state.

    Args:
        variables: Keras or TensorFlow variables, in the same order on every
            rank (e.g. `model.variables`).
        root_rank: the rank whose values are kept.
        process_set: the ranks taking part. Defaults to `global_process_set`.
        inplace: accepted for compatibility (assignment is always in place).
            Defaults to `False`.

    Returns:
        `None` eagerly; in a graph, an op that runs the assignments.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> v = tf.Variable([1.0, 2.0])
    >>> hvd.broadcast_variables([v], root_rank=0)
    >>> v.numpy()
    array([1., 2.], dtype=float32)
    """
    del inplace
    assigns = []
    eager = tf.executing_eagerly()
    for i, var in enumerate(variables):
        # In a graph each op's unique name names it, so that several calls in
        # one function (the model's variables, then the optimizer's) differ.
        value = broadcast(var, root_rank,
                          name=f"broadcast_variables.{i}" if eager else None,
                          process_set=process_set)
        assigns.append(var.assign(value))
    if eager:
        return None
    return tf.group(*assigns)


def alltoall(
    tensor: Any,
    splits: Any = None,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> Any:
    """Sends slices of `tensor` along its first dimension to every rank.

    As in Horovod, the received splits are returned only when `splits` is
    given: `hvd.alltoall(t)` returns the received tensor,
    `hvd.alltoall(t, splits)` returns `(received, received_splits)`.

    Args:
        tensor: the rows to send, concatenated in destination rank order.
        splits: the number of rows for each rank (int32, one entry per rank
            of the process set); `None` splits evenly. Defaults to `None`.
        name: the name that matches it across ranks. Defaults to `None`.
        ignore_name_scope: accepted for compatibility. Defaults to `False`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Returns:
        The rows received from every rank in rank order; with `splits`, the
        pair `(received, received_splits)`, the second saying how many rows
        came from each rank.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.alltoall(tf.constant([1, 2, 3])).numpy()
    array([1, 2, 3], dtype=int32)
    >>> out, counts = hvd.alltoall(tf.constant([1, 2, 3]), splits=[3])
    >>> out.numpy(), counts.numpy()
    (array([1, 2, 3], dtype=int32), array([3], dtype=int32))
    """
    del ignore_name_scope
    with_splits = splits is not None
    if with_splits:
        splits = tf.cast(tf.convert_to_tensor(splits), tf.int32)
    received, received_splits = mpi_ops.alltoall(
        tf.convert_to_tensor(tensor), splits, name=name,
        process_set_id=process_set_id_of(process_set))
    return (received, received_splits) if with_splits else received


def reducescatter(
    tensor: Any,
    device_dense: str = "",
    compression: type[Compressor] = Compression.none,
    op: int = mpi_ops.Average,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
    ignore_name_scope: bool = False,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> tf.Tensor:
    """Reduces `tensor` over the ranks; each rank keeps a slice of the rows.

    Rank `i` of `n` receives rows `[i*k + min(i, r), ...)`, where the first
    dimension is `k*n + r`: the first `r` ranks get one row more.

    Args:
        tensor: a tensor of rank >= 1, the same shape on every rank.
        device_dense: accepted for compatibility. Defaults to `""`.
        compression: a `hvd.Compression`. Defaults to `Compression.none`.
        op: the reduction. Defaults to `hvd.Average`.
        name: the name that matches it across ranks. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.
        ignore_name_scope: accepted for compatibility. Defaults to `False`.
        prescale_factor: multiplies the input. Defaults to `1.0`.
        postscale_factor: multiplies the result. Defaults to `1.0`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.reducescatter(tf.constant([1.0, 2.0]), op=hvd.Sum).numpy()
    array([1., 2.], dtype=float32)
    """
    del device_dense, ignore_name_scope
    op = resolve_op(op)
    # The factors go to the op, as in Horovod: it scales integers in float64
    # and float16 in float32 (a multiply in the tensor's dtype truncated an
    # integer factor to 0).
    compressed, ctx = compression.compress(tf.convert_to_tensor(tensor))
    out = mpi_ops.reducescatter(compressed, name=name, op=op,
                                prescale_factor=float(prescale_factor),
                                postscale_factor=float(postscale_factor),
                                process_set_id=process_set_id_of(process_set))
    return compression.decompress(out, ctx)


def grouped_reducescatter(
    tensors: Sequence[Any],
    device_dense: str = "",
    compression: type[Compressor] = Compression.none,
    op: int = mpi_ops.Average,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> list[tf.Tensor]:
    """Reduce-scatters a list of tensors as one unit (see `reducescatter`).

    Args:
        tensors: tensors of rank >= 1.
        device_dense: accepted for compatibility. Defaults to `""`.
        compression: a `hvd.Compression`. Defaults to `Compression.none`.
        op: the reduction. Defaults to `hvd.Average`.
        name: the group's name. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.
        prescale_factor: multiplies the inputs. Defaults to `1.0`.
        postscale_factor: multiplies the results. Defaults to `1.0`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> [t.numpy() for t in hvd.grouped_reducescatter([tf.ones([2])], op=hvd.Sum)]
    [array([1., 1.], dtype=float32)]
    """
    del device_dense
    op = resolve_op(op)
    pairs = [compression.compress(tf.convert_to_tensor(t)) for t in tensors]
    outs = mpi_ops.grouped_reducescatter(
        [p[0] for p in pairs], name=name, op=op,
        prescale_factor=float(prescale_factor),
        postscale_factor=float(postscale_factor),
        process_set_id=process_set_id_of(process_set))
    return [compression.decompress(o, p[1]) for o, p in zip(outs, pairs)]


def join(process_set: ProcessSet = global_process_set) -> tf.Tensor:
    """Waits until every rank joined; returns the last rank that joined.

    A rank that ran out of data calls `join()` while the others continue:
    their collectives proceed, with this rank contributing zeros.

    Args:
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> int(hvd.join())
    0
    """
    return mpi_ops.join(process_set_id=process_set_id_of(process_set))


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Blocks until every rank of the process set reached the barrier.

    Args:
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.barrier()
    """
    mpi_ops.barrier(process_set_id=process_set_id_of(process_set))
