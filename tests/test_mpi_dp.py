"""Multi-process DataParallelStrategy against single-process MirroredStrategy."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from mp_common import GLOBAL_BATCH, NUM_SAMPLES, custom_step
from mp_common import data as _data
from mp_common import model as _model
from mp_util import TESTS, launch, requires_mpi

WORKER = os.path.join(TESTS, "mp_worker.py")
pytestmark = [pytest.mark.slow, requires_mpi]


def _weights(path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _mirrored() -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def _reference_custom(
    init: list[np.ndarray], strategy: tf.distribute.Strategy | None = None
) -> tuple[list[np.ndarray], list[float]]:
    strategy = strategy or _mirrored()
    with strategy.scope():
        model = _model()
        optimizer = keras.optimizers.SGD(0.1)
    model.set_weights(init)
    x, y = _data()
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH))
    step = custom_step(strategy, model, optimizer)
    losses = [float(step(b)) for b in dist]
    return model.get_weights(), losses


def _reference_fit(init: list[np.ndarray], *, epochs: int,
                   num_samples: int = NUM_SAMPLES,
                   strategy: tf.distribute.Strategy | None = None,
                   ) -> tuple[list[np.ndarray], list]:
    strategy = strategy or _mirrored()
    with strategy.scope():
        model = _model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.set_weights(init)
    x, y = _data(num_samples)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    history = model.fit(ds, epochs=epochs, verbose=0)
    return model.get_weights(), history.history["loss"]


def _assert_close(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5)


def _assert_same_on_every_rank(out, name: str, nproc: int) -> list[np.ndarray]:
    first = _weights(out / f"rank0_{name}.npz")
    for r in range(1, nproc):
        for a, b in zip(first, _weights(out / f"rank{r}_{name}.npz")):
            np.testing.assert_array_equal(a, b)
    return first


# Each process count with two devices per process, and one device per process
# on 3 ranks; 2 ranks of one device each train in the tests below
# (compression, mixed precision, uneven batches, checkpoints, embeddings).
@pytest.mark.parametrize("nproc,local", [(2, 2), (3, 1), (3, 2)])
def test_custom_loop_and_fit_equal_mirrored_strategy(tmp_path, nproc, local):
    proc = launch(["--nproc", str(nproc), WORKER, "equiv", str(local), str(tmp_path)],
                  timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Each rank seeded its model differently: equal values mean rank 0's
    # initial weights were broadcast.
    init = _assert_same_on_every_rank(tmp_path, "init", nproc)
    final = _assert_same_on_every_rank(tmp_path, "final", nproc)
    ref_weights, ref_losses = _reference_custom(init)
    _assert_close(final, ref_weights)
    assert not np.allclose(final[0], init[0])  # training moved the weights
    for r in range(nproc):
        np.testing.assert_allclose(
            np.load(tmp_path / f"rank{r}_losses.npy"), ref_losses, atol=1e-5)

    fit_init = _assert_same_on_every_rank(tmp_path, "fit_final_init", nproc)
    fit_final = _assert_same_on_every_rank(tmp_path, "fit_final", nproc)
    ref_weights, ref_history = _reference_fit(fit_init, epochs=2)
    _assert_close(fit_final, ref_weights)
    for r in range(nproc):
        np.testing.assert_allclose(
            np.load(tmp_path / f"rank{r}_fit_final_loss.npy"), ref_history, atol=1e-5)


def test_fp16_transfers_match_one_process_with_the_same_compression(tmp_path):
    # 2 processes x 1 device against one process x 2 devices, both sending
    # float16 buffers: the cross-process sum runs in float32, so the results
    # are bit-identical (the SUM of two float16 values is exact in float32).
    proc = launch(["--nproc", "2", WORKER, "compress", "1", str(tmp_path)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import tf_smdist as smd

    init = _assert_same_on_every_rank(tmp_path, "init", 2)
    final = _assert_same_on_every_rank(tmp_path, "final", 2)
    local = smd.DataParallelStrategy(["/cpu:0", "/cpu:1"], bucket_cap_mb=1e-4,
                                     compression="fp16")
    ref_weights, _ = _reference_custom(init, local)
    for a, e in zip(final, ref_weights):
        np.testing.assert_array_equal(a, e)
    fp32_weights, _ = _reference_custom(init)
    assert any(not np.array_equal(a, e) for a, e in zip(final, fp32_weights))


def test_mixed_precision_fit_with_bf16_transfers_matches_one_process(tmp_path):
    proc = launch(["--nproc", "2", WORKER, "mixed", "1", str(tmp_path)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import tf_smdist as smd

    init = _assert_same_on_every_rank(tmp_path, "init", 2)
    final = _assert_same_on_every_rank(tmp_path, "final", 2)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        local = smd.DataParallelStrategy(["/cpu:0", "/cpu:1"], bucket_cap_mb=1e-4,
                                         compression="bf16")
        ref_weights, ref_history = _reference_fit(init, epochs=2, strategy=local)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for a, e in zip(final, ref_weights):
        np.testing.assert_array_equal(a, e)
    np.testing.assert_allclose(np.load(tmp_path / "rank1_final_loss.npy"),
                               ref_history, atol=1e-6)


def test_uneven_last_batch_is_split_without_hanging(tmp_path):
    # 5 full global batches and one of 8 samples: every rank runs 6 steps.
    # A hang would trip the 20 s watchdog and fail the job (exit code != 0).
    proc = launch(["--nproc", "2", WORKER, "uneven", "1", str(tmp_path)],
                  timeout=300, env={"SMDIST_MPI_TIMEOUT": "20"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    init = _assert_same_on_every_rank(tmp_path, "init", 2)
    final = _assert_same_on_every_rank(tmp_path, "final", 2)
    ref_weights, _ = _reference_fit(init, epochs=1, num_samples=GLOBAL_BATCH * 5 + 8)
    _assert_close(final, ref_weights)


def test_backup_and_restore_resumes_to_the_uninterrupted_weights(tmp_path):
    backup = str(tmp_path / "backup")
    first = launch(["--nproc", "2", WORKER, "checkpoint", "1", str(tmp_path),
                    backup, "1"], timeout=300)
    assert first.returncode == 17, first.stdout + first.stderr  # stopped after epoch 1
    assert os.path.exists(os.path.join(backup, "latest.weights.h5"))
    second = launch(["--nproc", "2", WORKER, "checkpoint", "1", str(tmp_path),
                     backup], timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    # Files are written by rank 0 only.
    assert os.path.exists(tmp_path / "ckpt_rank0.weights.h5")
    assert not os.path.exists(tmp_path / "ckpt_rank1.weights.h5")
    init = _assert_same_on_every_rank(tmp_path, "init", 2)
    final = _assert_same_on_every_rank(tmp_path, "final", 2)
    ref_weights, ref_history = _reference_fit(init, epochs=3)
    _assert_close(final, ref_weights)
    # The resumed run trained the last epoch only.
    np.testing.assert_allclose(
        np.load(tmp_path / "rank0_final_loss.npy"), ref_history[2:], atol=1e-5)


def test_different_models_fail_on_every_rank_naming_the_shapes(tmp_path):
    proc = launch(["--nproc", "2", WORKER, "mismatch", "1", str(tmp_path)],
                  timeout=300)
    assert proc.returncode == 1
    message = ("differs across ranks, so their all-reduces would not match. "
               "Received: rank 0: [6, 16]:float32")
    assert "[rank 0] ValueError: The variable 'kernel' " + message in proc.stderr
    assert "[rank 1] ValueError: The variable 'kernel' " + message in proc.stderr


def test_killed_rank_stops_the_job_and_is_named(tmp_path):
    # The surviving rank does not wait for the launch's timeout (the job would
    # then end killed, not with the dead rank's status).
    proc = launch(["--nproc", "2", WORKER, "die", "1", str(tmp_path)], timeout=300,
                  env={"SMDIST_MPI_TIMEOUT": "20"})
    assert proc.returncode == 137, proc.stdout + proc.stderr
    assert "rank 1 failed with exit status 137" in proc.stderr



VOCAB, USED_VOCAB = 40, 25  # as in mp_worker.py: ids >= USED_VOCAB never occur


def _embedding_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)  # as in mp_worker.py
    x = rng.integers(0, USED_VOCAB, size=(NUM_SAMPLES, 3)).astype(np.int32)
    y = rng.standard_normal((NUM_SAMPLES, 2)).astype(np.float32)
    return x, y


def _reference_embedding(init: list[np.ndarray], num_devices: int):
    # ReductionToOneDevice: MirroredStrategy's CPU collectives reuse group
    # keys across strategies of different sizes in one process.
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_devices)],
        cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ])
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.set_weights(init)
    x, y = _embedding_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)

    @tf.function
    def reduced_gradient(batch):
        def replica_grad(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb) - yb))
            return tape.gradient(loss, model.trainable_variables[0])

        return strategy.reduce("MEAN", strategy.run(replica_grad, args=batch),
                               axis=None)

    grad = reduced_gradient(next(iter(strategy.experimental_distribute_dataset(ds))))
    model.fit(ds, epochs=2, verbose=0)
    return grad, model.get_weights()


@pytest.mark.parametrize("local", [1, 2])
def test_embedding_gradients_are_gathered_across_processes_like_mirrored(
        tmp_path, local):
    # IndexedSlices are concatenated across processes in global replica
    # order (not summed into a dense buffer), so Adam with 2 processes
    # updates exactly the rows MirroredStrategy updates with the same
    # global batch, and never-seen rows stay untouched.
    proc = launch(["--nproc", "2", WORKER, "embedding", str(local), str(tmp_path)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    init = _assert_same_on_every_rank(tmp_path, "init", 2)
    final = _assert_same_on_every_rank(tmp_path, "final", 2)
    ref_grad, ref_weights = _reference_embedding(init, 2 * local)
    assert isinstance(ref_grad, tf.IndexedSlices)

    def rows(indices, values):
        # The rows as a multiset: with 2 local replicas the input sharding
        # hands a rank other samples of the global batch than
        # MirroredStrategy's replicas get, so only the order differs.
        table = np.concatenate([indices[:, None].astype(np.float64), values], 1)
        return table[np.lexsort(table.T[::-1])]

    expected = rows(ref_grad.indices.numpy(), ref_grad.values.numpy())
    for r in range(2):
        with np.load(tmp_path / f"rank{r}_grad.npz") as z:
            assert bool(z["is_slices"])
            assert z["indices"].shape == (GLOBAL_BATCH * 3,)  # one row per token
            got = rows(z["indices"], z["values"])
        np.testing.assert_array_equal(got[:, 0], expected[:, 0])  # exact indices
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    _assert_close(final, ref_weights)
    np.testing.assert_array_equal(final[0][USED_VOCAB:], init[0][USED_VOCAB:])
    assert not np.allclose(final[0][:USED_VOCAB], init[0][:USED_VOCAB])
    # Exact int64 indices beyond 2**24, uneven row counts, global replica order.
    replicas = 2 * local
    indices = [2**40 + 1000 * g + j for g in range(replicas) for j in range(g + 1)]
    counts = np.arange(1, replicas + 1)
    values = np.repeat(counts.astype(np.float32), counts)[:, None].repeat(2, axis=1)
    for r in range(2):
        with np.load(tmp_path / f"rank{r}_large_SUM.npz") as z:
            np.testing.assert_array_equal(z["indices"], indices)
            np.testing.assert_array_equal(z["values"], values)
        with np.load(tmp_path / f"rank{r}_large_MEAN.npz") as z:
            np.testing.assert_array_equal(z["indices"], indices)
            np.testing.assert_allclose(z["values"], values / replicas, rtol=1e-7)


def test_unseeded_shuffled_fit_covers_every_sample_once_per_epoch(tmp_path):
    # Keras shuffles arrays with TensorFlow's random ops; unseeded, each rank
    # drew its own order and the ranks' shards of an epoch overlapped (the
    # weight ended at -24362 instead of -24961 in one run).
    proc = launch(["--nproc", "2", WORKER, "shuffled", "1", str(tmp_path)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    [weight] = _assert_same_on_every_rank(tmp_path, "shuffled", 2)
    x = (np.arange(NUM_SAMPLES, dtype=np.float64) + 1.0) ** 2
    expected = -2 * x.sum() / GLOBAL_BATCH  # two epochs, every sample once each
    np.testing.assert_allclose(weight, [[expected]], rtol=1e-6)
    # jit_compile=True across processes: a clear error on every rank.
    for r in range(2):
        message = (tmp_path / f"xla_rank{r}.txt").read_text()
        assert message.startswith("DataParallelStrategy cannot reduce inside an "
                                  "XLA-compiled function"), message
