"""TF1-style broadcast of the graph's global variables (sessions and hooks)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_smdist.horovod.collectives import broadcast_variables
from tf_smdist.horovod.process_sets import ProcessSet, global_process_set

__all__ = ["BroadcastGlobalVariablesHook", "broadcast_global_variables"]


def broadcast_global_variables(
    root_rank: int, process_set: ProcessSet = global_process_set
) -> tf.Operation:
    """An op assigning `root_rank`'s values to the graph's global variables.

    For `tf.compat.v1` graphs only: eager TensorFlow 2 keeps no collection of
    global variables.

    Args:
        root_rank: the rank whose values are kept.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Raises:
        RuntimeError: called eagerly.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> with tf.Graph().as_default():
    ...     v = tf.compat.v1.get_variable("v", initializer=[1.0])
    ...     op = hvd.broadcast_global_variables(0)
    ...     with tf.compat.v1.Session() as sess:
    ...         sess.run(v.initializer); sess.run(op)
    """
    if tf.executing_eagerly():
        raise RuntimeError(
            "broadcast_global_variables() needs a tf.compat.v1 graph: eager "
            "TensorFlow has no global variable collection. Received: a call in "
            "eager mode. Use hvd.broadcast_variables(model.variables, "
            "root_rank=0), or hvd.keras.callbacks.BroadcastGlobalVariablesCallback "
            "with model.fit.")
    return broadcast_variables(tf.compat.v1.global_variables(), root_rank,
                               process_set=process_set)


class BroadcastGlobalVariablesHook(tf.compat.v1.train.SessionRunHook):
    """A session hook that broadcasts the global variables once the session starts.

    For `tf.compat.v1.train.MonitoredTrainingSession` scripts.

    Args:
        root_rank: the rank whose values are kept.
        device: accepted for compatibility. Defaults to `""`.
        process_set: the ranks taking part. Defaults to `global_process_set`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hook = hvd.BroadcastGlobalVariablesHook(0)
    """

    def __init__(self, root_rank: int, device: str = "",
                 process_set: ProcessSet = global_process_set) -> None:
        super().__init__()
        del device
        self.root_rank = root_rank
        self.process_set = process_set
        self.bcast_op: Any = None

    def begin(self) -> None:
        """Builds the broadcast op in the session's graph."""
        graph = tf.compat.v1.get_default_graph()
        if self.bcast_op is None or self.bcast_op.graph != graph:
            self.bcast_op = broadcast_global_variables(self.root_rank, self.process_set)

    def after_create_session(self, session: Any, coord: Any) -> None:
        """Runs the broadcast once the variables are initialized."""
        del coord
        session.run(self.bcast_op)
