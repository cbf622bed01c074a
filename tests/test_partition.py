"""Tests for the cost model, `smd.partition` and `smd.Partition`."""

import keras
import numpy as np
import pytest

import tf_smdist as smd
from tf_smdist.pipeline import solve_partition
from tf_smdist.pipeline.cost_model import CostModel, in_flight_microbatches
from tf_smdist.pipeline.profile import LayerProfile, Profile
from tf_smdist.pipeline.schedule import make_schedule


def make_profile(times, *, live=None, params=None, outputs=None, ops=(), batch=8):
    n = len(times)
    live = live or [100] * n
    params = params or [1000] * n
    outputs = outputs or [50] * n
    layers = [
        LayerProfile(
            name=f"l{i}",
            class_name="Dense",
            inputs=(f"l{i - 1}:0",) if i else ("x:0",),
            time=times[i],
            param_bytes=params[i],
            trainable_bytes=params[i],
            optimizer_bytes=2 * params[i],
            output_bytes=outputs[i],
            live_bytes=live[i],
            is_layer=i not in ops,
        )
        for i in range(n)
    ]
    return Profile(layers, batch_size=batch, input_bytes=40, device_kind="CPU")


def test_in_flight_microbatches_per_schedule():
    assert [in_flight_microbatches(s, 4, 8, "gpipe") for s in range(4)] == [8] * 4
    assert [in_flight_microbatches(s, 4, 8, "1f1b") for s in range(4)] == [4, 3, 2, 1]
    assert [in_flight_microbatches(s, 4, 2, "1f1b") for s in range(4)] == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="schedule='zigzag'"):
        in_flight_microbatches(0, 2, 2, "zigzag")


def test_in_flight_is_the_schedules_own_count():
    # 8 virtual stages on 4 devices: not what 1F1B over 8 stages holds.
    counts = [
        in_flight_microbatches(s, 8, 8, "interleaved", virtual_stages=2)
        for s in range(8)
    ]
    assert counts == [8, 8, 7, 5, 4, 4, 3, 1]
    plan = make_schedule("interleaved", 4, 8, virtual_stages=2)
    assert counts == [plan.in_flight(s) for s in range(8)]
    assert [in_flight_microbatches(s, 8, 8, "1f1b") for s in range(8)] == [
        8, 7, 6, 5, 4, 3, 2, 1
    ]
    with pytest.raises(ValueError, match="virtual_stages=3"):
        in_flight_microbatches(0, 8, 8, "interleaved", virtual_stages=3)


def test_interleaved_memory_adds_up_a_devices_chunks():
    profile = make_profile([1.0] * 8, outputs=[100] * 8, params=[10] * 8)
    model = CostModel(
        profile, 4, microbatches=4, schedule="interleaved", virtual_stages=2
    )
    estimates = model.estimate([2, 2, 2, 2])
    assert [e.in_flight for e in estimates] == [4, 3, 2, 1]
    # Device 0 holds stages 0 and 2, device 1 stages 1 and 3.
    assert model.device_memory(estimates) == [
        estimates[0].memory + estimates[2].memory,
        estimates[1].memory + estimates[3].memory,
    ]
    capacity = max(model.device_memory(estimates)) * 1.5
    part = smd.partition(
        profile, 4, microbatches=4, schedule="interleaved", memory_capacity=capacity
    )
    assert part.settings["virtual_stages"] == 2
    assert len(part.device_memory) == 2
    assert all(m <= capacity for m in part.device_memory)
    assert "2 stages per device" in part.report()


