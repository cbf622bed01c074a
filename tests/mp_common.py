"""What a multi-process rank and its single-process reference share.

Imported both by `mp_worker.py` (one rank under mpirun) and by the tests that
compute the MirroredStrategy reference, so both train on the same data, the
same model and the same step.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 24
NUM_SAMPLES = 96


def data(num_samples: int = NUM_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((num_samples, 6)).astype(np.float32)
    y = rng.standard_normal((num_samples, 3)).astype(np.float32)
    return x, y


def model(hidden: int = 16) -> keras.Model:
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(hidden, activation="tanh"),
        keras.layers.Dense(3),
    ])


def custom_step(
    strategy: tf.distribute.Strategy,
    net: keras.Model,
    optimizer: keras.optimizers.Optimizer,
) -> tf.types.experimental.GenericFunction:
    """One custom-loop step: mean squared error over the global batch, summed."""

    @tf.function
    def step(batch: tuple) -> tf.Tensor:
        def replica_step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                per_example = tf.reduce_sum(tf.square(net(xb) - yb), axis=-1)
                loss = tf.nn.compute_average_loss(
                    per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, net.trainable_variables)
            optimizer.apply_gradients(zip(grads, net.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=batch),
                               axis=None)

    return step
