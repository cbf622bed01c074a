"""Horovod's elastic training API (`hvd.elastic`), for jobs of a fixed size.

Horovod's elastic mode adds and removes workers while a job runs
(`horovodrun --min-np ... --max-np ...`): the training function is wrapped
in `hvd.elastic.run`, its state lives in a `State` that is committed to host
memory every few batches, and when workers come or go every worker restores
the last commit, re-initialises and synchronises from rank 0.

A tf_smdist job keeps its processes from start to end, so the same scripts
run here at a fixed size:

- `run(func)` synchronises the state from rank 0 (a model's and optimizer's
  variables, and the state's own attributes such as `epoch` and `batch`),
  then calls `func(state, ...)`. Hosts never change here, so the
  `HostsUpdatedInterrupt` that would restart it comes only from the script
  itself (or `on_hosts_updated`); it runs the reset callbacks and calls
  `func` again, as in Horovod.
- `State.commit()` saves a copy of the state in host memory and
  `restore()` returns to it, as in Horovod.
- A rank that fails is not replaced: its peers' collectives fail (see the
  README's failure handling) and the job ends, as without `hvd.elastic`.
  Checkpoint with `keras.callbacks.BackupAndRestore` to resume it.

Example:
>>> import tf_smdist.horovod as hvd
>>> hvd.init()
>>> v = tf.Variable([1.0, 2.0])
>>> state = hvd.elastic.TensorFlowState([v], epoch=0)
>>> @hvd.elastic.run
... def train(state):
...     for state.epoch in range(state.epoch, 3):
...         v.assign_add([1.0, 1.0])
...         state.commit()
...     return v.numpy()
>>> train(state)
array([4., 5.], dtype=float32)
"""

from __future__ import annotations

import functools
import queue
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_smdist.horovod import basics, collectives, objects

__all__ = [
    "HorovodInternalError",
    "HostsUpdatedInterrupt",
    "ObjectState",
    "State",
    "TensorFlowKerasState",
    "TensorFlowState",
    "run",
]


class HorovodInternalError(RuntimeError):
    """A collective failed (in Horovod's elastic mode: a worker was lost).

    Here the job cannot replace a lost worker, so `run` lets it end the job.
    """


class HostsUpdatedInterrupt(RuntimeError):
    """Raised by `State.check_host_updates` when the hosts changed.

    Args:
        skip_sync: whether `run` may call the function again without
            synchronising the state first. Defaults to `False`.
    """

    def __init__(self, skip_sync: bool = False) -> None:
        super().__init__(skip_sync)
        self.skip_sync = skip_sync


class State:
    """State kept in host memory and synchronised across the workers.

    Subclasses define `save`, `restore` and `sync`.

    Args:
        bcast_object: broadcasts a Python object from rank 0.
        get_rank: returns this worker's rank.
    """

    def __init__(self, bcast_object: Callable[[Any], Any],
                 get_rank: Callable[[], int]) -> None:
        self._bcast_object = bcast_object
        self._rank = get_rank
        self._host_messages: queue.Queue = queue.Queue()
        self._last_updated_timestamp = 0
        self._reset_callbacks: list[Callable[[], Any]] = []

    def register_reset_callbacks(self, callbacks: Sequence[Callable[[], Any]]) -> None:
        """Adds functions that `run` calls after a reset (before synchronising).

        Example:
        >>> state = ObjectState(lambda o: o, lambda: 0, epoch=0)
        >>> state.register_reset_callbacks([lambda: print("reset")])
        >>> state.on_reset()
        reset
        """
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        """Clears pending host updates, calls `reset` and the reset callbacks."""
        self._host_messages = queue.Queue()
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, timestamp: float, update_res: Any = None) -> None:
        """Records a change of hosts; the next `commit` raises
        `HostsUpdatedInterrupt` on every rank if rank 0 recorded one."""
        self._host_messages.put((timestamp, update_res))

    def commit(self) -> None:
        """Saves the state (`save`), then checks for host changes."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Raises `HostsUpdatedInterrupt` on every rank if rank 0 recorded a
        newer host change (`on_hosts_updated`); a fixed-size job records none
        of its own.

        Raises:
            HostsUpdatedInterrupt: rank 0 recorded a host change.
        """
        previous = latest = self._last_updated_timestamp
        while not self._host_messages.empty():
            timestamp, _ = self._host_messages.get()
            latest = max(latest, timestamp)
        # Rank 0's view, so that every rank raises at the same commit.
        previous, self._last_updated_timestamp = self._bcast_object((previous, latest))
        if self._last_updated_timestamp > previous:
            raise HostsUpdatedInterrupt(False)

    def save(self) -> None:
        """Saves the state to host memory."""
        raise NotImplementedError("State subclasses define save().")

    def restore(self) -> None:
        """Returns to the last saved state."""
        raise NotImplementedError("State subclasses define restore().")

    def sync(self) -> None:
        """Makes every rank's state rank 0's."""
        raise NotImplementedError("State subclasses define sync().")

    def reset(self) -> None:
        """Called on a reset, before the reset callbacks (nothing by default)."""


