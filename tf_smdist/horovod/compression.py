"""Gradient compression for transfer: none, or float16 on the wire."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["Compression", "Compressor", "FP16Compressor", "NoneCompressor"]


class Compressor:
    """Interface of a compression: `compress` before, `decompress` after."""

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, Any]:
        """Returns the tensor to send and the context `decompress` needs."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: Any) -> tf.Tensor:
        """Returns the received tensor restored with `ctx`."""
        raise NotImplementedError


class NoneCompressor(Compressor):
    """Sends tensors unchanged.

    Example:
    >>> t, ctx = NoneCompressor.compress(tf.constant([1.5]))
    >>> NoneCompressor.decompress(t, ctx).numpy()
    array([1.5], dtype=float32)
    """

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: Any) -> tf.Tensor:
        del ctx
        return tensor


class FP16Compressor(Compressor):
    """Sends floating-point tensors as float16 and casts them back after.

    Integer and boolean tensors are sent unchanged.

    Example:
    >>> t, ctx = FP16Compressor.compress(tf.constant([1.5], tf.float64))
    >>> t.dtype, FP16Compressor.decompress(t, ctx).dtype
    (tf.float16, tf.float64)
    """

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, Any]:
        tensor = tf.convert_to_tensor(tensor)
        dtype = tensor.dtype
        if dtype.is_floating and dtype != tf.float16:
            tensor = tf.cast(tensor, tf.float16)
        return tensor, dtype

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: Any) -> tf.Tensor:
        if ctx is not None and tensor.dtype != ctx:
            tensor = tf.cast(tensor, ctx)
        return tensor


class Compression:
    """The compressions `compression=` accepts: `none` and `fp16`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.Compression.fp16 is FP16Compressor
    True
    """

    none = NoneCompressor
    fp16 = FP16Compressor
