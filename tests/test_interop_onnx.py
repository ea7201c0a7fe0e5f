"""BatchNorm.from_onnx against ONNX Runtime running the same model: eval
output, and in training mode (training_mode=1) the output and the running
statistics - which checks decay and the biased running variance. Models are
built with onnx.helper at opset 15."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

import bncore  # noqa: E402
from conftest import DTYPE_PARAMS, make_input, make_params  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

SHAPE = (4, 3, 5, 6)


def _bn_node(name, x, y, prefix, extra_outputs=(), **attributes):
    inputs = [x] + [f"{prefix}_{role}" for role in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y, *extra_outputs], name=name,
                            **attributes)


def _initializers(prefix, dtype, seed):
    w, b, rm, rv = make_params(SHAPE[1], dtype, seed=seed)
    return [numpy_helper.from_array(a, f"{prefix}_{role}")
            for a, role in zip((w, b, rm, rv), ("scale", "B", "mean", "var"))]


def _model(nodes, initializers, dtype, outputs=("Y",), inputs=("X",)):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shapes = {"rm": [SHAPE[1]], "rv": [SHAPE[1]]}
    graph = helper.make_graph(
        nodes, "bn_test",
        [helper.make_tensor_value_info(name, elem, list(SHAPE) if name == "X" else [SHAPE[1]])
         for name in inputs],
        [helper.make_tensor_value_info(name, elem, shapes.get(name, list(SHAPE)))
         for name in outputs],
        initializer=initializers,
    )
    # IR version 8 is what opset 15 came with, and what ONNX Runtime accepts.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)],
                             ir_version=8)


def _run(model, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("source", ["path", "model"])
def test_eval_output_matches_onnxruntime(source, dtype, tmp_path):
    node = _bn_node("bn", "X", "Y", "p", epsilon=1e-3, momentum=0.8)
    model = _model([node], _initializers("p", dtype, seed=1), dtype)
    onnx.checker.check_model(model)
    path = tmp_path / "bn.onnx"
    onnx.save(model, path)
    bn = bncore.BatchNorm.from_onnx(path if source == "path" else model)
    assert type(bn) is bncore.BatchNorm and bn.training is False
    assert bn.dtype == dtype and bn.axis == 1
    # ONNX attributes are float32: taken as they are (ONNX Runtime uses them so)
    assert bn.eps == np.float32(1e-3) and bn.decay == np.float32(0.8)
    assert bn.unbiased_running_var is False
    x = make_input(SHAPE, dtype, 1, kind="normal", seed=2)
    (want,) = _run(model, x)
    np.testing.assert_allclose(bn(x), want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_training_mode_matches_onnxruntime(dtype):
    """training_mode=1: ONNX normalises with the batch statistics and
    returns running = momentum * running + (1 - momentum) * batch, with the
    biased batch variance."""
    node = _bn_node("bn", "X", "Y", "p", extra_outputs=("rm", "rv"), momentum=0.7,
                    training_mode=1)
    model = _model([node], _initializers("p", dtype, seed=3), dtype, outputs=("Y", "rm", "rv"))
    bn = bncore.BatchNorm2d.from_onnx(model)
    assert type(bn) is bncore.BatchNorm2d and bn.training is True
    assert bn.eps == pytest.approx(1e-5) and bn.decay == pytest.approx(0.7)
    x = make_input(SHAPE, dtype, 1, kind="normal", seed=4)
    want_y, want_rm, want_rv = _run(model, x)
    tol = _tol(dtype)
    np.testing.assert_allclose(bn(x), want_y, **tol)
    np.testing.assert_allclose(bn.running_mean, want_rm, **tol)
    np.testing.assert_allclose(bn.running_var, want_rv, **tol)


def test_defaults_are_the_onnx_schemas():
    node = _bn_node("bn", "X", "Y", "p")  # no attributes
    bn = bncore.BatchNorm.from_onnx(_model([node], _initializers("p", np.float32, 5),
                                           np.float32))
    attributes = onnx.defs.get_schema("BatchNormalization").attributes
    assert bn.eps == pytest.approx(attributes["epsilon"].default_value.f, rel=1e-6)
    assert bn.decay == pytest.approx(attributes["momentum"].default_value.f, rel=1e-6)
    assert bn.training is False


def _two_bn_model():
    nodes = [_bn_node("first", "X", "H", "a", epsilon=1e-3),
             helper.make_node("Relu", ["H"], ["R"], name="relu"),
             _bn_node("second", "R", "Y", "b", epsilon=1e-2)]
    inits = _initializers("a", np.float32, 6) + _initializers("b", np.float32, 7)
    return _model(nodes, inits, np.float32)


def test_node_name_picks_one_of_several():
    model = _two_bn_model()
    with pytest.raises(ValueError, match=r"2 BatchNormalization nodes \['first', 'second'\]"
                                         ".*node_name"):
        bncore.BatchNorm.from_onnx(model)
    second = bncore.BatchNorm.from_onnx(model, "second")
    assert second.eps == pytest.approx(1e-2)
    w, b, rm, rv = make_params(SHAPE[1], np.float32, seed=7)
    np.testing.assert_array_equal(second.weight, w)
    np.testing.assert_array_equal(second.running_var, rv)
    with pytest.raises(ValueError, match="no BatchNormalization node named 'third'"):
        bncore.BatchNorm.from_onnx(model, "third")


def test_model_without_batch_norm_is_refused():
    node = helper.make_node("Relu", ["X"], ["Y"], name="relu")
    with pytest.raises(ValueError, match="no BatchNormalization node"):
        bncore.BatchNorm.from_onnx(_model([node], [], np.float32))


def test_statistics_fed_at_run_time_are_refused():
    node = _bn_node("bn", "X", "Y", "p")
    inits = [i for i in _initializers("p", np.float32, 8) if i.name != "p_var"]
    model = _model([node], inits, np.float32, inputs=("X", "p_var"))
    with pytest.raises(ValueError, match=r"input_var \('p_var'\) of BatchNormalization node "
                                         "'bn' is not an initializer"):
        bncore.BatchNorm.from_onnx(model)


def test_dtype_comes_from_the_declared_input():
    """X declared float64, parameters stored as float32 (opset 15 allows it):
    the layer takes float64 input."""
    node = _bn_node("bn", "X", "Y", "p")
    model = _model([node], _initializers("p", np.float32, 9), np.float64)
    assert bncore.BatchNorm.from_onnx(model).dtype == np.float64
    assert bncore.BatchNorm.from_onnx(model, dtype=np.float32).dtype == np.float32


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        bncore.BatchNorm.from_onnx(42)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_model_gives_a_half_layer_with_float32_parameters(name):
    """Initializers and X in half: a half layer whose float32 parameters
    hold the initializers' values exactly, computing what ONNX Runtime
    computes in float32 on the same values (up to the output's rounding)."""
    half = np.dtype(np.float16) if name == "float16" else np.dtype(
        pytest.importorskip("ml_dtypes").bfloat16)
    half_inits = [numpy_helper.from_array(a.astype(half), f"p_{role}")
                  for a, role in zip(make_params(SHAPE[1], np.float32, seed=5),
                                     ("scale", "B", "mean", "var"))]
    node = _bn_node("bn", "X", "Y", "p", epsilon=1e-3)
    bn = bncore.BatchNorm.from_onnx(_model([node], half_inits, half))
    assert bn.dtype == half and bn.param_dtype == np.float32
    values = [numpy_helper.to_array(init).astype(np.float32) for init in half_inits]
    for got, want in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), values):
        np.testing.assert_array_equal(got, want)
    x32 = make_input(SHAPE, np.float32, 1, kind="normal", seed=6).astype(half).astype(np.float32)
    wide = [numpy_helper.from_array(v, init.name) for v, init in zip(values, half_inits)]
    (want,) = _run(_model([node], wide, np.float32), x32)
    got = bn(x32.astype(half))
    assert got.dtype == half
    ulp = float(np.finfo(np.float16).eps if name == "float16" else
                pytest.importorskip("ml_dtypes").finfo(half).eps)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=ulp, atol=ulp)


@pytest.mark.parametrize("attribute, value", [("epsilon", -1.0), ("momentum", 1.5)])
def test_bad_attributes_are_named_as_onnx_names_them(attribute, value):
    node = _bn_node("bn7", "X", "Y", "p", **{attribute: value})
    model = _model([node], _initializers("p", np.float32, seed=1), np.float32)
    with pytest.raises(ValueError, match=f"the {attribute} of .*bn7"):
        bncore.BatchNorm.from_onnx(model)
