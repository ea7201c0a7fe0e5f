"""The Keras/ONNX/Flax conventions as layer options: ``decay`` (the weight of
the running value) and ``unbiased_running_var=False`` (the biased batch
variance in running_var) - against the float64 reference, which computes
both from their definitions; and the docstring's table of defaults against
the real libraries where installed."""

import inspect
import re

import numpy as np
import pytest

import bncore
from bncore import reference
from conftest import DTYPE_PARAMS, assert_output_close, make_input


def _train_steps(bn, batches):
    """Run training forwards; returns the outputs."""
    return [bn(x) for x in batches]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("decay, unbiased", [(0.99, False), (0.9, False), (0.7, True),
                                             (None, False)])
@pytest.mark.parametrize("layout", [((8, 3), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)],
                         ids=["NC", "NCHW", "NHWC"])
def test_training_follows_the_convention(layout, decay, unbiased, dtype):
    shape, axis = layout
    c = shape[axis]
    options = dict(unbiased_running_var=unbiased, axis=axis, dtype=dtype)
    if decay is not None:
        options["decay"] = decay
    bn = bncore.BatchNorm(c, **options)
    rm, rv = np.zeros(c), np.ones(c)
    batches = [make_input(shape, dtype, axis, kind="normal", seed=s) for s in range(4)]
    for x in batches:
        y = bn(x)
        want = reference.batch_norm(x, rm, rv, training=True, axis=axis, decay=decay,
                                    unbiased_running_var=unbiased)
        rm, rv = want.running_mean, want.running_var
        assert_output_close(y, want.y, dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(bn.running_mean, rm, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.running_var, rv, rtol=tol)
    assert bn.num_batches_tracked == len(batches)
    # and eval normalises with those running statistics
    bn.eval()
    x = batches[0]
    assert_output_close(bn(x), reference.batch_norm(x, rm, rv, axis=axis).y, dtype)


def test_decay_is_the_running_values_weight():
    """One step by hand: decay 0.75 keeps 3/4 of the running value; the
    biased variance of [0, 2] is 1, the unbiased 2."""
    x = np.array([[0.0], [2.0]])
    for unbiased, var in ((False, 1.0), (True, 2.0)):
        bn = bncore.BatchNorm(1, decay=0.75, unbiased_running_var=unbiased, dtype=np.float64)
        bn(x)
        assert bn.running_mean[0] == 0.75 * 0.0 + 0.25 * 1.0
        assert bn.running_var[0] == 0.75 * 1.0 + 0.25 * var


def test_decay_matches_momentum_one_minus_decay():
    a = bncore.BatchNorm1d(3, decay=0.875, dtype=np.float64)
    b = bncore.BatchNorm1d(3, momentum=0.125, dtype=np.float64)
    for s in range(3):
        x = make_input((16, 3), np.float64, 1, kind="normal", seed=20 + s)
        a(x), b(x)
    np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-15)


@pytest.mark.parametrize("momentum", [0.5, None, 0.0])
def test_decay_with_a_non_default_momentum_is_refused(momentum):
    with pytest.raises(ValueError, match="momentum.*decay|decay.*momentum"):
        bncore.BatchNorm2d(3, momentum=momentum, decay=0.9)


@pytest.mark.parametrize("decay, exc", [(1.5, ValueError), (-0.1, ValueError),
                                        ("0.9", TypeError), (True, TypeError)])
def test_bad_decay(decay, exc):
    with pytest.raises(exc, match="decay"):
        bncore.BatchNorm2d(3, decay=decay)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_unbiased_running_var_must_be_a_bool(value):
    with pytest.raises(TypeError, match="unbiased_running_var"):
        bncore.BatchNorm2d(3, unbiased_running_var=value)


def test_momentum_changed_after_construction_is_refused_before_any_update():
    bn = bncore.BatchNorm1d(3, decay=0.9)
    bn.momentum = 0.3
    x = make_input((8, 3), np.float32, 1, kind="normal", seed=3)
    with pytest.raises(ValueError, match="decay"):
        bn(x)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)


def test_attributes_and_repr():
    bn = bncore.BatchNorm2d(4, decay=0.99, unbiased_running_var=False)
    assert bn.decay == 0.99 and bn.unbiased_running_var is False
    assert bn.momentum == 0.1  # untouched; decay rules
    text = repr(bn)
    assert "decay=0.99" in text and "unbiased_running_var=False" in text
    assert "momentum" not in text
    # PyTorch's options alone keep PyTorch's repr
    assert repr(bncore.BatchNorm2d(4)) == (
        "BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        "axis=1, dtype=float32)")


# --------------------------------------------------------------------------
# The docstring's table of conventions, against the libraries themselves.

def table_row(label):
    """The cells of a row of BatchNorm's conventions table (also used by
    test_interop_keras, which checks the Keras column)."""
    for line in bncore.BatchNorm.__doc__.splitlines():
        if line.strip().startswith(label):
            return line.strip()[len(label):].split()
    raise AssertionError(f"no row {label!r} in BatchNorm's docstring")


LIBRARIES = ["PyTorch", "Keras", "ONNX", "Flax"]


def test_table_lists_the_libraries_in_order():
    header = next(line for line in bncore.BatchNorm.__doc__.splitlines()
                  if "PyTorch" in line and "Keras" in line)
    assert re.findall(r"PyTorch|Keras|ONNX|Flax", header) == LIBRARIES


def _library_defaults(name):
    """(momentum, eps) defaults read from the installed library."""
    if name == "PyTorch":
        torch = pytest.importorskip("torch")
        layer = torch.nn.BatchNorm2d(3)
        return layer.momentum, layer.eps
    if name == "ONNX":
        onnx = pytest.importorskip("onnx")
        schema = onnx.defs.get_schema("BatchNormalization")
        return (schema.attributes["momentum"].default_value.f,
                schema.attributes["epsilon"].default_value.f)
    flax = pytest.importorskip("flax.linen")
    fields = inspect.signature(flax.BatchNorm).parameters
    return fields["momentum"].default, fields["epsilon"].default


# (Keras's column is checked in test_interop_keras, which imports Keras anyway.)
@pytest.mark.parametrize("library", ["PyTorch", "ONNX", "Flax"])
def test_table_defaults_match_the_library(library):
    momentum, eps = _library_defaults(library)
    column = LIBRARIES.index(library)
    assert float(table_row("momentum default")[column]) == pytest.approx(momentum, rel=1e-6)
    assert float(table_row("eps default")[column]) == pytest.approx(eps, rel=1e-6)
