"""Raw Horovod-compatible collectives: engine, process sets, one wrapper per op.

The collectives are TensorFlow ops handed to a negotiation engine (one per
process set, in C++) that matches them across ranks by name, so independent
collectives may be issued in a different order on each rank. Each wrapper
here adds only argument checks, a name and the gradient; the public
`tf_smdist.horovod` API builds on them.

Names: a collective called with `name=None` gets one generated
deterministically. Inside a graph (`tf.function`, `tf.compat.v1` graphs) it
is `"<kind>.<graph name>/<op name>"`, from the op's unique name in its graph
(the graph's name without a trailing `_<number>`), which is the same on
every rank that traces the same program. Unnamed collectives of two graphs
with the same name running at the same time can collide (an
`InvalidArgumentError` saying the name is already pending); pass `name=`
then. Eagerly it is
`"<kind>.eager.<n>"`, counting this process's unnamed eager calls of that
kind on that process set (assigned by the engine when the op runs, so the
eager kernel is reused), so ranks that make the same eager calls in the
same order agree. Explicit names must be unique among the collectives
pending at one time on a rank.

Tuning (environment variables, read by `init_engine`; the `SMDIST_` spelling
wins over the `HOROVOD_` one):
- `HOROVOD_CYCLE_TIME` / `SMDIST_CYCLE_TIME`: milliseconds between
  negotiation cycles while collectives are pending. Defaults to `1`.
- `HOROVOD_FUSION_THRESHOLD` / `SMDIST_FUSION_THRESHOLD`: bytes of one fused
  all-reduce buffer; `0` disables fusion. Defaults to 64 MiB.
- `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS` / `SMDIST_STALL_SHUTDOWN_TIME_SECONDS`:
  seconds a name may stay issued by some ranks but not others; then every
  collective pending in the process set fails, on every rank, with an error
  naming the stalled names and the ranks that did not issue them (the set
  stays usable). Defaults to the watchdog timeout (`SMDIST_MPI_TIMEOUT`,
  60 s), so a job never hangs on a name some rank never issues.
- `HOROVOD_STALL_CHECK_TIME_SECONDS` / `SMDIST_STALL_CHECK_TIME_SECONDS`:
  seconds after which rank 0 of the set prints a warning naming such a
  name and the ranks missing it. Defaults to half the stall shutdown time,
  at most 60. `HOROVOD_STALL_CHECK_DISABLE=1` turns the warning off.

In a single process (no MPI launcher) no MPI is used: every collective
returns its input (scaled by the prescale and postscale factors).

Errors: ranks that disagree about a name (collective, dtype, shape, reduce
op, root, scale factors) get `tf.errors.FailedPreconditionError` on every
rank, listing each rank's value; bad local input (`splits`, `root_rank`) is
`InvalidArgumentError` before any communication, and so is a name already
pending on this rank; a name issued by some ranks but not others for longer
than the stall time is `DeadlineExceededError` for every pending collective
of the set on every rank; a dead or stopped rank, or one that issues no
collective at all while others wait, is the watchdog's
`DeadlineExceededError` naming it.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import socket
import threading
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.data_parallel import cluster

__all__ = [
    "Adasum",
    "Average",
    "Max",
    "Min",
    "Product",
    "Sum",
    "add_process_set",
    "allgather",
    "allreduce",
    "alltoall",
    "barrier",
    "broadcast",
    "cross_rank",
    "cross_size",
    "debug_counters",
    "grouped_allgather",
    "grouped_allreduce",
    "grouped_reducescatter",
    "init_engine",
    "is_engine_initialized",
    "is_homogeneous",
    "join",
    "local_rank",
    "local_size",
    "process_set_ranks",
    "process_set_table",
    "rank",
    "reducescatter",
    "remove_process_set",
    "shutdown_engine",
    "size",
]

logger = logging.getLogger(__name__)

# Horovod's reduce op numbers.
Average = 0
Sum = 1
Adasum = 2
Min = 3
Max = 4
Product = 5
_OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min",
             Max: "Max", Product: "Product"}

_ERR_LEN = 4096
_ERRORS = {
    1: tf.errors.InvalidArgumentError,
    2: tf.errors.DeadlineExceededError,
    3: tf.errors.FailedPreconditionError,
    4: tf.errors.InternalError,
}
_COUNTER_NAMES = ("cycles", "executions", "fused_executions", "fused_tensors",
                  "mismatches", "stalls")
_DTYPES = (tf.uint8, tf.int8, tf.int16, tf.uint16, tf.int32, tf.int64, tf.float16,
           tf.bfloat16, tf.float32, tf.float64, tf.bool)

_lock = threading.RLock()
_state: dict[str, Any] = {
    "initialized": False, "rank": 0, "size": 1, "local_rank": 0, "local_size": 1,
    "cross_rank": 0, "cross_size": 1, "homogeneous": True, "sets": {},
    "next_set": 1, "free_sets": [], "cdll": None, "ops": None,
}

# Collectives of one tf.function may run concurrently and in any order (the
# engine matches them by name and fuses them); join and barrier keep
# program order.
_compat.unordered_in_functions(frozenset({
    "SmdistHvdAllreduce", "SmdistHvdGroupedAllreduce", "SmdistHvdAllgather",
    "SmdistHvdBroadcast", "SmdistHvdAlltoall", "SmdistHvdReducescatter"}))


# --- engine ------------------------------------------------------------------

def _env_number(name: str, default: float) -> float:
    for var in ("SMDIST_" + name, "HOROVOD_" + name):
        raw = os.environ.get(var, "")
        if raw:
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if value < 0:
                raise ValueError(
                    f"{var} must be a non-negative number. Received: {var}={raw!r}. "
                    "Unset it for the default.")
            return value
    return default


def _check(code: int, err: ctypes.Array) -> None:
    if code != 0:
        message = err.value.decode("utf-8", "replace")
        raise _ERRORS.get(code, tf.errors.UnknownError)(None, None, message)


def _bind(cdll: ctypes.CDLL) -> None:
    c_err = [ctypes.c_char_p, ctypes.c_int]
    cdll.smdist_hvd_init.argtypes = [ctypes.c_double, ctypes.c_longlong,
                                     ctypes.c_double, ctypes.c_double, *c_err]
    cdll.smdist_hvd_add_process_set.argtypes = [
        ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.POINTER(ctypes.c_int),
        *c_err]
    cdll.smdist_hvd_remove_process_set.argtypes = [ctypes.c_int, *c_err]
    cdll.smdist_hvd_counters.argtypes = [
        ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
    cdll.smdist_hvd_shutdown.argtypes = c_err


def _topology(world_rank: int, world_size: int) -> dict[str, Any]:
    """Local and cross ranks from every rank's host name (one gather)."""
    from tf_smdist import _mpi_ops  # noqa: PLC0415 (multi-process only)

    host = socket.gethostname().encode("utf-8")[:255].ljust(256, b"\0")
    hosts = [h.rstrip(b"\0") for h in _mpi_ops.allgather_bytes(host)]
    order = list(dict.fromkeys(hosts))
    mine = hosts[world_rank]
    local = [r for r in range(world_size) if hosts[r] == mine]
    sizes = {h: hosts.count(h) for h in order}
    return {
        "local_rank": local.index(world_rank), "local_size": len(local),
        "cross_rank": order.index(mine), "cross_size": len(order),
        "homogeneous": len(set(sizes.values())) == 1,
    }


