"""What a round did: each silo's outcome and the round's record (history.json rows)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedguard.server.secure_metrics import EvaluationSummary

__all__ = ["NodeOutcome", "RoundRecord"]


@dataclass(frozen=True)
class NodeOutcome:
    """What one silo did in one round; ``reason`` says why when it is not ``ok``."""

    node_id: int
    silo_id: str
    status: str  # ok | refused | error | rejected | no-reply
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRecord:
    round: int
    seconds: float
    sampled: int
    outcomes: list[NodeOutcome]
    aggregation: dict[str, Any]
    evaluation: EvaluationSummary
    silo_epsilon: dict[str, float]
    central_epsilon: float | None

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
