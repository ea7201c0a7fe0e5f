"""Recycled buffers for large outputs (bncore/_output_pool.h).

An allocating call (no ``out=``) whose output is 16 MB or more gets its
buffer from a NumPy memory handler that keeps up to two freed output
buffers for the next output of the same size, so that a loop ``y = bn(x)``
does not fault in fresh pages on every call. These tests check that the
buffers are really reused, stay bounded, are released on request, are
reported to tracemalloc, and that the arrays behave as any NumPy array.
"""

import gc
import sys
import tracemalloc

import numpy as np
import pytest

import bncore
from bncore import _kernels

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="buffers are only kept on Linux")

LARGE = (5, 8, 512, 256)  # 5.2 M float32 values, 21 MB: above the 16 MB threshold


def _address(a):
    return a.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def empty_pool():
    gc.collect()
    bncore.release_memory()
    yield
    gc.collect()
    bncore.release_memory()


def _inputs():
    x = np.random.default_rng(0).standard_normal(LARGE, dtype=np.float32)
    return x, np.zeros(8, np.float32), np.ones(8, np.float32)


def test_a_freed_output_buffer_is_reused_by_the_next_output():
    x, mean, var = _inputs()
    first = bncore.batch_norm(x, mean, var)
    address = _address(first)
    del first
    assert _kernels.pool_bytes() >= x.nbytes
    second = bncore.batch_norm(x, mean, var)
    assert _address(second) == address
    assert _kernels.pool_bytes() == 0
    # The recycled buffer holds the new result, not the old one.
    want = np.empty_like(x)
    bncore.batch_norm(x * 2, mean, var, out=want)
    third = bncore.batch_norm(x * 2, mean, var)
    np.testing.assert_array_equal(third, want)
    np.testing.assert_array_equal(second, bncore.batch_norm(x, mean, var, out=np.empty_like(x)))


def test_the_backward_and_training_outputs_recycle_too():
    x, mean, var = _inputs()
    y, m, invstd = bncore.batch_norm(x, mean, var, training=True, return_stats=True)
    address = _address(y)
    del y
    grad_input, _, _ = bncore.batch_norm_backward(x, x, m, invstd)
    assert _address(grad_input) == address


def test_kept_buffers_are_bounded_and_released_on_request():
    x, mean, var = _inputs()
    outputs = [bncore.batch_norm(x, mean, var) for _ in range(4)]
    del outputs
    kept = _kernels.pool_bytes()
    assert x.nbytes * 2 <= kept <= x.nbytes * 2 * 1.01  # two slots, not four
    assert bncore.release_memory() == kept
    assert _kernels.pool_bytes() == 0


def test_small_and_very_different_sizes_are_not_recycled():
    x, mean, var = _inputs()
    small = bncore.batch_norm(x[:1, :, :8], mean, var)  # far below 16 MB
    del small
    assert _kernels.pool_bytes() == 0
    big = bncore.batch_norm(x, mean, var)
    address = _address(big)
    del big
    # An output of half the size does not take (and pin) the larger buffer.
    half = bncore.batch_norm(np.ascontiguousarray(x[:, :4]), mean[:4], var[:4])
    assert _address(half) != address
    assert _kernels.pool_bytes() >= x.nbytes


def test_pooled_outputs_are_seen_by_tracemalloc():
    x, mean, var = _inputs()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        y = bncore.batch_norm(x, mean, var)
        alive = tracemalloc.get_traced_memory()[0]
        del y
        freed = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert alive - before >= x.nbytes
    assert alive - freed >= x.nbytes  # kept for reuse is not in use


def test_pooled_arrays_behave_as_numpy_arrays():
    a = _kernels.pooled_empty((3, 2**22), np.float32)  # 48 MB
    a[:] = 1.5
    view = a[1]
    del a
    gc.collect()
    assert view.base is not None and (view == 1.5).all()  # the view keeps it alive
    b = _kernels.pooled_empty((2**23,), np.float32)
    b[:] = np.arange(b.size, dtype=np.float32)
    b.resize((2**23 + 7,), refcheck=False)  # through the handler's realloc
    np.testing.assert_array_equal(b[:2**23], np.arange(2**23, dtype=np.float32))
    assert b.shape == (2**23 + 7,)
