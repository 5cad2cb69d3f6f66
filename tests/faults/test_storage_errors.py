"""Issue 13, item 5: storage failures are typed, named and logged; a record counts once confirmed.

A full disk, a damaged SQLite page or a read-only ledger must surface as a typed
fedguard error (a ``StorageError``, also the store's own error type: a
``LedgerError`` for the ledger and the outbox, an ``AuditError`` for the chained
logs, ``CheckpointError``, ``RegistryError``) whose message names the file and the
cause, never a bare ``sqlite3``/``OSError`` that becomes "Flower error 2" on a
silo. A chained log's record whose head update failed must not stay on the log
as sent, and ``audit verify`` must report a record beyond the head and a
leftover ``.head.tmp``.

Real faults where the machine allows: a full disk is a size-limited file
(``RLIMIT_FSIZE`` in a subprocess, ``SIGXFSZ`` ignored, so writes past the limit
fail with ``EFBIG`` on a real file), a damaged page is bytes overwritten in the
middle of the SQLite file, a read-only ledger is ``chmod`` (or, as root, whom
``chmod`` does not stop, a read-only SQLite URI). Where no real fault can be
aimed (the head file after a successful record write; one SQLite statement of a
silo's message) an ``OSError(ENOSPC)`` / ``SQLITE_FULL`` is injected at the
storage layer.

The assertions name error classes by their class hierarchy (``_typed``), so this
file imports only what existed before the fix and fails on its assertions there.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Message

from fedguard.audit.chain import AuditError, read_records
from fedguard.audit.logs import SILO_LOG_NAME, SiloLog, verify_silo_log
from fedguard.audit.server_log import AuditLog
from fedguard.cli.deploy import cmd_audit_verify
from fedguard.client.app import make_client_app
from fedguard.client.silo import SiloSettings
from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import FedguardError, LedgerError
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import PrivacyLedger, RoundPlan
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from tests.factories import initial_weights, instruction, local_scaler, node_context, silo_settings

REPO = Path(__file__).resolve().parents[2]
BUDGET = PrivacyBudget(3.0, 1e-5)
PLAN = RoundPlan(0.01, 1.1, 10, 3)
EVENT = DpSgdRound(0.01, 1.1, 10)


def _names(exc: BaseException) -> list[str]:
    return [c.__name__ for c in type(exc).__mro__]


def _typed(exc: BaseException, store_error: str, path: Path | str, *causes: str) -> str:
    """``exc`` is a StorageError and a ``store_error``, naming ``path`` and one of ``causes``."""
    names, text = _names(exc), str(exc)
    assert "StorageError" in names and store_error in names, f"untyped: {names}: {text}"
    assert isinstance(exc, FedguardError)
    assert str(path) in text, f"the message does not name {path}: {text}"
    assert any(cause in text for cause in causes), f"no cause {causes} in: {text}"
    return text


def _typed_report(result: dict[str, Any], store_error: str, path: Path, *causes: str) -> str:
    """The same check on an error a subprocess described (``_describe`` below)."""
    assert result["raised"] is not None, "the write past the size limit did not fail"
    names, text = result["mro"], result["message"]
    assert "StorageError" in names and store_error in names, f"untyped: {names}: {text}"
    assert "FedguardError" in names
    assert str(path) in text, f"the message does not name {path}: {text}"
    assert any(cause in text for cause in causes), f"no cause {causes} in: {text}"
    return str(text)


# -- a real full disk: writes past RLIMIT_FSIZE fail with EFBIG ---------------------------

_FULL_DISK = textwrap.dedent(
    """
    import json, os, resource, signal, sys, traceback
    from pathlib import Path

    import numpy as np

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
    base = Path(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    out = {}

    def describe(exc):
        if exc is None:
            return {"raised": None}
        return {
            "raised": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))[-3000:],
        }

    def limited(limit, call):
        # Only files written under the limit are affected: set-up runs unlimited.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            call()
        except Exception as exc:
            return describe(exc)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        return describe(None)

    def scenario(name, body):
        try:
            out[name] = body()
        except Exception as exc:
            out[name] = {"setup_failed": describe(exc)}

    def ledger():
        from fedguard.core.config import PrivacyBudget
        from fedguard.privacy.events import DpSgdRound
        from fedguard.privacy.ledger import PrivacyLedger, RoundPlan

        state = base / "ledger"
        led = PrivacyLedger.open(state, "silo-0", PrivacyBudget(3.0, 1e-5))
        size = (state / PrivacyLedger.FILENAME).stat().st_size
        long_run = "r" * 60000  # a row that needs new pages: the file must grow
        plan = limited(size, lambda: led.set_plan(long_run, RoundPlan(0.01, 1.1, 10, 3)))
        charge = limited(size, lambda: led.charge(long_run, 1, DpSgdRound(0.01, 1.1, 10)))
        after = {"entries": len(led.entries()), "plan": led.plan(long_run) is None}
        led.charge("run-a", 1, DpSgdRound(0.01, 1.1, 10))  # usable once space is back
        after["entries_later"] = len(led.entries())
        led.close()
        return {"set_plan": plan, "charge": charge, "after": after}

    def silo_log():
        from fedguard.audit.chain import read_records
        from fedguard.audit.logs import SiloLog, verify_silo_log

        state = base / "silo"
        log = SiloLog.open(state)
        log.sent("run-a", 1, "train", None, 0.5)
        size = log.path.stat().st_size
        # The next record gets 40 bytes in, then EFBIG: a torn write, unless taken back.
        sent = limited(size + 40, lambda: log.sent("run-a", 2, "evaluate", None, 0.5))
        report = verify_silo_log(log.path)
        return {
            "sent": sent,
            "size_before": size,
            "size_after": log.path.stat().st_size,
            "records": len(read_records(log.path)) if report.ok else None,
            "verify": report.summary(),
            "head_tmp": log.path.with_name(log.path.name + ".head.tmp").exists(),
        }

    weights = {"w": np.arange(20000, dtype=np.float32)}

    def outbox():
        from fedguard.client.outbox import Outbox

        box = Outbox(base / "outbox-silo")
        saved = limited(4096, lambda: box.save("run-a", 1, "0" * 64, weights, {"loss": 1.0}))
        left = sorted(p.name for p in box.directory.rglob("*") if p.is_file())
        return {"save": saved, "left": left}

    def checkpoint():
        from fedguard.runs.checkpoints import CheckpointStore

        store = CheckpointStore(base / "checkpoints")
        saved = limited(4096, lambda: store.save(1, weights, {"round": 1}))
        left = sorted(p.name for p in store.directory.rglob("*") if p.is_file())
        return {"save": saved, "rounds": store.rounds(), "left": left}

    def registry():
        from fedguard.audit.registry import ModelRegistry

        reg = ModelRegistry.open(base / "registry")
        registered = limited(
            4096,
            lambda: reg.register(weights, run_id="run-a", round=1, parent_sha256=None, config={}),
        )
        blobs = sorted(p.name for p in (base / "registry" / "blobs").iterdir())
        models = len(reg.list())
        reg.close()
        return {"register": registered, "blobs": blobs, "models": models}

    for name, body in [("ledger", ledger), ("silo_log", silo_log), ("outbox", outbox),
                       ("checkpoint", checkpoint), ("registry", registry)]:
        scenario(name, body)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Run every full-disk scenario in one subprocess (one import of fedguard)."""
    pytest.importorskip("resource")
    import signal

    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no RLIMIT_FSIZE / SIGXFSZ on this platform: a full disk cannot be made")
    base = tmp_path_factory.mktemp("full-disk")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(base)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert "setup_failed" not in result, (name, result)
    return base, results


def test_a_full_disk_on_the_ledger_is_a_typed_ledger_error(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    base, results = full_disk
    result = results["ledger"]
    path = base / "ledger" / PrivacyLedger.FILENAME
    for call in ("set_plan", "charge"):
        _typed_report(result[call], "LedgerError", path, "SQLITE_FULL", "SQLITE_IOERR", "EFBIG")
    # Nothing of the failed transactions was written; the ledger works once space is back.
    assert result["after"] == {"entries": 0, "plan": True, "entries_later": 1}


def test_a_full_disk_during_a_log_append_leaves_no_record_and_no_torn_line(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    base, results = full_disk
    result = results["silo_log"]
    _typed_report(result["sent"], "AuditError", base / "silo" / SILO_LOG_NAME, "EFBIG")
    assert "not recorded" in result["sent"]["message"]
    assert result["size_after"] == result["size_before"], "the torn record stayed on the log"
    assert result["verify"].startswith("OK: 1 records"), result["verify"]
    assert result["records"] == 1 and not result["head_tmp"]


def test_a_full_disk_on_the_outbox_is_a_typed_error_and_leaves_no_file(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    base, results = full_disk
    result = results["outbox"]
    _typed_report(result["save"], "LedgerError", base / "outbox-silo" / "outbox", "EFBIG")
    assert result["left"] == [], f"a half-written entry or temporary file: {result['left']}"


def test_a_full_disk_on_a_checkpoint_is_a_typed_checkpoint_error(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    base, results = full_disk
    result = results["checkpoint"]
    _typed_report(result["save"], "CheckpointError", base / "checkpoints", "EFBIG")
    assert result["rounds"] == [] and result["left"] == []


def test_a_full_disk_on_the_model_registry_is_a_typed_registry_error(
    full_disk: tuple[Path, dict[str, Any]],
) -> None:
    base, results = full_disk
    result = results["registry"]
    _typed_report(result["register"], "RegistryError", base / "registry" / "blobs", "EFBIG")
    assert result["blobs"] == [] and result["models"] == 0


# -- a real full disk: a small tmpfs, filled up (where this machine lets the test mount) ---


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Any:
    """A 512 KiB tmpfs; ``fill()`` then takes every free page (real ENOSPC from then on)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the "
            "RLIMIT_FSIZE and injected-ENOSPC tests cover a full disk"
        )

    def fill() -> None:
        with open(mount_point / "filler", "wb", buffering=0) as filler:
            chunk = b"\0" * 4096
            with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
                while True:
                    filler.write(chunk)
            assert full.value.errno == errno.ENOSPC, full.value

    try:
        yield mount_point, fill
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_disk_during_the_head_update_records_nothing(full_tmpfs: Any) -> None:
    mount_point, fill = full_tmpfs
    log = SiloLog.open(mount_point / "silo-0")
    log.sent("run-a", 1, "train", None, 0.5)
    before = log.path.read_bytes()
    fill()  # the next record still fits in the log's page; the new .head.tmp does not
    with pytest.raises(AuditError) as failed:
        log.sent("run-a", 1, "evaluate", None, 0.5)
    _typed(failed.value, "AuditError", log.path, "ENOSPC")
    assert log.path.read_bytes() == before, "the record stayed on the log as sent"
    assert not _head_tmp(log.path).exists()
    assert verify_silo_log(log.path).ok


