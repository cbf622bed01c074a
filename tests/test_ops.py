"""SmdistPack, SmdistUnpack and SmdistHostReduce against NumPy references."""

import itertools
import threading

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_smdist as smd
from tf_smdist import _ops

DTYPES = {
    "float32": (tf.float32, np.float32),
    "float16": (tf.float16, np.float16),
    "bfloat16": (tf.bfloat16, ml_dtypes.bfloat16),
}
PAIRS = list(itertools.product(DTYPES, DTYPES))


def _random(rng, shape, dtype_name):
    return rng.standard_normal(shape).astype(np.float32).astype(DTYPES[dtype_name][1])


def _bits(array):
    """The raw bits, so NaNs and signed zeros compare exactly."""
    array = np.ascontiguousarray(array)
    return array.view(np.uint16 if array.dtype.itemsize == 2 else np.uint32)


def _flushed_bits(array):
    """Bits as float32 with subnormals flushed to signed zero.

    TensorFlow runs CPU kernels with denormals flushed (its worker threads set
    flush-to-zero), NumPy does not; results in the subnormal range of float32
    (and bfloat16, which shares its exponent range) may be either.
    """
    f = np.asarray(array).astype(np.float32)
    f = np.where(np.abs(f) < np.finfo(np.float32).tiny, np.copysign(0.0, f), f)
    return _bits(f.astype(np.float32))


def _ref_pack(arrays, scale, out):
    flat = [a.astype(np.float32).ravel() * np.float32(scale) for a in arrays]
    return np.concatenate(flat).astype(DTYPES[out][1])


def _ref_reduce(arrays, scale, out):
    acc = arrays[0].astype(np.float32)
    for a in arrays[1:]:
        acc = acc + a.astype(np.float32)
    return (acc * np.float32(scale)).astype(DTYPES[out][1])


@pytest.mark.parametrize("src,out", PAIRS)
@pytest.mark.parametrize("sizes", [[0], [1], [7], [3, 0, 5, 1], [1001, 17, 4096]])
def test_pack_matches_numpy(src, out, sizes):
    rng = np.random.default_rng(len(sizes))
    arrays = [_random(rng, [n], src) for n in sizes]
    got = smd.pack(arrays, scale=0.37, out_type=DTYPES[out][0]).numpy()
    np.testing.assert_array_equal(_bits(got), _bits(_ref_pack(arrays, 0.37, out)))


@pytest.mark.parametrize("src,out", PAIRS)
def test_unpack_matches_numpy(src, out):
    rng = np.random.default_rng(1)
    shapes = [[2, 3], [0], [1], [5, 1, 7]]
    packed = _random(rng, [sum(int(np.prod(s)) for s in shapes)], src)
    got = smd.unpack(packed, shapes, out_type=DTYPES[out][0])
    start = 0
    for shape, tensor in zip(shapes, got):
        n = int(np.prod(shape))
        want = packed[start:start + n].astype(np.float32).astype(DTYPES[out][1])
        assert tensor.shape == shape
        np.testing.assert_array_equal(_bits(tensor.numpy()).ravel(), _bits(want))
        start += n


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pack_unpack_round_trip_is_exact(dtype):
    rng = np.random.default_rng(2)
    shapes = [[3, 4], [1], [0, 2], [9], [2, 2, 2]]
    arrays = [_random(rng, s, dtype) for s in shapes]
    packed = smd.pack(arrays)
    assert packed.dtype == DTYPES[dtype][0]
    for a, b in zip(arrays, smd.unpack(packed, shapes)):
        np.testing.assert_array_equal(_bits(a), _bits(b.numpy()))


@pytest.mark.parametrize("src,out", PAIRS)
@pytest.mark.parametrize("n", range(1, 9))
def test_host_reduce_matches_float32_accumulation(src, out, n):
    rng = np.random.default_rng(n)
    arrays = [_random(rng, [2, 513], src) for _ in range(n)]
    got = smd.host_reduce(arrays, scale=1.0 / n, out_type=DTYPES[out][0]).numpy()
    np.testing.assert_array_equal(_bits(got), _bits(_ref_reduce(arrays, 1.0 / n, out)))


@pytest.mark.parametrize("src,out", [("float32", "float32"), ("float16", "bfloat16"),
                                     ("bfloat16", "float32")])
