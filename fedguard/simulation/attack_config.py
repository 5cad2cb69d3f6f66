"""The simulated attack's configuration (torch-free: the CLI parses it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fedguard.core.aggregation_config import AggregatorName
from fedguard.core.errors import ConfigError
from fedguard.core.options import as_bool, as_float, as_int
from fedguard.core.seeding import numpy_rng


class AttackName(StrEnum):
    SIGN_FLIP = "sign-flip"
    SCALING = "scaling"
    GAUSSIAN = "gaussian"
    LABEL_FLIP = "label-flip"
    ALIE = "alie"
    IPM = "ipm"
    BACKDOOR = "backdoor"


#: Attacks built from the colluders' honest updates.
NEEDS_BENIGN = frozenset({AttackName.SIGN_FLIP, AttackName.ALIE, AttackName.IPM})
#: Attacks that send a boosted update (model replacement).
BOOSTED = frozenset({AttackName.SCALING, AttackName.BACKDOOR})

DEFAULT_STRENGTH = {AttackName.SIGN_FLIP: 4.0, AttackName.GAUSSIAN: 1.0, AttackName.IPM: 0.1}

#: Rules that declare no Byzantine f: the plain mean, and norm bounding (it bounds each
#: update, it excludes none); an attack leaves their ``aggregator-f`` unset.
_NO_DECLARED_F = frozenset({AggregatorName.WEIGHTED_MEAN, AggregatorName.NORM_BOUNDING})


def declares_f(rule: str) -> bool:
    """Whether the aggregation rule ``rule`` (an :class:`AggregatorName` value) takes the
    number of Byzantine inputs ``f`` it must tolerate, which an attack then defaults."""
    return rule not in _NO_DECLARED_F


@dataclass(frozen=True)
class AttackConfig:
    """Which attack, how many Byzantine silos, whether they collude, how strong.

    ``byzantine_fraction`` of the silos (rounded to the nearest count, at least
    one) are Byzantine, drawn with the run's seed. ``poison_fraction`` is the
    share of a backdoor silo's examples that carry the trigger.
    """

    name: AttackName
    byzantine_fraction: float
    collusion: bool = True
    strength: float | None = None
    backdoor_target: int = 0
    poison_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.name, AttackName):
            raise ConfigError(f"attack must be an AttackName, got {self.name!r}")
        if not (0.0 < self.byzantine_fraction < 0.5):
            raise ConfigError(
                f"byzantine fraction must lie in (0, 0.5), got {self.byzantine_fraction}"
            )
        if self.strength is not None and not (math.isfinite(self.strength) and self.strength > 0):
            raise ConfigError(f"attack strength must be a finite number > 0, got {self.strength}")
        if self.name is AttackName.ALIE and not self.collusion:
            raise ConfigError(
                "alie estimates the honest spread from several silos: needs collusion"
            )
        if self.backdoor_target < 0:
            raise ConfigError(f"backdoor target must be a class >= 0, got {self.backdoor_target}")
        if not (0.0 < self.poison_fraction <= 1.0):
            raise ConfigError(f"poison fraction must lie in (0, 1], got {self.poison_fraction}")

    def byzantine_indices(self, num_clients: int, seed: int) -> tuple[int, ...]:
        """The Byzantine silos' indices (seeded; at least one, fewer than half)."""
        count = max(1, round(self.byzantine_fraction * num_clients))
        if 2 * count >= num_clients:
            raise ConfigError(
                f"{count} Byzantine of {num_clients} silos is not a minority; lower --byzantine"
            )
        rng = numpy_rng(seed, "byzantine-silos")
        return tuple(sorted(int(i) for i in rng.choice(num_clients, count, replace=False)))

    def default_f(self, num_clients: int, seed: int, groups: int) -> int:
        """The f a robust rule declares against this attack unless told otherwise: what
        the attack can corrupt, its silos, or at most one of ``groups`` secure groups each
        (``groups`` <= 1: no groups). An f the rule cannot meet is refused, never lowered."""
        byzantine = len(self.byzantine_indices(num_clients, seed))
        return min(byzantine, groups) if groups > 1 else byzantine

    def to_options(self) -> dict[str, Any]:
        return {
            "attack": self.name.value,
            "byzantine": self.byzantine_fraction,
            "collusion": self.collusion,
            "attack-strength": self.strength,
            "backdoor-target": self.backdoor_target,
            "poison-fraction": self.poison_fraction,
        }

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AttackConfig:
        try:
            name = AttackName(str(options["attack"]))
        except ValueError:
            known = ", ".join(a.value for a in AttackName)
            raise ConfigError(f"unknown attack {options['attack']!r}; known: {known}") from None
        strength = options.get("attack-strength")
        return cls(
            name=name,
            byzantine_fraction=as_float("byzantine", options.get("byzantine", 0.2)),
            collusion=as_bool("collusion", options.get("collusion", True)),
            strength=None if strength is None else as_float("attack-strength", strength),
            backdoor_target=as_int("backdoor-target", options.get("backdoor-target", 0)),
            poison_fraction=as_float("poison-fraction", options.get("poison-fraction", 0.5)),
        )
