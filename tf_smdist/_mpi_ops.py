"""Loads the MPI op library; wrappers for its ops and its C control plane."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Any

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
    "host_allreduce",
    "broadcast",
    "allreduce_array",
    "allgather_bytes",
    "broadcast_bytes",
    "barrier",
    "shutdown",
    "time_native_allreduce",
    "MAX_GROUPS",
]

LIBRARY_NAME = "libsmdist_mpi.so"
INSTALL_HINT = "apt-get install openmpi-bin libopenmpi-dev"
# Independent ordering groups of the communication thread (kernels/mpi/comm.h).
MAX_GROUPS = 64
_ERR_LEN = 4096
_REDUCTIONS = {"sum": 0, "min": 1, "max": 2}
_NP_TYPES = {
    np.dtype(np.float32): 0,
    np.dtype(np.float64): 1,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.uint8): 6,
}
_ERRORS = {
    1: tf.errors.InvalidArgumentError,
    2: tf.errors.DeadlineExceededError,
    3: tf.errors.FailedPreconditionError,
    4: tf.errors.InternalError,
}

_lock = threading.Lock()
_ops: Any = None
_cdll: ctypes.CDLL | None = None


def _path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)


def _preload_mpi() -> None:
    # Open MPI opens its plugins with dlopen and expects libmpi's symbols to
    # be global; TensorFlow loads op libraries with RTLD_LOCAL.
    name = ctypes.util.find_library("mpi")
    if name is None:
        raise ImportError(
            "The MPI library (libmpi.so) was not found, so tf_smdist cannot run "
            "more than one process. Install Open MPI: `" + INSTALL_HINT + "` "
            "(then rebuild tf_smdist with `pip install .` so that its MPI op "
            "library is compiled)."
        )
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


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
        cdll.smdist_mpi_init.argtypes = [
            ctypes.c_double, ctypes.c_double, ctypes.c_char_p, ctypes.c_int]
        cdll.smdist_mpi_allgather_bytes.argtypes = [
            ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_char_p,
            ctypes.c_int]
        cdll.smdist_mpi_broadcast_bytes.argtypes = [
            ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_char_p,
            ctypes.c_int]
        cdll.smdist_mpi_allreduce.argtypes = [
            ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        cdll.smdist_mpi_barrier.argtypes = [ctypes.c_char_p, ctypes.c_int]
        cdll.smdist_mpi_shutdown.argtypes = [ctypes.c_char_p, ctypes.c_int]
        cdll.smdist_mpi_time_native_allreduce.argtypes = [
            ctypes.c_longlong, ctypes.c_int]
        cdll.smdist_mpi_time_native_allreduce.restype = ctypes.c_double
        _cdll = cdll
        _ops = ops
        return _ops


def _lib() -> ctypes.CDLL:
    load_library()
    assert _cdll is not None
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
        heartbeat: seconds between heartbeats to the other ranks.
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


def host_allreduce(
    tensor: Any,
    *,
    reduction: str = "sum",
    group: int = 0,
    index: int = 0,
    group_size: int = 1,
) -> tf.Tensor:
    """All-reduces a host tensor across processes on the communication thread.

    Collectives of one `group` start strictly in `index` order (cycling
    through `[0, group_size)`), which must be the same on every rank: a
    bucket plan uses one group and its buckets' positions as indices.
    Collectives of different groups are independent. Group 0 with
    `group_size=1` is the ordered control group (eager calls).

    Args:
        tensor: a float32, float64, float16, bfloat16, int32 or int64 tensor.
        reduction: `"sum"`, `"min"` or `"max"` (16-bit floats: sum only).
            Defaults to `"sum"`.
        group: the ordering group, in `[0, 64)`. Defaults to `0`.
        index: this collective's position in the group's cycle.
            Defaults to `0`.
        group_size: the length of the group's cycle. Defaults to `1`.

    Returns:
        The reduced tensor, same shape and dtype, on the host.

    Example:
    >>> host_allreduce(tf.ones([4]))  # doctest: +SKIP
    <tf.Tensor: shape=(4,), dtype=float32, numpy=array([2., 2., 2., 2.], ...)>
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(
            "`reduction` must be one of 'sum', 'min', 'max'. "
            f"Received: reduction={reduction!r}"
        )
    _check_group(group, index, group_size)
    with tf.device("/CPU:0"):
        return load_library().smdist_host_allreduce(
            tf.convert_to_tensor(tensor), reduction=reduction, group=group,
            index=index, group_size=group_size)


