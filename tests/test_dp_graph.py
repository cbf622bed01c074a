"""The traced step: gradients pass through the custom ops, bucket by bucket."""

import keras
import numpy as np
import tensorflow as tf

import tf_smdist as smd
from tf_smdist import _ops

MIB = 1024 * 1024
DEVICES = ["/cpu:0", "/cpu:1"]


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(3, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )


def _trace(strategy):
    """Traces one all-reduced gradient step; returns (graph, per-replica grads)."""
    with strategy.scope():
        model = _model()
    recorded = []

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            x = tf.fill([3, 5], tf.cast(ctx.replica_id_in_sync_group, tf.float32) + 1)
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            recorded.append(grads)
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)

        return strategy.run(replica_fn)

    graph = step.get_concrete_function().graph
    return graph, recorded, model


def _ancestors(op):
    seen, stack = set(), [op]
    while stack:
        o = stack.pop()
        for t in list(o.inputs):
            if t.op not in seen:
                seen.add(t.op)
                stack.append(t.op)
        for c in o.control_inputs:
            if c not in seen:
                seen.add(c)
                stack.append(c)
    return seen


def _force_packing(monkeypatch):
    """Takes the pack path that devices with their own memory (GPUs) take.

    Logical CPU devices share the host's memory, so by default each tensor is
    summed in place; packing is what moves buckets to the host and between
    processes.
    """
    monkeypatch.setattr(
        smd.data_parallel.HostReduceCrossDeviceOps, "_skips_packing", lambda *a: False
    )


def _ops_of_type(graph, op_type):
    return [op for op in graph.get_operations() if op.type == op_type]


def test_gradients_pass_through_the_custom_ops_on_their_devices(monkeypatch):
    _force_packing(monkeypatch)
    strategy = smd.DataParallelStrategy(DEVICES, bucket_cap_mb=1e-6)
    graph, recorded, model = _trace(strategy)
    n_vars = len(model.trainable_variables)
    packs = _ops_of_type(graph, "SmdistPack")
    reduces = _ops_of_type(graph, "SmdistHostReduce")
    unpacks = _ops_of_type(graph, "SmdistUnpack")
    assert (len(packs), len(reduces)) == (2 * n_vars, n_vars)
    assert all(op.device.endswith("device:CPU:0") for op in reduces)
    assert sorted(op.device[-5:] for op in packs) == sorted(["CPU:0", "CPU:1"] * n_vars)
    # Logical CPU devices share the host's memory: each bucket is unpacked
    # once, on the host, and every replica reads the same buffers.
    assert len(unpacks) == n_vars
    assert all(op.device.endswith("device:CPU:0") for op in unpacks)
    # Every gradient of every replica is an input of exactly one pack.
    packed_inputs = {t.ref() for op in packs for t in op.inputs}
    for grads in recorded:
        for g in grads:
            assert g.ref() in packed_inputs


def test_each_bucket_depends_only_on_its_own_gradients(monkeypatch):
    _force_packing(monkeypatch)
    # Gradients: [k0 (5x4), b0 (4), k1 (4x3), b1 (3), k2 (3x2), b2 (2)] float32;
    # a 64-byte cap gives buckets (b2, k2, b1) 44 B, (k1, b0) 64 B, (k0) 80 B.
    strategy = smd.DataParallelStrategy(DEVICES, bucket_cap_mb=64 / MIB)
    graph, recorded, model = _trace(strategy)
    plan = next(iter(strategy.cross_device_ops._plans.values()))
    assert [b.tensor_indices for b in plan.buckets] == [(5, 4, 3), (2, 1), (0,)]
    grad_ops = {g.op: i for grads in recorded for i, g in enumerate(grads)}
    reduces = _ops_of_type(graph, "SmdistHostReduce")
    assert len(reduces) == plan.num_buckets
    seen_buckets = set()
    for op in reduces:
        ancestors = _ancestors(op)
        packs = [a for a in ancestors if a.type == "SmdistPack"]
        assert len(packs) == len(DEVICES)
        needed = {grad_ops[a] for a in ancestors if a in grad_ops}
        # Exactly the bucket's own gradients, from every replica, and nothing
        # else: no barrier on the other gradients or the other buckets.
        bucket = next(b for b in plan.buckets if set(b.tensor_indices) == needed)
        seen_buckets.add(bucket.index)
        assert not any(
            a.type in ("SmdistHostReduce", "SmdistUnpack") for a in ancestors
        )
        for pack in packs:
            assert len(pack.inputs) == len(bucket.tensor_indices)
    assert seen_buckets == set(range(plan.num_buckets))
    # The first bucket (last layer) does not wait for the first layer's
    # kernel gradient of either replica.
    first = next(op for op in reduces if op.name.startswith("smdist_bucket_0/"))
    assert not any(g[0].op in _ancestors(first) for g in recorded)


