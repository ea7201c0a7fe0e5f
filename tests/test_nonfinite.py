"""NaN and infinity: a non-finite value poisons its own channel only, and
the ``nonfinite=`` policy decides whether the running statistics follow.

Channels are computed independently, so every other channel must come out
bitwise identical to a run on the same data with the bad channel cleaned.
"""

import copy
import math

import numpy as np
import pytest

import bncore
from conftest import DTYPE_PARAMS, LAYOUT_PARAMS, layout_id, make_input, make_params

BIG_LAYOUTS = [
    ((16, 3, 64, 64), 1),  # planar, parallel row-major items
    ((8, 16, 16, 32), -1),  # channels-last, parallel
    ((40000, 3), 1),  # interleaved (N, C), parallel row blocks
]
ALL_LAYOUT_PARAMS = LAYOUT_PARAMS + [pytest.param(lo, id=layout_id(lo)) for lo in BIG_LAYOUTS]

# (name, values written into the bad channel)
POISONS = {
    "nan": [np.nan],
    "inf": [np.inf],
    "-inf": [-np.inf],
    "inf-and-minus-inf": [np.inf, -np.inf],
}
#: where in the channel (its flat index along the reduced axes) the values go
WHERES = ["first", "middle", "last"]


def _channel_view(x, axis):
    """(C, n) view (when x is contiguous along the move) or copy of x."""
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _poison(x, axis, channel, values, where):
    """Copy of x with values written into channel `channel` at `where`."""
    bad = x.copy()
    moved = np.moveaxis(bad, axis, 0)  # a view: writes land in bad
    n = math.prod(moved.shape[1:])
    start = {"first": 0, "middle": n // 2, "last": n - len(values)}[where]
    for k, v in enumerate(values):
        moved[(channel,) + np.unravel_index(start + k, moved.shape[1:])] = v
    return bad


def _others(a, axis, channel):
    """Everything of a (per-channel vector or full array) but that channel."""
    a = np.asarray(a)
    if a.ndim == 1:
        return np.delete(a, channel)
    return np.delete(np.moveaxis(a, axis, 0), channel, axis=0)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


def _assert_others_identical(got, clean, axis, channel, what):
    np.testing.assert_array_equal(_bits(_others(got, axis, channel)),
                                  _bits(_others(clean, axis, channel)),
                                  err_msg=f"{what}: a clean channel changed")


def _setup(layout, dtype, seed):
    shape, axis = layout
    x = make_input(shape, dtype, axis, kind="normal", seed=seed)
    c = shape[axis]
    return x, axis, c, make_params(c, dtype, seed=seed)


# --------------------------------------------------------------------------
# What a non-finite value does (nonfinite="propagate", the default)


@pytest.mark.parametrize("where", WHERES)
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ALL_LAYOUT_PARAMS)
def test_training_poisons_only_its_channel(layout, dtype, poison, where):
    x, axis, c, (w, b, rm, rv) = _setup(layout, dtype, seed=700)
    k = c // 2
    bad = _poison(x, axis, k, POISONS[poison], where)

    rm_clean, rv_clean = rm.copy(), rv.copy()
    y_clean, mean_clean, inv_clean = bncore.batch_norm(
        x, rm_clean, rv_clean, w, b, training=True, axis=axis, return_stats=True)
    rm_bad, rv_bad = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm(bad, rm_bad, rv_bad, w, b, training=True,
                                        axis=axis, return_stats=True)

    # the bad channel: non-finite statistics, NaN everywhere in its output
    assert not np.isfinite(mean[k]), mean[k]
    assert not np.isfinite(invstd[k]), invstd[k]
    assert np.isnan(_channel_view(y, axis)[k]).all()
    assert not np.isfinite(rm_bad[k]) and not np.isfinite(rv_bad[k])  # poisoned (PyTorch)
    # every other channel: exactly the clean run
    _assert_others_identical(y, y_clean, axis, k, "output")
    _assert_others_identical(mean, mean_clean, axis, k, "mean")
    _assert_others_identical(invstd, inv_clean, axis, k, "invstd")
    _assert_others_identical(rm_bad, rm_clean, axis, k, "running_mean")
    _assert_others_identical(rv_bad, rv_clean, axis, k, "running_var")

    m, v = bncore.moments(bad, axis=axis)
    m0, v0 = bncore.moments(x, axis=axis)
    assert not np.isfinite(m[k]) and not np.isfinite(v[k])
    _assert_others_identical(m, m0, axis, k, "moments mean")
    _assert_others_identical(v, v0, axis, k, "moments var")


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ALL_LAYOUT_PARAMS)
def test_eval_poisons_only_its_own_value(layout, dtype, poison):
    """Eval normalises each value on its own: a bad input value gives a bad
    output at its position only; a bad running statistic poisons its
    channel only."""
    x, axis, c, (w, b, rm, rv) = _setup(layout, dtype, seed=701)
    k = c - 1
    bad = _poison(x, axis, k, POISONS[poison], "middle")
    y_clean = bncore.batch_norm(x, rm, rv, w, b, axis=axis)
    y = bncore.batch_norm(bad, rm, rv, w, b, axis=axis)
    poisoned = ~np.isfinite(bad)
    assert poisoned.sum() == 1
    assert not np.isfinite(y[poisoned]).any()
    np.testing.assert_array_equal(_bits(y[~poisoned]), _bits(y_clean[~poisoned]))

    # a non-finite running statistic (say loaded from a poisoned checkpoint)
    for name in ("running_mean", "running_var"):
        stats = {"running_mean": rm.copy(), "running_var": rv.copy()}
        stats[name][k] = POISONS[poison][0]
        y = bncore.batch_norm(x, stats["running_mean"], stats["running_var"], w, b, axis=axis)
        if name == "running_var" and poison == "inf":
            # invstd = 1/sqrt(inf) = 0: every value is normalised to bias
            np.testing.assert_array_equal(_channel_view(y, axis)[k], b[k])
        else:
            assert not np.isfinite(_channel_view(y, axis)[k]).any(), name
        _assert_others_identical(y, y_clean, axis, k, name)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ALL_LAYOUT_PARAMS)
