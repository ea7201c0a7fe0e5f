"""bncore side by side with its peers: ``python benchmarks/compare.py``.

For each workload (issue 4's table: training and eval forwards in NCHW,
channels-last and (N, C) layouts, the training backward, few channels,
allocating calls, small latency-bound calls; and small feature maps in
cache, --workloads cache) and each thread count, this
times, interleaved:

- the yardstick: bncore's private streaming copy ``_kernels.copy`` (one read
  and one write of the tensor with non-temporal stores, on the same threads),
  and ``np.copyto`` for reference;
- bncore: ``batch_norm`` / ``batch_norm_backward`` with ``out=``; without
  ``out=`` ("alloc") on the allocating and small workloads; the layers
  (``bncore.BatchNorm2d(C)(x)``, "module") on the small workloads;
- NumPy written the textbook way (whole-array operations, temporaries);
- PyTorch, if importable, on zero-copy ``torch.from_numpy`` views
  (channels-last inputs as ``permute``d channels_last-strided views);
- ONNX Runtime, if importable, eval only, channel-first layouts only.

Method. Each implementation is warmed up (its first call is also checked
against float64 statistics at a random sample of positions), then the
implementations of a workload run round-robin in shuffled order, one sample
each per round, until each has its repetitions (fewer for the slow ones, so
that a workload keeps to its time budget), and the report gives medians.
A sample of a large workload is one call; a sample of a small one is a loop
of calls lasting about a millisecond (time per call reported). Outputs are
preallocated (``out=``) wherever the implementation allows. libgomp's idle
workers spin for several milliseconds after a parallel region; before a
sample that follows a different thread pool's the script sleeps (--settle)
so that one runtime's spinning threads do not slow the next one down.

Bandwidth: a forward must read and write the tensor once (2 * nbytes), the
backward read two tensors and write one (3 * nbytes). "of copy" is an
implementation's bandwidth over the streaming copy's at the same thread
count (for the backward: 1.5 x the copy's time over the time).

    python benchmarks/compare.py                      # float32, 1 and 2 threads
    python benchmarks/compare.py --quick              # small shapes, seconds
    python benchmarks/compare.py --threads 1 2 4 --dtype float64 \\
        --workloads 'train-*' backward --json out.json --plot out.png

Optional: ``pip install -e ".[bench]"`` (onnxruntime, onnx, matplotlib);
PyTorch is used when it is installed, never required.
"""

import argparse
import contextlib
import datetime
import fnmatch
import gc
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

import bncore

try:
    import resource
except ImportError:  # not on Windows: no sample is then known to be disturbed
    resource = None

try:
    from bncore._kernels import copy as _stream_copy
except ImportError:  # a build without the yardstick kernel: no "of copy" column
    _stream_copy = None

EPS = 1e-5
MOMENTUM = 0.1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Workloads

@dataclass(frozen=True)
class Workload:
    """One input shape and one operation.

    kind: "train" / "eval" forward, or "backward" (training). group: the
    report section. alloc: also time the allocating calls (no ``out=``).
    latency: a small call, reported per call, with functional and module.
    """

    id: str
    group: str
    kind: str
    shape: tuple
    axis: int
    quick_shape: Optional[tuple] = None
    alloc: bool = False
    latency: bool = False

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def feature_axis(self):
        return self.axis % self.ndim

    @property
    def channels(self):
        return self.shape[self.feature_axis]

    @property
    def channels_last(self):
        """Feature axis last in a rank >= 3 input (NHWC and friends)."""
        return self.ndim >= 3 and self.feature_axis == self.ndim - 1

    @property
    def layout(self):
        if self.ndim == 2:
            return "nc"
        return "nhwc" if self.channels_last else "nchw"

    @property
    def bound_factor(self):
        """Tensors moved through memory, at least: read + write, or 2 reads + write."""
        return 3 if self.kind == "backward" else 2

    def variants(self):
        """Which call styles to time: "out" always, "alloc", "module"."""
        found = ["out"]
        if self.alloc or self.latency:
            found.append("alloc")
        if self.latency:
            found.append("module")
        return found

    def canonical(self):
        ax = self.feature_axis
        return (math.prod(self.shape[:ax]), self.shape[ax], math.prod(self.shape[ax + 1:]))

    def scaled(self, quick):
        if quick and self.quick_shape is not None:
            return Workload(self.id, self.group, self.kind, self.quick_shape, self.axis, None,
                            self.alloc, self.latency)
        return self


def _wl(kind, shape, axis=1, group=None, quick=None, alloc=False, latency=False):
    layout = "nc" if len(shape) == 2 else ("nhwc" if axis in (-1, len(shape) - 1) else "nchw")
    prefix = f"alloc-{kind}" if alloc else kind
    ident = f"{prefix}-{layout}-{'x'.join(map(str, shape))}"
    return Workload(ident, group or kind, kind, tuple(shape), axis,
                    tuple(quick) if quick else None, alloc, latency)


# Issue 4's table. Ids name the full-size shape; --quick runs the same
# workloads on the quick shapes.
NCHW_L, NCHW_M = (128, 128, 56, 56), (64, 256, 28, 28)          # 205 MB, 51 MB (float32)
NHWC_M, NC_L = (32, 56, 56, 128), (400_000, 128)                # 51 MB, 205 MB
Q_NCHW_L, Q_NCHW_M, Q_NHWC_M, Q_NC_L = (8, 32, 56, 56), (8, 64, 28, 28), (4, 28, 28, 64), (20_000, 64)
# Few channels: long runs, rows of 1 MB, (N, 8); and many rows of short
# runs, whose row chunks hold several blocks of runs a channel.
SCALING = [((64, 3, 224, 224), (4, 3, 224, 224)), ((8, 8, 256, 256), (2, 8, 128, 128)),
           ((2_000_000, 8), (100_000, 8)), ((2048, 8, 28, 28), (64, 8, 28, 28))]
# Small feature maps (ResNet's last stages): runs of 196 and 784 bytes,
# under the planar loops' per-run costs and not whole cache lines; runs of
# 256 bytes, whole lines but short; runs of 64 bytes (a CIFAR ResNet's 4 x 4
# maps), the shortest planar runs of whole vectors; 3 x 3 maps, runs of
# 9 values, read as rows across channels; and ResNet-50's last stage at a
# batch of 64, whose 64 rows once made row chunks of one row.
SHORT_RUNS = [((512, 512, 7, 7), (16, 64, 7, 7)), ((256, 256, 14, 14), (8, 64, 14, 14)),
              ((512, 256, 8, 8), (16, 64, 8, 8)), ((1024, 512, 4, 4), (32, 64, 4, 4)),
              ((4096, 256, 3, 3), (64, 64, 3, 3)), ((64, 2048, 7, 7), (8, 256, 7, 7))]
# Feature maps of odd sizes (Inception-v3's 35 x 35 and 17 x 17 stages):
# runs of 4900 and 1156 bytes that begin and end inside cache lines.
ODD_RUNS = [((32, 192, 35, 35), (4, 32, 35, 35)), ((32, 768, 17, 17), (4, 64, 17, 17))]
LATENCY = [("eval", (1, 64)), ("eval", (8, 32, 14, 14)), ("train", (8, 32, 14, 14)),
           ("eval", (1, 64, 56, 56)), ("train", (1, 64, 56, 56))]
