"""The planar normalisation takes two streams at once, for the memory's
sake: the runs of two rows of a row chunk (rows about half the chunk
apart; in cache, AVX-512 writes each row's runs in one call instead,
test_row_runs.py; with streaming stores, two row chunks in step where the
chunks pair, test_chunk_pairs.py, turned off here), and, with streaming
stores, the runs of two channels of a row that has no partner and the two
halves of a chunk of a long run. Its output must be bitwise that of one
stream: each row normalised alone with the channel pairs off, and the
channel pairs and halves against the same call with them turned off.

Rows:  Eval, float32 and float64, with and without relu and streaming
stores, 1-3 threads, arrays that start off a cache line, in place. Chunks
hold ceil(outer / 64) rows, so outer > 64: chunks of 3 rows (one pair, one
row alone), 4 (one pair, 2 alone), 8 (3 pairs of rows 3 apart, 2 alone);
rows whose length in bytes is not a multiple of a line (never paired); and
a call above the serial cutoff, so that threads share the chunks."""

import numpy as np
import pytest

import bncore
from bncore import _kernels

from test_periodic_normalize import _problem, _same_bits
from test_pipelined import _offset_array

# (outer, channels, inner), in the planar layout. With streaming
# stores, runs that share lines or are under 2 KiB are written a row at a
# time instead (rows_as_runs, test_row_runs.py): (130, 2, 512), runs of
# 2 KiB of float32 (4 KiB of float64), keeps the row pairs under them.
SHAPES = [(130, 2, 32), (200, 3, 48), (450, 2, 40), (300, 3, 33), (200, 2, 1000),
          (130, 2, 512)]


@pytest.fixture
def restore_stream_min():
    previous = _kernels.set_stream_min_bytes(1 << 62)
    yield
    _kernels.set_stream_min_bytes(previous)


@pytest.fixture
def no_chunk_pairs():
    """Rows paired within a chunk, as the streamed walk pairs them where
    whole chunks do not pair (test_chunk_pairs.py)."""
    previous = _kernels.set_chunk_pairs(False)
    yield
    _kernels.set_chunk_pairs(previous)


# (threads, offset, in place): 1-3 threads, arrays 0, 1 and 4 elements off
# a cache line, the output apart from the input or the input itself.
PLACEMENTS = [(threads, offset, in_place) for threads in (1, 2, 3) for offset in (0, 1, 4)
              for in_place in (False, True)]


def _placed(values, offset, in_place):
    """(x, y): values `offset` elements off a line, and an output placed
    alike (zeros), or x itself in place."""
    x = _offset_array(values, offset)
    return x, x if in_place else _offset_array(np.zeros_like(x), offset)


def _normalize(x, y, shape, problem, threads, relu):
    _, running_mean, running_var, weight, bias = problem
    _kernels.normalize(x, y, *shape, running_mean, running_var, 1e-5, weight, bias, threads,
                       relu)


def _row_by_row(problem, shape, relu):
    """Each row normalised by a call of its own (one row: no row pairs),
    with the channel pairs off."""
    outer, channels, inner = shape
    x = problem[0].reshape(outer, channels * inner)
    y = np.empty_like(x)
    previous = _kernels.set_twin_min_bytes(1 << 62)
    try:
        for n in range(outer):
            _normalize(x[n], y[n], (1, channels, inner), problem, 1, relu)
    finally:
        _kernels.set_twin_min_bytes(previous)
    return y.ravel()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paired_rows_give_the_bits_of_rows_alone(shape, dtype, restore_stream_min,
                                                 no_chunk_pairs):
    problem = _problem(shape, dtype, seed=sum(shape))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        for relu in (False, True):
            want = _row_by_row(problem, shape, relu)
            for threads, offset, in_place in PLACEMENTS:
                x, y = _placed(problem[0], offset, in_place)
                _normalize(x, y, shape, problem, threads, relu)
                assert _same_bits([y], [want]), (stream_min, relu, threads, offset, in_place)


# Long runs (inner >= 64 Ki values: chunks of 64 Ki values, pieces of one
# run): whole chunks, a last chunk of an odd length, and one whose halves
# are under twin_min_bytes. Then rows of runs that are whole lines, outer
# <= 64 (chunks of one row): channels paired at the default size (8 KiB
# runs: 7 channels, 3 pairs and one alone; 4 channels, one pair 1 apart
# and 2 alone) and, at twin_min_bytes = 0, short runs.
LONG_SHAPES = [(2, 2, 65536 * 2), (1, 3, 65536 + 9001), (3, 1, 65536 + 40)]
PAIRED_CHANNEL_SHAPES = [(3, 7, 2048), (2, 4, 2048), (5, 6, 48), (64, 5, 32)]


@pytest.fixture
def twin_min_default():
    default = _kernels.set_twin_min_bytes(1 << 62)
    yield default
    _kernels.set_twin_min_bytes(default)


def _one_stream_then_two(run, twin_min_default):
    """run() with the halves and channel pairs off, then on at the default
    size and for every size (0)."""
    _kernels.set_twin_min_bytes(1 << 62)
    yield run()
    for twin_min in (twin_min_default, 0):
        _kernels.set_twin_min_bytes(twin_min)
        yield run()


@pytest.mark.parametrize("shape", LONG_SHAPES + PAIRED_CHANNEL_SHAPES,
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_halves_and_channel_pairs_give_the_bits_of_one_stream(shape, dtype, restore_stream_min,
                                                         twin_min_default):
    problem = _problem(shape, dtype, seed=sum(shape))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        for relu in (False, True):
            for threads, offset, in_place in PLACEMENTS:
                def run():
                    x, y = _placed(problem[0], offset, in_place)
                    _normalize(x, y, shape, problem, threads, relu)
                    return y
                want, *got = _one_stream_then_two(run, twin_min_default)
                assert _same_bits(got, [want] * len(got)), (stream_min, relu, threads, offset,
                                                            in_place)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_halves_in_the_training_forward(dtype, twin_min_default, restore_stream_min):
    """The training forward's normalisation pass takes the same halves
    (with streaming stores: the 1.8 MB tensor is in cache else)."""
    shape = (2, 3, 65536 + 9001)
    x = _problem(shape, dtype, seed=7)[0].reshape(shape)
    _kernels.set_stream_min_bytes(0)
    for threads in (1, 2):
        def run():
            return bncore.batch_norm(x, training=True, num_threads=threads)
        want, *got = _one_stream_then_two(run, twin_min_default)
        assert _same_bits(got, [want] * len(got)), threads
