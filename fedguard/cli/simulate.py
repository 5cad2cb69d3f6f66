"""``fedguard simulate``: a consortium of silos simulated on this machine.

Every option can also live in a TOML file (``--config run.toml``) under the same
name without the leading dashes; flags given on the command line win over the
file. Top-level imports stay free of torch, pandas and Flower (the runner is
imported when the command runs).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedguard.cli.edge import add_simulate_export_option, export_after_simulate
from fedguard.cli.explain import add_explain_options
from fedguard.cli.monitor import add_trust_options
from fedguard.core.aggregation_config import AggregatorName, CenterReference
from fedguard.core.config import (
    DatasetName,
    Engine,
    GradSampleMode,
    NoiseSource,
    OptimizerKind,
    RunConfig,
)
from fedguard.core.errors import ConfigError
from fedguard.core.options import PARTICIPATION_OPTIONS, add_table_options
from fedguard.runs.layout import silo_id
from fedguard.simulation.attack_config import AttackConfig, AttackName, declares_f

__all__ = ["add_simulate_command", "attack_from_args", "cmd_simulate", "config_from_args"]

_DEFAULTS = RunConfig().to_options()


def _choices(enum: Any) -> list[str]:
    return [m.value for m in enum]


def add_simulate_command(sub: Any) -> argparse.ArgumentParser:
    """``fedguard simulate`` (its handler: :func:`cmd_simulate`)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="simulate a consortium of silos on this machine",
        description=(
            "Simulate a consortium: a built-in data set split across silos, each training "
            "locally with DP-SGD under a persistent privacy ledger, aggregated by the server. "
            "By default the DP run is followed by its non-private twin (--no-baseline skips it). "
            "Writes OUT/RUN/report.json, report.md and PNG plots."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = _DEFAULTS
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="TOML file with any of these options (keys without leading dashes)",
    )
    _data_options(p, d)
    _training_options(p, d)
    _local_dp_options(p, d)
    _central_dp_options(p, d)
    secure = _secure_options(p, d)
    participation = p.add_argument_group("participation policy (when a run counts as completed)")
    add_table_options(participation, PARTICIPATION_OPTIONS, d)
    _secure_group_options(secure, d)
    _robust_options(p, d)
    _attack_options(p)
    _run_options(p, d)
    add_simulate_export_option(p)
    add_trust_options(p)
    add_explain_options(p)
    p.set_defaults(handler=cmd_simulate)
    return p


def _data_options(p: argparse.ArgumentParser, d: Mapping[str, Any]) -> None:
    """``--dataset``, ``--clients``, the partition and the test share."""
    data = p.add_argument_group("data and consortium")
    data.add_argument(
        "--dataset",
        choices=_choices(DatasetName),
        default=None,
        help=f"built-in data set [default: {d['dataset']}]",
    )
    data.add_argument(
        "--clients", type=int, default=None, help=f"number of silos [default: {d['clients']}]"
    )
    data.add_argument(
        "--partition",
        default=None,
        metavar="{iid,dirichlet:ALPHA,column:NAME}",
        help=f"how rows are split across silos [default: {d['partition']}]",
    )
    data.add_argument(
        "--min-silo-size",
        type=int,
        default=None,
        help=f"smallest silo a partition may leave [default: {d['min-silo-size']}]",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help=f"held-out test share of each silo [default: {d['test-fraction']}]",
    )


