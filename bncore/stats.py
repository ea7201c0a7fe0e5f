"""Mergeable per-feature statistics: exact moments of data seen in pieces.

A :class:`Moments` holds, per feature, the triple (count, mean, M2) of some
set of values, M2 being the sum of squared deviations from the mean. Two
such triples of disjoint sets merge into the triple of their union with the
pairwise update of Chan, Golub & LeVeque (1979, 1983):

    n = na + nb;  d = mb - ma;  mean = ma + d * nb / n;
    M2 = M2a + M2b + d * d * na * nb / n

in float64. It never forms E[x^2] - E[x]^2, so it does not cancel however
large the mean is against the spread, and it is the same algebra the kernels
use between their blocks (see DESIGN.md). :func:`merge_moments` merges in the
order it is given, left to right, so the same pieces in the same order give
bitwise the same result: that is what makes a sharded computation (MPI
ranks, dask blocks, batches of a data loader) reproducible.

:func:`partial_moments` computes one piece with the compiled kernel;
:func:`update_population_stats` sets a layer's running statistics to the
exact statistics of a whole data set, fed batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _threads
from .functional import (
    _Batch,
    _as_input,
    _canonical_shape,
    _feature_axis,
    _kernel_ready,
    _kernels_for,
    _nonfinite_channels,
    _nonnegative_int,
)

if TYPE_CHECKING:
    from .modules import BatchNorm

__all__ = ["Moments", "merge_moments", "partial_moments", "update_population_stats"]


def _feature_vector(value: ArrayLike, name: str) -> NDArray[np.float64]:
    """A read-only float64 copy of a 1-D per-feature array."""
    array = np.array(value, dtype=np.float64, copy=True)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per feature), got shape {array.shape}")
    array.flags.writeable = False
    return array


class Moments:
    """Per-feature count, mean and M2 (sum of squared deviations) of a set
    of values; immutable.

    Parameters
    ----------
    count : int
        Values per feature (the same for every feature), >= 0.
    mean, m2 : array_like of shape (C,)
        Stored as read-only float64 copies. M2 must not be negative (NaN is
        kept: it is what non-finite data give). With ``count == 0`` the mean
        is undefined: it is stored as NaN and M2 as 0, whatever was passed.

    Notes
    -----
    ``a + b`` is ``merge_moments(a, b)``. An empty Moments (count 0) is the
    identity of merging.
    """

    __slots__ = ("_count", "_mean", "_m2")
    _count: int
    _mean: NDArray[np.float64]
    _m2: NDArray[np.float64]

    def __init__(self, count: int, mean: ArrayLike, m2: ArrayLike) -> None:
        count = _nonnegative_int(count, "count")
        mean = _feature_vector(mean, "mean")
        m2 = _feature_vector(m2, "m2")
        if m2.shape != mean.shape:
            raise ValueError(
                f"m2 has shape {m2.shape}, expected {mean.shape} to match mean"
            )
        if (m2 < 0).any():
            raise ValueError("m2 is a sum of squares: it must not be negative")
        if count == 0:
            mean = _feature_vector(np.full(mean.shape, np.nan), "mean")
            m2 = _feature_vector(np.zeros(mean.shape), "m2")
        self._count = int(count)
        self._mean = mean
        self._m2 = m2

    @classmethod
    def empty(cls, num_features: int) -> Moments:
        """The statistics of no values: the identity of merging."""
        return cls(0, np.full(num_features, np.nan), np.zeros(num_features))

    @property
    def count(self) -> int:
        """Values per feature."""
        return self._count

    @property
    def mean(self) -> NDArray[np.float64]:
        """(C,) float64 mean per feature (NaN when count is 0); read-only."""
        return self._mean

    @property
    def m2(self) -> NDArray[np.float64]:
        """(C,) float64 sum of squared deviations from the mean; read-only."""
        return self._m2

    @property
    def num_features(self) -> int:
        """C, the number of features."""
        return self._mean.shape[0]

    def var(self, ddof: int = 0) -> NDArray[np.float64]:
        """(C,) float64 variance ``m2 / (count - ddof)``; NaN where
        ``count - ddof <= 0`` (as ``bncore.moments``)."""
        ddof = _nonnegative_int(ddof, "ddof")
        if self._count - ddof <= 0:
            return np.full(self.num_features, np.nan)
        return self._m2 / (self._count - ddof)

    def __add__(self, other: object) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        return merge_moments(self, other)

    def __repr__(self) -> str:
        return (
            f"Moments(count={self._count}, mean={np.array2string(self._mean, threshold=6)}, "
            f"m2={np.array2string(self._m2, threshold=6)})"
        )

    def __reduce__(self) -> tuple[type[Moments], tuple[int, NDArray[np.float64],
                                                        NDArray[np.float64]]]:
        # immutable: pickle through the constructor
        return (Moments, (self._count, self._mean, self._m2))


def _merge_pair(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s update of two disjoint sets' moments, in float64."""
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    n = a.count + b.count
    d = b.mean - a.mean
    # Python integers: the weights are exact until the one rounding of the
    # division, whatever the counts (na * nb may exceed 2**63).
    mean = a.mean + d * (b.count / n)
    m2 = a.m2 + b.m2 + d * d * (a.count * b.count / n)
    return Moments(n, mean, m2)


