"""Model cards (Markdown and JSON) for exported edge models.

After Mitchell et al., "Model Cards for Model Reporting", FAT* 2019: intended use,
data (silo counts only, never records), training, the privacy guarantee, the
aggregation and robustness set-up, metrics overall and per silo, teacher vs
student vs int8, size and latency, and known limitations.

The privacy figures are read from the silos' own ledgers (the authority on ε),
not from the run's report: :func:`ledger_privacy` opens every
``privacy-ledger.sqlite`` and records, per silo, the lifetime ε it reports
(:meth:`~fedguard.privacy.ledger.PrivacyLedger.spent_epsilon`), the budget, and
the charges of each run with the ε after its last charge.

The trust section (:func:`trust_section`) carries the teacher run's fairness
audit, drift status and global-model attributions (its ``trust.json``) plus the
student's attributions computed at export, each with the ε it cost; it is left
out when there are none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedguard.core.config import PrivacyBudget
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import PrivacyLedger
from fedguard.trust.report import plot_trust, trust_markdown
from fedguard.trust.results import AttributionResult, TrustResults

__all__ = [
    "CARD_VERSION",
    "PRIVACY_ACCOUNTANT",
    "PRIVACY_UNIT",
    "ledger_privacy",
    "render_markdown",
    "trust_section",
]

CARD_VERSION = 1
PRIVACY_UNIT = "one record (patient/customer) of one silo: sample-level DP, add/remove-one"
PRIVACY_ACCOUNTANT = (
    "dp_accounting PLD (pessimistic estimate, value discretization 1e-4), composed over "
    "every round a silo trained in every run of its life; no credit for client selection"
)


def ledger_privacy(
    silo_dirs: Mapping[str, Path], budget: PrivacyBudget
) -> dict[str, dict[str, Any]]:
    """Per silo: budget, lifetime ε spent and the charges of each run, from its ledger.

    A silo without a ledger file (a non-private run) is reported with ``ledger: false``
    and no ε. Nothing is created or written.
    """
    out: dict[str, dict[str, Any]] = {}
    # ε is a deterministic function of the charged events: silos with identical
    # histories (equal-sized silos of one run) share one PLD computation.
    spent_by_events: dict[tuple[Any, ...], float] = {}
    for silo_id, state_dir in silo_dirs.items():
        if not (Path(state_dir) / PrivacyLedger.FILENAME).is_file():
            out[silo_id] = {"ledger": False}
            continue
        with PrivacyLedger.open(Path(state_dir), silo_id, budget) as ledger:
            entries = ledger.entries()
            runs: dict[str, dict[str, Any]] = {}
            releases: list[dict[str, Any]] = []
            for entry in entries:
                if not isinstance(entry.event, DpSgdRound):
                    # A trust-layer release (fairness, drift, attributions): it counts in
                    # the spent ε; listed apart from the training rounds.
                    releases.append(
                        {
                            "run_id": entry.run_id,
                            "round": entry.round,
                            "event": entry.event.to_json(),
                            "epsilon_after": entry.epsilon_after,
                            "status": entry.status.value,
                        }
                    )
                    continue
                run = runs.setdefault(
                    entry.run_id,
                    {
                        "rounds_charged": 0,
                        "noise_multiplier": entry.event.noise_multiplier,
                        "sample_rate": entry.event.sample_rate,
                        "steps_per_round": entry.event.steps,
                        "statuses": {},
                    },
                )
                run["rounds_charged"] += 1
                run["epsilon_after_last_round"] = entry.epsilon_after
                run["statuses"][entry.status.value] = run["statuses"].get(entry.status.value, 0) + 1
            events = tuple(e.event for e in entries)
            if events not in spent_by_events:
                spent_by_events[events] = ledger.spent_epsilon()
            spent = spent_by_events[events]
            out[silo_id] = {
                "ledger": True,
                "ledger_file": str(ledger.path),
                "epsilon_budget": ledger.budget.epsilon,
                "delta": ledger.budget.delta,
                "epsilon_spent": spent,
                "rounds_charged": sum(r["rounds_charged"] for r in runs.values()),
                "runs": runs,
                "releases": releases,
            }
    return out


def trust_section(
    teacher: TrustResults | None,
    student_attributions: AttributionResult | None,
    out_dir: Path,
) -> dict[str, Any] | None:
    """The card's ``trust`` entry, with its PNG plots written to ``out_dir``.

    ``teacher`` is what the teacher run's trust phase recorded (fairness, drift,
    global attributions); the student's attributions are added under the model name
    ``student``. ``None`` when there is nothing to report.
    """
    base = teacher or TrustResults()
    attributions = tuple(a for a in base.attributions if a.model != "student")
    if student_attributions is not None:
        attributions += (student_attributions,)
    results = TrustResults(base.fairness, base.drift, attributions)
    if results.empty:
        return None
    plots = plot_trust(results, Path(out_dir))
    return {"results": results.to_json(), "plots": {k: p.name for k, p in plots.items()}}


# --------------------------------------------------------------------------- Markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown for people (the JSON is the machine-readable record)."""
    # Each section's lines end with a blank line, the last section's excepted.
    out = [
        *_title_md(card),
        *_model_md(card["model"]),
        *_intended_use_md(card["intended_use"]),
        *_data_md(card["data"]),
        *_training_md(card["training"]),
        *_privacy_md(card["privacy"]),
        *_aggregation_md(card["aggregation"]),
        *_metrics_md(card["metrics"]),
        *_size_latency_md(card["size_latency"]),
        *_trust_md(card.get("trust")),
        "## Known limitations",
        "",
        *(f"* {item}" for item in card["limitations"]),
    ]
    return "\n".join(out) + "\n"


