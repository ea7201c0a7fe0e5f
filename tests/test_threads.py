"""Threads: bitwise identical results for any thread count, the global /
scoped / per-call settings, and OpenMP's own limits (OMP_NUM_THREADS,
threadpoolctl)."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import bncore
from bncore import _config
from conftest import (
    DTYPE_PARAMS,
    HUGE_LAYOUT_PARAMS,
    LARGE_LAYOUT_PARAMS,
    LAYOUT_PARAMS,
    make_input,
    make_params,
    n_channels,
)

THREAD_COUNTS = [1, 2, 3, 4, 8]
OPENMP = bool(_config.build_info().get("openmp"))
needs_openmp = pytest.mark.skipif(not OPENMP, reason="built without OpenMP")

DETERMINISM_LAYOUTS = ([LAYOUT_PARAMS[i] for i in (0, 2, 3, 4, 7, 9, 12)]
                       + LARGE_LAYOUT_PARAMS + HUGE_LAYOUT_PARAMS)


def _run(x, axis, params, training, threads):
    w, b, rm, rv = params
    rm, rv = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, axis=axis,
                                        num_threads=threads, return_stats=True)
    m, v = bncore.moments(x, axis=axis, ddof=1, num_threads=threads)
    return {"y": y, "mean": mean, "invstd": invstd, "running_mean": rm, "running_var": rv,
            "moments_mean": m, "moments_var": v}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", DETERMINISM_LAYOUTS)
def test_bitwise_identical_for_any_thread_count(layout, dtype, training):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=300)
    params = make_params(n_channels(shape, axis), dtype, seed=300)
    base = _run(x, axis, params, training, 1)
    for threads in THREAD_COUNTS[1:]:
        got = _run(x, axis, params, training, threads)
        for key, value in base.items():
            # compare the bits (NaN-safe, -0.0 vs 0.0 distinguished)
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key].view(np.uint8), value.view(np.uint8),
                                          err_msg=f"{key} with {threads} threads")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_in_place_bitwise_identical_for_any_thread_count(dtype):
    shape, axis = HUGE_LAYOUT_PARAMS[0].values[0]
    x = make_input(shape, dtype, axis, seed=301)
    expected = bncore.batch_norm(x, training=True, axis=axis, num_threads=1)
    for threads in THREAD_COUNTS:
        buf = x.copy()
        bncore.batch_norm(buf, training=True, axis=axis, out=buf, num_threads=threads)
        np.testing.assert_array_equal(buf.view(np.uint8), expected.view(np.uint8))


def test_repeatable_run_to_run():
    """The same call twice gives the same bits (no timing-dependent reduction)."""
    shape, axis = HUGE_LAYOUT_PARAMS[1].values[0]
    x = make_input(shape, np.float32, axis, seed=302)
    a = bncore.batch_norm(x, training=True, axis=axis, num_threads=4, return_stats=True)
    for _ in range(3):
        b = bncore.batch_norm(x, training=True, axis=axis, num_threads=4, return_stats=True)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8))


def test_global_and_scoped_settings():
    before = bncore.get_num_threads()
    assert isinstance(before, int) and before >= 1
    with bncore.num_threads(3):
        assert bncore.get_num_threads() == 3
        with bncore.num_threads(1):
            assert bncore.get_num_threads() == 1
        assert bncore.get_num_threads() == 3
    assert bncore.get_num_threads() == before


def test_set_num_threads_in_fresh_process():
    """set_num_threads is process-wide, a scope shadows it and restores it;
    run in a subprocess so the process-wide value cannot leak into other tests."""
    code = (
        "import bncore\n"
        "r = [bncore.get_num_threads()]\n"
        "bncore.set_num_threads(2); r.append(bncore.get_num_threads())\n"
        "with bncore.num_threads(1):\n"
        "    r.append(bncore.get_num_threads())\n"
        "r.append(bncore.get_num_threads())\n"
        "bncore.set_num_threads(5); r.append(bncore.get_num_threads())\n"
        "print(*r)\n"
    )
    expected_default = "3" if OPENMP else "1"
    assert _subprocess(code, OMP_NUM_THREADS="3").split() == [expected_default, "2", "1", "2",
                                                              "5"]


def test_context_manager_restores_on_exception():
    before = bncore.get_num_threads()
    with pytest.raises(RuntimeError):
        with bncore.num_threads(5):
            assert bncore.get_num_threads() == 5
            raise RuntimeError("boom")
    assert bncore.get_num_threads() == before


def test_per_call_setting_does_not_leak():
    x = make_input((8, 3, 4, 4), np.float32, 1, seed=303)
    with bncore.num_threads(2):
        bncore.batch_norm(x, training=True, num_threads=3)
        bncore.moments(x, num_threads=1)
        assert bncore.get_num_threads() == 2


def test_results_do_not_depend_on_global_setting():
    """The global setting and the per-call argument are interchangeable."""
    shape, axis = HUGE_LAYOUT_PARAMS[0].values[0]
    x = make_input(shape, np.float64, axis, seed=304)
    with bncore.num_threads(1):
        a = bncore.batch_norm(x, training=True, axis=axis, num_threads=4)
    with bncore.num_threads(4):
        b = bncore.batch_norm(x, training=True, axis=axis)
        c = bncore.batch_norm(x, training=True, axis=axis, num_threads=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (2.0, TypeError),
                                      ("2", TypeError), (True, TypeError)])
def test_bad_global_settings(bad, exc):
    before = bncore.get_num_threads()
    with pytest.raises(exc):
        bncore.set_num_threads(bad)
    assert bncore.get_num_threads() == before
    with pytest.raises(exc):
        with bncore.num_threads(bad):
            pass
    assert bncore.get_num_threads() == before


def test_concurrent_python_threads():
    """Kernels release the GIL; calls from several Python threads at once
    must still each give their own correct result."""
    shape, axis = LARGE_LAYOUT_PARAMS[0].values[0]
    inputs = [make_input(shape, np.float32, axis, seed=310 + i) for i in range(4)]
    expected = [bncore.batch_norm(x, training=True, axis=axis) for x in inputs]
    results = [None] * 4
    errors = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = bncore.batch_norm(inputs[i], training=True, axis=axis,
                                               num_threads=2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def _subprocess(code, **env):
    full = dict(os.environ)
    full.pop("OMP_NUM_THREADS", None)
    full.update(env)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=full, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@needs_openmp
@pytest.mark.parametrize("n", [1, 3])
def test_omp_num_threads_honoured(n):
    out = _subprocess("import bncore; print(bncore.get_num_threads())", OMP_NUM_THREADS=str(n))
    assert out == str(n)


@needs_openmp
def test_threadpoolctl_limits_respected():
    pytest.importorskip("threadpoolctl")
    code = (
        "import bncore, numpy as np\n"
        "from threadpoolctl import threadpool_limits\n"
        "n0 = bncore.get_num_threads()\n"
        "with threadpool_limits(1):\n"
        "    inside = bncore.get_num_threads()\n"
        "    x = np.ones((4, 3, 8, 8), np.float32)\n"
        "    bncore.batch_norm(x, training=True)\n"
        "with threadpool_limits(3, user_api='openmp'):\n"
        "    three = bncore.get_num_threads()\n"
        "print(n0, inside, three, bncore.get_num_threads())\n"
    )
    n0, inside, three, after = map(int, _subprocess(code, OMP_NUM_THREADS="4").split())
    assert n0 == 4
    assert inside == 1
    assert three == 3
    assert after == 4


@needs_openmp
def test_explicit_setting_beats_openmp_default():
    code = (
        "import bncore\n"
        "with bncore.num_threads(2):\n"
        "    a = bncore.get_num_threads()\n"
        "b = bncore.get_num_threads()\n"
        "print(a, b)\n"
    )
    assert _subprocess(code, OMP_NUM_THREADS="3").split() == ["2", "3"]

