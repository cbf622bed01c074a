"""Process sets: collectives over a subset of the job's ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tf_smdist.horovod import basics, mpi_ops

__all__ = [
    "ProcessSet",
    "add_process_set",
    "global_process_set",
    "process_set_id_of",
    "remove_process_set",
]


class ProcessSet:
    """A subset of the job's ranks that collectives can run over.

    Create it on every rank with the same ranks, register it with
    `add_process_set` (or `init(process_sets=[...])`) in the same order on
    every rank, then pass `process_set=` to a collective. Only the member
    ranks call collectives on it.

    Args:
        ranks: the member ranks (sorted and de-duplicated). `None` is the
            whole job (only `global_process_set` uses it).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> evens = hvd.ProcessSet([0, 2])
    >>> evens.ranks
    [0, 2]
    """

    def __init__(self, ranks: Sequence[int] | None) -> None:
        if ranks is None:
            self._ranks: list[int] | None = None
        else:
            try:
                values = sorted({int(r) for r in ranks})
            except (TypeError, ValueError):
                raise TypeError(
                    "`ranks` must be a sequence of integers. "
                    f"Received: ranks={ranks!r}") from None
            if not values or values[0] < 0:
                raise ValueError(
                    "`ranks` must be non-empty, non-negative ranks. "
                    f"Received: ranks={ranks!r}")
            self._ranks = values
        self.process_set_id: int | None = 0 if ranks is None else None

    @property
    def ranks(self) -> list[int]:
        """The member ranks in order (every rank for the global set)."""
        if self._ranks is None:
            return list(range(basics.size()))
        return list(self._ranks)

    def size(self) -> int:
        """The number of member ranks.

        Example:
        >>> import tf_smdist.horovod as hvd
        >>> hvd.ProcessSet([0, 1]).size()
        2
        """
        return len(self.ranks)

    def rank(self) -> int:
        """This process's position among the members; -1 if not a member.

        Example:
        >>> import tf_smdist.horovod as hvd
        >>> hvd.init(); hvd.ProcessSet([0]).rank()
        0
        """
        me = basics.rank()
        ranks = self.ranks
        return ranks.index(me) if me in ranks else -1

    def included(self) -> bool:
        """Whether this process is a member.

        Example:
        >>> import tf_smdist.horovod as hvd
        >>> hvd.init(); hvd.global_process_set.included()
        True
        """
        return basics.rank() in self.ranks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProcessSet):
            return NotImplemented
        return self._ranks == other._ranks

    def __hash__(self) -> int:
        return hash(None if self._ranks is None else tuple(self._ranks))

    def __repr__(self) -> str:
        # Horovod's spelling; the global set lists the job's ranks once
        # initialised ([] before, as Horovod's does).
        if self._ranks is not None:
            ranks = self._ranks
        elif mpi_ops.is_engine_initialized():
            ranks = self.ranks
        else:
            ranks = []
        return (f"ProcessSet(process_set_id={self.process_set_id}, ranks={ranks}, "
                "mpi_comm=None)")


global_process_set = ProcessSet(None)


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Registers a process set with the engine; every rank calls it in order.

    Args:
        process_set: a `ProcessSet` or a list of ranks.

    Returns:
        The registered `ProcessSet` (its `process_set_id` is now set).

    Raises:
        ValueError: the set names a rank outside the job, or a set with the
            same ranks (the global set included) is registered already, as
            in Horovod.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> ps = hvd.add_process_set([0])  # doctest: +SKIP
    >>> ps.process_set_id > 0  # doctest: +SKIP
    True
    >>> hvd.remove_process_set(ps)  # doctest: +SKIP
    True
    """
    if not isinstance(process_set, ProcessSet):
        process_set = ProcessSet(process_set)
    if process_set.process_set_id is not None:
        raise ValueError(
            "This process set is registered already. Received: "
            f"process_set={process_set!r}. Register each ProcessSet object once.")
    world = basics.size()
    ranks = process_set.ranks
    if ranks[-1] >= world:
        raise ValueError(
            f"A process set may only name ranks of the job, in [0, {world}). "
            f"Received: ranks={ranks}. Start more processes or drop those ranks.")
    twin = _registered_id(ranks)
    if twin is not None:
        raise ValueError(
            "Attempted to add a duplicate process set: process set "
            f"{twin} has these ranks already. Received: ranks={ranks}. Use that set "
            "(hvd.global_process_set for every rank) or remove it first.")
    process_set.process_set_id = int(mpi_ops.add_process_set(ranks))
    return process_set


def _registered_id(ranks: Sequence[int]) -> int | None:
    """The id of the registered process set over exactly `ranks`, or None."""
    wanted = sorted({int(r) for r in ranks})
    for set_id, members in mpi_ops.process_set_table().items():
        if members == wanted:
            return set_id
    return None


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregisters a process set; every rank calls it in the same order.

    Args:
        process_set: a set returned by `add_process_set`.

    Returns:
        True if it was registered (and is removed now), False otherwise
        (also for the global set, which cannot be removed).

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init(); hvd.remove_process_set(hvd.ProcessSet([0]))
    False
    """
    set_id = process_set.process_set_id
    if set_id is None or set_id == 0:
        return False
    if set_id not in mpi_ops.process_set_table():
        process_set.process_set_id = None  # removed through another object
        return False
    mpi_ops.remove_process_set(set_id)
    process_set.process_set_id = None
    return True


def process_set_id_of(process_set: Any) -> int:
    """The engine's id of `process_set` (a `ProcessSet`; `None` is global).

    Raises:
        ValueError: the set was not registered with `add_process_set`.
        TypeError: `process_set` is not a `ProcessSet`.

    Example:
    >>> process_set_id_of(global_process_set)
    0
    """
    if process_set is None:
        return 0
    if not isinstance(process_set, ProcessSet):
        raise TypeError(
            "`process_set` must be a ProcessSet (hvd.global_process_set or one "
            f"from hvd.add_process_set). Received: process_set={process_set!r}")
    if process_set.process_set_id is None:
        raise ValueError(
            "This process set is not registered with the engine. Received: "
            f"process_set={process_set!r}. Call hvd.add_process_set(...) on every "
            "rank first (or pass it to hvd.init(process_sets=[...])).")
    return process_set.process_set_id
