"""Running a pipeline schedule as TensorFlow ops chained per device.

Each task of the schedule becomes a group of ops under the name scope
`F_s{stage}_m{microbatch}` or `B_s{stage}_m{microbatch}`, placed on its
stage's device, with a control dependency on the previous task of the same
device. Inside a `tf.function` every device therefore runs its work in the
schedule's order, while different devices run at the same time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.pipeline.schedule import Schedule
from tf_smdist.pipeline.stages import Stage

__all__ = [
    "DeferredWeightGradients",
    "run_forward",
    "run_train",
    "split_microbatches",
    "task_scope",
    "weight_penalty",
]

LossFn = Callable[[int, list[tf.Tensor]], tf.Tensor]


def task_scope(kind: str, stage: int, microbatch: int) -> str:
    """The name scope of a task's ops.

    Example:
    >>> task_scope("F", 0, 1)
    'F_s0_m1'
    """
    return f"{kind}_s{stage}_m{microbatch}"


def _differentiable(t: tf.Tensor) -> bool:
    return t.dtype.is_floating or t.dtype.is_complex


def split_microbatches(
    tensors: Sequence[tf.Tensor], num_microbatches: int, *, even: bool = True
) -> list[list[tf.Tensor]]:
    """Cuts each tensor along axis 0 into micro-batches.

    Args:
        tensors: tensors sharing their first dimension (the batch).
        num_microbatches: the number of micro-batches `M`.
        even: require the batch to be a multiple of `M`; otherwise the first
            `batch % M` micro-batches get one extra row. Defaults to `True`.

    Returns:
        Per micro-batch, the list of its slices of `tensors`.

    Raises:
        ValueError: `even` and a static batch size is not a multiple of `M`
            (a dynamic one fails the same check when the graph runs).

    Example:
    >>> [len(m[0]) for m in split_microbatches([tf.zeros((6, 2))], 3)]
    [2, 2, 2]
    """
    m = num_microbatches
    if m == 1:
        return [list(tensors)]
    out: list[list[tf.Tensor]] = [[] for _ in range(m)]
    for t in tensors:
        t = tf.convert_to_tensor(t)
        batch = t.shape[0]
        if even and batch is not None and batch % m:
            raise ValueError(
                "The batch size must be a multiple of the number of "
                f"micro-batches. Received: batch size {batch} with "
                f"microbatches={m}. Use a batch size divisible by {m} (for "
                "datasets, batch with `drop_remainder=True`)."
            )
        dynamic = tf.shape(t)[0]
        if even:
            checks = []
            if batch is None:
                checks.append(
                    tf.debugging.assert_equal(
                        dynamic % m,
                        0,
                        message=(
                            "The batch size must be a multiple of the number "
                            f"of micro-batches (microbatches={m}). Use a batch "
                            f"size divisible by {m}; a dataset's last partial "
                            "batch is the usual cause: batch it with "
                            "`drop_remainder=True`."
                        ),
                    )
                )
            with tf.control_dependencies(checks):
                parts = tf.split(t, m, axis=0)
        else:
            base, extra = dynamic // m, dynamic % m
            sizes = base + tf.cast(tf.range(m) < extra, dynamic.dtype)
            parts = tf.split(t, sizes, num=m, axis=0)
        for i, part in enumerate(parts):
            out[i].append(part)
    return out


class _DeviceChain:
    """The last task's marker per device, for control dependencies."""

    def __init__(self) -> None:
        self._last: dict[int, tf.Operation | None] = {}

    def deps(self, device: int) -> list[tf.Operation]:
        last = self._last.get(device)
        return [] if last is None else [last]

    def done(self, device: int, tensors: Sequence[tf.Tensor]) -> None:
        if tf.executing_eagerly():
            return
        self._last[device] = tf.group(*tensors, name="done")


