"""float16 and bfloat16 batch normalization on the float32 kernels.

The functions here have the signatures and semantics of the compiled entry
points in ``_kernels`` (see ``_kernels.pyi``), for x, y, dy, dx, out arrays
of dtype float16, or bfloat16 when ``ml_dtypes`` is installed. Per-channel
arrays are as there: weight, bias and running statistics float32 or float64,
the statistics filled here float64.

How: the flat (outer, C, inner) buffer is walked in chunks of at most
:data:`CHUNK_VALUES` values whose boundaries depend on the shape alone
(:func:`_chunks`). Each chunk is widened, exactly, into a float32 scratch
buffer; the float32 kernel runs on it as on a small (outer', C', inner')
problem of its own; the result is rounded once back into the half-precision
output. So no temporary is ever the size of the input, and arithmetic is
float32 with float64 accumulation, as for float32 input.

Statistics need the whole channel: per-chunk triples (count, mean, M2) from
``_kernels.moments`` are merged in float64 with Chan et al.'s update in chunk
order (:class:`_ChannelMoments`), gradient sums are added in chunk order.
Neither the chunks nor the order depend on the thread count, and every
kernel call is itself bitwise reproducible, so results are identical for any
number of threads. Normalization then runs chunk by chunk with the global
statistics passed as running statistics, and the training backward chunk by
chunk with the global sums.

The cost is the conversion, not the kernels. NumPy widens float16 at 1.6 ns
a value and rounds float32 to float16 at 2.5 ns (one thread, this machine),
where the whole float32 eval normalization takes 0.2 ns a value: with NumPy's
casts float16 ran about 20 times slower than float32. Where the CPU has F16C
the conversions use it instead (``_kernels.half_to_float`` /
``float_to_half``, bitwise NumPy's rounding) and float16 costs about 1.6x
(eval) to 2x (training) the time per value of float32. ml_dtypes converts
bfloat16 at 0.1 and 0.5 ns a value, about 3 times float32's time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from . import _kernels

__all__ = [
    "CHUNK_VALUES", "backward", "grad_input", "grad_sums", "half_dtypes", "is_half",
    "moments", "normalize", "relu_mask", "train_forward",
]

#: Values per chunk: 256 Ki, a 1 MiB float32 scratch buffer. A sweep of
#: float16 normalize and train_forward on (64, 64, 56, 56) and (200704, 64),
#: one thread, CPU time, found 32 Ki to 1 Mi within 10 % of each other (the
#: conversions dominate) and 128 Ki to 1 Mi the best by a few per cent. At
#: this size the per-chunk Python (microseconds) is lost in the conversion of
#: a chunk (about a millisecond), and the scratch stays small against any
#: input that needs more than one chunk. Tests shrink it to exercise every
#: way of cutting a buffer.
CHUNK_VALUES = 1 << 18

_Half = npt.NDArray[np.generic]
_F64 = npt.NDArray[np.float64]
_Param = npt.NDArray[np.floating] | None
_F64_DTYPE = np.dtype(np.float64)


# --------------------------------------------------------------------------
# Which dtypes this module serves.

def _bfloat16() -> np.dtype | None:
    """ml_dtypes' bfloat16, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def half_dtypes() -> tuple[np.dtype, ...]:
    """The input dtypes served here: float16, and bfloat16 when ml_dtypes
    is installed (``pip install bncore[bfloat16]``)."""
    bf16 = _bfloat16()
    return (np.dtype(np.float16),) if bf16 is None else (np.dtype(np.float16), bf16)


