"""bncore.dask on real dask arrays (local synchronous and threaded
schedulers) against in-memory bncore and the float64 reference."""

import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")

import bncore  # noqa: E402
import bncore.dask as bdask  # noqa: E402
from bncore import reference  # noqa: E402
from bncore.stats import Moments  # noqa: E402
from conftest import (  # noqa: E402
    DTYPE_PARAMS,
    assert_output_close,
    assert_stats_close,
    channel_condition,
    channel_spread,
    make_input,
    make_params,
)

# (shape, axis, chunks): the feature axis whole or cut, ragged last chunks,
# channels-last, a middle axis.
CHUNKINGS = [
    ((50, 4), 1, (7, 4)),
    ((50, 4), 1, (16, 3)),
    ((9, 5, 6, 4), 1, (2, 5, 4, 3)),
    ((9, 5, 6, 4), 1, (4, 2, 6, 1)),
    ((6, 5, 4, 7), -1, (5, 2, 4, 3)),
    ((3, 4, 10, 2), 2, (1, 3, 4, 2)),
]
CHUNK_IDS = ["NC", "NC-cut-features", "NCHW", "NCHW-cut-features", "NHWC", "middle-axis"]


@pytest.fixture(params=["synchronous", "threads"])
def scheduler(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("shape, axis, chunks", CHUNKINGS, ids=CHUNK_IDS)
def test_moments_match_in_memory_and_reference(shape, axis, chunks, dtype, scheduler):
    x = make_input(shape, dtype, axis, seed=700)
    darr = da.from_array(x, chunks=chunks)
    for ddof in (0, 1):
        mean, var = bdask.moments(darr, axis, ddof=ddof, scheduler=scheduler)
        assert mean.dtype == var.dtype == np.float64
        assert mean.flags.writeable
        rmean, rvar = reference.moments(x, axis=axis, ddof=ddof)
        spread, cond = channel_spread(x, axis), channel_condition(x, axis)
        assert_stats_close(mean, rmean, dtype, scale=spread, what="mean")
        assert_stats_close(var, rvar, dtype, what="var", cond=cond)
        mmean, mvar = bncore.moments(x, axis=axis, ddof=ddof)
        assert_stats_close(mean, mmean, dtype, scale=spread, what="mean vs bncore")
        assert_stats_close(var, mvar, dtype, what="var vs bncore", cond=cond)


def test_moments_are_bitwise_the_same_for_any_scheduler():
    x = make_input((64, 6, 5), np.float64, 1, seed=701)
    darr = da.from_array(x, chunks=(5, 4, 3))
    results = [bdask.partial_moments(darr, num_threads=1).compute(scheduler=s)
               for s in ("synchronous", "threads", "threads", "synchronous")]
    for other in results[1:]:
        assert other.count == results[0].count == 64 * 5
        np.testing.assert_array_equal(other.mean, results[0].mean)
        np.testing.assert_array_equal(other.m2, results[0].m2)


def test_partial_moments_is_lazy_and_merges_with_others():
    x = make_input((30, 3), np.float64, 1, seed=702)
    first, second = da.from_array(x[:11], chunks=4), da.from_array(x[11:], chunks=7)
    lazy = bdask.partial_moments(first)
    assert not isinstance(lazy, Moments)  # a Delayed until computed
    merged = lazy.compute() + bdask.partial_moments(second).compute()
    rmean, rvar = reference.moments(x)
    assert_stats_close(merged.mean, rmean, np.float64, scale=channel_spread(x, 1))
    assert_stats_close(merged.var(), rvar, np.float64, cond=channel_condition(x, 1))


def test_moments_of_a_single_block_are_the_kernels():
    x = make_input((20, 3, 4), np.float32, 1, seed=703)
    mean, var = bdask.moments(da.from_array(x, chunks=x.shape))
    want_mean, want_var = bncore.moments(x)
    np.testing.assert_array_equal(mean, want_mean)
    np.testing.assert_array_equal(var, want_var)


def test_moments_with_empty_blocks_and_empty_arrays():
    x = make_input((10, 3), np.float64, 1, seed=704)
    darr = da.concatenate([da.from_array(x[:4]), da.zeros((0, 3)), da.from_array(x[4:])])
    mean, var = bdask.moments(darr)
    rmean, rvar = reference.moments(x)
    assert_stats_close(mean, rmean, np.float64, scale=channel_spread(x, 1))
    assert_stats_close(var, rvar, np.float64, cond=channel_condition(x, 1))
    empty_mean, empty_var = bdask.moments(da.zeros((0, 3)))
    assert np.isnan(empty_mean).all() and np.isnan(empty_var).all()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("shape, axis, chunks", CHUNKINGS, ids=CHUNK_IDS)
def test_batch_norm_matches_in_memory_and_reference(shape, axis, chunks, dtype, scheduler):
    x = make_input(shape, dtype, axis, seed=710)
    c = shape[axis]
    weight, bias, running_mean, running_var = make_params(c, dtype, seed=711)
    darr = da.from_array(x, chunks=chunks)
    y = bdask.batch_norm(darr, running_mean, running_var, weight, bias, eps=1e-3, axis=axis)
    assert isinstance(y, da.Array)
    assert y.dtype == x.dtype and y.shape == x.shape and y.chunks == darr.chunks
    got = y.compute(scheduler=scheduler)
    want = bncore.batch_norm(x, running_mean, running_var, weight, bias, eps=1e-3, axis=axis)
    # Eval normalization is elementwise: blocking cannot change a bit.
    np.testing.assert_array_equal(got, want)
    ref = reference.batch_norm(x, running_mean, running_var, weight, bias, eps=1e-3,
                               axis=axis)
    assert_output_close(got, ref.y, dtype)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_batch_norm_with_its_own_moments_is_training_mode(affine):
    x = make_input((24, 5, 6), np.float64, 1, seed=720)
    weight, bias, _, _ = make_params(5, np.float64, seed=721)
    weight = weight if affine == "weight" else None
    bias = bias if affine == "bias" else None
    darr = da.from_array(x, chunks=(5, 2, 6))
    mean, var = bdask.moments(darr)
    got = bdask.batch_norm(darr, mean, var, weight, bias).compute()
    ref = reference.batch_norm(x, None, None, weight, bias, training=True)
    assert_output_close(got, ref.y, np.float64)


def test_batch_norm_is_lazy():
    calls = []

    def block(value):
        calls.append(value)
        return np.full((4, 3), value, dtype=np.float64)

    import dask

    parts = [da.from_delayed(dask.delayed(block)(float(k)), (4, 3), np.float64)
             for k in range(3)]
    y = bdask.batch_norm(da.concatenate(parts), np.zeros(3), np.ones(3), eps=0.0)
    assert calls == []
    np.testing.assert_array_equal(y.compute(), np.repeat([0.0, 1.0, 2.0], 12).reshape(12, 3))
    assert sorted(calls) == [0.0, 1.0, 2.0]


def _boolean_indexed(shape, axis, seed):
    """An in-memory array and a dask array of its rows where the first
    feature is above its median: sizes along axis 0 are unknown (NaN)."""
    x = make_input(shape, np.float64, axis, kind="normal", seed=seed)
    darr = da.from_array(x, chunks=(3,) + x.shape[1:])
    key = x[(slice(None),) + (0,) * (x.ndim - 1)]
    threshold = np.median(key)
    picked = darr[da.from_array(key, chunks=3) > threshold]
    assert np.isnan(picked.shape[0]) and np.isnan(picked.chunks[0]).all()
    return x[key > threshold], picked


@pytest.mark.parametrize("shape, axis", [((40, 3), 1), ((30, 4, 2, 3), 1),
                                         ((30, 2, 5), -1)])
def test_unknown_chunk_sizes_outside_the_feature_axis(shape, axis, scheduler):
    want_x, picked = _boolean_indexed(shape, axis, seed=740)
    mean, var = bdask.moments(picked, axis, scheduler=scheduler)
    want_mean, want_var = bncore.moments(want_x, axis=axis)
    assert_stats_close(mean, want_mean, np.float64, scale=channel_spread(want_x, axis))
    assert_stats_close(var, want_var, np.float64, cond=channel_condition(want_x, axis))
    y = bdask.batch_norm(picked, mean, var, axis=axis)
    np.testing.assert_array_equal(y.compute(scheduler=scheduler),
                                  bncore.batch_norm(want_x, mean, var, axis=axis))


def test_unknown_size_of_the_feature_axis_is_refused():
    x = da.from_array(make_input((6, 8), np.float64, 1, seed=741), chunks=3)
    picked = x[:, x[0] > 0]
    assert np.isnan(picked.shape[1])
    for call in (lambda: bdask.partial_moments(picked),
                 lambda: bdask.batch_norm(picked, np.zeros(4), np.ones(4))):
        with pytest.raises(ValueError, match=r"darr's size along the feature axis \(1\) "
                                             "is unknown"):
            call()
    # With the features on axis 0, the unknown axis is reduced over: fine.
    mean, _ = bdask.moments(picked, axis=0)
    np.testing.assert_allclose(mean, picked.compute().mean(axis=1), rtol=1e-12)


@pytest.mark.parametrize("num_threads, error, text", [
    (0, ValueError, "num_threads must be at least 1"),
    ("2", TypeError, "num_threads must be a positive integer"),
])
def test_num_threads_is_checked_before_anything_is_computed(num_threads, error, text):
    x = da.zeros((6, 3), chunks=2)
    with pytest.raises(error, match=text):
        bdask.partial_moments(x, num_threads=num_threads)
    with pytest.raises(error, match=text):
        bdask.moments(x, num_threads=num_threads)
    with pytest.raises(error, match=text):
        bdask.batch_norm(x, np.zeros(3), np.ones(3), num_threads=num_threads)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_matches_in_memory(dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = make_input((24, 5, 3), np.float64, 1, kind="normal", seed=750).astype(dtype)
    darr = da.from_array(x, chunks=(5, 2, 3))
    mean, var = bdask.moments(darr)
    want_mean, want_var = bncore.moments(x)
    # The same float64 statistics of the same half values, merged in
    # another order.
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, want_var, rtol=1e-12)
    weight, bias, _, _ = make_params(5, np.float32, seed=751)
    y = bdask.batch_norm(darr, mean, var, weight, bias)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y.compute(), bncore.batch_norm(x, mean, var, weight, bias))


