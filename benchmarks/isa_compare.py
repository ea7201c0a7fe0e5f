"""The AVX2 paths against the AVX-512 ones on one machine:
``python benchmarks/isa_compare.py [--threads N] [--reps R] [WORKLOAD ...]``.

Builds a second copy of bncore with ``BNCORE_NO_AVX512=1`` (the library as a
CPU without AVX-512 runs it) under the package name ``bncore_avx2`` in a
temporary folder, imports both into one process, and times each workload
with both builds and a streaming copy, interleaved (order reversed every
other round), reporting medians in streaming-copy times and whether the two
builds gave the same bits. Needs a machine with AVX-512 (else both builds
take the same loops) and the build tools (setuptools, Cython, a C compiler).

A workload is ``kind:shape[:axis[:dtype]]``, kind one of train, eval,
backward; e.g. ``train:400000x128`` or ``eval:32x56x56x128:-1``.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import bncore
from bncore import _kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["train:64x256x28x28", "eval:64x256x28x28", "backward:64x256x28x28",
           "train:32x56x56x128:-1", "eval:32x56x56x128:-1", "backward:32x56x56x128:-1",
           "train:400000x128", "eval:400000x128", "backward:400000x128",
           "eval:12207x4096", "train:512x512x7x7"]


def build_avx2_copy(folder):
    """bncore built with BNCORE_NO_AVX512=1 as package bncore_avx2 in folder."""
    shutil.copytree(os.path.join(REPO, "bncore"), os.path.join(folder, "bncore_avx2"),
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    with open(os.path.join(REPO, "setup.py")) as f:
        setup = f.read()
    setup = setup.replace('"bncore._kernels"', '"bncore_avx2._kernels"')
    setup = setup.replace('"bncore/', '"bncore_avx2/')
    with open(os.path.join(folder, "setup.py"), "w") as f:
        f.write(setup)
    env = dict(os.environ, BNCORE_NO_AVX512="1")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=folder,
                   env=env, check=True, capture_output=True)
    sys.path.insert(0, folder)
    import bncore_avx2
    return bncore_avx2


def parse(spec):
    parts = spec.split(":")
    shape = tuple(int(s) for s in parts[1].split("x"))
    axis = int(parts[2]) if len(parts) > 2 else 1
    dtype = np.dtype(parts[3]) if len(parts) > 3 else np.dtype(np.float32)
    return parts[0], shape, axis, dtype


def compare(spec, libs, threads, reps):
    kind, shape, axis, dtype = parse(spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    running_mean, running_var = np.zeros(c, dtype), np.ones(c, dtype)
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    outs = {name: np.empty_like(x) for name in libs}

    def call(lib, out):
        if kind == "eval":
            lib.batch_norm(x, running_mean, running_var, axis=axis, out=out)
        elif kind == "train":
            lib.batch_norm(x, training=True, axis=axis, out=out)
        else:
            lib.batch_norm_backward(dy, x, mean, invstd, axis=axis, out=out)

    calls = {"copy": lambda: _kernels.copy(x, outs["AVX-512"], True, threads)}
    for name, lib in libs.items():
        calls[name] = (lambda lib=lib, out=outs[name]: call(lib, out))
        calls[name]()
    same = outs["AVX-512"].tobytes() == outs["AVX2"].tobytes()
    times = {name: [] for name in calls}
    order = list(calls.items())
    for r in range(reps):
        for name, f in (order if r % 2 else order[::-1]):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {name: float(np.median(v)) for name, v in times.items()}
    a, b = med["AVX-512"] / med["copy"], med["AVX2"] / med["copy"]
    return f"| {spec} | {a:.2f} | {b:.2f} | {b / a:.2f} | {'yes' if same else 'NO'} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=DEFAULT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    if _kernels.VECTOR_ISA != "AVX-512":
        sys.exit(f"this build chooses {_kernels.VECTOR_ISA} loops here: nothing to compare")
    with tempfile.TemporaryDirectory() as folder:
        avx2 = build_avx2_copy(folder)
        libs = {"AVX-512": bncore, "AVX2": avx2}
        for lib in libs.values():
            lib.set_num_threads(args.threads)
        print(f"{args.threads} thread(s), medians of {args.reps}, in streaming-copy times")
        print("| workload | AVX-512 | AVX2 | AVX2 / AVX-512 | same bits |")
        print("|---|---:|---:|---:|---|")
        for spec in args.workloads:
            print(compare(spec, libs, args.threads, args.reps), flush=True)


if __name__ == "__main__":
    main()
