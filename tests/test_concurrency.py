"""Python threads: the kernels release the GIL, layers are safe to share.

* Every kernel releases the GIL: another Python thread keeps running while
  a long kernel call is under way (a gap test, immune to machine load), and
  two threads running eval forwards take clearly less wall time together
  than one after the other (a timing test, marked ``timing``: not in the
  default run, where a loaded CI machine failed it once although the gap
  test passed; run it with ``-m timing`` on a quiet machine).
* A layer in eval mode gives, from 8 threads at once, bitwise the results of
  serial calls.
* Training forwards from 8 threads fold their statistics into the running
  statistics one at a time (the layer's lock): with momentum=None the
  running statistics are the average over all batches, as a serial loop
  gives, and every batch is counted.
* The lock does not stop a layer from being copied or pickled.
"""

import copy
import math
import os
import pickle
import sys
import threading
import time

import numpy as np
import pytest

import bncore
from conftest import make_input


def _run_threads(target, nthreads):
    """Run target(i) in nthreads threads started together; re-raise errors."""
    errors = []
    barrier = threading.Barrier(nthreads)

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------
# The GIL is released in every kernel


def _kernel_calls():
    """(name, call) pairs, each one kernel call of 1-6 ms (8 Mi values)."""
    shape = (8, 16, 256, 256)  # 8 Mi values: 32 MiB in float32
    x = make_input(shape, np.float32, 1, kind="normal", seed=800)
    dy = make_input(shape, np.float32, 1, kind="normal", seed=801)
    out = np.empty_like(x)
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    _, mean, invstd = bncore.batch_norm(x, training=True, return_stats=True)
    return [
        ("eval", lambda: bncore.batch_norm(x, rm, rv, out=out, num_threads=1)),
        ("train", lambda: bncore.batch_norm(x, training=True, out=out, num_threads=1)),
        ("moments", lambda: bncore.moments(x, num_threads=1)),
        ("backward", lambda: bncore.batch_norm_backward(dy, x, mean, invstd, out=out,
                                                        num_threads=1)),
        ("backward-eval", lambda: bncore.batch_norm_backward(
            dy, x, mean, invstd, training=False, out=out, num_threads=1)),
    ]


@pytest.mark.parametrize("name", ["eval", "train", "moments", "backward", "backward-eval"])
def test_kernels_release_the_gil(name):
    """While one thread is inside kernel calls (a few ms each, num_threads=1,
    back to back for 50 ms), a second Python thread keeps counting: it gets
    through a good part of what it counts in the same time with the main
    thread asleep. A kernel holding the GIL would stop it for the whole call
    (with the switch interval set to 0.1 ms, it could count for at most
    that long before the call takes the GIL).

    Immune to load: on a busy machine both rates drop alike. Best of up to
    8 calls."""
    call = dict(_kernel_calls())[name]
    call()  # warm up
    stop = threading.Event()
    ticks = [0]

    def ticker():
        while not stop.is_set():
            ticks[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    worker = threading.Thread(target=ticker)
    worker.start()
    best = 0.0
    try:
        for _ in range(8):
            t0, n0 = time.perf_counter(), ticks[0]
            time.sleep(0.05)  # the ticker alone: its rate now
            t1, n1 = time.perf_counter(), ticks[0]
            # Calls back to back for 50 ms: long enough for the OS to give
            # the ticker its share of a loaded machine.
            while time.perf_counter() - t1 < 0.05:
                call()
            t2, n2 = time.perf_counter(), ticks[0]
            rate = (n1 - n0) / (t1 - t0)
            if rate > 0:
                best = max(best, (n2 - n1) / (rate * (t2 - t1)))
            if best > 0.25:
                break
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(old_interval)
    assert best > 0.25, (
        f"{name}: during {t2 - t1:.4f} s of kernel calls another Python thread ran at "
        f"{best:.0%} of its free speed: the kernel holds the GIL"
    )


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _best_serial_and_parallel(works, trials):
    """For each work(i): the best wall time of work(0); work(1), and the
    best of both in two threads at once, over interleaved trials (the best
    of several is the time least disturbed by the rest of the machine)."""
    best = {name: [math.inf, math.inf] for name in works}
    for _ in range(trials):
        for name, work in works.items():
            t0 = time.perf_counter()
            work(0)
            work(1)
            best[name][0] = min(best[name][0], time.perf_counter() - t0)
            t0 = time.perf_counter()
            _run_threads(work, 2)
            best[name][1] = min(best[name][1], time.perf_counter() - t0)
    return {name: parallel / serial for name, (serial, parallel) in best.items()}


@pytest.mark.timing
@pytest.mark.skipif(_cpus() < 2, reason="needs 2 CPUs")
def test_two_threads_run_eval_forwards_at_once():
    """Two threads, each running eval forwards with num_threads=1 on its own
    array, finish in clearly less wall time than the same work done one
    after the other (ideal: half). The size is chosen between two limits
    measured on the 2-core development machine: with 128 Ki values a call
    is ~15 us of kernel beside ~10 us of Python holding the GIL, and two
    threads gain nothing (ratio 1.02); with 2 Mi values per thread the
    kernels share DRAM bandwidth, which one core already fills (1.05).
    512 Ki values (2 MiB in, 2 MiB out per thread) stay in L3: 0.56.

    A control runs the same way with NumPy's multiply on the same arrays
    (NumPy releases the GIL for large arrays): the same memory traffic, so
    when even that shows no speed-up, the machine (its cores, or the cache
    and memory bandwidth that neighbours share) is too busy to tell, and
    the test skips instead of failing."""
    shape = (8, 16, 64, 64)
    xs = [make_input(shape, np.float32, 1, kind="normal", seed=810 + i) for i in range(2)]
    outs = [np.empty_like(x) for x in xs]
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)

    def bn_work(i):
        x, out = xs[i], outs[i]
        for _ in range(80):
            bncore.batch_norm(x, rm, rv, out=out, num_threads=1)

    def numpy_work(i):
        x, out = xs[i], outs[i]
        for _ in range(80):
            np.multiply(x, 1.5, out=out)

    bn_work(0)
    numpy_work(0)
    # Up to 4 rounds: pass on the first where bncore's threads overlap; fail
    # only if in some round the control showed a quiet machine (<= 0.65)
    # and bncore never overlapped. On a loaded machine bncore's ~10 us of
    # Python per call (GIL held) is more exposed to a preempted core than
    # NumPy's 1 us, so a merely busy machine skips.
    rounds = []
    for _ in range(4):
        ratios = _best_serial_and_parallel({"bncore": bn_work, "control": numpy_work},
                                           trials=9)
        if ratios["bncore"] < 0.8:
            return
        rounds.append((ratios["bncore"], ratios["control"]))
    shown = ", ".join(f"{b:.2f} (NumPy {c:.2f})" for b, c in rounds)
    if min(c for _, c in rounds) > 0.65:
        pytest.skip(f"machine too busy to tell: two threads took {shown} of the serial time")
    pytest.fail(f"two threads of eval forwards took {shown} of the serial wall time, "
                "where NumPy's GIL-free multiply overlapped: the GIL is not released")


