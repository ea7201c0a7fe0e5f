"""Batch-norm statistics and normalization of chunked dask arrays.

Needs the optional ``dask`` extra (``pip install "bncore[dask]"``).

* :func:`partial_moments` / :func:`moments`: every block's moments with the
  compiled kernel (:func:`bncore.stats.partial_moments`), merged pairwise in
  a tree of fixed shape and order (:func:`bncore.stats.merge_moments`), so
  the result does not depend on the scheduler or on which block finishes
  first. Blocks along the feature axis are reduced separately and joined.
* :func:`batch_norm`: the eval-form normalization ``(x - mean) /
  sqrt(var + eps) * weight + bias`` of every block with
  :func:`bncore.batch_norm`, lazily, each block receiving the slices of the
  per-feature vectors that match its features: nothing is rechunked.

Normalizing with the data's own ``moments`` (biased variance) is the
training-mode output over the whole array, for data that need not fit in
memory.

(Inside this module ``import dask`` is the dask package: imports are
absolute.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _threads, functional
from .functional import _as_input, _channel_vector, _feature_axis
from .stats import Moments, merge_moments
from .stats import partial_moments as _block_moments

if TYPE_CHECKING:
    import dask.array
    from dask.delayed import Delayed

__all__ = ["batch_norm", "moments", "partial_moments"]


def _import_dask() -> tuple[Any, Any]:
    try:
        import dask
        import dask.array
    except ImportError as error:
        raise ImportError(
            "bncore.dask needs dask with its array module: install the 'dask' "
            'extra, pip install "bncore[dask]"'
        ) from error
    return dask, dask.array


def _checked_array(darr: Any, axis: int) -> int:
    """Validate a dask array as functional validates an input (dtype, rank,
    axis), without computing it; returns the non-negative feature axis.

    Sizes may be unknown (NaN, e.g. after boolean indexing) along every
    axis but the feature axis: the blocks know their own sizes when they
    run, but the per-feature results need the number of features now."""
    _, da = _import_dask()
    if not isinstance(darr, da.Array):
        raise TypeError(
            f"darr must be a dask array, got {type(darr).__name__}; for in-memory "
            "data use bncore.moments / bncore.batch_norm"
        )
    # A zero-stride stand-in of the same rank and dtype: functional's own
    # checks and messages, and no memory. Its shape is darr's with the
    # unknown sizes as 1 (only a message about the rank shows it).
    shape = tuple(1 if math.isnan(size) else int(size) for size in darr.shape)
    _as_input(np.broadcast_to(np.empty((), dtype=darr.dtype), shape), "darr")
    ax = _feature_axis(axis, darr.ndim)
    if math.isnan(darr.shape[ax]):
        raise ValueError(
            f"darr's size along the feature axis ({ax}) is unknown (NaN chunk sizes, "
            "e.g. from boolean indexing along that axis): call "
            "darr.compute_chunk_sizes() first"
        )
    return ax


def _checked_num_threads(num_threads: int | None) -> None:
    """Refuse a bad num_threads now, not when the blocks run."""
    if num_threads is not None:
        _threads.check_num_threads(num_threads)


def _merge_tree(parts: list[Delayed], delayed: Any) -> Delayed:
    """Pairwise merges level by level: depth log2(len(parts)), the shape
    and order fixed by the list alone."""
    while len(parts) > 1:
        paired = [delayed(merge_moments, pure=True)(parts[k], parts[k + 1])
                  for k in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            paired.append(parts[-1])
        parts = paired
    return parts[0]


def _join_features(*parts: Moments) -> Moments:
    """Moments of consecutive feature ranges, all over the same values."""
    return Moments(parts[0].count,
                   np.concatenate([p.mean for p in parts]),
                   np.concatenate([p.m2 for p in parts]))


def partial_moments(darr: dask.array.Array, axis: int = 1, *,
                    num_threads: int | None = None) -> Delayed:
    """The moments of a dask array, lazily.

    Parameters
    ----------
    darr : dask.array.Array, at least 2-D
        Of dtype float32, float64, float16 or bfloat16 (with ml_dtypes), as
        :func:`bncore.moments` takes. Chunked any way, the feature axis
        included; chunk sizes may be unknown (NaN, as after boolean
        indexing) along every axis but the feature axis.
    axis : int
        The feature axis.
    num_threads : int, optional
        Threads of each block's kernel. Dask's threaded scheduler already
        runs blocks side by side: ``num_threads=1`` avoids oversubscribing
        the cores.

    Returns
    -------
    dask.delayed.Delayed
        Computes to a :class:`bncore.stats.Moments` of all of ``darr``,
        bitwise the same whatever the scheduler. Merge it with others'
        (``bncore.stats.merge_moments``) for data held in several arrays.
    """
    dask, _ = _import_dask()
    ax = _checked_array(darr, axis)
    _checked_num_threads(num_threads)
    delayed = dask.delayed
    blocks = darr.to_delayed()
    per_feature_chunk = []
    for j in range(darr.numblocks[ax]):
        # Every block holding features chunk j, in C order of block index.
        column = np.take(blocks, j, axis=ax).ravel().tolist()
        parts = [delayed(_block_moments, pure=True)(block, ax, num_threads=num_threads)
                 for block in column]
        per_feature_chunk.append(_merge_tree(parts, delayed))
    if len(per_feature_chunk) == 1:
        return per_feature_chunk[0]
    return delayed(_join_features, pure=True)(*per_feature_chunk)


def moments(darr: dask.array.Array, axis: int = 1, *, ddof: int = 0,
            num_threads: int | None = None,
            **compute_kwargs: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-feature mean and variance of a dask array, computed.

    The dask twin of :func:`bncore.moments`: same ``axis`` and ``ddof``,
    same float64 results to rounding (the blocks merge in another order than
    the kernel's own blocks). ``compute_kwargs`` go to ``compute`` (e.g.
    ``scheduler="threads"``); ``num_threads`` as in :func:`partial_moments`.

    Returns
    -------
    mean, var : float64 arrays of shape (C,)
    """
    functional._nonnegative_int(ddof, "ddof")
    total = partial_moments(darr, axis, num_threads=num_threads).compute(**compute_kwargs)
    return total.mean.copy(), total.var(ddof)


