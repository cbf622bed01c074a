"""The Horovod-compatible API across 2 and 3 localhost processes."""

from __future__ import annotations

import json
import os

import pytest
from mp_util import REPO, TESTS, launch, requires_mpi

WORKER = os.path.join(TESTS, "hvd_worker.py")
pytestmark = [pytest.mark.slow, requires_mpi]


def _results(out, nproc: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc", [2, 3])
def test_horovod_api_across_processes(tmp_path, nproc):
    proc = launch(["--nproc", str(nproc), WORKER, str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    results = _results(tmp_path, nproc)
    assert [r["size"] for r in results] == [nproc] * nproc

    root = results[0]
    # model.fit with DistributedOptimizer + the broadcast callback, each rank
    # on its part of every batch, ends where one process trained on the
    # whole batches ends; the same for the tape and for sdp's spelling.
    for check in ("fit", "sdp_fit", "tape"):
        assert all(r[check]["same_on_every_rank"] for r in results), check
        assert root[check]["weights_rel_diff"] < 1e-5, (check, root[check])
    assert root["fit"]["moved"] > 0.1
    # MetricAverageCallback: the logs are the mean of the ranks' own values
    # (which differed), and so equal the whole-batch losses.
    assert root["fit"]["ranks_differ_before_average"]
    assert root["fit"]["metric_average_diff"] < 1e-6
    assert root["fit"]["loss_vs_whole_batch"] < 1e-5

    for r, res in enumerate(results):
        c = res["collectives"]
        for key in ("sparse", "dense", "keras_numpy", "broadcast_object",
                    "allgather_object", "broadcast_"):
            assert c[key] is True, (r, key)
        # d/dw of sum_r(w_r^2), summed over the ranks' identical losses.
        assert c["allreduce_grad"] == pytest.approx(2.0 * (r + 1) * nproc)
        assert res["partial_tape"] == {"local_scaled": True, "shared_averaged": True}
        bn = res["sync_batch_norm"]
        assert max(bn.values()) < 1e-5, (r, bn)
        assert res["sdp"] == {"allreduce": True, "oob": float(nproc)}

    if nproc >= 3:
        sets = [res["process_sets"] for res in results]
        for r in (0, 1):
            assert sets[r]["pair_sum"] == 3.0
            assert sets[r]["pair_rank"] == r
            assert sets[r]["pair_gather"] == [0, 1]
        assert sets[2]["pair_rank"] == -1
        assert all(s["removed"] is True for s in sets)


def test_horovod_keras_example_runs_under_the_launcher(tmp_path):
    script = os.path.join(REPO, "examples", "horovod_keras.py")
    proc = launch(["--nproc", "2", script, "--epochs", "2",
                   "--checkpoint-dir", str(tmp_path)], timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    # Rank 0 writes the checkpoint and prints the progress; rank 1 does not.
    assert os.path.exists(tmp_path / "checkpoint-2.keras")
    assert "[rank 0]" in proc.stdout and "final loss" in proc.stdout
    final = [line for line in proc.stdout.splitlines() if "final loss" in line]
    assert len(final) == 1 and final[0].startswith("[rank 0]")
