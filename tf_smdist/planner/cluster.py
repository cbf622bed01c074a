"""The description of a cluster the planner plans for: `Cluster`."""

from __future__ import annotations

import math
import os
from typing import Any

from tf_smdist.pipeline.serialization import JsonSerializable, check_format_version

__all__ = ["Cluster"]

_FORMAT_VERSION = 1

# Fields: (name, kind); kind "count" is a positive int, "positive" a positive
# float, "nonneg" a float >= 0, "optional" a positive float or None.
_FIELDS = (
    ("nodes", "count"),
    ("devices_per_node", "count"),
    ("device_memory", "positive"),
    ("intra_node_bandwidth", "positive"),
    ("inter_node_bandwidth", "positive"),
    ("latency", "nonneg"),
    ("intra_node_latency", "optional_nonneg"),
    ("host_reduce_bandwidth", "positive"),
    ("device_host_bandwidth", "optional"),
    ("p2p_bandwidth", "optional"),
    ("p2p_latency", "optional_nonneg"),
    ("memory_bandwidth", "optional"),
    ("compute_scale", "positive"),
    ("compute_slots", "optional"),
    ("task_overhead", "nonneg"),
    ("overlap", "fraction"),
    ("bucket_bytes", "positive"),
)


class Cluster(JsonSerializable):
    """A cluster of identical nodes with identical devices, in SI units.

    Bytes, bytes per second and seconds throughout. A *device* is what runs
    one model replica's share: a GPU, or on a CPU-only machine one process.

    Args:
        nodes: Number of nodes (hosts).
        devices_per_node: Devices on each node.
        device_memory: Bytes of memory per device.
        intra_node_bandwidth: Bytes/s between two devices of one node (NVLink,
            PCIe, shared memory), as seen by a collective's ring step.
        inter_node_bandwidth: Bytes/s of one node's network link (each way).
        latency: Seconds per message between nodes (the α of the α-β
            model). Defaults to `10e-6`.
        intra_node_latency: Seconds per message inside a node. Defaults to
            `None` (same as `latency`).
        host_reduce_bandwidth: Bytes/s at which a node's CPUs sum buffers
            (bytes of input read). Defaults to `20e9`.
        device_host_bandwidth: Bytes/s of a device-to-host copy (PCIe).
            Defaults to `None` (no copy: the devices are host processes).
        p2p_bandwidth: Bytes/s of a point-to-point message between pipeline
            stages. Defaults to `None` (`intra_node_bandwidth`, or
            `inter_node_bandwidth` for stages on different nodes).
        p2p_latency: Seconds per point-to-point message. Defaults to `None`
            (`intra_node_latency` / `latency`).
        memory_bandwidth: Bytes/s of device memory, used to cost the
            optimizer update (it streams parameters, gradients and state).
            Defaults to `None` (the update is not costed).
        compute_scale: Multiplies the profile's measured layer times to
            give the target device's: `0.5` for a device twice as fast as
            the one profiled, `2.0` for a process that gets half a core.
            Defaults to `1.0`.
        compute_slots: How many devices of the whole cluster can compute at
            full speed at the same time, when they share compute (processes
            on a host's cores: the cores). A step then takes at least the
            devices' summed compute over `compute_slots`, so a pipeline
            stage idle in the bubble lends its core to the others.
            Defaults to `None` (every device computes on its own).
        task_overhead: Seconds of fixed cost per pipeline task (one forward
            or backward of one stage on one micro-batch): kernel launches,
            framework dispatch. Defaults to `0.0`.
        overlap: Share of the backward pass that gradient aggregation can
            run under (bucketing lets it start before backward ends): `1.0`
            when communication has its own engine (GPU + NIC), `0.0` when it
            competes with compute for the same core. Defaults to `1.0`.
        bucket_bytes: Bytes per gradient fusion bucket. Defaults to `25 MiB`
            (`DataParallelStrategy`'s `bucket_cap_mb=25`).

    Example:

    >>> cluster = smd.Cluster(nodes=64, devices_per_node=8, device_memory=80e9,
    ...                       intra_node_bandwidth=300e9,
    ...                       inter_node_bandwidth=12.5e9)
    >>> cluster.num_devices
    512
    >>> smd.Cluster.from_json(cluster.to_json()) == cluster
    True
    """

    def __init__(
        self,
        *,
        nodes: int,
        devices_per_node: int,
        device_memory: float,
        intra_node_bandwidth: float,
        inter_node_bandwidth: float,
        latency: float = 10e-6,
        intra_node_latency: float | None = None,
        host_reduce_bandwidth: float = 20e9,
        device_host_bandwidth: float | None = None,
        p2p_bandwidth: float | None = None,
        p2p_latency: float | None = None,
        memory_bandwidth: float | None = None,
        compute_scale: float = 1.0,
        compute_slots: float | None = None,
        task_overhead: float = 0.0,
        overlap: float = 1.0,
        bucket_bytes: float = 25 * 2**20,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        values = dict(locals())
        for name, kind in _FIELDS:
            values[name] = _check(name, kind, values[name])
        self._values = {name: values[name] for name, _ in _FIELDS}
        self._metadata = dict(metadata or {})

    # -- read-only properties ------------------------------------------------

    @property
    def nodes(self) -> int:
        """Number of nodes."""
        return self._values["nodes"]

    @property
    def devices_per_node(self) -> int:
        """Devices on each node."""
        return self._values["devices_per_node"]

    @property
    def num_devices(self) -> int:
        """All devices: `nodes * devices_per_node`."""
        return self.nodes * self.devices_per_node

    @property
    def device_memory(self) -> float:
        """Bytes of memory per device."""
        return self._values["device_memory"]

    @property
    def intra_node_bandwidth(self) -> float:
        """Bytes/s between two devices of one node."""
        return self._values["intra_node_bandwidth"]

    @property
    def inter_node_bandwidth(self) -> float:
        """Bytes/s of one node's network link."""
        return self._values["inter_node_bandwidth"]

    @property
    def latency(self) -> float:
        """Seconds per message between nodes."""
        return self._values["latency"]

    @property
    def intra_node_latency(self) -> float:
        """Seconds per message inside a node."""
        value = self._values["intra_node_latency"]
        return self.latency if value is None else value

    @property
    def host_reduce_bandwidth(self) -> float:
        """Bytes/s of input a node's CPUs sum."""
        return self._values["host_reduce_bandwidth"]

    @property
    def device_host_bandwidth(self) -> float | None:
        """Bytes/s of a device-to-host copy, or `None` (no copy needed)."""
        return self._values["device_host_bandwidth"]

    def p2p(self, across_nodes: bool) -> tuple[float, float]:
        """`(bandwidth, latency)` of a message between pipeline stages.

        Args:
            across_nodes: Whether the two stages are on different nodes.

        Returns:
            Bytes/s and seconds per message.

        Example:

        >>> cluster.p2p(across_nodes=False)
        (300000000000.0, 1e-05)
        """
        bandwidth = self._values["p2p_bandwidth"]
        latency = self._values["p2p_latency"]
        if bandwidth is None:
            bandwidth = (
                self.inter_node_bandwidth if across_nodes else self.intra_node_bandwidth
            )
        if latency is None:
            latency = self.latency if across_nodes else self.intra_node_latency
        return bandwidth, latency

    @property
    def memory_bandwidth(self) -> float | None:
        """Bytes/s of device memory for the optimizer update, or `None`."""
        return self._values["memory_bandwidth"]

    @property
    def compute_scale(self) -> float:
        """Target layer time / profiled layer time."""
        return self._values["compute_scale"]

    @property
    def compute_slots(self) -> float | None:
        """Devices that can compute at once, or `None` (all of them)."""
        return self._values["compute_slots"]

    @property
    def task_overhead(self) -> float:
        """Fixed seconds per pipeline task."""
        return self._values["task_overhead"]

    @property
    def overlap(self) -> float:
        """Share of the backward pass that aggregation can hide under."""
        return self._values["overlap"]

    @property
    def bucket_bytes(self) -> float:
        """Bytes per gradient fusion bucket."""
        return self._values["bucket_bytes"]

    @property
    def metadata(self) -> dict[str, Any]:
        """Free-form notes (for example what `calibrate` measured)."""
        return dict(self._metadata)

    def replace(self, **changes: Any) -> Cluster:
        """A copy with some fields changed.

        Args:
            **changes: Constructor arguments to change.

        Returns:
            The new `Cluster`.

        Example:

        >>> cluster.replace(nodes=2).num_devices
        16
        """
        values = dict(self._values, metadata=self._metadata)
        unknown = sorted(set(changes) - set(values))
        if unknown:
            raise TypeError(
                f"Unknown Cluster field(s) {unknown}. Received: {changes}. "
                f"Known fields: {sorted(values)}"
            )
        values.update(changes)
        return Cluster(**values)

    # -- JSON ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The cluster as plain JSON-compatible data.

        Returns:
            A dict; `Cluster.from_dict` inverts it.

        Example:

        >>> smd.Cluster.from_dict(cluster.to_dict()) == cluster
        True
        """
        return {
            "format_version": _FORMAT_VERSION,
            **self._values,
            "metadata": dict(self._metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cluster:
        """Rebuilds a cluster from `to_dict()` data (or hand-written JSON).

        Args:
            data: A dict as returned by `to_dict`; `format_version` and the
                fields with defaults may be left out.

        Returns:
            The `Cluster`.

        Example:

        >>> smd.Cluster.from_dict({"nodes": 1, "devices_per_node": 2,
        ...     "device_memory": 8e9, "intra_node_bandwidth": 5e9,
        ...     "inter_node_bandwidth": 1e9}).num_devices
        2
        """
        data = dict(data)
        if "format_version" in data:
            check_format_version(
                data,
                _FORMAT_VERSION,
                what="cluster",
                remedy="Describe the cluster again, or calibrate again.",
            )
        data.pop("format_version", None)
        known = {name for name, _ in _FIELDS} | {"metadata"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown field(s) {unknown} in cluster data. Received: "
                f"keys={sorted(data)}. Known fields: {sorted(known)}"
            )
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cluster):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, str(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
            for name, value in self._values.items()
            if value is not None
        )
        return f"Cluster({shown})"

    # -- calibration -------------------------------------------------------------

    @classmethod
    def calibrate(
        cls,
        processes: int = 2,
        path: str | os.PathLike | None = None,
        **options: Any,
    ) -> Cluster:
        """Measures this machine, with processes as devices, and describes it.

        Runs a short job of `processes` processes over the launcher
        (`python -m tf_smdist.launch`): point-to-point and all-reduce times
        over a sweep of message sizes, fitted by least squares to
        `α + n·β` (α: latency, 1/β: bandwidth); the host-reduce bandwidth of
        the `host_reduce` op; the memory bandwidth; and a matmul speed
        reference. See `tf_smdist.planner.calibrate.calibrate` for the
        options.

        Args:
            processes: Processes (devices) to measure between, at least 2.
                Defaults to `2`.
            path: Where to write the cluster's JSON (`Cluster.load` reads
                it). Defaults to `None` (not written).
            **options: Passed to `tf_smdist.planner.calibrate.calibrate`.

        Returns:
            The measured `Cluster` (one node of `processes` devices).

        Example:

        >>> local = smd.Cluster.calibrate(processes=2, path="local.json")
        >>> smd.Cluster.load("local.json") == local
        True
        """
        from tf_smdist.planner.calibrate import calibrate

        return calibrate(processes, path=path, **options)


def _check(name: str, kind: str, value: Any) -> Any:
    if kind.startswith("optional"):
        if value is None:
            return None
        kind = "nonneg" if kind == "optional_nonneg" else "positive"
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer. Received: {name}={value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}")
    value = float(value)
    bad = (
        not math.isfinite(value)
        or (kind == "positive" and value <= 0)
        or (kind in ("nonneg", "fraction") and value < 0)
        or (kind == "fraction" and value > 1)
    )
    if bad:
        need = {
            "positive": "a finite number > 0",
            "nonneg": "a finite number >= 0",
            "fraction": "between 0 and 1",
        }[kind]
        raise ValueError(
            f"`{name}` must be {need} (SI units: bytes, bytes/s, seconds). "
            f"Received: {name}={value!r}"
        )
    return value
