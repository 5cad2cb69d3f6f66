"""Robust rules, pre-aggregation and the registry: fast kernels against naive loops, and each
rule's own semantics (parameters, preconditions, weights, state)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.aggregation.aggregators import (
    AggregationError,
    PreconditionError,
    RuleParameterError,
    WeightedMean,
)
from fedguard.aggregation.kernels import (
    centered_clip,
    coordinate_median,
    coordinate_trimmed_mean,
    gram,
    krum_scores,
    mix_rows,
    norm_clip_factors,
    order_by,
    pairwise_sq_distances,
    row_sq_distances,
    smoothed_weiszfeld,
)
from fedguard.aggregation.preaggregation import (
    Bucketing,
    Composed,
    NearestNeighborMixing,
    bucket_means,
)
from fedguard.aggregation.registry import (
    OPTION_KEYS,
    AggregatorConfig,
    AggregatorName,
    CenterReference,
    PreAggregationName,
    build_aggregator,
)
from fedguard.aggregation.robust import (
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBounding,
    TrimmedMean,
)
from fedguard.core.errors import ConfigError

EXAMPLES = settings(max_examples=25, deadline=None)


def _matrix(seed: int, n: int, d: int, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:  # small integers: many equal values per coordinate
        return rng.integers(-3, 4, size=(n, d)).astype(np.float64)
    return np.asarray(rng.normal(size=(n, d)) * rng.choice([1e-3, 1.0, 1e3]))


dims = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 14), st.integers(1, 40))


# ------------------------------------------------------------------ kernels vs naive loops


@EXAMPLES
@given(dims=dims, ties=st.booleans(), block=st.integers(1, 9))
def test_median_kernel_matches_a_loop_over_coordinates(
    dims: tuple[int, int, int], ties: bool, block: int
) -> None:
    x = _matrix(*dims, ties=ties)
    naive = np.array([sorted(col)[len(col) // 2] for col in x.T])
    if x.shape[0] % 2 == 0:
        naive = np.array(
            [0.5 * (sorted(col)[len(col) // 2 - 1] + sorted(col)[len(col) // 2]) for col in x.T]
        )
    fast = coordinate_median(x, block=block)
    np.testing.assert_array_equal(fast, naive)
    np.testing.assert_array_equal(fast, np.median(x, axis=0))


@EXAMPLES
@given(dims=dims, ties=st.booleans(), block=st.integers(1, 9), data=st.data())
def test_trimmed_mean_kernel_matches_a_loop(
    dims: tuple[int, int, int], ties: bool, block: int, data: st.DataObject
) -> None:
    x = _matrix(*dims, ties=ties)
    n = x.shape[0]
    k = data.draw(st.integers(0, (n - 1) // 2))
    naive = np.array([np.mean(sorted(col)[k : n - k]) for col in x.T])
    np.testing.assert_allclose(coordinate_trimmed_mean(x, k, block=block), naive, rtol=1e-12)


def test_trimmed_mean_kernel_refuses_trimming_everything() -> None:
    with pytest.raises(ValueError, match="cannot trim"):
        coordinate_trimmed_mean(np.ones((4, 2)), 2)


@EXAMPLES
@given(dims=dims)
def test_gram_distances_match_loops(dims: tuple[int, int, int]) -> None:
    x = _matrix(*dims)
    n = x.shape[0]
    naive = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    scale = float(np.max(np.sum(x**2, axis=1)))
    np.testing.assert_allclose(pairwise_sq_distances(x), naive, atol=1e-12 * scale)
    np.testing.assert_allclose(gram(x), x @ x.T, atol=1e-12 * scale)


def test_gram_splits_wide_matrices_across_threads() -> None:
    x = _matrix(1, 7, 5000)
    np.testing.assert_allclose(gram(x), x @ x.T, rtol=1e-12)
    a = np.random.default_rng(2).random((3, 7))
    np.testing.assert_allclose(mix_rows(a, x), a @ x, rtol=1e-12)
    np.testing.assert_allclose(mix_rows(a[0], x), a[0] @ x, rtol=1e-12)


@EXAMPLES
@given(dims=dims, block=st.integers(1, 9))
def test_row_distances_match_a_loop(dims: tuple[int, int, int], block: int) -> None:
    x = _matrix(*dims)
    v = np.random.default_rng(dims[0] + 1).normal(size=(x.shape[1],))
    naive = np.array([np.sum((row - v) ** 2) for row in x])
    np.testing.assert_allclose(row_sq_distances(x, v, block=block), naive, rtol=1e-12)


@EXAMPLES
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 14), d=st.integers(1, 20), data=st.data())
def test_krum_scores_match_a_loop(seed: int, n: int, d: int, data: st.DataObject) -> None:
    x = _matrix(seed, n, d)
    f = data.draw(st.integers(0, (n - 3) // 2))
    naive = np.array(
        [
            sum(sorted(np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i)[: n - f - 2])
            for i in range(n)
        ]
    )
    scores = krum_scores(pairwise_sq_distances(x), f)
    scale = float(np.max(np.sum(x**2, axis=1))) * n
    np.testing.assert_allclose(scores, naive, atol=1e-11 * scale)
    # Krum returns an input whose naive score is the smallest (up to rounding).
    chosen = Krum(f).aggregate(x, np.ones(n))
    index = next(i for i in range(n) if np.array_equal(x[i], chosen))
    assert naive[index] <= naive.min() + 1e-11 * scale


def _naive_weiszfeld(x: np.ndarray, alpha: np.ndarray, nu: float, iterations: int) -> np.ndarray:
    v = np.zeros(x.shape[1])
    for _ in range(iterations):
        betas = [a / max(nu, math.dist(row, v)) for row, a in zip(x, alpha, strict=True)]
        v = sum(b * row for b, row in zip(betas, x, strict=True)) / sum(betas)
    return np.asarray(v)


@EXAMPLES
@given(dims=dims, iterations=st.integers(1, 6))
def test_weiszfeld_matches_a_loop(dims: tuple[int, int, int], iterations: int) -> None:
    x = _matrix(*dims)
    alpha = np.random.default_rng(dims[0]).random((x.shape[0],)) + 0.01
    alpha /= alpha.sum()
    fast, steps = smoothed_weiszfeld(x, alpha, nu=1e-6, iterations=iterations, tolerance=0.0)
    slow = _naive_weiszfeld(x, alpha, 1e-6, steps)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-9 * float(np.abs(x).max()))


def test_weiszfeld_converges_to_the_weighted_geometric_median() -> None:
    x = _matrix(5, 9, 4)
    alpha = np.arange(1.0, 10.0) / 45
    point = GeometricMedian(iterations=1000, tolerance=1e-12).aggregate(x, alpha * 45)
    # Optimality: the weighted sum of unit vectors towards the inputs vanishes.
    pulls = (x - point) / np.linalg.norm(x - point, axis=1, keepdims=True)
    assert np.linalg.norm(alpha @ pulls) < 1e-6

    # The objective is no larger than at any input or at the mean.
    def objective(v: np.ndarray) -> float:
        return float(alpha @ np.linalg.norm(x - v, axis=1))

    assert all(objective(point) <= objective(c) + 1e-12 for c in [*x, x.mean(axis=0)])


@EXAMPLES
@given(dims=dims, tau=st.floats(0.01, 100.0), iterations=st.integers(1, 4))
def test_centered_clipping_matches_a_loop(
    dims: tuple[int, int, int], tau: float, iterations: int
) -> None:
    x = _matrix(*dims)
    center = np.random.default_rng(dims[0]).normal(size=(x.shape[1],))
    v = center.copy()
    for _ in range(iterations):
        step = np.zeros_like(v)
        for row in x:
            distance = np.linalg.norm(row - v)
            step += (row - v) * (min(1.0, tau / distance) if distance > 0 else 1.0)
        v = v + step / len(x)
    scale = 1.0 + float(np.abs(x).max()) + float(np.abs(center).max())
    np.testing.assert_allclose(centered_clip(x, center, tau, iterations), v, atol=1e-10 * scale)


@EXAMPLES
@given(dims=dims, bound=st.floats(1e-3, 1e3))
def test_norm_bounding_matches_a_loop(dims: tuple[int, int, int], bound: float) -> None:
    x = _matrix(*dims)
    weights = np.random.default_rng(dims[0]).integers(1, 50, (x.shape[0],)).astype(np.float64)
    clipped = [row * min(1.0, bound / np.linalg.norm(row)) for row in x]
    naive = sum(w * row for w, row in zip(weights, clipped, strict=True)) / weights.sum()
    np.testing.assert_allclose(NormBounding(bound).aggregate(x, weights), naive, rtol=1e-10)
    assert np.all(
        np.linalg.norm(norm_clip_factors(x, bound)[:, None] * x, axis=1) <= bound * 1.0001
    )


@EXAMPLES
@given(dims=dims, s=st.integers(1, 5))
def test_bucket_means_match_a_loop(dims: tuple[int, int, int], s: int) -> None:
    x = _matrix(*dims)
    n = x.shape[0]
    weights = np.random.default_rng(dims[0]).integers(0, 4, (n,)).astype(np.float64)
    buckets = Bucketing(s, np.random.default_rng(dims[0])).buckets(n)
    assert sorted(itertools.chain.from_iterable(buckets)) == list(range(n))
    assert [len(b) for b in buckets[:-1]] == [s] * (len(buckets) - 1)
    means, totals = bucket_means(x, weights, buckets)
    for b, members in enumerate(buckets):
        w = weights[members]
        expected = (w @ x[members]) / w.sum() if w.sum() > 0 else x[members].mean(axis=0)
        np.testing.assert_allclose(means[b], expected, rtol=1e-10, atol=1e-12)
        assert totals[b] == w.sum()


@EXAMPLES
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), d=st.integers(1, 12), data=st.data())
def test_nnm_matches_a_loop(seed: int, n: int, d: int, data: st.DataObject) -> None:
    x = _matrix(seed, n, d)
    f = data.draw(st.integers(0, (n - 1) // 2))
    mixed, weights = NearestNeighborMixing(f).transform(x, np.arange(1.0, n + 1))
    for i in range(n):
        nearest = sorted(range(n), key=lambda j: (np.sum((x[i] - x[j]) ** 2), j))[: n - f]
        np.testing.assert_allclose(mixed[i], x[nearest].mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(weights, np.arange(1.0, n + 1))


# ------------------------------------------------------------------ rule semantics


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_median_and_trimmed_mean_refuse_an_overflowing_result() -> None:
    huge = np.full((2, 1), 1.7e308)
    with pytest.raises(AggregationError, match="overflowed"):
        CoordinateMedian().aggregate(huge, np.ones(2))
    with pytest.raises(AggregationError, match="overflowed"):
        TrimmedMean().aggregate(huge, np.ones(2))


def test_trimmed_mean_with_a_fraction_trims_int_beta_n() -> None:
    x = np.arange(20.0)[:, None]
    assert TrimmedMean(trim_fraction=0.29).trim_count(100) == 28  # int(28.999...)
    np.testing.assert_allclose(TrimmedMean(1, 0.1).aggregate(x, np.ones(20)), [9.5])
    with pytest.raises(PreconditionError, match=r"k = int\(0.1 \* 15\) = 1 per side"):
        TrimmedMean(2, 0.1).aggregate(x[:15], np.ones(15))
    assert TrimmedMean(2, 0.1).min_inputs == 20


def test_multi_krum_keeps_m_and_uses_the_weights_of_the_kept() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(8, 3))
    x = np.vstack([honest, np.full((2, 3), 50.0)])
    weights = np.arange(1.0, 11.0)
    rule = MultiKrum(2, m=5)
    keep = rule.selected(x)
    assert len(keep) == 5 and set(keep) <= set(range(8))
    expected = weights[keep] @ x[keep] / weights[keep].sum()
    np.testing.assert_allclose(rule.aggregate(x, weights), expected)
    assert MultiKrum(1, m=7).min_inputs == 8
    with pytest.raises(PreconditionError, match=r"multi-krum needs m <= n - f = 8"):
        MultiKrum(2, m=9).aggregate(x, weights)


def test_ties_are_broken_by_content_not_by_input_order() -> None:
    x = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3 + [[9.0, 9.0]])
    picks = {
        tuple(Krum(1).aggregate(x[order], np.ones(7))) for order in (range(7), range(6, -1, -1))
    }
    assert len(picks) == 1
    line = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])  # symmetric: many equal distances
    krum, nnm = set(), set()
    for order in itertools.permutations(range(5)):
        index = list(order)
        # scores 14, 6, 6, 6, 14: a three-way tie between 1, 2 and 3
        krum.add(float(Krum(0).aggregate(line[index], np.ones(5))[0]))
        mixed, _ = NearestNeighborMixing(1).transform(line[index], np.ones(5))
        nnm.add(tuple(np.sort(mixed[:, 0])))
    assert len(krum) == 1 and krum <= {1.0, 2.0, 3.0}
    assert len(nnm) == 1
    keys = np.array([2.0, 1.0, 1.0 + 1e-15, 0.5])
    projection = np.array([0.0, 5.0, 3.0, 9.0])
    assert list(order_by(keys, lambda: (projection,))) == [3, 2, 1, 0]
    assert list(order_by(np.array([1.0, 2.0]), lambda: pytest.fail("not needed"))) == [0, 1]
    # With a cut, only a tie across it needs the content keys.
    tied_late = np.array([0.0, 1.0, 1.0])
    assert list(order_by(tied_late, lambda: pytest.fail("not needed"), cut=1)) == [0, 1, 2]
    assert list(order_by(tied_late, lambda: (np.array([0.0, 2.0, 1.0]),), cut=2)) == [0, 2, 1]


def test_multi_krum_ranks_duplicates_by_weight() -> None:
    x = np.vstack([np.zeros((4, 2)), np.ones((3, 2)) * 0.1])
    weights = np.array([5.0, 1.0, 3.0, 2.0, 1.0, 1.0, 1.0])
    for order in (np.arange(7), np.arange(7)[::-1]):
        kept = MultiKrum(1, m=2).selected(x[order], weights[order])
        assert sorted(weights[order][kept]) == [1.0, 2.0]


def test_centered_clipping_from_the_previous_aggregate_remembers_and_resets() -> None:
    x = np.array([[10.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
    rule = CenteredClipping(1.0, 1, CenterReference.PREVIOUS)
    np.testing.assert_allclose(rule.aggregate(x, np.ones(3)), [1.0, 0.0])
    np.testing.assert_allclose(rule.aggregate(x, np.ones(3)), [2.0, 0.0])
    np.testing.assert_allclose(rule.center_for(2), [2.0, 0.0])
    with pytest.raises(AggregationError, match="reset"):
        rule.aggregate(np.ones((3, 5)), np.ones(3))
    rule.reset()
    np.testing.assert_allclose(rule.aggregate(x, np.ones(3)), [1.0, 0.0])
    zero = CenteredClipping(1.0, 1)
    zero.aggregate(x, np.ones(3))
    np.testing.assert_allclose(zero.aggregate(x, np.ones(3)), [1.0, 0.0])


def test_geometric_median_uses_weights_and_stops_early() -> None:
    x = np.array([[0.0], [1.0], [2.0]])
    heavy_right = GeometricMedian().aggregate(x, np.array([1.0, 1.0, 5.0]))
    np.testing.assert_allclose(heavy_right, [2.0], atol=1e-5)
    _, steps = smoothed_weiszfeld(
        _matrix(0, 9, 5), np.full(9, 1 / 9), nu=1e-6, iterations=500, tolerance=1e-6
    )
    assert steps < 500


@pytest.mark.parametrize(
    "build",
    [
        lambda: CoordinateMedian(-1),
        lambda: CoordinateMedian(True),
        lambda: TrimmedMean(trim_fraction=0.5),
        lambda: TrimmedMean(trim_fraction=-0.1),
        lambda: TrimmedMean(1, trim_fraction=0.0),
        lambda: Krum(1.5),  # type: ignore[arg-type]
        lambda: MultiKrum(1, m=0),
        lambda: GeometricMedian(nu=0.0),
        lambda: GeometricMedian(iterations=0),
        lambda: GeometricMedian(tolerance=-1.0),
        lambda: GeometricMedian(tolerance=math.nan),
        lambda: CenteredClipping(0.0),
        lambda: CenteredClipping(math.inf),
        lambda: CenteredClipping(1.0, iterations=0),
        lambda: CenteredClipping(1.0, reference="zero"),  # type: ignore[arg-type]
        lambda: NormBounding(-1.0),
        lambda: Bucketing(0, np.random.default_rng(0)),
        lambda: Bucketing(2, np.random.RandomState(0)),  # type: ignore[arg-type]
        lambda: NearestNeighborMixing(-2),
    ],
)
def test_bad_parameters_raise(build: object) -> None:
    with pytest.raises(RuleParameterError):
        build()  # type: ignore[operator]


# ------------------------------------------------------------------ composition


def test_bucketing_then_the_weighted_mean_is_the_weighted_mean() -> None:
    x = _matrix(3, 11, 6)
    weights = np.random.default_rng(3).integers(1, 90, 11).astype(np.float64)
    composed = Composed((Bucketing(3, np.random.default_rng(0)),), WeightedMean())
    np.testing.assert_allclose(
        composed.aggregate(x, weights), WeightedMean().aggregate(x, weights), rtol=1e-12
    )


def test_bucketing_is_reproducible_from_its_seed_and_draws_fresh_permutations() -> None:
    x = _matrix(4, 12, 5)
    first = build_aggregator(_bucketed_median(seed=5))
    second = build_aggregator(_bucketed_median(seed=5))
    outputs = [first.aggregate(x, np.ones(12)) for _ in range(3)]
    np.testing.assert_array_equal(outputs, [second.aggregate(x, np.ones(12)) for _ in range(3)])
    assert not np.array_equal(outputs[0], outputs[1])


def _bucketed_median(seed: int) -> AggregatorConfig:
    return AggregatorConfig(
        AggregatorName.MEDIAN,
        f=1,
        pre_aggregation=(PreAggregationName.BUCKETING,),
        bucket_size=2,
        seed=seed,
    )


def test_composed_names_min_inputs_and_precondition_context() -> None:
    rule = Composed((NearestNeighborMixing(2), Bucketing(2, np.random.default_rng(0))), Krum(2))
    assert rule.name == "nnm+bucketing+krum"
    assert rule.min_inputs == 13  # ⌈13/2⌉ = 7 = 2f + 3 buckets
    assert rule.uses_weights  # bucket means are weighted
    assert not Composed((NearestNeighborMixing(1),), Krum(1)).uses_weights
    with pytest.raises(PreconditionError) as refused:
        rule.aggregate(_matrix(0, 12, 3), np.ones(12))
    message = str(refused.value)
    assert message.startswith("nnm+bucketing+krum needs n >= 13 inputs; got n = 12, f = 2")
    assert "bucketing turned 12 inputs into 6" in message
    assert "krum needs n >= 2f + 3 = 7 inputs" in message
    with pytest.raises(PreconditionError, match=r"nnm needs n >= 2f \+ 1 = 5"):
        Composed((NearestNeighborMixing(2),), CoordinateMedian(0)).aggregate(
            _matrix(0, 4, 3), np.ones(4)
        )


# ------------------------------------------------------------------ registry


def _full(name: AggregatorName, f: int = 1) -> AggregatorConfig:
    extra: dict[str, float] = {}
    if name is AggregatorName.CENTERED_CLIPPING:
        extra["cc_tau"] = 1.0
    if name is AggregatorName.NORM_BOUNDING:
        extra["norm_bound"] = 1.0
    no_f = name in {AggregatorName.WEIGHTED_MEAN, AggregatorName.NORM_BOUNDING}
    return AggregatorConfig(name, f=0 if no_f else f, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(AggregatorName))
def test_build_aggregator_builds_every_rule(name: AggregatorName) -> None:
    aggregator = build_aggregator(_full(name))
    assert aggregator.name == name.value
    x = _matrix(1, aggregator.min_inputs, 4)
    assert aggregator.aggregate(x, np.ones(len(x))).shape == (4,)


def test_build_aggregator_composes_steps_in_order() -> None:
    config = AggregatorConfig(
        AggregatorName.TRIMMED_MEAN,
        f=2,
        trim_fraction=0.2,
        pre_aggregation=(PreAggregationName.BUCKETING, PreAggregationName.NNM),
        bucket_size=2,
    )
    aggregator = build_aggregator(config)
    assert isinstance(aggregator, Composed)
    assert aggregator.name == config.label == "bucketing+nnm+trimmed-mean"
    assert isinstance(aggregator.steps[1], NearestNeighborMixing)
    assert aggregator.steps[1].f == 2
    assert aggregator.rule == TrimmedMean(2, 0.2)


def test_registry_defaults() -> None:
    geomed = build_aggregator(AggregatorConfig(AggregatorName.GEOMETRIC_MEDIAN))
    assert geomed == GeometricMedian(0, nu=1e-6, iterations=100, tolerance=1e-6)
    cc = build_aggregator(AggregatorConfig(AggregatorName.CENTERED_CLIPPING, cc_tau=2.0))
    assert cc == CenteredClipping(2.0, 1, CenterReference.ZERO)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "krum"}, "AggregatorName"),
        ({"f": -1}, "integer >= 0"),
        ({"f": 2}, "weighted-mean cannot tolerate"),
        ({"rule": AggregatorName.NORM_BOUNDING, "norm_bound": 1.0, "f": 1}, "cannot tolerate"),
        ({"rule": AggregatorName.MEDIAN, "trim_fraction": 0.1}, "trimmed-mean only"),
        ({"rule": AggregatorName.KRUM, "multi_krum_m": 3}, "multi-krum only"),
        ({"rule": AggregatorName.KRUM, "cc_reference": CenterReference.ZERO}, "centered-clip"),
        ({"rule": AggregatorName.CENTERED_CLIPPING}, "needs cc_tau"),
        ({"rule": AggregatorName.NORM_BOUNDING}, "needs norm_bound"),
        ({"rule": AggregatorName.NORM_BOUNDING, "norm_bound": 0.0}, "bound"),
        ({"rule": AggregatorName.TRIMMED_MEAN, "trim_fraction": 0.7}, r"\[0, 0.5\)"),
        ({"pre_aggregation": (PreAggregationName.BUCKETING,)}, "needs bucket_size"),
        ({"bucket_size": 2}, "bucketing only"),
        ({"pre_aggregation": ("nnm",)}, "PreAggregationName"),
        ({"pre_aggregation": (PreAggregationName.NNM, PreAggregationName.NNM)}, "repeats"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_refuses_inconsistent_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AggregatorConfig(**kwargs)  # type: ignore[arg-type]


def test_options_round_trip_and_parse() -> None:
    config = AggregatorConfig(
        AggregatorName.CENTERED_CLIPPING,
        f=2,
        cc_tau=3.0,
        cc_iterations=2,
        cc_reference=CenterReference.PREVIOUS,
        pre_aggregation=(PreAggregationName.NNM, PreAggregationName.BUCKETING),
        bucket_size=2,
        seed=9,
    )
    assert AggregatorConfig.from_options(config.to_options()) == config
    assert set(config.to_options()) == set(OPTION_KEYS)
    parsed = AggregatorConfig.from_options(
        {"aggregator": "trimmed-mean", "aggregator-f": "2", "pre-aggregation": "nnm"}
    )
    assert parsed == AggregatorConfig(
        AggregatorName.TRIMMED_MEAN, f=2, pre_aggregation=(PreAggregationName.NNM,)
    )
    assert AggregatorConfig.from_options({}) == AggregatorConfig()
    with pytest.raises(ConfigError, match="unknown aggregation option"):
        AggregatorConfig.from_options({"aggregater": "krum"})
    with pytest.raises(ConfigError, match="unknown aggregator 'kroom'; known: weighted-mean"):
        AggregatorConfig.from_options({"aggregator": "kroom"})
    with pytest.raises(ConfigError, match="unknown pre-aggregation step"):
        AggregatorConfig.from_options({"aggregator": "krum", "pre-aggregation": "nnm,buckets"})
    with pytest.raises(ConfigError, match="must be an integer"):
        AggregatorConfig.from_options({"aggregator": "krum", "aggregator-f": "two"})
