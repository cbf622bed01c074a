"""PipelineModel against the plain model: loss, outputs, gradients, weights."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_smdist.pipeline import checkpoint, execution
from tf_smdist.pipeline.model import PipelineModel
from tf_smdist.pipeline.schedule import Task
from tf_smdist.pipeline.stages import layer_order

RTOL, ATOL = 1e-5, 1e-6
SCHEDULES = ("gpipe", "1f1b", "interleaved")
BATCH = 16


def sequential_model(seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((6,))]
    layers += [keras.layers.Dense(5, activation="tanh") for _ in range(7)]
    layers += [keras.layers.Dense(3)]
    return keras.Sequential(layers)


def functional_model(seed=0):
    """Skips cross stage cuts: `h0` through an op, `h1` through a layer, and
    the second input `z` goes straight to the last layer."""
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((6,), name="x")
    z_in = keras.Input((2,), name="z")
    dense = [keras.layers.Dense(5, activation="tanh") for _ in range(6)]
    h0 = dense[0](x_in)
    h1 = dense[1](h0)
    h2 = dense[2](h1)
    h3 = dense[3](h2) + h0
    h4 = dense[4](h3)
    h5 = keras.layers.Concatenate()([h4, h1])
    h6 = dense[5](h5)
    out = keras.layers.Dense(3)(keras.layers.Concatenate()([h6, z_in]))
    return keras.Model([x_in, z_in], out)


MODELS = {"sequential": sequential_model, "functional": functional_model}


def data(kind, batch=BATCH):
    rng = np.random.RandomState(7)
    x = rng.randn(batch, 6).astype("float32")
    y = rng.randn(batch, 3).astype("float32")
    if kind == "functional":
        return [x, rng.randn(batch, 2).astype("float32")], y
    return x, y


def pipeline(kind, k, m, schedule, **kwargs):
    """A fresh plain model and a pipeline around an identical copy."""
    plain = MODELS[kind]()
    copy = MODELS[kind](seed=1)
    copy.set_weights(plain.get_weights())
    pipe = PipelineModel(
        copy, num_stages=k, microbatches=m, schedule=schedule, **kwargs
    )
    return plain, pipe


def plain_gradients(model, x, y):
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = keras.losses.MeanSquaredError()(y, y_pred)
    return loss, y_pred, tape.gradient(loss, model.trainable_variables)


def assert_close(actual, expected):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_loss_outputs_gradients_and_weights_equal_plain_model(kind, k):
    """Every M in (1, 2, 4, 8) and every schedule, run eagerly (the same code
    builds the graph in `tf.function`): the first step's loss, outputs and
    gradients, then the weights after 3 SGD steps, equal the plain model's."""
    for m in (1, 2, 4, 8):
        for schedule in SCHEDULES:
            if schedule == "interleaved" and m % k:
                continue
            plain, pipe = pipeline(kind, k, m, schedule)
            pipe.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            opt = keras.optimizers.SGD(0.1)
            x, y = data(kind)
            for step in range(3):
                loss, y_pred, grads = plain_gradients(plain, x, y)
                p_loss, p_pred, p_grads = pipe.compute_gradients(x, y)
                if step == 0:
                    assert len(p_grads) == len(grads) > 0, (m, schedule)
                    assert_close(p_loss, loss)
                    assert_close(p_pred, y_pred)
                    for g, pg in zip(grads, p_grads):
                        assert_close(pg, g)
                opt.apply(grads, plain.trainable_variables)
                pipe.optimizer.apply(p_grads, pipe.trainable_variables)
            for w, pw in zip(plain.get_weights(), pipe.get_weights()):
                assert_close(pw, w)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fit_evaluate_predict_equal_plain_model(schedule):
    plain, pipe = pipeline("functional", 2, 4, schedule)
    x, y = data("functional", batch=32)
    for model in (plain, pipe):
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss="mse",
            metrics=["mae"],
            jit_compile=False,
        )
    h_plain = plain.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    h_pipe = pipe.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    for key in ("loss", "mae"):
        assert_close(h_pipe.history[key], h_plain.history[key])
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)
    assert_close(pipe.evaluate(x, y, verbose=0), plain.evaluate(x, y, verbose=0))
    assert_close(pipe.predict(x, verbose=0), plain.predict(x, verbose=0))


@pytest.mark.parametrize("m", [1, 4])
def test_embedding_sparse_gradients_reach_adam_as_in_the_plain_model(m):
    # An Embedding's gradient is a tf.IndexedSlices with repeated rows (10
    # tokens, 16 x 5 per batch). Keras' Adam squares each repeated row
    # rather than their sum, so the micro-batches' slices must be handed
    # on as one IndexedSlices, not summed densely (which differs by ~1e-2).
    def embedding_model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([
            keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])

    plain, copy = embedding_model(0), embedding_model(1)
    copy.set_weights(plain.get_weights())
    pipe = PipelineModel(copy, num_stages=2, microbatches=m, schedule="1f1b",
                         partition=[2, 2])
    rng = np.random.RandomState(3)
    x = rng.randint(0, 10, (32, 5)).astype("int32")
    y = rng.randint(0, 3, 32).astype("int32")
    for model in (plain, pipe):
        model.compile(optimizer=keras.optimizers.Adam(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    h_plain = plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_pipe = pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_close(h_pipe.history["loss"], h_plain.history["loss"])
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)


def test_mixed_precision_scales_the_loss_as_keras_train_step_does():
    # Under mixed_float16, compile wraps the optimizer in a
    # LossScaleOptimizer, which divides the gradients by its loss scale
    # (32768): the backward must differentiate the scaled loss, as Keras'
    # train_step does, or SGD's steps shrink 32768-fold.
    def mlp(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(3, dtype="float32")])

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        plain, copy = mlp(0), mlp(1)
        copy.set_weights(plain.get_weights())
        init = plain.get_weights()
        pipe = PipelineModel(copy, num_stages=2, microbatches=2, partition=[2, 1])
        for model in (plain, pipe):
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        assert isinstance(pipe.optimizer, keras.optimizers.LossScaleOptimizer)
        rng = np.random.RandomState(4)
        x = rng.randn(32, 6).astype("float32")
        y = rng.randn(32, 3).astype("float32")
        h_plain = plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        h_pipe = pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    moved = max(np.abs(w - w0).max() for w, w0 in zip(plain.get_weights(), init))
    assert moved > 0.05
    # float16 sums over 8 rows (a micro-batch) instead of 16 round apart.
    np.testing.assert_allclose(h_pipe.history["loss"], h_plain.history["loss"],
                               rtol=1e-3)
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        np.testing.assert_allclose(pw, w, atol=1e-3)