def init_engine() -> None:
    """Starts the collective engine of the global process set (idempotent).

    Initialises the cluster (MPI, in a job of several processes) and starts
    the negotiation thread of process set 0. In a single process no MPI is
    used.

    Example:
    >>> init_engine()
    >>> size()
    1
    """
    with _lock:
        if _state["initialized"]:
            return
        world_rank, world_size = cluster.initialize()
        _state.update(rank=world_rank, size=world_size, local_rank=0, local_size=1,
                      cross_rank=0, cross_size=1, homogeneous=True, next_set=1,
                      free_sets=[])
        if world_size > 1:
            from tf_smdist import _mpi_ops  # noqa: PLC0415

            _state["ops"] = _mpi_ops.load_library()
            cdll = _mpi_ops._lib()  # noqa: SLF001 (this package's own library)
            _bind(cdll)
            cycle_ms = _env_number("CYCLE_TIME", 1.0)
            fusion = int(_env_number("FUSION_THRESHOLD", 64 * 1024 * 1024))
            stall = _env_number("STALL_SHUTDOWN_TIME_SECONDS", 0.0)
            if stall <= 0:
                stall = cluster._timeout_from_env()  # noqa: SLF001 (same package)
            warn = _env_number("STALL_CHECK_TIME_SECONDS", min(60.0, stall / 2))
            if _env_number("STALL_CHECK_DISABLE", 0.0) > 0:
                warn = 0.0
            err = ctypes.create_string_buffer(_ERR_LEN)
            code = cdll.smdist_hvd_init(cycle_ms / 1000.0, fusion, stall, warn, err,
                                        _ERR_LEN)
            _check(code, err)
            _state["cdll"] = cdll
            _state.update(_topology(world_rank, world_size))
            if not _state.get("atexit"):
                atexit.register(shutdown_engine)
                _state["atexit"] = True
        _state["sets"] = {0: list(range(world_size))}
        _state["initialized"] = True


