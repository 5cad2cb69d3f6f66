"""The aggregation pipeline: one place where a round's inputs become the next global model.

A round gives the pipeline one input (:data:`AggregationInputs`): the silos' own
updates (:class:`ClientUpdates`), one secure sum over the cohort (:class:`SecureSum`)
or one secure sum per group (:class:`GroupSums`). :meth:`AggregationPipeline.apply`
is the one entry: it looks the input kind, the rule and the central DP setting up in
:data:`~fedguard.aggregation.combinations.COMBINATIONS` (an illegal combination
raises :class:`~fedguard.aggregation.combinations.UnsupportedCombinationError`) and
computes what that table says.

Steps plug in by composition (no strategy subclass chains): central DP, when on,
replaces the aggregator's weighted mean by the DP-FedAvg release of
:mod:`fedguard.privacy.central` (uniform weights, fixed denominator: example weights
would let one silo's size move the sensitivity); otherwise the configured
:class:`Aggregator` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, assert_never, overload

import numpy as np

from fedguard.aggregation.aggregators import AggregationError, Aggregator, WeightedMean
from fedguard.aggregation.combinations import (
    InputKind,
    Release,
    check_combination,
    rule_kind,
)
from fedguard.core.aggregation_config import AggregatorName
from fedguard.core.config import CentralDPConfig
from fedguard.privacy.central import (
    dp_fedavg_release,
    dp_fedavg_release_from_sum,
)
from fedguard.privacy.noise import CsprngGaussian

__all__ = [
    "SECAGG_LABEL",
    "SECURE_GROUPS_LABEL",
    "AggregationInputs",
    "AggregationOutcome",
    "AggregationPipeline",
    "ClientUpdate",
    "ClientUpdates",
    "GroupSum",
    "GroupSums",
    "SecureSum",
]

#: The round record's ``rule`` prefix (and whole label, on an abort) of a secure sum.
SECAGG_LABEL = "secagg"
#: The round record's ``rule`` prefix of the rule over secure group means.
SECURE_GROUPS_LABEL = "secure-groups"


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
class ClientUpdates:
    """The round's accepted updates, each checked by the server; ``population`` is N."""

    kind: ClassVar[InputKind] = InputKind.CLIENT_UPDATES
    global_vector: np.ndarray
    updates: tuple[ClientUpdate, ...]
    population: int


@dataclass(frozen=True)
class SecureSum:
    """One SecAgg+ sum Σ w_i Δ_i over the cohort and Σ w_i; ``population`` is N.

    With central DP the silos clipped their Δ and weighed 1 each.
    """

    kind: ClassVar[InputKind] = InputKind.SECURE_SUM
    global_vector: np.ndarray
    weighted_sum: np.ndarray
    total_weight: float
    population: int


@dataclass(frozen=True)
class GroupSums:
    """One SecAgg+ sum per group; silos clipped Δ to ``norm_bound`` when it is > 0.

    ``norm_tolerance`` is the fixed-point rounding a group mean may add to the bound.
    """

    kind: ClassVar[InputKind] = InputKind.GROUP_SUMS
    global_vector: np.ndarray
    groups: tuple[GroupSum, ...]
    norm_bound: float = 0.0
    norm_tolerance: float = 0.0


