"""float16 / bfloat16 kernels (bncore/_lowp.py) against the float64 reference.

The oracle is ``bncore.reference`` run on the half-precision input cast to
float64 (exact), so only bncore's own error is measured.

Tolerances, with ``ulp(v)`` the spacing of the half type at ``|v|`` (2**-10
relative for float16, 2**-7 for bfloat16, down to the smallest subnormal):

* outputs (y, dx): ``|got - want| <= ulp(want) + 2**-20 * mag``. The float32
  kernel computes the value from terms of size ``mag`` (``|w * xhat| + |b|``
  forward; ``|w * invstd| * (|dy| + |mean dy| + |xhat * mean(dy xhat)|)``
  backward) with a few float32 roundings (2**-24 relative each; 2**-20 is
  sixteen of them) from statistics accurate to float64, and the result is
  rounded once to the half type, which adds at most half an ulp of that
  float32 value: one ulp of the exact value covers it with margin. Computing
  in half precision, or rounding twice, or statistics off by 1e-4, would
  break the bound.
* statistics (mean, invstd, variance, M2): the float32 contract of
  ``conftest.assert_stats_close`` (relative 1e-6, means relative to the
  spread, variances with the kappa term): half data are exact float32 data
  and are accumulated in float64 like them.
* gradient sums: ``1e-6 * sum(|term|)``, float64 sums of exactly computed
  products (a float32 accumulator would be off by about 1e-5 here).
"""

import math
import tracemalloc

import numpy as np
import pytest
from conftest import assert_stats_close, channel_condition, channel_spread, make_input

from bncore import _kernels, _lowp, reference

EPS = 1e-5


def _bfloat16():
    return pytest.importorskip("ml_dtypes").bfloat16


@pytest.fixture(params=["float16", "bfloat16"])
def half(request):
    """The half-precision dtype under test (bfloat16 needs ml_dtypes)."""
    if request.param == "bfloat16":
        return np.dtype(_bfloat16())
    return np.dtype(np.float16)


# (shape, feature axis, CHUNK_VALUES or None for the real one). The small
# chunk sizes cut small arrays in every way _lowp does: whole rows, channel
# ranges of a row, and pieces of one channel's run.
CASES = [
    ((6, 5), 1, None),  # (N, C), one chunk
    ((4, 3, 5, 6), 1, None),  # NCHW, one chunk
    ((4, 5, 6, 3), -1, None),  # NHWC, one chunk
    ((3, 17, 40), 1, None),  # planar runs (inner >= 32), one chunk
    ((50, 6), 1, 64),  # (N, C): 10 rows a chunk, 5 chunks
    ((4, 5, 6, 7), -1, 64),  # NHWC: 120 rows of 7 channels, 14 chunks
    ((3, 5, 4, 5), 1, 64),  # rows of 100 values: channels [0, 2) and [2, 5)
    ((2, 3, 10, 15), 1, 64),  # runs of 150: three pieces of 50
    ((3, 2, 7, 11), 1, 32),  # runs of 77: pieces of 25, 26, 26
    ((5, 4, 3), 1, 1),  # one value a chunk
]
CASE_PARAMS = [
    pytest.param(case, id="x".join(map(str, case[0])) + f"-ax{case[1]}-chunk{case[2]}")
    for case in CASES
]

#: What the channels of :func:`half_input` are, cycled over channels.
KINDS = ("unit", "offset", "tiny", "constant", "wide")


def canonical(shape, axis):
    ax = axis % len(shape)
    return math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])


def half_input(shape, axis, dtype, seed=0):
    """Channels of the kinds in KINDS, inside float16's range: unit scale;
    mean 1000 with spread 1 (a float32 E[x^2] - E[x]^2 loses every digit);
    spread 1e-2 around 0.5; all equal; spread 300. Returned rounded to dtype.
    """
    x = make_input(shape, np.float64, axis, kind="normal", seed=seed)
    channels = np.moveaxis(x, axis, 0)
    for c in range(channels.shape[0]):
        kind = KINDS[(c + seed) % len(KINDS)]
        if kind == "offset":
            channels[c] += 1000.0
        elif kind == "tiny":
            channels[c] = 0.5 + 1e-2 * channels[c]
        elif kind == "constant":
            channels[c] = 7.0
        elif kind == "wide":
            channels[c] *= 300.0
    return x.astype(dtype)


