"""Which tensors travel between pipeline stages, and their message tags (pure Python).

When each stage runs in its own process, every tensor a stage consumes but
does not compute travels to it as a point-to-point message from the stage
that computes it, and the tensor's gradient travels back. A skip connection
that crosses several stages travels directly from its producer to its
consumer (no stage in between forwards it). Model inputs are available in
every process and never travel.

Each (producer stage, tensor, consumer stage) is one *edge*, numbered in
the order of producer stage, then tensor production order, then consumer
stage. A message is tagged

```
tag = 2 * (edge * M + microbatch) + direction      (direction: 0 forward, 1 backward)
```

so tags are unique within a step, identical on both sides without any
negotiation, and below the transport's limit of `2**20` (checked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["Edge", "MAX_TAG", "TransferPlan", "plan_transfers"]

MAX_TAG = (1 << 20) - 1
MODEL_INPUT = -1


@dataclasses.dataclass(frozen=True)
class Edge:
    """One tensor travelling from the stage computing it to a stage consuming it.

    Attributes:
        index: the edge's number (see the module docstring for tags).
        key: the tensor's key in the model graph.
        src: the producing stage.
        dst: the consuming stage.

    Example:
    >>> Edge(0, "dense:0", 0, 1)
    Edge(index=0, key='dense:0', src=0, dst=1)
    """

    index: int
    key: str
    src: int
    dst: int


class TransferPlan:
    """Every stage's incoming and outgoing tensors and their message tags.

    Build one with `plan_transfers`.

    Args:
        edges: the edges, numbered from 0 in order.
        num_stages: the number of stages.
        num_microbatches: the number of micro-batches `M` per step.
        local_keys: per stage, the model inputs it reads locally.

    Example:
    >>> plan = plan_transfers([["x"], ["a"]], [["a"], ["b"]], ["x"], ["b"], 4)
    >>> plan.incoming(1), plan.tag(plan.incoming(1)[0], 3, backward=True)
    ([Edge(index=0, key='a', src=0, dst=1)], 7)
    """

    def __init__(
        self,
        edges: Sequence[Edge],
        num_stages: int,
        num_microbatches: int,
        local_keys: Sequence[Sequence[str]],
    ) -> None:
        self._edges = tuple(edges)
        self._k = num_stages
        self._m = num_microbatches
        self._local = tuple(tuple(k) for k in local_keys)
        top = 2 * len(self._edges) * num_microbatches - 1
        if top > MAX_TAG:
            raise ValueError(
                "Too many tensors cross the stage boundaries for the message "
                f"tags. Received: {len(self._edges)} tensor edges and "
                f"{num_microbatches} micro-batches need tags up to {top}, above "
                f"{MAX_TAG}. Use fewer micro-batches or fewer stages."
            )

    @property
    def edges(self) -> tuple[Edge, ...]:
        """All edges, in index order."""
        return self._edges

    @property
    def num_microbatches(self) -> int:
        """The number of micro-batches `M`."""
        return self._m

    def incoming(self, stage: int) -> list[Edge]:
        """The edges whose tensors `stage` receives, in index order."""
        return [e for e in self._edges if e.dst == stage]

    def outgoing(self, stage: int) -> list[Edge]:
        """The edges whose tensors `stage` sends, in index order."""
        return [e for e in self._edges if e.src == stage]

    def local_inputs(self, stage: int) -> tuple[str, ...]:
        """The model inputs `stage` reads from its own copy of the batch."""
        return self._local[stage]

    def tag(self, edge: Edge, microbatch: int, *, backward: bool = False) -> int:
        """The message tag of `edge`'s tensor (or its gradient) for a micro-batch.

        Example:
        >>> plan = plan_transfers([["x"], ["a"]], [["a"], ["b"]], ["x"], ["b"], 2)
        >>> plan.tag(plan.edges[0], 1)
        2
        """
        if not 0 <= microbatch < self._m:
            raise ValueError(
                f"`microbatch` must be in [0, {self._m}). Received: "
                f"microbatch={microbatch}"
            )
        return 2 * (edge.index * self._m + microbatch) + int(backward)

    def bytes_per_sample(self, sizes: dict[str, int]) -> int:
        """Bytes travelling forward per sample, given each key's bytes per sample."""
        return sum(sizes[e.key] for e in self._edges)

    def __repr__(self) -> str:
        return (
            f"TransferPlan(num_stages={self._k}, num_microbatches={self._m}, "
            f"edges={len(self._edges)})"
        )


def plan_transfers(
    consumed: Sequence[Sequence[str]],
    produced: Sequence[Sequence[str]],
    model_inputs: Sequence[str],
    model_outputs: Sequence[str],
    num_microbatches: int,
) -> TransferPlan:
    """Plans the messages between stages from what each stage reads and writes.

    Args:
        consumed: per stage, the tensor keys its operations read (keys it
            computes itself may be included; they are skipped).
        produced: per stage, the tensor keys it computes, in order.
        model_inputs: the model's input keys (read locally by any stage).
        model_outputs: the model's output keys; the last stage needs them
            all (those computed by earlier stages travel to it).
        num_microbatches: the number of micro-batches `M`.

    Returns:
        The `TransferPlan`.

    Raises:
        ValueError: a stage reads a tensor no earlier stage computes.

    Example:
    >>> # a -> b -> c with a skip from a to c
    >>> plan = plan_transfers([["x"], ["a"], ["a", "b"]], [["a"], ["b"], ["c"]],
    ...                       ["x"], ["c"], 2)
    >>> [(e.key, e.src, e.dst) for e in plan.edges]
    [('a', 0, 1), ('a', 0, 2), ('b', 1, 2)]
    """
    num_stages = len(produced)
    if len(consumed) != num_stages:
        raise ValueError(
            "`consumed` and `produced` need one entry per stage. Received: "
            f"{len(consumed)} and {num_stages} entries."
        )
    owner: dict[str, int] = {k: MODEL_INPUT for k in model_inputs}
    order: list[str] = []
    for s, keys in enumerate(produced):
        for k in keys:
            owner[k] = s
            order.append(k)
    needs: list[list[str]] = [list(dict.fromkeys(c)) for c in consumed]
    needs[-1] += [k for k in model_outputs if k not in needs[-1]]
    pairs: set[tuple[str, int]] = set()
    local: list[list[str]] = [[] for _ in range(num_stages)]
    for s, keys in enumerate(needs):
        for k in keys:
            src = owner.get(k)
            if src is None or src > s:
                raise ValueError(
                    f"Stage {s} reads tensor {k!r}, which "
                    + ("no stage computes" if src is None
                       else f"stage {src} computes later")
                    + ". Received: a partition that is not in the model's "
                    "data-flow order. Give each stage a contiguous slice of "
                    "the layer order."
                )
            if src == MODEL_INPUT:
                local[s].append(k)
            elif src != s:
                pairs.add((k, s))
    position = {k: i for i, k in enumerate(order)}
    ordered = sorted(pairs, key=lambda p: (owner[p[0]], position[p[0]], p[1]))
    edges = [Edge(i, k, owner[k], dst) for i, (k, dst) in enumerate(ordered)]
    return TransferPlan(edges, num_stages, num_microbatches, local)
