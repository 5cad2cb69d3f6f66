"""The statistic queries' contract: what the server asks a silo for, and the layouts.

The server builds a :class:`StatisticRequest`, the silo parses it once at its
boundary (``fedguard.client.statistic_release`` answers it); the vector layouts fix
the length both sides agree on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import Message

from fedguard.core.errors import ProtocolError
from fedguard.core.metrics import AUC_BINS
from fedguard.core.trust_config import TrustNoise
from fedguard.privacy.ledger import ChargePurpose

__all__ = [
    "EVALUATION_LOSS_BOUND",
    "REQUEST",
    "REQUEST_ARRAYS",
    "SCORE_BINS",
    "SECAGG_STATISTIC",
    "StatisticKind",
    "StatisticRequest",
    "evaluation_vector_length",
    "fairness_vector_length",
]

#: Message type of the first SecAgg+ stage of a statistic query (then ``train.secagg_*``).
SECAGG_STATISTIC = "query.secagg_statistic"
#: Records of a statistic query: the request's options and its arrays (bin edges).
REQUEST = "statistic"
REQUEST_ARRAYS = "statistic-arrays"
#: Score bins of the fairness audit's per-cohort histograms (AUC and calibration).
SCORE_BINS = 10
#: Per-example loss bound of an evaluation statistic (cross-entropy; a probability
#: below e^-50 on the true class is counted as e^-50).
EVALUATION_LOSS_BOUND = 50.0


class StatisticKind(StrEnum):
    """Which question a secure statistic answers; each is charged under its own purpose."""

    FAIRNESS = "fairness"
    DRIFT = "drift"
    ATTRIBUTION = "attribution"
    FEATURE_MOMENTS = "feature-moments"  # the federated scaler, before round 1
    EVALUATION = "evaluation"  # each round's evaluation under SecAgg (noise: silo policy)

    @property
    def purpose(self) -> ChargePurpose:
        return ChargePurpose(self.value)


@dataclass(frozen=True)
class StatisticRequest:
    """What the server asks for, parsed once at the silo's boundary."""

    kind: StatisticKind
    query_round: int  # identifies the release in the ledger with the run id and the kind
    target_epsilon: float
    noise: TrustNoise
    resolution: float  # public quantization unit of the encoded vector (a power of two)
    vector_length: int
    options: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.query_round < 0 or self.vector_length < 1:
            raise ProtocolError(
                f"bad query round {self.query_round} or length {self.vector_length}"
            )
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ProtocolError(f"target ε must be > 0, got {self.target_epsilon}")
        exponent = math.log2(self.resolution) if self.resolution > 0 else 0.5
        if not (math.isfinite(exponent) and exponent.is_integer()):
            raise ProtocolError(f"resolution must be a power of two, got {self.resolution}")

    def to_records(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(config values, arrays) of the request; list/scalar options and array options."""
        scalars = {k: v for k, v in self.options.items() if not isinstance(v, np.ndarray)}
        arrays = {k: v for k, v in self.options.items() if isinstance(v, np.ndarray)}
        config = {
            "kind": self.kind.value,
            "query-round": self.query_round,
            "target-epsilon": float(self.target_epsilon),
            "noise": self.noise.value,
            "resolution": float(self.resolution),
            "vector-length": self.vector_length,
            "options": json.dumps(scalars, sort_keys=True),
        }
        return config, arrays

    @classmethod
    def from_message(cls, message: Message) -> StatisticRequest:
        records = message.content.config_records
        if REQUEST not in records:
            raise ProtocolError("statistic query has no request record")
        r = records[REQUEST]
        try:
            options: dict[str, Any] = json.loads(str(r["options"]))
            if not isinstance(options, dict):
                raise ProtocolError("statistic options must be a JSON object")
            if REQUEST_ARRAYS in message.content.array_records:
                for k, v in message.content.array_records[REQUEST_ARRAYS].items():
                    options[k] = v.numpy()
            return cls(
                kind=StatisticKind(str(r["kind"])),
                query_round=int(r["query-round"]),  # type: ignore[arg-type]
                target_epsilon=float(r["target-epsilon"]),  # type: ignore[arg-type]
                noise=TrustNoise(str(r["noise"])),
                resolution=float(r["resolution"]),  # type: ignore[arg-type]
                vector_length=int(r["vector-length"]),  # type: ignore[arg-type]
                options=options,
            )
        except KeyError as missing:
            raise ProtocolError(f"statistic request lacks {missing}") from None
        except (TypeError, ValueError) as bad:
            raise ProtocolError(f"malformed statistic request: {bad}") from None


def fairness_vector_length(num_groups: int, score_bins: int = SCORE_BINS) -> int:
    """Layout ``[TP, FP, TN, FN (G each), positives, negatives, score sums (G·S each)]``."""
    return num_groups * (4 + 3 * score_bins)


def evaluation_vector_length(num_classes: int, score_bins: int = AUC_BINS) -> int:
    """Layout ``[n, correct, Σ loss / L, positives' score bins, negatives' score bins]``."""
    return 3 + (2 * score_bins if num_classes == 2 else 0)
