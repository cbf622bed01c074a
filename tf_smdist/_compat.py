"""The one place that imports TensorFlow-private modules; each import says why.

Version workarounds live here too, so the rest of the package uses only
public TensorFlow and Keras APIs plus the names below.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = [
    "MirroredExtended",
    "accept_tf_keras_spellings",
    "accumulated_gradients",
    "clipping_with",
    "wrap_loss_scale_check",
    "all_sublayers",
    "compiled_parts",
    "cross_device_gather",
    "device_util",
    "distribute_values",
    "get_devices_from",
    "input_util",
    "keep_weight_decay_exclusions",
    "graph_variable_handles",
    "in_xla_context",
    "move_variable",
    "refresh_optimizer_index",
    "regroup",
    "small_rows_matmul_gradients",
    "unordered_in_functions",
    "stop_checkpoint_writes",
    "xplane_pb2",
]

# --- data parallel ------------------------------------------------------
# tf.distribute has no public way to build a strategy whose extended object
# differs from MirroredStrategy's (needed to route reductions and updates to
# our cross-device ops and to reject variables created outside the scope).
from tensorflow.python.distribute.mirrored_strategy import (  # noqa: E402
    MirroredExtended as MirroredExtended,
)

# Mirrored / PerReplica values have no public constructor; a CrossDeviceOps
# subclass must return them (the public base class expects these types).
from tensorflow.python.distribute import (  # noqa: E402, F401
    values as distribute_values,
)

# `regroup` turns per-device results into Mirrored values the way the built-in
# CrossDeviceOps do; not exported publicly.
from tensorflow.python.distribute.distribute_utils import (  # noqa: E402
    regroup as regroup,
)

# Device lists of DistributedValues / variables / strings, canonicalised the
# way the built-in CrossDeviceOps compare them; not exported publicly.
from tensorflow.python.distribute.cross_device_ops import (  # noqa: E402
    get_devices_from as get_devices_from,
)

# Canonical device names (resolving partial specs against a default device),
# as tf.distribute itself compares them; no public equivalent.
from tensorflow.python.distribute import (  # noqa: E402
    device_util as device_util,
)

# --- host collectives inside XLA ------------------------------------------
def in_xla_context() -> bool:
    """Whether ops built now go into a function XLA compiles (`jit_compile=True`).

    tf_smdist's collectives are host ops without XLA kernels, so they cannot
    run there; callers raise a clear error at trace time instead of XLA's
    "unsupported operations" at the first step. TensorFlow has no public
    query for this; MirroredStrategy asks the same private helper before it
    decides between merge_call and in-XLA collectives.
    """
    import tensorflow as tf

    # The XLA context of the graph being built; no public API exposes it.
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()))


# --- multi-process data parallel -----------------------------------------
# Building a distributed dataset with an InputContext (rank sharding plus
# rebatching of the global batch) is what MultiWorkerMirroredStrategy does;
# the helpers that do it are not exported publicly.
from tensorflow.python.distribute import input_util  # noqa: E402


# --- pipeline parallel ----------------------------------------------------
def xplane_pb2() -> object:
    """The XSpace protobuf module of TensorFlow's profiler traces.

    `tf.profiler.experimental` writes `*.xplane.pb` files but exports no
    reader; the generated protobuf module ships only under `tensorflow.tsl`.
    Imported lazily: only timeline tracing needs it.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2 as module

    return module


# --- Horovod-compatible collectives -----------------------------------------
_unordered_types: set = set()


def unordered_in_functions(op_types: frozenset) -> None:
    """Lets stateful ops of `op_types` run in any order inside a tf.function.

    tf.function's automatic control dependencies chain every stateful op
    without resource inputs in program order, so each collective would wait
    for the previous one to finish: no fusion, and no freedom of order that
    name matching exists for. The ops stay stateful (never constant-folded,
    deduplicated or pruned); each is given its own output as the only
    "resource" it writes, so it is ordered against nothing. TensorFlow
    exposes no public way to declare an op order-insensitive; the
    resource-resolver registry is the hook its own collectives use.
    Idempotent.

    Args:
        op_types: op type names, e.g. `{"SmdistHvdAllreduce"}`.
    """
    # The resolver registry (see the docstring) is not exported publicly.
    from tensorflow.python.framework import auto_control_deps

    first = not _unordered_types
    _unordered_types.update(op_types)
    if not first:
        return

    def _smdist_unordered_collectives(op, reads, writes) -> bool:
        del reads
        if op.type not in _unordered_types or not op.outputs:
            return False
        own = op.outputs[0]
        if own in writes:
            return False
        writes.add(own)
        return True

    auto_control_deps.register_acd_resource_resolver(_smdist_unordered_collectives)


