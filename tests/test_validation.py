"""Bad input: the right exception type, a message naming the argument, and
nothing modified (input, running buffers, weight, bias, out) when a call
raises.

Each case starts from a valid *training* call with running statistics,
weight, bias and an ``out`` buffer, and breaks one thing; a correct
implementation must reject it before writing any array, so a running
statistic that moved or an ``out`` that was written is a failure too.
"""

import numpy as np
import pytest

import bncore
from bncore import reference

C = 3
SHAPE = (4, C, 5)


def _base(dtype=np.float32):
    rng = np.random.default_rng(400)
    return {
        "input": rng.standard_normal(SHAPE).astype(dtype),
        "running_mean": rng.standard_normal(C).astype(dtype),
        "running_var": rng.uniform(0.5, 2, C).astype(dtype),
        "weight": rng.normal(1, 0.3, C).astype(dtype),
        "bias": rng.normal(0, 1, C).astype(dtype),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
        "axis": 1,
        "out": np.full(SHAPE, -7.0, dtype),
        "num_threads": None,
    }


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _strided(a):
    big = np.zeros(2 * a.size, a.dtype)
    big[::2] = a
    return big[::2]


def _overlap(kw):
    """input and out share memory, shifted by one element."""
    buf = np.zeros(int(np.prod(SHAPE)) + 1, np.float32)
    kw["input"] = buf[:-1].reshape(SHAPE)
    kw["input"][...] = np.random.default_rng(1).standard_normal(SHAPE)
    kw["out"] = buf[1:].reshape(SHAPE)


def _overlap_strided(kw):
    """A C-contiguous out inside the buffer that a strided input lives in."""
    buf = np.zeros((4, 2 * C, 5), np.float32)
    buf[:, ::2] = np.random.default_rng(2).standard_normal(SHAPE)
    kw["input"] = buf[:, ::2]
    kw["out"] = buf.reshape(-1)[: int(np.prod(SHAPE))].reshape(SHAPE)


def _set(**changes):
    def apply(kw):
        for k, v in changes.items():
            kw[k] = v(kw) if callable(v) and not isinstance(v, type) else v
    return apply


