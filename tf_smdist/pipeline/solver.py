"""Exact contiguous min-max partition of a layer sequence into pipeline stages."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["solve_partition"]

# A stage function maps (stage index s, candidate starts a[0..m), end b) to
# one value per candidate start: the stage cost of layers [a, b) on stage s.
StageFn = Callable[[int, np.ndarray, int], np.ndarray]


def _as_costs(values: Sequence[float], name: str, length: int | None) -> np.ndarray:
    """Validates a cost vector: 1-D, finite, non-negative, of `length`."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{name}` must be a sequence of numbers. Received: {name}={values!r}"
        ) from error
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be a flat sequence of numbers, one per layer. "
            f"Received: {name} with shape {array.shape}"
        )
    if length is not None and array.shape[0] != length:
        raise ValueError(
            f"`{name}` must have {length} entries, got {array.shape[0]}. "
            f"Received: len({name})={array.shape[0]}"
        )
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
    if bad.size:
        index = int(bad[0])
        value = float(array[index])
        raise ValueError(
            f"`{name}` must hold finite, non-negative numbers; entry {index} is "
            f"{value!r}. Received: {name}[{index}]={value!r}"
        )
    return array


def min_max_partition(
    num_layers: int,
    num_stages: int,
    stage_cost: StageFn,
    *,
    stage_fits: StageFn | None = None,
    broadcast: bool = False,
) -> tuple[float, list[int]]:
    """Splits `num_layers` layers into contiguous stages minimising the worst one.

    The dynamic programme is exact for any stage cost: `best[s][b]` is the
    smallest possible largest cost of splitting layers `[0, b)` into `s + 1`
    stages, and `best[s][b] = min_a max(best[s-1][a], stage_cost(s, a, b))` over
    the starts `a` whose stage `[a, b)` fits (`stage_fits(s, a, b)` true). It
    runs in O(num_stages * num_layers^2) cost evaluations, vectorised over `a`
    (and over `b` with `broadcast`).

    Args:
        num_layers: Number of layers, `n >= num_stages`.
        num_stages: Number of stages `K >= 1`.
        stage_cost: `stage_cost(s, a, b)` returns the cost of stage `s` holding
            layers `[a[i], b)`, one value per entry of the integer array `a`.
        stage_fits: Optional `stage_fits(s, a, b)` returning a boolean array,
            true where stage `s` may hold layers `[a[i], b)`. Defaults to `None`
            (every stage fits).
        broadcast: Whether `stage_cost` and `stage_fits` also take `a` as a
            column and `b` as a row of ints and return their broadcast
            shape (as `CostModel.stage_time` does); each stage is then one
            call for all its ends, with the same result. Defaults to
            `False`.

    Returns:
        `(bottleneck, stage_sizes)`; `bottleneck` is `math.inf` and
        `stage_sizes` empty when no split fits.

    Example:

    >>> min_max_partition(3, 2, lambda s, a, b: (b - a).astype(float))
    (2.0, [1, 2])
    """
    n, k_total = num_layers, num_stages
    best = np.full((k_total, n + 1), np.inf)
    choice = np.zeros((k_total, n + 1), dtype=np.int64)
    if broadcast:
        _fill_by_stage(best, choice, stage_cost, stage_fits)
    else:
        for s in range(k_total):
            # Stage s ends at b; it starts after s earlier stages of >= 1 layer each
            # and leaves >= 1 layer for each of the K - 1 - s later stages.
            for b in range(s + 1, n - (k_total - 1 - s) + 1):
                starts = np.arange(s, b) if s else np.zeros(1, dtype=np.int64)
                costs = np.asarray(stage_cost(s, starts, b), dtype=np.float64)
                if s:
                    costs = np.maximum(best[s - 1, starts], costs)
                if stage_fits is not None:
                    fits = np.asarray(stage_fits(s, starts, b), dtype=bool)
                    costs = np.where(fits, costs, np.inf)
                index = int(np.argmin(costs))
                best[s, b] = costs[index]
                choice[s, b] = starts[index]
    bottleneck = float(best[k_total - 1, n])
    if math.isinf(bottleneck):
        return bottleneck, []
    bounds = [n]
    for s in range(k_total - 1, 0, -1):
        bounds.append(int(choice[s, bounds[-1]]))
    bounds.append(0)
    bounds.reverse()
    return bottleneck, [bounds[i + 1] - bounds[i] for i in range(k_total)]


