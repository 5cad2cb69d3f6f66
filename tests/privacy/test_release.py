"""Gaussian releases: the event, its calibration, and the ledger that charges them."""

import json
import sqlite3
from pathlib import Path

import dp_accounting
import pytest

from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import BudgetExhaustedError, ConfigError, LedgerError
from fedguard.privacy.analysis.dp_sgd import epsilon_pld
from fedguard.privacy.analysis.release import calibrate_release_noise, release_epsilon
from fedguard.privacy.events import DpSgdRound, GaussianRelease, event_from_json
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger

BUDGET = PrivacyBudget(3.0, 1e-5)


def test_release_event_round_trips_and_maps_to_dp_accounting() -> None:
    event = GaussianRelease(2.5, 3)
    assert event_from_json(json.loads(json.dumps(event.to_json()))) == event
    assert event.to_dp_event() == dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(2.5), 3
    )
    assert GaussianRelease(2.5).to_dp_event() == dp_accounting.GaussianDpEvent(2.5)
    with pytest.raises(LedgerError, match="version"):
        event_from_json({**event.to_json(), "version": 2})
    with pytest.raises(ConfigError):
        GaussianRelease(0.0)


@pytest.mark.parametrize(("epsilon", "count"), [(0.5, 1), (1.0, 1), (1.0, 4), (3.0, 1)])
def test_calibrated_release_spends_the_target_to_within_a_permille(
    epsilon: float, count: int
) -> None:
    sigma = calibrate_release_noise(epsilon, 1e-5, count)
    spent = release_epsilon(sigma, 1e-5, count)
    assert epsilon * 0.999 <= spent <= epsilon
    # Composition of k Gaussians = one Gaussian of σ/√k: the PLD agrees.
    single = epsilon_pld(dp_accounting.GaussianDpEvent(sigma / count**0.5), 1e-5)
    assert single == pytest.approx(spent, rel=2e-3)


def test_ledger_charges_a_release_once_and_composes_it_with_training(tmp_path: Path) -> None:
    with PrivacyLedger.open(tmp_path, "silo-0", BUDGET) as ledger:
        ledger.charge("run", 1, DpSgdRound(0.05, 6.0, 20))
        after_training = ledger.spent_epsilon()
        release = GaussianRelease(calibrate_release_noise(1.0, BUDGET.delta))
        entry = ledger.charge(
            "run", 1, release, ChargePurpose.FAIRNESS
        )  # same round, other purpose
        assert entry.purpose is ChargePurpose.FAIRNESS
        assert after_training < entry.epsilon_after == ledger.spent_epsilon()
        with pytest.raises(LedgerError, match="already charged"):
            ledger.charge("run", 1, release, ChargePurpose.FAIRNESS)
        assert [e.purpose for e in ledger.entries()] == [
            ChargePurpose.TRAINING,
            ChargePurpose.FAIRNESS,
        ]
        assert ledger.find("run", 1, ChargePurpose.FAIRNESS) == ledger.entries()[1]
        assert ledger.find("run", 1, ChargePurpose.DRIFT) is None
        with pytest.raises(ConfigError, match="GaussianRelease"):
            ledger.charge("run", 2, DpSgdRound(0.05, 6.0, 20), ChargePurpose.DRIFT)


def test_a_release_past_the_budget_is_refused_and_not_written(tmp_path: Path) -> None:
    with PrivacyLedger.open(tmp_path, "silo-0", PrivacyBudget(1.2, 1e-5)) as ledger:
        cheap = GaussianRelease(calibrate_release_noise(1.0, 1e-5))
        ledger.charge("run", 0, cheap, ChargePurpose.DRIFT)
        with pytest.raises(BudgetExhaustedError, match="drift release 1"):
            ledger.charge("run", 1, cheap, ChargePurpose.DRIFT)
        assert len(ledger.entries()) == 1


def test_a_schema_1_ledger_is_migrated_with_its_charges(tmp_path: Path) -> None:
    path = tmp_path / PrivacyLedger.FILENAME
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        PRAGMA application_id = 1179078732;
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE silo (silo_id TEXT NOT NULL, budget_epsilon REAL NOT NULL,
            budget_delta REAL NOT NULL, created_at TEXT NOT NULL);
        INSERT INTO silo VALUES ('silo-0', 3.0, 1e-05, '2026-01-01');
        CREATE TABLE charges (entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL, round INTEGER NOT NULL, event TEXT NOT NULL,
            epsilon_after REAL NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('charged', 'completed', 'failed')),
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL, UNIQUE (run_id, round));
        CREATE TABLE plans (run_id TEXT PRIMARY KEY, plan TEXT NOT NULL,
            created_at TEXT NOT NULL);
        """
    )
    event = json.dumps(DpSgdRound(0.05, 6.0, 20).to_json())
    conn.execute(
        "INSERT INTO charges VALUES (7, 'old-run', 3, ?, 0.5, 'completed', 't', 't')", (event,)
    )
    conn.commit()
    conn.close()
    with PrivacyLedger.open(tmp_path, "silo-0", BUDGET) as ledger:
        (entry,) = ledger.entries()
        assert (entry.entry_id, entry.run_id, entry.round, entry.purpose) == (
            7,
            "old-run",
            3,
            ChargePurpose.TRAINING,
        )
        assert entry.event == DpSgdRound(0.05, 6.0, 20)
        ledger.charge("old-run", 3, GaussianRelease(4.0), ChargePurpose.DRIFT)
        assert ledger.entries()[-1].entry_id == 8
    version = sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchall()
    assert version == [(3,)]
