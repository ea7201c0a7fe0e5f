"""Scale: index arithmetic past 2**31 values, huge channel counts, huge runs.

* More than 2**31 values (marked slow: 8.6 GB of float32, needs 20 GB of
  free memory): moments, a training forward, an eval forward and both
  backward passes on a (1, 3, N) planar and an (N, 3) interleaved array of
  2**31 + 7 values, against float64 NumPy computed chunk by chunk, at
  probe positions around 2**31 and over every channel's whole output.
* In the default run, stand-ins whose sizes straddle the kernels' block,
  chunk and tile boundaries at odd offsets, against the reference.
* Huge C, (4, 1000000), and huge runs, (2, 3, 4096, 4096), against float64
  NumPy; and (marked timing) in time per value within a factor 5 of a
  mid-size input of the same layout.
"""

import functools
import math
import time

import numpy as np
import pytest

import bncore
from conftest import assert_output_close, assert_stats_close, make_input
from test_functional import _check_against_reference


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------
# Stand-ins for the default run

STAND_INS = [
    ((1, 2, 2**20 + 3), 1),  # two planar runs of just over a Mi values
    ((3, 2**16 + 1, 5), 1),  # 65537 channels of short runs (rows across channels)
    ((2**16 + 1, 3), 1),  # interleaved, 65537 rows
    ((3, 5, 2**14 + 1), -1),  # channels-last, 16385 channels
    ((2**12 + 1, 3, 33), 1),  # planar runs just over the 32-value threshold
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", STAND_INS, ids=lambda lo: "x".join(map(str, lo[0])))
def test_odd_large_sizes_match_reference(layout, dtype, training):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=950)
    _check_against_reference(x, axis, dtype, training=training, affine=True, running=True,
                             seed=950)


# --------------------------------------------------------------------------
# Huge C, huge runs


def _float64_stats(x, axis):
    """Per channel (mean, biased var) in float64, one channel at a time."""
    xc = np.moveaxis(x, axis, 0)
    means, variances = [], []
    for k in range(xc.shape[0]):
        v = xc[k].astype(np.float64)
        m = v.mean()
        means.append(m)
        variances.append(np.mean((v - m) ** 2))
    return np.array(means), np.array(variances)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_huge_channel_count(dtype):
    """(4, 1000000): a million channels of 4 values each."""
    rng = np.random.default_rng(960)
    offsets = rng.uniform(-100, 100, 1_000_000)
    x = (offsets + rng.standard_normal((4, 1_000_000)) * rng.uniform(0.1, 10, 1_000_000))
    x = x.astype(dtype)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    var = x64.var(axis=0)
    spread = np.sqrt(var)
    cond = np.abs(mean) / spread
    rm, rv = np.zeros(1_000_000, dtype), np.ones(1_000_000, dtype)

    got_mean, got_var = bncore.moments(x)
    assert_stats_close(got_mean, mean, dtype, scale=spread, what="mean")
    assert_stats_close(got_var, var, dtype, what="var", cond=cond)

    y, m, invstd = bncore.batch_norm(x, rm, rv, training=True, return_stats=True)
    want_invstd = 1 / np.sqrt(var + 1e-5)
    assert_stats_close(invstd, want_invstd, dtype, what="invstd", cond=cond)
    assert_output_close(y, (x64 - mean) * want_invstd, dtype)
    assert_stats_close(rm, 0.1 * mean, dtype, scale=0.1 * spread, what="running_mean")
    assert_stats_close(rv, 0.9 + 0.1 * var * 4 / 3, dtype, what="running_var", cond=cond)

    y = bncore.batch_norm(x, rm, rv)
    assert_output_close(y, (x64 - rm) / np.sqrt(rv.astype(np.float64) + 1e-5), dtype)


def _assert_affine_of(got, x, a, c):
    """got == a * x + c for every value, to float32 output accuracy
    (conftest's 1e-5 relative + 1e-5), without assert_allclose's
    temporaries (seconds on 33 million values)."""
    want = x.astype(np.float64)
    want *= a
    want += c
    err = got.astype(np.float64)
    err -= want
    np.abs(err, out=err)
    bound = np.abs(want, out=want)
    bound *= 1e-5
    bound += 1e-5
    bad = ~(err <= bound)
    assert not bad.any(), f"{bad.sum()} values off, worst by {err.max()}"


