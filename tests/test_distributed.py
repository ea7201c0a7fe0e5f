"""bncore.distributed.SyncBatchNorm.

* A real MPI launch (``mpiexec -n 2`` and ``-n 3`` of tests/mpi_sync_worker.py,
  skipped without mpi4py or mpiexec): each rank trains on its uneven shard
  and checks itself against BatchNorm on the whole batch.
* The same checks in-process, with ranks as threads sharing a communicator
  object (so they run wherever the suite runs).
* One rank: bitwise BatchNorm. Collectives counted, errors, the missing
  extra.
"""

import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import bncore
from bncore import functional
from bncore.distributed import SyncBatchNorm
from conftest import assert_output_close, make_input
from mpi_sync_worker import check_rank

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "mpi_sync_worker.py"


# --------------------------------------------------------------------------
# Communicators without MPI


class CountingComm:
    """One rank; counts the collectives."""

    def __init__(self):
        self.calls = 0

    def Get_size(self):
        return 1

    def Allgather(self, sendbuf, recvbuf):
        self.calls += 1
        recvbuf[0] = sendbuf


class _Hub:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots = [None] * size


class ThreadComm:
    """Rank ``rank`` of ``hub.size`` threads of this process, with mpi4py's
    buffer-form Allgather."""

    def __init__(self, hub, rank):
        self.hub = hub
        self.rank = rank

    def Get_size(self):
        return self.hub.size

    def Get_rank(self):
        return self.rank

    def Allgather(self, sendbuf, recvbuf):
        self.hub.slots[self.rank] = np.array(sendbuf, copy=True)
        self.hub.barrier.wait()  # every message posted
        recvbuf[...] = np.stack(self.hub.slots).reshape(recvbuf.shape)
        self.hub.barrier.wait()  # every message read before the next round


def run_ranks(size, target):
    """target(comm, rank, size) on `size` threads; their results in rank
    order. A failing rank breaks the barrier, so the others stop too."""
    hub = _Hub(size)

    def rank_main(rank):
        try:
            return target(ThreadComm(hub, rank), rank, size)
        except BaseException:
            hub.barrier.abort()
            raise

    with ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(rank_main, rank) for rank in range(size)]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------
# The worker's checks, ranks as threads


@pytest.mark.parametrize("size", [1, 2, 3])
def test_ranks_as_threads_match_batchnorm_on_the_whole_batch(size):
    run_ranks(size, check_rank)


# --------------------------------------------------------------------------
# A real MPI launch


def _mpiexec():
    beside_python = Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpiexec(ranks):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (the 'mpi' extra)")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter")
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        pytest.skip(f"mpi4py finds no MPI library: {probe.stderr.strip()[-300:]}")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",  # ranks share the cores
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS.parent),
                                                 os.environ.get("PYTHONPATH")])),
        # Harmless for MPICH; lets Open MPI run as root and more ranks than cores.
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
    )
    proc = subprocess.run(
        [mpiexec, "-n", str(ranks), sys.executable, str(WORKER), str(ranks)],
        capture_output=True, text=True, timeout=120, env=env, cwd=TESTS.parent,
    )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    for rank in range(ranks):
        assert f"rank {rank}: ok" in proc.stdout, report


# --------------------------------------------------------------------------
# One rank: exactly BatchNorm


