"""Short runs: NCHW inputs with small maps, on both sides of the rules that
choose how their runs are walked, in either case against the float64
reference on adversarial channels (offset, constant, ...), and with the
same bits on 1, 2 and 3 threads:

* few rows: planar_order walks short runs as runs (FEW_ROWS_F32,
  FEW_ROWS_F64: fewer than a half, float64 a quarter, as many rows as
  values per run), where rows across channels would merge a triple per
  column;
* in cache, runs of 16-31 values (PLANAR_MIN_INNER_IN_CACHE): as runs,
  written a row at a time with AVX-512 (rows_as_runs), as rows across
  channels without it;
* in cache, row chunks of at least a block of whole runs
  (IN_CACHE_BLOCK_MIN_RUNS), the last chunk short where there are more
  rows than a block holds;
* from memory (streaming stores forced), row chunks of at least
  FROM_MEMORY_BLOCK_ROWS (8) rows of such runs, or a block's where it
  holds fewer, the last chunk short.
"""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from conftest import (assert_output_close, assert_stats_close, channel_condition,
                      channel_spread, make_input, make_params)

SHAPES = [
    # (N, C, H, W, dtype), few rows: taken as runs (N * 2 < H * W float32,
    # N * 4 < H * W float64), then at and past the rule's edge, where rows
    # across channels stay for runs under 16 values.
    (1, 256, 4, 4, np.float32), (2, 128, 4, 4, np.float32), (7, 40, 4, 4, np.float32),
    (3, 96, 3, 4, np.float32), (2, 64, 3, 3, np.float32), (1, 300, 1, 3, np.float32),
    (8, 64, 3, 5, np.float32), (2, 512, 2, 2, np.float32), (9, 30, 3, 3, np.float32),
    (2, 128, 4, 4, np.float64), (3, 50, 5, 3, np.float64), (4, 64, 3, 3, np.float64),
    (1, 200, 2, 2, np.float64),
    # Runs of 16-31 values in cache: one chunk of rows; 300 and 150 rows
    # of 16 values are three and two chunks (a block holds 128 runs).
    (8, 64, 4, 4, np.float32), (9, 30, 4, 4, np.float32), (33, 20, 4, 5, np.float32),
    (128, 16, 5, 5, np.float32), (5, 7, 31, 1, np.float32), (300, 4, 4, 4, np.float32),
    (8, 64, 4, 4, np.float64), (150, 6, 4, 4, np.float64), (20, 9, 3, 7, np.float64),
    # Longer runs in cache, chunks of a block's rows: 41 runs of 49 values,
    # 9 of 216 (12 chunks), 4 of 512; and 600 values, 3 a block, in chunks
    # of a row.
    (32, 64, 7, 7, np.float32), (100, 6, 6, 36, np.float32), (64, 5, 8, 64, np.float32),
    (16, 8, 20, 30, np.float32), (40, 6, 7, 7, np.float64), (100, 3, 6, 36, np.float64),
]

# From memory: runs of 49 values (41 a block) in 28 rows, chunks of 8, 8, 8
# and 4 rows (one row each before); 64 rows in 8 chunks; 30 rows, the last
# chunk of 6; runs of 196 (10 a block) in 100 rows, 13 chunks; runs of 400
# (5 a block) in 201 rows, chunks of 5 (4 before), the last of one row.
# Float64: 24 rows of 49 values, 3 chunks; 70 rows of 196, chunks of 8, the
# last of 6.
FROM_MEMORY_SHAPES = [
    (28, 64, 7, 7, np.float32), (64, 16, 7, 7, np.float32), (30, 40, 7, 7, np.float32),
    (100, 8, 14, 14, np.float32), (201, 4, 20, 20, np.float32),
    (24, 32, 7, 7, np.float64), (70, 8, 14, 14, np.float64),
]


@pytest.fixture
def from_memory():
    """Every call taken as from memory: streaming stores and its chunking."""
    previous = _kernels.set_stream_min_bytes(0)
    yield
    _kernels.set_stream_min_bytes(previous)


def _shape_id(case):
    *shape, dtype = case
    return "x".join(map(str, shape)) + "-" + np.dtype(dtype).name


def _forward_and_backward(x, dy, params, threads):
    weight, bias, running_mean, running_var = params
    y, mean, invstd = bncore.batch_norm(x, running_mean.copy(), running_var.copy(), weight,
                                        bias, training=True, return_stats=True,
                                        num_threads=threads)
    y_eval = bncore.batch_norm(x, running_mean, running_var, weight, bias,
                               num_threads=threads)
    grads = bncore.batch_norm_backward(dy, x, mean, invstd, weight, bias,
                                       num_threads=threads)
    return [y, mean, invstd, y_eval, *grads]


def _check_against_the_reference(case):
    """Statistics on adversarial channels (within the conditioning bounds of
    the accuracy contract); outputs and gradients on unit-scale data, where
    the output tolerance holds."""
    *shape, dtype = case
    weight, bias, running_mean, running_var = params = make_params(shape[1], dtype)
    hard = make_input(shape, dtype, seed=sum(shape))
    _, mean, invstd = bncore.batch_norm(hard, training=True, return_stats=True,
                                        num_threads=2)
    want = reference.batch_norm(hard, training=True)
    assert_stats_close(mean, want.mean, dtype, scale=channel_spread(hard, 1), what="mean")
    assert_stats_close(invstd, want.invstd, dtype, cond=channel_condition(hard, 1),
                       what="invstd")

    x = make_input(shape, dtype, kind="normal", seed=sum(shape))
    dy = make_input(shape, dtype, kind="normal", seed=1)
    y, mean, invstd, y_eval, *grads = _forward_and_backward(x, dy, params, 2)
    want = reference.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    assert_output_close(y, want.y, dtype)
    want_eval = reference.batch_norm(x, running_mean, running_var, weight, bias)
    assert_output_close(y_eval, want_eval.y, dtype)
    want_grads = reference.batch_norm_backward(dy, x, mean, invstd, weight, bias)
    for got, expected in zip(grads, want_grads):
        assert_output_close(got, expected, dtype)


def _check_the_same_bits_on_any_thread_count(case):
    *shape, dtype = case
    x = make_input(shape, dtype, seed=sum(shape))
    dy = make_input(shape, dtype, kind="normal", seed=1)
    params = make_params(shape[1], dtype)
    want = _forward_and_backward(x, dy, params, 1)
    for threads in (2, 3):
        got = _forward_and_backward(x, dy, params, threads)
        assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                   for a, b in zip(got, want)), threads


@pytest.mark.parametrize("case", SHAPES, ids=_shape_id)
def test_short_runs_match_the_reference(case):
    _check_against_the_reference(case)


@pytest.mark.parametrize("case", SHAPES, ids=_shape_id)
def test_short_runs_give_the_same_bits_on_any_thread_count(case):
    _check_the_same_bits_on_any_thread_count(case)


@pytest.mark.parametrize("case", FROM_MEMORY_SHAPES, ids=_shape_id)
def test_short_runs_from_memory_match_the_reference(case, from_memory):
    _check_against_the_reference(case)


@pytest.mark.parametrize("case", FROM_MEMORY_SHAPES, ids=_shape_id)
def test_short_runs_from_memory_give_the_same_bits_on_any_thread_count(case, from_memory):
    _check_the_same_bits_on_any_thread_count(case)
