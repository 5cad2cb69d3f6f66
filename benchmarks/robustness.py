"""Robustness of every aggregation rule under every attack, with and without secure groups.

Digits (8×8 images, 10 classes), Dirichlet α = 0.5 over 20 silos, non-private
local training (robustness alone; DP noise would blur the comparison), the
in-process engine. For each setting the script runs clean FedAvg and every
(rule × attack) pair with a share of Byzantine silos (drawn with the run seed,
colluding), and reports the final pooled test accuracy (mean of the last three
rounds, to smooth round-to-round noise) and, for the backdoor, its attack success
rate on triggered test rows.

Settings:

- ``plain``: the server sees every update; fedguard's rules, NNM and bucketing
  compositions, and Flower's own ``aggregate_krum`` / ``aggregate_median`` /
  ``aggregate_trimmed_avg`` (the functions behind its Krum, FedMedian and
  FedTrimmedAvg strategies) on the same runs.
- ``secure``: SecAgg+ inside random groups (``--groups``), silos clip Δ to
  ``--clip-norm`` before masking, flagged groups left out, the rule over the
  group means. Run at 10% and 20% Byzantine.

Prints one table per setting (rules as rows, attacks as columns), the issue's
"done" checks, and writes ``results.json`` and a heat map per setting (PNG) to
``--out``. Runs in parallel processes (``--workers``), one torch thread each.

    .venv/bin/python benchmarks/robustness.py [--rounds 25] [--workers 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

ATTACKS = ["sign-flip", "scaling", "gaussian", "label-flip", "alie", "ipm", "backdoor"]

#: fedguard rules in the plain setting: label -> aggregation options (f = Byzantine count).
PLAIN_RULES: dict[str, dict[str, Any]] = {
    "fedavg": {"aggregator": "weighted-mean"},
    "median": {"aggregator": "median"},
    "trimmed-mean": {"aggregator": "trimmed-mean"},
    "krum": {"aggregator": "krum"},
    "multi-krum": {"aggregator": "multi-krum"},
    "geometric-median": {"aggregator": "geometric-median"},
    "centered-clipping": {
        "aggregator": "centered-clipping",
        "cc-tau": 1.0,
        "cc-iterations": 3,
        "cc-reference": "previous",
    },
    "nnm+median": {"aggregator": "median", "pre-aggregation": "nnm"},
    "nnm+trimmed-mean": {"aggregator": "trimmed-mean", "pre-aggregation": "nnm"},
    "nnm+krum": {"aggregator": "krum", "pre-aggregation": "nnm"},
    "nnm+geometric-median": {"aggregator": "geometric-median", "pre-aggregation": "nnm"},
    "nnm+centered-clipping": {
        "aggregator": "centered-clipping",
        "pre-aggregation": "nnm",
        "cc-tau": 1.0,
        "cc-iterations": 3,
        "cc-reference": "previous",
    },
}
FLOWER_RULES = ["flower-krum", "flower-median", "flower-trimmed-avg"]
TRADEOFF_ATTACKS = ["sign-flip", "scaling", "alie"]

#: Rules over secure group means (f = corrupted groups tolerated).
SECURE_RULES: dict[str, dict[str, Any]] = {
    "fedavg": {"aggregator": "weighted-mean"},
    "median": {"aggregator": "median"},
    "trimmed-mean": {"aggregator": "trimmed-mean"},
    "geometric-median": {"aggregator": "geometric-median"},
    "centered-clipping": {
        "aggregator": "centered-clipping",
        "cc-tau": 1.0,
        "cc-iterations": 3,
        "cc-reference": "previous",
    },
}


@dataclasses.dataclass(frozen=True)
class Case:
    setting: str  # plain | secure
    byzantine: float
    rule: str
    attack: str | None
    rounds: int
    clients: int
    groups: int
    clip_norm: float
    seed: int

    @property
    def key(self) -> str:
        attack = self.attack or "clean"
        setting = f"tradeoff-g{self.groups}" if self.setting == "tradeoff" else self.setting
        return f"{setting}-{int(self.byzantine * 100)}-{self.rule}-{attack}"

    @property
    def secure(self) -> bool:
        return self.setting in ("secure", "tradeoff")


def _flower_aggregator(name: str, f: int) -> Any:
    """Flower's reference aggregation functions as a fedguard ``Aggregator`` (on deltas:
    the rules are translation-equivariant, so this equals aggregating the models)."""
    from flwr.server.strategy import aggregate as flower

    class FlowerRule:
        uses_weights = False

        @property
        def name(self) -> str:
            return name

        @property
        def min_inputs(self) -> int:
            return 2 * f + 3 if name == "flower-krum" else 1

        def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
            results = [([u], int(max(w, 1))) for u, w in zip(updates, weights, strict=True)]
            if name == "flower-krum":
                out = flower.aggregate_krum(results, num_malicious=f, to_keep=0)
            elif name == "flower-median":
                out = flower.aggregate_median(results)
            else:  # FedTrimmedAvg's default beta
                out = flower.aggregate_trimmed_avg(results, proportiontocut=0.2)
            return np.asarray(out[0], dtype=np.float64)

    return FlowerRule()


def run_case(case: Case, out: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from fedguard.core.aggregation_config import AggregatorName
    from fedguard.core.config import RunConfig
    from fedguard.simulation.attack_config import AttackConfig, AttackName
    from fedguard.simulation.attacks import attack_success_rate
    from fedguard.simulation.runner import run_variant

    attack = (
        AttackConfig(AttackName(case.attack), case.byzantine) if case.attack is not None else None
    )
    byzantine = len(
        AttackConfig(AttackName.SIGN_FLIP, case.byzantine).byzantine_indices(
            case.clients, case.seed
        )
    )
    options: dict[str, Any] = {
        "dataset": "digits",
        "clients": case.clients,
        "rounds": case.rounds,
        "partition": "dirichlet:0.5",
        "min-silo-size": 20,
        "no-dp": True,
        "engine": "inprocess",
        "seed": case.seed,
    }
    aggregator = None
    if case.rule.startswith("flower-"):
        aggregator = _flower_aggregator(case.rule, byzantine)
    else:
        rules = SECURE_RULES if case.secure else PLAIN_RULES
        options.update(rules[case.rule])
        if options["aggregator"] != AggregatorName.WEIGHTED_MEAN:
            options["aggregator-f"] = (
                min(byzantine, (case.groups - 1) // 2) if case.secure else byzantine
            )
    if case.secure:
        options.update(
            {
                "secagg": True,
                "secagg-groups": case.groups,
                "secagg-clip-norm": case.clip_norm,
                # Groups of ~4 silos tolerate no dropout; the benchmark has none.
                "secagg-allow-no-dropout": True,
            }
        )
    config = RunConfig.from_options(options)
    run_dir = out / "runs" / case.key
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    result = run_variant(config, "run", run_dir, attack=attack, aggregator=aggregator)
    accuracies = [h["evaluation"]["accuracy"] for h in result.history]
    flagged = sum(len(h["aggregation"].get("flagged-groups", [])) for h in result.history)
    failed = sum(1 for h in result.history if "failed" in h["aggregation"])
    row: dict[str, Any] = {
        **dataclasses.asdict(case),
        "f": options.get("aggregator-f", byzantine if aggregator else 0),
        "accuracy": float(np.mean(accuracies[-3:])),
        "final-accuracy": accuracies[-1],
        "flagged-groups": flagged,
        "failed-rounds": failed,
        "seconds": time.monotonic() - started,
    }
    if attack is not None and attack.name is AttackName.BACKDOOR:
        row["attack-success-rate"] = attack_success_rate(config, attack, result.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def _worker(args: tuple[Case, Path]) -> dict[str, Any]:
    case, out = args
    try:
        return run_case(case, out)
    except Exception as failed:  # a rule refusing its inputs is a result, not a crash
        return {**dataclasses.asdict(case), "error": f"{type(failed).__name__}: {failed}"}


def cases(args: argparse.Namespace) -> list[Case]:
    common = {"rounds": args.rounds, "clients": args.clients, "seed": args.seed}
    out: list[Case] = []
    plain_rules = [*PLAIN_RULES, *FLOWER_RULES]
    for rule in plain_rules:
        for attack in [None, *ATTACKS]:
            if attack is None and rule != "fedavg" and not args.clean_all:
                continue
            out.append(Case("plain", 0.2, rule, attack, groups=1, clip_norm=0.0, **common))
    for fraction in (0.1, 0.2):
        for rule in SECURE_RULES:
            for attack in [None, *ATTACKS]:
                if attack is None and rule != "fedavg":
                    continue
                out.append(
                    Case(
                        "secure",
                        fraction,
                        rule,
                        attack,
                        groups=args.groups,
                        clip_norm=args.clip_norm,
                        **common,
                    )
                )
    # Group size against tolerated Byzantine share: the median over G groups of ~n/G
    # silos (f = ⌊(G − 1)/2⌋ groups), next to the main secure setting's G.
    for groups in args.tradeoff_groups:
        for fraction in (0.1, 0.2):
            for attack in [None, *TRADEOFF_ATTACKS]:
                if attack is None and fraction != 0.1:
                    continue
                out.append(
                    Case(
                        "tradeoff",
                        fraction,
                        "median",
                        attack,
                        groups=groups,
                        clip_norm=args.clip_norm,
                        **common,
                    )
                )
    return out


def tradeoff_table(rows: list[dict[str, Any]], main_groups: int) -> str:
    """Group size vs tolerated Byzantine share vs accuracy (median over group means)."""
    picked = [
        r
        for r in rows
        if "error" not in r
        and r["rule"] == "median"
        and (
            r["setting"] == "tradeoff" or (r["setting"] == "secure" and r["groups"] == main_groups)
        )
        and (r["attack"] in (None, *TRADEOFF_ATTACKS))
    ]
    clients = picked[0]["clients"] if picked else 0
    lines = [
        f"{'groups':>6} {'silos/group':>11} {'f groups':>8} {'tolerated':>9} "
        f"{'clean':>6} {'worst 10%':>9} {'worst 20%':>9}",
    ]
    for groups in sorted({r["groups"] for r in picked}):
        mine = [r for r in picked if r["groups"] == groups]
        f = (groups - 1) // 2
        clean = [r["accuracy"] for r in mine if r["attack"] is None]
        worst = {
            fr: min(
                (r["accuracy"] for r in mine if r["attack"] and r["byzantine"] == fr),
                default=float("nan"),
            )
            for fr in (0.1, 0.2)
        }
        size = f"{clients // groups}-{-(-clients // groups)}"
        lines.append(
            f"{groups:>6} {size:>11} {f:>8} {f / clients:>9.0%} "
            f"{(clean[0] if clean else float('nan')):>6.3f} {worst[0.1]:>9.3f} {worst[0.2]:>9.3f}"
        )
    lines.append(
        f"(median over group means; tolerated = f groups / {clients} silos, the share "
        f"guaranteed in the worst case; worst over {', '.join(TRADEOFF_ATTACKS)})"
    )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], setting: str, fraction: float) -> tuple[str, dict[str, Any]]:
    picked = [r for r in rows if r["setting"] == setting and r["byzantine"] == fraction]
    clean = next(
        (r["accuracy"] for r in picked if r["rule"] == "fedavg" and r["attack"] is None), None
    )
    rules = list(dict.fromkeys(r["rule"] for r in picked))
    grid: dict[str, dict[str, Any]] = {rule: {} for rule in rules}
    for r in picked:
        grid[r["rule"]][r["attack"] or "clean"] = r
    header = f"{'rule':<24}" + "".join(f"{a:>11}" for a in ATTACKS) + f"{'worst':>8}"
    lines = [
        f"## {setting}, {int(fraction * 100)}% Byzantine (clean FedAvg accuracy {clean:.3f})"
        if clean is not None
        else f"## {setting}, {int(fraction * 100)}% Byzantine",
        header,
        "-" * len(header),
    ]
    worst: dict[str, float] = {}
    for rule in rules:
        cells = []
        values = []
        for attack in ATTACKS:
            r = grid[rule].get(attack)
            if r is None:
                cells.append(f"{'':>11}")
            elif "error" in r:
                cells.append(f"{'refused':>11}")
            else:
                values.append(r["accuracy"])
                asr = r.get("attack-success-rate")
                text = f"{r['accuracy']:.3f}" + (f"/{asr:.2f}" if asr is not None else "")
                cells.append(f"{text:>11}")
        worst[rule] = min(values) if len(values) == len(ATTACKS) else float("nan")
        lines.append(f"{rule:<24}" + "".join(cells) + f"{worst[rule]:>8.3f}")
    lines.append("(accuracy, mean of the last 3 rounds; backdoor: accuracy/attack success rate)")
    return "\n".join(lines), {"clean": clean, "worst": worst, "grid": grid}


def heat_map(summary: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(summary["grid"])
    values = np.array(
        [
            [
                summary["grid"][rule].get(a, {}).get("accuracy", np.nan)
                if "error" not in summary["grid"][rule].get(a, {})
                else np.nan
                for a in ATTACKS
            ]
            for rule in rules
        ],
        dtype=float,
    )
    fig, ax = plt.subplots(figsize=(1.1 * len(ATTACKS) + 3, 0.45 * len(rules) + 1.5))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(ATTACKS)), ATTACKS, rotation=30, ha="right")
    ax.set_yticks(range(len(rules)), rules)
    for i in range(len(rules)):
        for j in range(len(ATTACKS)):
            if np.isfinite(values[i, j]):
                ax.text(
                    j,
                    i,
                    f"{values[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if values[i, j] < 0.6 else "black",
                )
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checks(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's "done" conditions, evaluated on the measured tables."""
    lines = []
    plain = summaries.get("plain-20")
    if plain and plain["clean"] is not None:
        clean = plain["clean"]
        ok = [r for r, w in plain["worst"].items() if w >= clean - 0.05]
        lines.append(
            f"plain 20%: configurations within 5 points of clean FedAvg ({clean:.3f}) under "
            f"every attack: {', '.join(ok) or 'none'}"
        )
        fedavg = plain["grid"].get("fedavg", {})
        for attack in ("sign-flip", "scaling"):
            acc = fedavg.get(attack, {}).get("accuracy")
            if acc is not None:
                lines.append(
                    f"plain 20%: FedAvg under {attack}: {acc:.3f} "
                    f"({(clean - acc) * 100:+.1f} points lost; issue asks > 20)"
                )
        for rule in ("krum", "median"):
            for attack in ("alie", "ipm"):
                acc = plain["grid"].get(rule, {}).get(attack, {}).get("accuracy")
                if acc is not None:
                    lines.append(
                        f"plain 20%: {rule} under {attack}: {acc:.3f} "
                        f"({(clean - acc) * 100:.1f} points below clean FedAvg)"
                    )
    for key, label in (("secure-10", "secure groups 10%"), ("secure-20", "secure groups 20%")):
        summary = summaries.get(key)
        if summary and summary["clean"] is not None:
            clean = summary["clean"]
            ok = [r for r, w in summary["worst"].items() if w >= clean - 0.10]
            lines.append(
                f"{label}: configurations within 10 points of clean FedAvg ({clean:.3f}) under "
                f"every attack: {', '.join(ok) or 'none'}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--clip-norm", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/robustness"))
    parser.add_argument("--only", default="", help="comma-separated case-key substrings")
    parser.add_argument("--clean-all", action="store_true", help="clean runs of every rule")
    parser.add_argument(
        "--report", action="store_true", help="run nothing: tables and plots from results.json"
    )
    parser.add_argument(
        "--tradeoff-groups",
        type=lambda text: [int(g) for g in text.split(",") if g],
        default=[4, 6],
        help="group counts for the group-size trade-off table (beside --groups)",
    )
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    todo = cases(args)
    if args.only and not args.report:
        wanted = args.only.split(",")
        todo = [c for c in todo if any(w in c.key for w in wanted)]
    results_path = args.out / "results.json"
    done: dict[str, dict[str, Any]] = {}
    if results_path.exists():  # resume: a crash loses no finished case
        done = {r["key"]: r for r in json.loads(results_path.read_text())}
    pending = [] if args.report else [c for c in todo if c.key not in done]
    print(f"{len(todo)} cases, {len(pending)} to run, {args.workers} workers", flush=True)
    started = time.monotonic()
    context = mp.get_context("spawn")
    with context.Pool(max(1, min(args.workers, len(pending)))) as pool:
        for row in pool.imap_unordered(_worker, [(c, args.out) for c in pending]):
            row["key"] = Case(**{k: row[k] for k in Case.__dataclass_fields__}).key
            done[row["key"]] = row
            results_path.write_text(json.dumps(list(done.values()), indent=1))
            status = row.get("error") or f"accuracy {row['accuracy']:.3f}"
            print(f"[{time.monotonic() - started:7.0f}s] {row['key']}: {status}", flush=True)
    rows = [done[c.key] for c in todo if c.key in done]
    summaries: dict[str, dict[str, Any]] = {}
    for setting, fraction in (("plain", 0.2), ("secure", 0.1), ("secure", 0.2)):
        if not any(r["setting"] == setting and r["byzantine"] == fraction for r in rows):
            continue
        text, summary = table(rows, setting, fraction)
        key = f"{setting}-{int(fraction * 100)}"
        summaries[key] = summary
        print("\n" + text)
        heat_map(summary, f"{setting}, {int(fraction * 100)}% Byzantine", args.out / f"{key}.png")
    if any(r["setting"] == "tradeoff" for r in rows):
        print("\n## group size vs tolerated Byzantine share vs accuracy")
        print(tradeoff_table(rows, args.groups))
    print()
    for line in checks(summaries):
        print(line)
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"refused: {r['key']}: {r['error']}")


if __name__ == "__main__":
    main()
