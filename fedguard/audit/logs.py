"""Appending to a hash-chained, signed log, and each silo's own log of what it sent.

:class:`_ChainedLog` is the append side shared by the consortium server's audit
log (:class:`fedguard.audit.server_log.AuditLog`) and :class:`SiloLog`, each
silo's record of what it sent (kind ``sent``: run, round, message type, SHA-256
of the update, ε) and of its privacy ledger's state (kind ``ledger``), kept next
to its privacy ledger (``<state-dir>/silo-log.jsonl``), signed with the silo's
node key when one is given (ECDSA P-384, the SuperNode authentication key) or
only chained. The record format and what verification catches are
:mod:`fedguard.audit.chain`'s. Both sides write one, so a silo agent imports
this room, never the server package.

Every append is written with one ``write`` under an exclusive ``flock``, then
``fsync``-ed, then the *head file* ``<log>.head`` (the last record's ``seq``,
``sha256`` and ``signature``) is replaced atomically (``<log>.head.tmp``,
fsync, rename, fsync of the folder). A record counts only once the head names
it: if any step fails (a full disk, a read-only folder) the log is cut back to
its previous length and fsynced, the head is left as it was, the temporary file
is removed, and :class:`~fedguard.audit.chain.LogStorageError` (naming the file
and the cause, such as ``ENOSPC``) is raised, so a reply whose record failed is
never on the log as sent. Every storage failure of a log (open, read, append,
repair) is a :class:`~fedguard.audit.chain.LogStorageError`, an
:class:`~fedguard.audit.chain.AuditError`.

Opening the log (``AuditLog.open``, :meth:`SiloLog.open`) repairs what a dead or
failed writer left: a torn last line is moved out (``<log>.torn-<n>``) and a
``log-repaired`` record names its SHA-256, so the repair itself is on the
record; unconfirmed records (after the head file's ``seq``) are moved out the
same way (``<log>.unconfirmed-<seq>``), a leftover ``<log>.head.tmp`` is
removed, and a ``log-repaired`` record names what was moved (seq, kind and
SHA-256 of each record) and removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from fedguard.audit.chain import (
    GENESIS,
    AuditError,
    AuditRecord,
    LogStorageError,
    VerificationReport,
    _digest,
    _head_path,
    _head_tmp_path,
    _is_hex64,
    _now,
    _sign,
    _split_lines,
    _tmp_seq,
    _verify_log,
    jsonable,
    read_records,
)
from fedguard.audit.pki import SigningKey, VerifyingKey
from fedguard.core.canonical import canonical_json
from fedguard.core.errors import StorageError
from fedguard.core.files import cause_name, describe_cause, storage_error

__all__ = ["SILO_LOG_NAME", "SiloKind", "SiloLog", "verify_silo_log"]

SILO_LOG_NAME = "silo-log.jsonl"


class SiloKind(StrEnum):
    """What a silo's log records."""

    SENT = "sent"
    LOG_REPAIRED = "log-repaired"
    # The privacy ledger's state, committed to the chain (fedguard.client.ledger_guard):
    # created, each charge (ε after it, the ledger's head hash), an explicit reset.
    LEDGER = "ledger"


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
