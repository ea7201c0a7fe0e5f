"""Memory: no temporary array the size of the input (DESIGN.md), and no
growth over repeated calls. NumPy reports its allocations to tracemalloc, so
any input-sized NumPy temporary shows up in the traced peak."""

import tracemalloc

import numpy as np
import pytest

import bncore
from conftest import DTYPE_PARAMS, make_input, make_params

SHAPE = (16, 8, 64, 64)  # 524288 values: 2 MiB in float32, 4 MiB in float64


def _peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_no_input_sized_temporaries(dtype, training, axis):
    x = make_input(SHAPE, dtype, axis, seed=500)
    c = SHAPE[axis]
    w, b, rm, rv = make_params(c, dtype, seed=500)
    out = np.empty_like(x)
    bncore.batch_norm(x, rm, rv, w, b, training, axis=axis, out=out)  # warm up
    # with out given: only per-channel scratch may be allocated
    peak, _ = _peak(lambda: bncore.batch_norm(x, rm, rv, w, b, training, axis=axis,
                                              out=out))
    assert peak < 0.1 * x.nbytes, f"peak {peak} bytes for a {x.nbytes}-byte input"
    # in place: the same
    peak, _ = _peak(lambda: bncore.batch_norm(out, rm, rv, w, b, training, axis=axis,
                                              out=out))
    assert peak < 0.1 * x.nbytes
    # without out: the output and nothing else of that size
    peak, y = _peak(lambda: bncore.batch_norm(x, rm, rv, w, b, training, axis=axis))
    assert peak < 1.1 * x.nbytes
    # moments: nothing of that size
    peak, _ = _peak(lambda: bncore.moments(x, axis=axis))
    assert peak < 0.1 * x.nbytes


def test_non_contiguous_input_copied_once():
    x = make_input(SHAPE, np.float32, 1, seed=501)
    xf = np.asfortranarray(x)
    peak, _ = _peak(lambda: bncore.batch_norm(xf, training=True))
    assert peak < 2.1 * x.nbytes  # one copy + the output


def test_no_growth_over_repeated_calls():
    x = make_input((8, 4, 32, 32), np.float32, 1, seed=502)
    w, b, rm, rv = make_params(4, np.float32, seed=502)
    out = np.empty_like(x)
    bn = bncore.BatchNorm2d(4)
    for _ in range(5):  # warm up caches of any kind
        bncore.batch_norm(x, rm, rv, w, b, True, out=out)
        bn(x)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            bncore.batch_norm(x, rm, rv, w, b, True, out=out)
            bncore.moments(x)
        bn_y = None
        for _ in range(50):
            bn_y = bn(x)
        del bn_y
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"grew by {after - before} bytes"


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_backward_has_no_input_sized_temporaries(dtype, training, axis):
    x = make_input(SHAPE, dtype, axis, seed=503)
    dy = make_input(SHAPE, dtype, axis, seed=504)
    w = make_params(SHAPE[axis], dtype, seed=503)[0]
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    out = np.empty_like(x)
    # with out given (or in place into dy): only per-channel arrays
    peak, _ = _peak(lambda: bncore.batch_norm_backward(dy, x, mean, invstd, w,
                                                       training=training, axis=axis, out=out))
    assert peak < 0.1 * x.nbytes, f"peak {peak} bytes for a {x.nbytes}-byte input"
    # allocating: grad_input and nothing else of that size
    peak, _ = _peak(lambda: bncore.batch_norm_backward(dy, x, mean, invstd, w,
                                                       training=training, axis=axis))
    assert peak < 1.1 * x.nbytes


@pytest.mark.parametrize("into", ["grad_output", "input"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_backward_in_place_allocates_nothing_input_sized(dtype, training, into):
    """out=grad_output or out=input: the gradient overwrites that array and
    nothing of the input's size is allocated."""
    x = make_input(SHAPE, dtype, 1, seed=505)
    dy = make_input(SHAPE, dtype, 1, seed=506)
    w = make_params(SHAPE[1], dtype, seed=505)[0]
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    target = dy if into == "grad_output" else x
    peak, (grad_input, _, _) = _peak(lambda: bncore.batch_norm_backward(
        dy, x, mean, invstd, w, training=training, out=target))
    assert grad_input is target
    assert peak < 0.1 * x.nbytes, f"peak {peak} bytes for a {x.nbytes}-byte input"


@pytest.mark.parametrize("nonfinite", ["skip_update", "raise"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_nonfinite_modes_allocate_nothing_input_sized(dtype, nonfinite):
    """The finiteness check works on the (C,) statistics only."""
    x = make_input(SHAPE, dtype, 1, seed=507)
    _, _, rm, rv = make_params(SHAPE[1], dtype, seed=507)
    out = np.empty_like(x)
    peak, _ = _peak(lambda: bncore.batch_norm(x, rm, rv, training=True, out=out,
                                              nonfinite=nonfinite))
    assert peak < 0.1 * x.nbytes
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan

    def call():
        try:
            bncore.batch_norm(bad, rm, rv, training=True, out=out, nonfinite=nonfinite)
        except FloatingPointError:
            pass

    peak, _ = _peak(call)
    assert peak < 0.1 * x.nbytes


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_layer_allocates_only_its_outputs(dtype):
    """A layer's forward allocates the output, its backward the gradient,
    and nothing else of the input's size (the layer keeps a reference to
    its input for backward, not a copy)."""
    x = make_input(SHAPE, dtype, 1, seed=508)
    dy = make_input(SHAPE, dtype, 1, seed=509)
    for training in (True, False):
        bn = bncore.BatchNorm2d(SHAPE[1], dtype=dtype).train(training)
        bn(x)  # warm up
        peak, _ = _peak(lambda: bn(x))
        assert peak < 1.1 * x.nbytes, (training, peak)
        peak, _ = _peak(lambda: bn.backward(dy))
        assert peak < 1.1 * x.nbytes, (training, peak)


@pytest.mark.parametrize("shape, axis", [((2, 20000, 16), 1), ((2, 20000, 16), -1),
                                         ((3, 50000), 1)])
def test_scratch_tables_stay_per_channel_for_wide_inputs(shape, axis):
    """Few rows and many columns: the kernels' own tables (traced, they come
    from PyMem_RawMalloc) stay per channel, far below the input's size."""
    x = make_input(shape, np.float32, axis, kind="normal", seed=505)
    channels = shape[axis]
    out = np.empty_like(x)
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    calls = [
        lambda: bncore.batch_norm(x, rm, rv, axis=axis, out=out),
        lambda: bncore.batch_norm(x, training=True, axis=axis, out=out),
        lambda: bncore.batch_norm_backward(x, x, mean, invstd, axis=axis, out=out),
    ]
    for call in calls:
        call()
        peak, _ = _peak(call)
        # per-channel arrays: a few dozen bytes a channel, whatever inner is
        assert peak < 64 * channels + 65536, f"peak {peak} bytes for {channels} channels"