def test_cost_model_estimates_are_exact():
    profile = make_profile([0.4, 0.2, 0.6], live=[10, 20, 30], batch=8)
    model = CostModel(profile, 2, microbatches=4, bandwidth=100.0, schedule="gpipe")
    # Micro-batches of 2 samples: times scale by 2 / 8.
    first, second = model.estimate([2, 1])
    assert first.compute_time == pytest.approx((0.4 + 0.2) / 4)
    # The cut after l1 carries 20 bytes/sample x 2 samples, both ways.
    assert first.transfer_time == pytest.approx(2 * 40 / 100.0)
    assert second.transfer_time == pytest.approx(2 * 40 / 100.0)
    assert first.activations_out == second.activations_in == 40
    assert first.param_bytes == 2000
    assert first.static_bytes == 2 * (1000 + 1000 + 2000)
    # Outputs of its layers plus what it receives (model input here).
    assert first.activation_bytes == 2 * (50 + 50) + 2 * 40
    assert second.activation_bytes == 2 * 50 + 40
    assert first.in_flight == second.in_flight == 4
    assert first.memory == first.static_bytes + 4 * first.activation_bytes


def test_partition_speed_matches_the_solver():
    rng = np.random.default_rng(0)
    times = list(rng.exponential(1e-3, 12))
    live = [int(v) for v in rng.integers(1, 10**6, 12)]
    profile = make_profile(times, live=live)
    model = CostModel(profile, 3)
    part = smd.partition(profile, 3)
    assert part.stage_sizes == solve_partition(
        model.compute_costs, 3, cut_costs=model.cut_costs
    )
    assert part.bottleneck == pytest.approx(max(part.stage_times))


def test_partition_avoids_cutting_a_huge_tensor():
    # Balanced by time, [2, 2] would cut after l1, where a huge tensor lives.
    profile = make_profile([1e-3, 1e-3, 1e-3, 1e-3], live=[10, 10**9, 10, 10], batch=1)
    assert smd.partition(profile, 2, bandwidth=1e15).stage_sizes == [2, 2]
    part = smd.partition(profile, 2, bandwidth=1e10)
    assert part.stage_sizes in ([1, 3], [3, 1])
    assert part.bottleneck < 3.1e-3


def test_optimize_memory_balances_memory():
    # Parameters are all in the last layer; time is even.
    profile = make_profile([1.0] * 6, params=[10, 10, 10, 10, 10, 10**6])
    speed = smd.partition(profile, 2, optimize="speed")
    memory = smd.partition(profile, 2, optimize="memory")
    assert speed.stage_sizes == [3, 3]
    assert memory.stage_sizes == [5, 1]
    assert max(memory.stage_memory) <= max(speed.stage_memory)
    assert memory.bottleneck > speed.bottleneck


def test_memory_capacity_shapes_the_speed_split():
    profile = make_profile([1.0] * 4, params=[10**5, 10**5, 10, 10])
    free = smd.partition(profile, 2)
    assert free.stage_sizes == [2, 2]
    capacity = 5 * 10**5  # Two big layers need 8e5 of static memory.
    bound = smd.partition(profile, 2, memory_capacity=capacity)
    assert bound.stage_sizes == [1, 3]
    assert all(m <= capacity for m in bound.stage_memory)


def test_gpipe_needs_more_memory_than_1f1b():
    profile = make_profile([1.0] * 4, outputs=[1000] * 4)
    gpipe = smd.partition(profile, 2, microbatches=8, schedule="gpipe", batch_size=64)
    one_f = smd.partition(profile, 2, microbatches=8, schedule="1f1b", batch_size=64)
    assert [e.in_flight for e in gpipe.estimates] == [8, 8]
    assert [e.in_flight for e in one_f.estimates] == [2, 1]
    assert gpipe.stage_memory[0] > one_f.stage_memory[0]


def test_infeasible_memory_names_the_stage_and_bytes():
    profile = make_profile([1.0] * 3, params=[1000, 5000, 1000])
    with pytest.raises(ValueError) as info:
        smd.partition(profile, 2, memory_capacity=2000)
    message = str(info.value)
    assert "No split into 2 stages fits memory_capacity" in message
    assert "on stage" in message and "KiB" in message
    assert "Received: memory_capacity=" in message


def test_per_stage_memory_capacity():
    profile = make_profile([1.0] * 4, params=[100] * 4)
    part = smd.partition(profile, 2, memory_capacity=[10**6, 2000])
    assert part.stage_sizes == [3, 1]
    with pytest.raises(ValueError, match="one per stage"):
        smd.partition(profile, 2, memory_capacity=[1e6, 1e6, 1e6])


