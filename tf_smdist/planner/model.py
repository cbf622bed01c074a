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
- pipeline: each stage's time per micro-batch is its compute plus the
  point-to-point transfer of the tensors live across its cuts, forward and
  back (`tf_smdist.pipeline.cost_model`); the split is the candidate split
  with the smallest predicted step (`estimate_layout`); the slowest device
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
  (`Cluster.overlap`), and fully under the time later stages finish early
  (stage `s` by `s` times the slowest stage's backward compute);
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
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tf_smdist.pipeline.cost_model import CostModel
from tf_smdist.pipeline.partition import partition
from tf_smdist.pipeline.profile import LayerProfile, Profile, format_bytes
from tf_smdist.planner import costs
from tf_smdist.planner.cluster import Cluster

__all__ = [
    "BACKWARD_SHARE",
    "EXHAUSTIVE_SPLITS",
    "PlanRow",
    "SPLIT_BANDWIDTHS",
    "SCHEDULES",
    "estimate_layout",
    "pipeline_time",
    "profile_at_batch",
]

# Point-to-point bytes/s at which the partitioner's min-max splits are a
# layout's candidate splits: infinity (compute alone), then every decade
# from 1e13 down to 1e6. Fixed, so that the candidates do not depend on the
# cluster's bandwidths.
SPLIT_BANDWIDTHS = (math.inf, *(10.0**e for e in range(13, 5, -1)))
# A layout with at most this many splits has every split evaluated.
EXHAUSTIVE_SPLITS = 128
# Relative margin within which two predicted steps tie.
_TIE = 1e-12

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
        stage_sizes: Profile positions per stage of the split chosen for
            this row (the one with the smallest predicted step among the
            layout's candidates, see `estimate_layout`).
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
    trainable = sum(x.trainable_bytes for x in layers)
    state = sum(x.optimizer_bytes for x in layers)
    return _update_seconds(trainable, state, cluster)


def _update_seconds(trainable: Any, state: Any, cluster: Cluster) -> Any:
    """Seconds to update `trainable` parameter bytes and `state` bytes."""
    if cluster.memory_bandwidth is None:
        return 0.0 * trainable
    # Read parameters and gradients, write parameters; read and write state.
    return (3 * trainable + 2 * state) / cluster.memory_bandwidth


def _refuse_both_profiles(pipeline_profile: Any, batch_profile: Any) -> None:
    """Raises `ValueError` when both profiles are given (not combined yet)."""
    if pipeline_profile is not None and batch_profile is not None:
        raise ValueError(
            "`pipeline_profile` and `batch_profile` cannot be combined "
            "yet. Received both. Pass one of them."
        )


def _accumulation_seconds(trainable: Any, microbatches: int, cluster: Cluster) -> Any:
    """Seconds per micro-batch to sum `trainable` bytes of weight gradients
    over `microbatches` micro-batches (`M - 1` additions, each reading two
    gradients and writing one, spread over the `M` micro-batches).

    >>> c = Cluster(nodes=1, devices_per_node=1, device_memory=1e9,
    ...             intra_node_bandwidth=1e9, inter_node_bandwidth=1e9,
    ...             memory_bandwidth=3e9)
    >>> _accumulation_seconds(1e9, 4, c)  # 3 additions of 3 GB at 3 GB/s, over 4
    0.75
    """
    if cluster.memory_bandwidth is None or microbatches <= 1:
        return 0.0 * trainable
    additions = (microbatches - 1) / microbatches
    return additions * 3 * trainable / cluster.memory_bandwidth


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
    split_cache: dict[Any, Any] | None = None,
    pipeline_profile: Profile | None = None,
) -> list[PlanRow]:
    """Predicts one layout, once per aggregation algorithm.

    Each row's split of the layers into (virtual) stages is the one, among
    a set of candidate splits, with the smallest predicted step for that
    row's aggregation: pipeline, exposed aggregation, update and call
    overhead, evaluated at the cluster's bandwidths. The candidates are
    every split when there are at most `EXHAUSTIVE_SPLITS` of them, else
    the partitioner's min-max splits (`tf_smdist.pipeline.partition`) at
    the fixed point-to-point bandwidths `SPLIT_BANDWIDTHS`; the candidates
    that do not fit `device_memory` are dropped, and when some do not, the
    least-memory split and the memory-constrained min-max splits at the
    same bandwidths are added. The candidates do not depend on the
    cluster's bandwidths, and on a fixed split no bandwidth can slow the
    step, so more bandwidth never predicts a slower row. The layout is
    feasible when a candidate fits; else its rows are infeasible, on the
    least-memory split, and say why.

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
        split_cache: A dict that keeps the partitioner's splits between
            calls for the same `profile`, `cluster` and `batch_profile`, as
            `plan` passes. Defaults to `None` (nothing kept).
        pipeline_profile: The same model profiled as a pipeline trains it
            (`profile_model(..., matmul_rule=True)`), at the same batch
            size: its layer times price the stages when `K >= 2`; `profile`
            still prices one device and data parallelism alone. Defaults to
            `None` (`profile` for everything). Not combined with
            `batch_profile`.

    Returns:
        One `PlanRow` per aggregation.

    Example:

    >>> estimate_layout(profile, cluster, global_batch=64, data_parallel=2,
    ...     pipeline_stages=1, microbatches=1, schedule="1f1b",
    ...     aggregations=("ring",))[0].step_time_s
    """
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
    if pipeline_profile is not None and k > 1:
        _refuse_both_profiles(pipeline_profile, batch_profile)
        profile = pipeline_profile
    scaled = scaled_profile(profile, cluster.compute_scale)
    bandwidth, latency = cluster.p2p(k > cluster.devices_per_node)
    stages = k * v
    options = dict(
        microbatches=m,
        schedule=schedule,
        batch_size=replica_batch,
        latency=latency,
        virtual_stages=max(v, 1),
    )
    cost_model = CostModel(scaled, stages, bandwidth=bandwidth, **options)
    capacity = cluster.device_memory
    cache = {} if split_cache is None else split_cache
    # Splits at a point-to-point bandwidth depend on the micro-batch size
    # and latency; with a memory limit, also on the schedule's in-flight
    # micro-batches.
    speed_key = (stages, replica_batch / m, latency)
    limit_key = (*speed_key, m, schedule, v, capacity)
    # With no tensor live across a cut, every bandwidth gives one split.
    moving = any(x.live_bytes for x in profile.layers[:-1])
    bandwidths = SPLIT_BANDWIDTHS if moving else SPLIT_BANDWIDTHS[:1]

    def solve(key: tuple[Any, ...], **kwargs: Any) -> tuple[int, ...]:
        if key not in cache:
            split = partition(scaled, stages, **options, **kwargs)
            cache[key] = tuple(split.stage_sizes)
        return cache[key]

    splits = [solve(("speed", *speed_key, math.inf), bandwidth=math.inf)]
    exhaustive = math.comb(len(profile) - 1, stages - 1) <= EXHAUSTIVE_SPLITS
    if exhaustive:
        splits.extend(_compositions(len(profile), stages))
    else:
        splits.extend(
            solve(("speed", *speed_key, b), bandwidth=b) for b in bandwidths[1:]
        )
    splits = list(dict.fromkeys(splits))
    evaluated: dict[tuple[int, ...], _Split] = {}

    def evaluate(sizes: tuple[int, ...]) -> _Split:
        return evaluated[sizes]

    def evaluate_all(candidates: list[tuple[int, ...]]) -> None:
        new = [s for s in dict.fromkeys(candidates) if s not in evaluated]
        if new:
            args = (cost_model, profile, cluster, d, k, m, v)
            evaluated.update(zip(new, _evaluate_splits(new, *args)))

    evaluate_all(splits)
    fitting = [s for s in splits if evaluate(s).memory <= capacity]
    if len(fitting) < len(splits) and not exhaustive:
        extra = [solve(("memory", *limit_key), optimize="memory", bandwidth=math.inf)]
        try:
            extra.extend(
                solve(("limit", *limit_key, b), bandwidth=b, memory_capacity=capacity)
                for b in bandwidths
            )
        except ValueError:
            pass  # No split has every stage within its share of the device.
        evaluate_all(extra)
        fitting.extend(
            s
            for s in dict.fromkeys(extra)
            if s not in fitting and evaluate(s).memory <= capacity
        )
    why = ""
    if not fitting:
        tight = partition(
            scaled, stages, optimize="memory", bandwidth=bandwidth, **options
        )
        why = _why(tight, profile, capacity, v)
        fitting = [tuple(tight.stage_sizes)]
        evaluate_all(fitting)
    nodes, per_node = _group_shape(cluster, d, k)

    @functools.cache
    def tail(aggregation: str, grad_bytes: float, backward: float) -> float:
        """Seconds a device's aggregation runs past its last backward."""
        total = aggregation_time(grad_bytes, aggregation, cluster, nodes, per_node)
        return costs.overlapped_aggregation(
            total,
            backward,
            costs.num_buckets(grad_bytes, cluster.bucket_bytes),
            cluster.overlap,
        )

    candidates = [evaluate(s) for s in fitting]
    rows = []
    for aggregation in aggregations:
        name = aggregation if d > 1 else "none"
        split, step = _fastest(
            candidates, functools.partial(_Split.step, aggregation=name, tail=tail)
        )
        rows.append(
            PlanRow(
                data_parallel=d,
                pipeline_stages=k,
                microbatches=m,
                schedule=schedule,
                aggregation=name,
                step_time_s=step,
                samples_per_s=global_batch / step,
                efficiency=(global_batch / step) / (d * k * replica_batch / single),
                memory_per_device=split.memory,
                feasible=not why,
                why=why,
                stage_sizes=split.sizes,
                compute_s=split.pipe,
                aggregation_s=split.exposed(name, tail),
                update_s=split.update,
                virtual_stages=v,
            )
        )
        if d == 1:
            break
    return rows


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Every split of `total` positions into `parts` non-empty stages."""
    out = []
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        out.append(tuple(bounds[i + 1] - bounds[i] for i in range(parts)))
    return out


@dataclasses.dataclass
class _Split:
    """One split of a layout, evaluated at the cluster's bandwidths."""

    sizes: tuple[int, ...]
    memory: float
    pipe: float
    update: float
    call_overhead: float
    grad_bytes: list[float]
    backward: list[float]
    clock: float

    _exposed: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def base(self) -> float:
        """The step without aggregation: a lower bound of `step`."""
        return self.pipe + self.update + self.call_overhead

    def exposed(self, aggregation: str, tail: Callable[..., float]) -> float:
        """Seconds of aggregation not hidden under compute.

        `tail(aggregation, grad_bytes, backward)` gives the seconds a
        device's aggregation runs past its last backward.
        """
        if aggregation == "none":
            return 0.0
        if aggregation not in self._exposed:
            exposed = 0.0
            for s, (grad_bytes, backward) in enumerate(
                zip(self.grad_bytes, self.backward)
            ):
                # Stage s ends its last backward s backward-clocks before
                # stage 0 (with interleaving, device s's last task is stage
                # s's backward).
                late = tail(aggregation, grad_bytes, backward) - s * self.clock
                exposed = max(exposed, late)
            self._exposed[aggregation] = exposed
        return self._exposed[aggregation]

    def step(self, aggregation: str, tail: Callable[..., float]) -> float:
        """Predicted seconds per step (never below `base`)."""
        exposed = self.exposed(aggregation, tail)
        return self.pipe + exposed + self.update + self.call_overhead


def _fastest(
    candidates: list[_Split], step: Callable[[_Split], float]
) -> tuple[_Split, float]:
    """The first candidate whose step ties the smallest, and its step.

    Candidates whose `base` already exceeds the fastest step found are not
    evaluated; the result is the same as evaluating every one.
    """
    steps: dict[int, float] = {}
    fastest = math.inf
    for i in sorted(range(len(candidates)), key=lambda i: candidates[i].base):
        if candidates[i].base > fastest:
            break
        steps[i] = step(candidates[i])
        fastest = min(fastest, steps[i])
    # The first within rounding of the fastest, in the candidates' order:
    # the min-max split at infinite bandwidth wins ties.
    limit = fastest * (1 + _TIE)
    for i, candidate in enumerate(candidates):
        if candidate.base <= limit:
            if i not in steps:
                steps[i] = step(candidate)
            if steps[i] <= limit:
                return candidate, steps[i]
    raise AssertionError("unreachable: the fastest candidate is within limit")


def _evaluate_splits(
    splits: list[tuple[int, ...]],
    cost_model: CostModel,
    profile: Profile,
    cluster: Cluster,
    d: int,
    k: int,
    m: int,
    v: int,
) -> list[_Split]:
    """The step's parts on each split of `K * v` stages, all splits at once."""
    count, stages = len(splits), k * v
    bounds = np.zeros((count, stages + 1), dtype=np.int64)
    bounds[:, 1:] = np.cumsum(np.array(splits, dtype=np.int64), axis=1)
    a, b = bounds[:, :-1], bounds[:, 1:]
    task = 2 * cluster.task_overhead
    # One column per stage: CostModel takes arrays of starts and ends.
    times = task + np.stack(
        [cost_model.stage_time(s, a[:, s], b[:, s]) for s in range(stages)], axis=1
    )
    memory = np.stack(
        [cost_model.stage_memory(s, a[:, s], b[:, s]) for s in range(stages)], axis=1
    )
    compute_prefix = np.concatenate([[0.0], np.cumsum(cost_model.compute_costs)])
    computes = task + compute_prefix[b] - compute_prefix[a]

    def per_device(values: np.ndarray) -> np.ndarray:
        # Device s holds (virtual) stages s, s + K, ...
        return values.reshape(-1, v, k).sum(axis=1)

    def stage_sums(values: list[int]) -> np.ndarray:
        prefix = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
        return prefix[b] - prefix[a]

    stage_grads = stage_sums([x.trainable_bytes for x in profile.layers])
    # Each (virtual) stage sums its micro-batches' weight gradients: M - 1
    # additions per step, each reading two gradients and writing one,
    # spread over the M micro-batches of the stage's time.
    times = times + _accumulation_seconds(stage_grads, m, cluster)
    grad_bytes = per_device(stage_grads)
    state = per_device(stage_sums([x.optimizer_bytes for x in profile.layers]))
    device_memory = per_device(memory).max(axis=1)
    update = _update_seconds(grad_bytes, state, cluster).max(axis=1)
    slots = cluster.compute_slots
    out = []
    for c, sizes in enumerate(splits):
        pipe = pipeline_time(times[c].tolist(), m, v)
        if slots is not None and d * k > slots:
            # Processor sharing: a device idle in the bubble lends its
            # compute unit to the others, so the whole job's work sets a
            # floor.
            pipe = max(pipe, d * m * float(times[c].sum()) / slots)
        out.append(
            _Split(
                sizes=tuple(sizes),
                memory=float(device_memory[c]),
                pipe=pipe,
                update=float(update[c]),
                call_overhead=profile.call_overhead,
                grad_bytes=grad_bytes[c].tolist(),
                backward=(BACKWARD_SHARE * computes[c, :k]).tolist(),
                # Compute only: transfers would make the clock, and so the
                # hidden aggregation, shrink as the point-to-point bandwidth
                # grows.
                clock=BACKWARD_SHARE * float(computes[c].max()),
            )
        )
    return out


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
