"""How far bncore's pipelined float32 training forward is from its memory
walk alone, on one thread: bncore (pipelined, and forced to two passes),
the stripped-down model of benchmarks/pipelined_model.c and a streaming
copy, timed in shuffled order, medians, as fractions of the copy's time.

    python benchmarks/pipelined_model.py [--repeats 21] [--threads 1] [SHAPE ...]

SHAPE is NxCxHxW (default 64x256x28x28 128x128x56x56); H * W must be a
multiple of 16. Needs a C compiler (cc) and an AVX-512 machine.
"""
import argparse
import ctypes
import pathlib
import subprocess
import tempfile
import time

import numpy as np

import bncore
from bncore import _kernels
from results.pipelined_forward import offset_array

HERE = pathlib.Path(__file__).resolve().parent


def build_model(workdir):
    library = pathlib.Path(workdir) / "pipelined_model.so"
    subprocess.run(["cc", "-O3", "-shared", "-fPIC", str(HERE / "pipelined_model.c"),
                    "-o", str(library)], check=True)
    model = ctypes.CDLL(str(library))
    model.bnm_pipelined_forward.restype = ctypes.c_double
    model.bnm_pipelined_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [
        ctypes.c_ssize_t] * 4
    return model


def compare(model, shape, threads, repeats):
    rows, channels, height, width = shape
    run = height * width
    if run % 16:
        raise ValueError(f"H * W must be a multiple of 16, got {run}")
    # On line starts: the model's streaming stores and aligned loads need it.
    x = offset_array(rows * channels * run, 0).reshape(shape)
    x[...] = np.random.default_rng(0).standard_normal(shape)
    y = offset_array(x.size, 0).reshape(shape)
    # The runs ahead bncore's statistics pass asks for (runs_ahead).
    ahead = max(1, -(-8 * 1024 // (run * 4)))

    def two_passes():
        previous = _kernels.set_pipelined(0)
        bncore.batch_norm(x, training=True, out=y)
        _kernels.set_pipelined(*previous)

    calls = {
        "copy": lambda: _kernels.copy(x, y, True, threads),
        "bncore": lambda: bncore.batch_norm(x, training=True, out=y),
        "bncore, two passes": two_passes,
        "model": lambda: model.bnm_pipelined_forward(x.ctypes.data, y.ctypes.data, rows,
                                                     channels, run, ahead),
    }
    times = {name: [] for name in calls}
    order = list(calls)
    rng = np.random.default_rng(1)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    copy = np.median(times["copy"])
    return {name: copy / np.median(t) for name, t in times.items() if name != "copy"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", default=["64x256x28x28", "128x128x56x56"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1,
                        help="bncore's and the copy's threads (the model runs on one)")
    args = parser.parse_args()
    bncore.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(workdir)
        print("| shape | bncore | bncore, two passes | model |")
        print("|---|---:|---:|---:|")
        for text in args.shapes:
            shape = tuple(int(v) for v in text.split("x"))
            r = compare(model, shape, args.threads, args.repeats)
            print(f"| {text} | {r['bncore']:.2f} | {r['bncore, two passes']:.2f} "
                  f"| {r['model']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
