"""The export/predict subcommands (fedguard.cli.edge), as fedguard.cli mounts them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedguard.cli.edge import (
    add_export_command,
    add_predict_command,
    add_simulate_export_option,
    export_config_from_args,
)
from fedguard.core.errors import ConfigError
from fedguard.edge.export import ExportConfig, ExportResult


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedguard")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_command(sub)
    add_predict_command(sub)
    add_simulate_export_option(sub.add_parser("simulate"))
    return parser


def test_export_defaults_equal_export_config() -> None:
    args = _parser().parse_args(["export", "runs/x"])
    assert args.run_dir == Path("runs/x")
    assert export_config_from_args(args) == ExportConfig()


def test_export_options_reach_the_config() -> None:
    args = _parser().parse_args(
        [
            "export",
            "r",
            "--distill",
            "federated",
            "--distill-rounds",
            "3",
            "--student",
            "mlp",
            "--student-hidden",
            "32,8",
            "--quantization",
            "static-qdq",
            "--variant",
            "no-dp",
        ]
    )
    config = export_config_from_args(args)
    assert config.distill.mode.value == "federated" and config.distill.rounds == 3
    assert config.student.hidden == (32, 8) and config.quantize.method.value == "static-qdq"
    assert config.variant == "no-dp"
    with pytest.raises(ConfigError):
        export_config_from_args(_parser().parse_args(["export", "r", "--student-hidden", "a"]))


def test_simulate_takes_export_edge() -> None:
    assert _parser().parse_args(["simulate", "--export", "edge"]).export == "edge"
    assert _parser().parse_args(["simulate"]).export is None


def test_predict_handler_prints_predictions(
    exported: ExportResult, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(
        ["predict", str(exported.files["student_int8"]), str(exported.files["example_input"])]
    )
    assert args.handler(args) == 0
    assert capsys.readouterr().out.startswith("row,prediction,class_index,")
