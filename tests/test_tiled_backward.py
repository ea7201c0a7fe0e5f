"""The channel-tiled training backward (planar order: each channel's
gradient sums read, then its dx written from cache) against the two-pass
path, bit for bit, float32 and float64: dx and both sums, for any thread
count and number of channel ranges, with or without streaming stores, dx in
place of dy or x, on arrays that do not start on a cache line; and against
the float64 reference."""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from conftest import at_page_offset
from test_pipelined import SHAPES, _offset_array, tuning_restorer


restore_tuning = tuning_restorer(_kernels.set_tiled_backward)


def _problem(outer, channels, inner, seed, dtype=np.float32):
    """x with a different location and spread per channel, dy, and the
    batch statistics of x (as the forward returns them)."""
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-50, 50, (1, channels, 1))
    scale = rng.uniform(0.1, 10, (1, channels, 1))
    x = (rng.standard_normal((outer, channels, inner)) * scale + loc).astype(dtype)
    dy = (rng.standard_normal((outer, channels, inner)) * rng.uniform(0.01, 5, (1, channels, 1))
          + rng.uniform(-1, 1, (1, channels, 1))).astype(dtype)
    wide = x.astype(np.float64)
    mean = wide.mean(axis=(0, 2))
    invstd = 1 / np.sqrt(wide.var(axis=(0, 2)) + 1e-5)
    weight = rng.uniform(-3, 3, channels).astype(dtype)
    return x.ravel(), dy.ravel(), mean, invstd, weight


def _backward(problem, shape, threads, mode, offset, in_place=None, items=0):
    """[dx, grad_weight, grad_bias]; in_place: None, "dy" or "x" (dx's buffer)."""
    x, dy, mean, invstd, weight = problem
    _kernels.set_tiled_backward(mode, items)
    x, dy = _offset_array(x, offset), _offset_array(dy, offset)
    dx = {"dy": dy, "x": x}.get(in_place)
    if dx is None:
        dx = _offset_array(np.zeros(x.size, x.dtype), offset)
    grad_weight, grad_bias = np.zeros(shape[1]), np.zeros(shape[1])
    _kernels.backward(x, dy, dx, *shape, mean, invstd, weight, True, grad_weight, grad_bias,
                      threads)
    return [dx.copy(), grad_weight, grad_bias]


def _same_bits(a, b):
    return all(p.tobytes() == q.tobytes() for p, q in zip(a, b))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0, 1, 4])
def test_tiled_backward_gives_the_bits_of_the_two_pass_path(shape, offset, dtype,
                                                                 restore_tuning):
    problem = _problem(*shape, seed=sum(shape) + offset, dtype=dtype)
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        want = _backward(problem, shape, 1, 0, offset)
        for threads, items in ((1, 0), (2, 0), (3, 0), (2, 5)):
            for in_place in (None, "dy", "x"):
                got = _backward(problem, shape, threads, 1, offset, in_place, items)
                assert _same_bits(got, want), (stream_min, threads, items, in_place)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner", [1024, 784])
@pytest.mark.parametrize("gaps", [(48, 2048), (2048, 48), (200, 64), (448, 448)])
def test_tiled_backward_with_dx_just_past_x_or_dy_mod_4_kib(gaps, inner, dtype,
                                                                 restore_tuning):
    """dx a little past x or dy modulo 4 KiB (gaps: dx's offset past x's,
    past dy's), where loads and stores alias in the store buffer: the bits
    stay the two-pass path's."""
    shape = (6, 9, inner)
    x, dy, mean, invstd, weight = _problem(*shape, seed=sum(gaps) + inner, dtype=dtype)
    x = at_page_offset(x, 16)
    dy = at_page_offset(dy, 16 + gaps[0] - gaps[1])
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        results = []
        for mode, threads in ((0, 1), (1, 1), (1, 2)):
            _kernels.set_tiled_backward(mode)
            dx = at_page_offset(np.zeros(x.size, x.dtype), 16 + gaps[0])
            sums = [np.zeros(shape[1]), np.zeros(shape[1])]
            _kernels.backward(x, dy, dx, *shape, mean, invstd, weight, True, *sums, threads)
            results.append([dx] + sums)
        assert _same_bits(results[1], results[0]) and _same_bits(results[2], results[0])