# Small feature maps that fit in the cache (late stages, small batches),
# timed per call like the latency-bound ones: their cost is per call,
# channel and run rather than per byte. Not among issue 4's goals.
IN_CACHE = [(2, 128, 4, 4), (8, 256, 4, 4), (64, 128, 4, 4), (8, 64, 7, 7), (32, 256, 7, 7),
            (32, 64, 14, 14)]
# Groups timed and reported per call, and left out of the chart.
PER_CALL_GROUPS = ("latency", "cache")

WORKLOADS = (
    [_wl(kind, shape, axis, quick=quick)
     for kind in ("train", "eval")
     for shape, axis, quick in ((NCHW_L, 1, Q_NCHW_L), (NCHW_M, 1, Q_NCHW_M),
                                (NHWC_M, -1, Q_NHWC_M), (NC_L, 1, Q_NC_L))]
    + [_wl("backward", shape, axis, quick=quick)
       for shape, axis, quick in ((NCHW_L, 1, Q_NCHW_L), (NCHW_M, 1, Q_NCHW_M),
                                  (NHWC_M, -1, Q_NHWC_M))]
    + [_wl(kind, shape, group="scaling", quick=quick)
       for kind in ("train", "eval") for shape, quick in SCALING]
    + [_wl(kind, shape, group="short", quick=quick)
       for kind in ("train", "eval", "backward") for shape, quick in SHORT_RUNS]
    + [_wl(kind, shape, group="odd", quick=quick)
       for kind in ("train", "eval", "backward") for shape, quick in ODD_RUNS]
    + [_wl(kind, NCHW_L, group="alloc", quick=Q_NCHW_L, alloc=True) for kind in ("train", "eval")]
    + [_wl(kind, shape, group="latency", latency=True) for kind, shape in LATENCY]
    + [_wl(kind, shape, group="cache", latency=True)
       for kind in ("train", "eval", "backward") for shape in IN_CACHE]
)

GROUPS = {
    "train": "Training forward",
    "eval": "Eval forward",
    "backward": "Backward (training)",
    "scaling": "Few channels (thread scaling)",
    "short": "Short runs: small feature maps",
    "odd": "Odd feature maps: runs that share cache lines",
    "alloc": "Allocating calls (no out=) against out=",
    "latency": "Small, latency-bound calls (time per call)",
    "cache": "Small feature maps in cache (time per call)",
}


def select_workloads(patterns):
    """Workloads whose id or group matches any pattern (fnmatch), in table order."""
    if not patterns:
        return list(WORKLOADS)
    chosen = [w for w in WORKLOADS
              if any(fnmatch.fnmatchcase(w.id, p) or p == w.group for p in patterns)]
    unknown = [p for p in patterns
               if not any(fnmatch.fnmatchcase(w.id, p) or p == w.group for w in WORKLOADS)]
    if unknown:
        raise SystemExit(f"compare.py: no workload matches {unknown}; see --list")
    return chosen


# ---------------------------------------------------------------------------
# Data and the float64 check

@dataclass
class Data:
    """A workload's arrays, shared by every implementation and thread count."""

    x: np.ndarray
    out: np.ndarray                  # the preallocated output (y, or dx)
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray         # eval statistics; training gets copies
    running_var: np.ndarray
    dy: Optional[np.ndarray] = None  # backward only
    mean: Optional[np.ndarray] = None    # backward: bncore's float64 batch statistics
    invstd: Optional[np.ndarray] = None

    def running(self):
        """Fresh running buffers for an implementation that updates them."""
        return self.running_mean.copy(), self.running_var.copy()


