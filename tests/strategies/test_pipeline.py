import numpy as np
import pytest
from scipy import stats

from fedguard.core.config import CentralDPConfig
from fedguard.privacy.central import clip_rows_to_norm
from fedguard.privacy.noise import CsprngGaussian
from fedguard.strategies.aggregators import AggregationError
from fedguard.strategies.pipeline import AggregationPipeline, ClientUpdate


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