def gradient_input(shape, dtype, seed=1):
    return make_input(shape, np.float64, kind="normal", seed=seed).astype(dtype)


def wide(a):
    return np.asarray(a).astype(np.float64)


def ulp(values, dtype):
    """Spacing of the half type at |values| (float64)."""
    if dtype.name == "bfloat16":
        info = pytest.importorskip("ml_dtypes").finfo(dtype)
    else:
        info = np.finfo(dtype)
    _, exponent = np.frexp(np.abs(values))
    spacing = np.ldexp(1.0, exponent - 1 - int(info.nmant))
    return np.maximum(spacing, float(info.smallest_subnormal))


def assert_half_close(got, want, mag, dtype, what="output"):
    """The output bound of the module docstring."""
    got = wide(got)
    assert got.shape == want.shape
    bound = ulp(want, dtype) + 2.0**-20 * mag
    err = np.abs(got - want)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {bad.sum()} values off, e.g. got {got[bad][:4]}, want {want[bad][:4]}, "
        f"bound {bound[bad][:4]}")


def channel_column(values, shape, axis):
    """A (C,) array broadcast along the feature axis of shape."""
    ax = axis % len(shape)
    return np.asarray(values, dtype=np.float64).reshape(
        [-1 if i == ax else 1 for i in range(len(shape))])


