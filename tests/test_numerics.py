"""Adversarial numerics: large offsets, constant channels, float64 exactness.

The contract: float32 data are accumulated in float64 with a stable
algorithm; a mean 1e4 times the spread still gives the variance to about
1e-6 relative and the normalized output to about 1e-5 absolute; a constant
channel has variance exactly 0 and its output is exactly the bias.
"""

import math

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference
from conftest import (
    DTYPE_PARAMS,
    LARGE_LAYOUT_PARAMS,
    LAYOUT_PARAMS,
    assert_stats_close,
    channel_condition,
    make_input,
    make_params,
    n_channels,
)

OFFSET_LAYOUTS = [LAYOUT_PARAMS[0], LAYOUT_PARAMS[2], LAYOUT_PARAMS[4], LAYOUT_PARAMS[7],
                  LAYOUT_PARAMS[15]] + LARGE_LAYOUT_PARAMS


def _offset_data(shape, axis, dtype, ratio, spread, seed):
    """Every channel: mean = ratio * spread (sign alternating), spread given."""
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    c = shape[ax]
    sign = np.where(np.arange(c) % 2 == 0, 1.0, -1.0)
    bshape = [1] * len(shape)
    bshape[ax] = c
    loc = (sign * ratio * spread).reshape(bshape)
    x = loc + spread * rng.standard_normal(shape)
    return x.astype(dtype)


@pytest.mark.parametrize("spread", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("layout", OFFSET_LAYOUTS)
def test_float32_offset_1e4(layout, spread):
    shape, axis = layout
    x = _offset_data(shape, axis, np.float32, 1e4, spread, seed=200)
    ref = reference.batch_norm(x, training=True, axis=axis)
    rmean, rvar = reference.moments(x, axis=axis)

    mean, var = bncore.moments(x, axis=axis)
    np.testing.assert_allclose(var, rvar, rtol=1e-6, atol=0)
    # the mean to 1e-6 of the spread (a 1e4 offset leaves 1e-10 relative)
    np.testing.assert_allclose(mean, rmean, rtol=0, atol=1e-6 * spread)

    y, bmean, binvstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    np.testing.assert_allclose(binvstd, ref.invstd, rtol=1e-6, atol=0)
    np.testing.assert_allclose(bmean, ref.mean, rtol=0, atol=1e-6 * spread)
    # unit-scale output (|y| <~ 5): 1e-5 absolute is the contract
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", OFFSET_LAYOUTS)
def test_float32_offset_eval_with_matching_running_stats(layout):
    """Eval with running statistics that match the data (the normal case after
    training): the normalized output must still be accurate to 1e-5, which a
    folded x * scale + shift in float32 (error ~ ulp(1e4) ~ 1e-3) is not."""
    shape, axis = layout
    x = _offset_data(shape, axis, np.float32, 1e4, 1.0, seed=201)
    rmean, rvar = reference.moments(x, axis=axis)
    rm, rv = rmean.astype(np.float32), rvar.astype(np.float32)
    ref = reference.batch_norm(x, rm, rv, training=False, axis=axis)
    y = bncore.batch_norm(x, rm, rv, training=False, axis=axis)
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", OFFSET_LAYOUTS)
def test_float64_offset_1e8(layout):
    """float64 with the mean 1e8 times the spread: E[x^2] - E[x]^2 would lose
    everything (1e16 * 2e-16 ~ 2 spreads^2, relative error ~1); Chan's merge
    keeps the variance to ~eps * kappa ~ 1e-8 (see conftest: 16 eps kappa)."""
    shape, axis = layout
    x = _offset_data(shape, axis, np.float64, 1e8, 1.0, seed=202)
    rmean, rvar = reference.moments(x, axis=axis)
    mean, var = bncore.moments(x, axis=axis)
    assert_stats_close(var, rvar, np.float64, cond=channel_condition(x, axis), what="var")
    assert (np.abs(var - rvar) < 1e-6 * rvar).all()  # far from the naive formula's ~1
    # ulp(1e8) = 1.5e-8 spreads; allow 16 ulps of the mean for the roundings of
    # the block means and their merges, and the same on the output
    ulps16 = 16 * np.spacing(1e8)
    np.testing.assert_allclose(mean, rmean, rtol=0, atol=ulps16)
    y = bncore.batch_norm(x, training=True, axis=axis)
    ref = reference.batch_norm(x, training=True, axis=axis)
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=2 * ulps16)


