"""DataParallelStrategy trains exactly like MirroredStrategy (Keras fit, 5 steps)."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smdist as smd

STEPS = 5
PER_REPLICA_BATCH = 4


_KEY_BASES = itertools.count(1)
_EXPECTED = {}


def _mirrored(devices):
    """A MirroredStrategy (default cross-device ops) with its own collective keys.

    Collective group keys are per process; two MirroredStrategy objects of
    different sizes must not share them.
    """

    class _Mirrored(tf.distribute.MirroredStrategy):
        _collective_key_base = 1000 * next(_KEY_BASES)

    return _Mirrored(devices)


def _devices(n):
    return [f"/cpu:{i}" for i in range(n)]


def _dense_model():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3, activation="relu"),
            keras.layers.Dense(1),
        ]
    )


def _embedding_model():
    return keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(11, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def _data(kind, n):
    rng = np.random.RandomState(7)
    batch = PER_REPLICA_BATCH * n * STEPS
    if kind == "dense":
        x = rng.randn(batch, 6).astype("float32")
    else:
        # Repeated ids within a batch exercise duplicate sparse rows.
        x = rng.randint(0, 11, size=(batch, 3)).astype("int32")
    y = rng.randn(batch, 1).astype("float32")
    return x, y


def _train(strategy, kind, optimizer, n):
    keras.utils.set_random_seed(1)
    x, y = _data(kind, n)
    with strategy.scope():
        model = _dense_model() if kind == "dense" else _embedding_model()
        opt = (
            keras.optimizers.SGD(0.1)
            if optimizer == "sgd"
            else keras.optimizers.Adam(0.05)
        )
        model.compile(optimizer=opt, loss="mse")
    model.fit(
        x, y, batch_size=PER_REPLICA_BATCH * n, epochs=1, shuffle=False, verbose=0
    )
    assert int(model.optimizer.iterations.numpy()) == STEPS
    return model.get_weights()


@pytest.mark.parametrize(
    "n, kind, optimizer",
    # Every device count meets every model and optimizer (and, below, every
    # path): all pairs of values, in half the runs of all combinations.
    [(2, "dense", "sgd"), (4, "dense", "adam"), (4, "embedding", "sgd"),
     (2, "embedding", "adam")],
)
@pytest.mark.parametrize(
    "path, bucket_cap_mb",
    # "packed": pack / host reduce / unpack, as for devices with their own
    # memory (GPUs) and across processes; "in place": logical CPU devices.
    [("packed", 1e-6), ("packed", 25.0), ("in place", 25.0)],
)
def test_fit_matches_mirrored_strategy(
    n, kind, optimizer, path, bucket_cap_mb, monkeypatch
):
    key = (n, kind, optimizer)
    if key not in _EXPECTED:  # one MirroredStrategy run serves every variant
        _EXPECTED[key] = _train(_mirrored(_devices(n)), kind, optimizer, n)
    expected = _EXPECTED[key]
    if path == "packed":
        monkeypatch.setattr(
            smd.data_parallel.HostReduceCrossDeviceOps,
            "_skips_packing",
            lambda *a: False,
        )
    strategy = smd.DataParallelStrategy(_devices(n), bucket_cap_mb=bucket_cap_mb)
    got = _train(strategy, kind, optimizer, n)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    # The dense gradients' plan (the Embedding's IndexedSlices are gathered).
    num_dense = len(got) - (kind == "embedding")
    plans = [
        p
        for p in strategy.cross_device_ops._plans.values()
        if p.num_tensors == num_dense
    ]
    assert len(plans) == 1, "the gradients did not go through the bucketed path"
    sizes = [len(b.tensor_indices) for b in plans[0].buckets]
    assert sizes == ([num_dense] if bucket_cap_mb == 25.0 else [1] * num_dense)


def test_fp16_compression_stays_close_to_mirrored():
    n = 2
    expected = _train(_mirrored(_devices(n)), "dense", "sgd", n)
    got = _train(
        smd.DataParallelStrategy(_devices(n), compression="fp16"), "dense", "sgd", n
    )
    for g, e in zip(got, expected):
        # Gradients travel in float16 (11-bit mantissa): a few 1e-4 relative.
        np.testing.assert_allclose(g, e, rtol=2e-3, atol=2e-4)
