"""No per-silo value in clear: the DP federated scaler and the secure evaluation."""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from fedguard.client.app import make_client_app
from fedguard.client.policy import SiloPolicy, policy_from_node_config
from fedguard.core.config import LocalDPConfig, RunConfig, SecureAggregationConfig
from fedguard.core.datasets import schema_for
from fedguard.core.errors import ConfigError
from fedguard.core.feature_moments import moment_layout
from fedguard.core.models import model_hash_for
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.serialization import weights_to_record
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger
from fedguard.runs.scaler_moments import MOMENTS_FILENAME, scaler_reproduced
from fedguard.server.app import make_server_app
from fedguard.server.secure_metrics import (
    EVALUATION_RESOLUTION,
    MOMENTS_RESOLUTION,
    PUBLIC_OUTCOME_METRICS,
    SCALER_QUERY_ROUND,
    evaluate_round,
    federated_scaler,
)
from fedguard.server.statistic_collection import grid_send
from fedguard.simulation.inprocess import InProcessGrid, run_inprocess
from fedguard.simulation.report import write_report
from fedguard.simulation.runner import simulate
from fedguard.wire import protocol
from fedguard.wire.protocol import RoundInstructions
from tests.factories import (
    DATASET,
    consortium_identities,
    consortium_roster,
    initial_weights,
    silo_settings,
    small_config,
)

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

SILOS = 3


def _secure(config: RunConfig) -> RunConfig:
    # Three silos tolerate no dropout (README); these tests run them on purpose.
    return dataclasses.replace(
        config, secagg=SecureAggregationConfig(enabled=True, allow_no_dropout=True)
    )


def _grid(tmp_path: Path, policy: SiloPolicy | None = None) -> InProcessGrid:
    client = make_client_app(
        lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"]), policy=policy),
        allow_non_private=True,
    )
    return InProcessGrid(client, SILOS)


def _config_record(config: RunConfig, round_number: int = 0) -> Any:
    return RoundInstructions(
        run_id="run-m",
        round=round_number,
        planned_rounds=config.num_rounds,
        seed=config.seed,
        contract_name=config.contract.name,
        contract_hash=config.contract.content_hash(),
        model=config.model,
        training=config.training,
        local_dp=config.local_dp,
        model_hash=model_hash_for(schema_for(config.contract), config.model),
    ).to_record()


def _pooled(tmp_path: Path) -> list[Any]:
    return [silo_settings(tmp_path, i).data.load() for i in range(SILOS)]


# --------------------------------------------------------------------------- scaler