#: One round's input to :meth:`AggregationPipeline.apply`.
AggregationInputs = ClientUpdates | SecureSum | GroupSums


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
        :meth:`_group_rule`); without it the rule always runs with its own f."""
        self.aggregator: Aggregator = aggregator or WeightedMean()
        self.central_dp = central_dp or CentralDPConfig()
        self._noise = noise
        self.byzantine_f = byzantine_f
        self.rule_for_f = rule_for_f

    @overload
    def apply(self, inputs: AggregationInputs) -> AggregationOutcome: ...

    @overload
    def apply(
        self, inputs: np.ndarray, updates: Sequence[ClientUpdate], population: int
    ) -> AggregationOutcome: ...

    def apply(
        self,
        inputs: AggregationInputs | np.ndarray,
        updates: Sequence[ClientUpdate] | None = None,
        population: int | None = None,
    ) -> AggregationOutcome:
        """The next global model from this round's input.

        ``apply(global_vector, updates, population)`` is short for
        ``apply(ClientUpdates(global_vector, tuple(updates), population))``.
        """
        if isinstance(inputs, np.ndarray):
            if updates is None or population is None:
                raise TypeError("apply(global_vector, updates, population) needs all three")
            inputs = ClientUpdates(inputs, tuple(updates), population)
        release = check_combination(
            inputs.kind, rule_kind(self.aggregator), self.central_dp.enabled, self.aggregator.name
        )
        match inputs:
            case ClientUpdates():
                return self._client_updates(inputs, release)
            case SecureSum():
                return self._secure_sum(inputs, release)
            case GroupSums():
                return self._group_rule(inputs)
            case _:
                assert_never(inputs)

    def apply_groups(
        self,
        global_vector: np.ndarray,
        groups: Sequence[GroupSum],
        norm_bound: float = 0.0,
        norm_tolerance: float = 0.0,
    ) -> AggregationOutcome:
        """Short for ``apply(GroupSums(global_vector, groups, norm_bound, norm_tolerance))``."""
        return self.apply(GroupSums(global_vector, tuple(groups), norm_bound, norm_tolerance))

    def _noise_source(self) -> CsprngGaussian:
        """Central DP's noise sampler, made on first use (the OS CSPRNG keys it)."""
        if self._noise is None:
            self._noise = CsprngGaussian()
        return self._noise

    def _client_updates(self, inputs: ClientUpdates, release: Release) -> AggregationOutcome:
        """The configured rule, or with central DP the DP-FedAvg release, over the updates."""
        global_vector, updates = inputs.global_vector, inputs.updates
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
        if release is Release.DP_FEDAVG:
            dp = dp_fedavg_release(deltas, self.central_dp, inputs.population, self._noise_source())
            return AggregationOutcome(
                global_vector + dp.mean_update,
                {
                    "rule": Release.DP_FEDAVG.value,
                    "clipped": int(dp.clipped.sum()),
                    "noise-std": dp.noise_std,
                    "denominator": dp.denominator,
                },
            )
        if not updates:
            return AggregationOutcome(global_vector.copy(), {"rule": "none: no accepted update"})
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        mean = self.aggregator.aggregate(deltas, weights)
        return AggregationOutcome(global_vector + mean, {"rule": self.aggregator.name})

    def _secure_sum(self, inputs: SecureSum, release: Release) -> AggregationOutcome:
        """The next global model from a securely aggregated sum Σ w_i Δ_i and Σ w_i.

        Only a (weighted) mean can be computed from a sum: a robust rule needs the
        individual inputs, so the combinations table refuses it (robust rules run
        over group sums). With central DP the server adds the Gaussian noise to the
        unmasked sum, so the guarantee protects the released model, not the sum the
        server itself saw.
        """
        global_vector, weighted_sum = inputs.global_vector, inputs.weighted_sum
        dim = global_vector.shape[0]
        if weighted_sum.shape != (dim,):
            raise AggregationError(
                f"aggregated sum has shape {weighted_sum.shape}, expected ({dim},)"
            )
        if release is Release.SECURE_DP_FEDAVG:
            dp = dp_fedavg_release_from_sum(
                weighted_sum, self.central_dp, inputs.population, self._noise_source()
            )
            return AggregationOutcome(
                global_vector + dp.mean_update,
                {
                    "rule": f"{SECAGG_LABEL}+{Release.DP_FEDAVG.value}",
                    "noise-std": dp.noise_std,
                    "denominator": dp.denominator,
                },
            )
        total_weight = inputs.total_weight
        if total_weight <= 0:
            return AggregationOutcome(global_vector.copy(), {"rule": "none: zero total weight"})
        return AggregationOutcome(
            global_vector + weighted_sum / float(total_weight),
            {
                "rule": f"{SECAGG_LABEL}+{AggregatorName.WEIGHTED_MEAN.value}",
                "total-weight": float(total_weight),
            },
        )

    def _group_rule(self, inputs: GroupSums) -> AggregationOutcome:
        """The next global model from secure group sums: the robust rule over group means.

        With ``norm_bound`` > 0 every honest silo clipped its Δ to that L2 norm before
        masking, so each group mean (a convex combination) has norm at most the bound
        plus the fixed-point rounding ``norm_tolerance``. A group above it holds a
        silo that did not clip: it is flagged and left out, named in the details.
        The rule then runs over the remaining group means, its precondition checked
        against their number (a failure raises
        :class:`~fedguard.aggregation.aggregators.PreconditionError`).
        """
        global_vector = inputs.global_vector
        means, weights, kept, flagged = _group_means(inputs)
        details: dict[str, Any] = {
            "rule": f"{SECURE_GROUPS_LABEL}+{self.aggregator.name}",
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


def _group_means(
    inputs: GroupSums,
) -> tuple[list[np.ndarray], list[float], list[int], list[dict[str, Any]]]:
    """Each usable group's mean and total weight, the indices kept, and the groups flagged."""
    dim = inputs.global_vector.shape[0]
    means: list[np.ndarray] = []
    weights: list[float] = []
    kept: list[int] = []
    flagged: list[dict[str, Any]] = []
    for index, group in enumerate(inputs.groups):
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
        if inputs.norm_bound > 0 and norm > inputs.norm_bound + inputs.norm_tolerance:
            flagged.append(
                {
                    "group": index,
                    "members": list(group.members),
                    "norm": norm,
                    "bound": inputs.norm_bound,
                    "reason": f"mean norm {norm:.4g} > bound {inputs.norm_bound:g}",
                }
            )
            continue
        means.append(mean)
        weights.append(float(group.total_weight))
        kept.append(index)
    return means, weights, kept, flagged
