"""Per-layer profiles of a Keras model: time, parameter and activation bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_smdist.pipeline.graph import LayerGraph, flatten_model
from tf_smdist.pipeline.serialization import JsonSerializable, check_format_version

__all__ = [
    "LayerProfile",
    "Profile",
    "ProfilingCallback",
    "optimizer_slots_per_parameter",
    "profile_model",
    "stage_step",
]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """What one layer of a model costs, as measured by `profile_model`.

    Args:
        name: The layer's unique name in the flattened model (`outer/inner`
            for layers of nested models).
        class_name: The layer's class name, for example `"Dense"`.
        inputs: Keys of the tensors it consumes (`"<producer>:<index>"`).
        time: Forward+backward seconds for `Profile.batch_size` samples
            (median of the timed repeats, call overhead removed).
        param_bytes: Bytes of the variables it owns (trainable and not);
            variables shared with an earlier layer count there only.
        trainable_bytes: Bytes of its trainable variables (and so of their
            gradients).
        optimizer_bytes: Bytes of optimizer state for its trainable variables.
        output_bytes: Bytes per sample of its outputs.
        live_bytes: Bytes per sample of every tensor live across the cut right
            after this layer (skip connections included).
        is_layer: Whether it is a `keras.layers.Layer`; `False` for a bare
            operation of a functional model (such as `x + y`). Defaults to
            `True`.

    Example:

    >>> layer = profile.layers[0]
    >>> layer.name, layer.param_bytes, layer.output_bytes
    ('dense', 1056, 128)
    """

    name: str
    class_name: str
    inputs: tuple[str, ...]
    time: float
    param_bytes: int
    trainable_bytes: int
    optimizer_bytes: int
    output_bytes: int
    live_bytes: int
    is_layer: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))


class Profile(JsonSerializable):
    """Per-layer costs of a model, in topological order; JSON serialisable.

    Build one with `profile_model` (or `ProfilingCallback` during `fit`), then
    pass it to `smd.partition`. Layers appear in the order of
    `tf_smdist.pipeline.graph.flatten_model(model)`: nested Sequential and
    functional models are expanded.

    Args:
        layers: The `LayerProfile`s, in topological order.
        batch_size: The batch size the times were measured at.
        input_bytes: Bytes per sample of the model's inputs.
        device_kind: Kind of device measured on (`"CPU"`, `"GPU"`).
            Defaults to `"CPU"`.
        optimizer: Name of the optimizer class whose state was counted, or
            `None`. Defaults to `None`.
        model_name: Name of the profiled model. Defaults to `""`.
        call_overhead: Seconds of one empty `tf.function` call, subtracted
            from each layer's time. Defaults to `0.0`.

    Example:

    >>> profile = smd.profile_model(model, x[:32])
    >>> print(profile)            # a table, one row per layer
    >>> profile.save("profile.json")
    >>> same = smd.Profile.load("profile.json")
    """

    def __init__(
        self,
        layers: Sequence[LayerProfile],
        *,
        batch_size: int,
        input_bytes: int,
        device_kind: str = "CPU",
        optimizer: str | None = None,
        model_name: str = "",
        call_overhead: float = 0.0,
    ) -> None:
        layers = tuple(layers)
        if not layers:
            raise ValueError("A Profile needs at least one layer. Received: layers=()")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise ValueError(
                f"Layer names in a Profile must be unique; {duplicate!r} repeats. "
                f"Received: layer names={names}"
            )
        if batch_size < 1:
            raise ValueError(
                f"`batch_size` must be positive. Received: batch_size={batch_size}"
            )
        self._layers = layers
        self._batch_size = int(batch_size)
        self._input_bytes = int(input_bytes)
        self._device_kind = device_kind
        self._optimizer = optimizer
        self._model_name = model_name
        self._call_overhead = float(call_overhead)

    @property
    def layers(self) -> tuple[LayerProfile, ...]:
        """The per-layer profiles, in topological order."""
        return self._layers

    @property
    def layer_names(self) -> list[str]:
        """The layer names, in topological order."""
        return [layer.name for layer in self._layers]

    @property
    def batch_size(self) -> int:
        """The batch size the layer times were measured at."""
        return self._batch_size

    @property
    def input_bytes(self) -> int:
        """Bytes per sample of the model's inputs."""
        return self._input_bytes

    @property
    def device_kind(self) -> str:
        """The kind of device the profile was measured on."""
        return self._device_kind

    @property
    def optimizer(self) -> str | None:
        """Name of the optimizer whose state bytes were counted."""
        return self._optimizer

    @property
    def model_name(self) -> str:
        """Name of the profiled model."""
        return self._model_name

    @property
    def call_overhead(self) -> float:
        """Seconds of an empty `tf.function` call (removed from layer times)."""
        return self._call_overhead

    @property
    def total_time(self) -> float:
        """Sum of the layers' forward+backward seconds."""
        return math.fsum(layer.time for layer in self._layers)

    @property
    def param_bytes(self) -> int:
        """Bytes of all the model's variables."""
        return sum(layer.param_bytes for layer in self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, index: int) -> LayerProfile:
        return self._layers[index]

    def index(self, name: str) -> int:
        """Position of the layer called `name`.

        Args:
            name: A layer name of this profile.

        Returns:
            Its index in `layers`.

        Example:

        >>> profile.index("dense_1")
        1
        """
        for position, layer in enumerate(self._layers):
            if layer.name == name:
                return position
        raise ValueError(
            f"No layer named {name!r} in this profile. Received: name={name!r}. "
            f"Known layers: {self.layer_names}"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Profile):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        total = self.total_time or 1.0
        rows = [
            (
                str(i),
                layer.name,
                layer.class_name,
                f"{layer.time * 1e3:.3f}",
                f"{100 * layer.time / total:.1f}",
                _format_bytes(layer.param_bytes),
                _format_bytes(layer.optimizer_bytes),
                _format_bytes(layer.output_bytes),
                _format_bytes(layer.live_bytes),
            )
            for i, layer in enumerate(self._layers)
        ]
        header = (
            "#",
            "layer",
            "class",
            "time ms",
            "time %",
            "params",
            "opt state",
            "out/sample",
            "live/sample",
        )
        title = (
            f"Profile of {self._model_name or 'model'}: {len(self)} layers, "
            f"batch {self._batch_size} on {self._device_kind}, "
            f"total {self.total_time * 1e3:.3f} ms, "
            f"params {_format_bytes(self.param_bytes)}, "
            f"optimizer {self._optimizer}"
        )
        return title + "\n" + _table(header, rows)

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-compatible data.

        Returns:
            A dict; `Profile.from_dict` inverts it.

        Example:

        >>> smd.Profile.from_dict(profile.to_dict()) == profile
        True
        """
        return {
            "format_version": _FORMAT_VERSION,
            "model_name": self._model_name,
            "batch_size": self._batch_size,
            "input_bytes": self._input_bytes,
            "device_kind": self._device_kind,
            "optimizer": self._optimizer,
            "call_overhead": self._call_overhead,
            "layers": [
                dict(dataclasses.asdict(layer), inputs=list(layer.inputs))
                for layer in self._layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Rebuilds a profile from `to_dict()` data.

        Args:
            data: A dict as returned by `to_dict`.

        Returns:
            The `Profile`.

        Example:

        >>> smd.Profile.from_dict(profile.to_dict())
        """
        check_format_version(
            data, _FORMAT_VERSION, what="profile", remedy="Profile the model again."
        )
        return cls(
            [LayerProfile(**layer) for layer in data["layers"]],
            batch_size=data["batch_size"],
            input_bytes=data["input_bytes"],
            device_kind=data["device_kind"],
            optimizer=data["optimizer"],
            model_name=data["model_name"],
            call_overhead=data["call_overhead"],
        )


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(header[c]), *(len(row[c]) for row in rows)) if rows else len(header[c])
        for c in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if c in (1, 2) else cell.rjust(width)
            for c, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _nbytes(tensor: Any) -> int:
    shape = tensor.shape
    return int(np.prod(shape, dtype=np.int64)) * tf.as_dtype(tensor.dtype).size


