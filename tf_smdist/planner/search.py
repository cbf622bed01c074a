"""The layout search: `plan()` and its result, `Plan`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tf_smdist.pipeline.profile import Profile, format_bytes
from tf_smdist.planner.cluster import Cluster
from tf_smdist.planner.costs import AGGREGATIONS
from tf_smdist.planner.model import (
    SCHEDULES,
    PlanRow,
    _check_pair,
    _refuse_both_profiles,
    estimate_layout,
)

__all__ = ["Plan", "plan"]

logger = logging.getLogger(__name__)

# Micro-batch counts tried when `microbatches` is not fixed.
_MICROBATCHES = (1, 2, 4, 8, 16, 32, 64)
# Stages per device tried for the interleaved schedule when not fixed.
_VIRTUAL_STAGES = (2, 4)


class Plan:
    """The layouts `plan()` predicted, best first, with the inputs.

    Feasible rows come first, fastest (most samples/s) first; infeasible
    rows follow, each saying which stage does not fit and by how much.

    Args:
        rows: The `PlanRow`s, in any order (they are sorted).
        cluster: The `Cluster` planned for.
        global_batch: Samples per step.
        model_name: The profiled model's name. Defaults to `""`.

    Example:

    >>> result = smd.plan(profile, cluster, global_batch=512)
    >>> print(result)          # the table
    >>> best = result.rows[0]
    >>> best.data_parallel * best.pipeline_stages
    512
    """

    def __init__(
        self,
        rows: Sequence[PlanRow],
        cluster: Cluster,
        global_batch: int,
        model_name: str = "",
    ) -> None:
        self._rows = tuple(
            sorted(rows, key=lambda r: (not r.feasible, -r.samples_per_s))
        )
        self._cluster = cluster
        self._global_batch = int(global_batch)
        self._model_name = model_name

    @property
    def rows(self) -> tuple[PlanRow, ...]:
        """The layouts, best first."""
        return self._rows

    @property
    def best(self) -> PlanRow:
        """The first row (raises if no layout fits)."""
        if not self._rows or not self._rows[0].feasible:
            why = self._rows[0].why if self._rows else "no layout was tried"
            raise ValueError(
                f"No layout fits the cluster: {why}. Received: "
                f"global_batch={self._global_batch}, cluster={self._cluster!r}. "
                "Use more devices, devices with more memory, more pipeline "
                "stages or more micro-batches."
            )
        return self._rows[0]

    @property
    def cluster(self) -> Cluster:
        """The cluster planned for."""
        return self._cluster

    @property
    def global_batch(self) -> int:
        """Samples per step."""
        return self._global_batch

    def __len__(self) -> int:
        return len(self._rows)

    def table(self, limit: int | None = 20) -> str:
        """The rows as a text table.

        Args:
            limit: Most rows shown (the rest are counted). Defaults to `20`.

        Returns:
            The table text.

        Example:

        >>> print(result.table(limit=5))
        """
        shown = self._rows if limit is None else self._rows[:limit]
        header = (
            "#", "DP", "PP", "M", "schedule", "aggregation", "step ms",
            "samples/s", "eff", "mem/device", "fits",
        )
        body = [
            (
                str(i),
                str(r.data_parallel),
                str(r.pipeline_stages),
                str(r.microbatches),
                r.schedule if r.virtual_stages == 1
                else f"{r.schedule} v={r.virtual_stages}",
                r.aggregation,
                f"{r.step_time_s * 1e3:.3f}",
                f"{r.samples_per_s:,.1f}",
                f"{r.efficiency:.2f}",
                format_bytes(r.memory_per_device),
                "yes" if r.feasible else "NO",
            )
            for i, r in enumerate(shown)
        ]
        c = self._cluster
        title = (
            f"Layouts for {self._model_name or 'the model'} on {c.nodes} x "
            f"{c.devices_per_node} devices, global batch {self._global_batch} "
            "(best first)"
        )
        lines = [title, _table(header, body, left=(4, 5))]
        hidden = len(self._rows) - len(shown)
        if hidden:
            lines.append(f"... {hidden} more rows")
        infeasible = [r for r in shown if not r.feasible]
        if infeasible:
            lines.append(f"Why not: {infeasible[0].why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-compatible data.

        Example:

        >>> result.to_dict()["rows"][0]["data_parallel"]
        """
        return {
            "global_batch": self._global_batch,
            "model_name": self._model_name,
            "cluster": self._cluster.to_dict(),
            "rows": [r.to_dict() for r in self._rows],
        }


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int]
) -> str:
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return value


def _choices(
    name: str, value: Any, allowed: Sequence[str]
) -> tuple[str, ...]:
    if value is None:
        return tuple(allowed)
    values = (value,) if isinstance(value, str) else tuple(value)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(
            f"Unknown {name} {bad or values}. Received: {name}={value!r}. "
            f"Use one of {list(allowed)}."
        )
    return values


