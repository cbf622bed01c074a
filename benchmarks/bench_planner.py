"""The planner's predictions against our own runs on this machine.

Calibrates this machine (`smd.Cluster.calibrate`, 2 and 4 processes),
profiles two models on one core (`smd.profile_model`), predicts the step
time of each layout with `smd.plan`, then measures it:

  - data parallel on 1, 2 and 4 processes (`smd.DataParallelStrategy`, custom
    loop under `python -m tf_smdist.launch`, one core per process; 4 processes
    on a 2-core machine share the cores, which the 4-process calibration
    carries as `compute_scale = processes / cores`);
  - 2 processes as 2 pipeline stages and 4 processes as 2 stages x 2
    replicas (`smd.PipelineModel` under the launcher), when this tf_smdist
    has the process-per-stage pipeline; otherwise those rows say
    "not measured".

Models: "wide_mlp" (6.3 M parameters, batch 4 per process: little compute
per parameter, so the gradient all-reduce dominates) and "convnet" (30 k
parameters, ~0.15 GFLOP per sample: compute-bound).

Prints, per row, two predictions and the measured step time:
  - from the calibration alone (the profile taken once, the calibrated
    cluster), and
  - with `compute_scale` set from the plain model's step timed in the same
    run, in windows alternating with the data-parallel ones (this machine's
    load from other jobs changes the speed of a core by the minute; the
    pipeline rows reuse the scale of the data-parallel run with as many
    processes),
and each one's ratio to the measured time.

Usage:
    python benchmarks/bench_planner.py [--models wide_mlp,convnet]
        [--layouts DP1,DP2,DP4,PP2,DP2xPP2] [--windows 5] [--skip-pipeline]
        [--clusters DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

# Per-process batch and steps per timed window of each model.
BATCH = {"wide_mlp": 4, "convnet": 16}
STEPS = {"wide_mlp": 10, "convnet": 3}
MICROBATCHES = 4


def _model(name: str):
    import keras

    keras.utils.set_random_seed(0)
    if name == "wide_mlp":  # 1024*2048 + 2048*2048 + 2048*10 ~ 6.3 M parameters
        return keras.Sequential([
            keras.Input((1024,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(10),
        ]), (1024,)
    if name == "convnet":  # ~30 k parameters, ~0.15 GFLOP per sample
        return keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]), (32, 32, 3)
    raise ValueError(f"unknown model {name!r}")


def _data(shape, n):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n,) + shape).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return x, y


# -- worker side -------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    result = {"profile": _profile_worker, "dp": _dp_worker,
              "pipe": _pipe_worker}[args.mode](args, size)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


def _profile_worker(args: argparse.Namespace, size: int) -> dict:
    import tf_smdist as smd

    model, shape = _model(args.model)
    x, _ = _data(shape, BATCH[args.model])
    profile = smd.profile_model(model, x, optimizer="sgd", time_budget=20.0)
    return profile.to_dict()


def _dp_worker(args: argparse.Namespace, size: int) -> dict:
    import keras
    import tensorflow as tf

    import tf_smdist as smd

    strategy = smd.DataParallelStrategy()
    global_batch = BATCH[args.model] * size
    with strategy.scope():
        model, shape = _model(args.model)
        optimizer = keras.optimizers.SGD(0.01)
    x, y = _data(shape, global_batch * 4)
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

    # The same model alone (no strategy) on this process's share of a batch,
    # timed in windows alternating with the data-parallel ones: what compute
    # costs on this machine at this moment (its load changes by the minute).
    local_model, _ = _model(args.model)
    local_optimizer = keras.optimizers.SGD(0.01)
    xb = tf.constant(x[:BATCH[args.model]])
    yb = tf.constant(y[:BATCH[args.model]])

    @tf.function
    def local_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(yb, local_model(xb, training=True)))
        grads = tape.gradient(loss, local_model.trainable_variables)
        local_optimizer.apply_gradients(zip(grads, local_model.trainable_variables))
        return loss

    barrier = None
    if size > 1:
        from tf_smdist import _mpi_ops

        barrier = _mpi_ops.barrier
    steps = STEPS[args.model]
    for _ in range(args.warmup):
        out = step(next(it))
        local_step().numpy()
    dp, local = [], []
    for _ in range(args.windows):
        if barrier:
            barrier()
        start = time.perf_counter()
        for _ in range(steps):
            out = step(next(it))
        for t in strategy.experimental_local_results(out):
            t.numpy()
        dp.append((time.perf_counter() - start) / steps)
        if barrier:
            barrier()
        start = time.perf_counter()
        for _ in range(steps):
            loss = local_step()
        loss.numpy()
        local.append((time.perf_counter() - start) / steps)
    return {"step_s": statistics.median(dp), "local_s": statistics.median(local)}


def _pipe_worker(args: argparse.Namespace, size: int) -> dict:
    import keras

    import tf_smdist as smd

    global_batch = BATCH[args.model] * (size // 2) * MICROBATCHES
    model, shape = _model(args.model)
    sizes = [int(s) for s in args.partition.split(",")]
    pipe = smd.PipelineModel(model, num_stages=2, microbatches=MICROBATCHES,
                             schedule="1f1b", partition=sizes)
    pipe.compile(optimizer=keras.optimizers.SGD(0.01),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = args.warmup + args.windows * STEPS[args.model]
    x, y = _data(shape, global_batch * steps)
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self._start)

    pipe.fit(x, y, batch_size=global_batch, epochs=1, shuffle=False,
             callbacks=[Timer()], verbose=0)
    return {"step_s": statistics.median(times[args.warmup:]),
            "global_batch": global_batch}


# -- driver side ---------------------------------------------------------------------


def _launch(nproc: int, worker_args: list[str], timeout: float = 900) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "tf_smdist.launch", "--nproc", str(nproc),
               os.path.abspath(__file__), "--worker", "--out", out, *worker_args]
        if nproc == 1:
            cmd[5:5] = ["--cpus-per-proc", "1"]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep
                   + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 and os.path.exists(out):
            # The timings are written; only the job's end went wrong.
            print(f"  (exit status {proc.returncode} after writing results: "
                  f"{proc.stdout.strip().splitlines()[-1:]})", flush=True)
        elif proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def _clusters(directory: str | None):
    import tf_smdist as smd

    clusters = {}
    for n in (2, 4):
        path = os.path.join(directory, f"local-{n}.json") if directory else None
        if path and os.path.exists(path):
            clusters[n] = smd.Cluster.load(path)
        else:
            clusters[n] = smd.Cluster.calibrate(processes=n, path=path)
        print(f"calibrated {n} processes: {clusters[n]!r}", flush=True)
    clusters[1] = clusters[2].replace(nodes=1)
    return clusters


def _predict(profile, cluster, global_batch, d, k, m):
    import tf_smdist as smd

    return smd.plan(
        profile, cluster, global_batch=global_batch, data_parallel=d,
        pipeline_stages=k, microbatches=m, schedule="1f1b",
        aggregation="host_sharded", use_all_devices=False,
    ).rows[0]


def _run_scale(profile, cluster, batch: int, local_s: float) -> float:
    """The compute_scale that makes the model's one-process step `local_s`."""
    from tf_smdist.planner.model import single_device_step

    one = cluster.replace(compute_scale=1.0)
    compute = profile.total_time * batch / profile.batch_size
    rest = single_device_step(profile, one, batch) - compute
    return max(0.05, (local_s - rest) / compute)


