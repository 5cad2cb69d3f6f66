"""Student attributions at export: charged to every ledger like the global model's."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from fedguard.client.ledger_guard import open_silo_ledger, record_charge, reset_ledger
from fedguard.core.datasets import schema_for
from fedguard.edge.distill import StudentSpec
from fedguard.edge.export import export_run
from fedguard.privacy.ledger import ChargePurpose, ChargeStatus, PrivacyLedger
from fedguard.runs.saved import load_saved_run
from fedguard.trust.explain_release import (
    STUDENT_RUN_SUFFIX,
    silo_settings,
    student_attributions,
    student_release_run_id,
)
from fedguard.trust.results import TrustResults
from tests.edge.conftest import BUDGET, FAST, LIFETIME, set_run_options

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier


def _asking_for_explanations(dp_run: Path, into: Path) -> Path:
    """A copy of the shared DP run whose config asks for explanations (8 IG steps)."""
    run_dir = into / "bc"
    shutil.copytree(dp_run, run_dir)
    assert load_saved_run(run_dir).config.trust.explain is False
    set_run_options(run_dir, **{"explain": True, "explain-steps": 8})
    return run_dir


def _with_lifetime_budget(run_dir: Path) -> None:
    """Every silo moved to the LIFETIME budget the one sanctioned way, its charges kept.

    ``reset-ledger`` archives the old ledger and logs the reset; the old charges are
    then charged again (and logged) in the new ledger, so the spend carries over.
    """
    saved = load_saved_run(run_dir)
    for index in range(saved.config.num_clients):
        settings = dataclasses.replace(silo_settings(saved, index), budget=LIFETIME)
        with PrivacyLedger.open(settings.state_dir, settings.silo_id, BUDGET) as ledger:
            entries = ledger.entries()
        reset_ledger(settings, "lifetime budget raised by the silo's governance board")
        with open_silo_ledger(settings) as ledger:
            for entry in entries:
                charged = ledger.charge(entry.run_id, entry.round, entry.event, entry.purpose)
                record_charge(settings, ledger, charged)
                ledger.mark(charged.entry_id, ChargeStatus.COMPLETED)
    set_run_options(run_dir, **{"target-epsilon": LIFETIME.epsilon, "delta": LIFETIME.delta})


def _attribution_runs(run_dir: Path) -> list[str]:
    silo_dir = run_dir / "dp" / "silos" / "silo-0"
    with PrivacyLedger.open(silo_dir, "silo-0", LIFETIME) as ledger:
        return [e.run_id for e in ledger.entries() if e.purpose is ChargePurpose.ATTRIBUTION]


def _attribution_charges(run_dir: Path, run_id: str) -> dict[str, int]:
    out = {}
    for silo_dir in sorted((run_dir / "dp" / "silos").iterdir()):
        with PrivacyLedger.open(silo_dir, silo_dir.name, LIFETIME) as ledger:
            out[silo_dir.name] = sum(
                1
                for e in ledger.entries()
                if e.purpose is ChargePurpose.ATTRIBUTION and e.run_id == run_id
            )
    return out


def test_export_adds_student_attributions_and_charges_each_ledger_once(
    dp_run: Path, tmp_path: Path
) -> None:
    run_dir = _asking_for_explanations(dp_run, tmp_path)
    saved = load_saved_run(run_dir)
    schema = schema_for(saved.config.dataset)
    untrained = StudentSpec().build(schema)
    # Planned without explanations, the silos kept no budget for it: refused, and why.
    result, why = student_attributions(saved, untrained, saved.scaler, schema)
    assert result is None and why is not None and "silo-0 refused" in why

    # With budget left (a larger lifetime budget), every silo releases it once.
    _with_lifetime_budget(run_dir)
    exported = export_run(run_dir, dataclasses.replace(FAST, out_dir=tmp_path / "b"), print)
    assert not any("not computed" in x for x in exported.card["limitations"]), [
        x for x in exported.card["limitations"] if "not computed" in x
    ]
    results = TrustResults.from_json(exported.card["trust"]["results"])
    student = results.attribution("student")
    assert student is not None
    assert student.cost.noised and student.cost.epsilon == pytest.approx(1.0, rel=1e-3)
    assert student.records == pytest.approx(455, abs=200)  # noised count of 455 records
    student_runs = _attribution_runs(run_dir)
    assert len(student_runs) == 1 and STUDENT_RUN_SUFFIX in student_runs[0]
    assert _attribution_charges(run_dir, student_runs[0]) == {f"silo-{i}": 1 for i in range(3)}
    markdown = exported.files["card_markdown"].read_text()
    assert "**student model**" in markdown
    assert (exported.out_dir / "attributions.png").is_file()

    # Another student is another release (its own charge); asking again for the same
    # student replays the stored release: the same figures, no new charge.
    other, why = student_attributions(load_saved_run(run_dir), untrained, saved.scaler, schema)
    assert why is None and other is not None and other.features != student.features
    other_run = student_release_run_id(saved, untrained)
    assert _attribution_charges(run_dir, other_run) == {f"silo-{i}": 1 for i in range(3)}
    again, _ = student_attributions(load_saved_run(run_dir), untrained, saved.scaler, schema)
    assert again is not None and again.features == other.features
    assert again.records == other.records
    assert _attribution_charges(run_dir, other_run) == {f"silo-{i}": 1 for i in range(3)}
