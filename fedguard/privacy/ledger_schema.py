"""The privacy ledger's SQLite schema: creating a ledger file, migrating older ones.

File layout: ``PRAGMA application_id`` set to :data:`APPLICATION_ID`, a
``schema_version`` table (version :data:`SCHEMA_VERSION`), a one-row ``silo``
table (silo id and budget, fixed at creation; the ledger id; whether a silo log
has committed to it), ``charges`` and ``plans``. Older schemas are migrated in
place inside the opening transaction: schema 1 (training charges only, unique
per ``(run_id, round)``) to 2 (a ``purpose`` column, unique per ``(run_id, round,
purpose)``; every schema-1 charge becomes a ``training`` charge with its entry
id, event and status kept), and 2 to 3 (a random ledger id, not yet bound to a
log). The ledger that uses it is :class:`fedguard.privacy.ledger.PrivacyLedger`.
"""

from __future__ import annotations

import secrets
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import LedgerError

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "create_or_check", "utc_now"]

#: ``PRAGMA application_id`` of a fedguard ledger ("FGPL"); anything else is foreign.
APPLICATION_ID = 0x4647504C
SCHEMA_VERSION = 3

_CHARGES_V2 = """
CREATE TABLE charges (
    entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    event TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('charged', 'completed', 'failed')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (run_id, round, purpose)
)"""

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE silo (
    silo_id TEXT NOT NULL,
    budget_epsilon REAL NOT NULL,
    budget_delta REAL NOT NULL,
    created_at TEXT NOT NULL,
    ledger_id TEXT NOT NULL,
    log_bound INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE plans (
    run_id TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
_TABLES = {"schema_version", "silo", "charges", "plans"}


def utc_now() -> str:
    """A timestamp as the ledger stores it: ISO 8601, UTC, to the microsecond."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def create_or_check(
    conn: sqlite3.Connection, path: Path, silo_id: str, budget: PrivacyBudget
) -> None:
    """Create the ledger in a new file or check (and migrate) an existing one.

    Runs inside the caller's ``BEGIN IMMEDIATE`` transaction. Raises
    ``LedgerError`` for a foreign file, an unknown schema version, or a ledger
    created for another silo or another budget.
    """
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    tables.discard("sqlite_sequence")
    if app_id == 0 and not tables:  # a new (or empty) file: create the ledger
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(_CHARGES_V2)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute(
            "INSERT INTO silo (silo_id, budget_epsilon, budget_delta, created_at, ledger_id) "
            "VALUES (?, ?, ?, ?, ?)",
            (silo_id, float(budget.epsilon), float(budget.delta), utc_now(), _new_ledger_id()),
        )
        return
    if app_id != APPLICATION_ID or not tables >= _TABLES:
        raise LedgerError(f"{path} is not a fedguard privacy ledger (foreign SQLite file)")
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
    if versions == [1]:
        _migrate_v1_to_v2(conn)
        versions = [2]
    if versions == [2]:
        _migrate_v2_to_v3(conn)
        versions = [SCHEMA_VERSION]
    if versions != [SCHEMA_VERSION]:
        raise LedgerError(
            f"{path} has ledger schema version {versions}; this fedguard reads "
            f"version {SCHEMA_VERSION}"
        )
    rows = conn.execute("SELECT silo_id, budget_epsilon, budget_delta FROM silo").fetchall()
    if len(rows) != 1:
        raise LedgerError(f"{path} is corrupt: {len(rows)} silo records")
    stored_id, stored_eps, stored_delta = rows[0]
    if stored_id != silo_id:
        raise LedgerError(
            f"{path} belongs to silo {stored_id!r}, not {silo_id!r}; each silo needs its "
            f"own state directory"
        )
    if stored_eps != float(budget.epsilon) or stored_delta != float(budget.delta):
        raise LedgerError(
            f"{path} was created with budget ε={stored_eps!r}, δ={stored_delta!r}, but "
            f"ε={budget.epsilon!r}, δ={budget.delta!r} was given; a silo's budget is "
            f"fixed for its life and is never changed silently (to start over with a new "
            f"budget, run `fedguard client reset-ledger`, which archives this ledger "
            f"and records the reset in the silo log)"
        )


def _migrate_v1_to_v2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2 inside the caller's transaction: a ``purpose`` column, ids kept."""
    conn.execute("ALTER TABLE charges RENAME TO charges_v1")
    conn.execute(_CHARGES_V2)
    conn.execute(
        "INSERT INTO charges (entry_id, run_id, round, purpose, event, epsilon_after, status, "
        "created_at, updated_at) SELECT entry_id, run_id, round, 'training', event, "
        "epsilon_after, status, created_at, updated_at FROM charges_v1 ORDER BY entry_id"
    )
    conn.execute("DROP TABLE charges_v1")
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def _migrate_v2_to_v3(conn: sqlite3.Connection) -> None:
    """Schema 2 -> 3 inside the caller's transaction: the ledger gets its random id."""
    conn.execute("ALTER TABLE silo ADD COLUMN ledger_id TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE silo ADD COLUMN log_bound INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE silo SET ledger_id = ?", (_new_ledger_id(),))
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def _new_ledger_id() -> str:
    # Random, so two ledgers with the same silo id and the same charges still differ.
    return secrets.token_hex(16)