def _driver(args: argparse.Namespace) -> None:
    from tf_smdist.pipeline.profile import Profile

    clusters = _clusters(args.clusters)
    common = ["--windows", str(args.windows), "--warmup", str(args.warmup)]
    rows = []
    for name in args.models.split(","):
        profile = Profile.from_dict(_launch(1, ["--mode", "profile", "--model", name]))
        print(profile, flush=True)
        b = BATCH[name]
        cases = [("DP", n, n, 1, 1) for n in (1, 2, 4)]
        if not args.skip_pipeline:
            cases += [("PP 2", 2, 1, 2, MICROBATCHES),
                      ("DP 2 x PP 2", 4, 2, 2, MICROBATCHES)]
        wanted = set(args.layouts.split(","))
        cases = [c for c in cases
                 if (c[0].replace(" ", "") + (str(c[1]) if c[0] == "DP" else ""))
                 in wanted]
        scales = {}
        for label, nproc, d, k, m in cases:
            global_batch = b * d * (m if k > 1 else 1)
            cluster = clusters[nproc]
            row = _predict(profile, cluster, global_batch, d, k, m)
            split = ",".join(map(str, row.stage_sizes))
            mode = "dp" if k == 1 else "pipe"
            try:
                result = _launch(nproc, ["--mode", mode, "--model", name,
                                         "--partition", split, *common])
            except Exception as error:  # noqa: BLE001 - reported as a row
                if k == 1:
                    raise
                reason = str(error).strip().splitlines()
                print(f"  {name} {label}: not measured "
                      f"({reason[-1] if reason else error})", flush=True)
                result = {"step_s": None}
            if "local_s" in result:
                scales[nproc] = _run_scale(profile, cluster, b, result["local_s"])
            scale = scales.get(nproc)
            in_run = None
            if scale is not None:
                in_run = _predict(profile, cluster.replace(compute_scale=scale),
                                  global_batch, d, k, m).step_time_s
            rows.append((name, label, nproc, global_batch, row.step_time_s, in_run,
                         scale, result["step_s"]))
            shown = ("not measured" if result["step_s"] is None
                     else f"{result['step_s'] * 1e3:.2f} ms")
            print(f"  {name:9s} {label:12s} {nproc} proc: predicted "
                  f"{row.step_time_s * 1e3:.2f} ms (compute as measured in the "
                  f"run: {in_run * 1e3 if in_run else float('nan'):.2f} ms), "
                  f"measured {shown}; load average {os.getloadavg()[0]:.1f}",
                  flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")
    print()
    print("| model | layout | processes | global batch | predicted ms "
          "(calibration) | predicted ms (compute measured in the run, scale) | "
          "measured ms | ratio (calibration) | ratio (compute in run) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, nproc, gb, predicted, in_run, scale, measured in rows:
        run = f"{in_run * 1e3:.2f} ({scale:.2f})" if in_run else "-"
        if measured is None:
            print(f"| {name} | {label} | {nproc} | {gb} | {predicted * 1e3:.2f} | "
                  f"{run} | not measured | - | - |")
            continue
        second = f"{in_run / measured:.2f}" if in_run else "-"
        print(f"| {name} | {label} | {nproc} | {gb} | {predicted * 1e3:.2f} | "
              f"{run} | {measured * 1e3:.2f} | {predicted / measured:.2f} | "
              f"{second} |")
    for column, title in ((4, "calibration"), (5, "compute measured in the run")):
        ratios = [r[column] / r[7] for r in rows if r[7] and r[column]]
        if ratios:
            inside = sum(0.8 <= x <= 1.2 for x in ratios)
            print(f"RATIO predicted/measured ({title}): {inside} of {len(ratios)} "
                  f"rows within 20% (median {statistics.median(ratios):.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="dp", help=argparse.SUPPRESS)
    p.add_argument("--model", default="wide_mlp", help=argparse.SUPPRESS)
    p.add_argument("--partition", default="", help=argparse.SUPPRESS)
    p.add_argument("--models", default="wide_mlp,convnet")
    p.add_argument("--windows", type=int, default=5, help="timed windows per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--layouts", default="DP1,DP2,DP4,PP2,DP2xPP2",
                   help="which rows to run")
    p.add_argument("--clusters", default=None,
                   help="directory to keep/reuse the calibrated clusters' JSON")
    args = p.parse_args()
    if args.worker:
        _worker(args)
    else:
        _driver(args)


if __name__ == "__main__":
    main()
