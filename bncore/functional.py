"""Functional batch normalization: validate, canonicalise, allocate, dispatch.

Every argument is checked here, before any kernel runs and before any running
statistic is written, so a call that raises leaves every array as it was.
The input is then seen without copying as (outer, C, inner) - outer the
product of the dimensions before the feature axis, inner of those after it -
and handed to the compiled layer with the thread count for the call.
"""

import math
import numbers
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _kernels, _lowp, _threads

__all__ = ["batch_norm", "batch_norm_backward", "fold_scale_shift", "moments",
           "release_memory"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: What batch_norm may do when a training batch's statistics are not finite.
NonfiniteMode = Literal["propagate", "skip_update", "raise"]
NONFINITE_MODES: tuple[NonfiniteMode, ...] = ("propagate", "skip_update", "raise")

#: The activations batch_norm can fuse into its output (None: none).
Activation = Literal["relu"] | None
ACTIVATIONS: tuple[Activation, ...] = (None, "relu")

#: batch_norm's (y, mean, invstd) with return_stats=True.
NormalizedWithStats = tuple[NDArray[np.floating], NDArray[np.float64], NDArray[np.float64]]


# --------------------------------------------------------------------------
# Argument checks. Each names the argument and what was expected.

def _as_input(input: ArrayLike, name: str = "input") -> NDArray[np.floating]:
    x = input if isinstance(input, np.ndarray) else np.asarray(input)
    if x.dtype not in _FLOAT_DTYPES and not _lowp.is_half(x.dtype):
        raise TypeError(
            f"{name} must have dtype float32, float64, float16 or bfloat16 (with "
            f"ml_dtypes), got {x.dtype}"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and features), "
            f"got shape {x.shape}"
        )
    return x


def _feature_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
    index = int(axis)
    if not -ndim <= index < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return index % ndim


def _canonical_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """(outer, C, inner) of an array of this shape with features on axis."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _real_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_momentum(momentum: object) -> float:
    if momentum is None:
        raise TypeError(
            "momentum must be a number in [0, 1], got None; for a cumulative "
            "moving average use the module API, BatchNorm(momentum=None)"
        )
    value = _real_number(momentum, "momentum")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return value


def _check_decay(decay: object, momentum: object) -> float | None:
    """The Keras/ONNX/Flax running-average factor, or None; it replaces
    PyTorch's momentum, so a non-default momentum with it is a contradiction."""
    if decay is None:
        return None
    value = _real_number(decay, "decay")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    if momentum != 0.1:
        raise ValueError(
            f"pass momentum (PyTorch's convention, the weight of the new batch) or "
            f"decay (Keras's, ONNX's and Flax's, the weight of the running value), "
            f"not both: got momentum={momentum!r} and decay={decay!r}"
        )
    return value


def _check_activation(activation: object) -> bool:
    """True for "relu", False for None."""
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _check_eps(eps: object) -> float:
    value = _real_number(eps, "eps")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


@overload
def _channel_vector(value: None, name: str, channels: int, axis: int) -> None: ...
@overload
def _channel_vector(value: ArrayLike, name: str, channels: int,
                    axis: int) -> NDArray[np.floating]: ...
def _channel_vector(value: ArrayLike | None, name: str, channels: int,
                    axis: int) -> NDArray[np.floating] | None:
    """A per-channel argument as a contiguous float32 or float64 (C,) array
    (the kernels read both as they are), or None."""
    if value is None:
        return None
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if array.shape != (channels,):
        raise ValueError(
            f"{name} has shape {array.shape}, expected ({channels},) "
            f"to match input.shape[{axis}]"
        )
    return _kernel_ready(array, None if array.dtype in _FLOAT_DTYPES else np.float64)


