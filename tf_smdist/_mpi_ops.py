"""Loads the MPI op library; wrappers for its ops and its C control plane."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import tensorflow as tf

__all__ = [
    "LIBRARY_NAME",
    "INSTALL_HINT",
    "load_library",
    "init",
    "is_initialized",
    "rank",
    "size",
    "create_comm",
    "destroy_comm",
    "comm_rank",
    "comm_size",
    "host_allreduce",
    "broadcast",
    "send",
    "recv",
    "allgather",
    "allgather_slices",
    "allreduce_array",
    "alltoallv_array",
    "reduce_scatter_array",
    "allgather_bytes",
    "broadcast_bytes",
    "send_bytes",
    "recv_bytes",
    "barrier",
    "shutdown",
    "time_native_allreduce",
    "MAX_GROUPS",
    "MAX_SUB_GROUPS",
    "MAX_TAG",
]

LIBRARY_NAME = "libsmdist_mpi.so"
INSTALL_HINT = "apt-get install openmpi-bin libopenmpi-dev"
# Independent ordering groups of the world and of each communicator made by
# create_comm, and the largest point-to-point tag (kernels/mpi/comm.h).
MAX_GROUPS = 64
MAX_SUB_GROUPS = 8
MAX_TAG = (1 << 20) - 1
_ERR_LEN = 4096
# The enums of kernels/mpi/comm.h (a test parses the header and compares).
_DTYPES = {
    "float32": 0, "float64": 1, "float16": 2, "bfloat16": 3, "int32": 4,
    "int64": 5, "uint8": 6, "int8": 7, "int16": 8, "uint16": 9, "bool": 10,
}
_REDUCTIONS = {"sum": 0, "min": 1, "max": 2, "prod": 3}
_KINDS = {
    "allreduce": 0, "broadcast": 1, "allgather": 2, "barrier": 3, "allgatherv": 4,
    "alltoallv": 5, "reduce_scatter": 6, "send": 7, "recv": 8, "benchmark": 9,
}
_ERRORS = {
    1: tf.errors.InvalidArgumentError,
    2: tf.errors.DeadlineExceededError,
    3: tf.errors.FailedPreconditionError,
    4: tf.errors.InternalError,
}
_NP_TYPES = {np.dtype(name): code for name, code in _DTYPES.items()
             if name != "bfloat16"}
_NP_TYPES[np.dtype(ml_dtypes.bfloat16)] = _DTYPES["bfloat16"]
_NP_NAMES = ", ".join(sorted(_DTYPES))

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_ops: Any = None
_cdll: ctypes.CDLL | None = None


def _path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)


def _recorded_mpi_library() -> str | None:
    """The libmpi that setup.py linked the op library against, or None."""
    try:
        from tf_smdist import _build_info  # noqa: PLC0415 (written by setup.py)
    except ImportError:
        return None
    return getattr(_build_info, "MPI_LIBRARY", None)


def _find_mpi_library() -> str | None:
    return ctypes.util.find_library("mpi")


def _open_global(path: str) -> None:
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _preload_mpi() -> None:
    # Open MPI opens its plugins with dlopen and expects libmpi's symbols to
    # be global; TensorFlow loads op libraries with RTLD_LOCAL. Load exactly
    # the libmpi the op library was linked against: another MPI (whose
    # MPI_Comm differs) found first on the search path would break it.
    recorded = _recorded_mpi_library()
    if recorded and os.path.exists(recorded):
        _open_global(recorded)
        return
    name = _find_mpi_library()
    if name is None:
        raise ImportError(
            "The MPI library (libmpi.so) was not found, so tf_smdist cannot run "
            "more than one process. Install Open MPI: `" + INSTALL_HINT + "` "
            "(then rebuild tf_smdist with `pip install .` so that its MPI op "
            "library is compiled)."
        )
    logger.warning(
        "tf_smdist: the MPI library that tf_smdist was built against (%s) is "
        "missing; loading %s from the library search path instead. If that is "
        "another MPI, rebuild tf_smdist (`pip install --force-reinstall .`).",
        recorded or "not recorded", name)
    _open_global(name)


def load_library() -> Any:
    """Loads `libsmdist_mpi.so` once and returns its op module.

    The library is built by setup.py only when Open MPI's `mpicc` is found.

    Returns:
        The module of TensorFlow ops (`smdist_host_allreduce`,
        `smdist_mpi_broadcast`).

    Raises:
        ImportError: Open MPI or the library is missing, or it was built
            against another TensorFlow; the message says what to install.

    Example:
    >>> ops = load_library()  # doctest: +SKIP
    >>> hasattr(ops, "smdist_host_allreduce")  # doctest: +SKIP
    True
    """
    global _ops, _cdll
    with _lock:
        if _ops is not None:
            return _ops
        path = _path()
        if not os.path.exists(path):
            raise ImportError(
                f"The tf_smdist MPI op library was not found at {path}. It is "
                "built only when Open MPI is installed: run `" + INSTALL_HINT + "`, "
                "then `pip install .` (or `python setup.py build_ext --inplace` in "
                "a source checkout)."
            )
        _preload_mpi()
        try:
            ops = tf.load_op_library(path)
        except tf.errors.NotFoundError as e:
            raise ImportError(
                f"The tf_smdist MPI op library at {path} failed to load: {e}. It was "
                "probably built against another TensorFlow or MPI; install Open MPI "
                "(`" + INSTALL_HINT + "`) and rebuild with `pip install "
                "--force-reinstall .`."
            ) from e
        cdll = ctypes.CDLL(path)
        _declare(cdll)
        _cdll = cdll
        _ops = ops
        return _ops


def _declare(cdll: ctypes.CDLL) -> None:
    """Declares the C entry points' argument and result types."""
    c_int, c_ll, c_ptr, c_str = (ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p,
                                 ctypes.c_char_p)
    ll_ptr = ctypes.POINTER(ctypes.c_longlong)
    out_ptr = ctypes.POINTER(ctypes.c_void_p)
    cdll.smdist_mpi_init.argtypes = [ctypes.c_double, ctypes.c_double, c_str, c_int]
    cdll.smdist_mpi_create_comm.argtypes = [
        ctypes.POINTER(ctypes.c_int), c_int, ctypes.POINTER(ctypes.c_int), c_str, c_int]
    cdll.smdist_mpi_destroy_comm.argtypes = [c_int, c_str, c_int]
    cdll.smdist_mpi_comm_rank.argtypes = [c_int]
    cdll.smdist_mpi_comm_size.argtypes = [c_int]
    cdll.smdist_mpi_request.argtypes = [
        c_int, c_ptr, c_ll, c_ptr, c_ll, c_ll, ll_ptr, ll_ptr, c_int, c_int, c_int,
        c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_str, c_int]
    cdll.smdist_mpi_allgather_bytes.argtypes = [
        c_ptr, c_ll, c_int, c_int, out_ptr, ll_ptr, c_str, c_int]
    cdll.smdist_mpi_broadcast_bytes.argtypes = [
        c_ptr, c_ll, c_int, c_int, c_int, ctypes.c_double, out_ptr, ll_ptr, c_str,
        c_int]
    cdll.smdist_mpi_free.argtypes = [c_ptr]
    cdll.smdist_mpi_shutdown.argtypes = [c_str, c_int]
    cdll.smdist_mpi_abort.argtypes = [c_str]
    cdll.smdist_mpi_abort.restype = None
    cdll.smdist_mpi_time_native_allreduce.argtypes = [c_ll, c_int]
    cdll.smdist_mpi_time_native_allreduce.restype = ctypes.c_double