def merge_moments(*parts: Moments) -> Moments:
    """The moments of the union of disjoint sets, from theirs.

    Parameters
    ----------
    *parts : Moments
        At least one; all with the same number of features.

    Returns
    -------
    Moments
        Merged left to right: the same parts in the same order give bitwise
        the same result (another order agrees to rounding). Empty parts
        change nothing.
    """
    if not parts:
        raise TypeError("merge_moments needs at least one Moments")
    for k, part in enumerate(parts):
        if not isinstance(part, Moments):
            raise TypeError(f"parts[{k}] must be a Moments, got {type(part).__name__}")
        if part.num_features != parts[0].num_features:
            raise ValueError(
                f"parts[{k}] has {part.num_features} features, expected "
                f"{parts[0].num_features} to match parts[0]"
            )
    merged = parts[0]
    for part in parts[1:]:
        merged = _merge_pair(merged, part)
    return merged


def _kernel_moments(x: NDArray[np.floating], axis: int, nthreads: int) -> Moments:
    """Moments of a validated input with features on the (non-negative) axis."""
    outer, channels, inner = _canonical_shape(x.shape, axis)
    count = outer * inner
    if count == 0 or channels == 0:
        return Moments(count, np.full(channels, np.nan), np.zeros(channels))
    mean = np.empty(channels)
    m2 = np.empty(channels)
    _kernels_for(x.dtype).moments(_kernel_ready(x), outer, channels, inner, mean, m2,
                                  nthreads)
    return Moments(count, mean, m2)


def partial_moments(x: ArrayLike, axis: int = 1, *,
                    num_threads: int | None = None) -> Moments:
    """The moments of one piece of data, to merge with other pieces'.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, at least 2-D
    axis : int
        The feature axis; statistics reduce over every other axis.
    num_threads : int, optional
        Threads for this call (see ``bncore.set_num_threads``).

    Returns
    -------
    Moments
        With ``count`` the number of values per feature (0 for an empty
        piece, which merges as nothing). The same numbers as
        ``bncore.moments(x, axis=axis)``: ``var() == moments(x)[1]``.
    """
    array: NDArray[np.floating] = _as_input(x, "x")
    ax = _feature_axis(axis, array.ndim)
    return _kernel_moments(array, ax, _threads.resolve(num_threads))


