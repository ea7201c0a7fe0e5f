"""pytest-benchmark cases: ``python -m pytest benchmarks/ --benchmark-only``.

One group per workload of issue 4's table (the definitions and adapters of
benchmarks/compare.py), so that each group prints, side by side on the same
arrays: bncore; the yardsticks, bncore's streaming copy (one read and one
write with non-temporal stores: the bound of a forward; the backward's is
1.5x its time) and ``np.copyto``; NumPy's textbook version; PyTorch and
ONNX Runtime where installed (importorskip). Threads: bncore's default
(``bncore.get_num_threads()``), PyTorch and ONNX Runtime set to the same.

Full-size inputs (up to 205 MB, a few minutes in all); select with ``-k``
(``-k "eval and nchw"``) or set BNCORE_BENCH_QUICK=1 for compare.py's
--quick shapes. Not a gate: nothing here fails on a slow machine. For
interleaved medians, GB/s and ratios use ``python benchmarks/compare.py``.
"""

import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bncore  # noqa: E402
import compare  # noqa: E402

QUICK = os.environ.get("BNCORE_BENCH_QUICK", "") not in ("", "0")
DTYPE = "float32"
WORKLOADS = {w.id: w.scaled(QUICK) for w in compare.WORKLOADS}
CASES = [pytest.param(w.id, name, id=f"{w.id}-{name.replace(' ', '_')}")
         for w in WORKLOADS.values() for name in compare.impl_names(w)]
PEER_MODULES = {"torch": ["torch"], "onnxruntime": ["onnxruntime", "onnx"]}

_data = {}  # the current workload's arrays only: cases run workload by workload


def _workload_data(wl):
    if wl.id not in _data:
        _data.clear()
        gc.collect()
        _data[wl.id] = compare.make_data(wl, DTYPE)
    return _data[wl.id]


@pytest.fixture
def threads():
    n = bncore.get_num_threads()
    torch = compare._optional("torch")
    if torch is None:
        yield n
        return
    previous, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(n)
    torch.set_grad_enabled(False)  # forwards as in inference; the backward is explicit
    yield n
    torch.set_num_threads(previous)
    torch.set_grad_enabled(grad)


@pytest.mark.parametrize(("workload", "implementation"), CASES)
def test_workload(benchmark, threads, workload, implementation):
    family = implementation.split()[0]
    for module in PEER_MODULES.get(family, []):
        pytest.importorskip(module)
    wl = WORKLOADS[workload]
    data = _workload_data(wl)
    impls = {impl.name: impl
             for impl in compare.implementations(wl, data, threads, families=[family])}
    assert implementation in impls, f"compare.py's adapters gave no {implementation!r}"
    impl = impls[implementation]
    benchmark.group = f"{wl.id} ({data.x.nbytes / 1e6:.3g} MB, {threads} threads)"
    benchmark.extra_info.update(
        nbytes=data.x.nbytes, threads=threads,
        bytes_moved=data.x.nbytes * (2 if impl.is_copy else wl.bound_factor))
    benchmark(impl.call)
