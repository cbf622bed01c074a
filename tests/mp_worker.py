"""One rank of the multi-process tests (run by mpirun / the launcher).

Usage: python mp_worker.py MODE LOCAL_DEVICES OUT_DIR [extra...]

MODE: checkpoint (fit with BackupAndRestore, optionally interrupted),
mismatch (rank 1 builds another model), uneven (a dataset whose batch count
does not divide by the ranks), compress (custom loop, fp16 transfers),
equiv (custom loop then fit), die (rank 1 kills itself after one epoch),
mixed (fit with mixed_float16 and bf16 transfers), embedding (an Embedding model: one
reduction of its IndexedSlices gradient, then fit with Adam), shuffled (an
unseeded `fit` of arrays with Keras' default shuffle=True). Each rank writes
its weights to OUT_DIR/rank{r}_*.npz.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tf_smdist as smd  # noqa: E402

MODE, LOCAL, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3]
EXTRA = sys.argv[4:]
smd.configure_cpu_devices(LOCAL)

import keras  # noqa: E402
import mp_common  # noqa: E402
import tensorflow as tf  # noqa: E402
from mp_common import GLOBAL_BATCH, NUM_SAMPLES, custom_step, data  # noqa: E402

from tf_smdist.data_parallel import cluster  # noqa: E402

STEPS = NUM_SAMPLES // GLOBAL_BATCH


def make_model(hidden: int = 16) -> keras.Model:
    keras.utils.set_random_seed(1 + cluster.env_rank_and_size()[0])  # differ per rank
    return mp_common.model(hidden)


def save(name: str, model: keras.Model) -> None:
    rank = cluster.rank()
    np.savez(os.path.join(OUT, f"rank{rank}_{name}.npz"),
             *[np.asarray(w) for w in model.get_weights()])


def custom(strategy: smd.DataParallelStrategy, compression: bool = False) -> None:
    with strategy.scope():
        model = make_model()
        optimizer = keras.optimizers.SGD(0.1)
    save("init", model)
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    dist = strategy.experimental_distribute_dataset(ds)
    step = custom_step(strategy, model, optimizer)

    losses = [float(step(b)) for b in dist]
    np.save(os.path.join(OUT, f"rank{cluster.rank()}_losses.npy"), np.array(losses))
    save("final", model)


def fit(strategy: smd.DataParallelStrategy, epochs: int = 2,
        callbacks: list | None = None, steps_note: str = "final") -> None:
    init_name = "init" if steps_note == "final" else f"{steps_note}_init"
    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    save(init_name, model)
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    history = model.fit(ds, epochs=epochs, verbose=0, callbacks=callbacks or [])
    np.save(os.path.join(OUT, f"rank{cluster.rank()}_{steps_note}_loss.npy"),
            np.array(history.history["loss"]))
    save(steps_note, model)


VOCAB, USED_VOCAB = 40, 25  # token ids >= USED_VOCAB never occur


def embedding_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.integers(0, USED_VOCAB, size=(NUM_SAMPLES, 3)).astype(np.int32)
    y = rng.standard_normal((NUM_SAMPLES, 2)).astype(np.float32)
    return x, y


def make_embedding_model() -> keras.Model:
    keras.utils.set_random_seed(1 + cluster.env_rank_and_size()[0])  # differ per rank
    return keras.Sequential([
        keras.Input((3,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 4),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])


def embedding(strategy: smd.DataParallelStrategy) -> None:
    with strategy.scope():
        model = make_embedding_model()
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    save("init", model)
    x, y = embedding_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)

    # The first batch's embedding gradient, MEAN-reduced across replicas.
    @tf.function
    def reduced_gradient(batch: tuple) -> tf.IndexedSlices:
        def replica_grad(xb: tf.Tensor, yb: tf.Tensor) -> tf.IndexedSlices:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb) - yb))
            return tape.gradient(loss, model.trainable_variables[0])

        grads = strategy.run(replica_grad, args=batch)
        return strategy.reduce("MEAN", grads, axis=None)

    grad = reduced_gradient(next(iter(strategy.experimental_distribute_dataset(ds))))
    np.savez(os.path.join(OUT, f"rank{cluster.rank()}_grad.npz"),
             values=grad.values.numpy(), indices=grad.indices.numpy(),
             is_slices=isinstance(grad, tf.IndexedSlices))
    model.fit(ds, epochs=2, verbose=0)
    save("final", model)

    # Indices beyond float32's exact range, a different row count per
    # replica (global replica g sends g + 1 rows of value g + 1).
    @tf.function
    def large_indices(reduce_op: str) -> tf.IndexedSlices:
        def replica_slices() -> tf.IndexedSlices:
            g = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group,
                        tf.int64)
            indices = 2**40 + 1000 * g + tf.range(g + 1)
            values = tf.fill([g + 1, 2], tf.cast(g + 1, tf.float32))
            return tf.IndexedSlices(values, indices, tf.constant([2**41, 2], tf.int64))

        return strategy.reduce(reduce_op, strategy.run(replica_slices), axis=None)

    for reduce_op in ("SUM", "MEAN"):
        big = large_indices(reduce_op)
        np.savez(os.path.join(OUT, f"rank{cluster.rank()}_large_{reduce_op}.npz"),
                 values=big.values.numpy(), indices=big.indices.numpy())


def shuffled(strategy: smd.DataParallelStrategy) -> None:
    """Two epochs of arrays, shuffled by Keras, in a script that sets no seed.

    The loss mean(w * x) has the gradient mean(x) whatever w is, so with
    SGD(1) the weight ends at -(sum of every sample seen) / GLOBAL_BATCH: the
    epochs cover each sample once only if the ranks shuffle alike.
    """
    x = (np.arange(NUM_SAMPLES, dtype=np.float32)[:, None] + 1.0) ** 2
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
        model.compile(optimizer=keras.optimizers.SGD(1.0),
                      loss=lambda _, pred: tf.reduce_mean(pred, axis=-1))
    model.fit(x, np.zeros_like(x), batch_size=GLOBAL_BATCH, epochs=2, verbose=0)
    save("shuffled", model)
    # The same job: a step compiled with XLA is refused when traced (the
    # host-reduce ops have no XLA kernels).
    with strategy.scope():
        model = make_model()
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    try:
        model.fit(*data(), batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
        message = "no error"
    except ValueError as e:
        message = str(e)
    with open(os.path.join(OUT, f"xla_rank{cluster.rank()}.txt"), "w") as f:
        f.write(message)


def main() -> None:
    if MODE == "mixed":
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = smd.DataParallelStrategy(
        bucket_cap_mb=1e-4,  # a bucket per tensor
        compression={"compress": "fp16", "mixed": "bf16"}.get(MODE))
    rank = cluster.rank()
    if MODE == "compress":
        custom(strategy)
    elif MODE == "mixed":
        fit(strategy)
    elif MODE == "mismatch":
        with strategy.scope():
            model = make_model(hidden=16 if rank == 0 else 17)
            model.compile(optimizer="sgd", loss="mse")
        x, y = data()
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    elif MODE == "embedding":
        embedding(strategy)
    elif MODE == "shuffled":
        shuffled(strategy)
    elif MODE == "equiv":
        custom(strategy)
        fit(strategy, steps_note="fit_final")
    elif MODE == "die":
        with strategy.scope():
            model = make_model()
            model.compile(optimizer="sgd", loss="mse")
        x, y = data()
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
        if rank == 1:
            os.kill(os.getpid(), 9)
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    elif MODE == "uneven":
        x, y = data(GLOBAL_BATCH * 5 + 8)  # 6 batches, the last one partial
        with strategy.scope():
            model = make_model()
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        save("init", model)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        model.fit(ds, epochs=1, verbose=0)
        save("final", model)
    elif MODE == "checkpoint":
        backup = EXTRA[0]
        interrupt_at = int(EXTRA[1]) if len(EXTRA) > 1 else -1

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                if epoch == interrupt_at:
                    raise SystemExit(17)

        callbacks = [keras.callbacks.BackupAndRestore(backup),
                     keras.callbacks.ModelCheckpoint(
                         os.path.join(OUT, f"ckpt_rank{rank}.weights.h5"),
                         save_weights_only=True)]
        fit(strategy, epochs=3,
            callbacks=cluster.rank_zero_writes(callbacks) + [Interrupt()])
    else:
        raise SystemExit(f"unknown mode {MODE}")


if __name__ == "__main__":
    main()
