"""Throughput of the op library against its peers, measured in one run.

For buckets of 1, 4, 25 and 100 MiB (float32) and N = 2, 4, 8 inputs, prints
SmdistHostReduce's bandwidth (bytes read + written) and its ratio to

  (a) a memory copy moving the same bytes (read + written, so the same working
      set; NumPy, the best of one thread and all threads): the ceiling,
  (b) the TF composite `tf.add_n` + cast + multiply,
  (c) NumPy (`a + b`, then `+=` and `*=`),

and SmdistPack / SmdistUnpack against the TF composites (reshape + concat +
cast + multiply; split + reshape + cast). Ops run eagerly, as a training
step's ops run one after another; every number is the median of `--repeats`
timings of many calls each.

    python benchmarks/bench_ops.py [--sizes 1,4,25,100] [--ns 2,4,8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_smdist as smd  # noqa: E402

MIB = 2**20


def median_seconds(fn, iters: int, repeats: int) -> float:
    fn()  # warm-up (and tracing)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def copy_ceiling(nbytes: int, iters: int, repeats: int) -> float:
    """Bandwidth (read + written) of the best copy of `nbytes` on this host."""
    src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    dst = np.empty_like(src)
    one = median_seconds(lambda: np.copyto(dst, src), iters, repeats)
    workers = os.cpu_count() or 1
    bounds = np.linspace(0, src.size, workers + 1).astype(int)

    def threaded():
        ts = [
            threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b]))
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    many = median_seconds(threaded, iters, repeats)
    return 2 * nbytes / min(one, many)


def bench_reduce(nbytes: int, n: int, iters: int, repeats: int) -> dict:
    rng = np.random.default_rng(n)
    arrays = [rng.standard_normal(nbytes // 4).astype(np.float32) for _ in range(n)]
    tensors = [tf.constant(a) for a in arrays]
    scale = 1.0 / n

    def ours_fn(*xs):
        return smd.host_reduce(list(xs), scale=scale)

    def composite_fn(*xs):
        return tf.cast(
            tf.add_n([tf.cast(x, tf.float32) for x in xs]) * scale, tf.float32
        )

    out = np.empty_like(arrays[0])

    def numpy_fn():
        np.add(arrays[0], arrays[1], out=out)
        for a in arrays[2:]:
            out.__iadd__(a)
        out.__imul__(np.float32(scale))

    moved = (n + 1) * nbytes
    t_ours = median_seconds(lambda: ours_fn(*tensors), iters, repeats)
    t_tf = median_seconds(lambda: composite_fn(*tensors), iters, repeats)
    t_np = median_seconds(numpy_fn, iters, repeats)
    ceiling = copy_ceiling(moved // 2, iters, repeats)
    return {"bw": moved / t_ours, "copy": ceiling, "tf": t_tf / t_ours,
            "np": t_np / t_ours}


def bench_pack(nbytes: int, iters: int, repeats: int, out_type) -> dict:
    rng = np.random.default_rng(1)
    # A bucket made of 16 gradients of uneven sizes, like a layer stack.
    weights = rng.uniform(0.2, 1.0, 16)
    sizes = np.maximum(1, (weights / weights.sum() * nbytes / 4).astype(int))
    shapes = [[int(s)] if i % 2 else [1, int(s)] for i, s in enumerate(sizes)]
    tensors = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    scale = 0.5

    def ours_pack(*xs):
        return smd.pack(list(xs), scale=scale, out_type=out_type)

    def tf_pack(*xs):
        flat = tf.concat([tf.reshape(x, [-1]) for x in xs], 0)
        return tf.cast(flat * scale, out_type)

    packed = ours_pack(*tensors)
    split_sizes = [int(np.prod(s)) for s in shapes]

    def ours_unpack(p):
        return smd.unpack(p, shapes, out_type=tf.float32)

    def tf_unpack(p):
        return [
            tf.cast(tf.reshape(part, s), tf.float32)
            for part, s in zip(tf.split(p, split_sizes), shapes)
        ]

    t_pack = median_seconds(lambda: ours_pack(*tensors), iters, repeats)
    t_pack_tf = median_seconds(lambda: tf_pack(*tensors), iters, repeats)
    t_unpack = median_seconds(lambda: ours_unpack(packed), iters, repeats)
    t_unpack_tf = median_seconds(lambda: tf_unpack(packed), iters, repeats)
    out_bytes = packed.dtype.size * int(packed.shape[0])
    return {
        "pack_bw": (nbytes + out_bytes) / t_pack,
        "pack_tf": t_pack_tf / t_pack,
        "unpack_bw": (nbytes + out_bytes) / t_unpack,
        "unpack_tf": t_unpack_tf / t_unpack,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,25,100", help="bucket sizes, MiB")
    parser.add_argument("--ns", default="2,4,8", help="numbers of inputs")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    ns = [int(n) for n in args.ns.split(",")]
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, "
          f"medians of {args.repeats} timings")

    print("\nSmdistHostReduce (float32, mean scale fused), GB/s = bytes read + written")
    print(f"{'MiB':>6} {'N':>3} {'GB/s':>7} {'copy GB/s':>10} {'x copy':>7} "
          f"{'x tf.add_n':>11} {'x numpy':>8}")
    for mib in sizes:
        nbytes = int(mib * MIB) // 4 * 4
        iters = max(1, int(64 * MIB // max(nbytes, 1)))
        for n in ns:
            r = bench_reduce(nbytes, n, max(1, iters // n), args.repeats)
            print(f"{mib:6g} {n:3d} {r['bw'] / 1e9:7.2f} {r['copy'] / 1e9:10.2f} "
                  f"{r['bw'] / r['copy']:7.2f} {r['tf']:11.2f} {r['np']:8.2f}")

    for out_type in (tf.float32, tf.bfloat16):
        print(f"\nSmdistPack / SmdistUnpack, float32 -> {out_type.name} -> float32, "
              "16 tensors a bucket; ratio = TF composite time / ours")
        print(f"{'MiB':>6} {'pack GB/s':>10} {'x concat':>9} "
              f"{'unpack GB/s':>12} {'x split':>8}")
        for mib in sizes:
            nbytes = int(mib * MIB) // 4 * 4
            iters = max(1, int(64 * MIB // max(nbytes, 1)))
            r = bench_pack(nbytes, iters, args.repeats, out_type)
            print(f"{mib:6g} {r['pack_bw'] / 1e9:10.2f} {r['pack_tf']:9.2f} "
                  f"{r['unpack_bw'] / 1e9:12.2f} {r['unpack_tf']:8.2f}")


if __name__ == "__main__":
    main()
