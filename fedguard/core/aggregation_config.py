"""The aggregation rule's configuration: names, parameters, flat options.

This lives in ``core`` so that :class:`~fedguard.core.config.RunConfig` can hold
it (core imports nothing of fedguard); the rules themselves are built from it by
:func:`fedguard.aggregation.registry.build_aggregator`. The config checks what it
can alone (parameter owners, required parameters, domains); the rules check their
own preconditions again when built and on every round's inputs.

:class:`AggregatorConfig` names a rule (:class:`AggregatorName`), the number ``f``
of Byzantine inputs it must tolerate, the rule's own parameters and the
pre-aggregation steps (:class:`PreAggregationName`) that run before it, in order.
It is frozen and validated when made: a parameter that belongs to another rule is
an error rather than silently ignored, and so is a declared ``f > 0`` for a rule
that cannot tolerate any Byzantine input.

``from_options`` / ``to_options`` read and write the flat option form (CLI flags,
TOML, Flower's ``run_config``): the ``aggregation`` entries of
:data:`fedguard.core.run_options.RUN_OPTIONS` (their names:
:data:`~fedguard.core.run_options.AGGREGATION_OPTION_KEYS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from fedguard.core.errors import ConfigError

__all__ = [
    "AggregatorConfig",
    "AggregatorName",
    "CenterReference",
    "PreAggregationName",
]


class CenterReference(StrEnum):
    """Where centered clipping starts: the zero update, or the previous round's aggregate."""

    ZERO = "zero"
    PREVIOUS = "previous"

    @classmethod
    def parse(cls, value: str) -> CenterReference:
        return _parse_enum(cls, "cc-reference", value)


class AggregatorName(StrEnum):
    """Every aggregation rule fedguard ships."""

    WEIGHTED_MEAN = "weighted-mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"
    KRUM = "krum"
    MULTI_KRUM = "multi-krum"
    GEOMETRIC_MEDIAN = "geometric-median"
    CENTERED_CLIPPING = "centered-clipping"
    NORM_BOUNDING = "norm-bounding"

    @classmethod
    def parse(cls, value: str) -> AggregatorName:
        return _parse_enum(cls, "aggregator", value)


class PreAggregationName(StrEnum):
    """Pre-aggregation steps: bucketing (Karimireddy et al. 2022), NNM (Allouah et al. 2023)."""

    BUCKETING = "bucketing"
    NNM = "nnm"

    @classmethod
    def parse(cls, value: str) -> PreAggregationName:
        return _parse_enum(cls, "pre-aggregation step", value)


_E = TypeVar("_E", bound=StrEnum)


def _parse_enum(kind: type[_E], label: str, value: str) -> _E:
    try:
        return kind(str(value).strip())
    except ValueError:
        known = ", ".join(m.value for m in kind)
        raise ConfigError(f"unknown {label} {value!r}; known: {known}") from None


#: Rules whose output a declared ``f > 0`` cannot make robust: they take no ``f``.
_NO_BYZANTINE_COUNT = frozenset({AggregatorName.WEIGHTED_MEAN, AggregatorName.NORM_BOUNDING})

#: Which rule each optional parameter belongs to.
_OWNER: dict[str, AggregatorName] = {
    "trim_fraction": AggregatorName.TRIMMED_MEAN,
    "multi_krum_m": AggregatorName.MULTI_KRUM,
    "geomed_iterations": AggregatorName.GEOMETRIC_MEDIAN,
    "geomed_nu": AggregatorName.GEOMETRIC_MEDIAN,
    "geomed_tolerance": AggregatorName.GEOMETRIC_MEDIAN,
    "cc_tau": AggregatorName.CENTERED_CLIPPING,
    "cc_iterations": AggregatorName.CENTERED_CLIPPING,
    "cc_reference": AggregatorName.CENTERED_CLIPPING,
    "norm_bound": AggregatorName.NORM_BOUNDING,
}

#: Parameters a rule cannot run without (no scale-free default exists).
_REQUIRED: dict[AggregatorName, tuple[str, ...]] = {
    AggregatorName.CENTERED_CLIPPING: ("cc_tau",),
    AggregatorName.NORM_BOUNDING: ("norm_bound",),
}

GEOMED_ITERATIONS = 100
GEOMED_NU = 1e-6
GEOMED_TOLERANCE = 1e-6
CC_ITERATIONS = 1


