"""The oracle: slow, obviously correct float64 NumPy twins of bncore's functions.

The test suite holds every compiled result against this module. It is written
for the reader, not for speed:

* every input is converted to float64 (exactly, for float32 data) and viewed
  channel-first as a ``(C, n)`` array with ``np.moveaxis`` + ``reshape``;
* statistics are two-pass: the mean is a correctly rounded sum
  (``math.fsum``) divided by ``n``, then ``M2`` is the correctly rounded sum
  of squared deviations, with the corrected two-pass term of Chan, Golub &
  LeVeque (1983) removing what is left of the mean's rounding error;
* a channel whose values are all equal has, exactly, that value as its mean
  and ``M2 == 0`` (no rounding can enter: the formula is not even evaluated);
* nothing is modified in place: new running statistics are *returned*.

It imports nothing from the rest of bncore, so a bug in the package cannot
leak into the oracle. Use it on small arrays only (one ``math.fsum`` per
channel over a Python list).
"""

import math
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["BatchNormResult", "batch_norm", "batch_norm_backward", "moments"]

_F64 = NDArray[np.float64]


#: What :func:`batch_norm` returns. All fields are float64 arrays.
#:
#: ``y``
#:     the normalized output, shape of the input, C-contiguous.
#: ``mean``, ``invstd``
#:     shape ``(C,)``: the mean and ``1 / sqrt(var + eps)`` that ``y`` was
#:     normalized with (batch statistics in training, running ones in eval).
#: ``running_mean``, ``running_var``
#:     NEW arrays holding the running statistics after the call (a float64
#:     copy of the inputs when they are not updated), or ``None`` when the
#:     corresponding argument was ``None``.
class BatchNormResult(NamedTuple):
    y: _F64
    mean: _F64
    invstd: _F64
    running_mean: _F64 | None
    running_var: _F64 | None


def _normalize_axis(ndim: int, axis: int) -> int:
    if ndim < 2:
        raise ValueError(f"input must have at least 2 dimensions, got {ndim}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def _channels(x: ArrayLike, axis: int) -> tuple[_F64, int]:
    """float64 copy of ``x`` as a ``(C, n)`` array, and the normalized axis."""
    x = np.asarray(x)
    ax = _normalize_axis(x.ndim, axis)
    c = x.shape[ax]
    xc = np.moveaxis(x.astype(np.float64), ax, 0).reshape(c, -1)
    return xc, ax


def _fsum(values: _F64) -> float:
    """Correctly rounded sum of a 1-D float64 array."""
    return math.fsum(values.tolist())


def _channel_moments(xc: _F64) -> tuple[int, _F64, _F64, _F64]:
    """Per row of the ``(C, n)`` array: ``(n, mean, M2, residual)``; NaN
    when n == 0. ``mean + residual`` is the mean to about twice float64's
    precision: ``residual`` is the mean of ``x - mean``, what rounding the
    mean to float64 left out."""
    c, n = xc.shape
    mean = np.full(c, np.nan)
    m2 = np.full(c, np.nan)
    residual = np.full(c, np.nan)
    if n == 0:
        return n, mean, m2, residual
    for k in range(c):
        row = xc[k]
        if np.all(row == row[0]):
            # All values equal: exact answer, no arithmetic.
            mean[k] = row[0]
            m2[k] = 0.0
            residual[k] = 0.0
            continue
        mu = _fsum(row) / n
        d = row - mu
        # Corrected two-pass algorithm: sum(d)**2 / n is what the rounding
        # of mu added to sum(d*d); it is tiny but removing it costs nothing.
        m2[k] = max(_fsum(d * d) - _fsum(d) ** 2 / n, 0.0)
        mean[k] = mu
        residual[k] = _fsum(d) / n
    return n, mean, m2, residual


def moments(x: ArrayLike, *, axis: int = 1, ddof: int = 0) -> tuple[_F64, _F64]:
    """Per-channel ``(mean, var)`` of ``x`` along every axis but ``axis``.

    Returns two float64 arrays of shape ``(C,)``; ``var = M2 / (n - ddof)``
    where ``n`` is the number of values per channel. Both are NaN where
    ``n == 0``; ``var`` is NaN where ``n - ddof <= 0``.
    """
    xc, _ = _channels(x, axis)
    n, mean, m2, _ = _channel_moments(xc)
    if n - ddof > 0:
        var = m2 / (n - ddof)
    else:
        var = np.full_like(m2, np.nan)
    return mean, var


def batch_norm(
    input: ArrayLike,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    activation: Literal["relu"] | None = None,
    unbiased_running_var: bool = True,
    decay: float | None = None,
) -> BatchNormResult:
    """Batch normalization with PyTorch's semantics, in float64.

    Same arguments as ``bncore.batch_norm`` (without ``out``, ``num_threads``
    and ``return_stats``). Returns a :data:`BatchNormResult`
    ``(y, mean, invstd, running_mean, running_var)``; the arguments are never
    modified.

    Training: ``y`` is normalized with the batch mean and the *biased* batch
    variance; when running statistics are given, the returned ones are
    ``(1 - momentum) * running + momentum * batch``, the variance using the
    *unbiased* batch variance ``M2 / (n - 1)``. With zero values per channel
    ``y`` is empty, ``mean``/``invstd`` are NaN and the running statistics
    are returned unchanged. With exactly one value per channel it raises
    ``ValueError`` like PyTorch.

    Eval: ``y`` is normalized with ``running_mean`` and ``running_var``
    (both required).

    Conventions: ``decay`` (Keras/ONNX/Flax) replaces momentum,
    ``running = decay * running + (1 - decay) * batch``;
    ``unbiased_running_var=False`` averages the biased batch variance
    ``M2 / n`` instead. ``activation="relu"`` returns ``max(y, 0)``.

    ``y = (x - mean) * invstd * weight + bias`` with ``invstd =
    1 / sqrt(var + eps)``; ``weight=None`` means 1 and ``bias=None`` means 0.
    """
    x = np.asarray(input)
    xc, ax = _channels(x, axis)
    c, n = xc.shape

    rm = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    rv = None if running_var is None else np.array(running_var, dtype=np.float64)
    if (rm is None) != (rv is None):
        raise ValueError("running_mean and running_var must be given together")
    for name, a in (("running_mean", rm), ("running_var", rv)):
        if a is not None and a.shape != (c,):
            raise ValueError(f"{name} has shape {a.shape}, expected {(c,)}")

    if training:
        if n == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {x.shape}"
            )
        n, mean, m2, residual = _channel_moments(xc)
        var = m2 / n if n > 0 else m2  # biased; m2 is already NaN when n == 0
        if rm is not None and rv is not None and n > 0:
            keep, take = (1.0 - momentum, momentum) if decay is None else (decay, 1.0 - decay)
            batch_var = m2 / (n - 1) if unbiased_running_var else m2 / n
            rm = keep * rm + take * mean
            rv = keep * rv + take * batch_var
    else:
        if rm is None or rv is None:
            raise ValueError("running_mean and running_var are required in eval mode")
        mean = rm.copy()
        var = rv.copy()
        residual = np.zeros(c)

    invstd = 1.0 / np.sqrt(var + eps)
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64).reshape(c)
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64).reshape(c)

    col = (slice(None), None)
    # Centred with the residual too: where a channel's spread is tiny
    # against its mean (7031.526 and 7031.521), the float64 mean's rounding
    # alone would move y by 2e-10 of its size, and asymmetrically.
    yc = ((xc - mean[col]) - residual[col]) * invstd[col] * w[col] + b[col]
    if activation == "relu":
        yc = np.where(yc < 0, 0.0, yc)  # NaN stays NaN
    moved_shape = np.moveaxis(x, ax, 0).shape
    y = np.ascontiguousarray(np.moveaxis(yc.reshape(moved_shape), 0, ax))
    return BatchNormResult(y, mean, invstd, rm, rv)


