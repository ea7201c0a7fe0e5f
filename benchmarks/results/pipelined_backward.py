"""The channel-tiled training backward against the two-pass one, side by side.

Interleaved repetitions of the streaming copy (the yardstick), the two-pass
path and the tiled path (forced with the private hook
``bncore._kernels.set_tiled_backward``; the tiled walk replaced the pipelined
one that pipelined_backward.md measured) on the same arrays and threads;
prints median times and fractions of the two-read-one-write bound, 1.5 x the
copy's time over the path's (the median's and, as a check against a noisy
machine, the best sample's). Every run first checks that both paths give
the same bits.

    python benchmarks/results/pipelined_backward.py --threads 1 2 --reps 21 [--dtype float64]
"""


import numpy as np

from bncore import _kernels
# The forward's twin of this script holds what both share.
from pipelined_forward import arguments, compare_paths, offset_array, table_row

def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    print("| shape (N, C, H*W) | x size | threads | copy | two-pass | of bound (best) "
          "| tiled | of bound (best) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        outer, channels, inner = map(int, shape.split(","))
        size = outer * channels * inner
        rng = np.random.default_rng(0)
        x = offset_array(size, args.offset, args.dtype)
        x[:] = rng.standard_normal(size, dtype=args.dtype) * 2 + 3
        dy = offset_array(size, args.offset, args.dtype)
        dy[:] = rng.standard_normal(size, dtype=args.dtype)
        dx = offset_array(size, args.offset, args.dtype)
        wide = x.reshape(outer, channels, inner)
        mean = wide.mean(axis=(0, 2), dtype=np.float64)
        invstd = 1 / np.sqrt(wide.var(axis=(0, 2), dtype=np.float64) + 1e-5)
        weight = np.linspace(0.5, 2, channels, dtype=args.dtype)
        for threads in args.threads:
            sums = [np.zeros(channels) for _ in range(2)]

            def backward(mode: int) -> None:
                _kernels.set_tiled_backward(mode)
                _kernels.backward(x, dy, dx, outer, channels, inner, mean, invstd, weight,
                                  True, *sums, threads)

            previous = _kernels.set_tiled_backward(-1)
            try:
                median, best = compare_paths(backward, [dx, *sums],
                                             lambda: _kernels.copy(x, dx, True, threads),
                                             args.reps, args.wait_idle)
            finally:
                _kernels.set_tiled_backward(*previous)
            print(table_row(shape, x.nbytes, threads, median, best, bound=1.5), flush=True)


if __name__ == "__main__":
    main()