def _lib() -> ctypes.CDLL:
    load_library()
    if _cdll is None:  # pragma: no cover (load_library sets it or raises)
        raise ImportError("The tf_smdist MPI library did not load.")
    return _cdll


def _check(code: int, err: ctypes.Array) -> None:
    if code == 0:
        return
    message = err.value.decode("utf-8", "replace")
    raise _ERRORS.get(code, tf.errors.UnknownError)(None, None, message)


def init(*, timeout: float = 60.0, heartbeat: float = 1.0) -> None:
    """Initialises MPI on the communication thread (idempotent).

    Args:
        timeout: seconds a collective may take before the watchdog fails it
            with an error naming the late ranks. Defaults to `60.0`.
        heartbeat: seconds between heartbeats (each rank sends one per period
            to the next rank of a ring and watches the previous one).
            Defaults to `1.0`.

    Example:
    >>> init(timeout=30.0)  # doctest: +SKIP
    """
    err = ctypes.create_string_buffer(_ERR_LEN)
    _check(_lib().smdist_mpi_init(float(timeout), float(heartbeat), err, _ERR_LEN), err)


def is_initialized() -> bool:
    """Whether the communication thread is running (False before `init`).

    Example:
    >>> is_initialized()  # doctest: +SKIP
    False
    """
    if _cdll is None:
        return False
    return bool(_cdll.smdist_mpi_initialized())