def _check_running_buffer(buffer: object, name: str, channels: int, axis: int,
                          training: bool) -> None:
    if not isinstance(buffer, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array of float32 or float64, got {type(buffer).__name__}"
        )
    if buffer.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {buffer.dtype}")
    if buffer.shape != (channels,):
        raise ValueError(
            f"{name} has shape {buffer.shape}, expected ({channels},) "
            f"to match input.shape[{axis}]"
        )
    if training:
        # Training updates the buffer in place; say so before anything runs.
        if not buffer.flags.writeable:
            raise ValueError(f"{name} is read-only, but training updates it in place")
        if not buffer.flags.c_contiguous:
            raise ValueError(f"{name} must be contiguous, since training updates it in place")


def _check_running_stats(running_mean: object, running_var: object, channels: int, axis: int,
                         training: bool) -> bool:
    if (running_mean is None) != (running_var is None):
        given, missing = (
            ("running_mean", "running_var") if running_var is None
            else ("running_var", "running_mean")
        )
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    if running_mean is None:
        if not training:
            raise ValueError(
                "running_mean and running_var are required when training=False "
                "(evaluation normalises with the running statistics)"
            )
        return False
    _check_running_buffer(running_mean, "running_mean", channels, axis, training)
    _check_running_buffer(running_var, "running_var", channels, axis, training)
    if training and np.may_share_memory(running_mean, running_var):
        raise ValueError("running_mean and running_var must not share memory")
    return True


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
    )


