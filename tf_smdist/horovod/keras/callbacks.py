"""Horovod's Keras callbacks for Keras 3 `model.fit`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_smdist.horovod import basics, collectives, mpi_ops, objects

__all__ = [
    "BestModelCheckpoint",
    "BroadcastGlobalVariablesCallback",
    "LearningRateScheduleCallback",
    "LearningRateWarmupCallback",
    "MetricAverageCallback",
]

class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Starts every rank from `root_rank`'s model and optimizer state.

    At the start of `fit` it assigns `root_rank`'s values to the model's
    variables, and to the optimizer's, where every rank has the same list
    (shapes and dtypes, compared across the ranks), so the first step starts
    from one model. Unless both were assigned then and the optimizer was
    built, it assigns every model and optimizer variable again after the
    first batch, as Horovod does: a model that Keras builds lazily (no
    `Input`) has no weights yet at the start, and an optimizer loaded on
    one rank only (Horovod's resume pattern) has slots the others create in
    the first step. Put it first in the callback list.

    Args:
        root_rank: the rank whose state is kept. Defaults to `0`.
        device: accepted for compatibility. Defaults to `""`.
        local_variables: a variable or a list of variables that keep each
            rank's own value (not broadcast), as in Horovod. Defaults to
            `None`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> cb = hvd.callbacks.BroadcastGlobalVariablesCallback(0)
    """

    def __init__(self, root_rank: int = 0, device: str = "",
                 local_variables: Any = None) -> None:
        super().__init__()
        del device
        self.root_rank = int(root_rank)
        self.broadcast_done = False
        if local_variables is None:
            local_variables = []
        elif not isinstance(local_variables, (list, tuple, set)):
            local_variables = [local_variables]
        self.local_variables = list(local_variables)

    @staticmethod
    def _identities(var: Any) -> set[int]:
        # A Keras variable and the tf.Variable behind it (its `value`
        # property; a tf.Variable's `value` is a method) are the same one.
        inner = getattr(var, "value", None)
        return {id(var)} if inner is None or callable(inner) else {id(var), id(inner)}

    def _groups(self) -> dict[str, list[Any]]:
        """The model's and the optimizer's variables that are broadcast.

        Left out: `local_variables`, and a DistributedOptimizer's gradients
        aggregated over backward_passes_per_step (each rank's own; also
        under a LossScaleOptimizer).
        """
        optimizer = getattr(self.model, "optimizer", None)
        kept = list(self.local_variables)
        for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
            aggregation_state = getattr(opt, "_hvd_local_variables", None)
            if aggregation_state is not None:
                kept += aggregation_state()
        excluded = set().union(*(self._identities(v) for v in kept))
        groups = {"model": list(self.model.variables)}
        if optimizer is not None:
            groups["optimizer"] = list(optimizer.variables)
        return {k: [v for v in vs if not self._identities(v) & excluded]
                for k, vs in groups.items()}

    @staticmethod
    def _signature(variables: list[Any]) -> list[tuple[tuple[int, ...], str]]:
        return [(tuple(int(d) for d in v.shape), str(v.dtype)) for v in variables]

    def _differs(self, groups: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Each group's per-rank signatures where the ranks' lists differ."""
        mine = {k: self._signature(v) for k, v in groups.items()}
        gathered = objects.allgather_object(mine)
        return {k: [g[k] for g in gathered] for k in groups
                if any(g[k] != gathered[0][k] for g in gathered)}

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        groups = self._groups()
        differs = self._differs(groups)
        same = [v for k, vs in groups.items() if k not in differs for v in vs]
        if same:
            collectives.broadcast_variables(same, self.root_rank)
        self.broadcast_done = (
            not differs and bool(groups["model"])
            and (optimizer is None or bool(getattr(optimizer, "built", True))))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.broadcast_done:
            return
        groups = self._groups()
        differs = self._differs(groups)
        if differs:
            counts = {k: [len(sig) for sig in sigs] for k, sigs in differs.items()}
            raise ValueError(
                "BroadcastGlobalVariablesCallback: after the first batch the ranks "
                "still hold different variables, so rank "
                f"{self.root_rank}'s cannot be assigned to the others. Variables per "
                f"rank: {counts}. Build the same model and optimizer on every rank.")
        collectives.broadcast_variables(groups["model"] + groups.get("optimizer", []),
                                        self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Averages the epoch's logged metrics over the ranks.

    At the end of each epoch every numeric entry of `logs` (training and
    validation metrics) is replaced by its mean over the ranks, so callbacks
    after it (checkpoints, early stopping, LR schedules) and the History see
    the same values everywhere. Put it before those callbacks.

    Args:
        device: accepted for compatibility. Defaults to `""`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> cb = hvd.callbacks.MetricAverageCallback()
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()
        del device
        self._epoch = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not logs:
            return
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0
                      and isinstance(np.asarray(v).item(), (int, float)))
        if not keys:
            return
        values = tf.constant([float(logs[k]) for k in keys], tf.float64)
        averaged = collectives.allreduce(
            values, op=mpi_ops.Average, name=f"MetricAverageCallback.{epoch}").numpy()
        for k, v in zip(keys, averaged):
            logs[k] = float(v)


def _lr(optimizer: Any) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _set_lr(optimizer: Any, value: float) -> None:
    try:
        optimizer.learning_rate = value
    except (TypeError, ValueError) as e:
        raise TypeError(
            "The learning-rate callbacks set the optimizer's learning rate, "
            "which must be a number, not a schedule. Received: learning_rate="
            f"{optimizer.learning_rate!r}. Construct the optimizer with a float "
            "learning rate.") from e


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Sets the learning rate to `initial_lr * multiplier(epoch)` in a range of epochs.

    With `staircase=True` the rate changes at the start of each epoch;
    otherwise after every batch, with a fractional epoch
    `epoch + batch / steps_per_epoch`.

    Keras 3 optimizers read `momentum` as a constant when the train step is
    traced, so Horovod's momentum correction cannot be applied:
    `momentum_correction` is accepted and ignored.

    Args:
        initial_lr: the base learning rate (usually scaled by `hvd.size()`).
        multiplier: a number, or a function of the (fractional) epoch.
        start_epoch: the first epoch it applies to. Defaults to `0`.
        end_epoch: the epoch it stops at (exclusive). Defaults to `None`.
        staircase: change per epoch (True) or per batch. Defaults to `True`.
        momentum_correction: accepted for compatibility. Defaults to `True`.
        steps_per_epoch: batches per epoch, for `staircase=False`; read
            from `fit`'s parameters when `None`. Defaults to `None`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> cb = hvd.callbacks.LearningRateScheduleCallback(
    ...     initial_lr=0.1, multiplier=lambda epoch: 0.5 ** epoch)
    """

    def __init__(
        self,
        initial_lr: float,
        multiplier: float | Callable[[float], float],
        start_epoch: int = 0,
        end_epoch: int | None = None,
        staircase: bool = True,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        del momentum_correction
        self.initial_lr = float(initial_lr)
        self.start_epoch = int(start_epoch)
        self.end_epoch = end_epoch
        self.staircase = bool(staircase)
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0
        if callable(multiplier):
            self.multiplier = multiplier
        else:
            constant = float(multiplier)
            self.multiplier = lambda epoch: constant

    def _in_range(self, epoch: float) -> bool:
        return epoch >= self.start_epoch and (
            self.end_epoch is None or epoch < self.end_epoch)

    def _adjust(self, epoch: float) -> None:
        if self._in_range(epoch):
            _set_lr(self.model.optimizer,
                    self.initial_lr * float(self.multiplier(epoch)))

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.staircase and self.steps_per_epoch is None:
            self.steps_per_epoch = (self.params or {}).get("steps")
            if not self.steps_per_epoch:
                raise ValueError(
                    "staircase=False needs the number of batches per epoch. "
                    "Received: steps_per_epoch=None and fit() did not know it. "
                    "Pass steps_per_epoch=.")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.current_epoch = epoch
        if self.staircase:
            self._adjust(epoch)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if not self.staircase:
            self._adjust(self.current_epoch + batch / self.steps_per_epoch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = _lr(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Ramps the learning rate from `initial_lr / size` up to `initial_lr`.

    Large global batches (`size` times one process's batch) train better
    when the scaled-up rate is reached gradually (Goyal et al., 2017). The
    rate grows after every batch; as in Horovod it runs one batch ahead, so
    the last warm-up batch runs at `initial_lr`, which then stays.

    Args:
        initial_lr: the rate at the end of the warm-up (usually
            `base_lr * hvd.size()`).
        warmup_epochs: the length of the warm-up. Defaults to `5`.
        momentum_correction: accepted for compatibility. Defaults to `True`.
        steps_per_epoch: batches per epoch; read from `fit` when `None`.
            Defaults to `None`.
        verbose: log the end of the warm-up on rank 0. Defaults to `0`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> cb = hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.4, warmup_epochs=3)
    """

    def __init__(
        self,
        initial_lr: float,
        warmup_epochs: int = 5,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
        verbose: int = 0,
    ) -> None:
        def multiplier(epoch: float) -> float:
            # One batch ahead, as in Horovod: the last warm-up batch runs at
            # initial_lr (and an epoch's logged rate is a round value).
            epoch += 1.0 / self.steps_per_epoch
            n = basics.size()
            return 1.0 / n * (epoch * (n - 1) / warmup_epochs + 1)

        super().__init__(initial_lr, multiplier, start_epoch=0,
                         end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction,
                         steps_per_epoch=steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and basics.rank() == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to "
                  f"{_lr(self.model.optimizer):g}.", flush=True)


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Saves the best model so far (by `monitor`), on rank 0 only.

    Args:
        monitor: the logged quantity to compare. Defaults to `"val_loss"`.
        verbose: Keras' verbosity. Defaults to `0`.
        mode: `"auto"`, `"min"` or `"max"`. Defaults to `"auto"`.
        save_freq: `"epoch"` or a number of batches. Defaults to `"epoch"`.
        filepath: where to save (`.keras` or `.weights.h5` with
            `save_weights_only=True`); required.
        **kwargs: other `keras.callbacks.ModelCheckpoint` arguments.

    Raises:
        ValueError: `filepath` is missing.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> cb = hvd.callbacks.BestModelCheckpoint(filepath="/tmp/best.keras")
    """

    def __init__(self, monitor: str = "val_loss", verbose: int = 0,
                 mode: str = "auto", save_freq: str | int = "epoch", *,
                 filepath: str | None = None, **kwargs: Any) -> None:
        if filepath is None:
            raise ValueError(
                "BestModelCheckpoint needs a file to write. Received: "
                "filepath=None. Pass filepath='best.keras'.")
        super().__init__(filepath, monitor=monitor, verbose=verbose,
                         save_best_only=True, mode=mode, save_freq=save_freq,
                         **kwargs)

    def _writes(self) -> bool:
        return basics.rank() == 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._writes():
            super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._writes():
            super().on_epoch_end(epoch, logs)
