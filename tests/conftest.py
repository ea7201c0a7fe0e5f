"""Shared fixtures for the bncore tests: one seeded adversarial array generator,
the layouts every concern is checked on, and the tolerances.

Test modules import the helpers with ``from conftest import ...``.

Tolerances (used by :func:`assert_output_close` and
:func:`assert_stats_close`), all against ``bncore.reference`` in float64:

* float64 outputs: ``|got - want| <= 1e-12 * |want| + 1e-10``. Outputs are in
  units of the channel's spread; an adversarial channel has ``|x|`` up to
  about 1e4 spreads, where one float64 rounding of ``x`` (or of
  ``x * scale``) is ``ulp(1e4) ~ 2e-12``; a few such roundings stay far
  below 1e-10, while a real mistake (biased/unbiased variance mix-up,
  eps applied twice, wrong channel) moves outputs by more than 1e-6.
* float32 outputs: ``|got - want| <= 1e-5 * |want| + 1e-5``. A unit-scale
  float32 output carries a handful of roundings of ``2**-24 ~ 6e-8`` each,
  scaled by ``|weight| <~ 3`` and added to ``|bias| <~ 4``: about 1e-6; the
  relative term covers eval calls whose running statistics do not match the
  data (outputs up to ~1e4), where only relative accuracy is meaningful.
* statistics (returned mean/invstd, moments, running buffers) of float64
  input: relative 1e-12; of float32 input: relative 1e-6 (the contract:
  float64 accumulation, "relative error ~1e-6 or better"). Means are judged
  relative to ``|mean| + spread`` so that a near-zero mean is not held to
  an impossible relative bound. Running buffers stored as float32 add one
  float32 rounding (6e-8), covered by the 1e-6.
* variances (and invstd, running_var) additionally get ``16 * eps64 * kappa``
  relative, kappa = |mean| / spread of the channel: Chan et al.'s merge
  (DESIGN.md) adds ``d*d*na*nb/n`` with ``d`` a difference of block means,
  and a block mean of size |mean| is only known to ``eps64 * |mean|``, so
  the merged variance is exact to first order in ``eps64 * kappa`` (about
  2e-12 for an adversarial kappa = 1e4 channel), not to 1e-16. The
  cancelling formula E[x^2] - E[x]^2 is off by ``eps * kappa**2`` and is
  still caught by a wide margin.
"""

import math
import os
import sys

import numpy as np
import pytest

# Make ``from conftest import ...`` work whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DTYPES = [np.float32, np.float64]

#: (shape, axis) pairs: every layout of the canonical (outer, C, inner) view.
LAYOUTS = [
    ((8, 3), 1),  # (N, C): inner = 1
    ((5, 4, 7), 1),  # (N, C, L)
    ((4, 3, 5, 6), 1),  # (N, C, H, W)
    ((2, 3, 3, 4, 5), 1),  # (N, C, D, H, W)
    ((4, 5, 6, 3), -1),  # channels-last 2-D (N, H, W, C)
    ((6, 7, 4), -1),  # channels-last 1-D (N, L, C)
    ((2, 3, 4, 3, 5), -1),  # channels-last 3-D (N, D, H, W, C)
    ((7, 3, 5, 3), 1),  # odd sizes
    ((9, 1, 4, 4), 1),  # C = 1
    ((10, 1), 1),  # C = 1 and inner = 1
    ((6, 5, 1, 1), 1),  # inner = 1 through trailing unit dims
    ((1, 3, 4, 4), 1),  # N = 1 (still 16 values per channel)
    ((3, 4, 5, 6), 2),  # a middle axis: outer = 12, inner = 6
    ((4, 6), 0),  # axis 0: outer = 1
    ((3, 4, 5, 6), -3),  # negative, not last
    ((3, 17, 2), 1),  # C > 16 (wider than one vector of lanes), small inner
    ((5, 2, 3, 19), -1),  # channels-last with a C that is not a lane multiple
]

