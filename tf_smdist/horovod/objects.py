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


def _runner(what: str, session: Any) -> Callable[[tf.Tensor], np.ndarray]:
    """How to get a collective's value: eagerly, or (as in Horovod) with
    `session` or the default session in a `tf.compat.v1` graph."""
    if tf.executing_eagerly():
        return lambda t: t.numpy()
    if tf.inside_function():
        raise RuntimeError(
            f"`{what}` exchanges Python objects, so it cannot run inside "
            "tf.function. Received: a call inside a traced function. Call it "
            "outside the traced function.")
    sess = session or tf.compat.v1.get_default_session()
    if sess is None:
        raise RuntimeError(
            f"`{what}` in a tf.compat.v1 graph runs its collectives in a session. "
            "Received: session=None and no default session. Pass session=sess "
            "or call it inside `with sess.as_default():`.")
    return sess.run


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
        session: in a `tf.compat.v1` graph, the session that runs the
            collectives (as in Horovod). Defaults to `None` (the default
            session; unused eagerly).
        name: the collectives' name prefix. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.broadcast_object({"epoch": 3})
    {'epoch': 3}
    """
    run = _runner("broadcast_object", session)
    prefix = name or "broadcast_object"
    payload = _dumps(obj) if basics.rank() == root_rank else np.zeros(0, np.uint8)
    length = collectives.broadcast(
        tf.constant([payload.size], tf.int64), root_rank,
        name=f"{prefix}.size", process_set=process_set)
    n = int(run(length)[0])
    if payload.size != n:
        payload = np.zeros(n, np.uint8)
    data = collectives.broadcast(tf.constant(payload), root_rank,
                                 name=f"{prefix}.data", process_set=process_set)
    return _loads(run(data))


def broadcast_object_fn(
    root_rank: int = 0,
    session: Any = None,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
) -> Callable[[Any], Any]:
    """Returns a function `fn(obj)` that calls `broadcast_object` with these options.

    Args:
        root_rank: the sending rank. Defaults to `0`.
        session: as in `broadcast_object`. Defaults to `None`.
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
        session: as in `broadcast_object`. Defaults to `None`.
        name: the collectives' name prefix. Defaults to `None`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> hvd.allgather_object("a")
    ['a']
    """
    run = _runner("allgather_object", session)
    prefix = name or "allgather_object"
    payload = _dumps(obj)
    sizes = collectives.allgather(tf.constant([payload.size], tf.int64),
                                  name=f"{prefix}.sizes", process_set=process_set)
    data = run(collectives.allgather(tf.constant(payload), name=f"{prefix}.data",
                                     process_set=process_set))
    offsets = np.concatenate([[0], np.cumsum(run(sizes))])
    return [_loads(data[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
