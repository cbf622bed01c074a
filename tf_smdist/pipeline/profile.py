"""The profile data model: per-layer costs of a model, as plain data.

`LayerProfile` and `Profile` (with their JSON form) and the text-table
helpers the profile and partition reports share. No TensorFlow or Keras:
planning code (`cost_model`, `partition`, the planner) imports this module
without starting TensorFlow; measuring lives in `profiler.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from tf_smdist.pipeline.serialization import JsonSerializable, check_format_version

__all__ = ["LayerProfile", "Profile", "format_bytes", "format_table"]

_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """What one layer of a model costs, as measured by `profile_model`.

    Args:
        name: The layer's unique name in the flattened model (`outer/inner`
            for layers of nested models).
        class_name: The layer's class name, for example `"Dense"`.
        inputs: Keys of the tensors it consumes (`"<producer>:<index>"`).
        time: Forward+backward seconds for `Profile.batch_size` samples
            (median of the timed repeats, call overhead removed).
        param_bytes: Bytes of the variables it owns (trainable and not);
            variables shared with an earlier layer count there only.
        trainable_bytes: Bytes of its trainable variables (and so of their
            gradients).
        optimizer_bytes: Bytes of optimizer state for its trainable variables.
        output_bytes: Bytes per sample of its outputs.
        live_bytes: Bytes per sample of every tensor live across the cut right
            after this layer (skip connections included).
        is_layer: Whether it is a `keras.layers.Layer`; `False` for a bare
            operation of a functional model (such as `x + y`). Defaults to
            `True`.

    Example:

    >>> layer = profile.layers[0]
    >>> layer.name, layer.param_bytes, layer.output_bytes  # Dense(32) of 32
    ('dense', 4224, 128)
    """

    name: str
    class_name: str
    inputs: tuple[str, ...]
    time: float
    param_bytes: int
    trainable_bytes: int
    optimizer_bytes: int
    output_bytes: int
    live_bytes: int
    is_layer: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))


class Profile(JsonSerializable):
    """Per-layer costs of a model, in topological order; JSON serialisable.

    Build one with `profile_model` (or `ProfilingCallback` during `fit`), then
    pass it to `smd.partition`. Layers appear in the order of
    `tf_smdist.pipeline.graph.flatten_model(model)`: nested Sequential and
    functional models are expanded.

    Args:
        layers: The `LayerProfile`s, in topological order.
        batch_size: The batch size the times were measured at.
        input_bytes: Bytes per sample of the model's inputs.
        device_kind: Kind of device measured on (`"CPU"`, `"GPU"`).
            Defaults to `"CPU"`.
        optimizer: Name of the optimizer class whose state was counted, or
            `None`. Defaults to `None`.
        model_name: Name of the profiled model. Defaults to `""`.
        call_overhead: Seconds of one empty `tf.function` call, subtracted
            from each layer's time. Defaults to `0.0`.

    Example:

    >>> profile = smd.profile_model(model, x[:32])
    >>> print(profile)            # a table, one row per layer
    Profile of ...: 5 layers, batch 32 on CPU, ...
    >>> profile.save("profile.json")
    >>> smd.Profile.load("profile.json") == profile
    True
    """

    def __init__(
        self,
        layers: Sequence[LayerProfile],
        *,
        batch_size: int,
        input_bytes: int,
        device_kind: str = "CPU",
        optimizer: str | None = None,
        model_name: str = "",
        call_overhead: float = 0.0,
    ) -> None:
        layers = tuple(layers)
        if not layers:
            raise ValueError("A Profile needs at least one layer. Received: layers=()")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise ValueError(
                f"Layer names in a Profile must be unique; {duplicate!r} repeats. "
                f"Received: layer names={names}"
            )
        if batch_size < 1:
            raise ValueError(
                f"`batch_size` must be positive. Received: batch_size={batch_size}"
            )
        self._layers = layers
        self._batch_size = int(batch_size)
        self._input_bytes = int(input_bytes)
        self._device_kind = device_kind
        self._optimizer = optimizer
        self._model_name = model_name
        self._call_overhead = float(call_overhead)

    @property
    def layers(self) -> tuple[LayerProfile, ...]:
        """The per-layer profiles, in topological order."""
        return self._layers

    @property
    def layer_names(self) -> list[str]:
        """The layer names, in topological order."""
        return [layer.name for layer in self._layers]

    @property
    def batch_size(self) -> int:
        """The batch size the layer times were measured at."""
        return self._batch_size

    @property
    def input_bytes(self) -> int:
        """Bytes per sample of the model's inputs."""
        return self._input_bytes

    @property
    def device_kind(self) -> str:
        """The kind of device the profile was measured on."""
        return self._device_kind

    @property
    def optimizer(self) -> str | None:
        """Name of the optimizer whose state bytes were counted."""
        return self._optimizer

    @property
    def model_name(self) -> str:
        """Name of the profiled model."""
        return self._model_name

    @property
    def call_overhead(self) -> float:
        """Seconds of an empty `tf.function` call (removed from layer times)."""
        return self._call_overhead

    @property
    def total_time(self) -> float:
        """Sum of the layers' forward+backward seconds."""
        return math.fsum(layer.time for layer in self._layers)

    @property
    def param_bytes(self) -> int:
        """Bytes of all the model's variables."""
        return sum(layer.param_bytes for layer in self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, index: int) -> LayerProfile:
        return self._layers[index]

    def index(self, name: str) -> int:
        """Position of the layer called `name`.

        Args:
            name: A layer name of this profile.

        Returns:
            Its index in `layers`.

        Example:

        >>> profile.index("dense_1")
        1
        """
        for position, layer in enumerate(self._layers):
            if layer.name == name:
                return position
        raise ValueError(
            f"No layer named {name!r} in this profile. Received: name={name!r}. "
            f"Known layers: {self.layer_names}"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Profile):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        total = self.total_time or 1.0
        rows = [
            (
                str(i),
                layer.name,
                layer.class_name,
                f"{layer.time * 1e3:.3f}",
                f"{100 * layer.time / total:.1f}",
                format_bytes(layer.param_bytes),
                format_bytes(layer.optimizer_bytes),
                format_bytes(layer.output_bytes),
                format_bytes(layer.live_bytes),
            )
            for i, layer in enumerate(self._layers)
        ]
        header = (
            "#",
            "layer",
            "class",
            "time ms",
            "time %",
            "params",
            "opt state",
            "out/sample",
            "live/sample",
        )
        title = (
            f"Profile of {self._model_name or 'model'}: {len(self)} layers, "
            f"batch {self._batch_size} on {self._device_kind}, "
            f"total {self.total_time * 1e3:.3f} ms, "
            f"params {format_bytes(self.param_bytes)}, "
            f"optimizer {self._optimizer}"
        )
        return title + "\n" + format_table(header, rows)

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-compatible data.

        Returns:
            A dict; `Profile.from_dict` inverts it.

        Example:

        >>> smd.Profile.from_dict(profile.to_dict()) == profile
        True
        """
        return {
            "format_version": _FORMAT_VERSION,
            "model_name": self._model_name,
            "batch_size": self._batch_size,
            "input_bytes": self._input_bytes,
            "device_kind": self._device_kind,
            "optimizer": self._optimizer,
            "call_overhead": self._call_overhead,
            "layers": [
                dict(dataclasses.asdict(layer), inputs=list(layer.inputs))
                for layer in self._layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Rebuilds a profile from `to_dict()` data.

        Args:
            data: A dict as returned by `to_dict`.

        Returns:
            The `Profile`.

        Example:

        >>> smd.Profile.from_dict(profile.to_dict())
        Profile of ...
        """
        check_format_version(
            data, _FORMAT_VERSION, what="profile", remedy="Profile the model again."
        )
        return cls(
            [LayerProfile(**layer) for layer in data["layers"]],
            batch_size=data["batch_size"],
            input_bytes=data["input_bytes"],
            device_kind=data["device_kind"],
            optimizer=data["optimizer"],
            model_name=data["model_name"],
            call_overhead=data["call_overhead"],
        )


def format_bytes(count: float) -> str:
    """A byte count as text in B, KiB, MiB or GiB.

    Args:
        count: The number of bytes.

    Returns:
        The text, such as `"1.5 KiB"`.

    Example:

    >>> format_bytes(1536)
    '1.5 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows of text cells as an aligned table with a rule under the header.

    Columns 1 and 2 (names) are left-aligned, the others (numbers) right-aligned.

    Args:
        header: The column titles.
        rows: The cells of each row, one per column.

    Returns:
        The table text, one line per row.

    Example:

    >>> print(format_table(("#", "layer"), [("0", "dense")]))
    #  layer
    -  -----
    0  dense
    """
    widths = [
        max(len(header[c]), *(len(row[c]) for row in rows)) if rows else len(header[c])
        for c in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if c in (1, 2) else cell.rjust(width)
            for c, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
