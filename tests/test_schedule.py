"""Tests for the pipeline schedules as data (no TensorFlow execution)."""

import pytest

from tf_smdist.pipeline import schedule as sched
from tf_smdist.pipeline.schedule import Schedule, Task

KS = (1, 2, 3, 4)
MS = (1, 2, 4, 8)


def _all(k_values=KS, m_values=MS):
    for k in k_values:
        for m in m_values:
            yield sched.gpipe(k, m)
            yield sched.one_f_one_b(k, m)
            for v in (2, 3):
                if m % k == 0:
                    yield sched.interleaved_1f1b(k, m, v)


def test_every_task_runs_exactly_once():
    for s in _all():
        seen = [t for row in s.clocks for t in row if t is not None]
        expected = {
            Task(kind, st, m)
            for kind in "FB"
            for st in range(s.num_stages)
            for m in range(s.num_microbatches)
        }
        assert len(seen) == len(expected), s
        assert set(seen) == expected, s


def test_clock_table_respects_dependencies():
    for s in _all():
        when = {t: c for c, row in enumerate(s.clocks) for t in row if t}
        for task, clock in when.items():
            for dep in Schedule.dependencies(task, s.num_stages):
                assert when[dep] < clock, (s, task, dep)


def test_each_device_runs_its_own_stages_in_its_order():
    for s in _all():
        for d in range(s.num_devices):
            column = [row[d] for row in s.clocks if row[d] is not None]
            assert tuple(column) == s.device_orders[d]
            assert all(s.device_of(t.stage) == d for t in column)


def test_linear_order_puts_dependencies_first():
    for s in _all():
        position = {t: i for i, t in enumerate(s.linear_order())}
        for task, i in position.items():
            for dep in Schedule.dependencies(task, s.num_stages):
                assert position[dep] < i


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_fraction_matches_formula(name):
    for k in KS:
        for m in MS:
            s = sched.make_schedule(name, k, m)
            assert s.bubble_fraction == pytest.approx((k - 1) / (m + k - 1))
            assert len(s.clocks) == 2 * (m + k - 1)


def test_interleaved_bubble_matches_formula():
    for k in (2, 3, 4):
        for m in (k, 2 * k, 4 * k):
            for v in (2, 3, 4):
                s = sched.interleaved_1f1b(k, m, v)
                # Idle share of the total, and idle time over useful time.
                assert s.bubble_fraction == pytest.approx(
                    (k - 1) / (v * m + k - 1)
                )
                idle = len(s.clocks) * k - 2 * v * m * k
                assert idle / (2 * v * m * k) == pytest.approx((k - 1) / (v * m))


def test_gpipe_keeps_all_microbatches_in_flight():
    for k in KS:
        for m in MS:
            s = sched.gpipe(k, m)
            assert [s.in_flight(st) for st in range(k)] == [m] * k


def test_one_f_one_b_bounds_in_flight_microbatches():
    for k in KS:
        for m in MS:
            s = sched.one_f_one_b(k, m)
            assert [s.in_flight(st) for st in range(k)] == [
                min(k - st, m) for st in range(k)
            ]


def test_one_f_one_b_steady_state_alternates():
    s = sched.one_f_one_b(4, 8)
    kinds = "".join(t.kind for t in s.device_orders[0])
    assert kinds == "FFF" + "FB" * 5 + "BBB"
    assert "".join(t.kind for t in s.device_orders[3]) == "FB" * 8


def test_gpipe_table_text():
    assert sched.gpipe(2, 2).table() == (
        "dev0 | F0 F1 .  .  B0 B1\n"
        "dev1 | .  F0 F1 B0 B1 ."
    )


def test_interleaved_places_stage_on_device_modulo():
    s = sched.interleaved_1f1b(2, 4, 3)
    assert s.num_stages == 6
    assert {t.stage for t in s.device_orders[1]} == {1, 3, 5}


def test_interleaved_rejects_microbatches_not_multiple_of_devices():
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        sched.interleaved_1f1b(4, 6, 2)


def test_make_schedule_unknown_name():
    with pytest.raises(ValueError, match="schedule='pipedream'"):
        sched.make_schedule("pipedream", 2, 2)


def test_non_positive_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_microbatches=0"):
        sched.gpipe(2, 0)
    with pytest.raises(ValueError, match="num_stages=True"):
        sched.one_f_one_b(True, 2)


def test_schedule_rejects_missing_task():
    orders = [[Task("F", 0, 0)], [Task("F", 1, 0), Task("B", 1, 0)]]
    with pytest.raises(ValueError, match="exactly once"):
        Schedule("custom", 2, 1, orders)


def test_schedule_rejects_task_on_wrong_device():
    orders = [[Task("F", 1, 0), Task("B", 1, 0)], [Task("F", 0, 0), Task("B", 0, 0)]]
    with pytest.raises(ValueError, match="runs on device"):
        Schedule("custom", 2, 1, orders)


def test_schedule_detects_deadlock():
    orders = [
        [Task("B", 0, 0), Task("F", 0, 0)],
        [Task("F", 1, 0), Task("B", 1, 0)],
    ]
    with pytest.raises(ValueError, match="deadlocks"):
        Schedule("custom", 2, 1, orders)


def test_task_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind='W'"):
        Task("W", 0, 0)
