"""Measuring a Keras model layer by layer: time, parameter and activation bytes.

The measurements become a `Profile` (the TensorFlow-free data model in
`tf_smdist.pipeline.profile`); `ProfilingCallback`
(`tf_smdist.pipeline.callback`) runs `profile_model` during `fit`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.pipeline.graph import LayerGraph, flatten_model
from tf_smdist.pipeline.profile import LayerProfile, Profile

__all__ = [
    "LayerProfile",
    "Profile",
    "optimizer_slots_per_parameter",
    "profile_model",
    "stage_step",
]

logger = logging.getLogger(__name__)


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
    matmul_rule: bool = False,
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
        matmul_rule: Run the backward with the pipeline's MatMul gradient
            rule (see `profile_model`). Defaults to `False`.

    Returns:
        A no-argument callable that runs the step once.

    Example:

    >>> graph = flatten_model(model)
    >>> values = graph.run([tf.constant(x)], training=True)
    >>> step = stage_step(graph, values, 0, 3)
    >>> gradients = step()  # forward + backward of nodes 0, 1 and 2
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
    step = tf.function(
        _StageStep(graph, start, stop, needed, floating, targets, produced, variables,
                   matmul_rule)
    )
    return lambda: step(*inputs)


class _StageStep:
    """Forward and backward of nodes `[start, stop)`, as `stage_step` runs it.

    An object rather than a closure: TensorFlow counts the traces of
    `tf.function`s per Python code object, so one closure traced once per
    layer would read as a function retraced on every call (and log
    TensorFlow's retracing warning); each instance is counted on its own.
    """

    def __init__(
        self,
        graph: LayerGraph,
        start: int,
        stop: int,
        needed: list[str],
        floating: list[str],
        targets: list[str],
        produced: list[str],
        variables: list[Any],
        matmul_rule: bool = False,
    ) -> None:
        self.graph, self.start, self.stop = graph, start, stop
        self.needed, self.floating = needed, floating
        self.targets, self.produced = targets, produced
        self.variables = variables
        self.matmul_rule = matmul_rule

    def __call__(self, *tensors: tf.Tensor) -> list[tf.Tensor]:
        known = dict(zip(self.needed, tensors))
        with tf.GradientTape() as tape:
            for key in self.floating:
                tape.watch(known[key])
            known = self.graph.run(
                [], start=self.start, stop=self.stop, values=known, training=True
            )
        outputs = [known[k] for k in self.targets]
        sources = [known[k] for k in self.floating] + self.variables
        if not outputs or not sources:
            return [known[k] for k in self.produced]
        with (_compat.small_rows_matmul_gradients() if self.matmul_rule
              else contextlib.nullcontext()):
            grads = tape.gradient(
                outputs, sources, output_gradients=[tf.ones_like(t) for t in outputs]
            )
        return [g for g in grads if g is not None] or outputs


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
    matmul_rule: bool = False,
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
        matmul_rule: Time the backward passes with the pipeline's MatMul
            gradient rule (`tf_smdist._compat.small_rows_matmul_gradients`:
            the input gradient of a product as `(W @ dY^T)^T` when the rows
            are at most half the weight's rows, on CPU), as `PipelineModel`
            trains, instead of TensorFlow's, as plain Keras and the
            data-parallel paths train. Pass the two profiles to `smd.plan`
            as `profile` and `pipeline_profile`. Defaults to `False`.

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
                matmul_rule=matmul_rule
                and _compat.small_rows_matmul_gradients(device).enabled,
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


@functools.cache
def _empty_function() -> Any:
    """One `tf.function` doing nothing, traced once per process: the cost of
    a call."""
    return tf.function(lambda x: x)


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
    matmul_rule: bool = False,
) -> tuple[list[LayerProfile], float]:
    values = graph.run(inputs, training=True)
    live = graph.live_after()
    empty = _empty_function()
    tiny = tf.zeros([1])
    n = len(graph.nodes)
    singles = [stage_step(graph, values, i, i + 1, live=live, matmul_rule=matmul_rule)
               for i in range(n)]
    bounds = list(range(0, n, chunk)) + [n] if chunk > 1 else []
    chunks = [
        stage_step(graph, values, bounds[c], bounds[c + 1], live=live,
                   matmul_rule=matmul_rule)
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