def rank() -> int:
    """This process's rank in MPI_COMM_WORLD (after `init`).

    Example:
    >>> rank()  # doctest: +SKIP
    0
    """
    return int(_lib().smdist_mpi_rank())


def size() -> int:
    """The number of processes in MPI_COMM_WORLD (after `init`).

    Example:
    >>> size()  # doctest: +SKIP
    2
    """
    return int(_lib().smdist_mpi_size())


def create_comm(ranks: Sequence[int]) -> int:
    """Makes a communicator over a subset of the world's ranks.

    Collective over the whole world: every rank calls it, in the same order,
    with the same `ranks` (checked: a different list on any rank raises
    `FailedPreconditionError` on every rank, naming both lists). Its members
    are numbered 0..n-1 in the order of `ranks`; pass the returned id as
    `comm=` to the collectives, `send` and `recv`. It has its own
    `MAX_SUB_GROUPS` ordering groups, independent of the world's.

    Args:
        ranks: distinct world ranks.

    Returns:
        The communicator's id (> 0) on its members, -1 on the other ranks.

    Raises:
        tf.errors.FailedPreconditionError: the ranks passed different lists.
        tf.errors.InvalidArgumentError: `ranks` is empty, repeats a rank or
            names one outside the world.

    Example:
    >>> evens = create_comm([0, 2])  # doctest: +SKIP
    >>> if evens >= 0:  # doctest: +SKIP
    ...     print(host_allreduce(tf.ones([2]), comm=evens).numpy())
    [2. 2.]
    """
    values = [int(r) for r in ranks]
    array = (ctypes.c_int * max(1, len(values)))(*values)
    out = ctypes.c_int(-1)
    err = ctypes.create_string_buffer(_ERR_LEN)
    _check(_lib().smdist_mpi_create_comm(array, len(values), ctypes.byref(out), err,
                                          _ERR_LEN), err)
    return int(out.value)


def destroy_comm(comm: int) -> None:
    """Frees a communicator of `create_comm` once its queued work is done.

    Every member calls it (blocking).

    Args:
        comm: the id `create_comm` returned.

    Example:
    >>> destroy_comm(evens)  # doctest: +SKIP
    """
    err = ctypes.create_string_buffer(_ERR_LEN)
    _check(_lib().smdist_mpi_destroy_comm(int(comm), err, _ERR_LEN), err)


def comm_rank(comm: int = 0) -> int:
    """This process's rank in communicator `comm` (-1 if not a member).

    Args:
        comm: a communicator id; 0 is the world. Defaults to `0`.

    Example:
    >>> comm_rank(evens)  # doctest: +SKIP
    1
    """
    return int(_lib().smdist_mpi_comm_rank(int(comm)))


