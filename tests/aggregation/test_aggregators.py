"""WeightedMean and the shared input checks (the contract suite is in test_contract.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.aggregation.aggregators import (
    AggregationError,
    PreconditionError,
    WeightedMean,
    check_inputs,
    finite_output,
)


def _inputs(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(1, 100, n).astype(np.float64)


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


def test_weighted_mean_declares_itself() -> None:
    assert (WeightedMean().name, WeightedMean().min_inputs, WeightedMean().uses_weights) == (
        "weighted-mean",
        1,
        True,
    )


def test_finite_inputs_whose_sum_overflows_are_accepted() -> None:
    """The fast finiteness check (a finite total) falls back to the exact one on overflow."""
    check_inputs(np.full((4, 3), 1e308), np.ones(4))


def test_an_overflowing_aggregate_is_refused() -> None:
    with pytest.raises(AggregationError, match="overflowed"):
        finite_output("rule", np.array([np.inf]))


def test_precondition_error_names_rule_condition_and_numbers() -> None:
    error = PreconditionError("krum", "n >= 2f + 3 = 7 inputs", 6, 2)
    assert str(error) == "krum needs n >= 2f + 3 = 7 inputs; got n = 6, f = 2"
    assert (error.rule, error.n, error.f) == ("krum", 6, 2)
    assert isinstance(error, AggregationError)