def assert_backward_matches_the_reference(got, problem, shape):
    """got = [dx, grad_weight, grad_bias] of a training backward of problem =
    (x, dy, mean, invstd, weight) against the float64 reference."""
    dx, grad_weight, grad_bias = got
    x, dy, mean, invstd, weight = problem
    want = reference.batch_norm_backward(dy.reshape(shape), x.reshape(shape), mean, invstd,
                                         weight)
    # dx is arithmetic in x's type: compare against its scale.
    rtol = 1e-4 if dx.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(dx.reshape(shape), want[0], rtol=rtol,
                               atol=rtol / 10 * np.abs(want[0]).max())
    np.testing.assert_allclose(grad_weight, want[1], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grad_bias, want[2], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_backward_matches_the_reference(dtype, restore_tuning):
    shape = (9, 5, 1100)
    problem = _problem(*shape, seed=11, dtype=dtype)
    _kernels.set_stream_min_bytes(0)
    assert_backward_matches_the_reference(_backward(problem, shape, 2, 1, 4), problem, shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_backward_keeps_non_finite_values(dtype, restore_tuning):
    shape = (6, 4, 500)
    x, dy, mean, invstd, weight = _problem(*shape, seed=3, dtype=dtype)
    inner = shape[2]
    dy[7] = np.inf                      # channel 0: infinite S_dy, NaN dx
    x[inner + 5] = np.nan               # channel 1: NaN S_dev, NaN dx
    dy[inner * 2 + 9] = -np.inf         # channel 2
    x[inner * 2 + 9] = np.inf           # ... with x infinite at the same place
    # Channel 3 stays finite: its bits must match too.
    _kernels.set_stream_min_bytes(0)
    problem = (x, dy, mean, invstd, weight)
    want = _backward(problem, shape, 1, 0, 0)
    assert np.isnan(want[0]).any() and np.isnan(want[1]).any() and np.isinf(want[2]).any()
    assert np.isfinite(want[0].reshape(shape)[:, 3]).all()
    for threads in (1, 2):
        for in_place in (None, "dy"):
            got = _backward(problem, shape, threads, 1, 0, in_place)
            assert _same_bits(got, want), (threads, in_place)


@pytest.mark.parametrize("in_place", [False, True])
def test_relu_backward_through_the_tiled_path(in_place, restore_tuning):
    """functional's relu backward gates dy into grad_input, then runs the
    backward in place on it: the tiled path gives the same bits."""
    x = _problem(4, 6, 300, seed=5)[0].reshape(4, 6, 300)
    dy = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    weight = np.linspace(-1, 2, 6, dtype=np.float32)
    bias = np.linspace(-0.5, 0.5, 6, dtype=np.float32)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    _kernels.set_stream_min_bytes(0)
    results = []
    for mode in (0, 1):
        _kernels.set_tiled_backward(mode)
        out = dy.copy() if in_place else None
        got = bncore.batch_norm_backward(dy if out is None else out, x, mean, invstd, weight,
                                         bias, activation="relu", out=out)
        results.append(got)
    assert _same_bits(*results)
    want = reference.batch_norm_backward(dy, x, mean, invstd, weight, bias, activation="relu")
    np.testing.assert_allclose(results[1][0], want[0], rtol=1e-4, atol=1e-4)


def test_calls_that_are_not_tiled_are_unchanged_when_forced(restore_tuning):
    """Eval, the split backward's halves and long runs (chunked pieces) keep
    their paths when the tiled one is forced."""
    shape = (3, 4, 70000)     # runs of 64 Ki values or more: chunked
    x, dy, mean, invstd, weight = _problem(*shape, seed=8)
    results = []
    for mode in (0, 1):
        _kernels.set_tiled_backward(mode)
        out = []
        for training, dims in ((True, shape), (False, shape), (False, (6, 4, 35000))):
            dx, sums = np.zeros_like(x), [np.zeros(4), np.zeros(4)]
            _kernels.backward(x, dy, dx, *dims, mean, invstd, weight, training, *sums, 2)
            out += [dx, *sums]
        dims = (6, 4, 35000)    # short runs: only the split halves' paths stay
        sums = [np.zeros(4), np.zeros(4)]
        _kernels.grad_sums(x, dy, *dims, mean, *sums, 2)
        dx = np.zeros_like(x)
        _kernels.grad_input(x, dy, dx, *dims, mean, invstd, weight, *sums, 7.0 * 35000, 2)
        results.append(out + [dx, *sums])
    assert _same_bits(*results)


@pytest.mark.parametrize("shape, tiled", [
    ((256, 8, 3136), True),      # channels of 3.2 MB (of x)
    ((320, 8, 3136), False),     # 4.0 MB
], ids=["3.2MB", "4.0MB"])
def test_size_rule_tiles_channels_up_to_3_5_mib(shape, tiled, restore_tuning):
    """By size, float32 on one thread with streaming stores, the tiled walk
    takes channels of up to PIPE_MAX_GRAD_SLICE (3.5 MiB of x); larger ones
    take the two passes. The bits are the two passes' either way."""
    problem = _problem(*shape, seed=5)
    _kernels.set_stream_min_bytes(0)
    want = _backward(problem, shape, 1, 0, 0)
    calls = _kernels.tiled_backward_calls()
    assert _same_bits(_backward(problem, shape, 1, -1, 0), want)
    if _kernels.VECTOR_ISA == "AVX-512":
        assert _kernels.tiled_backward_calls() == calls + tiled


def test_set_tiled_backward_returns_the_previous_setting(restore_tuning):
    _kernels.set_tiled_backward(1, 6)
    assert _kernels.set_tiled_backward(0) == (1, 6)
    assert _kernels.set_tiled_backward(-1) == (0, 0)
