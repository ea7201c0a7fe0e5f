"""``python -m bncore``: build information, a self-check, a quick speed report.

The self-check runs every public function on small adversarial inputs and
compares it with bncore.reference (float64 NumPy); the speed report times
training and eval forwards of a (32, 64, 56, 56) float32 batch against the
same computation written with NumPy array operations. Exit status 1 if any check fails.
"""

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import numpy as np
from numpy.typing import ArrayLike, NDArray

import bncore
from bncore import reference

SPEED_SHAPE = (32, 64, 56, 56)

#: A self-check: computes and returns its largest error.
ErrorCheck = Callable[[], float]


def _self_check_cases() -> list[tuple[str, ErrorCheck, float]]:
    """(name, function returning the largest error, tolerance) triples."""
    rng = np.random.default_rng(2024)
    cases: list[tuple[str, ErrorCheck, float]] = []
    for dtype, tol in ((np.float32, 2e-5), (np.float64, 1e-11)):
        for shape, axis in (((16, 8), 1), ((4, 6, 9), 1), ((3, 5, 7, 7), 1),
                            ((2, 3, 4, 5, 6), 1), ((4, 5, 5, 6), -1)):
            x = (rng.standard_normal(shape) * 3 + 1000).astype(dtype)
            channels = shape[axis]
            weight = rng.standard_normal(channels)
            bias = rng.standard_normal(channels)
            label = f"{np.dtype(dtype).name} {shape} axis={axis}"
            cases.append((f"batch_norm train {label}",
                          _train_error(x, weight, bias, axis), tol))
            cases.append((f"batch_norm eval  {label}",
                          _eval_error(x, weight, bias, axis, rng), tol))
            cases.append((f"moments          {label}", _moments_error(x, axis), tol))
            cases.append((f"backward         {label}",
                          _backward_error(x, weight, axis, rng), tol))
            cases.append((f"BatchNorm        {label}", _module_error(x, axis), tol))
    x = (rng.standard_normal((6, 4, 9)) * 3 + 100).astype(np.float32)
    cases.append(("relu forward and backward float32 (6, 4, 9)", _relu_error(x, rng), 2e-5))
    cases.append(("Keras conventions float64 (6, 4, 9)",
                  _conventions_error(x.astype(np.float64)), 1e-11))
    cases.append(("partial and merged moments float64 (6, 4, 9)",
                  _merged_moments_error(x.astype(np.float64)), 1e-11))
    # float16 outputs carry one rounding to 11 bits: 2**-11 relative.
    cases.append(("batch_norm train float16 (16, 8)",
                  _half_error(rng.standard_normal((16, 8)).astype(np.float16)), 2**-10))
    return cases


def _relu_error(x: NDArray[np.floating], rng: np.random.Generator) -> ErrorCheck:
    def run() -> float:
        channels = x.shape[1]
        weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
        dy = rng.standard_normal(x.shape).astype(x.dtype)
        y, mean, invstd = bncore.batch_norm(x, None, None, weight, bias, training=True,
                                            activation="relu", return_stats=True)
        got = bncore.batch_norm_backward(dy, x, mean, invstd, weight, bias,
                                         activation="relu")
        expected = reference.batch_norm(x, None, None, weight, bias, training=True,
                                        activation="relu")
        want = reference.batch_norm_backward(dy, x, expected.mean, expected.invstd, weight,
                                             bias, activation="relu")
        return max([_max_abs(y, expected.y)] + [_max_abs(g, w) for g, w in zip(got, want)])
    return run


def _conventions_error(x: NDArray[np.floating]) -> ErrorCheck:
    def run() -> float:
        layer = bncore.BatchNorm(x.shape[1], dtype=x.dtype, decay=0.99,
                                 unbiased_running_var=False)
        layer(x)
        expected = reference.batch_norm(x, np.zeros(x.shape[1]), np.ones(x.shape[1]),
                                        training=True, decay=0.99,
                                        unbiased_running_var=False)
        assert layer.running_mean is not None and layer.running_var is not None
        assert expected.running_mean is not None and expected.running_var is not None
        return max(_max_abs(layer.running_mean, expected.running_mean),
                   _max_abs(layer.running_var, expected.running_var))
    return run


def _merged_moments_error(x: NDArray[np.floating]) -> ErrorCheck:
    def run() -> float:
        merged = bncore.merge_moments(*(bncore.partial_moments(part)
                                        for part in np.array_split(x, 3)))
        ref_mean, ref_var = reference.moments(x)
        return max(_max_abs(merged.mean, ref_mean) / 100,
                   _max_abs(merged.var() / ref_var, 1.0))
    return run


def _half_error(x: NDArray[np.floating]) -> ErrorCheck:
    def run() -> float:
        y = bncore.batch_norm(x, None, None, training=True)
        return _max_abs(y, reference.batch_norm(x.astype(np.float64), training=True).y)
    return run


def _train_error(x: NDArray[np.floating], weight: NDArray[np.float64],
                 bias: NDArray[np.float64], axis: int) -> ErrorCheck:
    def run() -> float:
        channels = x.shape[axis]
        running = (np.zeros(channels, x.dtype), np.ones(channels, x.dtype))
        y = bncore.batch_norm(x, *running, weight, bias, training=True, axis=axis)
        expected = reference.batch_norm(x, np.zeros(channels), np.ones(channels), weight,
                                        bias, training=True, axis=axis)
        assert expected.running_mean is not None and expected.running_var is not None
        return max(_max_abs(y, expected.y),
                   _max_abs(running[0], expected.running_mean),
                   _max_abs(running[1], expected.running_var))
    return run


