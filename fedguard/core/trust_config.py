"""Configuration of the trust layer: fairness audit, drift monitoring, explanations.

Every question is answered by a *secure DP statistic*: each silo computes a
vector on its own records, adds Gaussian noise calibrated to the query's ε
(charged to its own privacy ledger first) and the noised vectors are summed by
secure aggregation. ``*-epsilon`` is the ε one silo spends on one such release
(at the δ of its own budget). ``trust-noise = none`` releases exact sums: a
research setting, without DP, that silos refuse unless they allow non-private
work (simulation does).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from enum import StrEnum

from fedguard.core.checks import positive
from fedguard.core.errors import ConfigError

__all__ = ["DEFAULT_DRIFT_THRESHOLD", "TrustConfig", "TrustNoise"]

#: Default PSI alert threshold per feature. Chosen from the false-alarm study in
#: ``benchmarks/drift.py`` (flchain, 5 silos, 10 bins, ε = 1 per release, 20 seeds):
#: see the README's "Trust layer" section for the measured figures.
DEFAULT_DRIFT_THRESHOLD = 0.05


class TrustNoise(StrEnum):
    """How silos protect the statistics they release."""

    GAUSSIAN = "gaussian"  # each silo adds calibrated Gaussian noise and charges its ledger
    NONE = "none"  # exact sums, no DP: research only; silos must allow non-private work


@dataclass(frozen=True)
class TrustConfig:
    """What the post-training trust phase (and later monitoring) computes.

    Its flat options (``fairness-*``, ``drift*``, ``explain*``, ``trust-noise``) are
    entries of :data:`fedguard.core.run_options.RUN_OPTIONS`.
    """

    fairness_attribute: str | None = None  # raw column, e.g. "sex"; None: no audit
    fairness_bands: tuple[float, ...] = ()  # band edges of a numeric attribute
    fairness_epsilon: float = 1.0
    drift: bool = False  # store the training-time drift reference
    drift_bins: int = 10
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD  # PSI per feature
    drift_epsilon: float = 1.0
    monitor_rounds: int = 3  # monitoring rounds each silo keeps budget for
    explain: bool = False  # global Integrated-Gradients attributions
    explain_epsilon: float = 1.0
    explain_steps: int = 32
    explain_clip_norm: float = 1.0
    noise: TrustNoise = TrustNoise.GAUSSIAN

    def __post_init__(self) -> None:
        if self.fairness_attribute is not None and not (
            isinstance(self.fairness_attribute, str) and self.fairness_attribute.strip()
        ):
            raise ConfigError(
                f"fairness attribute must be a column name, got {self.fairness_attribute!r}"
            )
        bands = tuple(self.fairness_bands)
        if not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bands) or any(
            a >= b for a, b in itertools.pairwise(bands)
        ):
            raise ConfigError(f"fairness bands must be finite and strictly increasing, got {bands}")
        object.__setattr__(self, "fairness_bands", tuple(float(b) for b in bands))
        for name in ("fairness_epsilon", "drift_epsilon", "explain_epsilon", "explain_clip_norm"):
            positive(name.replace("_", " "), getattr(self, name))
        positive("drift threshold", self.drift_threshold)
        if (
            isinstance(self.drift_bins, bool)
            or not isinstance(self.drift_bins, int)
            or not (2 <= self.drift_bins <= 100)
        ):
            raise ConfigError(f"drift bins must be an integer in [2, 100], got {self.drift_bins!r}")
        if (
            isinstance(self.monitor_rounds, bool)
            or not isinstance(self.monitor_rounds, int)
            or (self.monitor_rounds < 0)
        ):
            raise ConfigError(
                f"monitor rounds must be an integer >= 0, got {self.monitor_rounds!r}"
            )
        if (
            isinstance(self.explain_steps, bool)
            or not isinstance(self.explain_steps, int)
            or (self.explain_steps < 1)
        ):
            raise ConfigError(f"explain steps must be an integer >= 1, got {self.explain_steps!r}")
        if not isinstance(self.noise, TrustNoise):
            raise ConfigError(f"trust noise must be a TrustNoise, got {self.noise!r}")

    @property
    def enabled(self) -> bool:
        """Whether the run has a post-training trust phase at all."""
        return self.fairness_attribute is not None or self.drift or self.explain

    def planned_releases(self) -> tuple[float, ...]:
        """ε of every release the run plans after training (each silo reserves them)."""
        if self.noise is TrustNoise.NONE:
            return ()
        fairness = (self.fairness_epsilon,) if self.fairness_attribute is not None else ()
        drift = (self.drift_epsilon,) * (1 + self.monitor_rounds) if self.drift else ()
        # Two attribution releases: the global model's, and the distilled student's
        # at ``fedguard export`` (see fedguard.trust.explain_release).
        explain = (self.explain_epsilon,) * 2 if self.explain else ()
        return fairness + drift + explain