# --- pipeline parallel (continued) ----------------------------------------
def move_variable(variable: Any, device: str) -> Any:
    """Re-creates the TensorFlow variable behind a Keras variable on `device`.

    The Keras variable object stays the same (so models, optimizers and
    saved files that hold it do not change); its value is kept. Keras 3's
    TensorFlow variable keeps its `tf.Variable` in `_value` and adopts an
    existing one through `_initialize`; no public API moves a variable to
    another device.

    Args:
        variable: A `keras.Variable` (TensorFlow backend).
        device: The TensorFlow device to move it to.

    Returns:
        The key Keras' TensorFlow optimizers knew the variable by before the
        move (`_var_key`: the `tf.Variable`'s `_unique_id`), which the move
        changes; see `keep_weight_decay_exclusions`.
    """
    import tensorflow as tf

    value = variable.value
    old_key = value._unique_id
    with tf.init_scope(), tf.device(device):
        moved = tf.Variable(
            tf.identity(value),
            trainable=variable.trainable,
            name=value.name.split(":")[0],
        )
    variable._initialize(moved)
    return old_key


def refresh_optimizer_index(optimizer: Any) -> None:
    """Re-keys a built Keras optimizer after its variables were moved.

    A built Keras optimizer finds each variable's state by a key derived
    from the TensorFlow variable behind it (`_var_key`, stored in
    `_trainable_variables_indices`); `move_variable` changes that variable,
    and Keras has no public call to rebuild the index.

    Args:
        optimizer: A built Keras optimizer (TensorFlow backend).
    """
    optimizer._trainable_variables_indices = {
        optimizer._var_key(v): i for i, v in enumerate(optimizer._trainable_variables)
    }


def keep_weight_decay_exclusions(optimizer: Any, source: Any, moved: dict) -> None:
    """Gives `optimizer` the weight-decay exclusions set on `source`, re-keyed.

    Keras' `exclude_from_weight_decay(var_list=...)` stores the keys of the
    TensorFlow variables behind the Keras variables (`_var_key`) in
    `_exclude_from_weight_decay`, and `var_names=` a compiled pattern in
    `_exclude_from_weight_decay_pattern`. Neither is in `get_config`, so a
    fresh copy of the optimizer loses them, and `move_variable` changes the
    keys, so the old ones match nothing. No public API reads or sets them.

    Args:
        optimizer: The optimizer to fix (a `LossScaleOptimizer`'s inner one
            is used).
        source: The optimizer the user configured: `optimizer` itself, or
            the one a fresh copy replaces.
        moved: {key before a move (`move_variable`'s result): the Keras
            variable}.
    """
    source = getattr(source, "inner_optimizer", source)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    keys = getattr(source, "_exclude_from_weight_decay", None)
    pattern = getattr(source, "_exclude_from_weight_decay_pattern", None)
    if not keys and pattern is None:
        return  # nothing excluded
    optimizer._exclude_from_weight_decay = {
        optimizer._var_key(moved[key]) if key in moved else key for key in keys or ()
    }
    optimizer._exclude_from_weight_decay_pattern = pattern
    optimizer._exclude_from_weight_decay_cache = {}


def all_sublayers(model: Any) -> list[Any]:
    """Every layer inside `model`, nested ones included (not `model` itself).

    `Model.layers` lists only direct children; Keras' own recursive walk
    (`_flatten_layers`, which also reaches layers tracked inside custom
    layers) is not public.

    Args:
        model: A Keras model or layer.

    Returns:
        The layers, each once.
    """
    return list(model._flatten_layers(include_self=False))


