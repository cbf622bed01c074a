"""The pipeline's MatMul gradient rule gives TensorFlow's gradients."""

import numpy as np
import pytest
import tensorflow as tf

from tf_smdist import _compat


@pytest.fixture(autouse=True)
def _rule_always(monkeypatch):
    # Whether the rule's form pays is measured per machine; these tests
    # check the form itself, so they ask for it (the choice: tests below).
    monkeypatch.setenv(_compat.MATMUL_RULE_ENV, "always")


def _grads(a, b, *, rule, sources="ab", signature=None, transpose_b=False):
    @tf.function(input_signature=signature)
    def run(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = tf.matmul(a, b, transpose_b=transpose_b)
            loss = tf.reduce_sum(tf.sin(y))
        wanted = [{"a": a, "b": b}[s] for s in sources]
        if rule:
            with _compat.small_rows_matmul_gradients():
                return tape.gradient(loss, wanted)
        return tape.gradient(loss, wanted)

    return [g.numpy() for g in run(a, b)]


@pytest.mark.parametrize("rows", [3, 16, 40])  # both sides of 2 * rows <= units
@pytest.mark.parametrize("dynamic", [False, True])
def test_same_gradients_as_tensorflow(rows, dynamic):
    rng = np.random.RandomState(rows)
    a = tf.constant(rng.randn(rows, 32).astype("float32"))
    b = tf.constant(rng.randn(32, 24).astype("float32"))
    signature = ([tf.TensorSpec([None, 32]), tf.TensorSpec([None, 24])]
                 if dynamic else None)
    want = _grads(a, b, rule=False, signature=signature)
    got = _grads(a, b, rule=True, signature=signature)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sources", ["a", "b"])
def test_one_operand_only(sources):
    rng = np.random.RandomState(0)
    a = tf.constant(rng.randn(4, 32).astype("float32"))
    b = tf.constant(rng.randn(32, 32).astype("float32"))
    want = _grads(a, b, rule=False, sources=sources)
    got = _grads(a, b, rule=True, sources=sources)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_transposed_and_other_dtypes_keep_tensorflows_rule():
    rng = np.random.RandomState(1)
    a = tf.constant(rng.randn(4, 32))  # float64
    b = tf.constant(rng.randn(8, 32))
    want = _grads(a, b, rule=False, transpose_b=True)
    got = _grads(a, b, rule=True, transpose_b=True)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def _gradient_op_types(rule, device=None, rows=2):
    @tf.function
    def run(a, b):
        with tf.GradientTape() as tape:
            tape.watch(a)
            y = tf.reduce_sum(tf.matmul(a, b))
        if rule:
            with _compat.small_rows_matmul_gradients(device):
                return tape.gradient(y, a)
        return tape.gradient(y, a)

    graph = run.get_concrete_function(tf.zeros([rows, 16]), tf.zeros([16, 16])).graph
    return {op.type for op in graph.get_operations()}


def test_tensorflows_rule_is_back_even_after_an_error():
    assert "Transpose" in _gradient_op_types(True)
    with pytest.raises(RuntimeError):
        with _compat.small_rows_matmul_gradients():
            raise RuntimeError("boom")
    assert "Transpose" not in _gradient_op_types(False)


def test_second_order_gradients():
    rng = np.random.RandomState(2)
    a = tf.Variable(rng.randn(4, 16).astype("float32"))
    b = tf.Variable(rng.randn(16, 16).astype("float32"))

    def hessian_vector(rule):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                y = tf.reduce_sum(tf.tanh(tf.matmul(a, b)) ** 2)
            if rule:
                with _compat.small_rows_matmul_gradients():
                    g = inner.gradient(y, a)
            else:
                g = inner.gradient(y, a)
            z = tf.reduce_sum(g * g)
        return outer.gradient(z, b).numpy()

    np.testing.assert_allclose(hessian_vector(True), hessian_vector(False),
                               rtol=1e-4, atol=1e-5)


def test_only_for_cpu_devices():
    # GPU kernels transpose operands for free: TensorFlow's rule stays.
    assert "Transpose" not in _gradient_op_types(True, "/GPU:0")
    assert "Transpose" in _gradient_op_types(True, "/job:worker/replica:0/task:1/CPU:0")


def test_never_keeps_tensorflows_rule(monkeypatch):
    monkeypatch.setenv(_compat.MATMUL_RULE_ENV, "never")
    assert "Transpose" not in _gradient_op_types(True)


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv(_compat.MATMUL_RULE_ENV, "sometimes")
    with pytest.raises(ValueError, match="SMDIST_MATMUL_RULE must be one of measure"):
        _compat.small_rows_matmul_gradients()


@pytest.mark.parametrize("times,transposed", [((1.0, 0.5), True), ((1.0, 0.95), False)])
def test_measure_takes_the_rule_only_when_clearly_faster(monkeypatch, times,
                                                         transposed):
    monkeypatch.setenv(_compat.MATMUL_RULE_ENV, "measure")
    monkeypatch.setattr(_compat, "_through_weights_choice", {})
    calls = []

    def fake(rows, units, cols, dtype):
        calls.append((rows, units, cols, tf.as_dtype(dtype).name))
        return times

    monkeypatch.setattr(_compat, "_time_input_gradient_forms", fake)
    monkeypatch.setattr(_compat, "_measured_seconds", 0.0)
    assert ("Transpose" in _gradient_op_types(True, rows=3)) == transposed
    assert _compat._measured_seconds > 0  # counted against the budget
    # Measured once per shape and process; rows above half the weight's
    # rows are never candidates.
    assert ("Transpose" in _gradient_op_types(True, rows=3)) == transposed
    assert "Transpose" not in _gradient_op_types(True, rows=9)
    assert calls == [(3, 16, 16, "float32")]
    # A remote worker's CPU is not this process's: no measurement there.
    assert "Transpose" in _gradient_op_types(True, "/job:worker/replica:0/task:1/CPU:0",
                                             rows=4)
    assert len(calls) == 1


def test_past_the_budget_shapes_take_the_rule_unmeasured(monkeypatch):
    monkeypatch.setenv(_compat.MATMUL_RULE_ENV, "measure")
    monkeypatch.setattr(_compat, "_through_weights_choice", {})
    monkeypatch.setattr(_compat, "_measured_seconds", _compat._MEASURE_BUDGET_S + 1)
    calls = []
    monkeypatch.setattr(_compat, "_time_input_gradient_forms",
                        lambda *args: calls.append(args) or (1.0, 1.0))
    assert "Transpose" in _gradient_op_types(True, rows=3)
    assert calls == []


def test_the_measurement_times_both_forms():
    for dtype in (tf.float32, tf.bfloat16):
        direct, through = _compat._time_input_gradient_forms(8, 64, 32, dtype,
                                                             copies=2, repeats=3)
        assert 0 < direct < 1 and 0 < through < 1
    # The default run count shrinks with the product (one 32 x 1024 x 1024
    # product: 67 MFLOP).
    direct, through = _compat._time_input_gradient_forms(32, 1024, 1024, tf.float32)
    assert 0 < direct < 1 and 0 < through < 1
