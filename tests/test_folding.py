"""bncore.folding: batch norm folded into linear and convolution weights.

The oracle is the unfused computation: the layer written here in plain NumPy
(a matrix product, a direct convolution and a direct transposed convolution
built from their definitions), followed by ``bncore.reference.batch_norm``
in float64. Where PyTorch is installed the folds are also held against
``torch.nn.utils.fusion`` and against PyTorch's own layers.
"""

import itertools
import string

import numpy as np
import pytest
from conftest import make_params
from numpy.lib.stride_tricks import sliding_window_view

import bncore
from bncore import reference
from bncore.folding import fold_into_conv, fold_into_linear, fold_preceding_into_linear

# --------------------------------------------------------------------------
# The unfused oracle.


def make_bn(channels, *, affine=True, eps=1e-5, dtype=np.float64, seed=0):
    """An eval-mode layer with random, non-trivial statistics and parameters."""
    bn = bncore.BatchNorm(channels, eps=eps, affine=affine, dtype=dtype).eval()
    weight, bias, running_mean, running_var = make_params(channels, dtype, seed)
    bn.running_mean[...] = running_mean
    bn.running_var[...] = running_var
    if affine:
        # Some negative weights: a fold must keep the sign per channel.
        bn.weight[...] = weight * np.where(np.arange(channels) % 3 == 2, -1, 1)
        bn.bias[...] = bias
    return bn


def reference_bn(y, bn):
    """bn(y) in eval mode, features on axis 1, in float64."""
    return reference.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                training=False, eps=bn.eps).y


def linear(x, weight, bias):
    y = x.astype(np.float64) @ weight.astype(np.float64).T
    return y if bias is None else y + bias.astype(np.float64)


def _tuple(value, d):
    return (value,) * d if np.isscalar(value) else tuple(value)