def run_forward(
    stages: Sequence[Stage],
    schedule: Schedule,
    micro_inputs: Sequence[Sequence[tf.Tensor]],
    *,
    training: bool | None = None,
) -> list[list[tf.Tensor]]:
    """Runs the forward tasks of `schedule` in its order.

    Args:
        stages: the pipeline's stages, `schedule.num_stages` of them.
        schedule: the schedule; its backward tasks are skipped.
        micro_inputs: per micro-batch, the model's inputs.
        training: passed to each stage's layers. Defaults to `None`.

    Returns:
        Per micro-batch, the last stage's outputs.

    Example:
    ```python
    micro = split_microbatches([x], pipe.microbatches)
    outs = run_forward(pipe.stages, pipe.pipeline_schedule, micro)
    ```
    """
    chain = _DeviceChain()
    acts: dict[tuple[int, int], list[tf.Tensor]] = {}
    last = len(stages) - 1
    for task in schedule.linear_order():
        if task.kind != "F":
            continue
        s, m = task.stage, task.microbatch
        dev = schedule.device_of(s)
        inputs = micro_inputs[m] if s == 0 else acts.pop((s - 1, m))
        with tf.name_scope(task_scope("F", s, m)), tf.device(stages[s].device):
            with tf.control_dependencies(chain.deps(dev)):
                inputs = [tf.identity(t) for t in inputs]
                outputs = stages[s](inputs, training=training)
        chain.done(dev, outputs)
        acts[(s, m)] = outputs
    return [acts[(last, m)] for m in range(schedule.num_microbatches)]


