"""The statistics of the interleaved layout (channels-last and (N, C)
inputs) where narrow rows are read several at a time as one wide row: every
row width around the packing's cases (1 to 63 values, whose packed width is
or is not a multiple of 16; 64 and up, not packed; wider than one
512-column tile, which float32 sums as whole rows), row counts that leave
rows over after the last whole pack and span several row chunks, float32
and float64. Checked against float64 NumPy on data far from zero (where a
careless sum cancels), and bit for bit across thread counts."""

import numpy as np
import pytest

from bncore import _kernels

# (channels, inner): row widths 1, 3, 5, 8, 9, 15, 16, 33, 40 (two channels
# of 20 inner values), 48, 63, 64, 100, 128 and 136 (float64 rows of 1 KiB,
# the widest its statistics ask for ahead, and just over); then wider than a
# tile: 900 (tiles of 170 whole channels of 3), 1030 (its last 6 columns
# past the vectors) and 2049.
GEOMETRIES = [(1, 1), (3, 1), (5, 1), (8, 1), (3, 3), (15, 1), (16, 1), (33, 1), (2, 20),
              (16, 3), (63, 1), (64, 1), (100, 1), (128, 1), (136, 1), (300, 3), (1030, 1),
              (2049, 1)]
# Rows: fewer than one pack, a few packs and some over, several row chunks
# (64 chunks of whole 32-row blocks at most) with a short last one.
ROWS = [5, 77, 4133]


def _data(outer, channels, inner, dtype, seed):
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-1e3, 1e3, (1, channels, 1))
    spread = rng.uniform(1e-3, 10, (1, channels, 1))
    return (rng.standard_normal((outer, channels, inner)) * spread + loc).astype(dtype)


def _moments(x, threads):
    outer, channels, inner = x.shape
    mean, m2 = np.zeros(channels), np.zeros(channels)
    _kernels.moments(x.ravel(), outer, channels, inner, mean, m2, threads)
    return mean, m2


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("outer", ROWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interleaved_moments_match_numpy_in_float64(geometry, outer, dtype):
    x = _data(outer, *geometry, dtype, seed=outer + sum(geometry))
    mean, m2 = _moments(x, 2)
    wide = x.astype(np.float64)
    want_mean = wide.mean(axis=(0, 2))
    want_m2 = ((wide - want_mean[:, None]) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-13, atol=0)
    np.testing.assert_allclose(m2, want_m2, rtol=1e-9, atol=0)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interleaved_moments_are_the_same_bits_for_any_thread_count(geometry, dtype):
    x = _data(4133, *geometry, dtype, seed=sum(geometry))
    want = _moments(x, 1)
    for threads in (2, 3):
        got = _moments(x, threads)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want)), threads


def test_a_nan_in_one_packed_column_reaches_only_its_channel():
    """Packed columns of the same channel are merged: a NaN in row 7 (the
    eighth of a pack) of channel 2 of 8 poisons channel 2 and no other."""
    x = _data(300, 8, 1, np.float32, seed=1)
    x[7, 2, 0] = np.nan
    mean, m2 = _moments(x, 2)
    assert np.isnan(mean[2]) and np.isnan(m2[2])
    others = np.arange(8) != 2
    assert np.isfinite(mean[others]).all() and np.isfinite(m2[others]).all()
