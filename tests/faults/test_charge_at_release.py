"""Issue 13, item 2: a silo pays for what it releases, not for what it started.

On the starting commit the ledger was charged when training started: a SecAgg
round that aborted before any masked input was sent (a silo dropped, the rest
could not go on) still cost every live silo a full round. Now the charge is
committed right before the release (the masked input under SecAgg, the reply in
clear), and recorded in the silo's signed log at that moment; a round that ends
before it costs nothing, and crash safety holds (never a release without its
charge, never two charges for one release).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import RecordDict

from fedguard.audit.chain import read_records
from fedguard.audit.logs import SILO_LOG_NAME
from fedguard.client import app as client_app
from fedguard.client.outbox import Outbox
from fedguard.client.training import TrainingError
from fedguard.core.errors import LedgerError
from fedguard.privacy.ledger import PrivacyLedger
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from tests.adversarial.harness import (
    SETUP,
    act_as_server,
    consortium,
    plain_instruction,
    status,
    vector_length,
)
from tests.factories import initial_weights, local_scaler, node_context, silo_settings

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

RUN = "run-a"


def _charges(state_dir: Path, silo_id: str, budget: Any) -> list[tuple[str, int, str]]:
    if not (state_dir / PrivacyLedger.FILENAME).exists():
        return []
    with PrivacyLedger.open(state_dir, silo_id, budget) as ledger:
        return [(e.run_id, e.round, e.purpose.value) for e in ledger.entries()]


def _logged_charges(state_dir: Path) -> list[tuple[str, int]]:
    records = read_records(state_dir / SILO_LOG_NAME)
    return [
        (r.payload["run_id"], r.payload["round"])
        for r in records
        if r.kind == "ledger" and r.payload.get("event") == "charged"
    ]


def test_a_secagg_round_aborted_before_the_masked_input_costs_nothing(tmp_path: Path) -> None:
    """Three silos; the server hears every advert, then one silo goes silent at the
    share stage: the round cannot reach the masked inputs, so nobody released."""
    act_as_server()
    group = consortium(tmp_path, 3)
    weights, scaler = initial_weights(), local_scaler(group[0].settings)
    base = RecordDict(dict(plain_instruction(1, weights, scaler).content.items()))
    run = group.run_secagg(
        group.node_ids,
        base,
        vector_length=vector_length(weights),
        silent={"share-keys": {group[2].node_id}},
    )
    assert not run.completed and "masked-input" not in run.stages, run.describe()
    assert {s for s, _ in run.replies(SETUP).values()} == {ReplyStatus.OK}  # all trained
    for silo in group.silos.values():
        state = silo.settings.state_dir
        assert _charges(state, silo.silo_id, silo.settings.budget) == [], (
            f"{silo.silo_id} was charged for a round that released nothing"
        )
        assert _logged_charges(state) == []


def test_a_secagg_round_charges_at_the_masked_input_and_reports_it_there(
    tmp_path: Path,
) -> None:
    act_as_server()
    group = consortium(tmp_path, 3)
    weights, scaler = initial_weights(), local_scaler(group[0].settings)
    base = RecordDict(dict(plain_instruction(1, weights, scaler).content.items()))
    dropped = group[2].node_id
    # Silo 2 goes silent after the share stage: it never sends its masked input.
    run = group.run_secagg(
        group.node_ids,
        base,
        vector_length=vector_length(weights),
        silent={"masked-input": {dropped}, "consistency": {dropped}, "unmask": {dropped}},
    )
    setup_metrics = {
        node: dict(reply.content.metric_records[protocol.METRICS])
        for node, reply in run.stages[SETUP].replies.items()
    }
    assert all("epsilon-spent" not in m for m in setup_metrics.values()), setup_metrics
    for silo in group.silos.values():
        state = silo.settings.state_dir
        charges = _charges(state, silo.silo_id, silo.settings.budget)
        if silo.node_id == dropped:
            assert charges == [] and _logged_charges(state) == []
            continue
        assert charges == [(RUN, 1, "training")], (silo.silo_id, charges)
        assert _logged_charges(state) == [(RUN, 1)]
        reply = run.stages["masked-input"].replies[silo.node_id]
        assert status(reply)[0] is ReplyStatus.OK
        reported = reply.content.metric_records[protocol.METRICS]["epsilon-spent"]
        with PrivacyLedger.open(state, silo.silo_id, silo.settings.budget) as ledger:
            assert reported == pytest.approx(ledger.spent_epsilon())


def _train(tmp_path: Path, round_number: int) -> Any:
    app = client_app.make_client_app(
        lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"]))
    )
    settings = silo_settings(tmp_path, 0)
    message = plain_instruction(round_number, initial_weights(), local_scaler(settings))
    return app(message, node_context(0))


def test_a_plain_round_that_fails_in_training_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TrainingError("the GPU fell off")

    monkeypatch.setattr(client_app, "train_dp_sgd", broken)
    reply = _train(tmp_path, 1)
    assert protocol.reply_status(reply)[0] is ReplyStatus.ERROR
    settings = silo_settings(tmp_path, 0)
    assert _charges(settings.state_dir, settings.silo_id, settings.budget) == []


def test_a_crash_between_the_charge_and_the_reply_is_charged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The charge is committed, then keeping the update fails (the process "dies"):
    nothing was sent. The replayed round trains again and releases under that same
    charge: one release, one charge."""
    real_save = Outbox.save
    calls = {"n": 0}

    def dies_once(self: Outbox, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise LedgerError("outbox: [Errno 28] No space left on device")
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Outbox, "save", dies_once)
    first = _train(tmp_path, 1)
    assert protocol.reply_status(first)[0] is not ReplyStatus.OK
    assert protocol.ARRAYS not in first.content.array_records
    second = _train(tmp_path, 1)
    assert protocol.reply_status(second)[0] is ReplyStatus.OK, protocol.reply_status(second)
    settings = silo_settings(tmp_path, 0)
    assert _charges(settings.state_dir, settings.silo_id, settings.budget) == [(RUN, 1, "training")]
    spent = second.content.metric_records[protocol.METRICS]["epsilon-spent"]
    with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
        assert spent == pytest.approx(ledger.spent_epsilon())
