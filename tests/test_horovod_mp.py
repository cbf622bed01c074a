"""The Horovod-compatible API across 2 and 3 localhost processes.

One launch per process count runs many checks (tests/hvd_worker.py); the
tests below assert on the JSON each rank wrote.
"""

from __future__ import annotations

import json
import os

import pytest
from mp_util import REPO, TESTS, launch, requires_mpi

WORKER = os.path.join(TESTS, "hvd_worker.py")
pytestmark = [pytest.mark.slow, requires_mpi]
CHECKS = {
    2: ("collectives,partial_tape,broadcast_callback_local,sync_batch_norm,sdp,tape,"
        "fit,sdp_fit,mixed_precision"),
    3: "collectives,process_sets,tape,fit,v1_optimizer",
}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    cache: dict[int, list[dict]] = {}

    def run(nproc: int) -> list[dict]:
        if nproc not in cache:
            out = tmp_path_factory.mktemp(f"hvd{nproc}")
            proc = launch(["--nproc", str(nproc), WORKER, str(out), CHECKS[nproc]],
                          timeout=600)
            assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
            cache[nproc] = [json.loads((out / f"rank{r}.json").read_text())
                            for r in range(nproc)]
            assert [r["size"] for r in cache[nproc]] == [nproc] * nproc
        return cache[nproc]

    return run


@pytest.mark.parametrize("nproc", [2, 3])
def test_fit_and_tape_equal_one_process_on_the_whole_batches(job, nproc):
    # model.fit with DistributedOptimizer + the broadcast callback (each rank
    # seeded differently) and a DistributedGradientTape loop, each rank on its
    # part of every batch, end where one process trained on the whole
    # batches ends.
    results = job(nproc)
    root = results[0]
    checks = ("fit", "tape", "sdp_fit") if nproc == 2 else ("fit", "tape")
    for check in checks:
        assert all(r[check]["same_on_every_rank"] for r in results), check
        assert root[check]["weights_rel_diff"] < 1e-5, (check, root[check])
    assert root["fit"]["moved"] > 0.1


def test_loss_scaling_skips_a_step_on_every_rank_together(job):
    # mixed_float16: only rank 1's first batch overflows. Every rank skips
    # that step and halves its loss scale (before, rank 0 applied it and
    # waited in an all-reduce that rank 1 never issued), whether Keras wraps
    # the DistributedOptimizer or the user wraps the LossScaleOptimizer.
    results = job(2)
    for wrap in ("compile", "explicit"):
        for r in results:
            entry = r["mixed_precision"][wrap]
            assert entry["same_on_every_rank"], (wrap, entry)
            assert entry["scale"] == 2.0**14 and entry["iterations"] == 3, (wrap, entry)


def test_tf1_distributed_optimizer_equals_one_process_on_the_whole_batches(job):
    # hvd.DistributedOptimizer over tf.compat.v1.train.MomentumOptimizer in
    # TF1 sessions (each rank starts elsewhere; broadcast_global_variables
    # fixes it), each rank on its third of every batch.
    results = job(3)
    assert all(r["v1_optimizer"]["same_on_every_rank"] for r in results)
    root = results[0]["v1_optimizer"]
    assert root["weights_rel_diff"] < 1e-5, root
    assert root["moved"] > 0.05 and root["unreduced_rel_diff"] > 1e-3, root


@pytest.mark.parametrize("nproc", [2, 3])
def test_metric_average_callback_averages_the_logs(job, nproc):
    root = job(nproc)[0]["fit"]
    assert root["ranks_differ_before_average"]
    assert root["metric_average_diff"] < 1e-6
    # The mean of equal shards' losses is the whole batch's loss.
    assert root["loss_vs_whole_batch"] < 1e-5


@pytest.mark.parametrize("nproc", [2, 3])
def test_collectives_through_the_public_api(job, nproc):
    for r, res in enumerate(job(nproc)):
        c = res["collectives"]
        for key in ("sparse", "sparse_int_average", "alltoall", "dense", "keras_numpy",
                    "broadcast_object", "allgather_object", "broadcast_",
                    "broadcast_graph", "graph_grouped"):
            assert c[key] is True, (r, key)
        # d/dw of sum_r(w_r^2), summed over the ranks' identical losses.
        assert c["allreduce_grad"] == pytest.approx(2.0 * (r + 1) * nproc)


def test_partial_tape_sync_batch_norm_and_sdp(job):
    for r, res in enumerate(job(2)):
        assert res["partial_tape"] == {"local_scaled": True, "shared_averaged": True}
        # BroadcastGlobalVariablesCallback(local_variables=...), as in Horovod.
        assert res["broadcast_callback_local"] == {"local_kept": True,
                                                   "others_from_root": True}, r
        bn = res["sync_batch_norm"]
        assert max(bn.values()) < 1e-5, (r, bn)
        assert res["sdp"] == {"allreduce": True, "oob": 2.0}


def test_process_sets(job):
    sets = [res["process_sets"] for res in job(3)]
    if "unsupported" in sets[0]:
        pytest.skip(sets[0]["unsupported"])
    for r in (0, 1):
        assert sets[r]["pair_sum"] == 3.0
        assert sets[r]["pair_rank"] == r
        assert sets[r]["pair_gather"] == [0, 1]
    assert sets[2]["pair_rank"] == -1
    assert [s["included_op"] for s in sets] == [1, 1, 0]
    assert sets[2]["non_member_error"] == "NotAMemberError+ValueError"
    assert all(s["removed"] is True for s in sets)
    # root_rank 2 is a rank of the job (rank 1 of the set [1, 2]), as in Horovod.
    assert [s.get("tail_broadcast") for s in sets] == [None, 2.0, 2.0]
    assert [s.get("tail_object") for s in sets] == [None, "from 2", "from 2"]
    # Rank 0 is outside [1, 2]: its tape keeps its own gradient 2x; the
    # others average 2*2 and 2*3.
    assert [s["tape_grad"] for s in sets] == [2.0, 5.0, 5.0]


def test_horovod_keras_example_runs_under_the_launcher(tmp_path):
    script = os.path.join(REPO, "examples", "horovod_keras.py")
    proc = launch(["--nproc", "2", script, "--epochs", "2",
                   "--checkpoint-dir", str(tmp_path)], timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    # Rank 0 writes the checkpoints and prints the progress; rank 1 does not.
    assert os.path.exists(tmp_path / "checkpoint-2.keras")
    final = [line for line in proc.stdout.splitlines() if "final loss" in line]
    assert len(final) == 1 and final[0].startswith("[rank 0]")
    assert not any(line.startswith("[rank 1] Epoch") for line in
                   proc.stdout.splitlines())
