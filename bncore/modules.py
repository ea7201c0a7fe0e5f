"""Batch normalization layers: parameters, running statistics and modes.

The layers mirror ``torch.nn.BatchNorm1d/2d/3d``: same constructor, same
attributes, same state-dict keys, same train/eval behaviour. Keras's, ONNX's
and Flax's conventions are options of the same classes (``decay``,
``unbiased_running_var``, ``scale``/``center``). The layers hold NumPy arrays
and delegate all arithmetic to ``bncore.functional``; saving and loading live
in ``bncore._layer_io``, conversions from and to other libraries in
``bncore.interop``.
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Mapping, cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _lowp
from .functional import (
    _FLOAT_DTYPES,
    _Batch,
    _check_activation,
    _check_decay,
    _check_eps,
    _check_flag,
    _check_nonfinite,
    _feature_axis,
    _fold_batch,
    _forward,
    _running_stats,
    batch_norm_backward,
    fold_scale_shift,
)

if TYPE_CHECKING:
    from ._layer_io import PathOrFile

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


# The checks take ``object``: they exist for the values the annotations
# exclude.

def _check_num_features(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"num_features must be a positive integer or None (lazy), got {type(value).__name__}"
        )
    if value < 1:
        raise ValueError(f"num_features must be at least 1, got {value}")
    return int(value)


def _check_layer_momentum(value: object) -> float | None:
    """PyTorch's momentum, where None (a cumulative average) is allowed."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"momentum must be a number in [0, 1] or None, got {type(value).__name__}")
    momentum = float(value)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {value!r}")
    return momentum


def _layer_dtype(value: object) -> np.dtype:
    """The accepted input dtype: float32, float64, float16, or bfloat16
    (by dtype or by name, with ml_dtypes installed)."""
    if value is None:
        # np.dtype(None) is float64: a None here is a mistake, not a choice.
        raise TypeError("dtype must be float32, float64, float16 or bfloat16, got None")
    if isinstance(value, str) and value == "bfloat16":
        bfloat16 = _lowp._bfloat16()
        if bfloat16 is None:
            raise TypeError(
                "dtype bfloat16 needs ml_dtypes: pip install 'bncore[bfloat16]'")
        return bfloat16
    try:
        dtype = np.dtype(value)  # type: ignore[call-overload]
    except TypeError:
        dtype = None
    if dtype is None or not (dtype in _FLOAT_DTYPES or _lowp.is_half(dtype)):
        raise TypeError(
            f"dtype must be float32, float64, float16 or bfloat16, got {value!r}")
    return dtype