def test_several_bad_channels(layout, dtype):
    x, axis, c, (w, b, rm, rv) = _setup(layout, dtype, seed=702)
    bad = _poison(x, axis, 0, [np.nan], "last")
    bad = _poison(bad, axis, c - 1, [np.inf], "first")
    y_clean = bncore.batch_norm(x, training=True, axis=axis)
    y = bncore.batch_norm(bad, training=True, axis=axis)
    yc = _channel_view(y, axis)
    assert np.isnan(yc[0]).all() and np.isnan(yc[c - 1]).all()
    if c > 2:
        keep = slice(1, c - 1)
        np.testing.assert_array_equal(
            _bits(np.moveaxis(y, axis, 0)[keep]), _bits(np.moveaxis(y_clean, axis, 0)[keep]))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ALL_LAYOUT_PARAMS[:4] + ALL_LAYOUT_PARAMS[-3:])
def test_backward_poisons_only_its_channel(layout, dtype):
    x, axis, c, (w, _, _, _) = _setup(layout, dtype, seed=703)
    dy = make_input(x.shape, dtype, axis, kind="normal", seed=704)
    k = c // 2
    bad = _poison(x, axis, k, [np.nan], "middle")
    results = []
    for data in (x, bad):
        _, mean, invstd = bncore.batch_norm(data, None, None, w, None, training=True,
                                            axis=axis, return_stats=True)
        results.append(bncore.batch_norm_backward(dy, data, mean, invstd, w, axis=axis))
    (dx0, gw0, gb0), (dx, gw, gb) = results
    assert np.isnan(_channel_view(dx, axis)[k]).all()
    assert np.isnan(gw[k])
    assert gb[k] == gb0[k]  # sum(dy) does not involve x
    _assert_others_identical(dx, dx0, axis, k, "grad_input")
    _assert_others_identical(gw, gw0, axis, k, "grad_weight")
    _assert_others_identical(gb, gb0, axis, k, "grad_bias")


