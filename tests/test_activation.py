"""The fused relu (forward and backward) and the split backward kernels.

The fused forward must give exactly max(batch_norm(x), 0): the same affine
arithmetic in the same pass, then the clamp. Its backward is checked against
the float64 reference (which applies the relu's gate from its definition)
and against PyTorch's autograd where installed.
"""

import numpy as np
import pytest
from conftest import (
    DTYPES,
    LARGE_LAYOUTS,
    LAYOUTS,
    assert_output_close,
    layout_id,
    make_input,
    make_params,
    n_channels,
)

import bncore
from bncore import _kernels, reference
from bncore.functional import _canonical_shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS + LARGE_LAYOUTS, ids=layout_id)
def test_fused_relu_is_the_clamped_output_bit_for_bit(layout, dtype, training):
    shape, axis = layout
    x = make_input(shape, dtype, axis, kind="normal")
    c = n_channels(shape, axis)
    weight, bias, mean, var = make_params(c, dtype)
    plain = bncore.batch_norm(x, mean, var, weight, bias, training=training, axis=axis)
    fused = bncore.batch_norm(x, mean.copy(), var.copy(), weight, bias, training=training,
                              axis=axis, activation="relu")
    np.testing.assert_array_equal(fused, np.where(plain < 0, 0, plain))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_relu_forward_and_backward_match_the_reference(layout, dtype, training):
    shape, axis = layout
    x = make_input(shape, dtype, axis, kind="normal")
    c = n_channels(shape, axis)
    weight, bias, mean, var = make_params(c, dtype)
    dy = make_input(shape, dtype, axis, kind="normal", seed=7)
    y, used_mean, invstd = bncore.batch_norm(
        x, mean.copy(), var.copy(), weight, bias, training=training, axis=axis,
        activation="relu", return_stats=True)
    want = reference.batch_norm(x, mean, var, weight, bias, training=training, axis=axis,
                                activation="relu")
    assert_output_close(y, want.y, dtype)
    grads = bncore.batch_norm_backward(dy, x, used_mean, invstd, weight, bias,
                                       training=training, axis=axis, activation="relu")
    want_grads = reference.batch_norm_backward(dy, x, want.mean, want.invstd, weight, bias,
                                               training=training, axis=axis,
                                               activation="relu")
    for got, expected in zip(grads, want_grads):
        assert_output_close(got, expected, dtype)


def test_relu_backward_differs_from_the_plain_one():
    """The gate matters: a check that would pass with the gate ignored is no check."""
    x = make_input((6, 3, 8), np.float64, 1, kind="normal")
    dy = make_input((6, 3, 8), np.float64, 1, kind="normal", seed=2)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    plain = bncore.batch_norm_backward(dy, x, mean, invstd)
    gated = bncore.batch_norm_backward(dy, x, mean, invstd, activation="relu")
    assert not np.allclose(plain[0], gated[0])
    assert not np.allclose(plain[2], gated[2])
    # With a bias that puts every value above 0, the relu lets everything through.
    shifted = bncore.batch_norm_backward(dy, x, mean, invstd, None, np.full(3, 100.0),
                                         activation="relu")
    for a, b in zip(plain, shifted):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", [((6, 4, 5), 1), ((8, 5, 3), -1), ((9, 6), 1)],
                         ids=layout_id)
