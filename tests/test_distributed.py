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


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "bncore\[mpi\]"'):
        SyncBatchNorm(3)


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
