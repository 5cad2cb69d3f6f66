"""Secure DP statistics: the release machinery and the trust producers, end to end in process."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedguard.client.app import make_client_app
from fedguard.client.statistic_release import SecureStatistic, noised_release
from fedguard.core.config import ModelSpec
from fedguard.core.datasets import schema_for
from fedguard.core.histograms import bin_edges
from fedguard.core.models import build_model
from fedguard.core.sensitive_groups import sensitive_groups
from fedguard.core.serialization import load_weights
from fedguard.core.trust_config import TrustNoise
from fedguard.privacy.analysis.release import calibrate_release_noise
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger
from fedguard.privacy.secagg import SecAggAbort
from fedguard.server.statistic_collection import collect_secure_statistic, grid_send
from fedguard.simulation.inprocess import InProcessGrid
from fedguard.trust.silo_statistics import (
    SILO_AND_TRUST_PRODUCERS,
    drift_statistic,
    fairness_statistic,
)
from fedguard.wire import protocol
from fedguard.wire.statistics import StatisticKind, StatisticRequest, fairness_vector_length
from tests.factories import (
    DATASET,
    consortium_identities,
    initial_weights,
    instruction,
    local_scaler,
    silo_settings,
)


def _request(kind: StatisticKind, length: int, query_round: int = 0) -> StatisticRequest:
    return StatisticRequest(kind, query_round, 1.0, TrustNoise.GAUSSIAN, 2.0**-4, length, {})


def test_noise_has_the_calibrated_std_and_is_charged_once(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    n = 40_000
    statistic = SecureStatistic(np.zeros(n), l2_sensitivity=2.0)
    request = _request(StatisticKind.DRIFT, n)
    noised, metrics = noised_release(settings, "run-a", request, statistic)
    sigma = calibrate_release_noise(1.0, settings.budget.delta)
    assert metrics["noise-multiplier"] == sigma
    # Sample std of 40 000 normals: relative standard error 0.35 %.
    assert np.std(noised) == pytest.approx(sigma * 2.0, rel=0.015)
    assert abs(np.mean(noised)) < 4 * sigma * 2.0 / np.sqrt(n)
    with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
        (entry,) = ledger.entries()
        assert entry.purpose is ChargePurpose.DRIFT
        assert entry.epsilon_after == pytest.approx(metrics["release-epsilon"])
    # A replay resends the same release and charges nothing.
    again, replay_metrics = noised_release(settings, "run-a", request, statistic)
    np.testing.assert_array_equal(again, noised)
    assert replay_metrics["replayed"] == 1.0
    # The next query round is a new release, charged again.
    noised_release(settings, "run-a", _request(StatisticKind.DRIFT, n, 1), statistic)
    with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
        assert [e.round for e in ledger.entries()] == [0, 1]


def _grid(tmp_path: Path, allow_non_private: bool = True) -> InProcessGrid:
    client = make_client_app(
        lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"])),
        allow_non_private=allow_non_private,
        producers=SILO_AND_TRUST_PRODUCERS,
    )
    return InProcessGrid(client, 3)


def test_exact_sums_with_noise_off_equal_the_silos_plain_sums(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    scaler = local_scaler(silo_settings(tmp_path, 0))
    weights = initial_weights()
    content = RecordDict(dict(instruction(0, weights, scaler).content.items()))
    schema = schema_for(DATASET)
    edges = bin_edges(schema.standardize, 10)
    groups = sensitive_groups(schema, "mean radius", (14.0,))
    model = build_model(schema, ModelSpec())
    load_weights(model, weights)
    silos = [silo_settings(tmp_path, i).data.load() for i in range(3)]
    fairness_options = {"attribute": "mean radius", "bands": [14.0]}
    cases = [
        (StatisticKind.DRIFT, edges.shape[0] * 10, {"edges": edges, "split": "train"}),
        (StatisticKind.FAIRNESS, fairness_vector_length(groups.num_groups), fairness_options),
    ]
    for kind, length, options in cases:
        result = collect_secure_statistic(
            grid_send(grid, kind.value),
            sorted(grid.get_node_ids()),
            kind,
            instruction=content,
            vector_length=length,
            query_round=0,
            target_epsilon=1.0,
            noise=TrustNoise.NONE,
            options=options,
            identities=consortium_identities(tmp_path, 3),
        )
        producer = drift_statistic if kind is StatisticKind.DRIFT else fairness_statistic
        plain = sum(producer(s, model, scaler, options).values for s in silos)
        assert len(result.contributors) == 3 and result.clipped_values == 0
        assert result.values.sum() > 0
        # Counts are integers: exact, not approximate. The fairness score sums are real:
        # each silo's is rounded (unbiasedly) to the resolution 2^-4.
        exact = length - (2 * 10 if kind is StatisticKind.FAIRNESS else 0)
        np.testing.assert_array_equal(result.values[:exact], plain[:exact])
        np.testing.assert_allclose(result.values[exact:], plain[exact:], atol=3 * 2.0**-4)


def test_silos_refuse_exact_sums_unless_they_allow_non_private_work(tmp_path: Path) -> None:
    grid = _grid(tmp_path, allow_non_private=False)
    scaler = local_scaler(silo_settings(tmp_path, 0))
    message = instruction(0, initial_weights(), scaler)
    content = RecordDict({k: v for k, v in message.content.items() if k != protocol.ARRAYS})
    edges = bin_edges(schema_for(DATASET).standardize, 4)
    with pytest.raises(SecAggAbort):
        collect_secure_statistic(
            grid_send(grid, "q"),
            sorted(grid.get_node_ids()),
            StatisticKind.DRIFT,
            instruction=content,
            vector_length=edges.shape[0] * 4,
            query_round=0,
            target_epsilon=1.0,
            noise=TrustNoise.NONE,
            options={"edges": edges},
            identities=consortium_identities(tmp_path, 3),
        )
    assert not (tmp_path / "silo-0" / PrivacyLedger.FILENAME).exists()
