"""Where each process sits in a job of pipelines × data-parallel groups (pure Python).

A job of `N` processes trains `K` pipeline stages (one process per stage) in
`D = N / K` pipelines that are data-parallel replicas of each other. Each
process has two coordinates: its stage (its rank inside its pipeline) and its
data-parallel rank (the pipeline it belongs to). `placement` says how world
ranks map to coordinates, with the model-parallel library's meaning:

```
N = 8, K = 2            "cluster" (default)         "spread"
pipelines               [0,1] [2,3] [4,5] [6,7]     [0,4] [1,5] [2,6] [3,7]
data-parallel groups    [0,2,4,6] [1,3,5,7]         [0,1,2,3] [4,5,6,7]
```

`"cluster"` keeps a pipeline on adjacent ranks (inside one host, where the
activations travel often) and spreads data parallelism across hosts;
`"spread"` does the opposite.
"""

from __future__ import annotations

__all__ = ["PLACEMENTS", "Topology"]

PLACEMENTS = ("cluster", "spread")


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return value


class Topology:
    """The coordinates of every process of a pipeline × data-parallel job.

    Args:
        world_size: the number of processes `N`.
        num_stages: the number of pipeline stages `K` (processes per
            pipeline); it must divide `world_size`.
        placement: `"cluster"` (a pipeline on adjacent ranks) or `"spread"`
            (a data-parallel group on adjacent ranks). Defaults to
            `"cluster"`.
        rank: this process's world rank. Defaults to `0`.

    Raises:
        ValueError: `num_stages` does not divide `world_size`, an unknown
            placement, or a rank outside the job.

    Example:
    >>> topo = Topology(8, 2, placement="spread", rank=5)
    >>> topo.stage_rank, topo.dp_rank
    (1, 1)
    >>> topo.pipeline_ranks, topo.dp_group_ranks
    ([1, 5], [4, 5, 6, 7])
    """

    def __init__(
        self,
        world_size: int,
        num_stages: int,
        *,
        placement: str = "cluster",
        rank: int = 0,
    ) -> None:
        _positive("world_size", world_size)
        _positive("num_stages", num_stages)
        if world_size % num_stages:
            raise ValueError(
                "The number of pipeline stages must divide the number of "
                f"processes. Received: num_stages={num_stages} with "
                f"{world_size} processes. Start a multiple of {num_stages} "
                "processes, or use a number of stages that divides "
                f"{world_size}."
            )
        if placement not in PLACEMENTS:
            raise ValueError(
                f"Unknown placement. Received: placement={placement!r}. Use "
                f"one of {list(PLACEMENTS)}."
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not (
            0 <= rank < world_size
        ):
            raise ValueError(
                f"`rank` must be in [0, {world_size}). Received: rank={rank!r}"
            )
        self._n = world_size
        self._k = num_stages
        self._d = world_size // num_stages
        self._placement = placement
        self._rank = rank
        self._stage, self._dp = self.coordinates(rank)

    # -- the whole job ------------------------------------------------------

    def rank_of(self, stage: int, dp_rank: int) -> int:
        """The world rank of stage `stage` in pipeline `dp_rank`.

        Example:
        >>> Topology(8, 2).rank_of(1, 3)
        7
        """
        if not (0 <= stage < self._k and 0 <= dp_rank < self._d):
            raise ValueError(
                f"Coordinates out of range. Received: stage={stage}, "
                f"dp_rank={dp_rank} for {self._k} stages and {self._d} "
                "data-parallel replicas."
            )
        if self._placement == "cluster":
            return dp_rank * self._k + stage
        return stage * self._d + dp_rank

    def coordinates(self, rank: int) -> tuple[int, int]:
        """`(stage, dp_rank)` of world rank `rank`.

        Example:
        >>> Topology(8, 2).coordinates(5)
        (1, 2)
        """
        if self._placement == "cluster":
            return rank % self._k, rank // self._k
        return rank // self._d, rank % self._d

    def pipelines(self) -> list[list[int]]:
        """Every pipeline's world ranks, in stage order, by data-parallel rank.

        Example:
        >>> Topology(8, 2).pipelines()
        [[0, 1], [2, 3], [4, 5], [6, 7]]
        """
        return [
            [self.rank_of(s, d) for s in range(self._k)] for d in range(self._d)
        ]

    def dp_groups(self) -> list[list[int]]:
        """Every stage's data-parallel group, in data-parallel rank order.

        Example:
        >>> Topology(8, 2).dp_groups()
        [[0, 2, 4, 6], [1, 3, 5, 7]]
        """
        return [
            [self.rank_of(s, d) for d in range(self._d)] for s in range(self._k)
        ]

    # -- this process ---------------------------------------------------------

    @property
    def world_size(self) -> int:
        """The number of processes `N`."""
        return self._n

    @property
    def rank(self) -> int:
        """This process's world rank."""
        return self._rank

    @property
    def placement(self) -> str:
        """`"cluster"` or `"spread"`."""
        return self._placement

    @property
    def stage_rank(self) -> int:
        """This process's stage: its rank inside its pipeline."""
        return self._stage

    @property
    def stage_size(self) -> int:
        """The number of stages `K` (processes per pipeline)."""
        return self._k

    @property
    def dp_rank(self) -> int:
        """This process's pipeline: its rank inside its data-parallel group."""
        return self._dp

    @property
    def dp_size(self) -> int:
        """The number of pipelines `D = N / K`."""
        return self._d

    @property
    def pipeline_ranks(self) -> list[int]:
        """The world ranks of this process's pipeline, in stage order."""
        return self.pipelines()[self._dp]

    @property
    def dp_group_ranks(self) -> list[int]:
        """The world ranks of this process's data-parallel group, in order."""
        return self.dp_groups()[self._stage]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return (self._n, self._k, self._placement, self._rank) == (
            other._n, other._k, other._placement, other._rank
        )

    def __hash__(self) -> int:
        return hash((self._n, self._k, self._placement, self._rank))

    def __repr__(self) -> str:
        return (
            f"Topology(world_size={self._n}, num_stages={self._k}, "
            f"placement={self._placement!r}, rank={self._rank}: "
            f"stage {self._stage}/{self._k}, dp {self._dp}/{self._d})"
        )
