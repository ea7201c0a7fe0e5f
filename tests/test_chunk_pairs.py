"""With streaming stores, the planar normalisation of row chunks writes two
chunks at once, for the memory's sake: the rows of chunk k in step with
those of chunk k + P (P about half the chunks, odd), the chunks after the
pairs alone, each row's runs as one stream (bn_affine_runs with a second
stream). Its output must be bitwise that of each row normalised by a call
of its own (one row is one chunk: nothing to pair), and of the same call
with the pairs turned off.

Eval, float32 and float64, with and without relu, 1-3 threads, arrays that
start off a cache line, in place. Chunks of 8 rows with a last chunk of 4
(whose partner then has rows left alone) and rows several a call; chunks of
2 rows with a last one of 1; rows of long runs (12.5 KiB of float32), which
are written a row at a time only where chunks pair; channel groups (two
threads, few rows). Rows whose chunks are not whole lines are not paired.
The training forward's normalisation pass takes the same walk. The row loop
is built for AVX-512 only: elsewhere chunks never pair, and the tests
check that they do not and that the bits are still those of rows alone."""

import numpy as np
import pytest

import bncore
from bncore import _kernels

from test_periodic_normalize import _problem, _same_bits
from test_twin_runs import PLACEMENTS, _normalize, _placed, _row_by_row
from test_twin_runs import restore_stream_min  # noqa: F401 (a fixture)

# (outer, channels, inner), in the planar layout.
PAIRED_SHAPES = [(300, 8, 16), (65, 4, 1000), (70, 16, 49), (130, 2, 512), (66, 3, 3136),
                 (20, 96, 49)]
UNPAIRED_SHAPES = [(130, 3, 1001), (1, 5, 3000)]
PAIRS_BUILT = _kernels.VECTOR_ISA == "AVX-512"


@pytest.fixture
def restore_chunk_pairs():
    previous = _kernels.set_chunk_pairs(True)
    yield
    _kernels.set_chunk_pairs(previous)


def _calls_pair(run):
    """run()'s result, and whether it wrote chunks in pairs."""
    before = _kernels.chunk_pair_calls()
    result = run()
    return result, _kernels.chunk_pair_calls() > before


@pytest.mark.parametrize("shape", PAIRED_SHAPES + UNPAIRED_SHAPES,
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunk_pairs_give_the_bits_of_rows_alone(shape, dtype, restore_stream_min,
                                                 restore_chunk_pairs):
    problem = _problem(shape, dtype, seed=sum(shape))
    _kernels.set_stream_min_bytes(0)
    for relu in (False, True):
        want = _row_by_row(problem, shape, relu)
        for pairs in (True, False):
            _kernels.set_chunk_pairs(pairs)
            for threads, offset, in_place in PLACEMENTS:
                x, y = _placed(problem[0], offset, in_place)
                _, paired = _calls_pair(lambda: _normalize(x, y, shape, problem, threads, relu))
                context = (relu, pairs, threads, offset, in_place)
                assert paired == (pairs and PAIRS_BUILT and shape in PAIRED_SHAPES), context
                assert _same_bits([y], [want]), context


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunk_pairs_in_the_training_forward(dtype, restore_stream_min, restore_chunk_pairs):
    """The two-pass training forward's normalisation (the pipelined walk
    off) pairs its chunks too: the same output and statistics."""
    shape = (300, 8, 16)
    x = _problem(shape, dtype, seed=3)[0].reshape(shape)
    _kernels.set_stream_min_bytes(0)
    previous = _kernels.set_pipelined(0)
    try:
        for threads in (1, 2):
            results = []
            for pairs in (False, True):
                _kernels.set_chunk_pairs(pairs)
                result, paired = _calls_pair(lambda: bncore.batch_norm(
                    x, training=True, return_stats=True, num_threads=threads))
                assert paired == (pairs and PAIRS_BUILT), threads
                results.append(result)
            assert _same_bits(results[1], results[0]), threads
    finally:
        _kernels.set_pipelined(*previous)


def test_chunk_pairs_by_size(restore_chunk_pairs):
    """Taken by size, with no tuning: an eval of 51 MB from memory, and not
    in cache."""
    rng = np.random.default_rng(0)
    params = [rng.random(256).astype(np.float32) + 0.5 for _ in range(4)]
    for shape, paired in (((64, 256, 28, 28), True), ((2, 256, 28, 28), False)):
        x = rng.standard_normal(shape).astype(np.float32)
        y, took = _calls_pair(lambda: bncore.batch_norm(x, *params, num_threads=2))
        assert took == (paired and PAIRS_BUILT), shape
        _kernels.set_chunk_pairs(False)
        assert _same_bits([y], [bncore.batch_norm(x, *params, num_threads=2)]), shape
        _kernels.set_chunk_pairs(True)


def test_set_chunk_pairs_returns_the_previous_setting(restore_chunk_pairs):
    assert _kernels.set_chunk_pairs(False) is True
    assert _kernels.set_chunk_pairs(True) is False
