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
    2: ("collectives,partial_tape,broadcast_callback_local,broadcast_callback_cases,"
        "local_gradients_any_op,"
        "sync_batch_norm,sdp,tape,fit,sdp_fit,fit_clip_accumulate,fit_adamw_exclude,"
        "mixed_precision,elastic"),
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
    checks = (("fit", "tape", "sdp_fit", "fit_clip_accumulate", "fit_adamw_exclude")
              if nproc == 2 else ("fit", "tape"))
    for check in checks:
        assert all(r[check]["same_on_every_rank"] for r in results), check
        assert root[check]["weights_rel_diff"] < 1e-5, (check, root[check])
    assert root["fit"]["moved"] > 0.1


def test_elastic_keras_script_runs_at_a_fixed_size(job):
    # hvd.elastic: the first sync gave every rank rank 0's weights and state
    # (rank 1 started at epoch 3), the host update recorded on rank 0 after
    # the first epoch interrupted both ranks at the commit that followed,
    # `run` reset and called the function again for the one epoch left, and
    # training equals one process on the whole batches.
    results = job(2)
    for r in results:
        e = r["elastic"]
        assert e["calls"] == [0, 1] and e["resets"] == [1], e
        assert e["final_epoch"] == 2 and e["same_on_every_rank"] and e["restored"], e
    assert results[0]["elastic"]["weights_rel_diff"] < 1e-5, results[0]["elastic"]


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
        assert ("hvd.allreduce cannot run inside a function compiled with XLA"
                in c["xla"])


def test_partial_tape_sync_batch_norm_and_sdp(job):
    for r, res in enumerate(job(2)):
        assert res["partial_tape"] == {"local_scaled": True, "shared_averaged": True,
                                       "split": True}
        # BroadcastGlobalVariablesCallback(local_variables=...), as in Horovod.
        assert res["broadcast_callback_local"] == {"local_kept": True,
                                                   "others_from_root": True}, r
        bn = res["sync_batch_norm"]
        assert max(bn.values()) < 1e-5, (r, bn)
        assert res["sdp"] == {"allreduce": True, "oob": 2.0}


def test_broadcast_callback_where_ranks_start_with_different_variables(job):
    # Found by a Horovod-style MNIST script (a Sequential without Input,
    # with Dropout) and Horovod's resume pattern (only rank 0 loads the
    # checkpoint): the callback broadcast only what existed at the start,
    # so ranks trained on different weights, or waited on each other's
    # broadcasts until the stall timeout.
    results = job(2)
    for r, res in enumerate(results):
        cases = res["broadcast_callback_cases"]
        assert cases["lazy_same_on_every_rank"] is True, r
        assert cases["resumed_same_on_every_rank"] is True, r
        # Rank 0's restored step count (7) plus the 4 steps trained.
        assert cases["resumed_iterations"] == 11, r
        assert cases["aggregated_same_on_every_rank"] is True, r
        # Horovod's warm-up: the last warm-up batch runs at initial_lr
        # (0.2); epoch 1 ends at (1 + 1 / 2) / 2 of it on 2 processes.
        assert cases["warmup_lr"] == pytest.approx([0.15, 0.2, 0.2], rel=1e-6), r
    # Each rank's aggregated gradients are not the root's: two batches
    # summed equal one step on both batches together.
    assert results[0]["broadcast_callback_cases"]["aggregated_rel_diff"] < 1e-5


def test_local_gradients_are_scaled_whatever_the_op(job):
    # Horovod divides a local variable's gradient by the set's size for any
    # op (it did so only for Average here); 3 / 2 processes.
    for r, res in enumerate(job(2)):
        local = res["local_gradients_any_op"]
        assert local["tape"] == pytest.approx(1.5), r
        assert local["keras_step"] == pytest.approx(1.5), r
        # scale_local_gradients=False keeps it; the shared one is summed (1 + 2).
        assert local["partial_local"] == pytest.approx(1.0), r
        assert local["partial_shared"] == pytest.approx(3.0), r


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