def test_several_outputs_keep_their_names_for_losses_and_metrics():
    # Keras names per-output losses and metrics after the model's output
    # layers ("main_loss"), and matches dict losses and targets to them, for
    # outputs in a list too.
    def two_outputs(seed):
        keras.utils.set_random_seed(seed)
        x_in = keras.Input((6,))
        h = keras.layers.Dense(5, activation="tanh")(x_in)
        aux = keras.layers.Dense(2, name="aux")(h)
        h = keras.layers.Dense(5, activation="tanh")(h)
        main = keras.layers.Dense(3, name="main")(h)
        return keras.Model(x_in, [main, aux])

    plain, copy = two_outputs(0), two_outputs(1)
    copy.set_weights(plain.get_weights())
    pipe = PipelineModel(copy, num_stages=2, microbatches=2, partition=[2, 2])
    rng = np.random.RandomState(4)
    x = rng.randn(32, 6).astype("float32")
    y = {"main": rng.randn(32, 3).astype("float32"),
         "aux": rng.randn(32, 2).astype("float32")}
    for model in (plain, pipe):
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss={"main": "mse", "aux": "mae"},
                      loss_weights={"main": 1.0, "aux": 0.3},
                      metrics={"main": ["mae"]})
    h_plain = plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_pipe = pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert sorted(h_pipe.history) == ["aux_loss", "loss", "main_loss", "main_mae"]
    for key, values in h_plain.history.items():
        assert_close(h_pipe.history[key], values)
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)
    expected = plain.evaluate(x, y, verbose=0, return_dict=True)
    got = pipe.evaluate(x, y, verbose=0, return_dict=True)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert_close(got[key], value)


def test_fit_runs_callbacks_with_pipelined_loss():
    plain, pipe = pipeline("sequential", 2, 2, "1f1b")
    pipe.compile(optimizer="sgd", loss="mse")
    seen = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(logs["loss"])
    )
    x, y = data("sequential")
    pipe.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
             callbacks=[callback])
    assert len(seen) == 2
    plain_loss = keras.losses.MeanSquaredError()(y[:8], plain(x[:8]))
    assert_close(seen[0], plain_loss)


def test_gradient_tape_custom_loop_equals_plain_model():
    plain, pipe = pipeline("functional", 3, 4, "gpipe")
    x, y = data("functional")
    loss, _, grads = plain_gradients(plain, x, y)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            y_pred = pipe(x, training=True)
            loss = keras.losses.MeanSquaredError()(y, y_pred)
        return loss, tape.gradient(loss, pipe.trainable_variables)

    p_loss, p_grads = step(x, y)
    assert_close(p_loss, loss)
    for g, pg in zip(grads, p_grads):
        assert_close(pg, g)


def test_compute_gradients_in_tf_function_equals_eager():
    _, pipe = pipeline("functional", 2, 4, "1f1b")
    pipe.compile(optimizer="sgd", loss="mse")
    x, y = data("functional")
    eager = pipe.compute_gradients(x, y)
    traced = tf.function(pipe.compute_gradients)(x, y)
    assert_close(traced[0], eager[0])
    for g, tg in zip(eager[2], traced[2]):
        assert_close(tg, g)


def test_recompute_gives_the_same_gradients():
    for schedule in SCHEDULES:
        plain, pipe = pipeline("functional", 2, 4, schedule, recompute=True)
        pipe.compile(optimizer="sgd", loss="mse")
        x, y = data("functional")
        loss, _, grads = plain_gradients(plain, x, y)
        p_loss, _, p_grads = tf.function(pipe.compute_gradients)(x, y)
        assert_close(p_loss, loss)
        for g, pg in zip(grads, p_grads):
            assert_close(pg, g)


def _matmul_count(fn, *args):
    graph = fn.get_concrete_function(*args).graph
    return sum(op.type == "MatMul" for op in graph.get_operations())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_deferred_weight_gradients_equal_plain_model(schedule):
    """defer_weight_gradients=True: every Dense kernel's gradient is two
    products, one over the rows of the micro-batches before the last (run
    while the stage waits for its last output gradient), one for the last
    (M - 2 fewer products per kernel in the step's graph), and gradients
    and training equal the plain model's."""
    m = 4
    plain, pipe = pipeline("functional", 2, m, schedule, defer_weight_gradients=True)
    _, eager = pipeline("functional", 2, m, schedule)
    for model in (plain, pipe, eager):
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                      jit_compile=False)
    x, y = data("functional")
    loss, _, grads = plain_gradients(plain, x, y)
    step = tf.function(pipe.compute_gradients)
    p_loss, _, p_grads = step(x, y)
    assert_close(p_loss, loss)
    for g, pg in zip(grads, p_grads):
        assert_close(pg, g)
    kernels = sum(isinstance(layer, keras.layers.Dense) for layer in plain.layers)
    assert kernels == 7
    assert (_matmul_count(tf.function(eager.compute_gradients), x, y)
            - _matmul_count(step, x, y)) == (m - 2) * kernels
    x, y = data("functional", batch=32)
    h_plain = plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_pipe = pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_close(h_pipe.history["loss"], h_plain.history["loss"])
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)


