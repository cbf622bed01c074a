"""One rank of the MPI op tests (run by the launcher).

Usage: python mp_ops_worker.py MODE OUT_DIR

MODE: collectives (writes OUT_DIR/rank{r}.json with every result), stall
(rank 1 stops issuing collectives; the others must fail naming it), stop
(rank 1 is stopped with SIGSTOP: no heartbeats either), stop_recv (rank 1 is
stopped while rank 0 receives from it), patient and patient_stop (a
broadcast's longer `timeout`, see `patient`).

The input generators below are imported by the test to compute the expected
values with NumPy.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_smdist import _mpi_ops  # noqa: E402
from tf_smdist.data_parallel import cluster  # noqa: E402

MODE, OUT = (sys.argv[1], sys.argv[2]) if __name__ == "__main__" else ("", "")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8",
          "int8", "int16", "uint16", "bool")
REDUCTIONS = ("sum", "min", "max", "prod")


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def reduction_input(dtype: str, rank: int) -> np.ndarray:
    """Small values whose sums and products are exact in every dtype."""
    base = (np.arange(12) + 3 * rank) % 5
    if dtype == "bool":
        return base % 3 == 0
    if dtype.startswith("uint"):
        return base.astype(dtype)
    values = base - 2.0
    if dtype.startswith("float") or dtype == "bfloat16":
        values = values / 2.0
    return values.astype(np_dtype(dtype))


def expected_reduction(dtype: str, reduction: str, size: int) -> list:
    parts = np.stack([reduction_input(dtype, r) for r in range(size)])
    if dtype == "bool":
        out = parts.any(0) if reduction in ("sum", "max") else parts.all(0)
    else:
        wide = parts.astype(np.float64)
        out = {"sum": wide.sum(0), "min": wide.min(0), "max": wide.max(0),
               "prod": wide.prod(0)}[reduction]
    return np.asarray(out).astype(np.float64).tolist()


def _error(fn) -> str:
    try:
        fn()
    except tf.errors.OpError as e:
        return f"{type(e).__name__}: {e.message}"
    return "no error"


def sub_communicators(rank: int, size: int) -> dict:
    """Communicators over the even and the odd ranks, and a reversed world."""
    out: dict = {}
    evens = _mpi_ops.create_comm(list(range(0, size, 2)))
    odds = _mpi_ops.create_comm(list(range(1, size, 2)))
    rev = _mpi_ops.create_comm(list(range(size - 1, -1, -1)))
    mine = evens if rank % 2 == 0 else odds
    out["ids"] = [evens, odds, rev]
    out["comm_rank_size"] = [_mpi_ops.comm_rank(mine), _mpi_ops.comm_size(mine),
                             _mpi_ops.comm_rank(rev), _mpi_ops.comm_size(rev),
                             _mpi_ops.comm_rank(0), _mpi_ops.comm_size(0)]
    out["sub_sum"] = _mpi_ops.host_allreduce(
        tf.constant([rank + 1.0, 1.0]), comm=mine).numpy().tolist()
    last = _mpi_ops.comm_size(mine) - 1
    out["sub_bcast"] = _mpi_ops.broadcast(
        tf.constant([float(rank)]), root=last, comm=mine).numpy().tolist()
    out["sub_np"] = _mpi_ops.allreduce_array(np.array([rank], np.int64), comm=mine,
                                             reduction="max").tolist()
    out["sub_gather"] = [b.decode() for b in _mpi_ops.allgather_bytes(
        str(rank).encode() * (rank + 1), comm=mine)]
    out["sub_bcast_bytes"] = _mpi_ops.broadcast_bytes(
        f"r{rank}".encode(), root=last, comm=mine).decode()
    _mpi_ops.barrier(comm=mine)
    # A function over both the world and the sub-communicator, groups 1.
    g = cluster.allocate_group()

    @tf.function
    def both(x: tf.Tensor) -> list[tf.Tensor]:
        return [_mpi_ops.host_allreduce(x, comm=mine, group=1),
                _mpi_ops.host_allreduce(x, group=g),
                _mpi_ops.host_allreduce(x * 2, comm=rev, group=7)]

    out["sub_fn"] = [t.numpy().tolist() for t in both(tf.constant([float(rank)]))]
    out["bad_group"] = _error(
        lambda: _mpi_ops.host_allreduce(tf.ones([1]), comm=mine, group=8))
    out["not_member"] = _error(
        lambda: _mpi_ops.host_allreduce(tf.ones([1]),
                                        comm=odds if mine == evens else evens))
    # A different list on one rank: every rank raises, naming both lists.
    ranks = [0, 1] if rank == size - 1 else [1, 0]
    try:
        _mpi_ops.create_comm(ranks)
        out["mismatch"] = "no error"
    except tf.errors.FailedPreconditionError as e:
        out["mismatch"] = e.message
    out["bad_ranks"] = _error(lambda: _mpi_ops.create_comm([0, 0]))
    _mpi_ops.destroy_comm(rev)
    out["destroyed"] = [_mpi_ops.comm_size(rev), _error(
        lambda: _mpi_ops.host_allreduce(tf.ones([1]), comm=rev))]
    # Communicators made after the failed ones get consistent ids.
    again = _mpi_ops.create_comm(list(range(size)))
    out["again"] = [again, _mpi_ops.allreduce_array(np.ones(1, np.int32),
                                                    comm=again).tolist()]
    _mpi_ops.destroy_comm(again)
    out["evens_odds"] = [evens, odds]
    return out


def point_to_point(rank: int, size: int) -> dict:
    """Sends and receives in opposite orders on the two sides, one function."""
    out: dict = {}
    big = 300_000  # 1.2 MB: past the eager limit, so the send needs the recv

    @tf.function
    def exchange() -> list[tf.Tensor]:
        results = []
        if rank == 0:
            _mpi_ops.send(tf.range(big, dtype=tf.float32), peer=1, tag=1)
            _mpi_ops.send(tf.constant([7, 8], tf.int64), peer=1, tag=2)
            results.append(_mpi_ops.recv([2, 2], tf.float16, peer=1, tag=3))
        elif rank == 1:
            results.append(_mpi_ops.recv(tf.constant([2], tf.int64), tf.int64, peer=0,
                                         tag=2))
            got = _mpi_ops.recv([big], tf.float32, peer=0, tag=1)
            results.append(tf.reduce_all(got == tf.range(big, dtype=tf.float32)))
            _mpi_ops.send(tf.fill([2, 2], tf.constant(1.5, tf.float16)), peer=0,
                          tag=3)
        # A ring: everyone sends to its successor, then receives.
        nxt, prev = (rank + 1) % size, (rank - 1) % size
        _mpi_ops.send(tf.fill([3], rank), peer=nxt, tag=100)
        results.append(_mpi_ops.recv([3], tf.int32, peer=prev, tag=100))
        return results

    out["p2p"] = [np.asarray(t.numpy(), np.float64).tolist() for t in exchange()]
    # Size mismatches are errors on the receiving side only.
    if rank == 0:
        _mpi_ops.send(tf.ones([5]), peer=1, tag=9)
        out["short"] = _error(lambda: _mpi_ops.recv([4], tf.float32, peer=1, tag=10))
    elif rank == 1:
        out["long"] = _error(lambda: _mpi_ops.recv([4], tf.float32, peer=0, tag=9))
        _mpi_ops.send(tf.ones([3]), peer=0, tag=10)
    # Bytes over the ctypes path, inside the even communicator when possible.
    if rank == 0:
        _mpi_ops.send_bytes(b"hello", peer=1, tag=11)
    elif rank == 1:
        out["bytes"] = _mpi_ops.recv_bytes(5, peer=0, tag=11).decode()
    _mpi_ops.barrier()
    return out


def gathers_and_scatters(rank: int, size: int) -> dict:
    out: dict = {}
    x = tf.fill([rank + 1, 2], float(rank))
    out["allgather"] = _mpi_ops.allgather(x).numpy().tolist()

    @tf.function
    def in_function(v: tf.Tensor) -> tf.Tensor:
        return _mpi_ops.allgather(tf.cast(v, tf.int8))

    out["allgather_fn"] = in_function(x).numpy().tolist()
    out["allgather_empty"] = _mpi_ops.allgather(
        tf.zeros([0 if rank == 0 else 1, 3])).shape.as_list()
    out["allgather_mismatch"] = _error(
        lambda: _mpi_ops.allgather(tf.zeros([1, 3 if rank == 0 else 2])))
    rows = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(rows)
        gathered = _mpi_ops.allgather(rows)
        weights = tf.range(tf.shape(gathered)[0], dtype=tf.float32)[:, None]
        loss = tf.reduce_sum(gathered * weights)
    out["allgather_grad"] = tape.gradient(loss, rows).numpy().tolist()
    send_counts = [k + 1 + rank for k in range(size)]
    recv_counts = [rank + 1 + k for k in range(size)]
    data = np.concatenate([np.full(n, rank * 100 + k, np.int32)
                           for k, n in enumerate(send_counts)])
    out["alltoallv"] = _mpi_ops.alltoallv_array(data, send_counts, recv_counts).tolist()
    counts = [k + 1 for k in range(size)]
    out["reduce_scatter"] = _mpi_ops.reduce_scatter_array(
        np.arange(sum(counts), dtype=np.float32) * (rank + 1), counts).tolist()
    out["reduce_scatter_max"] = _mpi_ops.reduce_scatter_array(
        np.arange(sum(counts), dtype=np.int16) * (rank + 1), counts,
        reduction="max").tolist()
    return out


def all_reductions(rank: int, size: int) -> dict:
    out: dict = {}
    for dtype in DTYPES:
        values = reduction_input(dtype, rank)
        for reduction in REDUCTIONS:
            op = _mpi_ops.host_allreduce(tf.constant(values), reduction=reduction)
            arr = _mpi_ops.allreduce_array(values, reduction=reduction)
            out[f"{dtype}_{reduction}"] = [
                np.asarray(op.numpy()).astype(np.float64).tolist(),
                arr.astype(np.float64).tolist(), op.dtype.name, str(arr.dtype)]
    # 8-bit sums and products wrap (modulo 256), in MPI's all-reduce (4 KB)
    # and in the engine's ring (512 KB) alike: Open MPI's AVX reduction
    # saturates them.
    for dtype in ("int8", "uint8"):
        base = -100 if dtype == "int8" else 200
        for n in (4 << 10, 512 << 10):
            t = tf.fill([n], tf.constant(base + rank, dtype))
            out[f"wrap_{dtype}_{n}"] = [
                sorted(set(np.asarray(_mpi_ops.host_allreduce(
                    t, reduction=red).numpy()).astype(int).tolist()))
                for red in ("sum", "prod")]
    # 16-bit products round to nearest even once per step (rank 2+ give 1).
    a = np.array([1.1, 3.3, -7.7, 0.1], np.float32)
    mine = a if rank == 0 else (a + 1 if rank == 1 else np.ones(4, np.float32))
    for dtype in ("float16", "bfloat16"):
        t = tf.cast(tf.constant(mine), dtype)
        out[f"round_{dtype}"] = tf.cast(
            _mpi_ops.host_allreduce(t, reduction="prod"), tf.float64).numpy().tolist()
    return out


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
    # From 256 KB (SMDIST_MPI_RING_BYTES, set by the test) the communication
    # thread's ring: out of place from an input still referenced here (it
    # must stay as it was), in place on a fresh intermediate; an odd length
    # gives blocks of unequal size.
    big = tf.constant(np.arange((256 << 10) + 3, dtype=np.float32) * (rank + 1))
    held = _mpi_ops.host_allreduce(big)
    fresh = tf.function(lambda v: _mpi_ops.host_allreduce(v * 1.0))(big)
    out["ring"] = [float(tf.reduce_max(tf.abs(held - fresh))),
                   float(held[-1]), float(big[-1])]
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
    out.update(sub_communicators(rank, size))
    out.update(point_to_point(rank, size))
    out.update(gathers_and_scatters(rank, size))
    out.update(all_reductions(rank, size))
    return out


def stall() -> None:
    rank, _ = cluster.initialize()
    _mpi_ops.host_allreduce(tf.ones([8]))
    if rank == 1 and MODE in ("stop", "stop_recv"):
        os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, comm thread too
    if rank == 1:
        time.sleep(600)
    start = time.monotonic()
    try:
        if MODE == "stop_recv":
            _mpi_ops.recv([4], tf.float32, peer=1, tag=77)
        else:
            _mpi_ops.host_allreduce(tf.ones([8]))
        message = "no error"
    except tf.errors.DeadlineExceededError as e:
        message = e.message
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump({"message": message, "seconds": time.monotonic() - start}, f)
    sys.exit(3)


def patient() -> None:
    """Broadcasts whose root works alone for longer than the usual deadline.

    `patient`: rank 0 sleeps past the deadline before a broadcast with a
    longer `timeout` (every rank must get the data), then before one without
    (every other rank must fail at the usual deadline). `patient_stop`: rank
    1, the root, is stopped (no heartbeats): the longer `timeout` must not
    keep the others waiting past the usual deadline.
    """
    rank, _ = cluster.initialize()
    _mpi_ops.host_allreduce(tf.ones([8]))
    out: dict = {}
    if MODE == "patient_stop":
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        steps = [("stopped_root", 1, 120.0)]
    else:
        steps = [("late_root", 0, 60.0), ("late_root_usual", 0, None)]
    for label, root, timeout in steps:
        if rank == root:
            time.sleep(8)
        start = time.monotonic()
        try:
            data = _mpi_ops.broadcast_bytes(f"from {rank}".encode(), root=root,
                                            timeout=timeout)
            out[label] = {"data": data.decode()}
        except tf.errors.DeadlineExceededError as e:
            out[label] = {"error": e.message}
        out[label]["seconds"] = time.monotonic() - start
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    sys.exit(3 if any("error" in v for v in out.values()) else 0)


if __name__ == "__main__":
    if MODE == "collectives":
        result = collectives()
        with open(os.path.join(OUT, f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
    elif MODE in ("stall", "stop", "stop_recv"):
        stall()
    elif MODE in ("patient", "patient_stop"):
        patient()
    else:
        raise SystemExit(f"unknown mode {MODE}")