def _title_md(card: Mapping[str, Any]) -> list[str]:
    return [f"# Model card: {card['model']['name']}", "", f"{card['model']['summary']}", ""]


def _model_md(model: Mapping[str, Any]) -> list[str]:
    return [
        "## Model",
        "",
        f"* Task: {model['task']}; classes: {', '.join(model['classes'])}.",
        f"* Student: {model['student']['architecture']} "
        f"({model['student']['parameters']} parameters); teacher: "
        f"{model['teacher']['architecture']} ({model['teacher']['parameters']} parameters).",
        f"* Quantization: {model['quantization']['method']}; {model['quantization']['scheme']}.",
        f"* Calibration data: {model['quantization']['calibration']}.",
        f"* Input: {model['input']['description']}",
        "* Files: "
        + "; ".join(
            f"`{f['path']}` ({f['bytes']} bytes, sha256 {f['sha256'][:16]}…)"
            for f in model["files"].values()
        ),
        f"* Exported by fedguard {model['fedguard_version']} on {model['created_at']}.",
        "",
    ]


def _intended_use_md(intended: Mapping[str, Any]) -> list[str]:
    return [
        "## Intended use",
        "",
        f"* {intended['primary']}",
        f"* Users: {intended['users']}",
        "* Out of scope: " + "; ".join(intended["out_of_scope"]) + ".",
        "",
    ]


def _data_md(data: Mapping[str, Any]) -> list[str]:
    return [
        "## Data",
        "",
        f"* Data set: `{data['dataset']}` ({data['source']}).",
        f"* {data['num_silos']} silos, partition `{data['partition']}`; each silo keeps its "
        f"own held-out test split ({data['test_fraction']:g} of its rows).",
        "",
        *_table(
            ["silo", "train records", "test records"],
            [[s["silo_id"], s["train_examples"], s["test_examples"]] for s in data["silos"]],
        ),
        "",
    ]


def _training_md(training: Mapping[str, Any]) -> list[str]:
    return [
        "## Training",
        "",
        f"* Teacher: {training['teacher']['summary']}",
        f"* Distillation: {training['distillation']['summary']}",
        "",
    ]


def _privacy_md(privacy: Mapping[str, Any]) -> list[str]:
    out = [
        "## Privacy",
        "",
        f"* Guarantee: {privacy['statement']}",
        f"* Unit of privacy: {privacy['unit']}.",
        f"* Accountant: {privacy['accountant']}.",
        f"* DP-SGD noise source: `{privacy['noise_source']}`.",
        f"* Distillation's privacy cost: {privacy['distillation_cost']}",
    ]
    if any(s.get("ledger") for s in privacy["silos"].values()):
        out += [
            "",
            "Per silo, from its privacy ledger (ε at the silo's δ):",
            "",
            *_table(
                ["silo", "ε budget", "δ", "ε after teacher run", "ε after distillation", "ε spent"],
                _ledger_rows(privacy),
            ),
        ]
    if privacy.get("central"):
        c = privacy["central"]
        out += [
            "",
            f"* Central (silo-level) DP-FedAvg: ε = {_fmt(c['epsilon'])} at δ = {c['delta']:g} "
            f"over {c['rounds']} rounds.",
        ]
    out += ["", "Not protected by differential privacy:", ""]
    out += [f"* {item}" for item in privacy["not_protected"]]
    return [*out, ""]


