"""The audit logs: every kind of tampering is named by the first bad seq and why."""

import itertools
import json
import math
import threading
from enum import StrEnum
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedguard.audit.chain import GENESIS, AuditError, canonical_json, jsonable, read_records
from fedguard.audit.logs import SiloLog, verify_silo_log
from fedguard.audit.server_log import AuditKind, AuditLog, verify_audit_log
from fedguard.core.errors import FedguardError

KEY = ed25519.Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()


def _write_log(path: Path, rounds: int = 4) -> AuditLog:
    log = AuditLog.open(path, KEY)
    log.run_start("run-a", {"dataset": "breast-cancer", "rounds": rounds})
    for r in range(1, rounds + 1):
        log.round(
            "run-a",
            r,
            sampled=[1, 2, 3],
            participating=[1, 2],
            refusing=[3],
            dropouts=[],
            rejected=[{"node": 2, "reason": "tensor 'w' holds 1 NaN"}],
            epsilon={"silo-1": 0.5 * r},
            central_epsilon=None,
            model_sha256="ab" * 32,
        )
    log.run_end("run-a", "completed", rounds=rounds)
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    return path


def test_an_intact_log_verifies_and_chains(log_path: Path) -> None:
    report = verify_audit_log(log_path, PUBLIC)
    assert report.ok, report.summary()
    assert report.records == 6
    records = read_records(log_path)
    assert [r.seq for r in records] == list(range(6))
    assert [r.kind for r in records] == ["run-start", "round", "round", "round", "round", "run-end"]
    assert records[0].prev_sha256 == GENESIS
    assert all(b.prev_sha256 == a.sha256 for a, b in itertools.pairwise(records))
    assert report.last_sha256 == records[-1].sha256
    assert records[0].payload["packages"]["flwr"].startswith("1.41")
    assert "OK: 6 records" in report.summary()


def test_every_line_is_json_with_the_documented_fields(log_path: Path) -> None:
    first = json.loads(_lines(log_path)[0])
    assert list(first) == ["seq", "time", "kind", "payload", "prev_sha256", "sha256", "signature"]


def test_an_edited_record_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2] = lines[2].replace('"participating":[1,2]', '"participating":[1,2,3]')
    _rewrite(log_path, lines)
    report = verify_audit_log(log_path, PUBLIC)
    assert not report.ok
    assert report.first_bad_seq == 2
    assert "edited" in (report.reason or "")
    assert "TAMPERED at seq 2" in report.summary()


def test_an_edited_and_rehashed_record_fails_its_signature(log_path: Path) -> None:
    from fedguard.audit.chain import AuditRecord, _digest

    lines = _lines(log_path)
    record = AuditRecord.from_json(json.loads(lines[3]))
    payload = {**record.payload, "epsilon": {"silo-1": 0.01}}
    forged = AuditRecord(record.seq, record.time, record.kind, payload, record.prev_sha256, "", "")
    forged = AuditRecord(
        forged.seq, forged.time, forged.kind, payload, forged.prev_sha256,
        _digest(forged.body()), record.signature,
    )  # fmt: skip
    lines[3] = forged.to_line().decode()
    _rewrite(log_path, lines)
    report = verify_audit_log(log_path, PUBLIC)
    assert report.first_bad_seq == 3
    assert "signature" in (report.reason or "")


def test_a_removed_record_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    del lines[2]
    _rewrite(log_path, lines)
    report = verify_audit_log(log_path, PUBLIC)
    assert report.first_bad_seq == 2
    assert "removed" in (report.reason or "")


def test_an_inserted_record_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines.insert(3, lines[2])  # a replayed copy
    _rewrite(log_path, lines)
    report = verify_audit_log(log_path, PUBLIC)
    assert report.first_bad_seq == 3
    assert "inserted" in (report.reason or "")


def test_a_forged_record_signed_by_another_key_is_named(tmp_path: Path, log_path: Path) -> None:
    other = AuditLog.open(tmp_path / "other.jsonl", ed25519.Ed25519PrivateKey.generate())
    for _ in range(3):
        other.round("run-a", 9)
    lines = _lines(log_path)[:2] + _lines(tmp_path / "other.jsonl")[2:3]
    _rewrite(log_path, lines)
    report = verify_audit_log(log_path, PUBLIC, check_head_file=False)
    assert report.first_bad_seq == 2
    assert "prev_sha256" in (report.reason or "")


