"""The planner's predictions against our own runs on this machine.

Calibrates this machine (`smd.Cluster.calibrate`, 2 and 4 processes),
profiles two models on one core (`smd.profile_model`, with TensorFlow's
MatMul gradient and with the pipeline's rule, `matmul_rule=True`, which
`smd.plan` gets as `pipeline_profile` for the pipelined layouts), predicts
the step time of each layout with `smd.plan`, then measures it:

  - data parallel on 1, 2 and 4 processes (`smd.DataParallelStrategy`, custom
    loop under `python -m tf_smdist.launch`, one core per process; 4 processes
    on a 2-core machine share the cores, which the 4-process calibration
    carries as `compute_slots = cores`);
  - 2 processes as 2 pipeline stages and 4 processes as 2 stages x 2
    replicas (`smd.PipelineModel`, 1F1B, M = 4, a custom loop over its
    `train_step`, on the planner's split); each rank also reports its time
    in compute ops during one traced step.

Models: "wide_mlp" (6.3 M parameters, batch 4 per process: little compute
per parameter, so the gradient all-reduce dominates) and "convnet" (30 k
parameters, ~0.15 GFLOP per sample: compute-bound).

Prints, per row, two predictions and the measured step time:
  - from the calibration alone (the profile taken once, the calibrated
    cluster), and
  - with `compute_scale` set from the plain model's step timed in the same
    run, by every process, in windows alternating with the distributed ones
    (this machine's load from other jobs changes the speed of a core by the
    minute; for the pipelined rows, the step under the pipeline's MatMul
    gradient rule, against `pipeline_profile`),
and each one's ratio to the measured time. The profile run also times the
plain model at the micro-batch and at M times it (is compute linear in the
batch size?).

Usage:
    python benchmarks/bench_planner.py [--models wide_mlp,convnet]
        [--layouts DP1,DP2,DP4,PP2,DP2xPP2] [--windows 5] [--skip-pipeline]
        [--clusters DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _common

sys.path.insert(0, _common.package_parent())

# Per-process batch and steps per timed window of each model.
BATCH = {"wide_mlp": 4, "convnet": 16}
STEPS = {"wide_mlp": 10, "convnet": 3}
MICROBATCHES = 4


def _model(name: str):
    return _common.model(name)


def _data(shape, n):
    return _common.data(shape, n)


# -- worker side -------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    result = {"profile": _profile_worker, "dp": _dp_worker,
              "pipe": _pipe_worker}[args.mode](args, size)
    _common.write_result(args.out, result, rank=rank, every_rank=True)


def _local_step(name: str, batch: int, matmul_rule: bool = False):
    """The plain model (no strategy, no pipeline) training on `batch` samples.

    Timed in windows alternating with the distributed ones: what compute
    costs on this machine at this moment, in this job (this machine's load
    changes by the minute). With `matmul_rule`, its gradient is taken under
    the pipeline's MatMul gradient rule, as the pipeline's stages (and the
    `pipeline_profile`) compute it: a slower machine slows that
    compute-bound work and TensorFlow's weight transposes differently.
    """
    import contextlib

    import keras
    import tensorflow as tf

    from tf_smdist import _compat

    model, shape = _model(name)
    optimizer = keras.optimizers.SGD(0.01)
    x, y = _data(shape, batch)
    xb, yb = tf.constant(x), tf.constant(y)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        rule = (_compat.small_rows_matmul_gradients() if matmul_rule
                else contextlib.nullcontext())
        with rule:
            grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    step().numpy()
    return step


def _time(step, steps: int) -> float:
    """Seconds per call of `step` (which returns a tensor), over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    out.numpy()  # wait for the last step's work
    return (time.perf_counter() - start) / steps


