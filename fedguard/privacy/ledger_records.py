"""The privacy ledger's value types: charges, their purposes and statuses, plans, heads.

:class:`LedgerEntry` is one stored charge, :class:`RoundPlan` the DP-SGD parameters
a silo fixed for a run, :class:`LedgerHead` where the ledger's hash chain of
charges stands, and :func:`chain_head` computes that chain from the stored rows.
The ledger itself is :class:`fedguard.privacy.ledger.PrivacyLedger`, which
re-exports all of these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

from fedguard.core.checks import positive, positive_int, rate
from fedguard.core.errors import ConfigError, LedgerError
from fedguard.privacy.events import DpSgdRound, GaussianRelease

__all__ = [
    "ChargePurpose",
    "ChargeStatus",
    "LedgerEntry",
    "LedgerEvent",
    "LedgerHead",
    "RoundPlan",
    "chain_head",
]


LedgerEvent: TypeAlias = DpSgdRound | GaussianRelease


class ChargePurpose(StrEnum):
    """What a charge paid for; each purpose has its own event type."""

    TRAINING = "training"  # a round of DP-SGD (DpSgdRound)
    FAIRNESS = "fairness"  # trust layer releases (GaussianRelease) from here on
    DRIFT = "drift"
    ATTRIBUTION = "attribution"
    FEATURE_MOMENTS = "feature-moments"  # the federated scaler's statistic
    EVALUATION = "evaluation"  # a noised evaluation (only where the silo's policy asks)

    @property
    def event_type(self) -> type[LedgerEvent]:
        return DpSgdRound if self is ChargePurpose.TRAINING else GaussianRelease


class ChargeStatus(StrEnum):
    CHARGED = "charged"  # committed right before the release
    COMPLETED = "completed"  # the release was handed over to be sent
    FAILED = "failed"  # (older ledgers) the round failed after its charge; still charged


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: int
    run_id: str
    round: int
    event: LedgerEvent
    epsilon_after: float  # the silo's total ε (at its budget's δ) once this round was charged
    status: ChargeStatus
    created_at: str  # ISO 8601, UTC
    purpose: ChargePurpose = ChargePurpose.TRAINING


@dataclass(frozen=True)
class LedgerHead:
    """Which ledger this is and where its hash chain of charges stands.

    ``heads[k]`` is the head after the first ``k`` charges (``heads[0]`` commits
    to the ledger id and silo id alone); the silo log records ``(ledger_id,
    entries, head)`` after every charge (:mod:`fedguard.client.ledger_guard`).
    """

    ledger_id: str
    heads: tuple[str, ...]

    @property
    def entries(self) -> int:
        return len(self.heads) - 1

    @property
    def head(self) -> str:
        return self.heads[-1]


@dataclass(frozen=True)
class RoundPlan:
    """The DP-SGD parameters a silo fixed for one run (σ is calibrated once per run)."""

    sample_rate: float
    noise_multiplier: float
    steps_per_round: int
    planned_rounds: int
    # False for a simulation research-mode run (seeded noise and sampling): its ε is
    # NOT a guarantee against the server, which knows the seeds.
    private_against_server: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.private_against_server, bool):
            raise ConfigError("plan private_against_server must be a bool")
        q = rate("plan sample_rate", self.sample_rate)
        z = positive("plan noise_multiplier", self.noise_multiplier)
        for name in ("steps_per_round", "planned_rounds"):
            positive_int(f"plan {name}", getattr(self, name))
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "noise_multiplier", z)

    def round_event(self) -> DpSgdRound:
        """What one round of this plan costs."""
        return DpSgdRound(self.sample_rate, self.noise_multiplier, self.steps_per_round)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps_per_round": self.steps_per_round,
            "planned_rounds": self.planned_rounds,
            "private_against_server": self.private_against_server,
        }

    @classmethod
    def from_json(cls, data: object) -> RoundPlan:
        keys = {"version", "sample_rate", "noise_multiplier", "steps_per_round", "planned_rounds"}
        # Plans written before research mode existed lack the flag: they were private.
        if (
            not isinstance(data, dict)
            or set(data) - {"private_against_server"} != keys
            or data["version"] != 1
            or not isinstance(data.get("private_against_server", True), bool)
        ):
            raise LedgerError(f"malformed or unknown-version round plan {data!r}")
        try:
            return cls(
                data["sample_rate"],
                data["noise_multiplier"],
                data["steps_per_round"],
                data["planned_rounds"],
                data.get("private_against_server", True),
            )
        except ConfigError as exc:
            raise LedgerError(f"invalid round plan {data!r}: {exc}") from exc


def chain_head(ledger_id: str, silo_id: str, rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """The ledger's head hash after 0, 1, ... len(rows) charges.

    ``rows`` are ``(entry_id, run_id, round, purpose, event_json, epsilon_after)``
    in entry order, as stored. A status change (charged -> completed) is not part
    of a charge's identity and does not move the head; anything else about a
    charge, its order, or the ledger it belongs to does.
    """
    head = hashlib.sha256(
        b"fedguard-ledger-head-v1\0" + ledger_id.encode() + b"\0" + silo_id.encode()
    ).hexdigest()
    heads = [head]
    for entry_id, run_id, round_, purpose, event_json, eps_after in rows:
        item = json.dumps(
            [
                int(entry_id),
                str(run_id),
                int(round_),
                str(purpose),
                str(event_json),
                float(eps_after),
            ],
            separators=(",", ":"),
        )
        head = hashlib.sha256(bytes.fromhex(head) + item.encode()).hexdigest()
        heads.append(head)
    return heads