def test_reordered_records_are_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    _rewrite(log_path, lines)
    report = verify_audit_log(log_path, PUBLIC)
    assert report.first_bad_seq == 2
    assert "expected seq 2, found 3" in (report.reason or "")


def test_a_truncated_tail_is_caught_by_the_head_file(log_path: Path) -> None:
    _rewrite(log_path, _lines(log_path)[:4])
    report = verify_audit_log(log_path, PUBLIC)
    assert not report.ok
    assert report.first_bad_seq == 4
    assert "truncated tail" in (report.reason or "")


def test_a_truncated_tail_is_caught_by_an_expected_head(log_path: Path) -> None:
    head = AuditLog.open(log_path, KEY).head()
    assert head is not None and head[0] == 5
    _rewrite(log_path, _lines(log_path)[:5])
    log_path.with_name(log_path.name + ".head").unlink()
    assert verify_audit_log(log_path, PUBLIC).ok  # a prefix alone looks whole...
    report = verify_audit_log(log_path, PUBLIC, expected_head=head)  # ...not against an anchor
    assert report.first_bad_seq == 5
    assert "truncated tail" in (report.reason or "")


def test_a_rewritten_history_is_caught_by_an_expected_head(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _write_log(path)
    anchor = (3, read_records(path)[3].sha256)
    path.unlink()
    path.with_name(path.name + ".head").unlink()
    log = AuditLog.open(path, KEY)  # the key holder writes another history
    for r in range(6):
        log.round("run-a", r, note="rewritten")
    report = verify_audit_log(path, PUBLIC, expected_head=anchor)
    assert report.first_bad_seq == 3
    assert "rewritten history" in (report.reason or "")


def test_a_torn_last_line_fails_verification_and_open_repairs_it_on_the_record(
    log_path: Path,
) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data + b'{"seq":6,"time":"2026')
    report = verify_audit_log(log_path, PUBLIC)
    assert report.first_bad_seq == 6
    assert "incomplete" in (report.reason or "")
    log = AuditLog.open(log_path, KEY)
    records = log.records()
    assert records[-1].kind == AuditKind.LOG_REPAIRED
    assert records[-1].payload["torn_bytes"] == len(b'{"seq":6,"time":"2026')
    assert (log_path.parent / records[-1].payload["moved_to"]).read_bytes().startswith(b'{"seq"')
    assert verify_audit_log(log_path, PUBLIC).ok


def test_the_wrong_public_key_fails_at_the_first_record(log_path: Path) -> None:
    report = verify_audit_log(log_path, ed25519.Ed25519PrivateKey.generate().public_key())
    assert report.first_bad_seq == 0
    assert "signature" in (report.reason or "")


