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
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedguard.client.training import LocalData, evaluate
from fedguard.core.datasets import EncodedData, FeatureSchema, SiloData, schema_for
from fedguard.core.errors import ConfigError
from fedguard.core.files import atomic_write_json
from fedguard.core.models import build_model
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.seeding import derive_seed
from fedguard.core.serialization import load_weights
from fedguard.core.silos import PooledData, simulation_silos
from fedguard.edge.card import render_markdown, trust_section
from fedguard.edge.card_builder import CardInputs, build_card, card_summary, jsonable
from fedguard.edge.distill import (
    DistillConfig,
    DistillMode,
    DistillSilo,
    FederatedDistillResult,
    ServerDistillResult,
    StudentSpec,
    distill_federated,
    distill_on_transfer_set,
    next_distill_run_id,
    seed_student,
)
from fedguard.edge.errors import RunFolderError
from fedguard.edge.measure import (
    Timing,
    TorchThreads,
    pooled_metrics,
    time_model,
    torch_bytes,
    torch_runner,
)
from fedguard.edge.measure import torch_logits as _torch_logits  # benchmarks/edge.py uses it
from fedguard.edge.predict import EdgeModel, read_feature_csv, sidecar_path
from fedguard.edge.quantize import (
    QuantizeConfig,
    check_agreement,
    export_onnx,
    quantize_onnx,
    require_agreement,
    scaled_for_model,
    synthetic_features,
)
from fedguard.runs.layout import VARIANTS
from fedguard.runs.layout import silo_id as simulated_silo_id
from fedguard.runs.saved import SavedRun, load_saved_run
from fedguard.runs.scaler_moments import same_scaler, scaler_reproduced
from fedguard.trust.results import AttributionResult, read_trust_results

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


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    card: dict[str, Any]


# --------------------------------------------------------------------------- stage results


@dataclass(frozen=True)
class _Teacher:
    """The loaded run: its teacher, scaler and rebuilt silos (test splits scaled for torch)."""

    saved: SavedRun
    schema: FeatureSchema
    scaler: FeatureScaler
    silos: list[SiloData]
    stats: FeatureStatistics
    model: nn.Module
    test: dict[str, LocalData]

    def train_data(self, silo: SiloData) -> LocalData:
        return _scaled(self.scaler, self.schema, silo.train)

    @property
    def test_features(self) -> np.ndarray:
        """Every silo's test split, encoded (unscaled): the edge models' input."""
        return np.concatenate([s.test.features for s in self.silos])


@dataclass(frozen=True)
class _Distilled:
    student: nn.Module
    info: dict[str, Any]  # the card's training.distillation entry
    federated: FederatedDistillResult | None  # None for server-side distillation


@dataclass(frozen=True)
class _Quantized:
    fp32_path: Path
    int8_path: Path
    method: str
    calibration_text: str
    fp32_model: EdgeModel
    int8_model: EdgeModel
    agreement: dict[str, Any]  # rows checked -> check_agreement result


# --------------------------------------------------------------------------- the pipeline


def export_run(
    run_dir: Path, config: ExportConfig | None = None, echo: Printer = print
) -> ExportResult:
    """Run the whole edge pipeline on a saved run folder (see the module docstring)."""
    config = config or ExportConfig()
    saved = load_saved_run(run_dir, config.variant)
    out_dir = _output_folder(saved, config)
    echo(
        f"--- edge export of {saved.run_dir} ({saved.variant}, round {saved.checkpoint.round}) ---"
    )
    teacher = _load_teacher(saved)
    distilled = _distill(teacher, config, echo)
    quantized = _quantize(teacher, distilled.student, config, out_dir)
    overall, per_silo = _evaluate(teacher, distilled.student, quantized.int8_model)
    timings = _measure(teacher, distilled.student, quantized, config)
    return _write_outputs(
        teacher, distilled, quantized, overall, per_silo, timings, config, out_dir, echo
    )