def _profile_worker(args: argparse.Namespace, size: int) -> dict:
    import tf_smdist as smd

    model, shape = _model(args.model)
    b = BATCH[args.model]
    x, _ = _data(shape, b)
    profile = smd.profile_model(model, x, optimizer="sgd", time_budget=20.0)
    # As the pipeline trains (its MatMul gradient rule): prices the stages.
    pipeline = smd.profile_model(model, x, optimizer="sgd", time_budget=20.0,
                                 matmul_rule=True)
    # The plain model's step at the micro-batch and at the pipeline's batch:
    # is compute linear in the batch size (time = a + c * batch)?
    batches = sorted({b, b * MICROBATCHES})
    steps = {n: _local_step(args.model, n) for n in batches}
    times: dict[int, list[float]] = {n: [] for n in batches}
    for _ in range(args.windows):
        for n in batches:
            times[n].append(_time(steps[n], max(1, STEPS[args.model] * b // n)))
    return {"profile": profile.to_dict(), "pipeline_profile": pipeline.to_dict(),
            "local_by_batch": {str(n): statistics.median(t) for n, t in times.items()}}


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

    def dp_step():
        out = step(next(it))
        return strategy.experimental_local_results(out)[0]

    return _alternate(args, size, dp_step, _local_step(args.model, BATCH[args.model]))


def _alternate(args: argparse.Namespace, size: int, step, local) -> dict:
    """Median step seconds of `step` and `local`, timed in alternating windows."""
    barrier = None
    if size > 1:
        from tf_smdist import _mpi_ops

        barrier = _mpi_ops.barrier
    steps = STEPS[args.model]
    for _ in range(args.warmup):
        step().numpy()
        local().numpy()
    timed, alone = [], []
    for _ in range(args.windows):
        if barrier:
            barrier()
        timed.append(_time(step, steps))
        if barrier:
            barrier()
        alone.append(_time(local, steps))
    return {"step_s": statistics.median(timed), "local_s": statistics.median(alone),
            "cpu_count": len(os.sched_getaffinity(0))}


def _pipe_worker(args: argparse.Namespace, size: int) -> dict:
    import keras
    import tensorflow as tf

    import tf_smdist as smd
    from tf_smdist import _mpi_ops
    from tf_smdist.pipeline.plot import trace_timeline

    global_batch = BATCH[args.model] * (size // 2) * MICROBATCHES
    model, shape = _model(args.model)
    sizes = [int(s) for s in args.partition.split(",")]
    pipe = smd.PipelineModel(model, num_stages=2, microbatches=MICROBATCHES,
                             schedule="1f1b", partition=sizes)
    pipe.compile(optimizer=keras.optimizers.SGD(0.01),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(shape, global_batch)
    data = (tf.constant(x), tf.constant(y))
    train = tf.function(pipe.train_step)

    def pipe_step():
        return train(data)["loss"]

    # The plain model on this process's share of the work, as in the
    # data-parallel runs: BATCH samples of the whole model, under the
    # pipeline's MatMul gradient rule (what `pipeline_profile` timed).
    local = _local_step(args.model, BATCH[args.model], matmul_rule=True)
    result = _alternate(args, size, pipe_step, local)
    # Each rank's time in its own compute ops during one step (the profiler's
    # op durations, communication ops left out), and the step's span.
    busy, span = [], []
    for _ in range(3):
        _mpi_ops.barrier()
        timeline = trace_timeline(train, data, schedule=pipe.pipeline_schedule)
        busy.append(sum(d for _, n, _, d in timeline.ops if "Smdist" not in n))
        span.append(max(t + d for _, _, t, d in timeline.ops)
                    - min(t for _, _, t, _ in timeline.ops))
    _mpi_ops.barrier()
    result.update(global_batch=global_batch, busy_s=statistics.median(busy),
                  span_s=statistics.median(span))
    return result


# -- driver side ---------------------------------------------------------------------


def _launch(nproc: int, worker_args: list[str], timeout: float = 600) -> list[dict]:
    return _common.launch(__file__, nproc, worker_args, timeout=timeout,
                          every_rank=True)


def _clusters(directory: str | None):
    import tf_smdist as smd

    clusters = {}
    if directory:
        os.makedirs(directory, exist_ok=True)
    for n in (2, 4):
        path = os.path.join(directory, f"local-{n}.json") if directory else None
        if path and os.path.exists(path):
            clusters[n] = smd.Cluster.load(path)
        else:
            clusters[n] = smd.Cluster.calibrate(processes=n, path=path)
        print(f"calibrated {n} processes: {clusters[n]!r}", flush=True)
    clusters[1] = clusters[2].replace(nodes=1)
    return clusters


def _predict(profile, cluster, global_batch, d, k, m, pipeline_profile=None):
    import tf_smdist as smd

    return smd.plan(
        profile, cluster, global_batch=global_batch, data_parallel=d,
        pipeline_stages=k, microbatches=m, schedule="1f1b",
        aggregation="host_sharded", use_all_devices=False,
        pipeline_profile=pipeline_profile,
    ).rows[0]


def _run_scale(profile, cluster, batch: int, local_s: float, nproc: int) -> float:
    """The compute_scale that makes the model's one-process step `local_s`.

    `local_s` was timed with all `nproc` processes computing at once: with
    more processes than cores (`cluster.compute_slots`), each had
    `slots / nproc` of a core, and the scale is that of a whole core.
    """
    from tf_smdist.planner.model import single_device_step

    one = cluster.replace(compute_scale=1.0)
    compute = profile.total_time * batch / profile.batch_size
    rest = single_device_step(profile, one, batch) - compute
    share = min(1.0, (cluster.compute_slots or nproc) / nproc)
    return max(0.05, (local_s * share - rest) / compute)


def _stage_compute(profile, cluster, row, batch: int) -> list[float]:
    """Predicted compute seconds of each stage over one step (`M` micro-batches)."""
    bounds, sizes = [0], row.stage_sizes
    for n in sizes:
        bounds.append(bounds[-1] + n)
    per = cluster.compute_scale * batch / profile.batch_size
    return [sum(x.time for x in profile.layers[bounds[s]:bounds[s + 1]]) * per
            for s in range(len(sizes))]


def _driver(args: argparse.Namespace) -> None:
    from tf_smdist.pipeline.profile import Profile

    print(f"start: {_common.load_text()}", flush=True)
    clusters = _clusters(args.clusters)
    common = ["--windows", str(args.windows), "--warmup", str(args.warmup)]
    rows = []
    for name in args.models.split(","):
        measured = _launch(1, ["--mode", "profile", "--model", name, *common])[0]
        profile = Profile.from_dict(measured["profile"])
        pipe_profile = Profile.from_dict(measured["pipeline_profile"])
        print(profile, flush=True)
        print(f"  with the pipeline's MatMul gradient rule: layers sum to "
              f"{pipe_profile.total_time * 1e3:.2f} ms (TensorFlow's rule: "
              f"{profile.total_time * 1e3:.2f} ms); per layer "
              + ", ".join(f"{x.time * 1e3:.2f}" for x in pipe_profile.layers),
              flush=True)
        b = BATCH[name]
        by_batch = {int(n): t for n, t in measured["local_by_batch"].items()}
        if len(by_batch) == 2:
            (n0, t0), (n1, t1) = sorted(by_batch.items())
            slope = (t1 - t0) / (n1 - n0)
            print(f"  plain step on one core: {t0 * 1e3:.2f} ms at batch {n0}, "
                  f"{t1 * 1e3:.2f} ms at batch {n1}: {t1 / t0:.2f}x for "
                  f"{n1 / n0:.0f}x the samples; fixed part a = "
                  f"{(t0 - slope * n0) * 1e3:.2f} ms, per sample "
                  f"{slope * 1e3:.3f} ms; the profile's sum of layers at batch "
                  f"{profile.batch_size}: {profile.total_time * 1e3:.2f} ms "
                  f"(+ call overhead {profile.call_overhead * 1e3:.2f} ms)", flush=True)
        cases = [("DP", n, n, 1, 1) for n in (1, 2, 4)]
        if not args.skip_pipeline:
            cases += [("PP 2", 2, 1, 2, MICROBATCHES),
                      ("DP 2 x PP 2", 4, 2, 2, MICROBATCHES)]
        wanted = set(args.layouts.split(","))
        cases = [c for c in cases
                 if (c[0].replace(" ", "") + (str(c[1]) if c[0] == "DP" else ""))
                 in wanted]
        for label, nproc, d, k, m in cases:
            global_batch = b * d * (m if k > 1 else 1)
            cluster = clusters[nproc]
            row = _predict(profile, cluster, global_batch, d, k, m, pipe_profile)
            split = ",".join(map(str, row.stage_sizes))
            mode = "dp" if k == 1 else "pipe"
            before = os.getloadavg()[0]
            try:
                ranks = _launch(nproc, ["--mode", mode, "--model", name,
                                        "--partition", split, *common])
            except Exception as error:  # noqa: BLE001 - reported as a row
                if k == 1:
                    raise
                reason = str(error).strip().splitlines()
                print(f"  {name} {label}: not measured "
                      f"({reason[-1] if reason else error})", flush=True)
                rows.append((name, label, nproc, global_batch, row.step_time_s,
                             None, None, None))
                continue
            step_s = ranks[0]["step_s"]
            # Each process's own compute speed in this run, averaged.
            local_s = statistics.mean(r["local_s"] for r in ranks)
            # Pipelined rows are priced by the pipeline profile, and their
            # plain step was timed under the same rule.
            scale = _run_scale(profile if k == 1 else pipe_profile, cluster, b,
                               local_s, nproc)
            in_cluster = cluster.replace(compute_scale=scale)
            in_run = _predict(profile, in_cluster, global_batch, d, k, m,
                              pipe_profile)
            rows.append((name, label, nproc, global_batch, row.step_time_s,
                         in_run.step_time_s, scale, step_s))
            print(f"  {name:9s} {label:12s} {nproc} proc: predicted "
                  f"{row.step_time_s * 1e3:.2f} ms (compute as measured in the "
                  f"run: {in_run.step_time_s * 1e3:.2f} ms = compute "
                  f"{in_run.compute_s * 1e3:.2f} + aggregation "
                  f"{in_run.aggregation_s * 1e3:.2f} + rest), measured "
                  f"{step_s * 1e3:.2f} ms; plain step per process"
                  f"{' (MatMul gradient rule)' if k > 1 else ''} "
                  f"{[round(r['local_s'] * 1e3, 2) for r in ranks]} ms; load "
                  f"average {before:.1f} before, {os.getloadavg()[0]:.1f} after",
                  flush=True)
            if k > 1:
                stage = _stage_compute(pipe_profile, in_cluster, in_run,
                                       global_batch // d)
                print(f"    per rank: busy in compute ops "
                      f"{[round(r['busy_s'] * 1e3, 2) for r in ranks]} ms, traced "
                      f"step span {[round(r['span_s'] * 1e3, 2) for r in ranks]} "
                      f"ms; predicted compute per stage "
                      f"{[round(t * 1e3, 2) for t in stage]} ms; split {split}",
                      flush=True)
    print(f"\nend: {_common.load_text()}")
    print()
    print("| model | layout | processes | global batch | predicted ms "
          "(calibration) | predicted ms (compute measured in the run, scale) | "
          "measured ms | ratio (calibration) | ratio (compute in run) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, nproc, gb, predicted, in_run, scale, measured in rows:
        if measured is None:
            print(f"| {name} | {label} | {nproc} | {gb} | {predicted * 1e3:.2f} | "
                  f"- | not measured | - | - |")
            continue
        print(f"| {name} | {label} | {nproc} | {gb} | {predicted * 1e3:.2f} | "
              f"{in_run * 1e3:.2f} ({scale:.2f}) | {measured * 1e3:.2f} | "
              f"{predicted / measured:.2f} | {in_run / measured:.2f} |")
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