def test_huge_runs():
    """(2, 3, 4096, 4096) float32: three channels of 33.5 million values."""
    shape = (2, 3, 4096, 4096)
    rng = np.random.default_rng(961)
    x = rng.standard_normal(shape, dtype=np.float32)
    x[:, 1] *= 100
    x[:, 1] += 1e4
    x[:, 2] -= 3
    mean, var = _float64_stats(x, 1)
    spread = np.sqrt(var)
    got_mean, got_var = bncore.moments(x)
    assert_stats_close(got_mean, mean, np.float32, scale=spread, what="mean")
    assert_stats_close(got_var, var, np.float32, what="var", cond=np.abs(mean) / spread)

    out = np.empty_like(x)
    _, m, invstd = bncore.batch_norm(x, training=True, out=out, return_stats=True)
    want_invstd = 1 / np.sqrt(var + 1e-5)
    assert_stats_close(invstd, want_invstd, np.float32, what="invstd")
    # every output value, one channel at a time (a float64 copy of all would be 800 MB)
    for k in range(3):
        _assert_affine_of(out[:, k], x[:, k], want_invstd[k], -mean[k] * want_invstd[k])
    w, b = np.array([2.0, 0.5, -1.0]), np.array([1.0, 0.0, 3.0])
    rm, rv = mean.astype(np.float32), var.astype(np.float32)
    bncore.batch_norm(x, rm, rv, w, b, out=out)
    inv = 1 / np.sqrt(rv.astype(np.float64) + 1e-5)
    for k in range(3):
        _assert_affine_of(out[:, k], x[:, k], inv[k] * w[k], b[k] - rm[k] * inv[k] * w[k])


@functools.lru_cache(maxsize=2)
def _timing_input(shape):
    rng = np.random.default_rng(970)
    return rng.standard_normal(shape, dtype=np.float32) * 2 + 1


def _per_value_time(shape, call_kind, repeats):
    """Best time per value of one call, single-threaded (no team to wait for
    on a loaded machine)."""
    x = _timing_input(shape)
    out = np.empty_like(x)
    c = shape[1]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    calls = {
        "train": lambda: bncore.batch_norm(x, training=True, out=out, num_threads=1),
        "eval": lambda: bncore.batch_norm(x, rm, rv, out=out, num_threads=1),
        "moments": lambda: bncore.moments(x, num_threads=1),
        "backward": lambda: bncore.batch_norm_backward(x, x, mean, invstd, out=out,
                                                       num_threads=1),
    }
    call = calls[call_kind]
    call()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best / x.size


@pytest.mark.timing
@pytest.mark.parametrize("kind", ["train", "eval", "moments", "backward"])
@pytest.mark.parametrize("huge, mid", [((4, 1_000_000), (4, 50_000)),
                                       ((2, 3, 4096, 4096), (2, 3, 512, 512))],
                         ids=["huge-C", "huge-runs"])
def test_time_proportional_to_size(huge, mid, kind):
    """Per value, the huge input costs at most 3 times the mid-size one
    beyond what a plain copy of the same sizes shows now (out of cache
    against in cache; generous, on a noisy machine)."""
    t_huge = _per_value_time(huge, kind, repeats=3)
    t_mid = _per_value_time(mid, kind, repeats=15)
    # Control: the same out-of-cache against in-cache ratio for a plain
    # copy, measured now, so that a neighbour saturating memory bandwidth
    # raises the bar instead of failing the test.
    copy_ratio = _copy_time(huge, repeats=3) / _copy_time(mid, repeats=15)
    assert t_huge < 3 * max(copy_ratio, 1.7) * t_mid, (
        f"{kind}: {t_huge * 1e9:.3f} ns per value for {huge}, "
        f"{t_mid * 1e9:.3f} for {mid} (a copy's ratio now: {copy_ratio:.2f})"
    )


def _copy_time(shape, repeats):
    x = np.ones(shape, np.float32)
    y = np.empty_like(x)
    np.copyto(y, x)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(y, x)
        best = min(best, time.perf_counter() - t0)
    return best / x.size


# --------------------------------------------------------------------------
# More than 2**31 values (slow, 8.6 GB)

TOTAL = 2**31 + 7  # divisible by 3
N = TOTAL // 3
CHUNK = 2**24
OFFSETS = np.array([5.0, -20.0, 100.0])
SCALES = np.array([1.0, 3.0, 0.5])


def _channels(flat, layout):
    """(3, N) view of the flat array: rows contiguous (planar) or strided
    (interleaved)."""
    if layout == "planar":
        return flat.reshape(3, N)
    return flat.reshape(N, 3).T


def _chunked_stats(channels):
    """float64 per-channel mean and M2, two passes, chunk by chunk."""
    means, m2s = [], []
    for k in range(3):
        row = channels[k]
        total = math.fsum(row[s:s + CHUNK].astype(np.float64).sum() for s in range(0, N, CHUNK))
        mean = total / N
        m2 = math.fsum(((row[s:s + CHUNK].astype(np.float64) - mean) ** 2).sum()
                       for s in range(0, N, CHUNK))
        means.append(mean)
        m2s.append(m2)
    return np.array(means), np.array(m2s)


def _probes(rng):
    """Flat indices around every boundary that 32-bit arithmetic would break."""
    fixed = [0, 1, N - 1, N, 2 * N - 1, 2 * N, 2**31 - 8, 2**31 - 1, 2**31, 2**31 + 1,
             2**31 + 4, TOTAL - 2, TOTAL - 1]
    return np.unique(np.concatenate([fixed, rng.integers(0, TOTAL, 50)]))


def _channel_of(index, layout):
    return index // N if layout == "planar" else index % 3


