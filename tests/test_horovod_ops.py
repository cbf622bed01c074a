"""Horovod-compatible raw collectives: single process, and 2 and 3 processes."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from mp_util import TESTS, launch, requires_mpi

from tf_smdist.horovod import mpi_ops as hvd

WORKER = os.path.join(TESTS, "mp_hvd_worker.py")
logger = logging.getLogger(__name__)
# Checks every rank must have run (and passed).
DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "int64", "float16", "bfloat16",
          "float32", "float64", "bool")
OPS = ("Sum", "Average", "Min", "Max", "Product")
REQUIRED = {
    *(f"{kind}_{d}_{op}" for kind in ("allreduce", "reducescatter") for d in DTYPES
      for op in OPS if not (d == "bool" and op == "Average")),
    *(f"{kind}_{d}" for kind in ("allgather", "broadcast", "alltoall") for d in DTYPES),
    "allreduce_large", "allreduce_ring", "allreduce_scales", "allreduce_empty",
    "allgather_even_and_empty",
    "alltoall_even_and_grad", "reducescatter_grad_and_grouped", "process_sets",
    "tf_function", "graph_mode", "out_of_order", "mismatch_shape", "mismatch_dtype",
    "mismatch_root", "mismatch_op", "mismatch_kind", "after_mismatch", "bad_input",
    "grouped", "fusion", "gradients", "join", "stall",
}


def test_single_process_collectives_return_their_input():
    hvd.init_engine()
    assert (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()) == (0, 1, 0, 1)
    assert (hvd.cross_rank(), hvd.cross_size(), hvd.is_homogeneous()) == (0, 1, True)
    x = tf.constant([[1, 2], [3, 4]])
    np.testing.assert_array_equal(hvd.allreduce(x, op=hvd.Sum), x)
    np.testing.assert_array_equal(
        hvd.allreduce(x, op=hvd.Average, prescale_factor=3.0, postscale_factor=0.5),
        [[1, 3], [4, 6]])
    np.testing.assert_array_equal(hvd.allgather(x), x)
    np.testing.assert_array_equal(hvd.broadcast(x, 0), x)
    out, splits = hvd.alltoall(x)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(splits, [2])
    np.testing.assert_array_equal(hvd.reducescatter(x, op=hvd.Sum), x)
    assert int(hvd.join()) == 0
    assert hvd.barrier() is None
    grouped = hvd.grouped_allreduce([x, tf.ones([3])], op=hvd.Sum)
    np.testing.assert_array_equal(grouped[1], np.ones(3))
    v = tf.Variable([1.0, 2.0])
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(hvd.allreduce(v * 3.0))
    np.testing.assert_array_equal(tape.gradient(y, v), [3.0, 3.0])
    ps = hvd.add_process_set([0])
    assert hvd.process_set_ranks(ps) == [0]
    np.testing.assert_array_equal(hvd.allreduce(x, process_set_id=ps), x)
    hvd.remove_process_set(ps)
    assert hvd.debug_counters()["fused_executions"] == 0


def test_single_process_argument_errors():
    hvd.init_engine()
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.allreduce(tf.ones([2]), op=hvd.Adasum)
    with pytest.raises(ValueError, match="op=7"):
        hvd.allreduce(tf.ones([2]), op=7)
    with pytest.raises(TypeError, match="dtype=string"):
        hvd.allreduce(tf.constant(["a"]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="root_rank=1"):
        hvd.broadcast(tf.ones([2]), 1)
    with pytest.raises(ValueError, match="rank >= 1"):
        hvd.allgather(tf.constant(1.0))
    with pytest.raises(ValueError, match="ranks=\\[0, 3\\]"):
        hvd.add_process_set([0, 3])
    with pytest.raises(ValueError, match="process_set_id=5"):
        hvd.allreduce(tf.ones([2]), process_set_id=5)


def test_shutdown_then_queries_fail():
    hvd.init_engine()
    hvd.shutdown_engine()
    assert not hvd.is_engine_initialized()
    with pytest.raises(ValueError, match="hvd.init"):
        hvd.rank()
    hvd.init_engine()
    assert hvd.is_engine_initialized()


def test_docstring_examples_run():
    import doctest

    failures, tried = doctest.testmod(hvd, extraglobs={"tf": tf})
    assert tried > 20 and failures == 0


@pytest.mark.slow
@requires_mpi
@pytest.mark.parametrize("nproc", [2, 3])
def test_collectives_across_processes(tmp_path, nproc):
    args = ["--nproc", str(nproc), WORKER, str(tmp_path)]
    args += ["--timings"] if nproc == 2 else []
    # The ring from 256 KB (by default it starts at 48 MiB / (processes - 1)),
    # in small chunks, so that the ring check's blocks span several.
    proc = launch(args, timeout=300, env={"SMDIST_MPI_RING_BYTES": "262144",
                                          "SMDIST_MPI_RING_CHUNK_BYTES": "65536"})
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    for r in range(nproc):
        with open(os.path.join(tmp_path, f"rank{r}.json")) as f:
            res = json.load(f)
        assert (res["rank"], res["size"]) == (r, nproc)
        failed = {k: v for k, v in res["results"].items()
                  if isinstance(v, str) and v != "ok"}
        assert not failed, f"rank {r}: " + "\n".join(
            f"{k}: {v}" for k, v in failed.items())
        missing = REQUIRED - set(res["results"])
        assert not missing, f"rank {r} did not run {sorted(missing)}"
        logger.info("rank %d timings: %s", r, res["timings"])
    # Before the stall check's set gave up on 'lonely', rank 0 warned about it.
    assert re.search(r"warning: for \d+ s, allreduce of tensor 'lonely' issued by "
                     r"rank 0 is waiting for ranks? 1", proc.stdout + proc.stderr)


@pytest.mark.slow
@requires_mpi
def test_stopped_rank_fails_the_waiting_collective_naming_it(tmp_path):
    proc = launch(["--nproc", "2", WORKER, str(tmp_path), "--stop"], timeout=180,
                  env={"SMDIST_MPI_TIMEOUT": "5"})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "rank0.json") as f:
        message = json.load(f)["message"]
    assert "'after.stop'" in message
    assert "Rank 1 sent no heartbeat" in message
    assert "did not complete within 5 s" in message


# How rank 1 leaves (mp_hvd_worker's mode) -> what rank 0's error says about
# it, and a line rank 1 printed on the way out (or None).
_DEPARTURES = {
    # Its exception stops its communication before Python's exit handlers
    # run (tf_smdist's sys.excepthook); the hook installed before (Python's
    # own) still prints the traceback.
    "--uncaught": ("Rank 1 has itself failed", "ValueError: rank 1 cannot go on"),
    # It leaves its script a step early (sys.exit(0)): its exit handlers
    # shut its communication down in order.
    "--exit": ("Rank 1 has left training", None),
    # Its script replaced tf_smdist's sys.excepthook: the exit handler sees
    # the uncaught exception (sys.last_value) and stops the communication as
    # the hook would have.
    "--replaced-hook": ("Rank 1 has itself failed",
                        "the script's own hook: ValueError: rank 1 cannot go on"),
}


@pytest.mark.slow
@requires_mpi
@pytest.mark.parametrize("mode", sorted(_DEPARTURES))
def test_a_rank_that_fails_or_leaves_fails_the_others_at_once(tmp_path, mode):
    # Rank 0's next collective fails about half a second after it learns
    # that rank 1 failed or left, naming it, instead of waiting out the
    # watchdog's 60 s.
    said, printed = _DEPARTURES[mode]
    proc = launch(["--nproc", "2", WORKER, str(tmp_path), mode], timeout=180,
                  env={"SMDIST_MPI_TIMEOUT": "60"})
    assert proc.returncode != 0
    with open(tmp_path / "rank0.json") as f:
        res = json.load(f)
    assert res["message"].startswith("FailedPreconditionError"), res["message"]
    assert "it needs rank 1" in res["message"]
    assert said in res["message"]
    assert res["seconds"] < 15, res["seconds"]
    if printed is not None:
        assert printed in proc.stdout + proc.stderr