def _normalize_block(block: NDArray[np.floating], mean: NDArray[np.floating],
                     var: NDArray[np.floating], weight: NDArray[np.floating] | None,
                     bias: NDArray[np.floating] | None, *, eps: float, axis: int,
                     num_threads: int | None) -> NDArray[np.floating]:
    # The per-feature arguments arrive as blocks of broadcastable shape
    # (1, ..., c_j, ..., 1): flattened, the block's (c_j,) slices.
    weight = None if weight is None else weight.ravel()
    bias = None if bias is None else bias.ravel()
    return functional.batch_norm(block, mean.ravel(), var.ravel(), weight, bias,
                                 training=False, eps=eps, axis=axis,
                                 num_threads=num_threads)


def batch_norm(darr: dask.array.Array, mean: ArrayLike, var: ArrayLike,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               eps: float = 1e-5, axis: int = 1, *,
               num_threads: int | None = None) -> dask.array.Array:
    """Normalize a dask array with given per-feature statistics, lazily.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, block by block with
    :func:`bncore.batch_norm` in eval form: the same numbers as that call on
    the whole array in memory.

    Parameters
    ----------
    darr : dask.array.Array, at least 2-D
        As in :func:`partial_moments`: float32, float64, float16 or
        bfloat16, chunk sizes known at least along the feature axis. A
        half-precision array gives a half-precision result.
    mean, var : array_like of shape (C,)
        E.g. a layer's running statistics, or :func:`moments` of the data
        itself (its biased variance reproduces training-mode batch norm).
    weight, bias : array_like of shape (C,), optional
    eps : float >= 0
    axis : int
        The feature axis; may be chunked.
    num_threads : int, optional
        Threads of each block's kernel (see :func:`partial_moments`).

    Returns
    -------
    dask.array.Array
        Of darr's shape, dtype and chunks; nothing is computed until asked.
    """
    _, da = _import_dask()
    ax = _checked_array(darr, axis)
    eps = functional._check_eps(eps)
    _checked_num_threads(num_threads)
    channels = darr.shape[ax]
    vectors = {"mean": mean, "var": var, "weight": weight, "bias": bias}
    for name in ("mean", "var"):
        if vectors[name] is None:
            raise TypeError(f"{name} is required: batch_norm normalizes with given statistics")
    # Each vector as a dask array that broadcasts against darr and is chunked
    # like darr's feature axis, so that map_blocks pairs every block with
    # its features' slice.
    shape = tuple(channels if d == ax else 1 for d in range(darr.ndim))
    chunks = tuple(darr.chunks[ax] if d == ax else (1,) for d in range(darr.ndim))
    operands = []
    for name, value in vectors.items():
        vector = _channel_vector(value, name, channels, ax)
        operands.append(None if vector is None
                        else da.from_array(vector.reshape(shape), chunks=chunks))
    return da.map_blocks(_normalize_block, darr, *operands, dtype=darr.dtype,
                         eps=eps, axis=ax, num_threads=num_threads)