def run_train(
    stages: Sequence[Stage],
    schedule: Schedule,
    micro_inputs: Sequence[Sequence[tf.Tensor]],
    loss_fn: LossFn,
    *,
    recompute: bool = False,
    loss_scale: Any = None,
    defer_weight_gradients: bool = False,
) -> tuple[list[list[tf.Tensor]], list[tf.Tensor], list[list[tf.Tensor]]]:
    """Runs every task of `schedule`: forwards, losses and backwards.

    The loss of micro-batch `m` is `loss_fn(m, outputs)`, computed on the last
    stage's device inside its forward task; the backward of each stage
    differentiates it (through the later stages) and adds the stage's
    variable gradients into a running sum on the stage's device.

    Args:
        stages: the pipeline's stages, `schedule.num_stages` of them.
        schedule: the schedule to run.
        micro_inputs: per micro-batch, the model's inputs.
        loss_fn: maps (micro-batch index, last stage outputs) to the scalar
            loss whose gradient is wanted (already weighted for summing).
        recompute: keep only each stage's inputs after its forward and run
            the forward again in the backward. Defaults to `False`.
        loss_scale: differentiate `loss_scale * loss` (mixed precision's loss
            scaling, as `optimizer.scale_loss` does in Keras' `train_step`);
            the losses returned stay unscaled. Defaults to `None` (1).
        defer_weight_gradients: compute each stage's dense-layer weight
            gradients in two products, around its last backward task
            (`DeferredWeightGradients`); ignored with `recompute`. Defaults
            to `False`.

    Returns:
        `(outputs, losses, grads)`: per micro-batch the last stage's outputs,
        per micro-batch the loss, and per stage the summed gradients of its
        `trainable_variables` (zeros where a variable gets no gradient).

    Example:
    ```python
    mse = keras.losses.MeanSquaredError()
    micro_x = split_microbatches([x], 4)
    micro_y = split_microbatches([y], 4)
    outs, losses, grads = run_train(
        stages, schedule, micro_x,
        lambda m, out: mse(micro_y[m][0], out[0]) / 4,
    )
    ```
    """
    chain = _DeviceChain()
    last = len(stages) - 1
    acts: dict[tuple[int, int], list[tf.Tensor]] = {}
    saved: dict[tuple[int, int], tuple] = {}
    upstream: dict[tuple[int, int], list[tf.Tensor]] = {}
    losses: dict[int, tf.Tensor] = {}
    grads: list[list[tf.Tensor] | None] = [None] * len(stages)
    order = list(schedule.linear_order())
    last_backward = {t.stage: i for i, t in enumerate(order) if t.kind == "B"}
    defer = ({s: DeferredWeightGradients(stages[s].trainable_variables)
              for s in range(len(stages))}
             if defer_weight_gradients and not recompute else {})

    def forward(s: int, m: int, inputs: list[tf.Tensor]):
        outputs = stages[s](inputs, training=True)
        loss = loss_fn(m, outputs) if s == last else None
        return outputs, loss

    for index, task in enumerate(order):
        s, m = task.stage, task.microbatch
        stage, dev = stages[s], schedule.device_of(s)
        with tf.name_scope(task_scope(task.kind, s, m)), tf.device(stage.device):
            if task.kind == "F":
                inputs = micro_inputs[m] if s == 0 else acts.pop((s - 1, m))
                with tf.control_dependencies(chain.deps(dev)):
                    inputs = [tf.identity(t) for t in inputs]
                    if recompute:
                        outputs, loss = forward(s, m, inputs)
                        saved[(s, m)] = (inputs, None, None, None)
                    else:
                        with tf.GradientTape() as tape:
                            tape.watch([t for t in inputs if _differentiable(t)])
                            outputs, loss = forward(s, m, inputs)
                        saved[(s, m)] = (inputs, outputs, loss, tape)
                acts[(s, m)] = outputs
                if s == last:
                    losses[m] = loss
                chain.done(dev, outputs + ([loss] if loss is not None else []))
                continue
            # Backward.
            entry = saved.pop((s, m))
            inputs = entry[0]
            if s in defer and index == last_backward[s] and defer[s].pending:
                # The products of the micro-batches done so far, for the time
                # the stage waits for its last output gradient.
                with tf.control_dependencies(chain.deps(dev)):
                    grads[s] = defer[s].flush(grads[s])
            with tf.control_dependencies(chain.deps(dev)):
                if recompute:
                    inputs = [tf.identity(t) for t in inputs]
                    with tf.GradientTape() as tape:
                        tape.watch([t for t in inputs if _differentiable(t)])
                        outputs, loss = forward(s, m, inputs)
                else:
                    _, outputs, loss, tape = entry
                if s == last:
                    targets, seeds = [loss], loss_seeds(loss, loss_scale)
                else:
                    dys = upstream.pop((s, m))
                    pairs = [
                        (y, dy)
                        for y, dy in zip(outputs, dys)
                        if dy is not None and _differentiable(y)
                    ]
                    targets = [y for y, _ in pairs]
                    seeds = [dy for _, dy in pairs]
                sources = [t for t in inputs if _differentiable(t)]
                variables = stage.trainable_variables
                # With deferred weight gradients a variable may get none
                # from the tape (None, not zeros: no addition).
                with _compat.small_rows_matmul_gradients(stage.device,
                                                         defer=defer.get(s)):
                    result = tape.gradient(
                        targets,
                        sources + variables,
                        output_gradients=seeds,
                        unconnected_gradients=(
                            tf.UnconnectedGradients.NONE if s in defer
                            else tf.UnconnectedGradients.ZERO),
                    )
            input_grads = iter([tf.zeros_like(t) if g is None else g
                                for t, g in zip(sources, result[: len(sources)])])
            var_grads = result[len(sources) :]
            if s > 0:
                upstream[(s - 1, m)] = [
                    next(input_grads) if _differentiable(t) else None
                    for t in inputs
                ]
            if grads[s] is None:
                grads[s] = list(var_grads)
            else:
                grads[s] = [add_gradient(a, g) for a, g in zip(grads[s], var_grads)]
            passed = [g for g in upstream.get((s - 1, m), []) if g is not None]
            if s in defer and index == last_backward[s]:
                # After the stage's last backward task; counted in it.
                with tf.control_dependencies(passed):
                    grads[s] = defer[s].finish(grads[s])
            chain.done(
                dev, passed + [slice_values(g) for g in grads[s] if g is not None])
    outputs = [acts[(last, m)] for m in range(schedule.num_microbatches)]
    loss_list = [losses[m] for m in range(schedule.num_microbatches)]
    return outputs, loss_list, [g or [] for g in grads]