ONE_RANK_CASES = [
    ((8, 3, 5), dict(axis=1)),
    ((6, 4, 3), dict(axis=-1, momentum=None)),
    ((16, 5), dict(affine=False)),
    ((4, 3, 2, 5), dict(track_running_stats=False)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, options", ONE_RANK_CASES,
                         ids=["NCL", "NLC-cumulative", "no-affine", "untracked"])
def test_one_rank_is_batchnorm(shape, options, dtype):
    # The statistics and everything computed from them alone are bitwise
    # BatchNorm's. The normalization is not quite: BatchNorm's fused kernel
    # also subtracts the low bits of the mean that float64 cannot hold (its
    # residual), which the exchanged mean lacks; with a mean 1e4 spreads
    # away that is ~1e-12 of an output, conftest's float64 tolerance.
    comm = CountingComm()
    axis = options.get("axis", 1)
    c = shape[axis]
    sync = SyncBatchNorm(c, dtype=dtype, comm=comm, **options)
    plain = bncore.BatchNorm(c, dtype=dtype, **options)
    for step in range(3):
        x = make_input(shape, dtype, axis, seed=800 + step)
        dy = make_input(shape, dtype, axis, kind="normal", seed=810 + step)
        assert_output_close(sync(x), plain(x).astype(np.float64), dtype)
        assert_output_close(sync.backward(dy), plain.backward(dy).astype(np.float64), dtype)
        if plain.affine:
            np.testing.assert_array_equal(sync.grad_bias, plain.grad_bias)
            assert_output_close(sync.grad_weight, plain.grad_weight.astype(np.float64), dtype)
        else:
            assert sync.grad_weight is None and sync.grad_bias is None
        if plain.track_running_stats:
            np.testing.assert_array_equal(sync.running_mean, plain.running_mean)
            np.testing.assert_array_equal(sync.running_var, plain.running_var)
        assert sync.num_batches_tracked == plain.num_batches_tracked
    # One collective per training forward and per backward.
    assert comm.calls == 6
    sync.eval()
    plain.eval()
    x = make_input(shape, dtype, axis, seed=820)
    np.testing.assert_array_equal(sync(x), plain(x))
    np.testing.assert_array_equal(sync.backward(x), plain.backward(x))
    assert comm.calls == 6  # eval communicates nothing


def test_layer_conventions_follow_the_functional_options():
    # Attributes newer layers may carry: the global batch is folded with
    # them as bncore.batch_norm folds its own.
    x = make_input((10, 3), np.float64, 1, seed=830)
    sync = SyncBatchNorm(3, dtype=np.float64, comm=CountingComm())
    sync.unbiased_running_var = False
    sync.decay = 0.9
    sync(x)
    rm, rv = np.zeros(3), np.ones(3)
    functional.batch_norm(x, rm, rv, training=True, unbiased_running_var=False, decay=0.9)
    np.testing.assert_array_equal(sync.running_mean, rm)
    np.testing.assert_array_equal(sync.running_var, rv)


@pytest.mark.parametrize("size", [1, 2])
def test_fused_relu_forward_and_backward(size):
    x = make_input((12, 4, 3), np.float64, 1, kind="normal", seed=840)
    dy = make_input((12, 4, 3), np.float64, 1, kind="normal", seed=841)
    rng = np.random.default_rng(842)
    weight, bias = rng.normal(1.0, 0.5, 4), rng.normal(0.0, 1.0, 4)
    y, mean, invstd = functional.batch_norm(x, None, None, weight, bias, training=True,
                                            activation="relu", return_stats=True)
    dx, dw, db = functional.batch_norm_backward(dy, x, mean, invstd, weight, bias,
                                                activation="relu")
    bounds = np.linspace(0, 12, size + 1).astype(int)

    def rank_main(comm, rank, size):
        sync = SyncBatchNorm(4, dtype=np.float64, comm=comm)
        sync.weight[...], sync.bias[...] = weight, bias
        sync.activation = "relu"
        mine = slice(bounds[rank], bounds[rank + 1])
        got_y = sync(x[mine])
        return got_y, sync.backward(dy[mine]), sync.grad_weight, sync.grad_bias

    results = run_ranks(size, rank_main)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), dx, rtol=1e-12,
                               atol=1e-12)
    for _, _, got_dw, got_db in results:
        np.testing.assert_allclose(got_dw, dw, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_db, db, rtol=1e-12, atol=1e-12)