def test_a_really_full_disk_on_the_ledger_is_a_typed_ledger_error(full_tmpfs: Any) -> None:
    mount_point, fill = full_tmpfs
    state = mount_point / "silo-0"
    path = _ledger_with_history(state)
    fill()
    with PrivacyLedger.open(state, "silo-0", BUDGET) as ledger:
        with pytest.raises(Exception) as failed:  # noqa: PT011 - the type is checked
            ledger.charge("run-a", 4, EVENT)
        _typed(failed.value, "LedgerError", path, "SQLITE_FULL", "ENOSPC")
        assert [e.round for e in ledger.entries()] == [1, 2, 3]


# -- a damaged page and a read-only ledger -------------------------------------------------


def _ledger_with_history(state: Path) -> Path:
    with PrivacyLedger.open(state, "silo-0", BUDGET) as ledger:
        ledger.set_plan("run-a", PLAN)
        for round_number in (1, 2, 3):
            ledger.charge("run-a", round_number, EVENT)
    return state / PrivacyLedger.FILENAME


def _calls(ledger: PrivacyLedger) -> dict[str, Any]:
    return {
        "entries": ledger.entries,
        "plan": lambda: ledger.plan("run-a"),
        "set_plan": lambda: ledger.set_plan("run-b", PLAN),
        "charge": lambda: ledger.charge("run-a", 4, EVENT),
    }


