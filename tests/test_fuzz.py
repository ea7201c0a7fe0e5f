"""Fuzzing (hypothesis): random shapes (zeros and ones in any dimension),
axes of either sign, dtypes (valid and not), memory layouts (C, Fortran,
strided, negative strides, read-only), parameters and modes.

Every call of batch_norm, moments and batch_norm_backward must either match
the float64 oracle (bncore.reference, or the documented gradient formulas)
to conftest's tolerances, or raise TypeError / ValueError - exactly when
one of the documented rules is broken, and with that rule's class. It
never modifies what it was not asked to: the input only with out=input,
the running buffers only in training, weight and bias never; and a call
that raises modifies nothing at all.
"""

import math
import os

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import bncore  # noqa: E402
from bncore import reference  # noqa: E402
from conftest import (  # noqa: E402
    assert_output_close,
    assert_stats_close,
    channel_condition,
    channel_spread,
    make_input,
)

#: 150 examples per test keep the default run at a few seconds; set
#: BNCORE_FUZZ_EXAMPLES=5000 (say) for a longer hunt.
SETTINGS = settings(max_examples=int(os.environ.get("BNCORE_FUZZ_EXAMPLES", "150")),
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

VALID = [np.float32, np.float64]
INVALID = [np.longdouble, np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128]
ORDERS = ["C", "F", "strided", "reversed"]


def _arrange(base, order, readonly):
    """base's values in the given memory layout (always a new array)."""
    if order == "C":
        x = base.copy()
    elif order == "F":
        x = np.asfortranarray(base)
        if x is base:
            x = base.copy(order="F")
    elif order == "strided":  # every other element of a wider array
        shape = base.shape[:-1] + (2 * base.shape[-1],) if base.ndim else base.shape
        wide = np.zeros(shape, base.dtype)
        if base.ndim:
            wide[..., ::2] = base
            x = wide[..., ::2]
        else:
            x = wide
            x[...] = base
    elif order == "reversed":  # negative strides along the first axis
        x = np.ascontiguousarray(base[::-1])[::-1] if base.ndim else base.copy()
    else:  # pragma: no cover
        raise AssertionError(order)
    if readonly:
        x.flags.writeable = False
    return x


def _sometimes(draw, percent):
    # Hypothesis leans towards the first choice (and st.integers towards
    # small values), so the usual case comes first.
    return draw(st.sampled_from([False] * (100 - percent) + [True] * percent))


@st.composite
def _data(draw, valid_only=False):
    """(x, axis, seed): x of a random shape, dtype, layout and read-only
    flag. About one draw in five breaks a rule (dtype, rank or axis)."""
    if _sometimes(draw, 6):
        ndim = draw(st.integers(0, 1))
    else:
        ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 7]),
                                min_size=ndim, max_size=ndim)))
    if not valid_only and _sometimes(draw, 10):
        dtype = draw(st.sampled_from(INVALID))
    else:
        dtype = draw(st.sampled_from(VALID))
    if ndim and _sometimes(draw, 6):
        axis = draw(st.sampled_from([-ndim - 1, ndim, ndim + 3]))  # out of range
    else:
        axis = draw(st.integers(-max(ndim, 1), max(ndim, 1) - 1))
    kind = draw(st.sampled_from(["adversarial", "adversarial", "normal"]))
    seed = draw(st.integers(0, 2**16))
    order = draw(st.sampled_from(ORDERS))
    readonly = _sometimes(draw, 25)
    if ndim >= 2 and -ndim <= axis < ndim:
        base = make_input(shape, np.float64, axis, kind=kind, seed=seed)
    else:
        base = np.random.default_rng(seed).standard_normal(shape)
    with np.errstate(over="ignore", invalid="ignore"):
        base = base.astype(dtype)
    return _arrange(base, order, readonly), axis, seed


def _canonical(shape, axis):
    """(C, values per channel) or None when the shape/axis are invalid."""
    ndim = len(shape)
    if ndim < 2 or not -ndim <= axis < ndim:
        return None
    ax = axis % ndim
    c = shape[ax]
    return c, math.prod(shape) // c if c else math.prod(shape[:ax] + shape[ax + 1:])


def _snapshot(*arrays):
    return [None if a is None else (np.array(a, copy=True), a.dtype) for a in arrays]


