"""A silo's privacy policy: decided by the silo alone, never by the server.

The consortium server is the adversary of every silo's privacy (see
``docs/threat-model.md``): it may send any instruction. So everything a silo's
guarantee depends on comes from here, parsed once from the silo's own node
config, and every instruction is checked against it:

* the **noise source**: the CSPRNG; seeded noise and seeded batch sampling only in
  an explicit simulation *research mode*, which marks the ledger and the report
  "not private against the server";
* a **noise-multiplier floor** and ceiling for the σ the silo calibrates itself;
* the largest per-example **clip bound** it accepts;
* the smallest **cohort** its input may be summed with under secure aggregation,
  and the weakest SecAgg+ graph it accepts: the server's (k, t) must meet the
  silo's own security target (Bell et al., CCS 2020, bounds in
  :mod:`fedguard.privacy.secagg.analysis`), and explicit floors on k and t;
* authenticated key advertisements: always required;
* whether its **evaluations** (on its held-out test split, never trained on) are
  released with DP noise: ``evaluation_epsilon`` ε per evaluation, charged to its
  ledger and kept budget for when the run is planned; ``None`` (the default)
  releases exact sums, and only inside a secure aggregate or a plain-mode reply.

An instruction outside the policy raises :class:`PolicyRefusalError` with a
:class:`RefusalReason`; the silo replies ``refused`` with that code, charging nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from fedguard.core.checks import positive
from fedguard.core.config import NoiseSource
from fedguard.core.errors import ConfigError, TrainingRefusedError
from fedguard.privacy.secagg.analysis import log2_disconnection, log2_equivocation_failure
from fedguard.privacy.secagg.config import SecAggConfig

__all__ = [
    "NOT_PRIVATE_AGAINST_SERVER",
    "PolicyRefusalError",
    "RefusalReason",
    "SiloPolicy",
    "policy_from_node_config",
]

#: What research mode writes into the ledger and the report.
NOT_PRIVATE_AGAINST_SERVER = (
    "research mode: seeded noise and sampling; NOT private against the server"
)


class RefusalReason(StrEnum):
    """Why a silo refused an instruction (the ``refusal`` field of its reply)."""

    NOISE_SOURCE = "noise-source"
    NON_PRIVATE = "non-private"
    NOISE_MULTIPLIER = "noise-multiplier"
    CLIP_BOUND = "clip-bound"
    COHORT_TOO_SMALL = "cohort-too-small"
    SECAGG_TOO_WEAK = "secagg-too-weak"
    SECAGG_UNAUTHENTICATED = "secagg-unauthenticated"
    SECAGG_ROSTER = "secagg-roster"
    SECAGG_SECOND_INSTANCE = "secagg-second-instance"
    SECAGG_STAGE = "secagg-stage"
    REPLAYED_ROUND = "replayed-round"
    DATA_CONTRACT = "data-contract"
    MODEL_ARCHITECTURE = "model-architecture"


class PolicyRefusalError(TrainingRefusedError):
    """The server asked for something outside this silo's policy."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"[{reason.value}] {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SiloPolicy:
    """What this silo accepts; the defaults are the deployed ones."""

    noise_source: NoiseSource = NoiseSource.CSPRNG
    research_mode: bool = False
    noise_multiplier_floor: float = 0.3
    max_noise_multiplier: float = 30.0
    max_clip_norm: float = 10.0
    min_cohort: int = 3
    secagg_security_bits: float = 40.0
    secagg_corrupt_fraction: float = 0.05
    secagg_dropout_rate: float = 0.1
    min_secagg_degree: int = 2
    min_secagg_threshold: int = 2
    evaluation_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.noise_source, NoiseSource):
            raise ConfigError(f"noise source must be a NoiseSource, got {self.noise_source!r}")
        if self.noise_source is NoiseSource.SEEDED and not self.research_mode:
            raise ConfigError(
                "seeded noise lets the server recompute a silo's noise: it is only allowed "
                "in the explicit simulation research mode"
            )
        positive("noise-multiplier-floor", self.noise_multiplier_floor, allow_zero=True)
        positive("max-noise-multiplier", self.max_noise_multiplier)
        if self.noise_multiplier_floor >= self.max_noise_multiplier:
            raise ConfigError(
                f"noise-multiplier-floor {self.noise_multiplier_floor} must be below "
                f"max-noise-multiplier {self.max_noise_multiplier}"
            )
        positive("max-clip-norm", self.max_clip_norm)
        if self.evaluation_epsilon is not None:
            positive("evaluation-epsilon", self.evaluation_epsilon)
        positive("secagg-security-bits", self.secagg_security_bits)
        for name, fraction in (
            ("secagg-corrupt-fraction", self.secagg_corrupt_fraction),
            ("secagg-dropout-rate", self.secagg_dropout_rate),
        ):
            if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
                raise ConfigError(f"{name} must lie in [0, 1), got {fraction!r}")
        for name, count, least in (
            ("min-cohort", self.min_cohort, 3),
            ("min-secagg-degree", self.min_secagg_degree, 2),
            ("min-secagg-threshold", self.min_secagg_threshold, 2),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {count!r}")

    @property
    def private_against_server(self) -> bool:
        return not self.research_mode

    # -- checks of one instruction ------------------------------------------------------

    def check_noise_source(self, requested: NoiseSource) -> None:
        if requested is not self.noise_source:
            raise PolicyRefusalError(
                RefusalReason.NOISE_SOURCE,
                f"the server asked for {requested.value!r} noise; this silo's policy "
                f"uses {self.noise_source.value!r} and nothing else",
            )

    def check_clip(self, max_grad_norm: float) -> None:
        if not (math.isfinite(max_grad_norm) and 0 < max_grad_norm <= self.max_clip_norm):
            raise PolicyRefusalError(
                RefusalReason.CLIP_BOUND,
                f"per-example clip bound {max_grad_norm!r} outside this silo's "
                f"(0, {self.max_clip_norm:g}]",
            )

    def check_noise_multiplier(self, sigma: float) -> None:
        if sigma < self.noise_multiplier_floor:
            raise PolicyRefusalError(
                RefusalReason.NOISE_MULTIPLIER,
                f"the run's plan would train with noise multiplier {sigma:.4g}, below this "
                f"silo's floor {self.noise_multiplier_floor:g}",
            )

    def check_secagg(self, config: SecAggConfig) -> None:
        """Refuse a SecAgg+ round weaker than this silo accepts (cohort, k, t, identity)."""
        n, k, t = config.num_clients, config.degree, config.threshold
        if n < self.min_cohort:
            raise PolicyRefusalError(
                RefusalReason.COHORT_TOO_SMALL,
                f"a secure aggregate over {n} silos; this silo's minimum cohort is "
                f"{self.min_cohort}",
            )
        if not config.require_identity:
            raise PolicyRefusalError(
                RefusalReason.SECAGG_UNAUTHENTICATED,
                "the server asked for unauthenticated key advertisements; this silo "
                "only takes part in rounds whose adverts are signed by roster identities",
            )
        complete = k == n - 1
        if not complete and (k < self.min_secagg_degree or t < self.min_secagg_threshold):
            raise PolicyRefusalError(
                RefusalReason.SECAGG_TOO_WEAK,
                f"degree {k} / threshold {t} below this silo's floors "
                f"{self.min_secagg_degree} / {self.min_secagg_threshold}",
            )
        if t < min(self.min_secagg_threshold, k):
            raise PolicyRefusalError(
                RefusalReason.SECAGG_TOO_WEAK,
                f"threshold {t} below this silo's floor {self.min_secagg_threshold}",
            )
        corrupt = math.ceil(self.secagg_corrupt_fraction * n)
        privacy = max(
            log2_equivocation_failure(n, k, t, corrupt),
            log2_disconnection(n, k, self.secagg_corrupt_fraction, self.secagg_dropout_rate),
        )
        if privacy > -self.secagg_security_bits:
            raise PolicyRefusalError(
                RefusalReason.SECAGG_TOO_WEAK,
                f"degree {k} / threshold {t} at n={n} leaves a privacy failure bound of "
                f"2^{privacy:.1f} (Bell et al. 2020, {corrupt} corrupt silo(s), dropout "
                f"{self.secagg_dropout_rate:g}); this silo requires "
                f"2^-{self.secagg_security_bits:g}",
            )


#: node-config key → (field, parser); one option table for the deployed policy.
_OPTIONS: dict[str, tuple[str, type]] = {
    "noise-multiplier-floor": ("noise_multiplier_floor", float),
    "max-noise-multiplier": ("max_noise_multiplier", float),
    "max-clip-norm": ("max_clip_norm", float),
    "min-cohort": ("min_cohort", int),
    "secagg-security-bits": ("secagg_security_bits", float),
    "secagg-corrupt-fraction": ("secagg_corrupt_fraction", float),
    "secagg-dropout-rate": ("secagg_dropout_rate", float),
    "min-secagg-degree": ("min_secagg_degree", int),
    "min-secagg-threshold": ("min_secagg_threshold", int),
    "evaluation-epsilon": ("evaluation_epsilon", float),
}

POLICY_KEYS = tuple(_OPTIONS)


def policy_from_node_config(node_config: Mapping[str, object]) -> SiloPolicy:
    """The deployed silo's policy: CSPRNG noise always; the rest from its node config.

    A deployed silo has no research mode: a ``noise-source`` or ``research-mode``
    key in its node config is refused rather than ignored.
    """
    for forbidden in ("noise-source", "research-mode"):
        if forbidden in node_config:
            raise ConfigError(
                f"node config key {forbidden!r}: a deployed silo always draws its noise "
                "and batches from the CSPRNG (research mode exists only in simulation)"
            )
    values: dict[str, object] = {}
    for key, (field_name, parse) in _OPTIONS.items():
        if key in node_config:
            try:
                values[field_name] = parse(str(node_config[key]))
            except ValueError:
                raise ConfigError(
                    f"node config {key!r} must be {parse.__name__}, got {node_config[key]!r}"
                ) from None
    return SiloPolicy(**values)  # type: ignore[arg-type]
