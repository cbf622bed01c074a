"""Custom training loops under DataParallelStrategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smdist as smd

DEVICES = ["/cpu:0", "/cpu:1"]


def _replica_values(strategy, fn):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: fn(ctx.replica_id_in_sync_group)
    )


@pytest.mark.parametrize("n", [2, 4])
def test_replica_context_all_reduce_sum_and_mean_in_tf_function(n):
    strategy = smd.DataParallelStrategy([f"/cpu:{i}" for i in range(n)])

    @tf.function
    def step(v):
        def fn(v):
            ctx = tf.distribute.get_replica_context()
            s = ctx.all_reduce("sum", {"a": v, "b": 2.0 * v[:2]})
            m = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, v)
            return s["a"], s["b"], m

        return strategy.run(fn, args=(v,))

    values = _replica_values(
        strategy, lambda r: tf.constant([1.0, 2.0, 3.0]) * (r + 1.0)
    )
    s, b, m = step(values)
    total = sum(range(1, n + 1))
    for i in range(n):
        np.testing.assert_array_equal(
            strategy.experimental_local_results(s)[i], [total, 2 * total, 3 * total]
        )
        np.testing.assert_array_equal(
            strategy.experimental_local_results(b)[i], [2 * total, 4 * total]
        )
        np.testing.assert_allclose(
            strategy.experimental_local_results(m)[i],
            np.array([1.0, 2.0, 3.0]) * total / n,
            rtol=1e-7,
        )


def test_all_reduce_of_indexed_slices_gathers_rows_in_replica_order():
    strategy = smd.DataParallelStrategy(DEVICES)

    @tf.function
    def step():
        def fn():
            r = tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32
            )
            slices = tf.IndexedSlices(
                tf.fill([2, 3], r + 1.0),
                tf.constant([0, 4], tf.int64) + tf.cast(r, tf.int64),
                tf.constant([6, 3], tf.int64),
            )
            return tf.distribute.get_replica_context().all_reduce("mean", slices)

        return strategy.run(fn)

    out = strategy.experimental_local_results(step())
    for value in out:
        assert isinstance(value, tf.IndexedSlices)
        np.testing.assert_array_equal(value.indices, [0, 4, 1, 5])
        np.testing.assert_array_equal(value.values, [[0.5] * 3] * 2 + [[1.0] * 3] * 2)
        np.testing.assert_array_equal(value.dense_shape, [6, 3])


def test_strategy_reduce_of_per_replica_values():
    strategy = smd.DataParallelStrategy(DEVICES)
    values = _replica_values(strategy, lambda r: tf.constant([[1.0, 2.0]]) * (r + 1.0))
    np.testing.assert_array_equal(
        strategy.reduce("SUM", values, axis=None), [[3.0, 6.0]]
    )
    np.testing.assert_array_equal(
        strategy.reduce("MEAN", values, axis=None), [[1.5, 3.0]]
    )
    np.testing.assert_array_equal(strategy.reduce("SUM", values, axis=0), [3.0, 6.0])
    np.testing.assert_array_equal(strategy.reduce("MEAN", values, axis=1), 2.25)
    counts = _replica_values(strategy, lambda r: tf.constant(r + 1, tf.int64))
    assert int(strategy.reduce("SUM", counts, axis=None)) == 3


def _custom_loop_weights(strategy, distribute, steps=4):
    global_batch = 4 * strategy.num_replicas_in_sync
    rng = np.random.RandomState(0)
    x = rng.randn(global_batch * steps, 5).astype("float32")
    y = rng.randn(global_batch * steps, 1).astype("float32")
    keras.utils.set_random_seed(6)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(4, activation="tanh"),
                keras.layers.Dense(1),
            ]
        )
        optimizer = keras.optimizers.Adam(0.01)
        optimizer.build(model.trainable_variables)
    if distribute == "dataset":
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
        dist = strategy.experimental_distribute_dataset(ds)
    else:

        def dataset_fn(ctx):
            batch = ctx.get_per_replica_batch_size(global_batch)
            # One input pipeline in one process: its per-replica batches go
            # to the replicas in turn.
            return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)

        dist = strategy.distribute_datasets_from_function(dataset_fn)

    @tf.function
    def train_step(inputs):
        def step_fn(inputs):
            xb, yb = inputs
            with tf.GradientTape() as tape:
                per_example = tf.reduce_sum((model(xb) - yb) ** 2, axis=1)
                loss = tf.nn.compute_average_loss(
                    per_example, global_batch_size=global_batch
                )
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        per_replica = strategy.run(step_fn, args=(inputs,))
        return strategy.reduce("SUM", per_replica, axis=None)

    losses = [float(train_step(batch)) for batch in dist]
    assert len(losses) == steps
    return [w.numpy() for w in model.weights], losses


@pytest.mark.parametrize("distribute", ["dataset", "function"])
def test_custom_loop_matches_mirrored(distribute):
    class _Mirrored(tf.distribute.MirroredStrategy):
        _collective_key_base = 300_000 + 1000 * (distribute == "function")

    expected, expected_losses = _custom_loop_weights(_Mirrored(DEVICES), distribute)
    got, losses = _custom_loop_weights(smd.DataParallelStrategy(DEVICES), distribute)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "compression, expected",
    [
        # 1 + 2**-12 is exact in float32; float16 and bfloat16 round it to 1.
        (None, [2.0 + 2.0**-11, 6.0]),
        ("fp16", [2.0, 6.0]),
        ("bf16", [2.0, 6.0]),
    ],
)
def test_compression_casts_for_the_transfer_only(compression, expected):
    strategy = smd.DataParallelStrategy(DEVICES, compression=compression)

    @tf.function
    def step(v):
        return strategy.run(
            lambda v: tf.distribute.get_replica_context().all_reduce("sum", v),
            args=(v,),
        )

    values = _replica_values(strategy, lambda r: tf.constant([1.0 + 2.0**-12, 3.0]))
    for out in strategy.experimental_local_results(step(values)):
        assert out.dtype == tf.float32
        np.testing.assert_array_equal(out, np.array(expected, np.float32))


def test_all_reduce_in_an_eager_strategy_run():
    strategy = smd.DataParallelStrategy(DEVICES)

    def fn(v):
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce("sum", v), ctx.all_reduce("mean", v)

    values = _replica_values(strategy, lambda r: tf.constant([2.0, 4.0]) * (r + 1.0))
    total, mean = strategy.run(fn, args=(values,))
    for t, m in zip(
        strategy.experimental_local_results(total),
        strategy.experimental_local_results(mean),
    ):
        np.testing.assert_array_equal(t, [6.0, 12.0])
        np.testing.assert_array_equal(m, [3.0, 6.0])