def chunked(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(_lowp, "CHUNK_VALUES", chunk)


def affine(channels, seed=0):
    rng = np.random.default_rng(100 + seed)
    weight = rng.normal(1.0, 0.5, channels)
    bias = rng.normal(0.0, 1.0, channels)
    return weight, bias


# --------------------------------------------------------------------------
# Forward

@pytest.mark.parametrize("case", CASE_PARAMS)
def test_moments_match_reference(half, case, monkeypatch):
    shape, axis, chunk = case
    chunked(monkeypatch, chunk)
    x = half_input(shape, axis, half)
    before = x.copy()
    outer, channels, inner = canonical(shape, axis)
    mean, m2 = np.empty(channels), np.empty(channels)
    _lowp.moments(x, outer, channels, inner, mean, m2, 2)
    want_mean, want_var = reference.moments(wide(x), axis=axis)
    spread = channel_spread(wide(x), axis)
    assert_stats_close(mean, want_mean, np.float32, scale=spread, what="mean")
    assert_stats_close(m2 / (outer * inner), want_var, np.float32,
                       cond=channel_condition(wide(x), axis), what="var")
    assert np.array_equal(x.view(np.uint16), before.view(np.uint16))


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine_dtype", [None, np.float32, np.float64])
def test_train_forward_matches_reference(half, case, relu, affine_dtype, monkeypatch):
    shape, axis, chunk = case
    chunked(monkeypatch, chunk)
    x = half_input(shape, axis, half)
    outer, channels, inner = canonical(shape, axis)
    if affine_dtype is None:
        weight = bias = None
        w, b = np.ones(channels), np.zeros(channels)
    else:
        w, b = affine(channels)
        weight, bias = w.astype(affine_dtype), b.astype(affine_dtype)
    y = np.empty_like(x)
    mean, m2, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
    _lowp.train_forward(x, y, outer, channels, inner, weight, bias, EPS, mean, m2, invstd,
                        2, relu=relu)

    ref = reference.batch_norm(wide(x), None, None, wide(weight) if weight is not None
                               else None, wide(bias) if bias is not None else None,
                               training=True, eps=EPS, axis=axis,
                               activation="relu" if relu else None)
    want = ref.y
    xhat = (wide(x) - channel_column(ref.mean, shape, axis)) * channel_column(
        ref.invstd, shape, axis)
    mag = np.abs(xhat * channel_column(wide(weight if weight is not None else w), shape,
                                       axis)) + np.abs(channel_column(b, shape, axis))
    assert y.dtype == half
    assert_half_close(y, want, mag, half, "y")
    spread = channel_spread(wide(x), axis)
    kappa = channel_condition(wide(x), axis)
    assert_stats_close(mean, ref.mean, np.float32, scale=spread, what="mean")
    assert_stats_close(invstd, ref.invstd, np.float32, cond=kappa, what="invstd")
    assert_stats_close(m2 / (outer * inner), reference.moments(wide(x), axis=axis)[1],
                       np.float32, cond=kappa, what="biased var")


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("param_dtype", [np.float32, np.float64])
def test_normalize_matches_reference(half, case, relu, param_dtype, monkeypatch):
    shape, axis, chunk = case
    chunked(monkeypatch, chunk)
    x = half_input(shape, axis, half)
    outer, channels, inner = canonical(shape, axis)
    w, b = affine(channels)
    rng = np.random.default_rng(7)
    running_mean = rng.normal(0.0, 1.0, channels).astype(param_dtype)
    running_var = rng.uniform(0.5, 2.0, channels).astype(param_dtype)
    y = np.empty_like(x)
    _lowp.normalize(x, y, outer, channels, inner, running_mean, running_var, EPS,
                    w.astype(param_dtype), b.astype(param_dtype), 2, relu=relu)
    ref = reference.batch_norm(wide(x), wide(running_mean), wide(running_var),
                               wide(w.astype(param_dtype)), wide(b.astype(param_dtype)),
                               training=False, eps=EPS, axis=axis,
                               activation="relu" if relu else None)
    want = ref.y
    mag = (np.abs((wide(x) - channel_column(running_mean, shape, axis))
                  * channel_column(ref.invstd * w, shape, axis))
           + np.abs(channel_column(b, shape, axis)))
    assert_half_close(y, want, mag, half, "y")


def test_large_offset_keeps_the_variance(half, monkeypatch):
    """Mean 1000, spread 1 (float16 spacing at 1000 is 0.5): the variance to
    float32 accuracy, where E[x^2] - E[x]^2 in float32 is off by ~10 %."""
    monkeypatch.setattr(_lowp, "CHUNK_VALUES", 256)
    rng = np.random.default_rng(3)
    x = (1000.0 + rng.standard_normal((64, 4, 40))).astype(half)
    outer, channels, inner = 64, 4, 40
    y = np.empty_like(x)
    mean, m2, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
    _lowp.train_forward(x, y, outer, channels, inner, None, None, EPS, mean, m2, invstd, 1)
    want_mean, want_var = reference.moments(wide(x))
    assert np.all(want_var > 0.05)  # the data did not collapse to a constant
    np.testing.assert_allclose(m2 / (outer * inner), want_var, rtol=1e-6)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-9)
    ref = reference.batch_norm(wide(x), training=True, eps=EPS)
    mag = np.abs((wide(x) - want_mean[None, :, None]) * ref.invstd[None, :, None])
    assert_half_close(y, ref.y, mag, half, "y")


def test_real_chunk_size_rows_and_runs_longer_than_a_chunk(monkeypatch):
    """At the real CHUNK_VALUES: rows of 393216 values cut into channel
    ranges, and one run of 300000 values cut into pieces."""
    for shape in ((2, 3, 512, 256), (1, 2, 300_000)):
        outer, channels, inner = canonical(shape, 1)
        assert channels * inner > _lowp.CHUNK_VALUES
        x = half_input(shape, 1, np.dtype(np.float16))
        y = np.empty_like(x)
        mean, m2, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
        _lowp.train_forward(x, y, outer, channels, inner, None, None, EPS, mean, m2,
                            invstd, 2)
        ref = reference.batch_norm(wide(x), training=True, eps=EPS)
        kappa = channel_condition(wide(x), 1)
        assert_stats_close(mean, ref.mean, np.float32, scale=channel_spread(wide(x), 1))
        assert_stats_close(invstd, ref.invstd, np.float32, cond=kappa)
        mag = np.abs((wide(x) - channel_column(ref.mean, shape, 1))
                     * channel_column(ref.invstd, shape, 1))
        assert_half_close(y, ref.y, mag, np.dtype(np.float16))