def test_errors_name_the_argument():
    x = da.zeros((6, 3), chunks=2)
    with pytest.raises(TypeError, match="darr must be a dask array"):
        bdask.moments(np.zeros((6, 3)))
    with pytest.raises(TypeError, match="darr must have dtype float32, float64"):
        bdask.moments(da.zeros((6, 3), dtype=np.int32))
    with pytest.raises(ValueError, match=r"darr must have at least 2 dimensions.*\(6,\)"):
        bdask.partial_moments(da.zeros(6))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        bdask.moments(x, axis=2)
    with pytest.raises(ValueError, match="ddof must be >= 0"):
        bdask.moments(x, ddof=-1)
    with pytest.raises(ValueError, match=r"var has shape \(4,\), expected \(3,\)"):
        bdask.batch_norm(x, np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match=r"bias has shape \(2,\)"):
        bdask.batch_norm(x, np.zeros(3), np.ones(3), bias=np.zeros(2))
    with pytest.raises(TypeError, match="mean is required"):
        bdask.batch_norm(x, None, np.ones(3))
    with pytest.raises(ValueError, match="eps must be"):
        bdask.batch_norm(x, np.zeros(3), np.ones(3), eps=-1.0)


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r'pip install "bncore\[dask\]"'):
        bdask.moments(object())
