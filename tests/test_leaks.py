"""No leaks: many calls keep the process's resident memory flat.

tracemalloc (tests/test_memory.py) sees NumPy's and Python's allocations;
these tests read the resident set size from /proc, which also sees what the
compiled kernels malloc (per-thread partials, chunk results) and reference
counts that are never dropped. Every public call is included, in place and
out= calls, the nonfinite modes, and calls that raise.
"""

import os

import numpy as np
import pytest

import bncore

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                       reason="needs /proc/self/statm (Linux)"),
    pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                       reason="AddressSanitizer's quarantine keeps freed memory resident"),
]

MARGIN = 10 * 2**20  # bytes: the allocator may keep a few arenas around


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _small_round():
    """One of every kind of small call; returns nothing, keeps nothing."""
    state = {}
    rng = np.random.default_rng(900)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    xc = np.ascontiguousarray(rng.standard_normal((4, 16, 5)))
    bad = x.copy()
    bad[0, 3] = np.nan
    w, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    out = np.empty_like(x)
    buf = x.copy()
    bn = bncore.BatchNorm1d(16)
    bn_eval = bncore.BatchNorm1d(16, dtype=np.float64).eval()
    state.update(locals())

    def run():
        bncore.batch_norm(x, rm, rv, w, b)  # eval
        y, mean, invstd = bncore.batch_norm(x, rm, rv, w, b, training=True, return_stats=True)
        bncore.batch_norm(x, rm, rv, w, b, training=True, out=out)
        np.copyto(buf, x)
        bncore.batch_norm(buf, rm, rv, training=True, out=buf)  # in place
        bncore.batch_norm(bad, rm, rv, training=True, nonfinite="skip_update")
        try:
            bncore.batch_norm(bad, rm, rv, training=True, nonfinite="raise")
        except FloatingPointError:
            pass
        try:
            bncore.batch_norm(x, rm[:3], rv, training=True)  # invalid: raises
        except ValueError:
            pass
        bncore.moments(x)
        bncore.moments(xc, axis=-1, ddof=1)
        bncore.batch_norm_backward(x, x, mean, invstd, w)
        bncore.batch_norm_backward(x, x, mean, invstd, w, training=False, out=out)
        bn(x)
        bn.backward(x)
        bn_eval(xc[:, :, 0])

    return run


def _assert_flat(run, rounds, warmup):
    for _ in range(warmup):
        run()
    before = _rss()
    for _ in range(rounds):
        run()
    grown = _rss() - before
    assert grown < MARGIN, f"resident memory grew by {grown / 2**20:.1f} MiB over {rounds} rounds"
    return grown


def test_small_calls_do_not_leak():
    """10,000 rounds of 15 calls (150,000 calls, a few seconds)."""
    _assert_flat(_small_round(), 10_000, 1_000)


@pytest.mark.slow
def test_small_calls_do_not_leak_long():
    """100,000 rounds (1.5 million calls)."""
    _assert_flat(_small_round(), 100_000, 2_000)


@pytest.mark.parametrize("shape, axis", [((16, 64, 8, 16), 1), ((64, 8, 8, 40), -1),
                                         ((32, 4096), 1)])
def test_parallel_wide_calls_do_not_leak(shape, axis):
    """Inputs that take the parallel paths (>= 65536 values, 2 threads) and
    have many channels, so that any per-call scratch the kernels allocate
    (per channel, per thread, per chunk) would add up: 150 rounds of 4
    calls, so 20 KiB lost per call would show."""
    rng = np.random.default_rng(901)
    x = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    out = np.empty_like(x)

    def run():
        _, mean, invstd = bncore.batch_norm(x, rm, rv, training=True, axis=axis, out=out,
                                            num_threads=2, return_stats=True)
        bncore.batch_norm(x, rm, rv, axis=axis, out=out, num_threads=2)
        bncore.moments(x, axis=axis, num_threads=2)
        bncore.batch_norm_backward(x, x, mean, invstd, axis=axis, out=out, num_threads=2)

    _assert_flat(run, 150, 10)
