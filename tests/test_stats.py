"""bncore.stats: mergeable moments and exact population statistics.

Merged pieces are held against the single-call ``bncore.moments`` and the
float64 reference (conftest's tolerances: a merged variance is exact to
first order in ``eps64 * kappa``); merging order, empties, immutability and
every error; ``update_population_stats`` against the reference's moments of
the concatenated batches.
"""

import pickle

import numpy as np
import pytest

import bncore
from bncore import reference
from bncore.stats import Moments, merge_moments, partial_moments, update_population_stats
from conftest import (
    DTYPE_PARAMS,
    LAYOUT_PARAMS,
    assert_stats_close,
    channel_condition,
    channel_spread,
    make_input,
)


def _assert_moments_close(got, x, axis, dtype):
    """got (a Moments) against the reference moments of all of x."""
    rmean, rvar = reference.moments(x, axis=axis)
    assert got.count == x.size // x.shape[axis]
    assert_stats_close(got.mean, rmean, dtype, scale=channel_spread(x, axis), what="mean")
    assert_stats_close(got.var(), rvar, dtype, what="var", cond=channel_condition(x, axis))


def _split(x, bounds, along):
    """Pieces of x cut at the sorted positions ``bounds`` along an axis."""
    return np.split(x, bounds, axis=along)


# --------------------------------------------------------------------------
# partial_moments


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_partial_moments_is_the_kernels_moments(layout, dtype):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=600)
    before = x.copy()
    got = partial_moments(x, axis=axis)
    mean, var = bncore.moments(x, axis=axis)
    np.testing.assert_array_equal(x, before)
    assert isinstance(got, Moments)
    assert got.mean.dtype == got.m2.dtype == np.float64
    np.testing.assert_array_equal(got.mean, mean)
    np.testing.assert_array_equal(got.var(), var)
    np.testing.assert_array_equal(got.var(ddof=1), bncore.moments(x, axis=axis, ddof=1)[1])
    _assert_moments_close(got, x, axis, dtype)


def test_partial_moments_takes_lists_and_noncontiguous_views():
    x = make_input((10, 3, 4), np.float64, 1, seed=601)
    view = x[::2, :, ::-1]
    got = partial_moments(view)
    _assert_moments_close(got, view, 1, np.float64)
    listed = partial_moments(x[:, :, 0].tolist())
    _assert_moments_close(listed, x[:, :, 0], 1, np.float64)


def test_partial_moments_validates_through_functional():
    with pytest.raises(TypeError, match="x must have dtype"):
        partial_moments(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        partial_moments(np.zeros(3))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        partial_moments(np.zeros((3, 2)), axis=2)
    with pytest.raises(TypeError, match="num_threads"):
        partial_moments(np.zeros((3, 2)), num_threads="four")


# --------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", [((40, 5), 1), ((13, 4, 6), 1), ((12, 3, 5, 4), -1)],
                         ids=["NC", "NCL", "NHWC"])
def test_any_split_merges_to_the_whole(layout, dtype):
    shape, axis = layout
    x = make_input(shape, dtype, axis, seed=610)
    whole = partial_moments(x, axis)
    rng = np.random.default_rng(611)
    for _ in range(5):
        bounds = np.sort(rng.integers(0, shape[0] + 1, size=rng.integers(1, 6)))
        parts = [partial_moments(p, axis) for p in _split(x, bounds, 0)]
        merged = merge_moments(*parts)
        assert merged.count == whole.count
        _assert_moments_close(merged, x, axis, dtype)
        # Against the single call: the same tolerance (both are approximations).
        rmean = whole.mean
        assert_stats_close(merged.mean, rmean, dtype, scale=channel_spread(x, axis))
        assert_stats_close(merged.var(), whole.var(), dtype, cond=channel_condition(x, axis))


def test_split_along_a_non_batch_axis_merges_too():
    # Features on axis 1; cut along the spatial axis 2.
    x = make_input((3, 4, 17), np.float64, 1, seed=612)
    parts = [partial_moments(p) for p in _split(x, [2, 3, 11], 2)]
    _assert_moments_close(merge_moments(*parts), x, 1, np.float64)


