"""bncore.batch_norm against the float64 reference: every layout, both dtypes,
training and eval, momentum, affine, running statistics, return_stats, out=,
and input layouts that are not C-contiguous."""

import numpy as np
import pytest

import bncore
from bncore import reference
from conftest import (
    DTYPE_PARAMS,
    LARGE_LAYOUT_PARAMS,
    LAYOUT_PARAMS,
    assert_output_close,
    assert_stats_close,
    channel_condition,
    channel_spread,
    make_input,
    make_params,
    n_channels,
)


def _check_against_reference(x, axis, dtype, *, training, affine, running, momentum=0.1,
                             eps=1e-5, seed=0):
    c = n_channels(x.shape, axis)
    weight, bias, rm, rv = make_params(c, dtype, seed)
    if not affine:
        weight = bias = None
    if not running:
        rm = rv = None
    x_before = x.copy()
    w_before = None if weight is None else weight.copy()
    b_before = None if bias is None else bias.copy()
    rm_arg = None if rm is None else rm.copy()
    rv_arg = None if rv is None else rv.copy()

    y, mean, invstd = bncore.batch_norm(
        x, rm_arg, rv_arg, weight, bias, training, momentum, eps,
        axis=axis, return_stats=True,
    )
    ref = reference.batch_norm(x, rm, rv, weight, bias, training, momentum, eps, axis=axis)

    assert isinstance(y, np.ndarray)
    assert y.dtype == dtype
    assert y.shape == x.shape
    assert y.flags.c_contiguous
    assert y is not x
    np.testing.assert_array_equal(x, x_before)  # input untouched
    if affine:
        np.testing.assert_array_equal(weight, w_before)
        np.testing.assert_array_equal(bias, b_before)
    assert_output_close(y, ref.y, dtype)

    assert mean.dtype == np.float64 and invstd.dtype == np.float64
    assert mean.shape == (c,) and invstd.shape == (c,)
    spread = channel_spread(x, axis)
    cond = channel_condition(x, axis)
    if training:
        assert_stats_close(mean, ref.mean, dtype, scale=spread, what="mean")
        assert_stats_close(invstd, ref.invstd, dtype, what="invstd", cond=cond)
    else:
        # eval: the running statistics themselves, converted to float64
        np.testing.assert_array_equal(mean, rm.astype(np.float64))
        assert_stats_close(invstd, ref.invstd, np.float64, what="invstd")

    if running:
        assert rm_arg.dtype == dtype and rv_arg.dtype == dtype
        if training:
            # running buffers hold dtype; compare at float32 accuracy when
            # either the data or the buffer is float32.
            assert_stats_close(rm_arg, ref.running_mean, dtype, scale=momentum * spread,
                               what="running_mean")
            assert_stats_close(rv_arg, ref.running_var, dtype, what="running_var",
                               cond=cond)
        else:
            np.testing.assert_array_equal(rm_arg, rm)
            np.testing.assert_array_equal(rv_arg, rv)
    return y


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("running", [True, False], ids=["running", "norunning"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_training_matches_reference(layout, dtype, affine, running, momentum):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=len(shape))
    _check_against_reference(x, axis, dtype, training=True, affine=affine,
                             running=running, momentum=momentum)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_eval_matches_reference(layout, dtype, affine):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=1)
    _check_against_reference(x, axis, dtype, training=False, affine=affine, running=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LARGE_LAYOUT_PARAMS)
def test_large_matches_reference(layout, dtype, training):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=3)
    _check_against_reference(x, axis, dtype, training=training, affine=True, running=True)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-3, 0.5])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_eps(dtype, eps):
    # no constant channels here: eps=0 would divide by zero
    x = make_input((6, 4, 5), dtype, 1, kind="normal", seed=7)
    for training in (True, False):
        _check_against_reference(x, 1, dtype, training=training, affine=True,
                                 running=True, eps=eps)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", [LAYOUT_PARAMS[2], LAYOUT_PARAMS[4], LAYOUT_PARAMS[7]])
