"""The backward of the interleaved layout (channels-last and (N, C) inputs).

Its gradient sums (register-blocked column groups of 64, 32 and 16, rows
wider than 64 taken a few at a time, narrow rows packed as the moments')
against float64 NumPy and bit for bit across thread counts; its input
gradient by the flat periodic loop against the row loop it replaces, bit for
bit (training and eval, float32 and float64, streaming stores on and off,
1-3 threads, buffers off a cache line, in place), and through the public
function against the float64 reference."""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from test_periodic_normalize import (  # noqa: F401 (restore_tuning: a fixture)
    SHAPES, _same_bits, assert_periodic_gives_row_loop_bits, restore_tuning)
from test_pipelined import _offset_array

# (channels, inner): row widths around every column group and packing case:
# 1, 3, 8, 16, 40 and 48 (packed into a multiple of 16 columns), 17, 33 and
# 63 (packed, not a multiple of 16), 64 (one group, not packed), 65, 80,
# 100, 128, 130 and 200 (groups of 64, 32 and 16 and a scalar rest, rows
# taken 8 at a time), and 600, 900 (channels of 3) and 1030 (wider than a
# column tile: whole rows where there are enough row chunks, else tiles).
GEOMETRIES = [(1, 1), (3, 1), (8, 1), (2, 20), (16, 1), (17, 1), (33, 1), (16, 3), (63, 1),
              (64, 1), (65, 1), (80, 1), (100, 1), (128, 1), (130, 1), (200, 1), (600, 1),
              (300, 3), (1030, 1)]
ROWS = [5, 77, 4133]


@pytest.fixture
def threads_on_small_calls():
    """Let threads split even the small calls here (they would otherwise
    run serially whatever the thread count asked for)."""
    previous = _kernels.set_serial_max_values(0)
    yield
    _kernels.set_serial_max_values(previous)


def _sums_problem(outer, channels, inner, dtype, seed):
    """x far from zero (where a careless sum cancels), dy of both signs."""
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-1e3, 1e3, (1, channels, 1))
    spread = rng.uniform(1e-3, 10, (1, channels, 1))
    x = (rng.standard_normal((outer, channels, inner)) * spread + loc).astype(dtype)
    dy = rng.standard_normal((outer, channels, inner)).astype(dtype)
    mean = x.astype(np.float64).mean(axis=(0, 2))
    return x, dy, mean


def _grad_sums(x, dy, mean, threads):
    outer, channels, inner = x.shape
    sum_dy, sum_dy_dev = np.zeros(channels), np.zeros(channels)
    _kernels.grad_sums(x.ravel(), dy.ravel(), outer, channels, inner, mean, sum_dy,
                       sum_dy_dev, threads)
    return sum_dy, sum_dy_dev


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("outer", ROWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interleaved_grad_sums_match_numpy_in_float64(geometry, outer, dtype):
    x, dy, mean = _sums_problem(outer, *geometry, dtype, seed=outer + sum(geometry))
    sum_dy, sum_dy_dev = _grad_sums(x, dy, mean, 2)
    wide_dy = dy.astype(np.float64)
    terms = wide_dy * (x.astype(np.float64) - mean[:, None])
    # Sums of terms of both signs: bound the error by the sum of magnitudes.
    np.testing.assert_allclose(sum_dy, wide_dy.sum(axis=(0, 2)), rtol=0,
                               atol=1e-13 * np.abs(wide_dy).sum())
    scale = np.abs(terms).sum(axis=(0, 2))
    assert np.all(np.abs(sum_dy_dev - terms.sum(axis=(0, 2))) <= 1e-13 * scale)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interleaved_grad_sums_are_the_same_bits_for_any_thread_count(geometry, dtype,
                                                                      threads_on_small_calls):
    x, dy, mean = _sums_problem(4133, *geometry, dtype, seed=sum(geometry))
    want = _grad_sums(x, dy, mean, 1)
    for threads in (2, 3):
        assert _same_bits(_grad_sums(x, dy, mean, threads), want), threads


def test_a_nan_in_one_packed_column_reaches_only_its_channels_sums():
    """A NaN in row 7 (the eighth row of a pack of 8 rows) of channel 2
    poisons channel 2's sums and no other."""
    x, dy, mean = _sums_problem(300, 8, 1, np.float32, seed=1)
    dy[7, 2, 0] = np.nan
    sum_dy, sum_dy_dev = _grad_sums(x, dy, mean, 2)
    assert np.isnan(sum_dy[2]) and np.isnan(sum_dy_dev[2])
    others = np.arange(8) != 2
    assert np.isfinite(sum_dy[others]).all() and np.isfinite(sum_dy_dev[others]).all()


def _backward_problem(shape, dtype, seed):
    outer, channels, inner = shape
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-50, 50, (1, channels, 1))
    spread = rng.uniform(0.1, 10, (1, channels, 1))
    x = (rng.standard_normal(shape) * spread + loc).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean = loc.ravel().astype(np.float64)
    invstd = 1.0 / spread.ravel()
    weight = rng.uniform(-3, 3, channels).astype(dtype)
    return x.ravel(), dy.ravel(), mean, invstd, weight


