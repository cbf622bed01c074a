"""DataParallelStrategy construction: devices, options and their errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smdist as smd
from tf_smdist.data_parallel import HostReduceCrossDeviceOps


def test_default_devices_are_the_logical_cpu_devices():
    num_cpus = len(tf.config.list_logical_devices("CPU"))
    assert num_cpus > 1  # the test set-up splits the CPU
    strategy = smd.DataParallelStrategy()
    assert strategy.num_replicas_in_sync == num_cpus
    assert [d[-5:] for d in strategy.extended.worker_devices] == [
        f"CPU:{i}" for i in range(num_cpus)
    ]


def test_is_a_mirrored_strategy_with_host_reduce_ops():
    strategy = smd.DataParallelStrategy(
        ["/cpu:1", "/cpu:0"], bucket_cap_mb=2.5, compression="bf16"
    )
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert isinstance(strategy.cross_device_ops, HostReduceCrossDeviceOps)
    assert strategy.bucket_cap_mb == 2.5
    assert strategy.compression == "bf16"
    assert strategy.host_threads is None
    assert strategy.cross_device_ops.host_device.endswith("device:CPU:0")
    assert repr(strategy) == (
        "DataParallelStrategy(devices=['/job:localhost/replica:0/task:0/device:CPU:1',"
        " '/job:localhost/replica:0/task:0/device:CPU:0'], bucket_cap_mb=2.5, "
        "compression='bf16', host_threads=None)"
    )


@pytest.mark.parametrize("cap", [0, -3.0, float("nan")])
def test_non_positive_bucket_cap_is_rejected(cap):
    with pytest.raises(ValueError, match=r"bucket_cap_mb.*Received: bucket_cap_mb="):
        smd.DataParallelStrategy(bucket_cap_mb=cap)


def test_non_numeric_bucket_cap_is_a_type_error():
    with pytest.raises(TypeError, match="bucket_cap_mb='big'"):
        smd.DataParallelStrategy(bucket_cap_mb="big")


def test_unknown_compression_is_rejected():
    with pytest.raises(ValueError, match=r"Received: compression='int8'.*\"fp16\""):
        smd.DataParallelStrategy(compression="int8")


def test_missing_device_is_rejected_with_the_available_list():
    with pytest.raises(ValueError, match=r"device='/gpu:0'.*Available devices"):
        smd.DataParallelStrategy(["/cpu:0", "/gpu:0"])
    with pytest.raises(ValueError, match=r"device='/cpu:9'"):
        smd.DataParallelStrategy(["/cpu:9"])
    with pytest.raises(ValueError, match=r"device='/job:worker/task:1/cpu:0'"):
        smd.DataParallelStrategy(["/job:worker/task:1/cpu:0"])


def test_bad_device_lists_are_rejected():
    with pytest.raises(ValueError, match="devices=\\[\\]"):
        smd.DataParallelStrategy([])
    with pytest.raises(ValueError, match="must not repeat"):
        smd.DataParallelStrategy(["/cpu:0", "/device:CPU:0"])
    with pytest.raises(TypeError, match="devices='/cpu:0'"):
        smd.DataParallelStrategy("/cpu:0")


@pytest.mark.parametrize("threads", [0, -1, 2.5, True])
def test_bad_host_threads_are_rejected(threads):
    with pytest.raises(ValueError, match="host_threads"):
        smd.DataParallelStrategy(host_threads=threads)


def test_model_built_outside_the_scope_is_a_clear_error():
    strategy = smd.DataParallelStrategy(["/cpu:0", "/cpu:1"])
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with strategy.scope():
        model.compile(optimizer="sgd", loss="mse")
        with pytest.raises(ValueError, match=r"created outside `strategy.scope\(\)`"):
            model.fit(np.ones((4, 3)), np.ones((4, 1)), batch_size=4, verbose=0)


def test_one_device_strategy_trains():
    strategy = smd.DataParallelStrategy(["/cpu:0"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 1)), batch_size=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2


def test_docstring_examples_run():
    import doctest

    from tf_smdist.data_parallel import cross_device_ops, strategy

    for module in (cross_device_ops, strategy):
        failures, tried = doctest.testmod(module)
        assert tried > 0
        assert failures == 0, module.__name__


def test_xla_compiled_reduction_is_a_clear_error(monkeypatch):
    # Under XLA on GPUs MirroredStrategy switches to NCCL collectives; ours
    # refuses instead of silently bypassing the host reduction.
    strategy = smd.DataParallelStrategy(["/cpu:0", "/cpu:1"])
    monkeypatch.setattr(type(strategy.extended), "_use_merge_call", lambda self: False)
    with pytest.raises(ValueError, match="jit_compile=False"):
        strategy.extended._get_cross_device_ops(tf.constant(1.0))


def test_keras_jit_compile_is_a_clear_error_on_cpus():
    # On CPUs MirroredStrategy keeps merge_call under XLA, and XLA then
    # fails at the first step on an op without an XLA kernel; ours names
    # the cause when the step is traced.
    strategy = smd.DataParallelStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    with pytest.raises(ValueError, match="cannot reduce inside an XLA-compiled"):
        model.fit(np.ones((8, 3), "float32"), np.ones((8, 1), "float32"),
                  batch_size=4, verbose=0)


def test_data_parallel_modules_import_without_a_cycle():
    import ast
    import os

    import tf_smdist.data_parallel

    package = os.path.dirname(tf_smdist.data_parallel.__file__)
    names = [n[:-3] for n in os.listdir(package) if n.endswith(".py")]
    edges = {}
    for name in names:
        with open(os.path.join(package, name + ".py")) as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):  # module-level and deferred imports alike
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "tf_smdist.data_parallel":
                    targets.update(a.name for a in node.names)
                elif node.module.startswith("tf_smdist.data_parallel."):
                    targets.add(node.module.rsplit(".", 1)[1])
        edges[name] = targets & set(names)
    assert "strategy" not in edges["multi_process"] | edges["extended"]

    def reaches(start, goal, seen=()):
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt)))
            for nxt in edges[start]
        )

    assert [n for n in names if reaches(n, n)] == []