def _training_options(p: argparse.ArgumentParser, d: Mapping[str, Any]) -> None:
    """Local training: rounds, epochs, batches, optimizer, the MLP, the update bound."""
    train = p.add_argument_group("training")
    train.add_argument(
        "--rounds", type=int, default=None, help=f"federated rounds [default: {d['rounds']}]"
    )
    train.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help=f"local epochs per round [default: {d['local-epochs']}]",
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"expected (Poisson) batch size [default: {d['batch-size']}]",
    )
    train.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help=f"local learning rate [default: {d['learning-rate']}]",
    )
    train.add_argument(
        "--optimizer",
        choices=_choices(OptimizerKind),
        default=None,
        help=f"local optimizer [default: {d['optimizer']}]",
    )
    train.add_argument(
        "--momentum", type=float, default=None, help=f"SGD momentum [default: {d['momentum']}]"
    )
    train.add_argument(
        "--hidden",
        default=None,
        metavar="H1,H2,...",
        help=f"hidden layer sizes of the tabular MLP [default: {d['hidden']}]",
    )
    train.add_argument(
        "--update-clip-norm",
        type=float,
        default=None,
        help="L2 bound on each silo's update (new - global): silos clip to it, the server "
        f"rejects a larger one and checks secure sums against it (0: off) "
        f"[default: {d['update-clip-norm']}]",
    )


def _local_dp_options(p: argparse.ArgumentParser, d: Mapping[str, Any]) -> None:
    """Local DP-SGD, each silo's sample-level guarantee."""
    privacy = p.add_argument_group("local DP-SGD (sample-level, per silo)")
    privacy.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help=f"each silo's ε budget [default: {d['target-epsilon']}]",
    )
    privacy.add_argument(
        "--delta", type=float, default=None, help=f"each silo's δ [default: {d['delta']}]"
    )
    privacy.add_argument(
        "--no-dp",
        action="store_true",
        default=None,
        help="non-private baseline: same everything else, no clipping or noise",
    )
    privacy.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help=f"per-sample gradient clipping norm [default: {d['max-grad-norm']}]",
    )
    privacy.add_argument(
        "--grad-sample-mode",
        choices=_choices(GradSampleMode),
        default=None,
        help=f"Opacus per-sample gradient engine [default: {d['grad-sample-mode']}]",
    )
    privacy.add_argument(
        "--noise-source",
        choices=_choices(NoiseSource),
        default=None,
        help=f"csprng: AES-CTR from the OS; seeded: reproducible, research only "
        f"[default: {d['noise-source']}]",
    )
    privacy.add_argument(
        "--max-noise-multiplier",
        type=float,
        default=None,
        help=f"largest σ a silo accepts before calling the budget infeasible "
        f"[default: {d['max-noise-multiplier']}]",
    )
    privacy.add_argument(
        "--scaler-epsilon",
        type=float,
        default=None,
        help=f"ε each silo spends on the DP feature moments of the federated scaler "
        f"(released once, before round 1) [default: {d['scaler-epsilon']}]",
    )


def _central_dp_options(p: argparse.ArgumentParser, d: Mapping[str, Any]) -> None:
    """Central DP (DP-FedAvg on the server), the user-level guarantee."""
    central = p.add_argument_group("central DP (user-level, on the server)")
    central.add_argument(
        "--central-dp",
        action="store_true",
        default=None,
        help="add DP-FedAvg: clip each silo's update, Gaussian noise on the sum",
    )
    central.add_argument(
        "--central-clip-norm",
        type=float,
        default=None,
        help=f"L2 bound on a silo's update [default: {d['central-clip-norm']}]",
    )
    central.add_argument(
        "--central-noise-multiplier",
        type=float,
        default=None,
        help=f"noise std / clip norm [default: {d['central-noise-multiplier']}]",
    )
    central.add_argument(
        "--client-sampling-rate",
        type=float,
        default=None,
        help=f"Poisson rate of silo sampling [default: {d['client-sampling-rate']}]",
    )
    central.add_argument(
        "--central-delta",
        type=float,
        default=None,
        help=f"δ of the central guarantee [default: {d['central-delta']}]",
    )
    central.add_argument(
        "--central-epsilon-budget",
        type=float,
        default=None,
        help="training stops before a round that would take the central ε past this "
        f"(no amplification by sampling is credited) [default: {d['central-epsilon-budget']}]",
    )


