"""tf_smdist quickstart: both halves of the library in one short run.

1. Data parallel: Keras `model.fit` under `smd.DataParallelStrategy` on 2
   logical CPU devices (all GPUs when there are some); gradients are packed
   into fusion buckets and summed on the host by our C++ ops. The weights are
   checked against `tf.distribute.MirroredStrategy`'s.
2. Pipeline parallel: the same kind of model split into 2 stages by
   `smd.PipelineModel`, trained with the 1F1B schedule over 4 micro-batches,
   with its loss checked against the plain model's.
3. The ops themselves: pack, host reduce (float32 accumulation, mean fused
   in), unpack, and the host reduce's throughput.

    python examples/quickstart.py
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_smdist as smd  # noqa: E402

devices = smd.configure_cpu_devices(2)  # first, before TensorFlow starts

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 32)).astype(np.float32)
y = (x[:, :4].sum(axis=1) > 0).astype(np.int32)  # a learnable toy task


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(2),
    ])


def train(strategy: tf.distribute.Strategy) -> keras.Model:
    with strategy.scope():
        model = make_model()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0)
    return model


# 1. Data parallel, against MirroredStrategy.
ours = train(smd.DataParallelStrategy(bucket_cap_mb=25.0))
theirs = train(tf.distribute.MirroredStrategy(devices))
diff = max(float(np.max(np.abs(a - b)))
           for a, b in zip(ours.get_weights(), theirs.get_weights()))
_, accuracy = ours.evaluate(x, y, verbose=0)
print(f"DataParallelStrategy on {len(devices)} devices: 24 steps, accuracy "
      f"{accuracy:.3f}; largest weight difference from MirroredStrategy {diff:.1e}")
assert diff < 1e-5

# 2. Pipeline parallel, against the plain model.
plain = make_model()
pipe = smd.PipelineModel(make_model(), num_stages=2, microbatches=4, schedule="1f1b")
for model in (plain, pipe):
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
h_plain = plain.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
h_pipe = pipe.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
loss_pipe, loss_plain = h_pipe.history["loss"][-1], h_plain.history["loss"][-1]
print(f"PipelineModel, 2 stages x 4 micro-batches (1F1B): loss {loss_pipe:.6f}, "
      f"plain model {loss_plain:.6f}")
np.testing.assert_allclose(h_pipe.history["loss"], h_plain.history["loss"], rtol=1e-5)
print(pipe.partition_report())

# 3. The ops: pack each replica's gradients (bfloat16 for transfer), sum on the
# host in float32 with the mean fused in, unpack.
shapes = [[784, 256], [256], [256, 10], [10]]
grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in devices]
buckets = []
for device, replica_grads in zip(devices, grads):
    with tf.device(device):
        buckets.append(smd.pack(replica_grads, out_type=tf.bfloat16))
with tf.device("/cpu:0"):
    mean = smd.host_reduce(buckets, scale=1.0 / len(devices), out_type=tf.float32)
for got, *per_replica in zip(smd.unpack(mean, shapes), *grads):
    want = np.mean([g.astype(tf.bfloat16.as_numpy_dtype).astype(np.float32)
                    for g in per_replica], axis=0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
print(f"pack -> host_reduce -> unpack of {int(mean.shape[0])} values: "
      "matches NumPy")

inputs = [tf.constant(rng.standard_normal(25 * 2**18).astype(np.float32))
          for _ in range(4)]
smd.host_reduce(inputs, scale=0.25)
times = []
for _ in range(5):
    start = time.perf_counter()
    smd.host_reduce(inputs, scale=0.25)
    times.append(time.perf_counter() - start)
moved = 5 * 25 * 2**20  # 4 inputs read + 1 output written
print(f"host reduce of 4 x 25 MiB: {moved / np.median(times) / 1e9:.1f} GB/s "
      "(bytes read + written, median of 5)")
