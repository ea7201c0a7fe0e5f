"""Conversions between bncore layers and PyTorch, Keras and ONNX batch norms.

Each library writes batch normalization with its own conventions (see the
table in ``bncore.BatchNorm``'s docstring); the converters set the layer's
options so that the bncore layer computes what the source computes, in
eval and in training. PyTorch, Keras and ONNX are optional: each is imported
only by the function that needs it (``from_keras_weights`` needs none).

The ``BatchNorm`` class methods (``BatchNorm.from_torch`` and so on) call
these functions with their own class as ``layer_class``.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._lowp import is_half

if TYPE_CHECKING:
    from .modules import BatchNorm

__all__ = ["from_keras_weights", "from_onnx", "from_torch", "to_torch"]


def _widened(array: np.ndarray) -> np.ndarray:
    """A float16 or bfloat16 array as float32 (exact), others as they are.

    Half layers keep float32 parameters, and ``load_state_dict`` takes
    only NumPy floating-point arrays, which ml_dtypes' bfloat16 is not."""
    return array.astype(np.float32) if is_half(array.dtype) else array


def _optional(module: str, purpose: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{purpose} needs {module}, which is not installed: {install}") from error


def _torch(purpose: str) -> Any:
    # Not an extra of bncore: a version range could pull a CUDA build.
    return _optional("torch", purpose, "install PyTorch, see https://pytorch.org")


def _layer_classes() -> tuple[type[BatchNorm], ...]:
    from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

    return BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d


def _pick_class(natural: type[BatchNorm], layer_class: type[BatchNorm] | None,
                source: str) -> type[BatchNorm]:
    """``natural`` is the class the source maps to; a caller's more specific
    class is fine (a rank-agnostic source), an unrelated one is not."""
    if layer_class is None or issubclass(natural, layer_class):
        return natural
    if issubclass(layer_class, natural):
        return layer_class
    raise TypeError(
        f"{source} converts to bncore.{natural.__name__}, not {layer_class.__name__}: "
        f"call {natural.__name__}.from_torch or BatchNorm.from_torch"
    )


# --------------------------------------------------------------------------
# PyTorch

#: The layer dtypes (by name) and PyTorch's for the same numbers. bfloat16 has
#: no NumPy dtype of its own (ml_dtypes supplies it, which torch.from_numpy
#: does not know), so the pairs are listed, not derived from NumPy.
_TORCH_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")


def _torch_dtype(torch: Any, name: str) -> Any:
    """PyTorch's dtype for a layer dtype name."""
    return getattr(torch, name)


def _layer_dtype_name(torch: Any, torch_dtype: Any) -> str:
    """The layer dtype for PyTorch's ``torch_dtype``, by name."""
    for name in _TORCH_DTYPE_NAMES:
        if torch_dtype == _torch_dtype(torch, name):
            return name
    raise TypeError(
        f"module holds {torch_dtype}; bncore layers take float32, float64, float16 or "
        "bfloat16: convert it first (e.g. module.float())"
    )


def _is_sizeless(module: Any, tracked: bool) -> bool:
    """True for a module with no size yet: a lazy one that has not seen an
    input. One without parameters or buffers (``affine=False,
    track_running_stats=False``) never has any to initialise, so PyTorch
    leaves ``num_features`` at 0, even once it has seen an input."""
    if getattr(module, "has_uninitialized_params", None) and module.has_uninitialized_params():
        return True
    return int(module.num_features) == 0 and not module.affine and not tracked


def from_torch(module: Any, layer_class: type[BatchNorm] | None = None) -> BatchNorm:
    """A bncore copy of a PyTorch batch-norm module.

    Parameters
    ----------
    module : torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d, their Lazy
        variants, or SyncBatchNorm
        Any options: ``affine=False``, ``track_running_stats=False``,
        ``momentum=None`` (cumulative average).
    layer_class : BatchNorm subclass, optional
        The bncore class wanted (what ``BatchNorm2d.from_torch`` passes);
        by default the one matching the module (BatchNorm2d for
        BatchNorm2d, the rank-agnostic BatchNorm for SyncBatchNorm).

    Returns
    -------
    BatchNorm
        With copies (not views) of the weight, bias, running statistics and
        ``num_batches_tracked``, the module's dtype, eps, momentum and
        training mode. A float16 or bfloat16 module gives a layer of that
        dtype, whose parameters and running statistics are float32
        (``param_dtype``) and hold the module's values exactly. A module
        with no size yet gives a lazy layer: a lazy module that has not
        seen an input, or one with ``num_features=0`` and neither
        parameters nor running statistics (what a ``LazyBatchNorm*`` with
        ``affine=False, track_running_stats=False`` keeps, before and
        after its first input; the bncore layer takes its size from its
        first input and then keeps it).

    Raises
    ------
    TypeError
        For a module that is not a batch norm, or holds a dtype other than
        float32, float64, float16 and bfloat16 (bfloat16 needs ml_dtypes).
    """
    torch = _torch("BatchNorm.from_torch")
    nn = torch.nn
    generic, bn1d, bn2d, bn3d = _layer_classes()
    mapping = [((nn.BatchNorm1d, nn.LazyBatchNorm1d), bn1d),
               ((nn.BatchNorm2d, nn.LazyBatchNorm2d), bn2d),
               ((nn.BatchNorm3d, nn.LazyBatchNorm3d), bn3d),
               ((nn.SyncBatchNorm,), generic)]
    natural = next((cls for kinds, cls in mapping if isinstance(module, kinds)), None)
    if natural is None:
        raise TypeError(
            "module must be a torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d, their Lazy "
            f"variants or SyncBatchNorm, got {type(module).__name__}"
        )
    cls = _pick_class(natural, layer_class, f"torch.nn.{type(module).__name__}")
    tracked = module.running_mean is not None and module.running_var is not None
    if tracked != bool(module.track_running_stats):
        # PyTorch then uses buffers it does not update (or none it should):
        # a state no bncore layer has.
        raise ValueError(
            f"module has track_running_stats={module.track_running_stats} but running "
            f"buffers {'present' if tracked else 'absent'}; bncore layers have "
            "running statistics exactly when they track them"
        )
    lazy = _is_sizeless(module, tracked)
    tensors = [t for t in (module.weight, module.running_mean) if t is not None]
    torch_dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    layer = cls(
        None if lazy else int(module.num_features),
        eps=float(module.eps),
        momentum=None if module.momentum is None else float(module.momentum),
        affine=bool(module.affine),
        track_running_stats=bool(module.track_running_stats),
        dtype=_layer_dtype_name(torch, torch_dtype),
    )
    if not lazy:
        # A half module's tensors widen exactly to the layer's float32
        # parameters (param_dtype); a float32 or float64 module's stay as they are.
        param_dtype = _torch_dtype(torch, layer.param_dtype.name)
        layer.load_state_dict({
            key: (value.detach().cpu().to(param_dtype) if value.is_floating_point()
                  else value.detach().cpu()).numpy()
            for key, value in module.state_dict().items()
        })
    return layer.train(bool(module.training))


def to_torch(layer: BatchNorm, *, strict: bool = True) -> Any:
    """A PyTorch copy of a bncore layer, as ``torch.nn.BatchNorm1d``, 2d or
    3d (``LazyBatchNorm*`` for a lazy layer without a size yet).

    PyTorch's layers take channels on dim 1 and have fewer options. A
    layer with ``scale`` and ``center`` apart converts exactly: the missing
    parameter becomes a constant (ones or zeros, ``requires_grad=False``).
    ``decay`` becomes ``momentum = 1 - decay`` (equal up to the rounding of
    that subtraction). What PyTorch cannot compute raises ValueError with
    ``strict=True`` (the default); with ``strict=False`` it is dropped:
    ``unbiased_running_var=False`` (torch's training updates then use the
    unbiased variance), ``activation="relu"`` (append ``torch.nn.ReLU()``),
    ``nonfinite`` other than ``"propagate"``, and a feature axis other than
    1 (the module then expects channels-first input). The generic,
    rank-agnostic ``BatchNorm`` has no PyTorch class and raises TypeError.

    The module has the layer's dtype, float16 and bfloat16 included, as
    PyTorch's half modules are: in it, the parameters and running
    statistics are of that dtype too, so a half layer's float32 ones
    (``param_dtype``) are rounded to it. ``from_torch`` of the module gives
    back the layer's options and dtype, and its arrays as rounded; a half
    module converted with ``from_torch`` and back is unchanged, bit for bit.
    To keep float32 parameters in PyTorch (whose float32 modules take half
    input too), convert a float32 copy of the layer:
    ``type(bn)(**{**bn.config(), "dtype": "float32"})`` given
    ``bn.state_dict()``.
    """
    torch = _torch("BatchNorm.to_torch")
    nn = torch.nn
    generic, bn1d, bn2d, bn3d = _layer_classes()
    lazy = layer.num_features is None
    mapping = [(bn1d, nn.BatchNorm1d, nn.LazyBatchNorm1d),
               (bn2d, nn.BatchNorm2d, nn.LazyBatchNorm2d),
               (bn3d, nn.BatchNorm3d, nn.LazyBatchNorm3d)]
    found = next(((eager, lazy_cls) for cls, eager, lazy_cls in mapping
                  if isinstance(layer, cls)), None)
    if found is None:
        raise TypeError(
            f"{type(layer).__name__} accepts input of any rank, and PyTorch has one class "
            "per rank: rebuild it as BatchNorm1d, BatchNorm2d or BatchNorm3d "
            "(e.g. bncore.BatchNorm2d(**bn.config()) and load_state_dict) first"
        )
    problems = []
    if not layer.unbiased_running_var:
        problems.append("unbiased_running_var=False (torch averages the unbiased variance)")
    if layer.activation is not None:
        problems.append(f"activation={layer.activation!r} (append torch.nn.ReLU())")
    if layer.nonfinite != "propagate":
        problems.append(f"nonfinite={layer.nonfinite!r} (torch propagates)")
    if layer.axis != 1:
        problems.append(f"axis={layer.axis} (torch takes channels on dim 1)")
    if strict and problems:
        raise ValueError(
            f"PyTorch's batch norm cannot express {'; '.join(problems)}: convert with "
            "strict=False to drop these, or change the layer first"
        )
    momentum = layer.momentum if layer.decay is None else 1.0 - layer.decay
    dtype = _torch_dtype(torch, layer.dtype.name)
    options = dict(eps=layer.eps, momentum=momentum, affine=layer.scale or layer.center,
                   track_running_stats=layer.track_running_stats, dtype=dtype)
    if lazy:
        if layer.scale != layer.center:
            raise ValueError(
                "a lazy layer with only one of scale and center has no PyTorch "
                "equivalent before it has a size (the missing parameter would be "
                "learnable): call the layer on an input first"
            )
        return found[1](**options).train(layer.training)
    module = found[0](layer.num_features, **options)
    # state_dict() holds fresh float32 or float64 arrays (param_dtype), which
    # torch.from_numpy takes; load_state_dict rounds them to a half module's dtype.
    state = {key: torch.from_numpy(value) for key, value in layer.state_dict().items()}
    with torch.no_grad():
        for key, fill in (("weight", 1.0), ("bias", 0.0)):
            if options["affine"] and key not in state:
                # scale without center or the reverse: a constant stands in.
                getattr(module, key).fill_(fill)
                getattr(module, key).requires_grad_(False)
                state[key] = getattr(module, key).detach().clone()
        module.load_state_dict(state)
    return module.train(layer.training)


# --------------------------------------------------------------------------
# Keras

def from_keras_weights(weights: Sequence[ArrayLike], *, epsilon: float = 1e-3,
                       momentum: float = 0.99, axis: int = -1, scale: bool = True,
                       center: bool = True, dtype: DTypeLike | None = None,
                       activation: str | None = None, nonfinite: str = "propagate",
                       layer_class: type[BatchNorm] | None = None) -> BatchNorm:
    """A layer computing what a Keras ``BatchNormalization`` computes.

    Parameters
    ----------
    weights : sequence of arrays of shape (C,)
        The Keras layer's ``get_weights()``: ``[gamma, beta, moving_mean,
        moving_variance]``, without gamma when ``scale=False`` and without
        beta when ``center=False``, as Keras leaves them out.
    epsilon, momentum, axis, scale, center
        The Keras layer's options, with Keras's defaults (epsilon 1e-3 -
        not PyTorch's 1e-5 - momentum 0.99, channels-last axis -1).
        Keras's momentum is the weight of the running value: it becomes
        ``decay``, and the running variance averages the biased batch
        variance (``unbiased_running_var=False``), as Keras's does.
    dtype : float32, float64, float16 or bfloat16, optional
        The layer's dtype; by default the weights'. A float16 or bfloat16
        layer keeps its parameters and statistics in float32
        (``param_dtype``); half weights widen to them exactly.
    activation, nonfinite
        bncore options, passed on (Keras's layer has neither).
    layer_class : BatchNorm subclass, optional
        The class to build (default ``BatchNorm``, any rank).

    Returns
    -------
    BatchNorm
        In eval mode, as a Keras layer computes when called without
        ``training=True``.
    """
    from .modules import BatchNorm

    cls = BatchNorm if layer_class is None else layer_class
    # Checked here under Keras's names: the layer would name its own (decay, eps).
    momentum = _checked_option(momentum, "momentum", "a number in [0, 1]",
                               lambda value: 0.0 <= value <= 1.0)
    epsilon = _checked_option(epsilon, "epsilon", "a finite number >= 0",
                              lambda value: 0.0 <= value < math.inf)
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + [
        "moving_mean", "moving_variance"]
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a list of arrays {names}, got "
                        f"{type(weights).__name__}")
    if len(weights) != len(names):
        raise ValueError(
            f"weights has {len(weights)} arrays, expected {len(names)}: {names} (Keras's "
            f"get_weights() order for scale={scale}, center={center})"
        )
    arrays = dict(zip(names, (np.asarray(w) for w in weights)))
    for name, array in arrays.items():
        if array.ndim != 1 or array.shape[0] < 1:
            raise ValueError(f"{name} must have shape (C,) with C >= 1, got {array.shape}")
    num_features = arrays["moving_mean"].shape[0]
    layer = cls(
        num_features, eps=epsilon, decay=momentum, unbiased_running_var=False,
        affine=scale or center, scale=scale, center=center, axis=axis,
        dtype=arrays["moving_mean"].dtype if dtype is None else dtype,
        activation=activation, nonfinite=nonfinite,
    )
    keys = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_variance": "running_var"}
    state = {keys[name]: _widened(array) for name, array in arrays.items()}
    layer.load_state_dict({**state, "num_batches_tracked": np.array(0)})
    return layer.eval()


