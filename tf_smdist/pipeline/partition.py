"""Choosing a pipeline split from a `Profile`: `partition` and `Partition`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from tf_smdist.pipeline.cost_model import CostModel, StageEstimate
from tf_smdist.pipeline.profile import Profile, format_bytes, format_table
from tf_smdist.pipeline.serialization import JsonSerializable, check_format_version
from tf_smdist.pipeline.solver import min_max_partition

__all__ = ["Partition", "partition"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
OPTIMIZE = ("speed", "memory")


class Partition(JsonSerializable):
    """A split of a model's layers into pipeline stages, with its estimates.

    Made by `smd.partition`. `stage_sizes` counts profile positions per
    stage, and `stage_layer_names` names them: the nodes of the model's
    graph as `tf_smdist.pipeline.graph.flatten_model` walks it, that is
    calls of Keras layers and bare operations such as `x + y`.

    Args:
        stage_layer_names: Names of the profile positions of each stage.
        estimates: One `StageEstimate` per stage.
        settings: The options it was made with (`optimize`, `schedule`,
            `microbatches`, `microbatch_size`, `bandwidth`, `memory_capacity`,
            `manual`).

    Example:

    >>> part = smd.partition(profile, 2)
    >>> sum(part.stage_sizes)
    5
    >>> print(part.report())
    Partition into 2 stages (optimize=speed, schedule=1f1b, ...)
    ...
    """

    def __init__(
        self,
        stage_layer_names: Sequence[Sequence[str]],
        estimates: Sequence[StageEstimate],
        settings: dict[str, Any],
    ) -> None:
        if len(stage_layer_names) != len(estimates):
            raise ValueError(
                "A Partition needs one estimate per stage. Received: "
                f"{len(stage_layer_names)} stages, {len(estimates)} estimates."
            )
        if any(not names for names in stage_layer_names):
            raise ValueError(
                "Every stage needs at least one layer. "
                f"Received: stage_layer_names={stage_layer_names}"
            )
        self._nodes = [list(names) for names in stage_layer_names]
        self._estimates = list(estimates)
        self._settings = dict(settings)

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self._nodes)

    @property
    def stage_sizes(self) -> list[int]:
        """Profile positions per stage."""
        return [len(names) for names in self._nodes]

    @property
    def stage_layer_names(self) -> list[list[str]]:
        """Names of the profile positions (graph nodes) of each stage."""
        return [list(names) for names in self._nodes]

    @property
    def estimates(self) -> list[StageEstimate]:
        """The per-stage time and memory estimates."""
        return list(self._estimates)

    @property
    def stage_times(self) -> list[float]:
        """Estimated seconds per micro-batch of each stage (compute+transfer)."""
        return [e.time for e in self._estimates]

    @property
    def stage_memory(self) -> list[float]:
        """Estimated peak bytes of each stage."""
        return [e.memory for e in self._estimates]

    @property
    def device_memory(self) -> list[float]:
        """Estimated peak bytes of each device: the sum over its stages.

        One entry per stage, except with the interleaved schedule, where
        device `d` holds stages `d`, `d + K`, ... (`virtual_stages` each).
        """
        devices = self.num_stages // self._settings.get("virtual_stages", 1)
        memory = [0.0] * devices
        for s, e in enumerate(self._estimates):
            memory[s % devices] += e.memory
        return memory

    @property
    def bottleneck(self) -> float:
        """Estimated seconds per micro-batch of the slowest stage."""
        return max(self.stage_times)

    @property
    def settings(self) -> dict[str, Any]:
        """The options the partition was made with."""
        return dict(self._settings)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"Partition(stage_sizes={self.stage_sizes}, "
            f"optimize={self._settings.get('optimize')!r}, "
            f"bottleneck={self.bottleneck * 1e3:.3f} ms)"
        )

    def report(self) -> str:
        """A table of the stages: layers, sizes, estimated time and memory.

        Times are per micro-batch; memory is the peak with the schedule's
        micro-batches in flight. The last line estimates a training step as
        `(M + K - 1)` times the slowest stage.

        Returns:
            The report text.

        Example:

        >>> print(smd.partition(profile, 2).report())
        Partition into 2 stages ...
        Slowest stage: ...
        """
        rows = []
        for s, (names, e) in enumerate(zip(self._nodes, self._estimates)):
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            rows.append(
                (
                    str(s),
                    f"{len(names)}: {span}",
                    format_bytes(e.param_bytes),
                    format_bytes(e.activations_in),
                    format_bytes(e.activations_out),
                    f"{e.compute_time * 1e3:.3f}",
                    f"{e.transfer_time * 1e3:.3f}",
                    f"{e.time * 1e3:.3f}",
                    format_bytes(e.memory),
                    str(e.in_flight),
                )
            )
        header = (
            "stage",
            "layers",
            "params",
            "act in",
            "act out",
            "compute ms",
            "transfer ms",
            "time ms",
            "memory",
            "in flight",
        )
        cfg = self._settings
        m, v = cfg.get("microbatches", 1), cfg.get("virtual_stages", 1)
        k = self.num_stages // v
        slowest = int(np.argmax(self.stage_times))
        mode = "manual" if cfg.get("manual") else f"optimize={cfg.get('optimize')}"
        chunks = f", {v} stages per device" if v > 1 else ""
        title = (
            f"Partition into {self.num_stages} stages ({mode}, "
            f"schedule={cfg.get('schedule')}{chunks}, "
            f"{m} micro-batches of {cfg.get('microbatch_size', 0):g} samples)"
        )
        # One clock per stage's micro-batch; (v M + K - 1) clocks per step.
        formula = "(v M + K - 1)" if v > 1 else "(M + K - 1)"
        footer = (
            f"Slowest stage: {slowest}, {self.bottleneck * 1e3:.3f} ms per "
            f"micro-batch; estimated step {formula} x slowest = "
            f"{(v * m + k - 1) * self.bottleneck * 1e3:.3f} ms; "
            f"peak {'device' if v > 1 else 'stage'} memory "
            f"{format_bytes(max(self.device_memory))}"
        )
        capacity = cfg.get("memory_capacity")
        if capacity is not None:
            footer += f" (capacity {_format_capacity(capacity)})"
        return "\n".join([title, format_table(header, rows), footer])

    def to_dict(self) -> dict[str, Any]:
        """The partition as plain JSON-compatible data.

        Returns:
            A dict; `Partition.from_dict` inverts it.

        Example:

        >>> smd.Partition.from_dict(part.to_dict()) == part
        True
        """
        return {
            "format_version": _FORMAT_VERSION,
            "stage_sizes": self.stage_sizes,
            "stage_layer_names": self.stage_layer_names,
            "estimates": [dataclasses.asdict(e) for e in self._estimates],
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        """Rebuilds a partition from `to_dict()` data.

        Args:
            data: A dict as returned by `to_dict`.

        Returns:
            The `Partition`.

        Example:

        >>> smd.Partition.from_dict(part.to_dict())
        Partition(stage_sizes=[...], optimize='speed', bottleneck=... ms)
        """
        check_format_version(
            data, _FORMAT_VERSION, what="partition", remedy="Partition again."
        )
        # Files written before names were unified hold every position under
        # "stage_node_names" (and only the layers under "stage_layer_names").
        return cls(
            data.get("stage_node_names", data["stage_layer_names"]),
            [StageEstimate(**e) for e in data["estimates"]],
            data["settings"],
        )


def _format_capacity(capacity: Any) -> str:
    if isinstance(capacity, (list, tuple)):
        return "[" + ", ".join(format_bytes(c) for c in capacity) + "]"
    return format_bytes(capacity)


def _capacities(memory_capacity: Any, num_devices: int) -> np.ndarray | None:
    """Bytes per device, one entry per device."""
    if memory_capacity is None:
        return None
    if isinstance(memory_capacity, (int, float, np.integer, np.floating)):
        values = np.full(num_devices, float(memory_capacity))
    else:
        values = np.asarray(memory_capacity, dtype=np.float64)
        if values.shape != (num_devices,):
            raise ValueError(
                "`memory_capacity` must be one number of bytes, or one per "
                "device, that is one per stage unless stages are interleaved "
                f"({num_devices}). Received: "
                f"memory_capacity={memory_capacity!r}"
            )
    if not np.all(values > 0):
        raise ValueError(
            "`memory_capacity` must be positive. "
            f"Received: memory_capacity={memory_capacity!r}"
        )
    return values


def _manual_sizes(
    profile: Profile,
    num_stages: int,
    stage_sizes: Sequence[int] | None,
    split_points: Sequence[str] | None,
) -> list[int]:
    n = len(profile)
    if stage_sizes is not None and split_points is not None:
        raise ValueError(
            "Pass `stage_sizes` or `split_points`, not both. Received: "
            f"stage_sizes={stage_sizes!r}, split_points={split_points!r}"
        )
    if stage_sizes is not None:
        sizes = list(stage_sizes)
        if (
            len(sizes) != num_stages
            or any(isinstance(x, bool) or int(x) != x or x < 1 for x in sizes)
            or sum(sizes) != n
        ):
            raise ValueError(
                f"`stage_sizes` must be {num_stages} positive ints summing to the "
                f"number of profiled layers ({n}). Received: stage_sizes={sizes} "
                f"(sum {sum(sizes)}). Use profile.layer_names to count layers, or "
                "leave stage_sizes out to partition automatically."
            )
        return [int(x) for x in sizes]
    points = list(split_points)  # type: ignore[arg-type]
    if len(points) != num_stages - 1:
        raise ValueError(
            f"`split_points` must name {num_stages - 1} layers (each starts a new "
            f"stage) for num_stages={num_stages}. Received: split_points={points}"
        )
    starts = [profile.index(name) for name in points]
    bounds = [0, *starts, n]
    if any(bounds[i] >= bounds[i + 1] for i in range(len(bounds) - 1)):
        raise ValueError(
            "`split_points` must be layers in increasing topological order, "
            "after the first layer, each starting a new stage. Received: "
            f"split_points={points} at positions {starts}. Check profile.layer_names."
        )
    return [bounds[i + 1] - bounds[i] for i in range(num_stages)]


def partition(
    profile: Profile,
    num_stages: int,
    *,
    optimize: str = "speed",
    stage_sizes: Sequence[int] | None = None,
    split_points: Sequence[str] | None = None,
    microbatches: int = 1,
    schedule: str = "1f1b",
    batch_size: int | None = None,
    bandwidth: float | None = None,
    latency: float = 0.0,
    memory_capacity: float | Sequence[float] | None = None,
    virtual_stages: int = 2,
) -> Partition:
    """Splits a profiled model into pipeline stages.

    With `optimize="speed"`, the split minimises the slowest stage's time per
    micro-batch (compute plus the transfer of every tensor live across its
    cuts), exactly, subject to each stage's peak memory (parameters,
    gradients, optimizer state, and activations of the micro-batches in
    flight, as the schedule runs them: `M` for GPipe, `min(K - s, M)` for
    1F1B) fitting `memory_capacity`. With `schedule="interleaved"` the
    `num_stages` stages are virtual, `virtual_stages` per device (device `d`
    holds stages `d`, `d + K`, ...); each stage must then fit its device's
    capacity divided by `virtual_stages`, so that the device's stages
    together fit it. With `optimize="memory"`, it minimises the largest
    stage memory instead (SageMaker model parallelism's trade-off: more
    balanced memory, possibly slower). `stage_sizes` or `split_points`
    override the choice; the estimates are still computed.

    Args:
        profile: The model's `Profile`.
        num_stages: Number of stages (devices `K`, or `K * virtual_stages`
            with `"interleaved"`).
        optimize: `"speed"` or `"memory"`. Defaults to `"speed"`.
        stage_sizes: Manual split: profile positions per stage. Defaults to
            `None`.
        split_points: Manual split: the `K - 1` layer names that start
            stages 1 to `K - 1`. Defaults to `None`.
        microbatches: Micro-batches per batch `M`. Defaults to `1`.
        schedule: `"1f1b"`, `"gpipe"` or `"interleaved"`. Defaults to
            `"1f1b"`.
        batch_size: Samples per batch (split into `M` micro-batches).
            Defaults to `None` (the profile's batch size).
        bandwidth: Bytes per second between stages. Defaults to `None` (a
            default for the profile's device kind).
        latency: Seconds per transfer. Defaults to `0.0`.
        memory_capacity: Bytes per device, one number or one per device.
            Defaults to `None` (no limit).
        virtual_stages: Stages per device with `"interleaved"` (ignored
            for the others). Defaults to `2`.

    Returns:
        A `Partition`.

    Raises:
        ValueError: when no split fits `memory_capacity` (the message names
            the stage and its bytes), or for invalid options.

    Example:

    >>> profile = smd.profile_model(model, x[:32])
    >>> part = smd.partition(profile, 2, microbatches=4)
    >>> print(part.report())
    Partition into 2 stages (optimize=speed, schedule=1f1b, 4 micro-batches ...
    ...
    >>> smd.partition(profile, 2, split_points=["dense_2"]).stage_sizes
    [2, 3]
    """
    n = len(profile)
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)):
        raise TypeError(
            f"`num_stages` must be an int. Received: num_stages={num_stages!r}"
        )
    if not 1 <= num_stages <= n:
        raise ValueError(
            f"`num_stages` must be between 1 and the number of profiled layers "
            f"({n}). Received: num_stages={num_stages}. Use at most {n} stages."
        )
    if optimize not in OPTIMIZE:
        raise ValueError(
            f"Unknown optimize={optimize!r}. Received: optimize={optimize!r}. "
            f"Use one of {list(OPTIMIZE)}."
        )
    model = CostModel(
        profile,
        num_stages,
        microbatches=microbatches,
        schedule=schedule,
        batch_size=batch_size,
        bandwidth=bandwidth,
        latency=latency,
        virtual_stages=virtual_stages,
    )
    capacity = _capacities(memory_capacity, model.num_devices)
    manual = stage_sizes is not None or split_points is not None
    if manual:
        sizes = _manual_sizes(profile, num_stages, stage_sizes, split_points)
    else:
        sizes = _solve(model, num_stages, optimize, capacity)
    estimates = model.estimate(sizes)
    if manual and capacity is not None:
        for d, used in enumerate(model.device_memory(estimates)):
            if used > capacity[d]:
                logger.warning(
                    "Device %d of the manual partition needs %s, over its "
                    "memory_capacity %s.",
                    d,
                    format_bytes(used),
                    format_bytes(capacity[d]),
                )
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    layers = profile.layers
    settings = {
        "optimize": optimize,
        "manual": manual,
        "schedule": schedule,
        "virtual_stages": model.virtual_stages,
        "microbatches": model.microbatches,
        "microbatch_size": model.microbatch_size,
        "bandwidth": model.bandwidth,
        "latency": model.latency,
        "memory_capacity": None if capacity is None else [float(c) for c in capacity],
        "profile_batch_size": profile.batch_size,
        "model_name": profile.model_name,
    }
    return Partition(
        [
            [x.name for x in layers[bounds[s] : bounds[s + 1]]]
            for s in range(num_stages)
        ],
        estimates,
        settings,
    )


def _solve(
    model: CostModel, num_stages: int, optimize: str, device_capacity: np.ndarray | None
) -> list[int]:
    """The best split; each stage within its share of its device's capacity."""
    n = model.num_layers
    objective = model.stage_time if optimize == "speed" else model.stage_memory
    capacity = None
    if device_capacity is not None:
        capacity = np.array(
            [
                device_capacity[model.device_of(s)] / model.virtual_stages
                for s in range(num_stages)
            ]
        )

    def fits(s: int, starts: np.ndarray, end: int) -> np.ndarray:
        return model.stage_memory(s, starts, end) <= capacity[s]  # type: ignore[index]

    _, sizes = min_max_partition(
        n,
        num_stages,
        objective,
        stage_fits=None if capacity is None else fits,
        broadcast=True,
    )
    if sizes:
        return sizes
    assert capacity is not None  # Only a memory limit can make it infeasible.

    # Report the split whose worst stage is least over its capacity.
    def ratio(s: int, starts: np.ndarray, end: int) -> np.ndarray:
        return model.stage_memory(s, starts, end) / capacity[s]

    worst_ratio, tight = min_max_partition(n, num_stages, ratio, broadcast=True)
    estimates = model.estimate(tight)
    worst = max(range(num_stages), key=lambda s: estimates[s].memory / capacity[s])
    names = model.profile.layer_names
    advice = "smaller micro-batches, " if model.microbatches > 1 else ""
    if model.schedule == "gpipe" and model.microbatches > 1:
        advice = "the 1F1B schedule, " + advice
    a = sum(tight[:worst])
    b = a + tight[worst] - 1
    share = (
        f", 1/{model.virtual_stages} of device {model.device_of(worst)}'s capacity"
        if model.virtual_stages > 1
        else ""
    )
    raise ValueError(
        f"No split into {num_stages} stages fits memory_capacity: even the split "
        f"that needs the least memory ({tight}) puts "
        f"{format_bytes(estimates[worst].memory)} on stage {worst} (layers "
        f"{names[a]} .. {names[b]}: {format_bytes(estimates[worst].static_bytes)} "
        f"parameters, gradients and optimizer state, and "
        f"{estimates[worst].in_flight} x "
        f"{format_bytes(estimates[worst].activation_bytes)} activations), over its "
        f"{format_bytes(capacity[worst])} ({worst_ratio:.2f}x){share}. "
        f"Received: memory_capacity={_format_capacity(list(device_capacity))}, "
        f"num_stages={num_stages}, microbatches={model.microbatches}, "
        f"schedule={model.schedule!r}. Use more stages, {advice}devices with more "
        "memory."
    )
