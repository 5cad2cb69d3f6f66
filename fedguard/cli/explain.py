"""``fedguard explain RUN_DIR --data CSV --row N``: explain one prediction where the record is.

Loads the finished global model of a run (its last torch checkpoint and the
federated feature scaler), reads one record from a CSV on this machine, and
prints the features that drove the model's output for it (Integrated Gradients
against the federated-mean baseline, :func:`fedguard.trust.explanations.explain_record`).
The record is never sent anywhere and nothing is written.

The CSV is either a silo's own data file (the raw columns, as a silo reads them)
or encoded features with a header of the model's feature names (the input of
``fedguard predict``). Only the standard library is imported until the command
runs.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from fedguard.core.errors import ConfigError

__all__ = ["add_explain_command", "cmd_explain", "read_record"]


def add_explain_command(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "explain",
        help="explain one prediction of a run's global model, on this machine",
        description=(
            "Explain the global model's prediction for one record with Integrated Gradients "
            "(baseline: the federated feature mean). The record is read from a CSV on this "
            "machine and never leaves it: a silo's own data file (raw columns) or encoded "
            "features (header = the model's feature names, as for fedguard predict)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a fedguard simulate run folder")
    p.add_argument(
        "--data", type=Path, required=True, metavar="CSV", help="file holding the record"
    )
    p.add_argument("--row", type=int, required=True, help="0-based data row of the record")
    p.add_argument(
        "--variant",
        choices=["dp", "no-dp"],
        default=None,
        help="which variant's global model [default: dp if present]",
    )
    p.add_argument("--top", type=int, default=10, help="features to show")
    p.add_argument("--steps", type=int, default=64, help="integration steps")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_explain)
    return p


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return [name.strip() for name in next(csv.reader(handle), [])]


def read_record(path: Path, row: int, schema: Any) -> Any:
    """The encoded features of data row ``row`` of ``path`` (raw or encoded CSV)."""
    import numpy as np

    from fedguard.core.datasets import encode_frame, load_silo_frame
    from fedguard.edge.predict import read_feature_csv

    if row < 0:
        raise ConfigError(f"--row must be >= 0, got {row}")
    header = set(_header(path))
    if header == set(schema.feature_names):
        features = read_feature_csv(path, schema.feature_names)
    else:
        frame = load_silo_frame(path, schema)
        if row >= len(frame):
            raise ConfigError(f"{path} has {len(frame)} data rows; --row {row} is past the end")
        # Encode only the one record (the fixed code books need no other row).
        features = encode_frame(schema, frame.iloc[[row]], whole_table=False).features
        row = 0
    if row >= features.shape[0]:
        raise ConfigError(f"{path} has {features.shape[0]} data rows; --row {row} is past the end")
    return np.asarray(features[row], dtype=np.float64)


def cmd_explain(args: argparse.Namespace) -> int:
    """``fedguard explain``: one record's attributions, printed (nothing sent or written)."""
    from fedguard.core.datasets import schema_for
    from fedguard.core.models import build_model
    from fedguard.core.serialization import load_weights
    from fedguard.runs.saved import load_saved_run
    from fedguard.trust.explanations import explain_record

    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    saved = load_saved_run(args.run_dir, args.variant)
    schema = schema_for(saved.config.contract)
    model = build_model(schema, saved.config.model)
    load_weights(model, saved.teacher_weights)
    record = read_record(Path(args.data), args.row, schema)
    explanation = explain_record(model, saved.scaler, schema, record, steps=args.steps)
    if args.json:
        print(json.dumps(explanation.to_json(args.top), indent=2))
    else:
        print(
            f"{saved.variant} global model of {saved.run_dir.name} (round "
            f"{saved.checkpoint.round}); record {args.row} of {args.data}, explained on this "
            "machine (nothing sent)"
        )
        print(explanation.render(args.top))
    return 0
