"""Trust results shared by the report and model-card tests (hand-made, checked values)."""

from __future__ import annotations

import numpy as np

from fedguard.trust.results import (
    AttributionResult,
    DriftResult,
    FairnessResult,
    FeatureDrift,
    GroupMetrics,
    ReleaseCost,
    TrustResults,
    attribution_from_sum,
)

COST = ReleaseCost(epsilon=0.5, delta=1e-6, noise_multiplier=4.2, contributors=3)


def sample_attributions(model: str = "global") -> AttributionResult:
    # Σ|c| of 3 features, Σc of 3 features, then the count.
    vector = np.array([9.0, 15.0, 3.0, 6.0, -12.0, 3.0, 30.0])
    return attribution_from_sum(
        vector,
        ["a", "b", "c"],
        model=model,
        clip_norm=1.0,
        steps=32,
        output="log-odds",
        cost=COST,
    )


def sample_results() -> TrustResults:
    fairness = FairnessResult(
        attribute="sex",
        groups=(
            GroupMetrics("F", 410.2, 0.81, 0.86, 0.7, 0.12, 0.3),
            GroupMetrics("M", 388.9, 0.78, None, 0.66, 0.15, 0.33),
        ),
        demographic_parity_difference=0.03,
        equalized_odds_difference=0.04,
        cost=COST,
    )
    drift = DriftResult(
        threshold=0.2,
        metric="psi",
        features=(FeatureDrift("age", 0.31, 0.05, True), FeatureDrift("kappa", 0.01, 0.002, False)),
        cost=COST,
        label="monitor round 1",
    )
    return TrustResults(fairness, (drift,), (sample_attributions(), sample_attributions("student")))
