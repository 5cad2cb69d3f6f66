"""What a DP-SGD silo under a plain Flower server decides for itself, and why it refuses.

:class:`DpSiloPolicy` holds everything the silo's privacy guarantee depends on:
its lifetime (ε, δ) budget, how σ is set (exactly one of a fixed
``noise-multiplier``, a ``round-epsilon`` each round costs on its own, or
``planned-rounds`` that must fit the whole budget), the per-example clip norm,
the expected Poisson batch size, the local epochs and the state folder holding
its ledger and signed log. It comes from the silo's own code or
``context.node_config`` (:meth:`DpSiloPolicy.from_node_config`), never from the
server: a server's ``ConfigRecord`` that names any privacy setting is refused
(:func:`check_server_config`, refusal ``server-privacy-setting``), since a server
that believes it sets the noise should learn that it does not; every other key
(``server-round`` aside, which names the round) is ignored.

A refusal travels as a Flower error reply (``Message(Error(code, reason))``;
Flower's FedAvg counts it as a failure and aggregates without it). Its
``reason`` starts with ``fedguard-dp:<refusal>:`` and its ``code`` is
:attr:`DpRefusal.code`; :func:`refusal_of` reads either back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedguard.core.checks import fraction, positive, positive_int
from fedguard.core.config import (
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    NoiseSource,
    OptimizerKind,
    PrivacyBudget,
)
from fedguard.core.errors import ConfigError, TrainingRefusedError

__all__ = [
    "NOISE_MULTIPLIER_FLOOR",
    "REFUSAL_PREFIX",
    "DpRefusal",
    "DpSiloPolicy",
    "DpSiloRefusedError",
    "check_server_config",
    "refusal_of",
]

#: The smallest fixed σ a policy accepts (fedguard's silo policy floor).
NOISE_MULTIPLIER_FLOOR = 0.3
#: Every refusal's reason starts with this, then ``<refusal>:``.
REFUSAL_PREFIX = "fedguard-dp"
#: Flower's own error codes run 0-8; a DP silo's refusals use 4100 + their index.
_CODE_BASE = 4100


class DpRefusal(StrEnum):
    """Why a DP silo answered with an error instead of an update."""

    BUDGET_EXHAUSTED = "budget-exhausted"
    SERVER_PRIVACY_SETTING = "server-privacy-setting"
    REPLAYED_ROUND = "replayed-round"
    LEDGER_INTEGRITY = "ledger-integrity"
    MODEL_UNSUPPORTED = "model-unsupported"
    BAD_ARRAYS = "bad-arrays"
    BAD_MESSAGE = "bad-message"
    MISCONFIGURED = "misconfigured"
    TRAINING_FAILED = "training-failed"
    FAILED = "failed"

    @property
    def code(self) -> int:
        """The Flower ``Error.code`` of this refusal."""
        return _CODE_BASE + list(DpRefusal).index(self)


class DpSiloRefusedError(TrainingRefusedError):
    """The silo refuses this message; ``refusal`` says why (nothing trained or charged)."""

    def __init__(self, refusal: DpRefusal, detail: str) -> None:
        super().__init__(detail)
        self.refusal = refusal


def refusal_of(code: int, reason: str | None) -> DpRefusal | None:
    """The refusal a DP silo's error reply carries (``None`` for a foreign error)."""
    prefix = f"{REFUSAL_PREFIX}:"
    for refusal in DpRefusal:
        if refusal.code == code and (reason or "").startswith(f"{prefix}{refusal.value}:"):
            return refusal
    return None


# Names (split on "-") and substrings of a server config key that touch the privacy
# guarantee. "server-round" is read; anything else is ignored.
_PRIVACY_WORDS = frozenset(
    {
        "accountant",
        "batch",
        "budget",
        "clip",
        "clipping",
        "delta",
        "dp",
        "epoch",
        "epochs",
        "eps",
        "epsilon",
        "grad",
        "ledger",
        "noise",
        "norm",
        "privacy",
        "private",
        "q",
        "sample",
        "sampling",
        "secure",
        "sigma",
        "state",
        "steps",
        "z",
    }
)
_PRIVACY_FRAGMENTS = (
    "noise",
    "clip",
    "epsilon",
    "budget",
    "batch",
    "epoch",
    "ledger",
    "sigma",
    "sample-rate",
    "samplerate",
)
_SERVER_ROUND = "server-round"


