"""Eval, training and backward calls take compiled fast paths
(_kernels.eval_fast, train_fast, backward_fast), which make small calls
cheap: each must give exactly what the full path gives, and hand every call
it is not sure of back to the full path, so that bad arguments meet the
full checks.

The full path is reached with an argument of a type the fast path does not
take but the full path accepts as the same value (eps as a NumPy float).
"""

import numpy as np
import pytest

import bncore
from bncore import _kernels, functional, reference
from conftest import assert_output_close, make_input, make_params

SMALL_SHAPES = [(1, 64), (2, 3), (8, 32, 14, 14), (4, 5, 7), (3, 6, 2, 5), (1, 1)]


def _full_path(*args, **kwargs):
    """batch_norm through its full checks: eps as np.float64, a value the
    fast path leaves alone."""
    kwargs["eps"] = np.float64(kwargs.get("eps", 1e-5))
    return bncore.batch_norm(*args, **kwargs)


def _args(shape, dtype, axis, affine, seed=0):
    x = make_input(shape, dtype, axis, kind="normal", seed=seed)
    c = shape[axis]
    weight, bias, rm, rv = make_params(c, dtype, seed)
    if not affine:
        weight = bias = None
    return x, rm, rv, weight, bias


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_fast_path_matches_full_path_and_reference(shape, dtype, axis, affine, activation):
    x, rm, rv, weight, bias = _args(shape, dtype, axis, affine)
    assert _kernels.eval_fast(x, rm, rv, weight, bias, 0.1, 1e-5, axis, None, None,
                               "propagate", activation, True) is not None, "not taken"
    fast = bncore.batch_norm(x, rm, rv, weight, bias, axis=axis, activation=activation)
    full = _full_path(x, rm, rv, weight, bias, axis=axis, activation=activation)
    np.testing.assert_array_equal(fast, full)
    assert fast.dtype == dtype and fast.shape == x.shape and fast.flags.c_contiguous
    ref = reference.batch_norm(x, rm, rv, weight, bias, False, 0.1, 1e-5, axis=axis).y
    if activation == "relu":
        ref = np.maximum(ref, 0)
    assert_output_close(fast, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_out_and_in_place(dtype):
    x, rm, rv, weight, bias = _args((8, 32, 14, 14), dtype, 1, True)
    want = _full_path(x, rm, rv, weight, bias)
    out = np.full_like(x, np.nan)
    assert bncore.batch_norm(x, rm, rv, weight, bias, out=out) is out
    np.testing.assert_array_equal(out, want)
    inplace = x.copy()
    assert bncore.batch_norm(inplace, rm, rv, weight, bias, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, want)


@pytest.mark.parametrize("shape, num_threads", [((2, 16, 70000), 2), ((4, 70000, 3), None),
                                                ((64, 16, 4096), 2)],
                         ids=["planar", "interleaved", "pooled-output"])
def test_large_calls_take_the_fast_path_too(shape, num_threads):
    """Above the serial size the fast path runs on the resolved team (and a
    16 MB output comes from the output pool): the same bits as the full path."""
    x, rm, rv, weight, bias = _args(shape, np.float32, 1, True)
    assert _kernels.eval_fast(x, rm, rv, weight, bias, 0.1, 1e-5, 1, None, num_threads,
                              "propagate", None, True) is not None, "not taken"
    np.testing.assert_array_equal(
        bncore.batch_norm(x, rm, rv, weight, bias, num_threads=num_threads),
        _full_path(x, rm, rv, weight, bias, num_threads=num_threads))


def test_mixed_parameter_dtypes():
    """float32 input with float64 statistics and parameters (both are read
    as they are): the same as the full path."""
    x, rm, rv, weight, bias = _args((4, 16), np.float32, 1, True)
    rm64, rv64, w64, b64 = (a.astype(np.float64) for a in (rm, rv, weight, bias))
    np.testing.assert_array_equal(bncore.batch_norm(x, rm64, rv64, w64, b64),
                                  _full_path(x, rm64, rv64, w64, b64))


def _declined(_entry=_kernels.eval_fast, **changes):
    """Whether the fast path (eval_fast, or _entry) declines a valid small
    call with some arguments changed."""
    x, rm, rv, weight, bias = _args((4, 16), np.float32, 1, True)
    call = dict(x=x, running_mean=rm, running_var=rv, weight=weight, bias=bias, momentum=0.1,
                eps=1e-5, axis=1, out=None, num_threads=None, nonfinite="propagate",
                activation=None, unbiased_running_var=True)
    for name, change in changes.items():
        call[name] = change(call) if callable(change) else change
    return _entry(*call.values()) is None


def test_the_baseline_call_is_taken():
    assert not _declined()
    for mode in functional.NONFINITE_MODES:
        assert not _declined(nonfinite=mode)
    assert not _declined(num_threads=2, unbiased_running_var=False, activation="relu")


@pytest.mark.parametrize("changes", [
    # Arguments the full path converts or refuses.
    dict(x=lambda c: c["x"].tolist()),
    dict(x=lambda c: np.asfortranarray(c["x"].reshape(4, 4, 4))),
    dict(x=lambda c: c["x"][:, ::2]),
    dict(x=lambda c: c["x"].astype(np.float16)),
    dict(x=lambda c: c["x"].astype(np.int32)),
    dict(x=lambda c: c["x"].view(np.matrix)),
    dict(x=lambda c: c["x"].reshape(-1)),
    dict(x=lambda c: c["x"][:0]),
    dict(running_mean=None),
    dict(running_var=None),
    dict(running_mean=lambda c: c["running_mean"][:-1]),
    dict(running_var=lambda c: c["running_var"].reshape(16, 1)),
    dict(running_var=lambda c: c["running_var"].astype(np.float16)),
    dict(weight=lambda c: c["weight"].tolist()),
    dict(bias=lambda c: np.repeat(c["bias"], 2)[::2]),
    dict(momentum=2.0), dict(momentum=float("nan")), dict(momentum=1),
    dict(momentum=None),
    dict(eps=-1.0), dict(eps=float("nan")), dict(eps=float("inf")), dict(eps=0),
    dict(eps=np.float64(1e-5)),
    dict(axis=2), dict(axis=-3), dict(axis=True), dict(axis=1.0), dict(axis=2**70),
    dict(num_threads=0), dict(num_threads=True), dict(num_threads=2.0),
    dict(nonfinite="ignore"), dict(nonfinite=None),
    dict(activation="gelu"), dict(activation=True),
    dict(unbiased_running_var=1), dict(unbiased_running_var=np.True_),
    # out= that is not a plain separate buffer or the input itself.
    dict(out=lambda c: np.empty((4, 16), np.float64)),
    dict(out=lambda c: np.empty((16, 4), np.float32)),
    dict(out=lambda c: np.empty((4, 16, 1), np.float32)),
    dict(out=lambda c: np.empty((4, 16), np.float32)[::-1]),
    dict(out=lambda c: c["x"].copy().tolist()),
    dict(out=lambda c: _read_only(np.empty((4, 16), np.float32))),
    dict(out=lambda c: _over(c, "running_mean")),
    dict(out=lambda c: _over(c, "weight")),
])
def test_uncertain_calls_go_to_the_full_path(changes):
    assert _declined(**changes)


def _read_only(a):
    a.flags.writeable = False
    return a


def _shifted_view(x):
    """(x in a buffer one row longer, the array one row further on): two
    arrays of x's shape and values sharing all but one row."""
    buffer = np.empty((x.shape[0] + 1,) + x.shape[1:], x.dtype)
    buffer[:-1] = x
    return buffer[:-1], buffer[1:]


def _over(call, name):
    """An out= whose memory holds the per-channel array `name`."""
    out = np.empty((4, 16), np.float32)
    call[name] = out[1]
    return out


def test_shifted_overlap_is_refused_by_the_full_path():
    """A partial overlap between out and x, declined by the fast path, meets
    the full path's error."""
    x = make_input((4, 16), np.float32, 1, kind="normal")
    x_view, out = _shifted_view(x)
    assert _declined(x=x_view, out=out)
    _, rm, rv, _, _ = _args((4, 16), np.float32, 1, False)
    with pytest.raises(ValueError, match="out overlaps input"):
        bncore.batch_norm(x_view, rm, rv, out=out)


def test_layer_eval_takes_the_fast_path_and_keeps_backward(monkeypatch):
    """A small eval-mode layer call takes the fast path (the full one is
    disabled here), gives the full path's output, and its backward sees the
    running statistics as they were at the forward."""
    x, rm, rv, weight, bias = _args((8, 6), np.float64, 1, True)
    layer = bncore.BatchNorm(6, dtype=np.float64)
    layer.weight[:], layer.bias[:] = weight, bias
    layer.running_mean[:], layer.running_var[:] = rm, rv
    layer.eval()
    want = _full_path(x, rm, rv, weight, bias)

    def no_full_path(*args, **kwargs):
        raise AssertionError("the layer took the full path")

    monkeypatch.setattr("bncore.functional._as_input", no_full_path)
    y = layer(x)
    monkeypatch.undo()
    np.testing.assert_array_equal(y, want)
    layer.running_mean += 1.0   # after the forward: must not reach backward
    dy = make_input((8, 6), np.float64, 1, kind="normal", seed=3)
    grad = layer.backward(dy)
    grad_ref, _, _ = reference.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + layer.eps),
                                                   weight, training=False)
    assert_output_close(grad, grad_ref, np.float64)