def test_nonfinite_raise_on_every_rank_with_nothing_written():
    def rank_main(comm, rank, size):
        sync = SyncBatchNorm(2, dtype=np.float64, comm=comm, nonfinite="raise")
        x = make_input((5, 2), np.float64, 1, seed=850 + rank)
        if rank == 1:
            x[3, 1] = np.nan  # one rank's bad value poisons the global batch
        with pytest.raises(FloatingPointError, match="channel\\(s\\) 1"):
            sync(x)
        return sync.state_dict()

    for state in run_ranks(3, rank_main):
        np.testing.assert_array_equal(state["running_mean"], [0.0, 0.0])
        np.testing.assert_array_equal(state["running_var"], [1.0, 1.0])
        assert state["num_batches_tracked"] == 0


class RecordingComm(CountingComm):
    """One rank; keeps the size of every message."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def Allgather(self, sendbuf, recvbuf):
        self.sizes.append(np.asarray(sendbuf).size)
        super().Allgather(sendbuf, recvbuf)


def test_one_message_per_collective_of_the_documented_size():
    c = 4
    comm = RecordingComm()
    sync = SyncBatchNorm(c, dtype=np.float64, comm=comm)
    x = make_input((6, c), np.float64, 1, seed=865)
    sync(x)
    sync.backward(x)
    sync.update_population_stats([x, x])
    # forward: failed, count, mean, M2; backward: failed, two sums;
    # population statistics: failed, count, batches, mean, M2.
    assert comm.sizes == [2 + 2 * c, 1 + 2 * c, 3 + 2 * c]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_float16_layer_matches_batchnorm_with_float32_gradients(size):
    # dy near 50 over 2400 samples: grad_bias ~ 1.2e5, beyond float16's
    # 65504. BatchNorm gives float32 parameter gradients (the dtype of a
    # half layer's parameters); so must every rank.
    rng = np.random.default_rng(870)
    n = 2400
    x = rng.normal(3.0, 2.0, (n, 2)).astype(np.float16)
    dy = (50.0 + rng.standard_normal((n, 2))).astype(np.float16)
    whole = bncore.BatchNorm(2, dtype=np.float16)
    want_y = whole(x).astype(np.float64)
    want_dx = whole.backward(dy).astype(np.float64)
    assert whole.grad_bias.min() > np.finfo(np.float16).max
    bounds = np.linspace(0, n, size + 1).astype(int)

    def rank_main(comm, rank, size):
        sync = SyncBatchNorm(2, dtype=np.float16, comm=comm)
        mine = slice(bounds[rank], bounds[rank + 1])
        y = sync(x[mine])
        return (y, sync.backward(dy[mine]), sync.grad_weight, sync.grad_bias,
                sync.running_mean, sync.running_var)

    results = run_ranks(size, rank_main)
    y = np.concatenate([r[0] for r in results])
    dx = np.concatenate([r[1] for r in results])
    assert y.dtype == dx.dtype == np.float16
    # One float16 rounding of unit-scale values: 2**-11 relative, and the
    # exchanged statistics may round a value the other way (one ulp).
    np.testing.assert_allclose(y.astype(np.float64), want_y, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dx.astype(np.float64), want_dx, rtol=2e-3,
                               atol=2e-3 * np.abs(want_dx).max())
    for _, _, grad_weight, grad_bias, running_mean, running_var in results:
        for got, want in [(grad_weight, whole.grad_weight), (grad_bias, whole.grad_bias),
                          (running_mean, whole.running_mean),
                          (running_var, whole.running_var)]:
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_decay_against_a_changed_momentum_raises_on_every_rank():
    # BatchNorm refuses an ambiguous rule at forward time when the
    # attributes were changed after construction; so does every rank here,
    # with nothing written anywhere.
    x = make_input((5, 2), np.float64, 1, seed=875)

    def rank_main(comm, rank, size, bad_ranks):
        sync = SyncBatchNorm(2, dtype=np.float64, comm=comm, decay=0.9)
        if rank in bad_ranks:
            sync.momentum = 0.3
        with pytest.raises(ValueError) as caught:
            sync(x)
        if rank in bad_ranks:
            assert "not both" in str(caught.value)
        else:
            assert f"rank(s) {', '.join(map(str, bad_ranks))}" in str(caught.value)
        assert sync.num_batches_tracked == 0
        np.testing.assert_array_equal(sync.running_mean, [0.0, 0.0])
        sync.momentum = 0.1
        return sync(x)  # still in step

    run_ranks(3, lambda comm, rank, size: rank_main(comm, rank, size, [0, 1, 2]))
    run_ranks(3, lambda comm, rank, size: rank_main(comm, rank, size, [1]))


# --------------------------------------------------------------------------
# Population statistics over every rank's batches


def _rank_batches(rank, dtype=np.float64):
    """Rank r's batches: a different number on each rank (none on rank 1),
    sizes down to one sample, and statistics that differ between ranks."""
    plans = [[5, 1, 3], [], [2, 6], [4]]
    return [(10.0 * rank + make_input((n, 3, 4), np.float64, 1, kind="normal",
                                      seed=900 + 10 * rank + k)).astype(dtype)
            for k, n in enumerate(plans[rank])]


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_update_population_stats_spans_every_rank(size, unbiased):
    every = [batch for rank in range(size) for batch in _rank_batches(rank)]
    whole = bncore.BatchNorm(3, dtype=np.float64, unbiased_running_var=unbiased)
    whole.update_population_stats(every)

    def rank_main(comm, rank, size):
        sync = SyncBatchNorm(3, dtype=np.float64, comm=comm,
                             unbiased_running_var=unbiased, momentum=None)
        sync(_rank_batches(rank)[0] if rank != 1 else np.zeros((0, 3, 4)))
        assert sync.update_population_stats(iter(_rank_batches(rank)),
                                            num_threads=1) is sync
        return sync.state_dict()

    states = run_ranks(size, rank_main)
    for state in states:
        np.testing.assert_allclose(state["running_mean"], whole.running_mean, rtol=1e-12)
        np.testing.assert_allclose(state["running_var"], whole.running_var, rtol=1e-12)
        # Every batch read, by any rank, as one process reading them all.
        assert state["num_batches_tracked"] == whole.num_batches_tracked == len(every)
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(state[key], states[0][key])


def test_update_population_stats_of_a_half_layer():
    every = [batch for rank in range(3) for batch in _rank_batches(rank, np.float16)]
    whole = bncore.BatchNorm(3, dtype=np.float16).update_population_stats(every)

    def rank_main(comm, rank, size):
        sync = SyncBatchNorm(3, dtype=np.float16, comm=comm)
        return sync.update_population_stats(_rank_batches(rank, np.float16)).state_dict()

    for state in run_ranks(3, rank_main):
        assert state["running_mean"].dtype == np.float32
        np.testing.assert_allclose(state["running_mean"], whole.running_mean, rtol=1e-6)
        np.testing.assert_allclose(state["running_var"], whole.running_var, rtol=1e-6)


def _failing_population_call(size, batches_of, expect):
    """update_population_stats with batches_of(rank) raises on every rank as
    expect(rank, error) checks, with nothing written anywhere."""

    def rank_main(comm, rank, size):
        sync = SyncBatchNorm(3, dtype=np.float64, comm=comm, nonfinite="raise")
        before = {k: np.array(v, copy=True) for k, v in sync.state_dict().items()}
        with pytest.raises(Exception) as caught:
            sync.update_population_stats(batches_of(rank))
        expect(rank, caught.value)
        for key, value in sync.state_dict().items():
            np.testing.assert_array_equal(value, before[key])

    run_ranks(size, rank_main)


def test_update_population_stats_fails_on_every_rank_alike():
    def own_or_named(bad, own_type, own_text):
        def expect(rank, error):
            if rank == bad:
                assert isinstance(error, own_type) and own_text in str(error), error
            else:
                assert isinstance(error, ValueError), error
                assert f"update_population_stats: the call failed on rank(s) {bad}" \
                    in str(error)
        return expect

    # A batch that does not fit, on rank 2 only.
    _failing_population_call(
        3, lambda rank: _rank_batches(rank) + ([np.zeros((2, 5, 4))] if rank == 2 else []),
        own_or_named(2, ValueError, "batches[2]: input.shape[1] is 5"))

    # A data loader that breaks on rank 0: no rank is left waiting.
    def broken(rank):
        yield from _rank_batches(rank)
        if rank == 0:
            raise OSError("disk gone")

    _failing_population_call(3, broken, own_or_named(0, OSError, "disk gone"))
    _failing_population_call(
        2, lambda rank: np.zeros((4, 3)) if rank == 1 else [],
        own_or_named(1, TypeError, "batches must be an iterable"))

    def same_everywhere(error_type, text):
        def expect(rank, error):
            assert isinstance(error, error_type) and text in str(error), error
        return expect

    # Global conditions: the same error on every rank.
    _failing_population_call(3, lambda rank: [], same_everywhere(ValueError, "empty"))
    _failing_population_call(
        3, lambda rank: [np.ones((1, 3))] if rank == 1 else [np.ones((0, 3))],
        same_everywhere(ValueError, "1 value(s) per feature in all"))

    def one_nan(rank):
        batches = _rank_batches(rank)
        if rank == 2:
            batches[0][1, 2, 0] = np.nan
        return batches

    _failing_population_call(3, one_nan, same_everywhere(FloatingPointError, "feature(s) 2"))


def test_backward_before_forward_and_after_eval():
    sync = SyncBatchNorm(2, comm=CountingComm())
    with pytest.raises(RuntimeError, match="before any forward"):
        sync.backward(np.zeros((3, 2), np.float32))


# --------------------------------------------------------------------------
# Construction


def test_comm_must_look_like_a_communicator():
    with pytest.raises(TypeError, match="object has no Get_size"):
        SyncBatchNorm(3, comm=object())
    with pytest.raises(ValueError, match="needs num_features"):
        SyncBatchNorm(None, comm=CountingComm())
    with pytest.raises(ValueError, match="num_features must be at least 1"):
        SyncBatchNorm(0, comm=CountingComm())


def test_mpi_is_needed_only_at_the_first_collective(monkeypatch, tmp_path):
    # Building, saving, loading and evaluating need no mpi4py: COMM_WORLD is
    # looked up at the first collective call, which then names the extra.
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    sync = SyncBatchNorm(3, momentum=0.2)
    assert sync.comm is None
    sync.save(tmp_path / "sync.npz")
    loaded = bncore.BatchNorm.load(tmp_path / "sync.npz")
    assert type(loaded) is SyncBatchNorm and loaded.comm is None
    assert loaded.momentum == 0.2
    x = make_input((4, 3), np.float32, 1, seed=862)
    np.testing.assert_array_equal(loaded.eval()(x), bncore.BatchNorm(3).eval()(x))
    loaded.train()
    for collective in (lambda: loaded(x), lambda: loaded.update_population_stats([x])):
        with pytest.raises(ImportError, match=r'pip install "bncore\[mpi\]"'):
            collective()
        np.testing.assert_array_equal(loaded.running_mean, np.zeros(3))
        np.testing.assert_array_equal(loaded.running_var, np.ones(3))
        assert loaded.num_batches_tracked == 0


def test_pickling_drops_the_communicator():
    sync = SyncBatchNorm(3, comm=CountingComm(), momentum=0.3)
    sync(make_input((4, 3), np.float32, 1, seed=860))
    copy = pickle.loads(pickle.dumps(sync))
    assert copy.comm is None
    assert copy.momentum == 0.3
    np.testing.assert_array_equal(copy.running_mean, sync.running_mean)
    copy.comm = CountingComm()
    copy.eval()
    copy(make_input((4, 3), np.float32, 1, seed=861))
