"""Trust sections of ``report.md`` and the model card: Markdown and PNG plots.

Shared by :mod:`fedguard.simulation.report` and :mod:`fedguard.edge.card`, which
read the same :class:`~fedguard.trust.results.TrustResults`. matplotlib is
imported only when a plot is drawn (Agg backend, no display).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedguard.trust.results import (
    AttributionResult,
    DriftResult,
    FairnessResult,
    ReleaseCost,
    TrustResults,
)

__all__ = [
    "TOP_FEATURES",
    "cost_text",
    "plot_trust",
    "trust_markdown",
]

TOP_FEATURES = 10


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.{digits}f}"


def cost_text(cost: ReleaseCost) -> str:
    """One sentence on what a release cost each silo, and how its noise was added."""
    if not cost.noised:
        return (
            f"no DP noise (ε = ∞): exact sums from {cost.contributors} silos through secure "
            "aggregation; for research runs only"
        )
    text = (
        f"ε = {cost.epsilon:.3g} at δ = {cost.delta:g} per silo for this release "
        f"(Gaussian noise σ = {cost.noise_multiplier:.3g} × the L2 sensitivity, added by each "
        f"silo before secure aggregation; the sum carries the noise of all "
        f"{cost.contributors} silos)"
    )
    if cost.epsilon_by_silo:
        lifetime = ", ".join(f"{k} {v:.3g}" for k, v in sorted(cost.epsilon_by_silo.items()))
        text += f"; each ledger's lifetime ε after it: {lifetime}"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _fairness(fairness: FairnessResult) -> list[str]:
    rows = [
        [
            g.group,
            f"{g.n:.0f}",
            _fmt(g.accuracy),
            _fmt(g.auc),
            _fmt(g.tpr),
            _fmt(g.fpr),
            _fmt(g.selection_rate),
        ]
        for g in fairness.groups
    ]
    return [
        f"### Fairness audit: sensitive attribute `{fairness.attribute}`",
        "",
        "Confusion counts per group from every silo's held-out test split, summed with "
        f"secure aggregation; {cost_text(fairness.cost)}. `n` is the noised record count.",
        "",
        *_table(["group", "n", "accuracy", "AUC", "TPR", "FPR", "selection rate"], rows),
        "",
        f"* Demographic parity difference: {_fmt(fairness.demographic_parity_difference)}.",
        f"* Equalized odds difference: {_fmt(fairness.equalized_odds_difference)}.",
    ]


def _drift(drift: Sequence[DriftResult]) -> list[str]:
    out = ["### Drift", ""]
    for result in drift:
        alerts = ", ".join(f"`{a}`" for a in result.alerts) or "none"
        rows = [
            [f.feature, _fmt(f.psi, 4), _fmt(f.js, 4), "ALERT" if f.alert else "ok"]
            for f in sorted(result.features, key=lambda f: -f.psi)
        ]
        out += [
            f"**{result.label}**: {len(result.alerts)} of {len(result.features)} features above "
            f"the {result.metric.upper()} threshold {result.threshold:g} (alerts: {alerts}). "
            f"Per-feature histograms on bins fixed at training time, summed securely; "
            f"{cost_text(result.cost)}.",
            "",
            *_table(["feature", "PSI", "JS", "status"], rows),
            "",
        ]
    return out[:-1]


def _attributions(result: AttributionResult, top: int) -> list[str]:
    rows = [
        [str(rank), f.feature, f"{f.mean_abs_attribution:.4f}", f"{f.mean_attribution:+.4f}"]
        for rank, f in enumerate(result.top(top), start=1)
    ]
    return [
        f"**{result.model} model**: Integrated-Gradients attributions of the {result.output} "
        f"against the federated mean, {result.steps} steps, each record's clipped to L2 norm "
        f"{result.clip_norm:g}, averaged over {result.records:.0f} (noised) records; ranked by "
        "mean |attribution| (importance), with the signed mean (direction, + raises the "
        f"output); {cost_text(result.cost)}.",
        "",
        *_table(["rank", "feature", "mean abs. attribution", "mean attribution"], rows),
    ]


def trust_markdown(
    results: TrustResults,
    plots: dict[str, Path] | None = None,
    heading: str = "##",
    top: int = TOP_FEATURES,
) -> list[str]:
    """Markdown lines of the trust sections; empty when there is nothing to show."""
    if results.empty:
        return []
    out = [f"{heading} Trust: fairness, drift and explanations", ""]
    if results.fairness is not None:
        out += [*_fairness(results.fairness), ""]
    if results.drift:
        out += [*_drift(results.drift), ""]
    if results.attributions:
        out += ["### Top features", ""]
        for attribution in results.attributions:
            out += [*_attributions(attribution, top), ""]
    for name, path in (plots or {}).items():
        out.append(f"![{name}]({path.name})")
    if plots:
        out.append("")
    return out[:-1] if out and out[-1] == "" else out


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_fairness(fairness: FairnessResult, path: Path) -> None:
    plt = _pyplot()
    metrics = [("accuracy", "accuracy"), ("auc", "AUC"), ("tpr", "TPR"), ("fpr", "FPR")]
    shown = [
        (k, label)
        for k, label in metrics
        if any(getattr(g, k) is not None for g in fairness.groups)
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(fairness.groups), 1)
    for j, group in enumerate(fairness.groups):
        values = [getattr(group, k) for k, _ in shown]
        xs = [i + (j - (len(fairness.groups) - 1) / 2) * width for i in range(len(shown))]
        ax.bar(
            xs,
            [math.nan if v is None else v for v in values],
            width=width,
            label=f"{group.group} (n≈{group.n:.0f})",
        )
    ax.set_xticks(range(len(shown)), [label for _, label in shown])
    ax.set_ylim(0, 1.05)
    ax.set(
        ylabel="value (DP-noised counts)",
        title=f"per-group metrics by `{fairness.attribute}`",
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_attributions(attributions: Sequence[AttributionResult], path: Path, top: int) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(attributions), figsize=(5.5 * len(attributions), 0.35 * top + 1.5), squeeze=False
    )
    for ax, result in zip(axes[0], attributions, strict=True):
        features = list(result.top(top))[::-1]
        ax.barh(
            [f.feature for f in features],
            [f.mean_abs_attribution for f in features],
            color=["#c0392b" if f.mean_attribution < 0 else "#2b7bba" for f in features],
        )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set(
            xlabel="mean |IG attribution|",
            title=f"{result.model} model: top {len(features)}\n"
            "(colour: sign of the mean attribution, blue +, red −)",
        )
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_drift(drift: DriftResult, path: Path) -> None:
    plt = _pyplot()
    features = sorted(drift.features, key=lambda f: -f.psi)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(features) + 2), 4))
    ax.bar(
        range(len(features)),
        [f.psi for f in features],
        color=["#c0392b" if f.alert else "#2b7bba" for f in features],
    )
    if drift.metric == "psi":
        ax.axhline(drift.threshold, color="red", linestyle="--", label="alert threshold")
        ax.legend(fontsize=8)
    top = max([f.psi for f in features] + [drift.threshold if drift.metric == "psi" else 0.0])
    ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
    ax.set_xticks(range(len(features)), [f.feature for f in features], rotation=70, fontsize=7)
    ax.set(ylabel="PSI", title=f"drift per feature ({drift.label}); red = alert")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trust(
    results: TrustResults, directory: Path, prefix: str = "", top: int = TOP_FEATURES
) -> dict[str, Path]:
    """PNG plots of whatever the results hold: per-group metrics, attributions, drift PSI."""
    paths: dict[str, Path] = {}
    directory = Path(directory)
    if results.fairness is not None and results.fairness.groups:
        paths["fairness_plot"] = directory / f"{prefix}fairness.png"
        _plot_fairness(results.fairness, paths["fairness_plot"])
    if results.attributions:
        paths["attribution_plot"] = directory / f"{prefix}attributions.png"
        _plot_attributions(results.attributions, paths["attribution_plot"], top)
    if results.drift and results.drift[-1].features:
        paths["drift_plot"] = directory / f"{prefix}drift.png"
        _plot_drift(results.drift[-1], paths["drift_plot"])
    return paths
