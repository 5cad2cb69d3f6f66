"""Aggregation rules over client updates, behind one interface.

An aggregator maps ``n`` update vectors (rows of an ``(n, d)`` array) and their
non-negative weights to one ``d``-vector. Rules are pure and vectorized; each
checks its own preconditions and raises :class:`AggregationError`, never clamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedguard.core.errors import FedguardError


class AggregationError(FedguardError):
    """An aggregation rule's precondition does not hold for this round's inputs."""


class Aggregator(Protocol):
    """``aggregate(updates (n, d), weights (n,)) -> (d,)``."""

    @property
    def name(self) -> str: ...

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray: ...


def check_inputs(updates: np.ndarray, weights: np.ndarray) -> None:
    """Shared input checks: a non-empty finite 2-D matrix and matching finite weights ≥ 0."""
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise AggregationError(f"need a non-empty (n, d) matrix of updates, got {updates.shape}")
    if weights.shape != (updates.shape[0],):
        raise AggregationError(
            f"need one weight per update: {updates.shape[0]} updates, weights {weights.shape}"
        )
    if not np.isfinite(updates).all():
        raise AggregationError("updates hold NaN or Inf; reject them before aggregation")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise AggregationError("weights must be finite and >= 0")


@dataclass(frozen=True)
class WeightedMean:
    """FedAvg (McMahan et al., AISTATS 2017): the example-weighted mean."""

    @property
    def name(self) -> str:
        return "weighted-mean"

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        total = float(weights.sum())
        if total <= 0:
            raise AggregationError("weights sum to zero: no update carries any examples")
        return np.asarray((weights / total) @ updates, dtype=np.float64)
