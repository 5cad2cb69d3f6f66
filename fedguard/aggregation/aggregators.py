"""Aggregation rules over client updates, behind one interface.

An aggregator maps ``n`` update vectors (rows of an ``(n, d)`` array) and their
non-negative weights to one ``d``-vector. Rules are pure and vectorized; each
checks its own preconditions and raises :class:`AggregationError`, never clamps.

Every rule states three things besides ``aggregate``:

- ``name``: a short label for logs (``"krum"``, ``"nnm+krum"``);
- ``min_inputs``: the smallest ``n`` for which the rule's precondition holds with
  its declared number ``f`` of Byzantine inputs (``2f + 3`` for Krum); callers that
  form groups use it to refuse a configuration before any round runs;
- ``uses_weights``: whether the example weights change the output. Rules that
  ignore them say so; a rule that uses them trusts them, so a silo that lies about
  its example count can tilt a weighted rule within that rule's own bound.

The robust rules live in :mod:`fedguard.aggregation.robust` (their numpy kernels in
:mod:`fedguard.aggregation.kernels`), the pre-aggregation steps (bucketing,
nearest-neighbour mixing) and their composition with a rule in
:mod:`fedguard.aggregation.preaggregation`, and the typed configuration and
``build_aggregator`` in :mod:`fedguard.aggregation.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedguard.core.aggregation_config import AggregatorName
from fedguard.core.checks import positive_int
from fedguard.core.errors import ConfigError, FedguardError


class AggregationError(FedguardError):
    """An aggregation rule cannot run on this round's inputs (bad shape, NaN, precondition)."""


class PreconditionError(AggregationError):
    """The round's inputs break a rule's precondition, e.g. too few inputs for the declared f.

    ``rule`` names the rule, ``condition`` the inequality that failed (``"n >= 2f + 3"``),
    and ``n`` / ``f`` the numbers it failed with.
    """

    def __init__(self, rule: str, condition: str, n: int, f: int, detail: str = "") -> None:
        message = f"{rule} needs {condition}; got n = {n}, f = {f}"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.rule = rule
        self.condition = condition
        self.n = n
        self.f = f


class RuleParameterError(AggregationError, ConfigError):
    """A rule was built with a parameter out of its range (it is also a ``ConfigError``)."""


class Aggregator(Protocol):
    """``aggregate(updates (n, d), weights (n,)) -> (d,)``."""

    @property
    def name(self) -> str: ...

    @property
    def min_inputs(self) -> int: ...

    @property
    def uses_weights(self) -> bool: ...

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray: ...


def check_inputs(updates: np.ndarray, weights: np.ndarray) -> None:
    """Shared input checks: a non-empty finite 2-D matrix and matching finite weights ≥ 0."""
    if updates.ndim != 2 or updates.shape[0] == 0 or updates.shape[1] == 0:
        raise AggregationError(f"need a non-empty (n, d) matrix of updates, got {updates.shape}")
    if weights.shape != (updates.shape[0],):
        raise AggregationError(
            f"need one weight per update: {updates.shape[0]} updates, weights {weights.shape}"
        )
    # A finite total implies finite entries (NaN and Inf propagate through a sum);
    # only when the total is not finite (or overflowed) is the exact check needed.
    with np.errstate(over="ignore", invalid="ignore"):
        total = updates.sum()
    if not np.isfinite(total) and not np.isfinite(updates).all():
        raise AggregationError("updates hold NaN or Inf; reject them before aggregation")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise AggregationError("weights must be finite and >= 0")


def check_byzantine(rule: str, f: int) -> None:
    """The declared number of Byzantine inputs must be an integer ≥ 0."""
    positive_int(f"{rule}: f (Byzantine inputs)", f, allow_zero=True, error=RuleParameterError)


def require_inputs(rule: str, n: int, f: int, minimum: int, condition: str) -> None:
    """Raise :class:`PreconditionError` unless ``n >= minimum``."""
    if n < minimum:
        raise PreconditionError(rule, f"{condition} = {minimum} inputs", n, f)


def finite_output(rule: str, result: np.ndarray) -> np.ndarray:
    """Refuse an aggregate that overflowed to Inf (finite inputs near the float limit)."""
    if not np.isfinite(result).all():
        raise AggregationError(f"{rule}: the aggregate overflowed; inputs are too large to combine")
    return result


@dataclass(frozen=True)
class WeightedMean:
    """FedAvg (McMahan et al., AISTATS 2017): the example-weighted mean.

    Uses the weights. No robustness: one input moves the output without bound.
    """

    @property
    def name(self) -> str:
        return AggregatorName.WEIGHTED_MEAN.value

    @property
    def min_inputs(self) -> int:
        return 1

    @property
    def uses_weights(self) -> bool:
        return True

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        total = float(weights.sum())
        if total <= 0:
            raise AggregationError("weights sum to zero: no update carries any examples")
        return finite_output(self.name, np.asarray((weights / total) @ updates, dtype=np.float64))
