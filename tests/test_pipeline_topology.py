"""Process placement and message routing of pipelines in separate processes."""

from __future__ import annotations

import pytest

from tf_smdist.pipeline.routing import MAX_TAG, plan_transfers
from tf_smdist.pipeline.topology import Topology


def test_cluster_placement_of_8_processes_and_2_stages():
    topo = Topology(8, 2)
    assert topo.pipelines() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.dp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_spread_placement_of_8_processes_and_2_stages():
    topo = Topology(8, 2, placement="spread")
    assert topo.pipelines() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.dp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("placement", ["cluster", "spread"])
@pytest.mark.parametrize("world,stages", [(1, 1), (2, 2), (4, 2), (6, 3), (12, 4)])
def test_coordinates_are_a_bijection(placement, world, stages):
    seen = set()
    for rank in range(world):
        topo = Topology(world, stages, placement=placement, rank=rank)
        coords = (topo.stage_rank, topo.dp_rank)
        seen.add(coords)
        assert topo.rank_of(*coords) == rank
        assert topo.pipeline_ranks[topo.stage_rank] == rank
        assert topo.dp_group_ranks[topo.dp_rank] == rank
        assert topo.stage_size == stages and topo.dp_size == world // stages
    assert len(seen) == world


def test_this_process_coordinates():
    topo = Topology(8, 4, placement="spread", rank=5)
    assert (topo.stage_rank, topo.dp_rank) == (2, 1)
    assert topo.pipeline_ranks == [1, 3, 5, 7]
    assert topo.dp_group_ranks == [4, 5]
    assert "stage 2/4" in repr(topo)


def test_stages_must_divide_the_processes():
    with pytest.raises(ValueError, match=r"must divide the number of processes. "
                       r"Received: num_stages=3 with 4 processes"):
        Topology(4, 3)


@pytest.mark.parametrize("kwargs,match", [
    ({"placement": "ring"}, "Unknown placement"),
    ({"rank": 4}, r"`rank` must be in \[0, 4\)"),
])
def test_bad_topology_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(4, 2, **kwargs)


def test_skip_connection_travels_directly_to_its_consumer():
    # x -> a (stage 0) -> b (stage 1) -> c = f(a, b) (stage 2) -> d (stage 3)
    plan = plan_transfers(
        consumed=[["x"], ["a"], ["a", "b"], ["c", "x"]],
        produced=[["a"], ["b"], ["c"], ["d"]],
        model_inputs=["x"], model_outputs=["d"], num_microbatches=4)
    assert [(e.key, e.src, e.dst) for e in plan.edges] == [
        ("a", 0, 1), ("a", 0, 2), ("b", 1, 2), ("c", 2, 3)]
    assert [e.key for e in plan.incoming(2)] == ["a", "b"]
    assert [e.dst for e in plan.outgoing(0)] == [1, 2]
    assert plan.local_inputs(3) == ("x",)  # model inputs never travel
    assert plan.local_inputs(1) == ()


def test_model_output_of_an_earlier_stage_travels_to_the_last():
    plan = plan_transfers([["x"], ["a"]], [["a"], ["b"]], ["x"], ["a", "b"], 2)
    assert [(e.key, e.src, e.dst) for e in plan.edges] == [("a", 0, 1)]


def test_tags_are_unique_and_match_the_documented_formula():
    plan = plan_transfers([["x"], ["a"], ["a", "b"]], [["a"], ["b"], ["c"]],
                          ["x"], ["c"], 3)
    tags = [plan.tag(e, m, backward=b) for e in plan.edges for m in range(3)
            for b in (False, True)]
    assert len(set(tags)) == len(tags) == 18
    assert sorted(tags) == list(range(18))
    edge = plan.edges[2]
    assert plan.tag(edge, 1, backward=True) == 2 * (2 * 3 + 1) + 1


def test_too_many_tags_is_a_clear_error():
    keys = [f"t{i}" for i in range(600)]
    with pytest.raises(ValueError, match="Too many tensors cross"):
        plan_transfers([["x"], keys], [keys, ["y"]], ["x"], ["y"], 1000)
    assert 2 * 600 * 800 - 1 <= MAX_TAG
    plan_transfers([["x"], keys], [keys, ["y"]], ["x"], ["y"], 800)


def test_a_stage_reading_a_later_tensor_is_refused():
    with pytest.raises(ValueError, match="stage 1 computes later"):
        plan_transfers([["b"], ["x"]], [["a"], ["b"]], ["x"], ["b"], 2)
