"""The flat options of a :class:`~fedguard.core.config.RunConfig`, in one table.

A flat option is one ``key = value`` of a run: a ``fedguard simulate`` flag
(``--target-epsilon 2``), a key of a TOML run file or of Flower's ``run_config``
(``target-epsilon = 2``). :data:`RUN_OPTIONS` lists every one of them once: its
name, the RunConfig field it sets, how its flat value parses and renders
(:class:`Codec`) and its command-line help (:class:`Group`, metavar, aliases).
Everything else is generated from the table:

* :func:`render_options`: ``RunConfig.to_options`` (and ``AggregatorConfig``'s),
  the serial form checkpoints and run files store, in table order;
* :func:`parse_options`: ``RunConfig.from_options`` (and ``AggregatorConfig``'s):
  an unknown key is an error, a missing or ``None`` one takes the default, every
  nested config is built through its constructor (so its validation runs);
* :func:`add_option_groups`: the argparse flags of ``fedguard simulate``, each
  with default ``None`` so that a flag not given leaves the TOML file or the
  default in charge.

Adding an option is one :class:`Option` entry (and the field it sets).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from fedguard.core.aggregation_config import (
    AggregatorName,
    CenterReference,
    PreAggregationName,
)
from fedguard.core.config import (
    DatasetName,
    Engine,
    GradSampleMode,
    ModelFamily,
    NoiseSource,
    OptimizerKind,
    PartitionKind,
    PartitionSpec,
    RunConfig,
)
from fedguard.core.errors import ConfigError
from fedguard.core.options import (
    as_bool,
    as_choice,
    as_float,
    as_floats,
    as_int,
    as_ints,
    float_text,
)
from fedguard.core.trust_config import TrustNoise

__all__ = [
    "AGGREGATION_OPTION_KEYS",
    "RUN_OPTIONS",
    "Codec",
    "Group",
    "Option",
    "add_option_groups",
    "parse_options",
    "render_options",
]


class Group(Enum):
    """The help section of ``fedguard simulate`` an option is listed in (its title)."""

    DATA = "data and consortium"
    TRAINING = "training"
    LOCAL_DP = "local DP-SGD (sample-level, per silo)"
    CENTRAL_DP = "central DP (user-level, on the server)"
    SECURE = "secure aggregation (SecAgg+: the server sees only sums)"
    PARTICIPATION = "participation policy (when a run counts as completed)"
    ROBUST = "robust aggregation"
    RUN = "run"
    TRUST = "trust layer (secure DP statistics after training; each charges every silo's ledger)"
    EXPLAIN = "explanations (trust layer: a secure DP statistic after training)"


def _same(value: Any) -> Any:
    return value


def _value(value: Any) -> Any:
    return value.value


@dataclass(frozen=True)
class Codec:
    """How one option's flat value becomes field value(s) and back.

    ``parse(name, flat)`` gives the field value (a tuple of them for an option with
    several fields); ``render`` is its inverse: ``parse(name, render(v)) == v``.
    ``arg_type`` and ``choices`` are what argparse checks on the command line (text
    when ``arg_type`` is None); a ``switch`` is a flag without a value (``--secagg``).
    """

    parse: Callable[[str, Any], Any]
    render: Callable[[Any], Any] = _same
    arg_type: Callable[[str], Any] | None = None
    choices: type[StrEnum] | None = None
    switch: bool = False


def choice(enum: type[StrEnum], parse: Callable[[str], StrEnum] | None = None) -> Codec:
    """One member of ``enum``, rendered as its value; ``parse``: the enum's own parser
    (``DatasetName.parse``), with its own error message."""
    if parse is None:
        return Codec(lambda name, value: as_choice(enum, name, value), _value, None, enum)
    return Codec(lambda name, value: parse(str(value)), _value, None, enum)


def optional(codec: Codec) -> Codec:
    """``codec``'s values, or ``None`` (unset; rendered as ``None``)."""
    return Codec(
        codec.parse,
        lambda value: None if value is None else codec.render(value),
        codec.arg_type,
        codec.choices,
    )


