"""A real consortium on 127.0.0.1: one SuperLink, three SuperNodes, TLS and node auth.

Everything goes through the ``fedguard`` commands exactly as docs/deployment.md
runs them (``python -m`` of the CLI module, in a temporary folder). Every process
started is stopped by its PID in the fixtures' ``finally`` blocks: the PIDs in
the PID files, their descendants, and any process whose command line names the
test's folder or ports.

The module starts one consortium (one CA, one SuperLink, three SuperNodes with
fedguard's warm ClientApp executor; the processes and helpers are in
tests/integration/deployment_harness.py, shared with the chaos harness) and runs
three federated runs on it. What is checked:

* an unregistered key is refused (Flower's exit code 305) and the SuperLink
  speaks TLS only, with a certificate that chains to the consortium CA;
* ``basic``: a 2-round DP run over TLS with node authentication completes, every
  silo charged once per round; the run is in the signed audit log (each round's
  whole aggregation record, outcomes, ε, model hash), its models in the registry
  (list, show, rollback), and each silo logged and signed what it sent;
* a tampered audit log (a record edited, removed or reordered) is detected and
  the first bad record named;
* ``crash``, a 3-round run: a client killed (SIGKILL) mid-round 1 is a dropout
  for that round (audited with its reason) and rejoins a later round; then the
  server (SuperLink, SuperExec, ServerApp) killed (SIGKILL) once a silo has
  trained round 3, restarted and the run started again resumes after round 2:
  no lost or doubled round, no budget charged twice (the silos' ledgers), the
  replayed round answered from the outbox, each round audited once;
* an oversize update is rejected with its reason (in process: NaN, wrong shape
  and wrong dtype are covered in tests/server/test_orchestrator.py);
* ``secure``, a 1-round SecAgg+ run: every advert signed with the silos' identity
  keys (``node keygen``) and checked against the roster the CA signed
  (``ca sign-roster``), each silo verifying it with its own ``ca.crt``.

Each run calibrates σ so that its planned rounds fit the silo's *whole* budget
with what was spent before composed in, so each run starts the silos on new
state folders (``Consortium.fresh_silos``: a graceful stop, so the same keys join
again at once) with a budget of ε = 1. (Sharing one life across the runs needs a
budget so large, ε = 100, that σ sits at its floor, 0.5, where each charge's PLD
accounting takes about 8x the CPU it takes at ε = 1 (σ about 3): on two cores that
was most of the module's time.)
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard.core.config import PrivacyBudget
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger
from tests.integration.deployment_harness import (
    CLI,
    SILOS,
    Consortium,
    _alive,
    _cmdline,
    _descendants,
    _free_ports,
    _kill,
    _pid,
    _stop_all,
    _wait_until,
    audit_records,
    consortium_session,
    verify_audit,
    write_config,
)
from tests.integration.deployment_harness import history as _history

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

# Re-exported for tests that import them from here (tests/faults/test_locks.py).
__all__ = ["CLI", "_alive", "_cmdline", "_descendants", "_free_ports", "_stop_all"]

# Each run has silos of its own; a small budget keeps σ large and accounting cheap.
BUDGET = PrivacyBudget(1.0, 1e-5)
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    """One CA, one SuperLink and three SuperNodes (warm executors), shared by the module."""
    root = tmp_path_factory.mktemp("consortium")
    with consortium_session(root, BUDGET, SILOS, spare_keys=("rogue",)) as c:
        yield c


def _write_config(root: Path, name: str, rounds: int, extra: tuple[str, ...] = ()) -> Path:
    return write_config(root, name, rounds, extra)


def _audit_records(consortium: Consortium, run: str) -> list[dict[str, Any]]:
    return audit_records(consortium, run)


def _verify_audit(consortium: Consortium, log: Path) -> Any:
    return verify_audit(consortium, log)


def _outcomes(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["silo_id"]: o for o in record["outcomes"]}


def _charges(state: Path, silo: str, run: str) -> list[tuple[int, str]]:
    with PrivacyLedger.open(state, silo, BUDGET) as ledger:
        return [
            (e.round, str(e.status))
            for e in ledger.entries()
            if e.run_id == run and e.purpose is ChargePurpose.TRAINING
        ]


def _silo_log(state: Path, run: str) -> list[dict[str, Any]]:
    """The ``sent`` records of ``run`` in a silo's log (other kinds carry no reply)."""
    records = [json.loads(line) for line in (state / "silo-log.jsonl").read_text().splitlines()]
    return [
        r["payload"] for r in records if r["kind"] == "sent" and r["payload"].get("run_id") == run
    ]


