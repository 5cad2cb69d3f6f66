"""``fedguard export`` and ``fedguard predict``: the edge path's commands.

* ``add_export_command(subparsers)``: ``fedguard export RUN_DIR [options]``;
* ``add_predict_command(subparsers)``: ``fedguard predict MODEL.onnx INPUT.csv``;
* ``add_simulate_export_option(simulate_parser)``: ``fedguard simulate ... --export edge``;
* ``export_after_simulate(run_dir)``: what ``--export edge`` runs once the report is written.

Each subcommand sets ``args.handler``, which returns the exit status. This
module imports only the standard library at import time: the predict path
(:mod:`fedguard.edge.predict`) loads numpy and onnxruntime, the export path loads
torch, and neither is imported before its command runs, so ``fedguard predict``
works where torch is not installed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedguard.core.errors import ConfigError

if TYPE_CHECKING:
    from fedguard.edge.export import ExportConfig, ExportResult

__all__ = [
    "EXPORT_TARGETS",
    "add_export_command",
    "add_predict_command",
    "add_simulate_export_option",
    "cmd_export",
    "cmd_predict",
    "export_after_simulate",
    "export_config_from_args",
]

EXPORT_TARGETS = ("edge",)

# The defaults below mirror ExportConfig / DistillConfig / StudentSpec / QuantizeConfig
# (a test checks that the parsed defaults equal ExportConfig()); they are spelled out
# here so that building the parser does not import torch.
_DISTILL_MODES = ("server", "federated")
_STUDENT_KINDS = ("auto", "mlp", "cnn")
_QUANT_METHODS = ("auto", "static-qoperator", "static-qdq", "dynamic")


def add_export_command(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="distil a saved run's global model into an int8 ONNX edge model with its card",
        description=(
            "Distil the global model of a saved run (RUN_DIR, written by fedguard simulate) "
            "into a small student, export it to ONNX with the feature scaler folded in, "
            "quantize it to int8, check int8 against fp32, time teacher/student/int8 and "
            "write a model card. Output: RUN_DIR/edge/ (or --out)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a fedguard simulate run folder")
    p.add_argument(
        "--variant",
        choices=["dp", "no-dp"],
        default=None,
        help="which variant's global model is the teacher [default: dp if present]",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder [default: RUN_DIR/edge]")
    d = p.add_argument_group("distillation")
    d.add_argument(
        "--distill",
        choices=_DISTILL_MODES,
        default="server",
        help="server: on a transfer set, no privacy cost; federated: extra DP-SGD rounds in "
        "every silo, charged to its privacy ledger (needs budget left)",
    )
    d.add_argument(
        "--transfer",
        type=Path,
        default=None,
        metavar="PUBLIC.csv",
        help="public unlabeled transfer set (encoded features, header = feature names) for "
        "--distill server; also used for int8 calibration [default: synthetic rows drawn "
        "from the federated feature statistics]",
    )
    d.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T")
    d.add_argument(
        "--alpha", type=float, default=0.7, help="weight of the soft term (federated mode)"
    )
    d.add_argument("--distill-rounds", type=int, default=5, help="federated distillation rounds")
    d.add_argument(
        "--transfer-rows", type=int, default=8192, help="synthetic transfer rows (server mode)"
    )
    d.add_argument("--server-epochs", type=int, default=20, help="epochs of server distillation")
    s = p.add_argument_group("student")
    s.add_argument("--student", choices=_STUDENT_KINDS, default="auto", help="architecture")
    s.add_argument("--student-hidden", default="16", metavar="H1,H2,...", help="MLP hidden sizes")
    s.add_argument("--student-channels", type=int, default=8, help="CNN channels")
    q = p.add_argument_group("int8")
    q.add_argument(
        "--quantization",
        choices=_QUANT_METHODS,
        default="auto",
        help="auto: static QOperator for CNNs, dynamic for MLPs",
    )
    q.add_argument("--calibration-rows", type=int, default=512, help="static calibration rows")
    q.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="fail if int8 agrees with fp32 on fewer silo test records than this",
    )
    q.add_argument(
        "--timing-repeats", type=int, default=200, help="single-record calls timed per model"
    )
    q.add_argument("--threads", type=int, default=1, help="CPU threads for the timings")
    p.set_defaults(handler=cmd_export)
    return p


def add_predict_command(subparsers: Any) -> argparse.ArgumentParser:
    from fedguard.edge import predict

    p: argparse.ArgumentParser = subparsers.add_parser(
        "predict",
        help="run an exported edge model on a CSV of encoded features (no torch needed)",
        description=(predict.__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.build_parser(p)
    p.set_defaults(handler=cmd_predict)
    return p


def add_simulate_export_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--export",
        choices=EXPORT_TARGETS,
        default=None,
        help="after the run, run the edge pipeline on it (fedguard export RUN with defaults)",
    )


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"--student-hidden must be integers like 16 or 32,16; got {text!r}"
        ) from None


def export_config_from_args(args: argparse.Namespace) -> ExportConfig:
    """The typed :class:`~fedguard.edge.export.ExportConfig` of parsed ``export`` arguments."""
    from fedguard.core.config import LocalTrainingConfig
    from fedguard.edge.distill import DistillConfig, DistillMode, StudentKind, StudentSpec
    from fedguard.edge.export import ExportConfig
    from fedguard.edge.quantize import QuantizeConfig, QuantMethod

    base = DistillConfig()
    return ExportConfig(
        distill=DistillConfig(
            mode=DistillMode(args.distill),
            temperature=args.temperature,
            alpha=args.alpha,
            rounds=args.distill_rounds,
            training=LocalTrainingConfig(
                local_epochs=base.training.local_epochs,
                batch_size=base.training.batch_size,
                learning_rate=base.training.learning_rate,
                optimizer=base.training.optimizer,
                momentum=base.training.momentum,
            ),
            transfer_rows=args.transfer_rows,
            server_epochs=args.server_epochs,
        ),
        student=StudentSpec(
            kind=StudentKind(args.student),
            hidden=_int_tuple(args.student_hidden),
            channels=args.student_channels,
        ),
        quantize=QuantizeConfig(
            method=QuantMethod(args.quantization),
            calibration_rows=args.calibration_rows,
            min_top1_agreement=args.min_agreement,
        ),
        variant=args.variant,
        out_dir=args.out,
        transfer_csv=args.transfer,
        timing_repeats=args.timing_repeats,
        threads=args.threads,
    )


def cmd_export(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    from fedguard.edge.export import export_run

    result = export_run(args.run_dir, export_config_from_args(args), echo)
    echo(f"\nedge folder: {result.out_dir}")
    for name, path in result.files.items():
        echo(f"  {name}: {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedguard.edge.predict import run_predict

    run_predict(args.model, args.input, args.output, args.threads)
    return 0


def export_after_simulate(run_dir: Path, echo: Callable[[str], None] = print) -> ExportResult:
    """``fedguard simulate ... --export edge``: the default pipeline on the new run folder."""
    from fedguard.edge.export import export_run

    result = export_run(Path(run_dir), None, echo)
    echo(f"\nedge folder: {result.out_dir}")
    return result