def is_half(dtype: npt.DTypeLike) -> bool:
    """True for float16 and ml_dtypes' bfloat16. ml_dtypes is imported only
    for a dtype named bfloat16 (an array of it exists only once some library
    has registered it)."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return True
    if dtype.name != "bfloat16":
        return False
    bf16 = _bfloat16()
    return bf16 is not None and dtype == bf16


# --------------------------------------------------------------------------
# Checks. functional.py validates arguments for users; these only make a
# wrong call an exception instead of a silent write into a copy or a wrong
# slice (the kernels would see chunk-sized pieces only).

def _check_shape(outer: int, channels: int, inner: int, num_threads: int) -> None:
    if outer < 1 or channels < 1 or inner < 1:
        raise ValueError(f"(outer, channels, inner) must be positive, got "
                         f"{(outer, channels, inner)}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be at least 1, got {num_threads}")


def _flat(array: object, name: str, dtype: np.dtype | None, size: int,
          writeable: bool = False) -> np.ndarray:
    """A C-contiguous array of ``size`` values as a 1-D view (never a copy)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array")
    if dtype is None:
        if not is_half(array.dtype):
            raise TypeError(f"{name}: expected float16 or bfloat16, got {array.dtype}")
    elif array.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {array.dtype}")
    if not (array.flags.c_contiguous and array.flags.aligned):
        raise TypeError(f"{name}: expected an aligned C-contiguous array")
    if array.size != size:
        raise ValueError(f"{name}: expected {size} values, got {array.size}")
    if writeable and not array.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array")
    return array.reshape(-1)


def _vector(array: object, name: str, channels: int) -> npt.NDArray[np.floating]:
    """A per-channel float32/float64 array of C values, checked whole here
    because the kernels only ever see a slice of it."""
    if not isinstance(array, np.ndarray) or array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name}: expected a float32 or float64 NumPy array")
    return _flat(array, name, array.dtype, channels)


def _param(array: _Param, name: str, channels: int) -> _Param:
    """An optional per-channel array (weight, bias): None or a _vector."""
    return None if array is None else _vector(array, name, channels)


def _part(array: _Param, channels: slice) -> _Param:
    return None if array is None else array[channels]


# --------------------------------------------------------------------------
# Chunks: where a buffer is cut depends on its shape alone.

class _Chunk(NamedTuple):
    """Values [start, stop) of the flat buffer, which are an (outer, C',
    inner) problem of their own over the channels [c0, c1)."""
    start: int
    stop: int
    outer: int
    c0: int
    c1: int
    inner: int

    @property
    def channels(self) -> slice:
        return slice(self.c0, self.c1)

    @property
    def nchannels(self) -> int:
        return self.c1 - self.c0

    @property
    def per_channel(self) -> int:
        """Values per channel in this chunk."""
        return self.outer * self.inner


