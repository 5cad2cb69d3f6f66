"""``simulate`` end to end on the in-process engine: run folder, report, plots."""

import json
from pathlib import Path

import pytest

from fedguard.core.config import PartitionSpec, PrivacyBudget
from fedguard.core.errors import InfeasibleBudgetError, PartitionError
from fedguard.simulation.report import summary_table, write_report
from fedguard.simulation.runner import plan_silos, simulate
from tests.factories import small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier


def test_simulate_writes_a_complete_report(tmp_path: Path) -> None:
    config = small_config(tmp_path, num_rounds=2, run_name="r1")
    lines: list[str] = []
    run_dir, results, plans = simulate(config, baseline=True, echo=lines.append)
    assert [r.name for r in results] == ["dp", "no-dp"]
    paths = write_report(run_dir, config, results, plans)
    for key in ("json", "markdown", "metrics_plot", "epsilon_plot", "comparison_plot"):
        assert paths[key].exists() and paths[key].stat().st_size > 0, key
    report = json.loads(paths["json"].read_text())
    assert report["seed"] == 0 and report["config"]["dataset"] == "breast-cancer"
    assert report["package_versions"]["opacus"].startswith("1.6")
    silos = report["variants"]["dp"]["silos"]
    assert set(silos) == {"silo-0", "silo-1", "silo-2"}
    for s in silos.values():
        assert 0 < s["epsilon_spent"] <= s["epsilon_budget"]
        assert s["rounds_charged"] == 2
        assert s["epsilon_by_round"]["1"] < s["epsilon_by_round"]["2"]
    assert report["variants"]["no-dp"]["silos"] == {}
    assert len(report["variants"]["dp"]["history"]) == 3  # round 0 + 2 rounds
    table = summary_table(config, report)
    assert "no-dp" in table and "DP keeps" in table
    assert "silo-2" in paths["markdown"].read_text()


def test_existing_run_folder_is_not_overwritten(tmp_path: Path) -> None:
    config = small_config(tmp_path, num_rounds=1, run_name="same")
    (config.out / "same").mkdir(parents=True)
    (config.out / "same" / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="not empty"):
        simulate(config, baseline=False, echo=lambda _: None)


def test_preflight_names_an_empty_silo(tmp_path: Path) -> None:
    config = small_config(
        tmp_path, num_clients=40, partition=PartitionSpec.parse("iid", min_silo_size=20)
    )
    with pytest.raises(PartitionError):
        plan_silos(config)


def test_preflight_names_an_infeasible_budget(tmp_path: Path) -> None:
    config = small_config(tmp_path, budget=PrivacyBudget(1e-4, 1e-5))
    with pytest.raises(InfeasibleBudgetError, match="silo-0"):
        plan_silos(config)