class DeferredWeightGradients:
    """A stage's dense-layer weight gradients, computed outside its backward tasks.

    The gradient of `x @ W` with respect to `W` is `x^T @ dy`; summed over
    the micro-batches it is one product of the micro-batches' rows stacked,
    `[x_1; ...; x_M]^T @ [dy_1; ...; dy_M]`. Passed as `defer=` to
    `_compat.small_rows_matmul_gradients` around each backward task's
    `tape.gradient`, it keeps `(x, dy)` of every `MatMul` that reads one of
    `variables` directly (untransposed, 2-D, same dtype) instead of letting
    the tape compute `x^T @ dy` per micro-batch; `flush` computes each such
    weight gradient with one product over the rows of the micro-batches kept
    so far, and `finish` completes it. The pipelines flush once before a
    stage's last backward task (while the stage waits for that task's output
    gradient) and finish after it. The backward tasks, whose input gradients
    the previous stage waits for, shrink, the sum over micro-batches costs
    (almost) no additions, and the products have up to `M - 1` times the
    rows, which CPUs (and GPUs) run more efficiently. The cost: each deferred
    layer's inputs and output gradients of every micro-batch stay alive until
    they are flushed (GPipe holds the inputs anyway; 1F1B otherwise frees
    them after each micro-batch's backward).

    Args:
        variables: the stage's trainable variables, in the order of the
            gradients that `finish` completes.

    Example:
    ```python
    defer = DeferredWeightGradients(variables)
    with _compat.small_rows_matmul_gradients(device, defer=defer):
        grads = tape.gradient(loss, variables,
                              unconnected_gradients=tf.UnconnectedGradients.NONE)
    grads = defer.finish(grads)      # after the last micro-batch
    ```
    """

    def __init__(self, variables: Sequence[Any]) -> None:
        self._variables = list(variables)
        self._kept: dict[int, list[tuple[tf.Tensor, tf.Tensor]]] = {}
        self._taken: set[int] = set()
        self._handles: dict = {}
        self._graph: Any = None

    def __call__(self, op: Any, grad: Any) -> bool:
        """Keeps `(op.inputs[0], grad)` when `op` reads one of the variables."""
        if tf.executing_eagerly() or not isinstance(grad, tf.Tensor):
            return False
        graph = tf.compat.v1.get_default_graph()
        x, w = op.inputs[0], op.inputs[1]  # (the tape passes a stand-in op)
        if x.graph is not graph or w.graph is not graph or grad.graph is not graph:
            return False  # inside a control-flow branch: not usable outside
        if op.get_attr("transpose_a") or op.get_attr("transpose_b"):
            return False
        if w.op.type != "ReadVariableOp" or x.shape.rank != 2 or grad.shape.rank != 2:
            return False
        if graph is not self._graph:
            self._graph = graph
            self._handles = {}
        key = w.op.inputs[0].ref()
        if key not in self._handles:
            self._handles = _compat.graph_variable_handles(self._variables)
        index = self._handles.get(key)
        if index is None or x.dtype != grad.dtype:
            return False
        self._kept.setdefault(index, []).append((x, grad))
        self._taken.add(index)
        return True

    @property
    def deferred(self) -> int:
        """How many variables have had products deferred."""
        return len(self._taken)

    @property
    def pending(self) -> bool:
        """Whether products are kept that `flush` has not computed yet."""
        return bool(self._kept)

    def flush(self, grads: Sequence[Any]) -> list[Any]:
        """`grads` plus the products kept so far (`None` stays where none).

        Args:
            grads: per variable, a gradient sum or `None`.

        Returns:
            Per variable, `grads` plus one product over the rows of every
            micro-batch kept since the last `flush`; those are dropped.
        """
        out = list(grads)
        for index, pairs in sorted(self._kept.items()):
            xs = [x for x, _ in pairs]
            dys = [dy for _, dy in pairs]
            x = xs[0] if len(xs) == 1 else tf.concat(xs, 0)
            dy = dys[0] if len(dys) == 1 else tf.concat(dys, 0)
            g = tf.matmul(x, dy, transpose_a=True)  # x: the variable's dtype
            out[index] = g if out[index] is None else accumulate(out[index], g)
        self._kept = {}
        return out

    def finish(self, grads: Sequence[Any]) -> list[Any]:
        """`grads` plus every kept product (`flush`); zeros where still `None`.

        Args:
            grads: per variable, the sum of the tape's gradients over the
                micro-batches, or `None` where the tape gave none.

        Returns:
            The complete gradients, one per variable.
        """
        return [tf.zeros(v.shape, v.dtype) if g is None else g
                for v, g in zip(self._variables, self.flush(grads))]