# (id, mutation, exception, names the message must contain (any of))
CASES = [
    # ---- TypeError
    ("input-int32", _set(input=lambda kw: kw["input"].astype(np.int32)), TypeError, ["input"]),
    ("input-int64", _set(input=lambda kw: np.arange(60).reshape(SHAPE)), TypeError, ["input"]),
    ("input-bool", _set(input=lambda kw: kw["input"] > 0), TypeError, ["input"]),
    ("input-complex", _set(input=lambda kw: kw["input"].astype(np.complex128)), TypeError,
     ["input"]),
    ("input-object", _set(input=lambda kw: kw["input"].astype(object)), TypeError, ["input"]),
    ("input-longdouble", _set(input=lambda kw: kw["input"].astype(np.longdouble)),
     TypeError, ["input"]),
    ("input-uint8", _set(input=lambda kw: np.zeros(SHAPE, np.uint8)), TypeError, ["input"]),
    ("weight-int", _set(weight=lambda kw: np.ones(C, np.int64)), TypeError, ["weight"]),
    ("weight-bool", _set(weight=lambda kw: np.ones(C, bool)), TypeError, ["weight"]),
    ("weight-complex", _set(weight=lambda kw: np.ones(C, np.complex64)), TypeError, ["weight"]),
    ("bias-int", _set(bias=lambda kw: np.zeros(C, np.int32)), TypeError, ["bias"]),
    ("bias-object", _set(bias=lambda kw: np.array([None] * C)), TypeError, ["bias"]),
    ("running_mean-list", _set(running_mean=lambda kw: [0.0] * C), TypeError, ["running_mean"]),
    ("running_var-list", _set(running_var=lambda kw: [1.0] * C), TypeError, ["running_var"]),
    ("running_mean-int", _set(running_mean=lambda kw: np.zeros(C, np.int64)), TypeError,
     ["running_mean"]),
    ("running_var-float16", _set(running_var=lambda kw: np.ones(C, np.float16)), TypeError,
     ["running_var"]),
    ("running_var-scalar", _set(running_var=1.0), TypeError, ["running_var"]),
    ("out-list", _set(out=lambda kw: kw["out"].tolist()), TypeError, ["out"]),
    ("out-dtype", _set(out=lambda kw: np.zeros(SHAPE, np.float64)), TypeError, ["out"]),
    ("out-int", _set(out=lambda kw: np.zeros(SHAPE, np.int32)), TypeError, ["out"]),
    ("num_threads-float", _set(num_threads=2.0), TypeError, ["num_threads"]),
    ("num_threads-str", _set(num_threads="2"), TypeError, ["num_threads"]),
    ("num_threads-bool", _set(num_threads=True), TypeError, ["num_threads"]),
    ("momentum-None", _set(momentum=None), TypeError, ["momentum"]),
    ("momentum-str", _set(momentum="0.1"), TypeError, ["momentum"]),
    ("axis-float", _set(axis=1.0), TypeError, ["axis"]),
    ("axis-str", _set(axis="1"), TypeError, ["axis"]),
    # ---- ValueError
    ("input-1d", _set(input=lambda kw: np.ones(5, np.float32),
                      out=lambda kw: np.zeros(5, np.float32)), ValueError, ["input"]),
    ("input-0d", _set(input=lambda kw: np.float32(1.0), out=None), ValueError, ["input"]),
    ("axis-too-big", _set(axis=3), ValueError, ["axis"]),
    ("axis-too-negative", _set(axis=-4), ValueError, ["axis"]),
    ("weight-shape", _set(weight=lambda kw: np.ones(C + 1, np.float32)), ValueError, ["weight"]),
    ("weight-2d", _set(weight=lambda kw: np.ones((C, 1), np.float32)), ValueError, ["weight"]),
    ("bias-shape", _set(bias=lambda kw: np.zeros(C - 1, np.float32)), ValueError, ["bias"]),
    ("running_mean-shape", _set(running_mean=lambda kw: np.zeros(C + 2, np.float32)),
     ValueError, ["running_mean"]),
    ("running_var-shape", _set(running_var=lambda kw: np.ones(1, np.float32)), ValueError,
     ["running_var"]),
    ("running_var-2d", _set(running_var=lambda kw: np.ones((1, C), np.float32)), ValueError,
     ["running_var"]),
    ("running_mean-readonly", _set(running_mean=lambda kw: _readonly(kw["running_mean"])),
     ValueError, ["running_mean"]),
    ("running_var-readonly", _set(running_var=lambda kw: _readonly(kw["running_var"])),
     ValueError, ["running_var"]),
    ("running_mean-strided", _set(running_mean=lambda kw: _strided(kw["running_mean"])),
     ValueError, ["running_mean"]),
    ("running_var-strided", _set(running_var=lambda kw: _strided(kw["running_var"])),
     ValueError, ["running_var"]),
    ("only-running_mean", _set(running_var=None), ValueError, ["running_mean", "running_var"]),
    ("only-running_var", _set(running_mean=None), ValueError, ["running_mean", "running_var"]),
    ("eval-without-running", _set(training=False, running_mean=None, running_var=None),
     ValueError, ["running_mean", "running_var"]),
    ("one-value-per-channel", _set(input=lambda kw: np.ones((1, C), np.float32),
                                   out=lambda kw: np.zeros((1, C), np.float32)),
     ValueError, ["Expected more than 1 value per channel when training"]),
    ("one-value-per-channel-4d", _set(input=lambda kw: np.ones((1, C, 1, 1), np.float32),
                                      out=None),
     ValueError, ["Expected more than 1 value per channel when training"]),
    ("momentum-negative", _set(momentum=-0.1), ValueError, ["momentum"]),
    ("momentum-above-one", _set(momentum=1.5), ValueError, ["momentum"]),
    ("momentum-nan", _set(momentum=float("nan")), ValueError, ["momentum"]),
    ("eps-negative", _set(eps=-1e-5), ValueError, ["eps"]),
    ("out-shape", _set(out=lambda kw: np.zeros((4, C, 6), np.float32)), ValueError, ["out"]),
    ("out-fortran", _set(out=lambda kw: np.asfortranarray(kw["out"])), ValueError, ["out"]),
    ("out-strided", _set(out=lambda kw: np.zeros((8, C, 5), np.float32)[::2]), ValueError,
     ["out"]),
    ("out-readonly", _set(out=lambda kw: _readonly(kw["out"])), ValueError, ["out"]),
    ("out-overlaps-input", _overlap, ValueError, ["out"]),
    ("out-overlaps-input-strided", _overlap_strided, ValueError, ["out"]),
    ("num_threads-zero", _set(num_threads=0), ValueError, ["num_threads"]),
    ("num_threads-negative", _set(num_threads=-2), ValueError, ["num_threads"]),
]


