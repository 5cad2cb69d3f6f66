"""The aggregation pipeline: one place where updates become the next global model.

Steps plug in by composition (no strategy subclass chains): central DP, when on,
replaces the aggregator's weighted mean by the DP-FedAvg release (uniform weights,
fixed denominator: example weights would let one silo's size move the
sensitivity); otherwise the configured :class:`Aggregator` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedguard.core.config import CentralDPConfig
from fedguard.privacy.central import dp_fedavg_release
from fedguard.privacy.noise import CsprngGaussian
from fedguard.strategies.aggregators import AggregationError, Aggregator, WeightedMean


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted update: the model delta (new - global) of one silo."""

    node_id: int
    silo_id: str
    delta: np.ndarray
    num_examples: int


@dataclass(frozen=True)
class AggregationOutcome:
    new_global: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)


class AggregationPipeline:
    def __init__(
        self,
        aggregator: Aggregator | None = None,
        central_dp: CentralDPConfig | None = None,
        noise: CsprngGaussian | None = None,
    ) -> None:
        self.aggregator: Aggregator = aggregator or WeightedMean()
        self.central_dp = central_dp or CentralDPConfig()
        self._noise = noise

    def apply(
        self, global_vector: np.ndarray, updates: Sequence[ClientUpdate], population: int
    ) -> AggregationOutcome:
        """The next global model from this round's accepted updates."""
        dim = global_vector.shape[0]
        for update in updates:
            if update.delta.shape != (dim,):
                raise AggregationError(
                    f"update of silo {update.silo_id} has shape {update.delta.shape}, "
                    f"expected ({dim},)"
                )
        deltas = (
            np.stack([u.delta for u in updates]).astype(np.float64)
            if updates
            else np.zeros((0, dim))
        )
        if self.central_dp.enabled:
            if self._noise is None:
                self._noise = CsprngGaussian()
            release = dp_fedavg_release(deltas, self.central_dp, population, self._noise)
            return AggregationOutcome(
                global_vector + release.mean_update,
                {
                    "rule": "dp-fedavg",
                    "clipped": int(release.clipped.sum()),
                    "noise-std": release.noise_std,
                    "denominator": release.denominator,
                },
            )
        if not updates:
            return AggregationOutcome(global_vector.copy(), {"rule": "none: no accepted update"})
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        mean = self.aggregator.aggregate(deltas, weights)
        return AggregationOutcome(global_vector + mean, {"rule": self.aggregator.name})
