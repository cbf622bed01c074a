"""tf_smdist quickstart: the fused gradient-aggregation ops at work.

Packs a model's gradients into one fusion bucket on each of two logical CPU
devices, sums the buckets on the host with the mean scale fused in, unpacks the
result, checks it against NumPy and prints the host reduce's throughput.

    python examples/quickstart.py
"""

import time

import numpy as np
import tensorflow as tf

import tf_smdist as smd

devices = smd.configure_cpu_devices(2)

# Two replicas' "gradients" of a small MLP: kernels and biases.
shapes = [[784, 256], [256], [256, 128], [128], [128, 10], [10]]
rng = np.random.default_rng(0)
grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in devices]

# 1. Pack each replica's gradients on its device (cast to bfloat16 for transfer).
buckets = []
for device, replica_grads in zip(devices, grads):
    with tf.device(device):
        buckets.append(smd.pack(replica_grads, out_type=tf.bfloat16))

# 2. Sum the buckets on the host, accumulating in float32, mean scale fused in.
with tf.device("/cpu:0"):
    mean = smd.host_reduce(buckets, scale=1.0 / len(devices), out_type=tf.float32)

# 3. Unpack back to the original shapes.
result = smd.unpack(mean, shapes)
for got, *per_replica in zip(result, *grads):
    want = np.mean([g.astype(tf.bfloat16.as_numpy_dtype).astype(np.float32)
                    for g in per_replica], axis=0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
print(f"{len(shapes)} gradients, {int(mean.shape[0])} values: mean over "
      f"{len(devices)} replicas matches NumPy")

# Host reduce throughput on a 25 MiB bucket from each of 4 replicas.
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
