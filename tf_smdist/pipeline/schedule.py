"""Pipeline schedules as data: GPipe, 1F1B and interleaved 1F1B.

A schedule says, for each device, the order in which it runs the forward
(`F`) and backward (`B`) pass of each (stage, micro-batch). It is plain Python
with no TensorFlow, so it can be checked in milliseconds; the execution code
(`tf_smdist.pipeline.execution`) turns it into TensorFlow ops chained with
control dependencies.

The clock table of a schedule comes from simulating the per-device orders with
every task taking one clock and a task starting as soon as its device is free
and its inputs are ready. For interleaved schedules a clock is the time of one
virtual stage (a `1/v` slice of a device's layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = [
    "SCHEDULES",
    "Schedule",
    "Task",
    "gpipe",
    "interleaved_1f1b",
    "make_schedule",
    "one_f_one_b",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclasses.dataclass(frozen=True, order=True)
class Task:
    """One unit of pipeline work: forward or backward of a stage on a micro-batch.

    Args:
        kind: `"F"` (forward) or `"B"` (backward).
        stage: the pipeline stage (a virtual stage for interleaved schedules),
            from 0.
        microbatch: the micro-batch, from 0.

    Example:
    >>> Task("F", 0, 1)
    F(s0,m1)
    """

    kind: str
    stage: int
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in ("F", "B"):
            raise ValueError(
                f"A task's kind must be 'F' or 'B'. Received: kind={self.kind!r}"
            )

    def __repr__(self) -> str:
        return f"{self.kind}(s{self.stage},m{self.microbatch})"


class Schedule:
    """An explicit pipeline schedule: each device's ordered list of tasks.

    Build one with `gpipe`, `one_f_one_b`, `interleaved_1f1b` or
    `make_schedule`. Stage `s` runs on device `s % num_devices`; without
    virtual stages that is device `s`.

    Args:
        name: the schedule's name, e.g. `"1f1b"`.
        num_devices: the number of devices `K`.
        num_microbatches: the number of micro-batches `M`.
        device_orders: for each device, its tasks in the order it runs them.
        virtual_stages: stages per device `v`. Defaults to `1`.

    Example:
    >>> s = one_f_one_b(2, 2)
    >>> s.device_orders[1]
    (F(s1,m0), B(s1,m0), F(s1,m1), B(s1,m1))
    >>> round(s.bubble_fraction, 4)  # (2 - 1) / (2 + 2 - 1)
    0.3333
    """

    def __init__(
        self,
        name: str,
        num_devices: int,
        num_microbatches: int,
        device_orders: Sequence[Sequence[Task]],
        *,
        virtual_stages: int = 1,
    ) -> None:
        self._name = name
        self._k = num_devices
        self._m = num_microbatches
        self._v = virtual_stages
        self._orders = tuple(tuple(o) for o in device_orders)
        if len(self._orders) != num_devices:
            raise ValueError(
                "A schedule needs one task order per device. Received: "
                f"{len(self._orders)} orders for num_devices={num_devices}."
            )
        for d, order in enumerate(self._orders):
            for t in order:
                if self.device_of(t.stage) != d:
                    raise ValueError(
                        f"Task {t!r} is listed on device {d}, but stage "
                        f"{t.stage} runs on device {self.device_of(t.stage)}."
                    )
        expected = {
            Task(kind, s, m)
            for kind in "FB"
            for s in range(self.num_stages)
            for m in range(num_microbatches)
        }
        listed = [t for o in self._orders for t in o]
        if len(listed) != len(set(listed)) or set(listed) != expected:
            raise ValueError(
                "A schedule must run the forward and backward of every "
                "(stage, micro-batch) exactly once. Received: "
                f"{len(listed)} tasks ({len(set(listed))} distinct), expected "
                f"{len(expected)}."
            )
        self._clocks = self._simulate()

    @property
    def name(self) -> str:
        """The schedule's name."""
        return self._name

    @property
    def num_devices(self) -> int:
        """The number of devices `K`."""
        return self._k

    @property
    def num_microbatches(self) -> int:
        """The number of micro-batches `M`."""
        return self._m

    @property
    def virtual_stages(self) -> int:
        """The number of stages per device `v`."""
        return self._v

    @property
    def num_stages(self) -> int:
        """The number of pipeline stages, `K * v`."""
        return self._k * self._v

    @property
    def device_orders(self) -> tuple[tuple[Task, ...], ...]:
        """Each device's tasks, in the order the device runs them."""
        return self._orders

    @property
    def clocks(self) -> tuple[tuple[Task | None, ...], ...]:
        """Per clock, the task each device runs (`None`: idle)."""
        return self._clocks

    def device_of(self, stage: int) -> int:
        """The device that runs `stage`."""
        return stage % self._k

    @staticmethod
    def dependencies(task: Task, num_stages: int) -> list[Task]:
        """The tasks whose results `task` consumes."""
        s, m = task.stage, task.microbatch
        if task.kind == "F":
            return [Task("F", s - 1, m)] if s > 0 else []
        deps = [Task("F", s, m)]
        if s < num_stages - 1:
            deps.append(Task("B", s + 1, m))
        return deps

    def _simulate(self) -> tuple[tuple[Task | None, ...], ...]:
        done: dict[Task, int] = {}
        pos = [0] * self._k
        clocks: list[tuple[Task | None, ...]] = []
        total = sum(len(o) for o in self._orders)
        while len(done) < total:
            row: list[Task | None] = []
            for d, order in enumerate(self._orders):
                task = order[pos[d]] if pos[d] < len(order) else None
                if task is not None and all(
                    done.get(dep, len(clocks)) < len(clocks)
                    for dep in self.dependencies(task, self.num_stages)
                ):
                    row.append(task)
                else:
                    row.append(None)
            if all(t is None for t in row):
                waiting = [o[p] for o, p in zip(self._orders, pos) if p < len(o)]
                raise ValueError(
                    "The schedule deadlocks: no device can run its next task. "
                    f"Received: next tasks {waiting}. Reorder the tasks so "
                    "each one's inputs are produced earlier."
                )
            for d, task in enumerate(row):
                if task is not None:
                    done[task] = len(clocks)
                    pos[d] += 1
            clocks.append(tuple(row))
        return tuple(clocks)

    def linear_order(self) -> list[Task]:
        """All tasks in clock order (device order within a clock).

        Every task comes after the tasks it depends on, so building the ops
        in this order never needs a value that does not exist yet.
        """
        return [t for row in self._clocks for t in row if t is not None]

    @property
    def bubble_fraction(self) -> float:
        """The idle share of the devices' time in the clock table."""
        busy = sum(len(o) for o in self._orders)
        return 1.0 - busy / (len(self._clocks) * self._k)

    def in_flight(self, stage: int) -> int:
        """The most micro-batches `stage` holds activations for at once.

        A micro-batch is in flight on a stage from the start of its forward
        to the end of its backward.
        """
        live = peak = 0
        for row in self._clocks:
            for t in row:
                if t is not None and t.stage == stage:
                    if t.kind == "F":
                        live += 1
                        peak = max(peak, live)
                    else:
                        live -= 1
        return peak

    def table(self) -> str:
        """The clock table as text: one row per device, one column per clock."""
        width = max(len(self._cell(t)) for r in self._clocks for t in r)
        lines = []
        for d in range(self._k):
            cells = [self._cell(row[d]).ljust(width) for row in self._clocks]
            lines.append(f"dev{d} | " + " ".join(cells).rstrip())
        return "\n".join(lines)

    def _cell(self, t: Task | None) -> str:
        if t is None:
            return "."
        if self._v == 1:
            return f"{t.kind}{t.microbatch}"
        return f"{t.kind}{t.microbatch}.{t.stage // self._k}"

    def __repr__(self) -> str:
        return (
            f"Schedule(name={self._name!r}, num_devices={self._k}, "
            f"num_microbatches={self._m}, virtual_stages={self._v}, "
            f"clocks={len(self._clocks)}, "
            f"bubble_fraction={self.bubble_fraction:.3f})"
        )