class ObjectState(State):
    """State of Python objects, given as keyword arguments; each becomes an
    attribute (`state.epoch`), saved by `commit` and restored by `restore`.

    Args:
        bcast_object: broadcasts a Python object from rank 0.
        get_rank: returns this worker's rank.
        **kwargs: the objects and their initial values.

    Example:
    >>> state = ObjectState(lambda o: o, lambda: 0, epoch=1)
    >>> state.epoch = 5
    >>> state.restore()
    >>> state.epoch
    1
    """

    def __init__(self, bcast_object: Callable[[Any], Any],
                 get_rank: Callable[[], int], **kwargs: Any) -> None:
        self._saved_state = dict(kwargs)
        self._set_attrs()
        super().__init__(bcast_object=bcast_object, get_rank=get_rank)

    def save(self) -> None:
        self._saved_state = {name: getattr(self, name) for name in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for name, value in self._saved_state.items():
            setattr(self, name, value)


def _optimizer_variables(optimizer: Any) -> list[Any]:
    """A Keras 3 optimizer's variables (a list), or a tf.keras 2 one's
    (`variables()`); none without an optimizer."""
    if optimizer is None:
        return []
    found = optimizer.variables
    return list(found() if callable(found) else found)


def _host_copy(variables: Sequence[Any], run: Callable[[Any], Any] | None) -> list:
    if run is not None:
        return [np.array(v) for v in run(list(variables))]
    return [np.array(v.numpy(), copy=True) for v in variables]


def _assign(variables: Sequence[Any], values: Sequence[Any],
            session: Any = None) -> None:
    """Assigns saved values; a list of another length (an optimizer built
    after the save) is left alone, as Horovod's pairwise assignment leaves
    the variables it has no value for."""
    if len(variables) != len(values):
        return
    for v, value in zip(variables, values):
        if session is not None:
            v.load(value, session)
        else:
            v.assign(value)


class _VariableState(ObjectState):
    """An `ObjectState` that also keeps variables, in groups
    (`_variable_groups`): `save` copies them to host memory, `restore`
    assigns each group's copy back (a group whose length changed since, an
    optimizer built after the save, is left alone), `sync` broadcasts them
    from rank 0. In a `tf.compat.v1` graph, `session` reads and loads them."""

    session: Any = None

    def _variable_groups(self) -> list[list[Any]]:
        raise NotImplementedError

    def save(self) -> None:
        self._save_model()
        super().save()

    def restore(self) -> None:
        self._load_model()
        super().restore()

    def sync(self) -> None:
        self._broadcast_model()
        self._save_model()
        super().sync()

    def _broadcast_model(self) -> None:
        variables = [v for group in self._variable_groups() for v in group]
        if variables:
            collectives.broadcast_variables(variables, root_rank=0)

    def _save_model(self) -> None:
        run = None if self.session is None else self.session.run
        self._saved_values = [_host_copy(group, run)
                              for group in self._variable_groups()]

    def _load_model(self) -> None:
        for group, values in zip(self._variable_groups(), self._saved_values):
            _assign(group, values, self.session)


class TensorFlowKerasState(_VariableState):
    """State of a Keras model, its optimizer and further objects.

    `sync` broadcasts rank 0's model and optimizer variables and objects;
    `commit` copies them to host memory; `restore` assigns the copies back.

    Args:
        model: a built Keras model.
        optimizer: its optimizer. Defaults to `None` (`model.optimizer`).
        backend: accepted for Horovod's TF1 spelling; unused in TF2.
        **kwargs: further objects to keep (`epoch=0`, `batch=0`), exposed as
            attributes.

    Raises:
        ValueError: the model is not built.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> state = hvd.elastic.TensorFlowKerasState(model, epoch=0)
    >>> state.sync()  # rank 0's weights and epoch on every rank
    """

    def __init__(self, model: Any, optimizer: Any = None, backend: Any = None,
                 **kwargs: Any) -> None:
        if not getattr(model, "built", True):
            raise ValueError(
                "The model must be built before its elastic state is created "
                "(its variables are what the state keeps). Received: a model "
                "that is not built. Call `model.build(input_shape)` or call the "
                "model on a batch first.")
        self.model = model
        self.optimizer = optimizer if optimizer is not None else getattr(
            model, "optimizer", None)
        self.backend = backend
        self._save_model()
        super().__init__(bcast_object=objects.broadcast_object,
                         get_rank=basics.rank, **kwargs)

    def _variable_groups(self) -> list[list[Any]]:
        return [list(self.model.variables), _optimizer_variables(self.optimizer)]


class TensorFlowState(_VariableState):
    """State of a list of TensorFlow (or Keras) variables and further objects.

    Args:
        variables: the variables. Defaults to `None` (in a `tf.compat.v1`
            graph, its global variables).
        session: in a `tf.compat.v1` graph, the session holding them.
            Defaults to `None` (the default session).
        **kwargs: further objects to keep, exposed as attributes.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> v = tf.Variable([1.0])
    >>> state = hvd.elastic.TensorFlowState([v], batch=0)
    >>> v.assign([3.0])
    <...>
    >>> state.restore()
    >>> v.numpy()
    array([1.], dtype=float32)
    """

    def __init__(self, variables: Sequence[Any] | None = None, session: Any = None,
                 **kwargs: Any) -> None:
        eager = tf.executing_eagerly()
        self.variables = list(variables if variables is not None
                              else tf.compat.v1.global_variables())
        if session is None and not eager:
            session = tf.compat.v1.get_default_session()
        self.session = session
        if not eager and self.session is None:
            raise RuntimeError(
                "hvd.elastic.TensorFlowState in a tf.compat.v1 graph reads its "
                "variables in a session. Received: session=None and no default "
                "session. Pass session=sess.")
        self._bcast_op = (None if eager or not self.variables else
                          collectives.broadcast_variables(self.variables, root_rank=0))
        self._save_model()
        bcast = objects.broadcast_object_fn(session=self.session)
        super().__init__(bcast_object=bcast, get_rank=basics.rank, **kwargs)

    def _variable_groups(self) -> list[list[Any]]:
        return [self.variables]

    def _broadcast_model(self) -> None:
        if self._bcast_op is None:
            super()._broadcast_model()
        else:  # the op built once, in the graph
            self.session.run(self._bcast_op)


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an elastic training function `func(state, *args, **kwargs)`.

    Each call synchronises `state` from rank 0, then runs `func`. A
    `HostsUpdatedInterrupt` out of it runs the state's reset callbacks and
    calls it again (synchronising first unless the interrupt says to skip
    it); any other error, including a failed collective, propagates (a job
    of fixed size cannot replace a lost rank).

    Example:
    >>> state = ObjectState(lambda o: o, lambda: 0, tries=0)
    >>> @run
    ... def train(state):
    ...     state.tries += 1
    ...     if state.tries < 2:
    ...         state.commit()
    ...         raise HostsUpdatedInterrupt(skip_sync=True)
    ...     return state.tries
    >>> train(state)
    2
    """

    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except HostsUpdatedInterrupt as e:
                skip_sync = e.skip_sync
            state.on_reset()

    return wrapper
