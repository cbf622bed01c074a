"""Multi-process data parallelism: DataParallelStrategy vs MultiWorkerMirroredStrategy.

Runs 1 and 2 processes, each pinned to one core (`--cpus-per-proc 1`), and
measures training throughput (samples/s, custom loop with `strategy.run`; the
Keras `fit` of MultiWorkerMirroredStrategy is broken on Keras 3,
keras-team/keras#20585) of
  (a) a small MLP (~0.4 M parameters, batch 128 per process), where the
      all-reduce dominates, and
  (b) a compute-bound convnet (few parameters, many FLOPs per sample),
for `smd.DataParallelStrategy` (host-reduced buckets all-reduced over MPI)
and `tf.distribute.MultiWorkerMirroredStrategy` (TensorFlow's gRPC
collectives, its CPU path). It prints each one's scaling efficiency
throughput(2) / (2 x throughput(1)) and the ratio ours / theirs.

It also times the all-reduce alone between 2 processes for 16 KB - 64 MB:
`SmdistHostAllreduce` (the op, the communication thread and MPI) against a
blocking `MPI_Allreduce` on the same communicator (MPI's own speed), and
prints the overhead of our path.

Every throughput figure is the median over `--windows` timed windows of
`--steps` steps after warm-up; each configuration runs `--repeats` times
(interleaved) and the median run is reported.

Usage:
    python benchmarks/bench_dp_multiprocess.py [--steps 30] [--windows 5]
        [--repeats 1] [--models mlp,convnet] [--skip-allreduce]
    python benchmarks/bench_dp_multiprocess.py --models ""  # the all-reduce alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import _common

ALLREDUCE_BYTES = [16 << 10, 256 << 10, 1600 << 10, 16 << 20, 64 << 20]


# -- worker side (one rank) ----------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    if args.strategy == "mwms" and size > 1:
        ports = args.ports.split(",")
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"localhost:{p}" for p in ports]},
            "task": {"type": "worker", "index": rank}})
    import numpy as np
    import tensorflow as tf

    import tf_smdist as smd

    if args.strategy == "allreduce":
        _allreduce_worker(args, rank)
        return
    if args.strategy == "smd":
        strategy = smd.DataParallelStrategy()
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    per_process = args.batch
    global_batch = per_process * size
    with strategy.scope():
        model, shape = _common.model(args.model)
        optimizer = keras.optimizers.SGD(0.01)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((global_batch * 4,) + shape).astype(np.float32)
    y = rng.integers(0, 10, global_batch * 4).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        global_batch, drop_remainder=True).repeat()
    it = iter(strategy.experimental_distribute_dataset(ds))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none")

    @tf.function
    def step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(
                    loss_fn(yb, model(xb, training=True)),
                    global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.run(replica_step, args=batch)

    # The convnet's steps are ~20x longer: fewer of them per window.
    steps = args.steps if args.model == "mlp" else max(2, args.steps // 10)
    for _ in range(args.warmup):
        step(next(it))
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(steps):
            out = step(next(it))
        for t in strategy.experimental_local_results(out):
            t.numpy()
        rates.append(global_batch * steps / (time.perf_counter() - start))
    _common.write_result(args.out, {"rates": rates, "params": model.count_params()},
                         rank=rank)


def _allreduce_worker(args: argparse.Namespace, rank: int) -> None:
    import tensorflow as tf

    from tf_smdist import _mpi_ops
    from tf_smdist.data_parallel import cluster

    cluster.initialize()
    results = {}
    for nbytes in ALLREDUCE_BYTES:
        n = nbytes // 4
        iters = max(5, min(2000, (200 << 20) // nbytes))
        x = tf.ones([n])

        @tf.function
        def chain(v, iters=iters):
            # Stateful ops run in program order: `iters` all-reduces back to back.
            # Each output is the next input (forwarded in place, no copy);
            # the values overflow, which does not change the cost.
            for _ in range(iters):
                v = _mpi_ops.host_allreduce(v)
            # One element: copying the whole result to NumPy would add a
            # size-proportional cost that the C loop does not pay.
            return v[:1]

        chain(x)  # trace and warm up
        ours, native = [], []
        for _ in range(args.windows):
            _mpi_ops.barrier()
            start = time.perf_counter()
            chain(x).numpy()
            ours.append((time.perf_counter() - start) / iters)
            native.append(_mpi_ops.time_native_allreduce(n, iters))
        results[nbytes] = {"ours": statistics.median(ours),
                           "native": statistics.median(native)}
    _common.write_result(args.out, results, rank=rank)


# -- driver side -----------------------------------------------------------------


def _launch(nproc: int, worker_args: list[str], timeout: float) -> dict:
    """Rank 0's result of this script's worker on `nproc` processes, one core each."""
    return _common.launch(__file__, nproc, worker_args, timeout=timeout)


def _driver(args: argparse.Namespace) -> None:
    models = [m for m in args.models.split(",") if m]  # "" : the all-reduce alone
    common = ["--steps", str(args.steps), "--windows", str(args.windows),
              "--warmup", str(args.warmup), "--batch", str(args.batch)]
    runs: dict[tuple, list[float]] = {}
    params = {}
    for _ in range(args.repeats):
        for model in models:
            for strategy in ("smd", "mwms"):
                for nproc in (1, 2):
                    def worker_args(ports, strategy=strategy, model=model):
                        return ["--strategy", strategy, "--model", model, *common,
                                "--ports", ",".join(map(str, ports))]

                    res = _common.launch_with_ports(__file__, nproc, worker_args,
                                                    timeout=1200)
                    runs.setdefault((model, strategy, nproc), []).append(
                        statistics.median(res["rates"]))
                    params[model] = res["params"]
                    print(f"  {model:8s} {strategy:5s} {nproc} proc: "
                          f"{runs[(model, strategy, nproc)][-1]:10.0f} samples/s",
                          flush=True)
    if models:
        _print_models(models, runs, params)
    if args.skip_allreduce:
        return
    res = _launch(2, ["--strategy", "allreduce", "--windows", str(args.windows)],
                  timeout=1200)
    print()
    print("| bytes | SmdistHostAllreduce (ms) | MPI_Allreduce (ms) | overhead |")
    print("|---|---|---|---|")
    for nbytes in ALLREDUCE_BYTES:
        r = res[str(nbytes)]
        print(f"| {nbytes:,} | {r['ours'] * 1e3:.4f} | {r['native'] * 1e3:.4f} | "
              f"{(r['ours'] / r['native'] - 1) * 100:+.0f}% |")


def _print_models(models: list[str], runs: dict, params: dict) -> None:
    print()
    print("| model | params | strategy | 1 process (samples/s) | 2 processes "
          "(samples/s) | scaling efficiency |")
    print("|---|---|---|---|---|---|")
    table = {}
    for model in models:
        for strategy, label in (("smd", "DataParallelStrategy"),
                                ("mwms", "MultiWorkerMirroredStrategy")):
            one = statistics.median(runs[(model, strategy, 1)])
            two = statistics.median(runs[(model, strategy, 2)])
            table[(model, strategy)] = (one, two)
            print(f"| {model} | {params[model]:,} | {label} | {one:,.0f} | {two:,.0f} "
                  f"| {two / (2 * one):.2f} |")
    print()
    for model in models:
        ours, theirs = table[(model, "smd")], table[(model, "mwms")]
        print(f"RATIO {model}: 2-process throughput DataParallelStrategy / "
              f"MultiWorkerMirroredStrategy = {ours[1] / theirs[1]:.2f}x; "
              f"efficiency {ours[1] / (2 * ours[0]):.2f} vs "
              f"{theirs[1] / (2 * theirs[0]):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="smd", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--ports", default="", help=argparse.SUPPRESS)
    p.add_argument("--models", default="mlp,convnet")
    p.add_argument("--steps", type=int, default=30,
                   help="MLP steps per timed window (convnet: a tenth)")
    p.add_argument("--windows", type=int, default=5, help="timed windows per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128, help="batch per process")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration")
    p.add_argument("--skip-allreduce", action="store_true")
    args = p.parse_args()
    if args.worker:
        _worker(args)
    else:
        _driver(args)


if __name__ == "__main__":
    main()
