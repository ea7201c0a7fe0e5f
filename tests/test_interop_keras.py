"""BatchNorm.from_keras_weights against a real Keras 3 BatchNormalization
(on the PyTorch backend): eval output, and the output and moving statistics
over training calls (``training=True``), for channels-last and
channels-first layouts and with scale/center off.

Keras computes the batch variance as E[x^2] - E[x]^2 in the layer's dtype;
on these unit-scale data that costs a few float32 roundings, inside the
float32 tolerance of 1e-5. Only float32, Keras's default, is compared: a
Keras 3.15 layer with dtype="float64" on the torch backend returned outputs
rounded to float32 (seen while writing these tests), so it is no float64
oracle."""

import inspect
import os
import re

import numpy as np
import pytest

import bncore
from conftest import make_input
from test_conventions import LIBRARIES, table_row


def _import_keras():
    """Keras 3 on the PyTorch backend, or None (the argument checks below
    need neither)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    if "keras" not in os.sys.modules:
        # Keras 3 reads its backend once, at import; the installed torch is it.
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        return None
    return keras


keras = _import_keras()
requires_keras = pytest.mark.skipif(
    keras is None, reason="needs keras 3 and torch (pip install 'bncore[interop-test]')")

# Keras 3.15's variables warn under NumPy 2 when read as arrays (their
# __array__ lacks the copy keyword): Keras's business, not these tests'.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CASES = {
    "NHWC": dict(shape=(4, 5, 6, 3), axis=-1, options={}),
    "NCL": dict(shape=(6, 3, 7), axis=1, options=dict(momentum=0.9, epsilon=1e-5)),
    "no-scale": dict(shape=(8, 3), axis=-1, options=dict(scale=False)),
    "no-center": dict(shape=(4, 5, 3), axis=-1, options=dict(center=False, momentum=0.5)),
    "neither": dict(shape=(4, 3, 5), axis=1, options=dict(scale=False, center=False)),
}


TOL = dict(rtol=1e-5, atol=1e-5)


def _keras_layer(case, dtype=np.float32):
    spec = CASES[case]
    layer = keras.layers.BatchNormalization(axis=spec["axis"], dtype=np.dtype(dtype).name,
                                            **spec["options"])
    layer.build(spec["shape"])
    rng = np.random.default_rng(len(case))
    c = spec["shape"][spec["axis"]]
    weights = []
    for w in layer.weights:  # gamma, beta (when present), moving_mean, moving_variance
        low, high = (0.5, 2.0) if w.name in ("gamma", "moving_variance") else (-1.0, 1.0)
        weights.append(rng.uniform(low, high, c).astype(dtype))
    layer.set_weights(weights)
    return layer


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _from_keras(layer, case):
    spec = CASES[case]
    options = {k: v for k, v in spec["options"].items()}
    return bncore.BatchNorm.from_keras_weights(layer.get_weights(), axis=spec["axis"],
                                               **options)


@requires_keras
@pytest.mark.parametrize("case", list(CASES))
def test_eval_matches_keras(case):
    dtype = np.float32
    layer = _keras_layer(case)
    bn = _from_keras(layer, case)
    spec = CASES[case]
    assert bn.training is False and bn.dtype == dtype and bn.axis == spec["axis"]
    assert len(layer.get_weights()) == 2 + bn.scale + bn.center
    for seed in range(2):
        x = make_input(spec["shape"], dtype, spec["axis"], kind="normal", seed=seed)
        np.testing.assert_allclose(bn(x), _numpy(layer(x, training=False)), **TOL)


@requires_keras
@pytest.mark.parametrize("case", list(CASES))
def test_training_matches_keras(case):
    dtype = np.float32
    layer = _keras_layer(case)
    bn = _from_keras(layer, case).train()
    spec = CASES[case]
    tol = TOL
    for seed in range(4):
        x = make_input(spec["shape"], dtype, spec["axis"], kind="normal", seed=10 + seed)
        np.testing.assert_allclose(bn(x), _numpy(layer(x, training=True)), **tol)
    np.testing.assert_allclose(bn.running_mean, _numpy(layer.moving_mean), **tol)
    np.testing.assert_allclose(bn.running_var, _numpy(layer.moving_variance), **tol)
    # and afterwards in eval, with the statistics both kept
    bn.eval()
    x = make_input(spec["shape"], dtype, spec["axis"], kind="normal", seed=20)
    np.testing.assert_allclose(bn(x), _numpy(layer(x, training=False)), **tol)


@requires_keras
def test_defaults_are_keras_defaults():
    layer = keras.layers.BatchNormalization()
    signature = inspect.signature(bncore.BatchNorm.from_keras_weights).parameters
    assert signature["epsilon"].default == layer.epsilon
    assert signature["momentum"].default == layer.momentum
    assert signature["axis"].default == layer.axis
    assert signature["scale"].default is layer.scale is True
    assert signature["center"].default is layer.center is True
    # and the conventions table in BatchNorm's docstring says the same
    column = LIBRARIES.index("Keras")
    assert float(table_row("momentum default")[column]) == layer.momentum
    assert float(table_row("eps default")[column]) == layer.epsilon


def test_wrong_number_of_weights_names_the_expected_list():
    weights = [np.ones(3, np.float32)] * 4
    with pytest.raises(ValueError, match=r"expected 3: \['beta', 'moving_mean', "
                                         r"'moving_variance'\].*scale=False"):
        bncore.BatchNorm.from_keras_weights(weights, scale=False)


def test_mismatched_lengths_and_axis_lists_are_refused():
    weights = [np.ones(3, np.float32)] * 3 + [np.ones(4, np.float32)]
    with pytest.raises(ValueError, match=r"running_var.*\(4,\)"):
        bncore.BatchNorm.from_keras_weights(weights)
    with pytest.raises(TypeError, match="axis must be an integer, got list"):
        bncore.BatchNorm.from_keras_weights([np.ones(3, np.float32)] * 4, axis=[1, 2])


@pytest.mark.parametrize("options, error, message", [
    (dict(momentum=1.5), ValueError, "momentum must be a number in [0, 1], got 1.5"),
    (dict(momentum=-0.1), ValueError, "momentum must be a number in [0, 1], got -0.1"),
    (dict(momentum=float("nan")), ValueError, "momentum must be a number in [0, 1], got nan"),
    (dict(momentum=None), TypeError, "momentum must be a number in [0, 1], got NoneType"),
    (dict(momentum=True), TypeError, "momentum must be a number in [0, 1], got bool"),
    (dict(epsilon=-1), ValueError, "epsilon must be a finite number >= 0, got -1"),
    (dict(epsilon=float("inf")), ValueError, "epsilon must be a finite number >= 0, got inf"),
    (dict(epsilon="1e-3"), TypeError, "epsilon must be a finite number >= 0, got str"),
])
def test_bad_options_are_named_as_keras_names_them(options, error, message):
    weights = [np.ones(3, np.float32)] * 4
    with pytest.raises(error, match=re.escape(message)):
        bncore.BatchNorm.from_keras_weights(weights, **options)


def test_edge_options_are_accepted():
    weights = [np.ones(3, np.float32)] * 4
    bn = bncore.BatchNorm.from_keras_weights(weights, momentum=1, epsilon=0)
    assert (bn.decay, bn.eps) == (1.0, 0.0)
    assert type(bn.decay) is float and type(bn.eps) is float


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_weights_give_a_half_layer_with_float32_parameters(name):
    half = np.dtype(np.float16) if name == "float16" else np.dtype(
        pytest.importorskip("ml_dtypes").bfloat16)
    rng = np.random.default_rng(3)
    weights = [rng.uniform(0.5, 2.0, 3).astype(half) for _ in range(4)]
    bn = bncore.BatchNorm.from_keras_weights(weights)
    assert bn.dtype == half and bn.param_dtype == np.float32
    for got, want in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), weights):
        np.testing.assert_array_equal(got, want.astype(np.float32))
    assert bncore.BatchNorm.from_keras_weights(weights, dtype=np.float64).dtype == np.float64