def _secure_options(p: argparse.ArgumentParser, d: Mapping[str, Any]) -> argparse._ArgumentGroup:
    """Secure aggregation's own options (its grouping ones: :func:`_secure_group_options`)."""
    secure = p.add_argument_group("secure aggregation (SecAgg+: the server sees only sums)")
    secure.add_argument(
        "--secagg",
        action="store_true",
        default=None,
        help="aggregate with fedguard's SecAgg+ (X25519, Shamir, AES-CTR masks)",
    )
    secure.add_argument(
        "--secagg-clip-range",
        type=float,
        default=None,
        help=f"each update coordinate is clipped to ±this before fixed-point "
        f"encoding; clipped values are counted [default: {d['secagg-clip-range']}]",
    )
    secure.add_argument(
        "--secagg-value-bits",
        type=int,
        default=None,
        help=f"fixed-point bits per value [default: {d['secagg-value-bits']}]",
    )
    secure.add_argument(
        "--secagg-dropout-rate",
        type=float,
        default=None,
        help=f"planned dropout share, sets the neighbour degree and threshold "
        f"[default: {d['secagg-dropout-rate']}]",
    )
    secure.add_argument(
        "--secagg-allow-no-dropout",
        action="store_true",
        default=None,
        help="run a SecAgg configuration in which one silo's dropout aborts the round "
        "(refused otherwise; see the README's small-consortia table)",
    )
    return secure


def _secure_group_options(secure: argparse._ArgumentGroup, d: Mapping[str, Any]) -> None:
    """Secure groups (added after the participation options, as ever)."""
    secure.add_argument(
        "--secagg-groups",
        "--groups",
        dest="secagg_groups",
        type=int,
        default=None,
        help="split each round's silos into this many random secure groups; the robust "
        f"rule runs over the group means [default: {d['secagg-groups']}]",
    )
    secure.add_argument(
        "--secagg-min-group-size",
        "--min-group-size",
        dest="secagg_min_group_size",
        type=int,
        default=None,
        help=f"smallest secure group a round may form [default: {d['secagg-min-group-size']}]",
    )
    secure.add_argument(
        "--secagg-clip-norm",
        "--clip-norm",
        dest="secagg_clip_norm",
        type=float,
        default=None,
        help="silos clip their update to this L2 norm before masking; a group mean above "
        "it is flagged and left out (0: the --update-clip-norm) [default: 0]",
    )


def _robust_options(p: argparse.ArgumentParser, d: Mapping[str, Any]) -> None:
    """The robust aggregation rule and its parameters."""
    robust = p.add_argument_group("robust aggregation")
    robust.add_argument(
        "--aggregator",
        choices=_choices(AggregatorName),
        default=None,
        help=f"aggregation rule [default: {d['aggregator']}]",
    )
    robust.add_argument(
        "--aggregator-f",
        type=int,
        default=None,
        help="Byzantine inputs (updates, or groups with --groups) the rule must tolerate "
        "[default: with --attack, the number of Byzantine silos (at most --groups); else 0]",
    )
    robust.add_argument("--trim-fraction", type=float, default=None, help="trimmed mean: β")
    robust.add_argument("--multi-krum-m", type=int, default=None, help="multi-krum: inputs kept")
    robust.add_argument("--cc-tau", type=float, default=None, help="centered clipping: τ")
    robust.add_argument("--cc-iterations", type=int, default=None, help="centered clipping: L")
    robust.add_argument(
        "--cc-reference",
        choices=_choices(CenterReference),
        default=None,
        help="centered clipping: start from zero or the previous aggregate",
    )
    robust.add_argument(
        "--geomed-iterations", type=int, default=None, help="geometric median: Weiszfeld steps"
    )
    robust.add_argument("--geomed-nu", type=float, default=None, help="geometric median: ν")
    robust.add_argument(
        "--geomed-tolerance", type=float, default=None, help="geometric median: stop tolerance"
    )
    robust.add_argument("--norm-bound", type=float, default=None, help="norm bounding: bound")
    robust.add_argument(
        "--pre-aggregation",
        default=None,
        help="comma-separated steps before the rule: nnm, bucketing (e.g. nnm,bucketing)",
    )
    robust.add_argument("--bucket-size", type=int, default=None, help="bucketing: s")
    robust.add_argument(
        "--aggregation-seed", type=int, default=None, help="seed of bucketing's permutations"
    )