def _variable_bytes(variable: Any) -> int:
    return (
        int(np.prod(variable.shape, dtype=np.int64)) * tf.as_dtype(variable.dtype).size
    )


def _per_sample(nbytes: int, tensor: Any, batch_size: int) -> int:
    shape = tensor.shape
    if len(shape) and shape[0] == batch_size:
        return nbytes // batch_size
    return math.ceil(nbytes / batch_size)


def optimizer_slots_per_parameter(optimizer: Any) -> float:
    """How many values of state an optimizer keeps per trainable parameter.

    Builds a fresh copy of the optimizer (from its config) on one small
    variable and counts the state variables of that variable's shape: Adam
    keeps 2 (momentum and velocity), SGD with momentum 1, plain SGD 0.

    Args:
        optimizer: A Keras optimizer instance or identifier (`"adam"`).

    Returns:
        The number of state values per parameter.

    Example:

    >>> optimizer_slots_per_parameter("adam")
    2.0
    """
    optimizer = keras.optimizers.get(optimizer)
    fresh = type(optimizer).from_config(optimizer.get_config())
    probe_size = 7
    probe = keras.Variable(np.zeros(probe_size, "float32"), name="probe")
    fresh.build([probe])
    values = sum(
        int(np.prod(v.shape))
        for v in fresh.variables
        if tuple(v.shape) == (probe_size,)
    )
    return values / probe_size