@pytest.mark.slow
@pytest.mark.skipif(_mem_available() < 20 * 2**30,
                    reason="needs 20 GB of available memory (an 8.6 GB array and checks)")
@pytest.mark.parametrize("layout", ["planar", "interleaved"])
def test_more_than_2_31_values(layout):
    rng = np.random.default_rng(990)
    flat = np.empty(TOTAL, np.float32)
    for s in range(0, TOTAL, CHUNK):
        rng.random(out=flat[s:s + CHUNK], dtype=np.float32)
    ch = _channels(flat, layout)
    for k in range(3):
        for s in range(0, N, CHUNK):
            seg = ch[k, s:s + CHUNK]
            seg *= SCALES[k]
            seg += OFFSETS[k]
    x = flat.reshape((1, 3, N) if layout == "planar" else (N, 3))
    axis = 1
    probes = _probes(rng)
    probe_channel = _channel_of(probes, layout)
    original = flat[probes].astype(np.float64)

    # moments
    mean, m2 = _chunked_stats(ch)
    var = m2 / TOTAL * 3
    spread = np.sqrt(var)
    got_mean, got_var = bncore.moments(x, axis=axis)
    assert_stats_close(got_mean, mean, np.float32, scale=spread, what="mean")
    assert_stats_close(got_var, var, np.float32, what="var")

    # training forward, in place, with running statistics
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    _, got_mean, invstd = bncore.batch_norm(x, rm, rv, training=True, axis=axis, out=x,
                                            return_stats=True)
    want_invstd = 1 / np.sqrt(var + 1e-5)
    assert_stats_close(got_mean, mean, np.float32, scale=spread, what="train mean")
    assert_stats_close(invstd, want_invstd, np.float32, what="invstd")
    assert_stats_close(rm, 0.1 * mean, np.float32, scale=0.1 * spread, what="running_mean")
    assert_stats_close(rv, 0.9 + 0.1 * m2 / (N - 1), np.float32, what="running_var")
    want = (original - mean[probe_channel]) * want_invstd[probe_channel]
    assert_output_close(flat[probes], want, np.float32)
    # every value was written: each channel now has mean 0 and variance ~1
    # (an unwritten tail would keep its offset of 5, -20 or 100)
    out_mean, out_m2 = _chunked_stats(ch)
    np.testing.assert_allclose(out_mean, 0, atol=1e-5)
    np.testing.assert_allclose(out_m2 / N, var / (var + 1e-5), rtol=1e-5)

    # eval forward, in place
    before = flat[probes].astype(np.float64)
    erm, erv = np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.25, 1.0])
    w, b = np.array([2.0, 0.5, -1.0]), np.array([1.0, 0.0, 3.0])
    bncore.batch_norm(x, erm, erv, w, b, axis=axis, out=x)
    scale = w / np.sqrt(erv + 1e-5)
    want = (before - erm[probe_channel]) * scale[probe_channel] + b[probe_channel]
    assert_output_close(flat[probes], want, np.float32)
    eval_mean, eval_m2 = _chunked_stats(ch)
    np.testing.assert_allclose(eval_mean, (out_mean - erm) * scale + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eval_m2, out_m2 * scale**2, rtol=1e-5)

    # backward with grad_output = input = out, one array (no second 8.6 GB):
    # with dy = x and any invstd s, grad_bias = sum(x), grad_weight = s * M2,
    # and in training dx = w * s * (x - mean) * (1 - s**2 * var); s is chosen
    # as 1 / sqrt(var + 3) so that the factor (3 / (var + 3)) cancels nothing.
    # In eval dx = x * w * s.
    var2 = eval_m2 / N
    s2 = 1 / np.sqrt(var2 + 3.0)
    bw = np.array([1.5, -0.5, 2.0])
    before = flat[probes].astype(np.float64)
    gi, gw, gb = bncore.batch_norm_backward(x, x, eval_mean, s2, bw, axis=axis, out=x)
    assert gi is x
    np.testing.assert_allclose(gb, eval_mean * N, rtol=1e-5)
    np.testing.assert_allclose(gw, eval_m2 * s2, rtol=1e-5)
    factor = bw * s2 * 3.0 / (var2 + 3.0)
    k = probe_channel
    assert_output_close(flat[probes], factor[k] * (before - eval_mean[k]), np.float32)
    grad_mean, grad_m2 = _chunked_stats(ch)
    np.testing.assert_allclose(grad_mean, 0, atol=1e-5)
    np.testing.assert_allclose(grad_m2, eval_m2 * factor**2, rtol=1e-5)

    before = flat[probes].astype(np.float64)
    bncore.batch_norm_backward(x, x, eval_mean, s2, bw, training=False, axis=axis, out=x)
    assert_output_close(flat[probes], before * bw[k] * s2[k], np.float32)
    last_mean, last_m2 = _chunked_stats(ch)
    np.testing.assert_allclose(last_mean, grad_mean * bw * s2, atol=1e-5)
    np.testing.assert_allclose(last_m2, grad_m2 * (bw * s2) ** 2, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _free_timing_inputs():
    yield
    _timing_input.cache_clear()
