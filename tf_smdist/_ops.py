"""Loads the compiled op library; thin wrappers and gradients for its ops."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

__all__ = ["load_library", "pack", "unpack", "host_reduce", "LIBRARY_NAME"]

LIBRARY_NAME = "libsmdist_ops.so"
_SUPPORTED = (tf.float32, tf.float16, tf.bfloat16)
_library: Any = None


def load_library() -> Any:
    """Loads `libsmdist_ops.so` once and returns the op module.

    Raises:
        ImportError: the library is missing or was built against another
            TensorFlow; the message says how to build it.
    """
    global _library
    if _library is not None:
        return _library
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)
    if not os.path.exists(path):
        raise ImportError(
            f"The tf_smdist op library was not found at {path}. Build it against "
            "the installed TensorFlow with `pip install .` (or, in a source "
            "checkout, `python setup.py build_ext --inplace`)."
        )
    built_for = _built_for()
    if built_for is not None and built_for != tf.__version__:
        raise ImportError(
            f"The tf_smdist op library was built against TensorFlow {built_for}, "
            f"but TensorFlow {tf.__version__} is installed. Rebuild it: "
            "`pip install --force-reinstall --no-deps .` in the source tree."
        )
    try:
        _library = tf.load_op_library(path)
    except tf.errors.NotFoundError as e:
        raise ImportError(
            f"The tf_smdist op library at {path} failed to load against "
            f"TensorFlow {tf.__version__}: {e}. It was probably built against "
            "another TensorFlow; rebuild it with `pip install --force-reinstall .`."
        ) from e
    return _library


def _built_for() -> str | None:
    """The TensorFlow version the library was compiled against, if recorded."""
    try:
        from tf_smdist import _build_info
    except ImportError:
        return None
    return _build_info.TF_VERSION


def _invalid(message: str) -> tf.errors.InvalidArgumentError:
    return tf.errors.InvalidArgumentError(None, None, message)


def _dtype(value: Any, name: str) -> tf.DType:
    dtype = tf.as_dtype(value)
    if dtype not in _SUPPORTED:
        raise _invalid(
            f"`{name}` must be one of float32, float16, bfloat16. "
            f"Received: {name}={dtype.name}"
        )
    return dtype


def _tensor_list(values: Sequence[Any], name: str) -> list[tf.Tensor]:
    """Converts `values` to tensors of one supported dtype, at least one."""
    tensors = [tf.convert_to_tensor(t) for t in values]
    if not tensors:
        raise _invalid(
            f"`{name}` must hold at least one tensor. Received: {name}=[]"
        )
    for i, t in enumerate(tensors):
        _dtype(t.dtype, f"{name}[{i}].dtype")
        if t.dtype != tensors[0].dtype:
            raise _invalid(
                f"All of `{name}` must have one dtype. Received: "
                f"{name}[0].dtype={tensors[0].dtype.name}, "
                f"{name}[{i}].dtype={t.dtype.name}"
            )
    return tensors


def pack(
    tensors: Sequence[tf.Tensor], *, scale: float = 1.0, out_type: Any = None
) -> tf.Tensor:
    """Flattens, scales, casts and concatenates `tensors` into one 1-D tensor.

    Args:
        tensors: a non-empty list of tensors of one dtype (float32, float16 or
            bfloat16), any shapes.
        scale: multiplies every element. Defaults to `1.0`.
        out_type: dtype of the packed buffer. Defaults to the inputs' dtype.

    Returns:
        A 1-D tensor of `sum(t.size for t in tensors)` elements.

    Example:
    >>> pack([tf.ones([2, 2]), tf.zeros([3])]).shape
    TensorShape([7])
    """
    tensors = _tensor_list(tensors, "tensors")
    out = _dtype(out_type if out_type is not None else tensors[0].dtype, "out_type")
    return load_library().smdist_pack(tensors, scale=float(scale), out_type=out)


def unpack(
    packed: tf.Tensor, shapes: Sequence[Any], *, out_type: Any = None
) -> list[tf.Tensor]:
    """Splits a 1-D buffer into tensors of `shapes`, cast to `out_type`.

    The inverse of `pack` (with `scale=1`).

    Args:
        packed: a 1-D tensor whose length is the total size of `shapes`.
        shapes: the fully defined output shapes, in order.
        out_type: dtype of the outputs. Defaults to `packed`'s dtype.

    Returns:
        A list of tensors, one per shape.

    Example:
    >>> [t.shape for t in unpack(tf.range(7.0), [[2, 2], [3]])]
    [TensorShape([2, 2]), TensorShape([3])]
    """
    packed = _tensor_list([packed], "packed")[0]
    shapes = [tf.TensorShape(s) for s in shapes]
    if not shapes:
        raise _invalid("`shapes` must not be empty. Received: shapes=[]")
    for i, s in enumerate(shapes):
        if not s.is_fully_defined():
            raise _invalid(
                f"Every shape must be fully defined. Received: shapes[{i}]={s}"
            )
    out = _dtype(out_type if out_type is not None else packed.dtype, "out_type")
    return list(load_library().smdist_unpack(
        packed, N=len(shapes), shapes=shapes, out_type=out
    ))


def host_reduce(
    inputs: Sequence[tf.Tensor],
    *,
    scale: float = 1.0,
    out_type: Any = None,
    max_threads: int = 0,
) -> tf.Tensor:
    """Returns `scale * sum(inputs)`, accumulated in float32.

    Runs on the host CPU over TensorFlow's intra-op thread pool, each thread
    summing a contiguous shard.

    Args:
        inputs: a non-empty list of tensors of one dtype and one shape.
        scale: multiplies the sum (1/N gives the mean). Defaults to `1.0`.
        out_type: dtype of the result. Defaults to the inputs' dtype.
        max_threads: at most this many CPU worker threads work on it, each
            on one contiguous shard; 0 uses the whole pool. Defaults to `0`.

    Example:
    >>> host_reduce([tf.ones([3]), tf.ones([3])], scale=0.5).numpy()
    array([1., 1., 1.], dtype=float32)
    """
    inputs = _tensor_list(inputs, "inputs")
    out = _dtype(out_type if out_type is not None else inputs[0].dtype, "out_type")
    if isinstance(max_threads, bool) or not isinstance(max_threads, int) or (
        max_threads < 0
    ):
        raise _invalid(
            "`max_threads` must be an integer >= 0. "
            f"Received: max_threads={max_threads!r}"
        )
    return load_library().smdist_host_reduce(
        inputs, scale=float(scale), out_type=out, max_threads=max_threads
    )


def _split_dynamic(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Splits `flat` into tensors shaped like `like`, whose shapes may be dynamic."""
    sizes = [tf.size(t, out_type=tf.int64) for t in like]
    parts = tf.split(flat, tf.stack(sizes))
    return [tf.reshape(p, tf.shape(t)) for p, t in zip(parts, like)]


