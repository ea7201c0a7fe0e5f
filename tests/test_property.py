"""Property test: random small shapes, axes, seeds and modes against the
reference (hypothesis)."""

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

from conftest import make_input, n_channels  # noqa: E402
from test_functional import _check_against_reference  # noqa: E402


@settings(max_examples=60, deadline=None, database=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    axis_seed=st.integers(0, 100),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
    training=st.booleans(),
    affine=st.booleans(),
    momentum=st.sampled_from([0.0, 0.1, 0.9, 1.0]),
)
def test_property_matches_reference(shape, axis_seed, seed, dtype, training, affine,
                                    momentum):
    shape = tuple(shape)
    axis = axis_seed % (2 * len(shape)) - len(shape)  # any valid axis, either sign
    c = n_channels(shape, axis)
    n = int(np.prod(shape)) // c
    assume(not (training and n == 1))  # an error, covered in test_functional
    x = make_input(shape, dtype, axis, seed=seed)
    _check_against_reference(x, axis, dtype, training=training, affine=affine,
                             running=True, momentum=momentum, seed=seed)
