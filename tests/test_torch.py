"""bncore against PyTorch itself: functional outputs and running statistics,
and modules loaded from a torch BatchNorm's state_dict.

Data here are unit-scale ("normal" and "heavy" channels, no 1e4 offsets):
torch's float32 CPU kernel accumulates in float32 and is not the oracle for
adversarial data - the reference is (see test_numerics). Tolerances:
float64 1e-12 relative (+1e-12 absolute on unit-scale outputs), both sides
near-exact; float32 1e-5 on outputs and 1e-5 relative on running statistics,
since torch's own float32 statistics carry errors of order 1e-6.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bncore  # noqa: E402
from conftest import DTYPE_PARAMS, make_input, make_params  # noqa: E402

TORCH_LAYOUTS = [
    pytest.param(((8, 3), 1), id="NC"),
    pytest.param(((5, 4, 7), 1), id="NCL"),
    pytest.param(((4, 3, 5, 6), 1), id="NCHW"),
    pytest.param(((2, 3, 3, 4, 5), 1), id="NCDHW"),
    pytest.param(((7, 3, 5, 3), 1), id="odd"),
    pytest.param(((4, 5, 6, 3), -1), id="NHWC"),
    pytest.param(((6, 7, 4), -1), id="NLC"),
    pytest.param(((9, 1, 4, 4), 1), id="C1"),
]


def _tols(dtype):
    return (1e-12, 1e-12) if dtype == np.float64 else (1e-5, 1e-5)


def _data(shape, dtype, axis, seed):
    # alternate unit-scale kinds so both appear in every layout
    kind = "normal" if seed % 2 == 0 else "heavy"
    return make_input(shape, dtype, axis, kind=kind, seed=seed)


def _to_torch_layout(x, axis):
    """torch wants channels at dim 1."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1)))


def _from_torch_layout(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


@pytest.mark.parametrize("momentum", [0.1, 0.7])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", TORCH_LAYOUTS)
def test_functional_vs_torch(layout, dtype, training, momentum):
    shape, axis = layout
    c = shape[axis]
    w, b, rm, rv = make_params(c, dtype, seed=90)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    rtol, atol = _tols(dtype)
    for step in range(3):
        x = _data(shape, dtype, axis, seed=90 + step)
        y = bncore.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5, axis=axis)
        ty = torch.nn.functional.batch_norm(
            _to_torch_layout(x, axis), t_rm, t_rv, torch.from_numpy(w), torch.from_numpy(b),
            training, momentum, 1e-5)
        np.testing.assert_allclose(y, _from_torch_layout(ty, axis), rtol=rtol, atol=atol)
        np.testing.assert_allclose(rm, t_rm.numpy(), rtol=rtol, atol=atol)
        np.testing.assert_allclose(rv, t_rv.numpy(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_functional_without_running_stats_vs_torch(dtype):
    x = _data((6, 4, 5), dtype, 1, seed=95)
    y = bncore.batch_norm(x, training=True)
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
    rtol, atol = _tols(dtype)
    np.testing.assert_allclose(y, ty.numpy(), rtol=rtol, atol=atol)


def test_one_value_per_channel_message_matches_torch():
    x = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError) as torch_err:
        torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
    with pytest.raises(ValueError) as our_err:
        bncore.batch_norm(x, training=True)
    key = "Expected more than 1 value per channel when training"
    assert key in str(torch_err.value)
    assert key in str(our_err.value)


MODULE_CASES = [
    pytest.param(torch.nn.BatchNorm1d, bncore.BatchNorm1d, (8, 4), id="1d-2D"),
    pytest.param(torch.nn.BatchNorm1d, bncore.BatchNorm1d, (5, 4, 6), id="1d-3D"),
    pytest.param(torch.nn.BatchNorm2d, bncore.BatchNorm2d, (3, 4, 5, 6), id="2d"),
    pytest.param(torch.nn.BatchNorm3d, bncore.BatchNorm3d, (2, 4, 3, 4, 5), id="3d"),
    pytest.param(torch.nn.BatchNorm2d, bncore.BatchNorm, (3, 4, 5, 6), id="generic-4D"),
]


def _torch_module(tcls, c, dtype, seed, **kwargs):
    tbn = tcls(c, **kwargs)
    if dtype == np.float64:
        tbn = tbn.double()
    w, b, rm, rv = make_params(c, dtype, seed)
    with torch.no_grad():
        if tbn.weight is not None:
            tbn.weight.copy_(torch.from_numpy(w))
            tbn.bias.copy_(torch.from_numpy(b))
        if tbn.running_mean is not None:
            tbn.running_mean.copy_(torch.from_numpy(rm))
            tbn.running_var.copy_(torch.from_numpy(rv))
            tbn.num_batches_tracked.fill_(3)
    return tbn


def _compare_modules(bn, tbn, dtype):
    rtol, atol = _tols(dtype)
    for key, value in tbn.state_dict().items():
        ours = np.asarray(bn.state_dict()[key])
        if key == "num_batches_tracked":
            assert int(ours) == int(value), key
        else:
            np.testing.assert_allclose(ours, value.numpy(), rtol=rtol, atol=atol, err_msg=key)
    assert set(bn.state_dict()) == set(tbn.state_dict())


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="cumulative"),
    pytest.param({"momentum": 0.3, "eps": 1e-3}, id="momentum0.3"),
    pytest.param({"affine": False}, id="noaffine"),
    pytest.param({"track_running_stats": False}, id="notrack"),
])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("tcls, bcls, shape", MODULE_CASES)
def test_module_loaded_from_torch_state_dict(tcls, bcls, shape, dtype, kwargs):
    c = shape[1]
    tbn = _torch_module(tcls, c, dtype, seed=100, **kwargs)
    bn = bcls(c, dtype=dtype, **kwargs)
    bn.load_state_dict(tbn.state_dict())  # torch tensors accepted as they are
    _compare_modules(bn, tbn, dtype)
    rtol, atol = _tols(dtype)

    for mode in ("eval", "train", "train", "train", "eval"):
        tbn.train(mode == "train")
        bn.train(mode == "train")
        x = _data(shape, dtype, 1, seed=101)
        with torch.no_grad():
            ty = tbn(torch.from_numpy(x)).numpy()
        y = bn(x)
        assert y.dtype == dtype
        np.testing.assert_allclose(y, ty, rtol=rtol, atol=atol, err_msg=mode)
        _compare_modules(bn, tbn, dtype)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_module_like_torch(momentum):
    tbn = torch.nn.BatchNorm1d(3, momentum=momentum)
    bn = bncore.BatchNorm1d(3, momentum=momentum)
    for x in (np.zeros((0, 3), np.float32), _data((5, 3), np.float32, 1, seed=7)):
        with torch.no_grad():
            ty = tbn(torch.from_numpy(x)).numpy()
        y = bn(x)
        assert y.shape == ty.shape
        np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
        _compare_modules(bn, tbn, np.float32)


def test_state_dict_into_torch():
    """Our state_dict loads into torch (same keys, compatible values)."""
    bn = bncore.BatchNorm2d(3)
    for s in range(2):
        bn(make_input((4, 3, 2, 2), np.float32, 1, kind="normal", seed=s))
    tbn = torch.nn.BatchNorm2d(3)
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                         bn.state_dict().items()})
    tbn.eval()
    bn.eval()
    x = make_input((4, 3, 2, 2), np.float32, 1, kind="normal", seed=9)
    with torch.no_grad():
        np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).numpy(), rtol=1e-5,
                                   atol=1e-5)
    assert int(tbn.num_batches_tracked) == 2