def shutdown_engine() -> None:
    """Stops the engine's negotiation threads (idempotent).

    Collectives still pending on this rank fail. MPI itself stays up until
    the process exits (the cluster owns it), so `init_engine` may be called
    again.

    Example:
    >>> init_engine()
    >>> shutdown_engine()
    >>> is_engine_initialized()
    False
    """
    with _lock:
        if not _state["initialized"]:
            return
        cdll = _state["cdll"]
        _state.update(initialized=False, sets={}, cdll=None)
    if cdll is not None:
        err = ctypes.create_string_buffer(_ERR_LEN)
        _check(cdll.smdist_hvd_shutdown(err, _ERR_LEN), err)


def is_engine_initialized() -> bool:
    """Whether `init_engine` ran (and `shutdown_engine` did not since).

    Example:
    >>> is_engine_initialized() in (True, False)
    True
    """
    return bool(_state["initialized"])


def _require() -> None:
    if not _state["initialized"]:
        raise ValueError(
            "tf_smdist.horovod has not been initialized. Call hvd.init() first, in "
            "every process of the job.")


def _engine_value(key: str) -> int:
    """Returns the initialized engine's `key` entry of the job topology.

    Args:
        key: An entry of the engine state set by `init_engine`.

    Example:
    >>> init_engine(); _engine_value("size")
    1
    """
    _require()
    return int(_state[key])


def rank() -> int:
    """This process's rank in the job.

    Example:
    >>> init_engine(); rank()
    0
    """
    return _engine_value("rank")


def size() -> int:
    """The number of processes in the job.

    Example:
    >>> init_engine(); size()
    1
    """
    return _engine_value("size")


def local_rank() -> int:
    """This process's rank among the processes on its host.

    Example:
    >>> init_engine(); local_rank()
    0
    """
    return _engine_value("local_rank")


def local_size() -> int:
    """The number of processes on this process's host.

    Example:
    >>> init_engine(); local_size()
    1
    """
    return _engine_value("local_size")


def cross_rank() -> int:
    """The index of this process's host among the job's hosts (first-rank order).

    Example:
    >>> init_engine(); cross_rank()
    0
    """
    return _engine_value("cross_rank")


def cross_size() -> int:
    """The number of hosts in the job.

    Example:
    >>> init_engine(); cross_size()
    1
    """
    return _engine_value("cross_size")


def is_homogeneous() -> bool:
    """Whether every host runs the same number of processes.

    Example:
    >>> init_engine(); is_homogeneous()
    True
    """
    _require()
    return bool(_state["homogeneous"])


def debug_counters(process_set_id: int = 0) -> dict[str, int]:
    """The engine's counters of one process set on this rank (for tests, tuning).

    Keys: `cycles` (negotiation cycles), `executions` (collectives run),
    `fused_executions` (all-reduces that carried more than one tensor),
    `fused_tensors` (the tensors they carried), `mismatches`, `stalls`. All
    zero in a single process.

    Args:
        process_set_id: the process set. Defaults to `0`.

    Example:
    >>> init_engine(); debug_counters()["fused_executions"]
    0
    """
    _require()
    cdll = _state["cdll"]
    out = (ctypes.c_longlong * len(_COUNTER_NAMES))()
    if cdll is None or cdll.smdist_hvd_counters(int(process_set_id), out) != 0:
        return dict.fromkeys(_COUNTER_NAMES, 0)
    return {k: int(v) for k, v in zip(_COUNTER_NAMES, out)}


# --- process sets --------------------------------------------------------------

def add_process_set(ranks: Sequence[int]) -> int:
    """Registers a process set over `ranks` and returns its id.

    Every rank of the job calls it, in the same order with the same ranks
    (also the ranks outside the set). Collectives of the set are then
    called with `process_set_id=` by its members only.

    Args:
        ranks: distinct ranks of the job.

    Returns:
        The set's id (> 0), the same on every rank. As in Horovod, the ids of
        removed sets are given out again, the longest-removed first.

    Example:
    >>> init_engine()
    >>> ps = add_process_set([0])
    >>> process_set_ranks(ps)
    [0]
    >>> remove_process_set(ps)
    """
    _require()
    ranks = sorted(int(r) for r in ranks)
    world = _state["size"]
    if not ranks or len(set(ranks)) != len(ranks) or ranks[0] < 0 or ranks[-1] >= world:
        raise ValueError(
            f"A process set needs distinct ranks in [0, {world}). Received: "
            f"ranks={ranks}.")
    with _lock:
        cdll = _state["cdll"]
        if cdll is None:
            free = _state["free_sets"]
            set_id = free.pop(0) if free else _state["next_set"]
        else:
            arr = (ctypes.c_int * len(ranks))(*ranks)
            out = ctypes.c_int(-1)
            err = ctypes.create_string_buffer(_ERR_LEN)
            _check(cdll.smdist_hvd_add_process_set(arr, len(ranks), ctypes.byref(out),
                                                   err, _ERR_LEN), err)
            set_id = int(out.value)
        _state["next_set"] = max(_state["next_set"], set_id + 1)
        _state["sets"][set_id] = ranks
    return set_id


