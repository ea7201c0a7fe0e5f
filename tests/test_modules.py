"""BatchNorm / BatchNorm1d / 2d / 3d: construction, modes, running statistics,
state dicts, input checks - against the reference."""

import numpy as np
import pytest

import bncore
from bncore import reference
from conftest import (
    DTYPE_PARAMS,
    assert_output_close,
    assert_stats_close,
    channel_condition,
    channel_spread,
    make_input,
    make_params,
)

MODULES = {
    "BatchNorm1d-2d": (bncore.BatchNorm1d, (8, 4)),
    "BatchNorm1d-3d": (bncore.BatchNorm1d, (5, 4, 6)),
    "BatchNorm2d": (bncore.BatchNorm2d, (3, 4, 5, 6)),
    "BatchNorm3d": (bncore.BatchNorm3d, (2, 4, 3, 4, 5)),
    "BatchNorm-2d": (bncore.BatchNorm, (8, 4)),
    "BatchNorm-4d": (bncore.BatchNorm, (3, 4, 5, 6)),
    "BatchNorm-6d": (bncore.BatchNorm, (2, 4, 2, 3, 2, 2)),
}


def _state(bn):
    """Deep copy of everything that a failed call must not change."""
    return {
        name: (None if getattr(bn, name) is None else np.array(getattr(bn, name), copy=True))
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }


def _assert_state_equal(bn, state):
    for name, value in state.items():
        now = getattr(bn, name)
        if value is None:
            assert now is None, name
        else:
            np.testing.assert_array_equal(np.asarray(now), value, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("cls", [bncore.BatchNorm, bncore.BatchNorm1d, bncore.BatchNorm2d,
                                 bncore.BatchNorm3d])
def test_defaults(cls, dtype):
    bn = cls(5, dtype=dtype)
    assert bn.training is True
    for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                       ("running_var", 1.0)):
        a = getattr(bn, name)
        assert isinstance(a, np.ndarray), name
        assert a.dtype == dtype, name
        assert a.shape == (5,), name
        np.testing.assert_array_equal(a, fill)
    assert bn.num_batches_tracked == 0
    assert isinstance(bn.num_batches_tracked, (int, np.integer))


def test_default_dtype_is_float32():
    bn = bncore.BatchNorm2d(3)
    assert bn.weight.dtype == np.float32
    assert bn.running_var.dtype == np.float32


def test_affine_false_and_no_tracking():
    bn = bncore.BatchNorm2d(3, affine=False)
    assert bn.weight is None and bn.bias is None
    assert bn.running_mean is not None
    bn = bncore.BatchNorm2d(3, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None
    assert bn.num_batches_tracked is None
    assert bn.weight is not None


def test_train_eval_return_module():
    bn = bncore.BatchNorm1d(3)
    assert bn.eval() is bn
    assert bn.training is False
    assert bn.train() is bn
    assert bn.training is True
    assert bn.train(False) is bn
    assert bn.training is False
    assert bn.train(mode=True) is bn
    assert bn.training is True


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("name", list(MODULES))
def test_training_steps_then_eval(name, dtype, affine, momentum):
    cls, shape = MODULES[name]
    c = shape[1]
    bn = cls(c, eps=1e-4, momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        w, b, _, _ = make_params(c, dtype, seed=30)
        bn.weight[...] = w
        bn.bias[...] = b
    ref_rm, ref_rv = np.zeros(c), np.ones(c)
    for step in range(1, 4):
        x = make_input(shape, dtype, 1, seed=30 + step)
        before = x.copy()
        y = bn(x)
        factor = 1.0 / step if momentum is None else momentum
        ref = reference.batch_norm(x, ref_rm, ref_rv, bn.weight, bn.bias, True, factor,
                                   1e-4)
        ref_rm, ref_rv = ref.running_mean, ref.running_var
        np.testing.assert_array_equal(x, before)
        assert y.dtype == dtype and y.shape == shape
        assert_output_close(y, ref.y, dtype)
        assert bn.num_batches_tracked == step
        assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
        assert_stats_close(bn.running_mean, ref_rm, dtype, scale=channel_spread(x, 1),
                           what="running_mean")
        assert_stats_close(bn.running_var, ref_rv, dtype, what="running_var",
                           cond=channel_condition(x, 1))

    bn.eval()
    x = make_input(shape, dtype, 1, seed=40)
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(x)
    ref = reference.batch_norm(x, rm0, rv0, bn.weight, bn.bias, False, 0.1, 1e-4)
    assert_output_close(y, ref.y, dtype)
    np.testing.assert_array_equal(bn.running_mean, rm0)
    np.testing.assert_array_equal(bn.running_var, rv0)
    assert bn.num_batches_tracked == 3  # eval does not count


def test_cumulative_average_is_plain_mean_of_batches():
    bn = bncore.BatchNorm1d(2, momentum=None, dtype=np.float64)
    means, variances = [], []
    for step in range(5):
        x = make_input((10, 2), np.float64, 1, kind="normal", seed=50 + step)
        bn(x)
        m, v = reference.moments(x, ddof=1)
        means.append(m)
        variances.append(v)
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=1e-12)
    assert bn.num_batches_tracked == 5


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_counts_but_keeps_running_stats(momentum):
    """The contract: num_batches_tracked increments on every training call
    when tracking (PyTorch does the same for an empty batch); the running
    statistics are left untouched by a batch without values."""
    bn = bncore.BatchNorm1d(3, momentum=momentum, dtype=np.float64)
    y = bn(np.zeros((0, 3)))
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)
    assert bn.num_batches_tracked == 1
    x = np.full((4, 3), 2.0)
    bn(x)
    assert bn.num_batches_tracked == 2
    # cumulative: the second call weighs 1/2, like torch
    expected = 0.1 * 2.0 if momentum is not None else 0.5 * 2.0
    np.testing.assert_allclose(bn.running_mean, expected, rtol=1e-15)


