"""The group-tiled training backward (row chunks of short runs, a tile of
channels' sums read from memory, then their dx written from L2) gives the
bits of the two passes, with tiles of one channel, of a few with the last
one short, and of LANE_GROUP (64) channels; on 1-3 threads, from memory and
in cache, aligned or not, in place or not; and matches the float64
reference. The walk writes each row of a tile in one call with AVX-512
only (as one stream, rows_as_runs, or in cache one run after the other,
each_run_in_one_call): elsewhere it is never taken, and the tests skip.
"""

import numpy as np
import pytest

from bncore import _kernels

from test_pipelined import tuning_restorer
from test_tiled_backward import (_backward, _problem, _same_bits,
                                 assert_backward_matches_the_reference)

pytestmark = pytest.mark.skipif(_kernels.VECTOR_ISA != "AVX-512",
                                reason="the group-tiled walk needs AVX-512")

# (outer, channels, inner, dtype), each from memory and in cache: from
# memory, chunks of 8 rows with a short last one (30, 70 rows), of blocks of
# several runs; runs that share lines (33, 49, 289 values) or not (16, 64,
# 196); float64 runs within the AVX-512 group walk (17, 49, 64 values) and
# past it (100). In cache, runs under ROW_RUNS_MAX_BYTES_IN_CACHE (256
# bytes) are written a row at a time, longer ones (float32 64, 196 and 289
# values, float64 from 49) one run after the other.
SHAPES = [(30, 7, 49, np.float32), (70, 5, 33, np.float32), (24, 70, 16, np.float32),
          (9, 13, 196, np.float32), (17, 6, 289, np.float32), (40, 3, 64, np.float32),
          (30, 7, 49, np.float64), (70, 5, 17, np.float64), (24, 66, 64, np.float64),
          (12, 4, 100, np.float64)]

# Tiles of one channel, of three (the last tile short for most channel
# counts above), and of as many as a tile may hold (LANE_GROUP).
CHANNELS_PER_TILE = [1, 3, None]


restore_tuning = tuning_restorer(_kernels.set_group_tiled_backward)


def _tile_bytes(shape, channels_per_tile):
    """The tile_bytes that make tiles of channels_per_tile channels (None: as
    many as a tile may hold)."""
    outer, _, inner, dtype = shape[:4]
    if channels_per_tile is None:
        return 1 << 40
    return channels_per_tile * 2 * outer * inner * np.dtype(dtype).itemsize


def _by_size(problem, shape, threads, offset, in_place=None):
    """test_tiled_backward's _backward of shape (outer, channels, inner,
    ...), the channel-tiled walk left to choose by size (its default)."""
    return _backward(problem, shape[:3], threads, -1, offset, in_place)


def _group_tiled(problem, shape, threads, offset, in_place=None):
    """_by_size, which must take the group-tiled walk."""
    calls = _kernels.group_tiled_backward_calls()
    got = _by_size(problem, shape, threads, offset, in_place)
    assert _kernels.group_tiled_backward_calls() == calls + 1
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3]))
                         + ("-f64" if s[3] == np.float64 else ""))
@pytest.mark.parametrize("offset", [0, 3])
def test_group_tiled_backward_gives_the_bits_of_the_two_pass_path(shape, offset,
                                                                  restore_tuning):
    problem = _problem(*shape[:3], seed=sum(shape[:3]) + offset, dtype=shape[3])
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        _kernels.set_group_tiled_backward(0)
        want = _by_size(problem, shape, 1, offset)
        for channels_per_tile in CHANNELS_PER_TILE:
            _kernels.set_group_tiled_backward(1, _tile_bytes(shape, channels_per_tile))
            for threads in (1, 2, 3):
                for in_place in (None, "dy", "x"):
                    got = _group_tiled(problem, shape, threads, offset, in_place)
                    assert _same_bits(got, want), (stream_min, channels_per_tile, threads,
                                                   in_place)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_tiled_backward_matches_the_reference(dtype, restore_tuning):
    shape = (30, 70, 49, dtype)
    problem = _problem(*shape[:3], seed=5, dtype=dtype)
    _kernels.set_stream_min_bytes(0)
    _kernels.set_group_tiled_backward(1, _tile_bytes(shape, 3))
    assert_backward_matches_the_reference(_group_tiled(problem, shape, 2, 0), problem,
                                          shape[:3])


def test_group_tiled_backward_is_chosen_by_size_for_small_maps_from_memory(restore_tuning):
    """ResNet-50's last stage at a batch of 64, 25.7 MB float32, two
    threads: the walk the rule was measured for."""
    shape = (64, 2048, 49, np.float32)
    problem = _problem(*shape[:3], seed=2)
    want = _by_size(problem, shape, 1, 0)
    assert _same_bits(_group_tiled(problem, shape, 2, 0), want)


# In cache, by size, on a team: (outer, channels, inner, dtype, threads)
# that the rule tiles, in tiles shared evenly among the threads: one round
# of 32 channels on two threads, 22 on three; seven rounds of 19 channels
# on two (the last tile 9), five of 18 on three (the last 4); tiles of 32
# (float64: 16) channels of runs of 25 values, on two threads only (on
# three, rows of 22 or 11 such runs are too short). 14 x 14 maps, their dx
# written one run after the other: tiles of 5 channels on two and three
# threads (float64: 4 on two).
IN_CACHE_SHAPES = [(8, 64, 49, np.float32, (2, 3)), (32, 256, 49, np.float32, (2, 3)),
                   (32, 64, 25, np.float32, (2,)), (32, 64, 25, np.float64, (2,)),
                   (32, 64, 196, np.float32, (2, 3)), (16, 32, 196, np.float64, (2,))]


@pytest.mark.parametrize("shape", IN_CACHE_SHAPES, ids=lambda s: "x".join(map(str, s[:3]))
                         + ("-f64" if s[3] == np.float64 else ""))
def test_group_tiled_backward_is_chosen_by_size_in_cache_on_a_team(shape, restore_tuning):
    """The two passes on one thread, the group-tiled walk on a team, with
    the same bits."""
    problem = _problem(*shape[:3], seed=7, dtype=shape[3])
    calls = _kernels.group_tiled_backward_calls()
    want = _by_size(problem, shape, 1, 0)
    assert _kernels.group_tiled_backward_calls() == calls
    for threads in shape[4]:
        assert _same_bits(_group_tiled(problem, shape, threads, 0), want), threads


def test_set_group_tiled_backward_returns_the_previous_setting(restore_tuning):
    _kernels.set_group_tiled_backward(1, 4096)
    assert _kernels.set_group_tiled_backward(0) == (1, 4096)
    assert _kernels.set_group_tiled_backward(-1)[1] == 512 * 1024