_DYNAMIC_SETS_WORKER = """
import json, sys
import tensorflow as tf
import tf_smdist.horovod as hvd
import tf_smdist.horovod.keras as hvd_keras

hvd.init()
rank, size = hvd.rank(), hvd.size()
out = {}
first = hvd.add_process_set([0])
rest = hvd.add_process_set(range(1, size))
ids = [first.process_set_id, rest.process_set_id]
out["ids"] = ids
out["ids_everywhere"] = hvd.allgather(tf.constant([ids])).numpy().tolist()
out["str"] = [str(p) for p in (hvd.global_process_set, first, rest)]
out["duplicates"] = []
for ranks in ([0], list(range(size - 1, 0, -1)), list(range(size))):
    try:
        hvd.add_process_set(ranks)
        out["duplicates"].append("added")
    except ValueError as e:
        out["duplicates"].append("duplicate" if "duplicate" in str(e) else str(e))
out["removed"] = [hvd.remove_process_set(first), hvd.remove_process_set(first),
                  first.process_set_id]
ends = hvd.add_process_set([0, size - 1])
out["reused_id"] = ends.process_set_id
if rank in (0, size - 1):
    total = hvd.allreduce(tf.constant([rank + 1.0]), op=hvd.Sum, process_set=ends)
    out["ends_sum"] = float(total.numpy()[0])
twin_global, pair, twin_pair = (hvd.ProcessSet(range(size)), hvd.ProcessSet([0, 1]),
                                hvd.ProcessSet([1, 0]))
hvd.init(process_sets=[twin_global, pair, twin_pair])
out["init_ids"] = [twin_global.process_set_id, pair.process_set_id,
                   twin_pair.process_set_id]
out["table"] = {str(k): v for k, v in hvd.mpi_ops.process_set_table().items()}
for ps in (rest, ends, pair):
    hvd.remove_process_set(ps)
again = hvd.add_process_set([1])
out["next_id"] = again.process_set_id
hvd.remove_process_set(again)
out["table_end"] = {str(k): v for k, v in hvd.mpi_ops.process_set_table().items()}
summed = hvd_keras.allreduce([float(rank)], op=hvd.Sum, name="keras_sum")
out["keras_result"] = [isinstance(summed, tf.Tensor), float(summed.numpy()[0])]
hvd.barrier()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
"""


def test_dynamic_process_sets_and_keras_results_as_horovod(tmp_path):
    # Horovod's dynamic process sets: a set with the ranks of a registered one
    # (the global set included) is refused with ValueError; removed sets' ids
    # are given out again, oldest first, and collectives over the reused id
    # run over the new ranks; sets print as Horovod's; init(process_sets=)
    # leaves twins unregistered. Keras-level collectives return tensors.
    script = tmp_path / "dynamic_sets.py"
    script.write_text(_DYNAMIC_SETS_WORKER)
    proc = launch(["--nproc", "3", str(script), str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for r, res in enumerate(results):
        assert res["ids"] == [1, 2], r
        assert res["ids_everywhere"] == [[1, 2]] * 3, r
        assert res["str"] == [
            "ProcessSet(process_set_id=0, ranks=[0, 1, 2], mpi_comm=None)",
            "ProcessSet(process_set_id=1, ranks=[0], mpi_comm=None)",
            "ProcessSet(process_set_id=2, ranks=[1, 2], mpi_comm=None)"], r
        assert res["duplicates"] == ["duplicate"] * 3, r
        assert res["removed"] == [True, False, None], r
        assert res["reused_id"] == 1, r
        assert res["init_ids"] == [None, 3, None], r
        assert res["table"] == {"0": [0, 1, 2], "1": [0, 2], "2": [1, 2], "3": [0, 1]}
        assert res["next_id"] == 2, r  # removed 2, 1, 3 in that order
        assert res["table_end"] == {"0": [0, 1, 2]}, r
        assert res["keras_result"] == [True, 3.0], r
    assert [res.get("ends_sum") for res in results] == [4.0, None, 4.0]


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


def test_horovod_elastic_example_runs_under_the_launcher():
    # The elastic state, its run wrapper and callbacks as a Horovod elastic
    # script uses them: 2 epochs, then every rank holds the same weights.
    script = os.path.join(REPO, "examples", "horovod_elastic.py")
    proc = launch(["--nproc", "2", script, "--epochs", "2"], timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    done = [line for line in proc.stdout.splitlines()
            if "elastic training done" in line]
    assert len(done) == 1 and done[0].startswith("[rank 0]"), done
    assert "epoch 2," in done[0], done
    assert done[0].endswith("weights equal on every rank: True"), done
