"""The silo agent, driven in process with real messages, real data and a real ledger."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedguard.client.app import SiloAgent, make_client_app
from fedguard.client.silo import settings_from_node_config
from fedguard.core.config import DatasetName, LocalDPConfig, PrivacyBudget
from fedguard.core.datasets import schema_for
from fedguard.core.errors import ConfigError
from fedguard.core.feature_moments import moment_layout
from fedguard.core.trust_config import TrustNoise
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.statistics import REQUEST, StatisticKind, StatisticRequest
from tests.factories import (
    DATASET,
    initial_weights,
    instruction,
    local_scaler,
    node_context,
    silo_settings,
)


def _train(agent: SiloAgent, message):  # type: ignore[no-untyped-def]
    reply = agent.handle(message, agent.train)
    return reply, protocol.reply_status(reply)


def test_epsilon_accumulates_across_rebuilt_agents_and_reopened_ledgers(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    weights, scaler = initial_weights(), local_scaler(settings)
    spent = []
    for round_number in (1, 2, 3):
        # A fresh agent per message, as Flower rebuilds a simulated ClientApp.
        reply, (status, reason) = _train(
            SiloAgent(settings), instruction(round_number, weights, scaler)
        )
        assert status is ReplyStatus.OK, reason
        spent.append(reply.content.metric_records[protocol.METRICS]["epsilon-spent"])
    assert spent[0] < spent[1] < spent[2] <= 3.0
    # A process restart: the ledger on disk says the same.
    with PrivacyLedger.open(settings.state_dir, "silo-0", settings.budget) as ledger:
        assert [e.round for e in ledger.entries()] == [1, 2, 3]
        assert ledger.spent_epsilon() == pytest.approx(spent[-1])


def test_round_past_the_budget_is_refused_and_charges_nothing(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 1)
    weights, scaler = initial_weights(), local_scaler(settings)
    for round_number in (1, 2):
        _, (status, _) = _train(
            SiloAgent(settings), instruction(round_number, weights, scaler, planned_rounds=2)
        )
        assert status is ReplyStatus.OK
    with PrivacyLedger.open(settings.state_dir, "silo-1", settings.budget) as ledger:
        before = ledger.spent_epsilon()
    reply, (status, reason) = _train(
        SiloAgent(settings), instruction(3, weights, scaler, planned_rounds=2)
    )
    assert status is ReplyStatus.REFUSED
    assert "budget" in reason
    assert protocol.ARRAYS not in reply.content.array_records
    with PrivacyLedger.open(settings.state_dir, "silo-1", settings.budget) as ledger:
        assert ledger.spent_epsilon() == before
        assert len(ledger.entries()) == 2


def test_a_replayed_round_resends_the_same_update_and_charges_nothing(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    weights, scaler = initial_weights(), local_scaler(settings)
    first, (status, _) = _train(SiloAgent(settings), instruction(1, weights, scaler))
    assert status is ReplyStatus.OK
    again, (status, _) = _train(SiloAgent(settings), instruction(1, weights, scaler))
    assert status is ReplyStatus.OK
    assert again.content.metric_records[protocol.METRICS]["replayed"] == 1
    sent = first.content.array_records[protocol.ARRAYS]
    resent = again.content.array_records[protocol.ARRAYS]
    for name in sent:
        np.testing.assert_array_equal(sent[name].numpy(), resent[name].numpy())
    with PrivacyLedger.open(settings.state_dir, "silo-0", settings.budget) as ledger:
        assert len(ledger.entries()) == 1


def test_a_replayed_round_from_another_model_is_refused(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    weights, scaler = initial_weights(), local_scaler(settings)
    assert _train(SiloAgent(settings), instruction(1, weights, scaler))[1][0] is ReplyStatus.OK
    other = {k: v + 0.5 for k, v in weights.items()}
    _, (status, reason) = _train(SiloAgent(settings), instruction(1, other, scaler))
    assert status is ReplyStatus.REFUSED
    assert reason.startswith("[replayed-round]") and "already" in reason


def test_budget_too_small_for_one_round_is_refused_with_a_clear_reason(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0, PrivacyBudget(1e-4, 1e-5))
    _, (status, reason) = _train(
        SiloAgent(settings), instruction(1, initial_weights(), local_scaler(settings))
    )
    assert status is ReplyStatus.REFUSED
    assert "one round" in reason


def test_non_private_training_is_refused_unless_allowed(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    message = instruction(
        1, initial_weights(), local_scaler(settings), dp=LocalDPConfig(enabled=False)
    )
    assert _train(SiloAgent(settings), message)[1][0] is ReplyStatus.REFUSED
    _, (status, _) = _train(SiloAgent(settings, allow_non_private=True), message)
    assert status is ReplyStatus.OK
    assert not (settings.state_dir / PrivacyLedger.FILENAME).exists()


def test_wrong_dataset_and_malformed_instructions_are_errors(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    weights, scaler = initial_weights(), local_scaler(settings)
    wrong = instruction(1, weights, scaler, dataset=DatasetName.DIGITS)
    _, (status, reason) = _train(SiloAgent(settings), wrong)
    # Another data contract than the silo's own: a refusal naming both.
    assert status is ReplyStatus.REFUSED and "digits" in reason and "breast-cancer" in reason
    broken = instruction(1, weights, scaler)
    broken.content.config_records[protocol.CONFIG] = ConfigRecord({"run-id": "x"})
    _, (status, reason) = _train(SiloAgent(settings), broken)
    assert status is ReplyStatus.ERROR and "lacks field" in reason


def test_evaluate_and_statistics_replies(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 2)
    agent = SiloAgent(settings)
    message = instruction(
        0, initial_weights(), local_scaler(settings), message_type=protocol.EVALUATE
    )
    reply = agent.handle(message, agent.evaluate)
    assert protocol.reply_status(reply)[0] is ReplyStatus.OK
    metrics = reply.content.metric_records[protocol.METRICS]
    assert metrics["num-examples"] == len(settings.data.load().test)
    assert protocol.HISTOGRAMS in reply.content.array_records
    # Plain mode's feature moments: the DP release in clear, charged to the ledger first.
    layout = moment_layout(schema_for(DATASET))
    request = StatisticRequest(
        StatisticKind.FEATURE_MOMENTS, 0, 0.2, TrustNoise.GAUSSIAN, 2.0**-6, layout.length, {}
    )
    message.content[REQUEST] = ConfigRecord(request.to_records()[0])
    stats = agent.handle(message, agent.feature_statistics)
    assert protocol.reply_status(stats)[0] is ReplyStatus.OK
    (moments,) = stats.content.array_records[protocol.STATISTICS].values()
    assert moments.numpy().shape == (layout.length,)
    released = stats.content.metric_records[protocol.METRICS]
    assert released["noise-multiplier"] > 0 and released["l2-sensitivity"] == layout.l2_sensitivity
    with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
        (entry,) = ledger.entries()
        assert (entry.round, entry.purpose) == (0, ChargePurpose.FEATURE_MOMENTS)
    # A replayed query resends the very same release, charging nothing.
    again = agent.handle(message, agent.feature_statistics)
    np.testing.assert_array_equal(
        next(iter(again.content.array_records[protocol.STATISTICS].values())).numpy(),
        moments.numpy(),
    )


def test_client_app_routes_messages_like_flower(tmp_path: Path) -> None:
    app = make_client_app(
        lambda context: silo_settings(tmp_path, int(context.node_config["partition-id"]))
    )
    settings = silo_settings(tmp_path, 0)
    reply = app(instruction(1, initial_weights(), local_scaler(settings)), node_context(0))
    assert protocol.reply_status(reply)[0] is ReplyStatus.OK
    assert reply.content.config_records[protocol.STATUS]["silo-id"] == "silo-0"


def test_node_config_parsing(tmp_path: Path) -> None:
    settings = settings_from_node_config(
        {
            "silo-id": "h1",
            "dataset": "flchain",
            "data-path": str(tmp_path / "x.csv"),
            "state-dir": str(tmp_path),
            "target-epsilon": "2.5",
            "delta": "1e-6",
        }
    )
    assert settings.budget == PrivacyBudget(2.5, 1e-6)
    with pytest.raises(ConfigError, match="lacks"):
        settings_from_node_config({"silo-id": "h1"})
    with pytest.raises(ConfigError):
        settings_from_node_config(
            {
                "silo-id": "h1",
                "dataset": "flchain",
                "data-path": "x",
                "state-dir": "y",
                "target-epsilon": "-1",
                "delta": "1e-6",
            }
        )
