"""Layer options beyond PyTorch's: scale/center toggles, lazy construction
(num_features=None), the cached eval transform fold(), and the fused relu
activation - against the float64 reference and, for the activation, against
PyTorch's relu(bn(x)) with autograd."""

import threading

import numpy as np
import pytest

import bncore
from bncore import reference
from bncore.functional import fold_scale_shift
from conftest import DTYPE_PARAMS, assert_output_close, make_input, make_params

# --------------------------------------------------------------------------
# scale / center


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("scale, center", [(True, False), (False, True), (False, False)])
def test_scale_center_forward_backward_against_reference(scale, center, training):
    shape, c = (6, 3, 4, 5), 3
    w, b, rm, rv = make_params(c, np.float64, seed=1)
    bn = bncore.BatchNorm2d(c, scale=scale, center=center, dtype=np.float64)
    assert (bn.weight is None) == (not scale) and (bn.bias is None) == (not center)
    state = {"running_mean": rm, "running_var": rv, "num_batches_tracked": np.array(0)}
    if scale:
        state["weight"] = w
    if center:
        state["bias"] = b
    bn.load_state_dict(state)
    bn.train(training)
    x = make_input(shape, np.float64, 1, kind="normal", seed=2)
    dy = make_input(shape, np.float64, 1, kind="normal", seed=3)
    weight, bias = (w if scale else None), (b if center else None)
    want = reference.batch_norm(x, rm, rv, weight, bias, training=training)
    assert_output_close(bn(x), want.y, np.float64)
    gx, gw, gb = reference.batch_norm_backward(dy, x, want.mean, want.invstd, weight,
                                               training=training)
    assert_output_close(bn.backward(dy), gx, np.float64)
    if scale:
        np.testing.assert_allclose(bn.grad_weight, gw, rtol=1e-12, atol=1e-10)
    else:
        assert bn.grad_weight is None
    if center:
        np.testing.assert_allclose(bn.grad_bias, gb, rtol=1e-12, atol=1e-10)
    else:
        assert bn.grad_bias is None


@pytest.mark.parametrize("scale, center, keys", [
    (True, True, ["weight", "bias"]), (True, False, ["weight"]),
    (False, True, ["bias"]), (False, False, [])])
def test_state_dict_keys_follow_scale_and_center(scale, center, keys):
    bn = bncore.BatchNorm1d(3, scale=scale, center=center)
    tracked = ["running_mean", "running_var", "num_batches_tracked"]
    assert list(bn.state_dict()) == keys + tracked
    # loading the other layout is refused, naming the keys
    other = bncore.BatchNorm1d(3, scale=not scale, center=not center).state_dict()
    with pytest.raises(ValueError, match="missing keys|unexpected keys"):
        bn.load_state_dict(other)


def test_none_follows_affine():
    bn = bncore.BatchNorm2d(3, affine=False)
    assert bn.scale is False and bn.center is False
    bn = bncore.BatchNorm2d(3)
    assert bn.scale is True and bn.center is True
    bn = bncore.BatchNorm2d(3, center=False)
    assert bn.scale is True and bn.center is False and bn.bias is None
    assert "center=False" in repr(bn) and "scale" not in repr(bn)


@pytest.mark.parametrize("option", ["scale", "center"])
def test_affine_false_with_a_toggle_on_is_a_contradiction(option):
    with pytest.raises(ValueError, match=f"{option}=True contradicts affine=False"):
        bncore.BatchNorm2d(3, affine=False, **{option: True})


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_toggles_must_be_bool_or_none(value):
    with pytest.raises(TypeError, match="scale"):
        bncore.BatchNorm2d(3, scale=value)


def test_reset_parameters_with_only_bias():
    bn = bncore.BatchNorm1d(2, scale=False)
    bn.bias[:] = 5
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.bias, 0.0)
    assert bn.weight is None


# --------------------------------------------------------------------------
# lazy construction


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", [((4, 3, 5, 6), 1), ((4, 5, 6, 7), -1)],
                         ids=["NCHW", "NHWC"])
def test_lazy_layer_takes_num_features_from_the_first_input(layout, dtype):
    shape, axis = layout
    c = shape[axis]
    lazy = bncore.BatchNorm2d(None, axis=axis, dtype=dtype)
    assert lazy.num_features is None and lazy.weight is None and lazy.running_mean is None
    assert repr(lazy).startswith("BatchNorm2d(None,")
    eager = bncore.BatchNorm2d(c, axis=axis, dtype=dtype)
    for seed in range(3):
        x = make_input(shape, dtype, axis, kind="normal", seed=seed)
        np.testing.assert_array_equal(lazy(x), eager(x))
    assert lazy.num_features == c
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(lazy, key).dtype == dtype
        np.testing.assert_array_equal(getattr(lazy, key), getattr(eager, key))
    assert lazy.num_batches_tracked == 3
    with pytest.raises(ValueError, match="expected num_features=" + str(c)):
        lazy(make_input((4, c + 1, 5, 6) if axis == 1 else (4, 5, 6, c + 1), dtype, axis))


