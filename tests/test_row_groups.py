"""Row groups: interleaved rows too wide for a periodic pattern in L1 (more
than 64 vectors: 1024 float32 or 512 float64 values), normalised and given
their input gradient several rows at a time (bn_row_groups_*), against the
column tiles' row loops they replace, bit for bit: eval, training and both
backwards, float32 and float64, with and without relu and streaming stores,
1-3 threads, arrays that start off a cache line, in place. And through the
public functions against the float64 reference."""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from test_interleaved_backward import (  # noqa: F401 (fixtures)
    _backward, _backward_problem, threads_on_small_calls)
from test_periodic_normalize import (  # noqa: F401 (restore_tuning: a fixture)
    _eval, _problem, _same_bits, _train, assert_eval_keeps_non_finite_values,
    assert_periodic_gives_row_loop_bits, restore_tuning)


def assert_row_groups_give_tile_bits(run, context):
    """In row groups on 1-3 threads, 0, 1 and 4 elements off a cache line,
    in place or not, the bits of the tiles' row loops on one thread."""
    assert_periodic_gives_row_loop_bits(run, context, switch=_kernels.set_row_groups)

# (outer, channels, inner), each with at least a row chunk of rows per
# thread for three threads, so that every team takes the row groups:
# widths whose rows lie 4 bytes past a line from one to the next (1025
# float32: 16 phases, so groups of every 16th row; 8 phases in float64),
# 48 bytes (1100), whole lines (2048; 1536 as 512 channels of 3); widths
# past a float64 period but not a float32 one (600, 1000); a width past
# the last whole vector (3001); row counts that leave short groups.
SHAPES = [(200, 1025, 1), (150, 1100, 1), (100, 2048, 1), (130, 512, 3), (330, 600, 1),
          (200, 1000, 1), (97, 3001, 1)]


# The (shape, dtype) pairs past the periodic loops' limit of 4 KiB a row.
CASES = [(shape, dtype) for shape in SHAPES for dtype in (np.float32, np.float64)
         if shape[1] * shape[2] * np.dtype(dtype).itemsize > 64 * 64]


def _case_id(case):
    shape, dtype = case
    return "x".join(map(str, shape)) + "-" + np.dtype(dtype).name


@pytest.fixture
def row_groups_restored():
    previous = _kernels.set_row_groups(True)
    yield
    _kernels.set_row_groups(previous)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("run", [_eval, _train], ids=["eval", "train"])
def test_row_groups_give_the_bits_of_the_tiles(case, run, restore_tuning,
                                               row_groups_restored, threads_on_small_calls):
    shape, dtype = case
    problem = _problem(shape, dtype, seed=sum(shape))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        for relu in (False, True):
            assert_row_groups_give_tile_bits(
                lambda threads, offset, in_place: run(problem, shape, threads, relu, offset,
                                                      in_place),
                (stream_min, relu))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_row_groups_grad_input_gives_the_bits_of_the_tiles(case, training, restore_tuning,
                                                           row_groups_restored,
                                                           threads_on_small_calls):
    shape, dtype = case
    problem = _backward_problem(shape, dtype, seed=sum(shape))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        assert_row_groups_give_tile_bits(
            lambda threads, offset, in_place: _backward(problem, shape, threads, training,
                                                        offset, in_place),
            (stream_min,))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_groups_keep_non_finite_values_and_signed_zeros(dtype, restore_tuning,
                                                            row_groups_restored,
                                                            threads_on_small_calls):
    assert_eval_keeps_non_finite_values((100, 2051, 1), dtype, 3, 997, (5, 4100),
                                        _kernels.set_row_groups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_row_groups_match_the_reference(dtype, axis, restore_tuning, row_groups_restored):
    """Through the public functions (eval, training, backward) on (N, C)
    and channels-last arrays, against the float64 reference."""
    rng = np.random.default_rng(11)
    shape = (300, 1500) if axis == 1 else (40, 4, 3, 1100)
    channels = shape[axis]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 4, channels)
         + rng.uniform(-20, 20, channels)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(-2, 2, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    running_mean = rng.uniform(-20, 20, channels).astype(dtype)
    running_var = rng.uniform(0.5, 16, channels).astype(dtype)
    tolerance = dict(rtol=2e-5, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-12,
                                                                           atol=1e-11)
    _kernels.set_stream_min_bytes(0)

    got = bncore.batch_norm(x, running_mean, running_var, weight, bias, axis=axis,
                            num_threads=2)
    want = reference.batch_norm(x, running_mean, running_var, weight, bias, axis=axis).y
    np.testing.assert_allclose(got, want, **tolerance)

    got, mean, invstd = bncore.batch_norm(x, None, None, weight, bias, training=True,
                                          axis=axis, num_threads=2, return_stats=True)
    want = reference.batch_norm(x, None, None, weight, bias, training=True, axis=axis).y
    np.testing.assert_allclose(got, want, **tolerance)

    for training in (True, False):
        got = bncore.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                         axis=axis, num_threads=2)
        want = reference.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                             axis=axis)
        for g, w in zip(got, want):
            scale = np.abs(w).max()
            np.testing.assert_allclose(g, w, rtol=tolerance["rtol"] * 10,
                                       atol=tolerance["atol"] * scale)


def test_set_row_groups_returns_the_previous_setting(row_groups_restored):
    assert _kernels.set_row_groups(False) is True
    assert _kernels.set_row_groups(True) is False