def broadcast(tensor: Any, *, root: int = 0, group: int = 0) -> tf.Tensor:
    """Returns `root`'s value of `tensor` on every process.

    Args:
        tensor: a numeric or bool tensor of the same shape on every rank.
        root: the rank whose value is sent. Defaults to `0`.
        group: the ordering group. Defaults to `0`.

    Example:
    >>> broadcast(tf.constant([float(rank())]))  # doctest: +SKIP
    <tf.Tensor: shape=(1,), dtype=float32, numpy=array([0.], dtype=float32)>
    """
    _check_group(group, 0, 1)
    with tf.device("/CPU:0"):
        return load_library().smdist_mpi_broadcast(
            tf.convert_to_tensor(tensor), root=int(root), group=group)


def _check_group(group: int, index: int, group_size: int) -> None:
    if not 0 <= group < MAX_GROUPS:
        raise ValueError(
            f"`group` must be in [0, {MAX_GROUPS}). Received: group={group}")
    if not (group_size >= 1 and 0 <= index < group_size):
        raise ValueError(
            "`index` must be in [0, group_size). "
            f"Received: index={index}, group_size={group_size}")


def allreduce_array(
    array: Any, *, reduction: str = "sum", group: int = 0
) -> np.ndarray:
    """All-reduces a NumPy array across processes (blocking, control group).

    Args:
        array: float32/float64/int32/int64/uint8 values.
        reduction: `"sum"`, `"min"` or `"max"`. Defaults to `"sum"`.
        group: the ordering group. Defaults to `0`.

    Returns:
        A new array holding the reduction over all ranks.

    Example:
    >>> allreduce_array(np.ones(2, np.float32))  # doctest: +SKIP
    array([2., 2.], dtype=float32)
    """
    out = np.ascontiguousarray(np.array(array, copy=True))
    if out.dtype not in _NP_TYPES:
        raise TypeError(
            "`array` must be float32, float64, int32, int64 or uint8. "
            f"Received: dtype={out.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            "`reduction` must be one of 'sum', 'min', 'max'. "
            f"Received: reduction={reduction!r}")
    err = ctypes.create_string_buffer(_ERR_LEN)
    code = _lib().smdist_mpi_allreduce(
        out.ctypes.data, out.size, _NP_TYPES[out.dtype], _REDUCTIONS[reduction],
        group, 0, 1, err, _ERR_LEN)
    _check(code, err)
    return out


def allgather_bytes(data: bytes) -> list[bytes]:
    """Gathers `data` (the same length on every rank) from every rank.

    Args:
        data: this rank's bytes.

    Returns:
        A list with each rank's bytes, in rank order.

    Example:
    >>> allgather_bytes(b"ab")  # doctest: +SKIP
    [b'ab', b'ab']
    """
    n = len(data)
    world = size()
    send = ctypes.create_string_buffer(data, n)
    recv = ctypes.create_string_buffer(max(1, n * world))
    err = ctypes.create_string_buffer(_ERR_LEN)
    _check(_lib().smdist_mpi_allgather_bytes(send, n, recv, err, _ERR_LEN), err)
    raw = recv.raw
    return [raw[i * n:(i + 1) * n] for i in range(world)]


def broadcast_bytes(data: bytes, *, root: int = 0) -> bytes:
    """Returns `root`'s `data` on every rank (any length).

    Args:
        data: the bytes to send (ignored on ranks other than `root`).
        root: the sending rank. Defaults to `0`.

    Example:
    >>> broadcast_bytes(b"hello")  # doctest: +SKIP
    b'hello'
    """
    err = ctypes.create_string_buffer(_ERR_LEN)
    length = np.array([len(data)], np.int64)
    _check(_lib().smdist_mpi_broadcast_bytes(
        length.ctypes.data, 8, root, err, _ERR_LEN), err)
    n = int(length[0])
    buf = ctypes.create_string_buffer(data if rank() == root else b"", max(1, n))
    _check(_lib().smdist_mpi_broadcast_bytes(buf, n, root, err, _ERR_LEN), err)
    return buf.raw[:n]


def barrier() -> None:
    """Blocks until every rank reached the barrier (watchdog applies).

    Example:
    >>> barrier()  # doctest: +SKIP
    """
    err = ctypes.create_string_buffer(_ERR_LEN)
    _check(_lib().smdist_mpi_barrier(err, _ERR_LEN), err)


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
