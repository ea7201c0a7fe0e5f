"""The column-group statistics and gradient sums of (N, C) and
channels-last inputs load their rows in memory order before they sum them
(bn_touch_rows_avx512 in _leaf_loops.h). Whether they do depends on where
the input lies: rows of at most 512 bytes are loaded ahead only when every
row starts on a cache line (bn_touch_each_rows). The results must not depend on it: for each
shape, the input (and the backward's grad_output) placed on a page
boundary, on other cache-line starts and off them gives the bits of the
input 16 bytes past a page (where NumPy puts large arrays), and matches the
float64 reference.

Shapes: rows of 96 and 128 float32 values (each slab loaded ahead when
aligned), 100 (rows of 400 bytes never start every one on a line), 256
float32 and 128 float64 values (rows wider than 512 bytes: the whole slab
loaded ahead wherever they lie), and channels-last maps of 128 channels.
Row counts leave a partial slab of rows at the end, and 1 and 2 threads
split the rows in other places."""

import numpy as np
import pytest

import bncore
from bncore import reference

from conftest import (assert_output_close, assert_stats_close, at_page_offset,
                      channel_condition, channel_spread, make_input, make_params)

# (input's, grad_output's) offsets past a page: both on line starts, both
# off them, and one of each (the backward loads each ahead on its own).
OFFSETS = ((0, 1024), (64, 2112), (2048, 0), (4032, 1088), (48, 1072), (8, 1032),
           (0, 1040), (48, 1024))
CASES = {
    "(N, 128) float32": ((3003, 128), -1, np.float32),
    "(N, 96) float32": ((3005, 96), -1, np.float32),
    "(N, 100) float32": ((3001, 100), -1, np.float32),
    "(N, 256) float32": ((1501, 256), -1, np.float32),
    "(N, 128) float64": ((1503, 128), -1, np.float64),
    "NHWC 128 float32": ((5, 9, 7, 128), -1, np.float32),
}


def _results(x, dy, params, axis, threads):
    """Every result that the statistics feed: moments, the training output
    and the backward's three gradients."""
    weight, bias, _, _ = params
    mean, var = bncore.moments(x, axis=axis, num_threads=threads)
    y = bncore.batch_norm(x, None, None, weight, bias, training=True, axis=axis,
                          num_threads=threads)
    stats = reference.batch_norm(x, training=True, axis=axis)
    grads = bncore.batch_norm_backward(dy, x, stats.mean.astype(x.dtype),
                                       stats.invstd.astype(x.dtype), weight, training=True,
                                       axis=axis, num_threads=threads)
    return (mean, var, y, *grads)


@pytest.mark.parametrize("case", list(CASES))
def test_input_placement_changes_no_bits(case):
    shape, axis, dtype = CASES[case]
    values = make_input(shape, dtype, axis=axis, kind="normal", seed=7)
    grad_values = make_input(shape, dtype, axis=axis, kind="normal", seed=8)
    params = make_params(shape[axis], dtype, seed=9)
    weight, bias, _, _ = params

    x = at_page_offset(values, 16)
    dy = at_page_offset(grad_values, 16 + 1024)
    want_mean, want_var = reference.moments(x, axis=axis)
    want_y = reference.batch_norm(x, None, None, weight, bias, training=True, axis=axis).y
    for threads in (1, 2):
        first = _results(x, dy, params, axis, threads)
        assert_stats_close(first[0], want_mean, dtype, scale=channel_spread(x, axis),
                           what="mean")
        assert_stats_close(first[1], want_var, dtype, cond=channel_condition(x, axis),
                           what="variance")
        assert_output_close(first[2], want_y, dtype)
        for offsets in OFFSETS:
            x_offset, dy_offset = offsets
            placed = _results(at_page_offset(values, x_offset),
                              at_page_offset(grad_values, dy_offset), params, axis, threads)
            for name, got, expected in zip(("mean", "var", "y", "dx", "dweight", "dbias"),
                                           placed, first):
                assert np.array_equal(got.view(np.uint8), expected.view(np.uint8)), \
                    (name, threads, offsets)