def test_momentum_counts_batches_even_when_not_cumulative():
    bn = bncore.BatchNorm1d(2, momentum=0.1)
    for _ in range(4):
        bn(make_input((6, 2), np.float32, 1, seed=1))
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_no_tracking_uses_batch_stats_in_eval(dtype):
    bn = bncore.BatchNorm2d(4, track_running_stats=False, dtype=dtype)
    w, b, _, _ = make_params(4, dtype, seed=60)
    bn.weight[...] = w
    bn.bias[...] = b
    x = make_input((3, 4, 5, 5), dtype, 1, seed=60)
    y_train = bn(x)
    ref = reference.batch_norm(x, None, None, w, b, True)
    assert_output_close(y_train, ref.y, dtype)
    bn.eval()
    y_eval = bn(x)
    assert_output_close(y_eval, ref.y, dtype)
    assert bn.running_mean is None and bn.num_batches_tracked is None


def test_channels_last_module():
    bn = bncore.BatchNorm(3, axis=-1, dtype=np.float64)
    x = make_input((4, 5, 6, 3), np.float64, -1, seed=61)
    y = bn(x)
    ref = reference.batch_norm(x, np.zeros(3), np.ones(3), None, None, True, 0.1, axis=-1)
    assert_output_close(y, ref.y, np.float64)
    assert_stats_close(bn.running_mean, ref.running_mean, np.float64,
                       scale=channel_spread(x, -1))
    assert_stats_close(bn.running_var, ref.running_var, np.float64,
                       cond=channel_condition(x, -1))


def test_eval_one_sample_ok_train_one_value_errors():
    bn = bncore.BatchNorm1d(3)
    x = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(x)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0)
    bn.eval()
    y = bn(x)
    np.testing.assert_allclose(y, 1 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_reset_running_stats():
    bn = bncore.BatchNorm1d(3, dtype=np.float64)
    bn.weight[...] = 2.0
    for s in range(2):
        bn(make_input((8, 3), np.float64, 1, seed=s))
    assert bn.num_batches_tracked == 2
    assert not np.all(bn.running_mean == 0)
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    assert bn.running_mean.dtype == np.float64
    np.testing.assert_array_equal(bn.weight, 2.0)  # parameters are kept


def test_reset_parameters():
    bn = bncore.BatchNorm1d(3)
    bn.weight[...] = 2.0
    bn.bias[...] = -1.0
    bn(make_input((8, 3), np.float32, 1, seed=0))
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    assert bn.weight.dtype == np.float32


def test_reset_without_affine_or_tracking():
    bn = bncore.BatchNorm1d(3, affine=False, track_running_stats=False)
    bn.reset_running_stats()
    bn.reset_parameters()
    assert bn.weight is None and bn.running_mean is None


# ---------------------------------------------------------------- state dicts

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_keys_and_types(affine, track):
    bn = bncore.BatchNorm2d(4, affine=affine, track_running_stats=track)
    sd = bn.state_dict()
    expected = set()
    if affine:
        expected |= {"weight", "bias"}
    if track:
        expected |= {"running_mean", "running_var", "num_batches_tracked"}
    assert set(sd) == expected
    for key, value in sd.items():
        assert isinstance(value, np.ndarray), key
    if track:
        nbt = sd["num_batches_tracked"]
        assert nbt.shape == () and nbt.dtype == np.int64 and nbt == 0
        assert sd["running_mean"].dtype == np.float32


def test_state_dict_returns_copies():
    bn = bncore.BatchNorm1d(3)
    sd = bn.state_dict()
    sd["weight"][...] = 5.0
    sd["running_mean"][...] = 5.0
    np.testing.assert_array_equal(bn.weight, 1.0)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    bn(make_input((4, 3), np.float32, 1, seed=0))
    np.testing.assert_array_equal(sd["running_var"], 1.0)  # not a live view
    assert sd["num_batches_tracked"] == 0


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_state_dict_round_trip(dtype):
    src = bncore.BatchNorm2d(4, momentum=0.3, dtype=dtype)
    src.weight[...], src.bias[...] = make_params(4, dtype, seed=70)[:2]
    for s in range(3):
        src(make_input((3, 4, 3, 3), dtype, 1, seed=70 + s))
    dst = bncore.BatchNorm2d(4, momentum=0.3, dtype=dtype)
    dst.load_state_dict(src.state_dict())
    for key, value in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[key], value, err_msg=key)
    assert dst.num_batches_tracked == 3
    assert dst.weight.dtype == dtype and dst.running_var.dtype == dtype
    x = make_input((3, 4, 3, 3), dtype, 1, seed=79)
    np.testing.assert_array_equal(dst(x), src(x))
    src.eval(), dst.eval()
    np.testing.assert_array_equal(dst(x), src(x))


