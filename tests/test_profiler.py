"""Tests for the layer-graph flattening and the per-layer profiler."""

import itertools
import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smdist as smd
from tf_smdist.pipeline.graph import SubclassedModelError, flatten_model
from tf_smdist.pipeline.profiler import optimizer_slots_per_parameter, stage_step

FAST = {"warmup": 1, "repeats": 2, "time_budget": 0.05}


def mlp():
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, name="d1"),
            keras.layers.Dense(8, name="d2"),
        ],
        name="mlp",
    )


def residual_model():
    x = keras.Input((8, 8, 4), name="image")
    h = keras.layers.Conv2D(6, 3, padding="same", name="stem")(x)
    y = keras.layers.Conv2D(6, 3, padding="same", name="conv_a")(h)
    y = keras.layers.ReLU(name="relu_a")(y)
    y = keras.layers.Conv2D(6, 3, padding="same", name="conv_b")(y)
    y = keras.layers.Add(name="residual")([h, y])
    y = keras.layers.GlobalAveragePooling2D(name="pool")(y)
    return keras.Model(x, keras.layers.Dense(3, name="head")(y), name="resnet")


def transformer_model(seq=6, dim=8):
    x = keras.Input((seq, dim), name="tokens")
    a = keras.layers.MultiHeadAttention(2, 4, name="attention")(x, x)
    h = keras.layers.Add(name="add_1")([x, a])
    h = keras.layers.LayerNormalization(name="norm_1")(h)
    f = keras.layers.Dense(16, activation="relu", name="ffn_in")(h)
    f = keras.layers.Dense(dim, name="ffn_out")(f)
    h = keras.layers.Add(name="add_2")([h, f])
    h = keras.layers.LayerNormalization(name="norm_2")(h)
    return keras.Model(x, h, name="transformer")


def test_param_and_activation_bytes_are_exact():
    model = mlp()
    profile = smd.profile_model(model, np.zeros((4, 16), "float32"), **FAST)
    assert profile.layer_names == ["d1", "d2"]
    assert profile.batch_size == 4
    assert profile.input_bytes == 16 * 4
    d1, d2 = profile.layers
    assert (d1.param_bytes, d1.trainable_bytes) == ((16 * 32 + 32) * 4,) * 2
    assert (d2.param_bytes, d2.trainable_bytes) == ((32 * 8 + 8) * 4,) * 2
    assert (d1.output_bytes, d2.output_bytes) == (32 * 4, 8 * 4)
    assert (d1.live_bytes, d2.live_bytes) == (32 * 4, 8 * 4)
    assert d1.optimizer_bytes == d2.optimizer_bytes == 0  # Not compiled.
    assert d1.inputs == ("input_layer:0",) or d1.inputs[0].endswith(":0")
    assert d2.inputs == ("d1:0",)


def test_optimizer_state_bytes_follow_the_optimizer():
    model = mlp()
    model.compile(optimizer="adam", loss="mse")
    batch = np.zeros((2, 16), "float32")
    adam = smd.profile_model(model, batch, **FAST)
    assert adam.optimizer == "Adam"
    assert adam.layers[0].optimizer_bytes == 2 * (16 * 32 + 32) * 4
    momentum = smd.profile_model(
        model, batch, optimizer=keras.optimizers.SGD(momentum=0.9), **FAST
    )
    assert momentum.layers[0].optimizer_bytes == (16 * 32 + 32) * 4
    assert optimizer_slots_per_parameter("sgd") == 0.0
    assert optimizer_slots_per_parameter(keras.optimizers.Adam(amsgrad=True)) == 3.0


def test_non_trainable_bytes_count_as_params_but_not_gradients():
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.BatchNormalization(name="bn")]
    )
    profile = smd.profile_model(model, np.ones((3, 5), "float32"), **FAST)
    bn = profile.layers[0]
    assert bn.param_bytes == 4 * 5 * 4
    assert bn.trainable_bytes == 2 * 5 * 4