def _parse_partition(name: str, value: Any) -> tuple[PartitionKind, float | None, str | None]:
    spec = PartitionSpec.parse(str(value))
    return spec.kind, spec.alpha, spec.column


def _render_partition(value: tuple[PartitionKind, float | None, str | None]) -> str:
    kind, alpha, column = value
    return str(PartitionSpec(kind, alpha=alpha, column=column))


INT = Codec(as_int, arg_type=int)
FLOAT = Codec(as_float, arg_type=float)
SWITCH = Codec(as_bool, switch=True)
#: ``no-dp``: the switch that turns a field off.
NOT_SWITCH = Codec(lambda name, value: not as_bool(name, value), lambda on: not on, switch=True)
#: ``"64,64"`` <-> ``(64, 64)``.
INTS = Codec(as_ints, lambda sizes: ",".join(str(size) for size in sizes))
#: ``"60,70.5"`` <-> ``(60.0, 70.5)``, exactly (:func:`float_text`).
FLOATS = Codec(as_floats, lambda edges: ",".join(float_text(edge) for edge in edges))
#: A name where ``""`` means none (``run-name``).
NAME = Codec(lambda name, value: str(value) or None, lambda text: text or "")
#: A column name where blank means none (``fairness-attribute``).
COLUMN = Codec(lambda name, value: str(value).strip() or None, lambda text: text or "")
PATH = Codec(lambda name, value: Path(str(value)), str)
#: Text where ``""`` means none, kept as ``""`` (``model-factory``).
NAME_TEXT = Codec(lambda name, value: str(value).strip(), str)
#: ``iid``, ``dirichlet:ALPHA`` or ``column:NAME``: a partition's kind, alpha and column.
PARTITION = Codec(_parse_partition, _render_partition)
#: ``"nnm,bucketing"`` <-> the pre-aggregation steps, in order.
STEPS = Codec(
    lambda name, value: tuple(
        PreAggregationName.parse(step) for step in str(value).split(",") if step.strip()
    ),
    lambda steps: ",".join(step.value for step in steps),
)


@dataclass(frozen=True)
class Option:
    """One flat option: ``--NAME`` on the command line, ``NAME`` in TOML and run_config.

    ``path``: the RunConfig field it sets (``("budget", "epsilon")``); ``joint``: other
    fields of the same config its value sets too (``partition`` sets kind, alpha and
    column). ``help`` is completed with the default (``[default: 4.0]``, from the
    default RunConfig) unless ``default_text`` says otherwise; switches and options
    whose default is unset show none. ``blank_is_unset``: ``""`` reads as unset (the
    aggregation options, whose unset parameters a TOML file cannot spell as null).
    """

    name: str
    path: tuple[str, ...]
    codec: Codec
    group: Group
    help: str
    joint: tuple[str, ...] = ()
    metavar: str | None = None
    aliases: tuple[str, ...] = ()
    default_text: str | None = None
    blank_is_unset: bool = False

    @property
    def owner(self) -> tuple[str, ...]:
        """Path of the config holding the option's field(s) (``()``: RunConfig)."""
        return self.path[:-1]

    @property
    def field_names(self) -> tuple[str, ...]:
        """The field(s) of :attr:`owner` the option sets."""
        return (self.path[-1], *self.joint)

    @property
    def dest(self) -> str:
        """The argparse attribute (``target_epsilon``)."""
        return self.name.replace("-", "_")


