"""Charge at release: the silo pays for what leaves it, right before it leaves.

The privacy cost of a DP-SGD round or a noised statistic is incurred when
something derived from the silo's records is released: a plain ``train`` reply,
a plain statistic reply, or, under secure aggregation, the masked input (the
only SecAgg message that depends on the records; the key adverts and shares do
not). So the silo:

1. checks its budget can pay (:meth:`PrivacyLedger.check_affordable`) before it
   trains or computes anything;
2. computes, and keeps what it will send (the outbox, the release store, or the
   SecAgg state) as a :class:`PendingCharge`;
3. right before the release, commits the charge durably
   (:func:`charge_release`: the ledger, then the silo log's ``charged`` record),
   and only then lets the message go.

A SecAgg round that aborts before the masked input costs nothing, and the
ledger and the log show no charge for it. Crash safety: nothing leaves before
its charge is committed; a charge found already committed for the same (run,
round, purpose) and the same event (the process died between the charge and
the reply, or a redelivered message) pays for this release, never a second
charge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedguard.client.ledger_guard import ledger_resets, open_silo_ledger, record_charge
from fedguard.client.silo import SiloSettings
from fedguard.core.errors import LedgerError
from fedguard.privacy.events import DpSgdRound, GaussianRelease, event_from_json
from fedguard.privacy.ledger import ChargePurpose, ChargeStatus, LedgerEntry, LedgerEvent

__all__ = ["SPEND_METRICS", "PendingCharge", "charge_release", "spend_metrics"]

#: The reply metrics :func:`spend_metrics` writes (present only once a charge paid).
SPEND_METRICS = ("epsilon-spent", "ledger-resets", "epsilon-archived")


@dataclass(frozen=True)
class PendingCharge:
    """What a computed, not yet released, update or statistic will cost."""

    run_id: str
    round: int
    purpose: ChargePurpose
    event: LedgerEvent

    def to_text(self) -> str:
        return json.dumps(
            {
                "run_id": self.run_id,
                "round": self.round,
                "purpose": self.purpose.value,
                "event": self.event.to_json(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_text(cls, text: str) -> PendingCharge:
        try:
            data: dict[str, Any] = json.loads(text)
            purpose = ChargePurpose(data["purpose"])
            event = event_from_json(data["event"])
            run_id, round_ = str(data["run_id"]), int(data["round"])
        except (ValueError, KeyError, TypeError) as bad:
            raise LedgerError(f"a kept pending charge is unreadable: {bad}") from None
        if not isinstance(event, (DpSgdRound, GaussianRelease)) or not isinstance(
            event, purpose.event_type
        ):
            raise LedgerError(f"a kept pending {purpose.value} charge holds {event!r}")
        return cls(run_id, round_, purpose, event)


def charge_release(settings: SiloSettings, pending: PendingCharge) -> LedgerEntry:
    """Durably charge ``pending`` (ledger, then silo log) right before its release.

    Raises ``BudgetExhaustedError`` (nothing charged, nothing may be released) or
    a ``LedgerError``; the caller releases only after this returns.
    """
    with open_silo_ledger(settings) as ledger:
        entry = ledger.find(pending.run_id, pending.round, pending.purpose)
        if entry is None:
            entry = ledger.charge(pending.run_id, pending.round, pending.event, pending.purpose)
            record_charge(settings, ledger, entry)
        elif entry.event != pending.event:
            raise LedgerError(
                f"{pending.purpose.value} {pending.round} of run {pending.run_id!r} was "
                f"charged as {entry.event}, now released as {pending.event}: refusing a "
                "second release"
            )
        if entry.status is ChargeStatus.CHARGED:
            ledger.mark(entry.entry_id, ChargeStatus.COMPLETED)
    return entry


def spend_metrics(settings: SiloSettings, entry: LedgerEntry) -> dict[str, float]:
    """What a reply says about the silo's spend once ``entry`` paid for it.

    ``epsilon-spent``: the ledger's total after the charge; ``ledger-resets`` and
    ``epsilon-archived``: the explicit resets in the silo log and the ε of the
    ledgers they archived (0 and 0.0 for a silo never reset), so the consortium's
    audit log shows a fresh start (docs/threat-model.md §3.1).
    """
    resets = ledger_resets(Path(settings.state_dir))
    return {
        "epsilon-spent": entry.epsilon_after,
        "ledger-resets": float(resets.count),
        "epsilon-archived": resets.archived_epsilon,
    }