@pytest.mark.parametrize("what", ["state_dict", "save", "fold"])
def test_lazy_layer_has_no_state_before_its_first_input(what, tmp_path):
    bn = bncore.BatchNorm1d(None)
    call = {"state_dict": bn.state_dict, "fold": bn.fold,
            "save": lambda: bn.save(tmp_path / "layer.npz")}[what]
    with pytest.raises(RuntimeError, match="num_features=None"):
        call()
    assert not (tmp_path / "layer.npz").exists()


@pytest.mark.parametrize("bad, exc", [
    (np.ones((2, 3, 4, 4), np.float64), TypeError),  # dtype
    (np.ones((2, 3, 4), np.float32), ValueError),  # rank
    (np.ones((2, 0, 4, 4), np.float32), ValueError),  # no features
])
def test_rejected_first_input_leaves_the_layer_lazy(bad, exc):
    bn = bncore.BatchNorm2d(None)
    with pytest.raises(exc):
        bn(bad)
    assert bn.num_features is None and bn.running_mean is None
    bn(np.ones((2, 5, 4, 4), np.float32))
    assert bn.num_features == 5


def test_load_state_dict_materializes_a_lazy_layer():
    source = bncore.BatchNorm1d(4, dtype=np.float64)
    source(make_input((8, 4), np.float64, 1, kind="normal", seed=5))
    lazy = bncore.BatchNorm1d(None, dtype=np.float64)
    lazy.load_state_dict(source.state_dict())
    assert lazy.num_features == 4
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(lazy.state_dict()[key], value)


def test_load_state_dict_with_mismatched_lengths_leaves_the_layer_lazy():
    state = bncore.BatchNorm1d(4).state_dict()
    state["running_var"] = np.ones(3, np.float32)
    lazy = bncore.BatchNorm1d(None)
    with pytest.raises(ValueError, match=r"running_var.*\(3,\).*\(4,\)"):
        lazy.load_state_dict(state)
    assert lazy.num_features is None and lazy.weight is None


def test_lazy_layer_materializes_once_under_threads():
    bn = bncore.BatchNorm1d(None, dtype=np.float64)
    x = make_input((16, 6), np.float64, 1, kind="normal", seed=7)
    errors = []

    def work():
        try:
            bn(x)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert bn.num_features == 6 and bn.num_batches_tracked == 8


def test_reset_on_a_lazy_layer_does_nothing():
    bn = bncore.BatchNorm2d(None)
    bn.reset_parameters()
    assert bn.num_features is None


# --------------------------------------------------------------------------
# fold


def _trained_layer(dtype=np.float64, **options):
    bn = bncore.BatchNorm2d(3, dtype=dtype, **options)
    w, b, _, _ = make_params(3, dtype, seed=11)
    if bn.weight is not None:
        bn.weight[:] = w
    if bn.bias is not None:
        bn.bias[:] = b
    for seed in range(2):
        bn(make_input((4, 3, 5, 5), dtype, 1, kind="normal", seed=seed))
    return bn.eval()


def _fold_by_hand(bn):
    """The definition, in float64, written independently of the layer."""
    w = np.ones(3) if bn.weight is None else bn.weight.astype(np.float64)
    b = np.zeros(3) if bn.bias is None else bn.bias.astype(np.float64)
    scale = w / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    return scale, b - bn.running_mean.astype(np.float64) * scale


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("options", [{}, {"scale": False}, {"affine": False}],
                         ids=["affine", "no-scale", "no-affine"])
def test_fold_is_the_eval_transform(options, dtype):
    bn = _trained_layer(dtype, **options)
    scale, shift = bn.fold()
    assert scale.dtype == np.float64 and shift.dtype == np.float64
    assert scale.shape == (3,) and shift.shape == (3,)
    want_scale, want_shift = _fold_by_hand(bn)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-14)
    np.testing.assert_allclose(shift, want_shift, rtol=1e-14, atol=1e-15)
    x = make_input((4, 3, 5, 5), dtype, 1, kind="normal", seed=9)
    folded = x.astype(np.float64) * scale[:, None, None] + shift[:, None, None]
    assert_output_close(bn(x), folded, dtype)


def test_fold_is_cached_and_read_only():
    bn = _trained_layer()
    scale, shift = bn.fold()
    again = bn.fold()
    assert again[0] is scale and again[1] is shift
    for a in (scale, shift):
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 1.0