def test_profiling_restores_batch_norm_statistics():
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.BatchNormalization(name="bn")]
    )
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    smd.profile_model(model, np.full((3, 5), 7.0, "float32"), **FAST)
    after = [v.numpy() for v in model.non_trainable_variables]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_heavy_layer_is_ranked_above_light_layers():
    model = keras.Sequential(
        [
            keras.Input((512,)),
            keras.layers.Dense(4, name="light_1"),
            keras.layers.Dense(512, name="widen"),
            keras.layers.Dense(1536, name="heavy"),
            keras.layers.Dense(4, name="light_2"),
        ]
    )
    profile = smd.profile_model(
        model, np.ones((128, 512), "float32"), warmup=1, repeats=5, time_budget=2.0
    )
    times = {layer.name: layer.time for layer in profile.layers}
    assert times["heavy"] > times["light_1"]
    assert times["heavy"] > times["light_2"]
    assert max(times, key=times.get) == "heavy"


def test_profile_json_round_trip(tmp_path):
    model = residual_model()
    profile = smd.profile_model(model, np.zeros((2, 8, 8, 4), "float32"), **FAST)
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = smd.Profile.load(path)
    assert loaded == profile
    assert loaded.layers == profile.layers
    assert json.loads(path.read_text())["layers"][0]["name"] == "stem"
    assert smd.Profile.from_json(profile.to_json()) == profile


def test_profile_rejects_unknown_format_version():
    model = mlp()
    data = smd.profile_model(model, np.zeros((1, 16), "float32"), **FAST).to_dict()
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version=99"):
        smd.Profile.from_dict(data)


def test_profile_repr_is_a_table():
    profile = smd.profile_model(mlp(), np.zeros((2, 16), "float32"), **FAST)
    text = repr(profile)
    lines = text.splitlines()
    assert lines[0].startswith("Profile of mlp: 2 layers, batch 2")
    assert "layer" in lines[1] and "params" in lines[1] and "live/sample" in lines[1]
    assert lines[3].split()[:3] == ["0", "d1", "Dense"]
    assert "2.1 KiB" in lines[3]  # (16 * 32 + 32) * 4 = 2176 bytes.


def test_residual_block_skip_tensor_is_live_across_the_block():
    model = residual_model()
    profile = smd.profile_model(model, np.zeros((2, 8, 8, 4), "float32"), **FAST)
    names = profile.layer_names
    assert names.index("stem") < names.index("conv_a") < names.index("residual")
    assert names[-2:] == ["pool", "head"]
    feature = 8 * 8 * 6 * 4  # One (8, 8, 6) float32 map per sample.
    live = {layer.name: layer.live_bytes for layer in profile.layers}
    # Inside the block the shortcut (stem's output) is live too.
    assert live["stem"] == feature
    assert live["conv_a"] == 2 * feature
    assert live["relu_a"] == 2 * feature
    assert live["conv_b"] == 2 * feature
    assert live["residual"] == feature
    assert live["pool"] == 6 * 4
    assert profile[names.index("residual")].inputs == ("stem:0", "conv_b:0")


def test_transformer_block_residuals_are_live():
    model = transformer_model()
    profile = smd.profile_model(model, np.zeros((2, 6, 8), "float32"), **FAST)
    names = profile.layer_names
    assert set(names) == {
        "attention",
        "add_1",
        "norm_1",
        "ffn_in",
        "ffn_out",
        "add_2",
        "norm_2",
    }
    token = 6 * 8 * 4
    live = {layer.name: layer.live_bytes for layer in profile.layers}
    # The input feeds attention and the first residual add.
    assert live["attention"] == 2 * token
    assert live["ffn_in"] == token + 6 * 16 * 4  # norm_1 output + hidden.
    assert live["ffn_out"] == 2 * token
    assert live["norm_2"] == token
    attention = profile[names.index("attention")]
    assert attention.inputs == ("tokens:0",)
    assert attention.param_bytes == sum(
        int(np.prod(w.shape)) * 4 for w in model.get_layer("attention").weights
    )


def test_flattened_graph_computes_the_model():
    for model, shape in (
        (residual_model(), (3, 8, 8, 4)),
        (transformer_model(), (3, 6, 8)),
    ):
        x = np.random.default_rng(0).normal(size=shape).astype("float32")
        graph = flatten_model(model)
        values = graph.run([x])
        np.testing.assert_allclose(values[graph.outputs[0]], model(x), rtol=1e-6)


def test_graph_runs_stage_by_stage_from_live_tensors():
    model = residual_model()
    graph = flatten_model(model)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype("float32")
    cut = graph.names.index("relu_a")
    first = graph.run([x], stop=cut + 1)
    carried = {k: first[k] for k in graph.live_after()[cut]}
    assert set(carried) == {"stem:0", "relu_a:0"}
    second = graph.run([], start=cut + 1, values=carried)
    np.testing.assert_allclose(second[graph.outputs[0]], model(x), rtol=1e-6)


