"""Step time and memory of one layout (data parallel × pipeline) on a cluster.

The model, per training step of `global_batch` samples on `D` data-parallel
replicas of a `K`-stage pipeline with `M` micro-batches:

- compute: each layer's profiled forward+backward time, scaled by
  `Cluster.compute_scale` and linearly by the micro-batch size (the profile
  holds one batch size, so time per sample is `time / profile.batch_size`;
  fixed per-call costs go in `Cluster.task_overhead`); with a second
  profile of the model at another batch size (`batch_profile`), each
  layer's time is the line `a + c * batch` through the two, so a fixed
  per-call part (weights read, weight gradients written) is kept whole at
  small micro-batches;
- pipeline: the stages are the exact min-max split of
  `tf_smdist.pipeline.partition` (compute plus the point-to-point transfer of
  the tensors live across each cut, forward and back); the slowest device
  sets the pace of the `M` micro-batches and the others' stages fill and
  drain the pipeline: `(M - 1) * max(t) + sum(t)` for GPipe and 1F1B with
  per-micro-batch stage times `t` (`(M + K - 1) t` for equal stages, the
  schedule's clock count); interleaved 1F1B
  cuts the model into `K * v` virtual stages, device `d` holding stages
  `d, d + K, ...`, and runs `v * M + K - 1` virtual-stage times, each `1/v`
  of a device's work (`M * max(T) + (sum(t) - max(T)) / v` with `T` a
  device's per-micro-batch time): the bubble shrinks `v`-fold, for `v` times the
  point-to-point messages and more activations in flight;
- aggregation: each stage's gradients are all-reduced over its `D`-replica
  group with the α-β cost of the algorithm (`tf_smdist.planner.costs`),
  partly hidden under the last backward pass by bucketing
  (`Cluster.overlap`), and fully under the time later stages finish early;
- shared compute: when the devices share fewer compute units
  (`Cluster.compute_slots`, processes on a host's cores), the compute takes
  at least the busy time of every device together over the units;
- update: the optimizer streams parameters, gradients and state through
  device memory (`Cluster.memory_bandwidth`, if given);
- memory per device: parameters, gradients, optimizer state and the
  schedule's in-flight activations of the device's stage.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tf_smdist.pipeline.profile import LayerProfile, Profile, format_bytes
from tf_smdist.planner import costs
from tf_smdist.planner.cluster import Cluster

__all__ = [
    "BACKWARD_SHARE",
    "PlanRow",
    "SCHEDULES",
    "estimate_layout",
    "pipeline_time",
    "profile_at_batch",
]

# Share of a layer's forward+backward time spent in backward (the usual
# 1:2 forward:backward ratio; the profile records only the sum).
BACKWARD_SHARE = 2.0 / 3.0
SCHEDULES = ("1f1b", "gpipe", "interleaved")


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One candidate layout and what the planner predicts for it.

    Args:
        data_parallel: Data-parallel replicas `D`.
        pipeline_stages: Pipeline stages `K` (devices per replica).
        microbatches: Micro-batches per replica batch `M`.
        schedule: Pipeline schedule, `"1f1b"`, `"gpipe"` or `"interleaved"`.
        aggregation: Gradient all-reduce: `"ring"`, `"hierarchical"`,
            `"host_sharded"`, or `"none"` for one replica.
        step_time_s: Predicted seconds per step of `global_batch` samples.
        samples_per_s: `global_batch / step_time_s`.
        efficiency: Throughput over `D * K` times one device's throughput
            at the same per-replica batch (weak-scaling efficiency).
        memory_per_device: Peak bytes of the most loaded device.
        feasible: Whether every device's memory fits `device_memory`.
        why: Why it is infeasible (the stage and the bytes), else `""`.
        stage_sizes: Profile positions per stage.
        compute_s: Seconds of the pipeline's compute and transfers.
        aggregation_s: Seconds of aggregation not hidden under compute.
        update_s: Seconds of the optimizer update.
        virtual_stages: Stages per device `v` of the interleaved schedule
            (`stage_sizes` then lists `K * v` virtual stages); `1` otherwise.

    Example:

    >>> row = smd.plan(profile, cluster, global_batch=256).rows[0]
    >>> row.data_parallel, row.pipeline_stages, row.feasible
    (8, 1, True)
    """

    data_parallel: int
    pipeline_stages: int
    microbatches: int
    schedule: str
    aggregation: str
    step_time_s: float
    samples_per_s: float
    efficiency: float
    memory_per_device: float
    feasible: bool
    why: str = ""
    stage_sizes: tuple[int, ...] = ()
    compute_s: float = 0.0
    aggregation_s: float = 0.0
    update_s: float = 0.0
    virtual_stages: int = 1

    @property
    def devices(self) -> int:
        """Devices used: `data_parallel * pipeline_stages`."""
        return self.data_parallel * self.pipeline_stages

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON-compatible data.

        Example:

        >>> PlanRow(**row.to_dict()) == row
        True
        """
        data = dataclasses.asdict(self)
        data["stage_sizes"] = list(self.stage_sizes)
        return data

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_sizes", tuple(self.stage_sizes))


def scaled_profile(profile: Profile, compute_scale: float) -> Profile:
    """`profile` with every layer time multiplied by `compute_scale`.

    Example:

    >>> scaled_profile(profile, 2.0).total_time == 2 * profile.total_time
    True
    """
    if compute_scale == 1.0:
        return profile
    return Profile(
        [dataclasses.replace(x, time=x.time * compute_scale) for x in profile.layers],
        batch_size=profile.batch_size,
        input_bytes=profile.input_bytes,
        device_kind=profile.device_kind,
        optimizer=profile.optimizer,
        model_name=profile.model_name,
        call_overhead=profile.call_overhead,
    )


def profile_at_batch(
    profile: Profile, batch: int, other: Profile | None = None
) -> Profile:
    """`profile` with each layer's time at `batch` samples.

    Without `other`, times scale linearly: `time * batch / batch_size`.
    With `other` (the same model profiled at another batch size), each
    layer's time is the line `a + c * batch` through its two measurements;
    its fixed part `a` is kept within `[0, time]` so that noise cannot
    make a time negative.

    Args:
        profile: The model's `Profile`.
        batch: Samples per call.
        other: The same layers profiled at another batch size. Defaults to
            `None`.

    Returns:
        A `Profile` whose `batch_size` is `batch`.

    Example:

    >>> profile_at_batch(profile_at_8, 4, profile_at_32).batch_size
    4
    """
    if other is None:
        times = [x.time * batch / profile.batch_size for x in profile.layers]
    else:
        _check_pair(profile, other)
        b0, b1 = profile.batch_size, other.batch_size
        times = []
        for x, y in zip(profile.layers, other.layers):
            per_sample = (y.time - x.time) / (b1 - b0)
            fixed = min(max(x.time - per_sample * b0, 0.0), x.time)
            per_sample = (x.time - fixed) / b0
            times.append(fixed + per_sample * batch)
    return Profile(
        [dataclasses.replace(x, time=t) for x, t in zip(profile.layers, times)],
        batch_size=batch,
        input_bytes=profile.input_bytes,
        device_kind=profile.device_kind,
        optimizer=profile.optimizer,
        model_name=profile.model_name,
        call_overhead=profile.call_overhead,
    )


def _check_pair(profile: Profile, other: Profile) -> None:
    if other.layer_names != profile.layer_names:
        raise ValueError(
            "`batch_profile` must profile the same layers as the profile. "
            f"Received: layers {other.layer_names} against "
            f"{profile.layer_names}. Profile the same model at another batch size."
        )
    if other.batch_size == profile.batch_size:
        raise ValueError(
            "`batch_profile` must be measured at another batch size than the "
            f"profile. Received: batch_size={other.batch_size} for both. "
            "Profile the model at, say, 4 times the batch size."
        )


def pipeline_time(
    stage_times: list[float], microbatches: int, virtual_stages: int = 1
) -> float:
    """Seconds of a pipelined step from each stage's time per micro-batch.

    The busiest device sets the pace of the `M` micro-batches; the other
    stages fill and drain the pipeline: `(M - 1) * max(t) + sum(t)` with one
    stage per device, which is the schedule's `(M + K - 1)` stage times when
    the stages are equal. With `v` stages per device (interleaved, device
    `d` holding stages `d, d + K, ...`), device `d` spends `T_d`, the sum of
    its stages' times, per micro-batch, and fill and drain take one
    virtual stage per device: `M * max(T) + (sum(t) - max(T)) / v`, equal to
    `(v M + K - 1)` virtual-stage times for equal stages.

    Args:
        stage_times: Seconds per micro-batch (forward + backward) of each
            stage, in order.
        microbatches: Micro-batches `M`.
        virtual_stages: Stages per device `v`. Defaults to `1`.

    Returns:
        Seconds.

    Example:

    >>> pipeline_time([3.0, 1.0], 4)  # 3 x 3 + (3 + 1)
    13.0
    >>> pipeline_time([1.0] * 4, 4, 2)  # 2 devices: (2 x 4 + 2 - 1) x 1
    9.0
    """
    v = max(1, int(virtual_stages))
    devices = len(stage_times) // v
    per_device = [sum(stage_times[d::devices]) for d in range(devices)]
    busiest = max(per_device)
    return microbatches * busiest + (sum(stage_times) - busiest) / v


def _update_time(layers: tuple[LayerProfile, ...], cluster: Cluster) -> float:
    if cluster.memory_bandwidth is None:
        return 0.0
    trainable = sum(x.trainable_bytes for x in layers)
    state = sum(x.optimizer_bytes for x in layers)
    # Read parameters and gradients, write parameters; read and write state.
    return (3 * trainable + 2 * state) / cluster.memory_bandwidth


def _group_shape(cluster: Cluster, data_parallel: int, stages: int) -> tuple[int, int]:
    """(nodes, devices per node) of one stage's data-parallel group.

    Pipelines sit on adjacent devices ("cluster" placement): a node holds
    `devices_per_node // K` pipelines, so a stage's group has that many
    members per node.
    """
    per_node = max(1, min(data_parallel, cluster.devices_per_node // stages))
    return math.ceil(data_parallel / per_node), per_node


def aggregation_time(
    nbytes: float, aggregation: str, cluster: Cluster, nodes: int, per_node: int
) -> float:
    """Seconds to all-reduce `nbytes` per device over a group.

    Args:
        nbytes: Gradient bytes per device.
        aggregation: `"ring"`, `"hierarchical"` or `"host_sharded"`.
        cluster: The `Cluster`.
        nodes: Nodes the group spans.
        per_node: Group members per node.

    Returns:
        Seconds.

    Example:

    >>> aggregation_time(4e6, "ring", cluster, 1, 4)
    """
    members = nodes * per_node
    if members <= 1:
        return 0.0
    # Phases on separate engines pipeline over the buckets; with one engine
    # for everything (`overlap=0`) they run one after another.
    buckets = costs.num_buckets(nbytes, cluster.bucket_bytes) if cluster.overlap else 1
    if aggregation == "ring":
        if nodes > 1:
            bandwidth = min(cluster.intra_node_bandwidth, cluster.inter_node_bandwidth)
            return costs.ring_allreduce(nbytes, members, bandwidth, cluster.latency)
        return costs.ring_allreduce(
            nbytes, members, cluster.intra_node_bandwidth, cluster.intra_node_latency
        )
    if aggregation == "hierarchical":
        return costs.hierarchical_allreduce(
            nbytes,
            nodes,
            per_node,
            intra_bandwidth=cluster.intra_node_bandwidth,
            intra_latency=cluster.intra_node_latency,
            inter_bandwidth=cluster.inter_node_bandwidth,
            inter_latency=cluster.latency,
            buckets=buckets,
        )
    if aggregation == "host_sharded":
        return costs.host_sharded_allreduce(
            nbytes,
            nodes,
            per_node,
            host_reduce_bandwidth=cluster.host_reduce_bandwidth,
            inter_bandwidth=cluster.inter_node_bandwidth,
            inter_latency=cluster.latency,
            device_host_bandwidth=cluster.device_host_bandwidth,
            buckets=buckets,
        )
    raise ValueError(
        f"Unknown aggregation {aggregation!r}. Received: aggregation={aggregation!r}. "
        f"Use one of {list(costs.AGGREGATIONS)}."
    )


def single_device_step(profile: Profile, cluster: Cluster, batch: float) -> float:
    """Seconds of one step of `batch` samples on one device, no communication.

    Example:

    >>> single_device_step(profile, cluster, 32)
    """
    compute = profile.total_time * cluster.compute_scale * batch / profile.batch_size
    return (
        compute
        + 2 * cluster.task_overhead
        + _update_time(profile.layers, cluster)
        + profile.call_overhead
    )


def estimate_layout(
    profile: Profile,
    cluster: Cluster,
    *,
    global_batch: int,
    data_parallel: int,
    pipeline_stages: int,
    microbatches: int,
    schedule: str,
    aggregations: tuple[str, ...],
    virtual_stages: int = 1,
    batch_profile: Profile | None = None,
) -> list[PlanRow]:
    """Predicts one layout, once per aggregation algorithm.

    Args:
        profile: The model's `Profile` (as measured; scaled here).
        cluster: The `Cluster`.
        global_batch: Samples per step, a multiple of `data_parallel *
            microbatches`.
        data_parallel: Replicas `D`.
        pipeline_stages: Stages `K`.
        microbatches: Micro-batches `M`.
        schedule: `"1f1b"`, `"gpipe"` or `"interleaved"`.
        aggregations: The aggregation algorithms to predict.
        virtual_stages: Stages per device `v` with `"interleaved"` (which
            needs `K >= 2`, `M` a multiple of `K`, and `K * v` profile
            positions); ignored otherwise. Defaults to `1`.
        batch_profile: The same model profiled at another batch size:
            layer times become `a + c * batch` (`profile_at_batch`).
            Defaults to `None` (times proportional to the batch).

    Returns:
        One `PlanRow` per aggregation.

    Example:

    >>> estimate_layout(profile, cluster, global_batch=64, data_parallel=2,
    ...     pipeline_stages=1, microbatches=1, schedule="1f1b",
    ...     aggregations=("ring",))[0].step_time_s
    """
    from tf_smdist.pipeline.partition import partition

    d, k, m = data_parallel, pipeline_stages, microbatches
    v = virtual_stages if schedule == "interleaved" else 1
    replica_batch = global_batch // d
    if batch_profile is not None:
        single = single_device_step(
            profile_at_batch(profile, replica_batch, batch_profile),
            cluster,
            replica_batch,
        )
        profile = profile_at_batch(profile, replica_batch // m, batch_profile)
    else:
        single = single_device_step(profile, cluster, replica_batch)
    scaled = scaled_profile(profile, cluster.compute_scale)
    across = k > cluster.devices_per_node
    bandwidth, latency = cluster.p2p(across)
    common = dict(
        microbatches=m,
        schedule=schedule,
        batch_size=replica_batch,
        bandwidth=bandwidth,
        latency=latency,
        virtual_stages=max(v, 1),
    )
    capacity = cluster.device_memory
    part = partition(scaled, k * v, **common)
    feasible, why = True, ""
    if max(part.device_memory) > capacity:
        try:
            part = partition(scaled, k * v, memory_capacity=capacity, **common)
        except ValueError:
            feasible = False
            tight = partition(scaled, k * v, optimize="memory", **common)
            why = _why(tight, profile, capacity, v)
            part = tight
    estimates = part.estimates
    task = 2 * cluster.task_overhead
    stage_times = [e.time + task for e in estimates]
    stage_max = max(stage_times)
    pipe = pipeline_time(stage_times, m, v)
    slots = cluster.compute_slots
    if slots is not None and d * k > slots:
        # Processor sharing: a device idle in the bubble lends its compute
        # unit to the others, so the whole job's work sets a floor.
        busy = d * m * sum(e.time + task for e in estimates)
        pipe = max(pipe, busy / slots)
    bounds = [0]
    for size in part.stage_sizes:
        bounds.append(bounds[-1] + size)
    # Device s holds (virtual) stages s, s + K, ...
    layer_groups = [
        tuple(
            x
            for chunk in range(s, k * v, k)
            for x in profile.layers[bounds[chunk] : bounds[chunk + 1]]
        )
        for s in range(k)
    ]
    update = max(_update_time(group, cluster) for group in layer_groups)
    nodes, per_node = _group_shape(cluster, d, k)
    backward_clock = BACKWARD_SHARE * stage_max
    rows = []
    for aggregation in aggregations:
        exposed = 0.0
        for s, group in enumerate(layer_groups):
            grad_bytes = sum(x.trainable_bytes for x in group)
            total = aggregation_time(grad_bytes, aggregation, cluster, nodes, per_node)
            backward = BACKWARD_SHARE * (estimates[s].compute_time + task)
            tail = costs.overlapped_aggregation(
                total,
                backward,
                costs.num_buckets(grad_bytes, cluster.bucket_bytes),
                cluster.overlap,
            )
            # Stage s ends its last backward s backward-clocks before stage 0
            # (with interleaving, device s's last task is stage s's backward).
            exposed = max(exposed, tail - s * backward_clock)
        step = pipe + exposed + update + profile.call_overhead
        rows.append(
            PlanRow(
                data_parallel=d,
                pipeline_stages=k,
                microbatches=m,
                schedule=schedule,
                aggregation=aggregation if d > 1 else "none",
                step_time_s=step,
                samples_per_s=global_batch / step,
                efficiency=(global_batch / step) / (d * k * replica_batch / single),
                memory_per_device=max(part.device_memory),
                feasible=feasible,
                why=why,
                stage_sizes=tuple(part.stage_sizes),
                compute_s=pipe,
                aggregation_s=exposed,
                update_s=update,
                virtual_stages=v,
            )
        )
        if d == 1:
            break
    return rows


def _why(tight: Any, profile: Profile, capacity: float, virtual_stages: int = 1) -> str:
    """The stage and bytes that do not fit, from the least-memory split."""
    estimates = tight.estimates
    worst = max(range(len(estimates)), key=lambda s: estimates[s].memory)
    e = estimates[worst]
    names = tight.stage_layer_names[worst]
    share = ""
    if virtual_stages > 1:
        devices = len(estimates) // virtual_stages
        capacity /= virtual_stages
        share = (
            f"/{virtual_stages} (device {worst % devices} holds "
            f"{virtual_stages} stages)"
        )
    return (
        f"stage {worst} ({names[0]} .. {names[-1]}) needs "
        f"{e.memory:.0f} bytes ({format_bytes(e.memory)}: "
        f"{format_bytes(e.static_bytes)} parameters, gradients and optimizer "
        f"state + {e.in_flight} x {format_bytes(e.activation_bytes)} "
        f"activations) > device_memory{share} {capacity:.0f} bytes "
        f"({format_bytes(capacity)}) even in the split that needs least memory"
    )