def _ledger_rows(privacy: Mapping[str, Any]) -> list[list[Any]]:
    """One row per silo: budget, δ, ε after the teacher run and the distillation, ε spent."""
    rows: list[list[Any]] = []
    for silo_id, s in privacy["silos"].items():
        if not s.get("ledger"):
            rows.append([silo_id, "—", "—", "—", "—", "—"])
            continue
        teacher_run = s["runs"].get(privacy["teacher_run_id"], {})
        distill_run = s["runs"].get(privacy.get("distillation_run_id") or "", {})
        rows.append(
            [
                silo_id,
                s["epsilon_budget"],
                f"{s['delta']:g}",
                teacher_run.get("epsilon_after_last_round"),
                distill_run.get("epsilon_after_last_round"),
                s["epsilon_spent"],
            ]
        )
    return rows


def _aggregation_md(agg: Mapping[str, Any]) -> list[str]:
    return [
        "## Aggregation and robustness",
        "",
        f"* Rule: {agg['rule']}.",
        f"* Central DP: {_fmt(agg['central_dp']['enabled'])}"
        + (
            f" (clip {agg['central_dp']['clip_norm']:g}, noise multiplier "
            f"{agg['central_dp']['noise_multiplier']:g}, client sampling rate "
            f"{agg['central_dp']['client_sampling_rate']:g})"
            if agg["central_dp"]["enabled"]
            else ""
        )
        + ".",
        f"* Update checks: {agg['update_checks']}",
        f"* Robust aggregation: {agg['robustness']}",
        *(f"* `{name}`: `{value}`" for name, value in agg.get("run_config", {}).items()),
        "",
    ]


def _metrics_md(metrics: Mapping[str, Any]) -> list[str]:
    models = ("teacher", "student_fp32", "student_int8")
    has_auc = metrics["overall"]["teacher"].get("auc") is not None
    header = ["model", "accuracy"] + (["AUC"] if has_auc else [])
    rows = []
    for name in models:
        m = metrics["overall"][name]
        rows.append([name, m["accuracy"]] + ([m.get("auc")] if has_auc else []))
    return [
        "## Metrics",
        "",
        "Pooled over the silos' held-out test splits "
        f"({metrics['overall']['teacher']['num_examples']} records), computed in each silo; "
        "only sums leave a silo.",
        "",
        *_table(header, rows),
        "",
        "Per silo (accuracy):",
        "",
        *_table(
            ["silo", *models],
            [
                [silo_id, *(per[name]["accuracy"] for name in models)]
                for silo_id, per in metrics["per_silo"].items()
            ],
        ),
        "",
        "int8 against fp32 (same student):",
        "",
        *_table(
            ["rows", "records", "top-1 agreement", "max |logit error|", "mean |logit error|"],
            [
                [
                    where,
                    a["rows"],
                    a["top1_agreement"],
                    a["max_abs_logit_error"],
                    a["mean_abs_logit_error"],
                ]
                for where, a in metrics["agreement"].items()
            ],
        ),
        "",
    ]


def _size_latency_md(size: Mapping[str, Any]) -> list[str]:
    return [
        "## Size and latency",
        "",
        f"{size['setting']}",
        "",
        *_table(
            ["model", "runtime", "bytes", "p50 latency, 1 record (ms)", "batch-256 records/s"],
            [
                [
                    name,
                    s["runtime"],
                    s["bytes"],
                    s["p50_latency_ms"],
                    f"{s['throughput_batch256']:.0f}",
                ]
                for name, s in size["models"].items()
            ],
        ),
        "",
        f"Student int8 vs teacher fp32: {size['ratios']['size']:.1f}× smaller, "
        f"{size['ratios']['throughput']:.1f}× the batch-256 throughput, "
        f"{size['ratios']['accuracy_points']:+.2f} accuracy points.",
        "",
    ]


def _trust_md(trust: Mapping[str, Any] | None) -> list[str]:
    if not trust:
        return []
    plots = {name: Path(file) for name, file in trust.get("plots", {}).items()}
    return [*trust_markdown(TrustResults.from_json(trust["results"]), plots), ""]