def _assert_unchanged(arrays, snapshots, names):
    for a, snap, name in zip(arrays, snapshots, names):
        if a is None:
            continue
        before, dtype = snap
        assert a.dtype == dtype
        np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8),
                                      np.ascontiguousarray(before).view(np.uint8),
                                      err_msg=f"{name} was modified")


def _call(fn, expected_errors):
    """Run fn; it must raise one of expected_errors exactly when that set is
    not empty. Returns (raised, result)."""
    try:
        result = fn()
    except (TypeError, ValueError) as e:
        assert expected_errors, f"unexpected {type(e).__name__}: {e}"
        assert isinstance(e, tuple(expected_errors)), (
            f"raised {type(e).__name__} ({e}); expected one of {expected_errors}")
        return True, None
    assert not expected_errors, f"expected one of {expected_errors}, nothing raised"
    return False, result


def _vector(draw, c, kind, seed):
    """A (C,) parameter: None, float32 / float64 values, or an int array."""
    if kind is None:
        return None
    rng = np.random.default_rng(seed)
    if kind == "int":
        return np.ones(c, np.int64)
    return rng.uniform(0.5, 2.0, c).astype(kind)


def _running(c, dtype, layout, seed):
    rng = np.random.default_rng(seed)
    rm = rng.normal(0, 1, c)
    rv = rng.uniform(0.5, 2, c)
    out = []
    for v in (rm, rv):
        if dtype == "int":
            a = np.ones(c, np.int64)
        elif layout == "strided":
            wide = np.zeros(2 * c, dtype)
            wide[::2] = v
            a = wide[::2]
        else:
            a = v.astype(dtype)
        if layout == "readonly":
            a.flags.writeable = False
        out.append(a)
    return out


@SETTINGS
@given(
    data=_data(),
    training=st.booleans(),
    # the usual choices first: Hypothesis leans towards the first
    weight_kind=st.sampled_from([np.float64] * 7 + [np.float32] * 6 + [None] * 6 + ["int"]),
    bias_kind=st.sampled_from([np.float64, np.float32, None]),
    running_kind=st.sampled_from([np.float64] * 8 + [np.float32] * 8 + [None] * 3 + ["int"]),
    running_layout=st.sampled_from(["plain"] * 8 + ["strided", "readonly"]),
    momentum=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    out_kind=st.sampled_from([None] * 4 + ["new"] * 2 + ["input"]),
    nonfinite=st.sampled_from(["propagate", "skip_update", "raise"]),
    num_threads=st.sampled_from([None, 1, 2, 3]),
)
def test_batch_norm_fuzz(data, training, weight_kind, bias_kind, running_kind, running_layout,
                         momentum, eps, out_kind, nonfinite, num_threads):
    x, axis, seed = data
    canon = _canonical(x.shape, axis)
    c = canon[0] if canon else (x.shape[1] if x.ndim >= 2 else 1)
    weight = _vector(None, c, weight_kind, seed + 1)
    bias = _vector(None, c, bias_kind, seed + 2)
    rm = rv = None
    if running_kind is not None:
        rm, rv = _running(c, running_kind, running_layout, seed + 3)
    if out_kind == "input":
        out = x
    elif out_kind == "new":
        out = np.zeros(x.shape, x.dtype)
    else:
        out = None

    errors = set()
    if x.dtype not in VALID:
        errors.add(TypeError)
    if canon is None:
        errors.add(ValueError)
    elif training and canon[1] == 1:
        errors.add(ValueError)  # PyTorch: more than one value per channel
    if weight_kind == "int":
        errors.add(TypeError)
    if rm is None:
        if not training:
            errors.add(ValueError)
    else:
        if running_kind == "int":
            errors.add(TypeError)
        elif training and not all(a.flags.c_contiguous and a.flags.writeable
                                  for a in (rm, rv)):
            errors.add(ValueError)  # updated in place
    if out_kind == "input" and not (x.flags.c_contiguous and x.flags.writeable):
        errors.add(ValueError)

    arrays = [x, rm, rv, weight, bias, out]
    names = ["input", "running_mean", "running_var", "weight", "bias", "out"]
    before = _snapshot(*arrays)
    raised, result = _call(lambda: bncore.batch_norm(
        x, rm, rv, weight, bias, training, momentum, eps, axis=axis, out=out,
        num_threads=num_threads, return_stats=True, nonfinite=nonfinite), errors)
    if raised:
        _assert_unchanged(arrays, before, names)
        return

    y, mean, invstd = result
    _assert_unchanged([weight, bias], before[3:5], names[3:5])
    if out_kind != "input":
        _assert_unchanged([x], before[:1], names[:1])
    if out is not None:
        assert y is out
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    assert mean.shape == invstd.shape == (c,)
    assert mean.dtype == invstd.dtype == np.float64
    if not training:
        _assert_unchanged([rm, rv], before[1:3], names[1:3])

    x0 = before[0][0]  # the input as it was (out=input overwrote x)
    if c == 0 or canon[1] == 0:
        # degenerate: an empty output, NaN batch statistics, nothing updated
        assert y.size == 0
        if training:
            assert np.isnan(mean).all() and np.isnan(invstd).all()
            _assert_unchanged([rm, rv], before[1:3], names[1:3])
        else:
            np.testing.assert_array_equal(mean, rm.astype(np.float64))
        return

    rm0 = None if rm is None else before[1][0]  # the buffers as they were
    rv0 = None if rv is None else before[2][0]
    ref = reference.batch_norm(x0, rm0, rv0, weight, bias, training, momentum, eps,
                               axis=axis)
    dtype = x.dtype.type
    assert_output_close(y, ref.y, dtype)
    spread = channel_spread(x0, axis)
    cond = channel_condition(x0, axis)
    if training:
        assert_stats_close(mean, ref.mean, dtype, scale=spread, what="mean")
        assert_stats_close(invstd, ref.invstd, dtype, what="invstd", cond=cond)
        if rm is not None:
            worst = np.float32 if np.float32 in (dtype, rm.dtype.type) else np.float64
            assert_stats_close(rm, ref.running_mean, worst, scale=momentum * spread,
                               what="running_mean")
            assert_stats_close(rv, ref.running_var, worst, what="running_var", cond=cond)
    else:
        np.testing.assert_array_equal(mean, rm.astype(np.float64))
        assert_stats_close(invstd, ref.invstd, np.float64, what="invstd")


