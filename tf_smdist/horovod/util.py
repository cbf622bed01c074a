"""Horovod's `horovod.tensorflow.util` helpers that scripts and tests import.

Horovod's own test suite and some training scripts import these underscored
helpers (`from horovod.tensorflow.util import _executing_eagerly`, or call
`hvd._executing_eagerly()`), so they keep working after the one-line change.

Example:
>>> from tf_smdist.horovod.util import _executing_eagerly
>>> _executing_eagerly()
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

__all__ = ["_cache", "_executing_eagerly", "_make_subgraph"]


def _executing_eagerly() -> bool:
    """Whether TensorFlow runs eagerly here (not inside a graph or `tf.function`)."""
    return tf.executing_eagerly()


def _make_subgraph(f: Callable[..., Any]) -> Callable[..., Any]:
    """`f` as a `tf.function`."""
    return tf.function(f)


def _cache(f: Callable[..., Any]) -> Callable[..., Any]:
    """Memoises `f` by its (hashable) arguments and the execution mode."""
    cache: dict[Any, Any] = {}

    def wrapper(*args: Any) -> Any:
        key = (args, _executing_eagerly())
        if key not in cache:
            cache[key] = f(*args)
        return cache[key]

    return wrapper