#: Every option of a run, in ``to_options`` order.
RUN_OPTIONS: tuple[Option, ...] = (
    Option("dataset", ("dataset",), choice(DatasetName, DatasetName.parse), Group.DATA,
           "built-in data set"),
    Option("contract", ("contract_file",), optional(PATH), Group.DATA,
           "the consortium's data contract (TOML; default: the built-in data set's)",
           metavar="FILE"),
    Option("data", ("data_table",), optional(PATH), Group.DATA,
           "simulation: a pooled CSV/Parquet table under --contract, split across silos",
           metavar="TABLE"),
    Option("clients", ("num_clients",), INT, Group.DATA, "number of silos"),
    Option("rounds", ("num_rounds",), INT, Group.TRAINING, "federated rounds"),
    Option("partition", ("partition", "kind"), PARTITION, Group.DATA,
           "how rows are split across silos", joint=("alpha", "column"),
           metavar="{iid,dirichlet:ALPHA,column:NAME}"),
    Option("min-silo-size", ("partition", "min_silo_size"), INT, Group.DATA,
           "smallest silo a partition may leave"),
    Option("target-epsilon", ("budget", "epsilon"), FLOAT, Group.LOCAL_DP, "each silo's ε budget"),
    Option("delta", ("budget", "delta"), FLOAT, Group.LOCAL_DP, "each silo's δ"),
    Option("local-epochs", ("training", "local_epochs"), INT, Group.TRAINING,
           "local epochs per round"),
    Option("batch-size", ("training", "batch_size"), INT, Group.TRAINING,
           "expected (Poisson) batch size"),
    Option("learning-rate", ("training", "learning_rate"), FLOAT, Group.TRAINING,
           "local learning rate"),
    Option("optimizer", ("training", "optimizer"), choice(OptimizerKind), Group.TRAINING,
           "local optimizer"),
    Option("momentum", ("training", "momentum"), FLOAT, Group.TRAINING, "SGD momentum"),
    Option("no-dp", ("local_dp", "enabled"), NOT_SWITCH, Group.LOCAL_DP,
           "non-private baseline: same everything else, no clipping or noise"),
    Option("max-grad-norm", ("local_dp", "max_grad_norm"), FLOAT, Group.LOCAL_DP,
           "per-sample gradient clipping norm"),
    Option("grad-sample-mode", ("local_dp", "grad_sample_mode"), choice(GradSampleMode),
           Group.LOCAL_DP, "Opacus per-sample gradient engine"),
    Option("noise-source", ("local_dp", "noise_source"), choice(NoiseSource), Group.LOCAL_DP,
           "csprng: AES-CTR from the OS; seeded: reproducible, research only"),
    Option("max-noise-multiplier", ("local_dp", "max_noise_multiplier"), FLOAT, Group.LOCAL_DP,
           "largest σ a silo accepts before calling the budget infeasible"),
    Option("scaler-epsilon", ("local_dp", "scaler_epsilon"), FLOAT, Group.LOCAL_DP,
           "ε each silo spends on the DP feature moments of the federated scaler (released once, "
           "before round 1)"),
    Option("central-dp", ("central_dp", "enabled"), SWITCH, Group.CENTRAL_DP,
           "add DP-FedAvg: clip each silo's update, Gaussian noise on the sum"),
    Option("central-clip-norm", ("central_dp", "clip_norm"), FLOAT, Group.CENTRAL_DP,
           "L2 bound on a silo's update"),
    Option("central-noise-multiplier", ("central_dp", "noise_multiplier"), FLOAT, Group.CENTRAL_DP,
           "noise std / clip norm"),
    Option("client-sampling-rate", ("central_dp", "client_sampling_rate"), FLOAT, Group.CENTRAL_DP,
           "Poisson rate of silo sampling"),
    Option("central-delta", ("central_dp", "delta"), FLOAT, Group.CENTRAL_DP,
           "δ of the central guarantee"),
    Option("central-epsilon-budget", ("central_dp", "epsilon_budget"), FLOAT, Group.CENTRAL_DP,
           "training stops before a round that would take the central ε past this (no "
           "amplification by sampling is credited)"),
    Option("secagg", ("secagg", "enabled"), SWITCH, Group.SECURE,
           "aggregate with fedguard's SecAgg+ (X25519, Shamir, AES-CTR masks)"),
    Option("secagg-clip-range", ("secagg", "clip_range"), FLOAT, Group.SECURE,
           "each update coordinate is clipped to ±this before fixed-point encoding; clipped "
           "values are counted"),
    Option("secagg-value-bits", ("secagg", "value_bits"), INT, Group.SECURE,
           "fixed-point bits per value"),
    Option("secagg-dropout-rate", ("secagg", "dropout_rate"), FLOAT, Group.SECURE,
           "planned dropout share, sets the neighbour degree and threshold"),
    Option("secagg-groups", ("secagg", "groups"), INT, Group.SECURE,
           "split each round's silos into this many random secure groups; the robust rule runs "
           "over the group means", aliases=("groups",)),
    Option("secagg-min-group-size", ("secagg", "min_group_size"), INT, Group.SECURE,
           "smallest secure group a round may form", aliases=("min-group-size",)),
    Option("secagg-clip-norm", ("secagg", "clip_norm"), FLOAT, Group.SECURE,
           "silos clip their update to this L2 norm before masking; a group mean above it is "
           "flagged and left out (0: the --update-clip-norm)", aliases=("clip-norm",)),
    Option("secagg-allow-no-dropout", ("secagg", "allow_no_dropout"), SWITCH, Group.SECURE,
           "run a SecAgg configuration in which one silo's dropout aborts the round (refused "
           "otherwise; see the README's small-consortia table)"),
    Option("aggregator", ("aggregation", "rule"), choice(AggregatorName, AggregatorName.parse),
           Group.ROBUST, "aggregation rule", blank_is_unset=True),
    Option("aggregator-f", ("aggregation", "f"), INT, Group.ROBUST,
           "Byzantine inputs (updates, or groups with --groups) the rule must tolerate",
           default_text="with --attack, the number of Byzantine silos (at most --groups); else 0",
           blank_is_unset=True),
    Option("trim-fraction", ("aggregation", "trim_fraction"), optional(FLOAT), Group.ROBUST,
           "trimmed mean: β", blank_is_unset=True),
    Option("multi-krum-m", ("aggregation", "multi_krum_m"), optional(INT), Group.ROBUST,
           "multi-krum: inputs kept", blank_is_unset=True),
    Option("geomed-iterations", ("aggregation", "geomed_iterations"), optional(INT), Group.ROBUST,
           "geometric median: Weiszfeld steps", blank_is_unset=True),
    Option("geomed-nu", ("aggregation", "geomed_nu"), optional(FLOAT), Group.ROBUST,
           "geometric median: ν", blank_is_unset=True),
    Option("geomed-tolerance", ("aggregation", "geomed_tolerance"), optional(FLOAT), Group.ROBUST,
           "geometric median: stop tolerance", blank_is_unset=True),
    Option("cc-tau", ("aggregation", "cc_tau"), optional(FLOAT), Group.ROBUST,
           "centered clipping: τ", blank_is_unset=True),
    Option("cc-iterations", ("aggregation", "cc_iterations"), optional(INT), Group.ROBUST,
           "centered clipping: L", blank_is_unset=True),
    Option("cc-reference", ("aggregation", "cc_reference"),
           optional(choice(CenterReference, CenterReference.parse)), Group.ROBUST,
           "centered clipping: start from zero or the previous aggregate", blank_is_unset=True),
    Option("norm-bound", ("aggregation", "norm_bound"), optional(FLOAT), Group.ROBUST,
           "norm bounding: bound", blank_is_unset=True),
    Option("pre-aggregation", ("aggregation", "pre_aggregation"), STEPS, Group.ROBUST,
           "comma-separated steps before the rule: nnm, bucketing (e.g. nnm,bucketing)",
           blank_is_unset=True),
    Option("bucket-size", ("aggregation", "bucket_size"), optional(INT), Group.ROBUST,
           "bucketing: s", blank_is_unset=True),
    Option("aggregation-seed", ("aggregation", "seed"), INT, Group.ROBUST,
           "seed of bucketing's permutations", blank_is_unset=True),
    Option("fairness-attribute", ("trust", "fairness_attribute"), COLUMN, Group.TRUST,
           "audit the final model by cohort of this raw column (flchain: sex, age; credit: Age, "
           "Marital, Home, ...)", metavar="COLUMN"),
    Option("fairness-bands", ("trust", "fairness_bands"), FLOATS, Group.TRUST,
           "band edges of a numeric attribute, e.g. 60,70,80 (age has defaults)", metavar="EDGES"),
    Option("fairness-epsilon", ("trust", "fairness_epsilon"), FLOAT, Group.TRUST,
           "ε per silo of the audit"),
    Option("drift", ("trust", "drift"), SWITCH, Group.TRUST,
           "keep a DP drift reference of the training inputs (for fedguard monitor)"),
    Option("drift-bins", ("trust", "drift_bins"), INT, Group.TRUST,
           "histogram bins per feature, fixed at training time"),
    Option("drift-threshold", ("trust", "drift_threshold"), FLOAT, Group.TRUST,
           "PSI above which a feature alerts"),
    Option("drift-epsilon", ("trust", "drift_epsilon"), FLOAT, Group.TRUST,
           "ε per silo of each drift release"),
    Option("drift-monitor-rounds", ("trust", "monitor_rounds"), INT, Group.TRUST,
           "monitoring rounds each silo keeps budget for"),
    Option("explain", ("trust", "explain"), SWITCH, Group.EXPLAIN,
           "global Integrated-Gradients attributions of the final model (and of the student at "
           "fedguard export), each charged to every silo's ledger"),
    Option("explain-epsilon", ("trust", "explain_epsilon"), FLOAT, Group.EXPLAIN,
           "ε per silo of one release"),
    Option("explain-steps", ("trust", "explain_steps"), INT, Group.EXPLAIN, "integration steps"),
    Option("explain-clip-norm", ("trust", "explain_clip_norm"), FLOAT, Group.EXPLAIN,
           "L2 bound C on one record's attributions"),
    Option("trust-noise", ("trust", "noise"), choice(TrustNoise), Group.TRUST,
           "none: exact sums without DP, research only"),
    Option("hidden", ("model", "hidden"), INTS, Group.TRAINING,
           "hidden layer sizes of the tabular MLP", metavar="H1,H2,..."),
    Option("model", ("model", "family"), choice(ModelFamily), Group.TRAINING,
           "model family (auto: a CNN for images, an MLP for tables)"),
    Option("model-factory", ("model", "factory"), NAME_TEXT, Group.TRAINING,
           "your own torch model: package.module:function (with --model factory)",
           metavar="MODULE:FUNCTION"),
    Option("min-silos-per-round", ("participation", "min_silos_per_round"), INT,
           Group.PARTICIPATION, "fewest silos whose updates a round must aggregate; a run "
           "with rounds below it ends degraded (failed if no round reaches it)"),
    Option("max-failed-rounds", ("participation", "max_failed_rounds"), INT, Group.PARTICIPATION,
           "most rounds that may fail (aborted, no aggregate) before the run stops as failed; a "
           "run with fewer, but some, ends degraded"),
    Option("reply-timeout", ("participation", "reply_timeout_s"), FLOAT, Group.PARTICIPATION,
           "seconds the server waits for a silo's reply before it counts as no reply",
           metavar="S"),
    Option("test-fraction", ("test_fraction",), FLOAT, Group.DATA,
           "held-out test share of each silo"),
    Option("update-clip-norm", ("update_clip_norm",), FLOAT, Group.TRAINING,
           "L2 bound on each silo's update (new - global): silos clip to it, the server rejects "
           "a larger one and checks secure sums against it (0: off)"),
    Option("seed", ("seed",), INT, Group.RUN, "seed of everything seeded"),
    Option("out", ("out",), PATH, Group.RUN, "folder for run folders"),
    Option("engine", ("engine",), choice(Engine), Group.RUN,
           "ray: Flower's simulation engine; inprocess: one process, no Ray"),
    Option("run-name", ("run_name",), NAME, Group.RUN,
           "name of the run folder", default_text="DATASET-TIMESTAMP"),
)  # fmt: skip

