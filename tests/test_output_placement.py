"""The streaming loops load a group of lines before they store any
(BN_GROUP_LINES in _leaf_loops.h), so that their speed does not depend on
where the output lies relative to the input modulo 4 KiB
(benchmarks/page_offsets.py measures that). Their results must not depend
on it either. For each loop that groups its lines, the output placed 16 to
176 bytes past the input's offset in a page (the placements that were
slow), before it, far from it and off 16-byte alignment, has the bits of
the output at the input's own offset and matches the float64 reference:

- the twin-run kernel: eval of runs longer than a chunk (two halves);
- the row-run loop: eval, training and backward of 7x7 and 5x5 maps, whose
  runs share lines;
- the fused statistics-and-normalisation loop: the pipelined training
  forward;
- the generic elementwise loop: eval of whole-line runs, and the two-pass
  backward's input gradient.

Rows and runs of these shapes leave 0-3 vectors after the last whole
group; outputs off 16-byte alignment (8 and 88 bytes) give the runs other
heads and tails; and the threads split the work in other places on 1 and
2 threads.
Streaming stores are forced (stream_min_bytes 0): the grouped loops are the
streaming ones."""

import numpy as np
import pytest

import bncore
from bncore import _kernels, reference

from conftest import assert_output_close, at_page_offset, make_input, make_params

OFFSETS = (16, 48, 80, 112, 176, -16, -64, 2048, 8, 88)
# (shape, pipelined forward, tiled backward): mode 1 forces, 0 forbids.
CASES = {
    "long runs": ((2, 3, 40000), 0, 0),
    "7x7": ((40, 24, 7, 7), 0, 0),
    "5x5": ((30, 40, 5, 5), 0, 0),
    "28x28 pipelined, tiled": ((4, 12, 28, 28), 1, 1),
    "28x28 two passes": ((4, 12, 28, 28), 0, 0),
    "1024 two passes": ((3, 5, 1024), 0, 0),
}


@pytest.fixture
def streaming_tuning():
    """Streaming stores at every size; the pipelined and tiled modes restored after."""
    stream = _kernels.set_stream_min_bytes(0)
    forward = _kernels.set_pipelined(-1)
    backward = _kernels.set_tiled_backward(-1)
    yield
    _kernels.set_stream_min_bytes(stream)
    _kernels.set_pipelined(*forward)
    _kernels.set_tiled_backward(*backward)


def _outputs(operation, x, dy, params, threads):
    """operation's output written into arrays at each offset from x's (0,
    then OFFSETS)."""
    weight, bias, running_mean, running_var = params
    outputs = []
    for offset in (0,) + OFFSETS:
        out = at_page_offset(np.zeros_like(x), offset)
        if operation == "eval":
            bncore.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                              out=out, num_threads=threads)
        elif operation == "train":
            bncore.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias,
                              training=True, out=out, num_threads=threads)
        else:
            mean, invstd = _batch_stats(x)
            bncore.batch_norm_backward(dy, x, mean, invstd, weight, training=True, out=out,
                                       num_threads=threads)
        outputs.append(out)
    return outputs


def _batch_stats(x):
    """The reference's batch mean and invstd, in x's dtype: the backward's
    inputs, the same for bncore and the reference."""
    result = reference.batch_norm(x, training=True)
    return result.mean.astype(x.dtype), result.invstd.astype(x.dtype)


def _want(operation, x, dy, params):
    weight, bias, running_mean, running_var = params
    if operation == "eval":
        return reference.batch_norm(x, running_mean, running_var, weight, bias).y
    if operation == "train":
        return reference.batch_norm(x, None, None, weight, bias, training=True).y
    mean, invstd = _batch_stats(x)
    return reference.batch_norm_backward(dy, x, mean, invstd, weight, training=True)[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("operation", ["eval", "train", "backward"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_placement_changes_no_bits(case, operation, dtype, streaming_tuning):
    shape, forward_mode, backward_mode = CASES[case]
    _kernels.set_pipelined(forward_mode)
    _kernels.set_tiled_backward(backward_mode)
    x = at_page_offset(make_input(shape, dtype, kind="normal", seed=3), 0)
    dy = at_page_offset(make_input(shape, dtype, kind="normal", seed=4), 2560)
    params = make_params(shape[1], dtype, seed=5)
    want = _want(operation, x, dy, params)
    # The backward's float32 rounding, as test_backward's comparison.
    tol = 1e-11 if dtype == np.float64 else 2e-5
    for threads in (1, 2):
        first, *others = _outputs(operation, x, dy, params, threads)
        if operation == "backward":
            np.testing.assert_allclose(first, want, rtol=tol,
                                       atol=tol * max(1.0, np.max(np.abs(want))))
        else:
            assert_output_close(first, want, dtype)
        for offset, out in zip(OFFSETS, others):
            assert np.array_equal(out.view(np.uint8), first.view(np.uint8)), (threads, offset)
