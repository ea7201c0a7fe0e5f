"""The backward pass: finite differences, PyTorch autograd, threads, bad input.

The finite-difference oracle is independent of any formula: the gradient of
L = sum(G * batch_norm(x)) is estimated by perturbing each input value and
re-running the float64 forward.
"""

import numpy as np
import pytest

import bncore

# (shape, feature axis): (N, C), (N, C, L), NCHW, NCDHW, channels-last, and a
# run long enough (inner >= 32) for the planar loop order.
LAYOUTS = [
    ((6, 3), 1),
    ((4, 3, 5), 1),
    ((3, 2, 4, 3), 1),
    ((2, 3, 2, 2, 3), 1),
    ((4, 3, 2, 3), -1),
    ((2, 2, 40), 1),
]


def _loss_and_grads(x, weight, bias, training, axis, upstream, mean=None, var=None):
    """Forward in float64, L = sum(upstream * y), and bncore's gradients."""
    channels = x.shape[axis]
    if training:
        y, used_mean, invstd = bncore.batch_norm(
            x, None, None, weight, bias, training=True, axis=axis, return_stats=True)
    else:
        y, used_mean, invstd = bncore.batch_norm(
            x, mean, var, weight, bias, training=False, axis=axis, return_stats=True)
    grads = bncore.batch_norm_backward(upstream, x, used_mean, invstd, weight,
                                       training=training, axis=axis)
    assert used_mean.shape == invstd.shape == (channels,)
    return float(np.sum(upstream * y)), grads


def _numeric_gradient(f, array, step=1e-6):
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        upper = f()
        array[index] = saved - step
        lower = f()
        array[index] = saved
        grad[index] = (upper - lower) / (2 * step)
    return grad


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradients_match_central_differences(shape, axis, training, affine):
    rng = np.random.default_rng(abs(hash((shape, axis, training, affine))) % 2**32)
    x = rng.standard_normal(shape) * 2 + 3
    channels = shape[axis]
    weight = rng.uniform(0.5, 2, channels) if affine else None
    bias = rng.standard_normal(channels) if affine else None
    mean = rng.standard_normal(channels)
    var = rng.uniform(0.5, 2, channels)
    upstream = rng.standard_normal(shape)

    def loss():
        return _loss_and_grads(x, weight, bias, training, axis, upstream, mean, var)[0]

    _, (grad_input, grad_weight, grad_bias) = _loss_and_grads(
        x, weight, bias, training, axis, upstream, mean, var)
    # Central differences with step 1e-6 in float64 are good to ~1e-8 here.
    np.testing.assert_allclose(grad_input, _numeric_gradient(loss, x), atol=1e-6, rtol=1e-6)
    if affine:
        np.testing.assert_allclose(grad_weight, _numeric_gradient(loss, weight),
                                   atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(grad_bias, _numeric_gradient(loss, bias),
                                   atol=1e-6, rtol=1e-6)
    else:
        # Without affine parameters the sums are still the gradients with
        # respect to an implicit weight of 1 and bias of 0.
        ones, zeros = np.ones(channels), np.zeros(channels)
        _, (_, expected_weight, expected_bias) = _loss_and_grads(
            x, ones, zeros, training, axis, upstream, mean, var)
        np.testing.assert_allclose(grad_weight, expected_weight, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad_bias, expected_bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_dtypes_follow_input(dtype):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(dtype)
    y, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    grad_input, grad_weight, grad_bias = bncore.batch_norm_backward(np.ones_like(x), x, mean,
                                                                   invstd)
    assert grad_input.dtype == grad_weight.dtype == grad_bias.dtype == dtype
    assert grad_input.shape == x.shape and grad_weight.shape == (4,)


def test_in_place_gradient_into_grad_output_and_input():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 6, 40))
    dy = rng.standard_normal(x.shape)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    expected = bncore.batch_norm_backward(dy, x, mean, invstd)
    into_dy = dy.copy()
    result = bncore.batch_norm_backward(into_dy, x, mean, invstd, out=into_dy)
    assert result[0] is into_dy
    np.testing.assert_array_equal(into_dy, expected[0])
    into_x = x.copy()
    bncore.batch_norm_backward(dy, into_x, mean, invstd, out=into_x)
    np.testing.assert_array_equal(into_x, expected[0])


