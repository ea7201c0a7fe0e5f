"""bncore's speed against where its output lies relative to its input.

    python benchmarks/page_offsets.py [--threads 1 2] [--quick]

A streaming kernel that loads a line of input and then stores a line of
output can slow down when the output starts a little past the input modulo
4 KiB (the page size): the core sees each load's low 12 address bits match
a store it has just issued and makes the load wait for it. NumPy often
places two arrays allocated one after the other 16-64 bytes apart in that
sense, so a benchmark that allocates its arrays once measures whichever
placement it happened to get. This one places them on purpose: the input
at the start of a page, the output `offset` bytes past a page start, for
offsets around 0 and far from it, and times eval, training and backward
(`out=` preallocated) at each, interleaved with a streaming copy of the same
tensor on the same threads (its median over all offsets is the yardstick).

Prints, per shape, operation and thread count, the time at each offset in
streaming-copy times and the worst offset's time over the median's. The
backward's dy lies at a fixed offset of its own (2560 bytes).
"""

import argparse
import json
import sys
import time

import numpy as np

import bncore
from bncore._kernels import copy as stream_copy

PAGE = 4096
# Around 0, where the slow placements were measured (16-176 bytes past the
# input), then far from it.
OFFSETS = tuple(range(-64, 257, 16)) + (1024, 2048)
QUICK_OFFSETS = (-16, 0, 16, 48, 80, 2048)
DY_OFFSET = 2560
# (shape, axis): NCHW maps of 28x28 (a pipelined forward), 256x256 with 8
# channels (two-pass, runs in halves), 7x7 and 35x35 (runs sharing lines),
# and channels-last.
SHAPES = (((64, 256, 28, 28), 1), ((8, 8, 256, 256), 1), ((512, 512, 7, 7), 1),
          ((32, 192, 35, 35), 1), ((32, 56, 56, 128), -1))
QUICK_SHAPES = (((16, 32, 28, 28), 1), ((4, 16, 7, 7), 1))
OPERATIONS = ("eval", "train", "backward")


def at_page_offset(shape, dtype, offset):
    """An uninitialised array whose data starts `offset` bytes (mod PAGE)
    past a page boundary: a view into a slightly larger buffer."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = np.empty(nbytes + 2 * PAGE, np.uint8)
    start = (-buffer.ctypes.data) % PAGE + offset % PAGE
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def make_calls(shape, axis, dtype, threads, seed=0):
    """The timed calls, each taking the output array: bncore's eval,
    training and backward, and the streaming copy."""
    rng = np.random.default_rng(seed)
    x = at_page_offset(shape, dtype, 0)
    x[...] = rng.standard_normal(shape) + 2
    dy = at_page_offset(shape, dtype, DY_OFFSET)
    dy[...] = rng.standard_normal(shape)
    channels = shape[axis]
    reduce_axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    weight, bias = (rng.random(channels).astype(dtype) + 0.5 for _ in range(2))
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.random(channels).astype(dtype) + 0.5
    mean = x.mean(axis=reduce_axes, dtype=np.float64).astype(dtype)
    invstd = (1 / np.sqrt(x.var(axis=reduce_axes, dtype=np.float64) + 1e-5)).astype(dtype)
    train_mean, train_var = running_mean.copy(), running_var.copy()
    return {
        "copy": lambda out: stream_copy(x.reshape(-1), out.reshape(-1), True, threads),
        "eval": lambda out: bncore.batch_norm(
            x, running_mean, running_var, weight, bias, training=False, axis=axis, out=out,
            num_threads=threads),
        "train": lambda out: bncore.batch_norm(
            x, train_mean, train_var, weight, bias, training=True, axis=axis, out=out,
            num_threads=threads),
        "backward": lambda out: bncore.batch_norm_backward(
            dy, x, mean, invstd, weight, training=True, axis=axis, out=out,
            num_threads=threads),
    }


def measure(shape, axis, dtype, threads, offsets, operations, repeats):
    """Median seconds per (operation, offset), interleaved: each repetition
    runs every operation at every offset once."""
    calls = make_calls(shape, axis, dtype, threads)
    outputs = {offset: at_page_offset(shape, dtype, offset) for offset in offsets}
    names = ("copy",) + tuple(operations)
    samples = {(name, offset): [] for name in names for offset in offsets}
    for name in names:   # warm up: first-touch page faults, thread pools
        for offset in offsets:
            calls[name](outputs[offset])
    for _ in range(repeats):
        for offset in offsets:
            for name in names:
                start = time.perf_counter()
                calls[name](outputs[offset])
                samples[name, offset].append(time.perf_counter() - start)
    return {key: float(np.median(values)) for key, values in samples.items()}


def summarise(medians, offsets, operations):
    """Per operation: copy-times at each offset (against the copy's median
    over all offsets), and the worst offset's time over the median's."""
    copy = float(np.median([medians["copy", offset] for offset in offsets]))
    rows = {}
    for name in ("copy",) + tuple(operations):
        times = {offset: medians[name, offset] / copy for offset in offsets}
        worst = max(times, key=times.get)
        rows[name] = {"copy_times": times, "worst_offset": worst,
                      "worst_over_median": times[worst] / float(np.median(list(times.values())))}
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/page_offsets.py",
        description="bncore's time against the output's offset from the input modulo 4 KiB.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--operations", nargs="+", choices=OPERATIONS, default=list(OPERATIONS))
    parser.add_argument("--repeats", type=int, help="samples per cell (default 9; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few offsets")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be positive")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be positive")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    offsets = QUICK_OFFSETS if args.quick else OFFSETS
    repeats = args.repeats or (3 if args.quick else 9)
    dtype = np.dtype(args.dtype)
    results = []
    print(f"bncore {bncore.__version__}, {dtype}: time at each output offset (bytes past the "
          f"input, mod {PAGE}) in streaming-copy times; medians of {repeats}")
    for shape, axis in shapes:
        for threads in args.threads:
            medians = measure(shape, axis, dtype, threads, offsets, args.operations, repeats)
            rows = summarise(medians, offsets, args.operations)
            print(f"\n{shape} axis={axis}, {threads} thread(s)")
            print("offset    " + " ".join(f"{offset:>5d}" for offset in offsets)
                  + "   worst/median")
            for name, row in rows.items():
                print(f"{name:<9} " + " ".join(f"{row['copy_times'][o]:5.2f}" for o in offsets)
                      + f"   {row['worst_over_median']:.2f} at {row['worst_offset']}")
            results.append({"shape": list(shape), "axis": axis, "threads": threads,
                            "dtype": str(dtype), "repeats": repeats,
                            "operations": {name: {"copy_times": {str(o): t for o, t in
                                                                 row["copy_times"].items()},
                                                  "worst_offset": row["worst_offset"],
                                                  "worst_over_median": row["worst_over_median"]}
                                           for name, row in rows.items()}})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
