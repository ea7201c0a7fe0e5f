"""The AVX2 loops give the AVX-512 loops' bits. Both add element i of a run
to lane i % 16, with one fused multiply-add in the vector loop and a
multiply rounded before its add in the tails, so wherever the kernels take
the same path, a CPU with AVX-512 capped to AVX2 (set_vector_isa_cap) must
give every output bitwise what it gives uncapped: the forward, its
statistics and running averages, eval, and the backward.

Paths differ in two places by design: in cache, runs of 16-31 values are
blocks of whole runs with AVX-512 and rows across channels without it
(PLANAR_MIN_INNER_IN_CACHE), so those shapes are compared with every size
read as from memory (set_stream_min_bytes(0)), where both take runs; from
memory, float32 runs of 9-15 values in rows of at most 16 KiB are rows
across channels with AVX-512 and runs without it (SHORT_RUN_ROWS_MAX_BYTES),
so those are compared in cache, where both take rows, and wider rows of
such runs from memory, where both take runs.

On a CPU without AVX-512 there is nothing to compare against; there, and
everywhere, the capped results must match the float64 reference. (The
baseline loops square and add in two roundings: their bits may differ, so
CI's BNCORE_NO_DISPATCH stage checks them against the reference.)"""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from conftest import assert_output_close, make_input, make_params

# (shape, axis): short runs from memory and in cache (4x4, 7x7, 14x14, 9x9
# and 5x3 maps), every tail length of a run (1-15 values past whole vectors
# of 16), runs of 9 and 15 values in rows wider than 16 KiB (and of 12 in
# rows of 33 KB, which AVX-512 normalises as rows but sums as runs), runs
# cut in pieces of BLOCK_LEN with 1 and 3 values left over, channels-last
# and (N, C) rows (128 float64 columns: rows of 1 KiB, which float64's
# statistics ask for ahead rather than touching).
SHAPES = ([((512, 64, 7, 7), 1), ((300, 8, 4, 4), 1), ((64, 32, 14, 14), 1),
           ((16, 24, 9, 9), 1), ((33, 20, 5, 3), 1), ((6, 1900, 1, 9), 1),
           ((6, 1200, 1, 15), 1), ((8, 700, 1, 12), 1), ((4, 3, 1, 2049), 1),
           ((4, 3, 1, 2051), 1), ((8, 14, 14, 64), -1), ((5000, 67), 1), ((4000, 8), 1),
           ((2000, 128), 1)]
          + [((40, 12, 1, n), 1) for n in (1, 2, 3, 5, 9, 15, 16, 17, 23, 31, 32, 33, 47)])


def _paths_differ(shape, axis, size_rules, dtype):
    """Whether AVX-512 and AVX2 take these runs different ways: in cache,
    runs of 16-31 values; from memory, float32 runs of 9-15 values in rows
    of at most 16 KiB."""
    inner = int(np.prod(shape[2:])) if axis == 1 and len(shape) > 2 else 1
    if size_rules == "cache":
        return 16 <= inner <= 31
    row_bytes = shape[1] * inner * np.dtype(dtype).itemsize
    return dtype == np.float32 and 9 <= inner <= 15 and row_bytes <= 16384


def _shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + ("-last" if axis == -1 else "")


@pytest.fixture(params=["cache", "memory"])
def size_rules(request):
    """The default rules, or every size read as from memory (runs down to
    9 values as runs, but for narrow rows of them with AVX-512; streaming
    stores, prefetches ahead), two threads from any size."""
    stream_min = _kernels.set_stream_min_bytes(0) if request.param == "memory" else None
    serial_max = _kernels.set_serial_max_values(0)
    yield request.param
    if stream_min is not None:
        _kernels.set_stream_min_bytes(stream_min)
    _kernels.set_serial_max_values(serial_max)


@pytest.fixture
def isa_cap():
    """Sets the cap for a test and puts the widest back after it."""
    caps = []

    def set_cap(isa):
        caps.append(_kernels.set_vector_isa_cap(isa))

    yield set_cap
    if caps:
        _kernels.set_vector_isa_cap(caps[0])


def _everything(x, dy, axis, params, threads=2):
    weight, bias, running_mean, running_var = (p.copy() for p in params)
    y, mean, invstd = bncore.batch_norm(x, running_mean, running_var, weight, bias,
                                        training=True, return_stats=True, axis=axis,
                                        num_threads=threads)
    y_eval = bncore.batch_norm(x, running_mean, running_var, weight, bias, axis=axis,
                               num_threads=threads)
    grads = bncore.batch_norm_backward(dy, x, mean, invstd, weight, bias, axis=axis,
                                       num_threads=threads)
    return [y, mean, invstd, running_mean, running_var, y_eval, *grads]