@contextlib.contextmanager
def clipping_with(optimizer: Any, clip: Any) -> Iterator[None]:
    """Has `optimizer` clip its gradients with `clip` while the block runs.

    Keras 3 clips inside `apply`, through the private `_clip_gradients`:
    after a `LossScaleOptimizer` unscales the gradients and, with
    `gradient_accumulation_steps`, on the accumulated mean at update steps
    only, inside a `tf.cond`. A pipeline stage's optimizer holds its stage's
    gradients only, and no public hook lets a caller clip by the norm of
    every stage's gradients at that point; an instance attribute shadows
    the method for the block.

    Args:
        optimizer: a Keras optimizer (not a `LossScaleOptimizer`).
        clip: called with the list of gradients (`None` for some), returns
            the clipped list.
    """
    if not callable(getattr(type(optimizer), "_clip_gradients", None)):
        import keras

        raise NotImplementedError(
            "This Keras version's optimizer has no `_clip_gradients`, which a "
            "pipeline across processes replaces to clip by the whole model's "
            f"norm. Received: {type(optimizer).__name__} of Keras "
            f"{keras.__version__}. Use clipnorm or clipvalue instead of "
            "global_clipnorm.")
    optimizer._clip_gradients = clip
    try:
        yield
    finally:
        del optimizer._clip_gradients


def accumulated_gradients(optimizer: Any, variables: list[Any]) -> list[Any]:
    """A built optimizer's gradient accumulators of `variables`, in order.

    With `gradient_accumulation_steps`, Keras 3 keeps the running sums in
    the private `_accumulated_gradients`, indexed through
    `_get_variable_index`; no public API reads them, and a pipeline stage
    needs them to measure the whole model's norm of the mean it clips.

    Args:
        optimizer: a built Keras optimizer with gradient accumulation.
        variables: variables the optimizer was built on.

    Returns:
        One accumulator variable per entry of `variables`.
    """
    return [optimizer._accumulated_gradients[optimizer._get_variable_index(v)]
            for v in variables]


# --- data parallel (continued) -------------------------------------------
def cross_device_gather(
    cross_device_ops: Any, value: Any, destinations: Any, axis: int, options: Any
) -> Any:
    """Gathers (concatenates) `value` along `axis` with `cross_device_ops`.

    `tf.distribute.CrossDeviceOps` exposes `reduce` and `batch_reduce`
    publicly but its gather only as `_gather`, which `strategy.gather` calls.

    Args:
        cross_device_ops: A `tf.distribute.CrossDeviceOps`.
        value: The per-replica value to gather.
        destinations: Where the result goes.
        axis: The axis to concatenate along.
        options: `tf.distribute.experimental.CommunicationOptions` or `None`.

    Returns:
        The gathered value, mirrored on `destinations`.
    """
    return cross_device_ops._gather(value, destinations, axis, options)


def stop_checkpoint_writes(callback: Any, write: Any) -> None:
    """Replaces how a Keras checkpoint callback writes its files.

    `ModelCheckpoint` and `BackupAndRestore` write through their
    `_save_model` method; Keras has no public switch that keeps the callback
    running (and restoring) on one process while another writes.

    Args:
        callback: A `keras.callbacks.ModelCheckpoint` or `BackupAndRestore`.
        write: Called instead of the callback's own writer, with its
            arguments.
    """
    callback._save_model = write


def compiled_parts(model: Any) -> tuple[Any, Any, Any]:
    """A compiled Keras model's loss tracker, compiled loss and metrics.

    A `train_step` that computes its loss itself (as the pipelines do) must
    update the same `loss` tracker and build and update the same compiled
    metrics that `Model.train_step` does; Keras keeps them in
    `_loss_tracker`, `_compile_loss` and `_compile_metrics` and exposes no
    public accessor.

    Args:
        model: A Keras model (compiled or not).

    Returns:
        `(loss_tracker, compile_loss, compile_metrics)`, each `None` when
        absent.
    """
    return (
        getattr(model, "_loss_tracker", None),
        getattr(model, "_compile_loss", None),
        getattr(model, "_compile_metrics", None),
    )