def update_population_stats(bn: BatchNorm, batches: Iterable[ArrayLike], *,
                            num_threads: int | None = None) -> BatchNorm:
    """Set a layer's running statistics to the exact statistics of a data set.

    Instead of the exponential moving average of training, the mean and
    variance of every value of every batch, as if the batches were one
    array - as precise batch statistics (Wu & Johnson, 2021) recommend
    before evaluating a model trained with small or unrepresentative
    batches. Each batch is reduced to its moments as it comes, so
    ``batches`` may be a generator over data larger than memory.

    Parameters
    ----------
    bn : BatchNorm
        A layer with ``track_running_stats=True``. Its mode, weight and bias
        are not used or changed.
    batches : iterable of array_like
        Each of the layer's dtype, an accepted rank and ``num_features``
        values along ``bn.axis``; together at least two values per feature.
    num_threads : int, optional

    Returns
    -------
    bn
        With ``running_mean`` the population mean, ``running_var`` its
        variance - unbiased (divided by n - 1), or biased when the layer
        has ``unbiased_running_var = False`` - and ``num_batches_tracked``
        the number of batches.

    A feature whose population mean or variance is not finite (or too
    large for the layer's dtype) follows ``bn.nonfinite``: "propagate"
    writes it, "skip_update" leaves the layer untouched, "raise" raises
    ``FloatingPointError`` with the layer untouched.

    Raises
    ------
    TypeError, ValueError
        For a layer without running statistics, a batch that does not fit
        the layer (naming its index), no batches, or fewer than two values
        per feature in all. Nothing is written before every batch has been
        read and checked: a failed call leaves the layer as it was.
    """
    from .modules import BatchNorm  # modules imports functional, as this module does

    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a bncore BatchNorm layer, got {type(bn).__name__}")
    total, seen = _population_moments(bn, batches, num_threads)
    if seen == 0:
        raise ValueError("batches is empty: population statistics need at least one batch")
    _write_population_stats(bn, total, seen, "the batches")
    return bn


def _population_moments(bn: BatchNorm, batches: Iterable[ArrayLike],
                        num_threads: int | None) -> tuple[Moments, int]:
    """The moments of all the batches and their number, each batch checked
    against the layer (its index named in the error); nothing written."""
    if bn.num_features is None:
        raise ValueError(
            "bn has not seen an input yet (a lazy layer, num_features=None): call it "
            "on a batch or load a state dict first"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn was built with track_running_stats=False: it has no running "
            "statistics to update"
        )
    if isinstance(batches, np.ndarray) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of arrays (a list, a generator, a data "
            f"loader), got {type(batches).__name__}; for one array pass [array]"
        )
    nthreads = _threads.resolve(num_threads)
    total = Moments.empty(bn.num_features)
    seen = 0
    for index, batch in enumerate(batches):
        x: NDArray[np.floating] = batch if isinstance(batch, np.ndarray) else np.asarray(batch)
        try:
            bn._check_input(x)
        except (TypeError, ValueError) as error:
            raise type(error)(f"batches[{index}]: {error}") from None
        total = _merge_pair(total, _kernel_moments(x, bn.axis % x.ndim, nthreads))
        seen += 1
    return total, seen


def _write_population_stats(bn: BatchNorm, total: Moments, batches: int,
                            source: str) -> None:
    """Write population moments into the layer's running statistics (mean,
    and the variance bn.unbiased_running_var asks for) under its lock,
    following bn.nonfinite, and set num_batches_tracked to ``batches``.
    ``source`` names where the values came from, for the errors."""
    running_mean, running_var = bn.running_mean, bn.running_var
    assert running_mean is not None and running_var is not None  # _population_moments
    if total.count < 2:
        raise ValueError(
            f"{source} hold {total.count} value(s) per feature in all; population "
            "statistics need at least 2"
        )
    population = _Batch(total.mean, total.m2, total.count, 0.0, bn.nonfinite,
                        bn.unbiased_running_var)
    var = population.running_var()
    if bn.nonfinite != "propagate":
        bad = _nonfinite_channels(population, running_mean, running_var)
        if bad.size:
            if bn.nonfinite == "raise":
                raise FloatingPointError(
                    f"population statistics are not finite in feature(s) "
                    f"{', '.join(map(str, bad[:10]))}{' ...' if bad.size > 10 else ''}; "
                    "the running statistics were left unchanged (bn.nonfinite='raise')"
                )
            return
    # Both casts before either write: nothing can fail between the writes.
    new_mean = total.mean.astype(running_mean.dtype)
    new_var = var.astype(running_var.dtype)
    with bn._lock:
        running_mean[...] = new_mean
        running_var[...] = new_var
        bn.num_batches_tracked = batches
