"""Typed, validated configuration.

Every setting lives in a frozen dataclass validated in ``__post_init__``; choices
are enums, never free strings. Strings from the command line, a TOML file or
Flower's ``run_config`` / ``node_config`` are parsed once, at the boundary, by the
``parse``/``from_*`` constructors here; everything past the boundary receives
typed objects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedguard.core.aggregation_config import AggregatorConfig, AggregatorName
from fedguard.core.checks import positive
from fedguard.core.contract import DataContract, load_contract, packaged_contract
from fedguard.core.errors import ConfigError, UnknownDatasetError
from fedguard.core.options import float_text
from fedguard.core.trust_config import TrustConfig


class DatasetName(StrEnum):
    """Built-in data sets. Each ships inside a package; nothing is downloaded."""

    BREAST_CANCER = "breast-cancer"
    DIGITS = "digits"
    FLCHAIN = "flchain"
    CREDIT = "credit"

    @classmethod
    def parse(cls, value: str) -> DatasetName:
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise UnknownDatasetError(f"unknown data set {value!r}; known: {known}") from None


class PartitionKind(StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    COLUMN = "column"


class GradSampleMode(StrEnum):
    """Opacus per-sample-gradient engines (``make_private(grad_sample_mode=...)``)."""

    HOOKS = "hooks"
    FUNCTORCH = "functorch"
    EW = "ew"
    GHOST = "ghost"


class NoiseSource(StrEnum):
    """Where DP-SGD's Gaussian noise comes from.

    ``csprng``: AES-256-CTR keystream keyed from ``os.urandom`` (see
    :mod:`fedguard.privacy.noise` for the threat model). ``seeded``: torch's
    Mersenne Twister seeded from the run seed; reproducible, for research only.
    """

    CSPRNG = "csprng"
    SEEDED = "seeded"


class OptimizerKind(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class Engine(StrEnum):
    """Simulation engine: Flower's Ray engine, or fedguard's in-process engine."""

    RAY = "ray"
    INPROCESS = "inprocess"


#: Default L2 bound on a silo's update Δ (``RunConfig.update_clip_norm``).
UPDATE_CLIP_NORM_DEFAULT = 10.0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class PartitionSpec:
    """How a pooled data set is split across silos (simulation only)."""

    kind: PartitionKind
    alpha: float | None = None
    column: str | None = None
    min_silo_size: int = 50

    def __post_init__(self) -> None:
        if self.kind is PartitionKind.DIRICHLET:
            if self.alpha is None:
                raise ConfigError("dirichlet partition needs alpha")
            positive("dirichlet alpha", self.alpha)
        else:
            _require(self.alpha is None, f"{self.kind.value} partition takes no alpha")
        if self.kind is PartitionKind.COLUMN:
            _require(bool(self.column), "column partition needs a column name")
        else:
            _require(self.column is None, f"{self.kind.value} partition takes no column")
        _require(
            isinstance(self.min_silo_size, int) and self.min_silo_size >= 1,
            f"min_silo_size must be an integer >= 1, got {self.min_silo_size!r}",
        )

    @classmethod
    def parse(cls, text: str, min_silo_size: int = 50) -> PartitionSpec:
        """Parse ``iid``, ``dirichlet:ALPHA`` or ``column:NAME``."""
        head, _, arg = text.partition(":")
        try:
            kind = PartitionKind(head.strip())
        except ValueError:
            raise ConfigError(
                f"unknown partition {text!r}; use iid, dirichlet:ALPHA or column:NAME"
            ) from None
        if kind is PartitionKind.IID:
            _require(not arg, f"iid partition takes no argument, got {text!r}")
            return cls(kind, min_silo_size=min_silo_size)
        if kind is PartitionKind.DIRICHLET:
            try:
                alpha = float(arg)
            except ValueError:
                raise ConfigError(f"dirichlet partition needs a number, got {text!r}") from None
            return cls(kind, alpha=alpha, min_silo_size=min_silo_size)
        return cls(kind, column=arg.strip(), min_silo_size=min_silo_size)

    def __str__(self) -> str:
        if self.kind is PartitionKind.DIRICHLET and self.alpha is not None:
            return f"dirichlet:{float_text(self.alpha)}"
        if self.kind is PartitionKind.COLUMN:
            return f"column:{self.column}"
        return "iid"


#: What a run name may be (see RunConfig).
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class PrivacyBudget:
    """A sample-level (ε, δ) budget of one silo, over the silo's whole life."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        positive("target epsilon", self.epsilon)
        _require(
            isinstance(self.delta, (int, float)) and 0.0 < self.delta < 1.0,
            f"delta must lie in (0, 1), got {self.delta!r}",
        )


