"""Federated statistics (fedmq/statistics.py): device summaries merged with Chan et al.'s rule
equal numpy on the union of the values: exactly for count, min, max and histogram, within
1e-12 (relative) for mean and variance, also with hostile data (offsets of 1e9 with small noise,
single values, devices without values), for random splits and merge orders; and what the
aggregator accepts from a device (read_contribution)."""

from __future__ import annotations

from fractions import Fraction
from functools import reduce

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.statistics import (
    Summary,
    column_statistics,
    contribution_tensors,
    empty,
    equal_width_edges,
    from_flat,
    merge,
    read_contribution,
    summarize,
    to_flat,
)
from fedmq.wire import StatsColumn

F64 = npt.NDArray[np.float64]
EDGES = equal_width_edges(-5.0, 5.0, 20)


def exact_moments(x: F64) -> tuple[Fraction, Fraction]:
    """Mean and population variance of ``x`` in exact rational arithmetic."""
    xs = [Fraction(float(v)) for v in x]
    mean = sum(xs, Fraction(0)) / len(xs)
    return mean, sum(((v - mean) ** 2 for v in xs), Fraction(0)) / len(xs)


def rel(got: float, want: Fraction | float) -> float:
    want = Fraction(want)
    if want == 0:
        return abs(got)
    return float(abs(Fraction(got) - want) / abs(want))


def merged(parts: list[F64], edges: tuple[float, ...] = EDGES) -> Summary:
    return reduce(merge, (summarize(p, edges) for p in parts), empty(len(edges) - 1))


def check_against_union(parts: list[F64], edges: tuple[float, ...] = EDGES,
                        exact: bool = True) -> dict[str, float]:
    """Assert the merge of ``parts`` against the union; return the relative errors."""
    union = np.concatenate(parts)
    s = merged(parts, edges)
    col = column_statistics("x", edges, s)
    assert col.count == union.size
    assert col.min == union.min()
    assert col.max == union.max()
    assert col.hist == tuple(int(h) for h in np.histogram(union, edges)[0])
    assert col.underflow == int((union < edges[0]).sum())
    assert col.overflow == int((union > edges[-1]).sum())
    assert col.devices == sum(1 for p in parts if p.size)
    assert col.mean is not None
    assert col.variance is not None
    if exact:
        mean, var = exact_moments(union)
    else:
        mean, var = Fraction(float(np.mean(union))), Fraction(float(np.var(union)))
    errors = {"mean": rel(col.mean, mean), "variance": rel(col.variance, var)}
    if union.size > 1:
        assert col.sample_variance is not None
        errors["sample_variance"] = rel(col.sample_variance, var * union.size / (union.size - 1))
    assert max(errors.values()) < 1e-12, errors  # against the exact values
    # numpy on the union agrees too, wherever numpy itself is right: at an offset of 1e12 with
    # noise of 1e-3 its two-pass variance is off by ~1e-10 (reported, not asserted).
    errors["numpy_variance"] = rel(float(np.var(union)), var) if exact else 0.0
    assert rel(col.mean, float(np.mean(union))) < 1e-12
    if errors["numpy_variance"] < 1e-13:
        assert rel(col.variance, float(np.var(union))) < 1e-12 or var == 0
    return errors


def test_plain_split() -> None:
    rng = np.random.default_rng(0)
    check_against_union([rng.normal(0, 2, n) for n in (10, 1000, 3, 77)])


@pytest.mark.parametrize("offset", [1e6, 1e9, -1e9, 1e12])
def test_large_offset_with_small_noise(offset: float) -> None:
    """Naive sums of squares lose every digit here; the double-double mean keeps them."""
    rng = np.random.default_rng(1)
    parts = [offset + rng.normal(0, 1e-3 if offset >= 1e12 else 1.0, n) for n in (500, 7, 1, 2000)]
    edges = equal_width_edges(offset - 5, offset + 5, 10)
    errors = check_against_union(parts, edges)
    print(f"offset {offset:g}: relative errors {errors}")


def test_single_values_and_empty_devices() -> None:
    parts = [np.array([3.25]), np.zeros(0), np.array([-1.5]), np.zeros(0), np.array([1e9])]
    edges = equal_width_edges(-2.0, 4.0, 6)
    check_against_union(parts, edges)
    s = merged([np.zeros(0), np.zeros(0)])
    col = column_statistics("x", EDGES, s)
    assert (col.count, col.mean, col.variance, col.min, col.max) == (0, None, None, None, None)
    one = column_statistics("x", EDGES, merged([np.array([2.0])]))
    assert (one.count, one.mean, one.variance, one.sample_variance) == (1, 2.0, 0.0, None)


