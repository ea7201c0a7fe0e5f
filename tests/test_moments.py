"""bncore.moments against the reference: every layout, both dtypes, ddof,
degenerate counts."""

import numpy as np
import pytest

import bncore
from bncore import reference
from conftest import (
    DTYPE_PARAMS,
    LARGE_LAYOUT_PARAMS,
    LAYOUT_PARAMS,
    assert_stats_close,
    channel_condition,
    channel_spread,
    make_input,
    n_channels,
)


def _check(x, axis, dtype, ddof=0):
    before = x.copy()
    mean, var = bncore.moments(x, axis=axis, ddof=ddof)
    rmean, rvar = reference.moments(x, axis=axis, ddof=ddof)
    np.testing.assert_array_equal(x, before)
    c = n_channels(x.shape, axis)
    for a in (mean, var):
        assert isinstance(a, np.ndarray)
        assert a.dtype == np.float64
        assert a.shape == (c,)
    assert_stats_close(mean, rmean, dtype, scale=channel_spread(x, axis), what="mean")
    assert_stats_close(var, rvar, dtype, what="var", cond=channel_condition(x, axis))
    return mean, var


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_matches_reference(layout, dtype, ddof):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=20 + len(shape))
    _check(x, axis, dtype, ddof)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LARGE_LAYOUT_PARAMS)
def test_large_matches_reference(layout, dtype):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=21)
    _check(x, axis, dtype, ddof=1)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_default_axis_and_ddof(dtype):
    x = make_input((6, 3, 4), dtype, 1, seed=22)
    a = bncore.moments(x)
    b = bncore.moments(x, axis=1, ddof=0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_matches_numpy_float64():
    x = make_input((7, 4, 6), np.float64, 1, kind="normal", seed=23)
    mean, var = bncore.moments(x, ddof=1)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=(0, 2), ddof=1), rtol=1e-12)


def test_ddof_relation():
    x = make_input((5, 3, 2), np.float64, 1, kind="normal", seed=24)
    _, v0 = bncore.moments(x, ddof=0)
    _, v1 = bncore.moments(x, ddof=1)
    _, v2 = bncore.moments(x, ddof=2)
    n = 10
    np.testing.assert_allclose(v1, v0 * n / (n - 1), rtol=1e-13)
    np.testing.assert_allclose(v2, v0 * n / (n - 2), rtol=1e-13)


@pytest.mark.parametrize("shape, ddof", [((1, 3), 1), ((1, 3), 2), ((2, 3), 2), ((2, 3), 3),
                                         ((1, 3, 1, 1), 1)])
def test_nan_when_n_minus_ddof_not_positive(shape, ddof):
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    mean, var = bncore.moments(x, ddof=ddof)
    assert np.isnan(var).all()
    assert np.isfinite(mean).all()
    np.testing.assert_array_equal(mean, reference.moments(x)[0])


def test_single_value_ddof0():
    x = np.array([[1.5, -2.0, 3.0]])
    mean, var = bncore.moments(x)
    np.testing.assert_array_equal(mean, [1.5, -2.0, 3.0])
    np.testing.assert_array_equal(var, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("shape, axis", [((0, 4), 1), ((3, 2, 0), 1), ((0, 2, 3), -1)])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_empty_gives_nan(shape, axis, dtype):
    mean, var = bncore.moments(np.zeros(shape, dtype), axis=axis)
    c = n_channels(shape, axis)
    assert mean.shape == (c,) and var.shape == (c,)
    assert np.isnan(mean).all() and np.isnan(var).all()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_non_contiguous(dtype):
    x = make_input((6, 4, 5), dtype, 1, seed=25)
    m1, v1 = bncore.moments(x)
    m2, v2 = bncore.moments(np.asfortranarray(x))
    big = np.zeros((12, 4, 5), dtype)
    big[1::2] = x
    m3, v3 = bncore.moments(big[1::2])
    for m, v in ((m2, v2), (m3, v3)):
        np.testing.assert_array_equal(m, m1)
        np.testing.assert_array_equal(v, v1)


def test_list_input():
    mean, var = bncore.moments([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(mean, [2.0, 4.0], rtol=1e-15)
    np.testing.assert_allclose(var, [1.0, 4.0], rtol=1e-15)


def test_consistent_with_batch_norm_stats():
    x = make_input((9, 5, 3), np.float32, 1, seed=26)
    mean, var = bncore.moments(x)
    _, bmean, binvstd = bncore.batch_norm(x, training=True, eps=1e-5, return_stats=True)
    np.testing.assert_array_equal(bmean, mean)
    np.testing.assert_allclose(binvstd, 1.0 / np.sqrt(var + 1e-5), rtol=1e-14)
