"""pytest-benchmark cases: ``python -m pytest benchmarks/ --benchmark-only``.

Grouped by workload so that each group compares bncore with NumPy written the
usual way (whole-array operations) on the same input; the streaming-copy
yardstick and the PyTorch / ONNX Runtime peers arrive with the comparison
script. Not a gate: nothing here fails on a slow machine.
"""

import numpy as np
import pytest

import bncore
from bncore.__main__ import numpy_batch_norm

WORKLOADS = {
    "nchw-26MB": ((32, 64, 56, 56), 1),
    "nhwc-26MB": ((32, 56, 56, 64), -1),
    "nc-26MB": ((100_000, 64), 1),
    "small-nchw": ((8, 32, 14, 14), 1),
    "batch1-nc": ((1, 64), 1),
}


@pytest.fixture(params=list(WORKLOADS), scope="module")
def workload(request):
    shape, axis = WORKLOADS[request.param]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    channels = shape[axis]
    return request.param, x, axis, np.zeros(channels, np.float32), np.ones(channels, np.float32)


def _moved_to_nchw(x, axis):
    return x if axis == 1 else np.moveaxis(x, axis, 1)


@pytest.mark.parametrize("implementation", ["bncore", "numpy"])
def test_eval_forward(benchmark, workload, implementation):
    name, x, axis, mean, var = workload
    benchmark.group = f"eval {name}"
    out = np.empty_like(x)
    if implementation == "bncore":
        benchmark(bncore.batch_norm, x, mean, var, training=False, axis=axis, out=out)
    else:
        benchmark(numpy_batch_norm, _moved_to_nchw(x, axis), mean, var, False)


@pytest.mark.parametrize("implementation", ["bncore", "numpy"])
def test_training_forward(benchmark, workload, implementation):
    name, x, axis, mean, var = workload
    if x.size // x.shape[axis] < 2:
        pytest.skip("training needs more than one value per channel")
    benchmark.group = f"train {name}"
    out = np.empty_like(x)
    if implementation == "bncore":
        benchmark(bncore.batch_norm, x, mean.copy(), var.copy(), training=True, axis=axis,
                  out=out)
    else:
        benchmark(numpy_batch_norm, _moved_to_nchw(x, axis), mean, var, True)


def test_backward(benchmark, workload):
    name, x, axis, _, _ = workload
    if x.size // x.shape[axis] < 2:
        pytest.skip("training needs more than one value per channel")
    benchmark.group = f"backward {name}"
    _, mean, invstd = bncore.batch_norm(x, training=True, axis=axis, return_stats=True)
    dy = np.ones_like(x)
    out = np.empty_like(x)
    benchmark(bncore.batch_norm_backward, dy, x, mean, invstd, axis=axis, out=out)
