"""Synchronized batch normalization across MPI processes.

Each process (rank) holds a shard of the batch. In training, the layer
normalizes every shard with the statistics of the whole batch, as if one
process held it all:

* forward: the local (count, mean, M2) per feature from the kernel, ONE
  collective (an Allgather of a packed float64 message), and Chan et al.'s
  merge of all ranks' triples in rank order (``bncore.stats``). Every rank
  merges the same numbers in the same order, so all hold bitwise the same
  global statistics, and a fixed number of processes gives reproducible
  results. The running statistics are updated with them exactly as
  ``BatchNorm`` updates its own.
* backward: the local per-feature sums of ``dy`` and ``dy * (x - mean)``,
  ONE collective gathering them, added in rank order, and the input
  gradient of each shard from those global sums and the global count.

Shards may differ in size, down to empty ones. Evaluation is plain
``BatchNorm`` and communicates nothing.

Needs the optional ``mpi`` extra (``pip install "bncore[mpi]"``: mpi4py) and
an MPI library (a cluster's own, or ``pip install mpich``) unless a
communicator object is passed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _threads
from .functional import (
    _Batch,
    _canonical_shape,
    _feature_axis,
    _kernel_ready,
    _kernels_for,
    _running_stats,
)
from .modules import BatchNorm
from .stats import Moments, _kernel_moments, merge_moments

__all__ = ["SyncBatchNorm"]


def _world() -> Any:
    """mpi4py's COMM_WORLD, imported only when needed."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:  # no mpi4py, or no MPI library
        raise ImportError(
            "SyncBatchNorm without comm= needs mpi4py and an MPI library: install "
            'the \'mpi\' extra, pip install "bncore[mpi]", and an MPI (your '
            f"cluster's, or pip install mpich); or pass a communicator ({error})"
        ) from error
    return MPI.COMM_WORLD


def _check_comm(comm: Any) -> Any:
    for method in ("Get_size", "Allgather"):
        if not callable(getattr(comm, method, None)):
            raise TypeError(
                f"comm must be an mpi4py communicator (or an object with Get_size() and "
                f"Allgather(sendbuf, recvbuf)); {type(comm).__name__} has no {method}()"
            )
    return comm


