"""The process cluster: rank and size from the MPI environment, start-up, handshake.

A job of several processes is started by `mpirun` (or `python -m
tf_smdist.launch`, or SLURM's `srun --mpi=pmix`). Each process reads its rank
and the job size from the launcher's environment; `initialize()` starts the
MPI communication thread; `handshake()` checks that every rank runs the same
tf_smdist version and builds the same bucket plans; `broadcast_variables()`
copies rank 0's weights to every rank.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist._version import __version__

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "allocate_group",
    "allreduce_numpy",
    "broadcast_variables",
    "env_rank_and_size",
    "handshake",
    "initialize",
    "is_multiprocess",
    "rank",
    "rank_zero_writes",
    "size",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# (rank, size) variables of the launchers we know: Open MPI, PMIx (srun
# --mpi=pmix), MPICH / Intel MPI (Hydra), MVAPICH.
_RANK_SIZE_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMIX_RANK", "SLURM_NTASKS"),
    ("PMI_RANK", "PMI_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
)
_RECORD_BYTES = 256
_lock = threading.RLock()
_state: dict[str, Any] = {"initialized": False, "rank": 0, "size": 1, "groups": 0}


def env_rank_and_size(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """Returns `(rank, size)` from the MPI launcher's environment variables.

    `(0, 1)` when the process was not started by an MPI launcher.

    Args:
        environ: the environment to read. Defaults to `os.environ`.

    Example:
    >>> env_rank_and_size({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    (1, 2)
    """
    env = os.environ if environ is None else environ
    for rank_var, size_var in _RANK_SIZE_VARS:
        if rank_var in env and size_var in env:
            try:
                return int(env[rank_var]), int(env[size_var])
            except ValueError:
                continue
    return 0, 1


def is_multiprocess() -> bool:
    """Whether this process is one of several in an MPI job.

    Example:
    >>> is_multiprocess()  # a plain `python` run
    False
    """
    if _state["initialized"]:
        return _state["size"] > 1
    return env_rank_and_size()[1] > 1


def _timeout_from_env() -> float:
    raw = os.environ.get("SMDIST_MPI_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(
            "SMDIST_MPI_TIMEOUT must be a positive number of seconds. Received: "
            f"SMDIST_MPI_TIMEOUT={raw!r}. Unset it for the default of "
            f"{DEFAULT_TIMEOUT_S:.0f} s."
        )
    return value


def initialize(*, timeout: float | None = None) -> tuple[int, int]:
    """Starts the MPI communication thread when the job has several processes.

    Idempotent. In a single process it does nothing and returns `(0, 1)`. The
    watchdog fails any collective that takes longer than `timeout` seconds,
    with an error naming the ranks that are dead, stopped or late.

    Args:
        timeout: the watchdog deadline in seconds; `None` reads
            `SMDIST_MPI_TIMEOUT`, else 60. Defaults to `None`.

    Returns:
        `(rank, size)`.

    Raises:
        ImportError: the job has several processes but Open MPI or the MPI op
            library is missing (the message names the package to install).

    Example:
    >>> initialize()  # a plain `python` run
    (0, 1)
    """
    with _lock:
        if _state["initialized"]:
            return _state["rank"], _state["size"]
        env_rank, env_size = env_rank_and_size()
        if env_size <= 1:
            _state.update(initialized=True, rank=0, size=1)
            return 0, 1
        if timeout is None:
            timeout = _timeout_from_env()
        if not timeout > 0:
            raise ValueError(
                f"`timeout` must be a positive number of seconds. Received: "
                f"timeout={timeout!r}")
        from tf_smdist import _mpi_ops  # noqa: PLC0415 (only multi-process jobs)

        heartbeat = min(1.0, timeout / 5.0)
        _mpi_ops.init(timeout=float(timeout), heartbeat=heartbeat)
        r, n = _mpi_ops.rank(), _mpi_ops.size()
        if (r, n) != (env_rank, env_size):
            raise RuntimeError(
                "MPI reports a different rank/size than the launcher's environment. "
                f"Received: MPI rank={r}, size={n}; environment rank={env_rank}, "
                f"size={env_size}. Start the job with one mpirun (or `python -m "
                "tf_smdist.launch`) and the same MPI that tf_smdist was built with."
            )
        _state.update(initialized=True, rank=r, size=n)
        atexit.register(_shutdown)
        _abort_on_uncaught_exception()
        logger.info("tf_smdist: rank %d of %d, watchdog %.0f s", r, n, timeout)
        return r, n


def _abort_on_uncaught_exception() -> None:
    """Makes an exception that ends this process stop its communication first.

    Python runs `sys.excepthook` for an exception nothing caught, before
    the exit handlers. Without this, the exit handler's orderly shutdown
    would wait for the other ranks to reach shutdown while they wait in a
    collective or a pipeline receive for this rank, and both sides would
    fail only at the watchdog's timeout. Aborted first, this rank's peers
    fail about half a second later, naming it ("Rank N has itself
    failed"), and this process exits at once. The hook installed before
    (Python's, which prints the traceback, or the script's) still runs. A
    hook the script installs later replaces this one; the exit handler
    (`_shutdown`) then stops the communication the same way.
    """
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        try:
            _abort_on(exc)
        except Exception:  # noqa: BLE001 (the process is exiting; report the original)
            pass
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    _state["excepthook"] = hook


def _abort_on(exc: BaseException) -> None:
    """Stops this rank's communication for an exception nothing caught."""
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    _mpi_ops.abort(f"it is exiting on an uncaught {type(exc).__name__}: {exc}")


def _shutdown() -> None:
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    # Python records an exception that nothing caught in `sys.last_value`
    # before it calls `sys.excepthook`. If the script replaced the hook that
    # `_abort_on_uncaught_exception` installed, stop here as that hook would
    # have: an orderly shutdown would wait for peers that wait for this rank.
    # Only then: with the hook in place, it already ran for such an
    # exception, and `last_value` may be someone else's record (pytest keeps
    # the last failed test's exception there; an interactive session keeps
    # the last error at the prompt and goes on).
    exc = getattr(sys, "last_value", None)
    replaced = sys.excepthook is not _state.get("excepthook", sys.excepthook)
    if exc is not None and replaced and not hasattr(sys, "ps1"):
        _abort_on(exc)
    try:
        _mpi_ops.shutdown()
    except tf.errors.OpError as e:
        logger.error("%s", e.message)


def rank() -> int:
    """This process's rank (0 in a single process); initialises if needed.

    Example:
    >>> rank()
    0
    """
    return initialize()[0]


def size() -> int:
    """The number of processes in the job (1 in a single process).

    Example:
    >>> size()
    1
    """
    return initialize()[1]


def allocate_group() -> int:
    """Returns a fresh ordering group for one bucket plan's all-reduces.

    Groups are handed out in call order, which is the same on every rank
    (plans are created in program order), so the same plan gets the same
    group everywhere. Group 0 is the ordered control group.

    Raises:
        RuntimeError: more than 61 plans were created.

    Example:
    >>> g = allocate_group()
    >>> 1 <= g < 62
    True
    """
    from tf_smdist._mpi_ops import MAX_GROUPS  # noqa: PLC0415

    with _lock:
        _state["groups"] += 1
        group = _state["groups"]
    # The last two groups belong to tf_smdist.horovod's global process set.
    if group >= MAX_GROUPS - 2:
        raise RuntimeError(
            f"More than {MAX_GROUPS - 3} distinct bucket plans were created in this "
            f"process. Received: plan number={group}. Each distinct set of gradient "
            "shapes gets a plan; keep the model's variables fixed after the first "
            "step (retracing with new shapes creates new plans)."
        )
    return group


def _record(**fields: str) -> bytes:
    text = ";".join(f"{k}={v}" for k, v in sorted(fields.items()))
    raw = text.encode("utf-8")[:_RECORD_BYTES]
    return raw.ljust(_RECORD_BYTES, b"\0")


def handshake(*, what: str, digest: str, summary: str = "") -> None:
    """Checks that every rank has the same tf_smdist version and `digest`.

    A collective on the control group: every rank must call it at the same
    point (e.g. when a bucket plan is first made). On a mismatch every rank
    raises the same error, listing each rank's value.

    Args:
        what: what is compared, for the message (e.g. `"bucket plan"`).
        digest: this rank's value (e.g. the plan's fingerprint).
        summary: a short human-readable description shown on a mismatch.
            Defaults to `""`.

    Raises:
        ValueError: the ranks disagree.

    Example:
    >>> handshake(what="bucket plan", digest="3fa1c2")  # single process: no-op
    """
    if size() <= 1:
        return
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    mine = _record(version=__version__, digest=digest, summary=summary)
    records = [r.rstrip(b"\0").decode("utf-8", "replace")
               for r in _mpi_ops.allgather_bytes(mine)]
    parsed = [dict(f.split("=", 1) for f in r.split(";") if "=" in f) for r in records]
    versions = {p.get("version") for p in parsed}
    if len(versions) != 1:
        listing = ", ".join(
            f"rank {i}: {p.get('version')}" for i, p in enumerate(parsed))
        raise ValueError(
            "The ranks run different tf_smdist versions. Received: " + listing
            + ". Install the same tf_smdist on every host."
        )
    digests = {p.get("digest") for p in parsed}
    if len(digests) != 1:
        listing = "; ".join(
            f"rank {i}: {p.get('digest')} ({p.get('summary', '')})"
            for i, p in enumerate(parsed))
        raise ValueError(
            f"The {what} differs across ranks, so their all-reduces would not "
            f"match. Received: {listing}. Every rank must build the same model "
            "(same layers, shapes, dtypes, order) with the same strategy "
            "options (bucket_cap_mb, compression)."
        )


_BROADCASTABLE = (tf.float32, tf.float64, tf.float16, tf.bfloat16, tf.int32,
                  tf.int64, tf.uint8, tf.bool)


def broadcast_variables(variables: Iterable[Any], *, root: int = 0) -> None:
    """Assigns `root`'s values of `variables` on every rank.

    Variables created inside a multi-process `DataParallelStrategy` scope are
    broadcast when they are created; call this for variables created
    elsewhere or restored on one rank only. Eager, in list order (the same on
    every rank).

    Args:
        variables: Keras or TensorFlow variables, in the same order on every
            rank.
        root: the rank whose values are kept. Defaults to `0`.

    Example:
    >>> v = tf.Variable([1.0, 2.0])
    >>> broadcast_variables([v])  # single process: unchanged
    >>> v.numpy()
    array([1., 2.], dtype=float32)
    """
    variables = list(variables)
    if size() <= 1 or not variables:
        return
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    for v in variables:
        value = v.value if hasattr(v, "value") and not callable(v.value) else v
        tensor = tf.convert_to_tensor(value)
        if tensor.dtype not in _BROADCASTABLE:
            continue
        v.assign(_mpi_ops.broadcast(tensor, root=root))


def allreduce_numpy(value: Any, *, reduction: str = "sum") -> np.ndarray:
    """All-reduces a small NumPy value across ranks (eager control plane).

    Args:
        value: a float32/float64/int32/int64 array or scalar.
        reduction: `"sum"`, `"min"` or `"max"`. Defaults to `"sum"`.

    Example:
    >>> allreduce_numpy(np.array([3]))  # single process: unchanged
    array([3])
    """
    array = np.asarray(value)
    if size() <= 1:
        return array
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    return _mpi_ops.allreduce_array(array, reduction=reduction)


def agree_on_random_seed(*, keep_own: bool) -> int | None:
    """Sets one TensorFlow global seed, drawn by rank 0, on every rank.

    Keras shuffles array inputs (`fit(x, y, shuffle=True)`, its default) with
    TensorFlow's random ops. Unseeded, each process draws its own order, so
    ranks that each take their part of every global batch would read the
    same samples twice and others never in an epoch (or, in a pipeline, pair
    one sample's inputs with another's targets). Collective: every rank calls
    it at the same point.

    Args:
        keep_own: leave the seed of a rank whose script already set one
            (`tf.random.set_seed`, `keras.utils.set_random_seed`).

    Returns:
        The seed set on this rank, or `None` where it kept its own.

    Example:
    >>> agree_on_random_seed(keep_own=True)  # doctest: +SKIP
    1234567
    """
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    seed = int.from_bytes(os.urandom(4), "little") >> 1 if rank() == 0 else 0
    if size() > 1:
        seed = int(_mpi_ops.broadcast_bytes(str(seed).encode(), root=0).decode())
    if keep_own and tf.compat.v1.random.get_seed(None)[0] is not None:
        return None
    tf.random.set_seed(seed)
    return seed


def _no_write(*args: Any, **kwargs: Any) -> None:
    del args, kwargs


def rank_zero_writes(callbacks: Iterable[Any]) -> list[Any]:
    """Makes checkpoint callbacks write files on rank 0 only.

    Every rank runs the same callbacks, so without this every rank would
    write the same checkpoint files at the same time. On ranks other than 0,
    `keras.callbacks.ModelCheckpoint` and `keras.callbacks.BackupAndRestore`
    stop writing (and never delete the backup); `BackupAndRestore` still
    restores on every rank at the start of `fit`, so the backup directory must
    be readable by every rank (same host or a shared file system). Rank 0
    writes as usual. Other callbacks are returned unchanged. In a single
    process this returns the callbacks unchanged.

    Args:
        callbacks: the Keras callbacks passed to `fit`.

    Returns:
        The same callback objects, in a list.

    Example:
    >>> import keras
    >>> cbs = rank_zero_writes([keras.callbacks.BackupAndRestore("/tmp/backup")])
    >>> len(cbs)
    1
    """
    import keras  # noqa: PLC0415

    callbacks = list(callbacks)
    if size() <= 1 or rank() == 0:
        return callbacks
    for cb in callbacks:
        if isinstance(cb, keras.callbacks.BackupAndRestore):
            _compat.stop_checkpoint_writes(cb, _no_write)
            cb.delete_checkpoint = False
        elif isinstance(cb, keras.callbacks.ModelCheckpoint):
            _compat.stop_checkpoint_writes(cb, _no_write)
    return callbacks