def test_manual_stage_sizes_and_split_points():
    profile = make_profile([1.0] * 5)
    by_sizes = smd.partition(profile, 2, stage_sizes=[1, 4])
    by_names = smd.partition(profile, 2, split_points=["l1"])
    assert by_sizes.stage_sizes == by_names.stage_sizes == [1, 4]
    assert by_names.stage_layer_names == [["l0"], ["l1", "l2", "l3", "l4"]]
    assert by_sizes.settings["manual"] is True
    with pytest.raises(ValueError, match=r"stage_sizes=\[2, 2\] \(sum 4\)"):
        smd.partition(profile, 2, stage_sizes=[2, 2])
    with pytest.raises(ValueError, match="increasing topological order"):
        smd.partition(profile, 3, split_points=["l3", "l1"])
    with pytest.raises(ValueError, match="No layer named 'nope'"):
        smd.partition(profile, 2, split_points=["nope"])
    with pytest.raises(ValueError, match="not both"):
        smd.partition(profile, 2, stage_sizes=[1, 4], split_points=["l1"])


def test_partition_rejects_bad_options():
    profile = make_profile([1.0] * 3)
    with pytest.raises(ValueError, match="num_stages=4"):
        smd.partition(profile, 4)
    with pytest.raises(ValueError, match="optimize='fast'"):
        smd.partition(profile, 2, optimize="fast")
    with pytest.raises(ValueError, match="microbatches=0"):
        smd.partition(profile, 2, microbatches=0)


def test_stage_names_include_bare_operations():
    # One kind of names: every profile position, bare operations included,
    # as the pipeline's stages are cut from the same graph nodes.
    profile = make_profile([1.0] * 4, ops=(1,))
    part = smd.partition(profile, 2, stage_sizes=[2, 2])
    assert part.stage_layer_names == [["l0", "l1"], ["l2", "l3"]]
    assert not hasattr(part, "stage_node_names")


def test_partition_files_with_two_kinds_of_names_still_load():
    profile = make_profile([1.0] * 4, ops=(1,))
    data = smd.partition(profile, 2, stage_sizes=[2, 2]).to_dict()
    data["stage_node_names"] = data["stage_layer_names"]
    data["stage_layer_names"] = [["l0"], ["l2", "l3"]]
    assert smd.Partition.from_dict(data).stage_layer_names == [
        ["l0", "l1"],
        ["l2", "l3"],
    ]


def test_report_is_a_table_of_stages():
    profile = make_profile([1e-3] * 4)
    part = smd.partition(profile, 2, microbatches=2)
    lines = part.report().splitlines()
    assert lines[0].startswith("Partition into 2 stages (optimize=speed")
    for column in ("stage", "layers", "params", "act in", "act out", "time ms"):
        assert column in lines[1]
    assert lines[3].split()[:4] == ["0", "2:", "l0", ".."]
    assert lines[-1].startswith("Slowest stage:")


def test_partition_json_round_trip(tmp_path):
    profile = make_profile([1e-3, 2e-3, 3e-3], ops=(2,))
    part = smd.partition(profile, 2, microbatches=2, memory_capacity=1e9)
    part.save(tmp_path / "part.json")
    loaded = smd.Partition.load(tmp_path / "part.json")
    assert loaded == part
    assert loaded.stage_layer_names == part.stage_layer_names
    assert loaded.report() == part.report()
    assert smd.Partition.from_json(part.to_json()) == part


def test_partition_of_a_profiled_model():
    model = keras.Sequential(
        [keras.Input((32,))]
        + [keras.layers.Dense(32, name=f"dense_{i}") for i in range(6)]
    )
    profile = smd.profile_model(
        model, np.zeros((8, 32), "float32"), warmup=1, repeats=2, time_budget=0.05
    )
    part = smd.partition(profile, 3, microbatches=2)
    assert sum(part.stage_sizes) == 6 and part.num_stages == 3
    assert [n for stage in part.stage_layer_names for n in stage] == [
        f"dense_{i}" for i in range(6)
    ]