#: Big enough to leave any serial path, span several cache blocks and
#: split over threads; too big for the per-element reference in hot loops,
#: so use them sparingly.
LARGE_LAYOUTS = [
    ((16, 8, 32, 32), 1),  # planar, 131072 values
    ((8, 16, 16, 32), -1),  # channels-last, 65536 values
    ((4, 2, 128, 128), 1),  # two channels with long runs: row-block split
    ((40000, 3), 1),  # interleaved, tiny C
    ((257, 33, 17), 1),  # odd sizes everywhere
    ((300, 4, 7, 7), 1),  # 7x7 maps: statistics blocks of 5 whole runs
    ((4000, 2, 5, 8), 1),  # runs of 40: blocks of 51 runs and of 12 in a chunk
]

#: For the thread tests only (no reference involved): about 1e6 values.
HUGE_LAYOUTS = [
    ((8, 4, 128, 256), 1),  # planar, 4 channels of 262144
    ((16, 64, 32, 32), -1),  # channels-last, 64 channels
    ((2, 1, 512, 1024), 1),  # one channel of 1048576 values
    ((262144, 4), 1),  # interleaved, 4 channels
]


def layout_id(layout):
    shape, axis = layout
    return "x".join(map(str, shape)) + f"-ax{axis}"


LAYOUT_PARAMS = [pytest.param(lo, id=layout_id(lo)) for lo in LAYOUTS]
LARGE_LAYOUT_PARAMS = [pytest.param(lo, id=layout_id(lo)) for lo in LARGE_LAYOUTS]
HUGE_LAYOUT_PARAMS = [pytest.param(lo, id=layout_id(lo)) for lo in HUGE_LAYOUTS]
DTYPE_PARAMS = [pytest.param(d, id=np.dtype(d).name) for d in DTYPES]

#: Channel kinds cycled through by ``kind="adversarial"``.
CHANNEL_KINDS = ("normal", "offset", "constant", "heavy", "tiny", "huge")


def n_channels(shape, axis):
    return shape[axis % len(shape)]


def _channel_values(rng, kind, n):
    """n float64 values of one channel of the given kind."""
    z = rng.standard_normal(n)
    if kind == "normal":  # unit scale
        return 0.5 * rng.standard_normal() + rng.uniform(0.5, 2.0) * z
    if kind == "offset":  # mean 1e4 times the spread, spread from 1e-2 to 1e2
        spread = rng.uniform(0.5, 2.0) * 10.0 ** rng.uniform(-2, 2)
        return rng.choice([-1.0, 1.0]) * 1e4 * spread + spread * z
    if kind == "constant":  # every value equal (and not a round number)
        c = rng.choice([0.1, -3.3e4, 7.0, 1e-3, 12345.678, -0.7])
        return np.full(n, c)
    if kind == "heavy":  # magnitudes from 1e-3 to 1e3 mixed in one channel
        return z * 10.0 ** rng.uniform(-3, 3, size=n)
    if kind == "tiny":  # mean 500 spreads, spread 1e-3
        return 0.5 + 1e-3 * z
    if kind == "huge":  # spread 1e3, mean -2 spreads
        return -2e3 + 1e3 * z
    raise ValueError(f"unknown channel kind {kind!r}")


def make_input(shape, dtype=np.float64, axis=1, kind="adversarial", seed=0):
    """The one adversarial array generator of the test suite.

    Returns a C-contiguous array of ``shape`` and ``dtype`` whose channels
    (along ``axis``) are drawn, with a generator seeded by ``seed``, from the
    kinds in :data:`CHANNEL_KINDS`. ``kind="adversarial"`` cycles channel c
    through ``CHANNEL_KINDS[(c + seed) % 6]``; any other value makes every
    channel that kind. Values are made in float64 and then rounded to
    ``dtype``, so float32 data are exact float64 data too.
    """
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    ax = axis % ndim
    c = shape[ax]
    moved = (c,) + tuple(s for i, s in enumerate(shape) if i != ax)
    n = math.prod(moved[1:])
    xc = np.empty((c, n))
    for k in range(c):
        if kind == "adversarial":
            knd = CHANNEL_KINDS[(k + seed) % len(CHANNEL_KINDS)]
        else:
            knd = kind
        xc[k] = _channel_values(rng, knd, n)
    x = np.moveaxis(xc.reshape(moved), 0, ax)
    return np.ascontiguousarray(x, dtype=dtype)


