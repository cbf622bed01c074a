"""Per-stage time and memory estimates of a pipeline split, from a `Profile`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from tf_smdist.pipeline.profile import Profile
from tf_smdist.pipeline.schedule import SCHEDULES, make_schedule

__all__ = [
    "DEFAULT_BANDWIDTH",
    "CostModel",
    "StageEstimate",
    "in_flight_microbatches",
]

# Bytes per second between two pipeline stages, by device kind: GPUs through
# PCIe or NVLink (a conservative PCIe 4 x16 figure), logical CPU devices
# through host memory. Pass `bandwidth=` to use a measured value.
DEFAULT_BANDWIDTH = {"GPU": 25e9, "CPU": 10e9}
_FALLBACK_BANDWIDTH = 10e9

def _check_schedule(schedule: str, num_stages: int, virtual_stages: int) -> int:
    """Validates the set-up; returns the stages per device `v` (1 unless
    interleaved)."""
    if schedule not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule {schedule!r}. Received: schedule={schedule!r}. "
            f"Use one of {list(SCHEDULES)}."
        )
    if schedule != "interleaved":
        return 1
    if (
        isinstance(virtual_stages, bool)
        or not isinstance(virtual_stages, int)
        or virtual_stages < 1
        or num_stages % virtual_stages
    ):
        raise ValueError(
            "The interleaved schedule needs `virtual_stages`, a positive int "
            "dividing `num_stages` (its stages: devices x stages per device). "
            f"Received: num_stages={num_stages}, virtual_stages={virtual_stages!r}. "
            "Pass num_stages = devices * virtual_stages."
        )
    return virtual_stages


@functools.lru_cache(maxsize=256)
def _in_flight_table(
    schedule: str, num_stages: int, microbatches: int, virtual_stages: int
) -> tuple[int, ...]:
    plan = make_schedule(
        schedule,
        num_stages // virtual_stages,
        microbatches,
        virtual_stages=virtual_stages,
    )
    return tuple(plan.in_flight(s) for s in range(num_stages))


def in_flight_microbatches(
    stage: int,
    num_stages: int,
    microbatches: int,
    schedule: str,
    *,
    virtual_stages: int = 2,
) -> int:
    """Micro-batches whose activations stage `stage` holds at its peak.

    The count comes from the schedule itself (`Schedule.in_flight`): a
    micro-batch is in flight on a stage from its forward to its backward.
    GPipe runs every forward before any backward, so each stage holds all
    `M`; 1F1B holds at most `min(K - s, M)` on stage `s` of `K`; interleaved
    1F1B (stage `s` on device `s % (K / v)`) holds what its warm-up and
    steady state leave in flight on each virtual stage.

    Args:
        stage: The stage index `s`, from 0.
        num_stages: The number of pipeline stages (`K`, or devices times
            `virtual_stages` for `"interleaved"`).
        microbatches: Micro-batches per batch `M`.
        schedule: `"gpipe"`, `"1f1b"` or `"interleaved"`.
        virtual_stages: Stages per device for `"interleaved"` (ignored for
            the others). Defaults to `2`.

    Returns:
        The number of micro-batches in flight.

    Example:

    >>> in_flight_microbatches(0, 4, 8, "1f1b")
    4
    >>> in_flight_microbatches(0, 4, 8, "gpipe")
    8
    >>> in_flight_microbatches(0, 4, 4, "interleaved")  # 2 devices, v=2
    4
    """
    v = _check_schedule(schedule, num_stages, virtual_stages)
    return _in_flight_table(schedule, num_stages, microbatches, v)[stage]


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    """Estimated cost of one pipeline stage (per micro-batch and at peak).

    Args:
        layers: Number of layers (profile positions) in the stage.
        compute_time: Forward+backward seconds of its layers per micro-batch.
        transfer_time: Seconds per micro-batch moving the activations across
            its boundaries forward and their gradients back.
        param_bytes: Bytes of its variables.
        static_bytes: Parameters + gradients + optimizer state.
        activation_bytes: Activations kept per in-flight micro-batch.
        in_flight: Micro-batches in flight at its peak.
        activations_in: Bytes received per micro-batch (cut before it).
        activations_out: Bytes sent per micro-batch (cut after it).

    Example:

    >>> estimate = cost_model.estimate([3, 2])[0]
    >>> estimate.layers, estimate.in_flight, estimate.memory > estimate.static_bytes
    (3, 2, True)
    """

    layers: int
    compute_time: float
    transfer_time: float
    param_bytes: int
    static_bytes: float
    activation_bytes: float
    in_flight: int
    activations_in: float
    activations_out: float

    @property
    def time(self) -> float:
        """Seconds per micro-batch: compute plus transfer."""
        return self.compute_time + self.transfer_time

    @property
    def memory(self) -> float:
        """Peak bytes: static plus in-flight activations."""
        return self.static_bytes + self.in_flight * self.activation_bytes


class CostModel:
    """Turns a `Profile` into stage costs for a given pipeline set-up.

    Per micro-batch of `b` samples, a stage holding layers `[a, c)` costs
    time: the layers' forward+backward seconds (scaled linearly from the
    profile's batch size to `b`) plus, for each of its cuts, the time to move
    the tensors live across that cut (forward) and their gradients (back) at
    `bandwidth`, plus `latency` per transfer. Its memory: parameters,
    gradients and optimizer state of its layers, plus the activations it
    keeps per micro-batch (its layers' outputs and the tensors it receives)
    times the micro-batches in flight on it (`in_flight_microbatches`, read
    from the schedule).

    With `schedule="interleaved"`, the `num_stages` stages are virtual:
    device `d` of `num_stages / virtual_stages` holds stages `d`,
    `d + K`, ... (`v` chunks of the model), each with its own in-flight count
    from the interleaved schedule; `device_memory` adds up a device's
    chunks.

    Args:
        profile: The model's `Profile`.
        num_stages: Number of stages (devices `K`, or `K * virtual_stages`
            for `"interleaved"`).
        microbatches: Micro-batches per batch `M`. Defaults to `1`.
        schedule: `"1f1b"`, `"gpipe"` or `"interleaved"`. Defaults to
            `"1f1b"`.
        batch_size: Samples per (whole) batch. Defaults to `None` (the
            profile's batch size).
        bandwidth: Bytes per second between stages. Defaults to `None`
            (`DEFAULT_BANDWIDTH` for the profile's device kind).
        latency: Seconds per transfer. Defaults to `0.0`.
        virtual_stages: Stages per device for `"interleaved"` (ignored for
            the others). Defaults to `2`.

    Example:

    >>> model = CostModel(profile, 2, microbatches=4)
    >>> [e.layers for e in model.estimate([3, 2])]
    [3, 2]
    """

    def __init__(
        self,
        profile: Profile,
        num_stages: int,
        *,
        microbatches: int = 1,
        schedule: str = "1f1b",
        batch_size: int | None = None,
        bandwidth: float | None = None,
        latency: float = 0.0,
        virtual_stages: int = 2,
    ) -> None:
        self.virtual_stages = _check_schedule(schedule, num_stages, virtual_stages)
        if isinstance(microbatches, bool) or int(microbatches) != microbatches:
            raise TypeError(
                "`microbatches` must be an int. "
                f"Received: microbatches={microbatches!r}"
            )
        if microbatches < 1:
            raise ValueError(
                "`microbatches` must be at least 1. "
                f"Received: microbatches={microbatches}"
            )
        if bandwidth is None:
            bandwidth = DEFAULT_BANDWIDTH.get(profile.device_kind, _FALLBACK_BANDWIDTH)
        if not bandwidth > 0 or latency < 0:
            raise ValueError(
                "`bandwidth` must be positive and `latency` non-negative. "
                f"Received: bandwidth={bandwidth}, latency={latency}"
            )
        batch_size = profile.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(
                f"`batch_size` must be positive. Received: batch_size={batch_size}"
            )
        self.profile = profile
        self.num_stages = int(num_stages)
        self.microbatches = int(microbatches)
        self.schedule = schedule
        self.batch_size = int(batch_size)
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)
        self.num_devices = self.num_stages // self.virtual_stages
        self.microbatch_size = self.batch_size / self.microbatches
        # Micro-batches in flight on each stage at its peak, from the schedule.
        self.in_flight = _in_flight_table(
            schedule, self.num_stages, self.microbatches, self.virtual_stages
        )
        layers = profile.layers
        scale = self.microbatch_size / profile.batch_size
        self.compute_costs = np.array([layer.time * scale for layer in layers])
        live = np.array([layer.live_bytes for layer in layers], dtype=np.float64)
        # Bytes crossing cut i (between layer i and i + 1) per micro-batch.
        self.cut_bytes = live[:-1] * self.microbatch_size
        self.cut_costs = 2 * (self.cut_bytes / self.bandwidth + self.latency)
        self.static_bytes = np.array(
            [
                layer.param_bytes + layer.trainable_bytes + layer.optimizer_bytes
                for layer in layers
            ],
            dtype=np.float64,
        )
        self.output_bytes = np.array(
            [layer.output_bytes * self.microbatch_size for layer in layers]
        )
        self._compute_prefix = np.concatenate([[0.0], np.cumsum(self.compute_costs)])
        self._static_prefix = np.concatenate([[0.0], np.cumsum(self.static_bytes)])
        self._output_prefix = np.concatenate([[0.0], np.cumsum(self.output_bytes)])
        # Bytes received before layer a (index a) and sent after b - 1.
        self._in_bytes = np.concatenate(
            [[profile.input_bytes * self.microbatch_size], self.cut_bytes]
        )
        self._in_cost = np.concatenate([[0.0], self.cut_costs])
        self._out_cost = np.concatenate([self.cut_costs, [0.0]])

    @property
    def num_layers(self) -> int:
        """Number of profile positions."""
        return len(self.compute_costs)

    def stage_time(self, stage: int, starts: np.ndarray, end: int) -> np.ndarray:
        """Seconds per micro-batch of stages `[starts[i], end)`.

        Args:
            stage: Stage index (unused: every device is alike).
            starts: First layer of each candidate stage.
            end: One past the last layer.

        Returns:
            One time per start.

        Example:

        >>> cost_model.stage_time(0, np.array([0, 1]), 3).shape
        (2,)
        """
        del stage
        starts = np.asarray(starts)
        return (
            self._compute_prefix[end]
            - self._compute_prefix[starts]
            + self._in_cost[starts]
            + self._out_cost[end - 1]
        )

    def stage_memory(self, stage: int, starts: np.ndarray, end: int) -> np.ndarray:
        """Peak bytes of stage `stage` holding layers `[starts[i], end)`.

        Args:
            stage: Stage index (sets the micro-batches in flight).
            starts: First layer of each candidate stage.
            end: One past the last layer.

        Returns:
            One byte count per start.

        Example:

        >>> cost_model.stage_memory(0, np.array([0]), 3).shape
        (1,)
        """
        starts = np.asarray(starts)
        in_flight = self.in_flight[stage]
        activations = (
            self._output_prefix[end]
            - self._output_prefix[starts]
            + self._in_bytes[starts]
        )
        static = self._static_prefix[end] - self._static_prefix[starts]
        return static + in_flight * activations

    def estimate(self, stage_sizes: Sequence[int]) -> list[StageEstimate]:
        """Estimates every stage of a split.

        Args:
            stage_sizes: Layers per stage (one entry per stage), summing to
                the profile's length.

        Returns:
            One `StageEstimate` per stage.

        Example:

        >>> [e.in_flight for e in cost_model.estimate([3, 2])]  # 1F1B, M = 4
        [2, 1]
        """
        if len(stage_sizes) != self.num_stages:
            raise ValueError(
                f"Need one size per stage ({self.num_stages}). Received: "
                f"stage_sizes={list(stage_sizes)}."
            )
        estimates, a = [], 0
        for s, size in enumerate(stage_sizes):
            b = a + size
            start = np.array([a])
            compute = float(self._compute_prefix[b] - self._compute_prefix[a])
            in_flight = self.in_flight[s]
            activation = float(
                self._output_prefix[b] - self._output_prefix[a] + self._in_bytes[a]
            )
            estimates.append(
                StageEstimate(
                    layers=size,
                    compute_time=compute,
                    transfer_time=float(self.stage_time(s, start, b)[0] - compute),
                    param_bytes=sum(
                        layer.param_bytes for layer in self.profile.layers[a:b]
                    ),
                    static_bytes=float(self._static_prefix[b] - self._static_prefix[a]),
                    activation_bytes=activation,
                    in_flight=in_flight,
                    activations_in=float(self.cut_bytes[a - 1]) if a > 0 else 0.0,
                    activations_out=(
                        float(self.cut_bytes[b - 1]) if b < self.num_layers else 0.0
                    ),
                )
            )
            a = b
        return estimates

    def device_of(self, stage: int) -> int:
        """The device holding `stage` (`stage % num_devices`).

        Args:
            stage: A stage index.

        Returns:
            The device index.

        Example:

        >>> CostModel(profile, 4, microbatches=2, schedule="interleaved").device_of(3)
        1
        """
        return stage % self.num_devices

    def device_memory(self, estimates: Sequence[StageEstimate]) -> list[float]:
        """Peak bytes of each device: the sum over the stages it holds.

        A device's stages (one, or `virtual_stages` chunks with the
        interleaved schedule) each count their own peak, so the sum bounds
        the device's peak from above.

        Args:
            estimates: One `StageEstimate` per stage (from `estimate`).

        Returns:
            One byte count per device.

        Example:

        >>> len(cost_model.device_memory(cost_model.estimate([3, 2])))
        2
        """
        memory = [0.0] * self.num_devices
        for s, e in enumerate(estimates):
            memory[self.device_of(s)] += e.memory
        return memory
