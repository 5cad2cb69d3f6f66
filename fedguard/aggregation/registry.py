"""Builds the configured aggregation rule.

:class:`~fedguard.core.aggregation_config.AggregatorConfig` (in ``core``, so the run
config can hold it) names a rule and its parameters; :func:`build_aggregator`
turns it into an :class:`~fedguard.aggregation.aggregators.Aggregator`: the rule
alone, or ``Composed(steps, rule)``. :func:`check_inputs_suffice` refuses a
configuration whose rule cannot run on the number of inputs a round will have.
"""

from __future__ import annotations

import numpy as np

from fedguard.aggregation.aggregators import Aggregator, WeightedMean
from fedguard.aggregation.preaggregation import (
    Bucketing,
    Composed,
    NearestNeighborMixing,
    PreAggregator,
)
from fedguard.aggregation.robust import (
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBounding,
    TrimmedMean,
)
from fedguard.core.aggregation_config import (
    CC_ITERATIONS,
    GEOMED_ITERATIONS,
    GEOMED_NU,
    GEOMED_TOLERANCE,
    AggregatorConfig,
    AggregatorName,
    CenterReference,
    PreAggregationName,
)
from fedguard.core.errors import ConfigError
from fedguard.core.run_options import AGGREGATION_OPTION_KEYS as OPTION_KEYS

__all__ = [
    "OPTION_KEYS",
    "AggregatorConfig",
    "AggregatorName",
    "CenterReference",
    "PreAggregationName",
    "build_aggregator",
    "check_inputs_suffice",
]


def _rule(config: AggregatorConfig) -> Aggregator:
    f = config.f
    match config.rule:
        case AggregatorName.WEIGHTED_MEAN:
            return WeightedMean()
        case AggregatorName.MEDIAN:
            return CoordinateMedian(f)
        case AggregatorName.TRIMMED_MEAN:
            return TrimmedMean(f, config.trim_fraction)
        case AggregatorName.KRUM:
            return Krum(f)
        case AggregatorName.MULTI_KRUM:
            return MultiKrum(f, config.multi_krum_m)
        case AggregatorName.GEOMETRIC_MEDIAN:
            return GeometricMedian(
                f,
                nu=GEOMED_NU if config.geomed_nu is None else config.geomed_nu,
                iterations=(
                    GEOMED_ITERATIONS
                    if config.geomed_iterations is None
                    else config.geomed_iterations
                ),
                tolerance=(
                    GEOMED_TOLERANCE if config.geomed_tolerance is None else config.geomed_tolerance
                ),
            )
        case AggregatorName.CENTERED_CLIPPING:
            assert config.cc_tau is not None  # checked by AggregatorConfig
            return CenteredClipping(
                config.cc_tau,
                iterations=CC_ITERATIONS if config.cc_iterations is None else config.cc_iterations,
                reference=config.cc_reference or CenterReference.ZERO,
                f=f,
            )
        case AggregatorName.NORM_BOUNDING:
            assert config.norm_bound is not None  # checked by AggregatorConfig
            return NormBounding(config.norm_bound)


def build_aggregator(config: AggregatorConfig) -> Aggregator:
    """The configured rule, wrapped as ``Composed(steps, rule)`` when steps are configured.

    Bucketing gets its own generator seeded from ``config.seed``; a stateful rule
    (centered clipping from the previous aggregate) starts fresh: build once per run.
    """
    rule = _rule(config)
    if not config.pre_aggregation:
        return rule
    steps: list[PreAggregator] = []
    for step in config.pre_aggregation:
        if step is PreAggregationName.BUCKETING:
            assert config.bucket_size is not None  # checked by AggregatorConfig
            steps.append(Bucketing(config.bucket_size, np.random.default_rng(config.seed)))
        else:
            steps.append(NearestNeighborMixing(config.f))
    return Composed(tuple(steps), rule)


def check_inputs_suffice(config: AggregatorConfig, inputs: int, what: str = "inputs") -> Aggregator:
    """Build the rule and refuse it if ``inputs`` per round break its precondition.

    Used at the server boundary: a configuration that cannot be robust (say Krum
    over 4 secure groups with f = 1, which needs 2f + 3 = 5) is an error before any
    silo trains, not a failed round later.
    """
    aggregator = build_aggregator(config)
    if inputs < aggregator.min_inputs:
        raise ConfigError(
            f"{config.label} with f = {config.f} needs at least {aggregator.min_inputs} {what} "
            f"per round, but a round will have {inputs}"
        )
    return aggregator
