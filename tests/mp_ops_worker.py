"""One rank of the MPI op tests (run by the launcher).

Usage: python mp_ops_worker.py MODE OUT_DIR

MODE: collectives (writes OUT_DIR/rank{r}.json with every result), stall
(rank 1 stops issuing collectives; the others must fail naming it), stop
(rank 1 is stopped with SIGSTOP: no heartbeats either).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_smdist import _mpi_ops  # noqa: E402
from tf_smdist.data_parallel import cluster  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]


def collectives() -> dict:
    rank, size = cluster.initialize()
    out: dict = {"rank": rank, "size": size}
    base = np.arange(1000, dtype=np.float64) / 7.0
    for dtype in ("float32", "float64", "float16", "bfloat16", "int32", "int64"):
        x = tf.cast(tf.constant(base * (rank + 1)), dtype)
        if dtype.startswith("int"):
            x = tf.constant((np.arange(1000) * (rank + 1)).astype(dtype))
        y = _mpi_ops.host_allreduce(x)
        out[f"sum_{dtype}"] = tf.cast(y, tf.float64).numpy().tolist()
    v = tf.constant([float(rank), -float(rank), 5.0])
    out["min"] = _mpi_ops.host_allreduce(v, reduction="min").numpy().tolist()
    out["max"] = _mpi_ops.host_allreduce(v, reduction="max").numpy().tolist()
    out["empty"] = _mpi_ops.host_allreduce(tf.zeros([0])).shape.as_list()
    out["bcast"] = _mpi_ops.broadcast(
        tf.fill([3], float(rank + 10)), root=size - 1).numpy().tolist()
    out["bcast_bool"] = _mpi_ops.broadcast(
        tf.constant([rank == 0, rank != 0])).numpy().tolist()
    out["gather"] = [b.decode() for b in _mpi_ops.allgather_bytes(f"r{rank}".encode())]
    out["bcast_bytes"] = _mpi_ops.broadcast_bytes(
        f"from {rank}".encode() * (rank + 1), root=1).decode()
    out["np_sum"] = _mpi_ops.allreduce_array(np.array([rank, 1], np.int64)).tolist()

    # Two bucket plans (groups) interleaved inside one function, issued in
    # index order; each step's values differ so a mix-up would show.
    g1, g2 = cluster.allocate_group(), cluster.allocate_group()

    @tf.function
    def step(k: tf.Tensor) -> list[tf.Tensor]:
        a = _mpi_ops.host_allreduce(tf.fill([4], k + rank), group=g1, index=0,
                                    group_size=2)
        b = _mpi_ops.host_allreduce(tf.fill([300], 2 * k), group=g2, index=0,
                                    group_size=1)
        c = _mpi_ops.host_allreduce(tf.fill([7], k * rank), group=g1, index=1,
                                    group_size=2)
        return [a, b, c]

    out["steps"] = [[t.numpy().tolist() for t in step(tf.constant(float(k)))]
                    for k in range(3)]
    # Native MPI timing path works.
    out["native_ok"] = _mpi_ops.time_native_allreduce(1024, 3) > 0
    try:
        _mpi_ops.host_allreduce(tf.ones([2], tf.float16), reduction="min")
        out["fp16_min_error"] = ""
    except tf.errors.InvalidArgumentError as e:
        out["fp16_min_error"] = e.message
    return out


def stall() -> None:
    rank, _ = cluster.initialize()
    _mpi_ops.host_allreduce(tf.ones([8]))
    if rank == 1 and MODE == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, comm thread too
    if rank == 1:
        time.sleep(600)
    start = time.monotonic()
    try:
        _mpi_ops.host_allreduce(tf.ones([8]))
        message = "no error"
    except tf.errors.DeadlineExceededError as e:
        message = e.message
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump({"message": message, "seconds": time.monotonic() - start}, f)
    sys.exit(3)


if __name__ == "__main__":
    if MODE == "collectives":
        result = collectives()
        with open(os.path.join(OUT, f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
    elif MODE in ("stall", "stop"):
        stall()
    else:
        raise SystemExit(f"unknown mode {MODE}")