def test_logical_cpu_devices_sum_each_gradient_in_place():
    strategy = smd.DataParallelStrategy(DEVICES, bucket_cap_mb=64 / MIB)
    graph, recorded, model = _trace(strategy)
    n_vars = len(model.trainable_variables)
    assert _ops_of_type(graph, "SmdistPack") == []
    assert _ops_of_type(graph, "SmdistUnpack") == []
    reduces = _ops_of_type(graph, "SmdistHostReduce")
    assert len(reduces) == n_vars
    assert all(op.device.endswith("device:CPU:0") for op in reduces)
    # Each reduction reads one gradient of every replica, in replica order.
    inputs = sorted(tuple(t.ref() for t in op.inputs) for op in reduces)
    expected = sorted(
        tuple(recorded[r][i].ref() for r in range(len(DEVICES))) for i in range(n_vars)
    )
    assert inputs == expected
    # Grouped by bucket (name scopes follow the plan), first bucket first.
    plan = next(iter(strategy.cross_device_ops._plans.values()))
    for bucket in plan.buckets:
        scoped = [op for op in reduces if f"smdist_bucket_{bucket.index}/" in op.name]
        assert len(scoped) == len(bucket.tensor_indices)


def test_keras_fit_traces_the_custom_ops(monkeypatch):
    traced = []
    for name in ("pack", "host_reduce", "unpack"):
        real = getattr(_ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            first = out[0] if isinstance(out, list) else out
            if not tf.executing_eagerly():  # traced into the step's graph
                traced.append((_name, first.op.type))
            return out

        monkeypatch.setattr(_ops, name, spy)
    _force_packing(monkeypatch)
    strategy = smd.DataParallelStrategy(DEVICES)
    with strategy.scope():
        model = _model()
        model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 5), "float32")
    model.fit(x, np.zeros((8, 2), "float32"), batch_size=4, epochs=1, verbose=0)
    assert set(traced) >= {
        ("pack", "SmdistPack"),
        ("host_reduce", "SmdistHostReduce"),
        ("unpack", "SmdistUnpack"),
    }


def test_devices_with_their_own_memory_unpack_on_each_device(monkeypatch):
    # As on GPUs: the reduced bucket is copied to and unpacked on each device.
    monkeypatch.setattr(
        smd.data_parallel.HostReduceCrossDeviceOps, "_in_host_memory", lambda *a: False
    )
    strategy = smd.DataParallelStrategy(DEVICES, bucket_cap_mb=1e-6)
    graph, recorded, model = _trace(strategy)
    n_vars = len(model.trainable_variables)
    unpacks = _ops_of_type(graph, "SmdistUnpack")
    assert sorted(op.device[-5:] for op in unpacks) == sorted(
        ["CPU:0", "CPU:1"] * n_vars
    )

    @tf.function
    def step():
        def fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            v = [tf.fill([2, 3], tf.cast(r, tf.float32) + 1.0), tf.constant([5.0])]
            return tf.distribute.get_replica_context().all_reduce("mean", v)

        return strategy.run(fn)

    a, b = step()
    for t in strategy.experimental_local_results(a):
        np.testing.assert_array_equal(t, np.full([2, 3], 1.5, np.float32))
    for t in strategy.experimental_local_results(b):
        np.testing.assert_array_equal(t, [5.0])


def test_host_threads_caps_every_host_reduction(monkeypatch):
    for force_packing in (False, True):
        if force_packing:
            _force_packing(monkeypatch)
        strategy = smd.DataParallelStrategy(DEVICES, host_threads=1)
        assert strategy.host_threads == 1
        graph, _, _ = _trace(strategy)
        reduces = _ops_of_type(graph, "SmdistHostReduce")
        assert reduces
        assert {op.get_attr("max_threads") for op in reduces} == {1}
    default_graph, _, _ = _trace(smd.DataParallelStrategy(DEVICES))
    reduces = _ops_of_type(default_graph, "SmdistHostReduce")
    assert {op.get_attr("max_threads") for op in reduces} == {0}