def make_data(wl, dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = wl.channels
    x = rng.standard_normal(wl.shape, dtype=np.float32).astype(dtype, copy=False)
    out = np.empty_like(x)
    out.fill(0)  # touch every page now, so no timed call pays the first faults
    data = Data(
        x=x, out=out,
        weight=rng.uniform(0.5, 1.5, channels).astype(dtype),
        bias=rng.normal(0.0, 0.1, channels).astype(dtype),
        running_mean=rng.normal(0.0, 0.1, channels).astype(dtype),
        running_var=rng.uniform(0.5, 1.5, channels).astype(dtype),
    )
    if wl.kind == "backward":
        data.dy = rng.standard_normal(wl.shape, dtype=np.float32).astype(dtype, copy=False)
        _, data.mean, data.invstd = bncore.batch_norm(x, training=True, axis=wl.axis,
                                                      return_stats=True)
    return data


class Reference:
    """Expected outputs at a random sample of positions, from float64
    statistics over the whole input: catches an implementation (or an
    adapter) that normalises the wrong axis or leaves its output unwritten."""

    SAMPLE = 20_000

    def __init__(self, wl, data, seed=1):
        outer, channels, inner = wl.canonical()
        x3 = data.x.reshape(outer, channels, inner)
        rng = np.random.default_rng(seed)
        flat = rng.integers(0, data.x.size, min(self.SAMPLE, data.x.size))
        self.shape3 = (outer, channels, inner)
        self.index = np.unravel_index(flat, self.shape3)
        c = self.index[1]
        w = data.weight.astype(np.float64)
        b = data.bias.astype(np.float64)
        xs = x3[self.index].astype(np.float64)
        if wl.kind == "eval":
            mean = data.running_mean.astype(np.float64)
            invstd = 1.0 / np.sqrt(data.running_var.astype(np.float64) + EPS)
        else:
            mean, var = _channel_moments(x3)
            invstd = 1.0 / np.sqrt(var + EPS)
        if wl.kind == "backward":
            dy3 = data.dy.reshape(self.shape3)
            sum_dy, sum_dy_xhat = _channel_backward_sums(x3, dy3, mean, invstd)
            n = outer * inner
            xhat = (xs - mean[c]) * invstd[c]
            dys = dy3[self.index].astype(np.float64)
            self.expected = w[c] * invstd[c] * (dys - sum_dy[c] / n - xhat * sum_dy_xhat[c] / n)
        else:
            self.expected = (xs - mean[c]) * invstd[c] * w[c] + b[c]
        self.copy_expected = xs
        self.tolerance = 1e-3 if data.x.dtype == np.float32 else 1e-8

    def error(self, output, copy=False):
        """Largest error at the sampled positions, relative above 1."""
        got = np.asarray(output).reshape(self.shape3)[self.index].astype(np.float64)
        expected = self.copy_expected if copy else self.expected
        return float(np.max(np.abs(got - expected) / np.maximum(1.0, np.abs(expected))))


def _chunks(outer, per_chunk):
    step = max(1, per_chunk)
    return [(i, min(outer, i + step)) for i in range(0, outer, step)]


def _channel_moments(x3):
    """Per-channel mean and biased variance in float64, two passes, in chunks."""
    outer, channels, inner = x3.shape
    step = max(1, (1 << 22) // max(1, channels * inner))
    total = np.zeros(channels)
    for lo, hi in _chunks(outer, step):
        total += x3[lo:hi].sum(axis=(0, 2), dtype=np.float64)
    mean = total / (outer * inner)
    m2 = np.zeros(channels)
    for lo, hi in _chunks(outer, step):
        d = x3[lo:hi].astype(np.float64) - mean[None, :, None]
        m2 += np.einsum("ocl,ocl->c", d, d)
    return mean, m2 / (outer * inner)


def _channel_backward_sums(x3, dy3, mean, invstd):
    outer, channels, inner = x3.shape
    step = max(1, (1 << 22) // max(1, channels * inner))
    sum_dy = np.zeros(channels)
    sum_dy_xhat = np.zeros(channels)
    for lo, hi in _chunks(outer, step):
        dy = dy3[lo:hi].astype(np.float64)
        xhat = (x3[lo:hi].astype(np.float64) - mean[None, :, None]) * invstd[None, :, None]
        sum_dy += dy.sum(axis=(0, 2))
        sum_dy_xhat += np.einsum("ocl,ocl->c", dy, xhat)
    return sum_dy, sum_dy_xhat


# ---------------------------------------------------------------------------
# Implementation adapters

@dataclass
class Impl:
    """One way to run a workload: ``call()`` does one call, ``output(result)``
    gives the numpy output in the input's layout (for the check).

    family: bncore, torch, onnxruntime, numpy, copy, np.copyto.
    variant: out (preallocated), alloc, module, textbook, yardstick.
    pool: whose threads run it: "openmp" (libgomp: bncore, PyTorch, the
    copy), "onnxruntime" (its own pool), "main" (single-threaded NumPy).
    """

    name: str
    family: str
    variant: str
    pool: str
    call: Callable[[], Any]
    output: Callable[[Any], Optional[np.ndarray]] = lambda result: result
    is_copy: bool = False
    note: str = ""


IMPL_ORDER = ["copy (stream)", "np.copyto", "bncore", "bncore alloc", "bncore module",
              "torch", "torch alloc", "torch module", "onnxruntime", "onnxruntime alloc",
              "numpy"]
PEER_FAMILIES = (("torch", "torch"), ("numpy", "numpy"), ("onnxruntime", "onnxruntime"))


def _optional(name):
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install: the peer is then absent
        return None


def _name(family, variant):
    return family if variant in ("out", "textbook") else f"{family} {variant}"


def yardstick_impls(wl, data, threads):
    impls = []
    if _stream_copy is not None:
        impls.append(Impl("copy (stream)", "copy", "yardstick", "openmp",
                          lambda: _stream_copy(data.x, data.out, True, threads),
                          output=lambda r: data.out, is_copy=True))
    impls.append(Impl("np.copyto", "np.copyto", "yardstick", "main",
                      lambda: np.copyto(data.out, data.x),
                      output=lambda r: data.out, is_copy=True))
    return impls


def _bncore_layer(wl, data, training):
    classes = {2: bncore.BatchNorm1d, 3: bncore.BatchNorm1d, 4: bncore.BatchNorm2d,
               5: bncore.BatchNorm3d}
    if wl.feature_axis == 1 and wl.ndim in classes:
        layer = classes[wl.ndim](wl.channels, eps=EPS, momentum=MOMENTUM, dtype=data.x.dtype)
    else:
        layer = bncore.BatchNorm(wl.channels, eps=EPS, momentum=MOMENTUM, axis=wl.axis,
                                 dtype=data.x.dtype)
    state = layer.state_dict()
    state.update(weight=data.weight, bias=data.bias, running_mean=data.running_mean,
                 running_var=data.running_var)
    layer.load_state_dict(state)
    layer.train(training)
    return layer


def bncore_impls(wl, data, threads):
    """bncore's functional calls with and without out=, and its layers.

    The layers take their thread count from bncore.set_num_threads, which the
    timing driver sets for each thread count."""
    x, axis, impls = data.x, wl.axis, []
    if wl.kind == "backward":
        def backward(out):
            return lambda: bncore.batch_norm_backward(
                data.dy, x, data.mean, data.invstd, data.weight, training=True, axis=axis,
                out=out, num_threads=threads)
        for variant in wl.variants():
            if variant == "module":
                continue
            impls.append(Impl(_name("bncore", variant), "bncore", variant, "openmp",
                              backward(data.out if variant == "out" else None),
                              output=lambda r: r[0]))
        return impls
    training = wl.kind == "train"
    for variant in wl.variants():
        if variant == "module":
            layer = _bncore_layer(wl, data, training)
            call = (lambda layer: lambda: layer(x))(layer)
        else:
            out = data.out if variant == "out" else None
            mean, var = data.running() if training else (data.running_mean, data.running_var)
            call = (lambda out, mean, var: lambda: bncore.batch_norm(
                x, mean, var, data.weight, data.bias, training=training, momentum=MOMENTUM,
                eps=EPS, axis=axis, out=out, num_threads=threads))(out, mean, var)
        impls.append(Impl(_name("bncore", variant), "bncore", variant, "openmp", call))
    return impls


def numpy_batch_norm(x, running_mean, running_var, weight, bias, training, axis=1,
                     momentum=MOMENTUM, eps=EPS):
    """Batch norm as NumPy users write it: whole-array operations in the
    input's dtype, a temporary per operation; updates the running statistics
    in training like the others do."""
    ax = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        n = x.size // x.shape[ax]
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * var * (n / (n - 1))
    else:
        mean, var = running_mean, running_var
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
            * weight.reshape(shape) + bias.reshape(shape))


def numpy_batch_norm_backward(dy, x, mean, invstd, weight, axis=1):
    """The training backward, textbook NumPy: (dx, grad_weight, grad_bias)."""
    ax = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    n = x.size // x.shape[ax]
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    grad_bias = dy.sum(axis=axes)
    grad_weight = (dy * xhat).sum(axis=axes)
    dx = (weight * invstd).reshape(shape) * (
        dy - (grad_bias / n).reshape(shape) - xhat * (grad_weight / n).reshape(shape))
    return dx, grad_weight, grad_bias


def numpy_impls(wl, data, threads):
    x, axis = data.x, wl.axis
    if wl.kind == "backward":
        mean = data.mean.astype(x.dtype)
        invstd = data.invstd.astype(x.dtype)
        call = lambda: numpy_batch_norm_backward(data.dy, x, mean, invstd, data.weight, axis)
        return [Impl("numpy", "numpy", "textbook", "main", call, output=lambda r: r[0])]
    training = wl.kind == "train"
    mean, var = data.running() if training else (data.running_mean, data.running_var)
    call = lambda: numpy_batch_norm(x, mean, var, data.weight, data.bias, training, axis)
    return [Impl("numpy", "numpy", "textbook", "main", call)]


def _torch_view(torch, array, wl):
    """A zero-copy tensor in PyTorch's (N, C, ...) order: channels-last
    arrays become channels_last-strided permuted views."""
    tensor = torch.from_numpy(array)
    if wl.channels_last:
        tensor = tensor.permute(0, wl.ndim - 1, *range(1, wl.ndim - 1))
        if wl.ndim == 4:
            assert tensor.is_contiguous(memory_format=torch.channels_last)
    return tensor


def _torch_to_layout(tensor, wl):
    if wl.channels_last:
        tensor = tensor.permute(0, *range(2, wl.ndim), 1)
    return tensor.numpy()


def torch_impls(wl, data, threads):
    """PyTorch on the same memory. "torch" is the preallocated-output kernel
    ``aten.native_batch_norm.out`` (what F.batch_norm runs, less the output
    allocation); "torch alloc" is F.batch_norm; "torch module" nn.BatchNormNd.
    The backward is ``aten.native_batch_norm_backward(.out)``, the kernel
    autograd's NativeBatchNormBackward0 runs, timed without the graph (measured
    equal to ``torch.autograd.grad(y, x, dy, retain_graph=True)`` within noise).
    Forwards run with autograd off (the driver sets torch.set_grad_enabled(False))."""
    torch = _optional("torch")
    if torch is None:
        return []
    aten = torch.ops.aten
    xt, outt = _torch_view(torch, data.x, wl), _torch_view(torch, data.out, wl)
    weight, bias = torch.from_numpy(data.weight), torch.from_numpy(data.bias)
    to_layout = lambda r: _torch_to_layout(r, wl)  # noqa: E731
    impls = []
    if wl.kind == "backward":
        dyt = _torch_view(torch, data.dy, wl)
        running = [torch.from_numpy(a) for a in data.running()]
        _, save_mean, save_invstd = aten.native_batch_norm(xt, weight, bias, *running, True,
                                                           MOMENTUM, EPS)
        grads = [torch.empty_like(weight), torch.empty_like(weight)]
        args = (dyt, xt, weight, *running, save_mean, save_invstd, True, EPS, [True] * 3)
        for variant in wl.variants():
            if variant == "out":
                call = lambda: aten.native_batch_norm_backward.out(
                    *args, out0=outt, out1=grads[0], out2=grads[1])
                impls.append(Impl("torch", "torch", "out", "openmp", call,
                                  output=lambda r: data.out))
            elif variant == "alloc":
                call = lambda: aten.native_batch_norm_backward(*args)
                impls.append(Impl("torch alloc", "torch", "alloc", "openmp", call,
                                  output=lambda r: to_layout(r[0])))
        return impls
    training = wl.kind == "train"
    for variant in wl.variants():
        if training:
            mean, var = (torch.from_numpy(a) for a in data.running())
        else:
            mean, var = torch.from_numpy(data.running_mean), torch.from_numpy(data.running_var)
        if variant == "out":
            save = [torch.empty_like(weight), torch.empty_like(weight)]
            call = (lambda mean, var, save: lambda: aten.native_batch_norm.out(
                xt, weight, bias, mean, var, training, MOMENTUM, EPS,
                out=outt, save_mean=save[0], save_invstd=save[1]))(mean, var, save)
            impls.append(Impl("torch", "torch", "out", "openmp", call,
                              output=lambda r: data.out))
        elif variant == "alloc":
            call = (lambda mean, var: lambda: torch.nn.functional.batch_norm(
                xt, mean, var, weight, bias, training, MOMENTUM, EPS))(mean, var)
            impls.append(Impl("torch alloc", "torch", "alloc", "openmp", call,
                              output=to_layout))
        elif variant == "module":
            layer = _torch_layer(torch, wl, data, training)
            call = (lambda layer: lambda: layer(xt))(layer)
            impls.append(Impl("torch module", "torch", "module", "openmp", call,
                              output=to_layout))
    return impls


def _torch_layer(torch, wl, data, training):
    classes = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}
    dtype = torch.float32 if data.x.dtype == np.float32 else torch.float64
    layer = classes[wl.ndim](wl.channels, eps=EPS, momentum=MOMENTUM, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(data.weight))
        layer.bias.copy_(torch.from_numpy(data.bias))
        layer.running_mean.copy_(torch.from_numpy(data.running_mean))
        layer.running_var.copy_(torch.from_numpy(data.running_var))
    layer.train(training)
    return layer


def onnx_batch_norm_model(data, ndim):
    """A one-node ONNX model (opset 15 BatchNormalization, inference mode)
    with the workload's weight, bias and running statistics as initializers."""
    from onnx import TensorProto, helper
    elem = TensorProto.FLOAT if data.x.dtype == np.float32 else TensorProto.DOUBLE
    dims = [f"d{i}" for i in range(ndim)]
    inits = [helper.make_tensor(name, elem, [len(value)], value)
             for name, value in (("scale", data.weight), ("B", data.bias),
                                 ("mean", data.running_mean), ("var", data.running_var))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
                            epsilon=EPS)
    graph = helper.make_graph([node], "batch_norm",
                              [helper.make_tensor_value_info("X", elem, dims)],
                              [helper.make_tensor_value_info("Y", elem, dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8  # opset 15's; any onnxruntime >= 1.10 loads it
    return model.SerializeToString()


def onnxruntime_impls(wl, data, threads):
    """ONNX Runtime's CPU BatchNormalization, eval only and channel-first only
    (ONNX's BatchNormalization has no feature axis). "onnxruntime" binds the
    preallocated output with IOBinding; "onnxruntime alloc" is a plain run."""
    if wl.kind != "eval" or wl.channels_last or wl.feature_axis != 1:
        return []
    ort = _optional("onnxruntime")
    if ort is None or _optional("onnx") is None:
        return []
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_batch_norm_model(data, wl.ndim), options,
                                   providers=["CPUExecutionProvider"])
    impls = []
    for variant in wl.variants():
        if variant == "out":
            binding = session.io_binding()
            binding.bind_cpu_input("X", data.x)
            binding.bind_output("Y", "cpu", 0, data.x.dtype, list(data.out.shape),
                                data.out.ctypes.data)
            call = (lambda binding: lambda: session.run_with_iobinding(binding))(binding)
            impls.append(Impl("onnxruntime", "onnxruntime", "out", "onnxruntime", call,
                              output=lambda r: data.out))
        elif variant == "alloc":
            feed = {"X": data.x}
            impls.append(Impl("onnxruntime alloc", "onnxruntime", "alloc", "onnxruntime",
                              lambda: session.run(None, feed), output=lambda r: r[0]))
    return impls


ADAPTERS = (yardstick_impls, bncore_impls, torch_impls, onnxruntime_impls, numpy_impls)
ADAPTER_FAMILIES = {yardstick_impls: {"copy", "np.copyto"}, bncore_impls: {"bncore"},
                    torch_impls: {"torch"}, onnxruntime_impls: {"onnxruntime"},
                    numpy_impls: {"numpy"}}


def impl_names(wl):
    """The names the adapters give wl's implementations when every peer is
    installed (for pytest's parametrization, which needs them before data)."""
    names = ["copy (stream)", "np.copyto"]
    variants = [v for v in wl.variants() if not (wl.kind == "backward" and v == "module")]
    for family in ("bncore", "torch"):
        names += [_name(family, v) for v in variants]
    if wl.kind == "eval" and wl.feature_axis == 1:
        names += [_name("onnxruntime", v) for v in variants if v != "module"]
    return sorted(names + ["numpy"], key=IMPL_ORDER.index)


def implementations(wl, data, threads, log=None, families=None):
    """Every applicable, importable implementation of wl, in report order
    (only those of the given families, if any). An adapter that fails (say
    an API in the middle of a change) is reported and skipped rather than
    ending the run."""
    impls = []
    for adapter in ADAPTERS:
        if families is not None and not set(families) & ADAPTER_FAMILIES[adapter]:
            continue
        try:
            impls.extend(adapter(wl, data, threads))
        except Exception as error:  # noqa: BLE001 - report and go on
            if log:
                log(f"  {adapter.__name__} failed on {wl.id}: {type(error).__name__}: {error}")
    return sorted(impls, key=lambda impl: IMPL_ORDER.index(impl.name))


# ---------------------------------------------------------------------------
# Timing

@dataclass
class Timing:
    samples: list = field(default_factory=list)   # seconds per call, one per sample
    preemptions: list = field(default_factory=list)  # per sample: involuntary switches
    disturbed: list = field(default_factory=list)  # per sample: too many of them
    calls_per_sample: int = 1
    check_error: Optional[float] = None
    failure: Optional[str] = None


@dataclass
class Settings:
    repeats: int = 31        # samples per implementation at most
    min_repeats: int = 5     # and at least
    budget: float = 6.0      # seconds of samples per workload and thread count
    sample_time: float = 1e-3  # a latency sample loops for about this long
    settle: float = 0.01     # sleep before a sample that follows another thread pool
    check: bool = True
    seed: int = 0


def _repetitions(estimates, settings):
    """Samples per implementation: the budget shared out fastest first, so
    fast implementations get `repeats` and slow ones what is left, never
    fewer than `min_repeats`."""
    reps = {}
    remaining = settings.budget
    order = sorted(estimates, key=estimates.get)
    for i, name in enumerate(order):
        share = remaining / (len(order) - i)
        n = int(share / max(estimates[name], 1e-9))
        reps[name] = max(settings.min_repeats, min(settings.repeats, n))
        remaining -= reps[name] * estimates[name]
    return reps


def _round_members(reps, rounds, r):
    """Implementations sampled in round r: each one's samples spread evenly."""
    return [name for name, n in reps.items()
            if (r + 1) * n // rounds > r * n // rounds]


# One preemption costs at most a scheduler tick (~4 ms): in a sample of
# 100 ms or more that is within 4 %, and samples that long are the ones a
# kernel thread is bound to interrupt once in a while.
PREEMPTION_GRACE = 0.1


def _preemptions():
    """Involuntary context switches of all this process's threads so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw if resource else 0


def measure(impls, wl, data, reference, settings, threads, log, wait=None):
    """Warm up and check each implementation, then sample them round-robin.

    A sample during which a thread of this process was preempted (another
    process wanted the CPU: on a 2-core machine a preempted OpenMP worker
    stalls the whole call for a scheduler tick, ~4 ms) is marked disturbed,
    unless it lasted long enough for that not to matter: one preemption per
    PREEMPTION_GRACE seconds is let pass (a kernel thread's blip during a
    0.5 s NumPy call). Extra rounds then retake samples until each
    implementation has its count of undisturbed ones, or three times that in
    all, or the planned time again."""
    timings = {impl.name: Timing() for impl in impls}
    estimates = {}
    live = []
    for impl in impls:
        timing = timings[impl.name]
        try:
            if reference is not None:
                # So that an out= call that leaves the buffer alone cannot
                # pass the check on what the previous implementation wrote.
                data.out.fill(np.nan)
            start = time.perf_counter()
            result = impl.call()
            first = time.perf_counter() - start
            if reference is not None:
                output = impl.output(result)
                if output is not None:
                    timing.check_error = reference.error(output, copy=impl.is_copy)
                    if not timing.check_error <= reference.tolerance:
                        log(f"  CHECK FAILED {wl.id} {impl.name} threads={threads}: "
                            f"error {timing.check_error:.2e} > {reference.tolerance:.0e}")
            del result
            # Warm up: two calls for large inputs, ~20 ms of calls for small ones.
            calls, spent = 1, first
            while calls < 2 or (wl.latency and spent < 0.02 and calls < 10_000):
                start = time.perf_counter()
                impl.call()
                last = time.perf_counter() - start
                spent += last
                calls += 1
            estimates[impl.name] = min(last, spent / calls)
        except Exception as error:  # noqa: BLE001 - one failing peer must not end the run
            timing.failure = f"{type(error).__name__}: {error}"
            log(f"  {impl.name} failed on {wl.id} threads={threads}: {timing.failure}")
            continue
        if wl.latency:
            timing.calls_per_sample = max(1, math.ceil(settings.sample_time / estimates[impl.name]))
        live.append(impl)

    per_sample = {impl.name: estimates[impl.name] * timings[impl.name].calls_per_sample
                  for impl in live}
    reps = _repetitions(per_sample, settings)
    rounds = max(reps.values(), default=0)
    rng = np.random.default_rng(settings.seed)
    by_name = {impl.name: impl for impl in live}
    previous_pool = None
    planned = sum(reps[name] * per_sample[name] for name in reps)
    gc.collect()
    gc.disable()
    try:
        r, extra_deadline = 0, None
        while True:
            if r < rounds:
                members = _round_members(reps, rounds, r)
            else:
                if extra_deadline is None:
                    extra_deadline = time.perf_counter() + planned
                members = [name for name in reps
                           if timings[name].disturbed.count(False) < reps[name]
                           and len(timings[name].samples) < 3 * reps[name]]
                if not members or time.perf_counter() > extra_deadline:
                    break
            r += 1
            # Shuffle, keeping each thread pool's members together so that
            # a round changes pools (and settles) as seldom as possible.
            pools = sorted({by_name[m].pool for m in members})
            rng.shuffle(pools)
            order = []
            for pool in pools:
                group = [m for m in members if by_name[m].pool == pool]
                rng.shuffle(group)
                order.extend(group)
            for name in order:
                impl, timing = by_name[name], timings[name]
                if (threads > 1 and previous_pool == "openmp" and impl.pool != "openmp"
                        and settings.settle > 0):
                    time.sleep(settings.settle)
                call, k = impl.call, timing.calls_per_sample
                switches = _preemptions()
                start = time.perf_counter()
                for _ in range(k):
                    call()
                elapsed = time.perf_counter() - start
                switches = _preemptions() - switches
                timing.preemptions.append(switches)
                timing.disturbed.append(switches > int(elapsed / PREEMPTION_GRACE))
                timing.samples.append(elapsed / k)
                previous_pool = impl.pool
            if wait is not None and any(timings[m].disturbed[-1] for m in order):
                gc.enable()
                wait(f"more samples of {wl.id} on {threads} threads")
                gc.disable()
    finally:
        gc.enable()
    return timings


def run_workload(wl, dtype, threads_list, settings, torch, log, wait=None):
    """Time every implementation of one workload at each thread count; the
    result rows, then the arrays are freed."""
    started = time.perf_counter()
    data = make_data(wl, dtype)
    reference = Reference(wl, data) if settings.check else None
    rows = []
    for threads in threads_list:
        if torch is not None:
            torch.set_num_threads(threads)
        bncore.set_num_threads(threads)  # the layers' thread count
        impls = implementations(wl, data, threads, log)
        if wait is not None:
            wait(f"{wl.id} on {threads} threads")
        with OthersMeter() as others:
            timings = measure(impls, wl, data, reference, settings, threads, log, wait)
        for impl in impls:
            rows.append(_row(wl, data, impl, timings[impl.name], threads))
            rows[-1]["others_cpu"] = others.share
        del impls, timings
    bncore.set_num_threads(None)
    del data, reference
    gc.collect()
    load = _load()
    for row in rows:
        row["load_after"] = load
    log(f"  {wl.id}: {time.perf_counter() - started:.1f} s, load average {load}")
    return rows


def _row(wl, data, impl, timing, threads):
    clean = [t for t, bad in zip(timing.samples, timing.disturbed) if not bad]
    # Statistics over the undisturbed samples when there are a few of them.
    samples = clean if len(clean) >= 3 else timing.samples
    row = {
        "workload": wl.id, "group": wl.group, "kind": wl.kind, "layout": wl.layout,
        "shape": list(wl.shape), "axis": wl.axis, "dtype": data.x.dtype.name,
        "nbytes": int(data.x.nbytes), "threads": threads,
        "impl": impl.name, "family": impl.family, "variant": impl.variant,
        "bytes_moved": int(data.x.nbytes * (2 if impl.is_copy else wl.bound_factor)),
        "calls_per_sample": timing.calls_per_sample, "n_samples": len(timing.samples),
        "n_undisturbed": len(clean), "median_of_undisturbed": samples is clean,
        "preemptions": timing.preemptions, "disturbed": timing.disturbed,
        "check_error": timing.check_error, "failure": timing.failure,
        "samples_s": timing.samples,
    }
    if samples:
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        row.update(median_s=float(median), q1_s=float(q1), q3_s=float(q3),
                   min_s=float(min(samples)))
    return row


# ---------------------------------------------------------------------------
# Derived quantities and the report

def derive(rows):
    """GB/s, fraction of the streaming copy, speed-ups against each peer
    (bncore rows only; like against like: out= with out=, alloc with alloc,
    a layer with a layer; NumPy's single textbook version against all)."""
    index = {(r["workload"], r["threads"], r["impl"]): r for r in rows if "median_s" in r}
    for row in rows:
        if "median_s" not in row:
            continue
        row["gbps"] = row["bytes_moved"] / row["median_s"] / 1e9
        copy = index.get((row["workload"], row["threads"], "copy (stream)"))
        row["frac_copy"] = (row["bytes_moved"] / row["median_s"]
                            / (copy["bytes_moved"] / copy["median_s"])) if copy else None
    for row in rows:
        if row["family"] != "bncore" or "median_s" not in row:
            continue
        speedups = {}
        for key, family in PEER_FAMILIES:
            if family == "numpy":
                peer = "numpy"
            elif family == "onnxruntime":
                peer = {"out": "onnxruntime", "alloc": "onnxruntime alloc",
                        "module": "onnxruntime alloc"}[row["variant"]]
            else:
                peer = _name(family, row["variant"])
            other = index.get((row["workload"], row["threads"], peer))
            speedups[key] = other["median_s"] / row["median_s"] if other else None
        row["speedup"] = speedups
    return rows


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mb(nbytes):
    return f"{nbytes / 1e6:.3g} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.3g} kB"


def results_table(rows):
    lines = ["| workload | impl | threads | median | IQR | n | GB/s | of copy | vs torch "
             "| vs NumPy | vs ORT |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        label = f"{row['workload']} ({_mb(row['nbytes'])})"
        if "median_s" not in row:
            lines.append(f"| {label} | {row['impl']} | {row['threads']} | failed: "
                         f"{row['failure']} | | | | | | | |")
            continue
        spread = (row["q3_s"] - row["q1_s"]) / row["median_s"] * 100
        speed = row.get("speedup", {})
        flag = ""
        if row["check_error"] is not None and not row["check_error"] <= (
                1e-3 if row["dtype"] == "float32" else 1e-8):
            flag = " (CHECK FAILED)"
        dagger = "" if row["median_of_undisturbed"] else " †"
        lines.append(
            f"| {label} | {row['impl']}{flag} | {row['threads']} | {_fmt_time(row['median_s'])}"
            f"{dagger} | {spread:.0f}% | {row['n_undisturbed']}/{row['n_samples']} "
            f"| {row['gbps']:.1f} | {_fmt(row['frac_copy'], '.2f')} "
            f"| {_fmt(speed.get('torch'), '.2f', 'x')} | {_fmt(speed.get('numpy'), '.1f', 'x')} "
            f"| {_fmt(speed.get('onnxruntime'), '.2f', 'x')} |")
    return lines


def _index(rows):
    return {(r["workload"], r["threads"], r["impl"]): r for r in rows if "median_s" in r}


def _verdict(ok, used):
    """yes / NO, with a dagger when a median it rests on had too few
    undisturbed samples (then it says little)."""
    reliable = all(r is None or r["median_of_undisturbed"] for r in used)
    return ("yes" if ok else "NO") + ("" if reliable else " †")


def _ratio(a, b):
    return a["median_s"] / b["median_s"] if a is not None and b is not None else None


def scaling_table(rows, workloads, threads_list):
    """bncore's, PyTorch's and the streaming copy's time on 1 thread over
    time on n. The copy's column is the machine's own scaling in the same
    run: where memory already runs at its limit on one thread, more threads
    cannot be faster, and the copy shows when that was so."""
    if 1 not in threads_list or len(threads_list) < 2:
        return []
    index = _index(rows)
    others = [t for t in threads_list if t != 1]
    impls = {"bncore": "bncore", "torch": "torch", "copy (stream)": "copy"}
    head = "| workload | " + " | ".join(f"{label} 1->{t}" for label in impls.values()
                                         for t in others) + " | bncore faster on more threads |"
    lines = [head, "|---|" + "---:|" * (len(impls) * len(others)) + "---|"]
    for wl in workloads:
        if wl.latency:
            continue
        cells, ok, used = [], True, []
        for impl in impls:
            for t in others:
                one, many = index.get((wl.id, 1, impl)), index.get((wl.id, t, impl))
                ratio = _ratio(one, many)
                if impl == "bncore":
                    ok = ok and ratio is not None and ratio > 1
                    used += [one, many]
                cells.append(_fmt(ratio, ".2f", "x"))
        lines.append(f"| {wl.id} | " + " | ".join(cells) + f" | {_verdict(ok, used)} |")
    return lines


def alloc_table(rows, workloads, threads_list):
    """Allocating call time over the out= call's (goal: bncore <= 1.3)."""
    index = _index(rows)
    lines = ["| workload | threads | bncore alloc / out= | torch alloc / out= "
             "| onnxruntime alloc / out= | bncore <= 1.3 |",
             "|---|---:|---:|---:|---:|---|"]
    for wl in workloads:
        if not wl.alloc:
            continue
        for t in threads_list:
            cells = [_ratio(index.get((wl.id, t, f"{family} alloc")),
                            index.get((wl.id, t, family)))
                     for family in ("bncore", "torch", "onnxruntime")]
            ok = cells[0] is not None and cells[0] <= 1.3
            used = [index.get((wl.id, t, "bncore alloc")), index.get((wl.id, t, "bncore"))]
            lines.append(f"| {wl.id} | {t} | " + " | ".join(_fmt(c, ".2f") for c in cells)
                         + f" | {_verdict(ok, used)} |")
    return lines


def _goals(wl, threads):
    """Issue 4's goals for bncore's out= call: (of copy, vs torch, vs ORT)."""
    if wl.group == "train":
        if wl.layout == "nchw":
            return (0.75 if threads >= 2 else 0.65), 4.0, None
        return 0.60, 2.0, None
    if wl.kind == "eval" and wl.group in ("eval", "scaling"):
        return 0.95, 1.3, (1.0 if wl.layout != "nhwc" else None)
    if wl.group == "backward":
        return 0.65, 3.0, None
    return None, None, None


def goals_table(rows, workloads, threads_list):
    index = _index(rows)
    lines = ["| workload | threads | of copy | goal | vs torch | goal | vs ORT | goal | met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for wl in workloads:
        for t in threads_list:
            row = index.get((wl.id, t, "bncore"))
            if row is None:
                continue
            if wl.group == "latency":
                for variant in ("alloc", "module"):
                    mine = index.get((wl.id, t, f"bncore {variant}"))
                    peer = index.get((wl.id, t, f"torch {variant}"))
                    s = _ratio(peer, mine)
                    met = "-" if s is None else _verdict(s >= 2, [mine, peer])
                    lines.append(f"| {wl.id} ({variant}) | {t} | - | - | {_fmt(s, '.2f', 'x')} "
                                 f"| 2x | - | - | {met} |")
                continue
            frac_goal, torch_goal, ort_goal = _goals(wl, t)
            if frac_goal is None:
                continue
            frac, speed = row["frac_copy"], row["speedup"]
            used = [row, index.get((wl.id, t, "copy (stream)"))]
            checks = [frac is not None and frac >= frac_goal]
            if speed["torch"] is not None:
                checks.append(speed["torch"] >= torch_goal)
                used.append(index.get((wl.id, t, "torch")))
            if ort_goal is not None and speed["onnxruntime"] is not None:
                checks.append(speed["onnxruntime"] >= ort_goal)
                used.append(index.get((wl.id, t, "onnxruntime")))
            lines.append(
                f"| {wl.id} | {t} | {_fmt(frac, '.2f')} | {frac_goal:.2f} "
                f"| {_fmt(speed['torch'], '.2f', 'x')} | {torch_goal:g}x "
                f"| {_fmt(speed['onnxruntime'], '.2f', 'x')} | "
                f"{'-' if ort_goal is None else f'{ort_goal:g}x'} | {_verdict(all(checks), used)} |")
    return lines


def machine_info():
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                      if line.startswith("flags")), [])
        info["isa"] = [f for f in ("avx512f", "avx512bw", "avx2", "fma") if f in flags]
    except OSError:
        pass
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    caches = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            def read(name, index=index):
                with open(os.path.join(base, index, name)) as f:
                    return f.read().strip()
            if read("type") != "Instruction":
                caches.append(f"L{read('level')} {read('size')}")
        except OSError:
            pass
    info["caches_per_cpu0"] = caches
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gb"] = round(kb / 1e6, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {"numpy": np.__version__, "bncore": bncore.__version__}
    for name in ("torch", "onnxruntime", "onnx", "matplotlib"):
        module = sys.modules.get(name) or (
            _optional(name) if importlib.util.find_spec(name) else None)
        versions[name] = getattr(module, "__version__", None) if module else None
    info["versions"] = versions
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "GOMP_SPINCOUNT", "OMP_PROC_BIND")
                   if k in os.environ}
    buffer = io.StringIO()
    bncore.show_config(buffer)
    info["bncore_config"] = buffer.getvalue().rstrip()
    info["bncore_commit"] = _git_describe()
    return info


def _git_describe():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bncore"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + (" + uncommitted changes under bncore/" if dirty else "")) or None


def render_markdown(report, workloads):
    info, rows = report["machine"], report["rows"]
    versions = info["versions"]
    lines = [
        f"# bncore against its peers ({report['dtype']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Run: {report['started']}, {report['runtime_s']:.0f} s"
        + (f" (of which {report['waited_s']:.0f} s waiting for idle CPUs)"
           if report["waited_s"] >= 1 else "") + "; load average "
        f"{report['load_before']} before, {report['load_after']} after; other processes "
        f"kept the CPUs {_fmt(report['busy_before'], '.0%')} busy in the second before, "
        f"{_fmt(report['busy_after'], '.0%')} in the second after.  ",
        f"Machine: {info['cpu']}, {info.get('usable_cpus', info['cpus'])} CPUs "
        f"({', '.join(info.get('isa', []))}), caches {', '.join(info['caches_per_cpu0'])}, "
        f"{info.get('memory_gb', '?')} GB; {info['platform']}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) +
        f"; bncore commit {info['bncore_commit']}." +
        (f"  \nEnvironment: {info['env']}" if info["env"] else ""),
        "",
        "```",
        info["bncore_config"],
        "```",
        "",
        "Medians over interleaved repetitions of the samples during which no thread of "
        "the process was preempted by another process (one preemption per 100 ms of a "
        "long sample let pass; n: those / all; † marks a median of all samples, too "
        "few being undisturbed); IQR: interquartile range over the median. "
        "GB/s counts the least memory traffic: 2 x nbytes for a forward or a copy, "
        "3 x nbytes for the backward. \"of copy\": bandwidth over the streaming copy's at "
        "the same thread count. \"vs X\": X's time over bncore's (>1: bncore faster), like "
        "against like: out= against out= (torch: `aten.native_batch_norm.out`, ONNX Runtime: "
        "IOBinding), alloc against alloc (`F.batch_norm`, `session.run`), layer against layer. "
        "NumPy is always the allocating textbook version on one thread. PyTorch forwards run "
        "with autograd off; its backward is `aten.native_batch_norm_backward`, the kernel "
        "autograd runs.",
    ]
    for group, title in GROUPS.items():
        group_rows = [r for r in rows if r["group"] == group]
        if not group_rows:
            continue
        lines += ["", f"## {title}", ""] + results_table(group_rows)
    threads_list = report["threads"]
    scaling = scaling_table(rows, workloads, threads_list)
    if scaling:
        lines += ["", "## Thread scaling (time on 1 thread / time on n)", ""] + scaling
    alloc = alloc_table(rows, workloads, threads_list)
    if len(alloc) > 2:
        lines += ["", "## Allocating calls: time without out= / with out=", ""] + alloc
    goals = goals_table(rows, workloads, threads_list)
    if len(goals) > 2:
        lines += ["", "## bncore against issue 4's goals", ""] + goals
    noise = {}
    for r in rows:
        if r.get("others_cpu") is not None:
            noise[(r["workload"], r["threads"])] = r["others_cpu"]
    if noise:
        worst = max(noise, key=noise.get)
        noisy = sorted(k for k, v in noise.items() if v > 0.10)
        lines += ["", f"Other processes' share of the CPUs during the timed runs: median "
                  f"{np.median(list(noise.values())):.0%}, at most {noise[worst]:.0%} "
                  f"({worst[0]} on {worst[1]} threads); above 10 % in "
                  + (", ".join(f"{w} ({t})" for w, t in noisy) if noisy else "none") + "."]
    failures = [r for r in rows if r["failure"]]
    checks = [r for r in rows if r["check_error"] is not None and not r["check_error"] <= (
        1e-3 if r["dtype"] == "float32" else 1e-8)]
    lines += ["", f"Checks against float64 statistics: {len(checks)} failed"
              + (": " + ", ".join(f"{r['workload']} {r['impl']} {r['threads']}"
                                  for r in checks) if checks else "")
              + f"; {len(failures)} implementation runs failed." + (
                  " " + "; ".join(f"{r['workload']} {r['impl']}: {r['failure']}"
                                  for r in failures) if failures else "")]
    return "\n".join(lines) + "\n"


def plot(report, path):
    """Bars of fraction-of-streaming-copy per implementation and workload,
    one panel per thread count (latency-bound workloads left out)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("compare.py: --plot needs matplotlib: pip install matplotlib "
                         "(or pip install -e \".[bench]\")") from None
    rows = [r for r in report["rows"] if r.get("frac_copy") is not None
            and r["group"] not in PER_CALL_GROUPS and r["impl"] != "copy (stream)"]
    if not rows:
        raise SystemExit("compare.py: nothing to plot (no streaming-copy yardstick?)")
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    threads_list = report["threads"]
    colors = {"np.copyto": "#999999", "bncore": "#1f77b4", "bncore alloc": "#aec7e8",
              "torch": "#d62728", "torch alloc": "#ff9896", "onnxruntime": "#2ca02c",
              "onnxruntime alloc": "#98df8a", "numpy": "#ff7f0e"}
    fig, axes = plt.subplots(len(threads_list), 1, squeeze=False,
                             figsize=(max(10, 0.75 * len(workloads) + 2),
                                      3.6 * len(threads_list) + 1.2))
    width = 0.8 / len(impls)
    index = {(r["workload"], r["threads"], r["impl"]): r["frac_copy"] for r in rows}
    for ax, threads in zip(axes[:, 0], threads_list):
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for i, wl in enumerate(workloads):
                value = index.get((wl, threads, impl))
                if value is not None:
                    xs.append(i - 0.4 + (k + 0.5) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=impl, color=colors.get(impl))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.text(len(workloads) - 0.5, 1.02, "streaming copy", ha="right", va="bottom",
                fontsize=8)
        ax.set_ylabel("fraction of streaming copy")
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}", fontsize=10, loc="left")
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(workloads) - 0.4)
        # Above 1.5 (a small input in cache beating the streaming copy, or a
        # copy slowed by a noisy neighbour) the bar is cut and labelled.
        top = min(1.5, max(1.15, max(index.values()) * 1.08))
        ax.set_ylim(0, top)
        for patch in ax.patches:
            if patch.get_height() > top:
                ax.text(patch.get_x() + patch.get_width() / 2, top * 0.98,
                        f"{patch.get_height():.1f}", rotation=90, ha="center", va="top",
                        fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(impls), 8), fontsize=8, loc="lower left",
                      bbox_to_anchor=(0, 1.08))
    fig.suptitle(f"bncore against its peers, {report['dtype']}: bandwidth as a fraction of "
                 f"a streaming copy ({report['machine']['cpu']}, "
                 f"{report['machine'].get('usable_cpus', '?')} CPUs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Driver

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/compare.py",
        description="bncore side by side with the streaming copy, NumPy, PyTorch and "
                    "ONNX Runtime; a Markdown table on stdout, progress on stderr.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts (default: 1 2)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--workloads", nargs="+", metavar="NAME",
                        help="workload ids, groups or fnmatch patterns (see --list)")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repetitions: a smoke run of seconds")
    parser.add_argument("--repeats", type=int, help="samples per implementation at most "
                        "(default 31; --quick 7)")
    parser.add_argument("--min-repeats", type=int, help="and at least (default 5; --quick 3)")
    parser.add_argument("--budget", type=float, help="seconds of samples per workload and "
                        "thread count (default 6; --quick 0.3)")
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds to sleep before a sample that follows another thread "
                             "pool's (default 0.01; --quick 0.002)")
    parser.add_argument("--wait-idle", type=float, metavar="SECONDS", default=0,
                        help="on a shared machine: before each timed run wait for other "
                             "processes to leave the CPUs (< 10%% busy), SECONDS in all")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the check of each output against float64 statistics")
    parser.add_argument("--json", metavar="PATH", help="write every sample and result as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to PATH")
    parser.add_argument("--plot", metavar="PNG", help="draw the fraction-of-copy chart "
                        "(needs matplotlib)")
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for wl in WORKLOADS:
            print(f"{wl.id:34s} {wl.group:9s} {str(wl.shape):22s} axis={wl.axis}")
        return 0
    if args.plot:  # fail now, not after ten minutes
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("compare.py: --plot needs matplotlib: pip install matplotlib "
                             "(or pip install -e \".[bench]\")") from None
    settings = Settings(
        repeats=args.repeats or (7 if args.quick else 31),
        min_repeats=args.min_repeats or (3 if args.quick else 5),
        budget=args.budget if args.budget is not None else (0.3 if args.quick else 6.0),
        settle=args.settle if args.settle is not None else (0.002 if args.quick else 0.01),
        check=not args.no_check,
    )
    settings.min_repeats = min(settings.min_repeats, settings.repeats)
    dtype = np.dtype(args.dtype)
    workloads = [w.scaled(args.quick) for w in select_workloads(args.workloads)]

    def log(message):
        print(message, file=sys.stderr, flush=True)

    torch = _optional("torch")
    if torch is not None:
        torch.set_grad_enabled(False)
    if max(args.threads) > (os.cpu_count() or 1):
        log(f"note: {max(args.threads)} threads on {os.cpu_count()} CPUs oversubscribes")
    start = time.perf_counter()
    wait = IdleWaiter(args.wait_idle, log)
    wait("the run")
    busy_before = _cpu_busy(1.0)
    if busy_before is not None and busy_before > 0.10:
        log(f"note: other processes keep the CPUs {busy_before:.0%} busy: expect noise, "
            "above all on the threads > 1 rows")
    started_wall = datetime.datetime.now().astimezone()
    load_before = _load()
    machine = machine_info()
    rows = []
    log(f"{len(workloads)} workloads x threads {args.threads}, {dtype.name}")
    for wl in workloads:
        rows.extend(run_workload(wl, dtype, args.threads, settings, torch, log, wait))
    if torch is not None:
        torch.set_grad_enabled(True)
    derive(rows)
    report = {
        "command": "python " + shlex.join(sys.argv if argv is None else ["compare.py", *argv]),
        "started": started_wall.isoformat(timespec="seconds"),
        "runtime_s": time.perf_counter() - start, "waited_s": wait.waited,
        "load_before": load_before, "load_after": _load(),
        "busy_before": busy_before, "busy_after": _cpu_busy(1.0),
        "dtype": dtype.name, "threads": args.threads, "quick": args.quick,
        "settings": settings.__dict__, "machine": machine,
        "workloads": [{"id": w.id, "group": w.group, "kind": w.kind, "shape": list(w.shape),
                       "axis": w.axis} for w in workloads],
        "rows": rows,
    }
    markdown = render_markdown(report, workloads)
    sys.stdout.write(markdown)
    if args.markdown:
        _write(args.markdown, markdown)
    if args.json:
        _write(args.json, json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)
    log(f"done in {report['runtime_s']:.0f} s")
    return 0


def _cpu_ticks():
    """(busy, total) seconds of all CPUs so far, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz


class OthersMeter:
    """Share of the CPUs that other processes used while this one ran:
    all CPUs' busy time less this process's CPU time, over wall time x CPUs."""

    def __enter__(self):
        self.ticks, self.own, self.wall = _cpu_ticks(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        ticks = _cpu_ticks()
        if ticks is None or self.ticks is None:
            self.share = None
            return
        wall = time.perf_counter() - self.wall
        busy = ticks[0] - self.ticks[0] - (time.process_time() - self.own)
        self.share = min(1.0, max(0.0, busy / max(1e-9, wall * (os.cpu_count() or 1))))


def _cpu_busy(interval):
    """Share of the CPUs busy over interval seconds while this process sleeps."""
    with OthersMeter() as meter:
        time.sleep(interval)
    return meter.share


class IdleWaiter:
    """Waits for other processes to leave the CPUs (busy < 10 % over half a
    second) before each timed run, within a total budget of seconds."""

    def __init__(self, budget, log):
        self.left, self.log, self.waited = budget, log, 0.0

    def __call__(self, what):
        if self.left <= 0:
            return
        start = time.monotonic()
        busy = _cpu_busy(0.5)
        while busy is not None and busy >= 0.10 and time.monotonic() - start < self.left:
            self.log(f"  waiting for idle CPUs before {what}: {busy:.0%} busy")
            time.sleep(1.5)
            busy = _cpu_busy(0.5)
        spent = time.monotonic() - start
        self.left -= spent
        self.waited += spent


def _load():
    with contextlib.suppress(OSError, AttributeError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


def _write(path, text):
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