@tf.RegisterGradient("SmdistPack")
def _pack_grad(op: Any, grad: tf.Tensor) -> list[tf.Tensor]:
    """d tensors[i] = scale * cast(grad segment i, T): Unpack with Pack's attrs."""
    scale = op.get_attr("scale")
    dtype = op.get_attr("T")
    inputs = list(op.inputs)
    if all(t.shape.is_fully_defined() for t in inputs):
        grads = load_library().smdist_unpack(
            grad, N=len(inputs), shapes=[t.shape for t in inputs], out_type=dtype
        )
    else:
        grads = [tf.cast(g, dtype) for g in _split_dynamic(grad, inputs)]
    if scale != 1.0:
        grads = [g * tf.cast(scale, dtype) for g in grads]
    return list(grads)


@tf.RegisterGradient("SmdistUnpack")
def _unpack_grad(op: Any, *grads: tf.Tensor) -> tf.Tensor:
    """d packed = Pack of the outputs' gradients (zeros where none), cast to T."""
    out_type = op.get_attr("out_type")
    grads = [
        tf.zeros_like(out) if g is None else tf.convert_to_tensor(g, out_type)
        for g, out in zip(grads, op.outputs)
    ]
    return load_library().smdist_pack(grads, scale=1.0, out_type=op.get_attr("T"))
