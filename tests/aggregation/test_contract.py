"""The contract every aggregator passes: each rule, and a few pre-aggregation pipelines.

- permutation invariance (exact for deterministic rules; for pipelines that shuffle
  with a seeded generator, the output on permuted inputs is still a valid robust
  output: inside the inputs' coordinate-wise hull);
- identity on equal inputs;
- bounded output with ``f`` outliers at the rule's breakdown point (the largest
  ``f`` its precondition accepts at that ``n``), for outliers of any size: the
  output stays in the honest inputs' box (or within the rule's proven radius) and
  stops moving once the outliers are far;
- ``min_inputs`` is tight: accepted at ``min_inputs``, refused with a
  ``PreconditionError`` (naming the rule and the numbers) one below;
- bad inputs (shape, NaN/Inf, weights) raise ``AggregationError``;
- rules that say they ignore the weights do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedguard.aggregation.aggregators import (
    AggregationError,
    Aggregator,
    PreconditionError,
    WeightedMean,
)
from fedguard.aggregation.preaggregation import Bucketing, Composed, NearestNeighborMixing
from fedguard.aggregation.robust import (
    CenteredClipping,
    CenterReference,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBounding,
    TrimmedMean,
)

TAU = 10.0
BOUND = 10.0


@dataclass(frozen=True)
class Case:
    """A rule built for a declared ``f``, and what it guarantees against ``f`` outliers."""

    id: str
    make: Callable[[int], Aggregator]
    guarantee: str  # "box": in the honest box; "ball": within radius(); "none": not robust
    randomized: bool = False
    radius: Callable[[int, int, float], float] | None = None  # (n, f, honest radius) -> bound

    def max_f(self, n: int) -> int:
        """The breakdown point at ``n``: the largest ``f`` the precondition accepts."""
        f = 0
        while f + 1 < n and self.make(f + 1).min_inputs <= n:
            f += 1
        return f


def _geomed_radius(n: int, f: int, r: float) -> float:
    # Minsker (2015): ‖z − y‖ ≤ 2(n − f)/(n − 2f) · max_h ‖x_h − y‖, slack for Weiszfeld.
    return 2 * (n - f) / (n - 2 * f) * r * 1.01 + 1e-6


def _cc_radius(n: int, f: int, r: float) -> float:
    # Every step moves v by at most τ, and the outliers' share of it is at most fτ/n.
    return 3 * TAU + r


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


CASES: list[Case] = [
    Case("weighted-mean", lambda f: WeightedMean(), "none"),
    Case("median", CoordinateMedian, "box"),
    Case("trimmed-mean", TrimmedMean, "box"),
    Case("trimmed-mean-beta", lambda f: TrimmedMean(f, trim_fraction=0.45), "box"),
    Case("krum", Krum, "box"),
    Case("multi-krum", MultiKrum, "box"),
    Case("multi-krum-m3", lambda f: MultiKrum(f, m=3), "box"),
    Case("geometric-median", GeometricMedian, "ball", radius=_geomed_radius),
    Case("centered-clipping", lambda f: CenteredClipping(TAU, 3, f=f), "ball", radius=_cc_radius),
    Case(
        "centered-clipping-previous",
        lambda f: CenteredClipping(TAU, 2, CenterReference.PREVIOUS, f=f),
        "ball",
        radius=_cc_radius,
    ),
    Case("norm-bounding", lambda f: NormBounding(BOUND), "norm"),
    Case("nnm+krum", lambda f: Composed((NearestNeighborMixing(f),), Krum(f)), "box"),
    Case(
        "nnm+trimmed-mean", lambda f: Composed((NearestNeighborMixing(f),), TrimmedMean(f)), "box"
    ),
    Case(
        "bucketing+median",
        lambda f: Composed((Bucketing(2, _rng(7)),), CoordinateMedian(f)),
        "box",
        randomized=True,
    ),
    Case(
        "nnm+bucketing+geometric-median",
        lambda f: Composed((NearestNeighborMixing(f), Bucketing(2, _rng(7))), GeometricMedian(f)),
        "ball",
        randomized=True,
        radius=_geomed_radius,
    ),
]
ROBUST = [c for c in CASES if c.guarantee in {"box", "ball"}]


def _ids(case: Case) -> str:
    return case.id


def _inputs(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(1, 100, n).astype(np.float64)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 13), d=st.integers(1, 12))
def test_permutation_invariance(case: Case, seed: int, n: int, d: int) -> None:
    f = _rng(seed).integers(0, case.max_f(n) + 1)
    assume(case.make(int(f)).min_inputs <= n)
    updates, weights = _inputs(seed, n, d)
    order = _rng(seed + 1).permutation(n)
    first = case.make(int(f)).aggregate(updates, weights)
    second = case.make(int(f)).aggregate(updates[order], weights[order])
    if case.randomized:
        low, high = updates.min(axis=0), updates.max(axis=0)
        assert np.all(second >= low - 1e-9) and np.all(second <= high + 1e-9)
    else:
        np.testing.assert_allclose(first, second, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_identity_on_equal_inputs(case: Case) -> None:
    row = np.linspace(-1, 1, 7)  # norm < TAU and BOUND: clipping leaves it whole
    n = 15
    aggregator = case.make(case.max_f(n))
    out = aggregator.aggregate(np.tile(row, (n, 1)), np.arange(1.0, n + 1))
    np.testing.assert_allclose(out, row, rtol=1e-12, atol=1e-12)


def _attack(kind: str, honest: np.ndarray, f: int, scale: float, seed: int) -> np.ndarray:
    rng = _rng(seed)
    d = honest.shape[1]
    if kind == "colluding":
        return np.tile(scale * np.ones(d) / np.sqrt(d), (f, 1))
    if kind == "scattered":
        directions = rng.normal(size=(f, d))
        return np.asarray(scale * directions / np.linalg.norm(directions, axis=1, keepdims=True))
    # sign flip, scaled: the honest mean reversed and blown up
    return np.tile(-scale * honest.mean(axis=0) / np.linalg.norm(honest.mean(axis=0)), (f, 1))


@pytest.mark.parametrize("attack", ["colluding", "scattered", "sign-flip"])
@pytest.mark.parametrize("case", [*ROBUST, *(c for c in CASES if c.guarantee == "norm")], ids=_ids)
@pytest.mark.parametrize("n", [9, 15])
def test_bounded_with_f_outliers_at_breakdown(case: Case, attack: str, n: int) -> None:
    d = 6
    f = case.max_f(n) if case.guarantee != "norm" else n // 2
    honest = 2.0 + _rng(n).normal(size=(n - f, d))
    centre = honest.mean(axis=0)
    radius = float(np.linalg.norm(honest - centre, axis=1).max())
    weights = np.ones(n)  # equal weights: the breakdown points are counted in inputs
    outputs = []
    for scale in (1e6, 1e12):
        updates = np.vstack([honest, _attack(attack, honest, f, scale, seed=n)])
        order = _rng(n + 1).permutation(n)  # outliers are not conveniently last
        out = case.make(0 if case.guarantee == "norm" else f).aggregate(updates[order], weights)
        outputs.append(out)
        if case.guarantee == "box":
            assert np.all(out >= honest.min(axis=0) - 1e-9), (case.id, scale)
            assert np.all(out <= honest.max(axis=0) + 1e-9), (case.id, scale)
        elif case.guarantee == "ball":
            assert case.radius is not None
            shift = float(np.linalg.norm(out - centre))
            assert shift <= case.radius(n, f, radius), (case.id, scale, shift)
        else:
            assert np.linalg.norm(out) <= BOUND * (1 + 1e-12)
    # Outliers a million times farther move the output by (almost) nothing.
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-3 * (1 + radius))


def test_the_mean_is_not_bounded() -> None:
    """Negative control: the bounded-output test would catch a non-robust rule."""
    honest = _rng(0).normal(size=(8, 4))
    far = np.vstack([honest, 1e12 * np.ones((1, 4))])
    assert np.linalg.norm(WeightedMean().aggregate(far, np.ones(9))) > 1e10


@pytest.mark.parametrize("case", [c for c in CASES if c.guarantee != "none"], ids=_ids)
@pytest.mark.parametrize("f", [1, 2])
def test_min_inputs_is_tight(case: Case, f: int) -> None:
    aggregator = case.make(f)
    n = aggregator.min_inputs
    updates, weights = _inputs(f, n, 5)
    assert case.make(f).aggregate(updates, weights).shape == (5,)
    if n == 1:
        return
    with pytest.raises(PreconditionError) as refused:
        case.make(f).aggregate(updates[:-1], weights[:-1])
    message = str(refused.value)
    assert aggregator.name.split("+")[0] in message
    assert f"n = {n - 1}" in message or f"got n = {n - 1}" in message
    assert f"f = {f}" in message


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize(
    ("updates", "weights"),
    [
        (np.zeros((0, 3)), np.zeros(0)),
        (np.zeros((3, 0)), np.ones(3)),
        (np.zeros(3), np.ones(1)),
        (np.array([[np.nan, 0.0]] * 9), np.ones(9)),
        (np.array([[np.inf, 0.0]] * 9), np.ones(9)),
        (np.array([[np.inf, 0.0], [-np.inf, 0.0]] * 5), np.ones(10)),
        (np.ones((9, 2)), np.ones(3)),
        (np.ones((9, 2)), np.array([1.0, -1.0] * 4 + [1.0])),
        (np.ones((9, 2)), np.array([np.nan] * 9)),
    ],
)
def test_bad_inputs_raise(case: Case, updates: np.ndarray, weights: np.ndarray) -> None:
    with pytest.raises(AggregationError):
        case.make(0).aggregate(updates, weights)


@pytest.mark.parametrize("case", [c for c in CASES if not c.make(1).uses_weights], ids=_ids)
def test_rules_that_ignore_weights_ignore_them(case: Case) -> None:
    updates, weights = _inputs(3, 11, 6)
    other = _rng(4).integers(0, 1000, 11).astype(np.float64)
    np.testing.assert_array_equal(
        case.make(1).aggregate(updates, weights), case.make(1).aggregate(updates, other)
    )


def _final_rule(aggregator: Aggregator) -> Aggregator:
    return aggregator.rule if isinstance(aggregator, Composed) else aggregator


@pytest.mark.parametrize(
    "case", [c for c in CASES if _final_rule(c.make(1)).uses_weights], ids=_ids
)
def test_rules_that_use_weights_refuse_zero_total(case: Case) -> None:
    updates, _ = _inputs(3, 11, 6)
    with pytest.raises(AggregationError, match="zero"):
        case.make(1).aggregate(updates, np.zeros(11))
