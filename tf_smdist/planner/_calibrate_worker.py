"""One rank of `Cluster.calibrate`'s measuring job (run by the launcher).

Usage (every rank): `python _calibrate_worker.py --out RESULT.json [--sizes
1024,65536,...] [--budget SECONDS]`. Rank 0 writes the timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` windows (after one warm-up)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _ping_pong(rank: int, nbytes: int):
    """`run(iters)`: `iters` round trips of `nbytes` between ranks 0 and 1.

    The pipeline's own path: the `send`/`recv` ops inside a `tf.function`.
    Other ranks do nothing.
    """
    import tensorflow as tf

    from tf_smdist import _mpi_ops

    shape = [nbytes // 4]
    value = tf.ones(shape)

    def build(iters: int):
        @tf.function
        def trips() -> tf.Tensor:
            x = value
            for i in range(iters):
                if rank == 0:
                    _mpi_ops.send(x, peer=1, tag=i)
                    x = _mpi_ops.recv(shape, tf.float32, peer=1, tag=i)
                else:
                    x = _mpi_ops.recv(shape, tf.float32, peer=0, tag=i)
                    _mpi_ops.send(x, peer=0, tag=i)
            return x

        return trips

    return _runner(build, active=rank <= 1)


def _allreduce_chain(nbytes: int):
    """`run(iters)`: `iters` all-reduces of `nbytes` back to back.

    The data-parallel strategy's own path: the all-reduce op inside a
    `tf.function`, each output the next input (forwarded, not copied). The
    NumPy path (`allreduce_array`) copies the data three times and took 4x
    as long from 4 MB up.
    """
    import tensorflow as tf

    from tf_smdist import _mpi_ops

    value = tf.ones([nbytes // 4])

    def build(iters: int):
        @tf.function
        def chain() -> tf.Tensor:
            # The values overflow, which does not change the cost.
            x = value
            for _ in range(iters):
                x = _mpi_ops.host_allreduce(x)
            return x

        return chain

    return _runner(build)


def _runner(build, active: bool = True):
    """`run(iters)`: calls the `tf.function` `build(iters)` (traced once)."""
    functions = {}

    def run(iters: int) -> None:
        if not active:
            return
        if iters not in functions:
            functions[iters] = build(iters)
            functions[iters]().numpy()  # trace outside the timing
        functions[iters]().numpy()

    return run


def _per_call(run, repeats: int, window: float) -> float:
    """Median seconds per call of `run(iters)`, iterations sized to `window`.

    Rank 0's probe sets the count for every rank (they must agree).
    """
    import numpy as np

    from tf_smdist import _mpi_ops

    _mpi_ops.barrier()
    run(1)  # warm-up (and tracing)
    _mpi_ops.barrier()
    start = time.perf_counter()
    run(1)
    probe = np.array([time.perf_counter() - start], np.float64)
    probe = _mpi_ops.allreduce_array(probe, reduction="max")[0]
    iters = int(max(1, min(100, window / max(probe, 1e-7))))
    _mpi_ops.barrier()
    run(iters)  # warm-up at the timed count
    samples = []
    for _ in range(repeats):
        _mpi_ops.barrier()
        start = time.perf_counter()
        run(iters)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="4096,65536,1048576,4194304,16777216")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=float, default=0.05,
                        help="seconds per timed window")
    parser.add_argument("--host-bytes", type=int, default=16 << 20)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from tf_smdist import _mpi_ops
    from tf_smdist.data_parallel import cluster

    rank, size = cluster.initialize()
    sizes = [int(s) for s in args.sizes.split(",")]
    allreduce, p2p, native = {}, {}, {}
    for nbytes in sizes:
        payload = b"x" * nbytes
        run_allreduce = _allreduce_chain(nbytes)

        def run_p2p(iters: int, payload: bytes = payload) -> None:
            for _ in range(iters):
                _mpi_ops.broadcast_bytes(payload, root=0)

        if hasattr(_mpi_ops, "send"):
            run_p2p = _ping_pong(rank, nbytes)

        allreduce[nbytes] = _per_call(run_allreduce, args.repeats, args.window)
        p2p[nbytes] = _per_call(run_p2p, args.repeats, args.window)
        if hasattr(_mpi_ops, "send"):
            p2p[nbytes] /= 2  # a round trip is two messages
        _mpi_ops.barrier()
        native[nbytes] = _mpi_ops.time_native_allreduce(nbytes // 4, 3)
    # Every rank takes the slowest rank's time (the collective's pace).
    keys = list(sizes)
    for table in (allreduce, p2p, native):
        values = np.array([table[k] for k in keys], np.float64)
        values = _mpi_ops.allreduce_array(values, reduction="max")
        table.update(zip(keys, values.tolist()))
    local = _local_measurements(args.host_bytes, args.repeats) if rank == 0 else {}
    _mpi_ops.barrier()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "processes": size,
                    "p2p_method": ("send/recv round trips between ranks 0 and 1"
                                   if hasattr(_mpi_ops, "send")
                                   else "broadcast_bytes from rank 0"),
                    "allreduce": {str(k): v for k, v in allreduce.items()},
                    "p2p": {str(k): v for k, v in p2p.items()},
                    "native_allreduce": {str(k): v for k, v in native.items()},
                    **local,
                },
                f,
            )


def _local_measurements(host_bytes: int, repeats: int) -> dict[str, float]:
    """Host-reduce, memory and compute speed of this process."""
    import numpy as np
    import tensorflow as tf

    from tf_smdist import _ops

    n = host_bytes // 4
    inputs = [tf.ones([n]), tf.ones([n])]

    @tf.function
    def reduce_twice() -> tf.Tensor:
        return _ops.host_reduce(inputs)

    host = _timed(lambda: reduce_twice().numpy(), repeats)
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    copy = _timed(lambda: np.copyto(dst, src), repeats)
    # Packing a bucket as the strategy does: a concatenation into a new
    # tensor each step. Its first touch of fresh pages makes it 2-4x slower
    # than the copy into a warm buffer above.
    parts = [tf.ones([n // 2]), tf.ones([n - n // 2])]

    @tf.function
    def pack() -> tf.Tensor:
        return tf.concat(parts, 0)

    packed = _timed(lambda: pack().numpy(), repeats)
    a = tf.random.normal([512, 512])

    @tf.function
    def matmul() -> tf.Tensor:
        return tf.reduce_sum(tf.matmul(a, a))

    flops = 2 * 512**3 / _timed(lambda: matmul().numpy(), repeats)

    @tf.function
    def empty() -> tf.Tensor:
        return tf.constant(0.0)

    call = _timed(lambda: [empty() for _ in range(100)], repeats) / 100
    return {
        "host_reduce_bandwidth": 2 * host_bytes / host,
        "memory_bandwidth": 2 * host_bytes / copy,
        "pack_bandwidth": host_bytes / packed,
        "matmul_flops": flops,
        "call_overhead": call,
    }


if __name__ == "__main__":
    main()
