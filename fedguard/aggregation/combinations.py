"""Which round inputs, rules and central DP go together: declared once, here.

A training round hands the :class:`~fedguard.aggregation.pipeline.AggregationPipeline`
one of three kinds of input (:class:`InputKind`), fixed by the run's secure
aggregation settings (:func:`input_kind`):

- ``client-updates``: every sampled silo's own update (secure aggregation off);
- ``secure-sum``: one SecAgg+ sum over the whole cohort (``secagg.groups == 1``);
- ``group-sums``: one SecAgg+ sum per random group (``secagg.groups > 1``).

The rule matters only as a :class:`RuleKind`: the weighted mean, which a sum
already gives and which DP-FedAvg's release is (with noise, uniform weights and a
fixed denominator), or a robust rule, which needs several individual inputs.

:data:`COMBINATIONS` maps every (input kind, rule kind, central DP on) to what the
pipeline releases (:class:`Release`) or to why the combination is refused;
:func:`check_combination` reads it and raises :class:`UnsupportedCombinationError`
(a :class:`~fedguard.core.errors.ConfigError`). The run's rule is checked against
it before any silo trains (:func:`checked_rule`) and the pipeline checks every
round's input against it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from fedguard.aggregation.aggregators import Aggregator
from fedguard.aggregation.preaggregation import Composed
from fedguard.aggregation.registry import check_inputs_suffice
from fedguard.core.aggregation_config import AggregatorConfig, AggregatorName
from fedguard.core.config import RunConfig, SecureAggregationConfig
from fedguard.core.errors import ConfigError

__all__ = [
    "COMBINATIONS",
    "InputKind",
    "Refused",
    "Release",
    "RuleKind",
    "UnsupportedCombinationError",
    "check_combination",
    "checked_rule",
    "config_rule_kind",
    "input_kind",
    "inputs_per_round",
    "rule_kind",
]


class InputKind(StrEnum):
    """What one round gives the pipeline (see the module doc)."""

    CLIENT_UPDATES = "client-updates"
    SECURE_SUM = "secure-sum"
    GROUP_SUMS = "group-sums"


class RuleKind(StrEnum):
    """The weighted mean (alone or after pre-aggregation steps), or a robust rule."""

    MEAN = "mean"
    ROBUST = "robust"


class Release(StrEnum):
    """What the pipeline computes for a legal combination."""

    RULE = "rule"  # the configured rule over the individual updates
    DP_FEDAVG = "dp-fedavg"  # clip, sum, noise, fixed denominator (privacy.central)
    SECURE_MEAN = "secure-mean"  # the sum over its total weight
    SECURE_DP_FEDAVG = "secure-dp-fedavg"  # the silos clipped; noise on the unmasked sum
    GROUP_RULE = "group-rule"  # the rule over the group means, flagged groups left out


@dataclass(frozen=True)
class Refused:
    """An illegal combination; ``message`` has a ``{label}`` for the rule's label."""

    message: str


class UnsupportedCombinationError(ConfigError):
    """This input kind, rule and central DP setting do not go together (:data:`COMBINATIONS`)."""


_DP_MEAN_ONLY = Refused(
    "central DP's accounting covers the DP-FedAvg mean only; {label} would be replaced by "
    "it: use the weighted mean with central DP"
)
_SINGLE_SUM = Refused(
    "{label} needs several inputs, but secure aggregation over one group gives the server "
    "a single sum (a robust rule over it is a plain mean): set secagg groups > 1"
)
_GROUPS_WITH_DP = Refused("secure groups with central DP are not supported")

_U, _S, _G = InputKind.CLIENT_UPDATES, InputKind.SECURE_SUM, InputKind.GROUP_SUMS
_MEAN, _ROBUST = RuleKind.MEAN, RuleKind.ROBUST

#: (input kind, rule kind, central DP on) -> what is released, or why it is refused.
#: A robust rule with central DP is refused first whatever the input (its message
#: wins), as :class:`~fedguard.core.config.RunConfig` checks it first.
COMBINATIONS: Mapping[tuple[InputKind, RuleKind, bool], Release | Refused] = {
    (_U, _MEAN, False): Release.RULE,
    (_U, _ROBUST, False): Release.RULE,
    (_U, _MEAN, True): Release.DP_FEDAVG,
    (_U, _ROBUST, True): _DP_MEAN_ONLY,
    (_S, _MEAN, False): Release.SECURE_MEAN,
    (_S, _ROBUST, False): _SINGLE_SUM,
    (_S, _MEAN, True): Release.SECURE_DP_FEDAVG,
    (_S, _ROBUST, True): _DP_MEAN_ONLY,
    (_G, _MEAN, False): Release.GROUP_RULE,
    (_G, _ROBUST, False): Release.GROUP_RULE,
    (_G, _MEAN, True): _GROUPS_WITH_DP,
    (_G, _ROBUST, True): _DP_MEAN_ONLY,
}


def check_combination(kind: InputKind, rule: RuleKind, central_dp: bool, label: str) -> Release:
    """What the pipeline releases for this combination; refuse an illegal one.

    ``label`` names the rule in the message (``nnm+krum``).
    """
    verdict = COMBINATIONS[(kind, rule, bool(central_dp))]
    if isinstance(verdict, Refused):
        raise UnsupportedCombinationError(verdict.message.format(label=label))
    return verdict


def rule_kind(aggregator: Aggregator) -> RuleKind:
    """The weighted mean (also after pre-aggregation steps, as a configured rule), or robust."""
    rule = aggregator.rule if isinstance(aggregator, Composed) else aggregator
    return RuleKind.MEAN if rule.name == AggregatorName.WEIGHTED_MEAN.value else RuleKind.ROBUST


def config_rule_kind(config: AggregatorConfig) -> RuleKind:
    """:func:`rule_kind` of the rule ``config`` builds, without building it."""
    return RuleKind.MEAN if config.rule is AggregatorName.WEIGHTED_MEAN else RuleKind.ROBUST


def input_kind(secagg: SecureAggregationConfig) -> InputKind:
    """The input every round of a run with these secure aggregation settings gives."""
    if not secagg.enabled:
        return InputKind.CLIENT_UPDATES
    return InputKind.SECURE_SUM if secagg.groups == 1 else InputKind.GROUP_SUMS


def inputs_per_round(config: RunConfig) -> tuple[int, str]:
    """How many inputs the rule gets in a full round, and what they are (for messages)."""
    if config.secagg.enabled:
        return config.secagg.groups, "secure groups"
    return config.num_clients, "silo updates"


def checked_rule(config: RunConfig, given: Aggregator | None = None) -> Aggregator:
    """The run's rule (``given``, or the configured one), refused now if a run cannot use it.

    Refused with a :class:`~fedguard.core.errors.ConfigError` when a full round cannot
    meet its precondition, or when :data:`COMBINATIONS` refuses it with the run's input
    kind and central DP setting.
    """
    inputs, what = inputs_per_round(config)
    if given is None:
        rule = check_inputs_suffice(config.aggregation, inputs, what)
        label = config.aggregation.label
    else:
        if inputs < given.min_inputs:
            raise ConfigError(
                f"{given.name} needs at least {given.min_inputs} {what} per round, "
                f"a round will have {inputs}"
            )
        rule, label = given, given.name
    check_combination(input_kind(config.secagg), rule_kind(rule), config.central_dp.enabled, label)
    return rule
