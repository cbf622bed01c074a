"""Horovod's Keras elastic training API (`hvd.elastic` of the Keras module).

As `tf_smdist.horovod.elastic`, for jobs of a fixed size: `KerasState`
keeps a model, its optimizer and further objects (`epoch`, `batch`); the
callbacks commit it and keep its `batch` and `epoch` current during `fit`;
`run` synchronises it from rank 0 and calls the training function.

Example:
```python
import tf_smdist.horovod.keras as hvd

state = hvd.elastic.KerasState(model, batch=0, epoch=0)

@hvd.elastic.run
def train(state):  # the epochs not yet done, counted from 0 as Horovod's examples do
    model.fit(x, y, epochs=5 - state.epoch, callbacks=[
        hvd.elastic.UpdateBatchStateCallback(state),
        hvd.elastic.UpdateEpochStateCallback(state),
        hvd.elastic.CommitStateCallback(state, batches_per_commit=10)])

train(state)
```
"""

from __future__ import annotations

from typing import Any

import keras

from tf_smdist.horovod.elastic import (
    HorovodInternalError,
    HostsUpdatedInterrupt,
    ObjectState,
    State,
    TensorFlowKerasState,
    run,
)

__all__ = [
    "CommitStateCallback",
    "HorovodInternalError",
    "HostsUpdatedInterrupt",
    "KerasState",
    "ObjectState",
    "State",
    "UpdateBatchStateCallback",
    "UpdateEpochStateCallback",
    "run",
]


class KerasState(TensorFlowKerasState):
    """State of a Keras model, its optimizer and further objects.

    Args:
        model: a built Keras model.
        optimizer: its optimizer. Defaults to `None` (`model.optimizer`).
        **kwargs: further objects to keep (`epoch=0`, `batch=0`).

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> state = hvd.elastic.KerasState(model, epoch=0)
    >>> state.epoch
    0
    """

    def __init__(self, model: Any, optimizer: Any = None, **kwargs: Any) -> None:
        super().__init__(model, optimizer=optimizer, **kwargs)


class CommitStateCallback(keras.callbacks.Callback):
    """Commits `state` every `batches_per_commit` batches and at each epoch's end.

    Args:
        state: the `KerasState`.
        batches_per_commit: batches between commits. Defaults to `1`.

    Example:
    ```python
    model.fit(x, y, callbacks=[hvd.elastic.CommitStateCallback(state, 10)])
    ```
    """

    def __init__(self, state: State, batches_per_commit: int = 1) -> None:
        super().__init__()
        self.state = state
        self.batches_per_commit = batches_per_commit
        self.batches_remaining = batches_per_commit

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.batches_remaining = self.batches_per_commit  # alike on every rank

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.batches_remaining -= 1
        if self.batches_remaining == 0:
            self.state.commit()
            self.batches_remaining = self.batches_per_commit

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.state.commit()


class UpdateBatchStateCallback(keras.callbacks.Callback):
    """Keeps `state.batch` at the last finished batch of the epoch (0 after it).

    At an epoch's start, with a known number of steps, `params["steps"]`
    becomes the steps left after `state.batch`, as in Horovod.

    Args:
        state: the `KerasState` (with a `batch` attribute).
    """

    def __init__(self, state: State) -> None:
        super().__init__()
        self.state = state
        self.steps_per_epoch: int | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.steps_per_epoch = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        steps = self.params.get("steps") if self.params else None
        if steps:
            if self.steps_per_epoch is None:
                self.steps_per_epoch = steps
            self.params["steps"] = self.steps_per_epoch - self.state.batch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.state.batch = batch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.state.batch = 0


class UpdateEpochStateCallback(keras.callbacks.Callback):
    """Keeps `state.epoch` at the number of finished epochs (counted from
    `state.epoch` when training began).

    Args:
        state: the `KerasState` (with an `epoch` attribute).
    """

    def __init__(self, state: State) -> None:
        super().__init__()
        self.state = state
        self.initial_epoch = state.epoch

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.initial_epoch = self.state.epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # As in Horovod, whose examples pass `epochs=total - state.epoch`
        # (fit numbers its epochs from 0): the state counts finished epochs,
        # so that a restart does not repeat the last one.
        self.state.epoch = self.initial_epoch + epoch + 1