def _start_run(consortium: Consortium, config: Path) -> str:
    done = consortium.fedguard("run", config.name, "--server-dir", "server")
    return done.stdout.split("Flower run ", 1)[1].split()[0]


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_only_tls_and_only_registered_keys(consortium: Consortium, tmp_path: Path) -> None:
    host, port = consortium.address.split(":")
    context = ssl.create_default_context(cafile=str(consortium.root / "ca" / "ca.crt"))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() is not None  # the certificate chains to the consortium CA
    foreign = ssl.create_default_context()  # the system CAs do not know our CA
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        foreign.wrap_socket(raw, server_hostname=host)

    done = consortium.start_silo("rogue", tmp_path / "rogue")
    assert done.returncode == 2
    assert "exit 305" in done.stderr and "not registered" in done.stderr
    assert not (tmp_path / "rogue" / "supernode.pid").exists()
    assert not [pid for pid in consortium.started if _alive(pid) and str(tmp_path) in _cmdline(pid)]


@dataclass
class BasicRun:
    output: str
    silos: dict[str, Path]  # the silos' state folders in this run


@pytest.fixture(scope="module")
def basic_run(consortium: Consortium) -> BasicRun:
    """A 2-round DP run over TLS with node authentication, run once for the checks below."""
    silos = consortium.fresh_silos("basic")
    config = _write_config(consortium.root, "basic", rounds=2)
    done = consortium.fedguard("run", config.name, "--server-dir", "server", "--wait")
    return BasicRun(str(done.stdout), silos)


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_a_two_round_run_over_tls_with_node_authentication(
    consortium: Consortium, basic_run: BasicRun
) -> None:
    assert "basic: finished:completed" in basic_run.output, basic_run.output
    history = _history(consortium, "basic")
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert {s: o["status"] for s, o in _outcomes(record).items()} == dict.fromkeys(SILOS, "ok")
        assert all(0 < eps <= BUDGET.epsilon for eps in record["silo_epsilon"].values())
    for name, state in basic_run.silos.items():
        assert _charges(state, name, "basic") == [(1, "completed"), (2, "completed")]


