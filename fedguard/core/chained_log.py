"""Append-only, hash-chained, signed logs (JSON Lines): the machinery and the silo's log.

Shared by the consortium server's audit log (:class:`fedguard.server.audit.AuditLog`)
and each silo's log of what it sent (:class:`SiloLog`, kept next to its privacy
ledger, ``<state-dir>/silo-log.jsonl``, signed with the silo's node key when one
is given, ECDSA P-384, or only chained). It lives in ``fedguard.core`` because both
sides write one: a silo agent does not import the server package.

* :class:`~fedguard.server.audit.AuditLog`, the consortium server's record of
  every run and round (kinds ``run-start``, ``round``, ``run-end``), each record signed with the
  server's Ed25519 audit key (``audit.key``, made by ``fedguard ca issue-server``);
* :class:`SiloLog`, each silo's record of what it sent (kind ``sent``: run,
  round, message type, SHA-256 of the update, ε), kept next to its privacy
  ledger (``<state-dir>/silo-log.jsonl``), signed with the silo's node key when
  one is given (ECDSA P-384, the SuperNode authentication key) or only chained.

Record format
-------------
One JSON object per line, keys in this order::

    {"seq": 0, "time": "2026-11-22T10:40:14.370518Z", "kind": "run-start",
     "payload": {...}, "prev_sha256": "000…0", "sha256": "…", "signature": "…"}

* ``seq`` counts from 0 with no gap; ``prev_sha256`` is the previous record's
  ``sha256`` (64 zeros for the first record);
* ``sha256`` is the SHA-256 (hex) of the *canonical JSON* of the record without
  ``sha256`` and ``signature``: UTF-8, keys sorted, no white space
  (``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False,
  allow_nan=False)``). Payloads are normalised before hashing (tuples to lists,
  enums to values, paths to strings, NumPy scalars to numbers, non-finite floats
  to the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``), so what is stored is
  exactly what was hashed;
* ``signature`` is the base64 signature of ``b"fedguard-audit-v1:" +
  bytes.fromhex(sha256)``: Ed25519, or ECDSA with SHA-384 for an EC key;
  ``null`` in an unsigned silo log.

Every append is written with one ``write`` under an exclusive ``flock``, then
``fsync``-ed, then the *head file* ``<log>.head`` (the last record's ``seq``,
``sha256`` and ``signature``) is replaced atomically.

What verification catches
-------------------------
Verification (:func:`verify_silo_log`, :func:`fedguard.server.audit.verify_audit_log`)
recomputes every hash and signature and checks the chain, so an edited, removed,
inserted or reordered record is named by the first ``seq`` where the chain
breaks, with the reason. A hash chain alone cannot tell a log cut short from a
shorter log, so the tail is checked against an *anchor*: the head file (catches
a crash or a careless ``truncate``), and any head the caller learnt elsewhere
(``expected_head``: a copy the auditor kept, the head a silo saw). Someone who
controls the server's disk and key can rewrite everything; what they cannot do
is make the log disagree with an anchor held by someone else.

A torn last line (the process died inside a ``write``) makes the log fail
verification; opening the log (``AuditLog.open``, :meth:`SiloLog.open`) repairs it
by moving the torn bytes out (``<log>.torn-<n>``) and appending a ``log-repaired``
record that names their SHA-256, so the repair itself is on the record.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any, Self

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedguard.core.errors import FedguardError
from fedguard.core.pki import SigningKey, VerifyingKey

__all__ = [
    "GENESIS",
    "SILO_LOG_NAME",
    "AuditError",
    "AuditRecord",
    "SiloKind",
    "SiloLog",
    "VerificationReport",
    "canonical_json",
    "jsonable",
    "read_records",
    "verify_silo_log",
]

GENESIS = "0" * 64
SIGNATURE_CONTEXT = b"fedguard-audit-v1:"
SILO_LOG_NAME = "silo-log.jsonl"
_FIELDS = ("seq", "time", "kind", "payload", "prev_sha256", "sha256", "signature")


class AuditError(FedguardError):
    """A chained log cannot be opened, read or appended to (or is not intact)."""


class SiloKind(StrEnum):
    """What a silo's log records."""

    SENT = "sent"
    LOG_REPAIRED = "log-repaired"


# -- canonical JSON ----------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, deterministically (see the module docstring)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=canonical_json)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (np.generic, np.ndarray)):
        return jsonable(value.tolist())
    raise AuditError(f"cannot record a {type(value).__name__} in an audit log: {value!r}")


