"""``fedguard predict`` in a fresh virtual environment holding only numpy and onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from fedguard.edge.export import ExportResult

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_predict_in_a_venv_with_only_numpy_and_onnxruntime(
    exported: ExportResult, tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # fedguard itself from the source tree, without its dependencies (torch, flwr, ...).
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    # Once, under pytest-xdist, pip reported success and numpy then did not import (cause
    # not established; a shared wheel cache is the suspect): check the packages import
    # with the environment predict runs in, and reinstall once without the cache.
    for attempt in ("--quiet", "--no-cache-dir"):
        install = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--force-reinstall",
                attempt,
                "numpy",
                "onnxruntime",
            ],
            capture_output=True,
            text=True,
            timeout=200,
            check=False,
        )
        assert install.returncode == 0, f"pip install numpy onnxruntime: {install.stderr[-800:]}"
        imports = subprocess.run(
            [str(python), "-c", "import numpy, onnxruntime"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if imports.returncode == 0:
            break
    assert imports.returncode == 0, f"numpy/onnxruntime do not import: {imports.stderr[-800:]}"
    missing = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; "
            "print([m for m in ('torch', 'pandas', 'sklearn', 'flwr') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert missing.stdout.strip() == "[]"
    model = exported.files["student_int8"]
    rows = exported.files["example_input"]
    for command in (
        [str(python), "-m", "fedguard.edge.predict", str(model), str(rows)],
        [
            str(python),
            "-c",
            "import sys; from fedguard.cli.edge import add_predict_command;"
            "import argparse; p = argparse.ArgumentParser(); "
            "add_predict_command(p.add_subparsers(dest='command')); "
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))",
            "predict",
            str(model),
            str(rows),
        ],
    ):
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("row,prediction,class_index,p_") and len(lines) == 6
    assert sys.executable != str(python)