def test_running_stats_over_steps(layout, dtype, momentum):
    shape, axis = layout
    c = n_channels(shape, axis)
    _, _, rm, rv = make_params(c, dtype, seed=2)
    ref_rm, ref_rv = rm.astype(np.float64), rv.astype(np.float64)
    for step in range(5):
        x = make_input(shape, dtype, axis, seed=100 + step)
        bncore.batch_norm(x, rm, rv, training=True, momentum=momentum, axis=axis)
        ref = reference.batch_norm(x, ref_rm, ref_rv, training=True, momentum=momentum,
                                   axis=axis)
        ref_rm, ref_rv = ref.running_mean, ref.running_var
        # errors of earlier steps decay geometrically; scale the mean's by
        # the largest channel magnitude seen so far
        assert_stats_close(rm, ref_rm, dtype, scale=channel_spread(x, axis),
                           what=f"running_mean step {step}")
        assert_stats_close(rv, ref_rv, dtype, what=f"running_var step {step}",
                           cond=channel_condition(x, axis))
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, make_params(c, dtype, seed=2)[2])
        np.testing.assert_array_equal(rv, make_params(c, dtype, seed=2)[3])


def test_momentum_one_gives_batch_stats():
    x = make_input((20, 3, 4), np.float64, 1, kind="normal", seed=4)
    rm, rv = np.full(3, 5.0), np.full(3, 7.0)
    bncore.batch_norm(x, rm, rv, training=True, momentum=1.0)
    mean, var = reference.moments(x, ddof=1)
    np.testing.assert_allclose(rm, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, var, rtol=1e-12)


def test_running_var_uses_unbiased_variance():
    # n = 4 values per channel: unbiased = 4/3 * biased, far outside any tolerance
    x = np.array([[0.0], [1.0], [2.0], [3.0]])  # (N=4, C=1)
    rm, rv = np.zeros(1), np.ones(1)
    y, mean, invstd = bncore.batch_norm(x, rm, rv, training=True, momentum=1.0,
                                        return_stats=True)
    np.testing.assert_allclose(rv, [5.0 / 3.0], rtol=1e-15)
    np.testing.assert_allclose(rm, [1.5], rtol=1e-15)
    np.testing.assert_allclose(invstd, [1.0 / np.sqrt(1.25 + 1e-5)], rtol=1e-15)
    np.testing.assert_allclose(y[:, 0], (x[:, 0] - 1.5) / np.sqrt(1.25 + 1e-5), rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_mixed_dtype_parameters(dtype):
    """weight/bias/running buffers of the other float dtype are accepted; the
    output keeps the input dtype and the buffers keep theirs."""
    other = np.float64 if dtype == np.float32 else np.float32
    x = make_input((6, 3, 4), dtype, 1, kind="normal", seed=5)
    w, b, rm, rv = make_params(3, other, seed=5)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bncore.batch_norm(x, rm, rv, w, b, training=True)
    ref = reference.batch_norm(x, rm0, rv0, w, b, training=True)
    assert y.dtype == dtype
    assert rm.dtype == other and rv.dtype == other
    assert_output_close(y, ref.y, dtype)
    loose = np.float32  # one of data/buffer is float32
    assert_stats_close(rm, ref.running_mean, loose, scale=0.1 * channel_spread(x, 1))
    assert_stats_close(rv, ref.running_var, loose)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", [LAYOUT_PARAMS[0], LAYOUT_PARAMS[2], LAYOUT_PARAMS[4]])
def test_out_argument(layout, dtype, training):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=6)
    c = n_channels(shape, axis)
    w, b, rm, rv = make_params(c, dtype, seed=6)
    expected = bncore.batch_norm(x, rm.copy(), rv.copy(), w, b, training, axis=axis)
    out = np.full(shape, np.nan, dtype=dtype)
    res = bncore.batch_norm(x, rm.copy(), rv.copy(), w, b, training, axis=axis, out=out)
    assert res is out
    np.testing.assert_array_equal(out, expected)

    res, mean, invstd = bncore.batch_norm(x, rm.copy(), rv.copy(), w, b, training,
                                          axis=axis, out=out, return_stats=True)
    assert res is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", [LAYOUT_PARAMS[1], LAYOUT_PARAMS[3], LAYOUT_PARAMS[5],
                                    LARGE_LAYOUT_PARAMS[0], LARGE_LAYOUT_PARAMS[3]])
