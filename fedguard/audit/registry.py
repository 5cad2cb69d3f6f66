"""Model registry with lineage: every round's global model, addressable by content hash.

Layout of a registry folder (SQLite, embedded: no server to run)::

    <registry>/registry.sqlite      models, heads, head_events (below)
    <registry>/blobs/<sha256>.npz   the weights, one file per distinct content

**Content hash.** A model's ``sha256`` is taken over its *canonical weights
bytes* (:func:`fedguard.core.serialization.canonical_weights_bytes`, re-exported
here with :func:`~fedguard.core.serialization.weights_sha256`): for every tensor
in name order, the name, dtype and shape as a canonical JSON header, then the raw little-endian
C-order bytes. The same weights give the same hash whatever the key order or
memory layout; any changed bit gives another. Blobs are written once (atomic
rename, fsync) and re-hashed on every load, so a blob changed on disk is
refused (:class:`RegistryError`).

**Lineage.** ``models`` holds one row per (run, round): its hash, its parent's
hash (the model the round started from: the previous round's, or the model a
run was resumed or forked from), the run's config and the round's metrics as
JSON, and when it was registered. The same content may appear in several rows
(two runs with the same seed start from the same round-0 model); a round's row
is never changed: registering a *different* model for a (run, round) that has
one is refused, registering the same one again is a no-op (a resumed server
may do it).

**Heads and rollback.** Each run has a *head*: the model it currently stands
at. Registering advances the head; :meth:`ModelRegistry.rollback` moves it back
to any registered model (of any round) and writes a ``head_events`` row with
the previous head and the reason. Nothing is ever deleted; the full history of
heads stays queryable (:meth:`ModelRegistry.head_history`).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import sqlite3
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from fedguard.audit.chain import jsonable
from fedguard.core.canonical import canonical_json
from fedguard.core.checks import positive_int
from fedguard.core.errors import FedguardError, StorageError
from fedguard.core.files import atomic_write_bytes, cause_name, describe_cause, storage_error
from fedguard.core.serialization import canonical_weights_bytes, weights_sha256

__all__ = [
    "HeadEvent",
    "ModelRecord",
    "ModelRegistry",
    "RegistryError",
    "RegistryStorageError",
    "canonical_weights_bytes",
    "weights_sha256",
]

#: ``PRAGMA application_id`` of a fedguard model registry ("FGMR").
APPLICATION_ID = 0x46474D52
SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL,
    parent_sha256 TEXT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL CHECK (round >= 0),
    config_json TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    num_parameters INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (run_id, round)
);
CREATE INDEX models_sha256 ON models (sha256);
CREATE TABLE heads (
    run_id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models (id),
    updated_at TEXT NOT NULL
);
CREATE TABLE head_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    previous_sha256 TEXT,
    action TEXT NOT NULL CHECK (action IN ('register', 'rollback')),
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


class RegistryError(FedguardError):
    """The registry cannot register, find or load a model, or its files are inconsistent."""


class RegistryStorageError(RegistryError, StorageError):
    """The registry's database or a weights file cannot be read or written (full, damaged)."""


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRecord:
    sha256: str
    parent_sha256: str | None
    run_id: str
    round: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    num_parameters: int
    created_at: str
    is_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "parent_sha256": self.parent_sha256,
            "run_id": self.run_id,
            "round": self.round,
            "config": self.config,
            "metrics": self.metrics,
            "num_parameters": self.num_parameters,
            "created_at": self.created_at,
            "is_head": self.is_head,
        }


@dataclass(frozen=True)
class HeadEvent:
    run_id: str
    sha256: str
    previous_sha256: str | None
    action: str
    reason: str
    at: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


# -- the registry --------------------------------------------------------------------------