# --------------------------------------------------------------------------
# Layers shared by threads


def _trained_layer(shape, axis, dtype, seed):
    bn = bncore.BatchNorm(shape[axis], axis=axis, dtype=dtype)
    for k in range(3):
        bn(make_input(shape, dtype, axis, seed=seed + k))
    return bn.eval()


@pytest.mark.parametrize("shape, axis", [((4, 6), 1), ((8, 16, 32, 32), 1),
                                         ((4, 8, 8, 24), -1)])
def test_eval_layer_shared_by_eight_threads(shape, axis):
    """8 threads x 40 calls on one eval layer: each result bitwise the
    serial one. The large shape runs OpenMP teams from 8 threads at once."""
    bn = _trained_layer(shape, axis, np.float32, seed=820)
    inputs = [make_input(shape, np.float32, axis, seed=830 + k) for k in range(8)]
    expected = [bn(x) for x in inputs]
    state = copy.deepcopy(bn.state_dict())
    results = [[None] * 40 for _ in range(8)]

    def work(t):
        for i in range(40):
            results[t][i] = bn(inputs[(t + i) % 8])

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings
    try:
        _run_threads(work, 8)
    finally:
        sys.setswitchinterval(old)
    for t in range(8):
        for i in range(40):
            np.testing.assert_array_equal(results[t][i].view(np.uint8),
                                          expected[(t + i) % 8].view(np.uint8))
    for key, value in state.items():  # eval changed nothing
        np.testing.assert_array_equal(np.asarray(getattr(bn, key)), value)


def _batches(nthreads, ncalls, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal(shape) * rng.uniform(0.5, 2) + rng.uniform(-3, 3))
             .astype(dtype) for _ in range(ncalls)] for _ in range(nthreads)]


