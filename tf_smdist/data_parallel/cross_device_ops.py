"""Cross-device reduction through host memory: pack, host reduce, unpack."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_smdist import _compat, _ops
from tf_smdist.data_parallel.buckets import Bucket, BucketPlan, plan_buckets

__all__ = ["COMPRESSIONS", "HostReduceCrossDeviceOps"]

logger = logging.getLogger(__name__)

COMPRESSIONS = {None: None, "fp16": tf.float16, "bf16": tf.bfloat16}
_HOST_REDUCIBLE = (tf.float32, tf.float16, tf.bfloat16)


def _check_compression(compression: Any) -> tf.DType | None:
    if compression not in COMPRESSIONS:
        raise ValueError(
            "Unknown gradient compression. Received: "
            f'compression={compression!r}. Use None (no compression), "fp16" '
            'or "bf16" (cast float32 buffers for the transfer; the host still '
            "sums in float32)."
        )
    return COMPRESSIONS[compression]


def _check_bucket_cap(bucket_cap_mb: Any) -> float:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise TypeError(
            "`bucket_cap_mb` must be a number. Received: "
            f"bucket_cap_mb={bucket_cap_mb!r}"
        )
    if not 0 < bucket_cap_mb < float("inf"):
        raise ValueError(
            "`bucket_cap_mb` must be a positive, finite number of MiB. Received: "
            f"bucket_cap_mb={bucket_cap_mb}. Use e.g. 25.0 (the default); a tiny "
            "value such as 1e-6 gives every gradient its own bucket."
        )
    return float(bucket_cap_mb)


def _dense_to_slices(value: tf.Tensor) -> tf.IndexedSlices:
    """A dense tensor as IndexedSlices over all its rows (mixed replicas)."""
    rows = tf.shape(value, out_type=tf.int64)[0]
    return tf.IndexedSlices(value, tf.range(rows), tf.shape(value, out_type=tf.int64))


class HostReduceCrossDeviceOps(tf.distribute.CrossDeviceOps):
    """Reduces across devices in host memory with the tf_smdist custom ops.

    The batch all-reduce of `N` per-replica tensor lists (the gradients) works
    bucket by bucket, following a `BucketPlan` made from the tensors' shapes
    and dtypes (reverse list order, about `bucket_cap_mb` MiB per bucket):

    1. `SmdistPack` on each replica's device flattens the bucket's tensors
       into one buffer (cast to float16/bfloat16 if `compression` is set).
    2. `SmdistHostReduce` on the host CPU sums the `N` buffers in float32,
       with the scale `1/N` fused in for `MEAN`; `_reduce_bucket_on_host` is
       this step, and the place where a cross-process all-reduce plugs in.
    3. `SmdistUnpack` on each destination device restores the shapes and
       dtypes. Destinations that share the host's memory (logical CPU
       devices) are served by one unpack on the host, without copies.

    Each bucket's chain depends only on its own tensors, so inside a
    `tf.function` early buckets are reduced while later gradients are still
    being computed.

    Tensors of other kinds take these paths:
    - `tf.IndexedSlices` (e.g. `Embedding` gradients) are all-gathered, as
      MirroredStrategy does: on the host, `SmdistPack` concatenates the
      replicas' value rows in replica order (with the `1/N` of a mean fused
      in) and the indices are concatenated alongside; every device gets the
      same `IndexedSlices`. They are not densified, since Keras optimizers
      update only the rows present in an `IndexedSlices` gradient (Adam's
      moments of absent rows stay as they are), so densifying would change
      the training result. Compression does not apply to them.
    - Float tensors whose shape is not fully defined are reduced one by one
      with `SmdistHostReduce` (no packing, as the buffer size is unknown when
      tracing).
    - Dtypes the host ops do not handle (float64, integers) are reduced by
      `tf.distribute.ReductionToOneDevice` on the host.

    Args:
        host_device: the host CPU device that sums the buffers.
            Defaults to `"/device:CPU:0"`.
        bucket_cap_mb: the fusion bucket size cap, in MiB, greater than 0.
            Defaults to `25.0`.
        compression: `None`, `"fp16"` or `"bf16"`: the dtype float32 buffers
            travel in (the host still accumulates in float32).
            Defaults to `None`.
        host_threads: the most threads one host reduction uses; `None` uses
            TensorFlow's CPU worker thread pool. Defaults to `None`.

    Example:
    >>> ops = HostReduceCrossDeviceOps(bucket_cap_mb=4.0)
    >>> strategy = tf.distribute.MirroredStrategy(
    ...     ["/cpu:0"], cross_device_ops=ops)
    """

    def __init__(
        self,
        *,
        host_device: str = "/device:CPU:0",
        bucket_cap_mb: float = 25.0,
        compression: str | None = None,
        host_threads: int | None = None,
    ) -> None:
        super().__init__()
        self._host_threads = host_threads
        self._bucket_cap_mb = _check_bucket_cap(bucket_cap_mb)
        self._compression = compression
        self._transfer_dtype = _check_compression(compression)
        self._host_device = _compat.device_util.canonicalize(host_device)
        self._plans: dict[tuple, BucketPlan] = {}
        self._fallback = tf.distribute.ReductionToOneDevice(
            reduce_to_device=host_device
        )

    @property
    def bucket_cap_mb(self) -> float:
        """The fusion bucket size cap in MiB."""
        return self._bucket_cap_mb

    @property
    def compression(self) -> str | None:
        """`None`, `"fp16"` or `"bf16"`."""
        return self._compression

    @property
    def host_device(self) -> str:
        """The device on which buckets are summed."""
        return self._host_device

    def __repr__(self) -> str:
        return (
            f"HostReduceCrossDeviceOps(host_device={self._host_device!r}, "
            f"bucket_cap_mb={self._bucket_cap_mb}, compression={self._compression!r})"
        )

    def __deepcopy__(self, memo: dict) -> HostReduceCrossDeviceOps:
        # Strategies are deep-copied by some Keras/TF utilities; the op
        # settings are immutable and plans are pure functions of their keys.
        return self

    # -- planning ---------------------------------------------------------

    def plan(
        self, shapes: Sequence[Sequence[int]], dtypes: Sequence[str]
    ) -> BucketPlan:
        """Returns (and caches) the bucket plan for tensors of these shapes and dtypes.

        Args:
            shapes: fully defined shapes, one per tensor.
            dtypes: dtype names, one per tensor.

        Example:
        >>> HostReduceCrossDeviceOps().plan([(3,)], ["float32"]).num_buckets
        1
        """
        key = (tuple(tuple(int(d) for d in s) for s in shapes), tuple(dtypes))
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_buckets(key[0], key[1], bucket_cap_mb=self._bucket_cap_mb)
            self._plans[key] = plan
            self._on_new_plan(plan)
        return plan

    def _on_new_plan(self, plan: BucketPlan) -> None:
        """Called once per new plan; a multi-process subclass verifies it here."""
        logger.info(
            "tf_smdist bucket plan: %r (fingerprint %s)", plan, plan.fingerprint()
        )

    # -- the host step (hook point for cross-process reduction) ------------

    def _reduce_bucket_on_host(
        self,
        packed: Sequence[tf.Tensor],
        *,
        scale: float,
        out_type: tf.DType,
        bucket: Bucket | None,
    ) -> tf.Tensor:
        """Sums the replicas' packed buffers of one bucket on the host.

        Runs under `tf.device(self.host_device)`. A multi-process subclass
        overrides this to all-reduce the returned host tensor across
        processes (`scale` already includes the 1/world-size of `MEAN`).

        Args:
            packed: one 1-D buffer per local replica (or, for tensors without
                a static shape, the tensors themselves).
            scale: the factor fused into the sum (1/replicas for `MEAN`).
            out_type: the dtype of the returned tensor.
            bucket: the bucket being reduced, or `None` for a lone tensor
                without a static shape.

        Returns:
            The reduced tensor on the host device.
        """
        del bucket
        return self._host_reduce(packed, scale=scale, out_type=out_type)

    def _host_reduce(
        self, inputs: Sequence[tf.Tensor], *, scale: float, out_type: tf.DType
    ) -> tf.Tensor:
        if self._host_threads is None:
            return _ops.host_reduce(inputs, scale=scale, out_type=out_type)
        return _ops.host_reduce(
            inputs, scale=scale, out_type=out_type, max_threads=self._host_threads
        )

    # -- CrossDeviceOps implementation --------------------------------------

    def reduce_implementation(
        self, reduce_op: Any, per_replica_value: Any, destinations: Any, options: Any
    ) -> Any:
        del options
        return self._reduce_values(reduce_op, [per_replica_value], destinations)[0]

    def batch_reduce_implementation(
        self, reduce_op: Any, value_destination_pairs: Any, options: Any
    ) -> list[Any]:
        del options
        pairs = list(value_destination_pairs)
        first_devices = _compat.get_devices_from(pairs[0][0])
        if all(
            _compat.get_devices_from(v) == first_devices
            and set(_compat.get_devices_from(d)) == set(first_devices)
            for v, d in pairs
        ):
            return self._reduce_values(reduce_op, [v for v, _ in pairs], pairs[0][0])
        return [self._reduce_values(reduce_op, [v], d)[0] for v, d in pairs]

    def _gather_implementation(
        self, per_replica_value: Any, destinations: Any, axis: int, options: Any
    ) -> Any:
        # Concatenation is not a reduction: gather on the host, then copy.
        return _compat.cross_device_gather(
            self._fallback, per_replica_value, destinations, axis, options
        )

    @property
    def _num_between_graph_workers(self) -> int:
        # Replicas in other processes; a multi-process subclass overrides it.
        return 1

    # -- execution -----------------------------------------------------------

    def _reduce_values(
        self, reduce_op: Any, per_replica_values: Sequence[Any], destinations: Any
    ) -> list[Any]:
        """Reduces several PerReplica values to `destinations`, bucketed."""
        reduce_op = (
            tf.distribute.ReduceOp(reduce_op.upper())
            if isinstance(reduce_op, str)
            else reduce_op
        )
        if reduce_op not in (tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN):
            raise ValueError(
                f"`reduce_op` must be SUM or MEAN. Received: reduce_op={reduce_op}"
            )
        dest_devices = _compat.get_devices_from(destinations)
        num_local = len(per_replica_values[0].values)
        num_replicas = num_local * self._num_between_graph_workers
        scale = 1.0 / num_replicas if reduce_op == tf.distribute.ReduceOp.MEAN else 1.0

        results: list[list[Any] | Any] = [None] * len(per_replica_values)
        bucketed: list[int] = []  # value positions going through the buckets
        bucketed_parts: list[list[tf.Tensor]] = []  # per value: one tensor per replica
        for i, value in enumerate(per_replica_values):
            parts = list(value.values)
            dtype = tf.as_dtype(parts[0].dtype)
            if dtype not in _HOST_REDUCIBLE:
                results[i] = self._fallback.reduce(reduce_op, value, destinations)
                continue
            if any(isinstance(p, tf.IndexedSlices) for p in parts):
                results[i] = self._reduce_sparse(parts, scale, dest_devices)
                continue
            shapes = {
                tuple(p.shape.as_list()) if p.shape.is_fully_defined() else None
                for p in parts
            }
            if None in shapes or len(shapes) != 1:
                results[i] = self._reduce_unshaped(parts, scale, dtype, dest_devices)
                continue
            bucketed.append(i)
            bucketed_parts.append(parts)

        if bucketed:
            plan = self.plan(
                [bucketed_parts[k][0].shape.as_list() for k in range(len(bucketed))],
                [
                    tf.as_dtype(bucketed_parts[k][0].dtype).name
                    for k in range(len(bucketed))
                ],
            )
            per_value_outputs: list[list[tf.Tensor] | None] = [None] * len(bucketed)
            for bucket in plan.buckets:
                outs = self._all_reduce_bucket(
                    bucket, bucketed_parts, scale, dest_devices
                )  # outs[d][j] for destination d, j-th tensor of the bucket
                for j, k in enumerate(bucket.tensor_indices):
                    per_value_outputs[k] = [
                        outs[d][j] for d in range(len(dest_devices))
                    ]
            for k, i in enumerate(bucketed):
                results[i] = per_value_outputs[k]

        return [
            r
            if not isinstance(r, list)
            else _compat.regroup(r, wrap_class=_compat.distribute_values.Mirrored)
            for r in results
        ]

    def _all_reduce_bucket(
        self,
        bucket: Bucket,
        parts: Sequence[Sequence[tf.Tensor]],
        scale: float,
        dest_devices: Sequence[str],
    ) -> list[list[tf.Tensor]]:
        dtype = tf.as_dtype(bucket.dtype)
        if bucket.num_elements == 0:
            outs = []
            for dev in dest_devices:
                with tf.device(dev):
                    outs.append([tf.zeros(s, dtype) for s in bucket.shapes])
            return outs
        transfer = dtype
        if self._transfer_dtype is not None and dtype == tf.float32:
            transfer = self._transfer_dtype
        num_local = len(parts[bucket.tensor_indices[0]])
        if self._skips_packing(parts, bucket, dest_devices):
            return self._reduce_in_host_memory(bucket, parts, scale, dest_devices)
        packed = []
        with tf.name_scope(f"smdist_bucket_{bucket.index}"):
            for r in range(num_local):
                tensors = [parts[k][r] for k in bucket.tensor_indices]
                with tf.device(tensors[0].device):
                    packed.append(_ops.pack(tensors, out_type=transfer))
            with tf.device(self._host_device):
                host = self._reduce_bucket_on_host(
                    packed, scale=scale, out_type=transfer, bucket=bucket
                )
            if self._in_host_memory(dest_devices):
                # The destinations share the host's memory (logical CPU
                # devices): unpack once and hand every device the same
                # buffers (identity ops, no copies).
                with tf.device(self._host_device):
                    shared = _ops.unpack(host, bucket.shapes, out_type=dtype)
                outs = []
                for dev in dest_devices:
                    with tf.device(dev):
                        outs.append([tf.identity(t) for t in shared])
                return outs
            outs = []
            for dev in dest_devices:
                with tf.device(dev):
                    outs.append(_ops.unpack(host, bucket.shapes, out_type=dtype))
        return outs

    def _skips_packing(
        self,
        parts: Sequence[Sequence[tf.Tensor]],
        bucket: Bucket,
        dest_devices: Sequence[str],
    ) -> bool:
        """Whether a bucket can be summed in place, without pack and unpack.

        Packing makes one contiguous buffer per bucket for the transfer to
        the host and for the cross-process step. When every replica's tensors
        already live in host memory (logical CPU devices), nothing is
        transferred, so in a single process without compression each tensor
        is summed straight from the replicas' buffers by `SmdistHostReduce`:
        one read of every input and one write, as with an `add_n`.
        """
        if self._num_between_graph_workers != 1 or self._transfer_dtype is not None:
            return False
        sources = [
            parts[k][r].device
            for k in bucket.tensor_indices
            for r in range(len(parts[k]))
        ]
        return self._in_host_memory(list(sources) + list(dest_devices))

    def _reduce_in_host_memory(
        self,
        bucket: Bucket,
        parts: Sequence[Sequence[tf.Tensor]],
        scale: float,
        dest_devices: Sequence[str],
    ) -> list[list[tf.Tensor]]:
        dtype = tf.as_dtype(bucket.dtype)
        shared = []
        with tf.name_scope(f"smdist_bucket_{bucket.index}"):
            with tf.device(self._host_device):
                for k in bucket.tensor_indices:
                    shared.append(
                        self._host_reduce(parts[k], scale=scale, out_type=dtype)
                    )
            outs = []
            for dev in dest_devices:
                with tf.device(dev):
                    outs.append([tf.identity(t) for t in shared])
        return outs

    def _in_host_memory(self, devices: Sequence[str]) -> bool:
        """Whether all `devices` are CPU devices of the host device's process."""
        host = tf.DeviceSpec.from_string(self._host_device)
        for d in devices:
            spec = tf.DeviceSpec.from_string(d)
            if (spec.device_type or "").upper() != "CPU" or (
                spec.job,
                spec.replica,
                spec.task,
            ) != (host.job, host.replica, host.task):
                return False
        return True

    def _gather_slices_on_host(
        self, parts: Sequence[tf.IndexedSlices], *, scale: float
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Concatenates the replicas' slices on the host: (flat values, indices).

        Runs under `tf.device(self.host_device)`; a multi-process subclass
        overrides this to all-gather both across processes.
        """
        values = _ops.pack([p.values for p in parts], scale=scale)
        indices = [p.indices for p in parts]
        if len({i.dtype for i in indices}) > 1:
            indices = [tf.cast(i, tf.int64) for i in indices]
        indices = tf.concat(indices, axis=0)
        return values, indices

    def _reduce_sparse(
        self,
        parts: Sequence[Any],
        scale: float,
        dest_devices: Sequence[str],
    ) -> list[tf.IndexedSlices]:
        parts = [
            p if isinstance(p, tf.IndexedSlices) else _dense_to_slices(p) for p in parts
        ]
        row_shape = parts[0].values.shape[1:]
        with tf.device(self._host_device):
            values, indices = self._gather_slices_on_host(parts, scale=scale)
        outs = []
        for dev in dest_devices:
            with tf.device(dev):
                rows = tf.reshape(values, [-1] + row_shape.as_list())
                if row_shape.is_fully_defined():
                    rows.set_shape([None] + row_shape.as_list())
                outs.append(
                    tf.IndexedSlices(rows, tf.identity(indices), parts[0].dense_shape)
                )
        return outs

    def _reduce_unshaped(
        self,
        parts: Sequence[tf.Tensor],
        scale: float,
        dtype: tf.DType,
        dest_devices: Sequence[str],
    ) -> list[tf.Tensor]:
        with tf.device(self._host_device):
            host = self._reduce_bucket_on_host(
                parts, scale=scale, out_type=dtype, bucket=None
            )
        outs = []
        for dev in dest_devices:
            with tf.device(dev):
                outs.append(tf.identity(host))
        return outs
