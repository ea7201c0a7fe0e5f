"""The pipelined training forward against the two-pass one, side by side.

Interleaved repetitions of the streaming copy (the yardstick), the two-pass
path and the pipelined path (forced with the private hook
``bncore._kernels.set_pipelined``) on the same arrays and threads; prints
median times and fractions of the copy's bandwidth (the median's and, as a
check against a noisy machine, the best sample's). Every run first checks
that both paths give the same bits.

    python benchmarks/results/pipelined_forward.py --threads 1 2 --reps 21 [--dtype float64]
"""

import argparse
from collections.abc import Callable
import time

import numpy as np

from bncore import _kernels

SHAPES = ["128,128,3136", "64,256,784"]     # (N, C, H*W): the two tensors


def busy_fraction(seconds: float = 0.2) -> float:
    """The fraction of the CPUs' time other processes used over `seconds`."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = list(map(int, stat.readline().split()[1:]))
        return sum(values), values[3] + values[4]

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(limit: float) -> None:
    start = time.time()
    while time.time() - start < limit and busy_fraction() > 0.1:
        pass


def offset_array(size: int, offset: int,
                 dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """Data of `dtype` (float32 or float64) `offset` values past a 64-byte
    boundary."""
    buf = np.empty(size + 32, dtype)
    start = (-buf.ctypes.data % 64) // buf.itemsize + offset
    return buf[start:start + size]


def arguments(description: str) -> argparse.Namespace:
    """The command line both pipelined_*.py scripts take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="outer,C,inner")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--offset", type=int, default=4,
                        help="values past a cache line (NumPy's large arrays: 4)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each round, wait up to SECONDS for idle CPUs")
    parser.add_argument("--dtype", type=np.dtype, default=np.dtype(np.float32),
                        choices=[np.dtype(np.float32), np.dtype(np.float64)])
    return parser.parse_args()


def compare_paths(run: Callable[[int], None], outputs: list[np.ndarray],
                  copy: Callable[[], None], reps: int,
                  wait_idle_limit: float) -> tuple[dict[str, float], dict[str, float]]:
    """run(0) is the two-pass path, run(1) the pipelined one, both writing
    outputs: check they give the same bits, then time them and the copy in
    interleaved rounds. Each round starts with a different one, after two
    untimed copies (the first calls after a pause wake the team and the
    clock: 6 ms for a 6 MB copy). Returns the median and best seconds."""
    def results(mode: int) -> list[np.ndarray]:
        run(mode)
        return [a.copy() for a in outputs]

    same = all(a.tobytes() == b.tobytes() for a, b in zip(results(0), results(1)))
    assert same, "the two paths differ"
    runs = {"copy": copy, "two-pass": lambda: run(0), "pipelined": lambda: run(1)}
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        if wait_idle_limit:
            wait_idle(wait_idle_limit)
        for _ in range(2):
            copy()
        for name in names[rep % 3:] + names[:rep % 3]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return ({name: float(np.median(t)) for name, t in times.items()},
            {name: min(t) for name, t in times.items()})


def table_row(shape: str, nbytes: int, threads: int, median: dict[str, float],
              best: dict[str, float], bound: float = 1.0) -> str:
    """A Markdown row: times, and the fraction of `bound` times the copy's
    time each path reaches (median, and best in brackets)."""
    line = f"| {shape} | {nbytes / 1e6:.0f} MB | {threads} | {median['copy'] * 1e3:.2f} ms |"
    for name in ("two-pass", "pipelined"):
        line += (f" {median[name] * 1e3:.2f} ms | {bound * median['copy'] / median[name]:.3f}"
                 f" ({bound * best['copy'] / best[name]:.3f}) |")
    return line + f" {median['two-pass'] / median['pipelined']:.2f}x |"


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    for shape in args.shapes:
        outer, channels, inner = map(int, shape.split(","))
        size = outer * channels * inner
        x = offset_array(size, args.offset, args.dtype)
        x[:] = np.random.default_rng(0).standard_normal(size, dtype=args.dtype) * 2 + 3
        y = offset_array(size, args.offset, args.dtype)
        weight = np.linspace(0.5, 2, channels, dtype=args.dtype)
        bias = np.linspace(-1, 1, channels, dtype=args.dtype)
        for threads in args.threads:
            stats = [np.zeros(channels) for _ in range(3)]

            def forward(mode: int) -> None:
                _kernels.set_pipelined(mode)
                _kernels.train_forward(x, y, outer, channels, inner, weight, bias, 1e-5,
                                       *stats, threads)

            previous = _kernels.set_pipelined(-1)
            try:
                median, best = compare_paths(forward, [y, *stats],
                                             lambda: _kernels.copy(x, y, True, threads),
                                             args.reps, args.wait_idle)
            finally:
                _kernels.set_pipelined(*previous)
            print(table_row(shape, x.nbytes, threads, median, best), flush=True)


if __name__ == "__main__":
    main()