@pytest.mark.parametrize("widen", [False, True], ids=["plain", "widened"])
@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 32, 32)])
def test_training_from_eight_threads_loses_no_update(shape, widen, monkeypatch):
    """8 threads x 200 training forwards with momentum=None: the running
    statistics equal a serial loop's over the same batches (up to the
    rounding of the summation order) and num_batches_tracked is 1600.
    Without the layer's lock, two threads read the same count and weigh
    their batches alike, and increments get lost. ("widened": the update
    yields the GIL half-way, as a slower machine might, so that a missing
    lock fails every time rather than now and then.)"""
    if widen:
        from bncore import modules

        fold = modules._fold_batch

        def slow_fold(*args):
            time.sleep(0)  # lets another thread in, mid-update
            return fold(*args)

        monkeypatch.setattr(modules, "_fold_batch", slow_fold)
    nthreads, ncalls = 8, 200
    if shape != (16, 4):
        ncalls = 25  # large batches: the kernels run long, interleaving is rich anyway
    batches = _batches(nthreads, ncalls, shape, np.float64, seed=840)
    serial = bncore.BatchNorm(4, momentum=None, dtype=np.float64)
    outputs_serial = {}
    for t in range(nthreads):
        for i in range(ncalls):
            outputs_serial[t, i] = serial(batches[t][i])

    shared = bncore.BatchNorm(4, momentum=None, dtype=np.float64)
    outputs = {}

    def work(t):
        for i in range(ncalls):
            outputs[t, i] = shared(batches[t][i])

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _run_threads(work, nthreads)
    finally:
        sys.setswitchinterval(old)

    total = nthreads * ncalls
    assert serial.num_batches_tracked == total
    assert shared.num_batches_tracked == total
    np.testing.assert_allclose(shared.running_mean, serial.running_mean, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(shared.running_var, serial.running_var, rtol=1e-11, atol=1e-13)
    # and both are the plain average of the batch statistics
    flat = [b for per_thread in batches for b in per_thread]
    axes = (0,) + tuple(range(2, len(shape)))
    means = np.mean([b.mean(axis=axes) for b in flat], axis=0)
    variances = np.mean([b.var(axis=axes, ddof=1) for b in flat], axis=0)
    np.testing.assert_allclose(shared.running_mean, means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(shared.running_var, variances, rtol=1e-10)
    # training outputs use batch statistics only: the same as serial calls
    for key, y in outputs.items():
        np.testing.assert_array_equal(y, outputs_serial[key])


def test_training_from_threads_with_float32_layer():
    batches = _batches(8, 100, (16, 4), np.float32, seed=850)
    serial = bncore.BatchNorm1d(4, momentum=None)
    for per_thread in batches:
        for b in per_thread:
            serial(b)
    shared = bncore.BatchNorm1d(4, momentum=None)
    _run_threads(lambda t: [shared(b) for b in batches[t]], 8)
    assert shared.num_batches_tracked == 800
    # 800 float32 roundings of a cumulative average, in two orders
    np.testing.assert_allclose(shared.running_mean, serial.running_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shared.running_var, serial.running_var, rtol=1e-4)


def test_eval_forward_does_not_take_the_lock():
    """An eval forward completes while another thread holds the layer's
    lock (as a training update would)."""
    bn = _trained_layer((4, 6), 1, np.float32, seed=860)
    x = make_input((4, 6), np.float32, 1, seed=861)
    done = threading.Event()
    with bn._lock:
        t = threading.Thread(target=lambda: (bn(x), done.set()))
        t.start()
        assert done.wait(10), "eval forward blocked on the training lock"
    t.join()
    bn.train()
    with bn._lock:  # a training forward does wait for it
        t = threading.Thread(target=lambda: bn(x))
        t.start()
        t.join(0.2)
        assert t.is_alive()
    t.join()
    assert bn.num_batches_tracked == 4


# --------------------------------------------------------------------------
# Copies


def _assert_same_layer(a, b):
    assert type(a) is type(b)
    for key in ("num_features", "eps", "momentum", "affine", "track_running_stats", "axis",
                "dtype", "training", "nonfinite", "num_batches_tracked"):
        assert getattr(a, key) == getattr(b, key), key
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        assert not np.shares_memory(getattr(a, key), getattr(b, key)), key


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_layer_copies_and_pickles(how):
    bn = bncore.BatchNorm2d(3, momentum=None, nonfinite="skip_update")
    x = make_input((4, 3, 5, 6), np.float32, 1, seed=870)
    bn(x)
    bn.weight[:] = [1.5, 0.5, 2.0]
    if how == "deepcopy":
        clone = copy.deepcopy(bn)
    else:
        clone = pickle.loads(pickle.dumps(bn))
    _assert_same_layer(bn, clone)
    assert clone._lock is not bn._lock
    # both work and stay independent, in threads too
    x2 = make_input((4, 3, 5, 6), np.float32, 1, seed=871)
    np.testing.assert_array_equal(clone(x2), bn(x2))
    np.testing.assert_array_equal(clone.backward(x2), bn.backward(x2))
    _run_threads(lambda t: clone(x2), 4)
    assert clone.num_batches_tracked == 6 and bn.num_batches_tracked == 2
    bn.eval()
    clone.eval()
    clone.load_state_dict(bn.state_dict())
    np.testing.assert_array_equal(clone(x), bn(x))


def test_shallow_copy_gets_its_own_lock():
    bn = bncore.BatchNorm1d(4)
    clone = copy.copy(bn)
    assert clone._lock is not bn._lock
    assert clone.running_mean is bn.running_mean  # shallow: shares the arrays
    clone(make_input((8, 4), np.float32, 1, seed=880))
    assert clone.num_batches_tracked == 1
