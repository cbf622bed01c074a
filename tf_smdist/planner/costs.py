"""α-β costs of the collectives and messages a training step issues.

Every function returns seconds for `nbytes` bytes per participant, with
`bandwidth` in bytes/s and `latency` (α) in seconds per message. A message of
`n` bytes costs `α + n / bandwidth`.
"""

from __future__ import annotations

import math

__all__ = [
    "AGGREGATIONS",
    "host_sharded_allreduce",
    "hierarchical_allreduce",
    "num_buckets",
    "overlapped_aggregation",
    "pipelined",
    "point_to_point",
    "ring_allreduce",
]

AGGREGATIONS = ("ring", "hierarchical", "host_sharded")


def point_to_point(nbytes: float, bandwidth: float, latency: float) -> float:
    """Seconds to send `nbytes` from one device to another: `α + n/B`.

    Args:
        nbytes: Bytes sent.
        bandwidth: Bytes/s of the link.
        latency: Seconds per message.

    Returns:
        Seconds; `0.0` for an empty message.

    Example:

    >>> point_to_point(1e6, 1e9, 1e-5)
    0.00101
    """
    if nbytes <= 0:
        return 0.0
    return latency + nbytes / bandwidth


def ring_allreduce(
    nbytes: float, participants: int, bandwidth: float, latency: float
) -> float:
    """Seconds of a ring all-reduce: `2(p-1)/p · n/B + 2(p-1)·α`.

    A reduce-scatter then an all-gather, each `p - 1` steps that move `n/p`
    bytes over every link at once.

    Args:
        nbytes: Bytes each participant contributes.
        participants: Number of participants `p`.
        bandwidth: Bytes/s of the slowest link of the ring.
        latency: Seconds per step.

    Returns:
        Seconds; `0.0` for one participant or no bytes.

    Example:

    >>> ring_allreduce(4e6, 4, 1e9, 1e-5)  # 2*3/4*4e6/1e9 + 6e-5
    0.00606
    """
    p = participants
    if p <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (p - 1) / p * nbytes / bandwidth + 2 * (p - 1) * latency


def hierarchical_allreduce(
    nbytes: float,
    nodes: int,
    per_node: int,
    *,
    intra_bandwidth: float,
    intra_latency: float,
    inter_bandwidth: float,
    inter_latency: float,
    buckets: int = 1,
) -> float:
    """Seconds of a two-level all-reduce: inside nodes, then across them.

    A reduce-scatter among the node's `g` devices leaves each holding `n/g`
    bytes; the `g` devices of a node then all-reduce their shards with their
    peers on the other nodes (`g` rings sharing the node's link, so together
    they move `n` bytes per node); an all-gather inside the node completes it:
    `2(g-1)/g · n/B_intra + 2(g-1)α_intra + 2(N-1)/N · n/B_inter + 2(N-1)α`
    for one bucket. The two levels use different links, so over `k` buckets
    they pipeline: the slower level's time plus `1/k` of the other's.

    Args:
        nbytes: Bytes each device contributes.
        nodes: Nodes taking part `N`.
        per_node: Devices taking part on each node `g`.
        intra_bandwidth: Bytes/s between devices of a node.
        intra_latency: Seconds per message inside a node.
        inter_bandwidth: Bytes/s of a node's network link.
        inter_latency: Seconds per message between nodes.
        buckets: Buckets the bytes travel in `k`. Defaults to `1`.

    Returns:
        Seconds.

    Example:

    >>> hierarchical_allreduce(8e6, 2, 4, intra_bandwidth=1e10,
    ...     intra_latency=0.0, inter_bandwidth=1e9, inter_latency=0.0)
    0.0092
    """
    if nbytes <= 0:
        return 0.0
    g, n = per_node, nodes
    local = (
        2 * (g - 1) / g * nbytes / intra_bandwidth + 2 * (g - 1) * intra_latency
        if g > 1
        else 0.0
    )
    # g concurrent rings of n/g bytes share the node's link: n bytes per node.
    across = (
        2 * (n - 1) / n * nbytes / inter_bandwidth + 2 * (n - 1) * inter_latency
        if n > 1
        else 0.0
    )
    return pipelined((local, across), buckets)