def _output_folder(saved: SavedRun, config: ExportConfig) -> Path:
    out_dir = Path(config.out_dir) if config.out_dir is not None else saved.run_dir / "edge"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"output folder {out_dir} exists and is not empty; pass another --out")
    return out_dir


def _rebuild_silos(saved: SavedRun) -> tuple[list[SiloData], FeatureStatistics]:
    """The run's silos, rebuilt in process, checked against the run's own (DP) scaler."""
    c = saved.config
    silos = simulation_silos(
        PooledData.for_run(c), c.num_clients, c.partition, c.test_fraction, c.seed
    )
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos])
    stored = saved.scaler
    agrees = scaler_reproduced(
        saved.variant_dir, schema_for(c.contract), [s.train for s in silos], stored
    )
    if agrees is None:  # a run folder from before the DP scaler: exact pooled sums
        agrees = same_scaler(FeatureScaler.from_statistics(stats, schema_for(c.contract)), stored)
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


def _load_teacher(saved: SavedRun) -> _Teacher:
    """The run's last global model and rebuilt silos, checked against what the run recorded."""
    schema = schema_for(saved.config.contract)
    silos, stats = _rebuild_silos(saved)
    model = build_model(schema, saved.config.model)
    load_weights(model, saved.teacher_weights)
    model.eval()
    test = {
        simulated_silo_id(i): _scaled(saved.scaler, schema, s.test) for i, s in enumerate(silos)
    }
    _check_teacher(
        saved,
        {sid: evaluate(model, data, schema.num_classes).accuracy for sid, data in test.items()},
    )
    return _Teacher(saved, schema, saved.scaler, silos, stats, model, test)


def _scaled(scaler: FeatureScaler, schema: FeatureSchema, part: EncodedData) -> LocalData:
    """A split as the torch models see it: features standardized by the run's scaler."""
    return LocalData(scaled_for_model(scaler, schema, part.features), part.labels)


# --------------------------------------------------------------------------- distillation


def _distill(teacher: _Teacher, config: ExportConfig, echo: Printer) -> _Distilled:
    seed_student(teacher.saved.config.seed)
    student = config.student.build(teacher.schema)
    if config.distill.mode is DistillMode.SERVER:
        info, federated = _distill_on_server(teacher, student, config), None
    else:
        info, federated = _distill_in_silos(teacher, student, config, echo)
    info["config"] = jsonable(dataclasses.asdict(config.distill))
    info["student"] = jsonable(dataclasses.asdict(config.student))
    return _Distilled(student, info, federated)


def _distill_on_server(
    teacher: _Teacher, student: nn.Module, config: ExportConfig
) -> dict[str, Any]:
    """Server-side distillation on a transfer set (public CSV or synthetic): no privacy cost."""
    schema, seed = teacher.schema, teacher.saved.config.seed
    if config.transfer_csv is not None:
        transfer = read_feature_csv(Path(config.transfer_csv), schema.feature_names)
        source = f"public transfer set {Path(config.transfer_csv).name} ({transfer.shape[0]} rows)"
    else:
        transfer = synthetic_features(
            teacher.stats, schema, config.distill.transfer_rows, derive_seed(seed, "transfer")
        ).astype(np.float32)
        source = f"{transfer.shape[0]} synthetic rows drawn from the federated feature statistics"
    server: ServerDistillResult = distill_on_transfer_set(
        teacher.model,
        student,
        scaled_for_model(teacher.scaler, schema, transfer),
        config.distill,
        seed,
        source,
    )
    return {
        "mode": "server",
        "summary": (
            f"server-side, on {source}; soft loss only (T={config.distill.temperature:g}), "
            f"Adam lr {config.distill.server_learning_rate:g}, {server.epochs} epochs, "
            f"batch {config.distill.server_batch_size}; no silo record used"
        ),
        "transfer_source": source,
        "final_loss": server.final_loss,
    }


