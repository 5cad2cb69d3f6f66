"""examples/flower_dp_silo: a stock Flower FedAvg server over 3 fedguard DP-SGD silos (Ray)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower_dp_silo" / "app.py"
BUDGETS = {"hospital-0": 4.0, "hospital-1": 6.0, "hospital-2": 8.0}  # the example's constants


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_the_example_trains_two_rounds_within_every_silos_budget(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rounds completed: 2" in out, out + done.stderr[-3000:]
    for server_round in (1, 2):
        line = re.search(
            rf"^round {server_round}: mean epsilon-spent=(\S+) .*eval-acc=(\S+)", out, re.M
        )
        assert line is not None, out
        assert float(line.group(1)) > 0 and 0.5 < float(line.group(2)) <= 1.0
    spent = dict(
        (silo, (float(eps), float(budget), int(rounds)))
        for silo, eps, budget, rounds in re.findall(
            r"^silo (\S+): epsilon spent (\S+) of budget (\S+) in (\d+) rounds", out, re.M
        )
    )
    assert set(spent) == set(BUDGETS), out
    for silo, (eps, budget, rounds) in spent.items():
        assert budget == BUDGETS[silo]
        assert 0 < eps <= budget and rounds == 2, (silo, eps, budget, rounds)
    # Each silo's ledger and signed log live in its own state folder.
    for silo in BUDGETS:
        assert (tmp_path / "state" / silo / "privacy-ledger.sqlite").exists()
        assert (tmp_path / "state" / silo / "silo-log.jsonl").exists()
