"""A Horovod elastic Keras script on tf_smdist, at a fixed number of processes.

Written as Horovod's elastic Keras examples are: the model and optimizer
live in an `hvd.elastic.KerasState` with `batch` and `epoch`, the training
function is wrapped in `hvd.elastic.run` (which first gives every process
rank 0's state), and callbacks keep `batch` and `epoch` current and commit
the state every few batches. With Horovod it would start with
`import horovod.tensorflow.keras as hvd` and run under `horovodrun
--min-np ...`; here the job keeps its processes from start to end:

    python -m tf_smdist.launch --nproc 2 examples/horovod_elastic.py --epochs 3

It classifies the synthetic data of `horovod_keras.py` (10 classes, 32
features, no download).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from horovod_keras import synthetic_data  # noqa: E402  (this folder's Keras example)

import tf_smdist.horovod as hvd_tf  # noqa: E402
import tf_smdist.horovod.keras as hvd  # was: import horovod.tensorflow.keras as hvd  # noqa: E402, E501


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.001, help="for one process")
    parser.add_argument("--batches-per-commit", type=int, default=4)
    args = parser.parse_args()

    hvd.init()
    x, y = synthetic_data(n=2048)
    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shard(hvd.size(), hvd.rank())
               .shuffle(1024, seed=hvd.rank())
               .batch(args.batch_size)
               .repeat())

    keras.utils.set_random_seed(hvd.rank())  # different on purpose: the sync fixes it
    model = keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])
    opt = hvd.DistributedOptimizer(keras.optimizers.Adam(args.lr * hvd.size()))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=opt, metrics=["accuracy"])

    # Horovod elastic: the state to keep, and what to redo after a reset.
    state = hvd.elastic.KerasState(model, batch=0, epoch=0)

    def on_state_reset() -> None:
        # With Horovod the number of processes may have changed here.
        model.optimizer.learning_rate.assign(args.lr * hvd.size())

    state.register_reset_callbacks([on_state_reset])
    callbacks = [
        hvd.elastic.UpdateEpochStateCallback(state),
        hvd.elastic.UpdateBatchStateCallback(state),
        hvd.elastic.CommitStateCallback(state,
                                        batches_per_commit=args.batches_per_commit),
    ]
    steps_per_epoch = len(x) // (args.batch_size * hvd.size())

    @hvd.elastic.run
    def train(state: hvd.elastic.KerasState) -> dict:
        # Only the epochs not yet done (all of them, in a job that never resets).
        history = state.model.fit(dataset, steps_per_epoch=steps_per_epoch,
                                  epochs=args.epochs - state.epoch, callbacks=callbacks,
                                  verbose=2 if hvd.rank() == 0 else 0)
        return history.history

    history = train(state)
    flat = np.concatenate([w.ravel() for w in model.get_weights()])
    equal = all(np.array_equal(flat, other) for other in hvd_tf.allgather_object(flat))
    if hvd.rank() == 0:
        print(f"elastic training done: epoch {state.epoch}, final loss "
              f"{history['loss'][-1]:.4f}, accuracy {history['accuracy'][-1]:.3f}, "
              f"weights equal on every rank: {equal}")


if __name__ == "__main__":
    main()