def test_merge_is_deterministic_and_order_only_changes_rounding():
    x = make_input((30, 6), np.float64, 1, seed=613)
    parts = [partial_moments(p) for p in _split(x, [4, 9, 20, 21], 0)]
    first = merge_moments(*parts)
    again = merge_moments(*parts)
    np.testing.assert_array_equal(first.mean, again.mean)
    np.testing.assert_array_equal(first.m2, again.m2)
    reordered = merge_moments(*parts[::-1])
    pairwise = (parts[0] + parts[1]) + (parts[2] + (parts[3] + parts[4]))
    for other in (reordered, pairwise):
        assert other.count == first.count
        assert_stats_close(other.mean, first.mean, np.float64, scale=channel_spread(x, 1))
        assert_stats_close(other.var(), first.var(), np.float64,
                           cond=channel_condition(x, 1))
    # `+` is the two-part merge, bitwise.
    np.testing.assert_array_equal((parts[0] + parts[1]).m2, merge_moments(*parts[:2]).m2)


def test_merge_of_constant_pieces_has_zero_variance():
    # A channel of one repeated value at a large offset: every piece has
    # mean exactly c and M2 exactly 0, so the merge must too.
    x = np.full((25, 2), 12345.678)
    parts = [partial_moments(p) for p in _split(x, [3, 10, 11], 0)]
    merged = merge_moments(*parts)
    np.testing.assert_array_equal(merged.mean, [12345.678, 12345.678])
    np.testing.assert_array_equal(merged.var(), [0.0, 0.0])


def test_merge_with_huge_counts_does_not_overflow():
    # na * nb exceeds 2**63; the weights are computed on Python integers.
    a = Moments(3 * 10**12, [1.0], [3e12])
    b = Moments(5 * 10**12, [3.0], [5e12])
    merged = a + b
    assert merged.count == 8 * 10**12
    np.testing.assert_allclose(merged.mean, [1.0 + 2.0 * 5 / 8], rtol=1e-15)
    # M2 = 3e12 + 5e12 + 4 * 15e24 / 8e12 = 8e12 + 7.5e12
    np.testing.assert_allclose(merged.m2, [15.5e12], rtol=1e-15)


def test_nan_propagates_per_feature():
    x = make_input((10, 3), np.float64, 1, seed=614)
    x[7, 1] = np.nan
    merged = merge_moments(partial_moments(x[:5]), partial_moments(x[5:]))
    assert np.isnan(merged.mean[1]) and np.isnan(merged.m2[1])
    assert np.isfinite(merged.mean[[0, 2]]).all() and np.isfinite(merged.m2[[0, 2]]).all()


# --------------------------------------------------------------------------
# Empties


def test_empty_pieces_are_the_identity():
    x = make_input((9, 4), np.float64, 1, seed=620)
    part = partial_moments(x)
    empty = partial_moments(x[:0])
    assert empty.count == 0
    assert np.isnan(empty.mean).all()
    assert np.isnan(empty.var()).all() and np.isnan(empty.var(ddof=1)).all()
    for merged in (empty + part, part + empty, merge_moments(empty, part, empty),
                   merge_moments(part, Moments.empty(4))):
        assert merged.count == part.count
        np.testing.assert_array_equal(merged.mean, part.mean)
        np.testing.assert_array_equal(merged.m2, part.m2)
    nothing = merge_moments(empty, Moments.empty(4))
    assert nothing.count == 0 and np.isnan(nothing.mean).all()


def test_empty_inputs_of_every_kind():
    # An empty batch, an empty spatial axis, and zero features.
    assert partial_moments(np.zeros((0, 3, 4))).count == 0
    assert partial_moments(np.zeros((2, 3, 0))).count == 0
    zero_features = partial_moments(np.zeros((5, 0)))
    assert zero_features.num_features == 0
    assert zero_features.count == 5


def test_var_at_the_edges():
    one = partial_moments(np.array([[2.0, 3.0]]))
    assert one.count == 1
    np.testing.assert_array_equal(one.var(), [0.0, 0.0])
    assert np.isnan(one.var(ddof=1)).all()


# --------------------------------------------------------------------------
# The Moments object


def test_moments_are_immutable_copies():
    mean = np.array([1.0, 2.0])
    m2 = np.array([3.0, 4.0])
    m = Moments(4, mean, m2)
    mean[0] = 99.0
    m2[0] = 99.0
    np.testing.assert_array_equal(m.mean, [1.0, 2.0])
    np.testing.assert_array_equal(m.m2, [3.0, 4.0])
    with pytest.raises(ValueError):
        m.mean[0] = 5.0
    with pytest.raises(AttributeError):
        m.count = 3
    with pytest.raises(AttributeError):
        m.other = 3
    copy = pickle.loads(pickle.dumps(m))
    assert copy.count == 4
    np.testing.assert_array_equal(copy.m2, m.m2)
    assert "count=4" in repr(m)


