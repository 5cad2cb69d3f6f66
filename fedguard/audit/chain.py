"""Hash-chained, signed log records (JSON Lines): the record, its hash, reading, verifying.

The machinery under both signed logs: the consortium server's audit log
(:class:`fedguard.audit.server_log.AuditLog`) and each silo's log of what it sent
(:class:`fedguard.audit.logs.SiloLog`). Appending (the exclusive lock, the head
file, taking a failed append back, the repair on open) is in
:mod:`fedguard.audit.logs`.

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

What verification catches
-------------------------
Verification (:func:`fedguard.audit.logs.verify_silo_log`,
:func:`fedguard.audit.server_log.verify_audit_log`) recomputes every hash and
signature and checks the chain, so an edited, removed, inserted or reordered
record is named by the first ``seq`` where the chain breaks, with the reason. A
hash chain alone cannot tell a log cut short from a shorter log, so the tail is
checked against an *anchor*: the head file (catches a crash or a careless
``truncate``), and any head the caller learnt elsewhere (``expected_head``: a
copy the auditor kept, the head a silo saw). Someone who controls the server's
disk and key can rewrite everything; what they cannot do is make the log
disagree with an anchor held by someone else.

A torn last line (the process died inside a ``write``) makes the log fail
verification. An *unconfirmed record* (whole and chained, but after the head
file's ``seq``: the writer died, or could not cut the log back, between the
record and its head) and a leftover ``<log>.head.tmp`` make verification fail
too, as ``INCOMPLETE`` (``fedguard audit verify`` exits non-zero): the record
was never confirmed, so the reply or round it describes was not sent or saved.
Opening the log repairs all three (:mod:`fedguard.audit.logs`).
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
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedguard.audit.pki import SigningKey, VerifyingKey
from fedguard.core.canonical import canonical_json
from fedguard.core.errors import FedguardError, StorageError
from fedguard.core.files import storage_error

__all__ = [
    "GENESIS",
    "SIGNATURE_CONTEXT",
    "AuditError",
    "AuditRecord",
    "LogStorageError",
    "VerificationReport",
    "canonical_json",
    "jsonable",
    "read_records",
]

GENESIS = "0" * 64
SIGNATURE_CONTEXT = b"fedguard-audit-v1:"
_FIELDS = ("seq", "time", "kind", "payload", "prev_sha256", "sha256", "signature")


class AuditError(FedguardError):
    """A chained log cannot be opened, read or appended to (or is not intact)."""


class LogStorageError(AuditError, StorageError):
    """A chained log or its head file cannot be read or written (full disk, read-only, I/O).

    Raised by an append whose record or head update failed: the log was cut back
    to its previous length, so the record is not on it (unless the message says
    the cut itself failed; then verification reports the record as unconfirmed
    and the next open moves it aside).
    """


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
    # Not tampered, but not whole either: a record after the head file (never
    # confirmed) or a leftover temporary head file; opening the log repairs it.
    incomplete: bool = False

    def summary(self) -> str:
        if self.ok:
            head = (
                f"head seq {self.last_seq} sha256 {self.last_sha256}"
                if self.last_seq is not None
                else "empty"
            )
            how = "signed and chained" if self.signed else "chained (unsigned)"
            return f"OK: {self.records} records, {how}; {head}"
        if self.incomplete:
            return f"INCOMPLETE at seq {self.first_bad_seq} (line {self.line}): {self.reason}"
        return f"TAMPERED at seq {self.first_bad_seq} (line {self.line}): {self.reason}"


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _head_tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".head.tmp")


def _tmp_seq(path: Path) -> int | None:
    """The seq a leftover ``.head.tmp`` names (the record its update was for), if readable."""
    try:
        return int(json.loads(_head_tmp_path(path).read_text())["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_log(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    except OSError as exc:
        raise storage_error(LogStorageError, "cannot read log", path, exc) from exc


@contextlib.contextmanager
def _shared_lock(path: Path) -> Iterator[bytes]:
    """The log's bytes, read under a shared ``flock`` held until the block ends.

    An append holds the exclusive lock from its record to its head update, so a
    verification under this lock never sees a record between the two.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    except OSError as exc:
        raise storage_error(LogStorageError, "cannot read log", path, exc) from exc
    try:
        with os.fdopen(fd, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            yield handle.read()
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise storage_error(LogStorageError, "cannot read log", path, exc) from exc


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole lines, and the bytes after the last newline (a torn write, if any)."""
    *lines, tail = data.split(b"\n")
    return lines, tail


def read_records(path: Path) -> list[AuditRecord]:
    """All records of a log (raises :class:`AuditError` on any malformed line)."""
    data = _read_log(Path(path))
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
    lock: bool = True,
    repairing: bool = False,
) -> VerificationReport:
    """Verify ``path``; under a shared lock unless the caller holds the exclusive one.

    ``repairing`` (opening the log, which then repairs them) accepts records after
    the head file and a leftover temporary head file.
    """
    path = Path(path)
    if not lock:
        return _verify_bytes(
            path, _read_log(path), public_key, require_signatures=require_signatures,
            allowed_kinds=allowed_kinds, expected_head=expected_head,
            check_head_file=check_head_file, repairing=repairing,
        )  # fmt: skip
    with _shared_lock(path) as data:
        return _verify_bytes(
            path, data, public_key, require_signatures=require_signatures,
            allowed_kinds=allowed_kinds, expected_head=expected_head,
            check_head_file=check_head_file, repairing=repairing,
        )  # fmt: skip


@dataclass
class _Walk:
    """How far verification got: the last good record's seq and hash, any signature seen."""

    path: Path
    prev_sha: str = GENESIS
    last_seq: int | None = None
    any_signature: bool = False

    def _last_sha(self) -> str | None:
        return self.prev_sha if self.last_seq is not None else None

    def bad(self, seq: int, line: int, reason: str, incomplete: bool = False) -> VerificationReport:
        return VerificationReport(
            self.path, False, line - 1, self.last_seq, self._last_sha(),
            first_bad_seq=seq, line=line, reason=reason, signed=self.any_signature,
            incomplete=incomplete,
        )  # fmt: skip

    def ok(self, count: int) -> VerificationReport:
        return VerificationReport(
            self.path, True, count, self.last_seq, self._last_sha(), signed=self.any_signature
        )


def _verify_bytes(
    path: Path,
    data: bytes,
    public_key: VerifyingKey | None,
    *,
    require_signatures: bool,
    allowed_kinds: frozenset[str],
    expected_head: tuple[int, str] | None,
    check_head_file: bool,
    repairing: bool,
) -> VerificationReport:
    lines, tail = _split_lines(data)
    walk = _Walk(path)
    for index, raw in enumerate(lines):
        reason = _record_problem(
            walk, raw, index, public_key,
            require_signatures=require_signatures, allowed_kinds=allowed_kinds,
        )  # fmt: skip
        if reason is not None:
            return walk.bad(index, index + 1, reason)
    count = len(lines)
    if tail:
        return walk.bad(count, count + 1, "the last line is incomplete (a torn or truncated write)")
    anchors: list[tuple[str, tuple[int, str]]] = []
    head_file = _head_path(path)
    head_seq: int | None = None
    if check_head_file and head_file.exists():
        head = _head_file_anchor(walk, head_file, public_key, count)
        if isinstance(head, VerificationReport):
            return head
        head_seq = head[0]
        anchors.append((f"the head file {head_file.name}", head))
    if expected_head is not None:
        anchors.append(("the expected head", expected_head))
    if (broken := _anchor_problem(walk, lines, anchors)) is not None:
        return broken
    unconfirmed = (
        _unconfirmed_problem(walk, head_seq, count) if check_head_file and not repairing else None
    )
    if unconfirmed is not None:
        return unconfirmed
    return walk.ok(count)


def _record_problem(
    walk: _Walk,
    raw: bytes,
    expected_seq: int,
    public_key: VerifyingKey | None,
    *,
    require_signatures: bool,
    allowed_kinds: frozenset[str],
) -> str | None:
    """Why line ``expected_seq`` breaks the chain (None: it is good, and ``walk`` moves on)."""
    try:
        record = AuditRecord.from_json(json.loads(raw))
    except ValueError as broken:
        return f"not a valid record: {broken}"
    if record.seq != expected_seq:
        what = (
            f"record(s) {expected_seq}..{record.seq - 1} removed"
            if record.seq > expected_seq
            else "a record was inserted, duplicated or moved"
        )
        return f"expected seq {expected_seq}, found {record.seq}: {what}"
    if record.prev_sha256 != walk.prev_sha:
        return (
            "prev_sha256 does not match the previous record's sha256 "
            "(a record before it was removed, replaced or reordered)"
        )
    if _digest(record.body()) != record.sha256:
        return "sha256 does not match the record's content (edited)"
    if record.kind not in allowed_kinds:
        return f"unknown record kind {record.kind!r}"
    if record.signature is None:
        if require_signatures or public_key is not None:
            return "the record is not signed"
    else:
        walk.any_signature = True
        if public_key is not None and not _verify(public_key, record.sha256, record.signature):
            return (
                "the signature does not verify with the given public key "
                "(forged, re-hashed, or signed by another key)"
            )
    walk.prev_sha, walk.last_seq = record.sha256, record.seq
    return None


def _head_file_anchor(
    walk: _Walk, head_file: Path, public_key: VerifyingKey | None, count: int
) -> VerificationReport | tuple[int, str]:
    """The head file's ``(seq, sha256)``, or the report of why it cannot be an anchor."""
    try:
        head = json.loads(head_file.read_text())
        head_seq = int(head["seq"])
        anchor = (head_seq, head["sha256"])
        if (
            public_key is not None
            and head.get("signature")
            and not _verify(public_key, head["sha256"], head["signature"])
        ):
            return walk.bad(count, count + 1, f"the head file {head_file.name} is not signed")
    except (ValueError, KeyError, TypeError) as broken:
        return walk.bad(count, count + 1, f"the head file {head_file.name} is unreadable: {broken}")
    except OSError as exc:
        raise storage_error(LogStorageError, "cannot read head file", head_file, exc) from exc
    return anchor


def _anchor_problem(
    walk: _Walk, lines: list[bytes], anchors: list[tuple[str, tuple[int, str]]]
) -> VerificationReport | None:
    """A report if the log ends before an anchor's seq or disagrees with its hash."""
    count = len(lines)
    last_seq = walk.last_seq
    by_seq_sha = _sha_at(lines) if anchors else {}
    for source, (seq, sha) in anchors:
        if last_seq is None or seq > last_seq:
            ends = "is empty" if last_seq is None else f"ends at seq {last_seq}"
            return walk.bad(
                (last_seq + 1) if last_seq is not None else 0,
                count + 1,
                f"truncated tail: the log {ends}, but {source} says seq {seq} exists",
            )
        if by_seq_sha.get(seq) != sha:
            return walk.bad(
                seq, seq + 1, f"record {seq} does not match {source} (rewritten history)"
            )
    return None


def _unconfirmed_problem(
    walk: _Walk, head_seq: int | None, count: int
) -> VerificationReport | None:
    """An ``INCOMPLETE`` report for records after the head file or a leftover ``.head.tmp``."""
    path, last_seq = walk.path, walk.last_seq
    head_file = _head_path(path)
    problems = []
    tmp = _head_tmp_path(path)
    leftover = tmp.exists() or tmp.is_symlink()
    if head_seq is None and leftover and (named := _tmp_seq(path)) is not None:
        head_seq = named - 1  # the first head update never completed
    if head_seq is not None and last_seq is not None and head_seq < last_seq:
        first = head_seq + 1
        span = f"seq {first}" if first == last_seq else f"seq {first}..{last_seq}"
        problems.append(
            f"unconfirmed record(s) {span}: written after the head file {head_file.name} "
            f"(seq {head_seq}) and never confirmed (the head update failed or the writer "
            "died), so what they describe was not sent or saved"
        )
    if leftover:
        problems.append(f"a leftover temporary file {tmp.name} (an interrupted head update)")
    if not problems:
        return None
    first_bad = (
        head_seq + 1
        if head_seq is not None and last_seq is not None and head_seq < last_seq
        else count
    )
    return walk.bad(
        first_bad,
        first_bad + 1,
        "; ".join(problems) + "; opening the log (the silo's next message, or the "
        "server's next start) moves such records aside and records the repair "
        "(log-repaired)",
        incomplete=True,
    )


def _sha_at(lines: list[bytes]) -> dict[int, str]:
    out: dict[int, str] = {}
    for raw in lines:
        record = json.loads(raw)
        out[int(record["seq"])] = str(record["sha256"])
    return out