# --------------------------------------------------------------------------
# The running-statistics update: one compiled loop (_kernels.update_running)
# that must write exactly what functional._update_running's NumPy writes.

@pytest.mark.parametrize("mean_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("var_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("unbiased", [True, False])
def test_update_running_matches_numpy_bitwise(mean_dtype, var_dtype, unbiased):
    rng = np.random.default_rng(7)
    c, count = 37, 11
    running_mean = rng.normal(size=c).astype(mean_dtype)
    running_var = rng.uniform(0.5, 2, size=c).astype(var_dtype)
    mean, m2 = rng.normal(size=c) * 1e3, rng.uniform(0, 50, size=c)
    keep, take = 0.9 + rng.uniform(0, 0.05), 0.1 - rng.uniform(0, 0.05)
    divisor = count - 1 if unbiased else count
    want_mean, want_var = running_mean.copy(), running_var.copy()
    functional._update_running(want_mean, want_var, mean, m2 / divisor, keep, take)
    assert _kernels.update_running(running_mean, running_var, mean, m2, float(divisor),
                                   keep, take)
    np.testing.assert_array_equal(running_mean, want_mean)
    np.testing.assert_array_equal(running_var, want_var)


def test_update_running_leaves_overflow_to_numpy():
    """A finite value beyond float32's range: nothing written, False; the
    caller's NumPy path then raises under np.errstate(over="raise") with
    both buffers untouched, as before."""
    running_mean = np.zeros(3, np.float32)
    running_var = np.ones(3, np.float32)
    mean, m2 = np.zeros(3), np.array([1.0, 1e39, 1.0])
    assert not _kernels.update_running(running_mean, running_var, mean, m2, 1.0, 0.0, 1.0)
    np.testing.assert_array_equal(running_mean, 0)
    np.testing.assert_array_equal(running_var, 1)
    batch = functional._Batch(mean, m2, 2, 1.0, "propagate", False)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        functional._fold_batch(batch, running_mean, running_var, 1.0)
    np.testing.assert_array_equal(running_var, 1)


@pytest.mark.parametrize("make_buffer", [
    lambda: _read_only(np.ones(4, np.float32)),
    lambda: np.ones(8, np.float32)[::2],
    lambda: np.frombuffer(bytearray(17), np.float32, count=4, offset=1),   # misaligned
    lambda: np.ones(4, np.float16),
    lambda: np.ones((4, 1), np.float32),
    lambda: np.ones(4, np.float32).view(np.matrix),
])
def test_update_running_declines_buffers_it_does_not_take(make_buffer):
    buffer = make_buffer()
    before = np.array(buffer, copy=True)
    assert not _kernels.update_running(np.zeros(4), buffer, np.zeros(4), np.ones(4), 1.0,
                                       0.5, 0.5)
    np.testing.assert_array_equal(np.asarray(buffer), before)


# --------------------------------------------------------------------------
# Training calls: _kernels.train_fast runs the checks and the kernel, the
# running update stays in functional._fold_batch.

def _train_both_ways(shape, dtype, axis, running=True, **options):
    """(fast, full): outputs, statistics and running buffers of the same
    training call through each path."""
    results = []
    for run in (bncore.batch_norm, _full_path):
        x, rm, rv, weight, bias = _args(shape, dtype, axis, True)
        if not running:
            rm = rv = None
        y, mean, invstd = run(x, rm, rv, weight, bias, True, axis=axis, return_stats=True,
                              **options)
        results.append((y, mean, invstd, rm, rv))
    return results


@pytest.mark.parametrize("shape", [(2, 3), (8, 32, 14, 14), (4, 5, 7), (3, 6, 2, 5),
                                   (2, 8, 40000)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_train_fast_path_matches_full_path(shape, dtype, axis):
    x, rm, rv, weight, bias = _args(shape, dtype, axis, True)
    assert _kernels.train_fast(x, rm, rv, weight, bias, 0.1, 1e-5, axis, None, None,
                               "propagate", None, True) is not None, "not taken"
    fast, full = _train_both_ways(shape, dtype, axis)
    for got, want in zip(fast, full):
        np.testing.assert_array_equal(got, want)
    ref = reference.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5, axis=axis)
    assert_output_close(fast[0], ref.y, dtype)


@pytest.mark.parametrize("options", [
    dict(momentum=0.3, activation="relu"), dict(decay=0.99), dict(unbiased_running_var=False),
    dict(nonfinite="skip_update"), dict(num_threads=2), dict(running=False),
])
def test_train_fast_path_options(options):
    options = dict(options)
    running = options.pop("running", True)
    fast, full = _train_both_ways((6, 4, 9), np.float32, 1, running=running, **options)
    for got, want in zip(fast, full):
        np.testing.assert_array_equal(got, want)


def test_train_fast_path_nonfinite_raise_leaves_running_stats():
    x, rm, rv, weight, bias = _args((4, 3, 5), np.float32, 1, True)
    x[1, 2, 3] = np.nan
    before = rm.copy(), rv.copy()
    assert _kernels.train_fast(x, rm, rv, weight, bias, 0.1, 1e-5, 1, None, None, "raise",
                               None, True) is not None, "not taken"
    with pytest.raises(FloatingPointError, match="channel"):
        bncore.batch_norm(x, rm, rv, weight, bias, True, nonfinite="raise")
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])