def _fill_by_stage(
    best: np.ndarray,
    choice: np.ndarray,
    stage_cost: StageFn,
    stage_fits: StageFn | None,
) -> None:
    """`min_max_partition`'s tables, one call per stage for all its ends.

    Starts form a column and ends a row; starts at or past their end are
    masked, so each end's first minimum is the one the per-end loop finds.
    """
    k_total, n = best.shape[0], best.shape[1] - 1
    for s in range(k_total):
        ends = np.arange(s + 1, n - (k_total - 1 - s) + 1)
        starts = np.arange(s, ends[-1])[:, None] if s else np.zeros((1, 1), np.int64)
        costs = np.asarray(stage_cost(s, starts, ends[None, :]), dtype=np.float64)
        costs = np.broadcast_to(costs, (starts.shape[0], ends.shape[0]))
        if s:
            costs = np.maximum(best[s - 1, starts], costs)
        if stage_fits is not None:
            fits = np.asarray(stage_fits(s, starts, ends[None, :]), dtype=bool)
            costs = np.where(fits, costs, np.inf)
        costs = np.where(starts < ends[None, :], costs, np.inf)
        index = np.argmin(costs, axis=0)
        best[s, ends] = costs[index, np.arange(ends.shape[0])]
        choice[s, ends] = starts[index, 0]


