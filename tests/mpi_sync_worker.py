"""One rank of the SyncBatchNorm check (not collected by pytest).

Run as ``mpiexec -n 3 python tests/mpi_sync_worker.py 3`` (the optional
argument: the expected number of ranks): every rank trains
SyncBatchNorm layers for a few steps on its shard of a batch (shards of
uneven sizes, a one-sample shard, an empty one), and checks against a
single-process ``bncore.BatchNorm`` fed the whole batch: outputs, its
grad_input shard, grad_weight/grad_bias, running statistics, then eval;
and update_population_stats over every rank's batches against BatchNorm's
over all of them. It also checks that all ranks hold bitwise the same statistics and that a
call that is wrong on one rank raises on every rank and changes nothing.
Prints ``rank R: ok`` and exits 0, or prints the traceback and aborts the
whole run with exit code 1 (so no rank is left waiting).

tests/test_distributed.py runs the same :func:`check_rank` with ranks as
threads of one process, and launches this script under mpiexec.
"""

import sys
import traceback

import numpy as np

import bncore
from bncore.distributed import SyncBatchNorm

#: Per step, the number of samples of each rank's shard (first `size`
#: entries): a one-sample shard, an empty shard, a larger batch.
SHARD_PLANS = [[6, 1, 3, 2], [0, 5, 2, 7], [3, 3, 4, 1]]

#: (layer options, trailing shape builder): planar with momentum, and
#: channels-last, no affine, cumulative average.
CONFIGS = [
    (dict(momentum=0.1, affine=True, axis=1), lambda n: (n, 4, 6)),
    (dict(momentum=None, affine=False, axis=-1), lambda n: (n, 5, 3)),
]

TOLERANCE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


def _close(got, want, dtype, what):
    """|got - want| <= tol * (|want| + max|want|): relative per value, with a
    floor at the array's scale (a near-zero output is not held to 1e-12 of
    itself)."""
    tol = TOLERANCE[np.dtype(dtype)]
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = np.abs(want).max() if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


def _same_on_every_rank(comm, arrays, what):
    """The float64 concatenation of arrays is bitwise the same on all ranks."""
    mine = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    every = np.empty((comm.Get_size(), mine.size))
    comm.Allgather(mine, every)
    for row in every[1:]:
        np.testing.assert_array_equal(row, every[0], err_msg=f"{what} differ between ranks")


def _state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def _assert_state(layer, state):
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=f"{key} was changed")


def _expect_failure_everywhere(call, rank, bad_rank, own_message):
    """call() must raise on every rank: its own error on bad_rank, a
    ValueError naming bad_rank elsewhere."""
    try:
        call()
    except (TypeError, ValueError) as error:
        text = str(error)
        if rank == bad_rank:
            assert own_message in text, text
        else:
            assert f"rank(s) {bad_rank}" in text, text
    else:
        raise AssertionError(f"rank {rank}: no error raised (bad rank {bad_rank})")


def check_training(comm, rank, size, dtype, options, shape_of, layer_comm):
    """Steps of forward/backward against BatchNorm on the whole batch;
    the layer is given layer_comm (None: its default, COMM_WORLD)."""
    rng = np.random.default_rng(2024)  # the same stream on every rank
    channels = shape_of(1)[options["axis"]]
    sync = SyncBatchNorm(channels, dtype=dtype, comm=layer_comm, **options)
    whole = bncore.BatchNorm(channels, dtype=dtype, **options)
    if sync.affine:
        weight = rng.normal(1.0, 0.5, channels).astype(dtype)
        bias = rng.normal(0.0, 1.0, channels).astype(dtype)
        for layer in (sync, whole):
            layer.weight[...] = weight
            layer.bias[...] = bias
    for plan in SHARD_PLANS:
        sizes = plan[:size]
        shape = shape_of(sum(sizes))
        offsets = np.linspace(-50.0, 200.0, channels)
        channel_axis = options["axis"] % len(shape)
        offsets = offsets.reshape([-1 if d == channel_axis else 1 for d in range(len(shape))])
        x = (offsets + rng.uniform(0.5, 3.0) * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])

        y = sync(x[mine])
        want_y = whole(x)
        _close(y, want_y[mine], dtype, "output")
        dx = sync.backward(dy[mine])
        want_dx = whole.backward(dy)
        _close(dx, want_dx[mine], dtype, "grad_input")
        assert y.dtype == dx.dtype == np.dtype(dtype)
        if sync.affine:
            _close(sync.grad_weight, whole.grad_weight, dtype, "grad_weight")
            _close(sync.grad_bias, whole.grad_bias, dtype, "grad_bias")
        else:
            assert sync.grad_weight is None and sync.grad_bias is None
        _close(sync.running_mean, whole.running_mean, dtype, "running_mean")
        _close(sync.running_var, whole.running_var, dtype, "running_var")
        assert sync.num_batches_tracked == whole.num_batches_tracked
        shared = [sync.running_mean, sync.running_var]
        if sync.affine:
            shared += [sync.grad_weight, sync.grad_bias]
        _same_on_every_rank(comm, shared, "running statistics and parameter gradients")

    # Eval: BatchNorm's, on each rank's own data, no communication needed.
    sync.eval()
    whole.eval()
    x = rng.standard_normal(shape_of(2 + rank)).astype(dtype)
    _close(sync(x), whole(x), dtype, "eval output")
    return sync


