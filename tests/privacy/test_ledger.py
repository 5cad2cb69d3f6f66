"""The per-silo SQLite privacy ledger: exact accounting, refusal, persistence, locking."""

from __future__ import annotations

import multiprocessing
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import BudgetExhaustedError, ConfigError, LedgerError
from fedguard.privacy.analysis.dp_sgd import (
    calibrate_noise_multiplier,
    compose_grouped,
    epsilon_pld,
)
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import ChargeStatus, PrivacyLedger, RoundPlan

DELTA = 1e-5
BUDGET = PrivacyBudget(epsilon=0.3, delta=DELTA)
# Large σ keeps the PLDs cheap. Measured: 1 round ε≈0.124, 5 rounds 0.2895, 6 rounds > 0.3.
ROUND = DpSgdRound(0.05, 6.0, 20)
ROUNDS = [DpSgdRound(0.05, 6.0, 20), DpSgdRound(0.05, 8.0, 20), DpSgdRound(0.02, 6.0, 40)]


def _pld(events: list[DpSgdRound]) -> float:
    if not events:
        return 0.0
    return epsilon_pld(compose_grouped((e.to_dp_event(), 1) for e in events), DELTA)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[PrivacyLedger]:
    with PrivacyLedger.open(tmp_path / "state", "silo-0", BUDGET) as opened:
        yield opened


# --------------------------------------------------------------------------- exact accounting


@settings(max_examples=6, deadline=None)
@given(indices=st.lists(st.integers(0, len(ROUNDS) - 1), min_size=1, max_size=5))
def test_spent_equals_pld_of_composed_events(indices: list[int]) -> None:
    budget = PrivacyBudget(epsilon=50.0, delta=DELTA)
    charged: list[DpSgdRound] = []
    previous = 0.0
    with (
        tempfile.TemporaryDirectory() as state,
        PrivacyLedger.open(Path(state), "silo", budget) as ledger,
    ):
        assert ledger.spent_epsilon() == 0.0
        for round_number, index in enumerate(indices, start=1):
            event = ROUNDS[index]
            predicted = ledger.epsilon_if_charged(event) if round_number == len(indices) else None
            entry = ledger.charge("run", round_number, event)
            charged.append(event)
            spent = ledger.spent_epsilon()
            assert spent == entry.epsilon_after
            assert spent >= previous  # monotone
            previous = spent
        assert predicted == spent
        assert spent == pytest.approx(_pld(charged), rel=1e-12)
        assert [e.event for e in ledger.entries()] == charged


def test_epsilon_if_charged_writes_nothing(ledger: PrivacyLedger) -> None:
    ledger.charge("run", 1, ROUND)
    before = (ledger.entries(), ledger.spent_epsilon())
    assert ledger.epsilon_if_charged(ROUND) > before[1]
    assert (ledger.entries(), ledger.spent_epsilon()) == before


def test_refusal_writes_nothing(ledger: PrivacyLedger) -> None:
    charged = 5  # five rounds fit in ε=0.3, a sixth does not (measured, see ROUND)
    for r in range(1, charged + 1):
        ledger.charge("run", r, ROUND)
    with pytest.raises(BudgetExhaustedError) as info:
        ledger.charge("run", charged + 1, ROUND)
    entries = ledger.entries()
    spent = ledger.spent_epsilon()
    assert len(entries) == charged
    assert spent <= BUDGET.epsilon < ledger.epsilon_if_charged(ROUND)
    message = str(info.value)
    assert f"{spent:.4g}" in message  # spent so far
    assert f"{_pld([ROUND]):.4g}" in message  # this round's cost
    assert "ε=0.3" in message and "nothing was charged" in message
    # Asking again changes nothing either.
    with pytest.raises(BudgetExhaustedError):
        ledger.charge("run", charged + 1, ROUND)
    assert ledger.entries() == entries
    assert ledger.spent_epsilon() == spent


def test_calibrated_plan_fits_the_ledger(tmp_path: Path) -> None:
    """A σ calibrated for R rounds is charged R times without refusal (same accountant)."""
    budget = PrivacyBudget(epsilon=0.5, delta=DELTA)
    q, steps, rounds = 0.05, 20, 4
    sigma = calibrate_noise_multiplier(q, steps, rounds, budget.epsilon, DELTA, 30.0)
    with PrivacyLedger.open(tmp_path, "silo", budget) as ledger:
        for r in range(1, rounds + 1):
            ledger.charge("run", r, DpSgdRound(q, sigma, steps))
        assert ledger.spent_epsilon() <= budget.epsilon