def _attack_options(p: argparse.ArgumentParser) -> None:
    """The simulated Byzantine silos' attack."""
    attacks = p.add_argument_group("attacks (simulation only: Byzantine silos)")
    attacks.add_argument(
        "--attack", choices=_choices(AttackName), default=None, help="the Byzantine silos' attack"
    )
    attacks.add_argument(
        "--byzantine", type=float, default=None, help="share of Byzantine silos [default: 0.2]"
    )
    attacks.add_argument(
        "--collusion",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Byzantine silos pool their honest updates [default: on]",
    )
    attacks.add_argument(
        "--attack-strength",
        type=float,
        default=None,
        help="sign-flip magnitude, scaling/backdoor boost, gaussian σ, alie z or ipm ε "
        "[default: per attack]",
    )
    attacks.add_argument(
        "--backdoor-target", type=int, default=None, help="backdoor target class [default: 0]"
    )
    attacks.add_argument(
        "--poison-fraction",
        type=float,
        default=None,
        help="share of a backdoor silo's examples stamped [default: 0.5]",
    )


def _run_options(p: argparse.ArgumentParser, d: Mapping[str, Any]) -> None:
    """Seed, output folder, engine, baseline and progress lines."""
    run = p.add_argument_group("run")
    run.add_argument(
        "--seed", type=int, default=None, help=f"seed of everything seeded [default: {d['seed']}]"
    )
    run.add_argument("--out", default=None, help=f"folder for run folders [default: {d['out']}]")
    run.add_argument(
        "--run-name", default=None, help="name of the run folder [default: DATASET-TIMESTAMP]"
    )
    run.add_argument(
        "--engine",
        choices=_choices(Engine),
        default=None,
        help=f"ray: Flower's simulation engine; inprocess: one process, no Ray "
        f"[default: {d['engine']}]",
    )
    run.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the non-private twin and compare",
    )
    run.add_argument("--quiet", action="store_true", help="no per-round progress lines")


_ATTACK_OPTIONS = {
    "attack",
    "byzantine",
    "collusion",
    "attack_strength",
    "backdoor_target",
    "poison_fraction",
}
_NOT_OPTIONS = {"command", "handler", "config", "baseline", "quiet", "export"} | _ATTACK_OPTIONS


