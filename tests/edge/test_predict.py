"""The torch-free predict path: CSV reading, metadata, and a run without torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedguard.edge.errors import ModelFileError, PredictInputError
from fedguard.edge.export import ExportResult
from fedguard.edge.predict import EdgeModel, read_feature_csv, run_predict, sidecar_path

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

REPO = Path(__file__).resolve().parents[2]
NAMES = ("a", "b=x", "c_missing")


def test_csv_columns_in_any_order_and_missing_cells() -> None:
    text = "c_missing,a,b=x\n1,2.5,\n0,nan,1\n\n"
    x = read_feature_csv(io.StringIO(text), NAMES)
    assert x.dtype == np.float32 and x.shape == (2, 3)
    assert x[0, 0] == 2.5 and np.isnan(x[0, 1]) and x[0, 2] == 1
    assert np.isnan(x[1, 0]) and x[1, 1] == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b=x\n1,2\n", r"missing \['c_missing'\]"),
        ("a,b=x,c_missing,d\n1,2,3,4\n", r"unknown \['d'\]"),
        ("a,a,b=x,c_missing\n1,1,2,3\n", r"repeated \['a'\]"),
        ("a,b=x,c_missing\n1,two,3\n", "'b=x'.*not a number"),
        ("a,b=x,c_missing\n1,2\n", "2 cells for 3 columns"),
        ("a,b=x,c_missing\n1,inf,3\n", "infinite"),
        ("", "empty"),
    ],
)
def test_bad_csv_is_refused_with_the_reason(text: str, match: str) -> None:
    with pytest.raises(PredictInputError, match=match):
        read_feature_csv(io.StringIO(text), NAMES)


def test_predict_writes_one_row_per_record(exported: ExportResult, tmp_path: Path) -> None:
    model_path = exported.files["student_int8"]
    out = tmp_path / "out.csv"
    labels = run_predict(model_path, exported.files["example_input"], out)
    lines = out.read_text().splitlines()
    classes = exported.card["model"]["classes"]
    assert lines[0] == "row,prediction,class_index," + ",".join(f"p_{c}" for c in classes)
    assert len(lines) == 1 + len(labels) == 6
    for line, label in zip(lines[1:], labels, strict=True):
        cells = line.split(",")
        assert cells[1] == classes[label] and int(cells[2]) == label
        assert sum(float(p) for p in cells[3:]) == pytest.approx(1.0, abs=1e-5)


def test_metadata_comes_from_the_model_or_its_sidecar(
    exported: ExportResult, tmp_path: Path
) -> None:
    import onnx

    source = exported.files["student_int8"]
    bare = onnx.load(str(source))
    del bare.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(bare, str(path))
    with pytest.raises(ModelFileError, match="no fedguard feature metadata"):
        EdgeModel(path)
    sidecar_path(path).write_text(sidecar_path(source).read_text())
    assert EdgeModel(path).feature_names == EdgeModel(source).feature_names
    other = json.loads(sidecar_path(source).read_text())
    other["class_names"] = ["x", "y"]
    sidecar_path(source.with_name("copy.onnx")).write_text(json.dumps(other))
    (tmp_path / "copy.onnx").write_bytes(source.read_bytes())
    sidecar_path(tmp_path / "copy.onnx").write_text(json.dumps(other))
    with pytest.raises(ModelFileError, match="differ"):
        EdgeModel(tmp_path / "copy.onnx")
    with pytest.raises(ModelFileError, match="does not exist"):
        EdgeModel(tmp_path / "none.onnx")


_BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "pandas", "sklearn", "opacus", "flwr"}:
                raise ImportError(f"blocked import of {name}")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_predict_runs_with_torch_pandas_and_sklearn_blocked(exported: ExportResult) -> None:
    model = exported.files["student_int8"]
    rows = exported.files["example_input"]
    result = _run_blocked(
        f"""
        import argparse, sys
        from fedguard.cli.edge import add_predict_command
        parser = argparse.ArgumentParser(prog="fedguard")
        add_predict_command(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["predict", {str(model)!r}, {str(rows)!r}])
        code = args.handler(args)
        assert not {{"torch", "pandas", "sklearn"}} & set(sys.modules), sorted(sys.modules)
        sys.exit(code)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("row,prediction,class_index,")
    assert len(result.stdout.splitlines()) == 6


def test_the_cli_module_and_edge_commands_import_without_torch() -> None:
    result = _run_blocked(
        """
        import fedguard.cli.edge, fedguard.edge.predict, fedguard.edge.errors
        import fedguard.cli
        """
    )
    assert result.returncode == 0, result.stderr
