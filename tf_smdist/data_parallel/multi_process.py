"""Multi-process data parallelism: the cross-process step over MPI.

`DataParallelStrategy` uses these classes when the job has several
processes (started by `mpirun` or `python -m tf_smdist.launch`): each
process reduces its local replicas' buckets on the host as in one process,
then `MpiHostReduceCrossDeviceOps` all-reduces every host bucket across the
processes with `SmdistHostAllreduce` (bucket-plan order, one ordering group
per plan), and `MultiProcessExtended` makes `num_replicas_in_sync` global,
shards the input by rank, broadcasts rank 0's initial variable values and
lets only rank 0 checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_smdist import _compat, _mpi_ops, _ops
from tf_smdist.data_parallel import cluster
from tf_smdist.data_parallel.buckets import Bucket, BucketPlan
from tf_smdist.data_parallel.cross_device_ops import HostReduceCrossDeviceOps
from tf_smdist.data_parallel.strategy import _DataParallelExtended

__all__ = ["MpiHostReduceCrossDeviceOps", "MultiProcessExtended"]

logger = logging.getLogger(__name__)

_ALLREDUCIBLE = (tf.float32, tf.float64, tf.float16, tf.bfloat16, tf.int32, tf.int64)


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
        if local.dtype not in _ALLREDUCIBLE:
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
        return self._local._gather(  # pylint: disable=protected-access
            value, destinations, axis, options)


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
        # (= global replica order, as MirroredStrategy concatenates), with
        # two all-reduces of the misc group (program order, the same on
        # every rank): the per-rank row counts, then a zero
        # [world, max rows, words] int32 buffer holding this rank's rows in
        # its slot. Rows travel as bit patterns (values bitcast, int64
        # indices split in two int32 words): summing zeros into them is exact.
        values, indices = super()._gather_slices_on_host(parts, scale=scale)
        row_shape = parts[0].values.shape[1:]
        if not row_shape.is_fully_defined():
            raise ValueError(
                "Sparse gradients need a static row shape across processes. "
                f"Received: row shape={row_shape}.")
        width = row_shape.num_elements()
        rank, world = cluster.rank(), self._world_size
        count = tf.shape(indices, out_type=tf.int32)[0]
        counts = _mpi_ops.host_allreduce(
            tf.one_hot(rank, world, dtype=tf.int32) * count, group=self._misc_group)
        most = tf.reduce_max(counts)

        wide = values if values.dtype == tf.float32 else tf.cast(values, tf.float32)
        rows = tf.concat([
            tf.bitcast(tf.reshape(wide, [-1, width]), tf.int32),
            tf.reshape(tf.bitcast(tf.cast(indices, tf.int64), tf.int32), [-1, 2]),
        ], axis=1)  # [count, width + 2]
        rows = tf.pad(rows, [[0, most - count], [0, 0]])
        slots = tf.pad(rows[tf.newaxis], [[rank, world - 1 - rank], [0, 0], [0, 0]])
        gathered = _mpi_ops.host_allreduce(slots, group=self._misc_group)
        valid = tf.range(most)[tf.newaxis, :] < counts[:, tf.newaxis]
        rows = tf.boolean_mask(gathered, valid)  # [sum(counts), width + 2]
        all_values = tf.bitcast(rows[:, :width], tf.float32)
        if values.dtype != tf.float32:  # float16/bfloat16: exact in float32
            all_values = tf.cast(all_values, values.dtype)
        all_indices = tf.bitcast(rows[:, width:], tf.int64)
        return (tf.reshape(all_values, [-1]),
                tf.cast(all_indices, indices.dtype))


class MultiProcessExtended(_DataParallelExtended):
    """The strategy's extended object when the job has several processes.

    Replicas are this process's devices; `num_replicas_in_sync` counts the
    replicas of every process. Input is sharded by rank (tf.data auto-shard:
    FILE, else DATA), each global batch split across all replicas. Variables
    created in the scope take rank 0's initial value. Only rank 0 writes
    checkpoints and summaries (`should_checkpoint`).

    Example:
    >>> # in a process started by `python -m tf_smdist.launch --nproc 2 ...`
    >>> strategy = smd.DataParallelStrategy()  # doctest: +SKIP
    >>> strategy.num_replicas_in_sync  # doctest: +SKIP
    2
    """

    def __init__(
        self,
        container_strategy: Any,
        *,
        devices: Sequence[str],
        cross_device_ops: MpiHostReduceCrossDeviceOps,
        rank: int,
        world_size: int,
    ) -> None:
        self._smd_rank = int(rank)
        self._smd_world = int(world_size)
        super().__init__(
            container_strategy, devices=list(devices),
            cross_device_ops=cross_device_ops)

    # -- replicas ------------------------------------------------------------

    @property
    def _num_replicas_in_sync(self) -> int:
        return len(self._devices) * self._smd_world

    def _get_replica_id_in_sync_group(self, replica_id: int) -> int:
        return self._smd_rank * len(self._devices) + replica_id

    def _get_local_replica_id(self, replica_id_in_sync_group: int) -> int:
        return replica_id_in_sync_group - self._smd_rank * len(self._devices)

    @property
    def experimental_between_graph(self) -> bool:
        return True

    @property
    def should_checkpoint(self) -> bool:
        return self._smd_rank == 0

    @property
    def should_save_summary(self) -> bool:
        return self._smd_rank == 0

    def _get_cross_device_ops(self, value: Any) -> MpiHostReduceCrossDeviceOps:
        # MirroredExtended sends int32 values (and XLA) to process-local
        # reductions; across processes every reduction must take our ops.
        del value
        return self._cross_device_ops

    def _reduce_to(
        self, reduce_op: Any, value: Any, destinations: Any, options: Any
    ) -> Any:
        # Like MultiWorkerMirroredStrategy: a value that is not distributed
        # (one local replica, or a cross-replica tensor) is this process's
        # contribution, reduced across the processes.
        reduce_op = tf.distribute.ReduceOp(reduce_op) if isinstance(
            reduce_op, str) else reduce_op
        if (isinstance(value, _compat.distribute_values.Mirrored)
                and reduce_op == tf.distribute.ReduceOp.MEAN):
            return value
        if not isinstance(value, tf.distribute.DistributedValues):
            if tf.nest.is_nested(value):
                # Keras reduces a whole data batch (keras-team/keras#20585).
                return tf.nest.map_structure(
                    lambda v: self._reduce_to(reduce_op, v, destinations, options),
                    value)
            if not isinstance(value, tf.IndexedSlices):  # stays sparse
                value = tf.convert_to_tensor(value)
        return self._get_cross_device_ops(value).reduce(
            reduce_op, value, destinations=destinations, options=options)

    # -- input ---------------------------------------------------------------

    def _make_input_context(self) -> tf.distribute.InputContext:
        return tf.distribute.InputContext(
            num_input_pipelines=self._smd_world,
            input_pipeline_id=self._smd_rank,
            num_replicas_in_sync=self._num_replicas_in_sync)

    def _experimental_distribute_dataset(self, dataset: Any, options: Any) -> Any:
        if (options and options.experimental_replication_mode
                == tf.distribute.InputReplicationMode.PER_REPLICA):
            raise NotImplementedError(
                "InputReplicationMode.PER_REPLICA is only supported in "
                "`distribute_datasets_from_function`.")
        return _compat.input_util.get_distributed_dataset(
            dataset,
            self._input_workers_with_options(options),
            self._container_strategy(),
            num_replicas_in_sync=self._num_replicas_in_sync,
            input_context=self._make_input_context(),
            options=options)

    def _distribute_datasets_from_function(self, dataset_fn: Any, options: Any) -> Any:
        return _compat.input_util.get_distributed_datasets_from_function(
            dataset_fn=dataset_fn,
            input_workers=self._input_workers_with_options(options),
            input_contexts=[self._make_input_context()],
            strategy=self._container_strategy(),
            options=options)

    def _experimental_distribute_values_from_function(self, value_fn: Any) -> Any:
        values = []
        for local_id in range(len(self._devices)):
            replica_id = self._get_replica_id_in_sync_group(local_id)
            values.append(value_fn(tf.distribute.experimental.ValueContext(
                replica_id, self._num_replicas_in_sync)))
        return _compat.regroup(values, always_wrap=True)

    # -- variables -----------------------------------------------------------

    def _get_variable_creator_initial_value(
        self, replica_id: int, device: Any, primary_var: Any, **kwargs: Any
    ) -> Any:
        if replica_id != 0:
            return super()._get_variable_creator_initial_value(
                replica_id, device, primary_var, **kwargs)
        initial_value = kwargs["initial_value"]
        dtype = kwargs.get("dtype", None)
        name = kwargs.get("name", None) or "variable"

        def broadcast_initial_value() -> tf.Tensor:
            value = initial_value() if callable(initial_value) else initial_value
            value = getattr(value, "wrapped_value", value)  # CheckpointInitialValue
            value = tf.convert_to_tensor(value, dtype=dtype)
            if value.dtype.base_dtype not in (*_ALLREDUCIBLE, tf.uint8, tf.bool):
                return value
            # Same shape and dtype everywhere, else the broadcast cannot match.
            cluster.handshake(
                what=f"variable {name!r}",
                digest=f"{value.shape.as_list()}:{value.dtype.name}",
                summary="")
            return _mpi_ops.broadcast(value, root=0)

        return broadcast_initial_value


def setup(strategy: Any, devices: Sequence[str], **ops_kwargs: Any) -> None:
    """Turns a `DataParallelStrategy` under construction into a multi-process one.

    Args:
        strategy: the strategy whose `__init__` is running.
        devices: its local devices.
        **ops_kwargs: the `HostReduceCrossDeviceOps` options.

    Example:
    >>> setup(strategy, ["/cpu:0"], bucket_cap_mb=25.0)  # doctest: +SKIP
    """
    rank, world = cluster.initialize()
    _ops.load_library()
    ops = MpiHostReduceCrossDeviceOps(world_size=world, **ops_kwargs)
    extended = MultiProcessExtended(
        strategy, devices=devices, cross_device_ops=ops, rank=rank, world_size=world)
    tf.distribute.Strategy.__init__(strategy, extended)
    logger.info(
        "DataParallelStrategy rank %d of %d over %s with %r",
        rank, world, list(devices), ops)