@pytest.mark.parametrize("layout", OFFSET_LAYOUTS)
def test_float64_near_exact(layout):
    shape, axis = layout
    x = _offset_data(shape, axis, np.float64, 1e4, 1.0, seed=203)
    rmean, rvar = reference.moments(x, axis=axis, ddof=1)
    mean, var = bncore.moments(x, axis=axis, ddof=1)
    # 1e-12 + 16 eps kappa ~ 4e-11 relative at kappa = 1e4 (see conftest)
    assert_stats_close(var, rvar, np.float64, cond=channel_condition(x, axis), what="var")
    # 16 ulps of a mean of size 1e4 (ulp 1.8e-12): block means and merges
    np.testing.assert_allclose(mean, rmean, rtol=0, atol=16 * np.spacing(1e4))
    y = bncore.batch_norm(x, training=True, axis=axis)
    ref = reference.batch_norm(x, training=True, axis=axis)
    # a few roundings of size ulp(1e4) ~ 1.8e-12 spreads; 1e-10 leaves room
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_statistics_float64_accurate_for_both_dtypes(dtype):
    x = make_input((64, 5, 33), dtype, 1, kind="normal", seed=204)
    rmean, rvar = reference.moments(x)
    mean, var = bncore.moments(x)
    # float32 data are exact in float64 and accumulated in float64: the
    # statistics are float64-accurate for both dtypes
    np.testing.assert_allclose(var, rvar, rtol=1e-12)
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-15)


CONSTANTS = [0.0, 0.1, -3.3e4, 1e-3, 12345.678, 7.0, -1e-30, 3e38]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS + LARGE_LAYOUT_PARAMS)
def test_constant_channels_are_exact(layout, dtype, training):
    shape, axis = layout
    ax = axis % len(shape)
    c = n_channels(shape, axis)
    values = np.array([CONSTANTS[k % len(CONSTANTS)] for k in range(c)], dtype=dtype)
    bshape = [1] * len(shape)
    bshape[ax] = c
    x = np.ascontiguousarray(np.broadcast_to(values.reshape(bshape), shape))
    w, b, _, _ = make_params(c, dtype, seed=205)

    mean, var = bncore.moments(x, axis=axis)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(mean, values.astype(np.float64))
    _, var1 = bncore.moments(x, axis=axis, ddof=1)
    np.testing.assert_array_equal(var1, 0.0)

    if training:
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        y, bmean, binvstd = bncore.batch_norm(x, rm, rv, w, b, True, 0.5, axis=axis,
                                              return_stats=True)
        np.testing.assert_array_equal(bmean, values.astype(np.float64))
        np.testing.assert_allclose(binvstd, 1 / np.sqrt(1e-5), rtol=1e-15)
        np.testing.assert_array_equal(rv, np.asarray(0.5, dtype))  # 0.5*1 + 0.5*0
    else:
        # eval with the running mean equal to the constant: exactly bias too
        rm, rv = values.copy(), np.full(c, 2.0, dtype)
        y = bncore.batch_norm(x, rm, rv, w, b, False, axis=axis)
    expected = np.ascontiguousarray(np.broadcast_to(b.reshape(bshape), shape))
    assert y.dtype == dtype
    # bitwise: x - mean == 0 exactly, so y = 0 * scale + bias = bias
    uint = np.uint32 if dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(y.view(uint), expected.view(uint))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_constant_channel_beside_others(dtype):
    """One constant channel among adversarial ones, large enough to span blocks."""
    x = make_input((64, 6, 40), dtype, 1, seed=2)  # seed 2: channel 0 is "constant"
    assert np.all(x[:, 0] == x[0, 0, 0])
    w, b, rm, rv = make_params(6, dtype, seed=206)
    y, mean, _ = bncore.batch_norm(x, rm, rv, w, b, True, return_stats=True)
    assert mean[0] == np.float64(x[0, 0, 0])
    np.testing.assert_array_equal(y[:, 0], np.full((64, 40), b[0], dtype))
    _, var = bncore.moments(x)
    assert var[0] == 0.0
    assert (var[1:] > 0).all()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS[:8])
