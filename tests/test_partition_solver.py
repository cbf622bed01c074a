"""Tests for the exact min-max partition solver (pure Python, no TensorFlow)."""

import itertools
import math
import random

import numpy as np
import pytest

from tf_smdist.pipeline.solver import min_max_partition, solve_partition


def compositions(n, k):
    """Every way to write n as k positive ints, in order."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(k)]


def stage_costs(sizes, compute, cuts):
    n = len(compute)
    costs, a = [], 0
    for size in sizes:
        b = a + size
        cost = sum(compute[a:b])
        if a > 0:
            cost += cuts[a - 1]
        if b < n:
            cost += cuts[b - 1]
        costs.append(cost)
        a = b
    return costs


def stage_memory(sizes, memory):
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [sum(memory[bounds[i] : bounds[i + 1]]) for i in range(len(sizes))]


def brute_force(compute, k, cuts, memory=None, capacity=None):
    best = math.inf
    for sizes in compositions(len(compute), k):
        if memory is not None and max(stage_memory(sizes, memory)) > capacity:
            continue
        best = min(best, max(stage_costs(sizes, compute, cuts)))
    return best


def random_instance(rng, n):
    kind = rng.choice(["plain", "zeros", "dominant"])
    compute = [rng.randint(0, 20) for _ in range(n)]
    if kind == "zeros":
        compute = [c if rng.random() < 0.4 else 0 for c in compute]
    elif kind == "dominant":
        compute[rng.randrange(n)] = 1000
    cuts = [rng.randint(0, 15) for _ in range(n - 1)]
    return compute, cuts


def test_solver_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        compute, cuts = random_instance(rng, n)
        sizes = solve_partition(compute, k, cut_costs=cuts)
        assert len(sizes) == k and sum(sizes) == n and min(sizes) >= 1
        # Integer costs: the optimum is exact, so compare with ==.
        assert max(stage_costs(sizes, compute, cuts)) == brute_force(compute, k, cuts)


def test_solver_matches_brute_force_with_memory_limits():
    rng = random.Random(1)
    feasible = infeasible = 0
    for _ in range(300):
        n = rng.randint(2, 8)
        k = rng.randint(1, n)
        compute, cuts = random_instance(rng, n)
        memory = [rng.randint(0, 10) for _ in range(n)]
        capacity = rng.randint(5, 30)
        expected = brute_force(compute, k, cuts, memory, capacity)
        if math.isinf(expected):
            infeasible += 1
            with pytest.raises(ValueError, match="fits memory_capacity"):
                solve_partition(
                    compute,
                    k,
                    cut_costs=cuts,
                    memory_costs=memory,
                    memory_capacity=capacity,
                )
            continue
        feasible += 1
        sizes = solve_partition(
            compute, k, cut_costs=cuts, memory_costs=memory, memory_capacity=capacity
        )
        assert max(stage_memory(sizes, memory)) <= capacity
        assert max(stage_costs(sizes, compute, cuts)) == expected
    assert feasible > 50 and infeasible > 20


def test_solver_matches_brute_force_on_float_costs():
    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(2, 9))
        k = int(rng.integers(1, n + 1))
        compute = list(rng.exponential(1.0, n))
        cuts = list(rng.exponential(0.5, n - 1))
        sizes = solve_partition(compute, k, cut_costs=cuts)
        assert max(stage_costs(sizes, compute, cuts)) == pytest.approx(
            brute_force(compute, k, cuts), rel=1e-12
        )


def test_solver_takes_the_trade_off_around_a_huge_tensor():
    # Four equal layers on two devices; the tensor between layers 1 and 2 is
    # huge. The three partitions cost (worst stage):
    compute = [1.0, 1.0, 1.0, 1.5]
    cuts = [0.1, 5.0, 0.2]
    assert [max(stage_costs(s, compute, cuts)) for s in ([1, 3], [2, 2], [3, 1])] == [
        3.6,
        7.5,
        3.2,
    ]
    # The balanced split [2, 2] cuts the huge tensor; the solver avoids it.
    assert solve_partition(compute, 2, cut_costs=cuts) == [3, 1]
    # Without the transfer cost the balanced split is best.
    assert solve_partition(compute, 2) == [2, 2]


def test_solver_isolates_a_dominant_layer():
    compute = [1, 1, 100, 1, 1, 1]
    sizes = solve_partition(compute, 3)
    assert max(stage_costs(sizes, compute, [0] * 5)) == 100


def test_solver_handles_all_zero_costs():
    sizes = solve_partition([0, 0, 0, 0, 0], 3)
    assert len(sizes) == 3 and sum(sizes) == 5 and min(sizes) >= 1


def test_solver_one_stage_and_one_layer_per_stage():
    assert solve_partition([3, 1, 2], 1) == [3]
    assert solve_partition([3, 1, 2], 3) == [1, 1, 1]


def test_solver_memory_limit_forces_an_unbalanced_split():
    # Time alone wants [2, 2]; layer 0 and 1 together exceed the capacity.
    sizes = solve_partition(
        [1, 1, 1, 1], 2, memory_costs=[6, 5, 1, 1], memory_capacity=10
    )
    assert sizes == [1, 3]


def test_solver_memory_capacity_is_inclusive():
    assert solve_partition([1, 1], 1, memory_costs=[1, 2], memory_capacity=3) == [2]
    assert solve_partition(
        [1, 1, 1], 2, memory_costs=[0.25, 0.5, 0.25], memory_capacity=0.75
    ) in ([1, 2], [2, 1])


def test_solver_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match=r"num_stages=4, len\(compute_costs\)=3"):
        solve_partition([1, 2, 3], 4)


def test_solver_rejects_zero_stages():
    with pytest.raises(ValueError, match="num_stages=0"):
        solve_partition([1, 2, 3], 0)


def test_solver_rejects_non_int_stages():
    with pytest.raises(TypeError, match="num_stages=2.0"):
        solve_partition([1, 2, 3], 2.0)


def test_solver_memory_infeasible_names_stage_and_need():
    with pytest.raises(ValueError) as info:
        solve_partition([1, 1, 1], 2, memory_costs=[4, 9, 4], memory_capacity=8)
    message = str(info.value)
    assert "memory_capacity=8" in message
    assert "still needs 13" in message
    assert "Layer 1 alone needs 9" in message


def test_solver_rejects_negative_and_nan_costs():
    with pytest.raises(ValueError, match=r"compute_costs\[1\]=-1.0"):
        solve_partition([1, -1, 2], 2)
    with pytest.raises(ValueError, match=r"cut_costs\[0\]=nan"):
        solve_partition([1, 1, 2], 2, cut_costs=[float("nan"), 0])
    with pytest.raises(ValueError, match=r"memory_costs\[2\]=-3.0"):
        solve_partition([1, 1, 2], 2, memory_costs=[1, 1, -3], memory_capacity=5)


def test_solver_rejects_wrong_lengths():
    with pytest.raises(ValueError, match=r"len\(cut_costs\)=3"):
        solve_partition([1, 1, 2], 2, cut_costs=[0, 0, 0])
    with pytest.raises(ValueError, match=r"len\(memory_costs\)=2"):
        solve_partition([1, 1, 2], 2, memory_costs=[1, 1], memory_capacity=5)
    with pytest.raises(ValueError, match="compute_costs=\\[\\]"):
        solve_partition([], 1)


def test_solver_requires_memory_costs_and_capacity_together():
    with pytest.raises(ValueError, match="without `memory_capacity`"):
        solve_partition([1, 1], 1, memory_costs=[1, 1])
    with pytest.raises(ValueError, match="without `memory_costs`"):
        solve_partition([1, 1], 1, memory_capacity=3)


def test_min_max_partition_with_stage_dependent_costs():
    # Stage 0 runs twice as slow as stage 1: it should take fewer layers.
    def cost(s, a, b):
        return (b - a) * (2.0 if s == 0 else 1.0)

    assert min_max_partition(6, 2, cost) == (4.0, [2, 4])


def test_solver_is_fast_for_hundreds_of_layers():
    rng = np.random.default_rng(3)
    compute = rng.exponential(1.0, 400)
    sizes = solve_partition(compute, 8, cut_costs=rng.exponential(0.1, 399))
    assert sum(sizes) == 400 and len(sizes) == 8


def test_broadcast_gives_the_loops_result():
    # Stage-dependent costs and limits, ties included (integer costs): one
    # call per stage over every end returns what one call per end returns.
    rng = np.random.default_rng(5)
    for _ in range(60):
        n = int(rng.integers(1, 12))
        k = int(rng.integers(1, n + 1))
        prefix = np.concatenate([[0], np.cumsum(rng.integers(0, 4, n))])
        cut = np.concatenate([rng.integers(0, 3, n), [0]])
        scale = rng.integers(1, 3, k)
        limit = int(rng.integers(1, 12))

        def cost(s, a, b, prefix=prefix, cut=cut, scale=scale):
            return scale[s] * (prefix[b] - prefix[a]) + cut[b - 1] + cut[a]

        def fits(s, a, b, limit=limit):
            return b - a <= limit + s

        for stage_fits in (None, fits):
            loop = min_max_partition(n, k, cost, stage_fits=stage_fits)
            once = min_max_partition(n, k, cost, stage_fits=stage_fits,
                                     broadcast=True)
            assert once == loop