@pytest.mark.timeout(120)
def test_the_run_is_audited_registered_and_logged_by_every_silo(
    consortium: Consortium, basic_run: BasicRun
) -> None:
    verify = _verify_audit(consortium, consortium.server.audit_log)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    records = _audit_records(consortium, "basic")
    assert [r["kind"] for r in records] == ["run-start", "round", "round", "run-end"]
    start, *rounds, end = (r["payload"] for r in records)
    assert start["config"]["rounds"] == 2 and "flwr" in start["packages"]
    assert isinstance(start["flower_run_id"], int)
    assert end["status"] == "completed"
    history = _history(consortium, "basic")
    for payload, record in zip(rounds, history[1:], strict=True):
        assert payload["round"] == record["round"]
        # The round's whole aggregation record, whatever keys it has, and its outcomes.
        assert payload["aggregation"] == json.loads(json.dumps(record["aggregation"]))
        assert sorted(payload["participating"]) == sorted(SILOS)
        assert payload["dropouts"] == payload["rejected"] == payload["refusing"] == []
        assert payload["epsilon"] == pytest.approx(record["silo_epsilon"])
    assert end["model_sha256"] == rounds[-1]["model_sha256"]

    listing = consortium.fedguard("models", "list", "--run", "basic", "--server-dir", "server")
    lines = listing.stdout.splitlines()
    assert len(lines) == 3, listing.stdout  # rounds 0, 1, 2
    assert lines[-1].startswith("*")  # the head: round 2
    head = lines[-1].split()[1]
    assert rounds[-1]["model_sha256"].startswith(head)
    assert rounds[-1]["parent_sha256"] == rounds[0]["model_sha256"]
    shown = json.loads(consortium.fedguard("models", "show", head).stdout)
    assert shown["round"] == 2 and len(shown["lineage"]) == 3
    assert shown["config"]["rounds"] == 2 and "loss" in shown["metrics"]
    first = rounds[0]["model_sha256"][:12]
    rolled = consortium.fedguard(
        "models", "rollback", first, "--run", "basic", "--reason", "test", "--server-dir", "server"
    )  # fmt: skip
    assert "round 1" in rolled.stdout
    listing = consortium.fedguard("models", "list", "--run", "basic", "--server-dir", "server")
    assert [line[0] for line in listing.stdout.splitlines()] == [" ", "*", " "]

    for name, state in basic_run.silos.items():
        key = consortium.root / "keys" / name / "node.pub"
        log = state / "silo-log.jsonl"
        check = consortium.fedguard("audit", "verify", str(log), "--silo", "--public-key", str(key))
        assert "OK" in check.stdout and "signed" in check.stdout, check.stdout
        sent = _silo_log(state, "basic")
        trained = [s for s in sent if s["message_type"] == "train"]
        assert [(s["round"], s["status"]) for s in trained] == [(1, "ok"), (2, "ok")]
        assert all(len(s["update_sha256"]) == 64 for s in trained)
        assert trained[1]["global_sha256"] == rounds[0]["model_sha256"]  # what it trained from
        assert [s["round"] for s in sent if s["message_type"] == "evaluate"] == [0, 1, 2]
        assert trained[-1]["epsilon"] == pytest.approx(history[2]["silo_epsilon"][name])


@pytest.mark.timeout(60)
def test_a_tampered_audit_log_is_detected(
    consortium: Consortium, basic_run: BasicRun, tmp_path: Path
) -> None:
    copy = tmp_path / "audit.jsonl"
    lines = consortium.server.audit_log.read_text().splitlines(keepends=True)
    target = next(i for i, line in enumerate(lines) if '"kind":"round"' in line)
    record = json.loads(lines[target])
    record["payload"]["participating"] = []  # an edit that keeps the line valid JSON
    edited = [*lines]
    edited[target] = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
    copy.write_text("".join(edited))
    done = _verify_audit(consortium, copy)
    assert done.returncode == 1
    assert f"TAMPERED at seq {record['seq']}" in done.stdout and "edited" in done.stdout
    copy.write_text("".join(lines[:target] + lines[target + 1 :]))  # removed instead
    done = _verify_audit(consortium, copy)
    assert done.returncode == 1 and "removed" in done.stdout
    swapped = [*lines]
    swapped[target], swapped[target + 1] = swapped[target + 1], swapped[target]  # reordered
    copy.write_text("".join(swapped))
    done = _verify_audit(consortium, copy)
    assert done.returncode == 1 and f"TAMPERED at seq {record['seq']}" in done.stdout


@dataclass
class CrashRun:
    """What the ``crash`` run saw: a silo killed in round 1, the server killed in round 3."""

    victim: str
    silos: dict[str, Path]  # the silos' state folders in this run
    restarted: Any
    trained_before_kill: set[str]
    checkpoints_at_kill: list[str]
    resumed_output: str