def comm_size(comm: int = 0) -> int:
    """The number of processes in communicator `comm` (-1 if not a member).

    Args:
        comm: a communicator id; 0 is the world. Defaults to `0`.

    Example:
    >>> comm_size(evens)  # doctest: +SKIP
    2
    """
    return int(_lib().smdist_mpi_comm_size(int(comm)))


def host_allreduce(
    tensor: Any,
    *,
    reduction: str = "sum",
    group: int = 0,
    index: int = 0,
    group_size: int = 1,
    comm: int = 0,
) -> tf.Tensor:
    """All-reduces a host tensor across processes on the communication thread.

    Collectives of one `group` start strictly in `index` order (cycling
    through `[0, group_size)`), which must be the same on every rank: a
    bucket plan uses one group and its buckets' positions as indices.
    Collectives of different groups are independent. Group 0 with
    `group_size=1` is the ordered control group (eager calls).

    Args:
        tensor: a float32, float64, float16, bfloat16, int8, int16, int32,
            int64, uint8, uint16 or bool tensor. 16-bit floats are reduced
            through float32 and rounded to nearest even after each step;
            bool: sum and max are a logical or, min and prod a logical and.
        reduction: `"sum"`, `"min"`, `"max"` or `"prod"`. Defaults to `"sum"`.
        group: the ordering group, in `[0, 64)` for the world, `[0, 8)` for a
            communicator of `create_comm`. Defaults to `0`.
        index: this collective's position in the group's cycle.
            Defaults to `0`.
        group_size: the length of the group's cycle. Defaults to `1`.
        comm: the communicator: 0 for the world, else an id from
            `create_comm`. Defaults to `0`.

    Returns:
        The reduced tensor, same shape and dtype, on the host.

    Example:
    >>> host_allreduce(tf.ones([4]))  # doctest: +SKIP
    <tf.Tensor: shape=(4,), dtype=float32, numpy=array([2., 2., 2., 2.], ...)>
    """
    _check_reduction(reduction)
    _check_group(group, index, group_size)
    with tf.device("/CPU:0"):
        return load_library().smdist_host_allreduce(
            tf.convert_to_tensor(tensor), reduction=reduction, group=group,
            index=index, group_size=group_size, comm=int(comm))


def broadcast(
    tensor: Any, *, root: int = 0, group: int = 0, comm: int = 0
) -> tf.Tensor:
    """Returns `root`'s value of `tensor` on every process.

    Args:
        tensor: a numeric or bool tensor of the same shape on every rank.
        root: the sending rank (a rank of `comm`). Defaults to `0`.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Example:
    >>> broadcast(tf.constant([float(rank())]))  # doctest: +SKIP
    <tf.Tensor: shape=(1,), dtype=float32, numpy=array([0.], dtype=float32)>
    """
    _check_group(group, 0, 1)
    with tf.device("/CPU:0"):
        return load_library().smdist_mpi_broadcast(
            tf.convert_to_tensor(tensor), root=int(root), group=group, comm=int(comm))


def send(tensor: Any, *, peer: int, tag: int, comm: int = 0) -> tf.Tensor:
    """Sends `tensor` to rank `peer` of `comm`; the receiver matches `tag`.

    The op completes as soon as the communication thread has the send (it
    posts it at once and keeps the buffer until delivered), so a sequence of
    sends never waits for the receivers, and sends and receives issued in any
    order on the two sides cannot deadlock as long as each rank's receives
    come in an order its peers' sends can satisfy. A send that later fails
    (the receiver died) fails every later MPI op of this process.

    Args:
        tensor: the data (any shape; the receiver gives the same shape and
            dtype).
        peer: the receiving rank, a rank of `comm`.
        tag: matches this message to the receive, in `[0, 2**20)`. Messages
            with the same (peer, tag) arrive in order.
        comm: the communicator. Defaults to `0` (the world).

    Returns:
        A scalar int32 token, produced once the send is issued (use it as a
        control dependency to keep the send in a graph).

    Example:
    >>> token = send(tf.ones([2, 3]), peer=1, tag=5)  # doctest: +SKIP
    """
    _check_peer_tag(peer, tag)
    with tf.device("/CPU:0"):
        return load_library().smdist_mpi_send(
            tf.convert_to_tensor(tensor), peer=int(peer), tag=int(tag), comm=int(comm))


