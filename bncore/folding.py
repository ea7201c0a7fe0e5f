"""Fold an eval-mode batch norm into the linear or convolution layer beside it.

In eval mode batch norm is a per-feature affine map, ``y = x * scale + shift``
(``bncore.functional.fold_scale_shift``), so it can be merged into the
weights of an adjacent linear or convolution layer: the network then runs one
layer instead of two and gives the same outputs up to rounding.

* A batch norm that FOLLOWS a layer scales the layer's output channels:
  ``W' = scale * W`` (per output channel), ``b' = scale * b + shift``.
  ``fold_into_linear`` and ``fold_into_conv`` (also transposed and grouped).
* A batch norm that PRECEDES a linear layer scales its input features:
  ``W' = W * scale`` (per input feature), ``b' = b + W @ shift``.
  ``fold_preceding_into_linear``.

A batch norm preceding a convolution is not offered: with zero padding the
padded border sees zeros, not ``0 * scale + shift``, so no convolution
reproduces ``conv(bn(x))`` there (and a transposed convolution overlaps a
different number of inputs near its borders whatever its padding).

Weights and biases are NumPy arrays in PyTorch's layout; the functions never
modify them, compute in float64 and return new arrays in the weight's dtype.
Only the batch norm's running statistics, ``weight``, ``bias`` and ``eps``
are read: the result reproduces the layer in eval mode whatever its
``training`` flag, and its feature ``axis`` plays no part (a feature is the
same channel in NCHW or NHWC data).
"""

import numbers
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from .functional import fold_scale_shift
from .modules import BatchNorm

__all__ = ["fold_into_conv", "fold_into_linear", "fold_preceding_into_linear"]

_Float = TypeVar("_Float", bound=np.floating)

#: Weight dtypes the folded weights can be returned in. The computation runs
#: in float64, so wider types (longdouble) would be given digits they lack.
_WEIGHT_DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16")


# --------------------------------------------------------------------------
# Argument checks. Each names the argument and what was expected.

def _check_float_array(value: object, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array, got {type(value).__name__}"
            + ("; pass tensor.detach().numpy()" if hasattr(value, "detach") else "")
        )
    if value.dtype.name not in _WEIGHT_DTYPE_NAMES:
        raise TypeError(
            f"{name} must have dtype float16, float32, float64 or bfloat16, "
            f"got {value.dtype}"
        )
    return value


def _check_linear_weight(weight: object) -> np.ndarray:
    w = _check_float_array(weight, "weight")
    if w.ndim != 2:
        raise ValueError(
            f"weight must have 2 dimensions (out_features, in_features), got shape {w.shape}"
        )
    return w


def _check_bias(bias: object, channels: int, what: str) -> np.ndarray | None:
    """The layer's bias as given (or None); it must have one value per
    ``what`` (a description of the channels, for the message)."""
    if bias is None:
        return None
    checked = _check_float_array(bias, "bias")
    if checked.shape != (channels,):
        raise ValueError(f"bias has shape {checked.shape}, expected ({channels},) ({what})")
    return checked


def _check_groups(groups: object) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be a positive integer, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    return int(groups)


def _bn_scale_shift(
    bn: object, channels: int, what: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The float64 (scale, shift) of ``bn`` in eval mode, after checking that
    it is a batch norm with running statistics over ``channels`` features."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a bncore.BatchNorm layer, got {type(bn).__name__}")
    if bn.activation is not None:
        raise ValueError(
            f"bn has activation={bn.activation!r}: weights can only hold the affine "
            "part; fold a layer without the activation and apply it afterwards"
        )
    if bn.num_features is None:
        raise ValueError("bn is a lazy layer that has not seen any input: it has no "
                         "statistics to fold yet")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn was built with track_running_stats=False: it normalizes with the "
            "statistics of each batch, which no fixed weights can reproduce"
        )
    if bn.num_features != channels:
        raise ValueError(
            f"bn has num_features={bn.num_features}, expected {channels} ({what})"
        )
    scale: npt.NDArray[np.float64]
    shift: npt.NDArray[np.float64]
    scale, shift = fold_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return scale, shift