def check_errors(comm, rank, size, dtype):
    """A call that is wrong on one rank raises on all and changes nothing;
    the layer keeps working afterwards."""
    rng = np.random.default_rng(7)
    sync = SyncBatchNorm(3, dtype=dtype, comm=comm)
    good = rng.standard_normal((4, 3)).astype(dtype)
    sync(good)
    sync.backward(good)
    state = _state(sync)
    bad_rank = size - 1

    x = np.zeros((4, 5), dtype) if rank == bad_rank else good
    _expect_failure_everywhere(lambda: sync(x), rank, bad_rank, "input.shape[1] is 5")
    _assert_state(sync, state)

    x = good.astype(np.float64 if np.dtype(dtype) == np.float32 else np.float32) \
        if rank == bad_rank else good
    _expect_failure_everywhere(lambda: sync(x), rank, bad_rank, "input has dtype")
    _assert_state(sync, state)

    sync(good)
    state = _state(sync)
    dy = good[:2] if rank == 0 else good
    _expect_failure_everywhere(lambda: sync.backward(dy), rank, 0, "grad_output has shape")
    _assert_state(sync, state)

    # One value per feature over all ranks: the same error on every rank.
    lonely = good[:1] if rank == 0 else good[:0]
    try:
        sync(lonely)
    except ValueError as error:
        assert "more than 1 value per channel" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: one value in all did not raise")
    _assert_state(sync, state)

    # Still in step with the other ranks.
    y = sync(good)
    whole = bncore.BatchNorm(3, dtype=dtype)
    want = whole(np.concatenate([good] * size))
    _close(y, want[:4], dtype, "output after the errors")


def check_population(comm, rank, size, dtype, layer_comm):
    """update_population_stats over every rank's batches (a different
    number on each rank, none on rank 1) against BatchNorm's over all of
    them; then a batch that does not fit on one rank fails everywhere."""
    rng = np.random.default_rng(99)  # the same stream on every rank
    counts = [2, 0, 3, 1][:size]
    every = [(5.0 * k + rng.standard_normal((1 + k, 3, 2))).astype(dtype)
             for k in range(sum(counts))]
    start = sum(counts[:rank])
    mine = every[start:start + counts[rank]]
    sync = SyncBatchNorm(3, dtype=dtype, comm=layer_comm)
    whole = bncore.BatchNorm(3, dtype=dtype).update_population_stats(every)
    sync.update_population_stats(iter(mine))
    _close(sync.running_mean, whole.running_mean, dtype, "population mean")
    _close(sync.running_var, whole.running_var, dtype, "population var")
    assert sync.num_batches_tracked == len(every)
    _same_on_every_rank(comm, [sync.running_mean, sync.running_var], "population statistics")

    state = _state(sync)
    bad_rank = size - 1
    batches = mine + [np.zeros((2, 4, 2), dtype)] if rank == bad_rank else mine
    _expect_failure_everywhere(lambda: sync.update_population_stats(batches), rank,
                               bad_rank, "input.shape[1] is 4")
    _assert_state(sync, state)


def check_rank(comm, rank, size, default_comm=False):
    """Every check on this rank; with default_comm (comm is then
    COMM_WORLD) the training layers are built without comm=."""
    layer_comm = None if default_comm else comm
    for dtype in (np.float32, np.float64):
        for options, shape_of in CONFIGS:
            check_training(comm, rank, size, dtype, options, shape_of, layer_comm)
        check_errors(comm, rank, size, dtype)
        check_population(comm, rank, size, dtype, layer_comm)


def main():
    expected_size = int(sys.argv[1]) if len(sys.argv) > 1 else None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        # A launcher of another MPI than mpi4py's starts N separate
        # one-rank worlds, which would check nothing: refuse.
        if expected_size is not None and comm.Get_size() != expected_size:
            raise AssertionError(
                f"started as one of {expected_size} ranks, but COMM_WORLD has "
                f"{comm.Get_size()}: mpiexec and mpi4py use different MPI libraries"
            )
        check_rank(comm, comm.Get_rank(), comm.Get_size(), default_comm=True)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        comm.Abort(1)
    print(f"rank {comm.Get_rank()}: ok", flush=True)


if __name__ == "__main__":
    main()
