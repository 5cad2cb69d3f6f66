"""Drift math: PSI by hand, Jensen–Shannon against scipy, bins, merging, alerts."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from fedguard.core.histograms import bin_edges, histogram_counts
from fedguard.trust import drift


def test_psi_matches_a_hand_computation() -> None:
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.4, 0.4, 0.2])
    by_hand = (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.4 - 0.3) * math.log(0.4 / 0.3)
    assert drift.population_stability_index(p, q) == pytest.approx(by_hand, abs=1e-15)
    assert drift.population_stability_index(p, p) == 0.0
    # An empty bin is floored, so PSI stays finite.
    assert math.isfinite(
        drift.population_stability_index(np.array([1.0, 0.0]), np.array([0.5, 0.5]))
    )


@pytest.mark.parametrize("seed", range(5))
def test_jensen_shannon_equals_scipys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, q = rng.random(12), rng.random(12)
    p[3] = 0.0
    assert drift.jensen_shannon(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)


def test_bins_are_normal_quantiles_for_standardized_features() -> None:
    edges = bin_edges([True, False], 4)
    np.testing.assert_allclose(edges[0], [-0.6744897501960817, 0.0, 0.6744897501960817])
    np.testing.assert_allclose(edges[1], [0.25, 0.5, 0.75])
    x = np.random.default_rng(0).normal(size=(40_000, 2))
    counts = histogram_counts(x, edges)
    assert counts.sum(axis=1).tolist() == [40_000, 40_000]
    np.testing.assert_allclose(counts[0] / 40_000, 0.25, atol=0.01)


def test_sparse_bins_merge_and_a_shift_alerts() -> None:
    reference = np.array([[0.0, 3, 40, 200, 400, 300, 50, 5, 2, 0]])
    merge = drift.merge_bins(reference)
    merged = drift.merged_counts(reference, merge)[0]
    assert (merged / merged.sum() >= drift.MIN_BIN_SHARE).all()
    assert merged.sum() == reference.sum()
    same = drift.drift_scores(["x"], reference, reference * 3, 0.05, merge)
    assert same[0].psi == pytest.approx(0.0, abs=1e-12) and not same[0].alert
    shifted = np.roll(reference, 1, axis=1)
    (score,) = drift.drift_scores(["x"], reference, shifted, 0.05, merge)
    assert score.alert and score.psi > 0.05 and 0 < score.js <= 1