def test_nested_models_are_expanded():
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(8)],
        name="block",
    )
    x = keras.Input((8,), name="x")
    h = keras.layers.Dense(8, name="pre")(x)
    y = keras.layers.Add(name="skip")([h, inner(h)])
    functional = keras.Model(x, y, name="body")
    outer = keras.Sequential(
        [keras.Input((8,)), functional, keras.layers.Dense(2, name="out")]
    )
    profile = smd.profile_model(outer, np.zeros((2, 8), "float32"), **FAST)
    dense_1 = inner.layers[1].name
    assert profile.layer_names == [
        "body/pre",
        "body/block/a",
        f"body/block/{dense_1}",
        "body/skip",
        "out",
    ]
    assert profile.param_bytes == (3 * (8 * 8 + 8) + 8 * 2 + 2) * 4
    assert profile[3].inputs == ("body/pre:0", f"body/block/{dense_1}:0")
    assert profile[1].live_bytes == 2 * 8 * 4  # The skip tensor is live.
    whole = smd.profile_model(
        outer, np.zeros((2, 8), "float32"), expand_nested=False, **FAST
    )
    assert whole.layer_names == ["body", "out"]
    assert whole.param_bytes == profile.param_bytes


def test_shared_layer_params_count_once():
    shared = keras.layers.Dense(4, name="shared")
    x = keras.Input((4,), name="x")
    y = shared(shared(x))
    model = keras.Model(x, y)
    profile = smd.profile_model(model, np.zeros((2, 4), "float32"), **FAST)
    assert profile.layer_names == ["shared", "shared#1"]
    assert [layer.param_bytes for layer in profile.layers] == [(16 + 4) * 4, 0]


def test_bare_operations_are_positions_but_not_layers():
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(4, name="d")(x)
    model = keras.Model(x, h + x)
    profile = smd.profile_model(model, np.zeros((2, 4), "float32"), **FAST)
    assert [layer.is_layer for layer in profile.layers] == [True, False]
    assert profile.layers[0].live_bytes == 2 * 4 * 4  # d's output and x.


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_subclassed_model_gets_a_manual_split_message():
    model = Subclassed()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(SubclassedModelError) as info:
        smd.profile_model(model, np.zeros((1, 4), "float32"), **FAST)
    message = str(info.value)
    assert "subclassed model" in message
    assert "split it manually" in message
    assert "stage_sizes" in message
    assert isinstance(info.value, ValueError)


def test_subclassed_model_inside_a_sequential_is_one_layer():
    block = Subclassed()
    model = keras.Sequential([keras.Input((4,)), block, keras.layers.Dense(2)])
    profile = smd.profile_model(model, np.zeros((2, 4), "float32"), **FAST)
    assert profile.layer_names[0] == block.name
    assert profile.layers[0].param_bytes == (4 * 3 + 3) * 4


def test_sample_batch_must_match_the_inputs():
    with pytest.raises(ValueError, match="Pass only `x`"):
        smd.profile_model(
            mlp(), (np.zeros((2, 16), "float32"), np.zeros((2, 8))), **FAST
        )


def test_profiling_callback_profiles_during_fit(tmp_path):
    model = mlp()
    model.compile(optimizer="adam", loss="mse")
    seen = []
    callback = smd.ProfilingCallback(
        path=tmp_path / "p.json", on_profile=seen.append, batch_size=4, **FAST
    )
    x = np.zeros((8, 16), "float32")
    y = np.zeros((8, 8), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
    assert callback.profile is not None
    assert seen == [callback.profile]
    assert callback.profile.batch_size == 4
    assert callback.profile.optimizer == "Adam"
    assert callback.profile.layers[0].optimizer_bytes == 2 * (16 * 32 + 32) * 4
    assert smd.Profile.load(tmp_path / "p.json") == callback.profile


def test_a_recorded_profile_counts_as_the_callbacks_own():
    # How every rank's callback gets rank 0's profile across processes.
    model = mlp()
    model.compile(optimizer="adam", loss="mse")
    x = np.zeros((8, 16), "float32")
    profile = smd.profile_model(model, x[:4], **FAST)
    seen = []
    callback = smd.ProfilingCallback(on_profile=seen.append, batch_size=4, **FAST)
    callback.record_profile(profile, model)
    assert callback.profile is profile
    assert callback.profiled_model is model
    assert seen == [profile]
    model.fit(x, np.zeros((8, 8), "float32"), batch_size=4, epochs=1, verbose=0,
              callbacks=[callback])
    assert callback.profile is profile  # not profiled again
    assert seen == [profile]


def test_profiling_callback_rejects_unknown_options():
    with pytest.raises(TypeError, match="repeat"):
        smd.ProfilingCallback(repeat=3)


def test_stage_step_runs_forward_and_backward_like_the_model():
    import tensorflow as tf

    model = residual_model()
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 8, 8, 4)), tf.float32)
    graph = flatten_model(model)
    values = graph.run([x], training=True)
    grads = stage_step(graph, values, 0, len(graph.nodes))()
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=True)
    expected = tape.gradient(y, [x, *model.trainable_variables])
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_profile_rejects_bad_timing_options():
    with pytest.raises(ValueError, match="chunk=0"):
        smd.profile_model(mlp(), np.zeros((2, 16), "float32"), chunk=0)
    with pytest.raises(ValueError, match="repeats=0"):
        smd.profile_model(mlp(), np.zeros((2, 16), "float32"), repeats=0)


