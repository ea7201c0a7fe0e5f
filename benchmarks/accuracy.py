"""Accuracy of per-channel statistics and the normalised output, bncore
against the NumPy textbook formula, NumPy's own var and PyTorch.

    python benchmarks/accuracy.py

float32 data whose channels have mean ``offset`` and spread 1, in three
layouts; the exact answer is bncore.reference (float64, correctly rounded
sums). Errors, each the largest over channels or values: the relative
error of the mean (against |mean|, or the spread where the mean is 0), of
the variance, and the absolute error of the normalised output (training
mode, batch statistics, eps = 1e-5).
"""

import argparse

import numpy as np

import bncore
from bncore import reference

LAYOUTS = {"NCHW (32,16,16,16)": ((32, 16, 16, 16), 1),
           "NHWC (32,16,16,16), axis=-1": ((32, 16, 16, 16), -1),
           "(N, C) (8192, 16)": ((8192, 16), 1)}
OFFSETS = (0.0, 1e2, 1e4, 1e6)
EPS = 1e-5


def _data(shape, axis, offset, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + offset).astype(np.float32)


def _reduce_axes(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def bncore_stats(x, axis):
    mean, var = bncore.moments(x, axis=axis)
    return mean, var, bncore.batch_norm(x, training=True, axis=axis)


def textbook_stats(x, axis):
    """E[x^2] - E[x]^2 in float32, as written in many tutorials."""
    axes = _reduce_axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = (x * x).mean(axis=axes, keepdims=True) - mean * mean
    return mean.ravel(), var.ravel(), (x - mean) / np.sqrt(var + np.float32(EPS))


def numpy_var_stats(x, axis):
    """np.var in float32: two passes, pairwise sums."""
    axes = _reduce_axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return mean.ravel(), var.ravel(), (x - mean) / np.sqrt(var + np.float32(EPS))


def torch_stats(x, axis):
    import torch

    tensor = torch.from_numpy(x)
    if axis != 1:
        tensor = tensor.movedim(axis, 1)  # a channels-last view, as models hold it
    channels = x.shape[axis]
    running_mean, running_var = torch.zeros(channels), torch.zeros(channels)
    y = torch.nn.functional.batch_norm(tensor, running_mean, running_var,
                                       training=True, momentum=1.0, eps=EPS)
    count = x.size / channels
    var = running_var.numpy().astype(np.float64) * (count - 1) / count  # unbiased -> biased
    y = y.movedim(1, axis).numpy() if axis != 1 else y.numpy()
    return running_mean.numpy(), var, y


def implementations():
    found = {"bncore": bncore_stats, "NumPy E[x²]-E[x]²": textbook_stats,
             "NumPy np.var": numpy_var_stats}
    try:
        import torch  # noqa: F401
        found["PyTorch " + torch.__version__] = torch_stats
    except ImportError:
        pass
    return found


def measure():
    rows = []
    for layout, (shape, axis) in LAYOUTS.items():
        for offset in OFFSETS:
            x = _data(shape, axis, offset)
            exact_mean, exact_var = reference.moments(x, axis=axis)
            exact_y = reference.batch_norm(x, training=True, axis=axis, eps=EPS).y
            scale = np.maximum(np.abs(exact_mean), np.sqrt(exact_var))
            for name, stats in implementations().items():
                with np.errstate(all="ignore"):
                    mean, var, y = stats(x, axis)
                    errors = (
                        np.max(np.abs(np.asarray(mean, np.float64) - exact_mean) / scale),
                        np.max(np.abs(np.asarray(var, np.float64) - exact_var) / exact_var),
                        np.max(np.abs(np.asarray(y, np.float64) - exact_y)),
                    )
                rows.append((layout, offset, name) + errors)
    return rows


def report(rows):
    names = list(dict.fromkeys(r[2] for r in rows))
    header = ("| layout | offset | "
              + " | ".join(f"{n}: mean / var / output" for n in names) + " |")
    lines = [header, "|" + "---|" * (2 + len(names))]
    for layout in LAYOUTS:
        for offset in OFFSETS:
            cells = []
            for name in names:
                (_, _, _, m, v, y), = [r for r in rows if r[:3] == (layout, offset, name)]
                cells.append(f"{m:.0e} / {v:.0e} / {y:.0e}")
            lines.append(f"| {layout} | {offset:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(report(measure()))


if __name__ == "__main__":
    main()