def test_deferred_weight_gradients_take_only_plain_products_of_the_variables():
    """A variable read twice gets both products' sum; a transposed product,
    one inside a tf.cond branch and a product of another variable are left
    to the tape, and their gradients still add up."""
    w = tf.Variable(np.random.RandomState(0).randn(4, 4).astype("float32"))
    u = tf.Variable(np.random.RandomState(1).randn(4, 4).astype("float32"))
    other = tf.Variable(np.random.RandomState(2).randn(4, 4).astype("float32"))
    x = tf.constant(np.random.RandomState(3).randn(3, 4).astype("float32"))

    def loss_of(x):
        h = tf.tanh(tf.matmul(x, w))
        h = tf.tanh(tf.matmul(h, w)) + tf.matmul(h, u, transpose_b=True)
        h = tf.cond(tf.reduce_sum(x) > -1e9, lambda: tf.matmul(h, u), lambda: h)
        return tf.reduce_sum(tf.matmul(h, other) ** 2)

    @tf.function
    def both(x):
        with tf.GradientTape() as tape:
            loss = loss_of(x)
        expected = tape.gradient(loss, [w, u])
        defer = execution.DeferredWeightGradients([w, u])
        with tf.GradientTape() as tape:
            loss = loss_of(x)
        from tf_smdist import _compat

        with _compat.small_rows_matmul_gradients(defer=defer):
            got = tape.gradient(loss, [w, u],
                                unconnected_gradients=tf.UnconnectedGradients.NONE)
        counts = [len(defer._kept.get(i, [])) for i in range(2)]  # noqa: SLF001
        return expected, defer.finish(got), counts

    expected, got, counts = both(x)
    assert [int(c) for c in counts] == [2, 0]
    for e, g in zip(expected, got):
        assert_close(g, e)


def test_sum_reduced_loss_adds_microbatch_losses():
    plain, pipe = pipeline("sequential", 2, 4, "1f1b")
    loss_fn = keras.losses.MeanSquaredError(reduction="sum")
    pipe.compile(optimizer="sgd", loss=loss_fn)
    x, y = data("sequential")
    with tf.GradientTape() as tape:
        loss = loss_fn(y, plain(x))
    grads = tape.gradient(loss, plain.trainable_variables)
    p_loss, _, p_grads = pipe.compute_gradients(x, y)
    assert_close(p_loss, loss)
    for g, pg in zip(grads, p_grads):
        assert_close(pg, g)


def test_sample_weights_are_split_with_the_batch():
    plain, pipe = pipeline("sequential", 2, 4, "gpipe")
    pipe.compile(optimizer="sgd", loss="mse")
    x, y = data("sequential")
    w = np.linspace(0.0, 2.0, BATCH).astype("float32")
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, plain(x), sample_weight=w)
    grads = tape.gradient(loss, plain.trainable_variables)
    p_loss, _, p_grads = pipe.compute_gradients(x, y, w)
    assert_close(p_loss, loss)
    for g, pg in zip(grads, p_grads):
        assert_close(pg, g)


def test_stage_variables_live_on_their_devices():
    _, pipe = pipeline("functional", 4, 2, "1f1b")
    for stage in pipe.stages:
        assert stage.device == f"/device:CPU:{stage.index}"
        for v in stage.variables:
            assert v.value.device.endswith(f"CPU:{stage.index}")


def test_interleaved_stages_cycle_over_devices():
    _, pipe = pipeline("sequential", 2, 2, "interleaved", virtual_stages=2)
    assert [s.device for s in pipe.stages] == [
        "/device:CPU:0", "/device:CPU:1", "/device:CPU:0", "/device:CPU:1"
    ]


def test_skip_connections_are_carried_across_cuts():
    # Stage sizes count graph nodes, the bare `+` included: stage 1 holds
    # dense_2, dense_3 and the addition.
    _, pipe = pipeline("functional", 4, 1, "gpipe", partition=[2, 3, 2, 3])
    # Cuts carry: (z, h0, h1), (z, h1, h3), (z, h5); z skips to the end.
    assert [s.num_inputs for s in pipe.stages] == [2, 3, 3, 2]
    assert [s.num_outputs for s in pipe.stages] == [3, 3, 2, 1]
    assert pipe.stages[1].sources[0] == ("pass", 0)


def test_partition_by_layer_names():
    model = sequential_model()
    names = layer_order(model)
    pipe = PipelineModel(
        model, num_stages=2, microbatches=2, partition=[names[:6], names[6:]]
    )
    assert [len(s.layer_names) for s in pipe.stages] == [6, 2]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_graph_orders_each_devices_ops_as_the_schedule_says(schedule):
    _, pipe = pipeline("functional", 3 if schedule == "1f1b" else 2, 4, schedule)
    pipe.compile(optimizer="sgd", loss="mse")
    x, y = data("functional")
    graph = tf.function(pipe.compute_gradients).get_concrete_function(x, y).graph
    task_ops: dict = {}
    for op in graph.get_operations():
        parts = op.name.split("/")
        # A backward's gradient ops are named after the forward they differentiate.
        scope = "B" + parts[1][1:] if parts[0] == "gradient_tape" else parts[0]
        task_ops.setdefault(scope, []).append(op)

    ancestors: dict = {}

    def ancestors_of(op):
        if op.name not in ancestors:
            found, stack = set(), list(op.inputs) + list(op.control_inputs)
            while stack:
                item = stack.pop()
                parent = item.op if hasattr(item, "op") else item
                if parent.name not in found:
                    found.add(parent.name)
                    stack.extend(list(parent.inputs) + list(parent.control_inputs))
            ancestors[op.name] = found
        return ancestors[op.name]

    sched = pipe.pipeline_schedule
    for device, order in enumerate(sched.device_orders):
        for prev, task in zip(order, order[1:]):
            scope = execution.task_scope(task.kind, task.stage, task.microbatch)
            prev_scope = execution.task_scope(prev.kind, prev.stage, prev.microbatch)
            done = prev_scope + "/done"
            skip = ("Const", "NoOp", "Placeholder")
            ops = [o for o in task_ops[scope] if o.type not in skip]
            assert ops, scope
            for op in ops:
                assert done in ancestors_of(op), (prev, task, op.name)
                if op.type != "ReadVariableOp":  # placed with its variable
                    assert op.device.endswith(f"CPU:{device}"), op.name
    assert Task("F", 0, 0) in sched.device_orders[0]