def test_nonfinite_values_stay_in_their_channel(half, monkeypatch):
    monkeypatch.setattr(_lowp, "CHUNK_VALUES", 64)
    x = half_input((6, 4, 30), 1, half)
    x[3, 1, 7] = np.nan
    x[2, 2, 0] = np.inf
    y = np.empty_like(x)
    mean, m2, invstd = np.empty(4), np.empty(4), np.empty(4)
    _lowp.train_forward(x, y, 6, 4, 30, None, None, EPS, mean, m2, invstd, 1)
    assert np.isnan(mean[1]) and not np.isfinite(invstd[2] * mean[2] * m2[2])
    assert np.isnan(wide(y)[:, 1]).all()
    ref = reference.batch_norm(wide(x)[:, [0, 3]], training=True, eps=EPS)
    np.testing.assert_allclose(mean[[0, 3]], ref.mean, rtol=1e-9)
    np.testing.assert_allclose(invstd[[0, 3]], ref.invstd, rtol=1e-6)


# --------------------------------------------------------------------------
# Backward

def backward_setup(half, shape, axis, training, seed=0):
    x = half_input(shape, axis, half, seed)
    dy = gradient_input(shape, half, seed + 1)
    channels = canonical(shape, axis)[1]
    w, b = affine(channels, seed)
    if training:
        ref = reference.batch_norm(wide(x), training=True, eps=EPS, axis=axis)
        mean, invstd = ref.mean, ref.invstd
    else:
        rng = np.random.default_rng(seed)
        mean = rng.normal(0.0, 1.0, channels)
        invstd = 1.0 / np.sqrt(rng.uniform(0.5, 2.0, channels) + EPS)
    return x, dy, w, b, mean, invstd