def recv(shape: Any, dtype: Any, *, peer: int, tag: int, comm: int = 0) -> tf.Tensor:
    """Receives a tensor of `shape` and `dtype` from rank `peer` of `comm`.

    Args:
        shape: the message's shape: a list of ints or a 1-D integer tensor.
            A message of another size raises `InvalidArgumentError`.
        dtype: the message's dtype (a `tf.DType` or its name).
        peer: the sending rank, a rank of `comm`.
        tag: the tag the sender used, in `[0, 2**20)`.
        comm: the communicator. Defaults to `0` (the world).

    Returns:
        The received tensor, on the host.

    Example:
    >>> recv([2, 3], tf.float32, peer=0, tag=5)  # doctest: +SKIP
    <tf.Tensor: shape=(2, 3), dtype=float32, numpy=...>
    """
    _check_peer_tag(peer, tag)
    with tf.device("/CPU:0"):
        shape_t = tf.cast(tf.reshape(tf.convert_to_tensor(shape), [-1]), tf.int64)
        return load_library().smdist_mpi_recv(
            shape_t, dtype=tf.as_dtype(dtype), peer=int(peer), tag=int(tag),
            comm=int(comm))


def allgather(tensor: Any, *, group: int = 0, comm: int = 0) -> tf.Tensor:
    """Concatenates every rank's `tensor` along the first dimension.

    The first dimension may differ per rank; the others must agree (else
    `FailedPreconditionError` on every rank). Ranks' parts come in rank
    order.

    Args:
        tensor: a tensor of rank >= 1.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Example:
    >>> allgather(tf.fill([rank() + 1, 2], rank()))  # doctest: +SKIP
    <tf.Tensor: shape=(3, 2), dtype=int32, numpy=array([[0, 0], [1, 1], [1, 1]], ...)>
    """
    _check_group(group, 0, 1)
    with tf.device("/CPU:0"):
        return load_library().smdist_mpi_allgather(
            tf.convert_to_tensor(tensor), group=group, comm=int(comm))


def allgather_slices(values: Any, indices: Any, row_shape: Any, *, group: int = 0,
                     comm: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    """Every rank's rows of a sparse gradient, concatenated in rank order.

    Two all-gathers in `group`, the values (as `[rows, row elements]`) then
    the indices, which wait for the values so every rank issues them in the
    same order; the row counts may differ per rank.

    Args:
        values: this rank's rows (any shape whose rows have `row_shape`).
        indices: this rank's row indices.
        row_shape: the static shape of one row.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Returns:
        `(values, indices)`: values shaped `[all rows, row elements]`.

    Raises:
        ValueError: `row_shape` is not fully defined.

    Example:
    >>> allgather_slices(g.values, g.indices, g.values.shape[1:])  # doctest: +SKIP
    """
    row_shape = tf.TensorShape(row_shape)
    if not row_shape.is_fully_defined():
        raise ValueError(
            "Sparse gradients need a static row shape across processes. "
            f"Received: row shape={row_shape}. Give the layer a static "
            "output shape.")
    rows = tf.reshape(values, [-1, row_shape.num_elements()])
    all_values = allgather(rows, group=group, comm=comm)
    with tf.control_dependencies([all_values]):
        all_indices = allgather(indices, group=group, comm=comm)
    return all_values, all_indices


@tf.RegisterGradient("SmdistMpiAllgather")
def _allgather_grad(op: Any, grad: tf.Tensor) -> tf.Tensor:
    """The gradient of a rank's part: its rows of the sum of every rank's grad."""
    comm = op.get_attr("comm")
    group = op.get_attr("group")
    rows = allgather(tf.shape(op.inputs[0], out_type=tf.int64)[:1], group=group,
                     comm=comm)
    with tf.control_dependencies([rows]):
        total = host_allreduce(grad, group=group, comm=comm)
    me = comm_rank(comm)
    start = tf.reduce_sum(rows[:me])
    return total[start:start + rows[me]]


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            "`reduction` must be one of 'sum', 'min', 'max', 'prod'. "
            f"Received: reduction={reduction!r}")


