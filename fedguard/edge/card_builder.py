"""The model card's JSON record, built section by section from an export's results.

:func:`build_card` returns the dict written as ``model-card.json`` (and rendered by
:func:`fedguard.edge.card.render_markdown`); each ``_..._section`` function builds
one top-level entry, in the card's key order. :func:`card_summary` is the table the
export prints.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from torch import nn

from fedguard.core.datasets import FeatureSchema, SiloData
from fedguard.core.models import count_parameters
from fedguard.edge.card import CARD_VERSION, PRIVACY_ACCOUNTANT, PRIVACY_UNIT, ledger_privacy
from fedguard.edge.distill import FederatedDistillResult, StudentSpec, central_round_event
from fedguard.edge.measure import Timing
from fedguard.edge.quantize import QuantizeConfig
from fedguard.privacy.accountant import PrivacyAccountant
from fedguard.privacy.central_accounting import central_dp_statement
from fedguard.runs.layout import silo_id as simulated_silo_id
from fedguard.runs.saved import SavedRun

__all__ = ["CardInputs", "build_card", "card_summary", "jsonable"]

_NOT_PROTECTED = (
    "the feature statistics (per-feature counts, sums, sums of squares over each silo's "
    "training split) every silo sends for preprocessing; the folded scaler (means and "
    "standard deviations of the standardized features) is part of the exported model",
    "the synthetic rows used for distillation transfer, int8 calibration and the agreement "
    "check are drawn from those statistics, so the student and its int8 ranges depend on "
    "them too",
    "the evaluation sums each silo returns (test loss, correct answers, score histograms) "
    "and the per-silo metrics in this card",
    "silo sizes (the counts in this card)",
)

_LIMITATIONS = (
    "Evaluated only on the consortium's own held-out splits (the same population as "
    "training); performance on other hospitals, banks or time periods is unknown.",
    "Accuracy is reported, not calibration; the int8 probabilities are not recalibrated.",
    "The silo data were rebuilt in process from a simulation run: a deployed export would "
    "run the per-silo steps (evaluation, federated distillation) as federated messages.",
    "Synthetic transfer and calibration rows assume independent features (the federated "
    "statistics hold no correlations); inputs far outside the training population may "
    "saturate int8 activation ranges.",
    "Inputs must be fedguard's encoded features; categories outside the code book cannot be "
    "encoded and must be rejected upstream.",
)


@dataclass(frozen=True)
class CardInputs:
    """What an export loaded, built, measured and wrote: everything the card reports."""

    saved: SavedRun
    schema: FeatureSchema
    silos: Sequence[SiloData]
    teacher: nn.Module
    student: nn.Module
    student_spec: StudentSpec
    quantize: QuantizeConfig
    threads: int
    timing_repeats: int
    method: str
    calibration_text: str
    distill_info: dict[str, Any]
    federated: FederatedDistillResult | None
    agreement: dict[str, Any]
    overall: dict[str, Any]
    per_silo: dict[str, Any]
    timings: Mapping[str, Timing]
    paths: Mapping[str, Path]

    @property
    def silo_ids(self) -> list[str]:
        return [simulated_silo_id(i) for i in range(len(self.silos))]


def build_card(inputs: CardInputs) -> dict[str, Any]:
    """The model card as a JSON-ready dict (without its ``trust`` entry, added by the export)."""
    return {
        "fedguard_model_card_version": CARD_VERSION,
        "model": _model_section(inputs),
        "intended_use": _intended_use_section(inputs),
        "data": _data_section(inputs),
        "training": _training_section(inputs),
        "privacy": _privacy_section(inputs),
        "aggregation": _aggregation_section(inputs),
        "metrics": {
            "overall": inputs.overall,
            "per_silo": inputs.per_silo,
            "agreement": inputs.agreement,
        },
        "size_latency": _size_latency_section(inputs),
        "limitations": _limitations(inputs),
    }


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings and string enums as their values, for JSON."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value
    return value


def card_summary(card: Mapping[str, Any]) -> str:
    """The few lines the export prints: accuracy, size and latency, agreement, privacy."""
    overall = card["metrics"]["overall"]
    size = card["size_latency"]
    lines = [
        f"{'model':<18} {'accuracy':>9} {'bytes':>9} {'p50 ms':>8} {'batch-256/s':>12}",
    ]
    for name in ("teacher_fp32", "student_fp32", "student_int8"):
        metric = overall["teacher" if name == "teacher_fp32" else name]
        s = size["models"][name]
        lines.append(
            f"{name:<18} {metric['accuracy']:>9.3f} {s['bytes']:>9} "
            f"{s['p50_latency_ms']:>8.3f} {s['throughput_batch256']:>12.0f}"
        )
    agreement = card["metrics"]["agreement"]["silo test splits"]
    lines.append(
        f"int8 vs fp32 on the silo test splits: top-1 agreement "
        f"{agreement['top1_agreement']:.4f}, max |logit error| "
        f"{agreement['max_abs_logit_error']:.4f}"
    )
    lines.append(f"privacy: {card['privacy']['statement']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version() -> str:
    try:
        return importlib_metadata.version("fedguard")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _model_section(inputs: CardInputs) -> dict[str, Any]:
    saved, schema, run = inputs.saved, inputs.schema, inputs.saved.config
    files = {
        name: {"path": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
        for name, path in (
            ("student_int8", inputs.paths["int8"]),
            ("student_fp32", inputs.paths["fp32"]),
            ("example_input", inputs.paths["example"]),
        )
    }
    return {
        "name": f"{run.data_name}-student-int8",
        "summary": (
            f"An int8 {inputs.student_spec.describe(schema)} distilled from the federated "
            f"global model of run `{saved.run_dir.name}` ({saved.variant}), for "
            "inference on constrained devices with onnxruntime (no torch)."
        ),
        "task": f"{schema.num_classes}-class classification of one record",
        "classes": list(schema.class_names),
        "input": {
            "description": (
                f"{schema.num_features} encoded features (names in the ONNX metadata and "
                "the sidecar JSON), not standardized (the federated scaler is folded in); "
                "NaN or an empty CSV cell = missing, imputed with the federated mean"
            ),
            "feature_names": list(schema.feature_names),
        },
        "teacher": {
            "architecture": type(inputs.teacher).__name__
            + (f" hidden {list(run.model.hidden)}" if len(schema.input_shape) == 1 else ""),
            "parameters": count_parameters(inputs.teacher),
            "round": saved.checkpoint.round,
        },
        "student": {
            "architecture": inputs.student_spec.describe(schema),
            "parameters": count_parameters(inputs.student),
        },
        "quantization": {
            "method": inputs.method,
            "scheme": "int8 weights per output channel, uint8 activations; Conv/Gemm/MatMul "
            "quantized, the scaler and output stay float"
            if inputs.quantize.per_channel
            else "int8 weights per tensor, uint8 activations",
            "calibration": inputs.calibration_text,
        },
        "files": files,
        "fedguard_version": _version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _intended_use_section(inputs: CardInputs) -> dict[str, Any]:
    return {
        "primary": (
            f"Decision support on {inputs.saved.config.data_name}-like records at the edge "
            "(bedside monitors, branch terminals, phones), under the consortium's oversight; a "
            "person reviews every decision."
        ),
        "users": "the consortium's clinical or credit staff and their auditors",
        "out_of_scope": [
            "automated decisions without human review",
            "populations outside the consortium's silos",
            "identifying or re-identifying any person",
            "inputs encoded other than with fedguard's fixed encoding",
        ],
    }


def _data_section(inputs: CardInputs) -> dict[str, Any]:
    run = inputs.saved.config
    return {
        "dataset": run.data_name,
        "data_contract": {
            "name": run.contract.name,
            "version": run.contract.version,
            "sha256": run.contract.content_hash(),
        },
        "source": "built-in public data set, partitioned into simulated silos",
        "num_silos": len(inputs.silos),
        "partition": str(run.partition),
        "test_fraction": run.test_fraction,
        "silos": [
            {
                "silo_id": sid,
                "train_examples": len(silo.train),
                "test_examples": len(silo.test),
            }
            for sid, silo in zip(inputs.silo_ids, inputs.silos, strict=True)
        ],
    }


def _training_section(inputs: CardInputs) -> dict[str, Any]:
    run = inputs.saved.config
    return {
        "teacher": {
            "summary": (
                f"{run.num_rounds} federated rounds over {run.num_clients} silos, "
                f"{run.training.local_epochs} local epoch(s), batch {run.training.batch_size}, "
                f"{run.training.optimizer.value} lr {run.training.learning_rate:g}, "
                + (
                    f"DP-SGD (clip {run.local_dp.max_grad_norm:g}, Poisson sampling)"
                    if run.local_dp.enabled
                    else "no DP"
                )
            ),
            "run_config": run.to_dict(),
            "run_id": inputs.saved.run_id,
        },
        "distillation": inputs.distill_info,
    }


def _privacy_section(inputs: CardInputs) -> dict[str, Any]:
    saved, run, federated = inputs.saved, inputs.saved.config, inputs.federated
    privacy_silos = ledger_privacy(
        {sid: saved.silo_dir(sid) for sid in inputs.silo_ids}, run.budget
    )
    has_ledgers = any(s.get("ledger") for s in privacy_silos.values())
    spent = [s["epsilon_spent"] for s in privacy_silos.values() if s.get("ledger")]
    dp_teacher = run.local_dp.enabled
    return {
        "dp": dp_teacher and has_ledgers,
        "statement": _privacy_statement(dp_teacher, has_ledgers, spent, inputs),
        "unit": PRIVACY_UNIT,
        "accountant": PRIVACY_ACCOUNTANT,
        "noise_source": run.local_dp.noise_source.value,
        "epsilon": max(spent) if spent and dp_teacher else None,
        "delta": run.budget.delta if spent and dp_teacher else None,
        "teacher_run_id": saved.run_id,
        "distillation_run_id": federated.run_id if federated is not None else None,
        "distillation_cost": _distillation_cost(federated),
        "silos": privacy_silos,
        "central": _central_privacy(saved, federated),
        "not_protected": list(_NOT_PROTECTED),
    }


def _privacy_statement(
    dp_teacher: bool, has_ledgers: bool, spent: Sequence[float], inputs: CardInputs
) -> str:
    if dp_teacher and has_ledgers:
        return (
            f"each silo's records are protected with (ε, δ) = (≤ {max(spent):.4g}, "
            f"{inputs.saved.config.budget.delta:g}) over its whole life (the largest silo spend; "
            f"every silo's own figure is below), covering the teacher's training"
            + (" and the federated distillation" if inputs.federated is not None else "")
            + "; the exported student is post-processing of those DP releases"
        )
    if has_ledgers:
        return (
            "none for this model: the teacher was trained WITHOUT differential privacy (the "
            "non-private research twin); the distillation rounds' DP-SGD cannot repair that"
        )
    return "none: the teacher was trained without differential privacy"


def _distillation_cost(federated: FederatedDistillResult | None) -> str:
    if federated is None:
        return (
            "none on silo data: server-side distillation uses no silo record and charges no ledger"
        )
    return (
        f"{federated.rounds} DP-SGD rounds charged to every silo's ledger under run id "
        f"`{federated.run_id}` (σ calibrated against the whole budget with prior spending "
        f"composed in)"
    )


def _central_privacy(
    saved: SavedRun, federated: FederatedDistillResult | None
) -> dict[str, Any] | None:
    """The silo-level DP-FedAvg guarantee, teacher rounds and distillation rounds composed."""
    run = saved.config
    if not run.central_dp.enabled:
        return None
    accountant = PrivacyAccountant()
    state = saved.checkpoint.state.get("central_accountant")
    if state is not None:
        accountant.load_state_dict(state)
    teacher_rounds = len([r for r in saved.history if r.get("round", 0) > 0])
    if federated is not None:
        accountant.compose(central_round_event(run.central_dp), federated.central_events)
    return {
        "epsilon": accountant.epsilon(run.central_dp.delta),
        "delta": run.central_dp.delta,
        "rounds": teacher_rounds + (federated.central_events if federated else 0),
        "unit": "one silo (user-level DP-FedAvg)",
        # Whom it covers; no amplification by sampling (cohorts are in the round logs).
        **{
            k: v
            for k, v in central_dp_statement(run.central_dp).items()
            if k in ("covers", "does_not_cover", "amplification_by_sampling")
        },
    }


def _aggregation_section(inputs: CardInputs) -> dict[str, Any]:
    run = inputs.saved.config
    return {
        "rule": "dp-fedavg (uniform weights, fixed denominator)"
        if run.central_dp.enabled
        else "weighted-mean (FedAvg, weights = silo training records)",
        "central_dp": jsonable(dataclasses.asdict(run.central_dp)),
        "update_checks": (
            "every update is checked before aggregation (tensor names, shapes, float32, "
            "finite values, example count) and rejected with a reason otherwise"
        ),
        "robustness": "no Byzantine-robust rule in this run (weighted mean)"
        if not run.central_dp.enabled
        else "central clipping bounds each silo's influence",
        # Every aggregation-related section of the run's config, as the run recorded it.
        "run_config": {
            k: v
            for k, v in run.to_dict().items()
            if any(word in k for word in ("agg", "robust", "central", "secure"))
        },
    }


def _size_latency_section(inputs: CardInputs) -> dict[str, Any]:
    t = inputs.timings["teacher_fp32"]
    q = inputs.timings["student_int8"]
    teacher_acc = inputs.overall["teacher"]["accuracy"]
    return {
        "setting": (
            f"CPU, {inputs.threads} thread(s); p50 of {inputs.timing_repeats} single-record "
            "calls; throughput = 256 / median batch-256 call time; teacher and student fp32 "
            "in torch (scaler folded), int8 in onnxruntime. Teacher bytes: torch.save of its "
            "state dict; ONNX bytes: the file."
        ),
        "models": {k: v.to_json() for k, v in inputs.timings.items()},
        "ratios": {
            "size": t.bytes / q.bytes,
            "throughput": q.throughput_batch256 / t.throughput_batch256,
            "accuracy_points": 100.0 * (inputs.overall["student_int8"]["accuracy"] - teacher_acc),
        },
    }


def _limitations(inputs: CardInputs) -> list[str]:
    limitations = list(_LIMITATIONS)
    if inputs.schema.num_classes == 2:
        limitations.append(
            "The decision threshold is argmax (0.5); choose a threshold for the clinical or "
            "credit cost of each error type before use."
        )
    if inputs.saved.config.local_dp.enabled:
        limitations.append(
            "DP-SGD trades accuracy for privacy: the teacher and student are weaker than a "
            "non-private model trained on the same data."
        )
    return limitations