def check_server_config(config: Mapping[str, Any]) -> None:
    """Refuse a server config that tries to set anything the DP guarantee rests on.

    Matched on the key's name (lower-cased, ``_`` and spaces as ``-``): a word such
    as ``noise``, ``clip``, ``epsilon``, ``delta``, ``batch``, ``epochs``,
    ``steps``, ``sample``, ``state``, ``budget`` or a fragment such as ``noise``
    inside ``noisemultiplier``. Raises :class:`DpSiloRefusedError`
    (``server-privacy-setting``) naming the keys; the silo's own values stand either
    way, the refusal only makes the attempt visible to the server's operator.
    """
    offending = sorted(key for key in config if key != _SERVER_ROUND and _is_privacy_key(key))
    if offending:
        raise DpSiloRefusedError(
            DpRefusal.SERVER_PRIVACY_SETTING,
            f"the server's config sets {', '.join(map(repr, offending))}: this silo's "
            "noise, clip norm, sampling, epochs, budget and state folder come only from "
            "its own node config; remove them from the server's train config",
        )


def _is_privacy_key(key: str) -> bool:
    name = key.lower().replace("_", "-").replace(" ", "-")
    return bool(_PRIVACY_WORDS & set(name.split("-"))) or any(
        fragment in name for fragment in _PRIVACY_FRAGMENTS
    )


@dataclass(frozen=True)
class DpSiloPolicy:
    """One silo's DP-SGD settings and lifetime budget; set by the silo, never the server.

    σ is set by exactly one of ``noise_multiplier`` (fixed, in
    [:data:`NOISE_MULTIPLIER_FLOOR`, ``max_noise_multiplier``]), ``round_epsilon``
    (calibrated once per run so that one round alone costs that ε at ``delta``) or
    ``planned_rounds`` (calibrated once per run so that that many rounds, on top of
    everything the ledger holds, fit ``epsilon_budget``). ``batch_size`` is the
    expected Poisson batch size (q = 1 / ceil(n / batch_size)). ``fix_model`` lets
    the silo replace layers Opacus cannot train privately (BatchNorm to GroupNorm,
    ...) with ``ModuleValidator.fix``; the server must then send the fixed model's
    tensors. ``signing_key``: the node key that signs the silo log, if any.
    """

    silo_id: str
    state_dir: Path
    epsilon_budget: float
    delta: float
    clip_norm: float
    batch_size: int
    noise_multiplier: float | None = None
    round_epsilon: float | None = None
    planned_rounds: int | None = None
    local_epochs: int = 1
    learning_rate: float = 0.05
    momentum: float = 0.9
    optimizer: OptimizerKind = OptimizerKind.SGD
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS
    max_noise_multiplier: float = 30.0
    fix_model: bool = False
    signing_key: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.silo_id, str) or not self.silo_id.strip():
            raise ConfigError(f"silo-id must be a non-empty string, got {self.silo_id!r}")
        if not isinstance(self.state_dir, Path):
            raise ConfigError(f"state-dir must be a Path, got {self.state_dir!r}")
        positive("epsilon-budget", self.epsilon_budget)
        fraction("delta", self.delta)
        positive("clip-norm", self.clip_norm)
        positive_int("batch-size", self.batch_size)
        positive_int("local-epochs", self.local_epochs)
        positive("max-noise-multiplier", self.max_noise_multiplier)
        rules = [
            name
            for name, value in (
                ("noise-multiplier", self.noise_multiplier),
                ("round-epsilon", self.round_epsilon),
                ("planned-rounds", self.planned_rounds),
            )
            if value is not None
        ]
        if len(rules) != 1:
            raise ConfigError(
                "set exactly one of noise-multiplier, round-epsilon, planned-rounds "
                f"(how the silo sets σ), got {rules or 'none'}"
            )
        if self.noise_multiplier is not None:
            sigma = positive("noise-multiplier", self.noise_multiplier)
            if not NOISE_MULTIPLIER_FLOOR <= sigma <= self.max_noise_multiplier:
                raise ConfigError(
                    f"noise-multiplier must lie in [{NOISE_MULTIPLIER_FLOOR}, "
                    f"{self.max_noise_multiplier:g}], got {sigma:g}"
                )
        if self.round_epsilon is not None:
            positive("round-epsilon", self.round_epsilon, upper=self.epsilon_budget * (1 + 1e-12))
        if self.planned_rounds is not None:
            positive_int("planned-rounds", self.planned_rounds)
        if not isinstance(self.fix_model, bool):
            raise ConfigError(f"fix-model must be a bool, got {self.fix_model!r}")
        if self.signing_key is not None and not isinstance(self.signing_key, Path):
            raise ConfigError(f"signing-key must be a Path, got {self.signing_key!r}")
        # The remaining fields are checked by the configs they build.
        _ = (self.training, self.local_dp)

    @property
    def budget(self) -> PrivacyBudget:
        """The lifetime budget its ledger is created with (and must keep)."""
        return PrivacyBudget(epsilon=self.epsilon_budget, delta=self.delta)

    @property
    def training(self) -> LocalTrainingConfig:
        return LocalTrainingConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            momentum=self.momentum,
        )

    @property
    def local_dp(self) -> LocalDPConfig:
        """Opacus settings: always CSPRNG noise and Poisson batches (never seeded)."""
        return LocalDPConfig(
            enabled=True,
            max_grad_norm=self.clip_norm,
            grad_sample_mode=self.grad_sample_mode,
            noise_source=NoiseSource.CSPRNG,
            max_noise_multiplier=self.max_noise_multiplier,
        )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DpSiloPolicy:
        """The policy from a node config (keys as in the field names, ``-`` for ``_``).

        Required: ``silo-id``, ``state-dir``, ``epsilon-budget``, ``delta``,
        ``clip-norm``, ``batch-size`` and one of ``noise-multiplier``,
        ``round-epsilon``, ``planned-rounds``. Other keys of the node config (the
        node's data path, ``partition-id``, ...) are not the policy's and are left
        alone. Raises ``ConfigError`` naming a missing or malformed key.
        """
        if "noise-source" in node_config:
            raise ConfigError(
                "node config key 'noise-source': this silo always draws its noise and "
                "Poisson batches from its CSPRNG"
            )
        values: dict[str, Any] = {}
        for key, (field, parse) in _KEYS.items():
            if key in node_config:
                values[field] = _parse(key, node_config[key], parse)
            elif key in _REQUIRED:
                raise ConfigError(f"node config key {key!r} is missing (the silo's own setting)")
        return cls(**values)


