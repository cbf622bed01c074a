"""`DataParallelStrategy`: MirroredStrategy with host-offloaded gradient aggregation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_smdist import _compat, _ops
from tf_smdist.data_parallel import cluster
from tf_smdist.data_parallel.cross_device_ops import (
    HostReduceCrossDeviceOps,
    _check_bucket_cap,
    _check_compression,
)
from tf_smdist.data_parallel.extended import DataParallelExtended, MultiProcessExtended

__all__ = ["DataParallelStrategy"]

logger = logging.getLogger(__name__)


def _local_device_names() -> list[str]:
    return [d.name for d in tf.config.list_logical_devices()]


def default_devices() -> list[str]:
    """All GPUs; else the logical CPU devices; else `/cpu:0`."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")] or ["/device:CPU:0"]


def resolve_devices(devices: Sequence[str] | None) -> list[str]:
    """Checks `devices` against this process's logical devices; returns their names."""
    if devices is None:
        return default_devices()
    if isinstance(devices, str):
        raise TypeError(
            "`devices` must be a list of device names, not one string. "
            f"Received: devices={devices!r}. Use e.g. devices=[{devices!r}]."
        )
    devices = list(devices)
    if not devices:
        raise ValueError(
            "`devices` must name at least one device. Received: devices=[]. "
            "Pass None to use all GPUs (or the logical CPU devices)."
        )
    available = {}
    for name in _local_device_names():
        spec = tf.DeviceSpec.from_string(name)
        available[(spec.device_type, spec.device_index)] = name
    resolved = []
    for d in devices:
        try:
            spec = tf.DeviceSpec.from_string(d)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"Could not parse the device name. Received: device={d!r}. "
                "Use names such as '/gpu:0' or '/cpu:1'."
            ) from e
        key = (
            (spec.device_type or "").upper(),
            spec.device_index if spec.device_index is not None else 0,
        )
        if (
            spec.job not in (None, "localhost")
            or spec.task not in (None, 0)
            or key not in available
        ):
            raise ValueError(
                "A requested device does not exist in this process. Received: "
                f"device={d!r}. Available devices: {sorted(available.values())}. "
                "For several logical CPU devices call "
                "`tf_smdist.configure_cpu_devices(n)` at the start of the program; "
                "for other processes or hosts use the launcher (`python -m "
                "tf_smdist.launch`)."
            )
        resolved.append(available[key])
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"`devices` must not repeat a device. Received: devices={devices!r}."
        )
    return resolved


def _build_extended(
    strategy: tf.distribute.Strategy, devices: Sequence[str], **ops_kwargs: Any
) -> tuple[DataParallelExtended, HostReduceCrossDeviceOps]:
    """The (extended object, cross-device ops) pair for this job.

    One process: `DataParallelExtended` with `HostReduceCrossDeviceOps`.
    Started by `mpirun` or the launcher: `MultiProcessExtended` with
    `MpiHostReduceCrossDeviceOps`, after joining the MPI job.
    """
    if not cluster.is_multiprocess():
        ops = HostReduceCrossDeviceOps(**ops_kwargs)
        return DataParallelExtended(
            strategy, devices=list(devices), cross_device_ops=ops
        ), ops
    from tf_smdist.data_parallel.multi_process import (  # noqa: PLC0415
        MpiHostReduceCrossDeviceOps,
    )

    rank, world = cluster.initialize()
    ops = MpiHostReduceCrossDeviceOps(world_size=world, **ops_kwargs)
    extended = MultiProcessExtended(
        strategy,
        devices=list(devices),
        cross_device_ops=ops,
        rank=rank,
        world_size=world,
    )
    # Keras' default `fit(shuffle=True)` must shuffle arrays alike on every
    # rank, or the ranks' shards of each global batch overlap.
    cluster.agree_on_random_seed(keep_own=True)
    logger.info("Rank %d of %d", rank, world)
    return extended, ops


def _host_device_for(devices: Sequence[str]) -> str:
    return _compat.device_util.canonicalize("/device:CPU:0", devices[0])