def test_get_and_set_weights_use_wrapped_model_order():
    plain, pipe = pipeline("functional", 3, 2, "1f1b")
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        np.testing.assert_array_equal(pw, w)
    new = [np.full_like(w, i) for i, w in enumerate(plain.get_weights())]
    pipe.set_weights(new)
    for w, pw in zip(new, pipe.wrapped_model.get_weights()):
        np.testing.assert_array_equal(pw, w)


def test_save_exports_a_plain_keras_model(tmp_path):
    _, pipe = pipeline("functional", 2, 2, "1f1b")
    pipe.compile(optimizer="sgd", loss="mse")
    x, y = data("functional")
    pipe.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    pipe.save(path)
    loaded = keras.models.load_model(path)
    assert not isinstance(loaded, PipelineModel)
    assert_close(loaded.predict(x, verbose=0), pipe.predict(x, verbose=0))


def test_save_and_load_weights_carry_the_optimizer_state(tmp_path):
    plain, pipe = pipeline("sequential", 2, 2, "1f1b")
    pipe.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = data("sequential")
    for model in (pipe, plain):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "pipe.weights.h5")
    pipe.save_weights(path)
    plain_path = str(tmp_path / "plain.weights.h5")
    sequential_model().save_weights(plain_path)  # uncompiled: no optimizer
    assert checkpoint.has_optimizer_state(path)
    assert not checkpoint.has_optimizer_state(plain_path)
    # The file a compiled plain model writes: it loads into one, optimizer too.
    loaded = sequential_model(seed=3)
    loaded.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(path)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(loaded.optimizer.variables, plain.optimizer.variables):
        assert_close(a.numpy(), b.numpy())
    # A new pipeline resumes from it as if never stopped.
    _, resumed = pipeline("sequential", 2, 2, "1f1b")
    resumed.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    resumed.load_weights(path)
    for model in (resumed, plain):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.get_weights(), plain.get_weights()):
        assert_close(a, b)


def test_batch_not_divisible_by_microbatches_is_an_error():
    _, pipe = pipeline("sequential", 2, 4, "1f1b")
    pipe.compile(optimizer="sgd", loss="mse")
    x, y = data("sequential", batch=10)
    with pytest.raises(ValueError, match="batch size 10 with microbatches=4"):
        pipe.compute_gradients(x, y)
    with pytest.raises(ValueError, match="batch size 10 with microbatches=4"):
        pipe.fit(x, y, batch_size=10, epochs=1, verbose=0)
    spec = tf.TensorSpec([None, None], tf.float32)
    step = tf.function(pipe.compute_gradients, input_signature=[spec, spec])
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of"):
        step(x, y)
    # A dataset whose last batch is partial fails when that batch comes,
    # naming the usual cause and its remedy.
    ds = tf.data.Dataset.from_tensor_slices(data("sequential", batch=18)).batch(8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="drop_remainder=True"):
        pipe.fit(ds, epochs=1, verbose=0)


def test_predict_accepts_batches_not_divisible_by_microbatches():
    plain, pipe = pipeline("sequential", 2, 4, "1f1b")
    x, _ = data("sequential", batch=10)
    assert_close(pipe(x), plain(x))


def test_inputs_of_the_wrong_structure_are_a_clear_error():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(4)(a), b])
    model = keras.Model([a, b], keras.layers.Dense(1)(h))
    pipe = PipelineModel(model, num_stages=2, microbatches=2)
    xa, xb = np.ones((4, 3), "float32"), np.ones((4, 2), "float32")
    assert_close(pipe([xa, xb]), model([xa, xb]))
    assert_close(pipe({"a": xa, "b": xb}), model([xa, xb]))
    # A dataset of inputs alone yielding (a, b) reaches predict as x=a, y=b.
    with pytest.raises(ValueError, match=r"expects 2 input\(s\) \['a', 'b'\]"):
        pipe.predict(tf.data.Dataset.from_tensor_slices((xa, xb)).batch(2), verbose=0)
    with pytest.raises(ValueError, match=r"lacks \['b'\]"):
        pipe({"a": xa})
    # A model built on a dict of inputs takes that dict's keys, as in Keras,
    # even where they differ from the inputs' names.
    keyed = keras.Model({"feat": a, "extra": b}, model.outputs)
    pipe = PipelineModel(keyed, num_stages=2, microbatches=2)
    assert_close(pipe({"feat": xa, "extra": xb}), keyed({"feat": xa, "extra": xb}))
    assert_close(pipe({"a": xa, "b": xb}), model([xa, xb]))  # and their names
    with pytest.raises(ValueError, match=r"lacks \['extra'\]"):
        pipe({"feat": xa})


def test_more_stages_than_layers_is_an_error():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(3)(inputs)))
    with pytest.raises(ValueError, match="num_stages=3 for a model with 2 layers"):
        PipelineModel(model, num_stages=3, microbatches=2)
    with pytest.raises(ValueError, match="num_stages=2 x virtual_stages=2 = 4 stages"):
        PipelineModel(model, num_stages=2, microbatches=2, schedule="interleaved")


def test_fewer_devices_than_stages_is_an_error():
    with pytest.raises(ValueError, match="fewer devices than pipeline stages"):
        PipelineModel(sequential_model(), num_stages=5, microbatches=2)
    with pytest.raises(ValueError, match="fewer devices than pipeline stages"):
        PipelineModel(
            sequential_model(), num_stages=2, microbatches=2, devices=["/CPU:0"]
        )


