"""BatchNorm.from_torch / to_torch against PyTorch's own batch norms: eval
outputs, training updates over several steps (momentum 0.1 and None), state
round trips, and the refusals.

Tolerances as in test_torch: float64 1e-12; float32 1e-5 (torch's float32
statistics carry errors of order 1e-6)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bncore  # noqa: E402
from conftest import DTYPE_PARAMS, make_input, make_params  # noqa: E402

nn = torch.nn

SHAPES = {nn.BatchNorm1d: (8, 3, 5), nn.BatchNorm2d: (4, 3, 5, 6), nn.BatchNorm3d: (2, 3, 3, 4, 5)}
CLASSES = {nn.BatchNorm1d: bncore.BatchNorm1d, nn.BatchNorm2d: bncore.BatchNorm2d,
           nn.BatchNorm3d: bncore.BatchNorm3d}


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)


def _torch_dtype(dtype):
    return getattr(torch, np.dtype(dtype).name)


def _random_module(torch_cls, dtype, seed, **options):
    module = torch_cls(3, dtype=_torch_dtype(dtype), **options)
    w, b, rm, rv = make_params(3, dtype, seed=seed)
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.from_numpy(w))
            module.bias.copy_(torch.from_numpy(b))
        if module.track_running_stats:
            module.running_mean.copy_(torch.from_numpy(rm))
            module.running_var.copy_(torch.from_numpy(rv))
            module.num_batches_tracked.fill_(7)
    return module


def _assert_same_state(bn, module, tol):
    state = module.state_dict()
    assert list(bn.state_dict()) == list(state)
    for key, value in bn.state_dict().items():
        np.testing.assert_allclose(value, state[key].numpy(), **tol, err_msg=key)


OPTIONS = {
    "defaults": {},
    "no-affine": dict(affine=False),
    "no-tracking": dict(track_running_stats=False),
    "cumulative": dict(momentum=None),
    "eps": dict(eps=1e-2, momentum=0.3),
}


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("torch_cls", list(SHAPES), ids=lambda c: c.__name__)
def test_from_torch_copies_and_matches_eval(torch_cls, options, dtype):
    module = _random_module(torch_cls, dtype, seed=1, **OPTIONS[options]).eval()
    bn = bncore.BatchNorm.from_torch(module)
    assert type(bn) is CLASSES[torch_cls]
    assert bn.dtype == dtype and bn.training is False
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (
        module.eps, module.momentum, module.affine, module.track_running_stats)
    if module.track_running_stats:
        assert bn.num_batches_tracked == 7
    _assert_same_state(bn, module, dict(rtol=0, atol=0))
    for key, value in module.state_dict().items():  # copies, not views
        if key != "num_batches_tracked":
            assert not np.shares_memory(getattr(bn, key), value.numpy())
    x = make_input(SHAPES[torch_cls], dtype, 1, kind="normal", seed=2)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn(x), want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("torch_cls", list(SHAPES), ids=lambda c: c.__name__)
def test_training_steps_match_torch(torch_cls, momentum, dtype):
    module = _random_module(torch_cls, dtype, seed=3, momentum=momentum)
    bn = bncore.BatchNorm.from_torch(module)
    assert bn.training is True
    tol = _tol(dtype)
    for step in range(5):
        x = make_input(SHAPES[torch_cls], dtype, 1, kind="normal", seed=10 + step)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(bn(x), want, **tol)
    assert bn.num_batches_tracked == int(module.num_batches_tracked) == 12
    _assert_same_state(bn, module, tol)
    # the bncore layer, back in torch, carries on where torch is
    back = bn.to_torch()
    assert back.training is True and back.momentum == momentum
    x = make_input(SHAPES[torch_cls], dtype, 1, kind="normal", seed=30)
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x)).numpy(),
                                   module(torch.from_numpy(x)).numpy(), **tol)
    _assert_same_state(bncore.BatchNorm.from_torch(back), module, tol)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("bn_cls", list(CLASSES.values()), ids=lambda c: c.__name__)
def test_state_round_trip_is_exact(bn_cls, options):
    bn = bn_cls(3, dtype=np.float64, **OPTIONS[options])
    x = make_input(SHAPES[next(k for k, v in CLASSES.items() if v is bn_cls)], np.float64,
                   1, kind="normal", seed=4)
    bn(x)
    module = bn.to_torch()
    assert type(module).__name__ == bn_cls.__name__
    assert module.training is True
    assert all(t.dtype == torch.float64 for t in module.state_dict().values()
               if t.is_floating_point())
    back = bncore.BatchNorm.from_torch(module)
    assert back.config() == bn.config()
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value)
        np.testing.assert_array_equal(module.state_dict()[key].numpy(), value)


def test_scale_without_center_converts_exactly():
    bn = bncore.BatchNorm1d(3, center=False, dtype=np.float64)
    bn.weight[:] = [2.0, 0.5, -1.0]
    module = bn.to_torch()
    assert module.affine and not module.bias.requires_grad and module.weight.requires_grad
    np.testing.assert_array_equal(module.bias.detach().numpy(), 0.0)
    x = make_input((8, 3), np.float64, 1, kind="normal", seed=5)
    want = module(torch.from_numpy(x))
    np.testing.assert_allclose(bn(x), want.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = make_input((8, 3), np.float64, 1, kind="normal", seed=6)
    want.backward(torch.from_numpy(dy))
    bn.backward(dy)
    np.testing.assert_allclose(bn.grad_weight, module.weight.grad.numpy(), rtol=1e-12)
    assert bn.grad_bias is None and module.bias.grad is None


def test_decay_converts_to_one_minus_decay():
    bn = bncore.BatchNorm1d(3, decay=0.75, dtype=np.float64)
    module = bn.to_torch()
    assert module.momentum == 0.25
    for seed in range(3):
        x = make_input((8, 3), np.float64, 1, kind="normal", seed=seed)
        with torch.no_grad():
            module(torch.from_numpy(x))
        bn(x)
    _assert_same_state(bn, module, _tol(np.float64))


@pytest.mark.parametrize("options, problem", [
    (dict(unbiased_running_var=False), "unbiased_running_var=False"),
    (dict(activation="relu"), "activation='relu'"),
    (dict(nonfinite="raise"), "nonfinite='raise'"),
    (dict(axis=-1), "axis=-1"),
])
def test_strict_to_torch_refuses_what_torch_cannot_compute(options, problem):
    bn = bncore.BatchNorm2d(3, **options)
    with pytest.raises(ValueError, match=f"cannot express {problem}.*strict=False"):
        bn.to_torch()
    module = bn.to_torch(strict=False)  # dropped, by request
    assert isinstance(module, nn.BatchNorm2d) and module.num_features == 3


def test_generic_layer_has_no_torch_class():
    with pytest.raises(TypeError, match="any rank.*BatchNorm1d, BatchNorm2d or BatchNorm3d"):
        bncore.BatchNorm(3).to_torch()


def test_lazy_modules_convert_both_ways():
    bn = bncore.BatchNorm.from_torch(nn.LazyBatchNorm2d(momentum=0.2))
    assert type(bn) is bncore.BatchNorm2d and bn.num_features is None and bn.momentum == 0.2
    module = bn.to_torch()
    assert isinstance(module, nn.LazyBatchNorm2d)
    x = make_input((4, 5, 3, 3), np.float32, 1, kind="normal", seed=8)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn(x), want, rtol=1e-5, atol=1e-5)
    assert bn.num_features == module.num_features == 5
    # a materialised lazy module converts like any other
    again = bncore.BatchNorm.from_torch(module)
    _assert_same_state(again, module, dict(rtol=0, atol=0))


def test_sync_batch_norm_converts_to_the_generic_layer():
    module = nn.SyncBatchNorm(3)
    assert type(bncore.BatchNorm.from_torch(module)) is bncore.BatchNorm
    assert type(bncore.BatchNorm2d.from_torch(module)) is bncore.BatchNorm2d


def test_class_mismatch_and_non_batch_norm_are_type_errors():
    with pytest.raises(TypeError, match="converts to bncore.BatchNorm1d, not BatchNorm2d"):
        bncore.BatchNorm2d.from_torch(nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match="got LayerNorm"):
        bncore.BatchNorm.from_torch(nn.LayerNorm(3))


def test_inconsistent_torch_state_is_refused():
    module = nn.BatchNorm2d(3)
    module.track_running_stats = False  # buffers kept: torch would read, not update them
    with pytest.raises(ValueError, match="track_running_stats=False but running buffers present"):
        bncore.BatchNorm.from_torch(module)


def test_dtype_bncore_does_not_take_is_refused():
    module = nn.BatchNorm1d(3, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"float8_e4m3fn.*float32, float64, float16 or "
                                        r"bfloat16.*module.float\(\)"):
        bncore.BatchNorm.from_torch(module)


def test_uninitialised_lazy_module_without_parameters_or_buffers_is_lazy():
    module = nn.LazyBatchNorm2d(affine=False, track_running_stats=False, momentum=0.2)
    assert module.num_features == 0 and not module.has_uninitialized_params()
    bn = bncore.BatchNorm.from_torch(module)
    assert type(bn) is bncore.BatchNorm2d and bn.num_features is None
    assert (bn.affine, bn.track_running_stats, bn.momentum) == (False, False, 0.2)
    x = make_input((4, 5, 3, 3), np.float32, 1, kind="normal", seed=9)  # no tensor: default
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn(x), want, **_tol(np.float32))
    # torch keeps num_features at 0 once it has seen an input (nothing to size)
    assert module.num_features == 0 and bn.num_features == 5
    assert bncore.BatchNorm.from_torch(module).num_features is None


# --------------------------------------------------------------------------
# Half precision: float16 and bfloat16 layers keep float32 parameters
# (param_dtype); torch's half modules keep them in half.

HALF = [pytest.param("float16", id="float16"),
        pytest.param("bfloat16", id="bfloat16")]


def _half_layer_dtype(name):
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    return bncore.BatchNorm1d(1, dtype=name).dtype


def _half_input(shape, name, seed):
    """Random input in the half dtype, as a NumPy array and the same values
    as a torch tensor (converted by torch through float32, exactly)."""
    x32 = make_input(shape, np.float32, 1, kind="normal", seed=seed)
    tensor = torch.from_numpy(x32).to(getattr(torch, name))
    return tensor.float().numpy().astype(_half_layer_dtype(name)), tensor


def _trained_half_module(name):
    module = nn.BatchNorm2d(3, momentum=0.3, dtype=getattr(torch, name))
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
        module.bias.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1))
        for seed in range(2):
            module(_half_input((4, 3, 5, 6), name, seed)[1])
    return module


@pytest.mark.parametrize("name", HALF)
def test_half_module_converts_both_ways_bit_for_bit(name):
    module = _trained_half_module(name)
    bn = bncore.BatchNorm.from_torch(module)
    assert type(bn) is bncore.BatchNorm2d
    assert bn.dtype == _half_layer_dtype(name) and bn.param_dtype == np.float32
    assert (bn.momentum, bn.num_batches_tracked) == (0.3, 2)
    for key, value in module.state_dict().items():
        want = value.float().numpy() if value.is_floating_point() else value.numpy()
        np.testing.assert_array_equal(bn.state_dict()[key], want, err_msg=key)
        assert bn.state_dict()[key].dtype == want.dtype, key
    back = bn.to_torch()
    assert isinstance(back, nn.BatchNorm2d) and back.weight.dtype == getattr(torch, name)
    assert back.state_dict().keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert back.state_dict()[key].dtype == value.dtype, key
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("name", HALF)
def test_half_layer_to_torch_rounds_parameters_to_its_dtype(name):
    half = getattr(torch, name)
    _half_layer_dtype(name)     # bfloat16 layers need ml_dtypes: skip without it
    bn = bncore.BatchNorm2d(3, momentum=0.2, dtype=name)
    w, b, rm, rv = make_params(3, np.float32, seed=3)
    bn.load_state_dict(dict(weight=w, bias=b, running_mean=rm, running_var=rv,
                            num_batches_tracked=np.array(4)))
    module = bn.to_torch()
    assert isinstance(module, nn.BatchNorm2d) and module.training is True
    assert module.momentum == 0.2 and int(module.num_batches_tracked) == 4
    for key, value in bn.state_dict().items():
        if key != "num_batches_tracked":
            got = module.state_dict()[key]
            assert got.dtype == half, key
            assert torch.equal(got, torch.from_numpy(value).to(half)), key  # torch's rounding
    again = bncore.BatchNorm.from_torch(module)
    assert again.config() == bn.config()
    # eval: the same computation on the same (rounded) numbers
    module.eval()
    again.eval()
    x, tensor = _half_input((4, 3, 5, 6), name, seed=4)
    with torch.no_grad():
        want = module(tensor).float().numpy()
    got = again(x)
    assert got.dtype == x.dtype
    ulp = float(torch.finfo(half).eps)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2 * ulp, atol=2 * ulp)