def _check_out(out: object, like: np.ndarray, operands: Mapping[str, np.ndarray],
               channel_arrays: Mapping[str, np.ndarray | None] | None = None) -> bool:
    """Whether out is exactly one of the operands (an in-place call).

    out must have the shape and dtype of ``like``, be C-contiguous, aligned
    and writeable; it may share memory with an operand (name -> array) only
    by being exactly that array, and with none of the per-channel arrays
    (name -> array or None) the kernel reads while it writes out.
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != like.dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {like.dtype} to match input")
    if out.shape != like.shape:
        raise ValueError(f"out has shape {out.shape}, expected {like.shape} to match input")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.aligned:
        raise ValueError(f"out must be aligned to its dtype ({out.dtype.alignment} bytes)")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    in_place = False
    for name, operand in operands.items():
        if np.may_share_memory(out, operand):
            if _same_buffer(out, operand):
                in_place = True
            elif np.shares_memory(out, operand):
                raise ValueError(
                    f"out overlaps {name} without being the same array; pass "
                    f"out={name} for an in-place call, or a separate array"
                )
    for name, array in (channel_arrays or {}).items():
        if array is not None and np.may_share_memory(out, array) \
                and np.shares_memory(out, array):
            raise ValueError(f"out overlaps {name}: pass a separate array")
    return in_place


def _check_nonfinite(nonfinite: object) -> str:
    if not (isinstance(nonfinite, str) and nonfinite in NONFINITE_MODES):
        allowed = ", ".join(repr(m) for m in NONFINITE_MODES)
        raise ValueError(f"nonfinite must be one of {allowed}; got {nonfinite!r}")
    return nonfinite


def _kernels_for(dtype: np.dtype) -> ModuleType:
    """The compiled kernels for float32 and float64; for float16 and
    bfloat16 their twin in bncore/_lowp.py, which runs them on float32
    chunks."""
    return _kernels if dtype in _FLOAT_DTYPES else _lowp


def _new_output(x: NDArray[Any]) -> NDArray[Any]:
    """An empty array like x. A large one may take the buffer of an earlier
    output that has been freed (bncore/_output_pool.h): its pages are
    already mapped, so a loop of allocating calls does not pay the page
    faults of a fresh buffer each time."""
    if x.nbytes >= _kernels.POOL_MIN_BYTES:
        return _kernels.pooled_empty(x.shape, x.dtype)
    return np.empty(x.shape, dtype=x.dtype)


def release_memory() -> int:
    """Free the buffers bncore keeps to recycle into later outputs.

    Calls without ``out=`` allocate their output; when such an output of
    16 MB or more is freed, bncore keeps its buffer (at most two, 1 GiB in
    all) for the next output of about the same size, which then needs no fresh
    pages from the operating system (on Linux). Returns the bytes freed.
    """
    return int(_kernels.release_pool())


def _kernel_ready(x: NDArray[np.floating],
                  dtype: DTypeLike | None = None) -> NDArray[np.floating]:
    """x as the kernels read it: C-contiguous and aligned, of ``dtype`` if
    given; a copy only when needed (ascontiguousarray alone would keep a
    contiguous but misaligned array as it is)."""
    if (x.flags.c_contiguous and x.flags.aligned
            and (dtype is None or x.dtype == dtype)):
        return x
    return np.array(x, dtype=dtype, order="C", copy=True)


def _as_flag(value: object, name: str) -> bool:
    """A truth value, or a TypeError naming the argument (an array, say)."""
    try:
        return bool(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {error}") from None


def _check_flag(value: object, name: str) -> bool:
    """A true/false option: bool or NumPy bool, nothing that merely converts
    (the string "False" is true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def _nonnegative_int(value: object, name: str) -> int:
    """value as an int, or a TypeError/ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


# --------------------------------------------------------------------------
# Public API

def moments(x: ArrayLike, *, axis: int = 1, ddof: int = 0,
            num_threads: int | None = None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-feature mean and variance, accurate for any offset of the data.

    Parameters
    ----------
    x : array_like, float32 or float64, at least 2-D
    axis : int
        The feature axis; statistics reduce over every other axis.
    ddof : int
        The variance divides by ``n - ddof``, n the number of values per
        feature. Where ``n - ddof <= 0`` the variance is NaN; with no values
        at all the mean is NaN too.
    num_threads : int, optional

    Returns
    -------
    mean, var : float64 arrays of shape (C,)
        float64 whatever the input dtype: the precision they were
        accumulated in.
    """
    x = _as_input(x, "x")
    ax = _feature_axis(axis, x.ndim)
    ddof = _nonnegative_int(ddof, "ddof")
    nthreads = _threads.resolve(num_threads)
    outer, channels, inner = _canonical_shape(x.shape, ax)
    count = outer * inner
    mean = np.empty(channels)
    m2 = np.empty(channels)
    if count == 0 or channels == 0:
        mean.fill(np.nan)
        return mean, np.full(channels, np.nan)
    kernels = _kernels_for(x.dtype)
    kernels.moments(_kernel_ready(x), outer, channels, inner, mean, m2, nthreads)
    if count - ddof <= 0:
        return mean, np.full(channels, np.nan)
    return mean, m2 / (count - ddof)


# return_stats decides what batch_norm returns: y, or (y, mean, invstd).
@overload
def batch_norm(input: ArrayLike, running_mean: NDArray[np.floating] | None = ...,
               running_var: NDArray[np.floating] | None = ..., weight: ArrayLike | None = ...,
               bias: ArrayLike | None = ..., training: bool = ..., momentum: float = ...,
               eps: float = ..., *, axis: int = ..., out: NDArray[np.floating] | None = ...,
               num_threads: int | None = ..., return_stats: Literal[False] = ...,
               nonfinite: NonfiniteMode = ..., activation: Activation = ...,
               unbiased_running_var: bool = ..., decay: float | None = ...,
               ) -> NDArray[np.floating]: ...
@overload
def batch_norm(input: ArrayLike, running_mean: NDArray[np.floating] | None = ...,
               running_var: NDArray[np.floating] | None = ..., weight: ArrayLike | None = ...,
               bias: ArrayLike | None = ..., training: bool = ..., momentum: float = ...,
               eps: float = ..., *, axis: int = ..., out: NDArray[np.floating] | None = ...,
               num_threads: int | None = ..., return_stats: Literal[True],
               nonfinite: NonfiniteMode = ..., activation: Activation = ...,
               unbiased_running_var: bool = ..., decay: float | None = ...,
               ) -> NormalizedWithStats: ...
@overload
def batch_norm(input: ArrayLike, running_mean: NDArray[np.floating] | None = ...,
               running_var: NDArray[np.floating] | None = ..., weight: ArrayLike | None = ...,
               bias: ArrayLike | None = ..., training: bool = ..., momentum: float = ...,
               eps: float = ..., *, axis: int = ..., out: NDArray[np.floating] | None = ...,
               num_threads: int | None = ..., return_stats: bool,
               nonfinite: NonfiniteMode = ..., activation: Activation = ...,
               unbiased_running_var: bool = ..., decay: float | None = ...,
               ) -> NDArray[np.floating] | NormalizedWithStats: ...
def batch_norm(input: ArrayLike, running_mean: NDArray[np.floating] | None = None,
               running_var: NDArray[np.floating] | None = None, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, axis: int = 1, out: NDArray[np.floating] | None = None,
               num_threads: int | None = None, return_stats: bool = False,
               nonfinite: NonfiniteMode = "propagate", activation: Activation = None,
               unbiased_running_var: bool = True, decay: float | None = None,
               ) -> NDArray[np.floating] | NormalizedWithStats:
    """Batch normalization with the arguments and semantics of PyTorch's
    ``torch.nn.functional.batch_norm``, and the conventions of Keras, ONNX
    and Flax as options.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per feature, where in
    training mean and var are the batch's (biased variance) and in evaluation
    the running statistics. In training, given running buffers are updated in
    place: ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased batch variance for running_var (PyTorch's convention; see
    ``decay`` and ``unbiased_running_var`` for the others').

    Parameters
    ----------
    input : array_like, float32 or float64, at least 2-D
        Copied once if not C-contiguous; never modified unless ``out=input``.
    running_mean, running_var : ndarray of shape (C,), float32 or float64
        Both or neither. Required when ``training=False``.
    weight, bias : array_like of shape (C,), optional
    training : bool
    momentum : float in [0, 1]
        PyTorch's convention: the weight of the new batch.
    eps : float >= 0
    axis : int
        The feature axis; ``axis=-1`` is channels-last.
    out : ndarray, optional
        C-contiguous, of the input's shape and dtype; may be the input itself.
    num_threads : int, optional
        Threads for this call (see ``bncore.set_num_threads``).
    activation : None or "relu"
        ``"relu"`` returns ``max(y, 0)`` (NaN stays NaN), computed in the same
        pass over memory as y (``batch_norm_backward`` takes the same
        argument).
    unbiased_running_var : bool
        True (PyTorch): running_var averages the unbiased batch variance
        (divided by n - 1); False (Keras, ONNX, Flax): the biased one (divided
        by n), the variance the batch was normalised with.
    decay : float in [0, 1], optional
        Keras's, ONNX's and Flax's convention instead of momentum:
        ``running = decay * running + (1 - decay) * batch``, so Keras's
        ``momentum=0.99`` is ``decay=0.99`` (PyTorch's ``momentum=0.01``).
        Give momentum or decay, not both.
    return_stats : bool
        Also return the float64 mean and ``1 / sqrt(var + eps)`` the output was
        normalised with, as needed by ``batch_norm_backward``.
    nonfinite : {"propagate", "skip_update", "raise"}
        What a training call does when the batch's mean or unbiased variance
        is NaN or infinite in some channel (a NaN or infinite input value, or
        values whose square overflows), or too large for a running buffer's
        dtype. Whatever the mode, such a channel's output is NaN and the
        other channels are normalised as usual; the mode decides what
        happens to the running statistics:

        * ``"propagate"`` (PyTorch's behaviour): update them anyway, so the
          offending channels' running statistics become NaN or infinite.
        * ``"skip_update"``: leave both running buffers untouched, every
          channel of them (the whole batch is skipped), and return the
          output as usual.
        * ``"raise"``: raise ``FloatingPointError`` naming the channels, with
          both running buffers untouched. Also raised when no running
          buffers were given. FloatingPointError rather than ValueError,
          because the arguments were valid: it is the arithmetic on this
          data that produced NaN, the error NumPy raises for that under
          ``np.errstate(invalid="raise")``; code that catches ValueError for
          bad arguments does not swallow it.

          The statistics are only known once the fused kernel has written
          the output, so after the raise ``out`` (the input itself when
          ``out=input``) holds the complete output the call would have
          returned: NaN throughout the offending channels, the other
          channels normalised with their batch statistics. Without ``out``
          nothing the caller holds has been written.

        Evaluation (``training=False``) computes no statistics and ignores
        this argument: a non-finite input value gives a non-finite output at
        its own position only. An empty batch is not non-finite.

    Returns
    -------
    y, or (y, mean, invstd) with ``return_stats=True``.

    Notes
    -----
    An empty batch (no values per feature) gives an empty output and leaves
    the running statistics untouched; its returned statistics are NaN.
    """
    decay = _check_decay(decay, momentum)
    y, mean, invstd, batch = _forward(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        axis=axis, out=out, num_threads=num_threads, nonfinite=nonfinite,
        eval_stats=return_stats, activation=activation,
        unbiased_running_var=unbiased_running_var,
    )
    if batch is not None:
        _fold_batch(batch, running_mean, running_var, batch.momentum, decay)
    if return_stats:
        # eval_stats=return_stats: the statistics were computed in either mode.
        assert mean is not None and invstd is not None
        return y, mean, invstd
    return y


class _Batch:
    """A training batch's statistics, not yet folded into running buffers."""

    __slots__ = ("mean", "m2", "count", "momentum", "nonfinite", "unbiased")

    def __init__(self, mean: NDArray[np.float64], m2: NDArray[np.float64], count: int,
                 momentum: float, nonfinite: str, unbiased: bool) -> None:
        self.mean = mean
        self.m2 = m2
        self.count = count
        self.momentum = momentum
        self.nonfinite = nonfinite
        self.unbiased = unbiased

    def var_divisor(self) -> int:
        """What m2 is divided by for the variance that goes into running_var."""
        return self.count - 1 if self.unbiased else self.count

    def running_var(self) -> NDArray[np.float64]:
        """The batch variance that goes into running_var."""
        return self.m2 / self.var_divisor()


def _forward(input: ArrayLike, running_mean: NDArray[np.floating] | None,
             running_var: NDArray[np.floating] | None, weight: ArrayLike | None,
             bias: ArrayLike | None, training: object, momentum: float, eps: float, *,
             axis: int, out: NDArray[np.floating] | None, num_threads: int | None,
             nonfinite: str, eval_stats: bool = True, activation: str | None = None,
             unbiased_running_var: object = True,
             ) -> tuple[NDArray[np.floating], NDArray[np.float64] | None,
                        NDArray[np.float64] | None, _Batch | None]:
    """Everything ``batch_norm`` does but the running update.

    Returns ``(y, mean, invstd, batch)``: batch is a :class:`_Batch` when the
    call computed batch statistics (training with at least one value per
    channel), for :func:`_fold_batch`; else None. The layers fold it under
    their lock, so that concurrent training calls update in turn. In eval,
    mean and invstd are None unless ``eval_stats``: the kernel folds the
    running statistics itself, and small calls are all overhead.
    """
    # Calls of the common kind are checked and run in C: small calls were
    # mostly the Python below. Anything else gets None from there.
    if training is False and not eval_stats:
        y = _kernels.eval_fast(input, running_mean, running_var, weight, bias, momentum, eps,
                               axis, out, num_threads, nonfinite, activation,
                               unbiased_running_var)
        if y is not None:
            return y, None, None, None
    elif training is True:
        fast = _kernels.train_fast(input, running_mean, running_var, weight, bias, momentum,
                                   eps, axis, out, num_threads, nonfinite, activation,
                                   unbiased_running_var)
        if fast is not None:
            y, batch_mean, m2, batch_invstd, count = fast
            return y, batch_mean, batch_invstd, _Batch(batch_mean, m2, count, momentum,
                                                       nonfinite, bool(unbiased_running_var))

    x = _as_input(input)
    # The common argument types are accepted at a glance; anything else
    # takes the full checks.
    ndim = x.ndim
    ax = axis if type(axis) is int and 0 <= axis < ndim else _feature_axis(axis, ndim)
    outer, channels, inner = _canonical_shape(x.shape, ax)
    training = training if type(training) is bool else _as_flag(training, "training")
    if not (type(momentum) is float and 0.0 <= momentum <= 1.0):
        momentum = _check_momentum(momentum)
    if not (type(eps) is float and 0.0 <= eps < math.inf):
        eps = _check_eps(eps)
    if nonfinite != "propagate":
        nonfinite = _check_nonfinite(nonfinite)
    relu = activation is not None and _check_activation(activation)
    if type(unbiased_running_var) is not bool:
        unbiased_running_var = _check_flag(unbiased_running_var, "unbiased_running_var")
    _check_running_stats(running_mean, running_var, channels, ax, training)
    weight = _channel_vector(weight, "weight", channels, ax)
    bias = _channel_vector(bias, "bias", channels, ax)
    # out may be the input, but must not share memory with the per-channel
    # arrays the kernel reads while it writes out (or the training update).
    in_place = out is not None and _check_out(out, x, {"input": x}, {
        "weight": weight, "bias": bias,
        "running_mean": running_mean, "running_var": running_var})
    nthreads = _threads.resolve(num_threads)
    count = outer * inner
    if training and count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {x.shape}"
        )

    source = _kernel_ready(x)
    y = out if out is not None else _new_output(x)
    if in_place:
        source = y

    batch: _Batch | None = None
    mean: NDArray[np.float64] | None
    invstd: NDArray[np.float64] | None
    if training:
        mean = np.empty(channels)
        m2 = np.empty(channels)
        invstd = np.empty(channels)
        if count == 0 or channels == 0:
            mean.fill(np.nan)
            invstd.fill(np.nan)
        else:
            _kernels_for(x.dtype).train_forward(source, y, outer, channels, inner, weight,
                                                bias, eps, mean, m2, invstd, nthreads, relu)
            batch = _Batch(mean, m2, count, momentum, nonfinite, unbiased_running_var)
    else:
        # Evaluation without running statistics was refused above.
        assert running_mean is not None and running_var is not None
        mean = invstd = None
        if eval_stats:
            mean, invstd = _running_stats(running_mean, running_var, eps)
        if x.size:
            _kernels_for(x.dtype).normalize(
                source, y, outer, channels, inner, _kernel_ready(running_mean),
                _kernel_ready(running_var), eps, weight, bias, nthreads, relu)
    return y, mean, invstd, batch