def test_wrong_stage_sizes_are_an_error():
    with pytest.raises(ValueError, match="add up to the number of layers"):
        PipelineModel(sequential_model(), num_stages=2, microbatches=2,
                      partition=[3, 3])


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="schedule='zigzag'"):
        PipelineModel(sequential_model(), num_stages=2, microbatches=2,
                      schedule="zigzag")


def test_batch_normalization_warns_about_microbatch_statistics():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(2),
    ])
    with pytest.warns(UserWarning, match="normalises every micro-batch"):
        PipelineModel(model, num_stages=2, microbatches=2)
    with pytest.raises(ValueError, match="recompute=True"):
        PipelineModel(model, num_stages=2, microbatches=2, recompute=True)


def test_batch_normalization_warns_once_per_model():
    layers = [keras.Input((4,))]
    for _ in range(5):
        layers += [keras.layers.Dense(4), keras.layers.BatchNormalization()]
    model = keras.Sequential(layers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PipelineModel(model, num_stages=2, microbatches=2)
    texts = [str(w.message) for w in caught if "BatchNormalization" in str(w.message)]
    assert len(texts) == 1
    assert texts[0].startswith("5 BatchNormalization layer(s)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = PipelineModel(model, num_stages=2, microbatches=1)  # exact: no warning
    assert not [w for w in caught if "BatchNormalization" in str(w.message)]
    # One micro-batch, but 2 pipelines (4 processes, 2 stages): each
    # normalises its half of the batch.
    from tf_smdist.pipeline.topology import Topology

    pipe._topology = Topology(4, 2, rank=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe._check_layers(model)
    texts = [str(w.message) for w in caught if "BatchNormalization" in str(w.message)]
    assert len(texts) == 1
    assert "batch_size / 2 (2 pipelines x 1 micro-batch(es))" in texts[0]


def test_batch_normalization_with_one_microbatch_matches_plain_model():
    keras.utils.set_random_seed(0)

    def make():
        return keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(3),
            keras.layers.BatchNormalization(), keras.layers.Dense(2),
        ])

    plain, copy = make(), make()
    copy.set_weights(plain.get_weights())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = PipelineModel(copy, num_stages=2, microbatches=1)
    pipe.compile(optimizer="sgd", loss="mse")
    x = np.random.RandomState(0).randn(8, 4).astype("float32")
    y = np.random.RandomState(1).randn(8, 2).astype("float32")
    loss, _, grads = plain_gradients(plain, x, y)
    p_loss, _, p_grads = pipe.compute_gradients(x, y)
    assert_close(p_loss, loss)
    for g, pg in zip(grads, p_grads):
        assert_close(pg, g)
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)  # moving statistics updated identically


def test_partition_report_lists_each_stage():
    _, pipe = pipeline("sequential", 2, 4, "gpipe")
    report = pipe.partition_report()
    assert "stage 0 on /device:CPU:0: 4 layers" in report
    assert "stage 1 on /device:CPU:1: 4 layers" in report
    assert "bubble 0.200" in report


def test_auto_partition_profiles_on_first_batch_and_continues_exactly():
    from tf_smdist.pipeline.callback import ProfilingCallback

    plain, pipe = pipeline("functional", 2, 2, "1f1b")
    assert pipe.profiled_model is pipe.wrapped_model
    x, y = data("functional", batch=32)
    for model in (plain, pipe):
        model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    seen = []
    callback = ProfilingCallback(
        batch_size=8, on_profile=seen.append, warmup=1, repeats=2
    )
    h_plain = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    h_pipe = pipe.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                      callbacks=[callback])
    assert len(seen) == 1
    names = [list(s.layer_names) for s in pipe.stages]
    assert names == pipe._partition.stage_layer_names
    assert "stage 1" in pipe.partition_report()
    assert_close(h_pipe.history["loss"], h_plain.history["loss"])
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)


def test_auto_partition_before_training():
    _, pipe = pipeline("sequential", 2, 2, "gpipe")
    x, _ = data("sequential")
    part = pipe.auto_partition(x)
    assert [list(s.layer_names) for s in pipe.stages] == part.stage_layer_names
    for stage in pipe.stages:
        for v in stage.variables:
            assert v.value.device.endswith(f"CPU:{stage.index}")


def test_plot_schedule_draws_every_task(tmp_path):
    import tf_smdist as smd
    from tf_smdist.pipeline.schedule import interleaved_1f1b

    schedule = interleaved_1f1b(2, 4, 2)
    path = tmp_path / "schedule.png"
    fig = smd.plot_schedule(schedule, path=str(path))
    assert path.stat().st_size > 0
    assert len(fig.axes[0].patches) == 2 * 4 * 4  # F and B of 4 stages x 4


def test_trace_timeline_measures_every_task_and_writes_chrome_trace(tmp_path):
    import json

    import tf_smdist as smd
    from tf_smdist.pipeline.plot import trace_timeline

    _, pipe = pipeline("sequential", 2, 2, "1f1b")
    pipe.compile(optimizer="sgd", loss="mse")
    x, y = data("sequential")
    timeline = trace_timeline(pipe, x, y)
    assert set(timeline.spans) == {
        t for order in pipe.pipeline_schedule.device_orders for t in order
    }
    for order in pipe.pipeline_schedule.device_orders:
        ends = [timeline.spans[t][2] for t in order]
        starts = [timeline.spans[t][1] for t in order]
        # Each device ran its tasks in the schedule's order.
        assert all(s >= e for s, e in zip(starts[1:], ends[:-1]))
    assert 0.0 <= timeline.bubble_fraction < 1.0
    path = tmp_path / "trace.json"
    timeline.save_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    assert {e["name"] for e in events if e.get("tid") == 0} >= {"F(s0,m0)"}
    smd.plot_schedule(timeline, path=str(tmp_path / "measured.png"))


