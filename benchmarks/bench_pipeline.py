"""Pipeline throughput, bubble and memory against the plain model on one core.

Two pipeline stages on truly parallel hardware: one process, two logical CPU
devices, one intra-op thread and two inter-op threads, pinned to two cores
(each device's ops run one at a time, the two devices at once). The peer is
the plain model in its own process with the same cores and threads (2 cores,
one intra-op and two inter-op threads), so that a ratio measures pipelining,
not extra threads; M = 1, where a pipeline cannot win, is the sanity row.
A second peer, the plain model traced with the pipeline's MatMul gradient
rule (`_compat.small_rows_matmul_gradients`, which alone speeds up steps whose
rows are at most half a layer's width), separates that rule's gain from
pipelining's.
Both run the same balanced MLP's training step (forward, backward, SGD
update) in a `tf.function`.

Reported per configuration (GPipe and 1F1B, M = 1, 2, 4, 8):
- throughput ratio: plain step time / pipelined step time (medians of
  rounds); the issue's target is >= 1.6 at M = 8;
- measured bubble: from one profiled step, `1 - busy / (K * span)` where
  `busy` is the time each device spent in its tasks' ops, against the
  formula `(K - 1) / (M + K - 1)`;
- CPU time per step (all threads): pipelining's own overhead;
- the step's peak memory above the resident weights (the TensorFlow CPU
  allocator is shared by the logical devices of one process, so one number
  covers both stages) and the micro-batches in flight per stage that the
  schedule allows.

Configurations run round-robin in two long-lived worker processes (one per
thread setting), so a change in machine load hits every configuration alike.

With `--remote` the two stages run instead in two `tf.distribute.Server`
processes pinned to one core each (one thread each), driven over TensorFlow's
distributed runtime; the client's profiler cannot see the workers' ops, so
the bubble is then inferred from the step time (`1 - RATIO / K`, which also
counts transfers and gradient accumulation).

With `--processes` each stage runs in its own process (one process per
stage over MPI, started by the launcher), each pinned to one core with one
intra-op and one inter-op thread, against the plain model pinned to one core
with one thread; rank 0 runs the plain model between the pipeline's rounds,
on its own core, while the other ranks wait. Reported per configuration: the
throughput ratio (against the plain model as Keras runs it, and against it
traced with the pipeline's MatMul gradient rule,
`_compat.small_rows_matmul_gradients`, which alone speeds up steps whose
rows are at most half a layer's width), the measured bubble
`1 - sum(busy) / (K * step)` where `busy` is each rank's time in its
tasks' compute ops and `step` the span of the ranks' ops, both from the
same profiled steps (medians of 3), against
`(K - 1) / (M + K - 1)`, the share of the step each rank waits beyond the
formula's bubble (`1 - busy / step - formula`: waiting on
transfers, the shared end-of-step all-reduce and imbalance), the CPU time
per step of each rank (all its threads: computation and the communication
thread), the transfers' own share of the step (the busiest rank's messages
times one message's time, half a ping-pong round trip of a micro-batch's
activations between stages 0 and 1 through the same graph ops the steps
use), and the bytes of variables, gradients and optimizer state (Adam) each
process holds against the whole model's. Each schedule also runs with
`defer_weight_gradients=True` (rows `gpipe+defer`, `1f1b+defer`): each
stage's Dense weight gradients as two products per step around its last
backward task instead of one per micro-batch.

Every mode always runs M = 1, the sanity row where a pipeline cannot win.

Usage:
    python benchmarks/bench_pipeline.py [--width 1024] [--layers 8]
        [--batch 256] [--steps 5] [--rounds 7] [--remote | --processes]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time

# The ping-pong's tag on the world communicator (the pipelines use their own).
_PING_TAG = 7
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _serve(args: argparse.Namespace) -> None:
    """A long-lived worker: builds each configuration once, times on request.

    Commands arrive as JSON lines on stdin (`{"config": [mode, M]}` times
    one round of `--steps` steps; `{"details": [mode, M]}` measures memory
    and the bubble); answers are JSON lines on stdout.
    """
    cores = sorted(os.sched_getaffinity(0))
    plain = args.mode == "plain"
    remote = args.mode == "remote"
    # The plain model gets the pipeline's cores and threads, except against
    # the remote stages (one core, one thread each).
    os.sched_setaffinity(0, cores[:1] if plain and args.remote else cores[:2])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow keeps CPU memory statistics (the step's peak) only with its
    # BFC allocator; both workers use it.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    sys.path.insert(0, ROOT)
    servers = []
    if remote:
        servers, workers = _start_servers(cores[:2])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(
        1 if plain and args.remote else 2)
    import keras
    import numpy as np

    import tf_smdist as smd
    from tf_smdist import _compat
    from tf_smdist.pipeline.plot import trace_timeline

    devices = None
    if remote:
        tf.config.experimental_connect_to_cluster(
            tf.train.ClusterSpec({"worker": workers})
        )
        devices = [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in (0, 1)]
    else:
        smd.configure_cpu_devices(2)
    x = np.random.RandomState(0).randn(args.batch, args.width).astype("float32")
    y = np.random.RandomState(1).randn(args.batch, args.width).astype("float32")
    data = (tf.constant(x), tf.constant(y))

    def build(mode: str, m: int):
        keras.utils.set_random_seed(0)
        layers = [keras.Input((args.width,))]
        layers += [
            keras.layers.Dense(args.width, activation="tanh")
            for _ in range(args.layers)
        ]
        net = keras.Sequential(layers)
        if not mode.startswith("plain"):
            half = args.layers // 2
            net = smd.PipelineModel(
                net, num_stages=2, microbatches=m, schedule=mode,
                partition=[half, args.layers - half], devices=devices,
            )
        net.compile(
            optimizer=keras.optimizers.SGD(1e-4), loss="mse", jit_compile=False
        )
        step = tf.function(net.train_step)
        # "plain-rule": traced with the pipeline's MatMul gradient rule.
        with (_compat.small_rows_matmul_gradients() if mode == "plain-rule"
              else contextlib.nullcontext()):
            for _ in range(3):
                float(step(data)["loss"])
        return net, step

    try:
        _loop(args, build, data, trace_timeline, tf)
    finally:
        _stop_servers(servers)


_SERVER = (
    "import json, os, sys; os.sched_setaffinity(0, [int(sys.argv[3])]); "
    "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'; import tensorflow as tf; "
    "tf.distribute.Server(tf.train.ClusterSpec({'worker': json.loads(sys.argv[1])}),"
    " job_name='worker', task_index=int(sys.argv[2]), config=tf.compat.v1."
    "ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1),"
    " start=True).join()"
)


def _unused_port() -> int:
    # Free now; a server started later may still lose it to another process,
    # which `_start_servers` detects (the server exits) and retries.
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("localhost", port), timeout=1.0):
            return True
    except OSError:
        return False


def _stop_servers(servers: list) -> None:
    for server in servers:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    for server in servers:
        server.wait(timeout=30)


def _start_servers(
    cores: list[int], *, attempts: int = 3, timeout: float = 120.0
) -> tuple[list, list[str]]:
    """Two TensorFlow servers on localhost, one core each, both listening.

    Waits until every server accepts connections; if one exits first (it
    lost its port to another process between the choice and the bind), all
    start again on new ports, up to `attempts` times.
    """
    for _ in range(attempts):
        workers = [f"localhost:{_unused_port()}" for _ in cores]
        servers = [
            subprocess.Popen(
                [sys.executable, "-c", _SERVER, json.dumps(workers), str(i), str(c)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for i, c in enumerate(cores)
        ]
        deadline = time.monotonic() + timeout
        ready: set[int] = set()
        while len(ready) < len(workers) and time.monotonic() < deadline:
            if any(server.poll() is not None for server in servers):
                break
            ready |= {i for i, w in enumerate(workers)
                      if _accepts(int(w.rsplit(":", 1)[1]))}
            time.sleep(0.2)
        if len(ready) == len(workers):
            return servers, workers
        _stop_servers(servers)
    raise RuntimeError(
        f"TensorFlow servers did not start listening in {attempts} attempts")


def _loop(args, build, data, trace_timeline, tf) -> None:  # noqa: ANN001
    plain = args.mode == "plain"
    built: dict = {}
    for line in sys.stdin:
        command = json.loads(line)
        key = tuple(command.get("config") or command["details"])
        if key not in built:
            built[key] = build(*key)
        net, step = built[key]
        if "config" in command:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                out = step(data)
            float(out["loss"])
            answer = {
                "step_s": (time.perf_counter() - wall) / args.steps,
                "cpu_s": (time.process_time() - cpu) / args.steps,
            }
        elif args.mode == "remote":
            answer = {}  # the client's profiler cannot see the workers' ops
        else:
            devices = ["CPU:0"] if plain else ["CPU:0", "CPU:1"]
            for d in devices:
                tf.config.experimental.reset_memory_stats(d)
            before = [
                tf.config.experimental.get_memory_info(d)["current"]
                for d in devices
            ]
            float(step(data)["loss"])
            # The step's own peak: activations, gradients, temporaries (the
            # worker keeps every configuration's weights, so subtract them).
            answer = {
                "peak_mb": [
                    (tf.config.experimental.get_memory_info(d)["peak"] - b)
                    / 2**20
                    for d, b in zip(devices, before)
                ]
            }
            if not plain:
                timelines = [
                    trace_timeline(step, data, schedule=net.pipeline_schedule)
                    for _ in range(3)
                ]
                answer["bubble"] = statistics.median(
                    t.bubble_fraction for t in timelines
                )
                answer["busy_s"] = statistics.median(
                    max(t.busy) for t in timelines
                )
                answer["in_flight"] = [
                    net.pipeline_schedule.in_flight(s) for s in range(2)
                ]
        print(json.dumps(answer), flush=True)


class _Worker:
    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable, os.path.abspath(__file__), "--serve",
            "--mode", mode, "--width", str(args.width),
            "--layers", str(args.layers), "--batch", str(args.batch),
            "--steps", str(args.steps),
        ] + (["--remote"] if args.remote else [])
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )

    def ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died on {command}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--microbatch-list", default="1,2,4,8")
    parser.add_argument(
        "--processes", action="store_true",
        help="one process per stage over MPI (started by the launcher), each "
        "pinned to one core with one thread, against the plain model on one "
        "core with one thread",
    )
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--proc-worker", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument(
        "--remote", action="store_true",
        help="run the stages in 2 TensorFlow server processes pinned to one "
        "core each (the distributed runtime), instead of 2 logical devices",
    )
    args = parser.parse_args()
    if args.serve:
        _serve(args)
        return
    if args.proc_worker:
        _process_worker(args)
        return
    if args.processes:
        _launch_processes(args)
        return
    ms = _microbatches(args)
    configs = [("plain", 1), ("plain-rule", 1)] + [
        (mode, m) for m in ms for mode in ("gpipe", "1f1b")]
    workers = {
        "plain": _Worker("plain", args),
        "pipe": _Worker("remote" if args.remote else "pipe", args),
    }
    try:
        times: dict = {c: [] for c in configs}
        cpu: dict = {c: [] for c in configs}
        for _ in range(args.rounds):  # round-robin: load changes hit all alike
            for c in configs:
                w = workers["plain" if c[0].startswith("plain") else "pipe"]
                answer = w.ask({"config": list(c)})
                times[c].append(answer["step_s"])
                cpu[c].append(answer["cpu_s"])
        details = {
            c: workers["plain" if c[0].startswith("plain") else "pipe"].ask(
                {"details": list(c)}
            )
            for c in configs
        }
    finally:
        for w in workers.values():
            w.close()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    med = {c: statistics.median(v) for c, v in times.items()}
    base = med[("plain", 1)]
    where = (
        "2 TensorFlow server processes pinned to one core each, 1 thread each"
        if args.remote
        else "2 logical CPU devices, intra-op 1, inter-op 2, 2 cores"
    )
    peer = ("1 core, 1 thread" if args.remote
            else "the same 2 cores, intra-op 1, inter-op 2")
    print(
        f"MLP {args.layers} x Dense({args.width}), batch {args.batch}: 2 stages "
        f"({where}) vs the plain "
        f"model ({peer}); medians of {args.rounds} round-robin rounds "
        f"of {args.steps} steps; load average {load}"
    )
    print(
        f"plain ({peer}): {base * 1e3:.1f} ms/step, CPU "
        f"{statistics.median(cpu[('plain', 1)]) * 1e3:.1f} ms/step, step peak "
        f"{details[('plain', 1)]['peak_mb'][0]:.0f} MB"
    )
    if args.remote:
        # With balanced stages and no overhead, step = (M + K - 1) / M x
        # plain / K, so 1 - RATIO / K is the bubble the step time implies
        # (transfers and accumulation included).
        print(
            "| schedule | M | ms/step | RATIO vs plain 1 core "
            "| implied bubble 1 - RATIO/K | (K-1)/(M+K-1) |"
        )
        print("|---|---|---|---|---|---|")
        for c in configs[2:]:
            ratio = base / med[c]
            print(
                f"| {c[0]} | {c[1]} | {med[c] * 1e3:.1f} | {ratio:.2f}x | "
                f"{1 - ratio / 2:.3f} | {1 / (c[1] + 1):.3f} |"
            )
        return
    ruled = med[("plain-rule", 1)]
    print(f"plain with the pipeline's MatMul gradient rule: {ruled * 1e3:.1f} "
          "ms/step")
    print(
        "| schedule | M | ms/step | RATIO vs plain | RATIO vs plain with the rule "
        "| CPU ms/step | busiest device ms | measured bubble | (K-1)/(M+K-1) "
        "| step peak MB (both devices) | in flight s0/s1 |"
    )
    print("|" + "---|" * 11)
    for c in configs[2:]:
        d = details[c]
        print(
            f"| {c[0]} | {c[1]} | {med[c] * 1e3:.1f} | {base / med[c]:.2f}x | "
            f"{ruled / med[c]:.2f}x | "
            f"{statistics.median(cpu[c]) * 1e3:.1f} | {d['busy_s'] * 1e3:.1f} | "
            f"{d['bubble']:.3f} | {1 / (c[1] + 1):.3f} | {d['peak_mb'][0]:.0f} | "
            f"{d['in_flight'][0]}/{d['in_flight'][1]} |"
        )


def _microbatches(args: argparse.Namespace) -> list[int]:
    """The micro-batch counts to run; M = 1 (the sanity row) always."""
    return sorted({1, *(int(v) for v in args.microbatch_list.split(","))})


def _launch_processes(args: argparse.Namespace) -> None:
    """Starts `--stages` stage processes through the launcher."""
    cmd = [
        sys.executable, "-m", "tf_smdist.launch", "--nproc", str(args.stages),
        os.path.abspath(__file__), "--proc-worker", "--width", str(args.width),
        "--layers", str(args.layers), "--batch", str(args.batch),
        "--steps", str(args.steps), "--rounds", str(args.rounds),
        "--microbatch-list", args.microbatch_list,
        "--stages", str(args.stages),
    ]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    sys.exit(subprocess.call(cmd, env=env))


def _process_worker(args: argparse.Namespace) -> None:  # noqa: C901
    """One stage process: times the pipelines, and (rank 0) the plain model."""
    from tf_smdist.data_parallel import cluster

    rank, world = cluster.env_rank_and_size()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, [cores[rank % len(cores)]])
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import tf_smdist as smd
    from tf_smdist import _compat, _mpi_ops
    from tf_smdist.pipeline.plot import trace_timeline

    cluster.initialize()
    k = args.stages
    x = np.random.RandomState(0).randn(args.batch, args.width).astype("float32")
    y = np.random.RandomState(1).randn(args.batch, args.width).astype("float32")
    data = (tf.constant(x), tf.constant(y))

    def net() -> keras.Model:
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((args.width,))]
            + [keras.layers.Dense(args.width, activation="tanh")
               for _ in range(args.layers)])

    def compiled(model: keras.Model) -> tuple:
        model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse",
                      jit_compile=False)
        step = tf.function(model.train_step)
        for _ in range(3):
            float(step(data)["loss"])
        return model, step

    ms = _microbatches(args)
    # "+defer": defer_weight_gradients=True.
    configs = [(mode, m) for m in ms
               for mode in ("gpipe", "1f1b", "gpipe+defer", "1f1b+defer")]
    size = args.layers // k
    sizes = [size] * (k - 1) + [args.layers - size * (k - 1)]
    built = {
        c: compiled(smd.PipelineModel(
            net(), num_stages=k, microbatches=c[1], schedule=c[0].split("+")[0],
            partition=sizes, defer_weight_gradients=c[0].endswith("+defer")))
        for c in configs
    }
    # Every rank builds the plain model too (the same layer names on every
    # rank, which the start-up check compares); rank 0 times it, as Keras
    # runs it and traced with the pipeline's MatMul gradient rule (so that
    # the rule's own gain is not counted as pipelining's).
    plain = compiled(net())[1]
    with _compat.small_rows_matmul_gradients():
        ruled = compiled(net())[1]

    def timed(step, cpu: list | None = None) -> float:  # noqa: ANN001
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            out = step(data)
        float(out["loss"])
        if cpu is not None:
            cpu.append((time.process_time() - start_cpu) / args.steps)
        return (time.perf_counter() - start) / args.steps

    times: dict = {c: [] for c in configs}
    cpus: dict = {c: [] for c in configs}
    base, base_ruled = [], []
    for _ in range(args.rounds):
        for c in configs:
            _mpi_ops.barrier()
            times[c].append(timed(built[c][1], cpus[c]))
        _mpi_ops.barrier()
        if rank == 0:
            base.append(timed(plain))
            base_ruled.append(timed(ruled))
    _mpi_ops.barrier()
    rows = []
    for c in configs:
        pipe, step = built[c]
        busy, span = [], []
        for _ in range(3):
            _mpi_ops.barrier()
            timeline = trace_timeline(step, data, schedule=pipe.pipeline_schedule)
            busy.append(sum(d for _, n, _, d in timeline.ops if "Smdist" not in n))
            span.append(max(t + d for _, _, t, d in timeline.ops)
                        - min(t for _, _, t, _ in timeline.ops))
        mine = np.array([statistics.median(busy), statistics.median(span),
                         statistics.median(cpus[c])])
        every = _mpi_ops.allgather_bytes(mine.astype("float64").tobytes())
        rows.append((c, [np.frombuffer(b, "float64") for b in every]))
    # One message's time between stages 0 and 1: half a round trip of a
    # micro-batch's activations, sent and received by the graph ops the
    # pipeline's steps use (`_mpi_ops.send` / `recv`), 50 round trips in
    # one tf.function, medians of 5 such runs; per micro-batch count.
    one_way = {}
    for m in ms:
        height = args.batch // m
        nbytes = height * args.width * 4

        @tf.function
        def trips(t, height=height):  # noqa: ANN001, ANN202
            for _ in tf.range(50):
                if rank == 0:
                    sent = _mpi_ops.send(t, peer=1, tag=_PING_TAG)
                    with tf.control_dependencies([sent]):
                        t = _mpi_ops.recv([height, args.width], tf.float32, peer=1,
                                          tag=_PING_TAG)
                elif rank == 1:
                    t = _mpi_ops.recv([height, args.width], tf.float32, peer=0,
                                      tag=_PING_TAG)
                    sent = _mpi_ops.send(t, peer=0, tag=_PING_TAG)
                    with tf.control_dependencies([sent]):
                        t = tf.identity(t)
            return t

        payload, runs = tf.zeros([height, args.width]), []
        for _ in range(6):
            _mpi_ops.barrier()
            start = time.perf_counter()
            if rank < 2:
                trips(payload).numpy()
            runs.append((time.perf_counter() - start) / 100)
        if rank == 0:
            one_way[m] = (nbytes, statistics.median(runs[1:]))
    adam = smd.PipelineModel(net(), num_stages=k, microbatches=ms[-1],
                             partition=sizes)
    adam.compile(optimizer="adam", loss="mse")
    memory = np.array(list(adam.memory_report().values()), "int64")
    memories = [np.frombuffer(b, "int64") for b in _mpi_ops.allgather_bytes(
        memory.tobytes())]
    if rank != 0:
        return
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    plain_s = statistics.median(base)
    print(
        f"MLP {args.layers} x Dense({args.width}), batch {args.batch}: {k} "
        f"stages in {world} processes (one per stage, pinned to one core each, "
        f"intra-op 1, inter-op 1, MPI) vs the plain model in one process on "
        f"one core with one thread; medians of {args.rounds} interleaved rounds "
        f"of {args.steps} steps; load average {load}"
    )
    ruled_s = statistics.median(base_ruled)
    print(f"plain 1 core: {plain_s * 1e3:.1f} ms/step (per round: "
          + ", ".join(f"{b * 1e3:.0f}" for b in base) + ")")
    print(f"plain 1 core, pipeline's MatMul gradient rule: {ruled_s * 1e3:.1f} "
          "ms/step (per round: " + ", ".join(f"{b * 1e3:.0f}" for b in base_ruled)
          + ")")
    print("| schedule | M | ms/step | RATIO vs plain | RATIO vs plain with the "
          "rule | CPU ms/step per rank "
          "| busy ms per rank | measured bubble | (K-1)/(M+K-1) "
          "| waiting beyond the bubble per rank | transfers (share of the step) |")
    print("|" + "---|" * 11)
    for c, per_rank in rows:
        step_s = statistics.median(times[c])
        busy = [r[0] for r in per_rank]
        # Busy time and span from the same profiled steps.
        traced = max(r[1] for r in per_rank)
        bubble = 1 - sum(busy) / (k * traced)
        formula = (k - 1) / (c[1] + k - 1)
        nbytes, seconds = one_way[c[1]]
        # The busiest rank receives 2 M messages (M on the first and last stage).
        recvs = (2 if k > 2 else 1) * c[1]
        print(
            f"| {c[0]} | {c[1]} | {step_s * 1e3:.1f} | {plain_s / step_s:.2f}x | "
            f"{ruled_s / step_s:.2f}x | "
            + "/".join(f"{r[2] * 1e3:.0f}" for r in per_rank) + " | "
            + "/".join(f"{b * 1e3:.1f}" for b in busy)
            + f" | {bubble:.3f} | {formula:.3f} | "
            + "/".join(f"{max(0.0, 1 - b / traced - formula):.0%}" for b in busy)
            + f" | {recvs} x {nbytes / 2**10:.0f} KiB x {seconds * 1e6:.0f} us"
            f" = {recvs * seconds / step_s:.1%} |"
        )
    names = ["variables", "gradients", "optimizer state", "whole model"]
    print("bytes held per process with Adam (whole model = the model every "
          "process builds first in host memory):")
    for r, mem in enumerate(memories):
        print(f"  rank {r}: " + ", ".join(
            f"{n} {int(v) / 2**20:.2f} MiB" for n, v in zip(names, mem)))


if __name__ == "__main__":
    main()
