"""Each silo's own log of what it sent, written by the ClientApp for every reply."""

from pathlib import Path
from typing import Any

import pytest

from fedguard.audit.chain import read_records
from fedguard.audit.logs import SILO_LOG_NAME, verify_silo_log
from fedguard.audit.pki import load_public_key, node_keygen
from fedguard.client.app import make_client_app
from fedguard.client.silo import SiloSettings
from fedguard.client.silo_log import SiloLogError, record_reply
from fedguard.core.config import LocalDPConfig, PrivacyBudget
from fedguard.core.serialization import record_to_weights, weights_sha256
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from tests.factories import initial_weights, instruction, local_scaler, node_context, silo_settings

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier


def _app(settings: SiloSettings, signing_key: Path | None = None) -> Any:
    def resolve(context: Any) -> SiloSettings:
        return settings

    app = make_client_app(resolve)

    def call(message: Any) -> Any:
        context = node_context(0)
        if signing_key is not None:
            context.node_config["signing-key"] = str(signing_key)
        return app(message, context)

    return call


def _sent(settings: SiloSettings) -> list[dict[str, Any]]:
    return [r.payload for r in read_records(settings.state_dir / SILO_LOG_NAME) if r.kind == "sent"]


def _ledger_events(settings: SiloSettings) -> list[str]:
    records = read_records(settings.state_dir / SILO_LOG_NAME)
    return [r.payload["event"] for r in records if r.kind == "ledger"]


def test_train_evaluate_refusal_and_replay_are_logged_signed_and_chained(tmp_path: Path) -> None:
    keys = node_keygen(tmp_path / "keys", comment="silo-0")
    settings = silo_settings(tmp_path, 0)
    call = _app(settings, keys.private_key)
    weights, scaler = initial_weights(), local_scaler(settings)

    trained = call(instruction(1, weights, scaler, planned_rounds=1))
    assert protocol.reply_status(trained)[0] is ReplyStatus.OK
    replayed = call(instruction(1, weights, scaler, planned_rounds=1))
    assert replayed.content.metric_records[protocol.METRICS]["replayed"] == 1
    refused = call(instruction(2, weights, scaler, planned_rounds=1))
    assert protocol.reply_status(refused)[0] is ReplyStatus.REFUSED
    call(instruction(1, weights, scaler, message_type=protocol.EVALUATE))

    sent = _sent(settings)
    assert [(s["message_type"], s["round"], s["status"]) for s in sent] == [
        ("train", 1, "ok"),
        ("train", 1, "replayed"),
        ("train", 2, "refused"),
        ("evaluate", 1, "ok"),
    ]
    update = weights_sha256(record_to_weights(trained.content.array_records[protocol.ARRAYS]))
    assert sent[0]["update_sha256"] == update == sent[1]["update_sha256"]
    assert sent[2]["update_sha256"] is None and sent[3]["update_sha256"] is None
    assert sent[0]["global_sha256"] == weights_sha256(weights)
    spent = trained.content.metric_records[protocol.METRICS]["epsilon-spent"]
    assert all(s["epsilon"] == pytest.approx(spent) for s in sent)  # charged once
    assert "budget" in sent[2]["reason"]
    assert all(s["run_id"] == "run-a" and s["flower_run_id"] == 1 for s in sent)

    report = verify_silo_log(settings.state_dir / SILO_LOG_NAME, load_public_key(keys.public_key))
    # The ledger's creation and its one charge are committed to the same chain.
    assert _ledger_events(settings) == ["created", "charged"]
    assert report.ok and report.signed and report.records == 6, report.summary()


def test_an_unsigned_log_without_a_signing_key(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 1)
    call = _app(settings)
    call(instruction(1, initial_weights(), local_scaler(settings)))
    report = verify_silo_log(settings.state_dir / SILO_LOG_NAME)
    assert report.ok and not report.signed and report.records == 3  # created, charged, sent


def test_other_messages_are_not_logged(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    call = _app(settings)
    call(
        instruction(
            1, initial_weights(), local_scaler(settings), message_type=protocol.FEATURE_STATISTICS
        )
    )
    assert not (settings.state_dir / SILO_LOG_NAME).exists()


def test_a_log_that_cannot_be_written_turns_the_reply_into_an_error(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    (settings.state_dir / SILO_LOG_NAME).mkdir(parents=True)  # a folder where the file goes
    call = _app(settings)
    reply = call(instruction(1, initial_weights(), local_scaler(settings)))
    status, reason = protocol.reply_status(reply)
    assert status is ReplyStatus.ERROR
    # Nothing is trained or charged either: the ledger cannot be checked against an
    # unreadable log (fedguard.client.ledger_guard); the error reply is not logged.
    assert "SiloLogError" in reason and "does not send it" in reason
    assert protocol.ARRAYS not in reply.content.array_records  # the update is not sent
    assert not (settings.state_dir / "privacy-ledger.sqlite").exists()


def test_a_tampered_silo_log_refuses_further_replies(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    call = _app(settings)
    weights, scaler = initial_weights(), local_scaler(settings)
    call(instruction(1, weights, scaler, message_type=protocol.EVALUATE))
    path = settings.state_dir / SILO_LOG_NAME
    path.write_text(path.read_text().replace('"evaluate"', '"train"'))
    reply = call(instruction(1, weights, scaler, message_type=protocol.EVALUATE))
    status, reason = protocol.reply_status(reply)
    assert status is ReplyStatus.ERROR and "fails verification" in reason


def test_an_unreadable_signing_key_is_a_typed_error(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 0)
    message = instruction(1, initial_weights(), local_scaler(settings), message_type="evaluate")
    with pytest.raises(SiloLogError, match="no private key"):
        record_reply(settings, {"signing-key": str(tmp_path / "missing.key")}, message, message)


def test_non_private_setups_are_logged_without_an_update(tmp_path: Path) -> None:
    settings = silo_settings(tmp_path, 2, budget=PrivacyBudget(3.0, 1e-5))
    app = make_client_app(lambda context: settings, allow_non_private=True)
    weights, scaler = initial_weights(), local_scaler(settings)
    reply = app(instruction(1, weights, scaler, dp=LocalDPConfig(enabled=False)), node_context(2))
    assert protocol.reply_status(reply)[0] is ReplyStatus.OK
    (sent,) = _sent(settings)
    assert sent["status"] == "ok" and sent["epsilon"] == 0.0
    assert len(sent["update_sha256"]) == 64