_REMOTE_CLIENT = r'''
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, sys.argv[2])
import tensorflow as tf
workers = json.loads(sys.argv[1])
tf.config.experimental_connect_to_cluster(tf.train.ClusterSpec({"worker": workers}))
import keras, numpy as np
import tf_smdist as smd

def make():
    keras.utils.set_random_seed(0)
    x_in = keras.Input((6,))
    h0 = keras.layers.Dense(5, activation="tanh")(x_in)
    h1 = keras.layers.Dense(5, activation="tanh")(h0)
    h2 = keras.layers.Dense(5, activation="tanh")(h1) + h0
    return keras.Model(x_in, keras.layers.Dense(3)(h2))

plain, copy = make(), make()
copy.set_weights(plain.get_weights())
devices = [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in range(2)]
pipe = smd.PipelineModel(copy, num_stages=2, microbatches=4, devices=devices,
                         partition=[2, 3])  # dense, dense_1 | dense_2, +, dense_3
pipe.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
rng = np.random.RandomState(0)
x = rng.randn(16, 6).astype("float32")
y = rng.randn(16, 3).astype("float32")
with tf.GradientTape() as tape:
    loss = keras.losses.MeanSquaredError()(y, plain(x))
grads = tape.gradient(loss, plain.trainable_variables)
p_loss, _, p_grads = tf.function(pipe.compute_gradients)(x, y)
history = pipe.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
print(json.dumps({
    "loss": float(loss),
    "p_loss": float(p_loss),
    "grads": [np.asarray(g).tolist() for g in grads],
    "p_grads": [np.asarray(g).tolist() for g in p_grads],
    "devices": [[v.value.device for v in s.variables] for s in pipe.stages],
    "fit_loss": history.history["loss"],
}))
'''

_REMOTE_SERVER = (
    "import json, os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'; "
    "import tensorflow as tf; "
    "tf.distribute.Server(tf.train.ClusterSpec({'worker': json.loads(sys.argv[1])}),"
    " job_name='worker', task_index=int(sys.argv[2]), start=True).join()"
)


def _unused_port():
    # The port is free now; a server started later may still lose it to
    # another process, which `_start_tf_servers` detects and retries.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _accepts(port):
    try:
        with socket.create_connection(("localhost", port), timeout=1.0):
            return True
    except OSError:
        return False


def _stop(servers):
    for server in servers:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    for server in servers:
        server.wait(timeout=30)


def _start_tf_servers(count, log_dir, *, attempts=3, timeout=120.0):
    """Starts `count` localhost TensorFlow servers; waits until each listens.

    Returns `(addresses, processes, log paths)`. A server that exits before
    listening fails the test with its stderr, except when it lost its port to
    another process (the race between choosing a port and binding it): then
    all start again on new ports, up to `attempts` times.
    """
    for attempt in range(attempts):
        ports = [_unused_port() for _ in range(count)]
        workers = [f"localhost:{port}" for port in ports]
        logs = [log_dir / f"server{i}.attempt{attempt}.log" for i in range(count)]
        servers = []
        for i, log in enumerate(logs):
            with open(log, "w") as f:
                servers.append(subprocess.Popen(
                    [sys.executable, "-c", _REMOTE_SERVER, json.dumps(workers),
                     str(i)],
                    stdout=subprocess.DEVNULL, stderr=f, start_new_session=True,
                ))
        deadline = time.monotonic() + timeout
        ready = set()
        while len(ready) < count and time.monotonic() < deadline:
            if any(server.poll() is not None for server in servers):
                break
            ready |= {i for i, port in enumerate(ports) if _accepts(port)}
            time.sleep(0.2)
        if len(ready) == count:
            return workers, servers, logs
        _stop(servers)
        text = "\n".join(log.read_text() for log in logs)
        lost_port = "address already in use" in text.lower() or (
            "port" in text.lower() and "bind" in text.lower())
        if not lost_port:
            raise AssertionError(
                f"TensorFlow servers {workers} did not start listening within "
                f"{timeout} s:\n{text[-3000:]}")
    raise AssertionError(f"Could not bind free ports in {attempts} attempts")


@pytest.mark.slow
def test_remote_stages_on_two_worker_processes(tmp_path):
    """Stages on two localhost TensorFlow servers through the distributed
    runtime: variables live there and the results equal the plain model's."""
    workers, servers, logs = _start_tf_servers(2, tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    client = tmp_path / "client.py"
    client.write_text(_REMOTE_CLIENT)
    try:
        out = subprocess.run(
            [sys.executable, str(client), json.dumps(workers), root],
            capture_output=True, text=True, timeout=300, check=False,
        )
        crashed = [i for i, server in enumerate(servers) if server.poll() is not None]
    finally:
        _stop(servers)
    server_logs = "\n".join(log.read_text()[-1500:] for log in logs)
    assert not crashed, f"servers {crashed} exited during the test:\n{server_logs}"
    assert out.returncode == 0, out.stderr[-3000:] + "\n" + server_logs
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for i, devices in enumerate(result["devices"]):
        assert devices and all(
            d == f"/job:worker/replica:0/task:{i}/device:CPU:0" for d in devices
        )
    assert_close(result["p_loss"], result["loss"])
    for g, pg in zip(result["grads"], result["p_grads"]):
        assert_close(pg, g)
    assert_close(result["fit_loss"][0], result["loss"])
    assert result["fit_loss"][1] < result["fit_loss"][0]


def test_partition_against_data_flow_is_an_error():
    model = sequential_model()
    names = layer_order(model)
    with pytest.raises(ValueError, match="not in the model's data-flow order"):
        PipelineModel(model, num_stages=2, microbatches=2,
                      partition=[names[4:], names[:4]])


def test_shared_layers_are_refused():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4)
    model = keras.Model(inputs, keras.layers.Dense(2)(shared(shared(inputs))))
    with pytest.raises(NotImplementedError, match="shared layers"):
        PipelineModel(model, num_stages=2, microbatches=2)