def solve_partition(
    compute_costs: Sequence[float],
    num_stages: int,
    *,
    cut_costs: Sequence[float] | None = None,
    memory_costs: Sequence[float] | None = None,
    memory_capacity: float | None = None,
) -> list[int]:
    """Splits a layer sequence into contiguous stages, minimising the slowest.

    A stage holding layers `[a, b)` of `n` costs
    `sum(compute_costs[a:b])`, plus `cut_costs[a - 1]` if `a > 0` (receiving
    the tensors that cross the cut before it) plus `cut_costs[b - 1]` if
    `b < n` (sending the tensors that cross the cut after it). The solver
    returns a split whose largest stage cost is the smallest possible, exactly
    (a dynamic programme over all contiguous splits, not a heuristic), subject
    to `sum(memory_costs[a:b]) <= memory_capacity` for every stage.

    Args:
        compute_costs: One non-negative cost per layer, in execution order
            (for example forward+backward seconds).
        num_stages: Number of stages, between 1 and `len(compute_costs)`.
        cut_costs: `len(compute_costs) - 1` non-negative costs; entry `i` is
            the cost of cutting between layer `i` and layer `i + 1` (for
            example the transfer time of the tensors live across that cut).
            Defaults to `None` (cuts are free).
        memory_costs: One non-negative memory cost per layer (for example
            bytes). Requires `memory_capacity`. Defaults to `None`.
        memory_capacity: The most memory one stage may hold. Requires
            `memory_costs`. Defaults to `None` (no memory limit).

    Returns:
        The stage sizes: `num_stages` positive ints summing to
        `len(compute_costs)`.

    Raises:
        ValueError: when `num_stages` exceeds the number of layers, when no split
            fits `memory_capacity` (the message names the tightest stage and
            its memory), or when an input is malformed.

    Example:

    >>> solve_partition([1, 1, 1, 1], 2)
    [2, 2]
    >>> solve_partition([1, 1, 1, 1], 2, cut_costs=[0, 10, 0])
    [1, 3]
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)):
        raise TypeError(
            f"`num_stages` must be an int. Received: num_stages={num_stages!r}"
        )
    compute = _as_costs(compute_costs, "compute_costs", None)
    n = compute.shape[0]
    if n == 0:
        raise ValueError(
            "`compute_costs` is empty: there are no layers to partition. "
            "Received: compute_costs=[]"
        )
    if num_stages < 1 or num_stages > n:
        raise ValueError(
            f"`num_stages` must be between 1 and the number of layers ({n}); "
            "every stage needs at least one layer. "
            f"Received: num_stages={num_stages}, len(compute_costs)={n}. "
            f"Use at most {n} stages, or a model with more layers."
        )
    cuts = (
        np.zeros(max(n - 1, 0))
        if cut_costs is None
        else _as_costs(cut_costs, "cut_costs", n - 1)
    )
    if (memory_costs is None) != (memory_capacity is None):
        given = "memory_costs" if memory_costs is not None else "memory_capacity"
        missing = "memory_capacity" if memory_costs is not None else "memory_costs"
        raise ValueError(
            f"`{given}` was given without `{missing}`; the memory limit needs "
            f"both. Received: memory_costs={memory_costs!r}, "
            f"memory_capacity={memory_capacity!r}. Pass both, or neither."
        )
    memory = None
    if memory_costs is not None:
        memory = _as_costs(memory_costs, "memory_costs", n)
        capacity = float(_as_costs([memory_capacity], "memory_capacity", 1)[0])

    prefix = np.concatenate([[0.0], np.cumsum(compute)])
    # Receiving cost before layer a (a > 0) and sending cost after layer b - 1.
    cut_in = np.concatenate([[0.0], cuts])  # index a
    cut_out = np.concatenate([cuts, [0.0]])  # index b - 1

    def stage_cost(s: int, a: np.ndarray, b: int) -> np.ndarray:
        del s
        return prefix[b] - prefix[a] + cut_in[a] + cut_out[b - 1]

    stage_fits = None
    if memory is not None:
        memory_prefix = np.concatenate([[0.0], np.cumsum(memory)])

        def stage_memory(s: int, a: np.ndarray, b: int) -> np.ndarray:
            del s
            return memory_prefix[b] - memory_prefix[a]

        def stage_fits(s: int, a: np.ndarray, b: int) -> np.ndarray:
            used = stage_memory(s, a, b)
            fits = used <= capacity
            # Prefix sums round; re-add the borderline stages exactly so the
            # check is sum(memory_costs[a:b]) <= memory_capacity.
            slack = 1e-9 * max(capacity, float(memory_prefix[-1]), 1.0)
            for i in np.flatnonzero(np.abs(used - capacity) <= slack):
                fits[i] = math.fsum(memory[int(a[i]) : b]) <= capacity
            return fits

    _, sizes = min_max_partition(n, int(num_stages), stage_cost, stage_fits=stage_fits)
    if sizes:
        return sizes
    # Infeasible: report the split with the smallest largest-stage memory.
    need, tight = min_max_partition(n, int(num_stages), stage_memory)
    bounds = np.concatenate([[0], np.cumsum(tight)]).astype(int)
    worst = max(
        range(num_stages),
        key=lambda s: math.fsum(memory[bounds[s] : bounds[s + 1]]),
    )
    biggest = int(np.argmax(memory))
    single = ""
    if memory[biggest] > capacity:
        single = f" Layer {biggest} alone needs {memory[biggest]:g}."
    raise ValueError(
        f"No split of {n} layers into {num_stages} stages fits "
        f"memory_capacity={capacity:g}: the split that needs the least memory, "
        f"stage sizes {tight}, still needs {need:g} on stage {worst} (layers "
        f"{bounds[worst]}..{bounds[worst + 1] - 1}).{single} "
        f"Received: memory_capacity={capacity:g}, num_stages={num_stages}. "
        "Use more stages, devices with more memory, or smaller layers."
    )