def backward_bounds(x, dy, w, mean, invstd, shape, axis, training):
    """(mag of dx, sum|dy|, sum|dy * xhat|) for the tolerances."""
    col = lambda v: channel_column(v, shape, axis)  # noqa: E731
    xhat = (wide(x) - col(mean)) * col(invstd)
    reduce_axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    n = wide(x).size // len(mean)
    term = np.abs(wide(dy))
    if training:
        term = (term + np.abs(col(wide(dy).sum(reduce_axes) / n))
                + np.abs(xhat * col((wide(dy) * xhat).sum(reduce_axes) / n)))
    mag = np.abs(col(w * invstd)) * term
    return (mag, np.abs(wide(dy)).sum(reduce_axes),
            np.abs(wide(dy) * xhat).sum(reduce_axes))


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference(half, case, training, monkeypatch):
    shape, axis, chunk = case
    chunked(monkeypatch, chunk)
    outer, channels, inner = canonical(shape, axis)
    x, dy, w, _, mean, invstd = backward_setup(half, shape, axis, training)
    x0, dy0 = x.copy(), dy.copy()
    dx = np.empty_like(x)
    grad_weight, grad_bias = np.empty(channels), np.empty(channels)
    _lowp.backward(x, dy, dx, outer, channels, inner, mean, invstd, w.astype(np.float32),
                   training, grad_weight, grad_bias, 2)
    want_dx, want_gw, want_gb = reference.batch_norm_backward(
        wide(dy), wide(x), mean, invstd, wide(w.astype(np.float32)), training=training,
        axis=axis)
    mag, sum_dy, sum_dy_xhat = backward_bounds(x, dy, w, mean, invstd, shape, axis,
                                               training)
    assert_half_close(dx, want_dx, mag, half, "dx")
    assert np.all(np.abs(grad_bias - want_gb) <= 1e-6 * sum_dy)
    assert np.all(np.abs(grad_weight - want_gw) <= 1e-6 * sum_dy_xhat)
    assert np.array_equal(x.view(np.uint16), x0.view(np.uint16))
    assert np.array_equal(dy.view(np.uint16), dy0.view(np.uint16))


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_grad_sums_and_grad_input(half, case, monkeypatch):
    """The two passes of the training backward, each on its own; grad_input
    with sums that are not the data's (as for a sharded batch)."""
    shape, axis, chunk = case
    chunked(monkeypatch, chunk)
    outer, channels, inner = canonical(shape, axis)
    x, dy, w, _, mean, invstd = backward_setup(half, shape, axis, True)
    col = lambda v: channel_column(v, shape, axis)  # noqa: E731
    reduce_axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    sum_dy, sum_dy_dev = np.empty(channels), np.empty(channels)
    _lowp.grad_sums(x, dy, outer, channels, inner, mean, sum_dy, sum_dy_dev, 2)
    dev_terms = wide(dy) * (wide(x) - col(mean))
    want_dy = np.array([math.fsum(r) for r in np.moveaxis(wide(dy), axis, 0).reshape(
        channels, -1)])
    want_dev = np.array([math.fsum(r) for r in np.moveaxis(dev_terms, axis, 0).reshape(
        channels, -1)])
    assert np.all(np.abs(sum_dy - want_dy) <= 1e-6 * np.abs(wide(dy)).sum(reduce_axes))
    assert np.all(np.abs(sum_dy_dev - want_dev) <= 1e-6 * np.abs(dev_terms).sum(reduce_axes))

    count = 3.0 * outer * inner  # as if this were a third of the batch
    rng = np.random.default_rng(5)
    given_dy, given_dev = rng.normal(0, 10, channels), rng.normal(0, 10, channels)
    dx = np.empty_like(x)
    _lowp.grad_input(x, dy, dx, outer, channels, inner, mean, invstd, w, given_dy,
                     given_dev, count, 2)
    dev = wide(x) - col(mean)
    terms = (np.abs(wide(dy)) + np.abs(col(given_dy / count))
             + np.abs(dev * col(invstd**2 * given_dev / count)))
    want = col(w * invstd) * (wide(dy) - col(given_dy / count)
                              - dev * col(invstd**2 * given_dev / count))
    assert_half_close(dx, want, np.abs(col(w * invstd)) * terms, half, "dx")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_relu_mask_matches_reference(half, case, monkeypatch):
    shape, axis, chunk = case
    chunked(monkeypatch, chunk)
    outer, channels, inner = canonical(shape, axis)
    x, dy, w, b, mean, invstd = backward_setup(half, shape, axis, True)
    out = np.empty_like(x)
    _lowp.relu_mask(x, dy, out, outer, channels, inner, mean, invstd, w, b, 2)
    col = lambda v: channel_column(v, shape, axis)  # noqa: E731
    y = (wide(x) - col(mean)) * col(invstd * w) + col(b)
    # Values within float32 rounding of zero may go either way.
    clear = np.abs(y) > 1e-5 * (np.abs(col(b)) + 1.0)
    want = np.where(y > 0, wide(dy), 0.0)
    np.testing.assert_array_equal(wide(out)[clear], want[clear])
    assert np.any(want[clear] == 0) and np.any(want[clear] != 0)


# --------------------------------------------------------------------------
# Threads, aliasing, memory

#: Chunks of the real size, so that each kernel call spans several threads.
THREAD_SHAPES = [(4, 8, 128, 128), (8192, 64)]