def test_in_place(layout, dtype, training):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=8)
    c = n_channels(shape, axis)
    w, b, rm, rv = make_params(c, dtype, seed=8)
    rm1, rv1 = rm.copy(), rv.copy()
    expected, emean, einvstd = bncore.batch_norm(x, rm1, rv1, w, b, training, axis=axis,
                                                 return_stats=True)
    buf = x.copy()
    rm2, rv2 = rm.copy(), rv.copy()
    res, mean, invstd = bncore.batch_norm(buf, rm2, rv2, w, b, training, axis=axis,
                                          out=buf, return_stats=True)
    assert res is buf
    # in place must give the same bits: the statistics are read before writing
    np.testing.assert_array_equal(buf, expected)
    np.testing.assert_array_equal(mean, emean)
    np.testing.assert_array_equal(invstd, einvstd)
    np.testing.assert_array_equal(rm2, rm1)
    np.testing.assert_array_equal(rv2, rv1)


def _strided_variants(x):
    """Non-C-contiguous arrays equal to x."""
    big = np.zeros((2 * x.shape[0],) + x.shape[1:], dtype=x.dtype)
    big[::2] = x
    wide = np.zeros(x.shape[:-1] + (x.shape[-1] * 3,), dtype=x.dtype)
    wide[..., 1::3] = x
    rev = np.ascontiguousarray(x[::-1])[::-1]
    return {
        "fortran": np.asfortranarray(x),
        "every-other-row": big[::2],
        "strided-last": wide[..., 1::3],
        "negative-stride": rev,
        "transposed": np.ascontiguousarray(x.T).T,
    }


@pytest.mark.parametrize("variant", ["fortran", "every-other-row", "strided-last",
                                     "negative-stride", "transposed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", [LAYOUT_PARAMS[0], LAYOUT_PARAMS[2], LAYOUT_PARAMS[4],
                                    LAYOUT_PARAMS[7]])
def test_non_contiguous_input(layout, dtype, training, variant):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=9)
    c = n_channels(shape, axis)
    w, b, rm, rv = make_params(c, dtype, seed=9)
    rm1, rv1 = rm.copy(), rv.copy()
    expected, emean, einvstd = bncore.batch_norm(x, rm1, rv1, w, b, training, axis=axis,
                                                 return_stats=True)
    xs = _strided_variants(x)[variant]
    assert not xs.flags.c_contiguous
    np.testing.assert_array_equal(xs, x)
    before = xs.copy()
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm(xs, rm2, rv2, w, b, training, axis=axis,
                                        return_stats=True)
    np.testing.assert_array_equal(xs, before)
    assert y.flags.c_contiguous and y.shape == shape and y.dtype == dtype
    # copied once into C order, then the same kernel: the same bits
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(mean, emean)
    np.testing.assert_array_equal(invstd, einvstd)
    np.testing.assert_array_equal(rm2, rm1)
    np.testing.assert_array_equal(rv2, rv1)


def test_non_contiguous_input_with_out():
    x = make_input((6, 4, 5), np.float32, 1, seed=10)
    xf = np.asfortranarray(x)
    out = np.empty_like(x)
    res = bncore.batch_norm(xf, training=True, out=out)
    assert res is out
    np.testing.assert_array_equal(out, bncore.batch_norm(x, training=True))


def test_non_contiguous_parameters():
    x = make_input((6, 4, 5), np.float64, 1, seed=11)
    w, b, rm, rv = make_params(8, np.float64, seed=11)
    # eval only reads the running statistics: strided ones are accepted
    y = bncore.batch_norm(x, rm[::2], rv[::2], w[::2], b[1::2], False)
    ref = reference.batch_norm(x, rm[::2], rv[::2], w[::2], b[1::2], False)
    assert_output_close(y, ref.y, np.float64)
    # training writes them, so they must be contiguous; weight/bias need not be
    y = bncore.batch_norm(x, rm[::2].copy(), rv[::2].copy(), w[::2], b[1::2], True)
    ref = reference.batch_norm(x, rm[::2], rv[::2], w[::2], b[1::2], True)
    assert_output_close(y, ref.y, np.float64)


