"""Per-stage time and memory estimates of a pipeline split, from a `Profile`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tf_smdist.pipeline.profiler import Profile

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

SCHEDULES = ("1f1b", "gpipe")


def in_flight_microbatches(
    stage: int, num_stages: int, microbatches: int, schedule: str
) -> int:
    """Micro-batches whose activations stage `stage` holds at its peak.

    GPipe runs every forward before any backward, so each stage holds all
    `M` micro-batches. 1F1B starts backward as soon as the last stage can, so
    stage `s` of `K` holds at most `min(K - s, M)`.

    Args:
        stage: The stage index `s`, from 0.
        num_stages: The number of stages `K`.
        microbatches: Micro-batches per batch `M`.
        schedule: `"1f1b"` or `"gpipe"`.

    Returns:
        The number of micro-batches in flight.

    Example:

    >>> in_flight_microbatches(0, 4, 8, "1f1b")
    4
    >>> in_flight_microbatches(0, 4, 8, "gpipe")
    8
    """
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(num_stages - stage, microbatches)
    raise ValueError(
        f"Unknown schedule {schedule!r}. Received: schedule={schedule!r}. "
        f"Use one of {list(SCHEDULES)}."
    )


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

    >>> estimate = cost_model.estimate([3, 5])[0]
    >>> estimate.time, estimate.memory
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
    times the micro-batches in flight on it (`in_flight_microbatches`).

    Args:
        profile: The model's `Profile`.
        num_stages: Number of stages `K`.
        microbatches: Micro-batches per batch `M`. Defaults to `1`.
        schedule: `"1f1b"` or `"gpipe"`. Defaults to `"1f1b"`.
        batch_size: Samples per (whole) batch. Defaults to `None` (the
            profile's batch size).
        bandwidth: Bytes per second between stages. Defaults to `None`
            (`DEFAULT_BANDWIDTH` for the profile's device kind).
        latency: Seconds per transfer. Defaults to `0.0`.

    Example:

    >>> model = CostModel(profile, 2, microbatches=4)
    >>> [e.time for e in model.estimate([5, 3])]
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
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(
                f"Unknown schedule {schedule!r}. Received: schedule={schedule!r}. "
                f"Use one of {list(SCHEDULES)}."
            )
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
        self.microbatch_size = self.batch_size / self.microbatches
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

        >>> cost_model.stage_time(0, np.array([0, 1]), 3)
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

        >>> cost_model.stage_memory(0, np.array([0]), 3)
        """
        starts = np.asarray(starts)
        in_flight = in_flight_microbatches(
            stage, self.num_stages, self.microbatches, self.schedule
        )
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
            stage_sizes: Layers per stage, summing to the profile's length.

        Returns:
            One `StageEstimate` per stage.

        Example:

        >>> [round(e.time, 6) for e in cost_model.estimate([4, 4])]
        """
        estimates, a = [], 0
        num_stages = len(stage_sizes)
        for s, size in enumerate(stage_sizes):
            b = a + size
            start = np.array([a])
            compute = float(self._compute_prefix[b] - self._compute_prefix[a])
            in_flight = in_flight_microbatches(
                s, num_stages, self.microbatches, self.schedule
            )
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