def remove_process_set(process_set_id: int) -> None:
    """Removes a process set made by `add_process_set` (every rank calls it).

    Args:
        process_set_id: the set's id.

    Example:
    >>> init_engine()
    >>> remove_process_set(add_process_set([0]))
    """
    _require()
    process_set_id = int(process_set_id)
    if process_set_id == 0 or process_set_id not in _state["sets"]:
        raise ValueError(
            "Only a process set made by add_process_set can be removed. Received: "
            f"process_set_id={process_set_id}.")
    with _lock:
        cdll = _state["cdll"]
        if cdll is not None:
            err = ctypes.create_string_buffer(_ERR_LEN)
            code = cdll.smdist_hvd_remove_process_set(process_set_id, err, _ERR_LEN)
            _check(code, err)
        del _state["sets"][process_set_id]
        _state["free_sets"].append(process_set_id)


def process_set_ranks(process_set_id: int) -> list[int]:
    """The ranks of a process set (0: every rank).

    Args:
        process_set_id: the set's id.

    Example:
    >>> init_engine(); process_set_ranks(0)
    [0]
    """
    _require()
    try:
        return list(_state["sets"][int(process_set_id)])
    except KeyError:
        raise ValueError(
            f"Unknown process set. Received: process_set_id={process_set_id}. Use 0 or "
            "an id returned by add_process_set.") from None


def process_set_table() -> dict[int, list[int]]:
    """Every registered process set: {id: its ranks}, id 0 (the world) first.

    Example:
    >>> init_engine(); process_set_table()
    {0: [0]}
    """
    _require()
    with _lock:
        return {k: list(v) for k, v in sorted(_state["sets"].items())}


class NotAMemberError(tf.errors.InvalidArgumentError, ValueError):
    """A collective of a process set was called on a rank outside it.

    Horovod's op fails with `tf.errors.InvalidArgumentError` here; it is
    also a `ValueError`, as tf_smdist raised before.
    """

    def __init__(self, message: str) -> None:
        super().__init__(None, None, message)


def _set_info(process_set_id: int) -> tuple[int, int]:
    """(this rank's rank in the set, the set's size); checks membership."""
    ranks = process_set_ranks(process_set_id)
    me = _state["rank"]
    if me not in ranks:
        raise NotAMemberError(
            f"Rank {me} is not a member of process set {process_set_id} (ranks "
            f"{ranks}). Received: process_set_id={process_set_id}. Call its "
            "collectives only on its members.")
    return ranks.index(me), len(ranks)


# --- names, checks -------------------------------------------------------------

def _refuse_xla(kind: str) -> None:
    """Raises inside a function XLA compiles: the engine's ops have no XLA kernel."""
    if not tf.executing_eagerly() and _compat.in_xla_context():
        raise ValueError(
            f"hvd.{kind} cannot run inside a function compiled with XLA: its op "
            "is a host collective without an XLA kernel. Received: a call inside "
            "tf.function(jit_compile=True) (or a Keras model compiled with "
            "jit_compile=True). Compile that function without jit_compile, or "
            "call the collective outside it.")


def _name(kind: str, name: str | None, process_set_id: int) -> str:
    _refuse_xla(kind)  # every collective that goes to the engine names its op here
    if name is not None:
        return str(name)
    if tf.executing_eagerly():
        return ""  # the engine counts unnamed eager calls
    graph = tf.compat.v1.get_default_graph()
    op_name = graph.unique_name(_OP_BASE[kind], mark_as_used=False)
    # Control-flow branch and loop-body graphs are named with a process-wide
    # counter ("while_body_123"), which can differ between ranks: drop it.
    label = _GRAPH_UID.sub("", getattr(graph, "name", None) or "graph")
    return f"{kind}.{label}/{op_name}"


_GRAPH_UID = re.compile(r"_\d+$")
_OP_BASE = {
    "allreduce": "HvdAllreduce", "grouped_allreduce": "HvdGroupedAllreduce",
    "allgather": "HvdAllgather", "broadcast": "HvdBroadcast", "alltoall": "HvdAlltoall",
    "reducescatter": "HvdReducescatter", "barrier": "HvdBarrier",
    "grouped_allgather": "HvdGroupedAllgather",
    "grouped_reducescatter": "HvdGroupedReducescatter",
}


