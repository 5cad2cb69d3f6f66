"""The plain-Flower example (examples/flower_robust_strategy) holds off its attacker on Ray.

It runs the example as a user would, in a subprocess, and reads its printed
per-round accuracies: FedAvg and fedguard's median over the same five nodes, one of
which sends a negated and scaled update.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower_robust_strategy" / "app.py"
LINE = re.compile(r"^(fedavg|median) round (\d+) accuracy ([0-9.]+)$", re.MULTILINE)

pytestmark = pytest.mark.slow  # a Ray simulation: its cold start alone is 15-50 s


@pytest.mark.engine
@pytest.mark.timeout(360)
def test_example_median_holds_off_the_byzantine_node_and_fedavg_does_not() -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLE.parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    accuracy: dict[str, dict[int, float]] = {"fedavg": {}, "median": {}}
    for label, server_round, value in LINE.findall(done.stdout):
        accuracy[label][int(server_round)] = float(value)
    assert sorted(accuracy["median"]) == [0, 1, 2, 3], done.stdout
    assert sorted(accuracy["fedavg"]) == [0, 1, 2, 3], done.stdout
    assert accuracy["median"][3] >= 0.85
    assert accuracy["median"][3] > accuracy["median"][0] + 0.2
    assert accuracy["fedavg"][3] < accuracy["median"][3] - 0.2  # the mean follows the attacker