def batch_norm_backward(
    grad_output: ArrayLike,
    input: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool = True,
    axis: int = 1,
    activation: Literal["relu"] | None = None,
) -> tuple[_F64, _F64, _F64]:
    """Gradients of :func:`batch_norm`, in float64, written from the
    definition: with ``xhat = (x - mean) * invstd`` and n values a channel,
    ``grad_weight = sum(dy * xhat)``, ``grad_bias = sum(dy)`` and

    * training (mean and invstd are the batch's own):
      ``dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``;
    * eval (frozen statistics): ``dx = dy * weight * invstd``.

    With ``activation="relu"`` grad_output is the gradient of ``max(z, 0)``,
    z the affine output: dy becomes ``dy * (z > 0)`` first.

    Returns ``(grad_input, grad_weight, grad_bias)``, all float64.
    """
    x = np.asarray(input)
    xc, ax = _channels(x, axis)
    dyc, _ = _channels(np.asarray(grad_output), axis)
    c, n = xc.shape
    col = (slice(None), None)
    mu = np.asarray(mean, dtype=np.float64).reshape(c)
    istd = np.asarray(invstd, dtype=np.float64).reshape(c)
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64).reshape(c)
    xhat = (xc - mu[col]) * istd[col]
    if activation == "relu":
        b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64).reshape(c)
        dyc = np.where(xhat * w[col] + b[col] > 0, dyc, 0.0)
    grad_weight = np.array([_fsum(row) for row in dyc * xhat])
    grad_bias = np.array([_fsum(row) for row in dyc])
    if training:
        dxc = (w * istd)[col] * (dyc - (grad_bias / n)[col] - xhat * (grad_weight / n)[col])
    else:
        dxc = dyc * (w * istd)[col]
    moved_shape = np.moveaxis(x, ax, 0).shape
    grad_input = np.ascontiguousarray(np.moveaxis(dxc.reshape(moved_shape), 0, ax))
    return grad_input, grad_weight, grad_bias