@SETTINGS
@given(data=_data(),
       ddof=st.sampled_from([0] * 6 + [1] * 4 + [2, 5, -1, 1.0, True]),
       num_threads=st.sampled_from([None, 1, 2]))
def test_moments_fuzz(data, ddof, num_threads):
    x, axis, _ = data
    canon = _canonical(x.shape, axis)
    errors = set()
    if x.dtype not in VALID:
        errors.add(TypeError)
    if canon is None:
        errors.add(ValueError)
    if isinstance(ddof, (bool, float)):
        errors.add(TypeError)
    elif ddof < 0:
        errors.add(ValueError)
    before = _snapshot(x)
    raised, result = _call(lambda: bncore.moments(x, axis=axis, ddof=ddof,
                                                  num_threads=num_threads), errors)
    _assert_unchanged([x], before, ["x"])
    if raised:
        return
    mean, var = result
    c, n = canon
    assert mean.shape == var.shape == (c,) and mean.dtype == var.dtype == np.float64
    if c == 0:
        return
    if n == 0:
        assert np.isnan(mean).all() and np.isnan(var).all()
        return
    want_mean, want_var = reference.moments(x, axis=axis, ddof=ddof)
    dtype = x.dtype.type
    assert_stats_close(mean, want_mean, dtype, scale=channel_spread(x, axis), what="mean")
    assert_stats_close(var, want_var, dtype, what="var", cond=channel_condition(x, axis))


def _backward_oracle(x, dy, mean, invstd, weight, training, axis):
    """The documented gradients, in float64, channel-first."""
    ax = axis % x.ndim
    c = x.shape[ax]
    xc = np.moveaxis(x.astype(np.float64), ax, 0).reshape(c, -1)
    dyc = np.moveaxis(dy.astype(np.float64), ax, 0).reshape(c, -1)
    n = xc.shape[1]
    w = np.ones(c) if weight is None else weight.astype(np.float64)
    col = (slice(None), None)
    xhat = (xc - mean[col]) * invstd[col]
    grad_weight = (dyc * xhat).sum(axis=1)
    grad_bias = dyc.sum(axis=1)
    if training:
        dxc = (w * invstd)[col] * (dyc - grad_bias[col] / n - xhat * (grad_weight / n)[col])
    else:
        dxc = dyc * (w * invstd)[col]
    moved = np.moveaxis(x, ax, 0).shape
    dx = np.moveaxis(dxc.reshape(moved), 0, ax)
    return dx, grad_weight, grad_bias