def _checked_option(value: object, name: str, expected: str,
                    valid: Callable[[float], bool]) -> float:
    """``value`` as a float, or a TypeError/ValueError naming ``name`` (the
    option as the user's library calls it, not bncore's name for it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    number = float(value)
    if not valid(number):  # NaN fails every comparison, so it lands here too
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


# --------------------------------------------------------------------------
# ONNX

def from_onnx(model: Any, node_name: str | None = None, *, dtype: DTypeLike | None = None,
              layer_class: type[BatchNorm] | None = None) -> BatchNorm:
    """A layer computing what an ONNX ``BatchNormalization`` node computes.

    Parameters
    ----------
    model : str, os.PathLike or onnx.ModelProto
        The model, or the path of its file.
    node_name : str, optional
        Which node, by name; needed when the graph has several
        BatchNormalization nodes.
    dtype : float32, float64, float16 or bfloat16, optional
        The layer's dtype; by default the element type declared for the
        node's input X, else that of the scale initializer. A float16 or
        bfloat16 layer keeps its parameters and statistics in float32
        (``param_dtype``); half initializers widen to them exactly.
    layer_class : BatchNorm subclass, optional
        The class to build (default ``BatchNorm``, any rank).

    Returns
    -------
    BatchNorm
        Channels first (``axis=1``), eps from ``epsilon`` (default 1e-5),
        ``decay`` from ``momentum`` (default 0.9; ONNX weights the running
        value, as Keras), the biased running variance
        (``unbiased_running_var=False``), and in training mode when the
        node has ``training_mode=1``, else in eval mode.

    Raises
    ------
    ValueError
        When the graph has no such node, several and no node_name, or when
        scale, B, input_mean or input_var are not initializers (computed by
        the graph or fed as graph inputs), or of mismatched shapes.
    """
    from .modules import BatchNorm

    onnx = _optional("onnx", "BatchNorm.from_onnx", "pip install 'bncore[onnx]'")
    from onnx import helper, numpy_helper

    cls = BatchNorm if layer_class is None else layer_class
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be a path or an onnx.ModelProto, got "
                        f"{type(model).__name__}")
    graph = model.graph
    node = _pick_node(graph, node_name)
    label = f"BatchNormalization node {node.name!r}"
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("spatial", 1) != 1:
        raise ValueError(f"{label} has spatial=0 (statistics per element, not per "
                         "channel), which bncore does not compute")
    if len(node.input) != 5:
        raise ValueError(f"{label} has {len(node.input)} inputs, expected 5 "
                         "(X, scale, B, input_mean, input_var)")
    initializers = {init.name: init for init in graph.initializer}
    arrays = {}
    for role, name in zip(("scale", "B", "input_mean", "input_var"), node.input[1:]):
        if name not in initializers:
            raise ValueError(
                f"input {role} ({name!r}) of {label} is not an initializer: it is computed "
                "by the graph or fed as a graph input, and bncore can only read constants"
            )
        array = numpy_helper.to_array(initializers[name])
        if array.ndim != 1 or array.shape[0] < 1:
            raise ValueError(f"{role} ({name!r}) of {label} has shape {array.shape}, "
                             "expected (C,) with C >= 1")
        arrays[role] = array
    if dtype is None:
        dtype = _declared_dtype(graph, node.input[0], helper) or arrays["scale"].dtype
    arrays = {role: _widened(array) for role, array in arrays.items()}
    epsilon = _checked_option(attributes.get("epsilon", 1e-5), f"the epsilon of {label}",
                              "a finite number >= 0",
                              lambda v: 0 <= v < math.inf)
    momentum = _checked_option(attributes.get("momentum", 0.9), f"the momentum of {label}",
                               "a number in [0, 1]", lambda v: 0 <= v <= 1)
    layer = cls(
        arrays["input_mean"].shape[0],
        eps=epsilon,
        decay=momentum,
        unbiased_running_var=False,
        axis=1,
        dtype=dtype,
    )
    layer.load_state_dict({
        "weight": arrays["scale"], "bias": arrays["B"],
        "running_mean": arrays["input_mean"], "running_var": arrays["input_var"],
        "num_batches_tracked": np.array(0),
    })
    return layer.train(bool(attributes.get("training_mode", 0)))


def _pick_node(graph: Any, node_name: str | None) -> Any:
    nodes = [n for n in graph.node
             if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
    names = [n.name for n in nodes]
    if node_name is not None:
        matches = [n for n in nodes if n.name == node_name]
        if len(matches) != 1:
            found = "no" if not matches else f"{len(matches)}"
            raise ValueError(f"the graph has {found} BatchNormalization node named "
                             f"{node_name!r}; its BatchNormalization nodes: {names}")
        return matches[0]
    if len(nodes) != 1:
        if not nodes:
            raise ValueError("the model's graph has no BatchNormalization node")
        raise ValueError(f"the model's graph has {len(nodes)} BatchNormalization nodes "
                         f"{names}: pass node_name= to choose one")
    return nodes[0]


def _declared_dtype(graph: Any, name: str, helper: Any) -> np.dtype | None:
    """The NumPy dtype the graph declares for the value ``name``, if any."""
    for info in list(graph.input) + list(graph.value_info):
        if info.name == name and info.type.HasField("tensor_type"):
            elem_type = info.type.tensor_type.elem_type
            if elem_type:
                return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    return None
