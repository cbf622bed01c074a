"""The layout planner: cost arithmetic, search, errors, JSON, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mp_util import TESTS, package_env

from tf_smdist.pipeline.partition import partition
from tf_smdist.pipeline.profile import LayerProfile, Profile
from tf_smdist.planner import Cluster, Plan, PlanRow, costs, plan
from tf_smdist.planner import model as planner_model
from tf_smdist.planner.calibrate import _cluster_from, fit_alpha_beta
from tf_smdist.planner.model import pipeline_time


def make_profile(
    times=(1e-3, 1e-3, 1e-3, 1e-3),
    *,
    param_bytes=1000,
    optimizer_bytes=0,
    output_bytes=0,
    live_bytes=0,
    batch_size=8,
    input_bytes=0,
) -> Profile:
    layers = [
        LayerProfile(
            name=f"l{i}", class_name="Dense", inputs=(), time=t,
            param_bytes=param_bytes, trainable_bytes=param_bytes,
            optimizer_bytes=optimizer_bytes, output_bytes=output_bytes,
            live_bytes=live_bytes,
        )
        for i, t in enumerate(times)
    ]
    return Profile(layers, batch_size=batch_size, input_bytes=input_bytes,
                   model_name="toy")


def make_cluster(**changes) -> Cluster:
    values = dict(nodes=1, devices_per_node=2, device_memory=1e12,
                  intra_node_bandwidth=1e9, inter_node_bandwidth=1e9,
                  latency=0.0, overlap=0.0)
    values.update(changes)
    return Cluster(**values)


# -- α-β costs -----------------------------------------------------------------


def test_ring_allreduce_formula():
    # 2(p-1)/p n/B + 2(p-1) α = 1.5 * 4e6 / 1e9 + 6 * 1e-5
    assert costs.ring_allreduce(4e6, 4, 1e9, 1e-5) == pytest.approx(6e-3 + 6e-5)
    assert costs.ring_allreduce(4e6, 1, 1e9, 1e-5) == 0.0
    assert costs.ring_allreduce(0, 4, 1e9, 1e-5) == 0.0


def test_hierarchical_allreduce_formula_and_limits():
    t = costs.hierarchical_allreduce(
        8e6, 2, 4, intra_bandwidth=1e10, intra_latency=1e-6,
        inter_bandwidth=1e9, inter_latency=1e-5)
    # inside: 2*3/4 * 8e6/1e10 + 6e-6; across: 2*1/2 * 8e6/1e9 + 2e-5
    assert t == pytest.approx(1.2e-3 + 6e-6 + 8e-3 + 2e-5)
    one_node = costs.hierarchical_allreduce(
        8e6, 1, 4, intra_bandwidth=1e10, intra_latency=1e-6,
        inter_bandwidth=1e9, inter_latency=1e-5)
    assert one_node == pytest.approx(costs.ring_allreduce(8e6, 4, 1e10, 1e-6))
    one_each = costs.hierarchical_allreduce(
        8e6, 4, 1, intra_bandwidth=1e10, intra_latency=1e-6,
        inter_bandwidth=1e9, inter_latency=1e-5)
    assert one_each == pytest.approx(costs.ring_allreduce(8e6, 4, 1e9, 1e-5))


def test_host_sharded_formula():
    t = costs.host_sharded_allreduce(
        8e6, 2, 4, host_reduce_bandwidth=32e9, inter_bandwidth=1e9,
        inter_latency=1e-5, device_host_bandwidth=8e9)
    # copies 2 * 8e6/8e9, host sum 4 * 8e6/32e9, ring over 2 nodes
    assert t == pytest.approx(2e-3 + 1e-3 + 8e-3 + 2e-5)


def test_phases_pipeline_over_buckets():
    assert costs.pipelined((1.0, 3.0, 2.0), 1) == pytest.approx(6.0)
    assert costs.pipelined((1.0, 3.0, 2.0), 3) == pytest.approx(4.0)
    one = costs.host_sharded_allreduce(
        8e6, 2, 4, host_reduce_bandwidth=32e9, inter_bandwidth=1e9,
        inter_latency=0.0, device_host_bandwidth=8e9)
    four = costs.host_sharded_allreduce(
        8e6, 2, 4, host_reduce_bandwidth=32e9, inter_bandwidth=1e9,
        inter_latency=0.0, device_host_bandwidth=8e9, buckets=4)
    assert four == pytest.approx(8e-3 + 3e-3 / 4) and one == pytest.approx(11e-3)


def test_point_to_point():
    assert costs.point_to_point(1e6, 1e9, 1e-5) == pytest.approx(1.01e-3)
    assert costs.point_to_point(0, 1e9, 1e-5) == 0.0


def test_overlapped_aggregation():
    # Two-stage pipeline over 4 buckets: max(8 + 1, 2 + 4) - 8 hidden.
    assert costs.overlapped_aggregation(4.0, 8.0, 4, 1.0) == pytest.approx(1.0)
    # Aggregation longer than backward: max(2 + 2, 0.5 + 8) - 2.
    assert costs.overlapped_aggregation(8.0, 2.0, 4, 1.0) == pytest.approx(6.5)
    assert costs.overlapped_aggregation(4.0, 8.0, 4, 0.0) == pytest.approx(4.0)
    assert costs.overlapped_aggregation(0.0, 8.0, 4, 1.0) == 0.0
    assert costs.num_buckets(60e6, 25 * 2**20) == 3


def test_fit_alpha_beta_exact_line():
    a, b = fit_alpha_beta([4096, 1 << 20, 16 << 20],
                          [1e-5 + 4096e-9, 1e-5 + (1 << 20) * 1e-9,
                           1e-5 + (16 << 20) * 1e-9])
    assert a == pytest.approx(1e-5, rel=1e-6)
    assert b == pytest.approx(1e-9, rel=1e-9)


def test_calibration_fit_inverts_ring_formula():
    sizes = [4096, 1 << 20, 16 << 20]
    ring = {str(s): costs.ring_allreduce(s, 4, 2e9, 3e-6) for s in sizes}
    p2p = {str(s): costs.point_to_point(s, 5e9, 7e-6) for s in sizes}
    raw = {"allreduce": ring, "p2p": p2p, "native_allreduce": ring,
           "host_reduce_bandwidth": 1e9, "memory_bandwidth": 2e9,
           "matmul_flops": 1e10, "call_overhead": 1e-4}
    cluster = _cluster_from(raw, 4, cores=2)
    assert cluster.inter_node_bandwidth == pytest.approx(2e9)
    assert cluster.latency == pytest.approx(3e-6)
    assert cluster.p2p(False) == pytest.approx((5e9, 7e-6))
    # 4 processes on 2 cores: 2 compute at once, each at full speed.
    assert (cluster.compute_scale, cluster.compute_slots) == (1.0, 2.0)
    assert _cluster_from(raw, 2, cores=2).compute_slots is None
    assert (cluster.nodes, cluster.devices_per_node) == (4, 1)
    assert cluster.overlap == 0.0 and cluster.device_host_bandwidth == 1e9


# -- step time and memory of a layout ------------------------------------------


def test_pipeline_bubble_step_time():
    # 4 layers of 1 ms per 8 samples; M = 4 micro-batches of 2 samples:
    # a stage of 2 layers takes 0.5 ms per micro-batch; (M + K - 1) x 0.5 ms.
    profile = make_profile()
    for schedule in ("1f1b", "gpipe"):
        row = plan(profile, make_cluster(), global_batch=8, pipeline_stages=2,
                   microbatches=4, schedule=schedule).rows[0]
        assert (row.data_parallel, row.stage_sizes) == (1, (2, 2))
        assert row.step_time_s == pytest.approx(5 * 0.5e-3)
        # One device would take 4 ms: efficiency 4 / (2 x 2.5).
        assert row.efficiency == pytest.approx(0.8)


def test_unequal_stages_fill_and_drain_with_their_own_times():
    # Layers of 1, 1, 4, 0.5 ms per 8 samples, K = 2, M = 4 micro-batches of
    # 8: the split (2, 2) gives stages of 2 ms and 4.5 ms. The busy stage
    # paces the 4 micro-batches, the other fills and drains:
    # (M - 1) x 4.5 + (2 + 4.5) = 20 ms, not (M + K - 1) x 4.5 = 22.5 ms.
    profile = make_profile(times=(1e-3, 1e-3, 4e-3, 0.5e-3))
    row = plan(profile, make_cluster(), global_batch=32, pipeline_stages=2,
               microbatches=4, schedule="1f1b").rows[0]
    assert row.stage_sizes == (2, 2)
    assert row.step_time_s == pytest.approx(20e-3)


def test_interleaved_schedule_by_hand():
    # 4 layers of 1 ms per 8 samples, K = 2 devices, v = 2 stages per device
    # (one layer each, device 0 holds stages 0 and 2), M = 4 micro-batches of
    # 8 samples: 2 (v M + K - 1) = 18 ticks of 1 ms, forward and backward
    # each counted, so 9 ms; 1F1B runs (M + K - 1) = 5 stage times of 2 ms.
    profile = make_profile(output_bytes=100)
    cluster = make_cluster()
    row = plan(profile, cluster, global_batch=32, pipeline_stages=2,
               microbatches=4, schedule="interleaved").rows[0]
    assert (row.virtual_stages, row.stage_sizes) == (2, (1, 1, 1, 1))
    assert row.step_time_s == pytest.approx(9e-3)
    one_f_one_b = plan(profile, cluster, global_batch=32, pipeline_stages=2,
                       microbatches=4, schedule="1f1b").rows[0]
    assert one_f_one_b.step_time_s == pytest.approx(10e-3)
    # Memory of device 0: 2 layers x (1000 params + 1000 grads), plus each
    # stage's activations (100 bytes x 8 samples) times its micro-batches in
    # flight: stage 0 runs 4 forwards before its first backward, stage 2
    # holds at most 2 (device 0 runs, as micro-batch.stage: F0.0 F1.0 F0.2
    # F1.2 F2.0 B0.2 F3.0 B1.2 F2.2 B0.0 ...).
    assert row.memory_per_device == pytest.approx(4000 + 4 * 800 + 2 * 800)
    # 1F1B's stage 0 holds min(K, M) = 2 micro-batches of 2 layers' outputs.
    assert one_f_one_b.memory_per_device == pytest.approx(4000 + 2 * 1600)
    # v = 4 needs K * v = 8 positions: only 4 here, so it is not searched.
    searched = plan(profile, cluster, global_batch=32, pipeline_stages=2)
    assert {r.virtual_stages for r in searched.rows
            if r.schedule == "interleaved"} == {2}
    assert "interleaved v=2" in searched.table()
    # M not a multiple of K: no interleaved row.
    with pytest.raises(ValueError, match="interleaved"):
        plan(profile, cluster, global_batch=32, pipeline_stages=2,
             microbatches=1, schedule="interleaved")
    with pytest.raises(ValueError, match="virtual_stages=1"):
        plan(profile, cluster, global_batch=32, virtual_stages=1)


def test_pipeline_transfer_cost_counts_both_directions():
    # 100 live bytes per sample across the cut, 2 samples per micro-batch,
    # 1e6 B/s and 1e-4 s per message: each way 2e-4 + 1e-4 s.
    profile = make_profile(live_bytes=100)
    cluster = make_cluster(p2p_bandwidth=1e6, p2p_latency=1e-4)
    row = plan(profile, cluster, global_batch=8, pipeline_stages=2,
               microbatches=4, schedule="1f1b").rows[0]
    assert row.step_time_s == pytest.approx(5 * (0.5e-3 + 2 * 3e-4))


def test_data_parallel_ring_without_overlap():
    # D = 2, one stage: compute of 4 samples (2 ms) then a ring all-reduce of
    # 4000 gradient bytes at 1e9 B/s: 2 * 1/2 * 4000 / 1e9.
    profile = make_profile()
    row = plan(profile, make_cluster(latency=1e-5), global_batch=8,
               data_parallel=2, aggregation="ring").rows[0]
    assert row.pipeline_stages == 1
    assert row.aggregation_s == pytest.approx(4e-6 + 2e-5)
    assert row.step_time_s == pytest.approx(2e-3 + 4e-6 + 2e-5)


def test_batch_profile_keeps_the_fixed_part():
    # 2 ms per layer at batch 8, 5 ms at batch 32: a + c b with c = 0.125 ms
    # per sample and a = 1 ms. K = 2, M = 4 micro-batches of 4 samples:
    # 1.5 ms per layer, 3 ms per stage, (M + K - 1) x 3 ms = 15 ms; linear
    # scaling from batch 8 alone predicts 1 ms per layer, 10 ms.
    small = make_profile(times=(2e-3,) * 4, batch_size=8)
    large = make_profile(times=(5e-3,) * 4, batch_size=32)
    fixed = dict(global_batch=16, pipeline_stages=2, microbatches=4,
                 schedule="1f1b")
    linear = plan(small, make_cluster(), **fixed).rows[0]
    assert linear.step_time_s == pytest.approx(10e-3)
    row = plan(small, make_cluster(), batch_profile=large, **fixed).rows[0]
    assert row.step_time_s == pytest.approx(15e-3)
    # One device on the replica batch of 16: 4 x 3 ms; efficiency 12 / (2 x 15).
    assert row.efficiency == pytest.approx(12 / 30)
    with pytest.raises(ValueError, match="another batch size"):
        plan(small, make_cluster(), batch_profile=small, **fixed)
    with pytest.raises(ValueError, match="same layers"):
        plan(small, make_cluster(), batch_profile=make_profile(
            times=(1e-3,) * 3, batch_size=32), **fixed)
    with pytest.raises(TypeError, match="batch_profile"):
        plan(small, make_cluster(), batch_profile={"batch": 32}, **fixed)


def test_pipeline_profile_prices_the_stages_only():
    # 2 ms per layer per 8 samples as plain Keras trains, 1 ms as the
    # pipeline does (its MatMul gradient rule). K = 2, M = 4 micro-batches of
    # 4 samples: 0.5 ms per layer, 1 ms per stage, (M + K - 1) x 1 ms = 5 ms
    # (10 ms from the plain profile).
    plain_profile = make_profile(times=(2e-3,) * 4, batch_size=8)
    piped = make_profile(times=(1e-3,) * 4, batch_size=8)
    pp = dict(global_batch=16, pipeline_stages=2, microbatches=4, schedule="1f1b")
    assert plan(plain_profile, make_cluster(), **pp).rows[0].step_time_s == (
        pytest.approx(10e-3))
    row = plan(plain_profile, make_cluster(), pipeline_profile=piped, **pp).rows[0]
    assert row.step_time_s == pytest.approx(5e-3)
    # One device still trains as plain Keras: 4 layers x 4 ms at batch 16.
    assert row.efficiency == pytest.approx(16 / (2 * 5))
    # Data parallelism alone keeps the plain profile: 4 x 2 ms per replica.
    dp = dict(global_batch=16, data_parallel=2, pipeline_stages=1,
              aggregation="ring")
    assert plan(plain_profile, make_cluster(), pipeline_profile=piped,
                **dp).rows[0].compute_s == pytest.approx(8e-3)
    with pytest.raises(ValueError, match="same layers"):
        plan(plain_profile, make_cluster(), pipeline_profile=make_profile(
            times=(1e-3,) * 3, batch_size=8), **pp)
    with pytest.raises(ValueError, match="same batch size"):
        plan(plain_profile, make_cluster(), pipeline_profile=make_profile(
            times=(1e-3,) * 4, batch_size=16), **pp)
    with pytest.raises(ValueError, match="cannot be combined"):
        plan(plain_profile, make_cluster(), pipeline_profile=piped,
             batch_profile=make_profile(times=(5e-3,) * 4, batch_size=32), **pp)
    with pytest.raises(TypeError, match="pipeline_profile"):
        plan(plain_profile, make_cluster(), pipeline_profile={"time": 1}, **pp)


def test_shared_compute_slots():
    # Layers of 1, 1, 1, 5 ms per 8 samples; 4 processes on 2 cores.
    profile = make_profile(times=(1e-3, 1e-3, 1e-3, 5e-3))
    shared = make_cluster(nodes=4, devices_per_node=1, compute_slots=2)
    own = make_cluster(nodes=4, devices_per_node=1)
    # Data parallel, 8 samples each: 8 ms of compute per process, 4 of them
    # on 2 cores: 16 ms.
    dp = dict(global_batch=32, data_parallel=4, aggregation="ring")
    assert plan(profile, own, **dp).rows[0].compute_s == pytest.approx(8e-3)
    assert plan(profile, shared, **dp).rows[0].compute_s == pytest.approx(16e-3)
    # 2 x 2, M = 4 of 8 samples: stages of 3 ms and 5 ms, (M - 1) x 5 + 3 + 5
    # = 23 ms on own cores; the 4 processes' work, 2 x 4 x (3 + 5) ms, on 2
    # cores takes 32 ms; on 3 cores 21.3 ms, below the schedule's 23 ms.
    pp = dict(global_batch=64, data_parallel=2, pipeline_stages=2,
              microbatches=4, schedule="1f1b", aggregation="ring")
    assert plan(profile, own, **pp).rows[0].compute_s == pytest.approx(23e-3)
    assert plan(profile, shared, **pp).rows[0].compute_s == pytest.approx(32e-3)
    three = shared.replace(compute_slots=3)
    assert plan(profile, three, **pp).rows[0].compute_s == pytest.approx(23e-3)


def test_optimizer_update_and_compute_scale():
    profile = make_profile(optimizer_bytes=2000)
    cluster = make_cluster(devices_per_node=1, memory_bandwidth=1e6,
                           compute_scale=2.0)
    row = plan(profile, cluster, global_batch=8).rows[0]
    # Update streams 3 x 4000 + 2 x 8000 bytes at 1e6 B/s; compute 2 x 4 ms.
    assert row.update_s == pytest.approx(28e-3)
    assert row.step_time_s == pytest.approx(8e-3 + 28e-3)


def test_micro_batch_gradients_are_summed_at_memory_bandwidth():
    # test_pipeline_bubble_step_time's layout (stages of 2 layers, 0.5 ms per
    # micro-batch, M = 4) with 1000 gradient bytes per layer: each stage adds
    # M - 1 = 3 micro-batch gradients of 2000 bytes, reading two and writing
    # one, at 1e6 B/s: 18 ms per step, 4.5 ms per micro-batch. The update
    # (3 x 2000 bytes at 1e6 B/s) comes after. M = 1 sums nothing.
    profile = make_profile()
    cluster = make_cluster(memory_bandwidth=1e6)
    row = plan(profile, cluster, global_batch=8, pipeline_stages=2,
               microbatches=4, schedule="1f1b").rows[0]
    assert row.compute_s == pytest.approx(5 * (0.5e-3 + 4.5e-3))
    assert row.update_s == pytest.approx(6e-3)
    one = plan(profile, cluster, global_batch=8, pipeline_stages=2,
               microbatches=1, schedule="1f1b").rows[0]
    assert one.compute_s == pytest.approx(2 * 2e-3)
    # Without a memory bandwidth, neither is priced.
    free = plan(profile, make_cluster(), global_batch=8, pipeline_stages=2,
                microbatches=4, schedule="1f1b").rows[0]
    assert free.compute_s == pytest.approx(5 * 0.5e-3)


def test_memory_per_device_by_hand():
    # Stage 0 of 2 (layers 0-1): params + grads + Adam-like state
    # 2 x (1000 + 1000 + 500); activations per micro-batch of 2 samples:
    # input 10 + outputs 2 x 20 bytes per sample; 1F1B keeps 2 in flight.
    profile = make_profile(optimizer_bytes=500, output_bytes=20, input_bytes=10)
    row = plan(profile, make_cluster(), global_batch=8, pipeline_stages=2,
               microbatches=4, schedule="1f1b").rows[0]
    stage0 = 2 * 2500 + 2 * (10 + 2 * 20) * 2
    assert row.memory_per_device == pytest.approx(stage0)
    gpipe = plan(profile, make_cluster(), global_batch=8, pipeline_stages=2,
                 microbatches=4, schedule="gpipe").rows[0]
    assert gpipe.memory_per_device == pytest.approx(2 * 2500 + 4 * (10 + 2 * 20) * 2)


def test_infeasible_row_names_stage_and_bytes():
    profile = make_profile(param_bytes=10_000)  # 20 kB per layer with grads
    cluster = make_cluster(devices_per_node=1, device_memory=50_000)
    result = plan(profile, cluster, global_batch=8)
    row = result.rows[0]
    assert not row.feasible
    assert "stage 0" in row.why and "80000 bytes" in row.why
    assert "device_memory 50000 bytes" in row.why
    with pytest.raises(ValueError, match="No layout fits"):
        _ = result.best
    assert "NO" in result.table()


def test_memory_limit_moves_the_split_before_giving_up():
    # Layer 0 is heavy: the fastest split [1, 3] would put 3 x 20 kB on
    # stage 1; a 45 kB device forces [2, 2] (40 kB each).
    profile = make_profile(times=(4e-3, 1e-3, 1e-3, 1e-3), param_bytes=10_000)
    free = plan(profile, make_cluster(), global_batch=8, pipeline_stages=2,
                microbatches=1).rows[0]
    assert free.stage_sizes == (1, 3)
    tight = plan(profile, make_cluster(device_memory=45_000), global_batch=8,
                 pipeline_stages=2, microbatches=1).rows[0]
    assert tight.feasible and tight.stage_sizes == (2, 2)
    # With the partitioner's candidates only (a large model's), the
    # memory-constrained split is added when the fastest does not fit.
    with mock.patch.object(planner_model, "EXHAUSTIVE_SPLITS", 0):
        tight = plan(profile, make_cluster(device_memory=45_000), global_batch=8,
                     pipeline_stages=2, microbatches=1).rows[0]
        assert tight.feasible and tight.stage_sizes == (2, 2)
        infeasible = plan(profile, make_cluster(device_memory=35_000),
                          global_batch=8, pipeline_stages=2,
                          microbatches=1).rows[0]
        assert not infeasible.feasible and "needs 40000 bytes" in infeasible.why


# -- the search ----------------------------------------------------------------


def test_keyword_arguments_fix_dimensions():
    profile = make_profile()
    cluster = make_cluster(nodes=2, devices_per_node=4)
    full = plan(profile, cluster, global_batch=64)
    assert {(r.data_parallel, r.pipeline_stages) for r in full.rows} == {
        (8, 1), (4, 2), (2, 4)}
    assert {r.aggregation for r in full.rows if r.data_parallel > 1} == set(
        costs.AGGREGATIONS)
    fixed = plan(profile, cluster, global_batch=64, pipeline_stages=2,
                 microbatches=4, schedule="gpipe", aggregation="hierarchical")
    assert {(r.data_parallel, r.pipeline_stages, r.microbatches, r.schedule,
             r.aggregation) for r in fixed.rows} == {(4, 2, 4, "gpipe",
                                                       "hierarchical")}
    assert {r.data_parallel for r in plan(profile, cluster, global_batch=64,
                                          data_parallel=2).rows} == {2}
    rows = plan(profile, cluster, global_batch=64).rows
    assert list(rows) == sorted(rows, key=lambda r: (not r.feasible,
                                                     -r.samples_per_s))


def test_plan_argument_errors():
    profile = make_profile()
    cluster = make_cluster(devices_per_node=8)
    with pytest.raises(ValueError, match="data_parallel=3"):
        plan(profile, cluster, global_batch=48, data_parallel=3)
    with pytest.raises(ValueError, match="schedule"):
        plan(profile, cluster, global_batch=64, schedule="zigzag")
    with pytest.raises(ValueError, match="aggregation"):
        plan(profile, cluster, global_batch=64, aggregation="tree")
    with pytest.raises(ValueError, match="pipeline_stages=5"):
        plan(profile, cluster, global_batch=64, pipeline_stages=5)
    with pytest.raises(ValueError, match="global_batch"):
        plan(profile, cluster, global_batch=0)
    with pytest.raises(ValueError, match="divisible"):
        plan(profile, cluster, global_batch=3, data_parallel=8)
    with pytest.raises(TypeError, match="cluster"):
        plan(profile, {"nodes": 1}, global_batch=8)
    with pytest.raises(ValueError, match="sample_batch"):
        plan(object(), cluster, global_batch=8)


def test_plan_profiles_a_keras_model():
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                              keras.layers.Dense(2)])
    result = plan(model, make_cluster(), global_batch=8,
                  sample_batch=np.zeros((4, 4), "float32"), pipeline_stages=2,
                  microbatches=2)
    row = result.rows[0]
    assert row.stage_sizes == (1, 1) and row.feasible
    # Parameters + gradients of the larger stage: 2 x (4 * 8 + 8) floats.
    assert row.memory_per_device >= 2 * 40 * 4


# -- monotonicity --------------------------------------------------------------

profiles = st.builds(
    lambda times, params, live: make_profile(
        tuple(times), param_bytes=params, live_bytes=live, output_bytes=live),
    st.lists(st.floats(1e-5, 1e-2), min_size=2, max_size=6),
    st.integers(1, 10**7),
    st.integers(0, 10**5),
)


def _check_more_bandwidth_never_predicts_slower(profile, factor, nodes, latency,
                                                overlap):
    slow = make_cluster(nodes=nodes, devices_per_node=2, latency=latency,
                        overlap=overlap, intra_node_bandwidth=5e9,
                        inter_node_bandwidth=1e9, host_reduce_bandwidth=2e9)
    fast = slow.replace(intra_node_bandwidth=5e9 * factor,
                        inter_node_bandwidth=1e9 * factor,
                        host_reduce_bandwidth=2e9 * factor)
    a = plan(profile, slow, global_batch=16 * nodes)
    b = plan(profile, fast, global_batch=16 * nodes)
    key = lambda r: (r.data_parallel, r.pipeline_stages, r.microbatches,  # noqa: E731
                     r.schedule, r.virtual_stages, r.aggregation)
    slow_rows = {key(r): r for r in a.rows}
    assert len(slow_rows) == len(a.rows) == len(b.rows)
    # Every row, whatever split each cluster chose for it.
    for r in b.rows:
        assert r.step_time_s <= slow_rows[key(r)].step_time_s * (1 + 1e-9)
    assert b.rows[0].step_time_s <= a.rows[0].step_time_s * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(profile=profiles, factor=st.floats(1.0, 100.0),
       nodes=st.sampled_from([1, 2, 4]), latency=st.floats(0, 1e-4),
       overlap=st.floats(0, 1))
def test_more_bandwidth_never_predicts_slower(profile, factor, nodes, latency,
                                              overlap):
    # Up to 6 layers: every split is a candidate.
    _check_more_bandwidth_never_predicts_slower(profile, factor, nodes, latency,
                                                overlap)


@settings(max_examples=20, deadline=None)
@given(profile=profiles, factor=st.floats(1.0, 100.0),
       nodes=st.sampled_from([1, 2, 4]), latency=st.floats(0, 1e-4),
       overlap=st.floats(0, 1))
def test_more_bandwidth_never_predicts_slower_on_partitioner_splits(
        profile, factor, nodes, latency, overlap):
    # The candidates of a large model: the partitioner's splits at fixed
    # bandwidths.
    with mock.patch.object(planner_model, "EXHAUSTIVE_SPLITS", 0):
        _check_more_bandwidth_never_predicts_slower(profile, factor, nodes,
                                                    latency, overlap)


def test_more_point_to_point_bandwidth_on_a_fixed_split():
    # Five one-layer stages (the only split), M = 1; only the cut after
    # layer 0 carries activations, and the last stage holds most gradients.
    # Faster transfers shorten the pipeline; they must not also shorten the
    # time the later stages' aggregation hides in, or the step would grow.
    profile = make_profile(times=(1e-3, 2e-3, 1e-3, 1e-3, 1e-3))
    layers = list(profile.layers)
    layers[0] = dataclasses.replace(layers[0], live_bytes=20_000)
    layers[4] = dataclasses.replace(layers[4], param_bytes=30_000_000,
                                    trainable_bytes=30_000_000)
    profile = Profile(layers, batch_size=8, input_bytes=0, model_name="toy")
    steps = []
    for p2p in (1e8, 1e9):
        cluster = make_cluster(nodes=2, devices_per_node=5, p2p_bandwidth=p2p)
        row = plan(profile, cluster, global_batch=16, pipeline_stages=5,
                   microbatches=1, schedule="1f1b", aggregation="ring").rows[0]
        assert row.stage_sizes == (1, 1, 1, 1, 1)
        steps.append(row.step_time_s)
    assert steps[1] < steps[0]


def test_split_minimises_the_step_not_the_slowest_stage():
    # Layers of 1.2, 1, 1, 1 ms per micro-batch of 8; only the cut after
    # layer 1 carries activations: 24 MB at 80 GB/s, 0.3 ms each way. The
    # partitioner's min-max split (2, 2) has stages of 2.8 and 2.6 ms, a
    # 1F1B step of (M - 1) x 2.8 + 5.4 = 13.8 ms with M = 4; the split
    # (1, 3) has a slower stage, 3 ms, but no transfer: 3 x 3 + 4.2 = 13.2 ms.
    profile = make_profile(times=(1.2e-3, 1e-3, 1e-3, 1e-3))
    layers = list(profile.layers)
    layers[1] = dataclasses.replace(layers[1], live_bytes=3_000_000)
    profile = Profile(layers, batch_size=8, input_bytes=0, model_name="toy")
    cluster = make_cluster(p2p_bandwidth=80e9)
    minmax = partition(profile, 2, microbatches=4, batch_size=32,
                       bandwidth=80e9)
    assert minmax.stage_sizes == [2, 2]
    assert minmax.stage_times == pytest.approx([2.8e-3, 2.6e-3])
    assert pipeline_time(minmax.stage_times, 4) == pytest.approx(13.8e-3)
    row = plan(profile, cluster, global_batch=32, pipeline_stages=2,
               microbatches=4, schedule="1f1b").rows[0]
    assert row.stage_sizes == (1, 3)
    assert row.step_time_s == pytest.approx(13.2e-3)
    # The same with the partitioner's candidates only (a large model's):
    # its split at the fixed 10 GB/s is (1, 3).
    with mock.patch.object(planner_model, "EXHAUSTIVE_SPLITS", 0):
        row = plan(profile, cluster, global_batch=32, pipeline_stages=2,
                   microbatches=4, schedule="1f1b").rows[0]
    assert row.stage_sizes == (1, 3)
    assert row.step_time_s == pytest.approx(13.2e-3)


@settings(max_examples=40, deadline=None)
@given(profile=profiles, memory=st.floats(1e4, 1e8), factor=st.floats(1.0, 10.0))
def test_more_memory_never_makes_a_layout_infeasible(profile, memory, factor):
    small = make_cluster(devices_per_node=2, device_memory=memory)
    large = small.replace(device_memory=memory * factor)
    a = {(r.data_parallel, r.pipeline_stages, r.microbatches, r.schedule,
          r.aggregation): r for r in plan(profile, small, global_batch=16).rows}
    for r in plan(profile, large, global_batch=16).rows:
        before = a[(r.data_parallel, r.pipeline_stages, r.microbatches,
                    r.schedule, r.aggregation)]
        if before.feasible:
            assert r.feasible
            assert r.step_time_s <= before.step_time_s * (1 + 1e-9)


# -- the Cluster value object --------------------------------------------------


def test_cluster_json_round_trip(tmp_path):
    cluster = make_cluster(nodes=3, device_host_bandwidth=25e9,
                           metadata={"note": "x"})
    assert Cluster.from_json(cluster.to_json()) == cluster
    path = tmp_path / "cluster.json"
    cluster.save(path)
    assert Cluster.load(path) == cluster
    assert json.loads(path.read_text())["nodes"] == 3
    assert cluster.num_devices == 6
    assert cluster.replace(nodes=1).num_devices == 2


def test_cluster_validation():
    with pytest.raises(ValueError, match="inter_node_bandwidth=-1"):
        make_cluster(inter_node_bandwidth=-1.0)
    with pytest.raises(ValueError, match="nodes=0"):
        make_cluster(nodes=0)
    with pytest.raises(TypeError, match="device_memory='80GB'"):
        make_cluster(device_memory="80GB")
    with pytest.raises(ValueError, match="overlap=2"):
        make_cluster(overlap=2.0)
    with pytest.raises(ValueError, match="Unknown field"):
        Cluster.from_dict({**make_cluster().to_dict(), "gpus": 8})
    with pytest.raises(TypeError, match="Unknown Cluster field"):
        make_cluster().replace(gpus=8)


def test_plan_rows_and_plan_to_dict():
    result = plan(make_profile(), make_cluster(), global_batch=8)
    assert isinstance(result, Plan) and len(result) == len(result.rows)
    row = result.rows[0]
    assert PlanRow(**row.to_dict()) == row
    data = json.loads(json.dumps(result.to_dict()))
    assert Cluster.from_dict(data["cluster"]) == result.cluster
    assert data["rows"][0]["step_time_s"] == row.step_time_s


def test_top_level_lazy_exports():
    import tf_smdist as smd

    assert smd.Cluster is Cluster and smd.plan is plan
    # The data-parallel cluster module keeps its own name.
    from tf_smdist.data_parallel import cluster as dp_cluster

    assert not hasattr(dp_cluster, "Cluster")


def test_planner_imports_without_tensorflow():
    code = ("import sys, tf_smdist as smd; smd.Cluster; smd.plan; "
            "import tf_smdist.planner.cli; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TESTS,
                   env=package_env(), timeout=120)


# -- the console script --------------------------------------------------------


def test_cli_writes_table_and_png(tmp_path):
    profile_path = tmp_path / "profile.json"
    make_profile(live_bytes=64).save(profile_path)
    cluster_path = tmp_path / "cluster.json"
    make_cluster(nodes=4, devices_per_node=2).save(cluster_path)
    png = tmp_path / "scaling.png"
    out = subprocess.run(
        [sys.executable, "-m", "tf_smdist.planner.cli", str(profile_path),
         "--cluster", str(cluster_path), "--inter-node-bandwidth", "2e9",
         "--global-batch", "64", "--png", str(png), "--json",
         str(tmp_path / "plan.json")],
        cwd=TESTS, env=package_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Layouts for toy on 4 x 2 devices, global batch 64" in out.stdout
    assert "aggregation" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["cluster"]["inter_node_bandwidth"] == 2e9
    bad = subprocess.run(
        [sys.executable, "-m", "tf_smdist.planner.cli", str(profile_path),
         "--nodes", "2", "--global-batch", "8"],
        cwd=TESTS, env=package_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--devices-per-node" in bad.stderr


def test_cli_pipeline_profile(tmp_path):
    # The example of test_pipeline_profile_prices_the_stages_only, by file.
    make_profile(times=(2e-3,) * 4, batch_size=8).save(tmp_path / "p.json")
    make_profile(times=(1e-3,) * 4, batch_size=8).save(tmp_path / "piped.json")
    make_cluster().save(tmp_path / "c.json")
    common = [sys.executable, "-m", "tf_smdist.planner.cli", str(tmp_path / "p.json"),
              "--cluster", str(tmp_path / "c.json"), "--global-batch", "16",
              "--pipeline-stages", "2", "--microbatches", "4", "--schedule", "1f1b",
              "--json", str(tmp_path / "plan.json")]
    steps = []
    for extra in ([], ["--pipeline-profile", str(tmp_path / "piped.json")]):
        out = subprocess.run(common + extra, cwd=TESTS, env=package_env(),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        saved = json.loads((tmp_path / "plan.json").read_text())
        steps.append(saved["rows"][0]["step_time_s"])
    assert steps == [pytest.approx(10e-3), pytest.approx(5e-3)]
    missing = subprocess.run(common + ["--pipeline-profile", str(tmp_path / "no.json")],
                             cwd=TESTS, env=package_env(), capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "no.json" in missing.stderr


# -- published results ---------------------------------------------------------


def test_published_reproductions():
    from tf_smdist.planner import published

    rows = published.reproduce()
    sources = {r.source.split(" (")[0] for r in rows}
    assert {"Horovod", "Herring", "GPipe", "torchgpipe docs"} <= sources
    for r in rows:
        assert r.error == pytest.approx(abs(r.predicted - r.published) / r.published)
    # Uniform stages, no overhead: throughput(K, M) / throughput(2, 1) is
    # K M / (M + K - 1), GPipe's bubble.
    for r in rows:
        if r.source.startswith("GPipe"):
            k = int(r.setting.split("K=")[1].split(" ")[0])
            m = int(r.setting.split("M=")[1])
            assert r.predicted == pytest.approx(k * m / (m + k - 1))
    efficiency = {r.setting.split(",")[0]: round(r.predicted, 2) for r in rows
                  if "efficiency" in r.metric}
    assert efficiency == {"Inception V3": 0.93, "ResNet-101": 0.92,
                          "VGG-16": 0.78, "BERT-large": 0.98}
    table = published.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| 0.68 | 0.78 | 15% |" in table


# -- calibration on this machine (2 processes) ---------------------------------


@pytest.mark.slow
def test_calibrate_two_processes(tmp_path):
    import mp_util
    from mp_util import requires_mpi  # noqa: F401 - skip marker below

    if not mp_util.mpi_available():
        pytest.skip("needs Open MPI and the MPI op library")
    path = tmp_path / "local.json"
    cluster = Cluster.calibrate(processes=2, path=path, sizes=(4096, 262144),
                                repeats=2, host_bytes=1 << 20, timeout=120)
    assert Cluster.load(path) == cluster
    assert cluster.nodes == 2 and cluster.devices_per_node == 1
    assert math.isfinite(cluster.intra_node_bandwidth)
    assert cluster.intra_node_bandwidth > 0 and cluster.host_reduce_bandwidth > 0
    assert set(cluster.metadata["allreduce_s"]) == {"4096", "262144"}


def test_calibrate_rejects_a_missing_folder_before_measuring(tmp_path):
    # Fails at once (no job launched: no MPI needed), not after minutes.
    path = tmp_path / "missing" / "local.json"
    with pytest.raises(FileNotFoundError, match="folder of `path` does not exist"):
        Cluster.calibrate(processes=2, path=path)
    with pytest.raises(ValueError, match="processes"):
        Cluster.calibrate(processes=1)