def run_everything(x, dy, nthreads):
    """Every entry point on (x, dy) as (outer, C, inner); all outputs."""
    shape = x.shape
    outer, channels, inner = canonical(shape, 1)
    w, b = affine(channels)
    results = []
    y = np.empty_like(x)
    mean, m2, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
    _lowp.train_forward(x, y, outer, channels, inner, w, b, EPS, mean, m2, invstd, nthreads,
                        relu=True)
    results += [y, mean, m2, invstd]
    m_mean, m_m2 = np.empty(channels), np.empty(channels)
    _lowp.moments(x, outer, channels, inner, m_mean, m_m2, nthreads)
    results += [m_mean, m_m2]
    y_eval = np.empty_like(x)
    _lowp.normalize(x, y_eval, outer, channels, inner, mean, m2 / (outer * inner), EPS, w,
                    b, nthreads)
    results.append(y_eval)
    for training in (True, False):
        dx = np.empty_like(x)
        gw, gb = np.empty(channels), np.empty(channels)
        _lowp.backward(x, dy, dx, outer, channels, inner, mean, invstd, w, training, gw, gb,
                       nthreads)
        results += [dx, gw, gb]
    sum_dy, sum_dev = np.empty(channels), np.empty(channels)
    _lowp.grad_sums(x, dy, outer, channels, inner, mean, sum_dy, sum_dev, nthreads)
    dx = np.empty_like(x)
    _lowp.grad_input(x, dy, dx, outer, channels, inner, mean, invstd, w, sum_dy, sum_dev,
                     outer * inner, nthreads)
    masked = np.empty_like(x)
    _lowp.relu_mask(x, dy, masked, outer, channels, inner, mean, invstd, w, b, nthreads)
    results += [sum_dy, sum_dev, dx, masked]
    return results


@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_identical_bits_for_any_thread_count(shape):
    assert math.prod(shape) > _lowp.CHUNK_VALUES  # several chunks
    x = half_input(shape, 1, np.dtype(np.float16))
    dy = gradient_input(shape, np.dtype(np.float16))
    first = run_everything(x, dy, 1)
    for nthreads in (2, 3):
        for k, (a, b) in enumerate(zip(first, run_everything(x, dy, nthreads))):
            assert a.tobytes() == b.tobytes(), f"result {k} differs with {nthreads} threads"


@pytest.mark.parametrize("chunk", [None, 64])
def test_outputs_may_alias_inputs(half, chunk, monkeypatch):
    chunked(monkeypatch, chunk)
    shape = (6, 5, 4, 5)
    outer, channels, inner = canonical(shape, 1)
    x0 = half_input(shape, 1, half)
    dy0 = gradient_input(shape, half)
    w, b = affine(channels)
    mean, m2, invstd = np.empty(channels), np.empty(channels), np.empty(channels)

    def same(a, b):
        return a.tobytes() == b.tobytes()

    y = np.empty_like(x0)
    _lowp.train_forward(x0, y, outer, channels, inner, w, b, EPS, mean, m2, invstd, 2)
    x = x0.copy()
    _lowp.train_forward(x, x, outer, channels, inner, w, b, EPS, mean, m2, invstd, 2)
    assert same(x, y)

    x = x0.copy()
    _lowp.normalize(x0, y, outer, channels, inner, mean, m2 / (outer * inner), EPS, w, b, 2)
    _lowp.normalize(x, x, outer, channels, inner, mean, m2 / (outer * inner), EPS, w, b, 2)
    assert same(x, y)

    for training in (True, False):
        gw, gb = np.empty(channels), np.empty(channels)
        dx = np.empty_like(x0)
        _lowp.backward(x0, dy0, dx, outer, channels, inner, mean, invstd, w, training, gw,
                       gb, 2)
        x, dy = x0.copy(), dy0.copy()
        _lowp.backward(x, dy, dy, outer, channels, inner, mean, invstd, w, training, gw, gb, 2)
        assert same(dy, dx)
        _lowp.backward(x, dy0, x, outer, channels, inner, mean, invstd, w, training, gw, gb, 2)
        assert same(x, dx)

    sum_dy, sum_dev = np.empty(channels), np.empty(channels)
    _lowp.grad_sums(x0, dy0, outer, channels, inner, mean, sum_dy, sum_dev, 2)
    _lowp.grad_input(x0, dy0, dx, outer, channels, inner, mean, invstd, w, sum_dy, sum_dev,
                     outer * inner, 2)
    x, dy = x0.copy(), dy0.copy()
    _lowp.grad_input(x, dy, dy, outer, channels, inner, mean, invstd, w, sum_dy, sum_dev,
                     outer * inner, 2)
    _lowp.grad_input(x, dy0, x, outer, channels, inner, mean, invstd, w, sum_dy, sum_dev,
                     outer * inner, 2)
    assert same(dy, dx) and same(x, dx)

    masked = np.empty_like(x0)
    _lowp.relu_mask(x0, dy0, masked, outer, channels, inner, mean, invstd, w, b, 2)
    dy = dy0.copy()
    _lowp.relu_mask(x0, dy, dy, outer, channels, inner, mean, invstd, w, b, 2)
    assert same(dy, masked)