def _backward(problem, shape, threads, training, offset, in_place):
    """dx and the parameter gradients; in place: dx written over dy."""
    x, dy, mean, invstd, weight = problem
    x, dy = _offset_array(x, offset), _offset_array(dy, offset)
    dx = dy if in_place else _offset_array(np.zeros(x.size, x.dtype), offset)
    grad_weight, grad_bias = np.zeros(shape[1]), np.zeros(shape[1])
    _kernels.backward(x, dy, dx, *shape, mean, invstd, weight, training, grad_weight,
                      grad_bias, threads)
    return [dx.copy(), grad_weight, grad_bias]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_periodic_grad_input_gives_the_bits_of_the_row_loop(shape, dtype, training,
                                                            restore_tuning,
                                                            threads_on_small_calls):
    problem = _backward_problem(shape, dtype, seed=sum(shape))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        assert_periodic_gives_row_loop_bits(
            lambda threads, offset, in_place: _backward(problem, shape, threads, training,
                                                        offset, in_place),
            (stream_min,))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_periodic_grad_input_keeps_non_finite_values(dtype, restore_tuning,
                                                     threads_on_small_calls):
    shape = (50, 24, 1)
    x, dy, mean, invstd, weight = _backward_problem(shape, dtype, seed=2)
    x[3::29] = np.nan
    dy[5] = np.inf
    dy[30] = -np.inf
    problem = (x, dy, mean, invstd, weight)
    _kernels.set_stream_min_bytes(0)
    for training in (True, False):
        _kernels.set_periodic_loops(False)
        want = _backward(problem, shape, 1, training, 0, False)
        _kernels.set_periodic_loops(True)
        got = _backward(problem, shape, 2, training, 1, False)
        # Training: NaN in x reaches its channels' sums; eval: dx = dy * k.
        assert np.isnan(got[0]).any() if training else np.isinf(got[0]).any()
        assert _same_bits(got, want), training


@pytest.mark.parametrize("shape", [(77, 8, 1), (700, 128, 1), (40, 5, 3), (3000, 130, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_backward_matches_the_reference(shape, training, restore_tuning):
    """Through the public function on a channels-last array, against the
    float64 reference (not only against the other loop)."""
    x, dy, mean, invstd, weight = _backward_problem(shape, np.float32, seed=9)
    nhwc = [np.ascontiguousarray(a.reshape(shape).transpose(0, 2, 1)) for a in (x, dy)]
    _kernels.set_stream_min_bytes(0)
    got = bncore.batch_norm_backward(nhwc[1], nhwc[0], mean, invstd, weight,
                                     training=training, axis=-1, num_threads=2)
    want = reference.batch_norm_backward(nhwc[1], nhwc[0], mean, invstd, weight,
                                         training=training, axis=-1)
    for g, w in zip(got, want):
        scale = np.abs(w).max()
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("shape", [(77, 8, 1), (700, 128, 1), (29, 17, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_periodic_split_grad_input_gives_the_bits_of_the_row_loop(shape, restore_tuning,
                                                                  threads_on_small_calls):
    """The second half of a split backward (sums given, as a distributed
    backward calls it) takes the periodic loop too."""
    x, dy, mean, invstd, weight = _backward_problem(shape, np.float32, seed=4)
    sum_dy, sum_dy_dev = _grad_sums(x.reshape(shape), dy.reshape(shape), mean, 1)
    count = float(shape[0] * shape[2])

    def grad_input(threads):
        dx = _offset_array(np.zeros(x.size, x.dtype), 1)
        _kernels.grad_input(x, dy, dx, *shape, mean, invstd, weight, sum_dy, sum_dy_dev,
                            count, threads)
        return [dx]

    _kernels.set_periodic_loops(False)
    want = grad_input(1)
    _kernels.set_periodic_loops(True)
    for threads in (1, 2, 3):
        assert _same_bits(grad_input(threads), want), threads