def test_loaded_state_is_not_shared_with_dict():
    src = bncore.BatchNorm1d(3)
    sd = src.state_dict()
    dst = bncore.BatchNorm1d(3)
    dst.load_state_dict(sd)
    sd["weight"][...] = 9.0
    sd["running_var"][...] = 9.0
    np.testing.assert_array_equal(dst.weight, 1.0)
    np.testing.assert_array_equal(dst.running_var, 1.0)


def test_load_state_dict_casts_to_module_dtype():
    bn = bncore.BatchNorm1d(3)  # float32
    sd = {"weight": np.full(3, 2.0), "bias": np.full(3, 0.5),
          "running_mean": np.arange(3.0), "running_var": np.full(3, 4.0),
          "num_batches_tracked": np.array(7)}
    bn.load_state_dict(sd)
    assert bn.weight.dtype == np.float32 and bn.running_mean.dtype == np.float32
    np.testing.assert_array_equal(bn.running_mean, [0, 1, 2])
    assert bn.num_batches_tracked == 7
    bn.eval()
    y = bn(np.zeros((2, 3), np.float32))
    np.testing.assert_allclose(y[0], 2.0 * (0 - np.arange(3)) / np.sqrt(4 + 1e-5) + 0.5,
                               rtol=1e-6)


def test_load_state_dict_accepts_lists():
    bn = bncore.BatchNorm1d(2, affine=False)
    bn.load_state_dict({"running_mean": [1.0, 2.0], "running_var": [3.0, 4.0],
                        "num_batches_tracked": 2})
    np.testing.assert_array_equal(bn.running_mean, [1, 2])
    assert bn.num_batches_tracked == 2


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("cls, good, bad", [
    (bncore.BatchNorm1d, [(4, 3), (4, 3, 5)], [(4, 3, 5, 6), (2, 4, 3, 5, 6)]),
    (bncore.BatchNorm2d, [(4, 3, 5, 6)], [(4, 3), (4, 3, 5), (2, 4, 3, 5, 6)]),
    (bncore.BatchNorm3d, [(2, 3, 3, 2, 2)], [(4, 3), (4, 3, 5), (4, 3, 5, 6)]),
    (bncore.BatchNorm, [(4, 3), (4, 3, 5), (2, 3, 2, 2, 2, 2)], [(3,)]),
])
def test_ndim_checks(cls, good, bad):
    bn = cls(3)
    for shape in good:
        y = bn(np.ones(shape, np.float32) + np.arange(3, dtype=np.float32).reshape(
            (1, 3) + (1,) * (len(shape) - 2)))
        assert y.shape == shape
    for shape in bad:
        state = _state(bn)
        with pytest.raises(ValueError):
            bn(np.ones(shape, np.float32))
        _assert_state_equal(bn, state)


