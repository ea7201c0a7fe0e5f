"""Batch normalization layers: parameters, running statistics and modes.

The layers mirror ``torch.nn.BatchNorm1d/2d/3d``: same constructor, same
attributes, same state-dict keys, same train/eval behaviour. They hold NumPy
arrays and delegate all arithmetic to ``bncore.functional``.
"""

import numbers
import threading

import numpy as np

from .functional import (
    _FLOAT_DTYPES,
    _check_eps,
    _check_nonfinite,
    _feature_axis,
    _fold_batch,
    _forward,
    _running_stats,
    batch_norm_backward,
)

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class BatchNorm:
    """Batch normalization over the feature axis of an input of any rank >= 2.

    Parameters
    ----------
    num_features : int
        C, the size of the feature axis.
    eps : float
        Added to the variance before the square root.
    momentum : float in [0, 1] or None
        PyTorch's convention: ``running = (1 - momentum) * running +
        momentum * batch``. None keeps a cumulative average of all batches.
        (Keras and ONNX write the same thing as ``1 - momentum``.)
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); None when False.
    track_running_stats : bool
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
        when False the batch statistics are used in eval mode too.
    axis : int
        The feature axis; -1 for channels-last input.
    dtype : float32 or float64
        Of the parameters, the running statistics and the accepted input.
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

    A new layer is in training mode. Call it as ``bn(x)``.

    ``bn.backward(grad_output)`` then returns the gradient with respect to
    that call's input and sets ``bn.grad_weight`` and ``bn.grad_bias``. For
    it the layer keeps a reference to the last input (not a copy) and its
    statistics: modifying that array in place before ``backward`` changes the
    gradient, and a layer shared by several threads should not be used for
    ``backward``.

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
    accepted_ndims = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32,
                 nonfinite="propagate"):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(
                f"num_features must be a positive integer, got {type(num_features).__name__}"
            )
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
                raise TypeError(
                    f"momentum must be a number in [0, 1] or None, got {type(momentum).__name__}"
                )
            if not 0.0 <= momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
            momentum = float(momentum)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")

        self.num_features = int(num_features)
        self.eps = _check_eps(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        self.nonfinite = _check_nonfinite(nonfinite)
        self.training = True
        # Serialises the running-statistic updates of training forwards; not
        # picklable, so __getstate__ leaves it out and __setstate__ makes one.
        self._lock = threading.Lock()
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None  # (input, mean, invstd, used batch statistics)
        self.weight = np.ones(self.num_features, dtype) if self.affine else None
        self.bias = np.zeros(self.num_features, dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(self.num_features, dtype)
            self.running_var = np.ones(self.num_features, dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None

    # -- modes -------------------------------------------------------------

    def train(self, mode=True):
        """Set training mode (or eval mode with ``mode=False``); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode; returns self."""
        return self.train(False)

    # -- state -------------------------------------------------------------

    def reset_running_stats(self):
        if self.track_running_stats:
            with self._lock:
                self.running_mean.fill(0)
                self.running_var.fill(1)
                self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight.fill(1)
            self.bias.fill(0)

    def _state_keys(self):
        keys = []
        if self.affine:
            keys += ["weight", "bias"]
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys."""
        state = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                state[key] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[key] = getattr(self, key).copy()
        return state

    def load_state_dict(self, state_dict):
        """Load a state dict (NumPy arrays, PyTorch tensors, anything
        ``np.asarray`` takes). All entries are checked before any is loaded."""
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
        loaded = {}
        for key in expected:
            value = np.asarray(state_dict[key])
            if key == "num_batches_tracked":
                loaded[key] = self._checked_count(value)
                continue
            if value.dtype.kind != "f":
                raise TypeError(
                    f"state_dict[{key!r}] must be floating point, got dtype {value.dtype}"
                )
            if value.shape != (self.num_features,):
                raise ValueError(
                    f"state_dict[{key!r}] has shape {value.shape}, "
                    f"expected ({self.num_features},)"
                )
            loaded[key] = value
        with self._lock:
            for key, value in loaded.items():
                if key == "num_batches_tracked":
                    self.num_batches_tracked = value
                else:
                    np.copyto(getattr(self, key), value, casting="unsafe")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def _checked_count(value):
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

    # -- forward -----------------------------------------------------------

    def _check_input(self, x):
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
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"input.shape[{axis}] is {x.shape[axis]}, expected num_features="
                f"{self.num_features}"
            )

    def forward(self, input):
        x = input if isinstance(input, np.ndarray) else np.asarray(input)
        self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        updates = self.training and self.track_running_stats
        # Without tracking the running buffers are None and batch statistics
        # are used in both modes; with tracking, eval reads them and training
        # updates them. The kernel runs outside the lock; only the update of
        # the running statistics and the counter is serialised.
        y, mean, invstd, batch = _forward(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
            axis=self.axis,
            out=None,
            num_threads=None,
            nonfinite=self.nonfinite,
            eval_stats=False,
        )
        if updates:
            with self._lock:
                counted = True
                if batch is not None:
                    momentum = self.momentum
                    if momentum is None:
                        # Cumulative average: batch k (from 1) gets weight 1/k.
                        momentum = 1.0 / (self.num_batches_tracked + 1)
                    counted = _fold_batch(batch, self.running_mean, self.running_var,
                                          momentum)
                # Counted after the update succeeded, empty batches included
                # (batch is None), as PyTorch does; a skipped batch is not.
                if counted:
                    self.num_batches_tracked += 1
        elif batch is not None:
            # Batch statistics without running buffers: only "raise" acts.
            _fold_batch(batch, None, None, 0.0)
        if not use_batch_stats:
            # Eval: backward needs the running statistics as they are now;
            # copying them is cheaper than folding them on every call.
            mean, invstd = self.running_mean.copy(), self.running_var.copy()
        self._saved = (x, mean, invstd, use_batch_stats)
        return y

    __call__ = forward

    def backward(self, grad_output):
        """dL/dx for the last forward call, given dL/dy.

        Sets ``grad_weight`` and ``grad_bias`` (None when ``affine=False``).
        In training mode (or without running statistics) the gradient flows
        through the batch statistics; in eval mode they are constants.
        """
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before any forward call")
        x, mean, invstd, used_batch_stats = self._saved
        if not used_batch_stats:
            # Saved in eval as the running statistics themselves.
            mean, invstd = _running_stats(mean, invstd, self.eps)
        dy = grad_output if isinstance(grad_output, np.ndarray) else np.asarray(grad_output)
        if dy.shape != x.shape:
            raise ValueError(
                f"grad_output has shape {dy.shape}, expected {x.shape}, the shape of "
                "the last forward call's input"
            )
        grad_input, grad_weight, grad_bias = batch_norm_backward(
            dy, x, mean, invstd, self.weight, training=used_batch_stats, axis=self.axis
        )
        self.grad_weight = grad_weight if self.affine else None
        self.grad_bias = grad_bias if self.affine else None
        return grad_input

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}, "
            f"dtype={self.dtype.name}"
            + ("" if self.nonfinite == "propagate" else f", nonfinite={self.nonfinite!r}")
            + ")"
        )


class BatchNorm1d(BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) input."""

    accepted_ndims = (2, 3)


class BatchNorm2d(BatchNorm):
    """Batch normalization of (N, C, H, W) input (``axis=-1`` for NHWC)."""

    accepted_ndims = (4,)


class BatchNorm3d(BatchNorm):
    """Batch normalization of (N, C, D, H, W) input (``axis=-1`` for NDHWC)."""

    accepted_ndims = (5,)
