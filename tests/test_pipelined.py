"""The pipelined training forward (planar order: each channel normalised
from cache while the next one's statistics are read) against the two-pass
path, bit for bit: outputs, mean, m2 and invstd, for any thread count,
with or without streaming stores, relu, affine parameters, in place, and on
arrays that do not start on a cache line."""

import numpy as np
import pytest

from bncore import _kernels

from conftest import at_page_offset


def tuning_restorer(set_mode):
    """A fixture that gives back, after the test, the mode of the hook
    set_mode (set_pipelined or its backward twin) and the streaming size."""
    @pytest.fixture
    def restore_tuning():
        previous_mode = set_mode(-1)
        previous_stream = _kernels.set_stream_min_bytes(1 << 62)
        _kernels.set_stream_min_bytes(previous_stream)
        yield
        set_mode(*previous_mode)
        _kernels.set_stream_min_bytes(previous_stream)
    return restore_tuning


restore_tuning = tuning_restorer(_kernels.set_pipelined)


def _offset_array(values, offset):
    """A copy of values whose data starts `offset` elements past a 64-byte
    boundary (NumPy's own large arrays usually start 16 bytes past one)."""
    buf = np.empty(values.size + 32, values.dtype)
    start = (-buf.ctypes.data % 64) // values.itemsize + offset
    out = buf[start:start + values.size]
    out[:] = values.ravel()
    return out


def _input(outer, channels, inner, offset, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    # A different location and spread per channel, so a value normalised
    # with the wrong channel's statistics shows.
    loc = rng.uniform(-50, 50, (1, channels, 1))
    scale = rng.uniform(0.1, 10, (1, channels, 1))
    x = (rng.standard_normal((outer, channels, inner)) * scale + loc).astype(dtype)
    x.flat[::97] = 1e4     # outliers: exercise the merges' cancellation
    return _offset_array(x, offset)


def _train(x, shape, params, relu, threads, mode, in_place, offset, items=0):
    outer, channels, inner = shape
    weight, bias = params
    _kernels.set_pipelined(mode, items)
    x = _offset_array(x, offset)
    y = x if in_place else _offset_array(np.zeros(x.size, x.dtype), offset)
    mean, m2, invstd = np.zeros(channels), np.zeros(channels), np.zeros(channels)
    _kernels.train_forward(x, y, outer, channels, inner, weight, bias, 1e-5, mean, m2, invstd,
                           threads, relu=relu)
    return [y.copy(), mean, m2, invstd]


def _same_bits(a, b):
    return all(p.tobytes() == q.tobytes() for p, q in zip(a, b))


# (outer, channels, inner): inner not a multiple of 16, of a cache line or
# of BLOCK_LEN (2048); several blocks per run with a short last one; more
# than 64 rows (row chunks of two, the last one short); one channel; more
# threads than channels; two above the serial cutoff (64 Ki values), so
# that threads share the channels; row chunks of 63 runs of 40 values, cut
# into blocks of 51 runs and of 12. With streaming stores, float32 lines
# shared by two runs or pieces are written whole, once (seams), where each
# piece spans a line: last pieces of 16 values (seams) and 14 (none). Row
# chunks of 5 rows in blocks of 2, 2 and 1, which the two passes read a
# block's rows at a time across the channels and the pipelined walk channel
# by channel.
SHAPES = [(3, 5, 77), (2, 3, 1030), (65, 3, 33), (7, 2, 2100), (4, 1, 300),
          (2, 7, 4099), (130, 4, 40), (5, 9, 784), (1, 2, 64), (3, 11, 2050),
          (70, 5, 201), (4000, 2, 40), (3, 4, 2064), (3, 4, 2062), (300, 3, 700)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0, 1, 4])
def test_pipelined_path_gives_the_bits_of_the_two_pass_path(shape, offset, dtype,
                                                             restore_tuning):
    outer, channels, inner = shape
    x = _input(outer, channels, inner, 0, seed=sum(shape) + offset, dtype=dtype)
    rng = np.random.default_rng(7)
    params = (rng.uniform(-3, 3, channels).astype(np.float32), rng.standard_normal(channels))
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        for relu in (False, True):
            want = _train(x, shape, params, relu, 1, 0, False, offset)
            for threads, items in ((1, 0), (2, 0), (3, 0), (2, 5)):
                for in_place in (False, True):
                    got = _train(x, shape, params, relu, threads, 1, in_place, offset, items)
                    assert _same_bits(got, want), (stream_min, relu, threads, items, in_place)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner", [1024, 784])