def test_replayed_round_is_refused(ledger: PrivacyLedger) -> None:
    ledger.charge("run-a", 1, ROUND)
    ledger.charge("run-b", 1, ROUND)  # another run's round 1 is a different round
    with pytest.raises(LedgerError, match="already charged"):
        ledger.charge("run-a", 1, ROUND)
    assert len(ledger.entries()) == 2


# --------------------------------------------------------------------------- statuses


def test_mark_statuses_and_failed_rounds_stay_charged(ledger: PrivacyLedger) -> None:
    first = ledger.charge("run", 1, ROUND)
    second = ledger.charge("run", 2, ROUND)
    spent = ledger.spent_epsilon()
    ledger.mark(first.entry_id, ChargeStatus.COMPLETED)
    ledger.mark(second.entry_id, ChargeStatus.FAILED)
    ledger.mark(second.entry_id, ChargeStatus.FAILED)  # idempotent
    assert [e.status for e in ledger.entries()] == [ChargeStatus.COMPLETED, ChargeStatus.FAILED]
    assert ledger.spent_epsilon() == spent
    with pytest.raises(LedgerError):
        ledger.mark(first.entry_id, ChargeStatus.FAILED)
    with pytest.raises(LedgerError):
        ledger.mark(second.entry_id, ChargeStatus.CHARGED)
    with pytest.raises(LedgerError):
        ledger.mark(999, ChargeStatus.COMPLETED)


def test_entry_fields(ledger: PrivacyLedger) -> None:
    entry = ledger.charge("run", 3, ROUND)
    assert entry.run_id == "run" and entry.round == 3 and entry.event == ROUND
    assert entry.status is ChargeStatus.CHARGED
    assert entry.created_at.endswith("+00:00")
    assert ledger.entries() == [entry]


# --------------------------------------------------------------------------- persistence


def test_persistence_across_reopen(tmp_path: Path) -> None:
    with PrivacyLedger.open(tmp_path, "silo-0", BUDGET) as ledger:
        entry = ledger.charge("run", 1, ROUND)
        ledger.mark(entry.entry_id, ChargeStatus.COMPLETED)
        ledger.charge("run", 2, ROUNDS[1])
        entries, spent = ledger.entries(), ledger.spent_epsilon()
    # A new process (or a rebuilt ClientApp) opens the same directory.
    with PrivacyLedger.open(tmp_path, "silo-0", BUDGET) as reopened:
        assert reopened.entries() == entries
        assert reopened.spent_epsilon() == spent
        with pytest.raises(LedgerError):
            reopened.charge("run", 2, ROUND)


def test_write_ahead_durability(ledger: PrivacyLedger) -> None:
    ledger.charge("run", 1, ROUND)
    # Committed before charge() returns: visible to an independent connection.
    other = sqlite3.connect(ledger.path)
    try:
        assert other.execute("SELECT run_id, round, status FROM charges").fetchall() == [
            ("run", 1, "charged")
        ]
    finally:
        other.close()
    synchronous = ledger._connection().execute("PRAGMA synchronous").fetchone()[0]
    assert synchronous == 3  # EXTRA: FULL plus a directory sync after the journal is unlinked


def test_budget_mismatch_on_reopen_is_refused(tmp_path: Path) -> None:
    PrivacyLedger.open(tmp_path, "silo-0", BUDGET).close()
    with pytest.raises(LedgerError, match="never changed silently"):
        PrivacyLedger.open(tmp_path, "silo-0", PrivacyBudget(epsilon=3.0, delta=DELTA))
    with pytest.raises(LedgerError, match="budget"):
        PrivacyLedger.open(tmp_path, "silo-0", PrivacyBudget(epsilon=0.3, delta=1e-6))
    with pytest.raises(LedgerError, match="belongs to silo"):
        PrivacyLedger.open(tmp_path, "silo-1", BUDGET)


