"""Collectives of picklable Python objects, sent as uint8 tensors.

Objects are pickled with cloudpickle when it is installed (lambdas and local
classes then work, as in Horovod), else with the standard `pickle`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_smdist.horovod import basics, collectives
from tf_smdist.horovod.process_sets import ProcessSet, global_process_set

try:
    import cloudpickle as _pickle
except ImportError:  # cloudpickle is optional
    import pickle as _pickle  # type: ignore[no-redef]

__all__ = ["allgather_object", "broadcast_object", "broadcast_object_fn"]


def _dumps(obj: Any) -> np.ndarray:
    buf = io.BytesIO()
    _pickle.dump(obj, buf)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _loads(data: np.ndarray) -> Any:
    return _pickle.loads(np.asarray(data, dtype=np.uint8).tobytes())


def _require_eager(what: str) -> None:
    if not tf.executing_eagerly():
        raise RuntimeError(
            f"`{what}` exchanges Python objects, so it runs eagerly only. "
            "Received: a call inside tf.function or a tf.compat.v1 graph. "
            "Call it outside the traced function.")


def broadcast_object(
    obj: Any,
    root_rank: int = 0,
    session: Any = None,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
) -> Any:
    """Returns `root_rank`'s `obj` on every rank (pickled).

    Args:
        obj: any picklable object (only `root_rank`'s is used).
        root_rank: the sending rank. Defaults to `0`.
        session: accepted for compatibility (TF1 sessions); unused.
            Defaults to `None`.
        name: the collectives' name prefix. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.broadcast_object({"epoch": 3})
    {'epoch': 3}
    """
    del session
    _require_eager("broadcast_object")
    prefix = name or "broadcast_object"
    payload = _dumps(obj) if basics.rank() == root_rank else np.zeros(0, np.uint8)
    length = collectives.broadcast(
        tf.constant([payload.size], tf.int64), root_rank,
        name=f"{prefix}.size", process_set=process_set)
    n = int(length.numpy()[0])
    if payload.size != n:
        payload = np.zeros(n, np.uint8)
    data = collectives.broadcast(tf.constant(payload), root_rank,
                                 name=f"{prefix}.data", process_set=process_set)
    return _loads(data.numpy())


def broadcast_object_fn(
    root_rank: int = 0,
    session: Any = None,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
) -> Callable[[Any], Any]:
    """Returns a function `fn(obj)` that calls `broadcast_object` with these options.

    Args:
        root_rank: the sending rank. Defaults to `0`.
        session: accepted for compatibility; unused. Defaults to `None`.
        name: the collectives' name prefix. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.broadcast_object_fn(root_rank=0)([1, 2])
    [1, 2]
    """

    def fn(obj: Any) -> Any:
        return broadcast_object(obj, root_rank, session, name=name,
                                process_set=process_set)

    return fn


def allgather_object(
    obj: Any,
    session: Any = None,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
) -> list[Any]:
    """Returns the list of every rank's `obj`, in rank order.

    Args:
        obj: any picklable object.
        session: accepted for compatibility; unused. Defaults to `None`.
        name: the collectives' name prefix. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.allgather_object("a")
    ['a']
    """
    del session
    _require_eager("allgather_object")
    prefix = name or "allgather_object"
    payload = _dumps(obj)
    sizes = collectives.allgather(tf.constant([payload.size], tf.int64),
                                  name=f"{prefix}.sizes", process_set=process_set)
    data = collectives.allgather(tf.constant(payload), name=f"{prefix}.data",
                                 process_set=process_set).numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes.numpy())])
    return [_loads(data[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