def host_sharded_allreduce(
    nbytes: float,
    nodes: int,
    per_node: int,
    *,
    host_reduce_bandwidth: float,
    inter_bandwidth: float,
    inter_latency: float,
    device_host_bandwidth: float | None = None,
    buckets: int = 1,
) -> float:
    """Seconds of this project's aggregation: copy to host, sum there, exchange.

    Each device copies its `n` bytes to host memory (`n/B_pcie`, the
    devices' copies in parallel); the host sums the `g` local buffers
    (`g·n` bytes read at `host_reduce_bandwidth`; one buffer is still
    scaled, read once); the nodes all-reduce the
    sums over the network (a ring across `N` nodes); each device copies the
    result back. The four phases use different engines (the copy engine's
    two directions, the CPUs, the network), so over `k` buckets they
    pipeline: the slowest phase plus `1/k` of the others.

    Args:
        nbytes: Bytes each device contributes.
        nodes: Nodes taking part `N`.
        per_node: Devices taking part on each node `g`.
        host_reduce_bandwidth: Bytes/s of input the host sums.
        inter_bandwidth: Bytes/s of a node's network link.
        inter_latency: Seconds per message between nodes.
        device_host_bandwidth: Bytes/s of one device-to-host copy.
            Defaults to `None` (no copies: the devices are host processes).
        buckets: Buckets the bytes travel in `k`. Defaults to `1`.

    Returns:
        Seconds.

    Example:

    >>> host_sharded_allreduce(8e6, 2, 4, host_reduce_bandwidth=32e9,
    ...     inter_bandwidth=1e9, inter_latency=0.0, device_host_bandwidth=8e9)
    0.011
    """
    if nbytes <= 0:
        return 0.0
    copy = nbytes / device_host_bandwidth if device_host_bandwidth else 0.0
    local = per_node * nbytes / host_reduce_bandwidth
    across = ring_allreduce(nbytes, nodes, inter_bandwidth, inter_latency)
    return pipelined((copy, local, across, copy), buckets)


def pipelined(phases: tuple[float, ...], buckets: int) -> float:
    """Seconds of phases on different resources, pipelined over buckets.

    One bucket runs the phases one after another; `k` equal buckets keep
    every resource busy, so the whole takes the slowest phase plus `1/k` of
    the rest.

    Args:
        phases: Seconds of each phase for all the bytes.
        buckets: Number of buckets `k >= 1`.

    Returns:
        `max(phases) + (sum(phases) - max(phases)) / k`.

    Example:

    >>> pipelined((1.0, 3.0), 1), pipelined((1.0, 3.0), 4)
    (4.0, 3.25)
    """
    slowest = max(phases)
    return slowest + (sum(phases) - slowest) / max(1, int(buckets))


def overlapped_aggregation(
    aggregation_time: float, backward_time: float, buckets: int, overlap: float
) -> float:
    """Seconds the aggregation adds to a step after the backward pass.

    With the gradients in `buckets` buckets, bucket `i` is reduced as soon
    as the backward pass produced it, so backward and aggregation form a
    two-stage pipeline over the buckets: they end together after
    `max(T_b + T_a/k, T_b/k + T_a)`. Only the share `overlap` of the
    backward pass runs alongside communication (`0` on a core that does
    both), so the exposed time is that pipeline's length less the hidden
    backward share.

    Args:
        aggregation_time: Seconds of the whole aggregation `T_a`.
        backward_time: Seconds of the backward pass `T_b`.
        buckets: Number of fusion buckets `k >= 1`.
        overlap: Share of `T_b` that communication can run under, in [0, 1].

    Returns:
        Exposed seconds, `>= 0`.

    Example:

    >>> overlapped_aggregation(4.0, 8.0, 4, 1.0)  # max(8 + 1, 2 + 4) - 8
    1.0
    >>> overlapped_aggregation(4.0, 8.0, 4, 0.0)
    4.0
    """
    if aggregation_time <= 0:
        return 0.0
    k = max(1, int(buckets))
    hidden = overlap * backward_time
    both = max(hidden + aggregation_time / k, hidden / k + aggregation_time)
    return max(0.0, both - hidden)


def num_buckets(nbytes: float, bucket_bytes: float) -> int:
    """Fusion buckets for `nbytes` of gradients: `ceil(n / bucket_bytes)`.

    Example:

    >>> num_buckets(60e6, 25 * 2**20)
    3
    """
    return max(1, math.ceil(nbytes / bucket_bytes))