@pytest.mark.parametrize("n", [9, 16, 17, 30])
def test_host_reduce_many_inputs_sum_in_input_order(src, out, n):
    rng = np.random.default_rng(n)
    arrays = [_random(rng, [5000], src) for _ in range(n)]
    got = smd.host_reduce(arrays, scale=0.3, out_type=DTYPES[out][0]).numpy()
    np.testing.assert_array_equal(_bits(got), _bits(_ref_reduce(arrays, 0.3, out)))


@pytest.mark.parametrize("src", ["float16", "bfloat16"])
@pytest.mark.parametrize("n", [2, 8])
def test_host_reduce_low_precision_inputs_accumulate_in_float32(src, n):
    rng = np.random.default_rng(3)
    # Values whose float16 / bfloat16 partial sums would lose most digits.
    arrays = [_random(rng, [4096], src) * 100 + 1 for _ in range(n)]
    arrays = [a.astype(DTYPES[src][1]) for a in arrays]
    got = smd.host_reduce(arrays, scale=0.5, out_type=tf.float32).numpy()
    exact = sum(a.astype(np.float64) for a in arrays) * 0.5
    magnitude = sum(np.abs(a.astype(np.float64)) for a in arrays) * 0.5
    # n roundings of float32 (unit roundoff 2^-24) on partial sums.
    np.testing.assert_array_less(np.abs(got - exact), n * 2.0**-24 * magnitude + 1e-30)
    # A low-precision accumulator would be far off.
    low = arrays[0]
    for a in arrays[1:]:
        low = (low + a).astype(DTYPES[src][1])
    assert np.max(np.abs(low.astype(np.float64) * 0.5 - exact)) > np.max(
        np.abs(got - exact)
    )


@pytest.mark.parametrize("src,out", [("float32", "float32"), ("float32", "bfloat16"),
                                     ("float16", "float32")])
