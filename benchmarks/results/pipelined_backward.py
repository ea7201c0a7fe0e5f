"""The pipelined float32 training backward against the two-pass one, side by side.

Interleaved repetitions of the streaming copy (the yardstick), the two-pass
path and the pipelined path (forced with the private hook
``bncore._kernels.set_pipelined_backward``) on the same arrays and threads;
prints median times and fractions of the two-read-one-write bound, 1.5 x the
copy's time over the path's (the median's and, as a check against a noisy
machine, the best sample's). Every run first checks that both paths give
the same bits.

    python benchmarks/results/pipelined_backward.py --threads 1 2 --reps 21
"""

import argparse
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


def offset_array(size: int, offset: int) -> np.ndarray:
    """float32 data `offset` values past a 64-byte boundary."""
    buf = np.empty(size + 32, np.float32)
    start = (-buf.ctypes.data % 64) // 4 + offset
    return buf[start:start + size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="outer,C,inner")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--offset", type=int, default=4,
                        help="values past a cache line (NumPy's large arrays: 4)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each round, wait up to SECONDS for idle CPUs")
    args = parser.parse_args()
    print("| shape (N, C, H*W) | x size | threads | copy | two-pass | of bound (best) "
          "| pipelined | of bound (best) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        outer, channels, inner = map(int, shape.split(","))
        size = outer * channels * inner
        rng = np.random.default_rng(0)
        x = offset_array(size, args.offset)
        x[:] = rng.standard_normal(size, dtype=np.float32) * 2 + 3
        dy = offset_array(size, args.offset)
        dy[:] = rng.standard_normal(size, dtype=np.float32)
        dx = offset_array(size, args.offset)
        wide = x.reshape(outer, channels, inner)
        mean = wide.mean(axis=(0, 2), dtype=np.float64)
        invstd = 1 / np.sqrt(wide.var(axis=(0, 2), dtype=np.float64) + 1e-5)
        weight = np.linspace(0.5, 2, channels, dtype=np.float32)
        for threads in args.threads:
            sums = [np.zeros(channels) for _ in range(2)]

            def backward(mode: int) -> None:
                _kernels.set_pipelined_backward(mode)
                _kernels.backward(x, dy, dx, outer, channels, inner, mean, invstd, weight,
                                  True, *sums, threads)

            def results(mode: int) -> list[np.ndarray]:
                backward(mode)
                return [dx.copy(), *(s.copy() for s in sums)]

            previous = _kernels.set_pipelined_backward(-1)
            try:
                same = all(a.tobytes() == b.tobytes() for a, b in zip(results(0), results(1)))
                assert same, "the two paths differ"
                runs = {"copy": lambda: _kernels.copy(x, dx, True, threads),
                        "two-pass": lambda: backward(0),
                        "pipelined": lambda: backward(1)}
                times: dict[str, list[float]] = {name: [] for name in runs}
                names = list(runs)
                for rep in range(args.reps):
                    if args.wait_idle:
                        wait_idle(args.wait_idle)
                    # The first calls after a pause wake the team and the
                    # clock (6 ms for a 6 MB copy): untimed. Each round
                    # starts with a different path.
                    for _ in range(2):
                        runs["copy"]()
                    for name in names[rep % 3:] + names[:rep % 3]:
                        start = time.perf_counter()
                        runs[name]()
                        times[name].append(time.perf_counter() - start)
            finally:
                _kernels.set_pipelined_backward(*previous)
            median = {name: float(np.median(t)) for name, t in times.items()}
            best = {name: min(t) for name, t in times.items()}
            line = (f"| {shape} | {x.nbytes / 1e6:.0f} MB | {threads} | "
                    f"{median['copy'] * 1e3:.2f} ms |")
            for name in ("two-pass", "pipelined"):
                line += (f" {median[name] * 1e3:.2f} ms |"
                         f" {1.5 * median['copy'] / median[name]:.3f}"
                         f" ({1.5 * best['copy'] / best[name]:.3f}) |")
            line += f" {median['two-pass'] / median['pipelined']:.2f}x |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
