"""The oracle itself: bncore.reference against NumPy, PyTorch's formulas and
hand-computed values, so that a wrong oracle cannot bless a wrong kernel."""

import numpy as np
import pytest

from bncore import reference
from conftest import LAYOUT_PARAMS, make_input, make_params, n_channels


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_moments_match_numpy(layout):
    shape, axis = layout
    x = make_input(shape, np.float64, axis, kind="normal", seed=600)
    ax = axis % len(shape)
    others = tuple(i for i in range(len(shape)) if i != ax)
    mean, var = reference.moments(x, axis=axis, ddof=1)
    np.testing.assert_allclose(mean, x.mean(axis=others), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(var, x.var(axis=others, ddof=1), rtol=1e-13)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_batch_norm_matches_numpy_formula(layout, training):
    shape, axis = layout
    x = make_input(shape, np.float64, axis, kind="normal", seed=601)
    ax = axis % len(shape)
    c = n_channels(shape, axis)
    others = tuple(i for i in range(len(shape)) if i != ax)
    bshape = [1] * len(shape)
    bshape[ax] = c
    w, b, rm, rv = make_params(c, np.float64, seed=601)
    args = (x.copy(), rm.copy(), rv.copy(), w.copy(), b.copy())
    res = reference.batch_norm(*args, training=training, momentum=0.25, eps=1e-3, axis=axis)
    for before, after in zip((x, rm, rv, w, b), args):
        np.testing.assert_array_equal(before, after)  # nothing mutated
    if training:
        mean, var = x.mean(axis=others), x.var(axis=others)
        n = x.size // c
        np.testing.assert_allclose(res.running_mean, 0.75 * rm + 0.25 * mean, rtol=1e-13)
        np.testing.assert_allclose(res.running_var, 0.75 * rv + 0.25 * var * n / (n - 1),
                                   rtol=1e-13)
    else:
        mean, var = rm, rv
        np.testing.assert_array_equal(res.running_mean, rm)
        np.testing.assert_array_equal(res.running_var, rv)
    want = ((x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-3) * w.reshape(bshape)
            + b.reshape(bshape))
    np.testing.assert_allclose(res.y, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(res.invstd, 1 / np.sqrt(var + 1e-3), rtol=1e-13)
    assert res.y.flags.c_contiguous and res.y.dtype == np.float64


def test_hand_computed():
    x = np.array([[1.0, -2.0], [3.0, -2.0], [5.0, -2.0]])
    res = reference.batch_norm(x, np.zeros(2), np.ones(2), training=True, momentum=0.5,
                               eps=0.0 + 1e-5)
    np.testing.assert_array_equal(res.mean, [3.0, -2.0])
    np.testing.assert_allclose(res.invstd, 1 / np.sqrt([8 / 3 + 1e-5, 1e-5]), rtol=1e-15)
    np.testing.assert_allclose(res.running_mean, [1.5, -1.0], rtol=1e-15)
    np.testing.assert_allclose(res.running_var, [0.5 + 0.5 * 4.0, 0.5], rtol=1e-15)
    np.testing.assert_array_equal(res.y[:, 1], 0.0)


def test_constant_channel_exact():
    x = np.full((7, 2, 3), 0.1)
    mean, var = reference.moments(x)
    np.testing.assert_array_equal(mean, 0.1)
    np.testing.assert_array_equal(var, 0.0)


def test_large_offset_exact():
    x = 1e8 + np.array([[-1.0], [0.0], [1.0], [2.0]])  # exactly representable
    mean, var = reference.moments(x, ddof=1)
    np.testing.assert_array_equal(mean, [1e8 + 0.5])
    np.testing.assert_array_equal(var, [5.0 / 3.0])


def test_training_output_centred_beyond_the_rounded_mean():
    """Two values whose spread is tiny against their mean (hypothesis found
    this pair): their exact deviations are +-(a - b) / 2, exact in float64,
    so y must be symmetric, and bncore (which centres with a two-part mean)
    must agree to float64's tolerance. Centred on the rounded mean alone,
    the oracle was off by 2e-10 of y and failed bncore's correct answer."""
    import bncore

    a, b = 7031.526015909107, 7031.521234949244
    x = np.array([[a, b]])
    half = (a - b) / 2                 # exact: Sterbenz, then a power of 2
    expected = np.array([[half, -half]]) / np.sqrt(half * half + 1e-5)
    res = reference.batch_norm(x, training=True, axis=0)
    np.testing.assert_array_equal(res.y[0, 0], -res.y[0, 1])
    np.testing.assert_allclose(res.y, expected, rtol=4e-16)
    np.testing.assert_allclose(bncore.batch_norm(x, training=True, axis=0), res.y,
                               rtol=1e-12, atol=1e-10)


def test_degenerate_counts():
    mean, var = reference.moments(np.zeros((0, 3)))
    assert np.isnan(mean).all() and np.isnan(var).all()
    mean, var = reference.moments(np.ones((1, 3)), ddof=1)
    assert np.isnan(var).all() and (mean == 1).all()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        reference.batch_norm(np.ones((1, 3)), training=True)
    res = reference.batch_norm(np.zeros((0, 3)), np.zeros(3), np.ones(3), training=True)
    assert res.y.shape == (0, 3) and np.isnan(res.mean).all()
    np.testing.assert_array_equal(res.running_var, 1.0)


def test_float32_input_is_used_exactly():
    x = make_input((5, 3, 4), np.float32, 1, seed=602)
    a = reference.moments(x)
    b = reference.moments(x.astype(np.float64))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_matches_torch_formula():
    torch = pytest.importorskip("torch")
    x = make_input((6, 3, 5), np.float64, 1, kind="normal", seed=603)
    w, b, rm, rv = make_params(3, np.float64, seed=603)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x), t_rm, t_rv, torch.from_numpy(w),
                                        torch.from_numpy(b), True, 0.3, 1e-4)
    res = reference.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-4)
    np.testing.assert_allclose(res.y, ty.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.running_mean, t_rm.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.running_var, t_rv.numpy(), rtol=1e-12)