def plan(
    profile_or_model: Any,
    cluster: Cluster,
    *,
    global_batch: int,
    sample_batch: Any = None,
    data_parallel: int | None = None,
    pipeline_stages: int | None = None,
    microbatches: int | None = None,
    schedule: str | Sequence[str] | None = None,
    aggregation: str | Sequence[str] | None = None,
    virtual_stages: int | None = None,
    batch_profile: Profile | None = None,
    use_all_devices: bool = True,
    pipeline_profile: Profile | None = None,
) -> Plan:
    """Predicts the step time and memory of every layout and ranks them.

    Searches data-parallel degree `D` × pipeline stages `K` (using all the
    cluster's devices, `D * K = nodes * devices_per_node`, unless
    `use_all_devices=False`) × micro-batches `M` × schedule (GPipe, 1F1B,
    and interleaved 1F1B with `v` stages per device) × gradient
    aggregation. A keyword argument fixes its dimension. See
    `tf_smdist.planner.model` for the cost model and the README section
    "Planning a layout" for what it ignores.

    Args:
        profile_or_model: A `Profile`, or a Keras model (then pass
            `sample_batch`; it is profiled with `smd.profile_model`).
        cluster: The `Cluster`.
        global_batch: Samples per training step, over all replicas.
        sample_batch: Inputs of one batch, to profile a model. Defaults to
            `None`.
        data_parallel: Fix `D`. Defaults to `None` (searched).
        pipeline_stages: Fix `K`. Defaults to `None` (searched).
        microbatches: Fix `M`. Defaults to `None` (searched: powers of two
            up to 64 that divide the per-replica batch).
        schedule: Fix the schedule(s): `"1f1b"`, `"gpipe"`,
            `"interleaved"`. Defaults to `None` (all three; interleaved
            where `K >= 2`, `M` is a multiple of `K` and the profile has
            `K * v` positions).
        aggregation: Fix the aggregation(s): `"ring"`, `"hierarchical"`,
            `"host_sharded"`. Defaults to `None` (all three).
        virtual_stages: Fix the interleaved schedule's stages per device
            `v >= 2`. Defaults to `None` (searched: 2 and 4).
        batch_profile: The same model profiled at another batch size
            (`smd.profile_model` on a larger batch): each layer's time is
            then the line `a + c * batch` through the two profiles instead
            of proportional to the batch, which matters when small
            micro-batches keep a fixed per-call cost. Defaults to `None`.
        use_all_devices: Whether `D * K` must equal the cluster's device
            count (else any `D * K` up to it). Defaults to `True`.
        pipeline_profile: The same model profiled as `PipelineModel`
            trains it (`smd.profile_model(..., matmul_rule=True)`: on CPU
            the pipeline computes dense layers' input gradients with its
            own rule, much faster on small micro-batches), at the same
            batch size: layouts with `K >= 2` price their stages with it.
            Defaults to `None` (`profile` for every layout). Not combined
            with `batch_profile`.

    Returns:
        A `Plan`; `plan.rows[0]` is the best feasible layout.

    Raises:
        ValueError: for fixed dimensions that cannot work together (the
            message names them), or a non-positive `global_batch`.

    Example:

    >>> cluster = smd.Cluster(nodes=64, devices_per_node=8, device_memory=80e9,
    ...                       intra_node_bandwidth=300e9,
    ...                       inter_node_bandwidth=12.5e9)
    >>> result = smd.plan(profile, cluster, global_batch=2048)
    >>> print(result)
    >>> smd.plan(profile, cluster, global_batch=2048, pipeline_stages=4).rows[0]
    """
    profile = _as_profile(profile_or_model, sample_batch)
    if not isinstance(cluster, Cluster):
        raise TypeError(
            f"`cluster` must be a smd.Cluster. Received: cluster={cluster!r}"
        )
    _positive("global_batch", global_batch)
    if batch_profile is not None:
        if not isinstance(batch_profile, Profile):
            raise TypeError(
                "`batch_profile` must be a smd.Profile. Received: "
                f"batch_profile={type(batch_profile).__name__}"
            )
        _check_pair(profile, batch_profile)
    if pipeline_profile is not None:
        _check_same_model(profile, pipeline_profile, batch_profile)
    n = cluster.num_devices
    for name, value in (
        ("data_parallel", data_parallel),
        ("pipeline_stages", pipeline_stages),
        ("microbatches", microbatches),
        ("virtual_stages", virtual_stages),
    ):
        if value is not None:
            _positive(name, value)
    if virtual_stages is not None and virtual_stages < 2:
        raise ValueError(
            "`virtual_stages` (the interleaved schedule's stages per device) "
            f"must be at least 2. Received: virtual_stages={virtual_stages}. "
            "Use 2 or more, or the '1f1b' schedule for one stage per device."
        )
    schedules = _choices("schedule", schedule, SCHEDULES)
    aggregations = _choices("aggregation", aggregation, AGGREGATIONS)
    if pipeline_stages is not None and pipeline_stages > len(profile):
        raise ValueError(
            f"`pipeline_stages` exceeds the profile's {len(profile)} layers. "
            f"Received: pipeline_stages={pipeline_stages}. Use at most "
            f"{len(profile)} stages."
        )
    layouts = _layouts(n, len(profile), data_parallel, pipeline_stages, use_all_devices)
    if not layouts:
        raise ValueError(
            "No data_parallel x pipeline_stages layout uses the cluster's "
            f"{n} devices. Received: data_parallel={data_parallel}, "
            f"pipeline_stages={pipeline_stages}, devices={n}. Fix dimensions "
            "whose product divides the device count, or pass "
            "use_all_devices=False."
        )
    rows: list[PlanRow] = []
    skipped = []
    split_cache: dict[Any, Any] = {}
    for d, k in layouts:
        if global_batch % d:
            skipped.append(f"D={d} (global_batch % D != 0)")
            continue
        replica = global_batch // d
        if microbatches is not None:
            counts: tuple[int, ...] = (microbatches,)
        else:
            counts = tuple(m for m in _MICROBATCHES if m <= replica)
        for m in counts:
            if replica % m:
                skipped.append(f"D={d}, M={m} (per-replica batch % M != 0)")
                continue
            # One stage: the schedules coincide; keep one unless fixed.
            names = schedules if (k > 1 or schedule is not None) else schedules[:1]
            for name in names:
                vs = _virtual(name, k, m, len(profile), virtual_stages)
                if not vs:
                    skipped.append(
                        f"D={d}, K={k}, M={m}, interleaved (needs K >= 2, M % K "
                        "== 0 and K * virtual_stages <= the profile's positions)"
                    )
                for v in vs:
                    rows.extend(
                        estimate_layout(
                            profile,
                            cluster,
                            global_batch=global_batch,
                            data_parallel=d,
                            pipeline_stages=k,
                            microbatches=m,
                            schedule=name,
                            aggregations=aggregations,
                            virtual_stages=v,
                            batch_profile=batch_profile,
                            split_cache=split_cache,
                            pipeline_profile=pipeline_profile,
                        )
                    )
    if not rows:
        raise ValueError(
            "No layout fits the fixed dimensions. Received: "
            f"global_batch={global_batch}, skipped: {skipped[:5]}. Use a "
            "global batch divisible by data_parallel * microbatches (and, for "
            "the interleaved schedule, microbatches divisible by "
            "pipeline_stages)."
        )
    logger.debug("plan: %d rows, skipped %s", len(rows), skipped)
    return Plan(rows, cluster, global_batch, profile.model_name)