def test_a_nested_models_layer_called_again_is_refused():
    # The nested model is one node, the second call of its layer another:
    # both update `sh`'s variables, which two stages cannot.
    sh = keras.layers.Dense(4, name="sh")
    inner = keras.Sequential([keras.layers.Dense(4, name="i1"), sh], name="inner")
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, name="mid")(inner(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(sh(h)))
    with pytest.raises(NotImplementedError, match=r"share variables.*'inner', 'sh'"):
        PipelineModel(model, num_stages=2, microbatches=2, partition=[1, 3])


def regularized_model(seed=0):
    """Weight regularizers on both sides of the cuts (partition [2, 3]): L2
    and L1L2 kernels, an L1 bias; a skip crosses the cut."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    a = keras.layers.Dense(5, activation="tanh", name="a",
                           kernel_regularizer=keras.regularizers.L2(0.05))(inputs)
    b = keras.layers.Dense(5, activation="tanh", name="b",
                           bias_regularizer=keras.regularizers.L1(0.05))(a)
    c = keras.layers.Dense(5, activation="tanh", name="c",
                           kernel_regularizer=keras.regularizers.L1L2(0.02, 0.05))(b)
    joined = keras.layers.Concatenate(name="join")([c, a])
    out = keras.layers.Dense(3, name="out",
                             kernel_regularizer=keras.regularizers.L2(0.05))(joined)
    return keras.Model(inputs, out)


@pytest.mark.parametrize("schedule,options", [
    ("gpipe", {}), ("1f1b", {"defer_weight_gradients": True}),
    ("interleaved", {"recompute": True}),
])
def test_weight_regularizers_train_as_in_the_plain_model(schedule, options):
    # Keras adds every regularized variable's penalty to the loss once per
    # step; each stage adds its own (the first stage's would otherwise get
    # no gradient from the loss on the last stage).
    plain, copy = regularized_model(), regularized_model(seed=1)
    copy.set_weights(plain.get_weights())
    pipe = PipelineModel(copy, num_stages=2, microbatches=4, schedule=schedule,
                         partition=[1, 1, 1, 2] if schedule == "interleaved"
                         else [2, 3], **options)
    for model in (plain, pipe):
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    x, y = data("sequential", batch=32)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y[:16], plain(x[:16])) + tf.add_n(
            plain.losses)
    grads = tape.gradient(loss, plain.trainable_variables)
    p_loss, _, p_grads = pipe.compute_gradients(x[:16], y[:16])
    assert_close(p_loss, loss)
    assert len(p_grads) == len(grads) == 8
    for g, pg in zip(grads, p_grads):
        assert_close(pg, g)
    h_plain = plain.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    h_pipe = pipe.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    assert_close(h_pipe.history["loss"], h_plain.history["loss"])
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)
    assert_close(pipe.evaluate(x, y, verbose=0), plain.evaluate(x, y, verbose=0))
    # The penalties are in the loss: without them it is lower.
    mse = keras.losses.MeanSquaredError()(y, plain.predict(x, verbose=0))
    assert float(mse) < plain.evaluate(x, y, verbose=0) - 0.01


class _AddsLoss(keras.layers.Layer):
    def call(self, inputs):
        self.add_loss(tf.reduce_mean(inputs))
        return inputs


@pytest.mark.parametrize("kind", ["activity", "add_loss", "add_loss_uncalled"])
def test_activity_regularizers_and_added_losses_are_refused(kind):
    # They depend on a stage's outputs: their gradient would have to travel
    # back through the pipeline, which only the loss's does.
    inputs = keras.Input((4,))
    if kind == "activity":
        h = keras.layers.Dense(4, name="first",
                               activity_regularizer=keras.regularizers.L2(0.1))(inputs)
    else:
        h = _AddsLoss(name="first")(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    match = ("activity regularizers" if kind == "activity"
             else "losses added with `add_loss`")
    if kind == "add_loss_uncalled":
        # Seen once the stages have run: the first step fails.
        pipe = PipelineModel(model, num_stages=2, microbatches=2)
        pipe.compile(optimizer="sgd", loss="mse")
        with pytest.raises(NotImplementedError, match=match):
            pipe.fit(np.ones((4, 4), "float32"), np.ones((4, 2), "float32"),
                     batch_size=4, verbose=0)
        return
    model(np.ones((2, 4), "float32"))  # the layer's loss is now in model.losses
    with pytest.raises(NotImplementedError, match=match):
        PipelineModel(model, num_stages=2, microbatches=2)


def _state_shapes_by_device(pipe):
    """Shapes of the optimizer's per-variable state, by device suffix.

    Scalars (the iteration count, the learning rate) are not per-variable
    state; which state belongs to which variable is not assumed, only how
    many of each shape sit on each device.
    """
    by_device = {}
    for state in pipe.optimizer.variables:
        if tuple(state.shape):
            by_device.setdefault(state.value.device[-5:], []).append(
                tuple(state.shape))
    return {device: sorted(shapes) for device, shapes in by_device.items()}


def _expected_state_shapes(pipe, per_variable):
    return {
        f"CPU:{stage.index}": sorted(
            tuple(v.shape) for v in stage.trainable_variables
            for _ in range(per_variable)
        )
        for stage in pipe.stages
    }


def test_optimizer_state_and_updates_live_on_stage_devices():
    _, pipe = pipeline("sequential", 2, 2, "1f1b")
    pipe.compile(optimizer="adam", loss="mse")
    x, y = data("sequential")
    step = tf.function(pipe.train_step)
    graph = step.get_concrete_function((tf.constant(x), tf.constant(y))).graph
    # Adam keeps two moments per variable, each next to its variable.
    assert _state_shapes_by_device(pipe) == _expected_state_shapes(pipe, 2)
    # Adam's sqrt(v) per variable (the scalar step-size math is shared).
    updates = [
        o for o in graph.get_operations()
        if o.type == "Sqrt" and o.inputs[0].shape.rank
    ]
    assert {o.device[-5:] for o in updates} == {"CPU:0", "CPU:1"}
    assert len(updates) == len(pipe.trainable_variables)
    stage_of = {v.path: s.index for s in pipe.stages for v in s.trainable_variables}
    assert sorted(o.device[-1] for o in updates) == sorted(
        str(stage_of[v.path]) for v in pipe.trainable_variables)
    pipe.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = [v.numpy() for v in pipe.optimizer.variables]
    pipe.repartition([6, 2])  # moves layers and their optimizer state
    assert _state_shapes_by_device(pipe) == _expected_state_shapes(pipe, 2)
    # Moving keeps every value, and training goes on with the moved state.
    for old, state in zip(before, pipe.optimizer.variables):
        np.testing.assert_array_equal(state.numpy(), old)
    pipe.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(pipe.optimizer.iterations.numpy()) == 2 * (BATCH // 8)


def test_weight_decay_exclusions_survive_moving_variables_to_stages():
    # Keras keys exclude_from_weight_decay(var_list=...) by the TensorFlow
    # variables behind the Keras ones, which placing a stage on its device
    # replaces: the excluded kernels used to be decayed.
    plain, pipe = pipeline("sequential", 2, 2, "1f1b")
    copy = pipe.wrapped_model

    def adamw(model):
        optimizer = keras.optimizers.AdamW(0.01, weight_decay=0.5)
        optimizer.exclude_from_weight_decay(
            var_list=[layer.kernel for layer in model.layers[::2]],
            var_names=["bias"])
        return optimizer

    # The pipeline placed the variables before the user set the exclusions
    # up; a second pipeline around the same model moves them afterwards.
    optimizer = adamw(copy)
    pipe = PipelineModel(copy, num_stages=2, microbatches=2, partition=[3, 5])
    pipe.compile(optimizer=optimizer, loss="mse")
    plain.compile(optimizer=adamw(plain), loss="mse", jit_compile=False)
    x, y = data("sequential", batch=32)
    for partition in (None, [6, 2]):  # and after moving layers once trained
        if partition:
            pipe.repartition(partition)
        pipe.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for actual, expected in zip(pipe.get_weights(), plain.get_weights()):
            assert_close(actual, expected)


def nested_model(seed):
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(5, activation="tanh"),
         keras.layers.Dense(5, activation="tanh")], name="inner")
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), inner,
         keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])


def test_one_callback_partitions_each_pipeline_it_is_given_to():
    from tf_smdist.pipeline.callback import ProfilingCallback

    plain = nested_model(0)
    first, second = nested_model(1), nested_model(2)
    first.set_weights(plain.get_weights())
    pipes = [
        PipelineModel(m, num_stages=2, microbatches=2, partition=[3, 1])
        for m in (first, second)
    ]
    x, y = data("sequential", batch=32)
    plain.compile(optimizer="adam", loss="mse", jit_compile=False)
    for pipe in pipes:
        pipe.compile(optimizer="adam", loss="mse")
    # The user's callback keeps its options: nested models are profiled (and
    # then cut) layer by layer.
    callback = ProfilingCallback(batch_size=8, warmup=1, repeats=1)
    h_plain = plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    h_pipe = pipes[0].fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                          callbacks=[callback])
    assert "expand_nested" not in callback.profile_kwargs
    part = pipes[0]._partition
    names = sum(part.stage_layer_names, [])
    assert names == pipes[0]._graph_for(part).names
    assert "inner/" + first.layers[1].layers[0].name in names
    assert [list(s.layer_names) for s in pipes[0].stages] == part.stage_layer_names
    assert_close(h_pipe.history["loss"], h_plain.history["loss"])
    for w, pw in zip(plain.get_weights(), pipes[0].get_weights()):
        assert_close(pw, w)
    # Given to the second pipeline's fit, it profiles and partitions that
    # one, and leaves the first alone.
    pipes[1].fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert pipes[1]._partition is not None
    assert pipes[0]._partition is part
    assert callback.profile.model_name == second.name
    # Nothing was patched onto the user's objects.
    for pipe in pipes:
        optimizer = pipe.optimizer
        assert not {"update_step", "add_variable_from_reference"} & set(vars(optimizer))
    assert "on_profile" not in vars(callback) or callback.on_profile is None


def test_auto_partition_keeps_nested_models_whole():
    plain, copy = nested_model(0), nested_model(1)
    copy.set_weights(plain.get_weights())
    pipe = PipelineModel(copy, num_stages=2, microbatches=2, schedule="1f1b")
    x, y = data("sequential", batch=32)
    part = pipe.auto_partition(x[:8])
    assert sum(part.stage_layer_names, []) == [layer.name for layer in copy.layers]
    assert "inner" in sum(part.stage_layer_names, [])
    for model in (plain, pipe):
        model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    h_plain = plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    h_pipe = pipe.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_close(h_pipe.history["loss"], h_plain.history["loss"])
    for w, pw in zip(plain.get_weights(), pipe.get_weights()):
        assert_close(pw, w)


def test_process_batch_check_counts_only_the_training_part_of_a_split():
    # Keras trains on the first floor(64 * 0.8) = 51 samples: a last batch of
    # 3 rows, which 4 micro-batches cannot split; refused before training
    # (it used to fail at a graph assertion after 3 steps).
    from types import SimpleNamespace

    from tf_smdist.pipeline.process_steps import _check_batches

    pipe = SimpleNamespace(microbatches=4, dp_size=1)
    x = np.zeros((64, 3), np.float32)
    with pytest.raises(ValueError, match="last batch 3 \\(51 training samples of 64"):
        _check_batches(pipe, (x,), {"batch_size": 16, "validation_split": 0.2})
    _check_batches(pipe, (x,), {"batch_size": 16, "validation_split": 0.25})  # 48
    _check_batches(pipe, (x,), {"batch_size": 16})
