"""The trust-results file the reports read: round trip, decoding of the secure sum."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedguard.trust.results import (
    TRUST_FILENAME,
    ReleaseCost,
    TrustResults,
    TrustResultsError,
    attribution_from_sum,
    read_trust_results,
    write_trust_results,
)
from tests.trust.samples import COST, sample_attributions, sample_results


def test_attribution_from_sum_divides_by_count_and_ranks_by_importance() -> None:
    result = sample_attributions()
    assert [f.feature for f in result.features] == ["b", "a", "c"]
    assert [f.mean_abs_attribution for f in result.features] == [0.5, 0.3, 0.1]
    assert [f.mean_attribution for f in result.features] == [-0.4, 0.2, 0.1]
    assert result.records == 30.0
    assert result.top(1)[0].feature == "b"
    # Ranked by importance, not by the signed mean: a feature whose signed
    # attributions cancel out still ranks first.
    cancelling = attribution_from_sum(
        np.array([8.0, 1.0, 0.0, 1.0, 4.0]),
        ["used-linearly", "other"],
        model="global",
        clip_norm=1.0,
        steps=8,
        output="",
        cost=COST,
    )
    assert [f.feature for f in cancelling.features] == ["used-linearly", "other"]
    # A noised count below one is floored so the means stay finite.
    low = attribution_from_sum(
        np.array([1.0, 0.0, 1.0, 0.0, -0.3]),
        ["a", "b"],
        model="global",
        clip_norm=1.0,
        steps=8,
        output="",
        cost=COST,
    )
    assert low.features[0].mean_attribution == 1.0
    with pytest.raises(TrustResultsError, match="expected 7"):
        attribution_from_sum(
            np.zeros(4), ["a", "b", "c"], model="g", clip_norm=1, steps=8, output="", cost=COST
        )
    with pytest.raises(TrustResultsError, match="non-finite"):
        attribution_from_sum(
            np.array([np.nan, 1.0, 1.0]),
            ["a"],
            model="g",
            clip_norm=1,
            steps=8,
            output="",
            cost=COST,
        )


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    results = sample_results()
    path = write_trust_results(tmp_path, results)
    assert path.name == TRUST_FILENAME
    back = read_trust_results(tmp_path)
    assert back == results
    assert back is not None and back.drift[0].alerts == ("age",)
    assert back.attribution("student") is not None
    assert back.attribution("missing") is None
    # Strict JSON: the undefined AUC is null, not NaN.
    assert json.loads(path.read_text())["fairness"]["groups"][1]["auc"] is None


def test_absent_empty_and_malformed_files(tmp_path: Path) -> None:
    assert read_trust_results(tmp_path) is None
    assert TrustResults().empty
    (tmp_path / TRUST_FILENAME).write_text("{not json")
    with pytest.raises(TrustResultsError, match="not JSON"):
        read_trust_results(tmp_path)
    (tmp_path / TRUST_FILENAME).write_text(json.dumps({"fedguard_trust_version": 99}))
    with pytest.raises(TrustResultsError, match="version"):
        read_trust_results(tmp_path)
    data = sample_results().to_json()
    del data["fairness"]["cost"]
    (tmp_path / TRUST_FILENAME).write_text(json.dumps(data))
    with pytest.raises(TrustResultsError, match="cost"):
        read_trust_results(tmp_path)


def test_release_cost_validation() -> None:
    with pytest.raises(TrustResultsError):
        ReleaseCost(epsilon=-1.0, delta=1e-5, noise_multiplier=1.0, contributors=2)
    with pytest.raises(TrustResultsError):
        ReleaseCost(epsilon=1.0, delta=1.0, noise_multiplier=1.0, contributors=2)
    with pytest.raises(TrustResultsError, match="finite"):
        ReleaseCost(epsilon=math.inf, delta=1e-5, noise_multiplier=1.0, contributors=2)
    exact = ReleaseCost(epsilon=math.inf, delta=0.0, noise_multiplier=0.0, contributors=2)
    assert not exact.noised
    assert exact.to_json()["epsilon"] is None
    assert ReleaseCost.from_json(json.loads(json.dumps(exact.to_json()))) == exact