def conv(x, weight, bias, *, stride=1, padding=0, dilation=1, groups=1):
    """Direct N-d convolution (cross-correlation, PyTorch's convention) in float64.

    x (N, C_in, *spatial), weight (C_out, C_in / groups, *kernel): every
    output value is the sum over its window, taken from a zero-padded copy of
    x through sliding_window_view, of the window times the kernel.
    """
    d = weight.ndim - 2
    stride, padding, dilation = (_tuple(v, d) for v in (stride, padding, dilation))
    kernel = weight.shape[2:]
    n, c_in = x.shape[:2]
    c_out, c_in_group = weight.shape[:2]
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(p, p) for p in padding])
    extent = tuple(dl * (k - 1) + 1 for k, dl in zip(kernel, dilation))
    windows = sliding_window_view(padded, extent, axis=tuple(range(2, 2 + d)))
    # (N, C_in, *out, *extent): keep every stride-th window, every dilation-th tap.
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
                      + tuple(slice(None, None, dl) for dl in dilation)]
    out_shape = windows.shape[2:2 + d]
    windows = windows.reshape((n, groups, c_in_group) + out_shape + kernel)
    w = weight.astype(np.float64).reshape((groups, c_out // groups, c_in_group) + kernel)
    o, k = string.ascii_letters[:d], string.ascii_letters[d:2 * d]
    y = np.einsum(f"NGC{o}{k},GDC{k}->NGD{o}", windows, w).reshape((n, c_out) + out_shape)
    if bias is not None:
        y = y + bias.astype(np.float64).reshape((c_out,) + (1,) * d)
    return y


def conv_transpose(x, weight, bias, *, stride=1, padding=0, dilation=1, groups=1):
    """Direct N-d transposed convolution in float64, from its definition.

    x (N, C_in, *spatial), weight (C_in, C_out / groups, *kernel): input
    value x[n, i, p] adds x[n, i, p] * weight[i, j, k] to output channel
    g * C_out / groups + j (g the group of i) at position p * stride +
    k * dilation - padding.
    """
    d = weight.ndim - 2
    stride, padding, dilation = (_tuple(v, d) for v in (stride, padding, dilation))
    kernel = weight.shape[2:]
    n, c_in = x.shape[:2]
    c_out_group = weight.shape[1]
    spatial = x.shape[2:]
    full = tuple((s - 1) * st + dl * (k - 1) + 1
                 for s, st, dl, k in zip(spatial, stride, dilation, kernel))
    y = np.zeros((n, groups, c_out_group) + full)
    xg = x.astype(np.float64).reshape((n, groups, c_in // groups) + spatial)
    wg = weight.astype(np.float64).reshape((groups, c_in // groups, c_out_group) + kernel)
    o = string.ascii_letters[:d]
    for tap in itertools.product(*(range(k) for k in kernel)):
        contribution = np.einsum(f"NGI{o},GIJ->NGJ{o}", xg, wg[(Ellipsis,) + tap])
        target = tuple(slice(t * dl, t * dl + (s - 1) * st + 1, st)
                       for t, dl, s, st in zip(tap, dilation, spatial, stride))
        y[(slice(None),) * 3 + target] += contribution
    y = y.reshape((n, groups * c_out_group) + full)
    y = y[(slice(None), slice(None)) + tuple(slice(p, f - p) for p, f in zip(padding, full))]
    if bias is not None:
        y = y + bias.astype(np.float64).reshape((-1,) + (1,) * d)
    return y


def assert_close64(got, want):
    """A float64 fold against the float64 unfused computation: rounding only."""
    scale = np.max(np.abs(want), initial=1.0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale)


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


# --------------------------------------------------------------------------
# Linear layers.


def unfused_linear(fold, x, w, b, bn):
    """The oracle for ``fold``: bn after or before the linear layer (w, b)."""
    if fold is fold_into_linear:
        return reference_bn(linear(x, w, b), bn)
    return linear(reference_bn(x, bn), w, b)


LINEAR_FOLDS = [pytest.param(fold_into_linear, id="after"),
                pytest.param(fold_preceding_into_linear, id="preceding")]


@pytest.mark.parametrize("fold", LINEAR_FOLDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_folds_match_unfused(fold, affine, with_bias):
    w, x = rand((3, 5), 1), rand((7, 5), 2)
    b = rand(3, 3) if with_bias else None
    bn = make_bn(3 if fold is fold_into_linear else 5, affine=affine, eps=1e-3)
    fw, fb = fold(w, b, bn)
    assert fw.shape == (3, 5) and fb.shape == (3,)
    assert_close64(linear(x, fw, fb), unfused_linear(fold, x, w, b, bn))


def test_square_linear_folds_differ_by_position():
    # With in == out features both folds accept the same arguments; they must
    # still give their own (different) answers.
    w, x, b = rand((4, 4), 1), rand((5, 4), 2), rand(4, 3)
    bn = make_bn(4)
    after, before = fold_into_linear(w, b, bn), fold_preceding_into_linear(w, b, bn)
    assert_close64(linear(x, *after), unfused_linear(fold_into_linear, x, w, b, bn))
    assert_close64(linear(x, *before), unfused_linear(fold_preceding_into_linear, x, w, b, bn))
    assert not np.allclose(after[0], before[0])


@pytest.mark.parametrize("fold", LINEAR_FOLDS)
def test_float32_weights_are_the_rounded_float64_fold(fold):
    # The folded parameters of a linear map are its values at the basis
    # vectors: bias = f(0), weight[:, k] = f(e_k) - f(0), here taken from the
    # unfused float64 oracle. A float32 fold computed in float64 and rounded
    # once is within one float32 ulp of them (a float32 computation is not,
    # for some entries, with this many of them).
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 30)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    features = 40 if fold is fold_into_linear else 30
    bn = make_bn(features, eps=1e-2)
    bn.running_var[...] = 10.0 ** rng.uniform(-3, 3, features)

    at_zero = unfused_linear(fold, np.zeros((1, 30)), w, b, bn)[0]
    want_weight = (unfused_linear(fold, np.eye(30), w, b, bn) - at_zero).T
    fw, fb = fold(w, b, bn)
    assert fw.dtype == np.float32 and fb.dtype == np.float32
    for got, want in ((fw, want_weight), (fb, at_zero)):
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        # Differences of f(e_k) - f(0) carry the oracle's rounding of |f(0)|.
        slack = 1e-15 * (np.abs(at_zero).max() + np.abs(want).max())
        assert np.all(np.abs(got.astype(np.float64) - want) <= ulp + slack)


# --------------------------------------------------------------------------
# Convolutions.

CONV_CASES = [
    # (spatial dims, groups, stride, padding, dilation)
    pytest.param(1, 1, 1, 0, 1, id="1d"),
    pytest.param(1, 2, 2, 1, 2, id="1d-groups2-stride2-pad1-dil2"),
    pytest.param(2, 1, 1, 1, 1, id="2d-pad1"),
    pytest.param(2, 3, (2, 1), (1, 0), (1, 2), id="2d-groups3-mixed"),
    pytest.param(2, 6, 1, 1, 1, id="2d-depthwise"),
    pytest.param(3, 1, 1, 1, 1, id="3d-pad1"),
    pytest.param(3, 2, 2, 0, 1, id="3d-groups2-stride2"),
]


@pytest.mark.parametrize("d, groups, stride, padding, dilation", CONV_CASES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_folds_match_unfused(d, groups, stride, padding, dilation, transposed,
                                  with_bias):
    c_in, c_out = 6, 12
    kernel = (3, 2, 2)[:d]
    if transposed:
        layer, w = conv_transpose, rand((c_in, c_out // groups) + kernel, 1)
    else:
        layer, w = conv, rand((c_out, c_in // groups) + kernel, 1)
    b = rand(c_out, 2) if with_bias else None
    x = rand((2, c_in) + (6, 5, 4)[:d], 3)
    bn = make_bn(c_out, eps=1e-4)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    fw, fb = fold_into_conv(w, b, bn, transposed=transposed, groups=groups)
    assert fw.shape == w.shape and fb.shape == (c_out,)
    assert_close64(layer(x, fw, fb, **options), reference_bn(layer(x, w, b, **options), bn))


def test_training_mode_layer_folds_its_eval_behaviour():
    w, x, b = rand((6, 5), 1), rand((7, 5), 2), rand(6, 3)
    bn = make_bn(6).train()
    fw, fb = fold_into_linear(w, b, bn)
    assert_close64(linear(x, fw, fb), reference_bn(linear(x, w, b), bn))


# --------------------------------------------------------------------------
# Dtypes, inputs left alone.


def _float_dtypes():
    params = [pytest.param(np.dtype(t), id=np.dtype(t).name)
              for t in (np.float16, np.float32, np.float64)]
    try:
        import ml_dtypes
    except ImportError:
        return params
    return params + [pytest.param(np.dtype(ml_dtypes.bfloat16), id="bfloat16")]


@pytest.mark.parametrize("dtype", _float_dtypes())
@pytest.mark.parametrize("bias_dtype", [np.float32, np.float64])
def test_returns_the_weight_dtype(dtype, bias_dtype):
    w = rand((6, 2, 3), 1).astype(dtype)
    b = rand(6, 2).astype(bias_dtype)
    bn = make_bn(6, dtype=np.float32)
    fw, fb = fold_into_conv(w, b, bn)
    assert fw.dtype == dtype and fb.dtype == dtype
    # The float64 fold of the same (already rounded) values, rounded once.
    want_w, want_b = fold_into_conv(w.astype(np.float64), b.astype(np.float64), bn)
    np.testing.assert_array_equal(fw, want_w.astype(dtype))
    np.testing.assert_array_equal(fb, want_b.astype(dtype))


@pytest.mark.parametrize("fold, weight_shape, features, options", [
    pytest.param(fold_into_linear, (8, 3), 8, {}, id="linear"),
    pytest.param(fold_preceding_into_linear, (8, 3), 3, {}, id="preceding"),
    pytest.param(fold_into_conv, (8, 3, 2, 2), 8, {}, id="conv"),
    pytest.param(fold_into_conv, (8, 3, 2, 2), 6, dict(transposed=True, groups=2),
                 id="transposed"),
])
def test_inputs_are_not_modified_and_results_are_new(fold, weight_shape, features, options):
    w, b = rand(weight_shape, 1), rand(weight_shape[0] if fold is fold_preceding_into_linear
                                       else features, 2)
    bn = make_bn(features)
    given = (w, b, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    before = [a.copy() for a in given]
    results = fold(w, b, bn, **options)
    for old, new in zip(before, given):
        np.testing.assert_array_equal(old, new)
    for result in results:
        assert result.flags.c_contiguous and result.flags.writeable
        for array in given:
            assert not np.shares_memory(result, array)


def test_result_does_not_depend_on_memory_layout():
    w = np.asfortranarray(rand((6, 4, 3, 3), 1))
    b = rand(12, 2)[::2]  # a strided view
    bn = make_bn(6)
    got = fold_into_conv(w, b, bn)
    want = fold_into_conv(np.ascontiguousarray(w), b.copy(), bn)
    for g, wt in zip(got, want):
        np.testing.assert_array_equal(g, wt)


# --------------------------------------------------------------------------
# Bad arguments.


def test_non_arrays_are_type_errors():
    w, b, bn = rand((4, 3), 1), rand(4, 2), make_bn(4)
    with pytest.raises(TypeError, match="weight must be a NumPy array, got list"):
        fold_into_linear(w.tolist(), b, bn)
    with pytest.raises(TypeError, match="bias must be a NumPy array, got tuple"):
        fold_into_linear(w, tuple(b), bn)
    with pytest.raises(TypeError, match="weight must have dtype .* got int64"):
        fold_into_linear(np.ones((4, 3), np.int64), b, bn)
    with pytest.raises(TypeError, match="bias must have dtype .* got complex128"):
        fold_into_linear(w, b.astype(complex), bn)
    with pytest.raises(TypeError, match="bias must have dtype .* got bool"):
        fold_into_linear(w, b > 0, bn)
    with pytest.raises(TypeError, match="weight must have dtype .* got (float128|longdouble)"):
        fold_into_linear(w.astype(np.longdouble), b, bn)
    with pytest.raises(TypeError, match="bn must be a bncore.BatchNorm layer, got dict"):
        fold_into_linear(w, b, bn.state_dict())
    with pytest.raises(TypeError, match="groups must be a positive integer, got float"):
        fold_into_conv(rand((4, 3, 2), 1), b, bn, groups=1.0)
    with pytest.raises(TypeError, match="groups must be a positive integer, got bool"):
        fold_into_conv(rand((4, 3, 2), 1), b, bn, groups=True)


def test_shape_mismatches_are_value_errors_naming_the_argument():
    bn4 = make_bn(4)
    with pytest.raises(ValueError, match=r"weight must have 2 dimensions .* got shape \(4, 3, 1\)"):
        fold_into_linear(rand((4, 3, 1), 1), None, bn4)
    with pytest.raises(ValueError, match=r"weight must have 2 dimensions"):
        fold_preceding_into_linear(rand(4, 1), None, bn4)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        fold_into_linear(rand((4, 3), 1), rand(3, 2), bn4)
    with pytest.raises(ValueError, match=r"bias has shape \(1, 4\), expected \(4,\)"):
        fold_into_linear(rand((4, 3), 1), rand((1, 4), 2), bn4)
    with pytest.raises(ValueError, match=r"bn has num_features=4, expected 3 .*out_features"):
        fold_into_linear(rand((3, 4), 1), None, bn4)
    with pytest.raises(ValueError, match=r"bn has num_features=4, expected 3 .*in_features"):
        fold_preceding_into_linear(rand((4, 3), 1), None, bn4)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        fold_preceding_into_linear(rand((4, 4), 1), rand(3, 2), bn4)
    with pytest.raises(ValueError, match=r"weight must have at least 3 dimensions"):
        fold_into_conv(rand((4, 3), 1), None, bn4)
    with pytest.raises(ValueError, match=r"bn has num_features=4, expected 6"):
        fold_into_conv(rand((6, 2, 3), 1), None, bn4)
    with pytest.raises(ValueError, match=r"bn has num_features=4, expected 6 .*groups=2"):
        fold_into_conv(rand((4, 3, 3), 1), None, bn4, transposed=True, groups=2)
    with pytest.raises(ValueError, match=r"weight.shape\[0\] is 4, which does not divide "
                                         r"into groups=3"):
        fold_into_conv(rand((4, 3, 3), 1), None, bn4, groups=3)
    with pytest.raises(ValueError, match="groups must be at least 1, got 0"):
        fold_into_conv(rand((4, 3, 3), 1), None, bn4, groups=0)


def test_batch_statistics_layer_cannot_be_folded():
    bn = bncore.BatchNorm(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_into_linear(rand((4, 3), 1), None, bn)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_into_conv(rand((4, 3, 3), 1), None, bn)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_preceding_into_linear(rand((3, 4), 1), None, bn)


# --------------------------------------------------------------------------
# Against PyTorch.


def _torch_bn(torch, bn, spatial=1):
    """A torch.nn.BatchNorm1d/2d/3d (for 1, 2, 3 spatial dimensions) in eval
    mode holding bn's state."""
    cls = getattr(torch.nn, f"BatchNorm{spatial}d")
    tbn = cls(bn.num_features, eps=bn.eps, affine=bn.affine,
                        dtype=torch.float64).eval()
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v))
                         for k, v in bn.state_dict().items()})
    return tbn


def assert_same_as_torch_fused(folded, fused):
    """Folded (weight, bias) against the parameters of a torch fused layer."""
    for got, want in zip(folded, (fused.weight, fused.bias)):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-13, atol=1e-15)


def assert_torch_layer_takes_the_fold(torch, layer, tbn, folded, x):
    """The torch layer given the folded (weight, bias) computes tbn(layer(x))."""
    with torch.no_grad():
        want = tbn(layer(x)).numpy()
        layer.weight.copy_(torch.from_numpy(folded[0]))
        layer.bias = torch.nn.Parameter(torch.from_numpy(folded[1]))
        got = layer(x).numpy()
    assert_close64(got, want)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear_against_torch_fusion(with_bias, affine):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 6, bias=with_bias, dtype=torch.float64).eval()
    bn = make_bn(6, affine=affine, eps=1e-3)
    tbn = _torch_bn(torch, bn)
    b = layer.bias.detach().numpy() if with_bias else None
    fw, fb = fold_into_linear(layer.weight.detach().numpy(), b, bn)
    if affine:  # torch's fuse_linear_bn_eval needs the weight and bias (2.13)
        fused = fuse_linear_bn_eval(layer, tbn)
        assert_same_as_torch_fused((fw, fb), fused)
    x = torch.from_numpy(rand((8, 5), 3))
    assert_torch_layer_takes_the_fold(torch, layer, tbn, (fw, fb), x)


def test_preceding_linear_against_torch_layers():
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3, dtype=torch.float64).eval()
    bn = make_bn(5, eps=1e-3)
    tbn = _torch_bn(torch, bn)
    fw, fb = fold_preceding_into_linear(layer.weight.detach().numpy(),
                                        layer.bias.detach().numpy(), bn)
    x = torch.from_numpy(rand((8, 5), 3))
    with torch.no_grad():
        want = layer(tbn(x)).numpy()
        got = torch.nn.functional.linear(x, torch.from_numpy(fw), torch.from_numpy(fb)).numpy()
    assert_close64(got, want)


TORCH_CONV_CASES = [
    # (spatial dims, transposed, groups, with_bias)
    pytest.param(1, False, 1, True, id="conv1d"),
    pytest.param(2, False, 2, False, id="conv2d-groups2-nobias"),
    pytest.param(3, False, 1, True, id="conv3d"),
    pytest.param(1, True, 1, False, id="convtranspose1d-nobias"),
    pytest.param(2, True, 1, True, id="convtranspose2d"),
    pytest.param(3, True, 1, True, id="convtranspose3d"),
]


def _torch_conv(torch, d, transposed, groups, with_bias):
    kind = "ConvTranspose" if transposed else "Conv"
    cls = getattr(torch.nn, f"{kind}{d}d")
    return cls(4, 6, 3, stride=2, padding=1, groups=groups, bias=with_bias,
               dtype=torch.float64).eval()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("d, transposed, groups, with_bias", TORCH_CONV_CASES)
def test_conv_against_torch_fusion(d, transposed, groups, with_bias, affine):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(d)
    layer = _torch_conv(torch, d, transposed, groups, with_bias)
    bn = make_bn(6, affine=affine, eps=1e-3)
    tbn = _torch_bn(torch, bn, d)
    fused = fuse_conv_bn_eval(layer, tbn, transpose=transposed)
    b = layer.bias.detach().numpy() if with_bias else None
    fw, fb = fold_into_conv(layer.weight.detach().numpy(), b, bn,
                            transposed=transposed, groups=groups)
    assert_same_as_torch_fused((fw, fb), fused)
    x = torch.from_numpy(rand((2, 4) + (5, 4, 3)[:d], 3))
    assert_torch_layer_takes_the_fold(torch, layer, tbn, (fw, fb), x)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_grouped_transposed_conv_against_torch_layers(d):
    # torch's fuse_conv_bn_eval(transpose=True) rejects groups > 1 (2.13):
    # here PyTorch's layers are the oracle.
    torch = pytest.importorskip("torch")

    torch.manual_seed(d)
    layer = _torch_conv(torch, d, True, 2, True)
    bn = make_bn(6, eps=1e-3)
    tbn = _torch_bn(torch, bn, d)
    fw, fb = fold_into_conv(layer.weight.detach().numpy(), layer.bias.detach().numpy(), bn,
                            transposed=True, groups=2)
    x = torch.from_numpy(rand((2, 4) + (5, 4, 3)[:d], 3))
    assert_torch_layer_takes_the_fold(torch, layer, tbn, (fw, fb), x)


@pytest.mark.parametrize("d, groups, stride, padding, dilation", CONV_CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_the_numpy_convolutions_are_torch_s(d, groups, stride, padding, dilation, transposed):
    # The oracle's own check: the direct convolutions above are PyTorch's.
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    kernel = (3, 2, 2)[:d]
    x = rand((2, 6) + (7, 6, 5)[:d], 3)
    b = rand(12, 2)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        w = rand((6, 12 // groups) + kernel, 1)
        got = conv_transpose(x, w, b, **options)
        op = getattr(functional, f"conv_transpose{d}d")
    else:
        w = rand((12, 6 // groups) + kernel, 1)
        got = conv(x, w, b, **options)
        op = getattr(functional, f"conv{d}d")
    want = op(*(torch.from_numpy(a) for a in (x, w, b)), **options).numpy()
    assert_close64(got, want)


def test_a_layer_with_a_fused_activation_or_no_statistics_yet_is_refused():
    weight, bias = np.ones((4, 3)), np.zeros(4)
    relu_layer = bncore.BatchNorm1d(4, dtype=np.float64, activation="relu").eval()
    with pytest.raises(ValueError, match="activation='relu'"):
        bncore.fold_into_linear(weight, bias, relu_layer)
    with pytest.raises(ValueError, match="lazy"):
        bncore.fold_into_linear(weight, bias, bncore.BatchNorm1d(None))