def _train_declined(**changes):
    return _declined(_entry=_kernels.train_fast, **changes)


def _shared_running(call):
    call["running_var"] = call["running_mean"]
    return call["running_mean"]


@pytest.mark.parametrize("changes", [
    dict(running_mean=None), dict(running_var=None),
    dict(running_mean=lambda c: _read_only(c["running_mean"])),
    dict(running_var=lambda c: np.repeat(c["running_var"], 2)[::2]),
    dict(running_mean=_shared_running),
    dict(x=lambda c: c["x"][:1]),          # one value per channel
    dict(out=lambda c: _over(c, "running_var")),
    dict(eps=np.float64(1e-5)), dict(momentum=-0.5), dict(nonfinite="sometimes"),
])
def test_uncertain_training_calls_go_to_the_full_path(changes):
    assert not _train_declined()
    assert not _train_declined(running_mean=None, running_var=None)
    assert _train_declined(**changes)


# --------------------------------------------------------------------------
# The backward's fast path (_kernels.backward_fast): the same contract. The
# full path is reached with the axis as a NumPy integer, the same value.

def _backward_args(shape, dtype, axis, affine, seed=0):
    x, _, _, weight, bias = _args(shape, dtype, axis, affine, seed)
    dy = make_input(shape, dtype, axis, kind="normal", seed=seed + 1)
    _, mean, invstd = bncore.batch_norm(x, weight=weight, bias=bias, training=True,
                                        axis=axis, return_stats=True)
    return dy, x, mean, invstd, weight, bias