def weight_penalty(
    variables: Sequence[Any], loss_scale: Any = None, *, gradients: bool = True
) -> tuple[tf.Tensor | None, list[Any]]:
    """The weight regularizers' penalty on `variables`, and its gradients.

    Keras adds `v.regularizer(v)` of every trainable variable that has a
    regularizer (`kernel_regularizer=`, `bias_regularizer=`, ...) to the loss,
    once per step (`Model.losses`). A pipeline's loss is computed on its last
    stage, whose backward cannot reach another stage's variables, so each
    stage adds its own variables' penalty and gradients instead.

    Args:
        variables: a stage's trainable variables.
        loss_scale: the gradients are those of `loss_scale * penalty`, as the
            data gradients are (mixed precision). Defaults to `None` (1).
        gradients: compute the gradients (else only the penalty). Defaults to
            `True`.

    Returns:
        `(penalty, grads)`: the summed penalty (a float scalar), or `None`
        when no variable has a regularizer; and per variable its penalty's
        gradient, or `None` for one without a regularizer (and for all when
        `gradients=False`).

    Example:
    ```python
    penalty, extra = weight_penalty(stage.trainable_variables)
    grads = [add_gradient(g, e) for g, e in zip(grads, extra)]
    ```
    """
    regularized = [v for v in variables if getattr(v, "regularizer", None) is not None]
    if not regularized:
        return None, [None] * len(variables)
    floatx = keras.backend.floatx()
    tape = tf.GradientTape() if gradients else contextlib.nullcontext()
    with tape:
        terms = []
        for v in regularized:
            # As Keras' `_aggregate_additional_loss`: floatx if not float, summed.
            term = tf.convert_to_tensor(v.regularizer(v))
            if not term.dtype.is_floating:
                term = tf.cast(term, floatx)
            terms.append(tf.reduce_sum(term))
        penalty = tf.add_n(terms) if len(terms) > 1 else terms[0]
    if not gradients:
        return penalty, [None] * len(variables)
    found = tape.gradient([penalty], regularized,
                          output_gradients=loss_seeds(penalty, loss_scale))
    by_id = {id(v): g for v, g in zip(regularized, found)}
    return penalty, [by_id.get(id(v)) for v in variables]


def loss_seeds(loss: tf.Tensor, loss_scale: Any) -> list[tf.Tensor] | None:
    """The output gradient that differentiates `loss_scale * loss`.

    Seeding the backward with the scale gives exactly the gradients of the
    scaled loss (the product's gradient with respect to the loss is the
    scale), so loss scaling matches Keras' without changing the loss.
    """
    if loss_scale is None:
        return None
    return [tf.cast(loss_scale, loss.dtype) * tf.ones_like(loss)]


def accumulate(a: Any, g: Any) -> Any:
    """`a + g` for micro-batch gradients; sparse ones (`tf.IndexedSlices`, an
    embedding's) are concatenated, as plain Keras holds a whole batch's rows
    (its optimizers treat a repeated row otherwise than the dense sum: Adam
    squares each)."""
    if isinstance(a, tf.IndexedSlices) and isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(tf.concat([a.values, g.values], 0),
                                tf.concat([a.indices, g.indices], 0),
                                a.dense_shape)
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(g)


def add_gradient(a: Any, g: Any) -> Any:
    """`accumulate(a, g)`, where `None` is no gradient (yet)."""
    if a is None:
        return g
    return a if g is None else accumulate(a, g)


def slice_values(g: Any) -> Any:
    """The values of a `tf.IndexedSlices`, else `g` (for control dependencies)."""
    return g.values if isinstance(g, tf.IndexedSlices) else g