def test_variance_never_negative(layout, dtype):
    """Nearly constant channels (one value differs by one ulp) give var >= 0.

    kappa is ~1e16 here, so the variance itself is only known to the bound
    of conftest (16 eps kappa, i.e. about its own size): what must hold is
    that it is not negative and not larger than the reference by more."""
    shape, axis = layout
    x = np.full(shape, 12345.678, dtype)
    idx = [0] * len(shape)
    x[tuple(idx)] = np.nextafter(dtype(12345.678), dtype(np.inf))
    mean, var = bncore.moments(x, axis=axis)
    assert (var >= 0).all()
    rmean, rvar = reference.moments(x, axis=axis)
    assert (rvar > 0).sum() == 1  # the channel holding the odd value
    np.testing.assert_array_equal(var[rvar == 0], 0.0)  # the others are constant
    assert_stats_close(var, rvar, dtype, cond=channel_condition(x, axis), what="var")
    assert (var <= 2 * rvar).all()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_mixed_magnitudes_between_channels(dtype):
    """Channel scales from 1e-6 to 1e6 in one call: each channel is normalized
    on its own scale."""
    rng = np.random.default_rng(207)
    scales = 10.0 ** np.arange(-6, 7, 2)  # 7 channels
    x = (rng.standard_normal((50, 7, 9)) * scales[None, :, None] + 3 * scales[None, :, None])
    x = x.astype(dtype)
    mean, var = bncore.moments(x)
    rmean, rvar = reference.moments(x)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(var, rvar, rtol=tol, atol=0)
    np.testing.assert_allclose(mean, rmean, rtol=tol, atol=0)
    y = bncore.batch_norm(x, training=True)
    ref = reference.batch_norm(x, training=True)
    # eps=1e-5 dominates the variance of the 1e-6 channel; still unit-or-less output
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=1e-10 if dtype == np.float64 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_many_values_per_channel(dtype):
    """262144 values per channel with a 1e4 offset: a float32 running sum would
    be off by 1e-3 relative; float64 accumulation is not."""
    x = _offset_data((16, 2, 128, 128), 1, dtype, 1e4, 1.0, seed=208)
    mean, var = bncore.moments(x)
    rmean, rvar = reference.moments(x)
    np.testing.assert_allclose(var, rvar, rtol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(mean, rmean, rtol=0, atol=1e-6)


def test_running_stats_exact_for_float64_simple():
    """Hand-computed: x = [1, 2, 3, 4] per channel, momentum 0.5."""
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    rm, rv = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    bncore.batch_norm(x, rm, rv, training=True, momentum=0.5)
    np.testing.assert_array_equal(rm, [0.5 * 1 + 0.5 * 2.5, 0.5 * 2 + 0.5 * 25])
    np.testing.assert_allclose(rv, [0.5 * 3 + 0.5 * (5 / 3), 0.5 * 4 + 0.5 * (500 / 3)],
                               rtol=1e-15)


# -- the reliability goals: every offset up to 1e6, every layout ------------

GOAL_LAYOUTS = [((32, 4, 8, 8), 1), ((32, 8, 8, 4), -1), ((2048, 4), 1),
                ((16, 3, 64, 64), 1), ((64, 16, 16, 8), -1), ((40000, 3), 1)]


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("layout", GOAL_LAYOUTS, ids=str)
def test_float32_goals_at_offsets_up_to_1e6(layout, offset):
    """Variance to 1e-6 relative and the normalised output to 1e-6 absolute
    at every offset up to 1e6 times the spread, planar and interleaved (the
    textbook formula returns garbage from 1e4 on; PyTorch's channels-last and
    (N, C) paths a variance off by orders of magnitude at 1e6)."""
    shape, axis = layout
    x = _offset_data(shape, axis, np.float32, offset, 1.0, seed=211)
    rmean, rvar = reference.moments(x, axis=axis)
    ref = reference.batch_norm(x, training=True, axis=axis)
    mean, var = bncore.moments(x, axis=axis)
    np.testing.assert_allclose(var, rvar, rtol=1e-6, atol=0)
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12)
    y = bncore.batch_norm(x, training=True, axis=axis)
    # float32 can hold a unit-scale output only to ~2.4e-7 (half an ulp of
    # 4): 1e-6 leaves room for the two roundings the kernel makes.
    assert np.max(np.abs(y - ref.y)) <= 1e-6


@pytest.mark.parametrize("layout", GOAL_LAYOUTS[:3], ids=str)
def test_variances_near_eps(layout):
    """Spreads of 1e-3 to 1e-4 (variances around eps = 1e-5): the
    statistics stay relative-accurate, and eps enters exactly once."""
    shape, axis = layout
    for spread in (3e-3, 1e-3, 3e-4):
        x = _offset_data(shape, axis, np.float32, 10.0, spread, seed=212)
        rmean, rvar = reference.moments(x, axis=axis)
        _, var = bncore.moments(x, axis=axis)
        np.testing.assert_allclose(var, rvar, rtol=1e-6, atol=0)
        y, _, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
        np.testing.assert_allclose(invstd, 1 / np.sqrt(rvar + 1e-5), rtol=1e-6)
        ref = reference.batch_norm(x, training=True, axis=axis)
        assert np.max(np.abs(y - ref.y)) <= 1e-5


@pytest.mark.parametrize("layout", GOAL_LAYOUTS[:3], ids=str)
def test_values_near_float32_max_do_not_overflow(layout):
    """Values around 1e38: their squares overflow float32 but not the float64
    accumulators, so the variance is finite and right."""
    shape, axis = layout
    x = _offset_data(shape, axis, np.float64, 2.0, 1e37, seed=213).astype(np.float32)
    assert np.all(np.isfinite(x)) and np.max(np.abs(x)) > 3e37
    rmean, rvar = reference.moments(x, axis=axis)
    mean, var = bncore.moments(x, axis=axis)
    assert np.all(np.isfinite(var))
    np.testing.assert_allclose(var, rvar, rtol=1e-6)
    y = bncore.batch_norm(x, training=True, axis=axis)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, reference.batch_norm(x, training=True, axis=axis).y,
                               atol=1e-5)