class SyncBatchNorm(BatchNorm):
    """Batch normalization whose training statistics span every process.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats
        As :class:`bncore.BatchNorm`; further keyword options (``axis``,
        ``dtype``, ``nonfinite``, ...) are passed to it.
    comm : mpi4py communicator, optional
        The processes sharing the batch; default ``MPI.COMM_WORLD``. Any
        object with ``Get_size()`` and mpi4py's buffer-form
        ``Allgather(sendbuf, recvbuf)`` works.

    Notes
    -----
    Training ``forward`` and ``backward`` are collective: every rank of
    ``comm`` calls them together, in the same order, each with its own
    shard (any number of samples, even none; the other dimensions may
    differ too). Each exchanges one message of ``2 + 2 * C`` float64 values
    per rank.

    A call that is wrong on some rank (bad shape or dtype) still takes part
    in the exchange, flagged as failed, and then raises on EVERY rank: its
    own error where the call was wrong, a ValueError naming the failing
    ranks elsewhere, so no rank is left waiting. Nothing is written on any
    rank. A global batch of one value per feature is a ValueError, and
    ``nonfinite="raise"`` a FloatingPointError, on every rank alike, since
    all ranks hold the same statistics.

    After ``backward``, ``grad_weight`` and ``grad_bias`` are those of the
    whole batch, identical on every rank: unlike PyTorch's SyncBatchNorm,
    they are already reduced, so leave them out of the gradient all-reduce
    of the other parameters (or divide by the number of ranks if that
    all-reduce sums and your loss is a mean over ranks).

    Evaluation (``bn.eval()``) is ``BatchNorm``'s and communicates nothing;
    so is a layer with ``track_running_stats=False`` in eval mode, which
    normalizes each shard with its own statistics (as PyTorch does).

    Pickling drops the communicator; an unpickled layer uses COMM_WORLD.
    """

    #: Never None here (no lazy construction: the messages' size is fixed by it).
    num_features: int

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 comm: Any = None, **options: Any) -> None:
        if num_features is None:
            raise ValueError(
                "SyncBatchNorm needs num_features: the ranks exchange messages of a "
                "size fixed by it"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **options)
        self.comm = _world() if comm is None else _check_comm(comm)
        # (input, mean, invstd, global count, weight, bias, activation) of the
        # last synchronized forward, or None after an unsynchronized one.
        self._sync_saved: tuple | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["comm"] = None
        return state

    def _communicator(self) -> Any:
        if self.comm is None:
            self.comm = _world()
        return self.comm

    def _allgather(self, message: NDArray[np.float64]) -> NDArray[np.float64]:
        """Every rank's message, one row per rank in rank order."""
        comm = self._communicator()
        gathered = np.empty((comm.Get_size(), message.size))
        comm.Allgather(message, gathered)
        return gathered

    @staticmethod
    def _raise_for_failures(error: Exception | None, flags: NDArray[np.float64],
                            what: str) -> None:
        """Raise this rank's own error, or one naming the ranks that failed."""
        if error is not None:
            raise error
        failed = np.flatnonzero(flags)
        if failed.size:
            raise ValueError(
                f"SyncBatchNorm.{what}: the call failed on rank(s) "
                f"{', '.join(map(str, failed))} (see the error there); nothing was "
                "computed or updated on any rank"
            )

    # -- forward -----------------------------------------------------------

    def forward(self, input: ArrayLike) -> NDArray[np.floating]:
        if not self.training:
            self._sync_saved = None
            return super().forward(input)
        channels = self.num_features
        error = None
        try:
            x = input if isinstance(input, np.ndarray) else np.asarray(input)
            self._check_input(x)
        except (TypeError, ValueError) as caught:
            error = caught
        if error is None:
            ax = _feature_axis(self.axis, x.ndim)
            nthreads = _threads.resolve(None)
            source = _kernel_ready(x)
            local = _kernel_moments(source, ax, nthreads)
        else:
            local = Moments.empty(channels)
        # The one collective: [failed, count, mean (C), M2 (C)] per rank.
        message = np.concatenate(([error is not None, local.count], local.mean, local.m2))
        gathered = self._allgather(message)
        self._raise_for_failures(error, gathered[:, 0], "forward")
        total = merge_moments(*(
            Moments(int(row[1]), row[2:2 + channels], row[2 + channels:]) for row in gathered
        ))
        if total.count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value "
                f"over all {gathered.shape[0]} ranks (input size {x.shape} here)"
            )

        weight, bias = self.weight, self.bias
        activation = getattr(self, "activation", None)
        y = np.empty(x.shape, dtype=x.dtype)
        if total.count == 0:
            mean = np.full(channels, np.nan)
            invstd = np.full(channels, np.nan)
            batch = None
        else:
            mean = total.mean
            var = total.var()  # biased: what training normalizes with
            mean, invstd = _running_stats(mean, var, self.eps)
            if x.size:
                outer, _, inner = _canonical_shape(x.shape, ax)
                _kernels_for(x.dtype).normalize(source, y, outer, channels, inner, mean, var,
                                                self.eps, weight, bias, nthreads,
                                                activation == "relu")
            batch = _Batch(mean, total.m2, total.count,
                           0.0 if self.momentum is None else self.momentum,
                           self.nonfinite, getattr(self, "unbiased_running_var", True))
        self._fold_global(batch)
        self._saved = None
        self._sync_saved = (x, mean, invstd, total.count, weight, bias, activation)
        return y

    __call__ = forward

    def _fold_global(self, batch: _Batch | None) -> None:
        """Fold the global batch into the running statistics as BatchNorm
        folds its own (momentum, momentum=None, decay, nonfinite policy),
        under the layer's lock."""
        self._fold_training_batch(batch, self.decay)

    # -- backward ----------------------------------------------------------

    def backward(self, grad_output: ArrayLike) -> NDArray[np.floating]:
        """dL/dx of this rank's shard, given its dL/dy; collective after a
        training forward (see the class notes for grad_weight/grad_bias)."""
        if self._sync_saved is None:
            return super().backward(grad_output)
        x, mean, invstd, count, weight, bias, activation = self._sync_saved
        channels = self.num_features
        nthreads = _threads.resolve(None)
        outer, _, inner = _canonical_shape(x.shape, _feature_axis(self.axis, x.ndim))
        error = None
        try:
            dy = grad_output if isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
            if dy.shape != x.shape:
                raise ValueError(
                    f"grad_output has shape {dy.shape}, expected {x.shape}, the shape of "
                    "the last forward call's input"
                )
            if dy.dtype != x.dtype:
                raise TypeError(f"grad_output has dtype {dy.dtype}, expected {x.dtype}")
        except (TypeError, ValueError) as caught:
            error = caught
        source = _kernel_ready(x)
        kernels = _kernels_for(x.dtype)
        sum_dy = np.zeros(channels)
        sum_dy_dev = np.zeros(channels)
        if error is None and x.size:
            dy = _kernel_ready(dy)
            if activation == "relu":
                # dL/d(pre-activation output): dy where the forward's output was > 0.
                gated = np.empty_like(dy)
                kernels.relu_mask(source, dy, gated, outer, channels, inner, mean, invstd,
                                  weight, bias, nthreads)
                dy = gated
            kernels.grad_sums(source, dy, outer, channels, inner, mean, sum_dy, sum_dy_dev,
                               nthreads)
        # The one collective: [failed, sum_dy (C), sum_dy_dev (C)] per rank.
        gathered = self._allgather(np.concatenate(([error is not None], sum_dy, sum_dy_dev)))
        self._raise_for_failures(error, gathered[:, 0], "backward")
        sums = gathered[0, 1:].copy()
        for row in gathered[1:]:  # rank order: the same sums on every rank
            sums += row[1:]
        sum_dy, sum_dy_dev = sums[:channels], sums[channels:]

        grad_input = np.empty(x.shape, dtype=x.dtype)
        if x.size:
            kernels.grad_input(source, dy, grad_input, outer, channels, inner, mean, invstd,
                                weight, sum_dy, sum_dy_dev, float(count), nthreads)
        # An empty global batch has NaN statistics but zero gradients (as
        # BatchNorm's): 0 * NaN would say otherwise.
        grad_weight = sum_dy_dev * invstd if count else np.zeros(channels)
        self.grad_weight = None if weight is None else grad_weight.astype(x.dtype)
        self.grad_bias = None if bias is None else sum_dy.astype(x.dtype)
        return grad_input
