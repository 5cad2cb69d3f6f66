"""The aggregation pipeline: one place where updates become the next global model.

Steps plug in by composition (no strategy subclass chains): central DP, when on,
replaces the aggregator's weighted mean by the DP-FedAvg release (uniform weights,
fixed denominator: example weights would let one silo's size move the
sensitivity); otherwise the configured :class:`Aggregator` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
class GroupSum:
    """One secure group's decoded sum Σ w_i Δ_i, its total weight Σ w_i, its members."""

    members: tuple[str, ...]
    weighted_sum: np.ndarray
    total_weight: float


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
        byzantine_f: int = 0,
        rule_for_f: Callable[[int], Aggregator] | None = None,
    ) -> None:
        """``byzantine_f`` is the rule's declared f; ``rule_for_f(f')`` builds the same rule
        for a smaller f' (used when flagged groups are provably Byzantine, see
        :meth:`apply_groups`); without it the rule always runs with its own f."""
        self.aggregator: Aggregator = aggregator or WeightedMean()
        self.central_dp = central_dp or CentralDPConfig()
        self._noise = noise
        self.byzantine_f = byzantine_f
        self.rule_for_f = rule_for_f

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

    def apply_groups(
        self,
        global_vector: np.ndarray,
        groups: Sequence[GroupSum],
        norm_bound: float = 0.0,
        norm_tolerance: float = 0.0,
    ) -> AggregationOutcome:
        """The next global model from secure group sums: the robust rule over group means.

        With ``norm_bound`` > 0 every honest silo clipped its Δ to that L2 norm before
        masking, so each group mean (a convex combination) has norm at most the bound
        plus the fixed-point rounding ``norm_tolerance``. A group above it holds a
        silo that did not clip: it is flagged and left out, named in the details.
        The rule then runs over the remaining group means, its precondition checked
        against their number (a failure raises
        :class:`~fedguard.strategies.aggregators.PreconditionError`).
        """
        dim = global_vector.shape[0]
        means: list[np.ndarray] = []
        weights: list[float] = []
        kept: list[int] = []
        flagged: list[dict[str, Any]] = []
        for index, group in enumerate(groups):
            if group.weighted_sum.shape != (dim,):
                raise AggregationError(
                    f"group {index} sum has shape {group.weighted_sum.shape}, expected ({dim},)"
                )
            if group.total_weight <= 0:
                flagged.append({"group": index, "reason": "zero total weight"})
                continue
            mean = group.weighted_sum.astype(np.float64) / float(group.total_weight)
            norm = float(np.linalg.norm(mean))
            if not np.isfinite(norm):
                flagged.append({"group": index, "reason": "non-finite mean"})
                continue
            if norm_bound > 0 and norm > norm_bound + norm_tolerance:
                flagged.append(
                    {
                        "group": index,
                        "members": list(group.members),
                        "norm": norm,
                        "bound": norm_bound,
                        "reason": f"mean norm {norm:.4g} > bound {norm_bound:g}",
                    }
                )
                continue
            means.append(mean)
            weights.append(float(group.total_weight))
            kept.append(index)
        details: dict[str, Any] = {
            "rule": f"secure-groups+{self.aggregator.name}",
            "groups-used": kept,
            "flagged-groups": flagged,
        }
        if not means:
            return AggregationOutcome(global_vector.copy(), {**details, "rule": "none: no group"})
        rule = self.aggregator
        caught = sum(1 for flag in flagged if "norm" in flag)
        if caught and self.byzantine_f > 0 and self.rule_for_f is not None:
            # Honest silos always clip, so a group over the bound holds a Byzantine silo:
            # if at most f groups are corrupted, the k flagged ones leave at most f - k
            # among the rest (a bound derived from the evidence, not a clamp).
            remaining_f = max(self.byzantine_f - caught, 0)
            rule = self.rule_for_f(remaining_f)
            details["f-after-flags"] = remaining_f
        update = rule.aggregate(np.stack(means), np.asarray(weights))
        return AggregationOutcome(global_vector + update, details)