def _sample_inputs(model: Any, sample_batch: Any) -> list[tf.Tensor]:
    flat = [tf.convert_to_tensor(x) for x in keras.tree.flatten(sample_batch)]
    expected = len(keras.tree.flatten(model.inputs))
    if len(flat) != expected:
        raise ValueError(
            f"`sample_batch` must hold the model's {expected} input(s) (the `x` "
            f"of a batch, without labels); it holds {len(flat)} tensors. "
            f"Received: sample_batch with {len(flat)} tensors. Pass only `x`."
        )
    return flat


def _timed_rounds(
    fns: Sequence[Callable[[], Any]],
    *,
    warmup: int,
    repeats: int,
    budget: float,
    sync: bool,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Median seconds of each `fn()`, timed in rounds that visit every fn once.

    Round-robin timing spreads each function's samples over the whole run,
    so a burst of load elsewhere on the machine lands in one round of every
    function rather than in all samples of one. Rounds stop after `repeats`,
    or after the round in which `budget` seconds of timed calls are spent.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    if sync:
        tf.test.experimental.sync_devices()
    samples: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            start = clock()
            fn()
            if sync:
                tf.test.experimental.sync_devices()
            times.append(clock() - start)
            spent += times[-1]
        if spent >= budget:
            break
    return [statistics.median(times) for times in samples]


def stage_step(
    graph: LayerGraph,
    values: dict[str, tf.Tensor],
    start: int,
    stop: int,
    *,
    live: Sequence[Sequence[str]] | None = None,
) -> Callable[[], Any]:
    """A callable running nodes `[start, stop)` forward and backward, as a stage.

    The nodes run in one `tf.function`, on fixed inputs: the tensors they
    consume that earlier nodes produce (taken from `values`). Backward
    starts from ones at every tensor they produce that is live after `stop`
    and reaches their trainable variables and floating inputs, as a pipeline
    stage's backward pass would.

    Args:
        graph: The model's `LayerGraph`.
        values: Every tensor of one forward pass, by key (`graph.run(...)`).
        start: First node.
        stop: One past the last node.
        live: `graph.live_after()`, if already computed. Defaults to `None`.

    Returns:
        A no-argument callable that runs the step once.

    Example:

    >>> graph = flatten_model(model)
    >>> values = graph.run([x], training=True)
    >>> step = stage_step(graph, values, 0, 3)
    >>> step()  # forward + backward of nodes 0, 1 and 2
    """
    live = graph.live_after() if live is None else live
    nodes = graph.nodes[start:stop]
    produced = [k for node in nodes for k in node.outputs]
    produced_set = set(produced)
    needed = list(
        dict.fromkeys(k for node in nodes for k in node.inputs if k not in produced_set)
    )
    targets = [k for k in live[stop - 1] if k in produced_set] or produced
    targets = [k for k in targets if values[k].dtype.is_floating]
    floating = [k for k in needed if values[k].dtype.is_floating]
    variables, seen = [], set()
    for node in nodes:
        for variable in node.operation.trainable_weights if node.is_layer else []:
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    inputs = [values[k] for k in needed]

    @tf.function
    def step(*tensors: tf.Tensor) -> list[tf.Tensor]:
        known = dict(zip(needed, tensors))
        with tf.GradientTape() as tape:
            for key in floating:
                tape.watch(known[key])
            known = graph.run([], start=start, stop=stop, values=known, training=True)
        outputs = [known[k] for k in targets]
        sources = [known[k] for k in floating] + variables
        if not outputs or not sources:
            return [known[k] for k in produced]
        grads = tape.gradient(
            outputs, sources, output_gradients=[tf.ones_like(t) for t in outputs]
        )
        return [g for g in grads if g is not None] or outputs

    return lambda: step(*inputs)


def profile_model(
    model: keras.Model,
    sample_batch: Any,
    *,
    optimizer: Any = None,
    warmup: int = 2,
    repeats: int = 10,
    time_budget: float = 60.0,
    device: str | None = None,
    expand_nested: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    chunk: int = 8,
) -> Profile:
    """Measures each layer of a Sequential or functional model.

    The model's layer graph is flattened (nested Sequential and functional
    models expanded) into topological order. The sample batch is run through
    it once to get every layer's inputs; then each layer runs alone, forward
    and backward (gradients for its trainable variables and floating inputs,
    `training=True`), in a `tf.function`: `warmup` untimed calls each, then
    up to `repeats` rounds that time every layer once (so a burst of other
    load on the machine spoils one sample of each layer, not all samples of
    one), stopping after the round in which `time_budget` is spent (at least
    one round). The median, less the cost of an empty `tf.function` call, is
    the layer's own time; chunks of `chunk` consecutive layers, timed in the
    same rounds as one step each, then rescale their layers' times to their
    measured sum (see `chunk`), so that runs of layers, such as pipeline
    stages, are predicted as they run. Sizes are exact:
    parameter bytes from the variables, activation bytes from the outputs.
    Non-trainable state the run touches (batch-norm statistics, random
    seeds) is restored afterwards.

    Args:
        model: A `keras.Sequential` or functional `keras.Model`.
        sample_batch: Inputs `x` for one batch (no labels), in the structure
            the model takes. Its leading dimension is the profile's batch size.
        optimizer: The optimizer whose state to count (instance or name).
            Defaults to `None` (the model's compiled optimizer, if any;
            otherwise no optimizer state).
        warmup: Untimed calls per layer (the first traces). Defaults to `2`.
        repeats: Most timed rounds (calls per layer). Defaults to `10`.
        time_budget: Seconds of timed calls for the whole model, after which
            no new round starts. Defaults to `60.0`.
        device: Device to run on, for example `"/GPU:0"`. Defaults to `None`
            (TensorFlow's default placement).
        expand_nested: Whether nested Sequential and functional models are
            profiled layer by layer (named `outer/inner`) rather than as one
            layer each. Defaults to `True`.
        clock: The clock, in seconds. Defaults to `time.perf_counter` (wall
            time). `time.process_time` (this process's CPU time) is steadier
            on a CPU shared with other jobs when TensorFlow runs its ops on
            one thread; it is wrong for GPUs, whose work is not CPU time.
        chunk: Layers per calibration chunk: consecutive chunks of this many
            layers are also timed as one step each, and each layer's time is
            scaled so its chunk's layers add up to the chunk's time (this
            accounts for costs that isolated layers do not show, such as
            activations evicted from cache between forward and backward).
            `1` turns calibration off. Defaults to `8`.

    Returns:
        A `Profile`.

    Raises:
        ValueError: for a subclassed model (its layer graph is unknown; the
            message explains the manual split), or a `sample_batch` that does
            not match the model's inputs.

    Example:

    >>> model = keras.Sequential([keras.Input((64,)),
    ...                           keras.layers.Dense(256, activation="relu"),
    ...                           keras.layers.Dense(10)])
    >>> profile = smd.profile_model(model, np.zeros((32, 64), "float32"))
    >>> profile.layers[0].param_bytes
    66560
    """
    if warmup < 0 or repeats < 1 or time_budget < 0 or chunk < 1:
        raise ValueError(
            "Need warmup >= 0, repeats >= 1, time_budget >= 0 and chunk >= 1. "
            f"Received: warmup={warmup}, repeats={repeats}, "
            f"time_budget={time_budget}, chunk={chunk}"
        )
    graph = _graph_of(model, sample_batch, expand_nested)
    inputs = _sample_inputs(model, sample_batch)
    batch_size = int(inputs[0].shape[0]) if len(inputs[0].shape) else 1
    optimizer = (
        optimizer if optimizer is not None else getattr(model, "optimizer", None)
    )
    slots = optimizer_slots_per_parameter(optimizer) if optimizer is not None else 0.0
    optimizer_name = (
        type(keras.optimizers.get(optimizer)).__name__ if optimizer else None
    )
    sync = bool(tf.config.list_logical_devices("GPU"))
    kind = (tf.DeviceSpec.from_string(device).device_type if device else None) or (
        "GPU" if sync else "CPU"
    )
    state = [(v, v.numpy()) for v in model.non_trainable_variables]
    try:
        with tf.device(device) if device else contextlib.nullcontext():
            layers, overhead = _measure(
                graph,
                inputs,
                batch_size=batch_size,
                slots=slots,
                warmup=warmup,
                repeats=repeats,
                time_budget=time_budget,
                sync=sync,
                clock=clock,
                chunk=chunk,
            )
    finally:
        for variable, value in state:
            variable.assign(value)
    input_bytes = sum(_per_sample(_nbytes(x), x, batch_size) for x in inputs)
    return Profile(
        layers,
        batch_size=batch_size,
        input_bytes=input_bytes,
        device_kind=kind,
        optimizer=optimizer_name,
        model_name=model.name,
        call_overhead=overhead,
    )


def _graph_of(model: Any, sample_batch: Any, expand_nested: bool) -> LayerGraph:
    if isinstance(model, keras.Sequential) and not model.built:
        model(sample_batch)
    return flatten_model(model, expand_nested=expand_nested)


def _measure(
    graph: LayerGraph,
    inputs: list[tf.Tensor],
    *,
    batch_size: int,
    slots: float,
    warmup: int,
    repeats: int,
    time_budget: float,
    sync: bool,
    clock: Callable[[], float],
    chunk: int,
) -> tuple[list[LayerProfile], float]:
    values = graph.run(inputs, training=True)
    live = graph.live_after()

    @tf.function
    def empty(x: tf.Tensor) -> tf.Tensor:
        return x

    tiny = tf.zeros([1])
    n = len(graph.nodes)
    singles = [stage_step(graph, values, i, i + 1, live=live) for i in range(n)]
    bounds = list(range(0, n, chunk)) + [n] if chunk > 1 else []
    chunks = [
        stage_step(graph, values, bounds[c], bounds[c + 1], live=live)
        for c in range(len(bounds) - 1)
    ]
    overhead, *seconds = _timed_rounds(
        [lambda: empty(tiny), *singles, *chunks],
        warmup=max(warmup, 1),
        repeats=repeats,
        budget=time_budget,
        sync=sync,
        clock=clock,
    )
    times = [max(t - overhead, 0.0) for t in seconds[:n]]
    # Calibrate: a chunk of consecutive layers run as one step also pays for
    # what isolated layers do not (activations evicted from cache between
    # forward and backward, gradient sums of tensors used twice); spread each
    # chunk's measured time over its layers in proportion to their own.
    for c, fused in enumerate(seconds[n:]):
        a, b = bounds[c], bounds[c + 1]
        fused = max(fused - overhead, 0.0)
        alone = math.fsum(times[a:b])
        for i in range(a, b):
            times[i] = fused * times[i] / alone if alone > 0 else fused / (b - a)
    seen: set[int] = set()
    layers = []
    for position, node in enumerate(graph.nodes):
        param = trainable = 0
        if node.is_layer:
            trainable_ids = {id(v) for v in node.operation.trainable_weights}
            for variable in node.operation.weights:
                if id(variable) in seen:
                    continue
                seen.add(id(variable))
                size = _variable_bytes(variable)
                param += size
                if id(variable) in trainable_ids:
                    trainable += size
        output_bytes = sum(
            _per_sample(_nbytes(values[k]), values[k], batch_size) for k in node.outputs
        )
        live_bytes = sum(
            _per_sample(_nbytes(values[k]), values[k], batch_size)
            for k in live[position]
        )
        layers.append(
            LayerProfile(
                name=node.name,
                class_name=type(node.operation).__name__,
                inputs=node.inputs,
                time=times[position],
                param_bytes=param,
                trainable_bytes=trainable,
                optimizer_bytes=int(round(slots * trainable)),
                output_bytes=output_bytes,
                live_bytes=live_bytes,
                is_layer=node.is_layer,
            )
        )
        logger.debug("Profiled %s: %.3f ms", node.name, times[position] * 1e3)
    return layers, overhead


class ProfilingCallback(keras.callbacks.Callback):
    """Profiles the model during the first steps of `fit`.

    After `profile_after_steps` training batches (so the model and its
    optimizer are built), it runs `profile_model` on a sample batch, keeps
    the result in `self.profile`, optionally saves it as JSON, and calls
    `on_profile(profile)`. `smd.PipelineModel` uses that hook to partition
    the model and continue pipelined. When no `sample_batch` is given, one is
    synthesised from the model's input specs (zeros, `batch_size` rows):
    layer times and sizes depend on shapes, not values.

    Args:
        sample_batch: Inputs `x` of one batch. Defaults to `None`
            (synthesised).
        batch_size: Rows of the synthesised batch. Defaults to `32`.
        profile_after_steps: Training batches to run first. Defaults to `1`.
        path: JSON file to save the profile to. Defaults to `None`.
        on_profile: Called with the `Profile` once it exists. Defaults to
            `None`.
        model: The model to profile. Defaults to `None` (the model `fit`
            runs, or its `profiled_model` attribute when it has one).
        **profile_kwargs: Passed to `profile_model` (`warmup`, `repeats`,
            `time_budget`, `device`, `optimizer`, `expand_nested`, `clock`,
            `chunk`).

    Example:

    >>> callback = smd.ProfilingCallback(path="profile.json")
    >>> model.fit(x, y, epochs=1, callbacks=[callback])
    >>> print(callback.profile)
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
        unknown = set(profile_kwargs) - {
            "warmup",
            "repeats",
            "time_budget",
            "device",
            "optimizer",
            "expand_nested",
            "clock",
            "chunk",
        }
        if unknown:
            raise TypeError(
                f"Unknown options for profile_model: {sorted(unknown)}. "
                f"Received: {profile_kwargs}"
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

    def _target(self) -> keras.Model:
        if self.target_model is not None:
            return self.target_model
        return getattr(self.model, "profiled_model", self.model)

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

    def run_profile(self) -> Profile:
        """Profiles the target model now (also called by `fit`'s hook).

        Returns:
            The new `Profile`, also kept in `self.profile`.

        Example:

        >>> callback.set_model(model)
        >>> profile = callback.run_profile()
        """
        model = self._target()
        sample = self.sample_batch
        if sample is None:
            sample = self._synthesised_batch(model)
        kwargs = dict(self.profile_kwargs)
        if "optimizer" not in kwargs and getattr(self.model, "optimizer", None):
            kwargs["optimizer"] = self.model.optimizer
        self.profile = profile_model(model, sample, **kwargs)
        logger.info("Profiled %d layers of %s", len(self.profile), model.name)
        if self.path is not None:
            self.profile.save(self.path)
        if self.on_profile is not None:
            self.on_profile(self.profile)
        return self.profile