def fold_scale_shift(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The per-feature (scale, shift) of evaluation-mode batch normalization.

    ``batch_norm(x, running_mean, running_var, weight, bias, eps=eps)`` equals
    ``x * scale + shift`` per feature, with ``scale = weight / sqrt(running_var
    + eps)`` and ``shift = bias - running_mean * scale``: what folding a batch
    norm into a neighbouring linear layer needs. Computed in float64.

    The kernels do not normalise this way: when the mean is large against the
    spread, ``x * scale + shift`` cancels and loses the low digits that
    ``(x - mean) * scale + bias`` keeps.

    Parameters
    ----------
    running_mean, running_var : array_like of shape (C,)
    weight, bias : array_like of shape (C,), optional (1 and 0)
    eps : float >= 0

    Returns
    -------
    scale, shift : float64 arrays of shape (C,)
    """
    mean = np.asarray(running_mean)
    if mean.ndim != 1:
        raise ValueError(f"running_mean must be 1-D, got shape {mean.shape}")
    channels = mean.shape[0]
    mean = _channel_vector(mean, "running_mean", channels, 0)
    var = _channel_vector(running_var, "running_var", channels, 0)
    if var is None:
        raise TypeError("running_var must be an array of shape (C,), got None")
    gamma = _channel_vector(weight, "weight", channels, 0)
    beta = _channel_vector(bias, "bias", channels, 0)
    mean64, invstd = _running_stats(mean, var, _check_eps(eps))
    scale = invstd if gamma is None else gamma.astype(np.float64) * invstd
    shift = -mean64 * scale
    if beta is not None:
        shift += beta
    return scale, shift


def _running_stats(running_mean: ArrayLike, running_var: ArrayLike,
                   eps: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The float64 mean and invstd that eval normalises with (the kernels
    compute the same, in the same IEEE operations)."""
    mean = np.array(running_mean, dtype=np.float64)
    # A negative or -inf running_var gives NaN, a zero one with eps=0 inf,
    # silently, as the kernels treat non-finite values.
    with np.errstate(invalid="ignore", divide="ignore"):
        invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    return mean, invstd


def batch_norm_backward(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                        invstd: ArrayLike, weight: ArrayLike | None = None,
                        bias: ArrayLike | None = None, *, training: bool = True,
                        axis: int = 1, out: NDArray[np.floating] | None = None,
                        num_threads: int | None = None, activation: Activation = None,
                        ) -> tuple[NDArray[np.floating], NDArray[np.floating],
                                   NDArray[np.floating]]:
    """Gradients of ``batch_norm`` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape and dtype.
    input : array_like, float32 or float64
        The forward's input.
    mean, invstd : array_like of shape (C,)
        What the forward normalised with: ``batch_norm(..., return_stats=True)``
        returns them.
    weight : array_like of shape (C,), optional
        The forward's weight (None: 1).
    bias : array_like of shape (C,), optional
        The forward's bias (None: 0); only read with ``activation="relu"``.
    training : bool
        True when mean and invstd were the batch's own statistics (they then
        depend on the input), False for frozen statistics (eval mode).
    axis : int
        The feature axis used in the forward.
    out : ndarray, optional
        For grad_input: C-contiguous, of the input's shape and dtype; may be
        exactly grad_output or input (overwritten in place; with
        ``activation="relu"`` grad_output only).
    num_threads : int, optional
    activation : None or "relu"
        The forward's activation. With ``"relu"``, grad_output is dL/d(relu
        output) and passes only where the forward's pre-activation output was
        > 0 (the gradient at 0 is 0, as PyTorch's). That pre-activation
        output is recomputed from input, mean, invstd, weight and bias with
        the forward's own arithmetic, so pass the values the forward used.

    Returns
    -------
    grad_input, grad_weight, grad_bias
        With ``xhat = (x - mean) * invstd`` and n values per feature:
        ``grad_weight = sum(dy * xhat)``, ``grad_bias = sum(dy)`` (shape (C,),
        the input's dtype, summed in float64), and in training
        ``grad_input = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``,
        in eval ``grad_input = dy * weight * invstd``.
    """
    # Calls of the common kind are checked and run in C, as the forward's:
    # a small backward was half Python checks. Anything else gets None.
    fast = _kernels.backward_fast(grad_output, input, mean, invstd, weight, bias, training,
                                  axis, out, num_threads, activation)
    if fast is not None:
        return fast
    x = _as_input(input)
    dy = _as_input(grad_output, "grad_output")
    if dy.dtype != x.dtype:
        raise TypeError(f"grad_output has dtype {dy.dtype}, expected {x.dtype} to match input")
    if dy.shape != x.shape:
        raise ValueError(f"grad_output has shape {dy.shape}, expected {x.shape} to match input")
    ax = _feature_axis(axis, x.ndim)
    outer, channels, inner = _canonical_shape(x.shape, ax)
    training = training if type(training) is bool else _as_flag(training, "training")
    for name, value in (("mean", mean), ("invstd", invstd)):
        if value is None:
            raise TypeError(
                f"{name} is required: pass what the forward normalised with "
                "(batch_norm(..., return_stats=True) returns it)"
            )
    mean = _kernel_ready(_channel_vector(mean, "mean", channels, ax), np.float64)
    invstd = _kernel_ready(_channel_vector(invstd, "invstd", channels, ax), np.float64)
    weight = _channel_vector(weight, "weight", channels, ax)
    bias = _channel_vector(bias, "bias", channels, ax)
    relu = activation is not None and _check_activation(activation)
    if out is not None:
        _check_out(out, x, {"input": x, "grad_output": dy},
                   {"mean": mean, "invstd": invstd, "weight": weight, "bias": bias})
        if relu and _same_buffer(out, x):
            raise ValueError(
                "out must not be the input with activation='relu': the relu's gate "
                "is recomputed from the input while the gradient is written"
            )
    nthreads = _threads.resolve(num_threads)

    grad_input = out if out is not None else _new_output(x)
    grad_weight = np.zeros(channels)
    grad_bias = np.zeros(channels)
    if x.size:
        source, dy = _kernel_ready(x), _kernel_ready(dy)
        kernels = _kernels_for(x.dtype)
        if relu:
            # dL/d(pre-activation) into grad_input, then the usual backward
            # in place on it.
            kernels.relu_mask(source, dy, grad_input, outer, channels, inner, mean, invstd,
                              weight, bias, nthreads)
            dy = grad_input
        kernels.backward(
            source, dy, grad_input, outer, channels, inner, mean, invstd, weight, training,
            grad_weight, grad_bias, nthreads,
        )
    # Half-precision parameter gradients would overflow at 65504 (float16)
    # or keep 8 bits (bfloat16): they come back as float32, the dtype of a
    # half-precision layer's parameters.
    sums_dtype = x.dtype if x.dtype in _FLOAT_DTYPES else np.dtype(np.float32)
    return grad_input, grad_weight.astype(sums_dtype), grad_bias.astype(sums_dtype)


def _nonfinite_channels(batch: _Batch, running_mean: NDArray[np.floating] | None,
                        running_var: NDArray[np.floating] | None) -> NDArray[np.intp]:
    """Channels whose batch mean or unbiased variance is NaN, infinite, or
    beyond the largest finite value of the running buffer's dtype."""
    mean_limit = np.finfo(np.float64 if running_mean is None else running_mean.dtype).max
    var_limit = np.finfo(np.float64 if running_var is None else running_var.dtype).max
    var = batch.running_var()
    # Comparisons with NaN are False: NaN fails both bounds.
    finite = (np.abs(batch.mean) <= mean_limit) & (np.abs(var) <= var_limit)
    return np.flatnonzero(~finite)


def _fold_batch(batch: _Batch, running_mean: NDArray[np.floating] | None,
                running_var: NDArray[np.floating] | None, momentum: float,
                decay: float | None = None) -> bool:
    """Apply the batch's nonfinite policy, then update the running buffers
    (when given) with momentum or, when given, decay (see batch_norm).
    Returns False when the update was skipped."""
    if batch.nonfinite != "propagate":
        bad = _nonfinite_channels(batch, running_mean, running_var)
        if bad.size:
            if batch.nonfinite == "raise":
                shown = ", ".join(str(c) for c in bad[:10])
                more = f" and {bad.size - 10} more" if bad.size > 10 else ""
                raise FloatingPointError(
                    f"batch statistics are not finite in channel(s) {shown}{more} "
                    f"(of {batch.mean.size}): the batch's mean or variance is NaN, "
                    "infinite, or too large for the running statistics' dtype; the "
                    "running statistics were left unchanged (nonfinite='raise')"
                )
            return False
    if running_mean is not None:
        assert running_var is not None  # both or neither, as checked by the callers
        keep, take = (1.0 - momentum, momentum) if decay is None else (decay, 1.0 - decay)
        # One compiled loop; NumPy's casts only where a float32 would overflow.
        if not _kernels.update_running(running_mean, running_var, batch.mean, batch.m2,
                                       float(batch.var_divisor()), keep, take):
            _update_running(running_mean, running_var, batch.mean, batch.running_var(), keep,
                            take)
    return True


def _update_running(running_mean: NDArray[np.floating], running_var: NDArray[np.floating],
                    mean: NDArray[np.float64], var: NDArray[np.float64], keep: float,
                    take: float) -> None:
    """running = keep * running + take * batch, in float64.

    Both new values are computed, and cast to the buffers' dtypes, before
    either buffer is written, so that nothing can fail between the two
    writes (a cast overflowing to inf may raise under np.errstate).
    """
    new_mean = keep * running_mean.astype(np.float64) + take * mean
    new_var = keep * running_var.astype(np.float64) + take * var
    new_mean = new_mean.astype(running_mean.dtype)
    new_var = new_var.astype(running_var.dtype)
    running_mean[...] = new_mean
    running_var[...] = new_var
