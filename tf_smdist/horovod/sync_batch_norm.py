"""`SyncBatchNormalization`: batch statistics over the global batch of every rank."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_smdist.horovod import mpi_ops
from tf_smdist.horovod.collectives import grouped_allreduce
from tf_smdist.horovod.process_sets import ProcessSet, global_process_set

__all__ = ["SyncBatchNormalization"]


class SyncBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose training statistics span every rank's batch.

    In training, each rank sums its inputs, their squares and its sample
    count; one grouped all-reduce adds them over the ranks, so the mean and
    variance are those of the global batch, the same on every rank (and so
    are the moving statistics). Gradients flow through the all-reduce. In
    inference it is an ordinary `BatchNormalization`.

    Args:
        process_set: the ranks whose batches are normalized together.
            Defaults to `global_process_set`.
        **kwargs: the arguments of `keras.layers.BatchNormalization`
            (`axis`, `momentum`, `epsilon`, `center`, `scale`, ...);
            `renorm` and `synchronized` are not supported.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> bn = hvd.SyncBatchNormalization()
    >>> bn(tf.constant([[1.0], [3.0]]), training=True).numpy().round(3)
    array([[-1.],
           [ 1.]], dtype=float32)
    """

    def __init__(self, process_set: ProcessSet = global_process_set,
                 **kwargs: Any) -> None:
        for unsupported in ("renorm", "synchronized"):
            if kwargs.get(unsupported):
                raise ValueError(
                    f"SyncBatchNormalization does not support `{unsupported}`. "
                    f"Received: {unsupported}={kwargs[unsupported]!r}. Leave it "
                    "unset (statistics are synchronized across ranks already).")
        kwargs.pop("fused", None)  # Horovod's TF1 argument; no meaning here.
        super().__init__(**kwargs)
        self.process_set = process_set

    def _global_moments(self, inputs: tf.Tensor, mask: tf.Tensor | None
                        ) -> tuple[tf.Tensor, tf.Tensor]:
        ndim = len(inputs.shape)
        axis = self.axis % ndim
        axes = [i for i in range(ndim) if i != axis]
        if mask is None:
            weights = tf.ones_like(inputs)
        else:
            weights = tf.cast(tf.broadcast_to(tf.expand_dims(mask, -1),
                                              tf.shape(inputs)), inputs.dtype)
        local_sum = tf.reduce_sum(inputs * weights, axis=axes)
        local_sq = tf.reduce_sum(tf.square(inputs) * weights, axis=axes)
        local_count = tf.reduce_sum(weights, axis=axes)
        # Eagerly the layer's name matches its calls across ranks; in a graph
        # the op's unique name does, so a layer applied twice in one function
        # (shared between two inputs) issues two distinct collectives.
        name = f"SyncBatchNormalization.{self.name}" if tf.executing_eagerly() else None
        total, total_sq, count = grouped_allreduce(
            [local_sum, local_sq, local_count], op=mpi_ops.Sum, name=name,
            process_set=self.process_set)
        count = tf.maximum(count, 1.0)
        mean = total / count
        variance = tf.maximum(total_sq / count - tf.square(mean), 0.0)
        shape = [1] * ndim
        shape[axis] = -1
        return tf.reshape(mean, shape), tf.reshape(variance, shape)

    def call(self, inputs: Any, training: bool | None = None,
             mask: Any = None) -> tf.Tensor:
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        inputs = tf.cast(inputs, tf.float32 if inputs.dtype in (tf.float16, tf.bfloat16)
                         else inputs.dtype)
        mean, variance = self._global_moments(inputs, mask)
        dtype = inputs.dtype
        self.moving_mean.assign(
            tf.cast(self.moving_mean, dtype) * self.momentum
            + tf.reshape(mean, [-1]) * (1.0 - self.momentum))
        self.moving_variance.assign(
            tf.cast(self.moving_variance, dtype) * self.momentum
            + tf.reshape(variance, [-1]) * (1.0 - self.momentum))
        ndim = len(inputs.shape)
        shape = [1] * ndim
        shape[self.axis % ndim] = -1
        gamma = None if self.gamma is None else tf.reshape(
            tf.cast(self.gamma, dtype), shape)
        beta = None if self.beta is None else tf.reshape(
            tf.cast(self.beta, dtype), shape)
        outputs = tf.nn.batch_normalization(
            inputs, mean, variance, offset=beta, scale=gamma,
            variance_epsilon=self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("synchronized", None)
        config.pop("renorm", None)
        config.pop("renorm_clipping", None)
        config.pop("renorm_momentum", None)
        return config