def canonical_json(value: Any) -> bytes:
    """The canonical encoding that hashes are taken over (input must be :func:`jsonable`)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


# -- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: str
    kind: str
    payload: dict[str, Any]
    prev_sha256: str
    sha256: str
    signature: str | None

    def body(self) -> dict[str, Any]:
        """The part the hash covers."""
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "payload": self.payload,
            "prev_sha256": self.prev_sha256,
        }

    def to_line(self) -> bytes:
        record = {**self.body(), "sha256": self.sha256, "signature": self.signature}
        return (
            json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n"
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: object) -> AuditRecord:
        if not isinstance(data, dict) or set(data) != set(_FIELDS):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"a record has exactly the fields {list(_FIELDS)}, got {keys}")
        seq, time, kind, payload = data["seq"], data["time"], data["kind"], data["payload"]
        prev, digest, signature = data["prev_sha256"], data["sha256"], data["signature"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"seq must be an integer >= 0, got {seq!r}")
        if not isinstance(time, str) or not isinstance(kind, str):
            raise ValueError("time and kind must be strings")
        if not isinstance(payload, dict):
            raise ValueError("payload must be an object")
        if not (_is_hex64(prev) and _is_hex64(digest)):
            raise ValueError("prev_sha256 and sha256 must be 64 hex digits")
        if signature is not None and not isinstance(signature, str):
            raise ValueError("signature must be a base64 string or null")
        return cls(seq, time, kind, payload, prev, digest, signature)


def _is_hex64(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _signed_message(sha256: str) -> bytes:
    return SIGNATURE_CONTEXT + bytes.fromhex(sha256)


def _sign(key: SigningKey, sha256: str) -> str:
    message = _signed_message(sha256)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    else:
        signature = key.sign(message, ec.ECDSA(hashes.SHA384()))
    return base64.b64encode(signature).decode("ascii")


def _verify(key: VerifyingKey, sha256: str, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, _signed_message(sha256))
        else:
            key.verify(raw, _signed_message(sha256), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- reading and verifying -----------------------------------------------------------------


@dataclass(frozen=True)
class VerificationReport:
    """The outcome of verifying a log. ``ok`` is False from the first bad record on."""

    path: Path
    ok: bool
    records: int
    last_seq: int | None
    last_sha256: str | None
    first_bad_seq: int | None = None
    line: int | None = None
    reason: str | None = None
    signed: bool = True

    def summary(self) -> str:
        if self.ok:
            head = (
                f"head seq {self.last_seq} sha256 {self.last_sha256}"
                if self.last_seq is not None
                else "empty"
            )
            how = "signed and chained" if self.signed else "chained (unsigned)"
            return f"OK: {self.records} records, {how}; {head}"
        return f"TAMPERED at seq {self.first_bad_seq} (line {self.line}): {self.reason}"


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole lines, and the bytes after the last newline (a torn write, if any)."""
    *lines, tail = data.split(b"\n")
    return lines, tail