# --------------------------------------------------------------------------
# nonfinite= in bncore.batch_norm

MODE_LAYOUTS = [((8, 3), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((16, 3, 64, 64), 1)]
MODE_LAYOUT_PARAMS = [pytest.param(lo, id=layout_id(lo)) for lo in MODE_LAYOUTS]


def _bad_batch(layout, dtype, seed=710):
    x, axis, c, params = _setup(layout, dtype, seed)
    return x, _poison(x, axis, c - 1, [np.nan], "middle"), axis, c, params


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", MODE_LAYOUT_PARAMS)
def test_skip_update_leaves_running_stats(layout, dtype):
    x, bad, axis, c, (w, b, rm, rv) = _bad_batch(layout, dtype)
    rm_p, rv_p = rm.copy(), rv.copy()
    want = bncore.batch_norm(bad, rm_p, rv_p, w, b, True, axis=axis, return_stats=True)
    rm_s, rv_s = rm.copy(), rv.copy()
    got = bncore.batch_norm(bad, rm_s, rv_s, w, b, True, axis=axis, return_stats=True,
                            nonfinite="skip_update")
    # the output and statistics are those of the default mode...
    for g, e in zip(got, want):
        np.testing.assert_array_equal(_bits(g), _bits(e))
    # ...but every channel of both running buffers is untouched
    np.testing.assert_array_equal(_bits(rm_s), _bits(rm))
    np.testing.assert_array_equal(_bits(rv_s), _bits(rv))
    assert not np.isfinite(rm_p[c - 1])  # while the default poisoned them

    # a finite batch updates as usual
    rm_f, rv_f = rm.copy(), rv.copy()
    rm_g, rv_g = rm.copy(), rv.copy()
    bncore.batch_norm(x, rm_f, rv_f, w, b, True, axis=axis)
    bncore.batch_norm(x, rm_g, rv_g, w, b, True, axis=axis, nonfinite="skip_update")
    assert not np.array_equal(rm_g, rm)
    np.testing.assert_array_equal(_bits(rm_g), _bits(rm_f))
    np.testing.assert_array_equal(_bits(rv_g), _bits(rv_f))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", MODE_LAYOUT_PARAMS)
def test_raise_names_channels_and_leaves_running_stats(layout, dtype):
    x, bad, axis, c, (w, b, rm, rv) = _bad_batch(layout, dtype)
    bad = _poison(bad, axis, 0, [np.inf], "first")
    want = bncore.batch_norm(bad, rm.copy(), rv.copy(), w, b, True, axis=axis)
    rm_r, rv_r = rm.copy(), rv.copy()
    out = np.zeros_like(bad)
    bad_before = bad.copy()
    with pytest.raises(FloatingPointError, match=rf"channel\(s\) 0, {c - 1} \(of {c}\)"):
        bncore.batch_norm(bad, rm_r, rv_r, w, b, True, axis=axis, out=out, nonfinite="raise")
    np.testing.assert_array_equal(_bits(rm_r), _bits(rm))
    np.testing.assert_array_equal(_bits(rv_r), _bits(rv))
    np.testing.assert_array_equal(_bits(bad), _bits(bad_before))
    # as documented: out holds the output the call would have returned
    np.testing.assert_array_equal(_bits(out), _bits(want))

    # in place, as documented: the input then holds that output
    inplace = bad.copy()
    with pytest.raises(FloatingPointError):
        bncore.batch_norm(inplace, rm_r, rv_r, w, b, True, axis=axis, out=inplace,
                          nonfinite="raise")
    np.testing.assert_array_equal(_bits(inplace), _bits(want))
    np.testing.assert_array_equal(_bits(rm_r), _bits(rm))

    # without running buffers it still raises: the mode asks to be told
    with pytest.raises(FloatingPointError):
        bncore.batch_norm(bad, training=True, axis=axis, nonfinite="raise")

    # a finite batch does not raise, and updates as usual
    rm_f, rv_f = rm.copy(), rv.copy()
    y = bncore.batch_norm(x, rm_r, rv_r, w, b, True, axis=axis, nonfinite="raise")
    y_f = bncore.batch_norm(x, rm_f, rv_f, w, b, True, axis=axis)
    np.testing.assert_array_equal(_bits(y), _bits(y_f))
    np.testing.assert_array_equal(_bits(rm_r), _bits(rm_f))
    np.testing.assert_array_equal(_bits(rv_r), _bits(rv_f))


def test_raise_message_lists_at_most_ten_channels():
    x = np.ones((4, 30), np.float64)
    x[0, :] = np.nan
    with pytest.raises(FloatingPointError,
                       match=r"channel\(s\) 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 20 more \(of 30\)"):
        bncore.batch_norm(x, training=True, nonfinite="raise")


@pytest.mark.parametrize("mode", ["skip_update", "raise"])
def test_eval_ignores_the_mode(mode):
    """Eval computes no statistics: nothing to skip, nothing to raise."""
    x, bad, axis, c, (w, b, rm, rv) = _bad_batch(((4, 3, 5, 6), 1), np.float32)
    y = bncore.batch_norm(bad, rm, rv, w, b, axis=axis, nonfinite=mode)
    want = bncore.batch_norm(bad, rm, rv, w, b, axis=axis)
    np.testing.assert_array_equal(_bits(y), _bits(want))


@pytest.mark.parametrize("mode", ["propagate", "skip_update", "raise"])
def test_empty_batch_is_not_nonfinite(mode):
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, _ = bncore.batch_norm(np.empty((0, 3, 4)), rm, rv, training=True,
                                   nonfinite=mode, return_stats=True)
    assert y.shape == (0, 3, 4) and np.isnan(mean).all()
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_overflow_of_a_float32_buffer_counts_as_nonfinite():
    """float64 data whose variance (1e40) a float32 running buffer cannot
    hold: the default writes inf, skip_update keeps the buffers; float64
    buffers hold it, so nothing is skipped there."""
    rng = np.random.default_rng(720)
    x = rng.standard_normal((64, 2))
    x[:, 1] *= 1e20
    rm32, rv32 = np.zeros(2, np.float32), np.ones(2, np.float32)
    with np.errstate(over="ignore"):
        bncore.batch_norm(x, rm32, rv32, training=True)
    assert np.isinf(rv32[1])  # propagate: poisoned

    rm32, rv32 = np.zeros(2, np.float32), np.ones(2, np.float32)
    bncore.batch_norm(x, rm32, rv32, training=True, nonfinite="skip_update")
    np.testing.assert_array_equal(rm32, 0)
    np.testing.assert_array_equal(rv32, 1)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1 \(of 2\)"):
        bncore.batch_norm(x, rm32, rv32, training=True, nonfinite="raise")

    rm64, rv64 = np.zeros(2), np.ones(2)
    bncore.batch_norm(x, rm64, rv64, training=True, nonfinite="raise")
    assert np.isfinite(rv64).all() and rv64[1] > 1e38


@pytest.mark.parametrize("bad", ["Propagate", "skip", "", None, 1, True, ["raise"],
                                 np.array("raise")])
def test_bad_nonfinite_value(bad):
    x, bad_x, axis, c, (w, b, rm, rv) = _bad_batch(((4, 3, 5, 6), 1), np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match="'propagate', 'skip_update', 'raise'"):
        bncore.batch_norm(x, rm, rv, w, b, True, axis=axis, out=out, nonfinite=bad)
    # rejected before anything was written
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    with pytest.raises(ValueError, match="'propagate', 'skip_update', 'raise'"):
        bncore.BatchNorm2d(3, nonfinite=bad)


# --------------------------------------------------------------------------
# nonfinite= in the layers


def _layer_batches(dtype, seed=730):
    x = make_input((4, 3, 5, 6), dtype, 1, kind="normal", seed=seed)
    x2 = make_input((4, 3, 5, 6), dtype, 1, kind="normal", seed=seed + 1)
    bad = _poison(x, 1, 1, [np.nan], "middle")
    return x, x2, bad


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_layer_propagate_is_the_default(dtype):
    x, _, bad = _layer_batches(dtype)
    bn = bncore.BatchNorm2d(3, dtype=dtype)
    assert bn.nonfinite == "propagate"
    bn(bad)
    assert bn.num_batches_tracked == 1
    assert np.isnan(bn.running_mean[1]) and np.isnan(bn.running_var[1])
    assert np.isfinite(np.delete(bn.running_mean, 1)).all()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_layer_skip_update(dtype, momentum):
    x, x2, bad = _layer_batches(dtype)
    bn = bncore.BatchNorm2d(3, momentum=momentum, dtype=dtype, nonfinite="skip_update")
    ref = bncore.BatchNorm2d(3, momentum=momentum, dtype=dtype)
    assert bn.nonfinite == "skip_update" and "skip_update" in repr(bn)
    y = bn(x)
    ref(x)
    state = copy.deepcopy(bn.state_dict())
    y_bad = bn(bad)
    # the output is returned as usual; running stats and the counter are not touched
    np.testing.assert_array_equal(_bits(y_bad), _bits(ref.forward(bad)))
    ref.load_state_dict(state)
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(getattr(bn, key)), value, err_msg=key)
    assert bn.num_batches_tracked == 1
    # the next good batch updates as if the bad one never came (with
    # momentum=None: weight 1/2, not 1/3)
    bn(x2)
    ref(x2)
    assert bn.num_batches_tracked == 2
    np.testing.assert_array_equal(_bits(bn.running_mean), _bits(ref.running_mean))
    np.testing.assert_array_equal(_bits(bn.running_var), _bits(ref.running_var))
    del y


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_layer_raise(dtype):
    x, _, bad = _layer_batches(dtype)
    bn = bncore.BatchNorm2d(3, dtype=dtype, nonfinite="raise")
    bn(x)
    grad_before = bn.backward(np.ones_like(x))
    state = copy.deepcopy(bn.state_dict())
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1 \(of 3\)"):
        bn(bad)
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(getattr(bn, key)), value, err_msg=key)
    # backward still refers to the last successful forward
    np.testing.assert_array_equal(bn.backward(np.ones_like(x)), grad_before)
    # eval reads the running statistics: no statistics computed, no raise
    bn.eval()
    y = bn(bad)
    assert np.isnan(y[:, 1]).sum() == 1


def test_layer_raise_without_running_stats():
    """A layer without running statistics computes batch statistics in both
    modes, so "raise" applies in both."""
    x, _, bad = _layer_batches(np.float32)
    bn = bncore.BatchNorm2d(3, track_running_stats=False, nonfinite="raise")
    bn(x)
    for mode in (True, False):
        bn.train(mode)
        with pytest.raises(FloatingPointError):
            bn(bad)


def test_layer_mode_can_change():
    x, _, bad = _layer_batches(np.float32)
    bn = bncore.BatchNorm2d(3)
    bn.nonfinite = "raise"
    with pytest.raises(FloatingPointError):
        bn(bad)
    bn.nonfinite = "bogus"
    with pytest.raises(ValueError, match="nonfinite"):
        bn(x)
    assert bn.num_batches_tracked == 0