def test_secure_scaler_matches_the_pooled_statistics_within_the_dp_noise(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    config = _secure(small_config(tmp_path))
    nodes = sorted(grid.get_node_ids())
    release = federated_scaler(
        grid_send(grid, "moments"),
        nodes,
        config,
        _config_record(config),
        str,
        identities=consortium_identities(tmp_path, SILOS),
    )
    layout = moment_layout(schema_for(DATASET))
    silos = _pooled(tmp_path)
    exact = np.sum([layout.vector(s.train.features) for s in silos], axis=0)
    assert release.secure and release.contributors == SILOS
    assert release.epsilon == config.local_dp.scaler_epsilon
    # The sum carries the three silos' noise: N(0, noise_std²) per value, independent.
    assert release.noise_std > 0
    z = (release.values - exact) / release.noise_std
    assert np.abs(z).max() < 5.0
    k = layout.length  # Σz² ~ χ²(k): mean k, standard deviation √(2k)
    assert abs(float(np.sum(z**2)) - k) < 6 * math.sqrt(2 * k)
    # The scaler is post-processing of the noised sum only, and fits the rebuilt data.
    train = [s.train for s in silos]
    assert (
        scaler_reproduced(tmp_path / "elsewhere", schema_for(DATASET), train, release.scaler)
        is None
    )
    (tmp_path / MOMENTS_FILENAME).write_text(json.dumps(release.to_json(DATASET.value)))
    assert scaler_reproduced(tmp_path, schema_for(DATASET), train, release.scaler)
    # Other data are caught only when far off: at this noise (≈ 221 a value, 455 rows)
    # one silo more or less passes the 6σ check (±1325); eight times the rows does not.
    assert not scaler_reproduced(tmp_path, schema_for(DATASET), train * 8, release.scaler)
    # Each silo charged the release once, under its own purpose, before any training.
    for i in range(SILOS):
        settings = silo_settings(tmp_path, i)
        with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
            (entry,) = ledger.entries()
        assert (entry.round, entry.purpose) == (SCALER_QUERY_ROUND, ChargePurpose.FEATURE_MOMENTS)
        assert entry.epsilon_after == pytest.approx(config.local_dp.scaler_epsilon, rel=5e-3)


def test_exact_secure_moments_give_the_pooled_scaler(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    config = _secure(small_config(tmp_path, local_dp=LocalDPConfig(enabled=False)))
    release = federated_scaler(
        grid_send(grid, "moments"),
        sorted(grid.get_node_ids()),
        config,
        _config_record(config),
        str,
        identities=consortium_identities(tmp_path, SILOS),
    )
    assert release.noise_std == 0 and release.epsilon is None
    silos = _pooled(tmp_path)
    pooled = FeatureScaler.from_statistics(
        FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos]),
        schema_for(DATASET),
    )
    # The public ranges cover these data (nothing is clipped); only the lattice rounds:
    # each silo's Σu moves by less than one step (2^-6), unbiasedly.
    layout = moment_layout(schema_for(DATASET))
    rows = sum(len(s.train) for s in silos)
    step = layout.half_width * SILOS * MOMENTS_RESOLUTION / rows
    index = list(layout.features)
    assert np.all(np.abs(release.scaler.mean[index] - pooled.mean[index]) <= step)
    np.testing.assert_allclose(release.scaler.scale, pooled.scale, rtol=5e-3)
    assert not (tmp_path / "silo-0" / PrivacyLedger.FILENAME).exists()


def test_plain_mode_sums_the_silos_dp_releases_sent_in_clear(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    config = small_config(tmp_path)
    release = federated_scaler(
        grid_send(grid, "moments"), sorted(grid.get_node_ids()), config, _config_record(config), str
    )
    assert not release.secure and release.contributors == SILOS and release.noise_std > 0
    layout = moment_layout(schema_for(DATASET))
    exact = np.sum([layout.vector(s.train.features) for s in _pooled(tmp_path)], axis=0)
    assert np.abs((release.values - exact) / release.noise_std).max() < 5.0


# --------------------------------------------------------------------------- evaluation


def _evaluation_instruction(tmp_path: Path, config: RunConfig) -> RecordDict:
    silos = _pooled(tmp_path)
    scaler = FeatureScaler.from_statistics(
        FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos]),
        schema_for(DATASET),
    )
    return RecordDict(
        {
            protocol.CONFIG: _config_record(config, 1),
            protocol.ARRAYS: weights_to_record(initial_weights()),
            protocol.SCALER: ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in scaler.to_arrays().items()}
            ),
        }
    )


