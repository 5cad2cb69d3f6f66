"""``fedguard simulate``: a consortium of silos simulated on this machine.

Every option can also live in a TOML file (``--config run.toml``) under the same
name without the leading dashes; flags given on the command line win over the
file. Top-level imports stay free of torch, pandas and Flower (the runner is
imported when the command runs).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from fedguard.cli.edge import add_simulate_export_option, export_after_simulate
from fedguard.core.aggregation_config import AggregatorName
from fedguard.core.config import RunConfig
from fedguard.core.errors import ConfigError
from fedguard.core.run_options import RUN_OPTIONS, Group, add_option_groups
from fedguard.runs.layout import silo_id
from fedguard.simulation.attack_config import AttackConfig, AttackName, declares_f

__all__ = ["add_simulate_command", "attack_from_args", "cmd_simulate", "config_from_args"]

#: The option groups listed before the attack options (the rest: run, trust, explain).
_CONFIG_GROUPS = (
    Group.DATA,
    Group.TRAINING,
    Group.LOCAL_DP,
    Group.CENTRAL_DP,
    Group.SECURE,
    Group.PARTICIPATION,
    Group.ROBUST,
)


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
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="TOML file with any of these options (keys without leading dashes)",
    )
    add_option_groups(p, _CONFIG_GROUPS)
    _attack_options(p)
    run = add_option_groups(p, (Group.RUN,))[Group.RUN]
    run.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the non-private twin and compare",
    )
    run.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    add_simulate_export_option(p)
    add_option_groups(p, (Group.TRUST, Group.EXPLAIN))
    p.set_defaults(handler=cmd_simulate)
    return p


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


_ATTACK_OPTIONS = {
    "attack",
    "byzantine",
    "collusion",
    "attack_strength",
    "backdoor_target",
    "poison_fraction",
}


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
    for option in RUN_OPTIONS:
        value = getattr(args, option.dest, None)
        if value is not None:
            options[option.name] = value
    attack = attack_from_args(args) if hasattr(args, "attack") else None
    rule = str(options.get("aggregator", AggregatorName.WEIGHTED_MEAN.value))
    if attack is not None and options.get("aggregator-f") is None and declares_f(rule):
        # An f the rule cannot meet is refused by RunConfig, never lowered.
        options["aggregator-f"] = attack.default_f(
            int(options.get("clients", RunConfig().num_clients)),
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
