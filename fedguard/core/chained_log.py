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
``sha256`` and ``signature``) is replaced atomically (``<log>.head.tmp``,
fsync, rename, fsync of the folder). A record counts only once the head names
it: if any step fails (a full disk, a read-only folder) the log is cut back to
its previous length and fsynced, the head is left as it was, the temporary file
is removed, and :class:`LogStorageError` (naming the file and the cause, such as
``ENOSPC``) is raised, so a reply whose record failed is never on the log as
sent. Every storage failure of a log (open, read, append, repair) is a
:class:`LogStorageError`, an :class:`AuditError`.

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

An *unconfirmed record* (whole and chained, but after the head file's ``seq``:
the writer died, or could not cut the log back, between the record and its head)
and a leftover ``<log>.head.tmp`` make verification fail too, as ``INCOMPLETE``
(``fedguard audit verify`` exits non-zero): the record was never confirmed, so
the reply or round it describes was not sent or saved. Opening the log repairs
both the same way: the unconfirmed records are moved out
(``<log>.unconfirmed-<seq>``), the temporary file is removed, and a
``log-repaired`` record names what was moved (seq, kind and SHA-256 of each
record) and removed.
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

from fedguard.core.errors import FedguardError, StorageError
from fedguard.core.files import cause_name, describe_cause, storage_error
from fedguard.core.pki import SigningKey, VerifyingKey