def make_params(c, dtype=np.float64, seed=0):
    """(weight, bias, running_mean, running_var) for c channels, seeded."""
    rng = np.random.default_rng(10_000 + seed)
    weight = rng.normal(1.0, 0.5, c).astype(dtype)
    bias = rng.normal(0.0, 1.0, c).astype(dtype)
    running_mean = rng.normal(0.0, 1.0, c).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, c).astype(dtype)
    return weight, bias, running_mean, running_var


PAGE = 4096


def at_page_offset(values, offset):
    """A copy of values whose data starts `offset` bytes (mod PAGE) past a
    page boundary."""
    buffer = np.empty(values.nbytes + 2 * PAGE, np.uint8)
    start = (-buffer.ctypes.data) % PAGE + offset % PAGE
    placed = buffer[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
    placed[...] = values
    return placed


def _channel_rows(x, axis):
    """x in float64 as a (C, n) array: one row of values per channel."""
    x = np.asarray(x, dtype=np.float64)
    ax = axis % x.ndim
    return np.moveaxis(x, ax, 0).reshape(x.shape[ax], -1)


def channel_spread(x, axis):
    """float64 (C,) standard deviation of each channel (0 for n == 0)."""
    xc = _channel_rows(x, axis)
    if xc.shape[1] == 0:
        return np.zeros(xc.shape[0])
    return xc.std(axis=1)


def channel_condition(x, axis):
    """float64 (C,) kappa = |mean| / spread per channel (0 where spread is 0)."""
    xc = _channel_rows(x, axis)
    if xc.shape[1] == 0:
        return np.zeros(xc.shape[0])
    mean = np.abs(xc.mean(axis=1))
    std = xc.std(axis=1)
    return np.divide(mean, std, out=np.zeros_like(mean), where=std > 0)


EPS64 = np.finfo(np.float64).eps


def _tol(dtype):
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-6


def assert_output_close(got, want, dtype):
    """Output of dtype ``dtype`` against the float64 reference output."""
    got = np.asarray(got)
    assert got.shape == want.shape
    if np.dtype(dtype) == np.float64:
        rtol, atol = 1e-12, 1e-10
    else:
        rtol, atol = 1e-5, 1e-5
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)


def assert_stats_close(got, want, dtype, scale=None, what="statistic", cond=None):
    """Per-channel statistics computed from data of ``dtype``.

    ``|got - want| <= (tol + 16 * eps64 * cond) * |want| + tol * scale`` with
    tol 1e-12 (float64 data) or 1e-6 (float32 data); ``scale`` (per channel,
    e.g. the spread for a mean) defaults to 0, i.e. purely relative;
    ``cond`` (per channel kappa, see :func:`channel_condition`; give it for
    variances) defaults to 0. NaN must match NaN.
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    s = np.zeros_like(want) if scale is None else np.broadcast_to(scale, want.shape)
    k = np.zeros_like(want) if cond is None else np.broadcast_to(cond, want.shape)
    bound = (_tol(dtype) + 16 * EPS64 * k) * np.abs(want) + _tol(dtype) * s
    err = np.abs(got - want)
    bad = ~nan & ~(err <= bound)
    assert not bad.any(), (
        f"{what} differs: got {got[bad]}, want {want[bad]}, "
        f"err {err[bad]}, bound {bound[bad]}"
    )


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
