"""PipelineModel with one process per stage, and pipelines × data parallelism.

Each launch runs several checks in one job (see mp_pipeline_worker.py); the
assembled weights after `fit` must equal the plain Keras model's trained on
the same global batches with the loss averaged over the global batch.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import pytest
from mp_pipeline_common import (
    CASES,
    EMBEDDING_CLIP,
    EVALUATED,
    NUM_SAMPLES,
    SAVED,
    data,
    embedding_reference,
    model,
    optimizer,
    reference,
    reference_model,
    regularized_reference,
    two_output_reference,
)
from mp_util import TESTS, launch, requires_mpi

WORKER = os.path.join(TESTS, "mp_pipeline_worker.py")
pytestmark = [pytest.mark.slow, requires_mpi]


def _results(out, nproc: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _weights(out, rank: int, check: str, prefix: str, count: int) -> list:
    with np.load(out / f"rank{rank}_{check}.npz") as z:
        return [z[f"{prefix}_{i}"] for i in range(count)]


def _assert_close(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def _check_case(out, nproc: int, case: str, results: list[dict]) -> None:
    count = results[0][case]["num_weights"]
    init = _weights(out, 0, case, "init", count)
    final = _weights(out, 0, case, "final", count)
    for r in range(1, nproc):  # the assembled model is the same everywhere
        for a, b in zip(final, _weights(out, r, case, "final", count)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(init, _weights(out, r, case, "init", count)):
            np.testing.assert_array_equal(a, b)  # rank 0's initial weights
    ref_net, ref_losses = reference_model(case, init)
    ref_weights = ref_net.get_weights()
    _assert_close(final, ref_weights)
    assert not np.allclose(final[0], init[0])
    for r in range(nproc):
        # Every rank's history holds the global loss.
        np.testing.assert_allclose(results[r][case]["loss"], ref_losses, rtol=1e-5)
        assert results[r][case]["loss"] == results[0][case]["loss"]
        assert results[r][case]["mae"] == results[0][case]["mae"]
    # Every rank of a data-parallel group holds the same stage variables.
    groups: dict[tuple, list] = {}
    for r in range(nproc):
        groups.setdefault(tuple(results[r][case]["dp_group_ranks"]), []).append(r)
    for ranks in groups.values():
        with np.load(out / f"rank{ranks[0]}_{case}.npz") as z0:
            local = [z0[k] for k in sorted(z0.files) if k.startswith("local_")]
        for r in ranks[1:]:
            with np.load(out / f"rank{r}_{case}.npz") as z:
                other = [z[k] for k in sorted(z.files) if k.startswith("local_")]
            assert len(other) == len(local) > 0
            for a, b in zip(local, other):
                np.testing.assert_array_equal(a, b)
    if case in SAVED:
        # Rank 0's file holds every stage's optimizer state as the plain
        # compiled model's own (it loads into one), and load_weights gave
        # every rank back its stage's part.
        assert all(r[case]["optimizer_restored"] for r in results)
        loaded = model(CASES[case][0], seed=9)
        loaded.compile(optimizer=optimizer(CASES[case][4]), loss="mse")
        loaded.optimizer.build(loaded.trainable_variables)
        loaded.load_weights(out / f"{case}.weights.h5")
        _assert_close([v.numpy() for v in loaded.optimizer.variables],
                      [v.numpy() for v in ref_net.optimizer.variables])
    if case not in EVALUATED:
        return
    # evaluate and predict on every rank, batches not divisible by M x D
    # (the last evaluate batch has 1 row: a pipeline of 2 gets none).
    plain = model(CASES[case][0])
    plain.set_weights(final)
    plain.compile(loss="mse", metrics=["mae"])
    x, y = data()
    expected = plain.evaluate(x[:33], y[:33], batch_size=16, verbose=0)
    predicted = plain.predict(x[:37], batch_size=16, verbose=0)
    for r in range(nproc):
        # The worker's predict on inputs of the wrong structure failed first.
        assert "InputStructureError" in results[r]["structure_errors"]
        np.testing.assert_allclose(results[r][case]["evaluate"], expected, rtol=1e-5)
        with np.load(out / f"rank{r}_{case}.npz") as z:
            np.testing.assert_allclose(z["predicted"], predicted, rtol=1e-5,
                                       atol=1e-6)


def _check_regularized(out, nproc, results):
    """Weight regularizers on both stages: fit's losses, evaluate, the custom
    step's loss and the weights after each equal the plain model's."""
    count = results[0]["regularized"]["num_weights"]
    ref = regularized_reference(_weights(out, 0, "regularized", "init", count))
    for r in range(nproc):
        res = results[r]["regularized"]
        np.testing.assert_allclose(res["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(res["evaluate"], ref["evaluate"], rtol=1e-5)
        np.testing.assert_allclose(res["custom_loss"], ref["custom_loss"], rtol=1e-5)
        _assert_close(_weights(out, r, "regularized", "fitted", count), ref["fitted"])
        _assert_close(_weights(out, r, "regularized", "final", count), ref["final"])


def test_two_stages_in_two_processes(tmp_path):
    checks = ["seq_1f1b_sgd", "skip_gpipe_adam", "skip_interleaved_sgd",
              "skip_1f1b_adam_defer", "skip_interleaved_defer",
              "mismatch", "custom", "checkpoint", "auto", "shuffled", "mixed",
              "regularized", "seq_1f1b_adam_ema", "seq_1f1b_adamw_exclude"]
    proc = launch(["--nproc", "2", WORKER, str(tmp_path), *checks], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _results(tmp_path, 2)
    for case in checks[:5]:
        _check_case(tmp_path, 2, case, results)
    _check_regularized(tmp_path, 2, results)
    # use_ema: each rank's optimizer put its stage's averages into its
    # variables at the end of fit, as Keras does for the whole model; the
    # averages travel in the weight file as the plain model's.
    _check_case(tmp_path, 2, "seq_1f1b_adam_ema", results)
    _check_case(tmp_path, 2, "seq_1f1b_adamw_exclude", results)
    # defer_weight_gradients: every Dense kernel's gradient (the first
    # layer's too, whose input needs none) was left out of the backward
    # tasks, on every stage; without the option none is.
    assert [r["skip_1f1b_adam_defer"]["deferred"] for r in results] == [
        {"0": 2}, {"1": 2}]
    assert [r["skip_interleaved_defer"]["deferred"] for r in results] == [
        {"0": 1, "2": 1}, {"1": 1, "3": 1}]
    assert all(r["skip_gpipe_adam"]["deferred"] == {} for r in results)
    assert [r["seq_1f1b_sgd"]["stage"] for r in results] == [0, 1]
    assert results[1]["seq_1f1b_sgd"]["pipeline_ranks"] == [0, 1]
    # fit shuffled the arrays alike on both ranks (seeded apart): the linear
    # targets are learnt (paired with other samples' inputs the loss stays
    # above 3).
    for r in results:
        assert r["shuffled"]["loss"][-1] < 0.05, r["shuffled"]["loss"]
    # mixed_float16: both ranks skipped the steps whose first-stage gradients
    # overflowed, as plain Keras did, lowered the loss scale alike, then
    # trained to plain Keras' weights.
    for r in results:
        mixed = r["mixed"]
        assert mixed["scale"] == mixed["expected_scale"] < 2.0 ** 26, mixed
        assert mixed["moved"] > 0.02, mixed
        assert mixed["max_diff"] < 1e-4, mixed
        assert mixed["reloaded_scale"] == mixed["saved_scale"] == mixed["scale"], mixed
        np.testing.assert_allclose(mixed["loss"], mixed["expected_loss"], rtol=1e-3)
        # The same with global_clipnorm and gradient accumulation inside the
        # LossScaleOptimizer (once refused), whose clipping mattered.
        clip = r["mixed_clip"]
        assert clip["scale"] == clip["expected_scale"] < 2.0 ** 26, clip
        assert clip["max_diff"] < 1e-4 and clip["clip_effect"] > 1e-3, clip
        np.testing.assert_allclose(clip["loss"], clip["expected_loss"], rtol=1e-3)
    # Each process holds its own stage's variables and optimizer state.
    memory = [r["skip_gpipe_adam"]["memory"] for r in results]
    assert sum(m["variables"] for m in memory) == memory[0]["model"]
    for m in memory:
        assert m["optimizer"] == 2 * m["variables"]  # Adam: m and v
        assert 0 < m["variables"] < m["model"]

    # A partition that differs between ranks: a clear error on every rank.
    for r in results:
        assert r["mismatch"].startswith(
            "The pipeline processes disagree, so their messages would not "
            "match. Received: the partition differs (rank 0: ")
        assert "(stage sizes [2, 2]), rank 1: " in r["mismatch"]
        assert "(stage sizes [3, 1])" in r["mismatch"]
        assert ("Received: the bucket_cap_mb differs (rank 0: 1.0, rank 1: 2.0)"
                in r["mismatch_buckets"])
        assert r["bad_batch"].startswith(
            "Every global batch must be a multiple of the number of "
            "micro-batches times the number of pipelines. Received: "
            "batch_size 10 (64 samples, batch_size=10) with microbatches=4")
        assert r["bad_batch_list"] == r["bad_batch"]
        assert r["bad_stages"].startswith(
            "The number of pipeline stages must divide the number of processes."
            " Received: num_stages=3 with 2 processes.")
    # A file rank 0 cannot read: Keras' error there, and the same on rank 1
    # (an OSError, which BackupAndRestore answers with its previous backup).
    assert results[0]["bad_load"].startswith("FileNotFoundError: ")
    assert "missing.weights.h5" in results[0]["bad_load"]
    assert results[1]["bad_load"].startswith(
        "OSError: Rank 0 could not load the weights. Received: filepath=")
    assert results[0]["bad_load"] + ". Make the file" in results[1]["bad_load"]

    # Custom loop: compute_gradients + apply_gradients on the local variables,
    # clipped by the whole model's norm.
    count = results[0]["custom"]["num_weights"]
    init = _weights(tmp_path, 0, "custom", "init", count)
    ref_weights, _ = reference("seq_1f1b_sgd_clip", init)
    _assert_close(_weights(tmp_path, 1, "custom", "final", count), ref_weights)
    assert results[0]["custom"]["losses"] == results[1]["custom"]["losses"]
    assert len(results[0]["custom"]["losses"]) == 2 * NUM_SAMPLES // 16
    for r in results:
        assert r["custom"]["set_weights"]
        np.testing.assert_allclose(r["custom"]["train_on_batch"],
                                   r["custom"]["losses"][0], rtol=1e-5)

    # BackupAndRestore with Adam: stopped after epoch 1, resumed by a new
    # model with other initial weights and a fresh optimizer, ends with the
    # uninterrupted run's weights (so the moments and the step count were
    # restored to their owners); ModelCheckpoint's file (written by rank 0)
    # loads in plain Keras; save_weights writes the whole optimizer state as
    # the plain compiled model would.
    count = results[0]["checkpoint"]["num_weights"]
    init = _weights(tmp_path, 0, "checkpoint", "init", count)
    final = _weights(tmp_path, 1, "checkpoint", "final", count)
    net = keras.models.load_model(tmp_path / "ckpt.keras", compile=False)
    plain = model("seq")
    plain.set_weights(init)
    plain.compile(optimizer=optimizer("adam"), loss="mse")
    x, y = data()
    history = plain.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    _assert_close(final, plain.get_weights())
    _assert_close(net.get_weights(), plain.get_weights())
    np.testing.assert_allclose(results[0]["checkpoint"]["loss"],
                               history.history["loss"][1:], rtol=1e-5)
    assert [r["checkpoint"]["iterations"] for r in results] == [12, 12]
    loaded = model("seq", seed=9)
    loaded.compile(optimizer=optimizer("adam"), loss="mse")
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(tmp_path / "trained.weights.h5")
    _assert_close(loaded.get_weights(), plain.get_weights())
    _assert_close([v.numpy() for v in loaded.optimizer.variables],
                  [v.numpy() for v in plain.optimizer.variables])

    # partition="auto" with a ProfilingCallback: rank 0's profile and the
    # measured bandwidth give one partition on every rank, chosen before the
    # first step (so training equals the plain model's from the start).
    assert results[0]["auto"]["stages"] == results[1]["auto"]["stages"]
    assert results[0]["auto"]["bandwidth"] == results[1]["auto"]["bandwidth"] > 0
    # Every rank's callback got rank 0's profile once (a second fit with
    # the same callback neither profiles nor partitions again), and its
    # options are the user's.
    for r in results:
        assert r["auto"]["hook_calls"] == 1
        assert r["auto"]["profile"] == results[0]["auto"]["profile"]
        assert r["auto"]["profile_kwargs"] == {"warmup": 1, "repeats": 2}
    for r in results:  # loaded optimizer steps: the equal split stays
        assert r["auto_after_load"]["warned"]
        assert [len(s) for s in r["auto_after_load"]["stages"]] == [2, 2]
    count = results[0]["auto"]["num_weights"]
    init = _weights(tmp_path, 0, "auto", "init", count)
    ref_weights, ref_losses = reference("seq_1f1b_sgd", init, epochs=1)
    _assert_close(_weights(tmp_path, 1, "auto", "final", count), ref_weights)
    np.testing.assert_allclose(results[1]["auto"]["loss"], ref_losses, rtol=1e-5)


def test_three_stages_in_three_processes(tmp_path):
    checks = ["skip3_1f1b_adam", "two_outputs"]
    proc = launch(["--nproc", "3", WORKER, str(tmp_path), *checks], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _results(tmp_path, 3)
    _check_case(tmp_path, 3, "skip3_1f1b_adam", results)
    assert [r["skip3_1f1b_adam"]["stage"] for r in results] == [0, 1, 2]
    # Two outputs (one from the middle stage): the per-output losses and
    # metrics, named after the outputs, are the plain model's on every rank
    # (the first two ranks compute no loss themselves).
    count = results[0]["two_outputs"]["num_weights"]
    ref_weights, ref_history, ref_evaluated = two_output_reference(
        _weights(tmp_path, 0, "two_outputs", "init", count))
    assert sorted(ref_history) == ["aux_loss", "loss", "main_loss", "main_mae"]
    for r in range(3):
        res = results[r]["two_outputs"]
        _assert_close(_weights(tmp_path, r, "two_outputs", "final", count), ref_weights)
        assert sorted(res["history"]) == sorted(ref_history)
        for key, values in ref_history.items():
            np.testing.assert_allclose(res["history"][key], values, rtol=1e-5)
        assert sorted(res["evaluate"]) == sorted(ref_evaluated)
        for key, value in ref_evaluated.items():
            np.testing.assert_allclose(res["evaluate"][key], value, rtol=1e-5)


def test_two_stages_times_two_pipelines_in_four_processes(tmp_path):
    # The 4 processes then train an embedding model and run
    # examples/pipeline_hybrid.py. (Clipping the accumulated gradients by
    # the whole model's norm inside Keras' update step once put that norm's
    # all-reduce out of order with the step's others: MPI_ERR_TRUNCATE.)
    checks = ["seq_hybrid_cluster", "skip_hybrid_spread", "seq_hybrid_accumulate_clip",
              "embedding", "batchnorm", "regularized", "example"]
    proc = launch(["--nproc", "4", WORKER, str(tmp_path), *checks], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _results(tmp_path, 4)
    _check_regularized(tmp_path, 4, results)
    # BatchNormalization's moving statistics: each pipeline updated them from
    # its half of the batch, then they were averaged over the pipelines, so
    # every rank holds the plain model's moving mean after one step (a
    # linear update of the batch mean); the stage-0 ranks (0 and 2) hold it.
    bn = [r["batchnorm"] for r in results]
    for r in (0, 2):
        np.testing.assert_allclose(bn[r]["local_mean"], bn[r]["plain_mean"],
                                   rtol=1e-5, atol=1e-7)
    assert bn[0]["local_mean"] == bn[2]["local_mean"]
    assert all(b["assembled"] == bn[0]["assembled"] for b in bn)
    for case in checks[:3]:
        _check_case(tmp_path, 4, case, results)
    cluster = [r["seq_hybrid_cluster"] for r in results]
    assert [c["pipeline_ranks"] for c in cluster] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [c["dp_group_ranks"] for c in cluster] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    spread = [r["skip_hybrid_spread"] for r in results]
    assert [s["pipeline_ranks"] for s in spread] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(s["stage"], s["dp"]) for s in spread] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Sparse gradients: every micro-batch's and pipeline's rows reach Adam as
    # one IndexedSlices, as the plain model's whole batch (a dense sum
    # differs by about 1e-2 here).
    for name, options in (("embedding", {}),
                          ("embedding_clip", {"global_clipnorm": EMBEDDING_CLIP})):
        count = results[0][name]["num_weights"]
        ref_weights, ref_losses = embedding_reference(
            _weights(tmp_path, 0, name, "init", count), **options)
        for r in range(4):
            _assert_close(_weights(tmp_path, r, name, "final", count), ref_weights)
            np.testing.assert_allclose(results[r][name]["loss"], ref_losses,
                                       rtol=1e-5)
    out = proc.stdout + proc.stderr
    assert "rank 3: stage 1 of 2, pipeline 1 of 2; pipeline ranks [2, 3]" in out
    assert "it loads in plain Keras with the trained weights: True" in out


@pytest.mark.parametrize("check", ["bad_target", "bad_index"])
def test_a_step_that_fails_on_one_stage_stops_its_peers_at_once(tmp_path, check):
    # bad_target: the last stage's step cannot be built (its loss);
    # bad_index: the first stage's embedding lookup fails at run time.
    launch(["--nproc", "2", WORKER, str(tmp_path), check], timeout=300)
    results = [res[check] for res in _results(tmp_path, 2)]
    failed = 1 if check == "bad_target" else 0
    own, peer = results[failed], results[1 - failed]
    assert ("Dimensions must be equal" if check == "bad_target"
            else "is not in [0, 20)") in own["error"], own["error"]
    # Not the watchdog's 60 s: the receive from the failed stage fails within
    # a few heartbeats, naming it.
    assert peer["error"].startswith("FailedPreconditionError"), peer["error"]
    assert f"Rank {failed} has itself failed" in peer["error"]
    assert peer["seconds"] < 20, peer["seconds"]


def test_an_uncaught_error_in_a_custom_loop_ends_the_job_promptly(tmp_path):
    # Nothing catches the first stage's run-time error: Python's exception
    # hook stops the rank's communication before the exit handlers, so the
    # rank exits at once (its orderly shutdown would have waited for the
    # other rank until the 120 s timeout) and the launcher fails the job.
    start = time.monotonic()
    proc = launch(["--nproc", "2", WORKER, str(tmp_path), "uncaught"], timeout=400,
                  env={"SMDIST_MPI_TIMEOUT": "120"})
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "is not in [0, 20)" in out, out[-3000:]
    assert "tf_smdist.launch: rank 0 failed" in out, out[-3000:]
    assert elapsed < 90, elapsed


def test_a_killed_stage_process_stops_the_job_and_is_named(tmp_path):
    start = time.monotonic()
    proc = launch(["--nproc", "2", WORKER, str(tmp_path), "die"], timeout=300,
                  env={"SMDIST_MPI_TIMEOUT": "20"})
    assert proc.returncode != 0
    assert "rank 1 failed with exit status 137" in proc.stderr
    assert time.monotonic() - start < 200