def _check_op(op: int) -> int:
    op = int(op)
    if op == Adasum:
        raise NotImplementedError(
            "The Adasum reduction is not supported by tf_smdist.horovod. Received: "
            "op=Adasum. Use Average or Sum.")
    if op not in _OP_NAMES:
        raise ValueError(
            "`op` must be Average, Sum, Min, Max or Product. Received: "
            f"op={op!r}.")
    return op


def _tensor(value: Any) -> tf.Tensor:
    t = tf.convert_to_tensor(value)
    if t.dtype not in _DTYPES:
        raise TypeError(
            "tf_smdist.horovod collectives take uint8, int8, int16, uint16, int32, "
            "int64, float16, bfloat16, float32, float64 or bool tensors. Received: "
            f"dtype={t.dtype.name}.")
    return t


def _scaled(t: tf.Tensor, factor: float) -> tf.Tensor:
    """t * factor in t's dtype (integers truncate), as the engine does."""
    if factor == 1.0 or t.dtype == tf.bool:
        return tf.identity(t)
    if t.dtype.is_integer:
        return tf.cast(tf.cast(t, tf.float64) * factor, t.dtype)
    return tf.cast(tf.cast(t, tf.float32 if t.dtype in (tf.float16, tf.bfloat16)
                           else t.dtype) * factor, t.dtype)


def _ops() -> Any:
    return _state["ops"]


def _multi(process_set_id: int) -> bool:
    """Whether the collective needs the engine (this rank's set has > 1 rank
    or the job has several processes)."""
    _set_info(process_set_id)
    return _state["size"] > 1


# --- collectives -----------------------------------------------------------------

def allreduce(
    tensor: Any,
    *,
    name: str | None = None,
    op: int = Average,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set_id: int = 0,
) -> tf.Tensor:
    """Reduces `tensor` across the ranks of a process set.

    The result is `postscale_factor * reduce(prescale_factor * tensor)`;
    `Average` divides the sum by the set's size. Scaling happens in the
    tensor's dtype (integers truncate toward zero).

    Args:
        tensor: a tensor of the same shape and dtype on every rank.
        name: the name that matches it across ranks; `None` generates one
            (see the module docstring). Defaults to `None`.
        op: `Average`, `Sum`, `Min`, `Max` or `Product`. Defaults to
            `Average`.
        prescale_factor: multiplies the input before the reduction.
            Defaults to `1.0`.
        postscale_factor: multiplies the result. Defaults to `1.0`.
        process_set_id: the process set. Defaults to `0`.

    Returns:
        The reduced tensor.

    Example:
    >>> init_engine()
    >>> allreduce(tf.constant([1.0, 2.0]), op=Sum).numpy()
    array([1., 2.], dtype=float32)
    """
    op = _check_op(op)
    t = _tensor(tensor)
    if not _multi(process_set_id):
        return _scaled(_scaled(t, prescale_factor), postscale_factor)
    tensor_name = _name("allreduce", name, process_set_id)
    with tf.device("/CPU:0"):
        return _ops().smdist_hvd_allreduce(
            t, reduce_op=op, prescale_factor=float(prescale_factor),
            postscale_factor=float(postscale_factor), tensor_name=tensor_name,
            process_set_id=int(process_set_id), name=_OP_BASE["allreduce"])


def grouped_allreduce(
    tensors: Sequence[Any],
    *,
    name: str | None = None,
    op: int = Average,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set_id: int = 0,
) -> list[tf.Tensor]:
    """All-reduces several tensors announced together (so they fuse).

    Tensors of one dtype go in one op (named `name.0`, `name.1`, ... in
    their order); several dtypes make one op per dtype (`name.<dtype>`).

    Args:
        tensors: the tensors, the same list on every rank.
        name: the group's name. Defaults to `None` (generated).
        op: as in `allreduce`. Defaults to `Average`.
        prescale_factor: as in `allreduce`. Defaults to `1.0`.
        postscale_factor: as in `allreduce`. Defaults to `1.0`.
        process_set_id: the process set. Defaults to `0`.

    Returns:
        The reduced tensors, in order.

    Example:
    >>> init_engine()
    >>> [t.numpy() for t in grouped_allreduce([tf.ones([2]), tf.zeros([1])])]
    [array([1., 1.], dtype=float32), array([0.], dtype=float32)]
    """
    op = _check_op(op)
    ts = [_tensor(t) for t in tensors]
    if not ts:
        return []
    if not _multi(process_set_id):
        return [_scaled(_scaled(t, prescale_factor), postscale_factor) for t in ts]
    tensor_name = _name("grouped_allreduce", name, process_set_id)
    by_dtype: dict[tf.DType, list[int]] = {}
    for i, t in enumerate(ts):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list[Any] = [None] * len(ts)
    with tf.device("/CPU:0"):
        for dtype, idx in by_dtype.items():
            several = tensor_name and len(by_dtype) > 1
            group_name = f"{tensor_name}.{dtype.name}" if several else tensor_name
            results = _ops().smdist_hvd_grouped_allreduce(
                [ts[i] for i in idx], reduce_op=op,
                prescale_factor=float(prescale_factor),
                postscale_factor=float(postscale_factor), tensor_name=group_name,
                process_set_id=int(process_set_id), name=_OP_BASE["grouped_allreduce"])
            for i, r in zip(idx, results):
                out[i] = r
    return out


