"""Bottleneck stage time of our partition against the usual peers, in one run.

On a heterogeneous model (a convolutional stem, transformer blocks, a large
dense head), for K = 2, 4, 8 stages, compares three splits of the same
layer sequence:

  ours        `smd.partition(profile, K)`: exact min-max over profiled time
              plus the transfer of every tensor live across each cut;
  layers      equal layer counts per stage (the naive split);
  params      equal parameter counts per stage (DeepSpeed's default
              `partition_method="parameters"`: min-max balanced parameters).

For each split it prints the predicted time of every stage (cost model:
profiled layer times plus transfers) and the measured time: each stage's
layers run forward and backward on this CPU as one `tf.function`
(`tf_smdist.pipeline.profiler.stage_step`), fed with the tensors it consumes
from earlier stages and back-propagating from every tensor it produces that
later stages use; the median of `--repeats` timed calls
after warm-up, less the cost of an empty `tf.function` call, timed round-robin
(every stage once per round). By default both the profile and the
measurements use this process's CPU time (`--clock cpu`): TensorFlow runs on
one thread here, and CPU time does not count the waits that other jobs on a
shared machine cause (`--clock wall` for wall time). The bottleneck
is the slowest stage; it sets a pipeline's steady-state throughput. Stages
run one after another here (one process, 1 intra-op thread), so measured
times are compute only; the predicted transfer share is printed apart.

    python benchmarks/bench_partition.py [--batch 16] [--blocks 5] [--repeats 9]
        [--stages 2,4,8] [--threads 1] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_smdist as smd  # noqa: E402
from tf_smdist.pipeline import solve_partition  # noqa: E402
from tf_smdist.pipeline.graph import flatten_model  # noqa: E402
from tf_smdist.pipeline.profiler import stage_step  # noqa: E402


def build_model(blocks: int, *, dim: int = 128, classes: int = 1024) -> keras.Model:
    """A convolutional stem at full resolution, transformer blocks, a dense head.

    The stem has few layers but more than half the compute; each transformer
    block spreads its compute over seven layers; the head holds most of the
    parameters in two layers.
    """
    conv = keras.layers.Conv2D
    x = keras.Input((32, 32, 3), name="image")
    h = conv(32, 3, padding="same", activation="relu", name="stem_1")(x)
    h = conv(64, 3, padding="same", activation="relu", name="stem_2")(h)
    h = conv(64, 3, padding="same", activation="relu", name="stem_3")(h)
    h = conv(64, 3, padding="same", activation="relu", name="stem_4")(h)
    h = keras.layers.MaxPooling2D(name="pool_1")(h)
    h = conv(dim, 3, padding="same", activation="relu", name="stem_5")(h)
    h = keras.layers.MaxPooling2D(name="pool_2")(h)
    h = keras.layers.Reshape((64, dim), name="tokens")(h)
    for b in range(blocks):
        a = keras.layers.MultiHeadAttention(4, dim // 4, name=f"attn_{b}")(h, h)
        h = keras.layers.Add(name=f"res_a_{b}")([h, a])
        h = keras.layers.LayerNormalization(name=f"norm_a_{b}")(h)
        f = keras.layers.Dense(4 * dim, activation="gelu", name=f"ffn_in_{b}")(h)
        f = keras.layers.Dense(dim, name=f"ffn_out_{b}")(f)
        h = keras.layers.Add(name=f"res_f_{b}")([h, f])
        h = keras.layers.LayerNormalization(name=f"norm_f_{b}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(1024, activation="relu", name="head_1")(h)
    y = keras.layers.Dense(classes, name="head_2")(h)
    return keras.Model(x, y, name="hetero")


def equal_layer_sizes(n: int, k: int) -> list[int]:
    return [n // k + (1 if s < n % k else 0) for s in range(k)]


def equal_param_sizes(profile: smd.Profile, k: int) -> list[int]:
    # DeepSpeed's "parameters" method balances parameter counts (min-max).
    # Parameter-free layers get a tiny weight, as DeepSpeed's do not, so the
    # exact solver has no ties to break arbitrarily.
    params = [layer.param_bytes + 1e-3 for layer in profile.layers]
    return solve_partition(params, k)


def median_times(fns, repeats: int, clock, warmup: int = 2) -> list[float]:
    """Median seconds of each fn, timed round-robin (one call each per round)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            start = clock()
            fn()
            times.append(clock() - start)
    return [statistics.median(times) for times in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--stages", default="2,4,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    model = build_model(args.blocks)
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(args.batch, 32, 32, 3))
    x = x.astype("float32")
    profile = smd.profile_model(
        model, x, warmup=2, repeats=args.repeats, time_budget=600.0, clock=clock
    )
    n = len(profile)
    print(
        f"model: {n} layers, {profile.param_bytes / 2**20:.1f} MiB params, "
        f"batch {args.batch}, intra-op threads {args.threads}, {args.clock} "
        f"clock; profiled "
        f"sum of layer times {profile.total_time * 1e3:.2f} ms"
    )

    graph = flatten_model(model)
    values = graph.run([tf.constant(x)], training=True)

    @tf.function
    def empty(t):
        return t

    tiny = tf.zeros([1])
    whole = stage_step(graph, values, 0, n)
    overhead, whole_time = median_times(
        [lambda: empty(tiny), whole], args.repeats, clock
    )
    whole_time -= overhead
    print(
        f"whole model fwd+bwd measured {whole_time * 1e3:.2f} ms "
        f"(profile sum / measured = {profile.total_time / whole_time:.3f})"
    )

    errors, bottleneck_errors, summary = [], [], []
    header = (
        f"{'K':>2}  {'split':<7} {'stage sizes':<30} {'pred ms':>8} "
        f"{'(xfer)':>7} {'meas ms':>8}  {'meas / ours':>11}"
    )
    print()
    print(f"bottleneck stage, fwd+bwd ms per batch of {args.batch} samples")
    print(header)
    print("-" * len(header))
    for k in [int(v) for v in args.stages.split(",")]:
        ours = smd.partition(profile, k)
        splits = {
            "ours": ours.stage_sizes,
            "layers": equal_layer_sizes(n, k),
            "params": equal_param_sizes(profile, k),
        }
        timers = []
        for sizes in splits.values():
            bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
            for s in range(k):
                timers.append(stage_step(graph, values, bounds[s], bounds[s + 1]))
        overhead, *times = median_times(
            [lambda: empty(tiny), *timers], args.repeats, clock
        )
        measured = {}
        for i, (name, sizes) in enumerate(splits.items()):
            measured[name] = [t - overhead for t in times[i * k : (i + 1) * k]]
            part = smd.partition(profile, k, stage_sizes=sizes)
            for e, m in zip(part.estimates, measured[name]):
                errors.append((e.compute_time - m) / m)
            slowest = int(np.argmax(measured[name]))
            bottleneck_errors.append(
                (part.estimates[slowest].compute_time - measured[name][slowest])
                / measured[name][slowest]
            )
            ratio = max(measured[name]) / max(measured["ours"])
            print(
                f"{k:>2}  {name:<7} {str(sizes):<30} {part.bottleneck * 1e3:8.2f} "
                f"{part.estimates[slowest].transfer_time * 1e3:7.3f} "
                f"{max(measured[name]) * 1e3:8.2f}  {ratio:11.2f}"
            )
            if args.verbose:
                for label, values_ms in (
                    ("predicted", [e.compute_time for e in part.estimates]),
                    ("measured", measured[name]),
                ):
                    cells = " ".join(f"{v * 1e3:6.1f}" for v in values_ms)
                    print(f"      {label:<9} {cells}")
        summary.append(
            (
                k,
                max(measured["layers"]) / max(measured["ours"]),
                max(measured["params"]) / max(measured["ours"]),
            )
        )
    print()
    for k, layers, params in summary:
        print(
            f"RATIO K={k}: bottleneck equal-layers / ours = {layers:.2f}x, "
            f"equal-params / ours = {params:.2f}x (measured)"
        )
    for label, values_ in (
        ("all stages", errors),
        ("measured-slowest stage of each split", bottleneck_errors),
    ):
        abs_errors = sorted(abs(e) for e in values_)
        print(
            f"stage compute prediction error, {label}: {len(abs_errors)} stages, "
            f"median {100 * statistics.median(abs_errors):.1f}%, 90th pct "
            f"{100 * abs_errors[int(0.9 * (len(abs_errors) - 1))]:.1f}%, max "
            f"{100 * abs_errors[-1]:.1f}%"
        )


if __name__ == "__main__":
    main()