def test_open_refuses_to_extend_a_tampered_log(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[1] = lines[1].replace('"round":1', '"round":7')
    _rewrite(log_path, lines)
    with pytest.raises(AuditError, match="fails verification"):
        AuditLog.open(log_path, KEY)


def test_reopening_continues_the_chain(log_path: Path) -> None:
    AuditLog.open(log_path, KEY).run_start("run-b", {"rounds": 1})
    records = read_records(log_path)
    assert records[-1].seq == 6
    assert records[-1].prev_sha256 == records[-2].sha256
    assert verify_audit_log(log_path, PUBLIC).ok


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog.open(path, KEY) for _ in range(4)]

    def write(log: AuditLog, worker: int) -> None:
        for r in range(10):
            log.round(f"run-{worker}", r)

    threads = [threading.Thread(target=write, args=(log, i)) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify_audit_log(path, PUBLIC)
    assert report.ok, report.summary()
    assert report.records == 40


def test_payloads_are_normalised_before_hashing(tmp_path: Path) -> None:
    class Color(StrEnum):
        RED = "red"

    value = {
        "nan": math.nan,
        "inf": -math.inf,
        "np": np.float32(0.5),
        "arr": np.arange(3),
        "enum": Color.RED,
        "path": Path("/x"),
        "tuple": (1, 2),
        "set": {3, 1},
        1: "int key",
    }
    assert jsonable(value) == {
        "nan": "NaN",
        "inf": "-Infinity",
        "np": 0.5,
        "arr": [0, 1, 2],
        "enum": "red",
        "path": "/x",
        "tuple": [1, 2],
        "set": [1, 3],
        "1": "int key",
    }
    log = AuditLog.open(tmp_path / "a.jsonl", KEY)
    record = log.round("r", 1, loss=math.nan)
    assert record.payload["loss"] == "NaN"
    assert verify_audit_log(tmp_path / "a.jsonl", PUBLIC).ok
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()
    with pytest.raises(AuditError, match="cannot record"):
        jsonable({"x": object()})


def test_bad_appends_raise_typed_errors(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "a.jsonl", KEY)
    with pytest.raises(AuditError, match="unknown record kind"):
        log.append("sent", {})
    with pytest.raises(AuditError, match="Ed25519"):
        AuditLog.open(tmp_path / "b.jsonl", ec.generate_private_key(ec.SECP384R1()))  # type: ignore[arg-type]
    assert issubclass(AuditError, FedguardError)


def test_silo_log_unsigned_is_chained(tmp_path: Path) -> None:
    log = SiloLog.open(tmp_path)
    log.sent("run-a", 1, "train", "cd" * 32, 1.25)
    log.sent("run-a", 1, "evaluate", None, None)
    path = tmp_path / "silo-log.jsonl"
    report = verify_silo_log(path)
    assert report.ok and not report.signed
    lines = _lines(path)
    lines[0] = lines[0].replace('"epsilon":1.25', '"epsilon":0.25')
    _rewrite(path, lines)
    assert verify_silo_log(path).first_bad_seq == 0


def test_silo_log_signed_with_the_ecdsa_node_key(tmp_path: Path) -> None:
    node_key = ec.generate_private_key(ec.SECP384R1())
    log = SiloLog.open(tmp_path, node_key)
    log.sent("run-a", 1, "train", "cd" * 32, 1.25, status="ok")
    path = tmp_path / "silo-log.jsonl"
    assert verify_silo_log(path, node_key.public_key()).ok
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert "signature" in (verify_silo_log(path, other).reason or "")
    with pytest.raises(AuditError, match="64 lower-case hex"):
        log.sent("run-a", 2, "train", "not-a-hash", 1.0)
    with pytest.raises(AuditError, match="unknown record kind"):
        log.append(AuditKind.ROUND, {})


def test_a_missing_log_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        verify_audit_log(tmp_path / "absent.jsonl", PUBLIC)


def test_find_lets_a_resumed_server_write_each_round_once(log_path: Path) -> None:
    log = AuditLog.open(log_path, KEY)
    assert log.find("round", "run-a", 3) is not None
    assert log.find("round", "run-a", 9) is None
    assert log.find("round", "run-b", 3) is None
    found = log.find("run-end", "run-a")
    assert found is not None and found.seq == 5


def test_record_round_sorts_outcomes_and_writes_a_round_once(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "a.jsonl", KEY)
    record = {
        "round": 2,
        "seconds": 3.5,
        "sampled": 4,
        "outcomes": [
            {"node_id": 1, "silo_id": "a", "status": "ok", "reason": "", "metrics": {}},
            {"node_id": 2, "silo_id": "b", "status": "refused", "reason": "budget", "metrics": {}},
            {"node_id": 3, "silo_id": "c", "status": "rejected", "reason": "NaN", "metrics": {}},
            {"node_id": 4, "silo_id": "d", "status": "no-reply", "reason": "timeout"},
        ],
        "aggregation": {"accepted": 1, "rule": "mean"},
        "evaluation": {"num_examples": 10, "loss": math.nan, "accuracy": 0.9, "auc": None},
        "silo_epsilon": {"a": 1.5},
        "central_epsilon": None,
    }
    first = log.record_round("run-a", record, model_sha256="ab" * 32, parent_sha256="cd" * 32)
    payload = first.payload
    assert payload["sampled"] == ["a", "b", "c", "d"]
    assert payload["participating"] == ["a"]
    assert payload["refusing"] == [{"silo": "b", "status": "refused", "reason": "budget"}]
    assert payload["rejected"] == [{"silo": "c", "status": "rejected", "reason": "NaN"}]
    assert payload["dropouts"] == [{"silo": "d", "status": "no-reply", "reason": "timeout"}]
    assert payload["evaluation"]["loss"] == "NaN"
    assert payload["epsilon"] == {"a": 1.5}
    again = log.record_round("run-a", record, model_sha256="ab" * 32)
    assert again.seq == first.seq  # a replayed round is not written twice
    assert len(log.records()) == 1