@pytest.mark.parametrize("training", [True, False])
def test_wrong_dtype_is_type_error(training):
    bn = bncore.BatchNorm2d(3).train(training)
    state = _state(bn)
    with pytest.raises(TypeError):
        bn(np.ones((2, 3, 4, 4), np.float64))
    _assert_state_equal(bn, state)
    bn64 = bncore.BatchNorm2d(3, dtype=np.float64).train(training)
    with pytest.raises(TypeError):
        bn64(np.ones((2, 3, 4, 4), np.float32))
    with pytest.raises(TypeError):
        bn64(np.ones((2, 3, 4, 4), np.int64))


@pytest.mark.parametrize("training", [True, False])
def test_wrong_num_features_is_value_error(training):
    bn = bncore.BatchNorm2d(3).train(training)
    state = _state(bn)
    with pytest.raises(ValueError):
        bn(np.ones((2, 4, 4, 4), np.float32))
    _assert_state_equal(bn, state)
    bn_last = bncore.BatchNorm(3, axis=-1)
    with pytest.raises(ValueError):
        bn_last(np.ones((2, 3, 4, 4), np.float32))  # axis -1 has 4


@pytest.mark.parametrize("num_features, exc", [(0, ValueError), (-2, ValueError),
                                               (3.0, TypeError), ("3", TypeError),
                                               (True, TypeError)])
def test_bad_num_features(num_features, exc):
    with pytest.raises(exc, match="num_features"):
        bncore.BatchNorm2d(num_features)


def _good_sd(c=3):
    return {"weight": np.full(c, 2.0, np.float32), "bias": np.full(c, 0.5, np.float32),
            "running_mean": np.full(c, 0.25, np.float32),
            "running_var": np.full(c, 3.0, np.float32),
            "num_batches_tracked": np.array(5, np.int64)}


def _bad_sd(kind):
    sd = _good_sd()
    if kind == "missing-running_var":
        del sd["running_var"]
    elif kind == "missing-num_batches_tracked":
        del sd["num_batches_tracked"]
    elif kind == "unexpected":
        sd["running_std"] = np.ones(3, np.float32)
    elif kind == "shape-running_var":
        sd["running_var"] = np.ones(4, np.float32)
    elif kind == "shape-weight-2d":
        sd["weight"] = np.ones((3, 1), np.float32)
    elif kind == "shape-nbt":
        sd["num_batches_tracked"] = np.array([5, 5])
    elif kind == "int-weight":
        sd["weight"] = np.ones(3, np.int64)
    elif kind == "bool-running_mean":
        sd["running_mean"] = np.ones(3, bool)
    elif kind == "complex-bias":
        sd["bias"] = np.ones(3, np.complex128)
    return sd


@pytest.mark.parametrize("kind, exc", [
    ("missing-running_var", ValueError), ("missing-num_batches_tracked", ValueError),
    ("unexpected", ValueError), ("shape-running_var", ValueError),
    ("shape-weight-2d", ValueError), ("shape-nbt", ValueError),
    ("int-weight", TypeError), ("bool-running_mean", TypeError),
    ("complex-bias", TypeError),
])
def test_load_state_dict_rejects_all_or_nothing(kind, exc):
    bn = bncore.BatchNorm1d(3)
    bn(make_input((4, 3), np.float32, 1, seed=80))
    state = _state(bn)
    with pytest.raises(exc):
        bn.load_state_dict(_bad_sd(kind))
    _assert_state_equal(bn, state)  # nothing loaded, not even the good entries


def test_load_state_dict_keys_follow_flags():
    bn = bncore.BatchNorm1d(3, affine=False)
    with pytest.raises(ValueError):
        bn.load_state_dict(_good_sd())  # weight/bias unexpected
    bn = bncore.BatchNorm1d(3, track_running_stats=False)
    sd = _good_sd()
    with pytest.raises(ValueError):
        bn.load_state_dict(sd)  # running stats unexpected
    bn.load_state_dict({"weight": sd["weight"], "bias": sd["bias"]})
    np.testing.assert_array_equal(bn.weight, 2.0)


def test_a_layer_pickled_before_the_newer_options_still_works():
    """bncore 0.1.0 layers have no decay, activation, scale/center, ...:
    unpickled, they take the constructor's defaults."""
    bn = bncore.BatchNorm1d(3)
    state = bn.__getstate__()
    for newer in ("decay", "unbiased_running_var", "activation", "scale", "center",
                  "param_dtype", "_fold_cache"):
        state.pop(newer)
    old = bncore.BatchNorm1d.__new__(bncore.BatchNorm1d)
    old.__setstate__(state)
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    np.testing.assert_array_equal(old(x), bncore.BatchNorm1d(3)(x))
    assert list(old.state_dict()) == list(bn.state_dict())
    assert old.fold()[0].shape == (3,)
