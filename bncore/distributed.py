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
* update_population_stats: each rank's (count, mean, M2) over its own
  batches, ONE collective, the same rank-order merge, and the running
  statistics set from it as ``bncore.stats.update_population_stats`` sets
  them.

Shards may differ in size, down to empty ones. Evaluation is plain
``BatchNorm`` and communicates nothing.

Needs the optional ``mpi`` extra (``pip install "bncore[mpi]"``: mpi4py) and
an MPI library (a cluster's own, or ``pip install mpich``) unless a
communicator object is passed in; only the collectives need them, so a layer
can be built, loaded and evaluated without MPI.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _threads
from .functional import (
    _Batch,
    _canonical_shape,
    _check_decay,
    _feature_axis,
    _kernel_ready,
    _kernels_for,
    _new_output,
    _running_stats,
)
from .modules import BatchNorm, _grad_output_like
from .stats import (
    Moments,
    _kernel_moments,
    _population_moments,
    _write_population_stats,
    merge_moments,
)

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
        The processes sharing the batch. Any object with ``Get_size()`` and
        mpi4py's buffer-form ``Allgather(sendbuf, recvbuf)`` works. None
        (the default) means ``MPI.COMM_WORLD``, looked up at the first
        collective call: building, loading (``BatchNorm.load``),
        unpickling and evaluating the layer need neither mpi4py nor MPI,
        and a missing mpi4py is an ImportError at the first training
        forward (or ``update_population_stats``).

    Notes
    -----
    Training ``forward`` and ``backward``, and ``update_population_stats``,
    are collective: every rank of ``comm`` calls them together, in the same
    order, each with its own shard (any number of samples, even none; the
    other dimensions may differ too) or its own batches. Each exchanges one
    message per rank of float64 values: ``2 + 2 * C`` for a forward (failed
    flag, count, mean, M2), ``1 + 2 * C`` for a backward (failed flag, two
    sums), ``3 + 2 * C`` for ``update_population_stats`` (failed flag,
    count, number of batches, mean, M2).

    A call that is wrong on some rank (bad shape or dtype, or a ``decay``
    contradicting a changed ``momentum``; for ``update_population_stats``
    any error reading the batches) still takes part in the exchange,
    flagged as failed, and then raises on EVERY rank: its own error where
    the call was wrong, a ValueError naming the failing ranks elsewhere, so
    no rank is left waiting. Nothing is written on any rank. A global batch
    of one value per feature is a ValueError, and ``nonfinite="raise"`` a
    FloatingPointError, on every rank alike, since all ranks hold the same
    statistics.

    After ``backward``, ``grad_weight`` and ``grad_bias`` are those of the
    whole batch, identical on every rank, of ``param_dtype`` (float32 for a
    half-precision layer, as ``BatchNorm``'s): unlike PyTorch's SyncBatchNorm,
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
        # None: COMM_WORLD, resolved by _communicator() at the first collective.
        self.comm = None if comm is None else _check_comm(comm)
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
        decay = self.decay
        try:
            x = input if isinstance(input, np.ndarray) else np.asarray(input)
            self._check_input(x)
            if self.track_running_stats and decay is not None:
                # As BatchNorm.forward: the attributes may have changed since
                # construction. Checked here, before the exchange, so that a
                # rank whose layer differs fails through the failed flag and
                # every rank raises together.
                decay = _check_decay(decay, self.momentum)
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

        weight, bias, activation = self.weight, self.bias, self.activation
        y = _new_output(x)
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
                           self.nonfinite, self.unbiased_running_var)
        self._fold_training_batch(batch, decay)
        self._saved = None
        self._sync_saved = (x, mean, invstd, total.count, weight, bias, activation)
        return y

    __call__ = forward

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
            dy = _grad_output_like(grad_output, x)
            if dy.dtype != x.dtype:
                raise TypeError(f"grad_output has dtype {dy.dtype}, expected {x.dtype}")
        except (TypeError, ValueError) as caught:
            error = caught
        source = _kernel_ready(x)
        kernels = _kernels_for(x.dtype)
        grad_input = _new_output(x)
        sum_dy = np.zeros(channels)
        sum_dy_dev = np.zeros(channels)
        if error is None and x.size:
            dy = _kernel_ready(dy)
            if activation == "relu":
                # dL/d(pre-activation output), dy where the forward's output was
                # > 0, into grad_input: grad_input is then computed in place.
                kernels.relu_mask(source, dy, grad_input, outer, channels, inner, mean,
                                  invstd, weight, bias, nthreads)
                dy = grad_input
            kernels.grad_sums(source, dy, outer, channels, inner, mean, sum_dy, sum_dy_dev,
                               nthreads)
        # The one collective: [failed, sum_dy (C), sum_dy_dev (C)] per rank.
        gathered = self._allgather(np.concatenate(([error is not None], sum_dy, sum_dy_dev)))
        self._raise_for_failures(error, gathered[:, 0], "backward")
        sums = gathered[0, 1:].copy()
        for row in gathered[1:]:  # rank order: the same sums on every rank
            sums += row[1:]
        sum_dy, sum_dy_dev = sums[:channels], sums[channels:]

        if x.size:
            kernels.grad_input(source, dy, grad_input, outer, channels, inner, mean, invstd,
                                weight, sum_dy, sum_dy_dev, float(count), nthreads)
        # An empty global batch has NaN statistics but zero gradients (as
        # BatchNorm's): 0 * NaN would say otherwise.
        grad_weight = sum_dy_dev * invstd if count else np.zeros(channels)
        # The parameters' dtype, as BatchNorm's: float32 for a half layer,
        # whose gradients would overflow float16 (or lose bits in bfloat16).
        self.grad_weight = None if weight is None else grad_weight.astype(self.param_dtype)
        self.grad_bias = None if bias is None else sum_dy.astype(self.param_dtype)
        return grad_input

    # -- population statistics ---------------------------------------------

    def update_population_stats(self, batches: Iterable[ArrayLike], *,
                                num_threads: int | None = None) -> SyncBatchNorm:
        """Set the running statistics to the exact mean and variance of
        every rank's batches together; collective.

        As :func:`bncore.stats.update_population_stats` on one process
        given all the batches: each rank reduces its own ``batches`` (any
        number, even none) to their moments, ONE collective gathers them,
        and every rank merges them in rank order, so all ranks write
        bitwise the same ``running_mean`` and ``running_var``.
        ``num_batches_tracked`` becomes the number of batches of all ranks.

        An error on some rank (a batch that does not fit the layer, a data
        loader that fails) raises on every rank, as the class notes say; so
        do no batches on any rank, fewer than two values per feature in
        all, and non-finite statistics under ``nonfinite="raise"``. A
        failed call writes nothing on any rank. Returns the layer.
        """
        error = None
        local, seen = Moments.empty(self.num_features), 0
        try:
            local, seen = _population_moments(self, batches, num_threads)
        except Exception as caught:  # anything from the batches: never leave a rank waiting
            error = caught
        # The one collective: [failed, count, batches, mean (C), M2 (C)] per rank.
        gathered = self._allgather(np.concatenate(
            ([error is not None, local.count, seen], local.mean, local.m2)))
        self._raise_for_failures(error, gathered[:, 0], "update_population_stats")
        channels = self.num_features
        total = merge_moments(*(
            Moments(int(row[1]), row[3:3 + channels], row[3 + channels:]) for row in gathered
        ))
        batches_in_all = int(gathered[:, 2].sum())
        if batches_in_all == 0:
            raise ValueError(
                "batches is empty on every rank: population statistics need at least "
                "one batch"
            )
        _write_population_stats(self, total, batches_in_all, "the batches of all ranks")
        return self
