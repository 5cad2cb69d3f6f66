"""Shared edge fixtures: one small DP run and its server-side export, built once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedguard.audit.logs import SILO_LOG_NAME
from fedguard.client.ledger_guard import open_silo_ledger, record_charge
from fedguard.core.config import PrivacyBudget
from fedguard.edge.distill import DistillConfig
from fedguard.edge.export import ExportConfig, ExportResult, export_run
from fedguard.privacy.ledger import ChargeStatus, PrivacyLedger
from fedguard.runs.saved import load_saved_run
from fedguard.simulation.report import write_report
from fedguard.simulation.runner import simulate
from tests.factories import small_config

BUDGET = PrivacyBudget(3.0, 1e-5)
# A larger lifetime budget, of which the teacher run (planned at BUDGET) spent two thirds:
# federated distillation then has budget left (see ``with_lifetime_budget``).
LIFETIME = PrivacyBudget(4.5, 1e-5)

FAST = ExportConfig(
    distill=DistillConfig(transfer_rows=1024, server_epochs=5, rounds=2),
    timing_repeats=5,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: builds a fresh virtual environment (about 20 s)")


@pytest.fixture(scope="session")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished breast-cancer DP run folder (3 silos, 2 rounds, in-process engine)."""
    root = tmp_path_factory.mktemp("edge-run")
    config = small_config(root, num_rounds=2, run_name="bc", budget=BUDGET)
    run_dir, results, plans = simulate(config, baseline=False, echo=lambda _: None)
    write_report(run_dir, config, results, plans)
    return run_dir


@pytest.fixture(scope="session")
def exported(dp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """The default (server-side) edge export of ``dp_run``."""
    out = tmp_path_factory.mktemp("edge-out") / "edge"
    return export_run(dp_run, dataclasses.replace(FAST, out_dir=out), lambda _: None)


def set_run_options(run_dir: Path, **options: object) -> None:
    """Change a copied run folder's config the way its checkpoints record it.

    A saved run's config is read from its checkpoints (``fedguard.runs.saved``):
    every checkpoint of every variant gets ``options`` (flat option keys).
    """
    for state_file in sorted(run_dir.glob("*/checkpoints/round-*.json")):
        data = json.loads(state_file.read_text())
        data["state"]["config"].update(options)
        state_file.write_text(json.dumps(data))


@dataclasses.dataclass(frozen=True)
class _Owner:
    silo_id: str
    state_dir: Path
    budget: PrivacyBudget
    signing_key: Path | None = None


def with_lifetime_budget(run_dir: Path, budget: PrivacyBudget) -> None:
    """Give every silo of a copied run folder a larger lifetime budget, charges kept.

    Each ledger is rebuilt with ``budget`` and the same charges (same run ids, rounds
    and events, so the same ε), and the run's config says ``budget``: the state of
    a consortium whose silos planned the teacher run with part of their lifetime budget.
    The silo log goes with its ledger and is rebuilt through the ledger guard (a
    ledger replaced under its log is refused, as it should be).
    """
    old = load_saved_run(run_dir).config.budget
    for silo_dir in sorted((run_dir / "dp" / "silos").iterdir()):
        with PrivacyLedger.open(silo_dir, silo_dir.name, old) as ledger:
            entries = ledger.entries()
        (silo_dir / PrivacyLedger.FILENAME).unlink()
        for log_file in silo_dir.glob(f"{SILO_LOG_NAME}*"):
            log_file.unlink()
        owner = _Owner(silo_dir.name, silo_dir, budget)
        with open_silo_ledger(owner) as ledger:
            for entry in entries:
                charged = ledger.charge(entry.run_id, entry.round, entry.event, entry.purpose)
                record_charge(owner, ledger, charged)
                ledger.mark(charged.entry_id, ChargeStatus.COMPLETED)
    set_run_options(run_dir, **{"target-epsilon": budget.epsilon, "delta": budget.delta})