@pytest.fixture(scope="module")
def crash_run(consortium: Consortium) -> CrashRun:
    """A 3-round run in which a silo is killed mid-round 1 and restarted at once, and the
    server is killed once a silo has trained round 3, restarted, and the run started again."""
    victim = "hospital-c"
    silos = consortium.fresh_silos("crash")
    state = silos[victim]
    config = _write_config(consortium.root, "crash", rounds=3)
    log = state / "supernode.log"
    offset = log.stat().st_size
    _start_run(consortium, config)

    def receiving_train() -> bool:
        with open(log, "rb") as handle:
            handle.seek(offset)
            return b"Receiving: train message" in handle.read()

    _wait_until(receiving_train, 240, f"{victim} to receive round 1")
    # Crash the whole silo: SuperNode, warm executor, its fork server and the task.
    roots = {_pid(state / "supernode.pid"), _pid(state / "executor.pid")}
    _kill(roots | _descendants(roots))
    (state / "supernode.pid").unlink()
    (state / "executor.pid").unlink()
    # Restart at once, as a service manager would; Flower refuses the key until it
    # has marked the dead node offline (two missed heartbeats), so keep retrying.
    restart: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: restart.update(done=consortium.start_silo(victim, state, 240))
    )
    thread.start()
    try:
        # Kill the server once a silo has trained round 3 (charged, its update in its
        # outbox), before the server could checkpoint that round.
        outboxes = {
            name: silo / "outbox" / hashlib.sha256(b"crash").hexdigest()[:16] / "round-00003.npz"
            for name, silo in silos.items()
        }
        _wait_until(lambda: any(p.exists() for p in outboxes.values()), 300, "round 3")
        link = _pid(consortium.server.pid_file)
        everything = {link} | _descendants({link})  # SuperLink, SuperExec, the ServerApp
        _kill(everything)
        _wait_until(lambda: not any(_alive(p) for p in everything), 30, "the server to die")
        trained = {name for name, path in outboxes.items() if path.exists()}
        checkpoints = consortium.server.runs / "crash" / "checkpoints"
        at_kill = sorted(p.stem for p in checkpoints.glob("round-*.json"))
        consortium.start_server()  # same database; the SuperNodes reconnect on their own
        done = consortium.fedguard(
            "run", config.name, "--server-dir", "server", "--wait", timeout=RUN_TIMEOUT_S
        )
    finally:
        thread.join(timeout=240)
    return CrashRun(victim, silos, restart.get("done"), trained, at_kill, done.stdout + done.stderr)


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_a_client_killed_mid_round_is_a_dropout_and_rejoins(
    consortium: Consortium, crash_run: CrashRun
) -> None:
    victim, state = crash_run.victim, crash_run.silos[crash_run.victim]
    assert crash_run.restarted is not None and crash_run.restarted.returncode == 0, (
        crash_run.restarted and crash_run.restarted.stderr
    )
    history = _history(consortium, "crash")
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    first = _outcomes(history[1])
    assert first[victim]["status"] in {"no-reply", "error"}, first[victim]
    assert {first[s]["status"] for s in SILOS if s != victim} == {"ok"}
    assert history[1]["aggregation"]["accepted"] == 2
    rejoined = [r["round"] for r in history[2:] if _outcomes(r)[victim]["status"] == "ok"]
    assert rejoined, f"{victim} never rejoined: {[_outcomes(r)[victim] for r in history[2:]]}"
    charged = [r for r, _ in _charges(state, victim, "crash")]
    assert len(charged) == len(set(charged))  # killed mid-training: charged, never twice
    (audited,) = [
        r["payload"] for r in _audit_records(consortium, "crash") if r["payload"].get("round") == 1
    ]
    assert [d["silo"] for d in audited["dropouts"]] == [victim] and audited["dropouts"][0]["reason"]


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_a_server_killed_mid_run_resumes_without_lost_doubled_or_recharged_rounds(
    consortium: Consortium, crash_run: CrashRun
) -> None:
    assert crash_run.checkpoints_at_kill[-1] == "round-0002", crash_run.checkpoints_at_kill
    out = crash_run.resumed_output
    assert "resumes after that round" in out and "crash: finished:completed" in out, out
    history = _history(consortium, "crash")
    assert [r["round"] for r in history] == [0, 1, 2, 3]  # none lost, none doubled
    final = {s: o["status"] for s, o in _outcomes(history[3]).items()}
    assert final == dict.fromkeys(SILOS, "ok"), history[3]["outcomes"]
    for name, state in crash_run.silos.items():
        charges = sorted(r for r, _ in _charges(state, name, "crash"))
        if name != crash_run.victim:
            assert charges == [1, 2, 3], (name, charges)  # each round once
        assert len(charges) == len(set(charges)), (name, charges)
        replies = [(s["round"], s["status"]) for s in _silo_log(state, "crash")
                   if s["message_type"] == "train"]  # fmt: skip
        if name in crash_run.trained_before_kill:  # answered the replay from its outbox
            assert (3, "replayed") in replies, (name, replies)
    audited = _audit_records(consortium, "crash")
    assert sorted(r["payload"]["round"] for r in audited if r["kind"] == "round") == [1, 2, 3]
    starts = [r["payload"] for r in audited if r["kind"] == "run-start"]
    assert [s.get("resumed_after_round") for s in starts] == [None, 2]
    # The killed ServerApp's run-start is closed when the resumed run starts.
    ends = [r["payload"]["status"] for r in audited if r["kind"] == "run-end"]
    assert ends == ["killed", "completed"], ends
    verify = _verify_audit(consortium, consortium.server.audit_log)
    assert verify.returncode == 0, verify.stdout