def _distill_in_silos(
    teacher: _Teacher, student: nn.Module, config: ExportConfig, echo: Printer
) -> tuple[dict[str, Any], FederatedDistillResult]:
    """Federated distillation: extra rounds in every silo, charged to its ledger."""
    saved, run = teacher.saved, teacher.saved.config
    distill_silos = [
        DistillSilo(
            simulated_silo_id(i),
            saved.silo_dir(simulated_silo_id(i)),
            run.budget,
            teacher.train_data(s),
        )
        for i, s in enumerate(teacher.silos)
    ]
    run_id = next_distill_run_id(saved.run_id, distill_silos)
    federated = distill_federated(
        teacher.model,
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
    info = {
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
    return info, federated


# --------------------------------------------------------------------------- ONNX, int8


def _quantize(
    teacher: _Teacher, student: nn.Module, config: ExportConfig, out_dir: Path
) -> _Quantized:
    """The student as fp32 and int8 ONNX (with sidecars), int8 checked against fp32."""
    schema, scaler, stats = teacher.schema, teacher.scaler, teacher.stats
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / "student-fp32.onnx"
    int8_path = out_dir / "student-int8.onnx"
    fp32_meta = export_onnx(student, scaler, schema, fp32_path)
    method = config.quantize.resolve(student)
    calibration, calibration_text = _calibration_rows(teacher, config)
    if method.value == "dynamic":
        calibration_text = "none needed: dynamic quantization measures activation ranges per batch"
    int8_meta = quantize_onnx(
        fp32_path, int8_path, method, calibration, per_channel=config.quantize.per_channel
    )
    for path, meta in ((fp32_path, fp32_meta), (int8_path, int8_meta)):
        atomic_write_json(sidecar_path(path), meta.to_json())
    fp32_model = EdgeModel(fp32_path, threads=config.threads)
    int8_model = EdgeModel(int8_path, threads=config.threads)
    seed = teacher.saved.config.seed
    check_rows = synthetic_features(stats, schema, 1024, derive_seed(seed, "agreement"))
    agreement = {
        "synthetic": check_agreement(fp32_model, int8_model, check_rows),
        "silo test splits": check_agreement(fp32_model, int8_model, teacher.test_features),
    }
    require_agreement(
        agreement["silo test splits"], config.quantize.min_top1_agreement, "silo test"
    )
    return _Quantized(
        fp32_path,
        int8_path,
        method.value,
        calibration_text,
        fp32_model,
        int8_model,
        {k: v.to_json() for k, v in agreement.items()},
    )


def _calibration_rows(teacher: _Teacher, config: ExportConfig) -> tuple[np.ndarray, str]:
    """Rows for static int8 calibration, and how the card describes them."""
    schema = teacher.schema
    if config.transfer_csv is not None:
        calibration = read_feature_csv(Path(config.transfer_csv), schema.feature_names)
        calibration = calibration[: config.quantize.calibration_rows]
        return calibration, f"the public transfer set ({calibration.shape[0]} rows)"
    seed = derive_seed(teacher.saved.config.seed, "calibration")
    calibration = synthetic_features(
        teacher.stats, schema, config.quantize.calibration_rows, seed
    ).astype(np.float32)
    return calibration, (
        f"{calibration.shape[0]} synthetic rows drawn from the federated feature statistics "
        "(no silo record)"
    )


# --------------------------------------------------------------------------- metrics, timing


def _evaluate(
    teacher: _Teacher, student: nn.Module, int8_model: EdgeModel
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pooled, per-silo) metrics of teacher, student and int8 student on the test splits."""
    binary = teacher.schema.num_classes == 2
    per_silo: dict[str, dict[str, Any]] = {}
    pooled_parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
        "teacher": [],
        "student_fp32": [],
        "student_int8": [],
    }
    for i, silo in enumerate(teacher.silos):
        sid = simulated_silo_id(i)
        logits = {
            "teacher": _torch_logits(teacher.model, teacher.test[sid]),
            "student_fp32": _torch_logits(student, teacher.test[sid]),
            "student_int8": int8_model.logits(silo.test.features),
        }
        per_silo[sid] = {}
        for name, values in logits.items():
            pooled_parts[name].append((values, silo.test.labels))
            per_silo[sid][name] = pooled_metrics([(values, silo.test.labels)], binary)
    overall = {name: pooled_metrics(parts, binary) for name, parts in pooled_parts.items()}
    return overall, per_silo


def _measure(
    teacher: _Teacher, student: nn.Module, quantized: _Quantized, config: ExportConfig
) -> dict[str, Timing]:
    """Size and latency of the torch teacher and student and of both ONNX students."""
    rows, repeats = teacher.test_features, config.timing_repeats
    scaler, schema = teacher.scaler, teacher.schema
    with TorchThreads(config.threads):
        t_p50, t_thr = time_model(torch_runner(teacher.model, scaler, schema), rows, repeats)
        s_p50, s_thr = time_model(torch_runner(student, scaler, schema), rows, repeats)
    q_p50, q_thr = time_model(quantized.int8_model.run_raw, rows, repeats)
    f_p50, f_thr = time_model(quantized.fp32_model.run_raw, rows, repeats)
    return {
        "teacher_fp32": Timing("torch", torch_bytes(teacher.model), t_p50, t_thr),
        "student_fp32": Timing("torch", torch_bytes(student), s_p50, s_thr),
        "student_fp32_onnx": Timing(
            "onnxruntime", quantized.fp32_path.stat().st_size, f_p50, f_thr
        ),
        "student_int8": Timing("onnxruntime", quantized.int8_path.stat().st_size, q_p50, q_thr),
    }


# --------------------------------------------------------------------------- outputs


def _write_outputs(
    teacher: _Teacher,
    distilled: _Distilled,
    quantized: _Quantized,
    overall: dict[str, Any],
    per_silo: dict[str, Any],
    timings: Mapping[str, Timing],
    config: ExportConfig,
    out_dir: Path,
    echo: Printer,
) -> ExportResult:
    """The example input and the model card (JSON and Markdown); the summary is printed."""
    saved, schema = teacher.saved, teacher.schema
    # Synthetic rows: the format, never a record.
    example_path = out_dir / "example-input.csv"
    _write_example(
        example_path, schema, synthetic_features(teacher.stats, schema, 5, saved.config.seed)
    )
    # Before the card: the attributions charge the ledgers the card's privacy section reads.
    student_attribution, not_explained = _student_attributions(teacher, distilled.student)
    card = build_card(
        CardInputs(
            saved=saved,
            schema=schema,
            silos=teacher.silos,
            teacher=teacher.model,
            student=distilled.student,
            student_spec=config.student,
            quantize=config.quantize,
            threads=config.threads,
            timing_repeats=config.timing_repeats,
            method=quantized.method,
            calibration_text=quantized.calibration_text,
            distill_info=distilled.info,
            federated=distilled.federated,
            agreement=quantized.agreement,
            overall=overall,
            per_silo=per_silo,
            timings=timings,
            paths={
                "fp32": quantized.fp32_path,
                "int8": quantized.int8_path,
                "example": example_path,
            },
        )
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
    echo(card_summary(card))
    files = {
        "student_fp32": quantized.fp32_path,
        "student_int8": quantized.int8_path,
        "sidecar_int8": sidecar_path(quantized.int8_path),
        "card_json": card_json,
        "card_markdown": card_md,
        "example_input": example_path,
    }
    return ExportResult(out_dir=out_dir, files=files, card=card)


def _student_attributions(
    teacher: _Teacher, student: nn.Module
) -> tuple[AttributionResult | None, str | None]:
    """The student's attributions (charged like the global model's), or why there are none.

    They join the teacher run's fairness audit, drift status and global attributions
    in the card's trust entry.
    """
    if not teacher.saved.config.trust.explain:
        return None, None
    from fedguard.trust.explain_release import student_attributions  # captum: the explain extra

    return student_attributions(teacher.saved, student, teacher.scaler, teacher.schema)


def _write_example(path: Path, schema: FeatureSchema, rows: np.ndarray) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(schema.feature_names)
        for row in rows:
            writer.writerow(["" if math.isnan(v) else f"{v:.6g}" for v in row])