def allgather(
    tensor: Any, *, name: str | None = None, process_set_id: int = 0
) -> tf.Tensor:
    """Concatenates every rank's `tensor` along the first dimension, in rank order.

    The first dimension may differ per rank; the others must match.

    Args:
        tensor: a tensor of rank >= 1.
        name: the matching name. Defaults to `None` (generated).
        process_set_id: the process set. Defaults to `0`.

    Example:
    >>> init_engine()
    >>> allgather(tf.constant([[1, 2]])).numpy()
    array([[1, 2]], dtype=int32)
    """
    t = _tensor(tensor)
    if t.shape.rank == 0:
        raise ValueError(
            "allgather needs a tensor of rank >= 1 (it concatenates along the first "
            "dimension). Received: shape=(). Reshape a scalar to [1].")
    if not _multi(process_set_id):
        return tf.identity(t)
    tensor_name = _name("allgather", name, process_set_id)
    with tf.device("/CPU:0"):
        return _ops().smdist_hvd_allgather(
            t, tensor_name=tensor_name, process_set_id=int(process_set_id),
            name=_OP_BASE["allgather"])


def grouped_allgather(
    tensors: Sequence[Any], *, name: str | None = None, process_set_id: int = 0
) -> list[tf.Tensor]:
    """`allgather` of each tensor (named `name.0`, `name.1`, ...).

    Args:
        tensors: the tensors, the same list on every rank.
        name: the group's name. Defaults to `None` (generated).
        process_set_id: the process set. Defaults to `0`.

    Example:
    >>> init_engine()
    >>> [t.shape.as_list() for t in grouped_allgather([tf.ones([2, 3])])]
    [[2, 3]]
    """
    ts = list(tensors)
    if not ts:
        return []
    multi = _multi(process_set_id)
    base = _name("grouped_allgather", name, process_set_id) if multi else ""
    return [allgather(t, name=f"{base}.{i}" if base else None,
                      process_set_id=process_set_id) for i, t in enumerate(ts)]


def broadcast(
    tensor: Any, root_rank: int, *, name: str | None = None, process_set_id: int = 0
) -> tf.Tensor:
    """Returns `root_rank`'s value of `tensor` on every rank of the set.

    Args:
        tensor: a tensor of the same shape and dtype on every rank.
        root_rank: the sending rank, counted within the process set.
        name: the matching name. Defaults to `None` (generated).
        process_set_id: the process set. Defaults to `0`.

    Example:
    >>> init_engine()
    >>> broadcast(tf.constant([3.0]), 0).numpy()
    array([3.], dtype=float32)
    """
    t = _tensor(tensor)
    _, set_size = _set_info(process_set_id)
    root_rank = int(root_rank)
    if not 0 <= root_rank < set_size:
        raise tf.errors.InvalidArgumentError(
            None, None,
            f"`root_rank` must be a rank of the process set, in [0, {set_size}). "
            f"Received: root_rank={root_rank}.")
    if not _multi(process_set_id):
        return tf.identity(t)
    tensor_name = _name("broadcast", name, process_set_id)
    with tf.device("/CPU:0"):
        return _ops().smdist_hvd_broadcast(
            t, root_rank=root_rank, tensor_name=tensor_name,
            process_set_id=int(process_set_id), name=_OP_BASE["broadcast"])