def test_no_input_sized_temporary(monkeypatch):
    """Peak memory of a training forward and backward on 1 Mi float16 values
    (2 MiB, 4 MiB as float32): two chunk scratch buffers and O(C) arrays."""
    monkeypatch.setattr(_lowp, "CHUNK_VALUES", 1 << 14)
    shape = (16, 8, 64, 128)
    outer, channels, inner = canonical(shape, 1)
    x = half_input(shape, 1, np.dtype(np.float16))
    dy = gradient_input(shape, np.dtype(np.float16))
    y, dx = np.empty_like(x), np.empty_like(x)
    mean, m2, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
    gw, gb = np.empty(channels), np.empty(channels)
    tracemalloc.start()
    try:
        _lowp.train_forward(x, y, outer, channels, inner, None, None, EPS, mean, m2, invstd,
                            2)
        _lowp.backward(x, dy, dx, outer, channels, inner, mean, invstd, None, True, gw, gb,
                       2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    scratch = 2 * 4 * _lowp.CHUNK_VALUES
    assert peak < scratch + 64 * 1024, peak


# --------------------------------------------------------------------------
# Dtypes and wrong calls

def test_is_half():
    assert _lowp.is_half(np.float16)
    assert not _lowp.is_half(np.float32) and not _lowp.is_half(np.int16)
    assert np.dtype(np.float16) in _lowp.half_dtypes()


def test_bfloat16_is_half_with_ml_dtypes():
    bf16 = _bfloat16()
    assert _lowp.is_half(bf16)
    assert np.dtype(bf16) in _lowp.half_dtypes()


def test_wrong_calls_raise():
    x = np.zeros((4, 3, 5), np.float16)
    y = np.empty_like(x)
    mean, m2, invstd = np.empty(3), np.empty(3), np.empty(3)
    args = (4, 3, 5, None, None, EPS, mean, m2, invstd, 1)
    with pytest.raises(TypeError, match="x: expected float16 or bfloat16"):
        _lowp.train_forward(x.astype(np.float32), y, *args)
    with pytest.raises(TypeError, match="y: expected dtype float16"):
        _lowp.train_forward(x, y.astype(np.float32), *args)
    with pytest.raises(TypeError, match="y: expected an aligned C-contiguous"):
        _lowp.train_forward(x, np.empty((5, 3, 4), np.float16).transpose(2, 1, 0), *args)
    with pytest.raises(ValueError, match="x: expected 60 values"):
        _lowp.train_forward(x[:3], y, *args)
    with pytest.raises(ValueError, match="weight: expected 3 values"):
        _lowp.normalize(x, y, 4, 3, 5, mean, m2, EPS, np.ones(4), None, 1)
    with pytest.raises(TypeError, match="mean: expected dtype float64"):
        _lowp.backward(x, x, y, 4, 3, 5, mean.astype(np.float32), invstd, None, True, m2,
                       mean, 1)
    with pytest.raises(ValueError, match="positive"):
        _lowp.moments(x, 0, 3, 5, mean, m2, 1)
    with pytest.raises(ValueError, match="num_threads"):
        _lowp.moments(x, 4, 3, 5, mean, m2, 0)
    frozen = y.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="y: expected a writeable array"):
        _lowp.train_forward(x, frozen, *args)
