"""DataParallelStrategy vs MirroredStrategy on one host: step time and samples/s.

Trains the same Keras model with `model.fit` under
- `smd.DataParallelStrategy` as it runs on logical CPU devices (each gradient
  summed in place on the host by the host-reduce op: "smd"), and on its
  packed path (pack / host reduce / unpack per bucket, the path of GPUs and
  of multi-process runs: "smd packed") for a sweep of `bucket_cap_mb`,
- `tf.distribute.MirroredStrategy` with its default cross-device ops
  (CollectiveAllReduce, ring, on CPU devices), and
- `tf.distribute.MirroredStrategy(cross_device_ops=ReductionToOneDevice())`,
on the same logical CPU devices, for a small MLP, a convnet and a transformer
block. Timings are interleaved (one epoch of every configuration per round)
so that load on the machine affects them alike; each figure is the median
over rounds after a warm-up epoch. Ratios are printed as
peer step time / DataParallelStrategy step time (> 1: ours is faster).

Usage:
    python benchmarks/bench_dp_single_host.py [--devices 2] [--steps 20]
        [--rounds 5] [--models mlp,convnet,transformer] [--caps 0.25,1,4,25]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_smdist as smd  # noqa: E402  (devices must be split before TF starts)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per config")
    p.add_argument("--per-replica-batch", type=int, default=64)
    p.add_argument("--models", default="mlp,convnet,transformer")
    p.add_argument("--caps", default="0.25,1,4,25", help="bucket_cap_mb sweep")
    return p.parse_args()


ARGS = _parse()
smd.configure_cpu_devices(ARGS.devices)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_KEYS = itertools.count(1)


def _mirrored(devices, cross_device_ops=None):
    class _Mirrored(tf.distribute.MirroredStrategy):
        # Own collective keys per instance (several strategies, one process).
        _collective_key_base = 1000 * next(_KEYS)

    return _Mirrored(devices, cross_device_ops=cross_device_ops)


OURS = "smd (default, in place)"
PEERS = ("Mirrored (default: collective ring)", "Mirrored (ReductionToOneDevice)")


def _configs(devices):
    configs = {OURS: smd.DataParallelStrategy(devices)}
    for cap in [float(c) for c in ARGS.caps.split(",")]:
        strategy = smd.DataParallelStrategy(devices, bucket_cap_mb=cap)
        # Force the packed path that GPUs and multi-process runs take.
        strategy.cross_device_ops._skips_packing = lambda *a: False
        configs[f"smd packed cap={cap:g}MB"] = strategy
    configs[PEERS[0]] = _mirrored(devices)
    configs[PEERS[1]] = _mirrored(devices, tf.distribute.ReductionToOneDevice())
    return configs


def mlp():
    return keras.Sequential(
        [
            keras.Input((256,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    ), ((256,), 10)


def convnet():
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    ), ((32, 32, 3), 10)


def transformer():
    seq, dim = 32, 128
    inp = keras.Input((seq, dim))
    h = keras.layers.MultiHeadAttention(num_heads=4, key_dim=dim // 4)(inp, inp)
    h = keras.layers.LayerNormalization()(inp + h)
    f = keras.layers.Dense(4 * dim, activation="gelu")(h)
    f = keras.layers.Dense(dim)(f)
    h = keras.layers.LayerNormalization()(h + f)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(inp, out), ((seq, dim), 10)


MODELS = {"mlp": mlp, "convnet": convnet, "transformer": transformer}


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def _build(name, strategy, global_batch):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model, (in_shape, classes) = MODELS[name]()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    rng = np.random.RandomState(0)
    x = rng.randn(global_batch * 4, *in_shape).astype("float32")
    y = rng.randint(0, classes, size=(global_batch * 4,)).astype("int32")
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(global_batch)
        .repeat()
        .prefetch(2)
    )
    return model, ds


def bench_model(name, devices):
    global_batch = ARGS.per_replica_batch * len(devices)
    configs = _configs(devices)
    runs = {}
    for label, strategy in configs.items():
        model, ds = _build(name, strategy, global_batch)
        timer = _EpochTimer()
        # Warm-up epoch: tracing, first allocations.
        model.fit(
            ds, epochs=1, steps_per_epoch=ARGS.steps, verbose=0, callbacks=[timer]
        )
        runs[label] = (model, ds, timer, [])
    for _ in range(ARGS.rounds):
        for _label, (model, ds, timer, times) in runs.items():
            model.fit(
                ds, epochs=1, steps_per_epoch=ARGS.steps, verbose=0, callbacks=[timer]
            )
            times.append(timer.seconds / ARGS.steps)
    params = runs[next(iter(runs))][0].count_params()
    medians = {label: statistics.median(r[3]) for label, r in runs.items()}
    best_packed = min(
        (lbl for lbl in medians if lbl.startswith("smd packed")), key=medians.get
    )
    print(
        f"\n== {name}: {params:,} params ({params * 4 / 2**20:.2f} MiB of float32 "
        f"gradients), {len(devices)} replicas, global batch {global_batch}, "
        f"median of {ARGS.rounds} x {ARGS.steps} steps =="
    )
    print(f"{'configuration':40s} {'step ms':>9s} {'samples/s':>10s} {'spread':>8s}")
    for label, (_, _, _, times) in runs.items():
        m = medians[label]
        spread = (max(times) - min(times)) / m
        print(f"{label:40s} {m * 1e3:9.2f} {global_batch / m:10.0f} {spread:7.0%}")
    for peer in PEERS:
        print(
            f"RATIO {name}: {peer} / {OURS} = {medians[peer] / medians[OURS]:.3f}; "
            f"/ {best_packed} = {medians[peer] / medians[best_packed]:.3f}"
        )
    return medians


def bench_allreduce(name, devices, repeats=30):
    """Times the gradient all-reduce alone (no model compute) for `name`'s shapes."""
    model, _ = MODELS[name]()
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    configs = _configs(devices)
    fns = {}
    for label, strategy in configs.items():

        def make(strategy=strategy):
            @tf.function
            def step(seed):
                def fn(seed):
                    r = tf.distribute.get_replica_context().replica_id_in_sync_group
                    base = seed + tf.cast(r, tf.float32)
                    grads = [tf.fill(s, base + i) for i, s in enumerate(shapes)]
                    out = tf.distribute.get_replica_context().all_reduce("sum", grads)
                    return tf.add_n([tf.reduce_sum(o) for o in out])

                return strategy.run(fn, args=(seed,))

            return step

        fns[label] = make()
        fns[label](tf.constant(0.0))  # trace and warm up
    times = {label: [] for label in fns}
    for k in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            out = fn(tf.constant(float(k)))
            configs[label].experimental_local_results(out)[0].numpy()
            times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in times.items()}
    nbytes = sum(int(np.prod(s)) for s in shapes) * 4
    print(
        f"\n== all-reduce only, {name} gradient shapes ({len(shapes)} tensors, "
        f"{nbytes / 2**20:.2f} MiB), median of {repeats} calls =="
    )
    for label, m in medians.items():
        print(f"{label:40s} {m * 1e3:9.3f} ms")
    best_packed = min(
        (lbl for lbl in medians if lbl.startswith("smd packed")), key=medians.get
    )
    for peer in PEERS:
        print(
            f"RATIO all-reduce {name}: {peer} / {OURS} = "
            f"{medians[peer] / medians[OURS]:.3f}; / {best_packed} = "
            f"{medians[peer] / medians[best_packed]:.3f}"
        )


def main():
    devices = [f"/cpu:{i}" for i in range(ARGS.devices)]
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices {devices}, "
        f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads()}, "
        f"CPUs {os.cpu_count()}"
    )
    for name in ARGS.models.split(","):
        bench_allreduce(name, devices)
    for name in ARGS.models.split(","):
        bench_model(name, devices)


if __name__ == "__main__":
    main()
