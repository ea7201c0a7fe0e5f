"""The planar normalisation takes the runs of two rows of a row chunk at
once (rows about half the chunk apart, for the memory's sake): its output
must be bitwise that of normalising each row alone, where no row has a
partner. Eval, float32 and float64, with and without relu and streaming
stores, 1-3 threads, arrays that start off a cache line, in place. Chunks
hold ceil(outer / 64) rows, so outer > 64: chunks of 3 rows (one pair, one
row alone), 4 (one pair, 2 alone), 8 (3 pairs of rows 3 apart, 2 alone);
rows whose length in bytes is not a multiple of a line (never paired); and
a call above the serial cutoff, so that threads share the chunks."""

import numpy as np
import pytest

from bncore import _kernels

from test_periodic_normalize import _problem, _same_bits
from test_pipelined import _offset_array

# (outer, channels, inner), inner >= 32 (the planar layout).
SHAPES = [(130, 2, 32), (200, 3, 48), (450, 2, 40), (300, 3, 33), (200, 2, 1000)]


@pytest.fixture
def restore_stream_min():
    previous = _kernels.set_stream_min_bytes(1 << 62)
    yield
    _kernels.set_stream_min_bytes(previous)


def _normalize(x, y, shape, problem, threads, relu):
    _, running_mean, running_var, weight, bias = problem
    _kernels.normalize(x, y, *shape, running_mean, running_var, 1e-5, weight, bias, threads,
                       relu)


def _row_by_row(problem, shape, relu):
    """Each row normalised by a call of its own (one row: nothing to pair)."""
    outer, channels, inner = shape
    x = problem[0].reshape(outer, channels * inner)
    y = np.empty_like(x)
    for n in range(outer):
        _normalize(x[n], y[n], (1, channels, inner), problem, 1, relu)
    return y.ravel()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paired_rows_give_the_bits_of_rows_alone(shape, dtype, restore_stream_min):
    problem = _problem(shape, dtype, seed=sum(shape))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        for relu in (False, True):
            want = _row_by_row(problem, shape, relu)
            for threads in (1, 2, 3):
                for offset in (0, 1, 4):
                    for in_place in (False, True):
                        x = _offset_array(problem[0], offset)
                        y = x if in_place else _offset_array(np.zeros(x.size, dtype), offset)
                        _normalize(x, y, shape, problem, threads, relu)
                        assert _same_bits([y], [want]), (stream_min, relu, threads, offset,
                                                         in_place)