def _cuts(total: int, pieces: int) -> list[int]:
    """Boundaries of ``total`` split into ``pieces`` near-equal parts."""
    return [k * total // pieces for k in range(pieces + 1)]


def _chunks(outer: int, channels: int, inner: int) -> Iterator[_Chunk]:
    """The chunks of an (outer, C, inner) buffer, in memory order.

    * A row of C * inner values fits: whole rows, as many as fit.
    * A channel's run of inner values fits: ranges of channels of one row.
    * A run is longer than a chunk: pieces of one run.
    Parts are near-equal (:func:`_cuts`), so no chunk is a sliver.
    """
    limit = CHUNK_VALUES
    row = channels * inner
    if row <= limit:
        cuts = _cuts(outer, math.ceil(outer / (limit // row)))
        for r0, r1 in zip(cuts, cuts[1:]):
            yield _Chunk(r0 * row, r1 * row, r1 - r0, 0, channels, inner)
    elif inner <= limit:
        cuts = _cuts(channels, math.ceil(channels / (limit // inner)))
        for r in range(outer):
            for c0, c1 in zip(cuts, cuts[1:]):
                yield _Chunk(r * row + c0 * inner, r * row + c1 * inner, 1, c0, c1, inner)
    else:
        cuts = _cuts(inner, math.ceil(inner / limit))
        for r in range(outer):
            for c in range(channels):
                run = r * row + c * inner
                for p0, p1 in zip(cuts, cuts[1:]):
                    yield _Chunk(run + p0, run + p1, 1, c, c + 1, p1 - p0)


def _scratch(size: int) -> np.ndarray:
    """A float32 buffer for one chunk of a buffer of ``size`` values.
    Allocated per call, not cached, so that concurrent calls (the kernels
    release the GIL) never share one."""
    return np.empty(min(size, CHUNK_VALUES), dtype=np.float32)


def _widen(half: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """half -> float32 into the front of scratch (exact); returns that view."""
    wide = scratch[:half.size]
    if not (half.dtype == np.float16 and _kernels.half_to_float(half, wide)):
        np.copyto(wide, half, casting="safe")
    return wide


def _narrow(wide: np.ndarray, half: np.ndarray) -> None:
    """float32 -> half, rounding to nearest even (the one rounding of a
    result). Beyond the half range the value is inf, silently, as an
    overflow in the float32 kernels is."""
    if half.dtype == np.float16 and _kernels.float_to_half(wide, half):
        return
    with np.errstate(over="ignore"):
        np.copyto(half, wide, casting="same_kind")


# --------------------------------------------------------------------------
# The statistics algebra, vectorised over channels.

class _ChannelMoments:
    """Per-channel (count, mean, M2) in float64, merged chunk by chunk.

    Chan, Golub & LeVeque's pairwise update ("Algorithms for computing the
    sample variance", 1983), as in the compiled layer: with
    ``n = na + nb`` and ``d = mb - ma``, ``m = ma + d * nb / n`` and
    ``M2 = M2a + M2b + d^2 * na * nb / n``. A chunk's mean comes from the
    kernel to float64 accuracy, so d, a difference of two means, keeps its
    digits even when the mean is large against the spread.
    """

    def __init__(self, channels: int) -> None:
        self.count = np.zeros(channels)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def merge(self, channels: slice, count: int, mean: _F64, m2: _F64) -> None:
        """Merge the triples (count, mean[k], m2[k]) into ``channels``."""
        na = self.count[channels]
        n = na + count
        delta = mean - self.mean[channels]
        self.mean[channels] += delta * (count / n)
        # The first part of a channel is taken as it is (na = 0): an
        # infinite mean must not turn its M2 into inf * 0 = NaN.
        spread = np.where(na > 0, delta * delta * (na * count / n), 0.0)
        self.m2[channels] += m2 + spread
        self.count[channels] = n


def _chunked_moments(x: np.ndarray, outer: int, channels: int, inner: int,
                     num_threads: int, scratch: np.ndarray) -> _ChannelMoments:
    """Every channel's triple of the flat half-precision buffer x."""
    total = _ChannelMoments(channels)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    for chunk in _chunks(outer, channels, inner):
        k = chunk.nchannels
        wide = _widen(x[chunk.start:chunk.stop], scratch)
        _kernels.moments(wide, chunk.outer, k, chunk.inner, mean[:k], m2[:k], num_threads)
        total.merge(chunk.channels, chunk.per_channel, mean[:k], m2[:k])
    return total


def _single_chunk(outer: int, channels: int, inner: int) -> bool:
    """True when the whole buffer is one chunk: then the kernel's own fused
    entry points run on it, with one conversion each way."""
    return outer * channels * inner <= CHUNK_VALUES


# --------------------------------------------------------------------------
# The entry points, as in _kernels.

def moments(x: _Half, outer: int, channels: int, inner: int, mean: _F64, m2: _F64,
            num_threads: int) -> None:
    """Fill mean[C] and m2[C] (float64) with each channel's mean and sum of
    squared deviations. x is a C-contiguous (outer, C, inner) buffer."""
    _check_shape(outer, channels, inner, num_threads)
    size = outer * channels * inner
    flat = _flat(x, "x", None, size)
    mean_out = _flat(mean, "mean", _F64_DTYPE, channels, True)
    m2_out = _flat(m2, "m2", _F64_DTYPE, channels, True)
    total = _chunked_moments(flat, outer, channels, inner, num_threads, _scratch(size))
    mean_out[:] = total.mean
    m2_out[:] = total.m2


def normalize(x: _Half, y: _Half, outer: int, channels: int, inner: int,
              running_mean: npt.NDArray[np.floating], running_var: npt.NDArray[np.floating],
              eps: float, weight: _Param, bias: _Param, num_threads: int,
              relu: bool = False) -> None:
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias per
    channel, then max(y, 0) if relu; y may be x."""
    src, dst, weight, bias = _forward_arrays(x, y, outer, channels, inner, weight, bias,
                                             num_threads)
    _normalize_chunks(src, dst, outer, channels, inner,
                      _vector(running_mean, "running_mean", channels),
                      _vector(running_var, "running_var", channels), eps, weight, bias,
                      num_threads, relu, _scratch(src.size))


def _forward_arrays(x: _Half, y: _Half, outer: int, channels: int, inner: int,
                    weight: _Param, bias: _Param, num_threads: int,
                    ) -> tuple[np.ndarray, np.ndarray, _Param, _Param]:
    """The checked flat x and y, weight and bias of a forward call."""
    _check_shape(outer, channels, inner, num_threads)
    size = outer * channels * inner
    return (_flat(x, "x", None, size), _flat(y, "y", x.dtype, size, True),
            _param(weight, "weight", channels), _param(bias, "bias", channels))


def _normalize_chunks(src: np.ndarray, dst: np.ndarray, outer: int, channels: int,
                      inner: int, mean: npt.NDArray[np.floating],
                      var: npt.NDArray[np.floating], eps: float, weight: _Param,
                      bias: _Param, num_threads: int, relu: bool, scratch: np.ndarray) -> None:
    for chunk in _chunks(outer, channels, inner):
        c = chunk.channels
        wide = _widen(src[chunk.start:chunk.stop], scratch)
        _kernels.normalize(wide, wide, chunk.outer, chunk.nchannels, chunk.inner,
                           mean[c], var[c], eps, _part(weight, c), _part(bias, c),
                           num_threads, relu=relu)
        _narrow(wide, dst[chunk.start:chunk.stop])


def train_forward(x: _Half, y: _Half, outer: int, channels: int, inner: int,
                  weight: _Param, bias: _Param, eps: float, mean: _F64, m2: _F64,
                  invstd: _F64, num_threads: int, relu: bool = False) -> None:
    """Batch statistics into mean, m2, invstd (float64[C]) and the normalised
    batch into y (which may be x)."""
    src, dst, weight, bias = _forward_arrays(x, y, outer, channels, inner, weight, bias,
                                             num_threads)
    mean_out = _flat(mean, "mean", _F64_DTYPE, channels, True)
    m2_out = _flat(m2, "m2", _F64_DTYPE, channels, True)
    invstd_out = _flat(invstd, "invstd", _F64_DTYPE, channels, True)
    scratch = _scratch(src.size)
    if _single_chunk(outer, channels, inner):
        wide = _widen(src, scratch)
        _kernels.train_forward(wide, wide, outer, channels, inner, weight, bias, eps,
                               mean_out, m2_out, invstd_out, num_threads, relu=relu)
        _narrow(wide, dst)
        return
    total = _chunked_moments(src, outer, channels, inner, num_threads, scratch)
    # The biased variance, and invstd in the kernels' own IEEE operations
    # (1 / sqrt(m2 / count + eps)), so the normalization below, which
    # computes invstd from var, uses exactly the invstd returned.
    var = total.m2 / (outer * inner)
    mean_out[:] = total.mean
    m2_out[:] = total.m2
    invstd_out[:] = 1.0 / np.sqrt(var + eps)
    _normalize_chunks(src, dst, outer, channels, inner, total.mean, var, eps, weight, bias,
                      num_threads, relu, scratch)


# --------------------------------------------------------------------------
# Gradients: every entry reads x and dy, chunk by chunk.

class _Gradient(NamedTuple):
    """The flat buffers of a gradient call and a float32 scratch for each input."""
    x: np.ndarray
    dy: np.ndarray
    x_scratch: np.ndarray
    dy_scratch: np.ndarray


def _gradient(x: _Half, dy: _Half, outer: int, channels: int, inner: int,
              num_threads: int) -> _Gradient:
    _check_shape(outer, channels, inner, num_threads)
    size = outer * channels * inner
    return _Gradient(_flat(x, "x", None, size), _flat(dy, "dy", x.dtype, size),
                     _scratch(size), _scratch(size))


def _map_gradient(g: _Gradient, out: np.ndarray, outer: int, channels: int, inner: int,
                  kernel: Callable[[_Chunk, np.ndarray, np.ndarray], None]) -> None:
    """For each chunk: widen x and dy, let ``kernel(chunk, x, dy)`` overwrite
    the float32 dy with the chunk's result, round that into out. Each chunk
    is read whole before its part of out is written, so out may be x or dy."""
    for chunk in _chunks(outer, channels, inner):
        part = slice(chunk.start, chunk.stop)
        wide_dy = _widen(g.dy[part], g.dy_scratch)
        kernel(chunk, _widen(g.x[part], g.x_scratch), wide_dy)
        _narrow(wide_dy, out[part])


def _sum_gradient(g: _Gradient, outer: int, channels: int, inner: int, mean: _F64,
                  num_threads: int) -> tuple[_F64, _F64]:
    """Per-channel sum(dy) and sum(dy * (x - mean)): chunk sums added in
    float64 in chunk order."""
    total_dy = np.zeros(channels)
    total_dev = np.zeros(channels)
    part_dy = np.empty(channels)
    part_dev = np.empty(channels)
    for chunk in _chunks(outer, channels, inner):
        c, k = chunk.channels, chunk.nchannels
        part = slice(chunk.start, chunk.stop)
        _kernels.grad_sums(_widen(g.x[part], g.x_scratch), _widen(g.dy[part], g.dy_scratch),
                           chunk.outer, k, chunk.inner, mean[c], part_dy[:k],
                           part_dev[:k], num_threads)
        total_dy[c] += part_dy[:k]
        total_dev[c] += part_dev[:k]
    return total_dy, total_dev


def _gradient_input(g: _Gradient, dx: np.ndarray, outer: int, channels: int, inner: int,
                    mean: _F64, invstd: _F64, weight: _Param, sum_dy: _F64,
                    sum_dy_dev: _F64, count: float, num_threads: int) -> None:
    def kernel(chunk: _Chunk, wide_x: np.ndarray, wide_dy: np.ndarray) -> None:
        c = chunk.channels
        _kernels.grad_input(wide_x, wide_dy, wide_dy, chunk.outer, chunk.nchannels,
                            chunk.inner, mean[c], invstd[c], _part(weight, c), sum_dy[c],
                            sum_dy_dev[c], count, num_threads)

    _map_gradient(g, dx, outer, channels, inner, kernel)


def relu_mask(x: _Half, dy: _Half, out: _Half, outer: int, channels: int, inner: int,
              mean: _F64, invstd: _F64, weight: _Param, bias: _Param, num_threads: int) -> None:
    """out = dy where ((x - mean) * invstd * weight + bias) > 0 else 0; out
    may be dy."""
    g = _gradient(x, dy, outer, channels, inner, num_threads)
    dst = _flat(out, "out", x.dtype, g.x.size, True)
    mean = _flat(mean, "mean", _F64_DTYPE, channels)
    invstd = _flat(invstd, "invstd", _F64_DTYPE, channels)
    weight = _param(weight, "weight", channels)
    bias = _param(bias, "bias", channels)

    # The forward rounded the relu's output to half precision, so the gate is
    # open where that rounded output is > 0: above the largest float32 that
    # rounds to 0, half the smallest subnormal (ties go to the even 0):
    # 2**-24 / 2 for float16, 2**-133 / 2 for bfloat16 (float32's exponents).
    above = 2.0**-25 if x.dtype == np.float16 else 2.0**-134

    def kernel(chunk: _Chunk, wide_x: np.ndarray, wide_dy: np.ndarray) -> None:
        c = chunk.channels
        _kernels.relu_mask(wide_x, wide_dy, wide_dy, chunk.outer, chunk.nchannels,
                           chunk.inner, mean[c], invstd[c], _part(weight, c), _part(bias, c),
                           num_threads, above)

    _map_gradient(g, dst, outer, channels, inner, kernel)


def grad_sums(x: _Half, dy: _Half, outer: int, channels: int, inner: int, mean: _F64,
              sum_dy: _F64, sum_dy_dev: _F64, num_threads: int) -> None:
    """Fill float64 sum_dy[c] = sum(dy) and sum_dy_dev[c] = sum(dy * (x - mean[c]))."""
    g = _gradient(x, dy, outer, channels, inner, num_threads)
    mean = _flat(mean, "mean", _F64_DTYPE, channels)
    sum_dy_out = _flat(sum_dy, "sum_dy", _F64_DTYPE, channels, True)
    sum_dev_out = _flat(sum_dy_dev, "sum_dy_dev", _F64_DTYPE, channels, True)
    sum_dy_out[:], sum_dev_out[:] = _sum_gradient(g, outer, channels, inner, mean,
                                                  num_threads)


def grad_input(x: _Half, dy: _Half, dx: _Half, outer: int, channels: int, inner: int,
               mean: _F64, invstd: _F64, weight: _Param, sum_dy: _F64, sum_dy_dev: _F64,
               count: float, num_threads: int) -> None:
    """Training-mode dx given the (possibly global) sums over ``count``
    values per channel:
    dx = w*invstd*(dy - sum_dy/count - (x-mean)*invstd^2*sum_dy_dev/count);
    dx may be dy or x."""
    g = _gradient(x, dy, outer, channels, inner, num_threads)
    dst = _flat(dx, "dx", x.dtype, g.x.size, True)
    _gradient_input(g, dst, outer, channels, inner,
                    _flat(mean, "mean", _F64_DTYPE, channels),
                    _flat(invstd, "invstd", _F64_DTYPE, channels),
                    _param(weight, "weight", channels),
                    _flat(sum_dy, "sum_dy", _F64_DTYPE, channels),
                    _flat(sum_dy_dev, "sum_dy_dev", _F64_DTYPE, channels), count,
                    num_threads)


def backward(x: _Half, dy: _Half, dx: _Half, outer: int, channels: int, inner: int,
             mean: _F64, invstd: _F64, weight: _Param, training: bool, grad_weight: _F64,
             grad_bias: _F64, num_threads: int) -> None:
    """Input gradient into dx (which may be x or dy) and the float64 sums
    grad_weight = sum(dy * xhat), grad_bias = sum(dy) per channel."""
    g = _gradient(x, dy, outer, channels, inner, num_threads)
    dst = _flat(dx, "dx", x.dtype, g.x.size, True)
    mean = _flat(mean, "mean", _F64_DTYPE, channels)
    invstd = _flat(invstd, "invstd", _F64_DTYPE, channels)
    weight = _param(weight, "weight", channels)
    grad_weight_out = _flat(grad_weight, "grad_weight", _F64_DTYPE, channels, True)
    grad_bias_out = _flat(grad_bias, "grad_bias", _F64_DTYPE, channels, True)
    if training and not _single_chunk(outer, channels, inner):
        # Two passes: the global sums, then dx from them.
        sum_dy, sum_dy_dev = _sum_gradient(g, outer, channels, inner, mean, num_threads)
        _gradient_input(g, dst, outer, channels, inner, mean, invstd, weight, sum_dy,
                        sum_dy_dev, outer * inner, num_threads)
        grad_weight_out[:] = sum_dy_dev * invstd
        grad_bias_out[:] = sum_dy
        return
    # One pass: eval's dx = dy * weight * invstd needs no global sums, and a
    # single chunk holds them all; the kernel's sums are added chunk by chunk.
    part_weight = np.empty(channels)
    part_bias = np.empty(channels)
    grad_weight_out[:] = 0.0
    grad_bias_out[:] = 0.0

    def kernel(chunk: _Chunk, wide_x: np.ndarray, wide_dy: np.ndarray) -> None:
        c, k = chunk.channels, chunk.nchannels
        _kernels.backward(wide_x, wide_dy, wide_dy, chunk.outer, k, chunk.inner, mean[c],
                          invstd[c], _part(weight, c), training, part_weight[:k],
                          part_bias[:k], num_threads)
        grad_weight_out[c] += part_weight[:k]
        grad_bias_out[c] += part_bias[:k]

    _map_gradient(g, dst, outer, channels, inner, kernel)
