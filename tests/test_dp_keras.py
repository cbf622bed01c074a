"""Keras 3 under DataParallelStrategy: fit/evaluate/predict, callbacks, saving."""

import importlib.util
import itertools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smdist as smd

DEVICES = ["/cpu:0", "/cpu:1"]
_KEY_BASES = itertools.count(1)


def _mirrored():
    class _Mirrored(tf.distribute.MirroredStrategy):
        _collective_key_base = 200_000 + 1000 * next(_KEY_BASES)

    return _Mirrored(DEVICES)


def _two_in_two_out():
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(6, activation="relu")(h)
    h = keras.layers.BatchNormalization()(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    return keras.Model({"a": a, "b": b}, {"reg": reg, "cls": cls})


def _data(n=32, seed=0):
    rng = np.random.RandomState(seed)
    x = {"a": rng.randn(n, 4).astype("float32"), "b": rng.randn(n, 3).astype("float32")}
    y = {
        "reg": rng.randn(n, 1).astype("float32"),
        "cls": rng.randint(0, 3, size=(n,)).astype("int32"),
    }
    return x, y


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss={"reg": "mse", "cls": "sparse_categorical_crossentropy"},
        metrics={"reg": ["mae"], "cls": ["accuracy"]},
    )


def _fit_all(strategy, tmp_path, tag):
    keras.utils.set_random_seed(2)
    x, y = _data()
    vx, vy = _data(16, seed=1)
    with strategy.scope():
        model = _two_in_two_out()
        _compile(model)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        validation_data=(vx, vy),
        verbose=0,
    )
    evaluation = model.evaluate(vx, vy, batch_size=8, return_dict=True, verbose=0)
    predictions = model.predict(vx, batch_size=8, verbose=0)
    return model, history.history, evaluation, predictions


def test_fit_evaluate_predict_multi_io_match_mirrored(tmp_path):
    ref_model, ref_hist, ref_eval, ref_pred = _fit_all(_mirrored(), tmp_path, "m")
    model, hist, evaluation, pred = _fit_all(
        smd.DataParallelStrategy(DEVICES, bucket_cap_mb=1e-4), tmp_path, "d"
    )
    assert sorted(hist) == sorted(ref_hist)
    assert "val_cls_accuracy" in hist and "val_reg_mae" in hist
    for key in ref_hist:
        np.testing.assert_allclose(hist[key], ref_hist[key], rtol=1e-5, atol=1e-6)
    assert sorted(evaluation) == sorted(ref_eval)
    for key in ref_eval:
        np.testing.assert_allclose(evaluation[key], ref_eval[key], rtol=1e-5, atol=1e-6)
    for key in ref_pred:
        np.testing.assert_allclose(pred[key], ref_pred[key], rtol=1e-5, atol=1e-6)
    # Weights, BatchNormalization moving statistics included.
    for w, e in zip(model.weights, ref_model.weights):
        np.testing.assert_allclose(w.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)
    # BatchNormalization's moving statistics: as under MirroredStrategy in
    # Keras 3, each replica updates its own copy from its own batches.
    bn, ref_bn = model.get_layer(index=4), ref_model.get_layer(index=4)
    assert isinstance(bn, keras.layers.BatchNormalization)
    for var, ref_var in [
        (bn.moving_mean, ref_bn.moving_mean),
        (bn.moving_variance, ref_bn.moving_variance),
    ]:
        local = [
            v.numpy()
            for v in model.distribute_strategy.experimental_local_results(var.value)
        ]
        ref_local = [
            v.numpy()
            for v in ref_model.distribute_strategy.experimental_local_results(
                ref_var.value
            )
        ]
        assert len(local) == len(ref_local) == 2
        for got, want in zip(local, ref_local):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_callbacks_and_save_then_load_outside_any_strategy(tmp_path):
    keras.utils.set_random_seed(4)
    x, y = _data()
    vx, vy = _data(16, seed=1)
    strategy = smd.DataParallelStrategy(DEVICES)
    with strategy.scope():
        model = _two_in_two_out()
        _compile(model)
    ckpt = str(tmp_path / "best.keras")
    callbacks = [
        keras.callbacks.ModelCheckpoint(ckpt, monitor="val_loss", save_best_only=True),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=1e9),
    ]
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    if has_tensorboard:  # tensorflow-cpu does not pull it in
        callbacks.append(keras.callbacks.TensorBoard(str(tmp_path / "tb")))
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=5,
        validation_data=(vx, vy),
        callbacks=callbacks,
        verbose=0,
    )
    # EarlyStopping with an unreachable min_delta stops after patience + 1.
    assert len(history.history["loss"]) == 2
    assert os.path.exists(ckpt)
    if has_tensorboard:
        assert os.listdir(tmp_path / "tb")
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert tf.distribute.get_strategy() is not strategy
    loaded = keras.models.load_model(path)
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    # Outside any strategy the loaded model predicts like the original's
    # first replica (the one whose BatchNormalization statistics are saved).
    first = {k: v[:4] for k, v in vx.items()}
    want = model.predict(vx, batch_size=8, verbose=0)
    got = loaded.predict(first, verbose=0)
    for key in want:
        np.testing.assert_allclose(got[key], want[key][:4], rtol=1e-5, atol=1e-6)
    assert keras.models.load_model(ckpt).count_params() == model.count_params()