def alltoall(
    tensor: Any,
    splits: Any = None,
    *,
    name: str | None = None,
    process_set_id: int = 0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Sends `splits[r]` rows of `tensor` to rank r; gathers what each rank sent here.

    Args:
        tensor: a tensor of rank >= 1 (the other dimensions match on every
            rank).
        splits: int32 rows per rank of the set, summing to the first
            dimension; `None` splits it equally. Defaults to `None`.
        name: the matching name. Defaults to `None` (generated).
        process_set_id: the process set. Defaults to `0`.

    Returns:
        `(received, received_splits)`: the rows from every rank in rank
        order, and how many came from each.

    Example:
    >>> init_engine()
    >>> out, got = alltoall(tf.constant([1, 2, 3]))
    >>> out.numpy(), got.numpy()
    (array([1, 2, 3], dtype=int32), array([3], dtype=int32))
    """
    t = _tensor(tensor)
    if t.shape.rank == 0:
        raise ValueError(
            "alltoall needs a tensor of rank >= 1 (it splits the first dimension). "
            "Received: shape=().")
    s = (tf.zeros([0], tf.int32) if splits is None
         else tf.cast(tf.convert_to_tensor(splits), tf.int32))
    if not _multi(process_set_id):
        rows = tf.shape(t, out_type=tf.int32)[:1]
        if splits is not None:
            tf.debugging.assert_equal(
                tf.reduce_sum(s), rows[0],
                message="`splits` must sum to the first dimension of `tensor`")
        return tf.identity(t), rows
    tensor_name = _name("alltoall", name, process_set_id)
    with tf.device("/CPU:0"):
        out, received = _ops().smdist_hvd_alltoall(
            t, s, tensor_name=tensor_name, process_set_id=int(process_set_id),
            name=_OP_BASE["alltoall"])
    return out, received


def reducescatter(
    tensor: Any,
    *,
    name: str | None = None,
    op: int = Average,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set_id: int = 0,
) -> tf.Tensor:
    """Reduces `tensor` across the set; each rank keeps its share of the rows.

    Rank r of n keeps `rows // n` rows, plus one when `r < rows % n`, in
    rank order (Horovod's split).

    Args:
        tensor: a tensor of rank >= 1, the same shape on every rank.
        name: the matching name. Defaults to `None` (generated).
        op: `Average`, `Sum`, `Min`, `Max` or `Product`. Defaults to
            `Average`.
        prescale_factor: multiplies the input. Defaults to `1.0`.
        postscale_factor: multiplies the result. Defaults to `1.0`.
        process_set_id: the process set. Defaults to `0`.

    Example:
    >>> init_engine()
    >>> reducescatter(tf.constant([[1.0], [2.0]]), op=Sum).numpy()
    array([[1.],
           [2.]], dtype=float32)
    """
    op = _check_op(op)
    t = _tensor(tensor)
    if t.shape.rank == 0:
        raise ValueError(
            "reducescatter needs a tensor of rank >= 1 (it scatters the first "
            "dimension). Received: shape=().")
    if not _multi(process_set_id):
        return _scaled(_scaled(t, prescale_factor), postscale_factor)
    tensor_name = _name("reducescatter", name, process_set_id)
    with tf.device("/CPU:0"):
        return _ops().smdist_hvd_reducescatter(
            t, reduce_op=op, prescale_factor=float(prescale_factor),
            postscale_factor=float(postscale_factor), tensor_name=tensor_name,
            process_set_id=int(process_set_id), name=_OP_BASE["reducescatter"])


def grouped_reducescatter(
    tensors: Sequence[Any],
    *,
    name: str | None = None,
    op: int = Average,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set_id: int = 0,
) -> list[tf.Tensor]:
    """`reducescatter` of each tensor (named `name.0`, `name.1`, ...).

    Args:
        tensors: the tensors, the same list on every rank.
        name: the group's name. Defaults to `None` (generated).
        op: as in `reducescatter`. Defaults to `Average`.
        prescale_factor: as in `reducescatter`. Defaults to `1.0`.
        postscale_factor: as in `reducescatter`. Defaults to `1.0`.
        process_set_id: the process set. Defaults to `0`.

    Example:
    >>> init_engine()
    >>> [t.shape.as_list() for t in grouped_reducescatter([tf.ones([4, 2])])]
    [[4, 2]]
    """
    ts = list(tensors)
    if not ts:
        return []
    multi = _multi(process_set_id)
    base = _name("grouped_reducescatter", name, process_set_id) if multi else ""
    return [reducescatter(t, name=f"{base}.{i}" if base else None, op=op,
                          prescale_factor=prescale_factor,
                          postscale_factor=postscale_factor,
                          process_set_id=process_set_id) for i, t in enumerate(ts)]


def join(process_set_id: int = 0) -> tf.Tensor:
    """Waits until every rank of the set joined; returns the rank that joined last.

    Until then this rank contributes zeros to the all-reduces the other
    ranks issue (and no rows to their allgathers, nothing to their
    broadcasts and barriers), so ranks with less data can stop early. An
    average still divides by the set's full size; Min, Max and Product are
    not meaningful while a rank has joined. An alltoall or reducescatter
    issued while a rank has joined fails with `FailedPreconditionError`, and
    so does a broadcast whose root has joined.

    Args:
        process_set_id: the process set. Defaults to `0`.

    Returns:
        An int32 scalar: the rank (within the set) that joined last.

    Example:
    >>> init_engine(); int(join())
    0
    """
    set_rank, _ = _set_info(process_set_id)
    if not _multi(process_set_id):
        return tf.constant(set_rank, tf.int32)
    _refuse_xla("join")
    with tf.device("/CPU:0"):
        return _ops().smdist_hvd_join(process_set_id=int(process_set_id),
                                      name="HvdJoin")


def barrier(process_set_id: int = 0) -> None:
    """Blocks until every rank of the set reached this barrier.

    Args:
        process_set_id: the process set. Defaults to `0`.

    Example:
    >>> init_engine(); barrier()
    """
    if not _multi(process_set_id):
        return None
    tensor_name = _name("barrier", None, process_set_id)
    with tf.device("/CPU:0"):
        result = _ops().smdist_hvd_barrier(
            tensor_name=tensor_name, process_set_id=int(process_set_id),
            name=_OP_BASE["barrier"])
    return None if tf.executing_eagerly() else result


# --- gradients ---------------------------------------------------------------------

def _output_scale(op: tf.Operation) -> float:
    scale = op.get_attr("prescale_factor") * op.get_attr("postscale_factor")
    if op.get_attr("reduce_op") == Average:
        scale /= _set_info(op.get_attr("process_set_id"))[1]
    return scale


@tf.RegisterGradient("SmdistHvdAllreduce")
def _allreduce_grad(op: tf.Operation, grad: tf.Tensor) -> tf.Tensor:
    """The same reduction of the gradient (Average -> Average, Sum -> Sum)."""
    return allreduce(grad, op=op.get_attr("reduce_op"),
                     prescale_factor=op.get_attr("prescale_factor"),
                     postscale_factor=op.get_attr("postscale_factor"),
                     process_set_id=op.get_attr("process_set_id"))


@tf.RegisterGradient("SmdistHvdGroupedAllreduce")
def _grouped_allreduce_grad(op: tf.Operation, *grads: tf.Tensor) -> list[tf.Tensor]:
    grads = [tf.zeros_like(x) if g is None else g for x, g in zip(op.inputs, grads)]
    return grouped_allreduce(grads, op=op.get_attr("reduce_op"),
                             prescale_factor=op.get_attr("prescale_factor"),
                             postscale_factor=op.get_attr("postscale_factor"),
                             process_set_id=op.get_attr("process_set_id"))


@tf.RegisterGradient("SmdistHvdAllgather")
def _allgather_grad(op: tf.Operation, grad: tf.Tensor) -> tf.Tensor:
    """This rank's rows of the gradient averaged over the ranks (Horovod's)."""
    psid = op.get_attr("process_set_id")
    set_rank, _ = _set_info(psid)
    averaged = allreduce(grad, op=Average, process_set_id=psid)
    rows = allgather(tf.shape(op.inputs[0], out_type=tf.int64)[:1], process_set_id=psid)
    begin = tf.reduce_sum(rows[:set_rank])
    return averaged[begin:begin + rows[set_rank]]


@tf.RegisterGradient("SmdistHvdBroadcast")
def _broadcast_grad(op: tf.Operation, grad: tf.Tensor) -> tf.Tensor:
    """The gradient averaged over the ranks on the root, zero elsewhere
    (Horovod's)."""
    psid = op.get_attr("process_set_id")
    averaged = allreduce(grad, op=Average, process_set_id=psid)
    if _set_info(psid)[0] != op.get_attr("root_rank"):
        # Depend on the all-reduce: a graph would prune it from a bare
        # zeros_like, and the root would wait for this rank forever.
        with tf.control_dependencies([averaged]):
            return tf.zeros_like(averaged)
    return averaged


@tf.RegisterGradient("SmdistHvdAlltoall")
def _alltoall_grad(op: tf.Operation, grad: tf.Tensor,
                   grad_splits: tf.Tensor) -> tuple[tf.Tensor, None]:
    """The rows sent back to where they came from."""
    del grad_splits
    back, _ = alltoall(grad, splits=op.outputs[1],
                       process_set_id=op.get_attr("process_set_id"))
    return back, None


@tf.RegisterGradient("SmdistHvdReducescatter")
def _reducescatter_grad(op: tf.Operation, grad: tf.Tensor) -> tf.Tensor:
    """Every rank's gradient rows; as in Horovod, a Sum's are multiplied by
    the set's size and an Average's are not."""
    psid = op.get_attr("process_set_id")
    gathered = allgather(grad, process_set_id=psid)
    scale = op.get_attr("prescale_factor") * op.get_attr("postscale_factor")
    if op.get_attr("reduce_op") == Sum:
        scale *= _set_info(psid)[1]
    return _scaled(gathered, scale)