# --- gradients of small matrix products ------------------------------------
MATMUL_RULE_ENV = "SMDIST_MATMUL_RULE"
_MATMUL_RULE_MODES = ("measure", "always", "never")
# (rows, units, cols, dtype, intra-op threads) -> whether `(W @ dY^T)^T` was
# clearly faster than `dY @ W^T` here; measured once per process.
_through_weights_choice: dict = {}
# Seconds this process has spent measuring; past the budget, shapes not yet
# measured keep the rows test alone (see `_through_weights_is_faster`).
_measured_seconds = 0.0
_MEASURE_BUDGET_S = 10.0


def _matmul_rule_mode() -> str:
    import os

    mode = os.environ.get(MATMUL_RULE_ENV, "measure").strip().lower() or "measure"
    if mode not in _MATMUL_RULE_MODES:
        raise ValueError(
            f"{MATMUL_RULE_ENV} must be one of {', '.join(_MATMUL_RULE_MODES)}. "
            f"Received: {os.environ.get(MATMUL_RULE_ENV)!r}")
    return mode


def _time_input_gradient_forms(rows: int, units: int, cols: int, dtype: Any,
                               copies: int | None = None,
                               repeats: int | None = None) -> tuple:
    """Seconds per product of `dY @ W^T` and of `(W @ dY^T)^T` on this CPU.

    `dY` is rows x cols and `W` units x cols. Timed in a graph of its own
    with the graph optimizers off (so neither form is rewritten into the
    other), `copies` independent products per run, with this process's
    intra-op thread count; medians of `repeats` interleaved runs. By
    default both shrink as the product grows (8 and 5 up to 50 MFLOP per
    product, down to 1 and 3 from 400), so that one shape costs a fraction
    of a second.
    """
    import time

    import numpy as np
    import tensorflow as tf

    flops = 2.0 * rows * units * cols
    if copies is None:
        copies = int(max(1, min(8, 4e8 // max(flops, 1.0))))
    if repeats is None:
        repeats = 5 if flops * copies <= 4e8 else 3

    graph = tf.Graph()
    with graph.as_default():
        grads = [tf.compat.v1.placeholder(tf.float32, [rows, cols])
                 for _ in range(copies)]
        weights = [tf.compat.v1.placeholder(tf.float32, [units, cols])
                   for _ in range(copies)]
        pairs = [(tf.cast(g, dtype), tf.cast(w, dtype)) for g, w in zip(grads, weights)]
        # One element of each result is fetched, so each run returns little.
        direct = [tf.matmul(g, w, transpose_b=True)[0, 0] for g, w in pairs]
        through = [tf.transpose(tf.matmul(w, g, transpose_b=True))[0, 0]
                   for g, w in pairs]
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_parallelism_threads=1)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.optimizer_options.opt_level = tf.compat.v1.OptimizerOptions.L0
    rng = np.random.default_rng(0)
    feed = {p: rng.standard_normal(p.shape.as_list(), dtype=np.float32)
            for p in grads + weights}
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        # Warm-up: the first runs allocate and pick kernels.
        for _ in range(1 if flops * copies > 4e8 else 2):
            session.run(direct, feed)
            session.run(through, feed)
        times: tuple = ([], [])
        for _ in range(repeats):
            for fetch, out in ((direct, times[0]), (through, times[1])):
                start = time.perf_counter()
                session.run(fetch, feed)
                out.append((time.perf_counter() - start) / copies)
    return float(np.median(times[0])), float(np.median(times[1]))


def _through_weights_is_faster(rows: int, units: int, cols: int, dtype: Any) -> bool:
    """Whether the rule's `(W @ dY^T)^T` should replace `dY @ W^T` here.

    Times both forms once per shape and process (`_time_input_gradient_forms`)
    and takes the rule's only when it is at least 10 % faster; after 10 s of
    measuring in a process, further shapes take it unmeasured.
    """
    import time

    import tensorflow as tf

    key = (rows, units, cols, tf.as_dtype(dtype).name,
           tf.config.threading.get_intra_op_parallelism_threads())
    if key not in _through_weights_choice:
        global _measured_seconds
        if _measured_seconds > _MEASURE_BUDGET_S:
            # A model with very many shapes: the rest keep the rows test
            # alone rather than delay the first step further.
            return True
        start = time.monotonic()
        direct, through = _time_input_gradient_forms(rows, units, cols, dtype)
        _measured_seconds += time.monotonic() - start
        _through_weights_choice[key] = through < 0.9 * direct
    return _through_weights_choice[key]


def _small_rows_matmul_grad(original: Any, small_rows: bool, defer: Any,
                            mode: str = "measure") -> Any:
    # `mode`: `SMDIST_MATMUL_RULE`'s value, or "rows" for the rows test alone
    # (a remote device, whose CPU this process cannot time).
    import tensorflow as tf

    def grad_fn(op: Any, grad: Any) -> Any:
        skip = getattr(op, "skip_input_indices", None) or ()
        a, b = op.inputs[0], op.inputs[1]
        # `defer(op, grad)` keeps `(a, grad)` to compute the weight gradient
        # later; the tape then sees none from this product.
        deferred = defer is not None and 1 not in skip and bool(defer(op, grad))
        if (not small_rows or 0 in skip or op.get_attr("transpose_a")
                or op.get_attr("transpose_b")
                or not (a.dtype.is_floating and a.dtype != tf.float16)
                or a.shape.rank != 2 or b.shape.rank != 2):
            if not deferred:
                return original(op, grad)
            # `defer` takes untransposed products only.
            return (None if 0 in skip else tf.matmul(grad, b, transpose_b=True)), None

        def through_weights() -> Any:  # (b @ grad^T)^T == grad @ b^T
            return tf.transpose(tf.matmul(b, grad, transpose_b=True))

        def direct() -> Any:
            return tf.matmul(grad, b, transpose_b=True)

        # Some CPU kernels pack a transposed right operand slowly (about 1
        # ms per MiB on one machine class): transpose the smaller of `b`
        # (weights) and `grad` (rows x units, twice: operand and result)
        # where that was measured to pay (on oneDNN's kernels it did not).
        rows, units, cols = grad.shape[0], b.shape[0], b.shape[1]
        if rows is not None and units is not None and cols is not None:
            small = (2 * rows <= units and mode != "never"
                     and (mode != "measure"
                          or _through_weights_is_faster(rows, units, cols, a.dtype)))
            grad_a = through_weights() if small else direct()
        elif mode == "never":
            grad_a = direct()
        else:
            small = 2 * tf.shape(grad)[0] <= tf.shape(b)[0]
            grad_a = tf.cond(small, through_weights, direct)
        grad_b = (None if 1 in skip or deferred
                  else tf.matmul(a, grad, transpose_a=True))
        return grad_a, grad_b

    return grad_fn


def graph_variable_handles(variables: Any) -> dict:
    """The handles through which the current function graph reads `variables`.

    Inside a `tf.function`, a variable is read through a placeholder that
    captures its resource handle; `ReadVariableOp`s take that placeholder.
    Only the function graph (TensorFlow's internal `FuncGraph`) knows which
    placeholder captures which handle (its `captures`), and no public API
    maps one to the other.

    Args:
        variables: Keras or TensorFlow variables.

    Returns:
        `{placeholder.ref(): index in variables}` for the variables the
        current graph has read so far; empty when executing eagerly.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return {}
    graph = tf.compat.v1.get_default_graph()
    captures = getattr(graph, "captures", None) or ()
    inner = {id(external): internal for external, internal in captures}
    out = {}
    for i, v in enumerate(variables):
        handle = getattr(v, "handle", None)  # Keras variables pass theirs on
        if handle is not None and id(handle) in inner:
            out[inner[id(handle)].ref()] = i
    return out


class small_rows_matmul_gradients:  # noqa: N801 (used as a context manager)
    """Within it, gradients of `MatMul` avoid a slow transposed-weight kernel.

    On CPU, TensorFlow's Eigen kernel computes `grad @ weights^T` (the input
    gradient of every dense layer) by first transposing the weights, at
    about 1 ms per MiB on one class of machine: for a micro-batch of 32 rows
    and a 512 x 512 layer that is 2.5x the product itself. Inside this
    context, gradient tapes compute it as `(weights @ grad^T)^T` when the
    rows are at most half the weights' rows (the same value up to fp32
    rounding order) and, on a local CPU device, when that form was measured
    to be at least 10 % faster for the shape: TensorFlow's oneDNN kernels
    transpose the weights cheaply, and there the extra transpose of the
    result cost 7-11 % of a pipeline step. The measurement (0.1-0.2 s
    per 512-wide shape on a 2-core machine, once per process) is skipped
    with `SMDIST_MATMUL_RULE=always` or `never`. Used around the pipeline's
    own `tape.gradient` calls, where micro-batches are small; the change is
    undone on exit. GPU kernels transpose operands for free, so for a stage
    on a GPU (or on the default device when a GPU is visible) it changes
    nothing.

    Args:
        device: the device the gradients run on. Defaults to `None` (the
            default device).
        defer: called as `defer(op, output_gradient)` for every `MatMul`
            whose right operand's gradient is wanted; when it returns true
            it has kept what it needs (`op.inputs[0]` and the output
            gradient) to compute that gradient itself, and the tape gets
            none from this product (on any device). Defaults to `None`.

    TensorFlow's tape looks gradient functions up by op type in its
    gradient registry and offers no public way to override one for a
    region (`Graph.gradient_override_map` is ignored by `GradientTape`),
    so the registry's entry is swapped for the duration.
    """

    def __init__(self, device: str | None = None, defer: Any = None) -> None:
        import tensorflow as tf

        kind = tf.DeviceSpec.from_string(device).device_type if device else None
        if kind is None:
            kind = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        self.enabled = kind.upper() == "CPU"  # whether the small-rows rule applies
        # A bad SMDIST_MATMUL_RULE fails here, early.
        self._mode = _matmul_rule_mode() if self.enabled else "never"
        # A remote device's CPU is not this process's: keep the rows test.
        job = tf.DeviceSpec.from_string(device).job if device else None
        if self._mode == "measure" and job not in (None, "localhost"):
            self._mode = "rows"
        self._defer = defer
        self._saved = None

    def __enter__(self) -> None:
        if not self.enabled and self._defer is None:
            return
        # The gradient registry (see the class docstring) is private.
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry  # noqa: SLF001
        self._saved = registry["MatMul"]
        entry = dict(self._saved)
        entry["type"] = _small_rows_matmul_grad(self._saved["type"], self.enabled,
                                                self._defer, self._mode)
        registry["MatMul"] = entry

    def __exit__(self, *exc: Any) -> None:
        if self._saved is None:
            return
        # The same private registry as in __enter__.
        from tensorflow.python.framework import ops

        ops._gradient_registry._registry["MatMul"] = self._saved  # noqa: SLF001
        self._saved = None


# --- tf.keras 2 spellings that Keras 3 rejects ----------------------------------
class _CallableList(list):
    """A list that a call also returns (tf.keras 2's `optimizer.variables()`)."""

    def __call__(self) -> "_CallableList":
        return self


def accept_tf_keras_spellings() -> None:
    """Lets two tf.keras 2 spellings that Horovod's examples use run on Keras 3.

    - `model.compile(..., experimental_run_tf_function=False)`: tf.keras 2
      accepted that argument and ignored it (the training function is always
      a `tf.function`); Keras 3's `compile` has no such parameter and raises
      `TypeError`, with no hook for extra arguments. The class that defines
      `compile` for `keras.Model` (Keras' private `Trainer`) gets its
      `compile` wrapped to drop that one argument: wrapped there rather than
      on `keras.Model`, because model loading skips compiling any model whose
      class's `compile` differs from `Trainer.compile`. Every other argument,
      and every other unknown one, reaches Keras unchanged.
    - `optimizer.variables()`: a method in tf.keras 2, a property returning a
      list in Keras 3, so the call raises `TypeError: 'list' object is not
      callable`. The property (defined on Keras' private `BaseOptimizer`)
      now returns that same list as a `list` subclass that a call returns
      too, so both spellings give the optimizer's variables.

    The same `compile` wrapper keeps XLA off for a model whose optimizer
    all-reduces with tf_smdist's host collectives (a Horovod-style
    `DistributedOptimizer`, `_without_xla_for_host_collectives`).

    Idempotent: each wrapper is installed once.
    """
    import functools

    import keras

    owner = next(c for c in keras.Model.__mro__ if "compile" in vars(c))
    original = vars(owner)["compile"]
    if not getattr(original, "_smdist_tf_keras_spelling", False):

        @functools.wraps(original)
        def compile(self: Any, *args: Any, experimental_run_tf_function: Any = None,
                    **kwargs: Any) -> Any:
            del experimental_run_tf_function  # tf.keras 2 ignored it as well
            args, kwargs = _without_xla_for_host_collectives(args, kwargs)
            return original(self, *args, **kwargs)

        compile._smdist_tf_keras_spelling = True  # type: ignore[attr-defined]
        owner.compile = compile

    mro = keras.optimizers.Optimizer.__mro__
    owner = next(c for c in mro if "variables" in vars(c))
    prop = vars(owner)["variables"]
    installed = getattr(getattr(prop, "fget", None), "_smdist_tf_keras_spelling", False)
    if isinstance(prop, property) and not installed:
        get = prop.fget

        def variables(self: Any) -> _CallableList:
            return _CallableList(get(self))

        variables._smdist_tf_keras_spelling = True  # type: ignore[attr-defined]
        owner.variables = property(variables, doc=prop.__doc__)


_JIT_COMPILE_POSITION = 7  # Keras 3's compile(optimizer, loss, ..., jit_compile, ...)


def _without_xla_for_host_collectives(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`compile`'s arguments with `jit_compile` off for a host-collective optimizer.

    Keras 3's default `jit_compile="auto"` compiles the training step with
    XLA on a machine with a GPU unless a tf.distribute strategy trains the
    model; a Horovod-style script has no strategy, and XLA has no kernel
    for tf_smdist's all-reduce ops, so its first step would fail. An
    optimizer whose class sets `_smdist_host_collectives` (also inside a
    `LossScaleOptimizer`) gets `jit_compile=False` for "auto", as Keras
    does under a strategy; an explicit `jit_compile=True` is a `ValueError`
    saying so. Anything else passes unchanged.
    """
    optimizer = kwargs.get("optimizer", args[0] if args else None)
    inner = getattr(optimizer, "inner_optimizer", None)
    if not (getattr(optimizer, "_smdist_host_collectives", False)
            or getattr(inner, "_smdist_host_collectives", False)):
        return args, kwargs
    at = _JIT_COMPILE_POSITION
    positional = len(args) > at
    jit = args[at] if positional else kwargs.get("jit_compile", "auto")
    if jit is True:
        raise ValueError(
            "jit_compile=True cannot compile this model's training step: its "
            "optimizer all-reduces gradients with tf_smdist's host collective ops, "
            "which XLA cannot compile. Compile with jit_compile=False (the default, "
            "'auto', turns XLA off for such an optimizer, as Keras does under a "
            "tf.distribute strategy).")
    if jit == "auto":
        if positional:
            args = (*args[:at], False, *args[at + 1:])
        else:
            kwargs = {**kwargs, "jit_compile": False}
    return args, kwargs


# --- loss scaling -----------------------------------------------------------------
def wrap_loss_scale_check(agree: Any) -> None:
    """Routes `LossScaleOptimizer.check_finite`'s answer through `agree`.

    Keras' loss scaling decides whether to apply a step from this process's
    gradients alone; outside a tf.distribute strategy it has no hook to
    make processes agree, so the (public) method is wrapped, once: it
    returns its own answer passed through every registered `agree` in turn
    (each leaves optimizers that are not its own alone). Registering the
    same `agree` again changes nothing.

    Args:
        agree: called with the `LossScaleOptimizer` and the boolean tensor
            so far; returns the boolean tensor to use.
    """
    import keras

    cls = keras.optimizers.LossScaleOptimizer
    current = cls.check_finite
    agreements = getattr(current, "_smdist_agreements", None)
    if agreements is not None:
        if agree not in agreements:
            agreements.append(agree)
        return
    original = current
    agreements = [agree]

    def check_finite(self: Any, grads: Any) -> Any:
        finite = original(self, grads)
        for fn in agreements:
            finite = fn(self, finite)
        return finite

    check_finite.__doc__ = original.__doc__
    check_finite._smdist_agreements = agreements  # type: ignore[attr-defined]
    cls.check_finite = check_finite