def _check(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe's fill-drain schedule: all forwards, then all backwards.

    Every stage keeps all `M` micro-batches' activations until the backward
    pass; the bubble is `(K - 1) / (M + K - 1)`. Stages `K = 3`,
    micro-batches `M = 4`:

    ```
    dev0 | F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
    dev1 | .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .
    dev2 | .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .
    ```

    Args:
        num_stages: the number of stages `K` (one per device).
        num_microbatches: the number of micro-batches `M`.

    Returns:
        The `Schedule`.

    Example:
    >>> round(gpipe(3, 4).bubble_fraction, 4)  # (3 - 1) / (4 + 3 - 1)
    0.3333
    """
    _check("num_stages", num_stages)
    _check("num_microbatches", num_microbatches)
    orders = [
        [Task("F", s, m) for m in range(num_microbatches)]
        + [Task("B", s, m) for m in range(num_microbatches)]
        for s in range(num_stages)
    ]
    return Schedule("gpipe", num_stages, num_microbatches, orders)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """PipeDream-Flush's 1F1B schedule: warm up, then alternate F and B.

    Stage `s` runs `min(K - s - 1, M)` forwards, then one forward and one
    backward in turn, then the remaining backwards. The bubble equals GPipe's,
    but stage `s` holds at most `min(K - s, M)` micro-batches' activations
    instead of `M`. `K = 3`, `M = 4`:

    ```
    dev0 | F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
    dev1 | .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .
    dev2 | .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .
    ```

    Args:
        num_stages: the number of stages `K` (one per device).
        num_microbatches: the number of micro-batches `M`.

    Returns:
        The `Schedule`.

    Example:
    >>> one_f_one_b(3, 4).in_flight(0)
    3
    """
    _check("num_stages", num_stages)
    _check("num_microbatches", num_microbatches)
    orders = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        order = [Task("F", s, m) for m in range(warmup)]
        for i in range(num_microbatches - warmup):
            order += [Task("F", s, warmup + i), Task("B", s, i)]
        order += [
            Task("B", s, m)
            for m in range(num_microbatches - warmup, num_microbatches)
        ]
        orders.append(order)
    return Schedule("1f1b", num_stages, num_microbatches, orders)


def interleaved_1f1b(
    num_devices: int, num_microbatches: int, virtual_stages: int = 2
) -> Schedule:
    """Megatron-LM's interleaved 1F1B: `v` non-adjacent stages per device.

    The model is cut into `K * v` stages; stage `s` runs on device `s % K`, so
    each device holds `v` slices of the model. Micro-batches move through the
    devices in groups of `K`. A clock is one stage's time, `1/v` of a device's
    layers, and the bubble shrinks to `(K - 1) / (v * M + K - 1)` of the
    time (`(K - 1) / (v * M)` of the useful time). Needs `M % K == 0`.
    `K = 2`, `M = 2`, `v = 2` (cells: micro-batch.slice):

    ```
    dev0 | F0.0 F1.0 F0.1 F1.1 .    .    B0.1 B1.1 B0.0 B1.0
    dev1 | .    F0.0 F1.0 F0.1 F1.1 B0.1 B1.1 B0.0 B1.0 .
    ```

    Args:
        num_devices: the number of devices `K`.
        num_microbatches: the number of micro-batches `M`, a multiple of `K`.
        virtual_stages: the number of stages per device `v`. Defaults to `2`.

    Returns:
        The `Schedule`.

    Example:
    >>> interleaved_1f1b(2, 4, 2).num_stages
    4
    """
    _check("num_devices", num_devices)
    _check("num_microbatches", num_microbatches)
    _check("virtual_stages", virtual_stages)
    k, m_total, v = num_devices, num_microbatches, virtual_stages
    if m_total % k:
        raise ValueError(
            "The interleaved schedule needs the number of micro-batches to be "
            f"a multiple of the number of devices. Received: "
            f"num_microbatches={m_total}, num_devices={k}. Use a multiple of "
            f"{k}, or the '1f1b' schedule."
        )
    total = m_total * v

    def task(kind: str, i: int) -> Task:
        chunk = (i % (k * v)) // k
        if kind == "B":
            chunk = v - 1 - chunk
        micro = (i // (k * v)) * k + i % k
        return Task(kind, chunk * k + d, micro)

    orders = []
    for d in range(k):
        if m_total == k:
            warmup = total
        else:
            warmup = min((k - d - 1) * 2 + (v - 1) * k, total)
        order = [task("F", i) for i in range(warmup)]
        for i in range(total - warmup):
            order += [task("F", warmup + i), task("B", i)]
        order += [task("B", i) for i in range(total - warmup, total)]
        orders.append(order)
    return Schedule("interleaved", k, m_total, orders, virtual_stages=v)


def make_schedule(
    name: str,
    num_devices: int,
    num_microbatches: int,
    *,
    virtual_stages: int = 2,
) -> Schedule:
    """Builds a schedule by name.

    Args:
        name: `"gpipe"`, `"1f1b"` or `"interleaved"`.
        num_devices: the number of devices `K`.
        num_microbatches: the number of micro-batches `M`.
        virtual_stages: stages per device for `"interleaved"`. Defaults to `2`.

    Returns:
        The `Schedule`.

    Example:
    >>> make_schedule("gpipe", 2, 4).num_stages
    2
    """
    if name == "gpipe":
        return gpipe(num_devices, num_microbatches)
    if name == "1f1b":
        return one_f_one_b(num_devices, num_microbatches)
    if name == "interleaved":
        return interleaved_1f1b(num_devices, num_microbatches, virtual_stages)
    raise ValueError(
        f"Unknown pipeline schedule. Received: schedule={name!r}. "
        f"Use one of {list(SCHEDULES)}."
    )
