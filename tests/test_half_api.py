"""float16 (and bfloat16, with ml_dtypes) through the public API.

tests/test_lowp.py checks the chunked half-precision kernels themselves;
this file checks that batch_norm, batch_norm_backward and moments route half
inputs to them with the same semantics, and that the F16C conversions they
use round exactly as NumPy's casts.
"""

import numpy as np
import pytest
from conftest import make_input, make_params

import bncore
from bncore import _kernels, reference


def _half_ulp(values, dtype):
    """The spacing of dtype at each value (float64)."""
    v = np.abs(np.asarray(values, dtype=np.float64)).astype(dtype)
    return np.abs(np.spacing(v).astype(np.float64)) if dtype == np.float16 else \
        np.maximum(np.abs(v.astype(np.float64)) * 2.0**-7, 2.0**-133)


def _assert_half_close(got, want, dtype):
    """One rounding to the half dtype (half an ulp) plus the float32 kernel's
    few roundings (far below that), with an ulp of margin."""
    want = np.asarray(want, dtype=np.float64)
    error = np.abs(got.astype(np.float64) - want)
    assert np.all(error <= _half_ulp(want, dtype) + 1e-6 * (1 + np.abs(want)))


HALF_LAYOUTS = [((16, 4, 9, 9), 1), ((64, 5), 1), ((8, 6, 6, 3), -1)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", HALF_LAYOUTS)
def test_float16_batch_norm_matches_the_reference(layout, training, relu):
    shape, axis = layout
    x = make_input(shape, np.float16, axis, kind="normal")
    c = shape[axis]
    weight, bias, mean, var = make_params(c, np.float32)
    activation = "relu" if relu else None
    got_mean, got_var = mean.copy(), var.copy()
    y = bncore.batch_norm(x, got_mean, got_var, weight, bias, training=training, axis=axis,
                          activation=activation)
    want = reference.batch_norm(x.astype(np.float64), mean, var, weight, bias,
                                training=training, axis=axis, activation=activation)
    assert y.dtype == np.float16
    _assert_half_close(y, want.y, np.float16)
    if training:
        np.testing.assert_allclose(got_mean, want.running_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_var, want.running_var, rtol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_backward_matches_the_reference_with_float32_parameter_gradients(training):
    shape, axis = (12, 3, 5, 5), 1
    x = make_input(shape, np.float16, axis, kind="normal")
    dy = make_input(shape, np.float16, axis, kind="normal", seed=3)
    weight, bias, mean, var = make_params(3, np.float32)
    _, used_mean, invstd = bncore.batch_norm(x, mean.copy(), var.copy(), weight, bias,
                                             training=training, return_stats=True)
    gx, gw, gb = bncore.batch_norm_backward(dy, x, used_mean, invstd, weight, bias,
                                            training=training, activation="relu")
    want = reference.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                         used_mean, invstd, weight, bias, training=training,
                                         activation="relu")
    assert gx.dtype == np.float16 and gw.dtype == gb.dtype == np.float32
    _assert_half_close(gx, want[0], np.float16)
    np.testing.assert_allclose(gw, want[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gb, want[2], rtol=1e-5, atol=1e-4)


def test_float16_moments_and_partial_moments_are_float64_accurate():
    # Mean 1000 and spread 1 in float16: its values are multiples of 0.5,
    # so only float64-accurate statistics of the exact half values agree.
    rng = np.random.default_rng(0)
    x = (1000 + rng.standard_normal((4000, 3))).astype(np.float16)
    mean, var = bncore.moments(x)
    want_mean, want_var = reference.moments(x.astype(np.float64))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(var, want_var, rtol=1e-9)
    parts = bncore.merge_moments(*(bncore.partial_moments(p) for p in np.array_split(x, 3)))
    np.testing.assert_allclose(parts.var(), want_var, rtol=1e-9)


def test_bfloat16_batch_norm_matches_the_reference():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = make_input((10, 4, 7), np.float32, 1, kind="normal").astype(bf16)
    weight, bias, _, _ = make_params(4, np.float32)
    y = bncore.batch_norm(x, None, None, weight, bias, training=True)
    want = reference.batch_norm(x.astype(np.float64), None, None, weight, bias,
                                training=True)
    assert y.dtype == bf16
    _assert_half_close(y, want.y, bf16)


def test_half_layer_dtype_mismatch_is_a_clear_error():
    x = np.ones((4, 3), np.float16)
    with pytest.raises(TypeError, match="dtype"):
        bncore.batch_norm(x, np.zeros(3), np.ones(3), out=np.empty((4, 3), np.float32))


# --------------------------------------------------------------------------
# The F16C conversions round exactly as NumPy's casts (where the CPU has them).

def test_half_to_float_is_exact_for_every_float16():
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    wide = np.empty(every.size, np.float32)
    if not _kernels.half_to_float(every, wide):
        pytest.skip("this CPU has no F16C: NumPy converts")
    want = every.astype(np.float32)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(wide[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.isnan(wide[~finite]).all()


@pytest.mark.parametrize("size", [1, 7, 8, 9, 100_003])
def test_float_to_half_rounds_as_numpy(size):
    rng = np.random.default_rng(size)
    values = (rng.standard_normal(size) * 10.0 ** rng.uniform(-9, 6, size)).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 2.98e-8, 1e-45],
                       np.float32)
    values = np.concatenate([values, special])  # sizes 10, 16, 17, 18, 100012: every tail
    half = np.empty(values.size, np.float16)
    if not _kernels.float_to_half(values, half):
        pytest.skip("this CPU has no F16C: NumPy converts")
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    np.testing.assert_array_equal(half.view(np.uint16), want.view(np.uint16))


def test_conversions_check_their_arguments():
    with pytest.raises(TypeError, match="dst"):
        _kernels.half_to_float(np.ones(3, np.float16), [0.0, 0.0, 0.0])
    with pytest.raises(TypeError, match="src"):
        _kernels.half_to_float(np.ones(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="src"):
        _kernels.float_to_half(np.ones(4, np.float32), np.ones(3, np.float16))


# --------------------------------------------------------------------------
# Half-precision layers: half input and output, float32 parameters.

@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_layer_trains_like_a_float32_layer_on_the_same_values(dtype_name, tmp_path):
    if dtype_name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    half = bncore.BatchNorm2d(3, dtype=dtype_name)
    wide = bncore.BatchNorm2d(3, dtype=np.float32)
    assert half.param_dtype == np.float32 and half.running_var.dtype == np.float32
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = (2 + 3 * rng.standard_normal((8, 3, 4, 4))).astype(half.dtype)
        y = half(x)
        want = wide(x.astype(np.float32))
        assert y.dtype == half.dtype
        _assert_half_close(y, want, half.dtype)
        grad = half.backward(np.ones_like(y))
        want_grad = wide.backward(np.ones_like(want))
        assert grad.dtype == half.dtype and half.grad_weight.dtype == np.float32
        np.testing.assert_allclose(half.grad_weight, wide.grad_weight, atol=1e-3)
    np.testing.assert_allclose(half.running_mean, wide.running_mean, rtol=1e-6)
    np.testing.assert_allclose(half.running_var, wide.running_var, rtol=1e-6)
    half.save(tmp_path / "half.npz")
    again = bncore.BatchNorm.load(tmp_path / "half.npz")
    assert again.dtype == half.dtype
    np.testing.assert_array_equal(again.running_var, half.running_var)
    with pytest.raises(TypeError, match="dtype"):
        half(np.ones((2, 3, 4, 4), np.float32))


def test_layer_dtype_is_checked():
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        bncore.BatchNorm1d(3, dtype=np.int32)
    with pytest.raises(TypeError, match="got None"):  # np.dtype(None) would be float64
        bncore.BatchNorm1d(3, dtype=None)
    with pytest.raises(TypeError, match="dtype must be"):
        bncore.BatchNorm1d(3, dtype="no such dtype")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_relu_gate_follows_the_rounded_half_output(dtype_name, training):
    """An affine output too small to survive the rounding to half precision
    is a 0 output, and passes no gradient (PyTorch gates on the output)."""
    if dtype_name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    bn = bncore.BatchNorm1d(2, dtype=dtype_name, activation="relu").train(training)
    tiny = 1e-9 if dtype_name == "float16" else 1e-45
    bn.bias[:] = [tiny, 1.0]  # channel 0 rounds to 0, channel 1 does not
    x = np.zeros((4, 2), dtype=bn.dtype)
    x[:, 1] = [1, 2, 3, 4]
    # Channel 0 is constant 0: normalised, exactly 0 in both modes (running
    # statistics 0 and 1 in eval).
    y = bn(x)
    assert (y[:, 0].astype(np.float32) == 0).all()
    bn.backward(np.ones_like(y))
    assert bn.grad_bias[0] == 0
    assert bn.grad_bias[1] == (y[:, 1].astype(np.float32) > 0).sum()