def test_list_input():
    data = [[1.0, 2.0], [3.0, 5.0], [4.0, -1.0]]
    y = bncore.batch_norm(data, training=True)
    ref = reference.batch_norm(np.array(data), training=True)
    assert y.dtype == np.float64
    assert_output_close(y, ref.y, np.float64)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_eval_accepts_read_only_running_stats(dtype):
    x = make_input((5, 3, 4), dtype, 1, seed=12)
    w, b, rm, rv = make_params(3, dtype, seed=12)
    rm.flags.writeable = False
    rv.flags.writeable = False
    w.flags.writeable = False
    x.flags.writeable = False
    y = bncore.batch_norm(x, rm, rv, w, b, training=False)
    ref = reference.batch_norm(x, rm, rv, w, b, training=False)
    assert_output_close(y, ref.y, dtype)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_axis_spellings_agree(dtype):
    x = make_input((3, 4, 5, 6), dtype, -1, seed=13)
    a = bncore.batch_norm(x, training=True, axis=-1, return_stats=True)
    b = bncore.batch_norm(x, training=True, axis=3, return_stats=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = bncore.batch_norm(x, training=True, axis=1, return_stats=True)
    d = bncore.batch_norm(x, training=True, axis=-3, return_stats=True)
    for u, v in zip(c, d):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_channels_last_equals_moved_axis(dtype):
    """axis=-1 on (N, H, W, C) is axis=1 on the moved (N, C, H, W) array."""
    x = make_input((4, 5, 6, 3), dtype, -1, seed=14)
    w, b, rm, rv = make_params(3, dtype, seed=14)
    y_last = bncore.batch_norm(x, rm.copy(), rv.copy(), w, b, True, axis=-1)
    y_first = bncore.batch_norm(np.moveaxis(x, -1, 1), rm.copy(), rv.copy(), w, b, True)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(y_last, np.moveaxis(y_first, 1, -1), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape, axis", [((0, 4), 1), ((0, 3, 5), 1), ((4, 3, 0), 1),
                                         ((2, 0, 3), -1), ((0, 2, 2, 3), -1)])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_empty_batch(shape, axis, dtype):
    c = n_channels(shape, axis)
    x = np.zeros(shape, dtype)
    w, b, rm, rv = make_params(c, dtype, seed=15)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm(x, rm, rv, w, b, True, axis=axis, return_stats=True)
    assert y.shape == shape and y.dtype == dtype
    assert mean.shape == (c,) and invstd.shape == (c,)
    assert np.isnan(mean).all() and np.isnan(invstd).all()
    np.testing.assert_array_equal(rm, rm0)  # running statistics untouched
    np.testing.assert_array_equal(rv, rv0)

    y = bncore.batch_norm(x, rm, rv, w, b, False, axis=axis)
    assert y.shape == shape and y.dtype == dtype
    y = bncore.batch_norm(x, training=True, axis=axis)
    assert y.shape == shape
    out = np.empty(shape, dtype)
    assert bncore.batch_norm(x, rm, rv, training=True, axis=axis, out=out) is out


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 1), (1, 2, 1, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_one_value_per_channel(shape, dtype):
    x = np.arange(np.prod(shape), dtype=dtype).reshape(shape) + 1
    c = shape[1]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bncore.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bncore.batch_norm(x, training=True)
    # eval with one value per channel is fine (batch-1 inference)
    y = bncore.batch_norm(x, rm, rv, training=False)
    ref = reference.batch_norm(x, rm, rv, training=False)
    assert_output_close(y, ref.y, dtype)


def test_channels_last_one_value_per_channel():
    x = np.ones((1, 1, 1, 5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bncore.batch_norm(x, training=True, axis=-1)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_return_stats_false_returns_array(dtype):
    x = make_input((4, 3), dtype, 1, seed=16)
    y = bncore.batch_norm(x, training=True)
    assert isinstance(y, np.ndarray) and y.shape == x.shape
    y2 = bncore.batch_norm(x, training=True, return_stats=False)
    np.testing.assert_array_equal(y, y2)


def test_positional_order_matches_torch():
    """input, running_mean, running_var, weight, bias, training, momentum, eps"""
    x = make_input((8, 3, 2), np.float64, 1, kind="normal", seed=17)
    w, b, rm, rv = make_params(3, np.float64, seed=17)
    rm1, rv1 = rm.copy(), rv.copy()
    y = bncore.batch_norm(x, rm1, rv1, w, b, True, 0.3, 1e-3)
    ref = reference.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-3)
    assert_output_close(y, ref.y, np.float64)
    assert_stats_close(rm1, ref.running_mean, np.float64, scale=0.3 * channel_spread(x, 1))
    assert_stats_close(rv1, ref.running_var, np.float64)


def test_eval_default_is_eval():
    """training defaults to False: running statistics are used and kept."""
    x = make_input((8, 3), np.float64, 1, kind="normal", seed=18)
    w, b, rm, rv = make_params(3, np.float64, seed=18)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bncore.batch_norm(x, rm, rv, w, b)
    assert_output_close(y, reference.batch_norm(x, rm0, rv0, w, b).y, np.float64)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
