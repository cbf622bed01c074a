"""Tests for the pure-Python fusion-bucket planner."""

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tf_smdist.data_parallel import buckets as buckets_lib
from tf_smdist.data_parallel.buckets import dtype_size, plan_buckets

MIB = 1024 * 1024


def test_buckets_fill_in_reverse_order():
    shapes = [(256, 128), (128,), (128, 10), (10,)]
    plan = plan_buckets(shapes, ["float32"] * 4, bucket_cap_mb=0.01)
    assert [b.tensor_indices for b in plan.buckets] == [(3, 2, 1), (0,)]
    assert [b.index for b in plan.buckets] == [0, 1]
    assert plan.buckets[0].shapes == ((10,), (128, 10), (128,))
    assert plan.buckets[0].num_elements == 10 + 1280 + 128
    assert plan.buckets[0].nbytes == 4 * (10 + 1280 + 128)


def test_large_cap_gives_one_bucket_per_dtype():
    plan = plan_buckets([(3,), (4, 4), (2,)], ["float32"] * 3, bucket_cap_mb=25.0)
    assert [b.tensor_indices for b in plan.buckets] == [(2, 1, 0)]
    assert plan.num_buckets == 1


def test_tiny_cap_gives_every_tensor_its_own_bucket():
    shapes = [(5, 3), (3,), (7,), ()]
    plan = plan_buckets(shapes, ["float32"] * 4, bucket_cap_mb=1e-9)
    assert [b.tensor_indices for b in plan.buckets] == [(3,), (2,), (1,), (0,)]
    assert [b.shapes for b in plan.buckets] == [((),), ((7,),), ((3,),), ((5, 3),)]


def test_tensor_larger_than_cap_is_not_split():
    plan = plan_buckets(
        [(10,), (1000,), (10,)], ["float32"] * 3, bucket_cap_mb=100 / MIB
    )
    assert [b.tensor_indices for b in plan.buckets] == [(2,), (1,), (0,)]
    assert plan.buckets[1].num_elements == 1000


def test_cap_is_filled_exactly_before_closing():
    # 4 tensors of 25 float32 = 100 bytes each; cap 200 bytes -> pairs.
    plan = plan_buckets([(25,)] * 4, ["float32"] * 4, bucket_cap_mb=200 / MIB)
    assert [b.tensor_indices for b in plan.buckets] == [(3, 2), (1, 0)]


def test_dtypes_never_share_a_bucket():
    dtypes = ["float32", "float16", "float32", "bfloat16", "float16"]
    plan = plan_buckets([(4,)] * 5, dtypes, bucket_cap_mb=25.0)
    assert [(b.tensor_indices, b.dtype) for b in plan.buckets] == [
        ((4, 1), "float16"),
        ((3,), "bfloat16"),
        ((2, 0), "float32"),
    ]
    assert plan.buckets[0].nbytes == 16


def test_plan_is_deterministic_and_fingerprint_tracks_it():
    shapes = [(3, 3), (3,), (3, 2), (2,)]
    a = plan_buckets(shapes, ["float32"] * 4, bucket_cap_mb=40 / MIB)
    b = plan_buckets(list(shapes), ["float32"] * 4, bucket_cap_mb=40 / MIB)
    c = plan_buckets(shapes, ["float32"] * 4, bucket_cap_mb=25.0)
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_bucket_of_finds_each_tensor():
    plan = plan_buckets([(1,), (1,), (1,)], ["float32"] * 3, bucket_cap_mb=8 / MIB)
    assert [plan.bucket_of(i) for i in range(3)] == [1, 0, 0]
    with pytest.raises(ValueError, match="tensor_index=3"):
        plan.bucket_of(3)


def test_empty_tensor_list_gives_empty_plan():
    plan = plan_buckets([], [], bucket_cap_mb=1.0)
    assert plan.buckets == ()
    assert plan.num_tensors == 0


def test_repr_names_the_sizes():
    plan = plan_buckets([(2,)], ["float32"], bucket_cap_mb=1.0)
    assert repr(plan) == (
        "BucketPlan(num_tensors=1, num_buckets=1, total_bytes=8, "
        f"bucket_cap_bytes={MIB})"
    )


@pytest.mark.parametrize("cap", [0, -1.0, float("nan"), float("inf")])
def test_non_positive_cap_is_rejected(cap):
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        plan_buckets([(1,)], ["float32"], bucket_cap_mb=cap)


def test_non_numeric_cap_is_a_type_error():
    with pytest.raises(TypeError, match="bucket_cap_mb='25'"):
        plan_buckets([(1,)], ["float32"], bucket_cap_mb="25")


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="len\\(shapes\\)=2, len\\(dtypes\\)=1"):
        plan_buckets([(1,), (2,)], ["float32"], bucket_cap_mb=1.0)


def test_undefined_shape_is_rejected():
    with pytest.raises(ValueError, match="fully defined"):
        plan_buckets([(None, 3)], ["float32"], bucket_cap_mb=1.0)


def test_unknown_dtype_is_rejected():
    assert dtype_size("bfloat16") == 2
    with pytest.raises(ValueError, match="dtype='string'"):
        plan_buckets([(1,)], ["string"], bucket_cap_mb=1.0)


def test_docstring_examples_run():
    failures, _ = doctest.testmod(buckets_lib)
    assert failures == 0


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), max_size=25),
    dtypes=st.lists(
        st.sampled_from(["float32", "float16", "bfloat16"]), min_size=25, max_size=25
    ),
    cap_bytes=st.integers(min_value=1, max_value=2000),
)
def test_plan_invariants(sizes, dtypes, cap_bytes):
    dtypes = dtypes[: len(sizes)]
    shapes = [(n,) for n in sizes]
    plan = plan_buckets(shapes, dtypes, bucket_cap_mb=cap_bytes / MIB)
    # Every tensor appears exactly once, whole.
    seen = sorted(i for b in plan.buckets for i in b.tensor_indices)
    assert seen == list(range(len(sizes)))
    for b in plan.buckets:
        assert all(dtypes[i] == b.dtype for i in b.tensor_indices)
        assert b.num_elements == sum(sizes[i] for i in b.tensor_indices)
        assert b.nbytes == b.num_elements * dtype_size(b.dtype)
        # Within a bucket the tensors are in reverse list order.
        assert list(b.tensor_indices) == sorted(b.tensor_indices, reverse=True)
        # Only a lone tensor may exceed the cap.
        assert b.nbytes <= plan.bucket_cap_bytes or len(b.tensor_indices) == 1
    # Buckets are ordered by their first tensor in reverse order.
    firsts = [b.tensor_indices[0] for b in plan.buckets]
    assert firsts == sorted(firsts, reverse=True)
