"""Process queries of the Horovod-compatible API: init, rank, size, build flags."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.horovod import mpi_ops

__all__ = [
    "Adasum",
    "Average",
    "Max",
    "Min",
    "Product",
    "Sum",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "gloo_built",
    "gloo_enabled",
    "init",
    "is_homogeneous",
    "is_initialized",
    "local_rank",
    "local_rank_op",
    "local_size",
    "local_size_op",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "process_set_included_op",
    "rank",
    "rank_op",
    "rocm_built",
    "shutdown",
    "size",
    "size_op",
    "sycl_built",
    "start_timeline",
    "stop_timeline",
]

logger = logging.getLogger(__name__)

# Reduce operations, Horovod's names and values.
Average = mpi_ops.Average
Sum = mpi_ops.Sum
Adasum = mpi_ops.Adasum
Min = mpi_ops.Min
Max = mpi_ops.Max
Product = mpi_ops.Product

_lock = threading.Lock()


def init(comm: Any = None, process_sets: Sequence[Any] | str | None = None) -> None:
    """Starts the collective engine (idempotent), like `horovod.tensorflow.init`.

    Every process of the job calls it once at start-up. In a plain `python`
    run (no MPI launcher) the job has one process and every collective
    returns its input. Calling it again does nothing (process sets passed
    again are registered if they are new). It also lets two tf.keras 2
    spellings that Horovod's examples use run on Keras 3:
    `model.compile(..., experimental_run_tf_function=False)` (ignored, as
    tf.keras 2 did) and `optimizer.variables()` (the same list as
    `optimizer.variables`).

    Args:
        comm: Horovod's communicator argument. Only `None` (the whole job)
            and a list of every rank in order are accepted; the engine always
            spans `MPI_COMM_WORLD`. Defaults to `None`.
        process_sets: `ProcessSet` objects to register now, in the same
            order on every rank (the same as calling `add_process_set` for
            each, except that, as in Horovod, a set over the ranks of the
            global set or of an earlier set in the list is left unregistered
            instead of raising), or `"dynamic"` (Horovod's switch for
            adding and removing sets later, which always works here).
            Defaults to `None`.

    Raises:
        ValueError: `comm` names a subset of the ranks, or `process_sets`
            is a string other than `"dynamic"`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.rank(), hvd.size()
    (0, 1)
    """
    with _lock:
        if not mpi_ops.is_engine_initialized():
            mpi_ops.init_engine()
        _compat.accept_tf_keras_spellings()
    if comm is not None:
        ranks = list(comm) if isinstance(comm, (list, tuple, range)) else None
        if ranks != list(range(size())):
            raise ValueError(
                "tf_smdist.horovod runs every collective over all processes of "
                "the job; a sub-communicator cannot be the world. "
                f"Received: comm={comm!r}. Call `init()` without `comm` and pass "
                "`process_sets=[hvd.ProcessSet(ranks)]` to reduce over a subset."
            )
    if isinstance(process_sets, str):
        # Horovod's switch for adding and removing sets after init; here
        # `add_process_set` / `remove_process_set` always work.
        if process_sets != "dynamic":
            raise ValueError(
                "`process_sets` is a list of ProcessSet objects or the string "
                f"'dynamic'. Received: process_sets={process_sets!r}")
        process_sets = None
    if process_sets:
        from tf_smdist.horovod import process_sets as _sets  # noqa: PLC0415

        # As Horovod's init: a set over the same ranks as the global set or as
        # an earlier set of this list stays unregistered (process_set_id None);
        # one over the ranks of a set registered before takes that set's id.
        seen: dict[int, Any] = {0: _sets.global_process_set}
        for process_set in process_sets:
            if process_set.process_set_id is None:
                twin = _sets._registered_id(process_set.ranks)  # noqa: SLF001
                if twin is None:
                    _sets.add_process_set(process_set)
                elif twin not in seen:
                    process_set.process_set_id = twin
            set_id = process_set.process_set_id
            if set_id is None:
                continue
            if seen.setdefault(set_id, process_set) is not process_set:
                process_set.process_set_id = None


def shutdown() -> None:
    """Stops the collective engine (idempotent).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.shutdown(); hvd.is_initialized()
    False
    """
    with _lock:
        if mpi_ops.is_engine_initialized():
            mpi_ops.shutdown_engine()


def is_initialized() -> bool:
    """Whether `init` was called (and `shutdown` was not).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.is_initialized()
    True
    """
    return bool(mpi_ops.is_engine_initialized())


def _require_init(what: str) -> None:
    if not mpi_ops.is_engine_initialized():
        raise ValueError(
            f"tf_smdist.horovod has not been initialized, so `{what}` has no "
            "answer. Received: is_initialized()=False. Call `hvd.init()` first."
        )


def rank() -> int:
    """This process's rank in the job, in `[0, size())`.

    Raises:
        ValueError: `init` was not called.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.rank()
    0
    """
    _require_init("rank()")
    return int(mpi_ops.rank())


def size() -> int:
    """The number of processes in the job.

    Raises:
        ValueError: `init` was not called.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.size()
    1
    """
    _require_init("size()")
    return int(mpi_ops.size())


def local_rank() -> int:
    """This process's rank among the processes on its host.

    Raises:
        ValueError: `init` was not called.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.local_rank()
    0
    """
    _require_init("local_rank()")
    return int(mpi_ops.local_rank())


def local_size() -> int:
    """The number of processes on this host.

    Raises:
        ValueError: `init` was not called.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.local_size()
    1
    """
    _require_init("local_size()")
    return int(mpi_ops.local_size())


def cross_rank() -> int:
    """The index of this process's host among the job's hosts.

    Raises:
        ValueError: `init` was not called.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.cross_rank()
    0
    """
    _require_init("cross_rank()")
    return int(mpi_ops.cross_rank())


def cross_size() -> int:
    """The number of hosts with a process of the same local rank as this one.

    Raises:
        ValueError: `init` was not called.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.cross_size()
    1
    """
    _require_init("cross_size()")
    return int(mpi_ops.cross_size())


def is_homogeneous() -> bool:
    """Whether every host runs the same number of processes.

    Raises:
        ValueError: `init` was not called.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.is_homogeneous()
    True
    """
    _require_init("is_homogeneous()")
    return bool(mpi_ops.is_homogeneous())


def rank_op(name: str | None = None) -> tf.Tensor:
    """`rank()` as an int32 TensorFlow tensor (for graphs).

    Args:
        name: the op name. Defaults to `None`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); int(hvd.rank_op())
    0
    """
    return tf.constant(rank(), dtype=tf.int32, name=name)


def size_op(process_set_id: int = 0, name: str | None = None) -> tf.Tensor:
    """The size of a process set (the whole job by default) as an int32 tensor.

    Args:
        process_set_id: the id of a registered process set. Defaults to `0`.
        name: the op name. Defaults to `None`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); int(hvd.size_op())
    1
    """
    _require_init("size_op()")
    count = len(mpi_ops.process_set_ranks(int(process_set_id)))
    return tf.constant(count, dtype=tf.int32, name=name)


def local_rank_op(name: str | None = None) -> tf.Tensor:
    """`local_rank()` as an int32 TensorFlow tensor.

    Args:
        name: the op name. Defaults to `None`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); int(hvd.local_rank_op())
    0
    """
    return tf.constant(local_rank(), dtype=tf.int32, name=name)


def local_size_op(name: str | None = None) -> tf.Tensor:
    """`local_size()` as an int32 TensorFlow tensor.

    Args:
        name: the op name. Defaults to `None`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); int(hvd.local_size_op())
    1
    """
    return tf.constant(local_size(), dtype=tf.int32, name=name)


def process_set_included_op(process_set_id: int = 0,
                            name: str | None = None) -> tf.Tensor:
    """Whether this rank belongs to a process set, as an int32 tensor (1 or 0).

    Horovod's `process_set_included_op`; `ProcessSet.included()` is the
    Python-level spelling.

    Args:
        process_set_id: the id of a registered process set. Defaults to `0`.
        name: the op name. Defaults to `None`.

    Raises:
        ValueError: the id is not a registered process set.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); int(hvd.process_set_included_op())
    1
    """
    _require_init("process_set_included_op()")
    included = rank() in mpi_ops.process_set_ranks(int(process_set_id))
    return tf.constant(int(included), dtype=tf.int32, name=name)


# --- build queries ----------------------------------------------------------

def mpi_built(verbose: bool = False) -> bool:
    """Whether the MPI op library was built (it is when Open MPI was found).

    Args:
        verbose: accepted for Horovod compatibility; unused.
            Defaults to `False`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> isinstance(hvd.mpi_built(), bool)
    True
    """
    del verbose
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    path = os.path.join(os.path.dirname(os.path.abspath(_mpi_ops.__file__)),
                        _mpi_ops.LIBRARY_NAME)
    return os.path.exists(path)


def mpi_enabled() -> bool:
    """Whether this process runs MPI now (a multi-process job after `init`).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.mpi_enabled()  # a plain `python` run uses no MPI
    False
    """
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    return bool(_mpi_ops.is_initialized())


def mpi_threads_supported() -> bool:
    """Whether other threads may call MPI too: False.

    tf_smdist funnels every MPI call through its one communication thread and
    does not ask MPI for `MPI_THREAD_MULTIPLE`, so code such as mpi4py must
    not call MPI concurrently with it.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.mpi_threads_supported()
    False
    """
    return False


def gloo_built() -> bool:
    """Whether Gloo is built: False (MPI is the only controller).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.gloo_built()
    False
    """
    return False


def gloo_enabled() -> bool:
    """Whether Gloo is in use: False.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.gloo_enabled()
    False
    """
    return False


def nccl_built() -> int:
    """NCCL's version if built in: 0 (collectives run on the host over MPI).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.nccl_built()
    0
    """
    return 0


def ddl_built() -> bool:
    """Whether IBM DDL is built: False.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.ddl_built()
    False
    """
    return False


def sycl_built() -> bool:
    """Whether Intel SYCL (XPU) support is built: False.

    Horovod's newer Keras examples ask it before listing `XPU` devices.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.sycl_built()
    False
    """
    return False


def ccl_built() -> bool:
    """Whether Intel oneCCL is built: False.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.ccl_built()
    False
    """
    return False


def cuda_built() -> bool:
    """Whether the op library was compiled with its CUDA kernels.

    The collectives themselves run on host memory over MPI in either case.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> isinstance(hvd.cuda_built(), bool)
    True
    """
    try:
        from tf_smdist import _build_info  # noqa: PLC0415
    except ImportError:
        return False
    return bool(getattr(_build_info, "GPU_KERNELS", False))


def rocm_built() -> bool:
    """Whether ROCm support is built: False.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.rocm_built()
    False
    """
    return False


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Horovod's timeline: not recorded by tf_smdist; logs a warning.

    Trace the collectives with TensorFlow's profiler instead
    (`tf.profiler.experimental.start(logdir)`): they appear as ops.

    Args:
        file_path: where Horovod would write its timeline.
        mark_cycles: accepted for compatibility; unused. Defaults to `False`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.start_timeline("/tmp/timeline.json")  # warns, records nothing
    """
    del mark_cycles
    logger.warning(
        "tf_smdist.horovod does not write Horovod timelines; no timeline is "
        "written to %s. Use tf.profiler.experimental.start(logdir) to trace "
        "the collectives.", file_path)


def stop_timeline() -> None:
    """Counterpart of `start_timeline`: does nothing.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.stop_timeline()
    """