@pytest.mark.parametrize("gap", [16, 48, 64, 136, 448, 4032])
def test_pipelined_path_with_the_output_just_past_the_input_mod_4_kib(gap, inner, dtype,
                                                                      restore_tuning):
    """An output a little past its input modulo 4 KiB makes the fused loop
    read the statistics ahead of its stores (bn_alias_lead): runs of 1024
    values keep the one gap for every run, runs of 784 change it from row
    to row. The bits stay the two-pass path's."""
    shape = (6, 9, inner)
    x = at_page_offset(_input(*shape, 0, seed=gap + inner, dtype=dtype), 16)
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        results = []
        for mode, threads in ((0, 1), (1, 1), (1, 2)):
            _kernels.set_pipelined(mode)
            y = at_page_offset(np.zeros(x.size, x.dtype), 16 + gap)
            stats = [np.zeros(shape[1]) for _ in range(3)]
            _kernels.train_forward(x, y, *shape, None, None, 1e-5, *stats, threads)
            results.append([y] + stats)
        assert _same_bits(results[1], results[0]) and _same_bits(results[2], results[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pipelined_path_keeps_non_finite_values(dtype, restore_tuning):
    shape = (6, 4, 500)
    x = _input(*shape, 0, seed=3, dtype=dtype)
    x[5::301] = np.nan
    x[7] = np.inf
    x[shape[2] * 2 + 9] = -np.inf   # channel 2 gets -inf, channel 0 +inf, NaN everywhere
    x[shape[2] * 3:shape[2] * 4] = 2.5   # channel 3 in row 0 constant ...
    _kernels.set_stream_min_bytes(0)
    for relu in (False, True):
        want = _train(x, shape, (None, None), relu, 1, 0, False, 0)
        assert np.isnan(want[0]).any() and np.isnan(want[1]).any()
        for threads in (1, 2):
            assert _same_bits(_train(x, shape, (None, None), relu, threads, 1, False, 0), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pipelined_path_statistics_are_right(dtype, restore_tuning):
    """Not only equal to the two-pass path: the mean and variance of each
    channel, against NumPy in float64."""
    shape = (9, 5, 1100)
    x = _input(*shape, 4, seed=11, dtype=dtype)
    _kernels.set_stream_min_bytes(0)
    y, mean, m2, invstd = _train(x, shape, (None, None), False, 2, 1, False, 4)
    wide = x.reshape(shape).astype(np.float64)
    np.testing.assert_allclose(mean, wide.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m2, ((wide - wide.mean(axis=(0, 2), keepdims=True)) ** 2)
                               .sum(axis=(0, 2)), rtol=1e-9)
    want = (wide - mean[:, None]) / np.sqrt(m2[:, None] / (shape[0] * shape[2]) + 1e-5)
    np.testing.assert_allclose(y.reshape(shape), want, rtol=1e-5, atol=1e-5)


def assert_pipelined_by_size(x, shape, pipelined_on):
    """By the size rule (mode -1), with streaming stores, the forward gives
    the bits of the two passes (mode 0) on each thread count in
    pipelined_on; where the CPU has AVX-512 (the rule's machines), it takes
    the pipelined walk on those mapped to True and only on those."""
    _kernels.set_stream_min_bytes(0)
    want = _train(x, shape, (None, None), False, 1, 0, False, 0)
    for threads, pipelined in pipelined_on.items():
        calls = _kernels.pipelined_forward_calls()
        assert _same_bits(_train(x, shape, (None, None), False, threads, -1, False, 0), want)
        if _kernels.VECTOR_ISA == "AVX-512":
            assert _kernels.pipelined_forward_calls() == calls + pipelined, threads


def test_float64_is_pipelined_by_size_on_one_and_two_threads(restore_tuning):
    shape = (4, 32, 4096)     # 16 channels per thread, channels of 128 KiB
    assert_pipelined_by_size(_input(*shape, 0, seed=2, dtype=np.float64), shape,
                             {1: True, 2: True})


def test_float64_runs_of_1568_bytes_are_pipelined_on_two_threads_only(restore_tuning):
    """Float64 runs of 1.5-3 KiB: pipelined on two threads
    (PIPE_MIN_RUN_BYTES_F64), two passes on one
    (PIPE_MIN_RUN_BYTES_F64_ONE_THREAD)."""
    shape = (84, 32, 196)     # 14 x 14 maps, enough values for a team of two
    assert_pipelined_by_size(_input(*shape, 0, seed=4, dtype=np.float64), shape,
                             {1: False, 2: True})


@pytest.mark.parametrize("inner, pipelined", [(136, True), (144, True), (128, False)],
                         ids=["1088B", "1152B", "1024B"])
def test_float64_runs_of_whole_lines_are_pipelined_from_17_lines(inner, pipelined,
                                                                  restore_tuning):
    """Float64 runs of whole 64-byte lines: pipelined on one thread and two
    from 1088 bytes (PIPE_MIN_WHOLE_LINE_RUN_BYTES_F64), two passes at 1
    KiB (under PIPE_MIN_RUN_BYTES_F64 too)."""
    shape = (64, 32, inner)
    assert_pipelined_by_size(_input(*shape, 0, seed=5, dtype=np.float64), shape,
                             {1: pipelined, 2: pipelined})


@pytest.mark.parametrize("shape, pipelined", [
    ((320, 8, 3136), True),      # channels of 4.0 MB, runs of 12.5 kB
    ((384, 8, 3136), False),     # 4.8 MB
    ((160, 8, 12544), True),     # 8.0 MB, runs of 50 kB
    ((176, 8, 12544), False),    # 8.8 MB
], ids=["4.0MB", "4.8MB", "8.0MB-long-runs", "8.8MB-long-runs"])
def test_size_rule_takes_channels_up_to_4_mib_or_8_with_long_runs(shape, pipelined,
                                                                   restore_tuning):
    """Float32 on one thread: the pipelined walk takes channels of up to
    PIPE_MAX_SLICE (4 MiB), and up to 8 MiB where runs are of 32 KiB or
    more; larger ones take the two passes."""
    x = np.random.default_rng(3).standard_normal(shape, dtype=np.float32).ravel()
    assert_pipelined_by_size(x, shape, {1: pipelined})


def test_set_pipelined_returns_the_previous_setting(restore_tuning):
    _kernels.set_pipelined(1, 6)
    assert _kernels.set_pipelined(0) == (1, 6)
    assert _kernels.set_pipelined(-1) == (0, 0)
