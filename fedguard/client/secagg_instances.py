"""One secure aggregation per (run, round, purpose): the silo's persistent commitments.

Why: secure aggregation hides one silo's input only if that input is masked in
*one* SecAgg instance. A server that runs a second instance over the same
update (a "replayed" round answered from the outbox, a trust statistic answered
from the release store) with another cohort, or with the same cohort but other
claimed dropouts, gets two sums whose difference is one silo's update. So before
it trains or releases anything, a silo commits to the instance it joins, in a
SQLite file in its own state folder (``secagg-instances.sqlite``), keyed by
``(run, round, purpose)`` and naming the setup digest (which binds the round id,
config, cohort and vector length) and the cohort. It then:

* answers a setup whose key is new (and commits to it);
* answers a byte-identical repeat of the setup of an instance still open, with
  the very same advertisement (no new keys, no new mask: Flower may redeliver);
* refuses any other instance for the same key, whatever its cohort, and any
  instance that was aborted: a refusal is final.

The commitment is written (and fsync'd by SQLite) before training starts, so a
silo restarted mid-round still refuses the server's second attempt.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from fedguard.client.policy import PolicyRefusalError, RefusalReason
from fedguard.core.errors import LedgerError

__all__ = ["InstanceKey", "InstanceStatus", "SecAggCommitment", "SecAggInstances"]

_FILE = "secagg-instances.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    digest TEXT NOT NULL,
    cohort TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'completed', 'aborted')),
    reason TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, round, purpose)
)"""


class InstanceStatus(StrEnum):
    OPEN = "open"
    COMPLETED = "completed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class InstanceKey:
    """What a SecAgg instance aggregates: a run, a round (or query round), a purpose."""

    run_id: str
    round: int
    purpose: str

    def __str__(self) -> str:
        return f"{self.purpose} round {self.round} of run {self.run_id!r}"


@dataclass(frozen=True)
class SecAggCommitment:
    key: InstanceKey
    digest: str
    cohort: tuple[int, ...]
    status: InstanceStatus
    repeat: bool  # True: this setup repeats the committed one byte for byte


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class SecAggInstances:
    """The commitments in one silo's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / _FILE

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except (OSError, sqlite3.Error) as failed:
            raise LedgerError(f"cannot open {self.path}: {failed}") from failed
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as failed:
            conn.rollback()
            raise LedgerError(f"{self.path}: {failed}") from failed
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def commit(self, key: InstanceKey, digest: bytes, cohort: Sequence[int]) -> SecAggCommitment:
        """Commit to this instance, or recognise its exact repeat; refuse any other."""
        hex_digest = digest.hex()
        cohort_text = ",".join(str(int(n)) for n in sorted(cohort))
        with self._connect() as conn:
            row = conn.execute(
                "SELECT digest, cohort, status, reason FROM instances "
                "WHERE run_id = ? AND round = ? AND purpose = ?",
                (key.run_id, key.round, key.purpose),
            ).fetchone()
            if row is None:
                now = _now()
                conn.execute(
                    "INSERT INTO instances VALUES (?, ?, ?, ?, ?, 'open', '', ?, ?)",
                    (key.run_id, key.round, key.purpose, hex_digest, cohort_text, now, now),
                )
                return SecAggCommitment(
                    key, hex_digest, tuple(sorted(cohort)), InstanceStatus.OPEN, repeat=False
                )
        stored_digest, stored_cohort, status, reason = row
        status = InstanceStatus(status)
        if stored_digest == hex_digest and status is InstanceStatus.OPEN:
            cohort_ids = tuple(int(n) for n in stored_cohort.split(",") if n)
            return SecAggCommitment(key, hex_digest, cohort_ids, status, repeat=True)
        size = len(stored_cohort.split(","))
        raise PolicyRefusalError(
            RefusalReason.SECAGG_SECOND_INSTANCE,
            f"this silo already took part in a secure aggregation for {key} (setup "
            f"{stored_digest[:16]}…, {size} silos, {status.value}"
            f"{': ' + reason if reason else ''}); a second instance over the same input "
            "would let the server difference the sums, so it is refused",
        )

    def close(self, key: InstanceKey, status: InstanceStatus, reason: str = "") -> None:
        """Mark the instance completed or aborted (both final)."""
        with self._connect() as conn:
            conn.execute(
                "UPDATE instances SET status = ?, reason = ?, updated_at = ? "
                "WHERE run_id = ? AND round = ? AND purpose = ? AND status = 'open'",
                (status.value, reason[:500], _now(), key.run_id, key.round, key.purpose),
            )

    def status(self, key: InstanceKey) -> InstanceStatus | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT status FROM instances WHERE run_id = ? AND round = ? AND purpose = ?",
                (key.run_id, key.round, key.purpose),
            ).fetchone()
        return None if row is None else InstanceStatus(row[0])
