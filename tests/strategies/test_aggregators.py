"""Contract tests every aggregator must pass, plus rule-specific checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.strategies.aggregators import AggregationError, Aggregator, WeightedMean

AGGREGATORS: list[Aggregator] = [WeightedMean()]


def _inputs(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(1, 100, n).astype(np.float64)


@pytest.mark.parametrize("rule", AGGREGATORS, ids=lambda r: r.name)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), d=st.integers(1, 20))
def test_permutation_invariance(rule: Aggregator, seed: int, n: int, d: int) -> None:
    updates, weights = _inputs(seed, n, d)
    order = np.random.default_rng(seed + 1).permutation(n)
    np.testing.assert_allclose(
        rule.aggregate(updates, weights), rule.aggregate(updates[order], weights[order]), atol=1e-12
    )


@pytest.mark.parametrize("rule", AGGREGATORS, ids=lambda r: r.name)
def test_identity_on_equal_inputs(rule: Aggregator) -> None:
    row = np.linspace(-1, 1, 7)
    np.testing.assert_allclose(rule.aggregate(np.tile(row, (5, 1)), np.arange(1.0, 6.0)), row)


@pytest.mark.parametrize("rule", AGGREGATORS, ids=lambda r: r.name)
@pytest.mark.parametrize(
    ("updates", "weights"),
    [
        (np.zeros((0, 3)), np.zeros(0)),
        (np.zeros(3), np.ones(1)),
        (np.array([[np.nan, 0.0]]), np.ones(1)),
        (np.ones((2, 2)), np.ones(3)),
        (np.ones((2, 2)), np.array([1.0, -1.0])),
    ],
)
def test_bad_inputs_raise(rule: Aggregator, updates: np.ndarray, weights: np.ndarray) -> None:
    with pytest.raises(AggregationError):
        rule.aggregate(updates, weights)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), d=st.integers(1, 20))
def test_weighted_mean_matches_naive_loop(seed: int, n: int, d: int) -> None:
    updates, weights = _inputs(seed, n, d)
    naive = np.zeros(d)
    for row, w in zip(updates, weights, strict=True):
        naive += w * row
    naive /= weights.sum()
    np.testing.assert_allclose(WeightedMean().aggregate(updates, weights), naive, atol=1e-12)


def test_weighted_mean_refuses_zero_total_weight() -> None:
    with pytest.raises(AggregationError, match="zero"):
        WeightedMean().aggregate(np.ones((2, 2)), np.zeros(2))
