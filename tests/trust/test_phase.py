"""The trust phase after training and drift monitoring, end to end (in-process engine)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from fedguard.core.config import RunConfig
from fedguard.core.models import build_model
from fedguard.core.sensitive_groups import sensitive_groups
from fedguard.core.serialization import load_weights
from fedguard.core.trust_config import TrustConfig, TrustNoise
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger
from fedguard.simulation.monitor import load_run, simulate_monitoring
from fedguard.simulation.runner import run_variant
from fedguard.trust.results import read_trust_results
from tests.factories import small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

TRUST = TrustConfig(fairness_attribute="mean radius", fairness_bands=(14.0,), drift=True)


def _run(tmp_path: Path, config: RunConfig) -> Path:
    run_dir = tmp_path / "run" / "dp"
    run_variant(config, "dp", run_dir)
    return run_dir


def _ledger(run_dir: Path, config: RunConfig, i: int) -> PrivacyLedger:
    return PrivacyLedger.open(run_dir / "silos" / f"silo-{i}", f"silo-{i}", config.budget)


def test_dp_run_audits_and_charges_each_release_once_within_budget(tmp_path: Path) -> None:
    config = small_config(
        tmp_path, num_rounds=2, trust=dataclasses.replace(TRUST, monitor_rounds=1)
    )
    run_dir = _run(tmp_path, config)
    results = read_trust_results(run_dir)
    assert results is not None and results.fairness is not None
    cost = results.fairness.cost
    assert cost.contributors == 3 and cost.epsilon == pytest.approx(1.0, rel=1e-3)
    assert [g.group for g in results.fairness.groups] == ["mean radius<14", "mean radius>=14"]
    assert results.drift[0].label == "reference"
    assert "fairness_calibration" in json.loads((run_dir / "trust.json").read_text())
    # The silos planned the releases in: the reserved monitoring round fits the budget.
    (monitor,) = simulate_monitoring(run_dir, rounds=1)
    assert monitor.cost.contributors == 3
    for i in range(3):
        with _ledger(run_dir, config, i) as ledger:
            purposes = [e.purpose for e in ledger.entries()]
            # The scaler's feature moments come first, before any training round.
            assert purposes == [ChargePurpose.FEATURE_MOMENTS] + [ChargePurpose.TRAINING] * 2 + [
                ChargePurpose.FAIRNESS,
                ChargePurpose.DRIFT,
                ChargePurpose.DRIFT,
            ]
            assert ledger.spent_epsilon() <= config.budget.epsilon
            assert (
                results.fairness.cost.epsilon_by_silo[f"silo-{i}"]
                == ledger.entries()[3].epsilon_after
            )
    log = (run_dir / "trust-log.jsonl").read_text().splitlines()
    assert [json.loads(line)["release"] for line in log] == [
        "fairness",
        "drift-reference",
        "drift-monitor",
    ]


def test_exact_audit_equals_fairlearn_on_the_silos_records(tmp_path: Path) -> None:
    trust = dataclasses.replace(TRUST, noise=TrustNoise.NONE)
    config = small_config(tmp_path, num_rounds=1, trust=trust)
    run_dir = _run(tmp_path, config)
    results = read_trust_results(run_dir)
    assert results is not None and results.fairness is not None
    # The same records, pooled here (only the test may pool them): fairlearn's figures.
    run = load_run(run_dir)
    model = build_model(_schema(config), config.model)
    load_weights(model, run.weights)
    groups = sensitive_groups(_schema(config), "mean radius", (14.0,))
    labels, predicted, cohorts = [], [], []
    from fedguard.client.silo import SimulatedSiloSource

    for i in range(3):
        silo = SimulatedSiloSource(
            config.dataset, 3, config.partition, i, config.test_fraction, config.seed
        ).load()
        x = torch.from_numpy(run.scaler.transform(silo.test.features))
        with torch.no_grad():
            predicted.append(model(x).argmax(dim=1).numpy())
        labels.append(silo.test.labels)
        cohorts.append(np.array(groups.names)[groups.assign(silo.test.features)])
    y, p, s = (np.concatenate(a) for a in (labels, predicted, cohorts))
    fairness = results.fairness
    assert fairness.demographic_parity_difference == pytest.approx(
        demographic_parity_difference(y, p, sensitive_features=s), abs=1e-9
    )
    assert fairness.equalized_odds_difference == pytest.approx(
        equalized_odds_difference(y, p, sensitive_features=s), abs=1e-9
    )
    for g in fairness.groups:
        mask = s == g.group
        assert g.n == mask.sum()
        assert g.accuracy == pytest.approx((y[mask] == p[mask]).mean(), abs=1e-9)
    assert fairness.cost.epsilon == 0.0 and not fairness.cost.noised


def test_monitoring_alerts_only_after_drift_is_injected(tmp_path: Path) -> None:
    trust = TrustConfig(drift=True, noise=TrustNoise.NONE)
    config = small_config(tmp_path, num_rounds=1, trust=trust)
    run_dir = _run(tmp_path, config)
    quiet, drifted = simulate_monitoring(run_dir, rounds=2, drift_silos=[1], shift=1.0, start=2)
    assert quiet.alerts == () and max(f.psi for f in quiet.features) == 0.0
    assert "mean radius" in drifted.alerts
    assert drifted.label == "monitor round 2"
    stored = read_trust_results(run_dir)
    assert stored is not None and [d.label for d in stored.drift] == [
        "reference",
        "monitor round 1",
        "monitor round 2",
    ]


def _schema(config: RunConfig):  # type: ignore[no-untyped-def]
    from fedguard.core.datasets import schema_for

    return schema_for(config.dataset)