def _snapshot(kw):
    return {k: np.array(v, copy=True) for k, v in kw.items()
            if isinstance(v, np.ndarray) and v.dtype != object}


@pytest.mark.parametrize("mutate, exc, names", [pytest.param(m, e, n, id=i)
                                                for i, m, e, n in CASES])
def test_batch_norm_rejects(mutate, exc, names):
    kw = _base()
    mutate(kw)
    before = _snapshot(kw)
    args = [kw.pop(k) for k in ("input", "running_mean", "running_var", "weight", "bias",
                                "training", "momentum", "eps")]
    with pytest.raises(exc) as info:
        bncore.batch_norm(*args, **kw)
    msg = str(info.value)
    assert any(name in msg for name in names), f"message {msg!r} names none of {names}"
    after = {"input": args[0], "running_mean": args[1], "running_var": args[2],
             "weight": args[3], "bias": args[4], "out": kw["out"]}
    for key, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), value,
                                      err_msg=f"{key} was modified by a failing call")


@pytest.mark.parametrize("training", [True, False])
def test_out_may_be_exactly_input(training):
    kw = _base()
    x = kw["input"]
    expected = bncore.batch_norm(x.copy(), kw["running_mean"].copy(), kw["running_var"].copy(),
                                 kw["weight"], kw["bias"], training)
    res = bncore.batch_norm(x, kw["running_mean"], kw["running_var"], kw["weight"],
                            kw["bias"], training, out=x)
    assert res is x
    np.testing.assert_array_equal(x, expected)


def test_out_in_separate_memory_is_fine():
    """A non-overlapping view of a bigger buffer, C-contiguous, is a valid out."""
    kw = _base()
    buf = np.zeros((2,) + SHAPE, np.float32)
    out = buf[1]
    assert out.flags.c_contiguous
    res = bncore.batch_norm(kw["input"], training=True, out=out)
    assert res is out
    np.testing.assert_array_equal(buf[0], 0)
    np.testing.assert_array_equal(out, bncore.batch_norm(kw["input"], training=True))


@pytest.mark.parametrize("momentum", [0, 1, 0.0, 1.0, np.float32(0.5), np.float64(0.25)])
def test_momentum_edges_accepted(momentum):
    kw = _base()
    bncore.batch_norm(kw["input"], kw["running_mean"], kw["running_var"], training=True,
                      momentum=momentum)


def test_eps_zero_accepted():
    kw = _base()
    y = bncore.batch_norm(kw["input"], training=True, eps=0.0)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("num_threads", [1, 2, np.int64(3)])
def test_num_threads_integers_accepted(num_threads):
    kw = _base()
    bncore.batch_norm(kw["input"], training=True, num_threads=num_threads)


# ---------------------------------------------------------------- moments

MOMENT_CASES = [
    ("int", dict(x=np.arange(12).reshape(4, 3)), TypeError, ["x", "input"]),
    ("bool", dict(x=np.ones((4, 3), bool)), TypeError, ["x", "input"]),
    ("complex", dict(x=np.ones((4, 3), complex)), TypeError, ["x", "input"]),
    ("longdouble", dict(x=np.ones((4, 3), np.longdouble)), TypeError, ["x", "input"]),
    ("1d", dict(x=np.ones(4)), ValueError, ["x", "input"]),
    ("axis-range", dict(x=np.ones((4, 3)), axis=2), ValueError, ["axis"]),
    ("axis-float", dict(x=np.ones((4, 3)), axis=1.0), TypeError, ["axis"]),
    ("threads-zero", dict(x=np.ones((4, 3)), num_threads=0), ValueError, ["num_threads"]),
    ("threads-bool", dict(x=np.ones((4, 3)), num_threads=True), TypeError, ["num_threads"]),
    ("ddof-negative", dict(x=np.ones((4, 3)), ddof=-1), ValueError, ["ddof"]),
    ("ddof-float", dict(x=np.ones((4, 3)), ddof=1.0), TypeError, ["ddof"]),
]


@pytest.mark.parametrize("kwargs, exc, names", [pytest.param(k, e, n, id=i)
                                                for i, k, e, n in MOMENT_CASES])
