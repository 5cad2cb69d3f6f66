"""The edge pipeline from a saved run folder (``fedguard export RUN_DIR``).

Reads a run folder written by ``fedguard simulate`` (:mod:`fedguard.runs`)::

    RUN/report.json                                   the run's report
    RUN/<variant>/checkpoints/round-NNNN.npz|json     model, scaler and the run's config
    RUN/<variant>/history.json                        per-round pooled and per-silo metrics
    RUN/<variant>/silos/silo-K/privacy-ledger.sqlite  each silo's privacy ledger

and writes ``RUN/edge/`` (or ``--out``)::

    student-fp32.onnx, student-fp32.json    the distilled student, scaler folded in
    student-int8.onnx, student-int8.json    its int8 quantization (the edge artifact)
    model-card.md, model-card.json          the model card
    example-input.csv                       synthetic rows showing the input format

Steps: load the last global model of the variant (the teacher) and the scaler;
rebuild the silos' data in process from the run's config (this is a simulation
run; the rebuilt data are checked against the run's own scaler and evaluation);
distil a student (:mod:`fedguard.edge.distill`, server-side by default: no
privacy cost); export it to ONNX and quantize it to int8
(:mod:`fedguard.edge.quantize`); evaluate teacher, student and int8 student on
each silo's held-out test split, check int8 against fp32, time all three; read
every silo's ledger; write the model card (:mod:`fedguard.edge.card`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedguard.client.training import LocalData, evaluate
from fedguard.core.datasets import FeatureSchema, SiloData, schema_for
from fedguard.core.errors import ConfigError
from fedguard.core.files import atomic_write_json
from fedguard.core.metrics import binned_auc, score_histograms
from fedguard.core.models import build_model, count_parameters
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.seeding import derive_seed
from fedguard.core.serialization import load_weights
from fedguard.core.silos import simulation_silos
from fedguard.core.trust_results import read_trust_results
from fedguard.edge.card import (
    CARD_VERSION,
    PRIVACY_ACCOUNTANT,
    PRIVACY_UNIT,
    ledger_privacy,
    render_markdown,
    trust_section,
)
from fedguard.edge.distill import (
    DistillConfig,
    DistillMode,
    DistillSilo,
    FederatedDistillResult,
    ServerDistillResult,
    StudentSpec,
    central_round_event,
    distill_federated,
    distill_on_transfer_set,
    next_distill_run_id,
    seed_student,
)
from fedguard.edge.errors import RunFolderError
from fedguard.edge.predict import EdgeModel, read_feature_csv, sidecar_path
from fedguard.edge.quantize import (
    FoldedScalerModel,
    QuantizeConfig,
    check_agreement,
    export_onnx,
    quantize_onnx,
    require_agreement,
    scaled_for_model,
    synthetic_features,
)
from fedguard.privacy.accountant import PrivacyAccountant
from fedguard.privacy.central_accounting import central_dp_statement
from fedguard.runs.layout import VARIANTS
from fedguard.runs.layout import silo_id as simulated_silo_id
from fedguard.runs.saved import SavedRun, load_saved_run
from fedguard.runs.scaler_moments import same_scaler, scaler_reproduced

__all__ = [
    "ExportConfig",
    "ExportResult",
    "Timing",
    "export_run",
    "time_model",
]

Printer = Callable[[str], None]
_ACCURACY_TOLERANCE = 1e-9


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``fedguard export`` can be told."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    student: StudentSpec = field(default_factory=StudentSpec)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    variant: str | None = None  # dp if the run has it, else no-dp
    out_dir: Path | None = None  # default RUN/edge
    transfer_csv: Path | None = None  # public unlabeled transfer set (encoded features)
    timing_repeats: int = 200
    threads: int = 1

    def __post_init__(self) -> None:
        if self.variant is not None and self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.transfer_csv is not None and self.distill.mode is not DistillMode.SERVER:
            raise ConfigError("a transfer set is used by server-side distillation only")
        for name in ("timing_repeats", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    runtime: str
    bytes: int
    p50_latency_ms: float
    throughput_batch256: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def time_model(
    run: Callable[[np.ndarray], object], features: np.ndarray, repeats: int
) -> tuple[float, float]:
    """(p50 single-record latency in ms, batch-256 records/s) of ``run`` on encoded rows."""
    rows = np.ascontiguousarray(features, dtype=np.float32)
    if rows.shape[0] == 0:
        raise ConfigError("timing needs at least one row")
    single = rows[:1]
    batch = np.ascontiguousarray(np.resize(rows, (256, rows.shape[1])), dtype=np.float32)
    for _ in range(max(5, repeats // 10)):
        run(single)
        run(batch)
    singles = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(single)
        singles.append(time.perf_counter() - started)
    batches = []
    for _ in range(max(10, repeats // 4)):
        started = time.perf_counter()
        run(batch)
        batches.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(singles), 256.0 / statistics.median(batches)


def torch_runner(
    model: nn.Module, scaler: FeatureScaler, schema: FeatureSchema
) -> Callable[[np.ndarray], object]:
    """A torch fp32 forward pass on encoded rows (the scaler folded in, as on the edge)."""
    folded = FoldedScalerModel(model, scaler, schema.input_shape).eval()

    @torch.no_grad()
    def run(rows: np.ndarray) -> object:
        return folded(torch.from_numpy(rows))

    return run


def torch_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the fp32 torch artifact."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


class _TorchThreads:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.before = torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


# --------------------------------------------------------------------------- metrics


def _pooled(parts: Sequence[tuple[np.ndarray, np.ndarray]], binary: bool) -> dict[str, Any]:
    """Accuracy (and binary AUC from summed histograms) over (logits, labels) parts."""
    n = sum(len(labels) for _, labels in parts)
    correct = sum(int((logits.argmax(axis=1) == labels).sum()) for logits, labels in parts)
    out: dict[str, Any] = {"num_examples": n, "accuracy": correct / n if n else math.nan}
    out["auc"] = None
    if binary and parts:
        histograms = [
            score_histograms(
                1.0 / (1.0 + np.exp(-np.diff(logits.astype(np.float64))[:, 0])), labels
            )
            for logits, labels in parts
        ]
        out["auc"] = binned_auc(
            np.sum([h[0] for h in histograms], axis=0), np.sum([h[1] for h in histograms], axis=0)
        )
    return out


@torch.no_grad()
def _torch_logits(model: nn.Module, data: LocalData) -> np.ndarray:
    model.eval()
    return np.asarray(model(torch.from_numpy(data.features)).numpy(), dtype=np.float32)


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    card: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version() -> str:
    try:
        return importlib_metadata.version("fedguard")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _rebuild_silos(saved: SavedRun) -> tuple[list[SiloData], FeatureStatistics]:
    """The run's silos, rebuilt in process, checked against the run's own (DP) scaler."""
    c = saved.config
    silos = simulation_silos(c.dataset, c.num_clients, c.partition, c.test_fraction, c.seed)
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos])
    stored = saved.scaler
    agrees = scaler_reproduced(saved.variant_dir, c.dataset, [s.train for s in silos], stored)
    if agrees is None:  # a run folder from before the DP scaler: exact pooled sums
        agrees = same_scaler(FeatureScaler.from_statistics(stats, schema_for(c.dataset)), stored)
    if not agrees:
        raise RunFolderError(
            "the silo data rebuilt from the run's config do not reproduce the run's feature "
            "scaler; the run folder was made with other data or another fedguard"
        )
    return silos, stats


def _check_teacher(saved: SavedRun, per_silo_accuracy: Mapping[str, float]) -> None:
    if not saved.history:
        return
    recorded = saved.history[-1].get("evaluation", {}).get("per_silo", {})
    for silo_id, accuracy in per_silo_accuracy.items():
        if (
            silo_id in recorded
            and abs(recorded[silo_id]["accuracy"] - accuracy) > _ACCURACY_TOLERANCE
        ):
            raise RunFolderError(
                f"the teacher scores {accuracy:.6f} on {silo_id}'s rebuilt test split, but the "
                f"run recorded {recorded[silo_id]['accuracy']:.6f}: the rebuilt silo data differ"
            )


def export_run(
    run_dir: Path, config: ExportConfig | None = None, echo: Printer = print
) -> ExportResult:
    """Run the whole edge pipeline on a saved run folder (see the module docstring)."""
    config = config or ExportConfig()
    saved = load_saved_run(run_dir, config.variant)
    run = saved.config
    schema = schema_for(run.dataset)
    out_dir = Path(config.out_dir) if config.out_dir is not None else saved.run_dir / "edge"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"output folder {out_dir} exists and is not empty; pass another --out")
    echo(
        f"--- edge export of {saved.run_dir} ({saved.variant}, round {saved.checkpoint.round}) ---"
    )

    silos, stats = _rebuild_silos(saved)
    scaler = saved.scaler
    teacher = build_model(schema, run.model)
    load_weights(teacher, saved.teacher_weights)
    teacher.eval()

    def local(silo: SiloData, train: bool) -> LocalData:
        part = silo.train if train else silo.test
        return LocalData(scaled_for_model(scaler, schema, part.features), part.labels)

    test = {simulated_silo_id(i): local(s, train=False) for i, s in enumerate(silos)}
    teacher_test = {
        sid: evaluate(teacher, data, schema.num_classes).accuracy for sid, data in test.items()
    }
    _check_teacher(saved, teacher_test)

    seed_student(run.seed)
    student = config.student.build(schema)
    distill_info: dict[str, Any]
    federated: FederatedDistillResult | None = None
    if config.distill.mode is DistillMode.SERVER:
        if config.transfer_csv is not None:
            transfer = read_feature_csv(Path(config.transfer_csv), schema.feature_names)
            source = (
                f"public transfer set {Path(config.transfer_csv).name} ({transfer.shape[0]} rows)"
            )
        else:
            transfer = synthetic_features(
                stats, schema, config.distill.transfer_rows, derive_seed(run.seed, "transfer")
            ).astype(np.float32)
            source = (
                f"{transfer.shape[0]} synthetic rows drawn from the federated feature statistics"
            )
        server: ServerDistillResult = distill_on_transfer_set(
            teacher,
            student,
            scaled_for_model(scaler, schema, transfer),
            config.distill,
            run.seed,
            source,
        )
        distill_info = {
            "mode": "server",
            "summary": (
                f"server-side, on {source}; soft loss only (T={config.distill.temperature:g}), "
                f"Adam lr {config.distill.server_learning_rate:g}, {server.epochs} epochs, "
                f"batch {config.distill.server_batch_size}; no silo record used"
            ),
            "transfer_source": source,
            "final_loss": server.final_loss,
        }
    else:
        distill_silos = [
            DistillSilo(
                simulated_silo_id(i),
                saved.silo_dir(simulated_silo_id(i)),
                run.budget,
                local(s, train=True),
            )
            for i, s in enumerate(silos)
        ]
        run_id = next_distill_run_id(saved.run_id, distill_silos)
        federated = distill_federated(
            teacher,
            student,
            distill_silos,
            config.distill,
            run.local_dp,
            run.central_dp,
            run_id,
            run.seed,
            echo,
        )
        t = config.distill.training
        how = "DP-SGD" if federated.private else "non-private SGD (the no-dp twin)"
        distill_info = {
            "mode": "federated",
            "summary": (
                f"federated, {federated.rounds} extra rounds of {how} in every silo on its own "
                f"records against the teacher's soft labels (α={config.distill.alpha:g}, "
                f"T={config.distill.temperature:g}; {t.local_epochs} local epoch(s), batch "
                f"{t.batch_size}, {t.optimizer.value} lr {t.learning_rate:g}), run id "
                f"`{run_id}`" + (", each silo charging its ledger" if federated.private else "")
            ),
            "run_id": run_id,
            "plans": [dataclasses.asdict(p) for p in federated.plans],
            "rounds": federated.round_log,
        }
    distill_info["config"] = _jsonable(dataclasses.asdict(config.distill))
    distill_info["student"] = _jsonable(dataclasses.asdict(config.student))

    # --- ONNX, int8, agreement
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / "student-fp32.onnx"
    int8_path = out_dir / "student-int8.onnx"
    fp32_meta = export_onnx(student, scaler, schema, fp32_path)
    method = config.quantize.resolve(student)
    if config.transfer_csv is not None:
        calibration = read_feature_csv(Path(config.transfer_csv), schema.feature_names)
        calibration = calibration[: config.quantize.calibration_rows]
        calibration_text = f"the public transfer set ({calibration.shape[0]} rows)"
    else:
        calibration = synthetic_features(
            stats, schema, config.quantize.calibration_rows, derive_seed(run.seed, "calibration")
        ).astype(np.float32)
        calibration_text = (
            f"{calibration.shape[0]} synthetic rows drawn from the federated feature statistics "
            "(no silo record)"
        )
    if method.value == "dynamic":
        calibration_text = "none needed: dynamic quantization measures activation ranges per batch"
    int8_meta = quantize_onnx(
        fp32_path, int8_path, method, calibration, per_channel=config.quantize.per_channel
    )
    for path, meta in ((fp32_path, fp32_meta), (int8_path, int8_meta)):
        atomic_write_json(sidecar_path(path), meta.to_json())
    fp32_model = EdgeModel(fp32_path, threads=config.threads)
    int8_model = EdgeModel(int8_path, threads=config.threads)
    check_rows = synthetic_features(stats, schema, 1024, derive_seed(run.seed, "agreement"))
    agreement = {
        "synthetic": check_agreement(fp32_model, int8_model, check_rows),
        "silo test splits": check_agreement(
            fp32_model, int8_model, np.concatenate([s.test.features for s in silos])
        ),
    }
    require_agreement(
        agreement["silo test splits"], config.quantize.min_top1_agreement, "silo test"
    )

    # --- metrics per silo, pooled
    binary = schema.num_classes == 2
    per_silo: dict[str, dict[str, Any]] = {}
    pooled_parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
        "teacher": [],
        "student_fp32": [],
        "student_int8": [],
    }
    for i, silo in enumerate(silos):
        sid = simulated_silo_id(i)
        logits = {
            "teacher": _torch_logits(teacher, test[sid]),
            "student_fp32": _torch_logits(student, test[sid]),
            "student_int8": int8_model.logits(silo.test.features),
        }
        per_silo[sid] = {}
        for name, values in logits.items():
            pooled_parts[name].append((values, silo.test.labels))
            per_silo[sid][name] = _pooled([(values, silo.test.labels)], binary)
    overall = {name: _pooled(parts, binary) for name, parts in pooled_parts.items()}

    # --- size and latency
    timing_rows = np.concatenate([s.test.features for s in silos])
    with _TorchThreads(config.threads):
        t_p50, t_thr = time_model(
            torch_runner(teacher, scaler, schema), timing_rows, config.timing_repeats
        )
        s_p50, s_thr = time_model(
            torch_runner(student, scaler, schema), timing_rows, config.timing_repeats
        )
    q_p50, q_thr = time_model(int8_model.run_raw, timing_rows, config.timing_repeats)
    f_p50, f_thr = time_model(fp32_model.run_raw, timing_rows, config.timing_repeats)
    timings = {
        "teacher_fp32": Timing("torch", torch_bytes(teacher), t_p50, t_thr),
        "student_fp32": Timing("torch", torch_bytes(student), s_p50, s_thr),
        "student_fp32_onnx": Timing("onnxruntime", fp32_path.stat().st_size, f_p50, f_thr),
        "student_int8": Timing("onnxruntime", int8_path.stat().st_size, q_p50, q_thr),
    }

    # --- example input (synthetic rows: the format, never a record)
    example_path = out_dir / "example-input.csv"
    _write_example(example_path, schema, synthetic_features(stats, schema, 5, run.seed))

    # --- trust: the student's attributions (charged like the global model's), with the
    # teacher run's fairness audit, drift status and global attributions
    student_attribution, not_explained = None, None
    if run.trust.explain:  # captum (the explain extra) is needed only then
        from fedguard.edge.explain import student_attributions

        student_attribution, not_explained = student_attributions(saved, student, scaler, schema)

    card = _card(
        saved,
        schema,
        silos,
        teacher,
        student,
        config,
        method.value,
        calibration_text,
        distill_info,
        federated,
        {k: v.to_json() for k, v in agreement.items()},
        overall,
        per_silo,
        timings,
        {"fp32": fp32_path, "int8": int8_path, "example": example_path},
    )
    card["trust"] = trust_section(
        read_trust_results(saved.variant_dir), student_attribution, out_dir
    )
    if not_explained is not None:
        card["limitations"].append(f"Student attributions were not computed: {not_explained}.")
    card_json = out_dir / "model-card.json"
    card_md = out_dir / "model-card.md"
    atomic_write_json(card_json, card)
    card_md.write_text(render_markdown(card), encoding="utf-8")
    echo(_summary(card))
    files = {
        "student_fp32": fp32_path,
        "student_int8": int8_path,
        "sidecar_int8": sidecar_path(int8_path),
        "card_json": card_json,
        "card_markdown": card_md,
        "example_input": example_path,
    }
    return ExportResult(out_dir=out_dir, files=files, card=card)


def _write_example(path: Path, schema: FeatureSchema, rows: np.ndarray) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(schema.feature_names)
        for row in rows:
            writer.writerow(["" if math.isnan(v) else f"{v:.6g}" for v in row])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value
    return value


def _summary(card: Mapping[str, Any]) -> str:
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


def _card(
    saved: SavedRun,
    schema: FeatureSchema,
    silos: Sequence[SiloData],
    teacher: nn.Module,
    student: nn.Module,
    config: ExportConfig,
    method: str,
    calibration_text: str,
    distill_info: dict[str, Any],
    federated: FederatedDistillResult | None,
    agreement: dict[str, Any],
    overall: dict[str, Any],
    per_silo: dict[str, Any],
    timings: Mapping[str, Timing],
    paths: Mapping[str, Path],
) -> dict[str, Any]:
    run = saved.config
    silo_ids = [simulated_silo_id(i) for i in range(len(silos))]
    privacy_silos = ledger_privacy({sid: saved.silo_dir(sid) for sid in silo_ids}, run.budget)
    has_ledgers = any(s.get("ledger") for s in privacy_silos.values())
    spent = [s["epsilon_spent"] for s in privacy_silos.values() if s.get("ledger")]
    dp_teacher = run.local_dp.enabled
    if dp_teacher and has_ledgers:
        statement = (
            f"each silo's records are protected with (ε, δ) = (≤ {max(spent):.4g}, "
            f"{run.budget.delta:g}) over its whole life (the largest silo spend; every silo's own "
            f"figure is below), covering the teacher's training"
            + (" and the federated distillation" if federated is not None else "")
            + "; the exported student is post-processing of those DP releases"
        )
    elif has_ledgers:
        statement = (
            "none for this model: the teacher was trained WITHOUT differential privacy (the "
            "non-private research twin); the distillation rounds' DP-SGD cannot repair that"
        )
    else:
        statement = "none: the teacher was trained without differential privacy"
    if federated is None:
        cost = (
            "none on silo data: server-side distillation uses no silo record and charges no ledger"
        )
    else:
        cost = (
            f"{federated.rounds} DP-SGD rounds charged to every silo's ledger under run id "
            f"`{federated.run_id}` (σ calibrated against the whole budget with prior spending "
            f"composed in)"
        )
    central: dict[str, Any] | None = None
    if run.central_dp.enabled:
        accountant = PrivacyAccountant()
        state = saved.checkpoint.state.get("central_accountant")
        if state is not None:
            accountant.load_state_dict(state)
        teacher_rounds = len([r for r in saved.history if r.get("round", 0) > 0])
        if federated is not None:
            accountant.compose(central_round_event(run.central_dp), federated.central_events)
        central = {
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
    not_protected = [
        "the feature statistics (per-feature counts, sums, sums of squares over each silo's "
        "training split) every silo sends for preprocessing; the folded scaler (means and "
        "standard deviations of the standardized features) is part of the exported model",
        "the synthetic rows used for distillation transfer, int8 calibration and the agreement "
        "check are drawn from those statistics, so the student and its int8 ranges depend on "
        "them too",
        "the evaluation sums each silo returns (test loss, correct answers, score histograms) "
        "and the per-silo metrics in this card",
        "silo sizes (the counts in this card)",
    ]
    files = {
        name: {"path": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
        for name, path in (
            ("student_int8", paths["int8"]),
            ("student_fp32", paths["fp32"]),
            ("example_input", paths["example"]),
        )
    }
    t = timings["teacher_fp32"]
    q = timings["student_int8"]
    teacher_acc = overall["teacher"]["accuracy"]
    limitations = [
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
    ]
    if schema.num_classes == 2:
        limitations.append(
            "The decision threshold is argmax (0.5); choose a threshold for the clinical or "
            "credit cost of each error type before use."
        )
    if dp_teacher:
        limitations.append(
            "DP-SGD trades accuracy for privacy: the teacher and student are weaker than a "
            "non-private model trained on the same data."
        )
    return {
        "fedguard_model_card_version": CARD_VERSION,
        "model": {
            "name": f"{run.dataset.value}-student-int8",
            "summary": (
                f"An int8 {config.student.describe(schema)} distilled from the federated "
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
                "architecture": type(teacher).__name__
                + (f" hidden {list(run.model.hidden)}" if len(schema.input_shape) == 1 else ""),
                "parameters": count_parameters(teacher),
                "round": saved.checkpoint.round,
            },
            "student": {
                "architecture": config.student.describe(schema),
                "parameters": count_parameters(student),
            },
            "quantization": {
                "method": method,
                "scheme": "int8 weights per output channel, uint8 activations; Conv/Gemm/MatMul "
                "quantized, the scaler and output stay float"
                if config.quantize.per_channel
                else "int8 weights per tensor, uint8 activations",
                "calibration": calibration_text,
            },
            "files": files,
            "fedguard_version": _version(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "intended_use": {
            "primary": (
                f"Decision support on {run.dataset.value}-like records at the edge (bedside "
                "monitors, branch terminals, phones), under the consortium's oversight; a "
                "person reviews every decision."
            ),
            "users": "the consortium's clinical or credit staff and their auditors",
            "out_of_scope": [
                "automated decisions without human review",
                "populations outside the consortium's silos",
                "identifying or re-identifying any person",
                "inputs encoded other than with fedguard's fixed encoding",
            ],
        },
        "data": {
            "dataset": run.dataset.value,
            "source": "built-in public data set, partitioned into simulated silos",
            "num_silos": len(silos),
            "partition": str(run.partition),
            "test_fraction": run.test_fraction,
            "silos": [
                {
                    "silo_id": sid,
                    "train_examples": len(silo.train),
                    "test_examples": len(silo.test),
                }
                for sid, silo in zip(silo_ids, silos, strict=True)
            ],
        },
        "training": {
            "teacher": {
                "summary": (
                    f"{run.num_rounds} federated rounds over {run.num_clients} silos, "
                    f"{run.training.local_epochs} local epoch(s), batch {run.training.batch_size}, "
                    f"{run.training.optimizer.value} lr {run.training.learning_rate:g}, "
                    + (
                        f"DP-SGD (clip {run.local_dp.max_grad_norm:g}, Poisson sampling)"
                        if dp_teacher
                        else "no DP"
                    )
                ),
                "run_config": run.to_dict(),
                "run_id": saved.run_id,
            },
            "distillation": distill_info,
        },
        "privacy": {
            "dp": dp_teacher and has_ledgers,
            "statement": statement,
            "unit": PRIVACY_UNIT,
            "accountant": PRIVACY_ACCOUNTANT,
            "noise_source": run.local_dp.noise_source.value,
            "epsilon": max(spent) if spent and dp_teacher else None,
            "delta": run.budget.delta if spent and dp_teacher else None,
            "teacher_run_id": saved.run_id,
            "distillation_run_id": federated.run_id if federated is not None else None,
            "distillation_cost": cost,
            "silos": privacy_silos,
            "central": central,
            "not_protected": not_protected,
        },
        "aggregation": {
            "rule": "dp-fedavg (uniform weights, fixed denominator)"
            if run.central_dp.enabled
            else "weighted-mean (FedAvg, weights = silo training records)",
            "central_dp": _jsonable(dataclasses.asdict(run.central_dp)),
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
        },
        "metrics": {
            "overall": overall,
            "per_silo": per_silo,
            "agreement": agreement,
        },
        "size_latency": {
            "setting": (
                f"CPU, {config.threads} thread(s); p50 of {config.timing_repeats} single-record "
                "calls; throughput = 256 / median batch-256 call time; teacher and student fp32 "
                "in torch (scaler folded), int8 in onnxruntime. Teacher bytes: torch.save of its "
                "state dict; ONNX bytes: the file."
            ),
            "models": {k: v.to_json() for k, v in timings.items()},
            "ratios": {
                "size": t.bytes / q.bytes,
                "throughput": q.throughput_batch256 / t.throughput_batch256,
                "accuracy_points": 100.0 * (overall["student_int8"]["accuracy"] - teacher_acc),
            },
        },
        "limitations": limitations,
    }