def test_ops_on_buffers_over_64_mib(src, out):
    n = 17 * 2**20  # 68 MiB of float32
    rng = np.random.default_rng(4)
    a = _random(rng, [n], src)
    b = _random(rng, [n], src)
    got = smd.host_reduce([a, b], scale=0.5, out_type=DTYPES[out][0]).numpy()
    np.testing.assert_array_equal(_bits(got), _bits(_ref_reduce([a, b], 0.5, out)))
    packed = smd.pack([a[:n // 2], b], scale=2.0, out_type=DTYPES[out][0]).numpy()
    np.testing.assert_array_equal(
        _bits(packed), _bits(_ref_pack([a[:n // 2], b], 2.0, out))
    )
    back = smd.unpack(packed, [[n // 2], [n]], out_type=DTYPES[src][0])
    np.testing.assert_array_equal(
        _bits(back[1].numpy()), _bits(packed[n // 2:].astype(np.float32).astype(
            DTYPES[src][1]))
    )


def test_non_finite_values_propagate():
    x = np.array([np.inf, -np.inf, np.nan, 1.0, 70000.0], np.float32)
    packed = smd.pack([x], out_type=tf.float16).numpy()
    assert np.isposinf(packed[0]) and np.isneginf(packed[1]) and np.isnan(packed[2])
    assert packed[3] == 1 and np.isposinf(packed[4])  # overflow to float16 inf
    bf = smd.pack([x], out_type=tf.bfloat16).numpy().astype(np.float32)
    assert np.isposinf(bf[0]) and np.isneginf(bf[1]) and np.isnan(bf[2])
    reduced = smd.host_reduce([x, np.ones_like(x)]).numpy()
    assert np.isposinf(reduced[0]) and np.isneginf(reduced[1]) and np.isnan(reduced[2])
    mixed = smd.host_reduce([np.float32([np.inf]), np.float32([-np.inf])]).numpy()
    assert np.isnan(mixed[0])


def test_float16_subnormals_convert_exactly():
    every_half = np.arange(2**16, dtype=np.uint16).view(np.float16)
    got = smd.pack([every_half], out_type=tf.float32).numpy()
    want = every_half.astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(_bits(got[finite]), _bits(want[finite]))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    back = smd.pack([want], out_type=tf.float16).numpy()
    np.testing.assert_array_equal(_bits(back[finite]), _bits(every_half[finite]))


def test_host_reduce_unequal_shapes_is_an_error():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"inputs\[1\]"):
        smd.host_reduce([tf.zeros([3]), tf.zeros([4])])
    raw = _ops.load_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"inputs\[2\]"):
        raw.smdist_host_reduce(
            [tf.zeros([2, 2]), tf.zeros([2, 2]), tf.zeros([4])], out_type=tf.float32
        )


def test_unpack_shapes_not_adding_up_is_an_error():
    with pytest.raises(tf.errors.InvalidArgumentError, match="`packed` has 5 elements"):
        smd.unpack(tf.zeros([5]), [[2], [2]])

    @tf.function(input_signature=[tf.TensorSpec([None])])
    def dynamic(x):
        return smd.unpack(x, [[2], [2]])

    with pytest.raises(tf.errors.InvalidArgumentError, match="add up to 4"):
        dynamic(tf.zeros([5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="1-D"):
        smd.unpack(tf.zeros([2, 2]), [[4]])


@pytest.mark.parametrize("dtype", [tf.float64, tf.int32, tf.complex64])
def test_unsupported_dtypes_are_errors(dtype):
    x = tf.zeros([3], dtype)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"tensors\[0\]"):
        smd.pack([x])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"inputs\[0\]"):
        smd.host_reduce([x])
    with pytest.raises(tf.errors.InvalidArgumentError, match="out_type"):
        smd.pack([tf.zeros([3])], out_type=dtype)
    with pytest.raises(tf.errors.InvalidArgumentError, match="packed"):
        smd.unpack(x, [[3]])


def test_mixed_input_dtypes_are_errors():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"tensors\[1\]"):
        smd.pack([tf.zeros([3]), tf.zeros([3], tf.float16)])


def test_empty_input_lists_are_errors():
    with pytest.raises(tf.errors.InvalidArgumentError, match="tensors"):
        smd.pack([])
    with pytest.raises(tf.errors.InvalidArgumentError, match="inputs"):
        smd.host_reduce([])
    with pytest.raises(tf.errors.InvalidArgumentError, match="shapes"):
        smd.unpack(tf.zeros([0]), [])


def test_pack_and_unpack_gradients():
    x = tf.random.normal([2, 3])
    y = tf.random.normal([4])
    w = tf.random.normal([10])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, y])
        packed = smd.pack([x, y], scale=3.0)
        loss = tf.reduce_sum(w * packed)
        parts = smd.unpack(packed, [[2, 3], [4]])
        loss2 = tf.reduce_sum(parts[0] * 2.0)  # parts[1] unused: zero gradient
    gx, gy = tape.gradient(loss, [x, y])
    np.testing.assert_allclose(gx.numpy(), 3.0 * w.numpy()[:6].reshape(2, 3))
    np.testing.assert_allclose(gy.numpy(), 3.0 * w.numpy()[6:])
    gx2, gy2 = tape.gradient(loss2, [x, y])
    np.testing.assert_allclose(gx2.numpy(), np.full([2, 3], 6.0))
    np.testing.assert_array_equal(gy2.numpy(), np.zeros([4]))


def test_pack_gradient_with_dynamic_shapes():
    @tf.function(input_signature=[tf.TensorSpec([None, 2]), tf.TensorSpec([None])])
    def grads(x, y):
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            loss = tf.reduce_sum(tf.range(8.0) * smd.pack([x, y], scale=0.5))
        return tape.gradient(loss, [x, y])

    gx, gy = grads(tf.zeros([3, 2]), tf.zeros([2]))
    np.testing.assert_allclose(gx.numpy(), 0.5 * np.arange(6.0).reshape(3, 2))
    np.testing.assert_allclose(gy.numpy(), 0.5 * np.arange(6.0, 8.0))


def test_static_shapes_are_inferred_in_graphs():
    @tf.function
    def f(a, b):
        packed = smd.pack([a, b])
        parts = smd.unpack(packed, [[2, 3], [5]])
        reduced = smd.host_reduce([a, a])
        assert packed.shape == [11]
        assert [p.shape for p in parts] == [[2, 3], [5]]
        assert reduced.shape == [2, 3]
        return packed

    f.get_concrete_function(tf.TensorSpec([2, 3]), tf.TensorSpec([5]))
    with pytest.raises(ValueError, match="add up to"):
        tf.function(lambda p: smd.unpack(p, [[3]])).get_concrete_function(
            tf.TensorSpec([4])
        )


def test_concurrent_calls_from_threads_and_functions():
    rng = np.random.default_rng(5)
    data = [[_random(rng, [50_000 + i], "float32") for _ in range(3)] for i in range(8)]
    results = [None] * len(data)
    errors = []

    @tf.function
    def step(a, b, c):
        return smd.host_reduce([a, b, c], scale=0.25), smd.pack([a, b, c], scale=2.0)

    def work(i):
        try:
            for _ in range(5):
                results[i] = [t.numpy() for t in step(*data[i])]
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not [t for t in threads if t.is_alive()], "a thread is still running"
    assert not errors
    for i, (reduced, packed) in enumerate(results):
        np.testing.assert_array_equal(reduced, _ref_reduce(data[i], 0.25, "float32"))
        np.testing.assert_array_equal(packed, _ref_pack(data[i], 2.0, "float32"))


def test_independent_ops_in_one_function_run_correctly():
    rng = np.random.default_rng(6)
    chunks = [[_random(rng, [10_000], "float32") for _ in range(4)] for _ in range(6)]

    @tf.function
    def many():
        return [smd.host_reduce(c, scale=0.5) for c in chunks]

    for got, c in zip(many(), chunks):
        np.testing.assert_array_equal(got.numpy(), _ref_reduce(c, 0.5, "float32"))


_shapes = st.lists(
    st.lists(st.integers(0, 6), min_size=0, max_size=3), min_size=1, max_size=6
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=_shapes,
    src=st.sampled_from(list(DTYPES)),
    out=st.sampled_from(list(DTYPES)),
    scale=st.floats(-4, 4, allow_nan=False, width=32),
    seed=st.integers(0, 2**31),
)
def test_fuzz_pack_unpack_reduce(shapes, src, out, scale, seed):
    rng = np.random.default_rng(seed)
    arrays = [_random(rng, s, src) for s in shapes]
    packed = smd.pack(arrays, scale=scale, out_type=DTYPES[out][0]).numpy()
    np.testing.assert_array_equal(
        _flushed_bits(packed), _flushed_bits(_ref_pack(arrays, scale, out))
    )
    parts = smd.unpack(packed, shapes, out_type=DTYPES[src][0])
    start = 0
    for shape, part in zip(shapes, parts):
        n = int(np.prod(shape))
        want = packed[start:start + n].astype(np.float32).astype(DTYPES[src][1])
        assert part.shape == tuple(shape)
        np.testing.assert_array_equal(_bits(part.numpy()).ravel(), _bits(want))
        start += n
    same = [_random(rng, shapes[0], src) for _ in range(len(shapes))]
    got = smd.host_reduce(same, scale=scale, out_type=DTYPES[out][0]).numpy()
    np.testing.assert_array_equal(
        _flushed_bits(got), _flushed_bits(_ref_reduce(same, scale, out))
    )


@pytest.mark.parametrize("max_threads", [0, 1, 2, 3, 7, 64])
def test_host_reduce_max_threads_gives_the_same_result(max_threads):
    rng = np.random.default_rng(7)
    arrays = [_random(rng, [100_003], "float32") for _ in range(3)]
    got = smd.host_reduce(arrays, scale=0.5, max_threads=max_threads).numpy()
    np.testing.assert_array_equal(got, _ref_reduce(arrays, 0.5, "float32"))


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_host_reduce_bad_max_threads_is_an_error(bad):
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_threads"):
        smd.host_reduce([tf.zeros([3])], max_threads=bad)


def test_host_reduce_reusing_an_input_buffer_keeps_other_readers_intact():
    rng = np.random.default_rng(8)
    a, b = (_random(rng, [300_001], "float32") for _ in range(2))

    @tf.function
    def only_sum(a, b):
        x = a * 2.0  # an intermediate the op may overwrite
        return smd.host_reduce([x, b], scale=0.5)

    @tf.function
    def sum_and_input(a, b):
        x = a * 2.0
        y = b + 1.0
        return smd.host_reduce([x, y, x], scale=0.25), x, y

    want = _ref_reduce([a * np.float32(2), b], 0.5, "float32")
    np.testing.assert_array_equal(only_sum(a, b).numpy(), want)
    total, x, y = sum_and_input(a, b)
    np.testing.assert_array_equal(x.numpy(), a * np.float32(2))
    np.testing.assert_array_equal(y.numpy(), b + np.float32(1))
    np.testing.assert_array_equal(
        total.numpy(), _ref_reduce([x.numpy(), y.numpy(), x.numpy()], 0.25, "float32")
    )