@SETTINGS
@given(data=_data(),
       dy_order=st.sampled_from(ORDERS),
       dy_dtype=st.sampled_from(["same"] * 9 + ["other"]),
       training=st.booleans(),
       weight_kind=st.sampled_from([None, np.float32, np.float64]),
       stats=st.sampled_from(["forward"] * 6 + ["random"] * 3 + ["missing"]),
       out_kind=st.sampled_from([None] * 4 + ["new", "new", "input", "grad_output"]),
       num_threads=st.sampled_from([None, 1, 2]))
def test_backward_fuzz(data, dy_order, dy_dtype, training, weight_kind, stats, out_kind,
                       num_threads):
    x, axis, seed = data
    canon = _canonical(x.shape, axis)
    c = canon[0] if canon else 1
    rng = np.random.default_rng(seed + 7)
    dy_type = x.dtype
    if dy_dtype == "other":
        dy_type = np.float64 if x.dtype == np.float32 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        dy = _arrange(rng.standard_normal(x.shape).astype(dy_type), dy_order, False)
    weight = _vector(None, c, weight_kind, seed + 8)
    if stats == "random" or (stats == "forward" and (canon is None or x.dtype not in VALID
                                                     or canon[1] < 2)):
        mean, invstd = rng.normal(0, 1, c), rng.uniform(0.5, 2, c)
    elif stats == "forward":
        _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    else:
        mean = invstd = None
    out = {"new": np.zeros(x.shape, x.dtype), "input": x, "grad_output": dy,
           None: None}[out_kind]

    errors = set()
    if x.dtype not in VALID:
        errors.add(TypeError)
    if dy.dtype != x.dtype:
        errors.add(TypeError)
    if canon is None:
        errors.add(ValueError)
    if mean is None:
        errors.add(TypeError)
    if out_kind in ("input", "grad_output") and not (out.flags.c_contiguous
                                                     and out.flags.writeable):
        errors.add(ValueError)
    if out_kind == "grad_output" and dy.dtype != x.dtype:
        errors.add(TypeError)

    arrays = [x, dy, mean, invstd, weight, out]
    names = ["input", "grad_output", "mean", "invstd", "weight", "out"]
    before = _snapshot(*arrays)
    raised, result = _call(lambda: bncore.batch_norm_backward(
        dy, x, mean, invstd, weight, training=training, axis=axis, out=out,
        num_threads=num_threads), errors)
    if raised:
        _assert_unchanged(arrays, before, names)
        return
    dx, grad_weight, grad_bias = result
    _assert_unchanged(arrays[2:5], before[2:5], names[2:5])
    if out_kind != "input":
        _assert_unchanged([x], before[:1], names[:1])
    if out_kind != "grad_output":
        _assert_unchanged([dy], before[1:2], names[1:2])
    if out is not None:
        assert dx is out
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.flags.c_contiguous
    assert grad_weight.shape == grad_bias.shape == (c,)
    assert grad_weight.dtype == grad_bias.dtype == x.dtype
    if x.size == 0:
        np.testing.assert_array_equal(grad_weight, 0)
        np.testing.assert_array_equal(grad_bias, 0)
        return
    want_dx, want_gw, want_gb = _backward_oracle(before[0][0], before[1][0], mean, invstd,
                                                 weight, training, axis)
    if x.dtype == np.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
    else:
        tol = dict(rtol=1e-9, atol=1e-9)
    # sums over n values of size |x - mean| * invstd: scale the absolute
    # tolerance with n and with how far the data lie from mean
    n = canon[1]
    size = max(1.0, float(np.abs(want_gw).max()), float(np.abs(want_gb).max()))
    np.testing.assert_allclose(grad_bias, want_gb, rtol=tol["rtol"], atol=tol["atol"] * n * size)
    np.testing.assert_allclose(grad_weight, want_gw, rtol=tol["rtol"],
                               atol=tol["atol"] * n * size)
    # dx: relative to the channel's largest term
    terms = np.abs(want_dx).max() + np.abs(before[1][0]).max() * float(
        np.max(np.abs(invstd) * (1 if weight is None else np.abs(weight))))
    np.testing.assert_allclose(dx, want_dx, rtol=tol["rtol"], atol=tol["atol"] * terms)