def test_relu_matches_pytorch_autograd(layout, training):
    torch = pytest.importorskip("torch")
    shape, axis = layout
    x = make_input(shape, np.float64, axis, kind="normal")
    c = n_channels(shape, axis)
    weight, bias, mean, var = make_params(c, np.float64)
    dy = make_input(shape, np.float64, axis, kind="normal", seed=5)
    y, used_mean, invstd = bncore.batch_norm(
        x, mean.copy(), var.copy(), weight, bias, training=training, axis=axis,
        activation="relu", return_stats=True)
    gx, gw, gb = bncore.batch_norm_backward(dy, x, used_mean, invstd, weight, bias,
                                            training=training, axis=axis,
                                            activation="relu")

    def channels_first(a):
        return torch.tensor(np.moveaxis(a, axis, 1).copy())

    xt = channels_first(x).requires_grad_(True)
    wt = torch.tensor(weight, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    yt = torch.relu(torch.nn.functional.batch_norm(
        xt, torch.tensor(mean), torch.tensor(var), wt, bt, training=training))
    yt.backward(channels_first(dy))
    np.testing.assert_allclose(np.moveaxis(yt.detach().numpy(), 1, axis), y, atol=1e-12)
    np.testing.assert_allclose(np.moveaxis(xt.grad.numpy(), 1, axis), gx, atol=1e-12)
    np.testing.assert_allclose(wt.grad.numpy(), gw, atol=1e-11)
    np.testing.assert_allclose(bt.grad.numpy(), gb, atol=1e-11)


def test_relu_keeps_nan_and_gates_it_out():
    x = np.array([[1.0, 2.0], [np.nan, -1.0], [3.0, 0.5]])
    y = bncore.batch_norm(x, np.zeros(2), np.ones(2), eps=0.0, activation="relu")
    assert np.isnan(y[1, 0])
    np.testing.assert_array_equal(y[:, 1], [2.0, 0.0, 0.5])
    dy = np.ones_like(x)
    gx, _, _ = bncore.batch_norm_backward(dy, x, np.zeros(2), np.ones(2), training=False,
                                          activation="relu")
    # The gate is (z > 0): NaN and negative values pass no gradient.
    np.testing.assert_array_equal(gx, [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])


@pytest.mark.parametrize("layout", LARGE_LAYOUTS, ids=layout_id)
def test_relu_is_bitwise_identical_for_any_thread_count(layout):
    shape, axis = layout
    x = make_input(shape, np.float32, axis, kind="normal")
    dy = make_input(shape, np.float32, axis, kind="normal", seed=4)
    c = n_channels(shape, axis)
    weight, bias, _, _ = make_params(c, np.float32)
    results = []
    for threads in (1, 2, 3):
        y, mean, invstd = bncore.batch_norm(x, None, None, weight, bias, training=True,
                                            axis=axis, activation="relu", return_stats=True,
                                            num_threads=threads)
        grads = bncore.batch_norm_backward(dy, x, mean, invstd, weight, bias, axis=axis,
                                           activation="relu", num_threads=threads)
        results.append((y, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_relu_backward_may_write_into_grad_output_but_not_input():
    x = make_input((5, 3, 4), np.float64, 1, kind="normal")
    dy = make_input((5, 3, 4), np.float64, 1, kind="normal", seed=1)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    want = bncore.batch_norm_backward(dy, x, mean, invstd, activation="relu")[0]
    dy_copy = dy.copy()
    got = bncore.batch_norm_backward(dy_copy, x, mean, invstd, activation="relu",
                                     out=dy_copy)[0]
    assert got is dy_copy
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="out must not be the input"):
        bncore.batch_norm_backward(dy, x, mean, invstd, activation="relu", out=x)


@pytest.mark.parametrize("activation", ["ReLU", "gelu", 1, True])
def test_unknown_activation_is_rejected(activation):
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        bncore.batch_norm(x, training=True, activation=activation)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        bncore.batch_norm_backward(x, x, np.zeros(2), np.ones(2), activation=activation)


# --------------------------------------------------------------------------
# The split backward: grad_sums then grad_input give what backward gives.

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS + LARGE_LAYOUTS, ids=layout_id)
def test_split_backward_equals_the_fused_one_bit_for_bit(layout, dtype):
    shape, axis = layout
    x = make_input(shape, dtype, axis, kind="normal")
    dy = make_input(shape, dtype, axis, kind="normal", seed=9)
    c = n_channels(shape, axis)
    weight = make_params(c, dtype)[0]
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    want_dx, want_gw, want_gb = bncore.batch_norm_backward(dy, x, mean, invstd, weight,
                                                           axis=axis)
    outer, channels, inner = _canonical_shape(x.shape, axis % x.ndim)
    xs = np.ascontiguousarray(x)
    dys = np.ascontiguousarray(dy)
    sum_dy, sum_dev = np.empty(c), np.empty(c)
    _kernels.grad_sums(xs, dys, outer, channels, inner, mean, sum_dy, sum_dev, 2)
    np.testing.assert_array_equal(sum_dy.astype(dtype), want_gb)
    np.testing.assert_allclose(sum_dev * invstd, want_gw, rtol=1e-6, atol=1e-9)
    dx = np.empty_like(xs)
    _kernels.grad_input(xs, dys, dx, outer, channels, inner, mean, invstd, weight, sum_dy,
                        sum_dev, float(outer * inner), 3)
    np.testing.assert_array_equal(dx, want_dx)


def test_grad_input_uses_the_given_sums_and_count():
    """Sums from a larger (global) batch: dx follows the formula with them."""
    x = make_input((6, 2, 5), np.float64, 1, kind="normal")
    dy = make_input((6, 2, 5), np.float64, 1, kind="normal", seed=3)
    mean, invstd = np.array([0.1, -0.2]), np.array([1.5, 0.7])
    weight = np.array([2.0, -1.0])
    sum_dy, sum_dev, count = np.array([3.0, -4.0]), np.array([0.5, 2.5]), 90.0
    dx = np.empty_like(x)
    _kernels.grad_input(x, dy, dx, 6, 2, 5, mean, invstd, weight, sum_dy, sum_dev, count, 1)
    col = (None, slice(None), None)
    k = (weight * invstd)[col]
    want = k * (dy - (sum_dy / count)[col]
                - (x - mean[col]) * (invstd**2 * sum_dev / count)[col])
    np.testing.assert_allclose(dx, want, rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="count must be positive"):
        _kernels.grad_input(x, dy, dx, 6, 2, 5, mean, invstd, weight, sum_dy, sum_dev, 0.0, 1)


# --------------------------------------------------------------------------
# Conventions of the functional API.

@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("decay", [None, 0.99, 0.9])
def test_running_update_conventions_match_the_reference(decay, unbiased):
    x = make_input((12, 3, 5), np.float64, 1)
    _, _, mean, var = make_params(3)
    got_mean, got_var = mean.copy(), var.copy()
    bncore.batch_norm(x, got_mean, got_var, training=True, decay=decay,
                      unbiased_running_var=unbiased)
    want = reference.batch_norm(x, mean, var, training=True, decay=decay,
                                unbiased_running_var=unbiased)
    np.testing.assert_allclose(got_mean, want.running_mean, rtol=1e-12)
    np.testing.assert_allclose(got_var, want.running_var, rtol=1e-12)


def test_keras_convention_by_its_formula():
    """Keras: moving = moving * momentum + batch * (1 - momentum), biased variance."""
    x = np.random.default_rng(0).standard_normal((50, 4)) * 2 + 1
    moving_mean, moving_var = np.full(4, 0.5), np.full(4, 2.0)
    bncore.batch_norm(x, moving_mean, moving_var, training=True, decay=0.99,
                      unbiased_running_var=False)
    np.testing.assert_allclose(moving_mean, 0.5 * 0.99 + x.mean(axis=0) * 0.01, rtol=1e-14)
    np.testing.assert_allclose(moving_var, 2.0 * 0.99 + x.var(axis=0) * 0.01, rtol=1e-14)


def test_decay_and_momentum_are_exclusive_and_checked():
    x = np.ones((4, 2))
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.raises(ValueError, match="not both"):
        bncore.batch_norm(x, rm, rv, training=True, momentum=0.2, decay=0.9)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        bncore.batch_norm(x, rm, rv, training=True, decay=1.5)
    with pytest.raises(TypeError, match="decay must be a real number"):
        bncore.batch_norm(x, rm, rv, training=True, decay="0.9")
    for not_a_bool in (np.ones(2), "False", 0):
        with pytest.raises(TypeError, match="unbiased_running_var must be True or False"):
            bncore.batch_norm(x, rm, rv, training=True, unbiased_running_var=not_a_bool)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


# --------------------------------------------------------------------------
# fold_scale_shift

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fold_scale_shift_reproduces_eval_batch_norm(dtype):
    x = make_input((7, 4, 6), dtype, 1, kind="normal")
    weight, bias, mean, var = make_params(4, dtype)
    scale, shift = bncore.fold_scale_shift(mean, var, weight, bias, eps=1e-3)
    assert scale.dtype == shift.dtype == np.float64
    folded = x.astype(np.float64) * scale[:, None] + shift[:, None]
    want = reference.batch_norm(x, mean, var, weight, bias, eps=1e-3).y
    np.testing.assert_allclose(folded, want, rtol=1e-12, atol=1e-12)
    plain_scale, plain_shift = bncore.fold_scale_shift(mean, var)
    mean64, var64 = mean.astype(np.float64), var.astype(np.float64)
    np.testing.assert_allclose(plain_scale, 1 / np.sqrt(var64 + 1e-5), rtol=1e-15)
    np.testing.assert_allclose(plain_shift, -mean64 * plain_scale, rtol=1e-15)


def test_fold_scale_shift_rejects_bad_arguments():
    with pytest.raises(ValueError, match="running_mean must be 1-D"):
        bncore.fold_scale_shift(np.zeros((2, 2)), np.ones(4))
    with pytest.raises(ValueError, match="running_var has shape"):
        bncore.fold_scale_shift(np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="weight has shape"):
        bncore.fold_scale_shift(np.zeros(3), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="eps must be"):
        bncore.fold_scale_shift(np.zeros(3), np.ones(3), eps=-1.0)
    with pytest.raises(TypeError, match="running_var"):
        bncore.fold_scale_shift(np.zeros(3), None)


# --------------------------------------------------------------------------
# Streaming stores (outputs of 16 MB and more) take separate code paths, in
# which the relu and its gate are applied to whole cache lines: force them
# on small arrays.

@pytest.fixture
def streaming():
    previous = _kernels.set_stream_min_bytes(0)
    yield
    _kernels.set_stream_min_bytes(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", [((3, 5, 77), 1), ((40, 13), 1), ((6, 7, 3), -1),
                                    ((2, 3, 1030), 1)], ids=layout_id)