def test_secure_evaluation_equals_the_sum_of_the_per_silo_evaluations(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    plain_config = small_config(tmp_path)
    instruction = _evaluation_instruction(tmp_path, plain_config)
    nodes = sorted(grid.get_node_ids())
    plain = evaluate_round(grid_send(grid, "p"), nodes, plain_config, instruction, 1, str)
    secure = evaluate_round(
        grid_send(grid, "s"),
        nodes,
        _secure(plain_config),
        instruction,
        1,
        str,
        identities=consortium_identities(tmp_path, SILOS),
    )
    assert len(plain.per_silo) == SILOS and not plain.secure
    assert secure.secure and secure.per_silo == {} and secure.contributors == SILOS
    assert secure.noise_std == 0  # the silos' default policy: exact evaluation sums
    # Counts and histograms are integers: exact. The loss sum is real: each silo's is
    # rounded (unbiasedly) to one lattice step of L · 2^-8.
    assert secure.num_examples == plain.num_examples
    assert secure.accuracy == plain.accuracy
    assert secure.auc == plain.auc
    step = 50.0 * EVALUATION_RESOLUTION / plain.num_examples
    assert secure.loss == pytest.approx(plain.loss, abs=SILOS * step)


def test_a_silos_policy_noises_its_evaluation_and_plans_the_budget_for_it(
    tmp_path: Path,
) -> None:
    records: list[Any] = []
    policy = SiloPolicy(evaluation_epsilon=0.5)
    config = _secure(small_config(tmp_path, num_rounds=2))
    server = make_server_app(
        config, "policy-run", tmp_path / "run", records.append, roster=consortium_roster(tmp_path)
    )
    client = make_client_app(
        lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"]), policy=policy),
        allow_non_private=True,
    )
    run_inprocess(server, client, SILOS)
    assert [r.round for r in records] == [0, 1, 2]
    for record in records:
        assert record.evaluation.secure and record.evaluation.noise_std > 0
        assert record.evaluation.auc is not None
    for i in range(SILOS):
        settings = silo_settings(tmp_path, i)
        with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
            charged = [(e.round, e.purpose) for e in ledger.entries()]
            # Round 0's evaluation and the moments come before the plan; rounds 1 and 2's
            # evaluations were kept budget for when the silo calibrated σ: all fit.
            assert charged == [
                (0, ChargePurpose.FEATURE_MOMENTS),
                (0, ChargePurpose.EVALUATION),
                (1, ChargePurpose.TRAINING),
                (1, ChargePurpose.EVALUATION),
                (2, ChargePurpose.TRAINING),
                (2, ChargePurpose.EVALUATION),
            ]
            assert ledger.spent_epsilon() <= settings.budget.epsilon
            assert ledger.spent_epsilon() > 0.97 * settings.budget.epsilon  # planned, not lost


def test_evaluation_epsilon_is_the_silos_node_config_and_refuses_plain_evaluation(
    tmp_path: Path,
) -> None:
    assert policy_from_node_config({"evaluation-epsilon": "0.5"}).evaluation_epsilon == 0.5
    assert policy_from_node_config({}).evaluation_epsilon is None
    with pytest.raises(ConfigError, match="evaluation-epsilon"):
        SiloPolicy(evaluation_epsilon=0.0)
    grid = _grid(tmp_path, SiloPolicy(evaluation_epsilon=0.5))
    config = small_config(tmp_path)
    summary = evaluate_round(
        grid_send(grid, "p"),
        sorted(grid.get_node_ids()),
        config,
        _evaluation_instruction(tmp_path, config),
        1,
        str,
    )
    # No silo sends exact sums in clear: nothing is pooled, nothing charged.
    assert summary.per_silo == {} and summary.num_examples == 0
    assert not (tmp_path / "silo-0" / PrivacyLedger.FILENAME).exists()


# --------------------------------------------------------------------------- whole runs


def _walk(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, leaf or dict) pair of a JSON document."""
    out: list[tuple[str, Any]] = [(path, value)]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _walk(v, f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _walk(v, f"{path}/{i}")
    return out


def test_a_secagg_run_records_no_per_silo_metric(tmp_path: Path) -> None:
    config = _secure(small_config(tmp_path, num_rounds=2, run_name="secure"))
    run_dir, results, plans = simulate(config, baseline=False, echo=lambda _: None)
    write_report(run_dir, config, results, plans)
    history = json.loads((run_dir / "dp" / "history.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    silo_ids = {f"silo-{i}" for i in range(SILOS)}
    metric_names = {"loss", "accuracy", "auc", "loss-sum", "correct", "train-loss", "train_loss"}
    for document in (history, report):
        for path, value in _walk(document):
            leaf = path.rsplit("/", 1)[-1]
            assert "clipped" not in leaf, path
            assert leaf not in {"train_loss", "train-loss", "per_silo"} or not value, path
            if isinstance(value, dict) and leaf in silo_ids:
                # Keyed by a silo: only its plan and its own ledger's ε, never a metric.
                assert not (set(value) & metric_names), (path, sorted(value))
    for record in history:
        assert record["evaluation"]["secure"] and record["evaluation"]["per_silo"] == {}
        for outcome in record["outcomes"]:
            assert set(outcome["metrics"]) <= set(PUBLIC_OUTCOME_METRICS), outcome["metrics"]
    assert history[-1]["evaluation"]["auc"] > 0.9
    moments = json.loads((run_dir / "dp" / MOMENTS_FILENAME).read_text())
    assert moments["secure"] and moments["contributors"] == SILOS and moments["noise_std"] > 0