#: The options of the aggregation rule (:class:`AggregatorConfig`), in ``to_options`` order.
AGGREGATION_OPTION_KEYS: tuple[str, ...] = tuple(
    o.name for o in RUN_OPTIONS if o.owner == ("aggregation",)
)


def _section(section: tuple[str, ...]) -> tuple[Option, ...]:
    """The options under ``section`` (``()``: all of them)."""
    return tuple(o for o in RUN_OPTIONS if o.path[: len(section)] == section)


def _at(value: Any, path: Iterable[str]) -> Any:
    for name in path:
        value = getattr(value, name)
    return value


def render_options(config: Any, section: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flat options of ``config``: a RunConfig, or its part at ``section``
    (``("aggregation",)``: an ``AggregatorConfig``), in table order."""
    rendered: dict[str, Any] = {}
    for o in _section(section):
        owner = _at(config, o.owner[len(section) :])
        values = tuple(getattr(owner, name) for name in o.field_names)
        rendered[o.name] = o.codec.render(values if o.joint else values[0])
    return rendered


def parse_options(options: Mapping[str, Any], section: tuple[str, ...] = ()) -> Any:
    """The config (RunConfig, or its part at ``section``) that flat ``options`` describe.

    An unknown key is a :class:`ConfigError` naming the known ones; a missing or
    ``None`` key (``""`` too where ``blank_is_unset``) takes the field's value in the
    default RunConfig; a value that does not parse is a ConfigError; every config is
    built through its constructor, so its own checks run on what was parsed.
    """
    table = _section(section)
    known = sorted(o.name for o in table)
    unknown = sorted(set(options) - set(known))
    if unknown:
        label = " ".join([*section[-1:], "option(s)"])
        raise ConfigError(f"unknown {label} {unknown}; known: {known}")
    values: dict[tuple[str, ...], Any] = {}
    try:
        for o in table:
            flat = options.get(o.name)
            if flat is None or (o.blank_is_unset and flat == ""):
                continue
            parsed = o.codec.parse(o.name, flat)
            for name, value in zip(o.field_names, parsed if o.joint else (parsed,), strict=True):
                values[(*o.owner[len(section) :], name)] = value
        return _build(_at(RunConfig(), section), values, ())
    except (TypeError, ValueError) as bad:
        if isinstance(bad, ConfigError):
            raise
        raise ConfigError(str(bad)) from None


def _build(default: Any, values: Mapping[tuple[str, ...], Any], path: tuple[str, ...]) -> Any:
    """``default``'s class made from ``values`` (by field path), ``default``'s own elsewhere."""
    kwargs: dict[str, Any] = {}
    for f in fields(default):
        here, current = (*path, f.name), getattr(default, f.name)
        if here in values:
            kwargs[f.name] = values[here]
        elif is_dataclass(current) and not isinstance(current, type):
            kwargs[f.name] = _build(current, values, here)
        else:
            kwargs[f.name] = current
    return type(default)(**kwargs)


def _help(option: Option, default: Any) -> str:
    shown = option.default_text
    if shown is None and not option.codec.switch and default not in (None, ""):
        shown = str(default)
    return option.help if shown is None else f"{option.help} [default: {shown}]"


def _add_flag(group: argparse._ArgumentGroup, option: Option, default: Any) -> None:
    flags = [f"--{option.name}", *(f"--{alias}" for alias in option.aliases)]
    kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": _help(option, default)}
    codec = option.codec
    if codec.switch:
        kwargs["action"] = "store_true"
    else:
        kwargs["metavar"] = option.metavar
        if codec.arg_type is not None:
            kwargs["type"] = codec.arg_type
        if codec.choices is not None:
            kwargs["choices"] = [member.value for member in codec.choices]
    group.add_argument(*flags, **kwargs)


def add_option_groups(
    parser: argparse.ArgumentParser, groups: Iterable[Group]
) -> dict[Group, argparse._ArgumentGroup]:
    """``--NAME`` flags (default ``None``: the TOML file or the config decides) for the
    options of ``groups``, one argparse group each, in this order."""
    defaults = RunConfig().to_options()
    made: dict[Group, argparse._ArgumentGroup] = {}
    for group in groups:
        made[group] = parser.add_argument_group(group.value)
        for option in RUN_OPTIONS:
            if option.group is group:
                _add_flag(made[group], option, defaults[option.name])
    return made