def test_corrupt_and_foreign_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / PrivacyLedger.FILENAME).write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(LedgerError, match=str(garbage / PrivacyLedger.FILENAME)):
        PrivacyLedger.open(garbage, "silo-0", BUDGET)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    conn = sqlite3.connect(foreign / PrivacyLedger.FILENAME)
    conn.execute("CREATE TABLE patients (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="not a fedguard privacy ledger"):
        PrivacyLedger.open(foreign, "silo-0", BUDGET)


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    PrivacyLedger.open(tmp_path, "silo-0", BUDGET).close()
    conn = sqlite3.connect(tmp_path / PrivacyLedger.FILENAME)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="schema version"):
        PrivacyLedger.open(tmp_path, "silo-0", BUDGET)


def test_closed_ledger_refuses_work(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "silo-0", BUDGET)
    ledger.close()
    ledger.close()  # idempotent
    with pytest.raises(LedgerError, match="closed"):
        ledger.charge("run", 1, ROUND)


def test_bad_arguments(ledger: PrivacyLedger) -> None:
    with pytest.raises(ConfigError):
        ledger.charge("", 1, ROUND)
    with pytest.raises(ConfigError):
        ledger.charge("run", -1, ROUND)
    with pytest.raises(ConfigError):
        ledger.charge("run", 1, "round")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PrivacyLedger.open(Path("unused"), "", BUDGET)


# --------------------------------------------------------------------------- plans


def test_plan_is_set_once(tmp_path: Path) -> None:
    plan = RoundPlan(
        sample_rate=1 / 79, noise_multiplier=1.2345, steps_per_round=79, planned_rounds=20
    )
    with PrivacyLedger.open(tmp_path, "silo-0", BUDGET) as ledger:
        assert ledger.plan("run") is None
        ledger.set_plan("run", plan)
        ledger.set_plan("run", plan)  # the same plan again: fine
        with pytest.raises(LedgerError, match="refusing to change"):
            ledger.set_plan("run", RoundPlan(1 / 79, 1.3, 79, 20))
        ledger.set_plan("other-run", RoundPlan(1 / 79, 1.3, 79, 20))
    with PrivacyLedger.open(tmp_path, "silo-0", BUDGET) as reopened:
        assert reopened.plan("run") == plan  # floats survive exactly
        assert reopened.plan("run").round_event() == DpSgdRound(1 / 79, 1.2345, 79)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "args", [(0.0, 1.0, 1, 1), (0.1, 0.0, 1, 1), (0.1, 1.0, 0, 1), (0.1, 1.0, 1, 0)]
)
def test_plan_validation(args: tuple[float, float, int, int]) -> None:
    with pytest.raises(ConfigError):
        RoundPlan(*args)


# --------------------------------------------------------------------------- concurrency


def test_two_ledger_objects_on_one_file(tmp_path: Path) -> None:
    a = PrivacyLedger.open(tmp_path, "silo-0", BUDGET)
    b = PrivacyLedger.open(tmp_path, "silo-0", BUDGET)
    try:
        a.charge("run", 1, ROUND)
        assert b.spent_epsilon() == a.spent_epsilon()
        with pytest.raises(LedgerError, match="already charged"):
            b.charge("run", 1, ROUND)
        b.charge("run", 2, ROUND)
        assert [e.round for e in a.entries()] == [1, 2]
        assert a.spent_epsilon() == b.spent_epsilon() == pytest.approx(_pld([ROUND, ROUND]))
    finally:
        a.close()
        b.close()


def _charge_worker(state_dir: str, worker: int, rounds: int) -> tuple[int, int]:
    charged = refused = 0
    with PrivacyLedger.open(Path(state_dir), "silo-0", BUDGET) as ledger:
        for r in range(rounds):
            try:
                # Both workers try the same rounds: exactly one may win each.
                ledger.charge("run", r, ROUND)
                charged += 1
            except (BudgetExhaustedError, LedgerError):
                refused += 1
    return charged, refused


def test_two_processes_never_overspend(tmp_path: Path) -> None:
    # fork: no re-import in the children (spawn costs ~1.5 s each); each child opens
    # its own SQLite connection, which is what a second process does.
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.starmap(_charge_worker, [(str(tmp_path), w, 12) for w in range(2)])
    with PrivacyLedger.open(tmp_path, "silo-0", BUDGET) as ledger:
        entries = ledger.entries()
        assert sum(c for c, _ in results) == len(entries)
        assert len({e.round for e in entries}) == len(entries)  # no round twice
        assert ledger.spent_epsilon() <= BUDGET.epsilon
        assert ledger.epsilon_if_charged(ROUND) > BUDGET.epsilon  # filled to the brim
