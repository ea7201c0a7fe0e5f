"""The flat periodic loop of the interleaved normalisation (channels-last and
(N, C) inputs: rows laid end to end, per-column constants from a repeating
pattern) against the row-by-row loop it replaces, bit for bit: eval and
training, float32 and float64, with and without relu and streaming stores,
1-3 threads, arrays that start off a cache line, in place; row widths below,
at and above the pattern's limit. And its eval output against the float64
reference."""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from test_pipelined import _offset_array


@pytest.fixture
def restore_tuning():
    previous_periodic = _kernels.set_periodic_loops(True)
    previous_stream = _kernels.set_stream_min_bytes(1 << 62)
    yield
    _kernels.set_periodic_loops(previous_periodic)
    _kernels.set_stream_min_bytes(previous_stream)


# (outer, channels, inner) with inner < 32 (the interleaved layout): rows
# narrower than a vector (widths 1, 3, 8, 15), one vector wide, not a
# multiple of one (17, 35, 100); 1000, whose float32 period (its least
# common multiple with a vector, 2000) is past the pattern's limit of 64
# vectors, so the width itself is the period and the pattern's loads are
# not aligned, and past the limit in float64; 2047 to 2049, past it in
# both (too few rows for row groups: walked by tiles); the last three
# above the serial cutoff (64 Ki values), so that threads split the span.
SHAPES = [(300, 1, 1), (101, 3, 1), (77, 8, 1), (40, 5, 3), (33, 16, 1), (29, 17, 1),
          (23, 7, 5), (11, 100, 1), (6, 1000, 1), (3, 2048, 1), (3, 2047, 1), (3, 2049, 1),
          (3000, 37, 1), (700, 128, 1), (130, 64, 9)]


def _problem(shape, dtype, seed):
    outer, channels, inner = shape
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-50, 50, (1, channels, 1))
    spread = rng.uniform(0.1, 10, (1, channels, 1))
    x = (rng.standard_normal(shape) * spread + loc).astype(dtype)
    running_mean = loc.ravel().astype(dtype)
    running_var = (spread.ravel() ** 2).astype(dtype)
    weight = rng.uniform(-3, 3, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    return x.ravel(), running_mean, running_var, weight, bias


def _eval(problem, shape, threads, relu, offset, in_place):
    x, running_mean, running_var, weight, bias = problem
    x = _offset_array(x, offset)
    y = x if in_place else _offset_array(np.zeros(x.size, x.dtype), offset)
    _kernels.normalize(x, y, *shape, running_mean, running_var, 1e-5, weight, bias, threads,
                       relu)
    return [y.copy()]


def _train(problem, shape, threads, relu, offset, in_place):
    x, _, _, weight, bias = problem
    channels = shape[1]
    x = _offset_array(x, offset)
    y = x if in_place else _offset_array(np.zeros(x.size, x.dtype), offset)
    stats = [np.zeros(channels) for _ in range(3)]
    _kernels.train_forward(x, y, *shape, weight, bias, 1e-5, *stats, threads, relu)
    return [y.copy(), *stats]


def _same_bits(a, b):
    return all(p.tobytes() == q.tobytes() for p, q in zip(a, b))


def assert_periodic_gives_row_loop_bits(run, context=(), switch=_kernels.set_periodic_loops):
    """run(threads, offset, in_place) -> arrays: the periodic loop's (or
    another loop that `switch` turns on), on 1-3 threads, 0, 1 and 4
    elements off a cache line, in place or not, must be bitwise the row
    loop's on one thread."""
    switch(False)
    want = run(1, 0, False)
    switch(True)
    for threads in (1, 2, 3):
        for offset in (0, 1, 4):
            for in_place in (False, True):
                got = run(threads, offset, in_place)
                assert _same_bits(got, want), (*context, threads, offset, in_place)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("run", [_eval, _train], ids=["eval", "train"])
def test_periodic_loop_gives_the_bits_of_the_row_loop(shape, dtype, run, restore_tuning):
    problem = _problem(shape, dtype, seed=sum(shape))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        for relu in (False, True):
            assert_periodic_gives_row_loop_bits(
                lambda threads, offset, in_place: run(problem, shape, threads, relu, offset,
                                                      in_place),
                (stream_min, relu))


def assert_eval_keeps_non_finite_values(shape, dtype, seed, nan_every, inf_at, switch):
    """The eval loop that `switch` turns on, on two threads one element off
    a cache line, must give NaN and infinities (NaN at every `nan_every`-th
    value from 3, +inf and -inf at `inf_at`) and a signed zero (x = -0.0
    with running mean 0 and bias 0) the bits of the row loop on one thread,
    with and without the ReLU."""
    problem = _problem(shape, dtype, seed=seed)
    x = problem[0]
    x[3::nan_every] = np.nan
    x[inf_at[0]] = np.inf
    x[inf_at[1]] = -np.inf
    problem[1][:] = 0.0
    problem[4][:] = 0.0
    x[7] = -0.0
    _kernels.set_stream_min_bytes(0)
    for relu in (False, True):
        switch(False)
        want = _eval(problem, shape, 1, relu, 0, False)
        switch(True)
        got = _eval(problem, shape, 2, relu, 1, False)
        assert np.isnan(got[0]).any() and np.isinf(got[0]).any()
        assert _same_bits(got, want), relu


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_periodic_loop_keeps_non_finite_values_and_signed_zeros(dtype, restore_tuning):
    assert_eval_keeps_non_finite_values((50, 24, 1), dtype, 2, 29, (5, 30),
                                        _kernels.set_periodic_loops)


@pytest.mark.parametrize("shape", [(77, 8, 1), (700, 128, 1), (40, 5, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_periodic_loop_matches_the_reference(shape, restore_tuning):
    """Through the public function on a channels-last array, against the
    float64 reference (not only against the other loop)."""
    outer, channels, inner = shape
    x, running_mean, running_var, weight, bias = _problem(shape, np.float32, seed=9)
    nhwc = np.ascontiguousarray(x.reshape(shape).transpose(0, 2, 1))   # channels last
    _kernels.set_stream_min_bytes(0)
    got = bncore.batch_norm(nhwc, running_mean, running_var, weight, bias, axis=-1,
                            num_threads=2)
    want = reference.batch_norm(nhwc, running_mean, running_var, weight, bias, axis=-1).y
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)


def test_set_periodic_loops_returns_the_previous_setting(restore_tuning):
    assert _kernels.set_periodic_loops(False) is True
    assert _kernels.set_periodic_loops(True) is False