def read_records(path: Path) -> list[AuditRecord]:
    """All records of a log (raises :class:`AuditError` on any malformed line)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    lines, tail = _split_lines(data)
    if tail:
        raise AuditError(f"{path}: the last line is incomplete (a torn or truncated write)")
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(AuditRecord.from_json(json.loads(line)))
        except ValueError as bad:
            raise AuditError(f"{path}: line {number} is not a record: {bad}") from None
    return records


def _verify_log(
    path: Path,
    public_key: VerifyingKey | None,
    *,
    require_signatures: bool,
    allowed_kinds: frozenset[str],
    expected_head: tuple[int, str] | None,
    check_head_file: bool,
) -> VerificationReport:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    lines, tail = _split_lines(data)
    prev_sha, last_seq = GENESIS, None
    any_signature = False

    def bad(seq: int, line: int, reason: str) -> VerificationReport:
        return VerificationReport(
            path, False, line - 1, last_seq, prev_sha if last_seq is not None else None,
            first_bad_seq=seq, line=line, reason=reason, signed=any_signature,
        )  # fmt: skip

    for index, raw in enumerate(lines):
        expected_seq, line = index, index + 1
        try:
            record = AuditRecord.from_json(json.loads(raw))
        except ValueError as broken:
            return bad(expected_seq, line, f"not a valid record: {broken}")
        if record.seq != expected_seq:
            what = (
                f"record(s) {expected_seq}..{record.seq - 1} removed"
                if record.seq > expected_seq
                else "a record was inserted, duplicated or moved"
            )
            return bad(
                expected_seq, line, f"expected seq {expected_seq}, found {record.seq}: {what}"
            )
        if record.prev_sha256 != prev_sha:
            return bad(
                expected_seq,
                line,
                "prev_sha256 does not match the previous record's sha256 "
                "(a record before it was removed, replaced or reordered)",
            )
        if _digest(record.body()) != record.sha256:
            return bad(expected_seq, line, "sha256 does not match the record's content (edited)")
        if record.kind not in allowed_kinds:
            return bad(expected_seq, line, f"unknown record kind {record.kind!r}")
        if record.signature is None:
            if require_signatures or public_key is not None:
                return bad(expected_seq, line, "the record is not signed")
        else:
            any_signature = True
            if public_key is not None and not _verify(public_key, record.sha256, record.signature):
                return bad(
                    expected_seq,
                    line,
                    "the signature does not verify with the given public key "
                    "(forged, re-hashed, or signed by another key)",
                )
        prev_sha, last_seq = record.sha256, record.seq
    count = len(lines)
    if tail:
        return bad(count, count + 1, "the last line is incomplete (a torn or truncated write)")
    anchors: list[tuple[str, tuple[int, str]]] = []
    head_file = _head_path(path)
    if check_head_file and head_file.exists():
        try:
            head = json.loads(head_file.read_text())
            anchors.append((f"the head file {head_file.name}", (int(head["seq"]), head["sha256"])))
            if (
                public_key is not None
                and head.get("signature")
                and not _verify(public_key, head["sha256"], head["signature"])
            ):
                return bad(count, count + 1, f"the head file {head_file.name} is not signed")
        except (ValueError, KeyError, TypeError) as broken:
            return bad(count, count + 1, f"the head file {head_file.name} is unreadable: {broken}")
    if expected_head is not None:
        anchors.append(("the expected head", expected_head))
    by_seq_sha = _sha_at(lines) if anchors else {}
    for source, (seq, sha) in anchors:
        if last_seq is None or seq > last_seq:
            ends = "is empty" if last_seq is None else f"ends at seq {last_seq}"
            return bad(
                (last_seq + 1) if last_seq is not None else 0,
                count + 1,
                f"truncated tail: the log {ends}, but {source} says seq {seq} exists",
            )
        if by_seq_sha.get(seq) != sha:
            return bad(seq, seq + 1, f"record {seq} does not match {source} (rewritten history)")
    return VerificationReport(
        path, True, count, last_seq, prev_sha if last_seq is not None else None,
        signed=any_signature,
    )  # fmt: skip


def _sha_at(lines: list[bytes]) -> dict[int, str]:
    out: dict[int, str] = {}
    for raw in lines:
        record = json.loads(raw)
        out[int(record["seq"])] = str(record["sha256"])
    return out


def verify_silo_log(
    path: Path,
    public_key: VerifyingKey | None = None,
    *,
    expected_head: tuple[int, str] | None = None,
    check_head_file: bool = True,
) -> VerificationReport:
    """Verify a silo's log: chained, and signed by ``public_key`` when one is given."""
    return _verify_log(
        path,
        public_key,
        require_signatures=public_key is not None,
        allowed_kinds=frozenset(SiloKind),
        expected_head=expected_head,
        check_head_file=check_head_file,
    )