def _check_group(group: int, index: int, group_size: int) -> None:
    if not 0 <= group < MAX_GROUPS:
        raise ValueError(
            f"`group` must be in [0, {MAX_GROUPS}). Received: group={group}")
    if not (group_size >= 1 and 0 <= index < group_size):
        raise ValueError(
            "`index` must be in [0, group_size). "
            f"Received: index={index}, group_size={group_size}")


def _check_peer_tag(peer: int, tag: int) -> None:
    if not 0 <= int(tag) <= MAX_TAG:
        raise ValueError(f"`tag` must be in [0, {MAX_TAG}]. Received: tag={tag}")
    if int(peer) < 0:
        raise ValueError(f"`peer` must be a rank (>= 0). Received: peer={peer}")


def _array(array: Any) -> np.ndarray:
    out = np.ascontiguousarray(np.array(array, copy=True))
    if out.dtype not in _NP_TYPES:
        raise TypeError(
            f"`array` must have one of the dtypes {_NP_NAMES}. "
            f"Received: dtype={out.dtype}")
    return out


def _counts(values: Sequence[int] | None) -> Any:
    if values is None:
        return None
    return (ctypes.c_longlong * max(1, len(values)))(*[int(v) for v in values])


def _request(kind: str, *, send: np.ndarray | None = None,
             recv: np.ndarray | None = None, count: int = 0,
             counts: Sequence[int] | None = None,
             recv_counts: Sequence[int] | None = None, dtype: int = 6,
             reduction: str = "sum", root: int = 0, peer: int = -1, tag: int = 0,
             comm: int = 0, group: int = 0) -> None:
    """Runs one blocking request on C++-owned copies of `send` and `recv`."""
    err = ctypes.create_string_buffer(_ERR_LEN)
    ncounts = len(counts) if counts is not None else 0
    code = _lib().smdist_mpi_request(
        _KINDS[kind],
        send.ctypes.data if send is not None else None,
        send.nbytes if send is not None else 0,
        recv.ctypes.data if recv is not None else None,
        recv.nbytes if recv is not None else 0,
        int(count), _counts(counts), _counts(recv_counts), ncounts, dtype,
        _REDUCTIONS[reduction], int(root), int(peer), int(tag), int(comm), int(group),
        0, 1, err, _ERR_LEN)
    _check(code, err)


def allreduce_array(
    array: Any, *, reduction: str = "sum", group: int = 0, comm: int = 0
) -> np.ndarray:
    """All-reduces a NumPy array across processes (blocking).

    Args:
        array: values of a dtype of `host_allreduce` (bfloat16 as
            `ml_dtypes.bfloat16`).
        reduction: `"sum"`, `"min"`, `"max"` or `"prod"`. Defaults to `"sum"`.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Returns:
        A new array holding the reduction over all ranks.

    Example:
    >>> allreduce_array(np.ones(2, np.float32))  # doctest: +SKIP
    array([2., 2.], dtype=float32)
    """
    out = _array(array)
    _check_reduction(reduction)
    _check_group(group, 0, 1)
    _request("allreduce", recv=out, count=out.size, dtype=_NP_TYPES[out.dtype],
             reduction=reduction, comm=comm, group=group)
    return out


