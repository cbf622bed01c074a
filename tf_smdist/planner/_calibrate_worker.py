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


def _per_call(run, repeats: int, window: float) -> float:
    """Median seconds per call of `run(iters)`, iterations sized to `window`.

    Rank 0's probe sets the count for every rank (they must agree).
    """
    import numpy as np

    from tf_smdist import _mpi_ops

    _mpi_ops.barrier()
    start = time.perf_counter()
    run(1)
    probe = np.array([time.perf_counter() - start], np.float64)
    probe = _mpi_ops.allreduce_array(probe, reduction="max")[0]
    iters = int(max(1, min(100, window / max(probe, 1e-7))))
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
        array = np.ones(nbytes // 4, np.float32)
        payload = b"x" * nbytes

        def run_allreduce(iters: int, array: np.ndarray = array) -> None:
            for _ in range(iters):
                _mpi_ops.allreduce_array(array)

        def run_p2p(iters: int, payload: bytes = payload) -> None:
            for _ in range(iters):
                _mpi_ops.broadcast_bytes(payload, root=0)

        allreduce[nbytes] = _per_call(run_allreduce, args.repeats, args.window)
        p2p[nbytes] = _per_call(run_p2p, args.repeats, args.window)
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
        "matmul_flops": flops,
        "call_overhead": call,
    }


if __name__ == "__main__":
    main()
