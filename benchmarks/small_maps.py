"""Small feature maps in cache: bncore's public calls against PyTorch's.

    python benchmarks/small_maps.py [--threads 1 2] [--repeats 21] [--dtype float64]
                                    [NxCxHxW ...]

The workloads of benchmarks/compare.py are mostly tensors far larger than
the cache, where memory bandwidth sets the pace. Networks also run many
layers whose whole input fits in L2 or L3: late layers with 7x7 or 4x4
maps, small batches. There the cost is per call, per channel and per run,
not per byte. This times, per shape and thread count, bncore's training
forward, eval forward and backward through the public functions (with
``out=`` preallocated, so that page faults do not count) against PyTorch's
``aten.native_batch_norm.out`` and ``aten.native_batch_norm_backward``
(the kernels autograd runs), interleaved, and prints the medians and
PyTorch's time over bncore's (>1: bncore faster). Needs torch.
"""

import argparse
import time

import numpy as np

import bncore

SHAPES = ((2, 128, 4, 4), (8, 256, 4, 4), (64, 128, 4, 4), (32, 64, 5, 5), (8, 64, 7, 7),
          (32, 256, 7, 7), (128, 64, 6, 6), (32, 64, 14, 14), (8, 32, 14, 14))
OPERATIONS = ("train", "eval", "backward")


def bncore_calls(x, dy, threads):
    channels = x.shape[1]
    weight = np.ones(channels, x.dtype)
    bias = np.zeros(channels, x.dtype)
    running_mean, running_var = np.zeros(channels, x.dtype), np.ones(channels, x.dtype)
    out = np.empty_like(x)
    _, mean, invstd = bncore.batch_norm(x, weight=weight, bias=bias, training=True,
                                        return_stats=True)
    return {
        "train": lambda: bncore.batch_norm(x, running_mean, running_var, weight, bias,
                                           training=True, out=out, num_threads=threads),
        "eval": lambda: bncore.batch_norm(x, running_mean, running_var, weight, bias,
                                          out=out, num_threads=threads),
        "backward": lambda: bncore.batch_norm_backward(dy, x, mean, invstd, weight, bias,
                                                       out=out, num_threads=threads),
    }


def torch_calls(x, dy):
    import torch

    aten = torch.ops.aten
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    channels = x.shape[1]
    weight, bias = torch.ones(channels, dtype=tx.dtype), torch.zeros(channels, dtype=tx.dtype)
    running_mean, running_var = torch.zeros_like(weight), torch.ones_like(weight)
    out = torch.empty_like(tx)
    save_mean, save_invstd = torch.empty_like(weight), torch.empty_like(weight)
    _, mean, invstd = aten.native_batch_norm(tx, weight, bias, None, None, True, 0.1, 1e-5)
    return {
        "train": lambda: aten.native_batch_norm.out(
            tx, weight, bias, running_mean, running_var, True, 0.1, 1e-5,
            out=out, save_mean=save_mean, save_invstd=save_invstd),
        "eval": lambda: aten.native_batch_norm.out(
            tx, weight, bias, running_mean, running_var, False, 0.1, 1e-5,
            out=out, save_mean=save_mean, save_invstd=save_invstd),
        "backward": lambda: aten.native_batch_norm_backward(
            tdy, tx, weight, None, None, mean, invstd, True, 1e-5, [True, True, True]),
    }


def seconds_per_call(call, calls):
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def measure(shape, dtype, threads, repeats):
    """{operation: (bncore median, torch median)} in seconds, interleaved."""
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ours, theirs = bncore_calls(x, dy, threads), torch_calls(x, dy)
    # About 2 ms a sample: many calls for the smallest shapes.
    calls = max(1, int(2e5 / x.size))
    results = {}
    for operation in OPERATIONS:
        samples = {"bncore": [], "torch": []}
        for repeat in range(repeats):
            order = ("bncore", "torch") if repeat % 2 else ("torch", "bncore")
            for name in order:
                call = (ours if name == "bncore" else theirs)[operation]
                call()
                samples[name].append(seconds_per_call(call, calls))
        results[operation] = (float(np.median(samples["bncore"])),
                              float(np.median(samples["torch"])))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", help="NxCxHxW shapes (default: a set of them)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] or SHAPES
    print(f"bncore {bncore.__version__}, {args.dtype}, medians of {args.repeats}; "
          "us per call, and PyTorch's time over bncore's\n")
    print("| shape | threads | " + " | ".join(f"{op} bncore | {op} torch | {op} vs torch"
                                            for op in OPERATIONS) + " |")
    print("|---|---:|" + "---:|---:|---:|" * len(OPERATIONS))
    for shape in shapes:
        for threads in args.threads:
            results = measure(shape, np.dtype(args.dtype), threads, args.repeats)
            cells = []
            for operation in OPERATIONS:
                ours, theirs = results[operation]
                cells += [f"{ours * 1e6:.1f}", f"{theirs * 1e6:.1f}", f"{theirs / ours:.2f}x"]
            print(f"| {'x'.join(map(str, shape))} | {threads} | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
