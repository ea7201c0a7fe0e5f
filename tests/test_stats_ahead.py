"""The statistics of short runs read from memory ask for the blocks a few
ahead of those they sum, in the order they read them (stats_blocks_ahead
and block_ahead in _kernels.pyx): a channel's block of several rows is as
many short streams, which the prefetchers did not follow, and chunks of
several blocks a channel are read a block's rows at a time across the
channels. The prefetches name memory past the last row, past the array's
end; they must leave every bit of the statistics and of the training
forward as they are without them (set_stats_runs_ahead(0)), on 1-3
threads, and those must match the float64 reference.

Every size counts as read from memory here (set_stream_min_bytes(0)), the
serial cutoff is off, and the shapes have chunks of at least 3 rows (outer
> 128: MAX_ROW_CHUNKS chunks), or of several blocks, so that the rule asks
for blocks ahead."""

import numpy as np
import pytest

from bncore import _kernels, reference

from test_periodic_normalize import _problem, _same_bits
from test_pipelined import _offset_array

# (outer, channels, inner): 7 x 7, 4 x 4 and 10 x 10 maps in blocks of 4-5
# rows; a last chunk cut short; the fewest rows and the shortest runs asked
# for ahead (3 rows, 16 values; 9 values, in rows wide enough to be walked
# as runs with AVX-512); one channel, whose next runs are the next row's;
# chunks of several blocks a channel: 5 rows in blocks of 2, 2 and 1, and
# 63 rows in blocks of 51 and 12.
SHAPES = [(300, 7, 49), (260, 5, 16), (257, 3, 100), (129, 6, 16), (200, 500, 9),
          (320, 1, 25), (300, 3, 700), (4000, 2, 40)]


@pytest.fixture
def from_memory():
    stream_min = _kernels.set_stream_min_bytes(0)
    serial_max = _kernels.set_serial_max_values(0)
    pipelined = _kernels.set_pipelined(0)
    runs_ahead = _kernels.set_stats_runs_ahead(6)
    yield
    _kernels.set_stream_min_bytes(stream_min)
    _kernels.set_serial_max_values(serial_max)
    _kernels.set_pipelined(*pipelined)
    _kernels.set_stats_runs_ahead(runs_ahead)


def _statistics(x, shape, threads, runs_ahead):
    _kernels.set_stats_runs_ahead(runs_ahead)
    mean, m2 = np.zeros(shape[1]), np.zeros(shape[1])
    _kernels.moments(x, *shape, mean, m2, threads)
    return [mean, m2]


def _train(x, shape, weight, bias, threads, runs_ahead):
    _kernels.set_stats_runs_ahead(runs_ahead)
    y = np.zeros_like(x)
    channels = shape[1]
    mean, m2, invstd = np.zeros(channels), np.zeros(channels), np.zeros(channels)
    _kernels.train_forward(x, y, *shape, weight, bias, 1e-5, mean, m2, invstd, threads, False)
    return [y, mean, m2, invstd]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_runs_asked_for_ahead_keep_the_bits(shape, dtype, from_memory):
    x, _, _, weight, bias = _problem(shape, dtype, seed=sum(shape))
    for offset in (0, 3):
        xs = _offset_array(x, offset)
        want = _statistics(xs, shape, 1, 0)
        trained = _train(xs, shape, weight, bias, 1, 0)
        for threads in (1, 2, 3):
            assert _same_bits(_statistics(xs, shape, threads, 6), want), (offset, threads)
            assert _same_bits(_train(xs, shape, weight, bias, threads, 6), trained)
    mean, m2 = want
    wide = x.astype(np.float64).reshape(shape)
    np.testing.assert_allclose(mean, wide.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    count = shape[0] * shape[2]
    np.testing.assert_allclose(m2 / count, wide.var(axis=(0, 2)), rtol=1e-9)
    y = trained[0].reshape(shape)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-9, "atol": 1e-9}
    np.testing.assert_allclose(y, reference.batch_norm(wide, weight=weight, bias=bias,
                                                       training=True)[0], **tol)


def test_set_stats_runs_ahead_returns_the_previous_value(from_memory):
    assert _kernels.set_stats_runs_ahead(0) == 6
    assert _kernels.set_stats_runs_ahead(6) == 0
