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

    def apply_sum(
        self,
        global_vector: np.ndarray,
        weighted_sum: np.ndarray,
        total_weight: float,
        population: int,
    ) -> AggregationOutcome:
        """The next global model from a securely aggregated sum Σ w_i Δ_i and Σ w_i.

        Only a (weighted) mean can be computed from a sum: a robust rule needs the
        individual inputs, so it is refused here (robust rules run over group sums).
        With central DP the silos clipped their Δ and weighed 1 each; the server adds
        the Gaussian noise to the unmasked sum, so the guarantee protects the released
        model, not the sum the server itself saw.
        """
        dim = global_vector.shape[0]
        if weighted_sum.shape != (dim,):
            raise AggregationError(
                f"aggregated sum has shape {weighted_sum.shape}, expected ({dim},)"
            )
        if self.central_dp.enabled:
            if self._noise is None:
                self._noise = CsprngGaussian()
            noise_std = self.central_dp.noise_multiplier * self.central_dp.clip_norm
            noise = self._noise.sample((dim,), std=noise_std).numpy().astype(np.float64)
            denominator = self.central_dp.client_sampling_rate * population
            return AggregationOutcome(
                global_vector + (weighted_sum + noise) / denominator,
                {"rule": "secagg+dp-fedavg", "noise-std": noise_std, "denominator": denominator},
            )
        if not isinstance(self.aggregator, WeightedMean):
            raise AggregationError(
                f"{self.aggregator.name} needs individual updates; over one secure sum only "
                "the weighted mean is possible (use robust rules over secure groups)"
            )
        if total_weight <= 0:
            return AggregationOutcome(global_vector.copy(), {"rule": "none: zero total weight"})
        return AggregationOutcome(
            global_vector + weighted_sum / float(total_weight),
            {"rule": "secagg+weighted-mean", "total-weight": float(total_weight)},
        )
