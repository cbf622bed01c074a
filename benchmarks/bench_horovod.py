"""Horovod-compatible API on 2 processes: all-reduce latency, Keras fit throughput.

1. All-reduce, 4 B to 64 MB of float32 between 2 processes (one core each):
   `tf_smdist.horovod.allreduce` (the op, the negotiation engine and MPI),
   `iters` dependent all-reduces in a `tf.while_loop` inside one
   `tf.function`, against two peers on the same ranks:
   - "MPI op": the same loop with the data-parallel strategy's all-reduce op
     (`tf_smdist._mpi_ops.host_allreduce`: the same TensorFlow op dispatch,
     the same communication thread and non-blocking MPI all-reduce, but no
     negotiation), so the ratio ours / MPI op is what name matching costs;
   - "MPI_Allreduce": a blocking `MPI_Allreduce` loop in C on the
     communication thread (`tf_smdist._mpi_ops.time_native_allreduce`,
     MPI's own speed, no TensorFlow at all). Below about 64 KB this is a
     floor no TensorFlow op can reach: running one op through the executor
     costs several microseconds, more than a small shared-memory all-reduce.
   Like the C loop, each TensorFlow iteration all-reduces the previous
   result and does nothing else (the sums double the values every
   iteration, in the C loop too); the function returns one element of the
   result, so no size-proportional copy to NumPy is timed. A fourth
   column, "TF loop alone", runs
   the same loop with `tf.identity` in place of the all-reduce: what the
   `tf.while_loop` itself costs per iteration.
   They are measured in alternation, `--rounds` times; medians are
   printed with the ratios. A sanity row measures our 64 KB all-reduce twice
   in alternation as A and B: its ratio shows the noise (no gain is
   possible).
2. Keras `model.fit` of the same MLP (~0.4 M parameters, batch 128 per
   process, SGD) on the same 2 processes: `hvd.keras.DistributedOptimizer`
   (each rank fits on its own shard) against `smd.DataParallelStrategy`
   (the strategy shards the global batch), alternating launches
   `--fit-rounds` times. Samples/s are the median of timed windows after
   warm-up. The sanity row compares the two launches of the Horovod
   configuration with each other.

The machine's load average is printed before and after: numbers taken on a
loaded machine are not comparable with an idle one.

Usage:
    python benchmarks/bench_horovod.py [--rounds 5] [--fit-rounds 2]
        [--skip-fit] [--skip-allreduce] [--sizes 4,65536,67108864]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common

SIZES = [4, 64, 1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20,
         16 << 20, 64 << 20]
SANITY_BYTES = 64 << 10


# -- worker side (one rank) ----------------------------------------------------


def _iters(nbytes: int) -> int:
    return max(5, min(1000, (256 << 20) // max(nbytes, 4096)))


def _allreduce_worker(args: argparse.Namespace) -> None:
    import tensorflow as tf

    import tf_smdist.horovod as hvd
    from tf_smdist import _mpi_ops

    hvd.init()
    loops = {}

    reducers = {
        "ours": lambda t: hvd.allreduce(t, op=hvd.Sum, name="bench"),
        "op": lambda t: _mpi_ops.host_allreduce(t, group=5),
        "tf": tf.identity,
    }

    def make_loop(kind: str, iters: int):
        reduce = reducers[kind]

        @tf.function
        def loop(v):
            def body(i, t):
                # Each all-reduce waits for the previous one: latency, not
                # fusion. Nothing else runs, as in the C loop.
                return i + 1, reduce(t)

            # One element comes back: reading the whole result to the host
            # would add a size-proportional copy the C loop does not make.
            return tf.while_loop(lambda i, t: i < iters, body, (0, v))[1][:1]

        return loop

    def timed(kind: str, nbytes: int) -> float:
        iters = _iters(nbytes)
        key = (kind, nbytes, iters)
        if key not in loops:
            loops[key] = make_loop(kind, iters)
            loops[key](tf.ones([max(1, nbytes // 4)])).numpy()  # trace, warm up
        x = tf.ones([max(1, nbytes // 4)])
        hvd.barrier()
        start = time.perf_counter()
        loops[key](x).numpy()
        return (time.perf_counter() - start) / iters

    def ours(nbytes: int) -> float:
        return timed("ours", nbytes)

    def op(nbytes: int) -> float:
        return timed("op", nbytes)

    def tf_alone(nbytes: int) -> float:
        return timed("tf", nbytes)

    def native(nbytes: int) -> float:
        return _mpi_ops.time_native_allreduce(max(1, nbytes // 4), _iters(nbytes))

    results: dict[str, dict[str, list[float]]] = {}
    for nbytes in args.sizes:
        kinds = [("ours", ours), ("op", op), ("mpi", native), ("tf", tf_alone)]
        for _, fn in kinds:
            fn(nbytes)
        entry = results.setdefault(str(nbytes), {k: [] for k, _ in kinds})
        for r in range(args.rounds):
            for label, fn in (kinds if r % 2 == 0 else kinds[::-1]):
                entry[label].append(fn(nbytes))
    sanity = {"a": [], "b": []}
    for r in range(args.rounds):
        for label in ("a", "b") if r % 2 == 0 else ("b", "a"):
            sanity[label].append(ours(SANITY_BYTES))
    results["sanity"] = sanity
    _common.write_result(args.out, results, rank=hvd.rank())


def _fit_worker(args: argparse.Namespace) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    per_process = args.batch
    rng = np.random.default_rng(0)
    if args.mode == "hvd":
        import tf_smdist.horovod.keras as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        x = rng.standard_normal((per_process * 8, 784)).astype(np.float32)
        y = rng.integers(0, 10, per_process * 8).astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            per_process, drop_remainder=True).repeat()
        model, _ = _common.model("mlp")
        model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.01)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), Clock()]
    else:
        import tf_smdist as smd
        from tf_smdist.data_parallel import cluster

        strategy = smd.DataParallelStrategy()
        rank, size = cluster.rank(), cluster.size()
        global_batch = per_process * size
        x = rng.standard_normal((global_batch * 8, 784)).astype(np.float32)
        y = rng.integers(0, 10, global_batch * 8).astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            global_batch, drop_remainder=True).repeat()
        with strategy.scope():
            model, _ = _common.model("mlp")
            model.compile(optimizer=keras.optimizers.SGD(0.01),
                          loss=keras.losses.SparseCategoricalCrossentropy(
                              from_logits=True))
        callbacks = [Clock()]
    steps = args.warmup + args.windows * args.steps
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks)
    rates = []
    for w in range(args.windows):
        start = args.warmup - 1 + w * args.steps
        elapsed = times[start + args.steps] - times[start]
        rates.append(per_process * size * args.steps / elapsed)
    _common.write_result(args.out, {"rates": rates, "params": model.count_params()},
                         rank=rank)


# -- driver side -----------------------------------------------------------------


def _launch_2(worker_args: list[str], timeout: float) -> dict:
    return _common.launch(__file__, 2, worker_args, timeout=timeout)


def _human(nbytes: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _allreduce_table(args: argparse.Namespace) -> None:
    res = _launch_2(["--mode", "allreduce", "--rounds", str(args.rounds),
                   "--sizes", ",".join(map(str, args.sizes))], timeout=1800)
    print("| bytes | hvd.allreduce (ms) | MPI op, same dispatch (ms) | ratio | "
          "MPI_Allreduce in C (ms) | ratio | TF loop alone (ms) |")
    print("|---|---|---|---|---|---|---|")
    for nbytes in args.sizes:
        r = res[str(nbytes)]
        ours, op, mpi, tf_ = (statistics.median(r[k])
                              for k in ("ours", "op", "mpi", "tf"))
        print(f"| {_human(nbytes)} | {ours * 1e3:.4f} | {op * 1e3:.4f} | "
              f"{ours / op:.2f}x | {mpi * 1e3:.4f} | {ours / mpi:.2f}x | "
              f"{tf_ * 1e3:.4f} |")
    a, b = (statistics.median(res["sanity"][k]) for k in ("a", "b"))
    print(f"| sanity: {_human(SANITY_BYTES)} hvd.allreduce A vs B | {a * 1e3:.4f} | "
          f"{b * 1e3:.4f} | {a / b:.2f}x | | | |")


def _fit_table(args: argparse.Namespace) -> None:
    common = ["--steps", str(args.steps), "--windows", str(args.windows),
              "--warmup", str(args.warmup), "--batch", str(args.batch)]
    runs: dict[str, list[float]] = {"hvd": [], "smd": []}
    params = 0
    for r in range(args.fit_rounds):
        for mode in ("hvd", "smd") if r % 2 == 0 else ("smd", "hvd"):
            res = _launch_2(["--mode", mode, *common], timeout=1800)
            runs[mode].append(statistics.median(res["rates"]))
            params = res["params"]
            print(f"  round {r}: {mode}: {runs[mode][-1]:,.0f} samples/s", flush=True)
    hvd_rate = statistics.median(runs["hvd"])
    smd_rate = statistics.median(runs["smd"])
    print()
    print(f"| Keras fit, MLP {params:,} params, 2 processes x batch {args.batch} "
          "| samples/s |")
    print("|---|---|")
    print(f"| hvd.keras.DistributedOptimizer | {hvd_rate:,.0f} |")
    print(f"| smd.DataParallelStrategy | {smd_rate:,.0f} |")
    print(f"RATIO DistributedOptimizer / DataParallelStrategy = "
          f"{hvd_rate / smd_rate:.2f}x")
    if len(runs["hvd"]) >= 2:
        print(f"SANITY two launches of the DistributedOptimizer run: "
              f"{runs['hvd'][0] / runs['hvd'][1]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="allreduce", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=5,
                   help="alternating all-reduce measurements per size")
    p.add_argument("--fit-rounds", type=int, default=2,
                   help="alternating launches per fit configuration")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128, help="batch per process")
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--skip-allreduce", action="store_true")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   type=lambda v: [int(x) for x in v.split(",")],
                   help="all-reduce sizes in bytes, comma-separated")
    args = p.parse_args()
    if args.worker:
        if args.mode == "allreduce":
            _allreduce_worker(args)
        else:
            _fit_worker(args)
        return
    print(_common.load_text(), flush=True)
    if not args.skip_allreduce:
        _allreduce_table(args)
        print(flush=True)
    if not args.skip_fit:
        _fit_table(args)
    print(_common.load_text())


if __name__ == "__main__":
    main()
