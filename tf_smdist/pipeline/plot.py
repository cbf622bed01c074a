"""Pictures and Chrome traces of pipeline schedules, planned and measured."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.pipeline.schedule import Schedule, Task

__all__ = ["Timeline", "plot_schedule", "trace_timeline"]

_TRANSFER_OPS = {"_Send", "_Recv", "_HostSend", "_HostRecv"}
_SCOPE = re.compile(r"^(?:gradient_tape/)?([FB])_s(\d+)_m(\d+)/")


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Measured start and end of every task of one pipelined step.

    Times are seconds from the step's first op. A task spans from its first
    op's start to its last op's end; `busy` sums its ops' own durations per
    device (the time the device computed).

    Attributes:
        schedule: the schedule that ran.
        spans: task -> (device, start, end).
        busy: per device, seconds spent running ops.
        ops: (device, op name, start, duration) of every op, for traces.

    Example:
    ```python
    timeline = smd.pipeline.trace_timeline(pipe, x, y)
    print(timeline.bubble_fraction)
    timeline.save_chrome_trace("pipeline_trace.json")
    ```
    """

    schedule: Schedule
    spans: dict[Task, tuple[int, float, float]]
    busy: tuple[float, ...]
    ops: tuple[tuple[int, str, float, float], ...]

    @property
    def duration(self) -> float:
        """Seconds from the first op to the last."""
        return max(end for _, _, end in self.spans.values())

    @property
    def bubble_fraction(self) -> float:
        """The measured idle share: `1 - sum(busy) / (K * duration)`."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.duration)

    def chrome_trace(self) -> dict[str, Any]:
        """The timeline as a Chrome trace (`chrome://tracing`, Perfetto).

        One process per device; a thread for tasks and one for ops.
        """
        events: list[dict[str, Any]] = []
        for d in range(self.schedule.num_devices):
            events.append(
                {"ph": "M", "name": "process_name", "pid": d,
                 "args": {"name": f"device {d}"}}
            )
        for task, (d, start, end) in sorted(
            self.spans.items(), key=lambda kv: kv[1][1]
        ):
            events.append({
                "ph": "X", "pid": d, "tid": 0, "name": repr(task),
                "cat": task.kind, "ts": start * 1e6,
                "dur": (end - start) * 1e6,
            })
        for d, name, start, dur in self.ops:
            events.append({
                "ph": "X", "pid": d, "tid": 1, "name": name, "cat": "op",
                "ts": start * 1e6, "dur": dur * 1e6,
            })
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_chrome_trace(self, path: str) -> None:
        """Writes `chrome_trace()` as JSON to `path`."""
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)


def trace_timeline(
    step: Callable[..., Any] | Any,
    *args: Any,
    schedule: Schedule | None = None,
    logdir: str | None = None,
) -> Timeline:
    """Runs one pipelined step under TensorFlow's profiler; returns its timeline.

    Args:
        step: a `PipelineModel` (its `compute_gradients` is traced and run on
            `*args`), or a `tf.function` running a pipeline.
        *args: the step's arguments, e.g. `x, y`.
        schedule: the schedule that `step` runs. Defaults to `None`: the
            `PipelineModel`'s.
        logdir: where the profiler writes. Defaults to `None`: a temporary
            directory, removed afterwards.

    Returns:
        The `Timeline`.

    Example:
    ```python
    timeline = smd.pipeline.trace_timeline(pipe, x_batch, y_batch)
    smd.plot_schedule(timeline, path="measured.png")
    ```
    """
    if hasattr(step, "compute_gradients"):
        schedule = schedule or step.pipeline_schedule
        step = tf.function(step.compute_gradients)
    if schedule is None:
        raise ValueError(
            "trace_timeline needs the schedule the step runs. Received: "
            "schedule=None with a plain function. Pass `schedule=`."
        )
    step(*args)  # trace and warm up outside the profile
    with tempfile.TemporaryDirectory() as tmp:
        logdir = logdir or tmp
        tf.profiler.experimental.start(logdir)
        try:
            step(*args)
        finally:
            tf.profiler.experimental.stop()
        paths = sorted(
            glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
            key=os.path.getmtime,
        )
        space = _compat.xplane_pb2().XSpace()
        with open(paths[-1], "rb") as f:
            space.ParseFromString(f.read())
    raw: list[tuple[Task, str, float, float]] = []
    for plane in space.planes:
        metadata = plane.event_metadata
        for line in plane.lines:
            base = line.timestamp_ns * 1e-9
            for event in line.events:
                name = metadata[event.metadata_id].name
                match = _SCOPE.match(name)
                if match is None:
                    continue
                kind, s, m = match.group(1), int(match.group(2)), int(match.group(3))
                if name.startswith("gradient_tape/"):
                    kind = "B"
                start = base + event.offset_ps * 1e-12
                raw.append((Task(kind, s, m), name, start, event.duration_ps * 1e-12))
    if not raw:
        raise RuntimeError(
            "The profile holds no pipeline task ops. Received: a step whose "
            "ops are not named F_s*_m* / B_s*_m*. Trace a PipelineModel step."
        )
    t0 = min(start for _, _, start, _ in raw)
    spans: dict[Task, tuple[int, float, float]] = {}
    busy = [0.0] * schedule.num_devices
    ops = []
    for task, name, start, dur in raw:
        d = schedule.device_of(task.stage)
        start -= t0
        ops.append((d, name, start, dur))
        if name.rsplit(":", 1)[-1] in _TRANSFER_OPS:
            continue  # the runtime's copies to other devices, not the task
        old = spans.get(task)
        spans[task] = (
            d,
            start if old is None else min(old[1], start),
            start + dur if old is None else max(old[2], start + dur),
        )
        busy[d] += dur
    return Timeline(schedule, spans, tuple(busy), tuple(ops))


def plot_schedule(
    schedule: Schedule | Timeline | Any,
    *,
    path: str | None = None,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draws a pipeline schedule per device: planned clocks or measured times.

    Forward tasks are light, backward tasks dark, each labelled with its
    micro-batch (and, for interleaved schedules, the model slice).

    Args:
        schedule: a `Schedule` (drawn in clocks), a `Timeline` (drawn in
            measured milliseconds), or a `PipelineModel` (its schedule).
        path: save the figure there (PNG, SVG, PDF by extension). Defaults to
            `None`.
        ax: a matplotlib axes to draw into. Defaults to `None`: a new figure.
        title: the title. Defaults to `None`: the schedule's name and bubble.

    Returns:
        The matplotlib figure.

    Example:
    >>> import tf_smdist as smd
    >>> from tf_smdist.pipeline.schedule import one_f_one_b
    >>> fig = smd.plot_schedule(one_f_one_b(4, 8))
    """
    try:
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "plot_schedule needs matplotlib. Received: no matplotlib module. "
            "Install it with `pip install matplotlib`."
        ) from e
    if hasattr(schedule, "pipeline_schedule"):
        schedule = schedule.pipeline_schedule
    if isinstance(schedule, Timeline):
        sched, unit = schedule.schedule, "ms"
        bars = {
            t: (d, start * 1e3, (end - start) * 1e3)
            for t, (d, start, end) in schedule.spans.items()
        }
        bubble = schedule.bubble_fraction
    else:
        sched, unit = schedule, "clock"
        bars = {
            t: (d, float(c), 1.0)
            for c, row in enumerate(sched.clocks)
            for d, t in enumerate(row)
            if t is not None
        }
        bubble = sched.bubble_fraction
    if ax is None:
        width = max(6.0, min(18.0, 0.35 * len(sched.clocks)))
        fig, ax = plt.subplots(figsize=(width, 0.6 * sched.num_devices + 1.2))
    else:
        fig = ax.figure
    cmap = plt.get_cmap("tab10")
    for task, (d, start, length) in bars.items():
        color = cmap(task.microbatch % 10)
        alpha = 0.45 if task.kind == "F" else 0.95
        ax.barh(d, length, left=start, height=0.8, color=color, alpha=alpha,
                edgecolor="black", linewidth=0.5)
        label = f"{task.kind}{task.microbatch}"
        if sched.virtual_stages > 1:
            label += f".{task.stage // sched.num_devices}"
        ax.text(start + length / 2, d, label, ha="center", va="center",
                fontsize=7)
    ax.set_yticks(range(sched.num_devices))
    ax.set_yticklabels([f"device {d}" for d in range(sched.num_devices)])
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(
        title
        or f"{sched.name}: K={sched.num_devices}, M={sched.num_microbatches}"
        f", bubble {bubble:.2f}"
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