@pytest.mark.parametrize("layout", GOAL_LAYOUTS[:3], ids=str)
def test_denormal_inputs(layout):
    """Subnormal float32 values (around 1e-40) are exact in float64: the
    statistics are right, and with the default eps the output is finite and
    right (tiny: x - mean is tiny beside sqrt(eps))."""
    shape, axis = layout
    x = _offset_data(shape, axis, np.float64, 3.0, 1e-40, seed=214).astype(np.float32)
    assert np.any((x != 0) & (np.abs(x) < np.finfo(np.float32).tiny))
    rmean, rvar = reference.moments(x, axis=axis)
    mean, var = bncore.moments(x, axis=axis)
    np.testing.assert_allclose(var, rvar, rtol=1e-6, atol=0)
    np.testing.assert_allclose(mean, rmean, rtol=1e-6, atol=0)
    y = bncore.batch_norm(x, training=True, axis=axis)
    ref = reference.batch_norm(x, training=True, axis=axis)
    assert np.all(np.isfinite(y))
    # The outputs are themselves around 1e-38, at the bottom of float32's
    # range, where a subnormal mean carries only ~1e-45 absolute precision:
    # 1e-4 of the output's scale is what float32 can promise there.
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=1e-4 * np.max(np.abs(ref.y)))


def _exactly_summed_variance(values):
    """The population variance of float64 values from correctly rounded sums
    (math.fsum) in two passes: off by a few eps at most."""
    values = np.asarray(values, dtype=np.float64).ravel()
    mean = math.fsum(values) / values.size
    return math.fsum((values - mean) ** 2) / values.size


# (shape, axis): (N, C) rows, whose first block's shift is its first row
# (3 and 64 columns); planar runs of 3136 and 12544 values (cut in pieces
# of BLOCK_LEN), and short runs as rows (3x3) and in blocks of whole runs
# (7x7).
FAR_SHIFT_LAYOUTS = [((200000, 3), -1), ((20000, 64), -1), ((8, 4, 56, 56), 1),
                     ((16, 3, 112, 112), 1), ((4096, 2, 3, 3), 1), ((64, 3, 7, 7), 1)]


def _statistics(x, axis, num_threads):
    """The variance of moments and the mean and invstd of a training forward."""
    _, var = bncore.moments(x, axis=axis, num_threads=num_threads)
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True,
                                        num_threads=num_threads)
    return var, mean, invstd


@pytest.mark.parametrize("pipelined", [0, 1], ids=["two-pass", "pipelined"])
@pytest.mark.parametrize("layout", FAR_SHIFT_LAYOUTS, ids=str)
def test_float64_shift_far_from_the_mean(layout, pipelined):
    """float64 statistics take one pass of sums about a shift where it lies
    near the block's mean, else a second pass about the mean. The shifts
    are values of the data (the channel's first, the block's first row), so
    an outlier there, 1e5 spreads off, sends blocks to the second pass: the
    variance then stays within 2e-14 of an exactly summed one (one pass
    alone measured 2e-13 to 7e-12 off), in moments and in the training
    forward, pipelined (where the layout allows) or not. The same bits on
    1 and 3 threads, and capped to AVX2."""
    shape, axis = layout
    x = make_input(shape, np.float64, axis=axis, kind="normal", seed=215)
    channels_first = np.moveaxis(x, axis, 0)   # a view: writes land in x
    channels_first[(slice(None),) + (0,) * (x.ndim - 1)] = 1e5
    want = np.array([_exactly_summed_variance(c) for c in channels_first])
    previous = _kernels.set_pipelined(pipelined)
    try:
        var, mean, invstd = got = _statistics(x, axis, 1)
        again = [_statistics(x, axis, 3)]
        if _kernels.VECTOR_ISA == "AVX-512":
            widest = _kernels.set_vector_isa_cap("AVX2")
            try:
                again.append(_statistics(x, axis, 1))
            finally:
                _kernels.set_vector_isa_cap(widest)
    finally:
        _kernels.set_pipelined(*previous)
    np.testing.assert_allclose(var, want, rtol=2e-14, atol=0)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(want + 1e-5), rtol=2e-14, atol=0)
    # the mean is an offset from the channel's origin, here the outlier
    exact_mean = [math.fsum(c.ravel()) / c.size for c in channels_first]
    np.testing.assert_allclose(mean, exact_mean, rtol=0, atol=16 * np.spacing(1e5))
    for other in again:
        assert all(a.tobytes() == b.tobytes() for a, b in zip(other, got))