def test_a_damaged_ledger_page_is_a_typed_error_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "silo-0"
    path = _ledger_with_history(state)
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    roots = dict(conn.execute("SELECT name, rootpage FROM sqlite_master WHERE type='table'"))
    conn.close()
    with open(path, "r+b") as raw:  # the charges and plans tables' pages, in mid-file
        for table in ("charges", "plans"):
            raw.seek((roots[table] - 1) * page_size)
            raw.write(b"\xa5" * page_size)
    failures: list[BaseException] = []
    try:
        ledger = PrivacyLedger.open(state, "silo-0", BUDGET)
    except Exception as at_open:
        failures.append(at_open)
    else:
        with ledger:
            for name, call in _calls(ledger).items():
                try:
                    call()
                except Exception as failed:
                    failures.append(failed)
                else:
                    pytest.fail(f"{name} read or wrote a damaged ledger page without an error")
    assert failures
    for error in failures:
        _typed(error, "LedgerError", path, "SQLITE_CORRUPT", "malformed")


def test_a_read_only_ledger_is_a_typed_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "silo-0"
    path = _ledger_with_history(state)
    if os.geteuid() == 0:
        # chmod does not stop root: open the file as SQLite would a read-only one.
        real_connect = sqlite3.connect

        def read_only(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
            kwargs.pop("uri", None)
            conn: sqlite3.Connection = real_connect(
                f"file:{Path(database)}?mode=ro", *args, uri=True, **kwargs
            )
            return conn

        monkeypatch.setattr(sqlite3, "connect", read_only)
    else:
        path.chmod(0o444)
        state.chmod(0o555)
    try:
        try:
            ledger = PrivacyLedger.open(state, "silo-0", BUDGET)
        except Exception as at_open:
            _typed(at_open, "LedgerError", path, "READONLY", "CANTOPEN", "EACCES", "EROFS")
            return
        with ledger:
            assert [e.round for e in ledger.entries()] == [1, 2, 3]  # reading still works
            calls = _calls(ledger)
            for name in ("set_plan", "charge"):
                with pytest.raises(Exception) as failed:  # noqa: PT011 - the type is checked
                    calls[name]()
                _typed(failed.value, "LedgerError", path, "READONLY", "CANTOPEN", "EACCES")
    finally:
        state.chmod(0o755)
        path.chmod(0o644)


# -- the chained logs: record and head, verification, repair --------------------------------


def _head(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _head_tmp(path: Path) -> Path:
    return path.with_name(path.name + ".head.tmp")


def _full_disk_on_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head file's rename fails with ENOSPC (the record itself was written)."""
    real_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(dst).endswith(".head"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_full_disk_during_the_head_update_records_nothing_as_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = SiloLog.open(tmp_path / "silo-0")
    log.sent("run-a", 1, "train", None, 0.5)
    before, head_before = log.path.read_bytes(), _head(log.path).read_bytes()
    _full_disk_on_head(monkeypatch)
    with pytest.raises(AuditError) as failed:
        log.sent("run-a", 1, "evaluate", None, 0.5)
    monkeypatch.undo()
    text = _typed(failed.value, "AuditError", log.path, "ENOSPC")
    assert "not recorded" in text
    assert log.path.read_bytes() == before, "the record stayed on the log as sent"
    assert _head(log.path).read_bytes() == head_before
    assert not _head_tmp(log.path).exists(), "a .head.tmp was left behind"
    report = verify_silo_log(log.path)
    assert report.ok and report.records == 1, report.summary()
    log.sent("run-a", 1, "evaluate", None, 0.5)  # space is back: appends go on
    assert verify_silo_log(log.path).records == 2


def _crash_between_record_and_head(log: SiloLog) -> bytes:
    """Leave the state of a writer that died after its record, before the head rename."""
    head_before = _head(log.path).read_bytes()
    record = log.sent("run-a", 3, "evaluate", None, 0.5)
    _head_tmp(log.path).write_bytes(_head(log.path).read_bytes())
    _head(log.path).write_bytes(head_before)
    return record.to_line()


def _verify_cli(log: Path, public_key: Path | None, silo: bool) -> int:
    args = argparse.Namespace(
        log=str(log),
        public_key=str(public_key) if public_key else None,
        expect_head=None,
        silo=silo,
    )
    return cmd_audit_verify(args)


def test_verify_reports_an_unconfirmed_record_and_a_leftover_head_tmp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = SiloLog.open(tmp_path / "silo-0")
    log.sent("run-a", 1, "train", None, 0.5)
    log.sent("run-a", 2, "train", None, 0.7)
    _crash_between_record_and_head(log)

    report = verify_silo_log(log.path)
    assert not report.ok, "a record beyond the head verified OK"
    assert report.first_bad_seq == 2, report.summary()
    assert "unconfirmed" in (report.reason or "") and ".head.tmp" in (report.reason or "")
    capsys.readouterr()
    assert _verify_cli(log.path, None, silo=True) != 0
    printed = capsys.readouterr().out
    assert "unconfirmed" in printed and ".head.tmp" in printed, printed


def test_opening_a_log_with_an_unconfirmed_record_moves_it_aside_on_the_record(
    tmp_path: Path,
) -> None:
    state = tmp_path / "silo-0"
    log = SiloLog.open(state)
    log.sent("run-a", 1, "train", None, 0.5)
    log.sent("run-a", 2, "train", None, 0.7)
    line = _crash_between_record_and_head(log)

    reopened = SiloLog.open(state)
    records = read_records(reopened.path)
    assert [r.kind for r in records] == ["sent", "sent", "log-repaired"], records
    repair = records[-1].payload
    assert [u["seq"] for u in repair["unconfirmed"]] == [2]
    assert repair["unconfirmed"][0]["sha256"] == json.loads(line)["sha256"]
    assert (state / repair["moved_to"]).read_bytes() == line  # kept, not deleted
    assert repair["removed_head_tmp"] == _head_tmp(reopened.path).name
    assert not _head_tmp(reopened.path).exists()
    assert verify_silo_log(reopened.path).ok
    sent = [r.payload for r in records if r.kind == "sent"]
    assert [s["round"] for s in sent] == [1, 2], "the unconfirmed reply still counts as sent"


def test_a_first_record_whose_head_never_landed_is_unconfirmed(tmp_path: Path) -> None:
    state = tmp_path / "silo-0"
    log = SiloLog.open(state)
    line = log.sent("run-a", 1, "train", None, 0.5).to_line()
    _head(log.path).rename(_head_tmp(log.path))  # died between the tmp write and its rename

    report = verify_silo_log(log.path)
    assert not report.ok and report.first_bad_seq == 0, report.summary()
    records = read_records(SiloLog.open(state).path)
    assert [r.kind for r in records] == ["log-repaired"]
    assert records[0].payload["unconfirmed"][0]["seq"] == 0
    assert (state / records[0].payload["moved_to"]).read_bytes() == line
    assert verify_silo_log(log.path).ok


def test_the_server_audit_log_reports_and_repairs_a_leftover_head_tmp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = tmp_path / "audit.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path, key)
    log.run_start("run-a", {"rounds": 2})
    _head_tmp(path).write_bytes(_head(path).read_bytes())  # died before the rename

    capsys.readouterr()
    assert _verify_cli(path, public, silo=False) != 0
    assert ".head.tmp" in capsys.readouterr().out

    AuditLog.open(path, key)
    assert not _head_tmp(path).exists()
    records = read_records(path)
    assert [r.kind for r in records] == ["run-start", "log-repaired"]
    assert records[-1].payload["removed_head_tmp"] == _head_tmp(path).name
    assert _verify_cli(path, public, silo=False) == 0


# -- through the silo's message handler ----------------------------------------------------


def _app(settings: SiloSettings) -> Any:
    app = make_client_app(lambda context: settings)
    return lambda message: app(message, node_context(0))


def _sent(settings: SiloSettings) -> list[dict[str, Any]]:
    path = settings.state_dir / SILO_LOG_NAME
    return [r.payload for r in read_records(path) if r.kind == "sent"] if path.exists() else []


class _FullOnCharge(sqlite3.Connection):
    """A ledger connection whose disk is full when a charge is inserted."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith("INSERT INTO CHARGES"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


def test_a_ledger_storage_failure_in_a_train_message_is_a_logged_error_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = silo_settings(tmp_path, 0)
    call = _app(settings)
    real_connect = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if str(database).endswith(PrivacyLedger.FILENAME):
            kwargs["factory"] = _FullOnCharge
        conn: sqlite3.Connection = real_connect(database, *args, **kwargs)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    reply: Message = call(instruction(1, initial_weights(), local_scaler(settings)))
    monkeypatch.undo()

    status, reason = protocol.reply_status(reply)
    assert status is ReplyStatus.ERROR, reason
    assert protocol.ARRAYS not in reply.content.array_records
    assert "LedgerStorageError" in reason and "database or disk is full" in reason, reason
    assert str(settings.state_dir / PrivacyLedger.FILENAME) in reason, reason
    sent = _sent(settings)
    assert [(s["message_type"], s["round"], s["status"]) for s in sent] == [("train", 1, "error")]
    assert "LedgerStorageError" in sent[0]["reason"]
    with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
        assert ledger.entries() == []  # nothing charged


def test_a_full_disk_on_the_silo_log_is_an_error_reply_never_logged_as_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = silo_settings(tmp_path, 0)
    call = _app(settings)
    weights, scaler = initial_weights(), local_scaler(settings)
    first = call(instruction(1, weights, scaler, message_type=protocol.EVALUATE))
    assert protocol.reply_status(first)[0] is ReplyStatus.OK
    _full_disk_on_head(monkeypatch)
    reply = call(instruction(2, weights, scaler, message_type=protocol.EVALUATE))
    monkeypatch.undo()

    status, reason = protocol.reply_status(reply)
    assert status is ReplyStatus.ERROR, reason
    sent = _sent(settings)
    assert [(s["message_type"], s["round"], s["status"]) for s in sent] == [
        ("evaluate", 1, "ok")
    ], "the log says a reply was sent that the silo replaced with an error"
    assert "LogStorageError" in reason and "ENOSPC" in reason, reason
    path = settings.state_dir / SILO_LOG_NAME
    assert verify_silo_log(path).ok and not _head_tmp(path).exists()


def test_ledger_storage_errors_stay_ledger_errors() -> None:
    """Callers that catch LedgerError (the silo's handlers, ledger_guard) keep working."""
    from fedguard.core import errors

    storage = getattr(errors, "LedgerStorageError", None)
    assert storage is not None, "no LedgerStorageError"
    assert issubclass(storage, LedgerError) and issubclass(storage, OSError)