def _virtual(
    schedule: str, stages: int, microbatches: int, layers: int, fixed: int | None
) -> tuple[int, ...]:
    """Stages per device to try: `(1,)`, or the interleaved schedule's `v`s."""
    if schedule != "interleaved":
        return (1,)
    if stages < 2 or microbatches % stages:
        return ()
    candidates = (fixed,) if fixed is not None else _VIRTUAL_STAGES
    return tuple(v for v in candidates if stages * v <= layers)


def _layouts(
    devices: int,
    layers: int,
    data_parallel: int | None,
    pipeline_stages: int | None,
    use_all: bool,
) -> list[tuple[int, int]]:
    out = []
    for k in range(1, min(devices, layers) + 1):
        if pipeline_stages is not None and k != pipeline_stages:
            continue
        for d in range(1, devices // k + 1):
            if data_parallel is not None and d != data_parallel:
                continue
            if use_all and d * k != devices:
                continue
            out.append((d, k))
    return out


def _as_profile(profile_or_model: Any, sample_batch: Any) -> Profile:
    if isinstance(profile_or_model, Profile):
        if sample_batch is not None:
            raise ValueError(
                "`sample_batch` is only for profiling a model; a Profile was "
                "given. Received: sample_batch is not None. Leave it out."
            )
        return profile_or_model
    if sample_batch is None:
        raise ValueError(
            "Pass a Profile, or a Keras model together with `sample_batch` "
            f"(one batch of inputs) to profile it. Received: "
            f"profile_or_model={type(profile_or_model).__name__}, "
            "sample_batch=None."
        )
    from tf_smdist.pipeline.profiler import profile_model

    return profile_model(profile_or_model, sample_batch)


def _check_same_model(profile: Profile, other: Any, batch_profile: Any) -> None:
    if not isinstance(other, Profile):
        raise TypeError(
            "`pipeline_profile` must be a smd.Profile. Received: "
            f"pipeline_profile={type(other).__name__}"
        )
    _refuse_both_profiles(other, batch_profile)
    names = [x.name for x in profile.layers]
    other_names = [x.name for x in other.layers]
    if names != other_names or other.batch_size != profile.batch_size:
        raise ValueError(
            "`pipeline_profile` must profile the same layers as the profile, "
            "at the same batch size. Received: "
            f"{len(other_names)} layers at batch {other.batch_size} against "
            f"{len(names)} layers at batch {profile.batch_size}."
        )
