"""Issue 13, item 3: the signed audit log must not under-report.

Every sampled silo of a round is recorded with its status and reason (an aborted
SecAgg round too, with the ε of the silos that released their masked input and
"charged nothing" for those that never released); a silo missing from the round's
evaluation shows in the evaluation's coverage; a silo that went away is
"disconnected after 7 s", not "no reply before the timeout"; a killed run gets
its final record when the next run starts on the server folder.

In process (fedguard's in-process engine, real silo agents, real ledgers); the
killed run is a real process killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedguard.audit.chain import read_records
from fedguard.audit.pki import init_ca, issue_server_cert, load_public_key
from fedguard.audit.server_log import verify_audit_log
from fedguard.client.app import make_client_app
from fedguard.core.config import (
    LocalDPConfig,
    RunConfig,
    SecureAggregationConfig,
    dataclass_field_names,
)
from fedguard.deploy.layouts import ServerLayout
from fedguard.deploy.recorder import DeploymentRecorder
from fedguard.privacy.ledger import PrivacyLedger
from fedguard.server.orchestrator import FederatedRun, RoundRecord
from fedguard.simulation.inprocess import InProcessGrid
from fedguard.wire import protocol
from tests.factories import consortium_roster, inprocess_node, silo_settings, small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

Mod = Callable[[Message, Context, ClientAppCallable], Message]
REPO = Path(__file__).resolve().parents[2]


def _layout(tmp_path: Path) -> ServerLayout:
    init_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "server")
    return ServerLayout(tmp_path / "server")


def _secagg(**options: Any) -> SecureAggregationConfig:
    """SecAgg on; small consortia allowed explicitly where the code knows the option."""
    if "allow_no_dropout" in dataclass_field_names(SecureAggregationConfig):
        options.setdefault("allow_no_dropout", True)
    return SecureAggregationConfig(enabled=True, **options)


def _run(
    tmp_path: Path,
    config: RunConfig,
    *,
    mods: list[Mod] | None = None,
    grid: Callable[[Any, int], InProcessGrid] = InProcessGrid,
    layout: ServerLayout | None = None,
    run_id: str = "audited",
) -> list[RoundRecord]:
    records: list[RoundRecord] = []
    client = make_client_app(
        lambda c: silo_settings(
            tmp_path, int(c.node_config["partition-id"]), num_silos=config.num_clients
        ),
        allow_non_private=True,
        mods=mods,
    )
    roster = consortium_roster(tmp_path, config.num_clients)
    run_dir = tmp_path / "runs" / run_id

    def run(on_round: Callable[[Any], None]) -> Any:
        federated = FederatedRun(
            grid(client, config.num_clients),
            config,
            run_id,
            run_dir,
            on_round,
            roster=roster,
        )
        federated.run()
        return federated

    if layout is None:
        run(records.append)
        return records
    with DeploymentRecorder.open(layout, run_id, config.to_options(), run_dir) as recorder:

        def both(record: RoundRecord) -> None:
            records.append(record)
            recorder.on_round(record)

        federated = run(both)
        if hasattr(recorder, "finish"):
            recorder.finish(federated.outcome)
    return records


def _round_payload(layout: ServerLayout, run_id: str, number: int) -> dict[str, Any]:
    (payload,) = [
        r.payload
        for r in read_records(layout.audit_log)
        if r.kind == "round" and r.payload["run_id"] == run_id and r.payload["round"] == number
    ]
    return dict(payload)


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def test_an_aborted_secagg_round_records_every_silo_and_the_epsilon_of_those_that_released(
    tmp_path: Path,
) -> None:
    # 5 silos (k = 4, t = 3). Round 1: silo-3 fails at share-keys (before it could
    # release), silo-2 and silo-4 fail at the consistency check (after they sent
    # their masked inputs); silo-0 and silo-1 are left with fewer than t live
    # neighbours: the round aborts after four silos released.
    failing = {
        3: protocol.SECAGG_SHARE,
        2: protocol.SECAGG_CONSISTENCY,
        4: protocol.SECAGG_CONSISTENCY,
    }
    done: set[int] = set()

    def drop(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        part = _partition(context)
        kind = message.metadata.message_type
        # The first such stage of round 1 is training's (the evaluation runs after it).
        if message.metadata.group_id == "1" and failing.get(part) == kind and part not in done:
            done.add(part)
            return Message(Error(code=0, reason="simulated failure"), reply_to=message)
        return call_next(message, context)

    layout = _layout(tmp_path)
    config = small_config(tmp_path, num_clients=5, num_rounds=1, secagg=_secagg())
    records = _run(tmp_path, config, mods=[drop], layout=layout)
    record = records[1]
    by_silo = {o.silo_id: o for o in record.outcomes}
    assert set(by_silo) == {f"silo-{i}" for i in range(5)}
    assert "aborted" in record.aggregation
    for silo in ("silo-0", "silo-1"):
        assert by_silo[silo].status == "aborted" and by_silo[silo].reason
    assert by_silo["silo-3"].status == "dropout"
    assert getattr(by_silo["silo-3"], "stage", None) == "share-keys"
    for silo in ("silo-2", "silo-4"):
        assert by_silo[silo].status == "dropout"
        assert getattr(by_silo[silo], "stage", None) == "consistency"
        assert "simulated failure" in by_silo[silo].reason

    # The silos' own ledgers: the four that released paid for round 1, silo-3 did not.
    paid: dict[str, float] = {}
    for i in range(5):
        settings = silo_settings(tmp_path, i, num_silos=5)
        with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
            charges = [e for e in ledger.entries() if e.run_id == "audited" and e.round == 1]
        if charges:
            paid[settings.silo_id] = charges[-1].epsilon_after
    assert set(paid) == {"silo-0", "silo-1", "silo-2", "silo-4"}

    assert record.silo_epsilon == paid  # history.json: what each silo reports it paid
    payload = _round_payload(layout, "audited", 1)
    assert payload["epsilon"] == paid  # the signed record says the same
    assert payload["charged_nothing"] == ["silo-3"]
    silos = {entry["silo"]: entry for entry in payload["silos"]}
    assert silos["silo-3"]["epsilon"] is None and silos["silo-3"]["charge"] == "nothing"
    assert silos["silo-0"]["status"] == "aborted" and silos["silo-0"]["charge"] == "charged"
    assert silos["silo-4"]["stage"] == "consistency"
    dropouts = {d["silo"]: d["status"] for d in payload["dropouts"]}
    assert dropouts == {
        "silo-0": "aborted",
        "silo-1": "aborted",
        "silo-2": "dropout",
        "silo-3": "dropout",
        "silo-4": "dropout",
    }
    assert payload["participating"] == [] and payload["failure"]
    assert verify_audit_log(layout.audit_log, load_public_key(layout.audit_public_key)).ok


def test_a_silo_missing_from_the_evaluation_is_in_its_coverage(tmp_path: Path) -> None:
    # silo-2 trains, but its evaluation fails in every round after round 0.
    def no_evaluation(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            message.metadata.message_type == protocol.EVALUATE
            and message.metadata.group_id != "0"
            and _partition(context) == 2
        ):
            return Message(Error(code=0, reason="evaluation split unreadable"), reply_to=message)
        return call_next(message, context)

    layout = _layout(tmp_path)
    config = small_config(tmp_path, num_rounds=1, local_dp=LocalDPConfig(enabled=False))
    records = _run(tmp_path, config, mods=[no_evaluation], layout=layout)
    full, partial = records[0].evaluation, records[1].evaluation
    assert [o.status for o in records[1].outcomes] == ["ok", "ok", "ok"]
    assert getattr(partial, "covered", None) == ("silo-0", "silo-1")
    missing = getattr(partial, "missing", {})
    assert set(missing) == {"silo-2"} and "evaluation split unreadable" in missing["silo-2"]
    assert partial.num_examples == sum(
        partial.per_silo[s]["num-examples"] for s in ("silo-0", "silo-1")
    )
    assert partial.num_examples < full.num_examples
    evaluation = _round_payload(layout, "audited", 1)["evaluation"]
    assert evaluation["covered"] == ["silo-0", "silo-1"]
    assert "evaluation split unreadable" in evaluation["missing"]["silo-2"]
    assert evaluation["num_examples"] == partial.num_examples


class _LosingGrid(InProcessGrid):
    """From round 1, node ``gone`` has disconnected: Flower's SuperLink answers for it with
    its own error reply (node unavailable), 7 s after the message was sent; node
    ``silent`` sends nothing at all, and the send waits out its timeout."""

    gone = inprocess_node(2)
    silent = inprocess_node(1)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        messages = list(messages)
        later = [m for m in messages if m.metadata.group_id not in ("0", "")]
        lost = [m for m in later if m.metadata.dst_node_id == self.gone]
        quiet = [
            m
            for m in later
            if m.metadata.dst_node_id == self.silent and m.metadata.message_type == protocol.TRAIN
        ]
        rest = [m for m in messages if m not in lost and m not in quiet]
        replies = list(self.pull_messages(self.push_messages(rest)))
        for m in lost:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            error = create_message_error_unavailable_res_message(m.metadata, "node_unavail")
            error.metadata.created_at = time.time() + 7.0  # when the SuperLink gave up on it
            replies.append(error)
        if quiet and timeout is not None:
            time.sleep(timeout)  # a real grid waits for the reply until the timeout
        return replies


def test_a_disconnected_silo_is_not_reported_as_a_timeout(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    config = small_config(tmp_path, num_rounds=1, local_dp=LocalDPConfig(enabled=False))
    config = dataclasses.replace(
        config, participation=dataclasses.replace(config.participation, reply_timeout_s=0.5)
    )
    records = _run(tmp_path, config, grid=_LosingGrid, layout=layout)
    by_silo = {o.silo_id: o for o in records[1].outcomes}
    gone, silent = by_silo["silo-2"], by_silo["silo-1"]
    assert gone.status == "no-reply"
    assert "disconnected after 7" in gone.reason, gone.reason
    assert "timeout" not in gone.reason
    assert silent.status == "no-reply"
    assert "no reply within 0.5 s" in silent.reason, silent.reason
    dropouts = {d["silo"]: d["reason"] for d in _round_payload(layout, "audited", 1)["dropouts"]}
    assert "disconnected after 7" in dropouts["silo-2"]
    assert "no reply within 0.5 s" in dropouts["silo-1"]


_KILLED_SERVERAPP = """
import os, signal, sys
from pathlib import Path
from fedguard.deploy.layouts import ServerLayout
from fedguard.deploy.recorder import DeploymentRecorder
recorder = DeploymentRecorder.open(
    ServerLayout(Path(sys.argv[1])), "killed-run", {"rounds": 3}, Path(sys.argv[2])
)
recorder.__enter__()  # run-start written; the ServerApp dies before its run-end
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_gets_its_final_record_when_the_next_run_starts(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SERVERAPP, str(layout.root), str(tmp_path / "killed")],
        cwd=REPO,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert [r.kind for r in read_records(layout.audit_log)] == ["run-start"]
    # A run still going in this process (another run on the same SuperLink) is not closed.
    live = DeploymentRecorder.open(layout, "live-run", {"rounds": 1}, tmp_path / "live")
    live.__enter__()
    with DeploymentRecorder.open(layout, "next-run", {"rounds": 1}, tmp_path / "next"):
        pass
    live.__exit__(None, None, None)
    records = read_records(layout.audit_log)
    ends = [(r.payload["run_id"], r.payload["status"]) for r in records if r.kind == "run-end"]
    assert ends[0] == ("killed-run", "killed"), ends
    assert [run for run, _ in ends] == ["killed-run", "next-run", "live-run"]
    killed_end = next(r for r in records if r.kind == "run-end")
    assert "without a final record" in " ".join(killed_end.payload["reasons"])
    start = next(r for r in records if r.kind == "run-start")
    assert killed_end.payload["run_start_seq"] == start.seq
    # Written once: a later start finds nothing left to close.
    with DeploymentRecorder.open(layout, "third-run", {"rounds": 1}, tmp_path / "third"):
        pass
    statuses = [r.payload["status"] for r in read_records(layout.audit_log) if r.kind == "run-end"]
    assert statuses.count("killed") == 1
    assert verify_audit_log(layout.audit_log, load_public_key(layout.audit_public_key)).ok


def test_a_silos_ledger_reset_is_in_the_audit_log(tmp_path: Path) -> None:
    # A reset is a silo's explicit fresh start; the consortium must see it (the ε a
    # reset silo reports is since the reset, not its lifetime spend).
    from fedguard.client.ledger_guard import reset_ledger

    layout = _layout(tmp_path)
    config = small_config(tmp_path, num_rounds=1)
    _run(tmp_path, config, layout=layout, run_id="before-reset")
    before = {s["silo"]: s for s in _round_payload(layout, "before-reset", 1)["silos"]}
    assert {s["ledger_resets"] for s in before.values()} == {0}
    reset_ledger(silo_settings(tmp_path, 1, num_silos=3), "new data-sharing agreement")
    _run(tmp_path, config, layout=layout, run_id="after-reset")
    after = {s["silo"]: s for s in _round_payload(layout, "after-reset", 1)["silos"]}
    assert after["silo-1"]["ledger_resets"] == 1
    assert after["silo-1"]["epsilon_archived"] == before["silo-1"]["epsilon"]
    assert after["silo-0"]["ledger_resets"] == 0 and after["silo-0"]["epsilon_archived"] == 0
    assert verify_audit_log(layout.audit_log, load_public_key(layout.audit_public_key)).ok