class ModelRegistry:
    """A folder with ``registry.sqlite`` and ``blobs/`` (see the module docstring)."""

    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        self.root = root
        self._conn = conn

    @classmethod
    def open(cls, root: Path) -> ModelRegistry:
        root = Path(root)
        try:
            (root / "blobs").mkdir(parents=True, exist_ok=True)
        except OSError as bad:
            raise storage_error(
                RegistryStorageError, "cannot create model registry folder", root, bad
            ) from bad
        path = root / "registry.sqlite"
        try:
            conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as bad:
            raise storage_error(
                RegistryStorageError, "cannot open model registry", path, bad
            ) from bad
        registry = cls(root, conn)
        try:
            try:
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = FULL")
                registry._create_or_check(path)
            except sqlite3.Error as bad:
                raise _unreadable(path, bad) from bad
            except RegistryStorageError as bad:
                raise _unreadable(path, bad.__cause__ or bad) from bad
        except BaseException:
            conn.close()
            raise
        return registry

    def _create_or_check(self, path: Path) -> None:
        with self._transaction() as conn:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not tables and app_id == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                return
            if app_id != APPLICATION_ID:
                raise RegistryError(f"{path} is not a fedguard model registry")
            version = conn.execute("SELECT version FROM schema_version").fetchone()
            if version is None or version[0] != SCHEMA_VERSION:
                raise RegistryError(
                    f"{path} has schema version {version}, expected {SCHEMA_VERSION}"
                )

    @property
    def path(self) -> Path:
        return self.root / "registry.sqlite"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; any SQLite error in it is a :class:`RegistryStorageError`."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as bad:
            raise storage_error(RegistryStorageError, "model registry", self.path, bad) from bad
        try:
            yield conn
        except sqlite3.Error as bad:
            _rollback(conn)
            raise storage_error(RegistryStorageError, "model registry", self.path, bad) from bad
        except BaseException:
            _rollback(conn)
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as bad:
            _rollback(conn)
            raise storage_error(
                RegistryStorageError, "model registry (commit failed)", self.path, bad
            ) from bad

    def _rows(self, query: str, args: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        """The rows of a read; a SQLite error (damaged page, I/O) is a RegistryStorageError."""
        try:
            return self._conn.execute(query, args).fetchall()
        except sqlite3.Error as bad:
            raise storage_error(RegistryStorageError, "model registry", self.path, bad) from bad

    def _row(self, query: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._rows(query, args)
        return rows[0] if rows else None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / f"{sha256}.npz"

    def _write_blob(self, sha256: str, weights: Mapping[str, np.ndarray]) -> None:
        path = self.blob_path(sha256)
        if path.exists():
            return
        buffer = io.BytesIO()
        names = list(weights)
        arrays: dict[str, Any] = {f"t{i}": np.asarray(weights[n]) for i, n in enumerate(names)}
        arrays["__names__"] = np.array(names, dtype=np.str_)
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue(), error=RegistryStorageError)

    def load_weights(self, hash_prefix: str) -> OrderedDict[str, np.ndarray]:
        """The weights of a registered model, re-hashed against their address."""
        sha256 = self.resolve(hash_prefix)
        path = self.blob_path(sha256)
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["__names__"]]
                weights = OrderedDict((n, data[f"t{i}"]) for i, n in enumerate(names))
        except FileNotFoundError:
            raise RegistryError(
                f"model {sha256[:12]}: its weights file {path} is missing"
            ) from None
        except OSError as bad:
            raise storage_error(
                RegistryStorageError, f"model {sha256[:12]}: cannot read", path, bad
            ) from bad
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as bad:
            raise RegistryError(f"model {sha256[:12]}: {path} is unreadable: {bad}") from None
        if weights_sha256(weights) != sha256:
            raise RegistryError(
                f"model {sha256[:12]}: {path} does not hash to its address (changed on disk)"
            )
        return weights

    # -- registering -----------------------------------------------------------------------

    def register(
        self,
        weights: Mapping[str, np.ndarray],
        *,
        run_id: str,
        round: int,
        parent_sha256: str | None,
        config: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Register one round's model and make it the run's head; returns its record."""
        if not run_id:
            raise RegistryError("run_id must be a non-empty string")
        positive_int("round", round, allow_zero=True, error=RegistryError)
        if not weights:
            raise RegistryError("a model has at least one tensor")
        sha256 = weights_sha256(weights)
        config_json = canonical_json(jsonable(config)).decode()
        metrics_json = canonical_json(jsonable(metrics or {})).decode()
        num_parameters = int(sum(np.asarray(v).size for v in weights.values()))
        self._write_blob(sha256, weights)  # before the row: a row never points at nothing
        with self._transaction() as conn:
            if parent_sha256 is not None and not self._known(conn, parent_sha256):
                raise RegistryError(f"parent model {parent_sha256[:12]} is not registered")
            existing = conn.execute(
                "SELECT sha256 FROM models WHERE run_id = ? AND round = ?", (run_id, round)
            ).fetchone()
            if existing is not None:
                if existing[0] != sha256:
                    raise RegistryError(
                        f"run {run_id!r} round {round} already has model {existing[0][:12]}; "
                        f"refusing to replace it with {sha256[:12]}"
                    )
            else:
                cursor = conn.execute(
                    "INSERT INTO models (sha256, parent_sha256, run_id, round, config_json,"
                    " metrics_json, num_parameters, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        sha256,
                        parent_sha256,
                        run_id,
                        round,
                        config_json,
                        metrics_json,
                        num_parameters,
                        _now(),
                    ),
                )
                model_id = cursor.lastrowid
                if model_id is None:
                    raise RegistryError("SQLite returned no row id")
                head = self._head_row(conn, run_id)
                latest = conn.execute(
                    "SELECT MAX(round) FROM models WHERE run_id = ?", (run_id,)
                ).fetchone()[0]
                if round >= latest:
                    self._set_head(
                        conn, run_id, sha256, model_id, head, "register", f"round {round}"
                    )
        return self._one(run_id, round)

    @staticmethod
    def _known(conn: sqlite3.Connection, sha256: str) -> bool:
        return (
            conn.execute("SELECT 1 FROM models WHERE sha256 = ?", (sha256,)).fetchone() is not None
        )

    @staticmethod
    def _head_row(conn: sqlite3.Connection, run_id: str) -> str | None:
        row = conn.execute("SELECT sha256 FROM heads WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _set_head(
        conn: sqlite3.Connection,
        run_id: str,
        sha256: str,
        model_id: int,
        previous: str | None,
        action: str,
        reason: str,
    ) -> None:
        now = _now()
        conn.execute(
            "INSERT INTO heads (run_id, sha256, model_id, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (run_id) DO UPDATE SET sha256 = excluded.sha256,"
            " model_id = excluded.model_id, updated_at = excluded.updated_at",
            (run_id, sha256, model_id, now),
        )
        conn.execute(
            "INSERT INTO head_events (run_id, sha256, previous_sha256, action, reason, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, sha256, previous, action, reason, now),
        )

    # -- querying --------------------------------------------------------------------------

    def resolve(self, hash_prefix: str) -> str:
        """The one full hash that starts with ``hash_prefix`` (at least 4 hex digits)."""
        prefix = hash_prefix.strip().lower()
        if len(prefix) < 4 or len(prefix) > 64 or not _is_hex(prefix):
            raise RegistryError(f"a model hash prefix has 4 to 64 hex digits, got {hash_prefix!r}")
        rows = self._rows(
            "SELECT DISTINCT sha256 FROM models WHERE sha256 LIKE ? || '%'", (prefix,)
        )
        if not rows:
            raise RegistryError(f"no registered model has a hash starting with {prefix}")
        if len(rows) > 1:
            raise RegistryError(
                f"hash prefix {prefix} is ambiguous: {', '.join(r[0][:12] for r in rows)}"
            )
        return str(rows[0][0])

    _COLUMNS = (
        "m.sha256, m.parent_sha256, m.run_id, m.round, m.config_json, m.metrics_json,"
        " m.num_parameters, m.created_at, (h.model_id IS NOT NULL) AS is_head"
    )
    _FROM = "FROM models m LEFT JOIN heads h ON h.model_id = m.id"

    @staticmethod
    def _record(row: tuple[Any, ...]) -> ModelRecord:
        return ModelRecord(
            sha256=row[0],
            parent_sha256=row[1],
            run_id=row[2],
            round=int(row[3]),
            config=json.loads(row[4]),
            metrics=json.loads(row[5]),
            num_parameters=int(row[6]),
            created_at=row[7],
            is_head=bool(row[8]),
        )

    def _one(self, run_id: str, round: int) -> ModelRecord:
        row = self._row(
            f"SELECT {self._COLUMNS} {self._FROM} WHERE m.run_id = ? AND m.round = ?",
            (run_id, round),
        )
        if row is None:
            raise RegistryError(f"run {run_id!r} has no model for round {round}")
        return self._record(row)

    def get(self, hash_prefix: str, run_id: str | None = None) -> ModelRecord:
        """The model with this hash (prefix); the earliest registration if several runs have it."""
        sha256 = self.resolve(hash_prefix)
        query = f"SELECT {self._COLUMNS} {self._FROM} WHERE m.sha256 = ?"
        args: tuple[Any, ...] = (sha256,)
        if run_id is not None:
            query += " AND m.run_id = ?"
            args += (run_id,)
        row = self._row(query + " ORDER BY m.id LIMIT 1", args)
        if row is None:
            raise RegistryError(f"run {run_id!r} has no model {sha256[:12]}")
        return self._record(row)

    def list(self, run_id: str | None = None) -> builtins.list[ModelRecord]:
        """All registered models (of one run), oldest first."""
        query = f"SELECT {self._COLUMNS} {self._FROM}"
        args: tuple[Any, ...] = ()
        if run_id is not None:
            query += " WHERE m.run_id = ?"
            args = (run_id,)
        return [self._record(r) for r in self._rows(query + " ORDER BY m.id", args)]

    def runs(self) -> builtins.list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT run_id FROM models ORDER BY id")]

    def head(self, run_id: str) -> ModelRecord | None:
        """The model a run currently stands at (after any rollback)."""
        row = self._row(
            f"SELECT {self._COLUMNS} FROM heads h JOIN models m ON m.id = h.model_id"
            " WHERE h.run_id = ?",
            (run_id,),
        )
        return None if row is None else self._record(row)

    def lineage(self, hash_prefix: str, run_id: str | None = None) -> builtins.list[ModelRecord]:
        """The model and its ancestors, newest first."""
        chain = [self.get(hash_prefix, run_id)]
        seen = {chain[0].sha256}
        while chain[-1].parent_sha256 is not None:
            parent = chain[-1].parent_sha256
            if parent in seen:
                raise RegistryError(f"lineage of {hash_prefix} loops at {parent[:12]}")
            seen.add(parent)
            chain.append(self.get(parent))
        return chain

    def head_history(self, run_id: str) -> builtins.list[HeadEvent]:
        rows = self._rows(
            "SELECT run_id, sha256, previous_sha256, action, reason, at FROM head_events"
            " WHERE run_id = ? ORDER BY id",
            (run_id,),
        )
        return [HeadEvent(*row) for row in rows]

    # -- rollback ----------------------------------------------------------------------------

    def rollback(
        self, hash_prefix: str, run_id: str | None = None, reason: str = ""
    ) -> ModelRecord:
        """Make a registered model its run's head again; recorded, nothing deleted.

        ``run_id`` picks the run when the same content was registered by several.
        """
        target = self.get(hash_prefix, run_id)
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id FROM models WHERE run_id = ? AND round = ?",
                (target.run_id, target.round),
            ).fetchone()
            previous = self._head_row(conn, target.run_id)
            self._set_head(
                conn,
                target.run_id,
                target.sha256,
                int(row[0]),
                previous,
                "rollback",
                reason or f"rolled back to round {target.round}",
            )
        return self._one(target.run_id, target.round)


def _unreadable(path: Path, bad: BaseException) -> RegistryStorageError:
    cause = cause_name(bad)
    damaged = cause in ("SQLITE_NOTADB", "SQLITE_CORRUPT", "DatabaseError")
    what = (
        f"{path} is not a readable SQLite file" if damaged else f"cannot open model registry {path}"
    )
    return RegistryStorageError(f"{what}: {describe_cause(bad)}", path=path, cause=cause)


def _rollback(conn: sqlite3.Connection) -> None:
    # No transaction may be open (it failed to start, or SQLite already rolled back).
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