def _bias_float64(array: np.ndarray | None, channels: int) -> np.ndarray:
    """A bias in float64; a missing one is zero."""
    if array is None:
        return np.zeros(channels)
    return array.astype(np.float64)


# --------------------------------------------------------------------------
# Public functions.

def fold_into_linear(
    weight: npt.NDArray[_Float],
    bias: npt.NDArray[np.floating] | None,
    bn: BatchNorm,
) -> tuple[npt.NDArray[_Float], npt.NDArray[_Float]]:
    """Fold a batch norm that follows a linear layer into the layer.

    Parameters
    ----------
    weight : ndarray, shape (out_features, in_features)
        The linear layer's weight, in PyTorch's layout: ``y = x @ weight.T +
        bias``. float16, float32, float64 or bfloat16.
    bias : ndarray, shape (out_features,), or None
        The linear layer's bias; None for a layer without one.
    bn : bncore.BatchNorm
        The batch norm applied to the layer's output, with running statistics
        (``num_features == out_features``).

    Returns
    -------
    weight, bias : ndarray
        New arrays in ``weight``'s dtype, such that ``x @ weight.T + bias``
        equals ``bn(x @ w.T + b)`` in eval mode, up to rounding. The bias is
        always returned: the batch norm's shift needs one.

    Raises
    ------
    TypeError
        When ``weight`` or ``bias`` is not a floating NumPy array, or ``bn``
        is not a ``bncore.BatchNorm``.
    ValueError
        When the shapes do not fit together, or ``bn`` has no running
        statistics (``track_running_stats=False``).

    See Also
    --------
    fold_preceding_into_linear : for a batch norm applied to the layer's input.
    """
    w = _check_linear_weight(weight)
    channels = w.shape[0]
    what = f"the out_features of weight, shape {w.shape}"
    b = _check_bias(bias, channels, what)
    scale, shift = _bn_scale_shift(bn, channels, what)
    folded_weight = w.astype(np.float64) * scale[:, np.newaxis]
    folded_bias = _bias_float64(b, channels) * scale + shift
    return folded_weight.astype(w.dtype), folded_bias.astype(w.dtype)


def fold_preceding_into_linear(
    weight: npt.NDArray[_Float],
    bias: npt.NDArray[np.floating] | None,
    bn: BatchNorm,
) -> tuple[npt.NDArray[_Float], npt.NDArray[_Float]]:
    """Fold a batch norm that precedes a linear layer into the layer.

    A function of its own rather than a flag of ``fold_into_linear``: the two
    scale different axes of the weight, and with a square weight a wrong flag
    could not be detected; the name says at the call site which fold it is.

    Parameters
    ----------
    weight : ndarray, shape (out_features, in_features)
        The linear layer's weight, in PyTorch's layout: ``y = x @ weight.T +
        bias``. float16, float32, float64 or bfloat16.
    bias : ndarray, shape (out_features,), or None
        The linear layer's bias; None for a layer without one.
    bn : bncore.BatchNorm
        The batch norm applied to the layer's input, with running statistics
        (``num_features == in_features``).

    Returns
    -------
    weight, bias : ndarray
        New arrays in ``weight``'s dtype, such that ``x @ weight.T + bias``
        equals ``bn(x) @ w.T + b`` in eval mode, up to rounding:
        ``weight = w * scale`` (each input feature's column scaled) and
        ``bias = b + w @ shift``.

    Raises
    ------
    TypeError
        When ``weight`` or ``bias`` is not a floating NumPy array, or ``bn``
        is not a ``bncore.BatchNorm``.
    ValueError
        When the shapes do not fit together, or ``bn`` has no running
        statistics (``track_running_stats=False``).

    Notes
    -----
    There is no such function for convolutions: a convolution that pads with
    zeros sees zeros at the border where ``bn`` would have produced
    ``shift``, so no change of its weights reproduces ``conv(bn(x))`` there.
    """
    w = _check_linear_weight(weight)
    out_features, in_features = w.shape
    b = _check_bias(bias, out_features, f"the out_features of weight, shape {w.shape}")
    scale, shift = _bn_scale_shift(
        bn, in_features, f"the in_features of weight, shape {w.shape}"
    )
    w64 = w.astype(np.float64)
    folded_weight = w64 * scale[np.newaxis, :]
    folded_bias = _bias_float64(b, out_features) + w64 @ shift
    return folded_weight.astype(w.dtype), folded_bias.astype(w.dtype)