def alltoallv_array(
    array: Any, send_counts: Sequence[int], recv_counts: Sequence[int], *,
    group: int = 0, comm: int = 0,
) -> np.ndarray:
    """Sends `send_counts[r]` elements of `array` to each rank r (blocking).

    The flat `array` is cut into consecutive pieces of `send_counts`
    elements; rank r's piece goes to rank r. The result concatenates the
    pieces received from every rank in rank order (`recv_counts[r]` from r).

    Args:
        array: the values to send (flattened).
        send_counts: elements to each rank of `comm`.
        recv_counts: elements from each rank of `comm`.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Example:
    >>> alltoallv_array(np.arange(3.0), [1, 2], [1, 1])  # doctest: +SKIP
    array([0., 1.])
    """
    data = _array(array).reshape(-1)
    out = np.zeros(int(sum(recv_counts)), data.dtype)
    _check_group(group, 0, 1)
    _request("alltoallv", send=data, recv=out, counts=list(send_counts),
             recv_counts=list(recv_counts), dtype=_NP_TYPES[data.dtype], comm=comm,
             group=group)
    return out


def reduce_scatter_array(
    array: Any, counts: Sequence[int], *, reduction: str = "sum", group: int = 0,
    comm: int = 0,
) -> np.ndarray:
    """Reduces `array` across ranks; rank r keeps its `counts[r]` elements.

    Args:
        array: `sum(counts)` values (flattened), the same length on every rank.
        counts: elements kept by each rank of `comm`, in rank order.
        reduction: `"sum"`, `"min"`, `"max"` or `"prod"`. Defaults to `"sum"`.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Example:
    >>> reduce_scatter_array(np.ones(3, np.float32), [1, 2])  # doctest: +SKIP
    array([2.], dtype=float32)
    """
    data = _array(array).reshape(-1)
    if data.size != sum(counts):
        raise ValueError(
            "`array` must hold sum(counts) elements. "
            f"Received: array.size={data.size}, counts={list(counts)}")
    _check_reduction(reduction)
    _check_group(group, 0, 1)
    me = comm_rank(comm)
    out = np.zeros(int(counts[me]) if 0 <= me < len(counts) else 0, data.dtype)
    _request("reduce_scatter", send=data, recv=out, counts=list(counts),
             dtype=_NP_TYPES[data.dtype], reduction=reduction, comm=comm, group=group)
    return out


def allgather_bytes(data: bytes, *, group: int = 0, comm: int = 0) -> list[bytes]:
    """Gathers `data` from every rank (the length may differ per rank).

    Args:
        data: this rank's bytes.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Returns:
        A list with each rank's bytes, in rank order.

    Example:
    >>> allgather_bytes(b"ab")  # doctest: +SKIP
    [b'ab', b'ab']
    """
    data = bytes(data)
    n = comm_size(comm)
    lengths = (ctypes.c_longlong * max(1, n))()
    out = ctypes.c_void_p()
    err = ctypes.create_string_buffer(_ERR_LEN)
    lib = _lib()
    code = lib.smdist_mpi_allgather_bytes(data, len(data), int(comm), int(group),
                                          ctypes.byref(out), lengths, err, _ERR_LEN)
    _check(code, err)
    try:
        total = sum(lengths[:n])
        raw = ctypes.string_at(out.value, total) if total else b""
    finally:
        lib.smdist_mpi_free(out)
    parts, offset = [], 0
    for k in range(n):
        parts.append(raw[offset:offset + lengths[k]])
        offset += lengths[k]
    return parts


def broadcast_bytes(data: bytes, *, root: int = 0, group: int = 0,
                    comm: int = 0, timeout: float | None = None) -> bytes:
    """Returns `root`'s `data` on every rank (any length).

    Args:
        data: the bytes to send (ignored on ranks other than `root`).
        root: the sending rank (a rank of `comm`). Defaults to `0`.
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).
        timeout: seconds to wait for a late `root` that is alive, when
            `root` legitimately works alone for long first (profiling a
            model); `None` keeps the usual deadline (`SMDIST_MPI_TIMEOUT`).
            A rank found dead, stopped or failed still fails the broadcast
            within the usual deadline.

    Example:
    >>> broadcast_bytes(b"hello")  # doctest: +SKIP
    b'hello'
    """
    data = bytes(data)
    out = ctypes.c_void_p()
    length = ctypes.c_longlong(0)
    err = ctypes.create_string_buffer(_ERR_LEN)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"`timeout` must be positive seconds or None. Received: "
                         f"timeout={timeout!r}")
    lib = _lib()
    _check(lib.smdist_mpi_broadcast_bytes(data, len(data), int(root), int(comm),
                                          int(group), float(timeout or 0.0),
                                          ctypes.byref(out),
                                          ctypes.byref(length), err, _ERR_LEN), err)
    try:
        return ctypes.string_at(out.value, length.value) if length.value else b""
    finally:
        lib.smdist_mpi_free(out)


