"""Run reports: ``report.json`` (everything), ``report.md`` (for people), PNG plots."""

from __future__ import annotations

import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from fedguard.client.policy import NOT_PRIVATE_AGAINST_SERVER
from fedguard.core.config import NoiseSource, RunConfig
from fedguard.core.datasets import schema_for
from fedguard.core.files import atomic_write_json
from fedguard.privacy.central_accounting import central_dp_statement, read_central_dp
from fedguard.simulation.runner import SiloPlan, VariantResult
from fedguard.trust.report import plot_trust, trust_markdown
from fedguard.trust.results import TrustResults, read_trust_results

PACKAGES = (
    "fedguard",
    "torch",
    "flwr",
    "opacus",
    "dp-accounting",
    "numpy",
    "scikit-learn",
    "cryptography",
    "ray",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _headline(config: RunConfig) -> str:
    return "auc" if schema_for(config.contract).is_binary else "accuracy"


def _metric(record: dict[str, Any], name: str) -> float:
    value = record.get("evaluation", {}).get(name)
    return float(value) if value is not None else float("nan")


_TRAINING_EVENT = "dp-sgd-round"


def silo_epsilon_summary(config: RunConfig, result: VariantResult) -> dict[str, dict[str, Any]]:
    """Per silo: budget, spent ε (the ledger's last entry), rounds charged, σ.

    The ledger also holds the trust layer's releases (fairness counts, drift
    histograms, attributions: ``gaussian-release`` events); they count in the spent
    ε and are listed under ``releases``, not as training rounds.
    """
    out: dict[str, dict[str, Any]] = {}
    for silo, entries in result.ledgers.items():
        spent = entries[-1]["epsilon_after"] if entries else 0.0
        rounds = [e for e in entries if e.get("type", _TRAINING_EVENT) == _TRAINING_EVENT]
        releases = [e for e in entries if e.get("type", _TRAINING_EVENT) != _TRAINING_EVENT]
        out[silo] = {
            "epsilon_budget": config.budget.epsilon,
            "delta": config.budget.delta,
            "epsilon_spent": spent,
            "rounds_charged": len(rounds),
            "noise_multiplier": rounds[0]["noise_multiplier"] if rounds else None,
            "sample_rate": rounds[0]["sample_rate"] if rounds else None,
            "steps_per_round": rounds[0]["steps"] if rounds else None,
            "epsilon_by_round": {str(e["round"]): e["epsilon_after"] for e in rounds},
            "releases": [
                {
                    "round": e["round"],
                    "type": e.get("type"),
                    "noise_multiplier": e.get("noise_multiplier"),
                    "count": e.get("count"),
                    "epsilon_after": e["epsilon_after"],
                }
                for e in releases
            ],
        }
    return out


def build_report(
    config: RunConfig, results: list[VariantResult], plans: list[SiloPlan]
) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for result in results:
        final = result.final
        central = final.get("central_epsilon")
        # The trust phase (fairness audit, drift reference, attributions) writes
        # trust.json into the variant's folder; runs without it report None.
        trust = read_trust_results(result.run_dir)
        variants[result.name] = {
            "seconds": result.seconds,
            # completed / degraded / failed / stopped, with the reasons (outcome.json).
            "outcome": result.outcome,
            "final": {
                "round": final.get("round"),
                "auc": _metric(final, "auc"),
                "accuracy": _metric(final, "accuracy"),
                "loss": _metric(final, "loss"),
            },
            "central_epsilon": central,
            # What central DP covers, ε spent and any budget stop (central-dp.json).
            "central_dp": read_central_dp(result.run_dir),
            "silos": silo_epsilon_summary(result.config, result),
            "history": result.history,
            "trust": trust.to_json() if trust is not None and not trust.empty else None,
        }
    return {
        "fedguard_report_version": 1,
        "config": config.to_dict(),
        "data_contract": {
            "name": config.contract.name,
            "version": config.contract.version,
            "sha256": config.contract.content_hash(),
        },
        "seed": config.seed,
        "package_versions": package_versions(),
        "privacy": {
            "unit": "one record (patient/customer) of one silo (sample-level, add/remove)",
            "accountant": "dp_accounting PLD, pessimistic, value discretization 1e-4",
            "composition": "over every round a silo actually trained; no credit for selection",
            "noise_source": config.local_dp.noise_source.value,
            # docs/threat-model.md: seeded noise and batches are research mode.
            "private_against_server": config.local_dp.noise_source is not NoiseSource.SEEDED,
            "against_server": (
                NOT_PRIVATE_AGAINST_SERVER
                if config.local_dp.noise_source is NoiseSource.SEEDED
                else "each silo's ε holds against the server: CSPRNG noise and Poisson "
                "batches drawn inside the silo, policy checked by the silo"
            ),
            "central": (
                central_dp_statement(config.central_dp) if config.central_dp.enabled else None
            ),
        },
        "silo_plans": [vars(p) for p in plans],
        "variants": variants,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def summary_table(config: RunConfig, report: dict[str, Any]) -> str:
    """The final results table printed at the end of a run."""
    lines = []
    variants = report["variants"]
    header = f"{'variant':<8} {'AUC':>7} {'accuracy':>9} {'loss':>7} {'max ε':>7} {'ε budget':>9}"
    lines += [header, "-" * len(header)]
    for name, variant in variants.items():
        spent = [s["epsilon_spent"] for s in variant["silos"].values()]
        max_eps = _fmt(max(spent), 2) if spent else "∞ (no DP)"
        budget = _fmt(config.budget.epsilon, 2) if spent else "—"
        final = variant["final"]
        lines.append(
            f"{name:<8} {_fmt(final['auc']):>7} {_fmt(final['accuracy']):>9} "
            f"{_fmt(final['loss']):>7} {max_eps:>7} {budget:>9}"
        )
    if "dp" in variants and "no-dp" in variants:
        key = _headline(config)
        dp, base = variants["dp"]["final"][key], variants["no-dp"]["final"][key]
        if base and not math.isnan(base) and not math.isnan(dp):
            lines.append(f"DP keeps {100 * dp / base:.1f}% of the non-private {key.upper()}.")
    for name, variant in variants.items():
        outcome = variant.get("outcome") or {}
        if outcome and outcome.get("status") != "completed":
            reasons = "; ".join(outcome.get("reasons") or [])
            lines.append(f"[{name}] run {outcome['status']}" + (f": {reasons}" if reasons else ""))
    lines += _central_lines(report)
    if not report["privacy"].get("private_against_server", True):
        lines.append(f"WARNING: {NOT_PRIVATE_AGAINST_SERVER}.")
    if "dp" in variants:
        lines.append("")
        lines.append(
            f"{'silo':<8} {'train':>6} {'σ':>6} {'q':>7} {'steps/rd':>8} "
            f"{'ε spent':>8} {'ε ≤ budget':>10}"
        )
        plans = {p["silo_id"]: p for p in report["silo_plans"]}
        for silo, s in variants["dp"]["silos"].items():
            within = "yes" if s["epsilon_spent"] <= s["epsilon_budget"] + 1e-12 else "NO"
            lines.append(
                f"{silo:<8} {plans.get(silo, {}).get('train_examples', '?'):>6} "
                f"{_fmt(s['noise_multiplier'], 2):>6} {_fmt(s['sample_rate'], 4):>7} "
                f"{_fmt(s['steps_per_round']):>8} {_fmt(s['epsilon_spent'], 3):>8} {within:>10}"
            )
    return "\n".join(lines)


def _central_lines(report: dict[str, Any]) -> list[str]:
    """Central DP in plain words: ε per variant, any budget stop, what it covers."""
    statement = report["privacy"].get("central")
    if not statement:
        return []
    lines = [""]
    for name, variant in report["variants"].items():
        state = variant.get("central_dp") or {}
        eps = state.get("epsilon", variant.get("central_epsilon"))
        lines.append(
            f"[{name}] central ε (one silo, δ={statement['delta']:g}): {_fmt(eps, 2)} "
            f"of budget {statement['epsilon_budget']:g}"
        )
        if state.get("stopped"):
            lines.append(f"[{name}] {state['stopped']['reason']}")
    lines.append(f"Central DP covers {statement['covers']};")
    lines.append(f"  not {statement['does_not_cover']}.")
    lines.append(f"  Amplification by sampling {statement['amplification']}.")
    return lines


def _central_markdown(report: dict[str, Any]) -> list[str]:
    statement = report["privacy"].get("central")
    if not statement:
        return []
    return [
        f"* Central DP (one silo, ε budget {statement['epsilon_budget']:g} at "
        f"δ = {statement['delta']:g}): covers {statement['covers']}; not "
        f"{statement['does_not_cover']}.",
        f"* Amplification by client sampling {statement['amplification']}.",
    ]


def _disclosure_markdown(config: RunConfig) -> list[str]:
    """What the server learns besides the DP-noised model: the scaler and the evaluations."""
    scaler = (
        f"DP feature moments (ε = {config.local_dp.scaler_epsilon:g} per silo, charged to its "
        "ledger)"
        if config.local_dp.enabled
        else "exact feature moments (no DP run)"
    )
    if config.secagg.enabled:
        return [
            f"* Federated scaler: {scaler}, summed under SecAgg+: the server sees only the sum.",
            "* Evaluation: each round's sums (examples, loss, correct, score histograms) are",
            "  summed under SecAgg+; the records hold the pooled values only, no per-silo metric.",
        ]
    return [
        f"* Federated scaler: {scaler}, each silo's release sent in clear (plain mode).",
        "* Not protected by DP: the evaluation sums each silo returns in clear (test loss,",
        "  correct answers, score histograms), kept per silo in the history.",
    ]


def write_report(
    run_dir: Path, config: RunConfig, results: list[VariantResult], plans: list[SiloPlan]
) -> dict[str, Path]:
    report = build_report(config, results, plans)
    paths = {"json": run_dir / "report.json", "markdown": run_dir / "report.md"}
    atomic_write_json(paths["json"], report)
    paths.update(_plots(run_dir, config, report))
    trust_plots = {
        name: plot_trust(trust, run_dir, prefix=f"{name}-")
        for name, trust in _trust_results(report).items()
    }
    for name, plots in trust_plots.items():
        paths.update({f"{name}_{kind}": path for kind, path in plots.items()})
    paths["markdown"].write_text(_markdown(config, report, paths, trust_plots))
    return paths


def _trust_results(report: dict[str, Any]) -> dict[str, TrustResults]:
    """Each variant's trust results, from the report (variants without any are left out)."""
    return {
        name: TrustResults.from_json(variant["trust"])
        for name, variant in report["variants"].items()
        if variant.get("trust")
    }


def _plots(run_dir: Path, config: RunConfig, report: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    key = _headline(config)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, variant in report["variants"].items():
        rounds = [r["round"] for r in variant["history"]]
        axes[0].plot(rounds, [_metric(r, key) for r in variant["history"]], marker="o", label=name)
        axes[1].plot(
            rounds, [_metric(r, "loss") for r in variant["history"]], marker="o", label=name
        )
    axes[0].set(xlabel="round", ylabel=f"test {key} (pooled)", title=f"{config.data_name}: {key}")
    axes[1].set(xlabel="round", ylabel="test loss (pooled)", title="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths["metrics_plot"] = run_dir / "metrics.png"
    fig.savefig(paths["metrics_plot"], dpi=110)
    plt.close(fig)

    if "dp" in report["variants"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for silo, s in report["variants"]["dp"]["silos"].items():
            rounds = sorted(int(r) for r in s["epsilon_by_round"])
            ax.plot(rounds, [s["epsilon_by_round"][str(r)] for r in rounds], marker=".", label=silo)
        ax.axhline(config.budget.epsilon, color="red", linestyle="--", label="budget")
        ax.set(
            xlabel="round",
            ylabel=f"ε spent (δ={config.budget.delta:g})",
            title="per-silo privacy ledger (PLD)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["epsilon_plot"] = run_dir / "epsilon.png"
        fig.savefig(paths["epsilon_plot"], dpi=110)
        plt.close(fig)

    if {"dp", "no-dp"} <= set(report["variants"]):
        fig, ax = plt.subplots(figsize=(6, 4))
        names = ["no-dp", "dp"]
        values = [report["variants"][n]["final"][key] for n in names]
        ax.bar(names, values, color=["#888888", "#2b7bba"])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
        ax.set(ylabel=f"final test {key}", title=f"DP (ε ≤ {config.budget.epsilon:g}) vs no DP")
        ax.set_ylim(0, 1.05)
        fig.tight_layout()
        paths["comparison_plot"] = run_dir / "dp-vs-nodp.png"
        fig.savefig(paths["comparison_plot"], dpi=110)
        plt.close(fig)
    return paths


def _markdown(
    config: RunConfig,
    report: dict[str, Any],
    paths: dict[str, Path],
    trust_plots: dict[str, dict[str, Path]] | None = None,
) -> str:
    key = _headline(config)
    out = [
        f"# fedguard run: {config.data_name}",
        "",
        f"{config.num_clients} silos, partition `{config.partition}`, {config.num_rounds} rounds, "
        f"seed {config.seed}, engine `{config.engine.value}`.",
        f"Data contract `{config.contract.name}` v{config.contract.version}, "
        f"sha256 `{config.contract.content_hash()}`.",
        "",
        "## Results",
        "",
        "```",
        summary_table(config, report),
        "```",
        "",
        "## Privacy",
        "",
        f"* Unit: {report['privacy']['unit']}.",
        f"* Budget per silo: ε = {config.budget.epsilon:g} at δ = {config.budget.delta:g}.",
        f"* Accountant: {report['privacy']['accountant']}; {report['privacy']['composition']}.",
        f"* DP-SGD noise source: `{config.local_dp.noise_source.value}`.",
        *_disclosure_markdown(config),
        *_central_markdown(report),
        "",
        f"## {key.upper()} per round",
        "",
    ]
    names = list(report["variants"])
    out.append("| round | " + " | ".join(names) + " |")
    out.append("|---|" + "---|" * len(names))
    longest = max(len(v["history"]) for v in report["variants"].values())
    for i in range(longest):
        cells = []
        for n in names:
            hist = report["variants"][n]["history"]
            cells.append(_fmt(_metric(hist[i], key)) if i < len(hist) else "")
        out.append(f"| {i} | " + " | ".join(cells) + " |")
    out += ["", "## Round log (DP variant)" if "dp" in names else "## Round log", ""]
    log_variant = report["variants"]["dp" if "dp" in names else names[0]]
    for record in log_variant["history"][1:]:
        outcomes = record["outcomes"]
        notes = [
            f"{o['silo_id']}: {o['status']} ({o['reason']})"
            for o in outcomes
            if o["status"] != "ok"
        ]
        ok = sum(1 for o in outcomes if o["status"] == "ok")
        out.append(
            f"* round {record['round']}: {ok}/{record['sampled']} accepted"
            + (f"; {'; '.join(notes)}" if notes else "")
        )
    for name, trust in _trust_results(report).items():
        section = trust_markdown(trust, (trust_plots or {}).get(name))
        section[0] += f" ({name} variant)"
        out += ["", *section]
    out += ["", "## Plots", ""]
    for name in ("metrics_plot", "epsilon_plot", "comparison_plot"):
        if name in paths:
            out.append(f"![{name}]({paths[name].name})")
    out += ["", "## Package versions", ""]
    out += [f"* {k}: {v}" for k, v in report["package_versions"].items()]
    return "\n".join(out) + "\n"
