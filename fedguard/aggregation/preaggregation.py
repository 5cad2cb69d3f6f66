"""Pre-aggregation steps and their composition with a rule.

A pre-aggregation step maps ``n`` inputs (and weights) to ``n'`` new inputs before
a robust rule runs; it makes classic rules robust under heterogeneous (non-IID)
honest data. Steps compose with a rule by holding it, never by subclassing:
``Composed((NearestNeighborMixing(f), Bucketing(2, rng)), Krum(f))`` is itself an
:class:`~fedguard.aggregation.aggregators.Aggregator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedguard.aggregation.aggregators import (
    Aggregator,
    PreconditionError,
    RuleParameterError,
    check_byzantine,
    check_inputs,
    require_inputs,
)
from fedguard.aggregation.kernels import (
    GRAM_TOLERANCE,
    content_tiebreak,
    distances_and_norms,
    mix_rows,
    order_by,
)
from fedguard.core.aggregation_config import PreAggregationName
from fedguard.core.checks import positive_int


class PreAggregator(Protocol):
    """``transform(updates (n, d), weights (n,)) -> (updates (n', d), weights (n',))``."""

    @property
    def name(self) -> str: ...

    @property
    def uses_weights(self) -> bool: ...

    def min_inputs_for(self, outputs: int) -> int:
        """The smallest ``n`` that meets this step's precondition and yields ``>= outputs`` rows."""
        ...

    def transform(
        self, updates: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Bucketing:
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022), bucket size ``s``.

    Shuffles the inputs with ``rng`` (a seeded ``numpy.random.Generator``: each call
    draws a fresh permutation, so a run is reproducible from its seed) and
    replaces each run of ``s`` consecutive shuffled inputs by their mean; the last
    bucket holds the ``n mod s`` left over, as in byzfl. ``⌈n/s⌉`` buckets come
    out; with ``f`` Byzantine inputs at most ``f`` buckets are touched, so the rule
    after it keeps its ``f`` and must meet its precondition over ``⌈n/s⌉`` inputs.

    Weights: a bucket's mean is weighted by its members' example weights (the plain
    mean when they sum to zero) and the bucket carries their sum, so bucketing
    followed by the weighted mean is the weighted mean. With equal weights this is
    the paper's plain bucket mean.
    """

    bucket_size: int
    rng: np.random.Generator

    def __post_init__(self) -> None:
        positive_int("bucketing: bucket size s", self.bucket_size, error=RuleParameterError)
        if not isinstance(self.rng, np.random.Generator):
            raise RuleParameterError(
                f"bucketing: rng must be a numpy.random.Generator, got {type(self.rng).__name__}"
            )

    @property
    def name(self) -> str:
        return PreAggregationName.BUCKETING.value

    @property
    def uses_weights(self) -> bool:
        return True

    def min_inputs_for(self, outputs: int) -> int:
        return (max(outputs, 1) - 1) * self.bucket_size + 1

    def buckets(self, n: int) -> list[np.ndarray]:
        """Draw a permutation and cut it into buckets of ``s`` input indices."""
        order = self.rng.permutation(n)
        return [order[i : i + self.bucket_size] for i in range(0, n, self.bucket_size)]

    def transform(self, updates: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return bucket_means(updates, weights, self.buckets(updates.shape[0]))


def bucket_means(
    updates: np.ndarray, weights: np.ndarray, buckets: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and total weight of each bucket of row indices (one matrix product)."""
    mixing = np.zeros((len(buckets), updates.shape[0]))
    totals = np.zeros(len(buckets))
    for b, members in enumerate(buckets):
        total = float(weights[members].sum())
        totals[b] = total
        mixing[b, members] = weights[members] / total if total > 0 else 1.0 / len(members)
    return mix_rows(mixing, updates), totals


@dataclass(frozen=True)
class NearestNeighborMixing:
    """Nearest-neighbour mixing, NNM (Allouah et al., AISTATS 2023). Needs ``n ≥ 2f + 1``.

    Replaces every input by the plain mean of its ``n − f`` nearest inputs (itself
    included; distances by the Gram identity, ties ranked by
    :func:`~fedguard.aggregation.kernels.order_by`). Ignores the
    weights for the mixing and passes them through unchanged to the rule.
    """

    f: int = 0

    def __post_init__(self) -> None:
        check_byzantine(self.name, self.f)

    @property
    def name(self) -> str:
        return PreAggregationName.NNM.value

    @property
    def uses_weights(self) -> bool:
        return False

    def min_inputs_for(self, outputs: int) -> int:
        return max(outputs, 2 * self.f + 1)

    def neighbours(self, updates: np.ndarray) -> np.ndarray:
        """``(n, n − f)`` indices of each input's nearest inputs, nearest first."""
        n = updates.shape[0]
        distances, norms = distances_and_norms(updates)
        tiebreak = content_tiebreak(updates)
        return np.stack(
            [
                order_by(row, tiebreak, GRAM_TOLERANCE * (norms[i] + norms), n - self.f)[
                    : n - self.f
                ]
                for i, row in enumerate(distances)
            ]
        )

    def transform(self, updates: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = updates.shape[0]
        require_inputs(self.name, n, self.f, 2 * self.f + 1, "n >= 2f + 1")
        mixing = np.zeros((n, n))
        np.put_along_axis(mixing, self.neighbours(updates), 1.0 / (n - self.f), axis=1)
        return mix_rows(mixing, updates), weights.copy()


@dataclass(frozen=True)
class Composed:
    """Pre-aggregation steps, in order, then a rule. An aggregator itself."""

    steps: tuple[PreAggregator, ...]
    rule: Aggregator

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple):
            raise RuleParameterError(f"steps must be a tuple, got {type(self.steps).__name__}")

    @property
    def name(self) -> str:
        return "+".join([*(step.name for step in self.steps), self.rule.name])

    @property
    def min_inputs(self) -> int:
        needed = self.rule.min_inputs
        for step in reversed(self.steps):
            needed = step.min_inputs_for(needed)
        return needed

    @property
    def uses_weights(self) -> bool:
        return self.rule.uses_weights or any(step.uses_weights for step in self.steps)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        n = updates.shape[0]
        trail = []
        for step in self.steps:
            before = updates.shape[0]
            updates, weights = step.transform(updates, weights)
            trail.append(f"{step.name} turned {before} inputs into {updates.shape[0]}")
        try:
            return self.rule.aggregate(updates, weights)
        except PreconditionError as failed:
            raise PreconditionError(
                self.name,
                f"n >= {self.min_inputs} inputs",
                n,
                failed.f,
                f"{'; '.join(trail)}, and {failed}",
            ) from failed
