"""Fusion-bucket planning for the gradient all-reduce (pure Python, no TensorFlow)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Sequence

__all__ = ["Bucket", "BucketPlan", "dtype_size", "plan_buckets"]

_MIB = 1024 * 1024
_DTYPE_SIZES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
}


def dtype_size(dtype: str) -> int:
    """Returns the bytes per element of the dtype named `dtype`.

    Args:
        dtype: a dtype name such as `"float32"` or `"bfloat16"`.

    Example:
    >>> dtype_size("bfloat16")
    2
    """
    try:
        return _DTYPE_SIZES[dtype]
    except KeyError:
        raise ValueError(
            f"Unknown dtype for bucket planning. Received: dtype={dtype!r}. "
            f"Expected one of {sorted(_DTYPE_SIZES)}."
        ) from None


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One fusion bucket: tensors reduced together as one packed buffer.

    Attributes:
        index: the bucket's position in the plan (the order of reduction).
        tensor_indices: positions, in the original tensor list, of the
            bucket's tensors, in packing order.
        shapes: the tensors' shapes, in packing order.
        dtype: the dtype name shared by every tensor of the bucket.
        num_elements: the total element count of the packed buffer.
        nbytes: the packed buffer's size in the tensors' own dtype.

    Example:
    >>> plan = plan_buckets([(2, 3)], ["float32"], bucket_cap_mb=1.0)
    >>> plan.buckets[0].num_elements
    6
    """

    index: int
    tensor_indices: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    num_elements: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Fusion buckets for a list of tensors, identical wherever it is computed.

    A plan depends only on the tensors' shapes and dtypes and on the cap, so
    every replica and every worker computes the same one; `fingerprint`
    compares plans across processes cheaply.

    Attributes:
        buckets: the buckets in reduction order.
        num_tensors: the length of the planned tensor list.
        bucket_cap_bytes: the cap the plan was made with, in bytes.

    Example:
    >>> plan = plan_buckets([(4,), (4,)], ["float32"] * 2, bucket_cap_mb=1.0)
    >>> [b.tensor_indices for b in plan.buckets]
    [(1, 0)]
    """

    buckets: tuple[Bucket, ...]
    num_tensors: int
    bucket_cap_bytes: int

    @property
    def num_buckets(self) -> int:
        """The number of buckets."""
        return len(self.buckets)

    def fingerprint(self) -> str:
        """A short hex digest of the plan, equal on every worker that agrees.

        Example:
        >>> a = plan_buckets([(3,)], ["float32"], bucket_cap_mb=1.0)
        >>> b = plan_buckets([(3,)], ["float32"], bucket_cap_mb=1.0)
        >>> a.fingerprint() == b.fingerprint()
        True
        """
        text = repr(
            (
                self.num_tensors,
                self.bucket_cap_bytes,
                [(b.tensor_indices, b.shapes, b.dtype) for b in self.buckets],
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def bucket_of(self, tensor_index: int) -> int:
        """Returns the index of the bucket holding tensor `tensor_index`.

        Example:
        >>> plan_buckets([(1,), (1,)], ["float32"] * 2, bucket_cap_mb=1e-6).bucket_of(0)
        1
        """
        for b in self.buckets:
            if tensor_index in b.tensor_indices:
                return b.index
        raise ValueError(
            f"Tensor index out of range of the plan. Received: "
            f"tensor_index={tensor_index}, for a plan of {self.num_tensors} tensors."
        )

    def __repr__(self) -> str:
        total = sum(b.nbytes for b in self.buckets)
        return (
            f"BucketPlan(num_tensors={self.num_tensors}, "
            f"num_buckets={self.num_buckets}, total_bytes={total}, "
            f"bucket_cap_bytes={self.bucket_cap_bytes})"
        )


def _num_elements(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def plan_buckets(
    shapes: Iterable[Sequence[int]],
    dtypes: Iterable[str],
    *,
    bucket_cap_mb: float = 25.0,
) -> BucketPlan:
    """Groups tensors into fusion buckets of about `bucket_cap_mb` MiB.

    Tensors are visited in reverse order of the list (a model's gradient list
    follows layer order, and the backward pass produces the last layers'
    gradients first), so the first bucket holds the gradients that are ready
    first. A bucket holds tensors of one dtype; a tensor is appended to the
    open bucket of its dtype unless that would take the bucket past the cap,
    in which case the open bucket is closed and a new one started. A tensor
    larger than the cap gets a bucket of its own; tensors are never split.
    Buckets are ordered by the reverse-order position of their first tensor.
    The plan is deterministic: the same shapes, dtypes and cap always give the
    same plan.

    Args:
        shapes: one fully defined shape (a sequence of ints) per tensor.
        dtypes: one dtype name (e.g. `"float32"`) per tensor.
        bucket_cap_mb: the bucket size cap in MiB, greater than 0.
            Defaults to `25.0`.

    Returns:
        A `BucketPlan`.

    Raises:
        ValueError: `bucket_cap_mb` is not positive, the lists differ in
            length, or a shape is not fully defined.

    Example:
    >>> plan = plan_buckets([(256, 128), (128,), (128, 10), (10,)],
    ...                     ["float32"] * 4, bucket_cap_mb=0.01)
    >>> [b.tensor_indices for b in plan.buckets]
    [(3, 2, 1), (0,)]
    """
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise TypeError(
            "`bucket_cap_mb` must be a number. Received: "
            f"bucket_cap_mb={bucket_cap_mb!r}"
        )
    if not bucket_cap_mb > 0 or math.isinf(bucket_cap_mb):
        raise ValueError(
            "`bucket_cap_mb` must be a positive, finite number of MiB. "
            f"Received: bucket_cap_mb={bucket_cap_mb}. Use e.g. 25.0; a tiny "
            "value such as 1e-6 gives every tensor its own bucket."
        )
    shapes = [tuple(s) for s in shapes]
    dtypes = [str(d) for d in dtypes]
    if len(shapes) != len(dtypes):
        raise ValueError(
            "`shapes` and `dtypes` must have one entry per tensor. Received: "
            f"len(shapes)={len(shapes)}, len(dtypes)={len(dtypes)}."
        )
    for i, s in enumerate(shapes):
        if any(d is None or int(d) < 0 for d in s):
            raise ValueError(
                "Every shape must be fully defined to plan buckets. Received: "
                f"shape={s} for tensor {i}."
            )
    cap = max(1, int(bucket_cap_mb * _MIB))

    # Per dtype: the open bucket as [first_position, indices, elements, bytes].
    open_buckets: dict[str, list] = {}
    closed: list[tuple[int, str, list[int], int, int]] = []

    def close(dtype: str) -> None:
        first, idx, elems, nbytes = open_buckets.pop(dtype)
        closed.append((first, dtype, idx, elems, nbytes))

    for position, i in enumerate(reversed(range(len(shapes)))):
        dtype = dtypes[i]
        elems = _num_elements(shapes[i])
        nbytes = elems * dtype_size(dtype)
        current = open_buckets.get(dtype)
        if current is not None and current[3] + nbytes > cap:
            close(dtype)
            current = None
        if current is None:
            current = open_buckets[dtype] = [position, [], 0, 0]
        current[1].append(i)
        current[2] += elems
        current[3] += nbytes
    for dtype in list(open_buckets):
        close(dtype)
    closed.sort(key=lambda c: c[0])
    buckets = tuple(
        Bucket(
            index=k,
            tensor_indices=tuple(idx),
            shapes=tuple(shapes[i] for i in idx),
            dtype=dtype,
            num_elements=elems,
            nbytes=nbytes,
        )
        for k, (_, dtype, idx, elems, nbytes) in enumerate(closed)
    )
    return BucketPlan(buckets=buckets, num_tensors=len(shapes), bucket_cap_bytes=cap)