def _backward_both_ways(dy, x, mean, invstd, weight, bias, **kwargs):
    axis = kwargs.pop("axis", 1)
    out = kwargs.pop("out", None)
    full_out = None if out is None else out.copy()
    fast = bncore.batch_norm_backward(dy.copy(), x.copy(), mean, invstd, weight, bias,
                                      axis=axis, out=out, **kwargs)
    full = bncore.batch_norm_backward(dy.copy(), x.copy(), mean, invstd, weight, bias,
                                      axis=np.int64(axis), out=full_out, **kwargs)
    return fast, full


@pytest.mark.parametrize("shape", [(2, 64), (2, 3), (8, 32, 14, 14), (4, 5, 7), (3, 6, 2, 5),
                                   (2, 8, 40000)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_backward_fast_path_matches_full_path_and_reference(shape, dtype, axis, training,
                                                            activation):
    dy, x, mean, invstd, weight, bias = _backward_args(shape, dtype, axis, True)
    assert _kernels.backward_fast(dy, x, mean, invstd, weight, bias, training, axis, None,
                                  None, activation) is not None, "not taken"
    fast, full = _backward_both_ways(dy, x, mean, invstd, weight, bias, axis=axis,
                                     training=training, activation=activation)
    for got, want in zip(fast, full):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    if activation is None:
        ref = reference.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                            axis=axis)
        for got, want in zip(fast, ref):
            assert_output_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_fast_path_out_and_in_place(dtype):
    dy, x, mean, invstd, weight, bias = _backward_args((8, 32, 14, 14), dtype, 1, True)
    want, _ = _backward_both_ways(dy, x, mean, invstd, weight, bias)
    out = np.full_like(x, np.nan)
    got = bncore.batch_norm_backward(dy, x, mean, invstd, weight, bias, out=out)
    assert got[0] is out
    for operand in ("grad_output", "input"):
        dy_copy, x_copy = dy.copy(), x.copy()
        target = dy_copy if operand == "grad_output" else x_copy
        in_place = bncore.batch_norm_backward(dy_copy, x_copy, mean, invstd, weight, bias,
                                              out=target)
        assert in_place[0] is target, operand
        for a, b in zip(in_place, want):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def _backward_declined(**changes):
    """Whether backward_fast declines a valid small call with some arguments
    changed."""
    dy, x, mean, invstd, weight, bias = _backward_args((4, 16), np.float32, 1, True)
    call = dict(dy=dy, x=x, mean=mean, invstd=invstd, weight=weight, bias=bias, training=True,
                axis=1, out=None, num_threads=None, activation=None)
    for name, change in changes.items():
        call[name] = change(call) if callable(change) else change
    return _kernels.backward_fast(*call.values()) is None


def _stats_over(call, name):
    """An out= whose memory holds the second half of the float64 (C,) array
    `name`."""
    buffer = np.empty(16 + 32, np.float64)
    call[name] = buffer[:16]
    call[name][:] = 1.0
    return buffer[8:].view(np.float32)[:64].reshape(4, 16)


def _shifted_dy(call):
    """An out= sharing all but one row with a dy of the same values."""
    call["dy"], out = _shifted_view(call["dy"])
    return out


@pytest.mark.parametrize("changes", [
    dict(dy=lambda c: c["dy"].astype(np.float64)),
    dict(dy=lambda c: c["dy"][:2]),
    dict(dy=lambda c: c["dy"].reshape(4, 16, 1)),
    dict(dy=lambda c: np.asfortranarray(c["dy"].reshape(4, 4, 4)).reshape(4, 16, order="A")),
    dict(dy=lambda c: c["dy"].tolist()),
    dict(x=lambda c: c["x"].astype(np.float16)),
    dict(x=lambda c: c["x"][:, ::2]),
    dict(mean=None), dict(invstd=None),
    dict(mean=lambda c: c["mean"].astype(np.float32)),
    dict(invstd=lambda c: c["invstd"][:-1]),
    dict(invstd=lambda c: c["invstd"].reshape(1, 16)),
    dict(mean=lambda c: c["mean"].tolist()),
    dict(weight=lambda c: c["weight"].tolist()),
    dict(training=1), dict(training=np.True_), dict(training=None),
    dict(axis=2), dict(axis=np.int64(1)), dict(axis=True),
    dict(num_threads=0), dict(num_threads=2.0),
    dict(activation="gelu"),
    dict(activation="relu", out=lambda c: c["x"]),
    dict(activation="relu", out=lambda c: c["x"].view()),
    dict(out=lambda c: np.empty((4, 16), np.float64)),
    dict(out=lambda c: _read_only(np.empty((4, 16), np.float32))),
    dict(out=_shifted_dy),
    dict(out=lambda c: _stats_over(c, "invstd")),
])
def test_uncertain_backward_calls_go_to_the_full_path(changes):
    assert not _backward_declined()
    assert not _backward_declined(out=lambda c: c["dy"])
    assert not _backward_declined(training=False, activation="relu", num_threads=2)
    assert _backward_declined(**changes)


def test_backward_shifted_overlap_is_refused_by_the_full_path():
    dy, x, mean, invstd, weight, bias = _backward_args((4, 16), np.float32, 1, True)
    dy_view, out = _shifted_view(dy)
    with pytest.raises(ValueError, match="out overlaps grad_output"):
        bncore.batch_norm_backward(dy_view, x, mean, invstd, weight, bias, out=out)
    for out in (x, x.view()):
        with pytest.raises(ValueError, match="out must not be the input"):
            bncore.batch_norm_backward(dy, x, mean, invstd, weight, bias, out=out,
                                       activation="relu")


def test_layer_backward_takes_the_fast_path(monkeypatch):
    """A training layer's backward (the full path disabled here) gives the
    full path's gradients."""
    dy, x, _, _, weight, bias = _backward_args((8, 6), np.float32, 1, True)
    layer = bncore.BatchNorm(6)
    layer.weight[:], layer.bias[:] = weight, bias
    layer(x)
    want = layer.backward(dy)
    want_sums = layer.grad_weight.copy(), layer.grad_bias.copy()

    def no_full_path(*args, **kwargs):
        raise AssertionError("the layer took the full path")

    monkeypatch.setattr("bncore.functional._as_input", no_full_path)
    got = layer.backward(dy)
    monkeypatch.undo()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(layer.grad_weight, want_sums[0])
    np.testing.assert_array_equal(layer.grad_bias, want_sums[1])