def send_bytes(data: bytes, *, peer: int, tag: int, comm: int = 0) -> None:
    """Sends `data` to rank `peer` of `comm` (blocks until it is delivered).

    Args:
        data: the bytes.
        peer: the receiving rank, a rank of `comm`.
        tag: matches the receive, in `[0, 2**20)`.
        comm: the communicator. Defaults to `0` (the world).

    Example:
    >>> send_bytes(b"hi", peer=1, tag=3)  # doctest: +SKIP
    """
    _check_peer_tag(peer, tag)
    array = np.frombuffer(bytes(data), np.uint8)
    _request("send", send=array, count=array.size, peer=peer, tag=tag, comm=comm)


def recv_bytes(num_bytes: int, *, peer: int, tag: int, comm: int = 0) -> bytes:
    """Receives exactly `num_bytes` bytes from rank `peer` of `comm` (blocking).

    Args:
        num_bytes: the message's length (another length raises
            `InvalidArgumentError`).
        peer: the sending rank, a rank of `comm`.
        tag: the sender's tag, in `[0, 2**20)`.
        comm: the communicator. Defaults to `0` (the world).

    Example:
    >>> recv_bytes(2, peer=0, tag=3)  # doctest: +SKIP
    b'hi'
    """
    _check_peer_tag(peer, tag)
    out = np.zeros(int(num_bytes), np.uint8)
    _request("recv", recv=out, count=out.size, peer=peer, tag=tag, comm=comm)
    return out.tobytes()


def barrier(*, group: int = 0, comm: int = 0) -> None:
    """Blocks until every rank of `comm` reached the barrier (watchdog applies).

    Args:
        group: the ordering group. Defaults to `0`.
        comm: the communicator. Defaults to `0` (the world).

    Example:
    >>> barrier()  # doctest: +SKIP
    """
    _check_group(group, 0, 1)
    _request("barrier", comm=comm, group=group)


def abort(message: str) -> None:
    """Fails this rank's communication for good, telling the peers (after `init`).

    What is in flight or queued fails with `message`, new requests are
    refused, and a peer's collective or receive that needs this rank fails
    about half a second later instead of at the watchdog's timeout.
    For an error that would leave the peers waiting on this rank. Does
    nothing before `init`.

    Example:
    >>> abort("the stage's step could not be built")  # doctest: +SKIP
    """
    if _cdll is None or not is_initialized():
        return
    _cdll.smdist_mpi_abort(str(message).encode("utf-8", "replace"))


def shutdown() -> None:
    """Completes pending work and finalises MPI (after `init`; idempotent).

    After a watchdog failure MPI is left initialised: a collective in flight
    cannot be cancelled, so MPI_Finalize would wait for it forever.

    Example:
    >>> shutdown()  # doctest: +SKIP
    """
    if _cdll is None:
        return
    err = ctypes.create_string_buffer(_ERR_LEN)
    _check(_cdll.smdist_mpi_shutdown(err, _ERR_LEN), err)


def time_native_allreduce(num_elements: int, iters: int) -> float:
    """Seconds per blocking `MPI_Allreduce` of float32 values (MPI's own speed).

    Args:
        num_elements: float32 elements per all-reduce.
        iters: repetitions.

    Example:
    >>> time_native_allreduce(4096, 100)  # doctest: +SKIP
    1.1e-05
    """
    return float(_lib().smdist_mpi_time_native_allreduce(int(num_elements), int(iters)))
