"""A Horovod-style Keras training script on tf_smdist: only the import line changed.

Written the way Horovod's Keras examples are (`hvd.init()`, learning rate
scaled by the number of processes, `DistributedOptimizer`, the broadcast and
metric-averaging callbacks, a learning-rate warm-up, checkpoints and progress
on rank 0 only, each rank reading its own shard of the data). With Horovod it
would start with `import horovod.tensorflow.keras as hvd`; here the same
script runs on Keras 3 / TensorFlow 2.21:

    python -m tf_smdist.launch --nproc 2 examples/horovod_keras.py --epochs 3
    mpirun -np 2 python examples/horovod_keras.py        # plain mpirun works too

It classifies synthetic data (10 classes, 32 features, no download).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_smdist.horovod.keras as hvd  # was: import horovod.tensorflow.keras as hvd  # noqa: E402, E501


def synthetic_data(n: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points labelled by a fixed random linear map (learnable, not trivial)."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 32).astype("float32")
    labels = np.argmax(x @ rng.randn(32, 10), axis=1).astype("int64")
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.001, help="for one process")
    parser.add_argument("--checkpoint-dir", default="./checkpoints")
    args = parser.parse_args()

    # Horovod: initialize.
    hvd.init()

    # Horovod: pin one GPU per process (no-op on CPU-only machines).
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank()], "GPU")

    # Horovod: each process reads its own shard of the data.
    x, y = synthetic_data()
    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shard(hvd.size(), hvd.rank())
               .shuffle(1024, seed=hvd.rank())
               .batch(args.batch_size)
               .repeat())

    keras.utils.set_random_seed(hvd.rank())  # different on purpose: rank 0's wins
    model = keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])

    # Horovod: scale the learning rate by the number of processes.
    scaled_lr = args.lr * hvd.size()
    opt = keras.optimizers.Adam(scaled_lr)

    # Horovod: add the distributed optimizer.
    opt = hvd.DistributedOptimizer(opt)

    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=opt, metrics=["accuracy"])

    callbacks = [
        # Horovod: broadcast rank 0's initial variables to every process.
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Horovod: average the metrics over the processes at the end of each epoch.
        hvd.callbacks.MetricAverageCallback(),
        # Horovod: warm the learning rate up from lr to lr * size.
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr,
                                                 warmup_epochs=1, verbose=1),
    ]
    # Horovod: save checkpoints on rank 0 only, so that processes do not clash.
    if hvd.rank() == 0:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(args.checkpoint_dir, "checkpoint-{epoch}.keras")))

    # Horovod: print progress on rank 0 only.
    verbose = 2 if hvd.rank() == 0 else 0

    # Horovod: fewer steps per process, so an epoch still covers the data once.
    steps_per_epoch = len(x) // (args.batch_size * hvd.size())
    history = model.fit(dataset, steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                        callbacks=callbacks, verbose=verbose)
    if hvd.rank() == 0:
        print(f"final loss {history.history['loss'][-1]:.4f}, "
              f"accuracy {history.history['accuracy'][-1]:.3f}")


if __name__ == "__main__":
    main()
