"""Issue 13, item 1: a lost, rolled-back or replaced ledger must not hand a silo a fresh budget.

The silo's own signed log commits to the ledger (its id, and its head hash and ε
after every charge); a ledger that disagrees (deleted, an older copy restored,
another ledger put in its place, a ledger whose log is gone) is refused before
anything is trained or charged; starting afresh is an explicit, logged reset.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flwr.app import Message

from fedguard.audit.chain import read_records
from fedguard.audit.logs import SILO_LOG_NAME
from fedguard.client.app import make_client_app
from fedguard.core.config import DatasetName
from fedguard.privacy.ledger import PrivacyLedger
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from tests.factories import initial_weights, instruction, local_scaler, node_context, silo_settings

LEDGER = "privacy-ledger.sqlite"


def _train(tmp_path: Path, round_number: int) -> Message:
    app = make_client_app(lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"])))
    settings = silo_settings(tmp_path, 0)
    message = instruction(round_number, initial_weights(), local_scaler(settings))
    return app(message, node_context(0))


def _refused_for_integrity(reply: Message) -> str:
    status, reason = protocol.reply_status(reply)
    assert status is not ReplyStatus.OK, "the silo trained on a ledger that lost its charges"
    assert protocol.ARRAYS not in reply.content.array_records
    assert "LedgerIntegrityError" in reason, reason
    return reason


def test_a_deleted_ledger_is_refused_not_recreated(tmp_path: Path) -> None:
    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    ledger = tmp_path / "silo-0" / LEDGER
    ledger.unlink()
    reason = _refused_for_integrity(_train(tmp_path, 2))
    assert "missing" in reason
    assert not ledger.exists(), "the ledger was silently re-created"


def test_an_older_ledger_copy_is_refused(tmp_path: Path) -> None:
    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    state = tmp_path / "silo-0"
    backup = tmp_path / "backup.sqlite"
    shutil.copy2(state / LEDGER, backup)
    assert protocol.reply_status(_train(tmp_path, 2))[0] is ReplyStatus.OK
    shutil.copy2(backup, state / LEDGER)  # restore the copy taken after round 1
    reason = _refused_for_integrity(_train(tmp_path, 3))
    assert "older copy" in reason
    settings = silo_settings(tmp_path, 0)
    with PrivacyLedger.open(state, "silo-0", settings.budget) as opened:
        assert [e.round for e in opened.entries()] == [1]  # nothing charged for round 3


def _log(tmp_path: Path) -> list[dict[str, object]]:
    records = read_records(tmp_path / "silo-0" / SILO_LOG_NAME)
    return [{"kind": r.kind, **r.payload} for r in records]


def test_a_replaced_ledger_with_a_larger_spend_is_refused(tmp_path: Path) -> None:
    """Another ledger file for the same silo id (another machine's, a fresh one that
    was charged elsewhere): its spend is not below the log's, but it is not the
    ledger the log vouches for."""
    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    elsewhere = tmp_path / "elsewhere"
    for round_number in (1, 2):
        assert protocol.reply_status(_train(elsewhere, round_number))[0] is ReplyStatus.OK
    shutil.copy2(elsewhere / "silo-0" / LEDGER, tmp_path / "silo-0" / LEDGER)
    reason = _refused_for_integrity(_train(tmp_path, 2))
    assert "replaced" in reason


def test_a_ledger_beside_a_missing_log_is_refused(tmp_path: Path) -> None:
    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    state = tmp_path / "silo-0"
    for name in (SILO_LOG_NAME, f"{SILO_LOG_NAME}.head"):
        (state / name).unlink()
    reason = _refused_for_integrity(_train(tmp_path, 2))
    assert "silo log" in reason and "missing" in reason
    # The refusal started a new log; that log does not vouch for the ledger either.
    _refused_for_integrity(_train(tmp_path, 2))


def test_every_charge_is_committed_to_the_log_with_the_ledger_head(tmp_path: Path) -> None:
    for round_number in (1, 2):
        assert protocol.reply_status(_train(tmp_path, round_number))[0] is ReplyStatus.OK
    settings = silo_settings(tmp_path, 0)
    with PrivacyLedger.open(settings.state_dir, "silo-0", settings.budget) as ledger:
        head, entries = ledger.head(), ledger.entries()
    bound = [r for r in _log(tmp_path) if r["kind"] == "ledger"]
    assert [r["event"] for r in bound] == ["created", "charged", "charged"]
    assert {r["ledger_id"] for r in bound} == {head.ledger_id}
    assert [r["head"] for r in bound] == list(head.heads)
    assert [r["epsilon"] for r in bound[1:]] == [e.epsilon_after for e in entries]


def test_a_charge_the_log_missed_is_caught_up_not_refused(tmp_path: Path) -> None:
    """The ledger committed a charge, then the process died before the log record:
    the ledger is ahead (it can only over-count); the next open logs the charge."""
    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    settings = silo_settings(tmp_path, 0)
    with PrivacyLedger.open(settings.state_dir, "silo-0", settings.budget) as ledger:
        missed = ledger.charge("run-a", 2, ledger.entries()[0].event)
    assert protocol.reply_status(_train(tmp_path, 3))[0] is ReplyStatus.OK
    charged = [r for r in _log(tmp_path) if r["kind"] == "ledger" and r["event"] == "charged"]
    assert [(r["round"], r.get("catch_up", False)) for r in charged] == [
        (1, False),
        (2, True),
        (3, False),
    ]
    assert charged[1]["epsilon"] == missed.epsilon_after


def test_starting_afresh_is_an_explicit_logged_reset(tmp_path: Path) -> None:
    from fedguard.client.ledger_guard import reset_ledger

    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    settings = silo_settings(tmp_path, 0)
    with PrivacyLedger.open(settings.state_dir, "silo-0", settings.budget) as ledger:
        spent, old_id = ledger.spent_epsilon(), ledger.head().ledger_id
    archived = reset_ledger(settings, "new data-sharing agreement, approved by the DPO")
    assert archived is not None and archived.exists()
    (reset,) = [r for r in _log(tmp_path) if r["kind"] == "ledger" and r["event"] == "reset"]
    assert reset["previous_ledger_id"] == old_id and reset["previous_epsilon"] == spent
    assert reset["reason"].startswith("new data-sharing agreement")
    # The fresh ledger is the one the log now vouches for: training goes on.
    assert protocol.reply_status(_train(tmp_path, 2))[0] is ReplyStatus.OK


def test_every_reply_after_a_reset_tells_the_consortium_about_it(tmp_path: Path) -> None:
    # The server sees the reset: a reset silo's ε since the reset is not its
    # lifetime spend, so each charged reply also carries the resets and their ε.
    from fedguard.client.ledger_guard import reset_ledger

    before = _train(tmp_path, 1).content.metric_records[protocol.METRICS]
    assert before["ledger-resets"] == 0 and before["epsilon-archived"] == 0.0
    spent = float(before["epsilon-spent"])
    reset_ledger(silo_settings(tmp_path, 0), "new agreement")
    after = _train(tmp_path, 2).content.metric_records[protocol.METRICS]
    assert after["ledger-resets"] == 1
    assert after["epsilon-archived"] == spent
    assert float(after["epsilon-spent"]) <= spent  # the new ledger's own total


def test_a_reset_moves_the_silo_to_the_budget_its_config_now_names(tmp_path: Path) -> None:
    # The old ledger is checked under the budget it was created with, then archived:
    # a new budget in the config is not a reason the reset itself fails.
    import dataclasses

    from fedguard.client.ledger_guard import open_silo_ledger, reset_ledger
    from fedguard.core.config import PrivacyBudget

    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    settings = silo_settings(tmp_path, 0)
    raised = dataclasses.replace(
        settings, budget=PrivacyBudget(settings.budget.epsilon * 2, settings.budget.delta)
    )
    reset_ledger(raised, "budget doubled by the governance board")
    with open_silo_ledger(raised) as ledger:
        assert ledger.budget == raised.budget and ledger.spent_epsilon() == 0.0
    (reset,) = [r for r in _log(tmp_path) if r["kind"] == "ledger" and r["event"] == "reset"]
    assert reset["previous_epsilon"] > 0


def test_reset_ledger_command_needs_confirmation_and_logs_the_reset(tmp_path: Path) -> None:
    from fedguard.cli import main
    from fedguard.deploy.bundles import node_config_toml

    assert protocol.reply_status(_train(tmp_path, 1))[0] is ReplyStatus.OK
    settings = silo_settings(tmp_path, 0)
    state = settings.state_dir
    (state / "node-config.toml").write_text(
        node_config_toml(
            "silo-0",
            DatasetName.parse(settings.data.contract.name),
            tmp_path / "x.csv",
            state,
            settings.budget,
        )
    )
    args = ["client", "reset-ledger", "--state-dir", str(state), "--reason", "new agreement"]
    assert main(args) != 0  # no --yes: nothing happens
    assert [r["event"] for r in _log(tmp_path) if r["kind"] == "ledger"] == ["created", "charged"]
    assert main([*args, "--yes"]) == 0
    events = [r["event"] for r in _log(tmp_path) if r["kind"] == "ledger"]
    assert events == ["created", "charged", "reset"]
    assert list((state / "archive").glob("privacy-ledger-*.sqlite"))