def test_streaming_paths_give_the_same_bits(layout, dtype, streaming):
    shape, axis = layout
    x = make_input(shape, dtype, axis, kind="normal")
    x.flat[::17] = np.nan
    dy = make_input(shape, dtype, axis, kind="normal", seed=6)
    c = n_channels(shape, axis)
    weight, bias, mean, var = make_params(c, dtype)
    streamed = []
    for stream_min in (0, 1 << 62):
        _kernels.set_stream_min_bytes(stream_min)
        y = bncore.batch_norm(x, mean, var, weight, bias, axis=axis)
        fused = bncore.batch_norm(x, mean, var, weight, bias, axis=axis, activation="relu")
        gate = bncore.batch_norm_backward(dy, x, mean.astype(np.float64),
                                          1 / np.sqrt(var.astype(np.float64) + 1e-5),
                                          weight, bias, training=False, axis=axis,
                                          activation="relu")[0]
        np.testing.assert_array_equal(fused, np.where(y < 0, 0, y))
        streamed.append((y, fused, gate))
    for a, b in zip(*streamed):
        np.testing.assert_array_equal(a, b)
    y, _, gate = streamed[0]
    # In eval the input gradient is dy * weight * invstd where the gate is open.
    scale = weight * (1 / np.sqrt(var.astype(np.float64) + 1e-5))
    shape_c = [1] * len(shape)
    shape_c[axis] = c
    want = np.where(y > 0, dy * scale.reshape(shape_c), 0)
    np.testing.assert_allclose(gate, want, rtol=4 * np.finfo(dtype).eps, atol=0)
    assert (gate == 0).sum() == (y <= 0).sum() + np.isnan(y).sum()
