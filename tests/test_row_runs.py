"""Planar runs that do not fill whole cache lines (7x7, 10x10, 14x14 feature
maps), or are short (under 8 KiB; the backward's under 2 KiB), are
normalised a row at a time when the output takes streaming stores: one
stream over the runs of consecutive channels, whose vectors blend two
channels' constants where a run ends inside them (bn_affine_runs, and
bn_grad_runs for the training backward's input gradient). Its output must
be bitwise that of the runs written one at a time (set_row_runs(False)).
The backward's sums over blocks of several runs, taken many channels at a
time (set_lane_groups), must be bitwise those taken a channel at a time.

Eval, the two-pass training forward and the two-pass backward; float32
and float64; relu; arrays that start off a cache line; in place; 1-3
threads with the serial cutoff off, so that a few row chunks are split into
channel groups and a row's runs are cut between threads; inner from 9 up
(the shortest planar runs), and channel boundaries at every position
within a vector."""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from test_periodic_normalize import _problem, _same_bits
from test_pipelined import _offset_array
from test_tiled_backward import assert_backward_matches_the_reference

# Runs of 9-31 values are walked as runs only in tensors of stream_min_bytes
# and up (here every size): 4x4 and 5x5 maps, and float32 runs under a
# vector (3x3, 3x4; float64 reads those as rows), written one at a time,
# which AVX-512 reads as rows too unless a row is over 16 KiB
# (SHORT_RUN_ROWS_MAX_BYTES): rows of 17100 and 16800 values.
SHORT_PLANAR_SHAPES = [(300, 5, 16), (130, 9, 25), (12, 1900, 9), (10, 1400, 12)]
# ... and narrower rows of them, rows across channels with AVX-512.
NARROW_SHORT_RUNS = [(300, 5, 9), (200, 11, 12)]
# (outer, channels, inner) in the planar layout: runs that are not whole
# lines, then runs of whole lines under GRAD_ROW_RUNS_MAX_BYTES (2 KiB;
# 256 float64 values are not) and under ROW_RUNS_MAX_BYTES (8 KiB, which
# the backward writes one at a time; 1024 float64 values are not), then the
# shortest planar runs.
SHAPES = [(130, 2, 33), (70, 7, 49), (9, 64, 196), (5, 17, 47), (3, 40, 100),
          (300, 3, 40), (2, 5, 1001), (70, 7, 32), (9, 20, 144),
          (5, 6, 256), (4, 6, 784), (3, 5, 1024)] + SHORT_PLANAR_SHAPES
# In cache, runs from ROW_RUNS_MAX_BYTES_IN_CACHE (256 B) on are written in
# one call per row (SHAPES from (9, 64, 196) on; shorter runs take the row
# loop), and so are long ones: 12.5 KB runs, whole vectors and with a tail.
LONG_RUN_SHAPES = [(40, 3, 3136), (1, 10, 3139)]


@pytest.fixture
def streaming():
    """Streaming stores at every size (row runs only take those), the serial
    cutoff off, and the tuning hooks restored afterwards."""
    stream_min = _kernels.set_stream_min_bytes(0)
    serial_max = _kernels.set_serial_max_values(0)
    pipelined = _kernels.set_pipelined(0)
    tiled_backward = _kernels.set_tiled_backward(0)
    row_runs = _kernels.set_row_runs(True)
    lane_groups = _kernels.set_lane_groups(True)
    yield
    _kernels.set_stream_min_bytes(stream_min)
    _kernels.set_serial_max_values(serial_max)
    _kernels.set_pipelined(*pipelined)
    _kernels.set_tiled_backward(*tiled_backward)
    _kernels.set_row_runs(row_runs)
    _kernels.set_lane_groups(lane_groups)


def _eval(problem, shape, threads, relu, offset, in_place, row_runs):
    x, running_mean, running_var, weight, bias = problem
    _kernels.set_row_runs(row_runs)
    x = _offset_array(x, offset)
    y = x if in_place else _offset_array(np.zeros_like(x), offset)
    _kernels.normalize(x, y, *shape, running_mean, running_var, 1e-5, weight, bias, threads,
                       relu)
    return y.copy()


def _train(problem, shape, threads, relu, offset, row_runs):
    x, _, _, weight, bias = problem
    _kernels.set_row_runs(row_runs)
    x = _offset_array(x, offset)
    y = _offset_array(np.zeros_like(x), offset)
    channels = shape[1]
    mean, m2, invstd = np.zeros(channels), np.zeros(channels), np.zeros(channels)
    _kernels.train_forward(x, y, *shape, weight, bias, 1e-5, mean, m2, invstd, threads, relu)
    return [y.copy(), mean, m2, invstd]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_runs_give_the_bits_of_runs_alone(shape, dtype, streaming):
    problem = _problem(shape, dtype, seed=sum(shape))
    for relu in (False, True):
        _assert_eval_with_row_runs_gives_the_same_bits(problem, shape, relu)


