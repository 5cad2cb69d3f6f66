"""The silo's ledger, cross-checked against its own signed silo log before any charge.

Why: the ledger is one SQLite file; deleting it, or restoring an older copy,
would hand the silo a fresh budget. The silo log (``silo-log.jsonl``, chained and
signed with the node key, in the same state folder) records the ledger's ε after
every reply the silo sent. A ledger whose spend is below the largest ε the log
records (or that is missing while the log records a spend) has lost charges:
the silo refuses to train or release anything until an operator restores the
right ledger (:class:`LedgerIntegrityError`, before anything is charged).

Not covered: deleting the ledger *and* the silo log together; only an outside
anchor (the server's audit log of each silo's ε) would show that.
"""

from __future__ import annotations

from pathlib import Path

from fedguard.client.silo import SiloSettings
from fedguard.core.chained_log import SILO_LOG_NAME, read_records
from fedguard.core.errors import FedguardError, LedgerError
from fedguard.privacy.ledger import PrivacyLedger

__all__ = ["LedgerIntegrityError", "logged_epsilon", "open_silo_ledger"]

#: Float slack between the ε the ledger computes and the one the log copied.
_TOLERANCE = 1e-9


class LedgerIntegrityError(LedgerError):
    """The ledger holds less than the silo's own log says was spent (lost or rolled back)."""


def logged_epsilon(state_dir: Path) -> float:
    """The largest ε the silo log records after a reply (0 without a log)."""
    path = Path(state_dir) / SILO_LOG_NAME
    if not path.exists() and not path.is_symlink():
        return 0.0
    try:
        records = read_records(path)
    except (FedguardError, OSError) as unreadable:
        raise LedgerIntegrityError(
            f"the silo log {path} cannot be read ({unreadable}); the ledger cannot be "
            "checked against it, so nothing is charged"
        ) from None
    spent = [
        float(r.payload["epsilon"])
        for r in records
        if isinstance(r.payload.get("epsilon"), (int, float))
    ]
    return max(spent, default=0.0)


def open_silo_ledger(settings: SiloSettings) -> PrivacyLedger:
    """Open the silo's ledger after checking it holds every spend its log records."""
    state_dir = Path(settings.state_dir)
    logged = logged_epsilon(state_dir)
    ledger_path = state_dir / PrivacyLedger.FILENAME
    if logged > 0 and not ledger_path.exists():
        raise LedgerIntegrityError(
            f"silo {settings.silo_id}: its signed log records ε={logged:.6g} spent, but the "
            f"privacy ledger {ledger_path} is missing; a new ledger would restart the budget. "
            "Restore the ledger file; nothing was charged or trained"
        )
    ledger = PrivacyLedger.open(state_dir, settings.silo_id, settings.budget)
    try:
        spent = ledger.spent_epsilon()
    except BaseException:
        ledger.close()
        raise
    if spent + _TOLERANCE < logged:
        ledger.close()
        raise LedgerIntegrityError(
            f"silo {settings.silo_id}: its signed log records ε={logged:.6g} spent, but the "
            f"ledger {ledger_path} holds only ε={spent:.6g}: charges were lost or an older "
            "copy was restored. Restore the current ledger; nothing was charged or trained"
        )
    return ledger
