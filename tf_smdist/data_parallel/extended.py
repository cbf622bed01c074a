"""The strategy's extended objects: one process, or one of several.

`DataParallelExtended` routes every reduction of a `MirroredStrategy`
through our cross-device ops; `MultiProcessExtended` adds what a job of
several processes needs (global replica ids, input sharded by rank, rank 0's
initial variable values, checkpoints from rank 0 only).
`tf_smdist.data_parallel.strategy` picks one of them, with its cross-device
ops, in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_smdist import _compat, _mpi_ops
from tf_smdist.data_parallel import cluster

__all__ = ["DataParallelExtended", "MultiProcessExtended"]

# Dtypes the communication layer reduces and broadcasts.
ALLREDUCIBLE = (tf.float32, tf.float64, tf.float16, tf.bfloat16, tf.int32, tf.int64)


class DataParallelExtended(_compat.MirroredExtended):
    """MirroredExtended whose reductions all go through our cross-device ops.

    Example:
    >>> strategy.extended  # doctest: +SKIP
    <...DataParallelExtended object ...>
    """

    def _reduce_to(
        self, reduce_op: Any, value: Any, destinations: Any, options: Any
    ) -> Any:
        # MirroredExtended sends reductions to CPU destinations (e.g. the
        # cross-replica `strategy.reduce`) to ReductionToOneDevice; route them
        # through the host-reduce ops instead, like every other reduction.
        if isinstance(value, tf.distribute.DistributedValues) and not _is_mirrored(
            value
        ):
            return self._get_cross_device_ops(value).reduce(
                reduce_op, value, destinations=destinations, options=options
            )
        return super()._reduce_to(reduce_op, value, destinations, options)

    def _get_cross_device_ops(self, value: Any) -> Any:
        self._refuse_xla()
        return super()._get_cross_device_ops(value)

    def _refuse_xla(self) -> None:
        """Raises when a reduction is built inside an XLA-compiled function.

        MirroredExtended would silently switch to NCCL collectives inside
        XLA on GPUs (no merge_call); on CPUs XLA would fail at the first step
        on an op without an XLA kernel.
        """
        if self._use_merge_call() and not _compat.in_xla_context():
            return
        raise ValueError(
            "DataParallelStrategy cannot reduce inside an XLA-compiled "
            "function: its host-reduce ops have no XLA kernels. Received: "
            "a replica function compiled with jit_compile=True. Compile "
            "with jit_compile=False (Keras' default under tf.distribute).")

    def _update(self, var: Any, fn: Any, args: Any, kwargs: Any, group: bool) -> Any:
        if not isinstance(var, _compat.distribute_values.DistributedVariable):
            raise ValueError(
                "A variable updated under DataParallelStrategy was created "
                "outside `strategy.scope()`. Received: "
                f"variable={getattr(var, 'name', var)!r}. "
                "Build (and compile) the model inside `with strategy.scope():`, "
                "or load it there with `keras.models.load_model`."
            )
        return super()._update(var, fn, args, kwargs, group)


def _is_mirrored(value: Any) -> bool:
    return isinstance(value, _compat.distribute_values.Mirrored)


class MultiProcessExtended(DataParallelExtended):
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
        cross_device_ops: Any,
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

    def _get_cross_device_ops(self, value: Any) -> Any:
        # MirroredExtended sends int32 values (and XLA) to process-local
        # reductions; across processes every reduction must take our ops.
        del value
        self._refuse_xla()
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
            if value.dtype.base_dtype not in (*ALLREDUCIBLE, tf.uint8, tf.bool):
                return value
            # Same shape and dtype everywhere, else the broadcast cannot match.
            cluster.handshake(
                what=f"variable {name!r}",
                digest=f"{value.shape.as_list()}:{value.dtype.name}",
                summary="")
            return _mpi_ops.broadcast(value, root=0)

        return broadcast_initial_value