def test_backup_and_restore_resumes_an_interrupted_fit(tmp_path):
    x, y = _data()
    strategy = smd.DataParallelStrategy(DEVICES)
    with strategy.scope():
        model = _two_in_two_out()
        _compile(model)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x, y, batch_size=8, epochs=4, callbacks=[backup, Interrupt()], verbose=0
        )
    with strategy.scope():
        resumed = _two_in_two_out()
        _compile(resumed)
    history = resumed.fit(x, y, batch_size=8, epochs=4, callbacks=[backup], verbose=0)
    assert len(history.history["loss"]) == 2  # epochs 2 and 3 only
    assert int(resumed.optimizer.iterations.numpy()) == 4 * 4


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_mirrored(policy):
    def train(strategy):
        keras.utils.set_random_seed(5)
        x = np.random.RandomState(3).randn(32, 6).astype("float32")
        y = np.random.RandomState(4).randn(32, 1).astype("float32")
        keras.mixed_precision.set_global_policy(policy)
        try:
            with strategy.scope():
                model = keras.Sequential(
                    [
                        keras.Input((6,)),
                        keras.layers.Dense(8, activation="relu"),
                        keras.layers.Dense(1, dtype="float32"),
                    ]
                )
                model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        return model.get_weights()

    expected = train(_mirrored())
    got = train(smd.DataParallelStrategy(DEVICES))
    for g, e in zip(got, expected):
        # Forward/backward in 16-bit on both sides; the reduction is float32.
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_gradient_clipping_matches_mirrored(clip):
    # Keras clips before it all-reduces under a strategy: each replica's own
    # gradients, so both strategies differ from one device alike.
    x = np.random.RandomState(3).randn(32, 6).astype("float32")
    y = np.random.RandomState(4).randn(32, 1).astype("float32")

    def train(strategy):
        keras.utils.set_random_seed(5)
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.1, **{clip: 0.05}),
                          loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    expected = train(_mirrored())
    got = train(smd.DataParallelStrategy(DEVICES))
    one_device = train(tf.distribute.get_strategy())
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert max(np.max(np.abs(g - o)) for g, o in zip(got, one_device)) > 1e-4


def test_gradient_accumulation_error_names_its_keras_cause():
    # Keras 3 all-reduces accumulated gradients inside a tf.cond, which
    # MirroredStrategy cannot do either; the error says so and what works.
    x = np.ones((16, 6), "float32")
    y = np.ones((16, 1), "float32")
    with smd.DataParallelStrategy(DEVICES).scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(gradient_accumulation_steps=2),
                      loss="mse")
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps causes"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
