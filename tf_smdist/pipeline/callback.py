"""`ProfilingCallback`: profile a model during the first steps of `fit`."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from tf_smdist.pipeline.profile import Profile
from tf_smdist.pipeline.profiler import profile_model

__all__ = ["ProfilingCallback"]

logger = logging.getLogger(__name__)

# The keyword-only options of `profile_model` (everything after `*`): the
# options a callback may forward. Read from its signature, so the two never
# drift apart.
PROFILE_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(profile_model).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)

class ProfilingCallback(keras.callbacks.Callback):
    """Profiles the model during the first steps of `fit`.

    After `profile_after_steps` training batches (so the model and its
    optimizer are built), it runs `profile_model` on a sample batch, keeps
    the result in `self.profile`, optionally saves it as JSON, and calls
    `on_profile(profile)`. When `fit` runs an `smd.PipelineModel` (Keras
    hands the callback its model through `set_model`), the callback profiles
    the wrapped model and then calls the pipeline's
    `partition_from_profile(profile)`, which partitions the model; training
    continues pipelined. The callback holds no state tied to one model: given
    to the `fit` of another model, it profiles that model once too. When no
    `sample_batch` is given, one is synthesised from the model's input specs
    (zeros, `batch_size` rows): layer times and sizes depend on shapes, not
    values.

    With a `PipelineModel` whose stages run in separate processes, the
    callback does not run during `fit`: before the first step rank 0
    profiles the wrapped model with the callback's options (nested models
    whole unless `expand_nested` is given) and every rank's callback
    receives that profile (`record_profile`), so every rank partitions from
    the same profile. The callback's options are not changed.

    Args:
        sample_batch: Inputs `x` of one batch. Defaults to `None`
            (synthesised).
        batch_size: Rows of the synthesised batch. Defaults to `32`.
        profile_after_steps: Training batches to run first. Defaults to `1`.
        path: JSON file to save the profile to. Defaults to `None`.
        on_profile: Called with the `Profile` once it exists. Defaults to
            `None`.
        model: The model to profile. Defaults to `None` (the model `fit`
            runs; for a `PipelineModel`, the model it wraps).
        **profile_kwargs: Passed to `profile_model`: its keyword-only
            options (`warmup`, `repeats`, `time_budget`, `device`,
            `optimizer`, `expand_nested`, `clock`, `chunk`).

    Example:

    >>> callback = smd.ProfilingCallback(path="profile.json")
    >>> history = model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    >>> print(callback.profile)
    Profile of ...: 5 layers, batch 32 on CPU, ...
    """

    def __init__(
        self,
        *,
        sample_batch: Any = None,
        batch_size: int = 32,
        profile_after_steps: int = 1,
        path: str | os.PathLike | None = None,
        on_profile: Callable[[Profile], Any] | None = None,
        model: keras.Model | None = None,
        **profile_kwargs: Any,
    ) -> None:
        super().__init__()
        if profile_after_steps < 1:
            raise ValueError(
                "`profile_after_steps` must be at least 1. "
                f"Received: profile_after_steps={profile_after_steps}"
            )
        unknown = set(profile_kwargs) - PROFILE_OPTIONS
        if unknown:
            raise TypeError(
                f"Unknown options for profile_model: {sorted(unknown)}. "
                f"Received: {profile_kwargs}. Use only "
                f"{sorted(PROFILE_OPTIONS)}."
            )
        self.sample_batch = sample_batch
        self.batch_size = batch_size
        self.profile_after_steps = profile_after_steps
        self.path = path
        self.on_profile = on_profile
        self.target_model = model
        self.profile_kwargs = profile_kwargs
        self.profile: Profile | None = None
        self._steps = 0
        self._profiled: keras.Model | None = None

    @property
    def profiled_model(self) -> keras.Model | None:
        """The model `profile` measured (`None` before profiling)."""
        return self._profiled

    def record_profile(self, profile: Profile, model: keras.Model) -> None:
        """Takes a profile of `model` measured elsewhere as this callback's result.

        A pipeline across processes profiles on rank 0 only; every rank's
        callback then holds the same `profile` and calls `on_profile` with
        it, as if it had profiled `model` itself (no file is written).

        Args:
            profile: the `Profile`.
            model: the model it measured.

        Example:
        >>> callback.record_profile(profile, pipe.wrapped_model)  # doctest: +SKIP
        """
        self.profile = profile
        self._profiled = model
        self._steps = self.profile_after_steps
        if self.on_profile is not None:
            self.on_profile(profile)

    def _pipeline(self) -> Any:
        """The `PipelineModel` that `fit` runs, or `None`."""
        from tf_smdist.pipeline.model import PipelineModel  # noqa: PLC0415

        return self.model if isinstance(self.model, PipelineModel) else None

    def _target(self) -> keras.Model:
        if self.target_model is not None:
            return self.target_model
        pipeline = self._pipeline()
        return pipeline.profiled_model if pipeline is not None else self.model

    def on_train_begin(self, logs: dict | None = None) -> None:
        # A callback reused for another model's `fit` profiles that model.
        if self._profiled is not None and self._profiled is not self._target():
            self.profile = None
            self._profiled = None
            self._steps = 0

    def _synthesised_batch(self, model: keras.Model) -> Any:
        def zeros(spec: Any) -> np.ndarray:
            shape = [self.batch_size if d is None else d for d in spec.shape]
            return np.zeros(shape, dtype=spec.dtype)

        specs = list(model.inputs)
        if len(specs) == 1:
            return zeros(specs[0])
        return keras.tree.map_structure(zeros, model.input)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.profile is not None:
            return
        self._steps += 1
        if self._steps < self.profile_after_steps:
            return
        self.run_profile()
        pipeline = self._pipeline()
        if pipeline is not None and self._profiled is pipeline.profiled_model:
            pipeline.partition_from_profile(self.profile)

    def run_profile(self) -> Profile:
        """Profiles the target model now.

        `fit` calls it after `profile_after_steps` batches, then hands the
        profile to a `PipelineModel` it trains (`partition_from_profile`);
        called directly, it only profiles.

        Returns:
            The new `Profile`, also kept in `self.profile`.

        Example:

        >>> callback = smd.ProfilingCallback(warmup=1, repeats=1)
        >>> callback.set_model(model)
        >>> len(callback.run_profile())
        5
        """
        model = self._target()
        sample = self.sample_batch
        if sample is None:
            sample = self._synthesised_batch(model)
        kwargs = dict(self.profile_kwargs)
        if "optimizer" not in kwargs and getattr(self.model, "optimizer", None):
            kwargs["optimizer"] = self.model.optimizer
        self.profile = profile_model(model, sample, **kwargs)
        self._profiled = model
        logger.info("Profiled %d layers of %s", len(self.profile), model.name)
        if self.path is not None:
            self.profile.save(self.path)
        if self.on_profile is not None:
            self.on_profile(self.profile)
        return self.profile