# -- appending -----------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ChainedLog:
    """The append side shared by :class:`AuditLog` and :class:`SiloLog`."""

    _kinds: type[StrEnum]
    _repair_kind: str

    def __init__(self, path: Path, signing_key: SigningKey | None) -> None:
        self.path = path
        self._signing_key = signing_key

    @classmethod
    def _open(cls, path: Path, signing_key: SigningKey | None) -> Self:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = cls(path, signing_key)
        created = not path.exists()
        with log._locked() as handle:
            if created:
                _fsync_dir(path.parent)
            torn = log._check_existing(handle)
        if torn is not None:
            log.append(
                log._repair_kind,
                {
                    "reason": "the last line was incomplete (the writer died mid-write)",
                    "torn_bytes": torn[0],
                    "torn_sha256": torn[1],
                    "moved_to": torn[2],
                },
            )
        return log

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        handle = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield handle
        finally:
            handle.close()  # closing the descriptor releases the lock

    def _public_key(self) -> VerifyingKey | None:
        return None if self._signing_key is None else self._signing_key.public_key()

    def _check_existing(self, handle: Any) -> tuple[int, str, str] | None:
        """Refuse a log that fails verification; move a torn last line aside."""
        handle.seek(0)
        data = handle.read()
        lines, tail = _split_lines(data)
        torn: tuple[int, str, str] | None = None
        if tail:
            aside = self.path.with_name(f"{self.path.name}.torn-{len(lines)}")
            aside.write_bytes(tail)
            handle.truncate(len(data) - len(tail))
            handle.flush()
            os.fsync(handle.fileno())
            torn = (len(tail), hashlib.sha256(tail).hexdigest(), aside.name)
        report = _verify_log(
            self.path,
            self._public_key(),
            require_signatures=self._signing_key is not None,
            allowed_kinds=frozenset(self._kinds),
            expected_head=None,
            check_head_file=True,
        )
        if not report.ok:
            raise AuditError(
                f"refusing to append to {self.path}: it fails verification: {report.summary()}"
            )
        return torn

    @staticmethod
    def _last_record(handle: Any) -> AuditRecord | None:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return None
        block = 4096
        while True:
            start = max(0, size - block)
            handle.seek(start)
            chunk = handle.read(size - start)
            body = chunk[:-1] if chunk.endswith(b"\n") else chunk
            cut = body.rfind(b"\n")
            if cut >= 0 or start == 0:
                return AuditRecord.from_json(json.loads(body[cut + 1 :]))
            block *= 4

    def append(self, kind: str, payload: Mapping[str, Any]) -> AuditRecord:
        """Append one record; it is on disk (fsync) when this returns."""
        try:
            kind = self._kinds(kind).value
        except ValueError:
            known = ", ".join(k.value for k in self._kinds)
            raise AuditError(f"unknown record kind {kind!r}; known: {known}") from None
        if not isinstance(payload, Mapping):
            raise AuditError(f"a payload is a mapping, got {type(payload).__name__}")
        body_payload = jsonable(payload)
        with self._locked() as handle:
            try:
                last = self._last_record(handle)
            except ValueError as broken:
                raise AuditError(f"{self.path}: the last record is unreadable: {broken}") from None
            seq = 0 if last is None else last.seq + 1
            prev = GENESIS if last is None else last.sha256
            unsigned = AuditRecord(seq, _now(), kind, body_payload, prev, "", None)
            digest = _digest(unsigned.body())
            signature = None if self._signing_key is None else _sign(self._signing_key, digest)
            record = dataclasses.replace(unsigned, sha256=digest, signature=signature)
            handle.seek(0, os.SEEK_END)
            handle.write(record.to_line())
            handle.flush()
            os.fsync(handle.fileno())
            self._write_head(record)
        return record

    def _write_head(self, record: AuditRecord) -> None:
        head = self.path.with_name(self.path.name + ".head")
        tmp = head.with_name(head.name + ".tmp")
        data = {"seq": record.seq, "sha256": record.sha256, "signature": record.signature}
        with open(tmp, "wb") as out:
            out.write(canonical_json(data) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, head)

    def records(self) -> list[AuditRecord]:
        return read_records(self.path)

    def find(self, kind: str, run_id: str, round_number: int | None = None) -> AuditRecord | None:
        """The last record of ``kind`` for ``run_id`` (and round), if any.

        A resumed server uses it to write each round's record exactly once: a round
        checkpointed just before a crash may or may not have been audited.
        """
        found = None
        for record in self.records():
            if (
                record.kind == kind
                and record.payload.get("run_id") == run_id
                and (round_number is None or record.payload.get("round") == round_number)
            ):
                found = record
        return found

    def head(self) -> tuple[int, str] | None:
        """``(seq, sha256)`` of the last record, the anchor to hand to others."""
        with self._locked() as handle:
            last = self._last_record(handle)
        return None if last is None else (last.seq, last.sha256)


class SiloLog(_ChainedLog):
    """A silo's own log of what it sent, next to its privacy ledger."""

    _kinds = SiloKind
    _repair_kind = SiloKind.LOG_REPAIRED.value

    @classmethod
    def open(cls, state_dir: Path, signing_key: SigningKey | None = None) -> SiloLog:
        """Open ``<state_dir>/silo-log.jsonl``; signed with the node key if given."""
        return cls._open(Path(state_dir) / SILO_LOG_NAME, signing_key)

    def sent(
        self,
        run_id: str | None,
        round_number: int | None,
        message_type: str,
        update_sha256: str | None,
        epsilon: float | None,
        status: str = "ok",
        **fields: Any,
    ) -> AuditRecord:
        """``sent``: one reply the silo sent (the update's content hash, its ε after it)."""
        if update_sha256 is not None and not _is_hex64(update_sha256):
            raise AuditError(
                f"update_sha256 must be 64 lower-case hex digits, got {update_sha256!r}"
            )
        return self.append(
            SiloKind.SENT,
            {
                "run_id": run_id,
                "round": round_number,
                "message_type": message_type,
                "update_sha256": update_sha256,
                "epsilon": epsilon,
                "status": status,
                **fields,
            },
        )
