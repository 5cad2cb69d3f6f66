"""Edge benchmark: teacher fp32 (torch) vs student fp32 (torch) vs student int8 (onnxruntime).

For each data set: a federated teacher is trained with fedguard's in-process engine
(the non-private variant, so the table measures compression, not DP noise), then
``fedguard export`` runs three ways on the saved run:

* ``kd``      federated distillation (α=0.7, T=4) of the student on the silos' records;
* ``direct``  the same federated rounds with α=0: the student trained on labels alone;
* ``server``  server-side distillation on synthetic rows from the federated statistics
              (no silo record; under DP this costs no privacy budget).

Then a low-data setting: every silo keeps only --low-data-fraction of its training
records for the student (the teacher saw them all); KD against direct.

Accuracy is pooled over the silos' held-out test splits; bytes: torch.save of the
teacher's state dict, the ONNX file for the students; latency: one thread, p50 of
single-record calls; throughput: 256 / median batch-256 call.

    .venv/bin/python benchmarks/edge.py [--datasets digits breast-cancer] [--rounds 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.client.training import LocalData
from fedguard.core.config import (
    DatasetName,
    Engine,
    LocalDPConfig,
    LocalTrainingConfig,
    PartitionSpec,
    RunConfig,
)
from fedguard.edge.distill import (
    DistillConfig,
    DistillMode,
    DistillSilo,
    StudentSpec,
    distill_federated,
    seed_student,
)
from fedguard.edge.export import (
    ExportConfig,
    _rebuild_silos,
    _torch_logits,
    export_run,
    load_saved_run,
)
from fedguard.edge.quantize import scaled_for_model
from fedguard.simulation.report import write_report
from fedguard.simulation.runner import simulate


def _teacher_run(dataset: DatasetName, rounds: int, root: Path) -> Path:
    config = RunConfig(
        dataset=dataset,
        num_clients=3,
        num_rounds=rounds,
        partition=PartitionSpec.parse("iid"),
        training=LocalTrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.05),
        local_dp=LocalDPConfig(enabled=False),
        engine=Engine.INPROCESS,
        out=root,
        run_name=dataset.value,
    )
    run_dir, results, plans = simulate(config, baseline=False, echo=lambda _: None)
    write_report(run_dir, config, results, plans)
    return run_dir


def _export(run_dir: Path, out: Path, distill: DistillConfig, repeats: int) -> dict[str, Any]:
    config = ExportConfig(distill=distill, out_dir=out, timing_repeats=repeats)
    return export_run(run_dir, config, lambda _: None).card


def _low_data(run_dir: Path, fraction: float, rounds: int) -> tuple[float, float, float]:
    """(teacher, student KD, student direct) accuracy when silos keep ``fraction`` of rows."""
    saved = load_saved_run(run_dir)
    silos, _ = _rebuild_silos(saved)
    schema = silos[0].schema
    scaler = saved.scaler
    from fedguard.core.models import build_model
    from fedguard.core.serialization import load_weights

    teacher = build_model(schema, saved.config.model)
    load_weights(teacher, saved.teacher_weights)
    teacher.eval()
    rng = np.random.default_rng(0)
    small = []
    for i, silo in enumerate(silos):
        keep = rng.permutation(len(silo.train))[: max(8, int(fraction * len(silo.train)))]
        part = silo.train.subset(np.sort(keep))
        data = LocalData(scaled_for_model(scaler, schema, part.features), part.labels)
        small.append(DistillSilo(f"silo-{i}", run_dir / "unused", saved.config.budget, data))
    test = [
        LocalData(scaled_for_model(scaler, schema, s.test.features), s.test.labels) for s in silos
    ]
    labels = np.concatenate([t.labels for t in test])

    def accuracy(model: torch.nn.Module) -> float:
        logits = np.concatenate([_torch_logits(model, t) for t in test])
        return float((logits.argmax(1) == labels).mean())

    results = []
    for alpha in (0.7, 0.0):
        seed_student(0)
        student = StudentSpec().build(schema)
        config = DistillConfig(
            mode=DistillMode.FEDERATED,
            rounds=rounds,
            alpha=alpha,
            training=LocalTrainingConfig(local_epochs=5, batch_size=16, learning_rate=0.05),
        )
        distill_federated(
            teacher,
            student,
            small,
            config,
            LocalDPConfig(enabled=False),
            saved.config.central_dp,
            "low-data",
            seed=0,
        )
        results.append(accuracy(student))
    return accuracy(teacher), results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "breast-cancer"])
    parser.add_argument("--rounds", type=int, default=10, help="teacher rounds")
    parser.add_argument("--distill-rounds", type=int, default=10)
    parser.add_argument("--distill-epochs", type=int, default=3, help="local epochs a round")
    parser.add_argument("--repeats", type=int, default=300, help="timed single-record calls")
    parser.add_argument("--low-data-fraction", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows: list[str] = []
    notes: list[str] = []
    header = (
        f"{'data set':<14} {'model':<14} {'runtime':<12} {'accuracy':>8} {'bytes':>7} "
        f"{'p50 ms':>7} {'batch-256/s':>12}"
    )
    with tempfile.TemporaryDirectory(prefix="fedguard-edge-bench-") as tmp:
        root = Path(tmp)
        for name in args.datasets:
            dataset = DatasetName.parse(name)
            run_dir = _teacher_run(dataset, args.rounds, root)
            base = DistillConfig(
                mode=DistillMode.FEDERATED,
                rounds=args.distill_rounds,
                training=LocalTrainingConfig(
                    local_epochs=args.distill_epochs, batch_size=32, learning_rate=0.05
                ),
            )
            kd = _export(run_dir, root / f"{name}-kd", base, args.repeats)
            direct = _export(
                run_dir, root / f"{name}-direct", dataclasses.replace(base, alpha=0.0), 20
            )
            server = _export(run_dir, root / f"{name}-server", DistillConfig(), 20)
            overall = kd["metrics"]["overall"]
            models = kd["size_latency"]["models"]
            for label, key, metric in (
                ("teacher fp32", "teacher_fp32", "teacher"),
                ("student fp32", "student_fp32", "student_fp32"),
                ("student int8", "student_int8", "student_int8"),
            ):
                m = models[key]
                rows.append(
                    f"{name:<14} {label:<14} {m['runtime']:<12} "
                    f"{overall[metric]['accuracy']:>8.3f} {m['bytes']:>7} "
                    f"{m['p50_latency_ms']:>7.3f} {m['throughput_batch256']:>12.0f}"
                )
            ratios = kd["size_latency"]["ratios"]
            agreement = kd["metrics"]["agreement"]["silo test splits"]
            rows.append(
                f"{name:<14} int8 vs teacher: {ratios['size']:.1f}x smaller, "
                f"{ratios['throughput']:.1f}x batch-256 throughput, "
                f"{ratios['accuracy_points']:+.2f} accuracy points; int8 vs fp32 top-1 "
                f"agreement {agreement['top1_agreement']:.4f}, max |logit error| "
                f"{agreement['max_abs_logit_error']:.4f} "
                f"({kd['model']['quantization']['method']})"
            )
            acc = {
                label: card["metrics"]["overall"]["student_int8"]["accuracy"]
                for label, card in (("kd", kd), ("direct", direct), ("server", server))
            }
            teacher_acc, low_kd, low_direct = _low_data(
                run_dir, args.low_data_fraction, args.distill_rounds
            )
            notes.append(
                f"{name}: student int8 accuracy, federated KD {acc['kd']:.3f} vs direct "
                f"{acc['direct']:.3f} ({100 * (acc['kd'] - acc['direct']):+.1f} points); "
                f"server-side KD on synthetic rows {acc['server']:.3f}. Low data "
                f"({args.low_data_fraction:g} of each silo's records, teacher {teacher_acc:.3f}): "
                f"KD {low_kd:.3f} vs direct {low_direct:.3f} "
                f"({100 * (low_kd - low_direct):+.1f} points)."
            )
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    print()
    print("\n".join(notes))
    print(f"\n{time.perf_counter() - started:.0f} s, 1 thread, torch {torch.__version__}")


if __name__ == "__main__":
    main()