@pytest.mark.timeout(120)
def test_an_oversize_update_is_rejected_with_its_reason(tmp_path: Path) -> None:
    """In process: a reply padded with a 16 MB tensor, or a tensor 100x too large."""
    from flwr.app import Array, ArrayRecord, Context, Message
    from flwr.clientapp.typing import ClientAppCallable

    from fedguard.client.app import make_client_app
    from fedguard.server.app import make_server_app
    from fedguard.simulation.inprocess import run_inprocess
    from fedguard.wire import protocol
    from tests.factories import silo_settings, small_config

    def oversize(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        partition = int(context.node_config["partition-id"])
        if message.metadata.message_type == protocol.TRAIN and partition in (0, 1):
            arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
            if partition == 0:
                arrays["padding"] = np.zeros(4_000_000, np.float32)
            else:
                name = next(iter(arrays))
                arrays[name] = np.zeros((arrays[name].size * 100,), np.float32)
            reply.content.array_records["arrays"] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
            )
        return reply

    config = small_config(tmp_path, num_rounds=1)
    records: list[Any] = []
    server = make_server_app(config, "oversize", tmp_path / "run", records.append)
    client = make_client_app(
        lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"])), mods=[oversize]
    )
    run_inprocess(server, client, config.num_clients)
    outcomes = {o.silo_id: o for o in records[-1].outcomes}
    assert outcomes["silo-0"].status == "rejected"
    assert "padding" in outcomes["silo-0"].reason
    assert outcomes["silo-1"].status == "rejected"
    assert "shape" in outcomes["silo-1"].reason
    assert outcomes["silo-2"].status == "ok"
    assert records[-1].aggregation["accepted"] == 1


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_a_secure_run_is_authenticated_with_the_signed_roster(consortium: Consortium) -> None:
    """SecAgg+ over the deployment: adverts signed by the silos' identity keys, checked
    against the roster the CA signed (each silo verifies it with its own ca.crt)."""
    silos = consortium.fresh_silos("secure")
    config = _write_config(
        consortium.root,
        "secure",
        rounds=1,
        extra=("secagg = true", "secagg-allow-no-dropout = true"),  # 3 silos: no dropout
    )
    done = consortium.fedguard("run", config.name, "--server-dir", "server", "--wait")
    assert "secure: finished:completed" in done.stdout, done.stdout + done.stderr
    record = _history(consortium, "secure")[-1]
    assert str(record["aggregation"]["rule"]).startswith("secagg+")
    assert {s: o["status"] for s, o in _outcomes(record).items()} == dict.fromkeys(SILOS, "ok")
    for name, state in silos.items():
        config_text = (state / "node-config.toml").read_text()
        assert "secagg-identity-key" in config_text and "consortium-key" in config_text
        seen = json.loads((state / "secagg-roster-seen.json").read_text())
        assert [entry["serial"] for entry in seen.values()] == [1], name