def _eval_error(x: NDArray[np.floating], weight: NDArray[np.float64],
                bias: NDArray[np.float64], axis: int, rng: np.random.Generator) -> ErrorCheck:
    def run() -> float:
        channels: int = x.shape[axis]
        mean = (rng.standard_normal(channels) + 1000).astype(x.dtype)
        var = rng.uniform(0.5, 9, channels).astype(x.dtype)
        y = bncore.batch_norm(x, mean, var, weight, bias, training=False, axis=axis)
        expected = reference.batch_norm(x, mean, var, weight, bias, training=False, axis=axis)
        return _max_abs(y, expected.y)
    return run


def _backward_error(x: NDArray[np.floating], weight: NDArray[np.float64], axis: int,
                    rng: np.random.Generator) -> ErrorCheck:
    def run() -> float:
        dy = rng.standard_normal(x.shape).astype(x.dtype)
        _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
        errors = []
        for training in (True, False):
            got = bncore.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                             axis=axis)
            want = reference.batch_norm_backward(dy, x, mean, invstd, weight,
                                                 training=training, axis=axis)
            errors += [_max_abs(g, w) for g, w in zip(got, want)]
        layer = bncore.BatchNorm(x.shape[axis], axis=axis, dtype=x.dtype)
        layer(x)
        errors.append(_max_abs(layer.backward(dy), reference.batch_norm_backward(
            dy, x, mean, invstd, layer.weight, axis=axis)[0]))
        return max(errors)
    return run


def _moments_error(x: NDArray[np.floating], axis: int) -> ErrorCheck:
    def run() -> float:
        mean, var = bncore.moments(x, axis=axis)
        ref_mean, ref_var = reference.moments(x, axis=axis)
        return max(_max_abs(mean, ref_mean) / 1000, _max_abs(var / ref_var, 1.0))
    return run


def _module_error(x: NDArray[np.floating], axis: int) -> ErrorCheck:
    def run() -> float:
        layer = bncore.BatchNorm(x.shape[axis], axis=axis, dtype=x.dtype)
        errors = []
        for training in (True, False):
            layer.train(training)
            y = layer(x)
            expected = reference.batch_norm(
                x, layer.running_mean, layer.running_var, training=False, axis=axis
            ) if not training else reference.batch_norm(x, training=True, axis=axis)
            errors.append(_max_abs(y, expected.y))
        return max(errors)
    return run


def _max_abs(a: ArrayLike, b: ArrayLike) -> float:
    """Largest error, absolute below 1 and relative above: float32 outputs
    of a few hundred carry their rounding error in proportion."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


def self_check(out: TextIO) -> bool:
    print("\nself-check against bncore.reference (float64 NumPy):", file=out)
    failures = 0
    for name, run, tolerance in _self_check_cases():
        error = run()
        ok = error <= tolerance
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:52s} max error {error:.1e} "
              f"(tolerance {tolerance:.0e})", file=out)
    print(f"  {'all passed' if not failures else f'{failures} FAILED'}", file=out)
    return failures == 0


def _median_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def numpy_batch_norm(x: NDArray[np.floating], running_mean: NDArray[np.floating],
                     running_var: NDArray[np.floating], training: bool,
                     eps: float = 1e-5) -> NDArray[np.floating]:
    """Batch norm as NumPy users write it: whole-array operations, in the
    input's dtype, with temporaries (the peer bncore replaces)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
    else:
        mean, var = running_mean, running_var
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


def speed_report(out: TextIO, repeats: int = 11) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SPEED_SHAPE, dtype=np.float32)
    y = np.empty_like(x)
    channels = SPEED_SHAPE[1]
    running_mean = np.zeros(channels, np.float32)
    running_var = np.ones(channels, np.float32)
    moved = 2 * x.nbytes  # one read and one write: the memory-bound minimum
    workloads = [
        ("training forward",
         lambda: bncore.batch_norm(x, running_mean, running_var, training=True, out=y),
         lambda: numpy_batch_norm(x, running_mean, running_var, training=True)),
        ("eval forward",
         lambda: bncore.batch_norm(x, running_mean, running_var, training=False, out=y),
         lambda: numpy_batch_norm(x, running_mean, running_var, training=False)),
    ]
    print(f"\nspeed: float32 {SPEED_SHAPE} ({x.nbytes / 1e6:.0f} MB), "
          f"{bncore.get_num_threads()} threads, median of {repeats}", file=out)
    print(f"  {'workload':18s} {'bncore':>10s} {'GB/s':>6s} {'NumPy':>10s} {'speed-up':>9s}",
          file=out)
    for name, fast, slow in workloads:
        fast_time = _median_time(fast, repeats)
        slow_time = _median_time(slow, max(3, repeats // 3))
        print(f"  {name:18s} {fast_time * 1e3:8.2f}ms {moved / fast_time / 1e9:6.1f} "
              f"{slow_time * 1e3:8.1f}ms {slow_time / fast_time:8.1f}x", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bncore", description=__doc__.splitlines()[0])
    parser.add_argument("--no-speed", action="store_true", help="skip the speed report")
    args = parser.parse_args(argv)
    out = sys.stdout
    bncore.show_config(out)
    passed = self_check(out)
    if not args.no_speed:
        speed_report(out)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