def _check_axis(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {type(value).__name__}")
    return int(value)


def _toggle(value: object, name: str, affine: bool) -> bool:
    """scale or center: None follows affine; True contradicts affine=False."""
    if value is None:
        return affine
    value = _check_flag(value, name)
    if value and not affine:
        raise ValueError(
            f"{name}=True contradicts affine=False (affine=False turns off both scale "
            f"and center); pass affine=True with scale=... and center=... instead"
        )
    return value


def _grad_output_like(grad_output: ArrayLike, x: NDArray[Any]) -> NDArray[Any]:
    """grad_output as an array, which must have the shape of x, the last
    forward call's input (its dtype is checked where it is used)."""
    dy = grad_output if isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
    if dy.shape != x.shape:
        raise ValueError(
            f"grad_output has shape {dy.shape}, expected {x.shape}, the shape of "
            "the last forward call's input"
        )
    return dy


def _not_materialized(layer: BatchNorm, what: str) -> RuntimeError:
    return RuntimeError(
        f"{type(layer).__name__} was built with num_features=None and has not seen an "
        f"input yet, so it has no parameters or running statistics: {what} needs them; "
        "call it on an input or load a state dict first"
    )


class BatchNorm:
    """Batch normalization over the feature axis of an input of any rank >= 2.

    Parameters
    ----------
    num_features : int or None
        C, the size of the feature axis. None builds a lazy layer (like
        ``torch.nn.LazyBatchNorm2d``): C is taken from the feature axis of
        the first input, or from the arrays of the first state dict loaded,
        and the parameters and running statistics are allocated then;
        until that ``num_features`` is None and ``state_dict``, ``save`` and
        ``fold`` raise ``RuntimeError``.
    eps : float
        Added to the variance before the square root.
    momentum : float in [0, 1] or None
        PyTorch's convention: ``running = (1 - momentum) * running +
        momentum * batch``. None keeps a cumulative average of all batches.
        Ignored (and must stay at its default) when ``decay`` is given.
    affine : bool
        The default for ``scale`` and ``center``: learnable ``weight`` (ones)
        and ``bias`` (zeros), or neither.
    track_running_stats : bool
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
        when False the batch statistics are used in eval mode too.
    axis : int
        The feature axis; -1 for channels-last input.
    dtype : float32, float64, float16 or bfloat16
        Of the accepted input, and of the parameters and running statistics,
        except that a float16 or bfloat16 layer (bfloat16 needs ml_dtypes)
        keeps those in float32 (``bn.param_dtype``), as mixed-precision
        training does: half precision cannot hold a running variance or
        accumulate small updates.
    nonfinite : {"propagate", "skip_update", "raise"}
        What a forward that computes batch statistics (training mode, or
        any mode with ``track_running_stats=False``) does when the batch's
        mean or variance is not finite in some channel (see
        ``bncore.batch_norm``):
        ``"propagate"`` (PyTorch's behaviour) updates the running statistics
        anyway; ``"skip_update"`` leaves them and ``num_batches_tracked``
        untouched and returns the output; ``"raise"`` raises
        ``FloatingPointError`` naming the channels, with the running
        statistics, ``num_batches_tracked`` and the state kept for
        ``backward`` untouched. Stored as ``bn.nonfinite``; may be changed
        later.
    decay : float in [0, 1] or None
        Keras's, ONNX's and Flax's convention instead of ``momentum``:
        ``running = decay * running + (1 - decay) * batch``. Giving both
        ``decay`` and a non-default ``momentum`` is a ValueError.
    unbiased_running_var : bool
        True (PyTorch): ``running_var`` averages the unbiased batch variance
        (divided by n - 1). False (Keras, ONNX, Flax): the biased one
        (divided by n), the variance the batch was normalised with.
    scale, center : bool or None
        Keras's ``scale``/``center`` (oneDNN's ``use_scale``/``use_shift``):
        whether there is a ``weight`` (gamma), and whether there is a
        ``bias`` (beta). None follows ``affine``; True with ``affine=False``
        is a ValueError. The missing one is None, as its gradient
        (``grad_weight``/``grad_bias``) and its state-dict key are absent.
    activation : None or "relu"
        ``"relu"`` returns ``max(bn(x), 0)``, fused into the same pass over
        memory; ``backward`` then differentiates through it.

    The conventions of the libraries, and how to get each here:

    ======================  ==============  ==============  ==============  ==============
    \\                       PyTorch         Keras           ONNX            Flax
    ======================  ==============  ==============  ==============  ==============
    momentum means          weight of the   weight of the   as Keras        as Keras
                            new batch       running value
    momentum default        0.1             0.99            0.9             0.99
    here                    momentum=0.1    decay=0.99      decay=0.9       decay=0.99
    running_var averages    unbiased (n-1)  biased (n)      biased (n)      biased (n)
    unbiased_running_var    True            False           False           False
    eps default             1e-5            1e-3            1e-5            1e-5
    layout                  channels first  channels last   channels first  channels last
    ======================  ==============  ==============  ==============  ==============

    ``BatchNorm.from_torch``, ``from_keras_weights`` and ``from_onnx`` set
    these options from the source model; ``to_torch`` converts back.

    A new layer is in training mode. Call it as ``bn(x)``.

    ``bn.backward(grad_output)`` then returns the gradient with respect to
    that call's input and sets ``bn.grad_weight`` and ``bn.grad_bias``. For
    it the layer keeps a reference to the last input, weight and bias (not
    copies) and the statistics: modifying those arrays in place before
    ``backward`` changes the gradient, and a layer shared by several threads
    should not be used for ``backward``.

    Threads: a layer may be called from several threads at once. Eval
    forwards only read the layer's arrays and take no lock. Training
    forwards compute in parallel and then fold their batch statistics into
    the running statistics (and count ``num_batches_tracked``) one at a
    time, under a lock held by the layer, so no update is lost; with
    ``momentum=None`` the result is the average of all batches whatever the
    order. An eval forward running while another thread trains may read
    running statistics in the middle of an update.
    """

    #: Input ranks the layer accepts; None means any rank >= 2.
    accepted_ndims: tuple[int, ...] | None = None

    def __init__(self, num_features: int | None, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, axis: int = 1,
                 dtype: DTypeLike = np.float32, nonfinite: str = "propagate",
                 decay: float | None = None, unbiased_running_var: bool = True,
                 scale: bool | None = None, center: bool | None = None,
                 activation: str | None = None) -> None:
        num_features = _check_num_features(num_features)
        momentum = _check_layer_momentum(momentum)
        axis = _check_axis(axis)
        dtype = _layer_dtype(dtype)
        affine = bool(affine)

        self.num_features: int | None = num_features
        self.eps: float = _check_eps(eps)
        self.momentum: float | None = momentum
        self.decay: float | None = _check_decay(decay, momentum)
        self.unbiased_running_var: bool = _check_flag(unbiased_running_var,
                                                      "unbiased_running_var")
        self.affine: bool = affine
        self.scale: bool = _toggle(scale, "scale", affine)
        self.center: bool = _toggle(center, "center", affine)
        self.track_running_stats: bool = bool(track_running_stats)
        self.axis: int = axis
        self.dtype: np.dtype = dtype
        self.param_dtype: np.dtype = dtype if dtype in _FLOAT_DTYPES else np.dtype(np.float32)
        self.nonfinite: str = _check_nonfinite(nonfinite)
        _check_activation(activation)
        self.activation: str | None = activation
        self.training: bool = True
        # Serialises the running-statistic updates of training forwards, lazy
        # materialisation and fold(); not picklable, so __getstate__ leaves it
        # out and __setstate__ makes one.
        self._lock: threading.Lock = threading.Lock()
        self.grad_weight: NDArray[np.floating] | None = None
        self.grad_bias: NDArray[np.floating] | None = None
        # (input, mean, invstd, used batch statistics, weight, bias, activation)
        self._saved: tuple[Any, ...] | None = None
        # (key, (scale, shift)): see fold().
        self._fold_cache: tuple[Any, ...] | None = None
        self.weight: NDArray[np.floating] | None = None
        self.bias: NDArray[np.floating] | None = None
        self.running_mean: NDArray[np.floating] | None = None
        self.running_var: NDArray[np.floating] | None = None
        self.num_batches_tracked: int | None = None
        if self.num_features is not None:
            self._allocate(self.num_features)

    def _allocate(self, num_features: int) -> None:
        """Create the parameters and buffers for C = num_features; the
        count goes last, so that a layer with a count has its arrays."""
        dtype = self.param_dtype
        self.weight = np.ones(num_features, dtype) if self.scale else None
        self.bias = np.zeros(num_features, dtype) if self.center else None
        if self.track_running_stats:
            self.running_mean = np.zeros(num_features, dtype)
            self.running_var = np.ones(num_features, dtype)
            self.num_batches_tracked = 0
        self.num_features = num_features

    def _materialize(self, num_features: int, source: str) -> None:
        """Give a lazy layer its size (once; other threads may race here)."""
        if num_features < 1:
            raise ValueError(
                f"{source} is {num_features}: a lazy {type(self).__name__} needs at "
                "least one feature to take num_features from"
            )
        with self._lock:
            if self.num_features is None:
                self._allocate(num_features)

    # -- modes -------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (or eval mode with ``mode=False``); returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Set evaluation mode; returns self."""
        return self.train(False)

    # -- state -------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches counted."""
        if self.running_mean is not None and self.running_var is not None:
            with self._lock:
                self.running_mean.fill(0)
                self.running_var.fill(1)
                self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Running statistics reset, weight 1, bias 0."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight.fill(1)
        if self.bias is not None:
            self.bias.fill(0)

    def _state_keys(self) -> list[str]:
        keys = []
        if self.scale:
            keys.append("weight")
        if self.center:
            keys.append("bias")
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the parameters and buffers under PyTorch's keys
        (``weight`` only with ``scale``, ``bias`` only with ``center``)."""
        if self.num_features is None:
            raise _not_materialized(self, "state_dict()")
        state = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                state[key] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[key] = getattr(self, key).copy()
        return state

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Load a state dict (NumPy arrays, PyTorch tensors, anything
        ``np.asarray`` takes). All entries are checked before any is loaded.
        A lazy layer takes num_features from the arrays' length."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(
                f"state_dict must be a mapping, got {type(state_dict).__name__}"
            )
        expected = self._state_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict.keys() if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not match {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        num_features = self.num_features
        count = None
        loaded = {}
        for key in expected:
            value = np.asarray(state_dict[key])
            if key == "num_batches_tracked":
                count = self._checked_count(value)
                continue
            if value.dtype.kind != "f":
                raise TypeError(
                    f"state_dict[{key!r}] must be floating point, got dtype {value.dtype}"
                )
            if num_features is None and value.ndim == 1 and value.shape[0] >= 1:
                num_features = value.shape[0]  # a lazy layer's size, from the first array
            expected_shape = "(C,) with C >= 1" if num_features is None else f"({num_features},)"
            if value.shape != (num_features,):
                raise ValueError(
                    f"state_dict[{key!r}] has shape {value.shape}, expected {expected_shape}"
                )
            loaded[key] = value
        if self.num_features is None and num_features is not None:
            self._materialize(num_features, "the state dict's arrays' length")
            if self.num_features != num_features:  # another thread won the race
                raise ValueError(
                    f"the state dict's arrays have length {num_features}, but the layer "
                    f"was meanwhile materialised with num_features={self.num_features}"
                )
        with self._lock:
            for key, value in loaded.items():
                np.copyto(getattr(self, key), value, casting="unsafe")
            if count is not None:
                self.num_batches_tracked = count

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_fold_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Layers pickled by bncore 0.1.0 lack the options added since: give
        # them their constructor defaults.
        dtype = state.get("dtype", np.dtype(np.float32))
        defaults = {
            "decay": None, "unbiased_running_var": True, "activation": None,
            "scale": state.get("affine", True), "center": state.get("affine", True),
            "param_dtype": dtype if dtype in _FLOAT_DTYPES else np.dtype(np.float32),
            "_fold_cache": None,
        }
        self.__dict__.update(defaults)
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def _checked_count(value: NDArray[Any]) -> int:
        if value.dtype.kind not in "iu":
            raise TypeError(
                f"state_dict['num_batches_tracked'] must be an integer, got dtype {value.dtype}"
            )
        if value.size != 1:
            raise ValueError(
                f"state_dict['num_batches_tracked'] must hold one value, got shape {value.shape}"
            )
        count = int(value.reshape(()))
        if count < 0:
            raise ValueError(f"state_dict['num_batches_tracked'] must be >= 0, got {count}")
        return count

    def config(self) -> dict[str, Any]:
        """Every constructor option, as ``type(self)(**bn.config())`` takes
        them (dtype by name; scale and center resolved to True/False)."""
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "axis": self.axis,
            "dtype": self.dtype.name,
            "nonfinite": self.nonfinite,
            "decay": self.decay,
            "unbiased_running_var": self.unbiased_running_var,
            "scale": self.scale,
            "center": self.center,
            "activation": self.activation,
        }

    # -- eval transform ----------------------------------------------------

    def _fold_inputs(self) -> tuple[tuple[Any, ...], list[NDArray[Any] | None], float]:
        """What fold()'s result depends on, as one snapshot: a key of the
        exact bytes (and dtypes) of weight, bias, running_mean and
        running_var, and eps; copies of those arrays; eps. The result is
        computed from the copies, so it matches its key even when another
        thread writes the arrays meanwhile. A snapshot costs copies of 4 C
        values - far less than folding - and sees every change, in place or
        by rebinding, including NaN to NaN of another payload."""
        eps = self.eps
        copies = [None if a is None else np.array(a)
                  for a in (self.weight, self.bias, self.running_mean, self.running_var)]
        key = tuple(None if a is None else (a.dtype.str, a.shape, a.tobytes())
                    for a in copies) + (eps,)
        return key, copies, eps

    def fold(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The eval transform as per-feature ``(scale, shift)``.

        ``x * scale + shift`` (moved to the feature axis) is the eval
        output before the activation, with ``scale = weight /
        sqrt(running_var + eps)`` and ``shift = bias - running_mean *
        scale``: what folding this layer into a neighbouring linear or
        convolution layer needs. float64 arrays of shape (C,), read-only.

        The result is cached on the layer together with a snapshot of the
        arrays and eps it came from; a call whose snapshot differs from the
        current values (any write, in place or not, a training step, a
        loaded state dict, a new eps) folds again. It never returns a stale
        value.

        Eval forwards do not use this cache. The kernel folds the running
        statistics itself, per call, in O(C) operations that cost nothing
        next to the pass over the data, while checking the cache's snapshot
        costs about 2 us a call: routed through the cache, eval forwards of
        float32 (1, 64), (32, 256), (32, 64, 16, 16) and (8, 512, 14, 14)
        inputs took 1.5 to 2.5 us longer (7-60 us a call on the 2-core
        development machine), never less. The kernel also normalises as
        ``(x - mean) * invstd * weight + bias``, which keeps the low digits
        that ``x * scale + shift`` loses when a feature's mean is large
        against its spread; the routed outputs differed from it by up to
        2e-6 on unit-scale float32 data.

        Raises
        ------
        RuntimeError
            Without running statistics (``track_running_stats=False``) or
            for a lazy layer that has not seen an input.
        """
        if self.num_features is None:
            raise _not_materialized(self, "fold()")
        with self._lock:
            if self.running_mean is None or self.running_var is None:
                raise RuntimeError(
                    f"{type(self).__name__} was built with track_running_stats=False: it "
                    "normalises with each batch's own statistics, so it has no fixed "
                    "eval transform to fold"
                )
            key, (weight, bias, mean, var), eps = self._fold_inputs()
            cached = self._fold_cache
            if cached is not None and cached[0] == key:
                return cached[1]
            assert mean is not None and var is not None
            scale, shift = fold_scale_shift(mean, var, weight, bias, eps)
            scale.flags.writeable = False
            shift.flags.writeable = False
            self._fold_cache = (key, (scale, shift))
        return scale, shift

    # -- forward -----------------------------------------------------------

    def _check_input(self, x: NDArray[Any]) -> None:
        # The common call passes at a glance: on a small call the full
        # checks below cost more than the batch norm.
        ndim, axis, ndims = x.ndim, self.axis, self.accepted_ndims
        if (x.dtype is self.dtype and type(axis) is int and 2 <= ndim and -ndim <= axis < ndim
                and (ndims is None or ndim in ndims) and x.shape[axis] == self.num_features):
            return
        if x.dtype != self.dtype:
            raise TypeError(
                f"input has dtype {x.dtype}, but {type(self).__name__} holds {self.dtype}; "
                f"convert the input or build the layer with dtype={x.dtype}"
            )
        if self.accepted_ndims is not None and x.ndim not in self.accepted_ndims:
            wanted = " or ".join(f"{n}D" for n in self.accepted_ndims)
            raise ValueError(f"{type(self).__name__} expected {wanted} input (got {x.ndim}D input)")
        if x.ndim < 2:
            raise ValueError(f"input must have at least 2 dimensions, got shape {x.shape}")
        axis = _feature_axis(self.axis, x.ndim)
        if self.num_features is None:
            self._materialize(x.shape[axis], f"input.shape[{axis}]")
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"input.shape[{axis}] is {x.shape[axis]}, expected num_features="
                f"{self.num_features}"
            )

    def forward(self, input: ArrayLike) -> NDArray[np.floating]:
        """The normalised input (through the activation, if any)."""
        x = input if isinstance(input, np.ndarray) else np.asarray(input)
        self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        decay = self.decay
        if self.training and self.track_running_stats and decay is not None:
            # Attributes may have been changed since construction: refuse an
            # ambiguous rule before anything runs.
            decay = _check_decay(decay, self.momentum)
        weight, bias, activation = self.weight, self.bias, self.activation
        # Without tracking the running buffers are None and batch statistics
        # are used in both modes; with tracking, eval reads them and training
        # updates them. The kernel runs outside the lock; only the update of
        # the running statistics and the counter is serialised.
        y, mean, invstd, batch = _forward(
            x,
            self.running_mean,
            self.running_var,
            weight,
            bias,
            use_batch_stats,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
            axis=self.axis,
            out=None,
            num_threads=None,
            nonfinite=self.nonfinite,
            eval_stats=False,
            activation=activation,
            unbiased_running_var=self.unbiased_running_var,
        )
        if self.training:
            self._fold_training_batch(batch, decay)
        elif batch is not None:
            # Eval without running buffers: only nonfinite="raise" acts.
            _fold_batch(batch, None, None, 0.0)
        if not use_batch_stats:
            # Eval: backward needs the running statistics as they are now;
            # copying them is cheaper than folding them on every call.
            mean, invstd = np.array(self.running_mean), np.array(self.running_var)
        self._saved = (x, mean, invstd, use_batch_stats, weight, bias, activation)
        return y

    __call__ = forward

    def _fold_training_batch(self, batch: _Batch | None, decay: float | None) -> None:
        """Fold a training forward's batch statistics (None for an empty
        batch) into the running statistics - with momentum, a cumulative
        average (momentum=None) or decay - and count the batch, under the
        layer's lock; without running statistics only the nonfinite policy
        acts. (SyncBatchNorm folds its global batch with this too.)"""
        running_mean, running_var = self.running_mean, self.running_var
        if running_mean is None or running_var is None:
            if batch is not None:
                _fold_batch(batch, None, None, 0.0)
            return
        with self._lock:
            tracked = cast(int, self.num_batches_tracked)
            counted = True
            if batch is not None:
                momentum = self.momentum
                if momentum is None:
                    # Cumulative average: batch k (from 1) gets weight 1/k.
                    momentum = 1.0 / (tracked + 1)
                counted = _fold_batch(batch, running_mean, running_var, momentum, decay)
            # Counted after the update succeeded, empty batches included
            # (batch is None), as PyTorch does; a skipped batch is not.
            if counted:
                self.num_batches_tracked = tracked + 1

    def backward(self, grad_output: ArrayLike) -> NDArray[np.floating]:
        """dL/dx for the last forward call, given dL/dy (y the layer's
        output, after the activation if there is one).

        Sets ``grad_weight`` (None without ``scale``) and ``grad_bias``
        (None without ``center``). In training mode (or without running
        statistics) the gradient flows through the batch statistics; in eval
        mode they are constants.
        """
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before any forward call")
        x, mean, invstd, used_batch_stats, weight, bias, activation = self._saved
        if not used_batch_stats:
            # Saved in eval as the running statistics themselves.
            mean, invstd = _running_stats(mean, invstd, self.eps)
        dy = _grad_output_like(grad_output, x)
        grad_input, grad_weight, grad_bias = batch_norm_backward(
            dy, x, mean, invstd, weight, bias, training=used_batch_stats, axis=self.axis,
            activation=activation,
        )
        self.grad_weight = grad_weight if weight is not None else None
        self.grad_bias = grad_bias if bias is not None else None
        return grad_input

    # -- files and other libraries -----------------------------------------

    def update_population_stats(self, batches: Iterable[ArrayLike], *,
                                num_threads: int | None = None) -> BatchNorm:
        """Set the running statistics to the exact mean and variance of all
        the values of all the batches (an iterable, e.g. a generator over a
        data set), instead of the moving average; see
        :func:`bncore.stats.update_population_stats`. Returns the layer."""
        from .stats import update_population_stats  # stats imports this module

        return update_population_stats(self, batches, num_threads=num_threads)

    def save(self, file: PathOrFile) -> None:
        """Write the layer to ``file`` (a path, used as given, or a binary
        file object) as a NumPy ``.npz`` archive: its arrays and a JSON
        config with every constructor option. No pickle; PyTorch is not
        needed. ``BatchNorm.load`` reads it back."""
        from . import _layer_io

        _layer_io.save(self, file)

    @classmethod
    def load(cls, file: PathOrFile) -> BatchNorm:
        """Rebuild a layer written by ``save``, as the class it was saved
        from (which must be ``cls`` or a subclass of it). Files that are not
        bncore layers, come from a newer format, or have missing, extra or
        misshapen arrays are refused with ValueError."""
        from . import _layer_io

        return _layer_io.load(cls, file)

    @classmethod
    def from_torch(cls, module: Any) -> BatchNorm:
        """A copy of a ``torch.nn.BatchNorm1d/2d/3d`` (or lazy or sync
        batch norm) as the matching bncore class; see
        ``bncore.interop.from_torch``."""
        from . import interop

        return interop.from_torch(module, cls)

    def to_torch(self, *, strict: bool = True) -> Any:
        """A ``torch.nn.BatchNorm1d/2d/3d`` copy of this layer; see
        ``bncore.interop.to_torch``."""
        from . import interop

        return interop.to_torch(self, strict=strict)

    @classmethod
    def from_keras_weights(cls, weights: Any, *, epsilon: float = 1e-3,
                           momentum: float = 0.99, axis: int = -1, scale: bool = True,
                           center: bool = True, dtype: DTypeLike | None = None,
                           activation: str | None = None,
                           nonfinite: str = "propagate") -> BatchNorm:
        """A layer from a Keras ``BatchNormalization``'s ``get_weights()``
        and options; see ``bncore.interop.from_keras_weights``."""
        from . import interop

        return interop.from_keras_weights(
            weights, epsilon=epsilon, momentum=momentum, axis=axis, scale=scale,
            center=center, dtype=dtype, activation=activation, nonfinite=nonfinite,
            layer_class=cls)

    @classmethod
    def from_onnx(cls, model: Any, node_name: str | None = None, *,
                  dtype: DTypeLike | None = None) -> BatchNorm:
        """A layer from a ``BatchNormalization`` node of an ONNX model (a
        path or a ``ModelProto``); see ``bncore.interop.from_onnx``."""
        from . import interop

        return interop.from_onnx(model, node_name, dtype=dtype, layer_class=cls)

    def __repr__(self) -> str:
        options = [f"{self.num_features}", f"eps={self.eps}"]
        if self.decay is None:
            options.append(f"momentum={self.momentum}")
        else:
            options.append(f"decay={self.decay}")
        options += [f"affine={self.affine}",
                    f"track_running_stats={self.track_running_stats}",
                    f"axis={self.axis}", f"dtype={self.dtype.name}"]
        # The options beyond PyTorch's, when they are not their defaults.
        if self.nonfinite != "propagate":
            options.append(f"nonfinite={self.nonfinite!r}")
        if not self.unbiased_running_var:
            options.append("unbiased_running_var=False")
        if self.scale != self.affine:
            options.append(f"scale={self.scale}")
        if self.center != self.affine:
            options.append(f"center={self.center}")
        if self.activation is not None:
            options.append(f"activation={self.activation!r}")
        return f"{type(self).__name__}({', '.join(options)})"


class BatchNorm1d(BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) input."""

    accepted_ndims = (2, 3)


class BatchNorm2d(BatchNorm):
    """Batch normalization of (N, C, H, W) input (``axis=-1`` for NHWC)."""

    accepted_ndims = (4,)


class BatchNorm3d(BatchNorm):
    """Batch normalization of (N, C, D, H, W) input (``axis=-1`` for NDHWC)."""

    accepted_ndims = (5,)