NAMES = ["y", "mean", "invstd", "running_mean", "running_var", "y_eval", "grad_input",
         "grad_weight", "grad_bias"]


def _problem(shape, axis, dtype):
    channels = shape[axis]
    x = make_input(shape, dtype, axis=axis, kind="normal", seed=sum(shape)) * 3 + 1
    dy = make_input(shape, dtype, axis=axis, kind="normal", seed=1)
    return x.astype(dtype), dy, make_params(channels, dtype)


ORDER = _kernels.ISA_CAPS  # narrowest first


def _needs(isa):
    """Skip unless the loops chosen uncapped (this build on this CPU) are at
    least `isa`."""
    if ORDER.index(_kernels.VECTOR_ISA) < ORDER.index(isa):
        pytest.skip(f"this build or CPU has no {isa} loops")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SHAPES, ids=_shape_id)
def test_avx2_gives_the_avx512_bits(case, dtype, size_rules, isa_cap):
    shape, axis = case
    _needs("AVX-512")
    if _paths_differ(shape, axis, size_rules, dtype):
        pytest.skip(f"{size_rules}: these runs take another path without AVX-512")
    x, dy, params = _problem(shape, axis, dtype)
    widest = _everything(x, dy, axis, params)
    isa_cap("AVX2")
    capped = _everything(x, dy, axis, params)
    for name, got, want in zip(NAMES, capped, widest):
        assert got.tobytes() == want.tobytes(), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SHAPES, ids=_shape_id)
def test_avx2_matches_the_reference(case, dtype, size_rules, isa_cap):
    shape, axis = case
    _needs("AVX2")
    isa_cap("AVX2")
    x, dy, params = _problem(shape, axis, dtype)
    y, mean, invstd, _, _, y_eval, *grads = _everything(x, dy, axis, params)
    weight, bias, running_mean, running_var = params
    want = reference.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                axis=axis)
    assert_output_close(y, want.y, dtype)
    want_eval = reference.batch_norm(x, want.running_mean, want.running_var, weight, bias,
                                     axis=axis)
    assert_output_close(y_eval, want_eval.y, dtype)
    want_grads = reference.batch_norm_backward(dy, x, mean, invstd, weight, bias, axis=axis)
    for got, expected in zip(grads, want_grads):
        assert_output_close(got, expected, dtype)


@pytest.mark.parametrize("shape", [(512, 64, 49), (40, 12, 33), (40, 12, 47), (64, 32, 196),
                                   (300, 8, 16), (4, 3, 2051)],
                         ids=lambda s: "x".join(map(str, s)))
def test_avx2_gradient_sums_give_the_avx512_bits_about_any_mean(shape, size_rules, isa_cap):
    """The float32 backward's float64 sums of dy and dy * (x - mean), before
    the rounding to float32 of grad_weight, grad_bias and the input
    gradient's constants, which hides a last-bit difference in them: the
    AVX2 tails must round each product before adding it, as the AVX-512
    ones do."""
    _needs("AVX-512")
    outer, channels, inner = shape
    if _paths_differ((outer, channels, inner), 1, size_rules, np.float32):
        pytest.skip(f"{size_rules}: these runs take another path without AVX-512")
    rng = np.random.default_rng(inner)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    mean = rng.standard_normal(channels)
    sums = {}
    for isa in ("AVX-512", "AVX2"):
        isa_cap(isa)
        sum_dy, sum_dy_dev = np.zeros(channels), np.zeros(channels)
        _kernels.grad_sums(x, dy, outer, channels, inner, mean, sum_dy, sum_dy_dev, 2)
        sums[isa] = sum_dy.tobytes() + sum_dy_dev.tobytes()
    assert sums["AVX2"] == sums["AVX-512"]


def test_the_cap_reaches_the_kernels(isa_cap):
    """In cache, float64 runs of 17 values are blocks of whole runs with
    AVX-512 and rows across channels under the AVX2 cap: their statistics
    are summed in another order, so their last bits differ. (Were the cap
    ignored, the tests above would compare AVX-512 with itself.)"""
    _needs("AVX-512")
    x, _, _ = _problem((40, 12, 1, 17), 1, np.float64)
    mean, m2 = np.zeros(12), np.zeros(12)
    _kernels.moments(x, 40, 12, 17, mean, m2, 1)
    isa_cap("AVX2")
    mean_avx2, m2_avx2 = np.zeros(12), np.zeros(12)
    _kernels.moments(x, 40, 12, 17, mean_avx2, m2_avx2, 1)
    assert m2_avx2.tobytes() != m2.tobytes()
    np.testing.assert_allclose(m2_avx2, m2, rtol=1e-13)


def test_the_cap_names_an_isa():
    with pytest.raises(ValueError, match="isa must be one of"):
        _kernels.set_vector_isa_cap("SSE2")
