"""Multi-process data parallelism: the cross-process step over MPI.

`DataParallelStrategy` uses these cross-device ops when the job has several
processes (started by `mpirun` or `python -m tf_smdist.launch`): each
process reduces its local replicas' buckets on the host as in one process,
then `MpiHostReduceCrossDeviceOps` all-reduces every host bucket across the
processes with `SmdistHostAllreduce` (bucket-plan order, one ordering group
per plan). The strategy's extended object for such a job,
`MultiProcessExtended`, lives in `tf_smdist.data_parallel.extended`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_smdist import _compat, _mpi_ops
from tf_smdist.data_parallel import cluster
from tf_smdist.data_parallel.buckets import Bucket, BucketPlan
from tf_smdist.data_parallel.cross_device_ops import HostReduceCrossDeviceOps
from tf_smdist.data_parallel.extended import ALLREDUCIBLE

__all__ = ["MpiHostReduceCrossDeviceOps"]

logger = logging.getLogger(__name__)



class _CrossProcessFallback:
    """ReductionToOneDevice on the host, then an all-reduce across processes."""

    def __init__(self, ops: MpiHostReduceCrossDeviceOps) -> None:
        self._ops = ops
        self._local = tf.distribute.ReductionToOneDevice(
            reduce_to_device=ops.host_device)

    def reduce(self, reduce_op: Any, value: Any, destinations: Any) -> Any:
        local = self._local.reduce(
            tf.distribute.ReduceOp.SUM, value, destinations=self._ops.host_device)
        if isinstance(local, tf.distribute.DistributedValues):
            local = local.values[0]
        if local.dtype not in ALLREDUCIBLE:
            raise TypeError(
                "This dtype cannot be reduced across processes. Received: "
                f"dtype={local.dtype.name}. Cast it to float32 or int64 first.")
        with tf.device(self._ops.host_device):
            total = _mpi_ops.host_allreduce(
                tf.identity(local), group=self._ops.misc_group)
            if reduce_op == tf.distribute.ReduceOp.MEAN:
                n = len(value.values) * self._ops.world_size
                if total.dtype.is_integer:
                    total = total // n
                else:
                    total = total / tf.cast(n, total.dtype)
        outs = []
        for dev in _compat.get_devices_from(destinations):
            with tf.device(dev):
                outs.append(tf.identity(total))
        return _compat.regroup(outs, wrap_class=_compat.distribute_values.Mirrored)

    def _gather(self, value: Any, destinations: Any, axis: int, options: Any) -> Any:
        # Gathers stay local to the process (documented limitation).
        return _compat.cross_device_gather(
            self._local, value, destinations, axis, options)


class MpiHostReduceCrossDeviceOps(HostReduceCrossDeviceOps):
    """`HostReduceCrossDeviceOps` plus an all-reduce of each host bucket over MPI.

    After the local replicas' buffers of a bucket are summed on the host
    (with the mean's `1/(local replicas x processes)` fused in), the host
    buffer is all-reduced across the processes by `SmdistHostAllreduce` on
    the communication thread, strictly in plan order. float16/bfloat16
    transfers are summed across processes in float32. Each new bucket plan
    is checked across ranks (same fingerprint, same tf_smdist version) and
    given its own ordering group. `tf.IndexedSlices` (e.g. `Embedding`
    gradients) are all-gathered across processes, concatenated in global
    replica order exactly as `MirroredStrategy` does in one process, so
    only the rows present in some replica's batch are updated.

    Args:
        world_size: the number of processes in the job.
        **kwargs: `HostReduceCrossDeviceOps` options (`host_device`,
            `bucket_cap_mb`, `compression`, `host_threads`).

    Example:
    >>> ops = MpiHostReduceCrossDeviceOps(world_size=2)  # doctest: +SKIP
    """

    def __init__(self, *, world_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._world_size = int(world_size)
        # Per plan fingerprint: (group, {bucket index: position}, positions).
        # Empty buckets never reach the host, so they take no position.
        self._groups: dict[str, tuple[int, dict[int, int], int]] = {}
        self._current: tuple[int, dict[int, int], int] = (0, {}, 1)
        self._misc_group = cluster.allocate_group()
        self._fallback = _CrossProcessFallback(self)

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return self._world_size

    @property
    def misc_group(self) -> int:
        """The ordering group of collectives outside bucket plans."""
        return self._misc_group

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", world_size={self._world_size})"

    @property
    def _num_between_graph_workers(self) -> int:
        return self._world_size

    def plan(
        self, shapes: Sequence[Sequence[int]], dtypes: Sequence[str]
    ) -> BucketPlan:
        plan = super().plan(shapes, dtypes)
        self._current = self._groups[plan.fingerprint()]
        return plan

    def _on_new_plan(self, plan: BucketPlan) -> None:
        super()._on_new_plan(plan)
        cluster.handshake(
            what="bucket plan", digest=plan.fingerprint(),
            summary=f"{plan.num_buckets} buckets, {plan.num_tensors} tensors")
        if plan.fingerprint() not in self._groups:
            positions = {
                b.index: k for k, b in enumerate(
                    b for b in plan.buckets if b.num_elements > 0)}
            self._groups[plan.fingerprint()] = (
                cluster.allocate_group(), positions, max(1, len(positions)))

    def _reduce_bucket_on_host(
        self,
        packed: Sequence[tf.Tensor],
        *,
        scale: float,
        out_type: tf.DType,
        bucket: Bucket | None,
    ) -> tf.Tensor:
        wide = tf.float32 if out_type in (tf.float16, tf.bfloat16) else out_type
        host = super()._reduce_bucket_on_host(
            packed, scale=scale, out_type=wide, bucket=bucket)
        if bucket is None:
            group, index, size = self._misc_group, 0, 1
        else:
            group, positions, size = self._current
            index = positions[bucket.index]
        total = _mpi_ops.host_allreduce(
            host, group=group, index=index, group_size=size)
        return total if wide == out_type else tf.cast(total, out_type)

    def _gather_slices_on_host(
        self, parts: Sequence[tf.IndexedSlices], *, scale: float
    ) -> tuple[tf.Tensor, tf.Tensor]:
        # All-gather of the processes' slices, concatenated in rank order
        # (= global replica order, as MirroredStrategy concatenates): two
        # all-gathers of the misc group, values then indices, each with this
        # rank's row count (the counts may differ per rank). The indices wait
        # for the values, so every rank issues them in the same order.
        values, indices = super()._gather_slices_on_host(parts, scale=scale)
        all_values, all_indices = _mpi_ops.allgather_slices(
            values, indices, parts[0].values.shape[1:], group=self._misc_group)
        return tf.reshape(all_values, [-1]), all_indices