def _parse(key: str, raw: Any, parse: Any) -> Any:
    try:
        if parse is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw) if isinstance(raw, (int, float)) else int(str(raw).strip())
        if parse is float:
            value = float(raw) if not isinstance(raw, bool) else math.nan
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        if parse is bool:
            return _boolean(raw)
        if parse is Path:
            text = str(raw).strip()
            if not text:
                raise ValueError(raw)
            return Path(text).expanduser()
        return parse(str(raw).strip())
    except (ValueError, TypeError):
        raise ConfigError(
            f"node config key {key!r} must be {getattr(parse, '__name__', parse)}, got {raw!r}"
        ) from None


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(raw)


#: node config key -> (field, parser)
_KEYS: dict[str, tuple[str, Any]] = {
    "silo-id": ("silo_id", str),
    "state-dir": ("state_dir", Path),
    "epsilon-budget": ("epsilon_budget", float),
    "delta": ("delta", float),
    "clip-norm": ("clip_norm", float),
    "batch-size": ("batch_size", int),
    "noise-multiplier": ("noise_multiplier", float),
    "round-epsilon": ("round_epsilon", float),
    "planned-rounds": ("planned_rounds", int),
    "local-epochs": ("local_epochs", int),
    "learning-rate": ("learning_rate", float),
    "momentum": ("momentum", float),
    "optimizer": ("optimizer", OptimizerKind),
    "grad-sample-mode": ("grad_sample_mode", GradSampleMode),
    "max-noise-multiplier": ("max_noise_multiplier", float),
    "fix-model": ("fix_model", bool),
    "signing-key": ("signing_key", Path),
}
_REQUIRED = frozenset(
    {"silo-id", "state-dir", "epsilon-budget", "delta", "clip-norm", "batch-size"}
)