@dataclass(frozen=True)
class AggregatorConfig:
    """The server's aggregation rule, validated.

    - ``rule``: which rule.
    - ``f``: the number of Byzantine inputs the rule must tolerate in a round (the
      papers' ``f``); it sets the preconditions (``n ≥ 2f + 3`` for Krum) and is
      passed to NNM. Must be 0 for ``weighted-mean`` and ``norm-bounding``.
    - ``trim_fraction`` (trimmed-mean): ``β``, trimming ``int(β·n)`` per side;
      ``None`` trims ``f`` per side.
    - ``multi_krum_m`` (multi-krum): inputs kept; ``None`` keeps ``n − f``.
    - ``geomed_iterations`` / ``geomed_nu`` / ``geomed_tolerance`` (geometric-median):
      at most this many smoothed Weiszfeld steps (default 100), the smoothing
      ``ν`` (1e-6), and the step, relative to the weighted median distance to the
      inputs, below which the iterations stop (1e-6).
    - ``cc_tau`` (centered-clipping, required), ``cc_iterations`` (``L``, default 1),
      ``cc_reference``: start from the zero update (default) or the previous aggregate.
    - ``norm_bound`` (norm-bounding, required).
    - ``pre_aggregation``: steps run in this order before the rule.
    - ``bucket_size``: ``s``; required exactly when bucketing is a step.
    - ``seed``: seeds the generator bucketing draws its permutations from.
    """

    rule: AggregatorName = AggregatorName.WEIGHTED_MEAN
    f: int = 0
    trim_fraction: float | None = None
    multi_krum_m: int | None = None
    geomed_iterations: int | None = None
    geomed_nu: float | None = None
    geomed_tolerance: float | None = None
    cc_tau: float | None = None
    cc_iterations: int | None = None
    cc_reference: CenterReference | None = None
    norm_bound: float | None = None
    pre_aggregation: tuple[PreAggregationName, ...] = ()
    bucket_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rule, AggregatorName):
            raise ConfigError(f"rule must be an AggregatorName, got {self.rule!r}")
        if isinstance(self.f, bool) or not isinstance(self.f, int) or self.f < 0:
            raise ConfigError(f"f (Byzantine inputs) must be an integer >= 0, got {self.f!r}")
        if self.f > 0 and self.rule in _NO_BYZANTINE_COUNT:
            raise ConfigError(
                f"{self.rule.value} cannot tolerate Byzantine inputs, but f = {self.f} is "
                "declared: choose a robust rule, or declare f = 0"
            )
        for name, owner in _OWNER.items():
            if getattr(self, name) is not None and owner is not self.rule:
                raise ConfigError(
                    f"{name} applies to {owner.value} only; the rule is {self.rule.value}"
                )
        for name in _REQUIRED.get(self.rule, ()):
            if getattr(self, name) is None:
                raise ConfigError(f"{self.rule.value} needs {name}")
        if not isinstance(self.pre_aggregation, tuple) or not all(
            isinstance(step, PreAggregationName) for step in self.pre_aggregation
        ):
            raise ConfigError(
                f"pre_aggregation must be a tuple of PreAggregationName, got "
                f"{self.pre_aggregation!r}"
            )
        if len(set(self.pre_aggregation)) != len(self.pre_aggregation):
            raise ConfigError(f"a pre-aggregation step repeats: {self.pre_aggregation!r}")
        bucketing = PreAggregationName.BUCKETING in self.pre_aggregation
        if bucketing and self.bucket_size is None:
            raise ConfigError("bucketing needs bucket_size")
        if not bucketing and self.bucket_size is not None:
            raise ConfigError("bucket_size applies to bucketing only, which is not a step")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        _check_ranges(self)

    @property
    def label(self) -> str:
        """``nnm+krum`` style: steps in order, then the rule."""
        return "+".join([*(step.value for step in self.pre_aggregation), self.rule.value])

    def to_options(self) -> dict[str, Any]:
        """The flat option mapping :meth:`from_options` reads (unset parameters as ``None``)."""
        from fedguard.core.run_options import render_options

        return render_options(self, ("aggregation",))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AggregatorConfig:
        """Parse the flat option form; a missing, ``None`` or ``""`` key takes the default.

        ``pre-aggregation`` is a comma-separated list (``"nnm,bucketing"``); an
        unknown key is an error, so a typo is never silently ignored.
        """
        from fedguard.core.run_options import parse_options

        config: AggregatorConfig = parse_options(options, ("aggregation",))
        return config


def _check_ranges(config: AggregatorConfig) -> None:
    """Domains of the rule parameters (the rules check them again when built)."""
    beta = config.trim_fraction
    if beta is not None and (
        isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 0.5
    ):
        raise ConfigError(f"trimmed-mean: trim_fraction must lie in [0, 0.5), got {beta!r}")
    if beta is not None and beta == 0 and config.f > 0:
        raise ConfigError(
            f"trimmed-mean: trim_fraction 0 trims nothing and cannot tolerate f = {config.f}"
        )
    for label in ("multi_krum_m", "geomed_iterations", "cc_iterations", "bucket_size"):
        value = getattr(config, label)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"{label} must be an integer >= 1, got {value!r}")
    for label in ("geomed_nu", "geomed_tolerance", "cc_tau", "norm_bound"):
        value = getattr(config, label)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)
        ):
            raise ConfigError(f"{label} (the bound) must be a finite number > 0, got {value!r}")
    if config.cc_reference is not None and not isinstance(config.cc_reference, CenterReference):
        raise ConfigError(f"cc_reference must be a CenterReference, got {config.cc_reference!r}")
