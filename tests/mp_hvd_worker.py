"""One rank of the Horovod-compatible collective tests (run by the launcher).

Usage: python mp_hvd_worker.py OUT_DIR [--timings | --stop | --uncaught | --exit |
                                        --replaced-hook]

With --stop, rank 1 stops itself (SIGSTOP) after one collective; rank 0's
next collective must fail with the watchdog's error naming it and the
tensor, then rank 0 exits with status 3. With --uncaught, rank 1 meets an
exception nothing catches (Python hands it to `sys.excepthook`, as it does
before exiting) and stays alive 20 s; rank 0's next collective must fail
at once, naming it, and rank 0 exits with status 3. With --exit, rank 1
ends its script early (`sys.exit(0)`: its exit handlers shut its
communication down in order); rank 0's next collective must fail at once,
naming rank 1 as having left, and rank 0 exits with status 3. With
--replaced-hook, rank 1 installs its own `sys.excepthook` after tf_smdist's
and really exits on an uncaught exception (an exit handler of its own, run
after tf_smdist's, keeps the process 20 s); rank 0's next collective must
fail at once, naming it, and rank 0 exits with status 3.

Runs every check in the same order on every rank and writes
OUT_DIR/rank{r}.json: {check name: "ok" or the failure text}, plus timings.
Expected values are computed with NumPy from every rank's (deterministic)
inputs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_smdist import _mpi_ops  # noqa: E402
from tf_smdist.horovod import mpi_ops as hvd  # noqa: E402

OUT = sys.argv[1]
TIMINGS = "--timings" in sys.argv[2:]
STOP = "--stop" in sys.argv[2:]
UNCAUGHT = "--uncaught" in sys.argv[2:]
EXIT = "--exit" in sys.argv[2:]
REPLACED_HOOK = "--replaced-hook" in sys.argv[2:]
if REPLACED_HOOK:
    import atexit

    # Registered before tf_smdist's exit handler, so it runs after it (last
    # in, first out): the process stays while rank 0 reports.
    atexit.register(time.sleep, 20)
DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "int64", "float16", "bfloat16",
          "float32", "float64", "bool"]
OPS = {"Sum": hvd.Sum, "Average": hvd.Average, "Min": hvd.Min, "Max": hvd.Max,
       "Product": hvd.Product}
results: dict = {}
timings: dict = {}
durations: dict = {}


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def value(rank: int, dtype: str, shape=(2, 3)) -> np.ndarray:
    """Small exact values: products of 3 ranks stay in int8 range."""
    n = int(np.prod(shape))
    base = (np.arange(n) % 3 + rank + 1).reshape(shape)
    if dtype == "bool":
        return ((np.arange(n).reshape(shape) + rank) % 2).astype(bool)
    if dtype.startswith("float") or dtype == "bfloat16":
        return (base / 4.0).astype(np_dtype(dtype))
    return base.astype(np_dtype(dtype))


def expected_reduce(op: str, dtype: str, size: int, shape=(2, 3)) -> np.ndarray:
    vals = [value(r, dtype, shape).astype(np.float64) for r in range(size)]
    if dtype == "bool":
        vals = [v.astype(bool) for v in vals]
        out = {"Sum": np.logical_or.reduce, "Max": np.logical_or.reduce,
               "Min": np.logical_and.reduce, "Product": np.logical_and.reduce}[op](vals)
        return out
    if op in ("Sum", "Average"):
        out = np.sum(vals, axis=0)
    elif op == "Min":
        out = np.min(vals, axis=0)
    elif op == "Max":
        out = np.max(vals, axis=0)
    else:
        out = np.prod(vals, axis=0)
    if op == "Average":
        out = out * (1.0 / size)
        if not (dtype.startswith("float") or dtype == "bfloat16"):
            out = np.trunc(out)
    return out.astype(np_dtype(dtype))


def check(name: str, fn) -> None:
    start = time.perf_counter()
    try:
        fn()
        results[name] = "ok"
    except Exception as e:  # noqa: BLE001 (reported to the test)
        results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    durations[name] = round(time.perf_counter() - start, 3)


def expect_error(fn, error_type, *needles: str) -> None:
    try:
        fn()
    except error_type as e:
        text = e.message if hasattr(e, "message") else str(e)
        for needle in needles:
            assert needle in text, f"{needle!r} not in {text!r}"
        return
    raise AssertionError(f"no {error_type.__name__} raised")


def close(got, want, dtype: str) -> None:
    got = np.asarray(got)
    assert got.dtype == np_dtype(dtype) or dtype == "bool", (got.dtype, dtype)
    if dtype in ("float16", "bfloat16"):
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=1e-2)
    elif dtype.startswith("float"):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


def main() -> None:
    hvd.init_engine()
    rank, size = hvd.rank(), hvd.size()

    # --- allreduce: every dtype and op, eager ------------------------------
    for dtype in DTYPES:
        for op_name, op in OPS.items():
            if dtype == "bool" and op_name == "Average":
                continue

            def f(dtype=dtype, op_name=op_name, op=op):
                got = hvd.allreduce(tf.constant(value(rank, dtype)), op=op)
                close(got.numpy(), expected_reduce(op_name, dtype, size), dtype)
            check(f"allreduce_{dtype}_{op_name}", f)

    # Above the size whose values travel with the negotiation (2 KB): the
    # MPI all-reduce itself (16-bit floats through MPI's user reductions).
    def allreduce_large():
        for dtype in DTYPES:
            for op_name, op in OPS.items():
                if dtype == "bool" and op_name == "Average":
                    continue
                x = tf.constant(value(rank, dtype, shape=(1024, 3)))
                got = hvd.allreduce(x, op=op)
                want = expected_reduce(op_name, dtype, size, shape=(1024, 3))
                close(got.numpy(), want, dtype)
    check("allreduce_large", allreduce_large)

    # From 256 KB (SMDIST_MPI_RING_BYTES, set by the test) the communication
    # thread runs its own ring all-reduce (point-to-point chunks, summed by
    # MPI_Reduce_local); an element count that no process count divides
    # leaves blocks of unequal length, and the test's 64 KB chunks
    # (SMDIST_MPI_RING_CHUNK_BYTES) give blocks of 2-8 chunks from 2-byte
    # elements up.
    def allreduce_ring():
        n = (256 << 10) + 7
        for dtype in DTYPES:
            for op_name, op in OPS.items():
                if dtype == "bool" and op_name == "Average":
                    continue
                x = tf.constant(value(rank, dtype, shape=(n,)))
                got = hvd.allreduce(x, op=op)
                close(got.numpy(), expected_reduce(op_name, dtype, size, shape=(n,)),
                      dtype)
                # `x` is still referenced, so the op reads it where it is
                # (out of place) and must leave it as it was.
                np.testing.assert_array_equal(x.numpy(), value(rank, dtype, shape=(n,)))
        # A fresh intermediate is forwarded: the ring runs in place on it.
        x = tf.constant(value(rank, "float32", shape=(n,)))
        in_place = tf.function(lambda v: hvd.allreduce(v * 1.0, op=hvd.Sum))
        close(in_place(x).numpy(), expected_reduce("Sum", "float32", size, shape=(n,)),
              "float32")
    check("allreduce_ring", allreduce_ring)

    def scales():
        x = tf.constant(value(rank, "float32"))
        got = hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25)
        close(got.numpy(), expected_reduce("Sum", "float32", size) * 0.5, "float32")
        got = hvd.allreduce(tf.constant(value(rank, "int32")), op=hvd.Average,
                            postscale_factor=3.0)
        want = np.trunc(expected_reduce("Sum", "int32", size) * (3.0 / size))
        close(got.numpy(), want.astype(np.int32), "int32")
        # Integer Average: the sum times 1/size, truncated toward zero (so
        # -7 / 2 is -3, not NumPy's floor -4), as Horovod's CPU path scales.
        neg = tf.constant([-3 - rank, 5 + rank, -1, 0], tf.int64)
        got = hvd.allreduce(neg, op=hvd.Average).numpy()
        ranks = range(size)
        sums = np.array([sum(-3 - r for r in ranks), sum(5 + r for r in ranks),
                         -size, 0], np.float64)
        close(got, np.trunc(sums / size).astype(np.int64), "int64")
    check("allreduce_scales", scales)

    def empty():
        assert hvd.allreduce(tf.zeros([0, 4]), op=hvd.Sum).shape == (0, 4)
    check("allreduce_empty", empty)

    # --- allgather (uneven first dimension), broadcast ---------------------
    for dtype in DTYPES:
        def g(dtype=dtype):
            mine = np.concatenate([value(rank, dtype)] * (rank + 1))[: rank + 1]
            got = hvd.allgather(tf.constant(mine)).numpy()
            want = np.concatenate([
                np.concatenate([value(r, dtype)] * (r + 1))[: r + 1]
                for r in range(size)])
            close(got, want, dtype)
        check(f"allgather_{dtype}", g)

        def b(dtype=dtype):
            got = hvd.broadcast(tf.constant(value(rank, dtype)), size - 1).numpy()
            close(got, value(size - 1, dtype), dtype)
        check(f"broadcast_{dtype}", b)

    def gather_even_and_empty():
        got = hvd.allgather(tf.fill([2, 2], rank)).numpy()
        np.testing.assert_array_equal(got, np.repeat(np.arange(size), 4).reshape(-1, 2))
        got = hvd.allgather(tf.zeros([0 if rank == 0 else 1, 3])).numpy()
        assert got.shape == (size - 1, 3), got.shape
    check("allgather_even_and_empty", gather_even_and_empty)

    # --- alltoall, reducescatter ---------------------------------------------
    def a2a_rows(src: int, dst: int, dtype: str) -> np.ndarray:
        n = (src + dst) % 3
        vals = (src * 9 + dst * 3 + np.arange(2 * n).reshape(n, 2)) % 50
        return vals.astype(bool) if dtype == "bool" else vals.astype(np_dtype(dtype))

    for dtype in DTYPES:
        def a2a(dtype=dtype):
            mine = np.concatenate([a2a_rows(rank, d, dtype) for d in range(size)])
            splits = [(rank + d) % 3 for d in range(size)]
            out, got = hvd.alltoall(tf.constant(mine), splits=splits)
            want = np.concatenate([a2a_rows(s, rank, dtype) for s in range(size)])
            close(out.numpy(), want, dtype)
            np.testing.assert_array_equal(got.numpy(),
                                          [(s + rank) % 3 for s in range(size)])
        check(f"alltoall_{dtype}", a2a)

    def a2a_even_and_grad():
        x = tf.Variable(np.arange(size * 2 * 3, dtype=np.float32).reshape(-1, 3) + rank)
        with tf.GradientTape() as tape:
            out, got = hvd.alltoall(x)
            loss = tf.reduce_sum(out * out)
        base = np.arange(size * 2 * 3, dtype=np.float32).reshape(-1, 3)
        want = np.concatenate([(base + s)[2 * rank:2 * rank + 2] for s in range(size)])
        close(out.numpy(), want, "float32")
        np.testing.assert_array_equal(got.numpy(), [2] * size)
        close(tape.gradient(loss, x).numpy(), 2 * x.numpy(), "float32")
        expect_error(lambda: hvd.alltoall(tf.zeros([3, 2]), splits=[1] * (size + 1)),
                     tf.errors.InvalidArgumentError, "splits")
        expect_error(
            lambda: hvd.alltoall(tf.zeros([3, 2]), splits=[4] + [0] * (size - 1)),
            tf.errors.InvalidArgumentError, "sum 4")
    check("alltoall_even_and_grad", a2a_even_and_grad)

    def scatter_rows(rows: int) -> list[tuple[int, int]]:
        out, start = [], 0
        for r in range(size):
            n = rows // size + (1 if r < rows % size else 0)
            out.append((start, start + n))
            start += n
        return out

    for dtype in DTYPES:
        for op_name in ("Sum", "Average", "Min", "Max", "Product"):
            if dtype == "bool" and op_name == "Average":
                continue

            def rs(dtype=dtype, op_name=op_name):
                x = np.concatenate([value(rank, dtype)] * 3)[:5]
                got = hvd.reducescatter(tf.constant(x), op=OPS[op_name]).numpy()
                full = np.concatenate([expected_reduce(op_name, dtype, size)] * 3)[:5]
                lo, hi = scatter_rows(5)[rank]
                close(got, full[lo:hi], dtype)
            check(f"reducescatter_{dtype}_{op_name}", rs)

    def rs_grad_and_grouped():
        x = tf.Variable(value(rank, "float32", (4, 3)))
        with tf.GradientTape() as tape:
            out = hvd.reducescatter(x, op=hvd.Sum)
            loss = tf.reduce_sum(out * out)
        full = sum(value(r, "float32", (4, 3)) for r in range(size))
        # Horovod's convention: a Sum's gathered gradient times the size.
        close(tape.gradient(loss, x).numpy(), 2 * full * size, "float32")
        a, b = hvd.grouped_reducescatter([x, x * 2], op=hvd.Average)
        lo, hi = scatter_rows(4)[rank]
        close(a.numpy(), full[lo:hi] / size, "float32")
        close(b.numpy(), 2 * full[lo:hi] / size, "float32")
        g1, g2 = hvd.grouped_allgather([x[:1], x[:rank + 1]])
        close(g1.numpy(), np.concatenate([value(r, "float32", (4, 3))[:1]
                                          for r in range(size)]), "float32")
        assert g2.shape[0] == sum(range(1, size + 1))
    check("reducescatter_grad_and_grouped", rs_grad_and_grouped)

    # --- process sets ------------------------------------------------------------
    def process_sets():
        first = hvd.add_process_set([0])
        rest = hvd.add_process_set(list(range(1, size)))
        assert hvd.process_set_ranks(rest) == list(range(1, size))
        mine = first if rank == 0 else rest
        other = rest if rank == 0 else first
        members = hvd.process_set_ranks(mine)

        @tf.function
        def both(x):
            # A global collective and one of this rank's set, concurrently.
            return (hvd.allreduce(x, op=hvd.Sum),
                    hvd.allreduce(x, op=hvd.Average, process_set_id=mine),
                    hvd.allgather(x[:1], process_set_id=mine),
                    hvd.broadcast(x, 0, process_set_id=mine))
        x = tf.constant(value(rank, "float32"))
        g, a, ag, b = both(x)
        close(g.numpy(), expected_reduce("Sum", "float32", size), "float32")
        close(a.numpy(), sum(value(r, "float32") for r in members) / len(members),
              "float32")
        close(ag.numpy(), np.concatenate([value(r, "float32")[:1] for r in members]),
              "float32")
        close(b.numpy(), value(members[0], "float32"), "float32")
        expect_error(lambda: hvd.allreduce(x, process_set_id=other), ValueError,
                     "not a member")
        hvd.remove_process_set(first)
        hvd.remove_process_set(rest)
        expect_error(lambda: hvd.process_set_ranks(rest), ValueError, "Unknown")
        got = hvd.allreduce(x, op=hvd.Sum)
        close(got.numpy(), expected_reduce("Sum", "float32", size), "float32")
    check("process_sets", process_sets)

    # --- tf.function and tf.compat.v1 graphs --------------------------------
    @tf.function
    def fn_step(x):
        a = hvd.allreduce(x, op=hvd.Sum)
        b = hvd.allgather(x[:1])
        c = hvd.broadcast(x, 0)
        return a, b, c

    def in_function():
        for k in range(3):
            x = tf.constant(value(rank, "float32") + k)
            a, b, c = fn_step(x)
            want_a = sum(value(r, "float32") + k for r in range(size))
            close(a.numpy(), want_a, "float32")
            close(b.numpy(), np.concatenate(
                [(value(r, "float32") + k)[:1] for r in range(size)]), "float32")
            close(c.numpy(), value(0, "float32") + k, "float32")
    check("tf_function", in_function)

    def graph_mode():
        g = tf.Graph()
        with g.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [2, 3])
            a = hvd.allreduce(x, op=hvd.Average)
            b = hvd.allgather(x)
            with tf.compat.v1.Session(graph=g) as sess:
                for k in range(2):
                    got_a, got_b = sess.run([a, b], {x: value(rank, "float32") + k})
                    want = sum(value(r, "float32") + k for r in range(size)) / size
                    close(got_a, want, "float32")
                    close(got_b, np.concatenate(
                        [value(r, "float32") + k for r in range(size)]), "float32")
    check("graph_mode", graph_mode)

    # --- out of order inside one function -----------------------------------
    def slow(t):
        """`t` after a pause: forces the issue order without a data dependency."""
        out = tf.py_function(lambda v: (time.sleep(0.3), v)[1], [t], t.dtype)
        out.set_shape(t.shape)
        return out

    @tf.function
    def reversed_order(x):
        # Rank 0 issues 'ooo.a' before 'ooo.b', the others the reverse order.
        if rank == 0:
            a = hvd.allreduce(x, op=hvd.Sum, name="ooo.a")
            b = hvd.allreduce(slow(x * 2), op=hvd.Sum, name="ooo.b")
        else:
            a = hvd.allreduce(slow(x), op=hvd.Sum, name="ooo.a")
            b = hvd.allreduce(x * 2, op=hvd.Sum, name="ooo.b")
        return a, b

    def out_of_order():
        x = tf.constant(value(rank, "float32"))
        a, b = reversed_order(x)
        want = expected_reduce("Sum", "float32", size)
        close(a.numpy(), want, "float32")
        close(b.numpy(), want * 2, "float32")
    check("out_of_order", out_of_order)

    # --- mismatches: the error on every rank ---------------------------------
    def mismatch_shape():
        x = tf.zeros([4, 2 + (rank % 2)])
        expect_error(lambda: hvd.allreduce(x, name="mm.shape"),
                     tf.errors.FailedPreconditionError, "mm.shape",
                     "rank 0 has [4, 2]", "rank 1 has [4, 3]")
    check("mismatch_shape", mismatch_shape)

    def mismatch_dtype():
        x = tf.zeros([3], tf.float32 if rank == 0 else tf.float64)
        expect_error(lambda: hvd.allreduce(x, name="mm.dtype"),
                     tf.errors.FailedPreconditionError, "mm.dtype",
                     "rank 0 has float32", "rank 1 has float64")
    check("mismatch_dtype", mismatch_dtype)

    def mismatch_root():
        expect_error(lambda: hvd.broadcast(tf.zeros([2]), rank % 2, name="mm.root"),
                     tf.errors.FailedPreconditionError, "mm.root", "root ranks",
                     "rank 0 has 0", "rank 1 has 1")
    check("mismatch_root", mismatch_root)

    def mismatch_op():
        op = hvd.Sum if rank == 0 else hvd.Max
        expect_error(lambda: hvd.allreduce(tf.zeros([2]), op=op, name="mm.op"),
                     tf.errors.FailedPreconditionError, "mm.op", "rank 0 has Sum",
                     "rank 1 has Max")
    check("mismatch_op", mismatch_op)

    def mismatch_kind():
        fn = hvd.allgather if rank == 0 else hvd.allreduce
        expect_error(lambda: fn(tf.zeros([2]), name="mm.kind"),
                     tf.errors.FailedPreconditionError, "mm.kind",
                     "rank 0 did allgather", "rank 1 did allreduce")
    check("mismatch_kind", mismatch_kind)

    def after_mismatch():
        got = hvd.allreduce(tf.ones([2]), op=hvd.Sum)
        close(got.numpy(), np.full([2], size, np.float32), "float32")
    check("after_mismatch", after_mismatch)

    # --- bad local input -------------------------------------------------------
    def bad_input():
        expect_error(lambda: hvd.broadcast(tf.zeros([2]), -1),
                     tf.errors.InvalidArgumentError, "root_rank")
        # A name already pending on this rank is refused. Rank 0 issues 'dup'
        # from two threads; neither can complete before the other ranks issue
        # 'dup', which they do only after a barrier that rank 0 reaches once
        # one of its two was refused: exactly one is refused, whatever the
        # timing, and the other completes with the right sum.
        x = tf.fill([4], float(rank + 1))
        want = np.full([4], size * (size + 1) / 2, np.float32)
        if rank == 0:
            outcomes: list = [None, None]
            refused = threading.Event()

            def issue(i: int) -> None:
                try:
                    outcomes[i] = hvd.allreduce(x, op=hvd.Sum, name="dup").numpy()
                except tf.errors.InvalidArgumentError as e:
                    outcomes[i] = e.message
                    refused.set()

            threads = [threading.Thread(target=issue, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            assert refused.wait(60), f"neither 'dup' was refused: {outcomes}"
            hvd.barrier()
            for t in threads:
                t.join(60)
            errors = [o for o in outcomes if isinstance(o, str)]
            sums = [o for o in outcomes if isinstance(o, np.ndarray)]
            assert len(errors) == 1 and len(sums) == 1, outcomes
            assert "'dup' is already pending on this rank (rank 0)" in errors[0], errors
            close(sums[0], want, "float32")
        else:
            hvd.barrier()
            close(hvd.allreduce(x, op=hvd.Sum, name="dup").numpy(), want, "float32")
        hvd.barrier()
    check("bad_input", bad_input)

    # --- grouped and fused ---------------------------------------------------------
    def grouped():
        xs = [tf.constant(value(rank, d)) for d in ("float32", "int32", "float32")]
        got = hvd.grouped_allreduce(xs, op=hvd.Sum)
        for t, d in zip(got, ("float32", "int32", "float32")):
            close(t.numpy(), expected_reduce("Sum", d, size), d)
    check("grouped", grouped)

    @tf.function
    def many(xs):
        return [hvd.allreduce(x, op=hvd.Average) for x in xs]

    def fusion():
        before = hvd.debug_counters()
        # Above the size whose values travel with the negotiation (2 KB).
        xs = [tf.fill([600 + i], float(rank + i)) for i in range(40)]
        fused = many(xs)
        one_by_one = [hvd.allreduce(x, op=hvd.Average) for x in xs]
        after = hvd.debug_counters()
        for a, b, i in zip(fused, one_by_one, range(40)):
            want = np.full([600 + i], sum(r + i for r in range(size)) / size,
                           np.float32)
            close(a.numpy(), want, "float32")
            close(b.numpy(), want, "float32")
        n_fused = after["fused_executions"] - before["fused_executions"]
        n_tensors = after["fused_tensors"] - before["fused_tensors"]
        assert n_fused >= 1 and n_tensors >= 20, (before, after)
        results["fusion_counts"] = [n_fused, n_tensors]
    check("fusion", fusion)

    # --- gradients -------------------------------------------------------------------
    def gradients():
        x = tf.Variable(value(rank, "float32"))
        with tf.GradientTape(persistent=True) as tape:
            y_avg = hvd.allreduce(x * (rank + 1.0), op=hvd.Average)
            loss_avg = tf.reduce_sum(y_avg * y_avg)
            gathered = hvd.allgather(x)
            loss_gather = tf.reduce_sum(gathered * np.arange(size * 2, dtype=np.float32)
                                        .repeat(3).reshape(-1, 3))
            bcast = hvd.broadcast(x, 0)
            loss_bcast = tf.reduce_sum(bcast * 3.0)
        # d/dx_r sum(y^2) with y = mean_s((s+1) x_s): every rank's gradient
        # (2y) averaged, times (r+1).
        y = sum((r + 1.0) * value(r, "float32") for r in range(size)) / size
        close(tape.gradient(loss_avg, x).numpy(),
              (2 * y * (rank + 1.0)).astype(np.float32), "float32")
        # Each rank's gather gradient is the same weights; averaged over the
        # ranks, as Horovod does, then this rank's rows.
        w = np.arange(size * 2, dtype=np.float32).repeat(3).reshape(-1, 3)
        close(tape.gradient(loss_gather, x).numpy(), w[2 * rank:2 * rank + 2],
              "float32")
        # Broadcast: the averaged gradient on the root, zero elsewhere.
        want_b = np.full([2, 3], 3.0 if rank == 0 else 0.0, np.float32)
        close(tape.gradient(loss_bcast, x).numpy(), want_b, "float32")
    check("gradients", gradients)

    # --- join -------------------------------------------------------------------
    def join():
        if rank == 0:
            last = int(hvd.join())
        else:
            got = hvd.allreduce(tf.fill([3], float(rank)), op=hvd.Sum, name="join.ar")
            close(got.numpy(), np.full([3], sum(range(1, size)), np.float32), "float32")
            got = hvd.allgather(tf.fill([1], float(rank)), name="join.ag")
            close(got.numpy(), np.arange(1, size, dtype=np.float32), "float32")
            last = int(hvd.join())
        assert last != 0, last
        results["join_last"] = last
    check("join", join)

    # --- latency ------------------------------------------------------------------
    def latency():
        x = tf.ones([4])
        for _ in range(20):
            hvd.allreduce(x, op=hvd.Sum)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            hvd.allreduce(x, op=hvd.Sum)
        timings["eager_allreduce_4floats_s"] = (time.perf_counter() - t0) / n

        @tf.function
        def loop(x):
            for _ in range(20):
                x = hvd.allreduce(x, op=hvd.Sum) * (1.0 / size)
            return x
        loop(x)
        t0 = time.perf_counter()
        for _ in range(10):
            loop(x)
        timings["function_allreduce_4floats_s"] = (time.perf_counter() - t0) / 200
        timings["native_allreduce_4floats_s"] = _mpi_ops.time_native_allreduce(4, 200)
        big = tf.ones([1 << 20])
        hvd.allreduce(big, op=hvd.Sum)
        t0 = time.perf_counter()
        for _ in range(5):
            hvd.allreduce(big, op=hvd.Sum)
        timings["eager_allreduce_4MB_s"] = (time.perf_counter() - t0) / 5
        timings["native_allreduce_4MB_s"] = _mpi_ops.time_native_allreduce(1 << 20, 5)
    if TIMINGS:
        check("latency", latency)

    # --- stall: names issued by some ranks only --------------------------------------
    def stall():
        hvd.shutdown_engine()
        os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = "2"
        os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = "1"
        hvd.init_engine()
        missing = ("rank " if size == 2 else "ranks ") + ", ".join(
            str(r) for r in range(1, size))
        # Rank 0 issues a name the others never issue; they wait on a name
        # rank 0 never reaches. Both end in the stall error on every rank.
        lonely = ("allreduce of tensor 'lonely' issued by rank 0 is waiting for "
                  + missing)
        name = "lonely" if rank == 0 else "behind.lonely"
        expect_error(lambda: hvd.allreduce(tf.ones([2]), name=name),
                     tf.errors.DeadlineExceededError, "stalled for more than 2 s",
                     lonely, "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")
        # Every rank issues a name of its own.
        mine = f"stall.r{rank}"
        expect_error(lambda: hvd.allreduce(tf.ones([2]), name=mine),
                     tf.errors.DeadlineExceededError, "stalled for more than 2 s",
                     "of tensor 'stall.r", "which did not issue it")
        # The set is still usable.
        got = hvd.allreduce(tf.ones([2]), op=hvd.Sum, name="after.stall")
        close(got.numpy(), np.full([2], size, np.float32), "float32")
        assert hvd.debug_counters()["stalls"] >= 2
    check("stall", stall)

    hvd.shutdown_engine()
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "size": size, "results": results,
                   "timings": timings, "durations": durations}, f)


def stopped_peer() -> None:
    hvd.init_engine()
    rank = hvd.rank()
    hvd.allreduce(tf.ones([8]), name="before.stop")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, its threads too
        time.sleep(600)
    try:
        hvd.allreduce(tf.ones([8]), name="after.stop")
        message = "no error"
    except tf.errors.DeadlineExceededError as e:
        message = e.message
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump({"message": message}, f)
    os._exit(3)  # MPI cannot finalise with a collective in flight


def failed_peer() -> None:
    hvd.init_engine()
    rank = hvd.rank()
    hvd.allreduce(tf.ones([8]), name="before.error")
    if rank == 1 and EXIT:
        sys.exit(0)  # one step early: the exit handlers run as usual
    if rank == 1 and REPLACED_HOOK:
        def own_hook(exc_type, exc, tb):
            print(f"the script's own hook: {exc_type.__name__}: {exc}", flush=True)

        sys.excepthook = own_hook
        raise ValueError("rank 1 cannot go on")  # nothing catches it
    if rank == 1:
        try:
            raise ValueError("rank 1 cannot go on")
        except ValueError:
            # What Python does with an exception nothing caught, before it
            # runs the exit handlers; the process then stays, so that rank
            # 0's error cannot come from its exit.
            sys.excepthook(*sys.exc_info())
        time.sleep(20)
        os._exit(1)
    start = time.monotonic()
    try:
        hvd.allreduce(tf.ones([8]), name="after.error")
        message = "no error"
    except tf.errors.OpError as e:
        message = f"{type(e).__name__}: {e.message}"
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump({"message": message, "seconds": time.monotonic() - start}, f)
    os._exit(3)  # MPI cannot finalise with a collective in flight


if __name__ == "__main__":
    if STOP:
        stopped_peer()
    elif UNCAUGHT or EXIT or REPLACED_HOOK:
        failed_peer()
    else:
        main()