__all__ = [
    "GENESIS",
    "SILO_LOG_NAME",
    "AuditError",
    "AuditRecord",
    "LogStorageError",
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


class LogStorageError(AuditError, StorageError):
    """A chained log or its head file cannot be read or written (full disk, read-only, I/O).

    Raised by an append whose record or head update failed: the log was cut back
    to its previous length, so the record is not on it (unless the message says
    the cut itself failed; then verification reports the record as unconfirmed
    and the next open moves it aside).
    """


class SiloKind(StrEnum):
    """What a silo's log records."""

    SENT = "sent"
    LOG_REPAIRED = "log-repaired"
    # The privacy ledger's state, committed to the chain (fedguard.client.ledger_guard):
    # created, each charge (ε after it, the ledger's head hash), an explicit reset.
    LEDGER = "ledger"


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
    prev_sha, last_seq = GENESIS, None
    any_signature = False

    def bad(seq: int, line: int, reason: str, incomplete: bool = False) -> VerificationReport:
        return VerificationReport(
            path, False, line - 1, last_seq, prev_sha if last_seq is not None else None,
            first_bad_seq=seq, line=line, reason=reason, signed=any_signature,
            incomplete=incomplete,
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
    head_seq: int | None = None
    if check_head_file and head_file.exists():
        try:
            head = json.loads(head_file.read_text())
            head_seq = int(head["seq"])
            anchors.append((f"the head file {head_file.name}", (head_seq, head["sha256"])))
            if (
                public_key is not None
                and head.get("signature")
                and not _verify(public_key, head["sha256"], head["signature"])
            ):
                return bad(count, count + 1, f"the head file {head_file.name} is not signed")
        except (ValueError, KeyError, TypeError) as broken:
            return bad(count, count + 1, f"the head file {head_file.name} is unreadable: {broken}")
        except OSError as exc:
            raise storage_error(LogStorageError, "cannot read head file", head_file, exc) from exc
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
    if check_head_file and not repairing:
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
        if problems:
            first_bad = (
                head_seq + 1
                if head_seq is not None and last_seq is not None and head_seq < last_seq
                else count
            )
            return bad(
                first_bad,
                first_bad + 1,
                "; ".join(problems) + "; opening the log (the silo's next message, or the "
                "server's next start) moves such records aside and records the repair "
                "(log-repaired)",
                incomplete=True,
            )
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


def _write_all(fd: int, data: bytes) -> None:
    """``write`` until all of ``data`` is written (a short write is followed by another)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fresh_aside(path: Path, name: str) -> Path:
    """``path``'s sibling ``name``, or ``name.1``, ``name.2``... if that exists already."""
    aside = path.with_name(name)
    n = 0
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{name}.{n}")
    return aside


def _write_aside(aside: Path, data: bytes) -> None:
    """Write moved-out bytes durably before the log is cut (nothing is lost)."""
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(aside.parent)


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(
                LogStorageError, "cannot create the folder of log", path, exc
            ) from exc
        log = cls(path, signing_key)
        created = not path.exists()
        with log._locked() as handle:
            try:
                if created:
                    _fsync_dir(path.parent)
                repairs = log._check_existing(handle)
            except StorageError:
                raise
            except OSError as exc:
                raise storage_error(
                    LogStorageError, "cannot open or repair log", path, exc
                ) from exc
        for payload in repairs:
            log.append(log._repair_kind, payload)
        return log

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise storage_error(LogStorageError, "cannot open log", self.path, exc) from exc
        handle = os.fdopen(fd, "r+b")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError as exc:
                raise storage_error(LogStorageError, "cannot lock log", self.path, exc) from exc
            yield handle
        finally:
            handle.close()  # closing the descriptor releases the lock

    def _public_key(self) -> VerifyingKey | None:
        return None if self._signing_key is None else self._signing_key.public_key()

    def _check_existing(self, handle: Any) -> list[dict[str, Any]]:
        """Refuse a log that fails verification; repair what a dead or failed writer left.

        Returns the payloads of the ``log-repaired`` records to append: a torn last
        line moved out (``<log>.torn-<n>``); records after the head file (never
        confirmed) moved out (``<log>.unconfirmed-<seq>``) and a leftover
        ``<log>.head.tmp`` removed.
        """
        repairs: list[dict[str, Any]] = []
        handle.seek(0)
        data = handle.read()
        lines, tail = _split_lines(data)
        if tail:
            aside = _fresh_aside(self.path, f"{self.path.name}.torn-{len(lines)}")
            _write_aside(aside, tail)
            os.ftruncate(handle.fileno(), len(data) - len(tail))
            os.fsync(handle.fileno())
            repairs.append(
                {
                    "reason": "the last line was incomplete (the writer died mid-write)",
                    "torn_bytes": len(tail),
                    "torn_sha256": hashlib.sha256(tail).hexdigest(),
                    "moved_to": aside.name,
                }
            )
            data = data[: len(data) - len(tail)]
        report = _verify_log(
            self.path,
            self._public_key(),
            require_signatures=self._signing_key is not None,
            allowed_kinds=frozenset(self._kinds),
            expected_head=None,
            check_head_file=True,
            lock=False,
            repairing=True,
        )
        if not report.ok:
            raise AuditError(
                f"refusing to append to {self.path}: it fails verification: {report.summary()}"
            )
        unconfirmed = self._move_unconfirmed(handle, data)
        tmp = _head_tmp_path(self.path)
        removed_tmp = tmp.exists() or tmp.is_symlink()
        if removed_tmp:
            # Never trusted: the head file is what an update that completed left.
            tmp.unlink()
            _fsync_dir(self.path.parent)
        if unconfirmed is not None or removed_tmp:
            payload: dict[str, Any] = dict(unconfirmed or {})
            if unconfirmed is None:
                payload["reason"] = (
                    "a leftover temporary head file (an interrupted head update) was "
                    "removed; no record was beyond the head"
                )
            payload["removed_head_tmp"] = tmp.name if removed_tmp else None
            repairs.append(payload)
        return repairs

    def _move_unconfirmed(self, handle: Any, data: bytes) -> dict[str, Any] | None:
        """Move the whole records after the head file's seq out of the log (verified log)."""
        head_file = _head_path(self.path)
        if head_file.exists():
            head_seq = int(json.loads(head_file.read_text())["seq"])
        elif (named := _tmp_seq(self.path)) is not None:
            head_seq = named - 1  # the first head update never completed
        else:
            return None  # no head at all (a log older than head files): nothing to check
        lines, _ = _split_lines(data)
        if head_seq + 1 >= len(lines):
            return None
        keep = sum(len(line) + 1 for line in lines[: head_seq + 1])
        moved = [AuditRecord.from_json(json.loads(line)) for line in lines[head_seq + 1 :]]
        aside = _fresh_aside(self.path, f"{self.path.name}.unconfirmed-{head_seq + 1}")
        _write_aside(aside, data[keep:])
        os.ftruncate(handle.fileno(), keep)
        os.fsync(handle.fileno())
        return {
            "reason": (
                "record(s) after the head file were never confirmed (the head update failed "
                "or the writer died before it); they were moved out and do not count as sent "
                "or saved"
            ),
            "unconfirmed": [{"seq": r.seq, "kind": r.kind, "sha256": r.sha256} for r in moved],
            "moved_to": aside.name,
        }

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
        """Append one record; it is on disk (fsync) and confirmed by the head when this returns.

        Raises :class:`LogStorageError` (naming the file and the cause) if the record
        or its head cannot be written; the log is then cut back to what it was, so
        the record is not on it.
        """
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
            except OSError as exc:
                raise storage_error(LogStorageError, "cannot read log", self.path, exc) from exc
            seq = 0 if last is None else last.seq + 1
            prev = GENESIS if last is None else last.sha256
            unsigned = AuditRecord(seq, _now(), kind, body_payload, prev, "", None)
            digest = _digest(unsigned.body())
            signature = None if self._signing_key is None else _sign(self._signing_key, digest)
            record = dataclasses.replace(unsigned, sha256=digest, signature=signature)
            fd = handle.fileno()
            size = os.fstat(fd).st_size
            head = _head_path(self.path)
            try:
                previous_head: bytes | None = head.read_bytes()
            except FileNotFoundError:
                previous_head = None
            except OSError as exc:
                raise storage_error(LogStorageError, "cannot read head file", head, exc) from exc
            step = "write the record to"
            try:
                # Raw writes (no buffer that a failed flush could write later).
                _write_all(fd, record.to_line())
                os.fsync(fd)
                step = "confirm the record in"
                self._write_head(record)
            except OSError as exc:
                undone = self._undo_append(fd, size, head, previous_head)
                outcome = (
                    f"the {kind} record seq {seq} was not recorded (the log is as before)"
                    if undone is None
                    else f"the {kind} record seq {seq} could not be taken back ({undone}); "
                    "verification reports it as unconfirmed and the next open moves it aside"
                )
                raise LogStorageError(
                    f"{self.path}: could not {step} the log: {describe_cause(exc)}; {outcome}",
                    path=self.path,
                    cause=cause_name(exc),
                    os_errno=exc.errno,
                ) from exc
        return record

    def _write_head(self, record: AuditRecord) -> None:
        head = _head_path(self.path)
        tmp = _head_tmp_path(self.path)
        data = {"seq": record.seq, "sha256": record.sha256, "signature": record.signature}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, canonical_json(data) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, head)
        # The rename must survive a power cut: a head lost after the reply was sent
        # would make the next open move a sent record aside as unconfirmed.
        _fsync_dir(self.path.parent)

    def _undo_append(
        self, fd: int, size: int, head: Path, previous_head: bytes | None
    ) -> str | None:
        """Take a failed append back: the old head, no tmp file, the log cut to ``size``.

        The head first: a head naming a record the log no longer holds would read
        as a cut log. Returns None when all is undone, else what could not be.
        """
        failed: list[str] = []
        tmp = _head_tmp_path(self.path)
        try:
            current = head.read_bytes() if head.exists() else None
            if current != previous_head:  # the rename happened, its folder sync failed
                if previous_head is None:
                    head.unlink()
                else:
                    tmp.write_bytes(previous_head)
                    os.replace(tmp, head)
        except OSError as exc:
            failed.append(f"restoring the head file failed: {describe_cause(exc)}")
        try:
            tmp.unlink(missing_ok=True)
        except OSError as exc:
            failed.append(f"removing {tmp.name} failed: {describe_cause(exc)}")
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:
            failed.append(f"cutting the log back failed: {describe_cause(exc)}")
        return "; ".join(failed) if failed else None

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

    def ledger(self, event: str, **fields: Any) -> AuditRecord:
        """``ledger``: the privacy ledger was created, charged or reset (its head after it)."""
        return self.append(SiloKind.LEDGER, {"event": event, **fields})

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