class DataParallelStrategy(tf.distribute.MirroredStrategy):
    """Synchronous data parallelism whose gradient all-reduce runs on the host CPU.

    A `tf.distribute.MirroredStrategy` over the local devices of this process
    (one replica per device, variables mirrored) whose cross-device
    reductions go through host memory with the tf_smdist custom ops: the
    gradients are grouped into fusion buckets of about `bucket_cap_mb` MiB,
    filled in reverse layer order (the last layers' gradients are ready
    first); each bucket is packed into one buffer on every replica's device
    (`SmdistPack`), the buffers are summed on the host CPU in float32 with the
    `1/N` of a mean fused in (`SmdistHostReduce`, over TensorFlow's CPU worker
    threads), and the result is unpacked on every device (`SmdistUnpack`).
    Each bucket's chain depends only on its own gradients, so within a step
    the reduction of early buckets overlaps the rest of the backward pass,
    and the accelerators do no reduction work.

    Everything that works under `MirroredStrategy` works here: Keras
    `fit`/`evaluate`/`predict`, callbacks, `model.save`, custom loops with
    `strategy.run`, `experimental_distribute_dataset`,
    `distribute_datasets_from_function`, `strategy.reduce` and
    `tf.distribute.get_replica_context().all_reduce`. Results equal
    MirroredStrategy's up to float32 rounding.

    Sparse gradients (`tf.IndexedSlices`, e.g. from `Embedding`) are
    all-gathered, never densified: the replicas' rows are concatenated on
    the host (mean scale fused in), across processes too, and every replica
    gets the same `IndexedSlices`, as under `MirroredStrategy`; Keras
    optimizers then update only the rows present. Float tensors without a
    static shape are reduced one by one on the host; float64 and integer
    values by `tf.distribute.ReductionToOneDevice`.

    In a job of several processes (started by `mpirun` or
    `python -m tf_smdist.launch`), each process's host buffers are then
    all-reduced across the processes over MPI, and `num_replicas_in_sync`
    counts the replicas of every process.

    Args:
        devices: the devices of the replicas, e.g. `["/gpu:0", "/gpu:1"]`.
            `None` means all GPUs, else all logical CPU devices (see
            `tf_smdist.configure_cpu_devices`), else `"/cpu:0"`.
            Defaults to `None`.
        bucket_cap_mb: the fusion bucket size cap in MiB, greater than 0. A
            tensor larger than the cap gets a bucket of its own.
            Defaults to `25.0`.
        compression: `None`, `"fp16"` or `"bf16"`: the dtype float32 buffers
            travel in between the devices and the host. The host still
            accumulates in float32. Defaults to `None`.
        host_threads: the most CPU threads one host reduction may use;
            `None` uses TensorFlow's CPU worker thread pool (its intra-op
            threads). Defaults to `None`.

    Example:
    >>> import keras
    >>> import numpy as np
    >>> import tf_smdist as smd
    >>> strategy = smd.DataParallelStrategy(bucket_cap_mb=4.0)
    >>> with strategy.scope():
    ...     model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    ...     model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((32, 8)), np.ones((32, 1))
    >>> history = model.fit(x, y, epochs=1, verbose=0)
    """

    def __init__(
        self,
        devices: Sequence[str] | None = None,
        *,
        bucket_cap_mb: float = 25.0,
        compression: str | None = None,
        host_threads: int | None = None,
    ) -> None:
        bucket_cap_mb = _check_bucket_cap(bucket_cap_mb)
        _check_compression(compression)
        if host_threads is not None:
            if (
                isinstance(host_threads, bool)
                or not isinstance(host_threads, int)
                or host_threads < 1
            ):
                raise ValueError(
                    "`host_threads` must be None or a positive integer. "
                    f"Received: host_threads={host_threads!r}."
                )
        devices = resolve_devices(devices)
        _ops.load_library()  # fail early, with build instructions, if missing
        extended, cross_device_ops = _build_extended(
            self,
            devices,
            host_device=_host_device_for(devices),
            bucket_cap_mb=bucket_cap_mb,
            compression=compression,
            host_threads=host_threads,
        )
        # MirroredStrategy.__init__ would build a MirroredExtended; the base
        # Strategy takes the extended object given.
        tf.distribute.Strategy.__init__(self, extended)
        self._cross_ops = cross_device_ops
        self._host_threads = host_threads
        logger.info(
            "DataParallelStrategy over %s with %r",
            list(extended.worker_devices),
            cross_device_ops,
        )

    @property
    def cross_device_ops(self) -> HostReduceCrossDeviceOps:
        """The `HostReduceCrossDeviceOps` that performs the reductions."""
        return self._cross_ops

    @property
    def bucket_cap_mb(self) -> float:
        """The fusion bucket size cap in MiB."""
        return self.cross_device_ops.bucket_cap_mb

    @property
    def compression(self) -> str | None:
        """`None`, `"fp16"` or `"bf16"`."""
        return self.cross_device_ops.compression

    @property
    def host_threads(self) -> int | None:
        """The thread cap of one host reduction, or `None`."""
        return self._host_threads

    def run(self, fn: Any, args: Any = (), kwargs: Any = None, options: Any = None
            ) -> Any:
        """`tf.distribute.Strategy.run`; a `merge_call` error says its
        usual Keras 3 cause.

        Keras 3's `gradient_accumulation_steps` all-reduces the gradients
        inside a `tf.cond`, which no `MirroredStrategy` supports (TensorFlow's
        error names nested functions and control flow, not the option).
        """
        try:
            return super().run(fn, args=args, kwargs=kwargs, options=options)
        except RuntimeError as e:
            if "merge_call" not in str(e):
                raise
            raise RuntimeError(
                f"{e}\n\ntf_smdist: a Keras 3 optimizer with "
                "gradient_accumulation_steps causes this error under "
                "DataParallelStrategy, as under every tf.distribute strategy "
                "(Keras all-reduces inside a tf.cond). Train without a strategy "
                "with tf_smdist.horovod.keras.DistributedOptimizer (its "
                "backward_passes_per_step, or the optimizer's own "
                "gradient_accumulation_steps, both work), or accumulate in a "
                "custom loop.") from e

    def __repr__(self) -> str:
        return (
            f"DataParallelStrategy(devices={list(self.extended.worker_devices)}, "
            f"bucket_cap_mb={self.bucket_cap_mb}, compression={self.compression!r}, "
            f"host_threads={self._host_threads})"
        )
