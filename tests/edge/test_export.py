"""The pipeline from a saved run: files, card, privacy figures equal to the ledgers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import ConfigError
from fedguard.edge.distill import DistillConfig, DistillMode
from fedguard.edge.errors import RunFolderError
from fedguard.edge.export import ExportResult, export_run
from fedguard.edge.predict import METADATA_KEY, EdgeModel
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger
from fedguard.runs.saved import load_saved_run
from tests.edge.conftest import BUDGET, FAST, LIFETIME, with_lifetime_budget

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier


def _ledger_figures(run_dir: Path, budget: PrivacyBudget = BUDGET) -> dict[str, dict[str, object]]:
    out = {}
    for silo_dir in sorted((run_dir / "dp" / "silos").iterdir()):
        with PrivacyLedger.open(silo_dir, silo_dir.name, budget) as ledger:
            # Training rounds; releases (the scaler's feature moments) count in the spend.
            entries = [e for e in ledger.entries() if e.purpose is ChargePurpose.TRAINING]
            out[silo_dir.name] = {
                "spent": ledger.spent_epsilon(),
                "rounds": len(entries),
                "last_by_run": {e.run_id: e.epsilon_after for e in entries},
                "count_by_run": {
                    r: sum(1 for e in entries if e.run_id == r) for r in {e.run_id for e in entries}
                },
            }
    return out


def _assert_card_matches_ledgers(
    card: dict[str, object], run_dir: Path, budget: PrivacyBudget = BUDGET
) -> None:
    privacy = card["privacy"]
    assert isinstance(privacy, dict)
    figures = _ledger_figures(run_dir, budget)
    assert set(privacy["silos"]) == set(figures)
    for silo_id, ledger in figures.items():
        silo = privacy["silos"][silo_id]
        assert silo["epsilon_spent"] == ledger["spent"]  # exactly: the same number
        assert silo["rounds_charged"] == ledger["rounds"]
        assert silo["epsilon_budget"] == budget.epsilon and silo["delta"] == budget.delta
        for run_id, last in ledger["last_by_run"].items():
            assert silo["runs"][run_id]["epsilon_after_last_round"] == last
            assert silo["runs"][run_id]["rounds_charged"] == ledger["count_by_run"][run_id]
    assert privacy["epsilon"] == max(f["spent"] for f in figures.values())
    assert privacy["delta"] == budget.delta


def test_server_export_writes_model_card_and_models(exported: ExportResult, dp_run: Path) -> None:
    files = exported.files
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0
    card = json.loads(files["card_json"].read_text())
    assert card == json.loads(json.dumps(exported.card))
    markdown = files["card_markdown"].read_text()
    for heading in (
        "## Intended use",
        "## Data",
        "## Training",
        "## Privacy",
        "## Aggregation and robustness",
        "## Metrics",
        "## Size and latency",
        "## Known limitations",
    ):
        assert heading in markdown
    overall = card["metrics"]["overall"]
    assert set(overall) == {"teacher", "student_fp32", "student_int8"}
    assert overall["teacher"]["num_examples"] == sum(
        s["test_examples"] for s in card["data"]["silos"]
    )
    assert 0.0 <= overall["student_int8"]["auc"] <= 1.0
    assert set(card["metrics"]["per_silo"]) == {"silo-0", "silo-1", "silo-2"}
    assert card["metrics"]["agreement"]["silo test splits"]["top1_agreement"] >= 0.9
    sizes = card["size_latency"]["models"]
    assert sizes["student_int8"]["bytes"] == files["student_int8"].stat().st_size
    assert card["size_latency"]["ratios"]["size"] > 1.0
    # The teacher in the card is the run's last global model: its pooled accuracy is the
    # run's own final evaluation.
    history = json.loads((dp_run / "dp" / "history.json").read_text())
    assert overall["teacher"]["accuracy"] == pytest.approx(
        history[-1]["evaluation"]["accuracy"], abs=1e-12
    )
    assert card["training"]["distillation"]["mode"] == "server"
    assert "no silo record" in card["training"]["distillation"]["summary"]


def test_card_privacy_figures_equal_the_ledgers(exported: ExportResult, dp_run: Path) -> None:
    card = json.loads(exported.files["card_json"].read_text())
    _assert_card_matches_ledgers(card, dp_run)
    assert card["privacy"]["distillation_run_id"] is None  # server mode charges nothing
    for silo in card["privacy"]["silos"].values():
        assert set(silo["runs"]) == {"bc/dp"}
    markdown = exported.files["card_markdown"].read_text()
    for silo in card["privacy"]["silos"].values():
        assert f"{silo['epsilon_spent']:.3f}" in markdown


def test_exported_models_carry_feature_metadata_and_no_debug_info(
    exported: ExportResult,
) -> None:
    for name in ("student_int8", "student_fp32"):
        path = exported.files[name]
        model = EdgeModel(path)
        assert model.feature_names == tuple(exported.card["model"]["input"]["feature_names"])
        assert model.metadata.precision == ("int8" if name == "student_int8" else "fp32")
        raw = path.read_bytes()
        assert METADATA_KEY.encode() in raw
        assert b"stack_trace" not in raw and b".py" not in raw
    example = exported.files["example_input"]
    header = example.read_text().splitlines()[0].split(",")
    assert tuple(header) == EdgeModel(exported.files["student_int8"]).feature_names


def test_federated_distillation_charges_every_ledger(dp_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "bc"
    shutil.copytree(dp_run, run_dir, ignore=shutil.ignore_patterns("edge"))
    with_lifetime_budget(run_dir, LIFETIME)
    before = _ledger_figures(run_dir, LIFETIME)
    config = dataclasses.replace(
        FAST, distill=dataclasses.replace(FAST.distill, mode=DistillMode.FEDERATED, rounds=1)
    )
    result = export_run(run_dir, config, lambda _: None)
    after = _ledger_figures(run_dir, LIFETIME)
    run_id = "bc/dp/edge-distill-1"
    assert result.card["privacy"]["distillation_run_id"] == run_id
    for silo_id, figures in after.items():
        assert figures["rounds"] == before[silo_id]["rounds"] + 1
        assert figures["count_by_run"][run_id] == 1
        assert before[silo_id]["spent"] < figures["spent"] <= LIFETIME.epsilon
    _assert_card_matches_ledgers(result.card, run_dir, LIFETIME)
    plans = result.card["training"]["distillation"]["plans"]
    assert {p["silo_id"] for p in plans} == set(after)
    for plan in plans:  # σ planned with the teacher run's spending composed in
        assert plan["epsilon_before"] == pytest.approx(before[plan["silo_id"]]["spent"])


def test_export_refuses_a_non_empty_output_folder(exported: ExportResult, dp_run: Path) -> None:
    with pytest.raises(ConfigError, match="not empty"):
        export_run(dp_run, dataclasses.replace(FAST, out_dir=exported.out_dir), lambda _: None)


def test_missing_or_tampered_run_folders_raise_typed_errors(dp_run: Path, tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match=r"report\.json"):
        load_saved_run(tmp_path)
    copy = tmp_path / "bc"
    shutil.copytree(dp_run, copy, ignore=shutil.ignore_patterns("edge", "silos"))
    with pytest.raises(RunFolderError, match="no-dp"):
        load_saved_run(copy, "no-dp")
    # A checkpoint whose scaler does not come from these silos is refused.
    last = sorted((copy / "dp" / "checkpoints").glob("round-*.npz"))[-1]
    with np.load(last) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["scaler/mean"] = arrays["scaler/mean"] + 1.0
    np.savez(last, **arrays)
    with pytest.raises(RunFolderError, match="scaler"):
        export_run(copy, dataclasses.replace(FAST, out_dir=tmp_path / "out"), lambda _: None)


def test_a_transfer_set_needs_server_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(
            FAST,
            distill=DistillConfig(mode=DistillMode.FEDERATED),
            transfer_csv=tmp_path / "public.csv",
        )