def _bump(bn, name):
    """The smallest in-place change of bn.<name>[1] that changes the fold:
    one ulp at a time (often one is enough)."""
    array = getattr(bn, name)
    before = fold_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    for _ in range(64):
        array[1] = np.nextafter(array[1], np.inf)
        after = fold_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        if not all(np.array_equal(a, b) for a, b in zip(before, after)):
            return
    raise AssertionError(f"64 ulps of {name} left the fold unchanged")


CHANGES = {
    "weight in place": lambda bn: bn.weight.__setitem__(slice(None), 2.0),
    "weight one ulp": lambda bn: _bump(bn, "weight"),
    "bias rebound": lambda bn: setattr(bn, "bias", bn.bias + 1),
    "running_mean ulps": lambda bn: _bump(bn, "running_mean"),
    "running_var in place": lambda bn: bn.running_var.__imul__(3.0),
    "eps": lambda bn: setattr(bn, "eps", 1e-2),
    "training step": lambda bn: bn.train()(make_input((4, 3, 5, 5), np.float64, 1,
                                                      kind="normal", seed=40)),
    "load_state_dict": lambda bn: bn.load_state_dict(
        _trained_layer(momentum=0.5).state_dict()),
    "reset_parameters": lambda bn: bn.reset_parameters(),
    "nan written": lambda bn: bn.running_var.__setitem__(0, np.nan),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_fold_is_never_stale(change):
    bn = _trained_layer()
    old_scale, old_shift = (a.copy() for a in bn.fold())
    CHANGES[change](bn)
    scale, shift = bn.fold()
    # exactly what an uncached fold of the current values gives ...
    fresh_scale, fresh_shift = fold_scale_shift(bn.running_mean, bn.running_var, bn.weight,
                                                bn.bias, bn.eps)
    np.testing.assert_array_equal(scale, fresh_scale)
    np.testing.assert_array_equal(shift, fresh_shift)
    # ... which differs from the cached one (else the test would prove nothing)
    assert not (np.array_equal(fresh_scale, old_scale, equal_nan=True)
                and np.array_equal(fresh_shift, old_shift, equal_nan=True))


def test_fold_needs_running_statistics():
    bn = bncore.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        bn.fold()


# --------------------------------------------------------------------------
# activation


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_layer_against_torch_autograd(training, dtype):
    torch = pytest.importorskip("torch")
    shape, c = (4, 3, 5, 6), 3
    w, b, rm, rv = make_params(c, dtype, seed=30)
    bn = bncore.BatchNorm2d(c, activation="relu", dtype=dtype)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                        "num_batches_tracked": np.array(0)})
    bn.train(training)
    module = torch.nn.BatchNorm2d(c, dtype=getattr(torch, np.dtype(dtype).name))
    module.load_state_dict({k: torch.from_numpy(np.array(v))
                            for k, v in bn.state_dict().items()})
    module.train(training)
    x = make_input(shape, dtype, 1, kind="normal", seed=31)
    dy = make_input(shape, dtype, 1, kind="normal", seed=32)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = torch.relu(module(tx))
    ty.backward(torch.from_numpy(dy))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    y = bn(x)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    assert (y >= 0).all() and (y == 0).any() and (y > 0).any()
    np.testing.assert_allclose(bn.backward(dy), tx.grad.numpy(), **tol)
    np.testing.assert_allclose(bn.grad_weight, module.weight.grad.numpy(), **tol)
    np.testing.assert_allclose(bn.grad_bias, module.bias.grad.numpy(), **tol)
    np.testing.assert_allclose(bn.running_mean, module.running_mean.numpy(), **tol)
    np.testing.assert_allclose(bn.running_var, module.running_var.numpy(), **tol)


def test_backward_uses_the_forwards_activation():
    bn = bncore.BatchNorm1d(3, activation="relu", dtype=np.float64)
    x = make_input((8, 3), np.float64, 1, kind="normal", seed=50)
    dy = np.ones_like(x)
    y = bn(x)
    bn.activation = None  # changed between forward and backward
    gx = bn.backward(dy)
    want = reference.batch_norm(x, training=True, activation="relu")
    gx_want, _, gb_want = reference.batch_norm_backward(
        dy, x, want.mean, want.invstd, np.ones(3), np.zeros(3), activation="relu")
    assert_output_close(y, want.y, np.float64)
    assert_output_close(gx, gx_want, np.float64)
    np.testing.assert_allclose(bn.grad_bias, gb_want, rtol=1e-12)
    np.testing.assert_array_equal(bn.grad_bias, (y > 0).sum(axis=0))


@pytest.mark.parametrize("activation", ["gelu", "RELU", 1])
def test_bad_activation(activation):
    with pytest.raises(ValueError, match="activation"):
        bncore.BatchNorm2d(3, activation=activation)