def test_moments_rejects(kwargs, exc, names):
    x = kwargs.pop("x")
    before = x.copy()
    with pytest.raises(exc) as info:
        bncore.moments(x, **kwargs)
    assert any(name in str(info.value) for name in names), str(info.value)
    np.testing.assert_array_equal(x, before)


# -- found in review: aliasing per-channel arrays, misalignment, casts ------

def _misaligned(shape, dtype):
    """A C-contiguous array of dtype whose data sit one byte off alignment."""
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape))
    buffer = np.zeros(count * itemsize + 1, np.uint8)
    array = np.ndarray(shape, dtype, buffer=buffer, offset=1)
    assert array.flags.c_contiguous and not array.flags.aligned
    return array


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_out_overlapping_a_per_channel_array_is_refused(name):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 64)).astype(np.float32)
    out = np.zeros_like(x)
    arrays = {"weight": np.ones(3, np.float32), "bias": np.zeros(3, np.float32),
              "running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    arrays[name] = out.reshape(-1)[5:8]  # shares out's memory
    arrays[name][:] = 1.0
    before = out.copy()
    with pytest.raises(ValueError, match=f"out overlaps {name}"):
        bncore.batch_norm(x, arrays["running_mean"], arrays["running_var"], arrays["weight"],
                          arrays["bias"], training=False, out=out)
    np.testing.assert_array_equal(out, before)


def test_backward_out_overlapping_weight_is_refused():
    x = np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match="out overlaps weight"):
        bncore.batch_norm_backward(np.ones_like(x), x, mean, invstd, out.reshape(-1)[:3],
                                   out=out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_input_is_copied_and_misaligned_out_refused(dtype):
    rng = np.random.default_rng(7)
    x = _misaligned((8, 3, 40), dtype)
    x[...] = rng.standard_normal(x.shape)
    expected = reference.batch_norm(x, training=True)
    np.testing.assert_allclose(bncore.batch_norm(x, training=True), expected.y, atol=1e-5)
    mean, var = bncore.moments(x)
    np.testing.assert_allclose(var, reference.moments(x)[1], rtol=1e-6)
    dy = _misaligned(x.shape, dtype)
    dy[...] = 1.0
    _, m, s = bncore.batch_norm(x, training=True, return_stats=True)
    grads = bncore.batch_norm_backward(dy, x, m, s)
    np.testing.assert_allclose(grads[0], bncore.batch_norm_backward(dy.copy(), x.copy(), m,
                                                                    s)[0])
    out = _misaligned(x.shape, dtype)
    with pytest.raises(ValueError, match="out must be aligned"):
        bncore.batch_norm(x, training=True, out=out)


def test_running_update_that_overflows_on_cast_writes_neither_buffer():
    """float64 statistics too large for float32 running buffers: with
    overflow raising, the call raises before either buffer is written."""
    x = np.array([[1.0, -3e38], [3.0, 3e38]])
    running_mean, running_var = np.zeros(2, np.float32), np.ones(2, np.float32)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        bncore.batch_norm(x, running_mean, running_var, training=True)
    np.testing.assert_array_equal(running_mean, [0, 0])
    np.testing.assert_array_equal(running_var, [1, 1])


def test_compiled_entry_points_refuse_impossible_sizes_instead_of_crashing():
    """The private kernels trust functional.py, but a wrong call from Python
    must still be an exception (it was a SIGFPE: a division by zero)."""
    from bncore import _kernels

    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="must be positive"):
        _kernels.normalize(x, x.copy(), -1, -1, 64, None, None, 1e-5, None, None, 1)
    with pytest.raises(ValueError, match="num_threads"):
        _kernels.copy(x, x.copy(), True, 0)
    with pytest.raises(TypeError, match="aligned"):
        _kernels.moments(_misaligned((4,), np.float32), 2, 2, 1, np.zeros(2), np.zeros(2), 1)


def test_training_that_has_no_truth_value_is_a_type_error_naming_it():
    x = np.ones((3, 2))
    with pytest.raises(TypeError, match="training"):
        bncore.batch_norm(x, training=np.array([True, False]))
    with pytest.raises(TypeError, match="training"):
        bncore.batch_norm_backward(x, x, np.zeros(2), np.ones(2), training=np.array([1, 0]))
