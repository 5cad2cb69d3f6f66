"""Issue 13, item 1: a lost or rolled-back ledger must not hand a silo a fresh budget.

The silo's own signed log records the ledger's ε after every reply; a ledger
that holds less (deleted, or an older copy restored) is refused before anything
is trained or charged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flwr.app import Message

from fedguard.client.app import make_client_app
from fedguard.core import protocol
from fedguard.core.protocol import ReplyStatus
from fedguard.privacy.ledger import PrivacyLedger
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