def test_float32_statistics_are_stored_as_float64():
    m = Moments(3, np.array([1.5], np.float32), np.array([0.25], np.float32))
    assert m.mean.dtype == m.m2.dtype == np.float64


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((-1, [0.0], [0.0]), ValueError, "count must be >= 0"),
        ((2.0, [0.0], [0.0]), TypeError, "count must be a non-negative integer"),
        ((True, [0.0], [0.0]), TypeError, "count must be a non-negative integer"),
        ((2, [[0.0]], [[0.0]]), ValueError, "mean must be 1-D"),
        ((2, [0.0, 1.0], [0.0]), ValueError, r"m2 has shape \(1,\), expected \(2,\)"),
        ((2, [0.0], [-1.0]), ValueError, "must not be negative"),
        ((2, ["a"], [0.0]), ValueError, "could not convert"),
    ],
)
def test_bad_moments(args, error, message):
    with pytest.raises(error, match=message):
        Moments(*args)


def test_bad_merges():
    a = Moments(2, [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="parts\\[1\\] has 3 features, expected 2"):
        merge_moments(a, Moments(2, [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="has 3 features"):
        a + Moments.empty(3)
    with pytest.raises(TypeError, match="parts\\[1\\] must be a Moments"):
        merge_moments(a, (2, [0.0, 1.0], [1.0, 1.0]))
    with pytest.raises(TypeError, match="at least one"):
        merge_moments()
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(TypeError, match="ddof must be"):
        a.var(ddof=0.5)
    with pytest.raises(ValueError, match="ddof must be >= 0"):
        a.var(ddof=-1)


# --------------------------------------------------------------------------
# Property: random splits at random offsets (hypothesis)

try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None, database=None)
    @given(
        rows=st.integers(1, 40),
        channels=st.integers(1, 5),
        inner=st.sampled_from([1, 3, 8]),
        cuts=st.lists(st.integers(0, 40), max_size=6),
        offset=st.floats(-1e6, 1e6),
        spread=st.sampled_from([1e-2, 1.0, 1e3]),
        seed=st.integers(0, 2**16),
        dtype=st.sampled_from([np.float32, np.float64]),
    )
    def test_property_random_splits_merge_to_the_whole(rows, channels, inner, cuts, offset,
                                                       spread, seed, dtype):
        rng = np.random.default_rng(seed)
        x = (offset + spread * rng.standard_normal((rows, channels, inner))).astype(dtype)
        bounds = sorted(min(c, rows) for c in cuts)
        parts = [partial_moments(p) for p in _split(x, bounds, 0)]
        merged = merge_moments(*parts)
        whole = partial_moments(x)
        assert merged.count == whole.count == rows * inner
        _assert_moments_close(merged, x, 1, dtype)
        assert_stats_close(merged.mean, whole.mean, dtype, scale=channel_spread(x, 1))
        assert_stats_close(merged.var(), whole.var(), dtype, cond=channel_condition(x, 1))


# --------------------------------------------------------------------------
# update_population_stats


def _batches(shapes, dtype, axis, seed):
    return [make_input(shape, dtype, axis, seed=seed + k) for k, shape in enumerate(shapes)]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize(
    "layer, shapes, axis",
    [
        (bncore.BatchNorm1d, [(7, 5), (3, 5), (12, 5)], 1),
        (bncore.BatchNorm1d, [(4, 3, 6), (2, 3, 6), (5, 3)], 1),  # ranks may differ
        (bncore.BatchNorm2d, [(2, 4, 5, 5), (3, 4, 2, 7)], 1),  # spatial sizes may differ
        (bncore.BatchNorm2d, [(2, 5, 5, 4), (1, 3, 3, 4), (3, 2, 2, 4)], -1),
    ],
    ids=["NC", "mixed-ranks", "NCHW", "NHWC"],
)
def test_population_stats_are_those_of_all_batches(layer, shapes, axis, dtype):
    batches = _batches(shapes, dtype, axis, seed=630)
    bn = layer(shapes[0][axis], axis=axis, dtype=dtype)
    bn.eval()
    returned = update_population_stats(bn, iter(batches))  # a one-shot iterator
    assert returned is bn
    assert bn.num_batches_tracked == len(batches)
    assert bn.running_mean.dtype == bn.running_var.dtype == np.dtype(dtype)
    assert not bn.training  # the mode is left alone
    # The oracle: the reference over every value, channel by channel.
    columns = [np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1) for b in batches]
    everything = np.concatenate(columns, axis=1)
    rmean, rvar = reference.moments(everything, axis=0, ddof=1)
    spread = channel_spread(everything, 0)
    cond = channel_condition(everything, 0)
    assert_stats_close(bn.running_mean, rmean, dtype, scale=spread, what="running_mean")
    assert_stats_close(bn.running_var, rvar, dtype, what="running_var", cond=cond)


def test_population_stats_biased_when_the_layer_says_so():
    batches = _batches([(6, 3), (9, 3)], np.float64, 1, seed=640)
    bn = bncore.BatchNorm1d(3, dtype=np.float64)
    bn.unbiased_running_var = False
    update_population_stats(bn, batches)
    _, rvar = reference.moments(np.concatenate(batches), ddof=0)
    assert_stats_close(bn.running_var, rvar, np.float64,
                       cond=channel_condition(np.concatenate(batches), 1))


def test_population_stats_from_a_generator_and_with_threads():
    def stream():
        for k in range(4):
            yield make_input((8, 2, 3), np.float64, 1, seed=650 + k)

    one = update_population_stats(bncore.BatchNorm1d(2, dtype=np.float64), stream(),
                                  num_threads=1)
    two = update_population_stats(bncore.BatchNorm1d(2, dtype=np.float64), stream(),
                                  num_threads=2)
    np.testing.assert_array_equal(one.running_mean, two.running_mean)
    np.testing.assert_array_equal(one.running_var, two.running_var)
    assert one.num_batches_tracked == 4


def test_a_bad_batch_leaves_the_layer_untouched():
    bn = bncore.BatchNorm1d(3, dtype=np.float64)
    bn.train()
    bn(make_input((5, 3), np.float64, 1, seed=660))
    before = bn.state_dict()
    good = make_input((5, 3), np.float64, 1, seed=661)
    cases = [
        ([good, good, np.zeros((5, 4))], ValueError, r"batches\[2\]: input.shape\[1\] is 4"),
        ([good, good.astype(np.float32)], TypeError, r"batches\[1\]: input has dtype float32"),
        ([good, np.zeros((2, 3, 4, 5))], ValueError, r"batches\[1\]: BatchNorm1d expected"),
        ([], ValueError, "batches is empty"),
        ([good[:1]], ValueError, "1 value\\(s\\) per feature in all"),
        ([good[:0], good[:0]], ValueError, "0 value\\(s\\) per feature"),
    ]
    for batches, error, message in cases:
        with pytest.raises(error, match=message):
            update_population_stats(bn, batches)
        after = bn.state_dict()
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_population_stats_argument_errors():
    x = make_input((5, 3), np.float32, 1, seed=670)
    with pytest.raises(TypeError, match="bn must be a bncore BatchNorm"):
        update_population_stats(object(), [x])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        update_population_stats(bncore.BatchNorm1d(3, track_running_stats=False), [x])
    with pytest.raises(TypeError, match="for one array pass \\[array\\]"):
        update_population_stats(bncore.BatchNorm1d(3), x)
    with pytest.raises(TypeError, match="iterable of arrays"):
        update_population_stats(bncore.BatchNorm1d(3), 3)


@pytest.mark.parametrize("mode", ["propagate", "skip_update", "raise"])
def test_population_stats_follow_the_nonfinite_policy(mode):
    bn = bncore.BatchNorm1d(2, dtype=np.float64, nonfinite=mode)
    batches = _batches([(4, 2), (4, 2)], np.float64, 1, seed=680)
    batches[1][2, 0] = np.inf
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="feature\\(s\\) 0"):
            update_population_stats(bn, batches)
    else:
        update_population_stats(bn, batches)
    if mode == "propagate":
        assert not np.isfinite(bn.running_mean[0]) and np.isfinite(bn.running_mean[1])
        assert bn.num_batches_tracked == 2
    else:
        np.testing.assert_array_equal(bn.running_mean, [0.0, 0.0])
        np.testing.assert_array_equal(bn.running_var, [1.0, 1.0])
        assert bn.num_batches_tracked == 0


def test_the_layer_method_delegates_to_update_population_stats():
    batches = [np.arange(12.0).reshape(4, 3), np.ones((5, 3))]
    by_method = bncore.BatchNorm1d(3, dtype=np.float64).update_population_stats(batches)
    by_function = update_population_stats(bncore.BatchNorm1d(3, dtype=np.float64), batches)
    np.testing.assert_array_equal(by_method.running_mean, by_function.running_mean)
    np.testing.assert_array_equal(by_method.running_var, by_function.running_var)
    assert by_method.num_batches_tracked == 2