def fold_into_conv(
    weight: npt.NDArray[_Float],
    bias: npt.NDArray[np.floating] | None,
    bn: BatchNorm,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[npt.NDArray[_Float], npt.NDArray[_Float]]:
    """Fold a batch norm that follows a convolution into the convolution.

    Parameters
    ----------
    weight : ndarray
        The convolution's weight in PyTorch's layout, of any number of
        spatial dimensions (Conv1d/2d/3d): ``(out_channels, in_channels /
        groups, *kernel)``, or for a transposed convolution
        ``(in_channels, out_channels / groups, *kernel)``. float16, float32,
        float64 or bfloat16.
    bias : ndarray, shape (out_channels,), or None
        The convolution's bias; None for one without.
    bn : bncore.BatchNorm
        The batch norm applied to the convolution's output, with running
        statistics (``num_features == out_channels``).
    transposed : bool
        Whether the convolution is transposed (``ConvTranspose``), whose
        weight has the output channels on its second axis.
    groups : int
        The convolution's ``groups``. It decides which output channel each
        slice of a transposed convolution's weight feeds; a plain
        convolution's output channels are its weight's first axis whatever
        ``groups`` is, and it is only checked against the weight's shape.

    Returns
    -------
    weight, bias : ndarray
        New arrays in ``weight``'s dtype (same shape as ``weight``, and
        ``(out_channels,)``), such that the convolution with them equals
        ``bn(conv(x))`` in eval mode, up to rounding, for any stride,
        padding and dilation. The bias is always returned.

    Raises
    ------
    TypeError
        When ``weight`` or ``bias`` is not a floating NumPy array, ``bn`` is
        not a ``bncore.BatchNorm``, or ``groups`` is not an integer.
    ValueError
        When the shapes do not fit together or the channels do not divide
        into ``groups``, or ``bn`` has no running statistics
        (``track_running_stats=False``).

    Notes
    -----
    A batch norm that *precedes* a convolution is not folded: a convolution
    that pads with zeros sees zeros at the border where ``bn`` would have
    produced ``shift``, so no change of its weights reproduces
    ``conv(bn(x))`` there; a transposed convolution sums a different number
    of inputs near its borders, whatever its padding.

    Grouped transposed convolutions are folded too
    (``torch.nn.utils.fusion.fuse_conv_bn_eval(..., transpose=True)`` 2.13
    rejects them with a shape error).
    """
    w = _check_float_array(weight, "weight")
    groups = _check_groups(groups)
    layout = "(in_channels, out_channels / groups, *kernel)" if transposed else (
        "(out_channels, in_channels / groups, *kernel)")
    if w.ndim < 3:
        raise ValueError(
            f"weight must have at least 3 dimensions {layout}, got shape {w.shape}"
        )
    if w.shape[0] % groups:
        raise ValueError(
            f"weight.shape[0] is {w.shape[0]}, which does not divide into groups={groups}"
        )
    spatial = (1,) * (w.ndim - 2)
    if transposed:
        channels = w.shape[1] * groups
        what = f"weight.shape[1] * groups of weight, shape {w.shape}, groups={groups}"
    else:
        channels = w.shape[0]
        what = f"the out_channels of weight, shape {w.shape}"
    b = _check_bias(bias, channels, what)
    scale, shift = _bn_scale_shift(bn, channels, what)
    w64 = w.astype(np.float64)
    if transposed:
        # Input channel i of group g feeds output channels g * (out / groups)
        # + j through weight[i, j]: view the weight as (groups, in / groups,
        # out / groups, *kernel) and scale j within each group.
        per_group = w64.reshape((groups, w.shape[0] // groups) + w.shape[1:])
        per_group = per_group * scale.reshape((groups, 1, w.shape[1]) + spatial)
        folded_weight = per_group.reshape(w.shape)
    else:
        folded_weight = w64 * scale.reshape((channels, 1) + spatial)
    folded_bias = _bias_float64(b, channels) * scale + shift
    return folded_weight.astype(w.dtype), folded_bias.astype(w.dtype)