def _assert_eval_with_row_runs_gives_the_same_bits(problem, shape, relu):
    """Eval with set_row_runs on (1-3 threads, in place or not) against eval
    with it off (one thread), arrays at offsets 0, 1 and 5 values."""
    for offset in (0, 1, 5):
        want = _eval(problem, shape, 1, relu, offset, False, False)
        for threads in (1, 2, 3):
            for in_place in (False, True):
                got = _eval(problem, shape, threads, relu, offset, in_place, True)
                assert got.tobytes() == want.tobytes(), (relu, offset, threads, in_place)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_forward_with_row_runs_gives_the_same_bits(shape, dtype, streaming):
    problem = _problem(shape, dtype, seed=2 * sum(shape))
    for relu in (False, True):
        want = _train(problem, shape, 1, relu, 1, False)
        for threads in (1, 2):
            assert _same_bits(_train(problem, shape, threads, relu, 1, True), want)


@pytest.fixture
def in_cache(streaming):
    """Normal stores at every size, where AVX-512 writes each row's runs in
    one call, one after the other (each_run_in_one_call: bn_affine_each_run,
    bn_grad_each_run)."""
    _kernels.set_stream_min_bytes(1 << 62)


@pytest.mark.parametrize("shape", SHAPES + LONG_RUN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_runs_in_cache_in_one_call_give_the_bits_of_runs_alone(shape, dtype, in_cache):
    problem = _problem(shape, dtype, seed=5 * sum(shape))
    for relu in (False, True):
        _assert_eval_with_row_runs_gives_the_same_bits(problem, shape, relu)
        want = _train(problem, shape, 1, relu, 1, False)
        assert _same_bits(_train(problem, shape, 2, relu, 1, True), want), relu


@pytest.mark.parametrize("shape", SHAPES + LONG_RUN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_gradient_in_cache_in_one_call_gives_the_bits_of_runs_alone(shape, dtype,
                                                                          in_cache):
    """The training backward's input gradient (bn_grad_each_run), dx in
    its own buffer or over dy or x; and the eval backward, which keeps a
    call per run."""
    problem = _gradient_problem(shape, dtype, seed=7 * sum(shape))
    want = _backward(problem, shape, 1, 0, None, False, True)
    _assert_backward_with_row_runs_gives(want, problem, shape)
    want = _backward(problem, shape, 1, 0, None, False, True, training=False)
    assert _same_bits(_backward(problem, shape, 2, 1, None, True, True, training=False), want)


def test_set_row_runs_returns_the_previous_setting(streaming):
    assert _kernels.set_row_runs(False) is True
    assert _kernels.set_row_runs(True) is False


def _gradient_problem(shape, dtype, seed):
    """x, dy, the batch statistics of x and a weight."""
    x, _, _, weight, _ = _problem(shape, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    dy = (rng.standard_normal(x.size) * rng.uniform(0.01, 5)).astype(dtype)
    wide = x.astype(np.float64).reshape(shape)
    mean = wide.mean(axis=(0, 2))
    invstd = 1 / np.sqrt(wide.var(axis=(0, 2)) + 1e-5)
    return x, dy, mean, invstd, weight


def _backward(problem, shape, threads, offset, in_place, row_runs, lane_groups,
              training=True):
    """[dx, grad_weight, grad_bias]; in_place: None, "dy" or "x" (dx's buffer)."""
    x, dy, mean, invstd, weight = problem
    _kernels.set_row_runs(row_runs)
    _kernels.set_lane_groups(lane_groups)
    x, dy = _offset_array(x, offset), _offset_array(dy, offset)
    dx = {"dy": dy, "x": x}.get(in_place)
    if dx is None:
        dx = _offset_array(np.zeros_like(x), offset)
    grad_weight, grad_bias = np.zeros(shape[1]), np.zeros(shape[1])
    _kernels.backward(x, dy, dx, *shape, mean, invstd, weight, training, grad_weight,
                      grad_bias, threads)
    return [dx.copy(), grad_weight, grad_bias]


def _assert_backward_with_row_runs_gives(want, problem, shape):
    """The backward with set_row_runs and set_lane_groups on gives want: on
    1-3 threads, arrays at offsets 0, 1 and 5 values, dx in its own buffer
    or over dy or x."""
    for offset in (0, 1, 5):
        for threads in (1, 2, 3):
            for in_place in (None, "dy", "x"):
                got = _backward(problem, shape, threads, offset, in_place, True, True)
                assert _same_bits(got, want), (offset, threads, in_place)


# Blocks of several runs in chunks of several rows (outer > 64), blocks cut
# short by the chunk's end, and groups of more than LANE_GROUP (64) channels.
BACKWARD_SHAPES = SHAPES + [(200, 130, 49), (1000, 5, 36), (70, 65, 100)]


@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_with_row_runs_and_lane_groups_gives_the_same_bits(shape, dtype, streaming):
    problem = _gradient_problem(shape, dtype, seed=3 * sum(shape))
    want = _backward(problem, shape, 1, 0, None, False, False)
    _assert_backward_with_row_runs_gives(want, problem, shape)
    # Each alone, and the eval backward (dx = dy * k, never a row of runs).
    assert _same_bits(_backward(problem, shape, 2, 1, None, True, False), want)
    assert _same_bits(_backward(problem, shape, 2, 1, None, False, True), want)
    want = _backward(problem, shape, 1, 0, None, False, False, training=False)
    assert _same_bits(_backward(problem, shape, 2, 1, None, True, True, training=False), want)


def test_backward_with_row_runs_matches_the_reference(streaming):
    shape = (200, 130, 49)
    problem = _gradient_problem(shape, np.float32, seed=5)
    got = _backward(problem, shape, 2, 1, None, True, True)
    assert_backward_matches_the_reference(got, problem, shape)


@pytest.mark.parametrize("shape", SHORT_PLANAR_SHAPES + NARROW_SHORT_RUNS,
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_runs_match_the_reference(shape, dtype, streaming):
    """The training forward, eval and backward against the float64
    reference, with the same bits on 1-3 threads."""
    x, running_mean, running_var, weight, bias = _problem(shape, dtype, seed=7 * sum(shape))
    x = x.reshape(shape)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-9, "atol": 1e-9}
    runs = {}
    for threads in (1, 2, 3):
        y, mean, invstd = bncore.batch_norm(x, weight=weight, bias=bias, training=True,
                                            return_stats=True, num_threads=threads)
        evaluated = bncore.batch_norm(x, running_mean, running_var, weight, bias,
                                      num_threads=threads)
        dx, grad_weight, grad_bias = bncore.batch_norm_backward(
            x, x, mean, invstd, weight, num_threads=threads)
        runs[threads] = [y, mean, invstd, evaluated, dx, grad_weight, grad_bias]
    assert _same_bits(runs[2], runs[1]) and _same_bits(runs[3], runs[1])
    y, mean, invstd, evaluated, dx, grad_weight, grad_bias = runs[1]
    want = reference.batch_norm(x, weight=weight, bias=bias, training=True)
    np.testing.assert_allclose(y, want[0], **tol)
    np.testing.assert_allclose(mean, want[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(invstd, want[2], rtol=1e-9)
    want = reference.batch_norm(x, running_mean, running_var, weight, bias)
    np.testing.assert_allclose(evaluated, want[0], **tol)
    want = reference.batch_norm_backward(x, x, mean, invstd, weight)
    np.testing.assert_allclose(dx, want[0], **tol)
    # The parameter gradients are float64 sums rounded to the input's dtype.
    rounding = {"rtol": 1e-6} if dtype == np.float32 else {"rtol": 1e-9, "atol": 1e-9}
    np.testing.assert_allclose(grad_weight, want[1], **rounding)
    np.testing.assert_allclose(grad_bias, want[2], **rounding)


def test_set_lane_groups_returns_the_previous_setting(streaming):
    assert _kernels.set_lane_groups(False) is True
    assert _kernels.set_lane_groups(True) is False


# Rows of every channel shorter than ROWS_CALL_MIN_BYTES (16 KiB) are
# written several a call, the table of constants repeated for as many rows:
# few channels of short runs, row chunks of 63 rows (all but the last call
# whole), of 4 rows with calls of 3 (set_rows_call_min_bytes below), rows
# of runs that share lines and of whole lines.
MANY_ROWS_SHAPES = [(4000, 2, 40), (4000, 3, 49), (250, 4, 64), (700, 1, 196)]


@pytest.mark.parametrize("shape", MANY_ROWS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_written_several_a_call_give_the_bits_of_one_a_call(shape, dtype, streaming):
    problem = _problem(shape, dtype, seed=11 * sum(shape))
    gradient_problem = _gradient_problem(shape, dtype, seed=13 * sum(shape))
    row_bytes = shape[1] * shape[2] * np.dtype(dtype).itemsize
    default = _kernels.set_rows_call_min_bytes(0)     # one row a call
    try:
        want_eval = _eval(problem, shape, 1, True, 1, False, True)
        want_train = _train(problem, shape, 1, False, 1, True)
        want_backward = _backward(gradient_problem, shape, 1, 1, None, True, True)
        for call_bytes in (default, 3 * row_bytes):
            _kernels.set_rows_call_min_bytes(call_bytes)
            for threads in (1, 2, 3):
                case = (call_bytes, threads)
                got = _eval(problem, shape, threads, True, 1, False, True)
                assert got.tobytes() == want_eval.tobytes(), case
                assert _same_bits(_train(problem, shape, threads, False, 1, True),
                                  want_train), case
                assert _same_bits(_backward(gradient_problem, shape, threads, 1, None, True,
                                            True), want_backward), case
    finally:
        _kernels.set_rows_call_min_bytes(default)


def test_set_rows_call_min_bytes_returns_the_previous_value(streaming):
    assert _kernels.set_rows_call_min_bytes(0) == 1 << 14
    assert _kernels.set_rows_call_min_bytes(1 << 14) == 0