def scripted_clock(durations):
    """A clock under which the k-th timed call lasts `durations[k % n]`
    seconds: calls alternate start (time unchanged) and end (time advanced)."""
    state = {"now": 0.0, "calls": 0}
    cycle = itertools.cycle(durations)

    def clock():
        state["calls"] += 1
        if state["calls"] % 2 == 0:
            state["now"] += next(cycle)
        return state["now"]

    return clock


def test_profile_without_calibration_is_each_layers_own_time():
    # Round-robin order: the empty call, then d1, then d2.
    clock = scripted_clock([0.001, 0.005, 0.002])
    profile = smd.profile_model(
        mlp(), np.zeros((2, 16), "float32"), chunk=1, warmup=1, repeats=3,
        time_budget=1.0, clock=clock,
    )
    assert profile.call_overhead == pytest.approx(0.001)
    assert [layer.time for layer in profile.layers] == pytest.approx([0.004, 0.001])


def test_calibration_spreads_a_chunks_time_over_its_layers():
    # Empty call, d1, d2, then the chunk of both layers run as one step.
    clock = scripted_clock([0.001, 0.005, 0.002, 0.010])
    profile = smd.profile_model(
        mlp(), np.zeros((2, 16), "float32"), chunk=2, warmup=1, repeats=3,
        time_budget=1.0, clock=clock,
    )
    # The chunk took 0.009 beyond the call; its layers alone 0.004 + 0.001.
    assert [layer.time for layer in profile.layers] == pytest.approx(
        [0.009 * 0.8, 0.009 * 0.2]
    )


def test_profiling_many_layers_does_not_log_retracing():
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect()
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        model = keras.Sequential(
            [keras.Input((8,))] + [keras.layers.Dense(8) for _ in range(12)]
        )
        smd.profile_model(model, np.zeros((4, 8), "float32"), warmup=2, repeats=2)
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert not [m for m in messages if "retracing" in m]


def test_matmul_rule_profile_same_layers_and_gradients():
    keras.utils.set_random_seed(0)
    # Large enough (about 50 MFLOP per step) that the step times well above
    # an empty call even on a loaded machine.
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(512),
                              keras.layers.Dense(8)])
    x = np.random.RandomState(0).randn(64, 256).astype("float32")
    plain = smd.profile_model(model, x, repeats=2, time_budget=1.0)
    ruled = smd.profile_model(model, x, repeats=2, time_budget=1.0,
                              matmul_rule=True)
    assert [layer.name for layer in ruled.layers] == [
        layer.name for layer in plain.layers]
    assert [layer.param_bytes for layer in ruled.layers] == [
        layer.param_bytes for layer in plain.layers]
    # A small layer can time at or under the cost of an empty call, which the
    # profiler subtracts and clamps at zero; the step as a whole cannot.
    assert all(layer.time >= 0 for layer in ruled.layers)
    assert sum(layer.time for layer in ruled.layers) > 0
    # The timed step computes the same gradients under either rule.
    graph = flatten_model(model)
    values = graph.run([tf.constant(x)], training=True)
    want = stage_step(graph, values, 0, 2)()
    got = stage_step(graph, values, 0, 2, matmul_rule=True)()
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=1e-5)
