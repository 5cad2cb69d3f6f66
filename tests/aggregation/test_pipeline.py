import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedguard.aggregation.aggregators import AggregationError
from fedguard.aggregation.pipeline import AggregationPipeline, ClientUpdate, GroupSum
from fedguard.aggregation.robust import CoordinateMedian
from fedguard.core.config import CentralDPConfig
from fedguard.privacy.central import clip_rows_to_norm
from fedguard.privacy.noise import CsprngGaussian


def _updates(deltas: list[np.ndarray], examples: list[int]) -> list[ClientUpdate]:
    return [
        ClientUpdate(i, f"s{i}", d, n)
        for i, (d, n) in enumerate(zip(deltas, examples, strict=True))
    ]


def test_weighted_fedavg_step() -> None:
    out = AggregationPipeline().apply(
        np.zeros(2), _updates([np.array([1.0, 0.0]), np.array([0.0, 1.0])], [1, 3]), population=2
    )
    np.testing.assert_allclose(out.new_global, [0.25, 0.75])


def test_no_update_keeps_the_model() -> None:
    out = AggregationPipeline().apply(np.ones(3), [], population=3)
    np.testing.assert_array_equal(out.new_global, np.ones(3))


def test_wrong_shape_update_is_refused() -> None:
    with pytest.raises(AggregationError):
        AggregationPipeline().apply(np.zeros(2), _updates([np.zeros(3)], [1]), population=1)


def test_clip_rows_can_fail_and_keeps_zero_rows() -> None:
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    clipped, was = clip_rows_to_norm(rows, 1.0)
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), [1.0, 0.0, 0.5])
    assert was.tolist() == [True, False, False]


def test_central_noise_has_the_configured_spread() -> None:
    # Updates that cancel out: the release is pure noise / (q·N), std z·S/(q·N).
    config = CentralDPConfig(
        enabled=True, clip_norm=2.0, noise_multiplier=1.5, client_sampling_rate=0.5
    )
    d, population = 20_000, 10
    updates = _updates([np.full(d, 0.01), np.full(d, -0.01)], [5, 5])
    out = AggregationPipeline(central_dp=config, noise=CsprngGaussian()).apply(
        np.zeros(d), updates, population
    )
    expected_std = 1.5 * 2.0 / (0.5 * population)
    k = d
    statistic = (k - 1) * out.new_global.var(ddof=1) / expected_std**2
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], k - 1)
    assert lo < statistic < hi
    assert out.details["clipped"] == 0 and out.details["denominator"] == 5.0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 8),
    d=st.integers(1, 30),
    bound=st.floats(1e-3, 1e3),
    scale=st.floats(1e-4, 1e4),
)
def test_clipping_properties(seed: int, n: int, d: int, bound: float, scale: float) -> None:
    rows = np.random.default_rng(seed).normal(size=(n, d)) * scale
    clipped, was = clip_rows_to_norm(rows, bound)
    norms = np.linalg.norm(rows, axis=1)
    out = np.linalg.norm(clipped, axis=1)
    assert (out <= bound * (1 + 1e-9)).all()
    # Rows inside the bound are untouched; rows outside land on the bound, same direction.
    np.testing.assert_allclose(clipped[~was], rows[~was])
    np.testing.assert_allclose(out[was], bound, rtol=1e-9)
    cos = (clipped * rows).sum(axis=1)[was] / (out[was] * norms[was])
    np.testing.assert_allclose(cos, 1.0, rtol=1e-9)


def _group(members: tuple[str, ...], mean: list[float], weight: float) -> GroupSum:
    return GroupSum(members, np.asarray(mean) * weight, weight)


def test_groups_over_the_norm_bound_are_flagged_and_f_shrinks_by_their_number() -> None:
    built: list[int] = []

    def rule_for_f(f: int) -> CoordinateMedian:
        built.append(f)
        return CoordinateMedian(f)

    pipeline = AggregationPipeline(CoordinateMedian(2), byzantine_f=2, rule_for_f=rule_for_f)
    groups = [
        _group(("a",), [0.1, 0.0], 10),
        _group(("b",), [0.2, 0.0], 10),
        _group(("c",), [0.3, 0.0], 10),
        _group(("x",), [50.0, 0.0], 10),  # a silo that did not clip
    ]
    out = pipeline.apply_groups(np.zeros(2), groups, norm_bound=1.0, norm_tolerance=1e-6)
    assert [f["members"] for f in out.details["flagged-groups"]] == [["x"]]
    assert out.details["groups-used"] == [0, 1, 2]
    assert out.details["f-after-flags"] == 1 and built == [1]
    np.testing.assert_allclose(out.new_global, [0.2, 0.0])
    # Without the bound the outlier group is kept, and the median (f = 2 needs 5) refuses 4.
    with pytest.raises(AggregationError, match="2f \\+ 1"):
        pipeline.apply_groups(np.zeros(2), groups)


def test_group_sum_of_the_wrong_shape_is_refused() -> None:
    pipeline = AggregationPipeline()
    with pytest.raises(AggregationError, match="shape"):
        pipeline.apply_groups(np.zeros(3), [_group(("a",), [1.0, 2.0], 1)])