def attack_from_args(args: argparse.Namespace) -> AttackConfig | None:
    """The simulated attack (``None`` without ``--attack``); its options need ``--attack``."""
    given = {k: v for k, v in vars(args).items() if k in _ATTACK_OPTIONS and v is not None}
    if "attack" not in given:
        if given:
            raise ConfigError(f"{sorted(given)} need --attack")
        return None
    return AttackConfig.from_options({k.replace("_", "-"): v for k, v in given.items()})


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's :class:`RunConfig`: ``--config``'s TOML, the flags given over it."""
    options: dict[str, Any] = {}
    if args.config is not None:
        try:
            options.update(tomllib.loads(Path(args.config).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {args.config} does not exist") from None
        except tomllib.TOMLDecodeError as bad:
            raise ConfigError(f"config file {args.config} is not valid TOML: {bad}") from None
    for key, value in vars(args).items():
        if key in _NOT_OPTIONS or value is None:
            continue
        options[key.replace("_", "-")] = value
    attack = attack_from_args(args) if hasattr(args, "attack") else None
    rule = str(options.get("aggregator", AggregatorName.WEIGHTED_MEAN.value))
    if attack is not None and options.get("aggregator-f") is None and declares_f(rule):
        # An f the rule cannot meet is refused by RunConfig, never lowered.
        options["aggregator-f"] = attack.default_f(
            int(options.get("clients", _DEFAULTS["clients"])),
            int(options.get("seed", 0)),
            int(options.get("secagg-groups", 1)),
        )
    return RunConfig.from_options(options)


def _progress(variant: str, record: Any) -> None:
    ev = record.evaluation
    auc = f" auc {ev.auc:.3f}" if ev.auc is not None else ""
    eps = max(record.silo_epsilon.values()) if record.silo_epsilon else None
    eps_text = f" max ε {eps:.2f}" if eps is not None else ""
    if record.central_epsilon is not None:
        eps_text += f" central ε {record.central_epsilon:.2f}"
    extra = ""
    if record.round > 0:
        extra = (
            f" | {record.count('ok')}/{record.sampled} accepted"
            + (f", {record.count('refused')} refused" if record.count("refused") else "")
            + (f", {record.count('rejected')} rejected" if record.count("rejected") else "")
            + (f", {record.count('error')} failed" if record.count("error") else "")
        )
    print(
        f"[{variant}] round {record.round:>3}: loss {ev.loss:.4f} acc {ev.accuracy:.3f}{auc}"
        f"{eps_text}{extra} ({record.seconds:.1f}s)",
        flush=True,
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedguard simulate``: 0 if every variant completed, 3 if one ended degraded or
    stopped, 1 if one failed (as ``fedguard run --wait``)."""
    from fedguard.simulation.report import summary_table, write_report
    from fedguard.simulation.runner import simulate

    config = config_from_args(args)
    attack = attack_from_args(args)
    if attack is not None:
        from fedguard.aggregation.registry import check_inputs_suffice

        inputs = config.secagg.groups if config.secagg.enabled else config.num_clients
        check_inputs_suffice(config.aggregation, inputs)
        byzantine = attack.byzantine_indices(config.num_clients, config.seed)
        print(
            f"attack {attack.name.value}: Byzantine silos "
            + ", ".join(silo_id(i) for i in byzantine)
            + (" (colluding)" if attack.collusion else "")
        )
    run_dir, results, plans = simulate(
        config,
        baseline=args.baseline,
        on_round=None if args.quiet else _progress,
        attack=attack,
    )
    if attack is not None:
        _write_attack_summary(run_dir, config, attack, results)
    paths = write_report(run_dir, config, results, plans)
    import json

    report = json.loads(paths["json"].read_text())
    print()
    print(summary_table(config, report))
    print(f"\nrun folder: {run_dir}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    if args.export == "edge":
        export_after_simulate(run_dir)
    # As `fedguard run --wait`: 0 only if every variant completed, 3 if one ended
    # degraded or stopped on the central budget, 1 if one failed.
    statuses = {str((r.outcome or {}).get("status", "completed")) for r in results}
    if statuses - {"completed", "degraded", "stopped"}:
        return 1
    return 3 if statuses - {"completed"} else 0


def _write_attack_summary(
    run_dir: Path, config: RunConfig, attack: AttackConfig, results: Any
) -> None:
    """``attack.json``: the attack, its silos and, for a backdoor, its success rate."""
    import json

    from fedguard.simulation.attacks import AttackName, attack_success_rate

    summary: dict[str, Any] = {
        **attack.to_options(),
        "byzantine-silos": [
            silo_id(i) for i in attack.byzantine_indices(config.num_clients, config.seed)
        ],
        "variants": {},
    }
    for result in results:
        entry: dict[str, Any] = {"accuracy": result.final.get("evaluation", {}).get("accuracy")}
        if attack.name is AttackName.BACKDOOR:
            entry["attack-success-rate"] = attack_success_rate(
                result.config, attack, result.run_dir
            )
            print(
                f"[{result.name}] backdoor attack success rate {entry['attack-success-rate']:.3f}"
            )
        summary["variants"][result.name] = entry
    (run_dir / "attack.json").write_text(json.dumps(summary, indent=2))