def test_eval_gradient_ignores_non_finite_input():
    # With frozen statistics dx = dy * weight * invstd: the input does not
    # enter, so a NaN in it must not reach dx.
    x = np.ones((4, 3))
    x[0, 0] = np.nan
    dy = np.full_like(x, 2.0)
    dx, _, _ = bncore.batch_norm_backward(dy, x, np.zeros(3), np.full(3, 0.5), training=False)
    np.testing.assert_array_equal(dx, np.ones_like(x))


# -- threads --------------------------------------------------------------

# Large enough (> 65536 values) that the kernels really run in parallel, for
# both loop orders and both planar strategies (few channels: chunks; many
# small channels: channel by channel); and planar maps of 16-64 Ki values,
# which the planar backward alone takes on several threads
# (BACKWARD_WORK_PER_VALUE).
THREAD_LAYOUTS = [((16, 3, 64, 64), 1), ((4096, 24), 1), ((64, 64, 8, 8), 1),
                  ((32, 16, 16, 8), -1), ((8, 32, 14, 14), 1), ((3, 32, 16, 16), 1)]


@pytest.mark.parametrize("shape, axis", THREAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_backward_bitwise_identical_for_any_thread_count(shape, axis, dtype, training):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 3 + 100).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    weight = rng.standard_normal(channels)
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    results = [bncore.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                          axis=axis, num_threads=n)
               for n in (1, 2, 3, 4, 8)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


# -- bad input ------------------------------------------------------------

def _valid_call():
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    return dict(grad_output=np.ones_like(x), input=x, mean=mean, invstd=invstd)


@pytest.mark.parametrize("change, error, name", [
    (lambda a: a.update(grad_output=np.ones((4, 2), np.float32)), ValueError, "grad_output"),
    (lambda a: a.update(grad_output=np.ones((4, 3), np.float64)), TypeError, "grad_output"),
    (lambda a: a.update(grad_output=np.ones((4, 3), np.int32)), TypeError, "grad_output"),
    (lambda a: a.update(mean=np.zeros(2)), ValueError, "mean"),
    (lambda a: a.update(mean=None), TypeError, "mean"),
    (lambda a: a.update(invstd=np.ones((3, 1))), ValueError, "invstd"),
    (lambda a: a.update(weight=np.ones(4)), ValueError, "weight"),
    (lambda a: a.update(input=np.ones((4, 3), np.int64)), TypeError, "input"),
    (lambda a: a.update(axis=2), ValueError, "axis"),
    (lambda a: a.update(num_threads=0), ValueError, "num_threads"),
    (lambda a: a.update(out=np.empty((4, 3), np.float64)), TypeError, "out"),
    (lambda a: a.update(out=np.empty((3, 4), np.float32).T), ValueError, "out"),
])
def test_bad_input_names_the_argument(change, error, name):
    arguments = _valid_call()
    change(arguments)
    with pytest.raises(error, match=name):
        bncore.batch_norm_backward(**arguments)


def test_out_overlapping_grad_output_is_refused_and_nothing_written():
    arguments = _valid_call()
    base = np.zeros(13, np.float32)
    arguments["grad_output"] = base[:12].reshape(4, 3)
    out = base[1:].reshape(4, 3)
    with pytest.raises(ValueError, match="overlaps grad_output"):
        bncore.batch_norm_backward(**arguments, out=out)
    assert not base.any()


# -- modules --------------------------------------------------------------

def test_module_backward_matches_functional_and_sets_parameter_gradients():
    rng = np.random.default_rng(3)
    layer = bncore.BatchNorm2d(3, dtype=np.float64)
    layer.weight[:] = rng.uniform(0.5, 2, 3)
    x = rng.standard_normal((4, 3, 5, 5))
    dy = rng.standard_normal(x.shape)
    layer(x)
    grad_input = layer.backward(dy)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    expected = bncore.batch_norm_backward(dy, x, mean, invstd, layer.weight)
    np.testing.assert_array_equal(grad_input, expected[0])
    np.testing.assert_array_equal(layer.grad_weight, expected[1])
    np.testing.assert_array_equal(layer.grad_bias, expected[2])