@dataclass(frozen=True)
class LocalTrainingConfig:
    """What every silo does in one round. Agreed by the consortium; sent by the server."""

    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.05
    optimizer: OptimizerKind = OptimizerKind.SGD
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _require(
            isinstance(self.local_epochs, int) and self.local_epochs >= 1,
            f"local_epochs must be an integer >= 1, got {self.local_epochs!r}",
        )
        _require(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1, got {self.batch_size!r}",
        )
        positive("learning_rate", self.learning_rate)
        _require(0.0 <= self.momentum < 1.0, f"momentum must lie in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class LocalDPConfig:
    """Sample-level DP-SGD inside each silo (Opacus, Poisson sampling)."""

    enabled: bool = True
    max_grad_norm: float = 1.0
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS
    noise_source: NoiseSource = NoiseSource.CSPRNG
    max_noise_multiplier: float = 30.0
    # ε each silo spends (at its own δ) on the feature moments the federated scaler is
    # built from, released once before round 1 (fedguard.core.feature_moments).
    scaler_epsilon: float = 0.2

    def __post_init__(self) -> None:
        positive("max_grad_norm", self.max_grad_norm)
        positive("max_noise_multiplier", self.max_noise_multiplier)
        positive("scaler_epsilon", self.scaler_epsilon)


@dataclass(frozen=True)
class CentralDPConfig:
    """Optional user-level (silo-level) DP added by the server (DP-FedAvg).

    McMahan et al., "Learning Differentially Private Recurrent Language Models",
    ICLR 2018: Poisson client sampling with rate ``client_sampling_rate``, each
    client's update clipped to ``clip_norm``, Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` on the sum, fixed denominator.

    The sampling is not credited in the accounting (each round's cohort is
    published in the round log): every round counts as q = 1, see
    :mod:`fedguard.privacy.central_accounting`, which also says whom the guarantee covers.

    ``epsilon_budget``: the server stops training before a round whose release
    would take the central ε past it (:mod:`fedguard.privacy.central_accounting`). The
    default 10 is the upper end of the "reasonable" tier of Ponomareva et al.,
    "How to DP-fy ML", JAIR 2023, Sec. 5.2 (ε ≤ 1 strong, ε ≤ 10 reasonable,
    above it little formal protection).
    """

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    client_sampling_rate: float = 1.0
    delta: float = 1e-3
    epsilon_budget: float = 10.0

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        positive("central clip_norm", self.clip_norm)
        positive("central noise_multiplier", self.noise_multiplier)
        _require(
            0.0 < self.client_sampling_rate <= 1.0,
            f"client_sampling_rate must lie in (0, 1], got {self.client_sampling_rate}",
        )
        _require(0.0 < self.delta < 1.0, f"central delta must lie in (0, 1), got {self.delta}")
        positive("central epsilon budget", self.epsilon_budget)


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ on the server (:mod:`fedguard.privacy.secagg`): it sees only sums.

    ``groups``: each round the sampled silos are split into this many groups at
    random (public seeded randomness, recorded in the round log); SecAgg+ runs
    inside each group, so the server sees one sum per group and a robust rule can
    run over the group means. ``min_group_size`` (>= 3) is the smallest group a
    round may form. ``clip_norm`` > 0: silos clip their update Δ to this L2 norm
    before masking, and a group whose decoded mean breaks the bound is flagged
    and left out (it holds a silo that did not clip); 0 takes the run's
    ``update_clip_norm`` (:func:`fedguard.server.norm_guard.secure_clip_norm`).

    ``clip_range`` bounds each coordinate of a silo's update Δ before fixed-point
    encoding (clipped values are counted and logged); ``value_bits`` is the
    fixed-point precision; ``dropout_rate`` is the planned share of silos that may
    drop, used with the security parameter to choose the neighbour degree k and the
    threshold t (Bell et al., CCS 2020).

    ``allow_no_dropout``: run even when the consortium is too small for a round to
    survive one dropout (3 or 4 silos with the defaults: one silo that drops aborts
    every round); refused at run start otherwise
    (:func:`fedguard.server.secure_round.check_dropout_tolerance`).
    """

    enabled: bool = False
    clip_range: float = 0.5
    value_bits: int = 16
    dropout_rate: float = 0.1
    groups: int = 1
    min_group_size: int = 3
    clip_norm: float = 0.0
    allow_no_dropout: bool = False

    def __post_init__(self) -> None:
        positive("secagg clip_range", self.clip_range)
        _require(
            isinstance(self.allow_no_dropout, bool),
            f"secagg allow_no_dropout must be true or false, got {self.allow_no_dropout!r}",
        )
        _require(
            isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups >= 1,
            f"secagg groups must be an integer >= 1, got {self.groups!r}",
        )
        # SecAgg+ needs n >= 3 in a group: with two, each learns the other's update.
        _require(
            isinstance(self.min_group_size, int) and self.min_group_size >= 3,
            f"secagg min_group_size must be an integer >= 3, got {self.min_group_size!r}",
        )
        _require(
            math.isfinite(self.clip_norm) and self.clip_norm >= 0,
            f"secagg clip_norm must be a finite number >= 0 (0: no bound), got {self.clip_norm}",
        )
        _require(
            self.enabled or (self.groups == 1 and self.clip_norm == 0),
            "secagg groups and clip_norm apply to secure aggregation, which is off",
        )
        _require(
            isinstance(self.value_bits, int) and 1 <= self.value_bits <= 24,
            f"secagg value_bits must be an integer in [1, 24], got {self.value_bits!r}",
        )
        _require(
            0.0 <= self.dropout_rate < 0.5,
            f"secagg dropout_rate must lie in [0, 0.5), got {self.dropout_rate}",
        )


@dataclass(frozen=True)
class ParticipationPolicy:
    """What a run must achieve to end ``completed`` (:mod:`fedguard.server.round_records`).

    ``min_silos_per_round``: the fewest silos whose updates a round aggregates (its
    contributors). A run in which rounds aggregated fewer ends ``degraded``, and
    ``failed`` if no round reached it: a model trained on one silo's updates is not
    a federated model. ``max_failed_rounds``: the most rounds that may fail (a SecAgg
    abort, an aggregation that could not run: the model is left unchanged); one more
    stops the run as ``failed`` (it can no longer do what it was asked), fewer but
    some end it ``degraded``. The defaults (2 and 1) make a run in which 4 of 6
    rounds aborted, or in which one silo of three trained, anything but completed.
    ``reply_timeout_s``: how long the server waits for a silo's reply before the
    silo counts as ``no-reply`` for that step (a silo that hangs then costs the
    round this long, not the whole run). Options: ``min-silos-per-round``,
    ``max-failed-rounds``, ``reply-timeout`` (:data:`fedguard.core.run_options.RUN_OPTIONS`).
    """

    min_silos_per_round: int = 2
    max_failed_rounds: int = 1
    reply_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name, value, low in (
            ("min-silos-per-round", self.min_silos_per_round, 1),
            ("max-failed-rounds", self.max_failed_rounds, 0),
        ):
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"{name} must be an integer >= {low}, got {value!r}",
            )
        positive("reply-timeout", self.reply_timeout_s)


class ModelFamily(StrEnum):
    """Which model a run trains (fedguard.core.models)."""

    AUTO = "auto"  # the CNN for images, the MLP for tables
    LOGISTIC = "logistic"  # one linear layer: logistic (softmax) regression
    MLP = "mlp"
    CNN = "cnn"
    FACTORY = "factory"  # the consortium's own torch module, from ``factory``


_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class ModelSpec:
    """Model architecture. ``hidden`` sizes apply to the tabular MLP.

    ``factory`` (family ``factory``): ``package.module:function``, called as
    ``function(input_shape=..., num_classes=...)`` and returning the ``nn.Module``.
    A silo never imports what the server names: it builds the model from the
    factory in its own node config and refuses unless the architecture's hash
    equals the one the server sent.
    """

    hidden: tuple[int, ...] = (64, 64)
    family: ModelFamily = ModelFamily.AUTO
    factory: str = ""

    def __post_init__(self) -> None:
        _require(
            len(self.hidden) >= 1 and all(isinstance(h, int) and h >= 1 for h in self.hidden),
            f"hidden sizes must be integers >= 1, got {self.hidden!r}",
        )
        _require(
            isinstance(self.family, ModelFamily),
            f"model family must be a ModelFamily, got {self.family!r}",
        )
        _require(
            (self.family is ModelFamily.FACTORY) == bool(self.factory),
            f"model family 'factory' and a model-factory go together, got family "
            f"{self.family.value!r} with factory {self.factory!r}",
        )
        _require(
            not self.factory or _FACTORY.fullmatch(self.factory) is not None,
            f"model-factory must read package.module:function, got {self.factory!r}",
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs (simulation adds clients, partition, engine)."""

    dataset: DatasetName = DatasetName.FLCHAIN
    num_clients: int = 5
    num_rounds: int = 10
    partition: PartitionSpec = field(
        default_factory=lambda: PartitionSpec(PartitionKind.DIRICHLET, alpha=1.0)
    )
    budget: PrivacyBudget = field(default_factory=lambda: PrivacyBudget(4.0, 1e-5))
    training: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    local_dp: LocalDPConfig = field(default_factory=LocalDPConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    secagg: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    aggregation: AggregatorConfig = field(default_factory=AggregatorConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    participation: ParticipationPolicy = field(default_factory=ParticipationPolicy)
    test_fraction: float = 0.2
    # L2 bound on each silo's update Δ = new − global (0: none). Silos clip to it; the
    # server rejects a plain update above it and checks secure sums against it.
    # Robustness, not privacy: it keeps one silo from blowing up the model. The
    # default leaves room over measured honest updates (docs in fedguard.server.norm_guard).
    update_clip_norm: float = UPDATE_CLIP_NORM_DEFAULT
    seed: int = 0
    out: Path = Path("runs")
    engine: Engine = Engine.RAY
    run_name: str | None = None
    # A consortium's own data contract (TOML; fedguard.core.contract); None: the
    # built-in ``dataset``'s own contract.
    contract_file: Path | None = None
    # The pooled table a simulation partitions across silos under ``contract_file``
    # (a researcher's own rows); None: the built-in data set's packaged rows.
    data_table: Path | None = None

    def __post_init__(self) -> None:
        _require(
            self.data_table is None or self.contract_file is not None,
            "a data table (--data) needs its data contract (--contract FILE)",
        )
        # Parsed once, here at the boundary; every schema of the run comes from it.
        contract = (
            packaged_contract(self.dataset.value)
            if self.contract_file is None
            else load_contract(self.contract_file)
        )
        object.__setattr__(self, "_contract", contract)
        # A run name is a folder name (out/<run-name>) and a Flower override value.
        _require(
            self.run_name is None
            or (isinstance(self.run_name, str) and _RUN_NAME.fullmatch(self.run_name) is not None),
            f"run-name must be 1-128 letters, digits, '.', '_' or '-' (not starting with "
            f"'.' or '-'), got {self.run_name!r}",
        )
        _require(
            isinstance(self.num_clients, int) and self.num_clients >= 1,
            f"clients must be an integer >= 1, got {self.num_clients!r}",
        )
        _require(
            isinstance(self.num_rounds, int) and self.num_rounds >= 1,
            f"rounds must be an integer >= 1, got {self.num_rounds!r}",
        )
        _require(
            0.0 < self.test_fraction < 1.0,
            f"test_fraction must lie in (0, 1), got {self.test_fraction}",
        )
        _require(
            isinstance(self.update_clip_norm, (int, float))
            and not isinstance(self.update_clip_norm, bool)
            and math.isfinite(self.update_clip_norm)
            and self.update_clip_norm >= 0,
            f"update clip norm must be a finite number >= 0 (0: none), "
            f"got {self.update_clip_norm!r}",
        )
        _require(
            isinstance(self.seed, int) and 0 <= self.seed < 2**63,
            f"seed must be an integer in [0, 2^63), got {self.seed!r}",
        )
        _require(
            self.participation.min_silos_per_round <= self.num_clients,
            f"min-silos-per-round {self.participation.min_silos_per_round} exceeds the "
            f"{self.num_clients} silo(s) of the run: lower min-silos-per-round",
        )
        self._check_aggregation()

    @property
    def contract(self) -> DataContract:
        """The run's data contract: the consortium's file, or the built-in data set's."""
        contract: DataContract = self.__dict__["_contract"]
        return contract

    @property
    def data_name(self) -> str:
        """The data set's name for reports and file names (the contract's name)."""
        return self.contract.name

    def _check_aggregation(self) -> None:
        """Refuse combinations that cannot give what they claim (never clamp silently)."""
        robust = self.aggregation.rule is not AggregatorName.WEIGHTED_MEAN
        if robust and self.central_dp.enabled:
            raise ConfigError(
                f"central DP's accounting covers the DP-FedAvg mean only; {self.aggregation.label}"
                " would be replaced by it: use the weighted mean with central DP"
            )
        if robust and self.secagg.enabled and self.secagg.groups == 1:
            raise ConfigError(
                f"{self.aggregation.label} needs several inputs, but secure aggregation over one "
                "group gives the server a single sum (a robust rule over it is a plain mean): "
                "set secagg groups > 1"
            )
        groups = self.secagg.groups
        if self.secagg.enabled and groups > 1:
            if self.central_dp.enabled:
                raise ConfigError("secure groups with central DP are not supported")
            if groups * self.secagg.min_group_size > self.num_clients:
                raise ConfigError(
                    f"{groups} secure groups of at least {self.secagg.min_group_size} silos need "
                    f"{groups * self.secagg.min_group_size} silos, the run has {self.num_clients}"
                )
        if (
            self.secagg.enabled
            and self.central_dp.enabled
            and self.secagg.clip_norm not in (0.0, self.central_dp.clip_norm)
        ):
            raise ConfigError(
                f"secagg clip_norm {self.secagg.clip_norm} differs from the central DP clip norm "
                f"{self.central_dp.clip_norm}; with central DP the silos clip to the latter"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (enums as their values, paths as strings)."""
        return _jsonable(asdict(self))  # type: ignore[no-any-return]

    def to_options(self) -> dict[str, Any]:
        """The flat option mapping :meth:`from_options` reads (TOML / run_config form), in
        the order of :data:`fedguard.core.run_options.RUN_OPTIONS`."""
        from fedguard.core.run_options import render_options

        return render_options(self)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RunConfig:
        """Parse a flat option mapping: a TOML file, CLI flags or Flower's ``run_config``.

        Keys are the long CLI option names without dashes in front (``target-epsilon``,
        :data:`fedguard.core.run_options.RUN_OPTIONS`); a missing key takes the default;
        an unknown key is an error, so a typo is never silently ignored.
        """
        from fedguard.core.run_options import parse_options

        config: RunConfig = parse_options(options)
        return config


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def dataclass_field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in fields(cls)}