def test_identical_values_have_zero_variance() -> None:
    parts = [np.full(n, 1e9 + 0.5) for n in (3, 1, 1000)]
    col = column_statistics("x", EDGES, merged(parts))
    assert col.mean == 1e9 + 0.5
    assert col.variance == 0.0
    assert col.overflow == 1004


def test_nan_readings_are_skipped() -> None:
    s = summarize(np.array([1.0, np.nan, 3.0, np.inf]), EDGES)
    assert (s.count, s.total_mean, s.min, s.max) == (2, 2.0, 1.0, 3.0)


def test_values_beyond_1e100_are_refused() -> None:
    with pytest.raises(ValueError, match="beyond"):
        summarize(np.array([0.0, 1e101]), EDGES)


#: Deviations below ~1e-154 underflow when squared, in any float64 variance (numpy's too).
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False,
                   allow_infinity=False).filter(lambda v: v == 0 or abs(v) > 1e-100)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=200),
       cuts=st.lists(st.integers(0, 200), max_size=8),
       offset=st.sampled_from([0.0, 1e9, -3e7]),
       seed=st.integers(0, 2**32 - 1))
def test_any_split_in_any_order_equals_the_union(values: list[float], cuts: list[int],
                                                 offset: float, seed: int) -> None:
    x = np.asarray(values) + offset
    bounds = sorted({min(c, x.size) for c in cuts})
    parts = np.split(x, bounds)  # empty parts included: devices with no values
    order = np.random.default_rng(seed).permutation(len(parts))
    edges = equal_width_edges(offset - 1e5, offset + 1e5, 13)
    check_against_union([parts[i] for i in order], edges)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), devices=st.integers(2, 12))
def test_merge_tree_shape_does_not_matter(seed: int, devices: int) -> None:
    """Merging pairwise in a random tree equals merging one at a time (both vs the union)."""
    rng = np.random.default_rng(seed)
    parts = [1e9 + rng.normal(0, rng.uniform(0.1, 10), rng.integers(0, 50)) for _ in
             range(devices)]
    if not sum(p.size for p in parts):
        parts[0] = np.array([1e9])
    pool = [summarize(p, EDGES) for p in parts]
    while len(pool) > 1:
        i, j = sorted(rng.choice(len(pool), 2, replace=False))
        b, a = pool.pop(j), pool.pop(i)
        pool.append(merge(a, b))
    union = np.concatenate(parts)
    mean, var = exact_moments(union)
    col = column_statistics("x", EDGES, pool[0])
    assert col.count == union.size
    assert col.min == union.min()
    assert col.max == union.max()
    assert col.mean is not None
    assert col.variance is not None
    assert rel(col.mean, mean) < 1e-12
    assert rel(col.variance, var) < 1e-12


def test_snapshot_form_round_trips_exactly() -> None:
    rng = np.random.default_rng(5)
    columns = [StatsColumn("a", EDGES), StatsColumn("b", equal_width_edges(0, 1, 3))]
    summaries = [merged([rng.normal(0, 1, 10), rng.normal(1e9, 1, 5)]),
                 merged([np.zeros(0)], columns[1].edges)]
    back = from_flat(to_flat(summaries), columns)
    for s, b in zip(summaries, back, strict=True):
        assert (s.count, s.mean, s.mean_lo, s.m2, s.min, s.max, s.devices) == (
            b.count, b.mean, b.mean_lo, b.m2, b.min, b.max, b.devices)
        np.testing.assert_array_equal(s.hist, b.hist)
    with pytest.raises(ValueError, match="saved statistics"):
        from_flat(to_flat(summaries)[:-1], columns)


# ---------------------------------------------------------------- contributions


COLUMNS = (StatsColumn("t", EDGES),)


def test_a_device_summary_reads_back_unchanged() -> None:
    s = summarize(np.random.default_rng(2).normal(1e9, 3, 100), EDGES)
    got, reason, _ = read_contribution(contribution_tensors({"t": s}), COLUMNS)
    assert reason == ""
    assert got is not None
    g = got["t"]
    assert (g.count, g.mean, g.mean_lo, g.m2, g.min, g.max) == (
        s.count, s.mean, s.mean_lo, s.m2, s.min, s.max)
    np.testing.assert_array_equal(g.hist, s.hist)
