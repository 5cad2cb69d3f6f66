"""``fedguard explain``: one record's explanation from a finished run (shares the edge run)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedguard.cli import main
from fedguard.core.builtin_datasets import load_pooled_frame
from fedguard.core.config import DatasetName
from fedguard.core.datasets import encode_frame, schema_for
from fedguard.core.models import build_model
from fedguard.core.serialization import load_weights
from fedguard.runs.saved import load_saved_run
from fedguard.trust.explanations import explain_record


def _raw_csv(tmp_path: Path) -> Path:
    frame = load_pooled_frame(DatasetName.BREAST_CANCER).iloc[10:15]
    path = tmp_path / "silo.csv"
    frame.to_csv(path, index=False)
    return path


def test_explain_matches_the_library_on_raw_and_encoded_csv(
    dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw_csv(tmp_path)
    assert main(["explain", str(dp_run), "--data", str(raw), "--row", "3", "--json"]) == 0
    from_raw = json.loads(capsys.readouterr().out)

    schema = schema_for(DatasetName.BREAST_CANCER)
    features = encode_frame(schema, load_pooled_frame(DatasetName.BREAST_CANCER)).features[13]
    encoded = tmp_path / "encoded.csv"
    with encoded.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(schema.feature_names)
        writer.writerow([repr(float(v)) for v in features])
    assert main(["explain", str(dp_run), "--data", str(encoded), "--row", "0", "--json"]) == 0
    from_encoded = json.loads(capsys.readouterr().out)

    saved = load_saved_run(dp_run)
    model = build_model(schema, saved.config.model)
    load_weights(model, saved.teacher_weights)
    expected = explain_record(model, saved.scaler, schema, features, steps=64).to_json(10)
    for got in (from_raw, from_encoded):
        assert got["predicted_class"] == expected["predicted_class"]
        assert [f["feature"] for f in got["features"]] == [
            f["feature"] for f in expected["features"]
        ]
        np.testing.assert_allclose(
            [f["attribution"] for f in got["features"]],
            [f["attribution"] for f in expected["features"]],
            atol=1e-5,
        )
    assert len(from_raw["features"]) == 10

    assert main(["explain", str(dp_run), "--data", str(raw), "--row", "0", "--top", "3"]) == 0
    table = capsys.readouterr().out
    assert "nothing sent" in table and "prediction:" in table
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("feature "))
    assert len(lines) - header - 1 == 3  # exactly the top 3 features


def test_explain_errors_are_one_line(
    dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw_csv(tmp_path)
    assert main(["explain", str(dp_run), "--data", str(raw), "--row", "5"]) == 2
    assert "5 data rows" in capsys.readouterr().err
    assert main(["explain", str(dp_run), "--data", str(tmp_path / "no.csv"), "--row", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["explain", str(dp_run), "--data", str(bad), "--row", "0"]) == 2
    assert "missing-column" in capsys.readouterr().err


def test_simulate_explain_options_reach_the_run_config() -> None:
    from fedguard.cli import build_parser
    from fedguard.cli.simulate import config_from_args

    args = ["simulate", "--explain", "--explain-epsilon", "0.5", "--explain-steps", "16"]
    trust = config_from_args(build_parser().parse_args([*args, "--explain-clip-norm", "2"])).trust
    assert (trust.explain, trust.explain_epsilon, trust.explain_steps) == (True, 0.5, 16)
    assert trust.explain_clip_norm == 2.0
    assert config_from_args(build_parser().parse_args(["simulate"])).trust.explain is False