def test_module_backward_in_eval_mode_uses_frozen_statistics():
    layer = bncore.BatchNorm1d(2, dtype=np.float64).eval()
    layer.running_var[:] = [4.0, 0.25]
    layer.weight[:] = [3.0, 1.0]
    x = np.random.default_rng(4).standard_normal((5, 2))
    layer(x)
    grad_input = layer.backward(np.ones_like(x))
    np.testing.assert_allclose(grad_input[0], 1.0 * np.array([3.0, 1.0]) / np.sqrt(
        np.array([4.0, 0.25]) + 1e-5), rtol=1e-12)


def test_module_without_affine_has_no_parameter_gradients():
    layer = bncore.BatchNorm1d(2, affine=False, dtype=np.float64)
    x = np.random.default_rng(5).standard_normal((5, 2))
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.grad_weight is None and layer.grad_bias is None


def test_module_backward_errors():
    layer = bncore.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((4, 3), np.float32))
    layer(np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="grad_output has shape"):
        layer.backward(np.ones((5, 3), np.float32))


# -- PyTorch --------------------------------------------------------------

@pytest.mark.parametrize("shape, axis", [((8, 5), 1), ((4, 3, 6, 6), 1), ((4, 6, 6, 3), -1),
                                         ((2, 4, 48), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_torch_autograd(shape, axis, dtype, training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)

    _, mean, invstd = bncore.batch_norm(x, running_mean.copy(), running_var.copy(), weight,
                                        bias, training=training, axis=axis, return_stats=True)
    grad_input, grad_weight, grad_bias = bncore.batch_norm_backward(
        dy, x, mean, invstd, weight, training=training, axis=axis)

    tx = torch.tensor(np.moveaxis(x, axis, 1).copy(), requires_grad=True)
    tw = torch.tensor(weight, requires_grad=True)
    tb = torch.tensor(bias, requires_grad=True)
    ty = torch.nn.functional.batch_norm(tx, torch.tensor(running_mean),
                                        torch.tensor(running_var), tw, tb, training=training)
    ty.backward(torch.tensor(np.moveaxis(dy, axis, 1).copy()))
    # float32: PyTorch sums in float32, bncore in float64; the sums of a few
    # hundred unit terms agree to ~1e-5 relative.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.moveaxis(grad_input, axis, 1), tx.grad.numpy(), **tol)
    np.testing.assert_allclose(grad_weight, tw.grad.numpy(), **tol)
    np.testing.assert_allclose(grad_bias, tb.grad.numpy(), **tol)


def test_batchnorm2d_training_steps_match_torch():
    """A few SGD steps of a BatchNorm2d on random data, bncore against PyTorch:
    the parameters and running statistics follow the same trajectory."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    ours = bncore.BatchNorm2d(4, dtype=np.float64)
    theirs = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    target = rng.standard_normal((6, 4, 5, 5))
    lr = 0.1
    for step in range(5):
        x = rng.standard_normal((6, 4, 5, 5)) * (step + 1) + step
        y = ours(x)
        ours_grad = 2 * (y - target) / y.size          # d mean((y - t)^2) / dy
        ours.backward(ours_grad)
        ours.weight -= lr * ours.grad_weight
        ours.bias -= lr * ours.grad_bias

        theirs.zero_grad()
        loss = torch.mean((theirs(torch.tensor(x)) - torch.tensor(target)) ** 2)
        loss.backward()
        with torch.no_grad():
            for parameter in theirs.parameters():
                parameter -= lr * parameter.grad
    state = theirs.state_dict()
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_allclose(getattr(ours, key), state[key].numpy(), rtol=1e-10,
                                   atol=1e-12)
    assert ours.num_batches_tracked == int(state["num_batches_tracked"])


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_reference(shape, axis, dtype, training):
    """Against bncore.reference's float64 twin (fsum-exact sums)."""
    from bncore import reference

    rng = np.random.default_rng(10)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 2, shape[axis])
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    got = bncore.batch_norm_backward(dy, x, mean, invstd, weight, training=training, axis=axis)
    want = reference.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                         axis=axis)
    # float32 results carry float32 rounding of unit-scale values; the sums
    # of a few dozen of them, a few float32 ulps.
    tol = 1e-11 if dtype == np.float64 else 2e-5
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, np.max(np.abs(w))))
