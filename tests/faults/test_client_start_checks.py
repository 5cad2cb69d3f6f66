"""Issue 13, items 1 and 5: ``fedguard client start`` checks the silo's state first.

Before it spawns a SuperNode or connects, ``client start`` opens the ledger with
the integrity checks of every training message (against the silo's signed log)
and checks that it can write it. Real processes and files: a running SuperLink
with the silo's key registered (so a start that skipped the checks would connect
and succeed), a state folder that a real ClientApp trained in (its signed silo
log records the spend) and whose ledger was then deleted, and a ledger the silo
cannot write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedguard.audit.chain import read_records
from fedguard.client.app import make_client_app
from fedguard.core.config import PrivacyBudget
from fedguard.privacy.ledger import PrivacyLedger
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from tests.factories import initial_weights, instruction, local_scaler, silo_settings
from tests.faults.test_locks import Deployment, _processes_naming, deployment

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

LEDGER = PrivacyLedger.FILENAME
SILO_LOG = "silo-log.jsonl"
BUDGET = PrivacyBudget(3.0, 1e-5)  # the factories' silo budget; client start gets the same


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("checks"), ["silo-0", "silo-ro"]) as d:
        yield d


def _nothing_started(site: Deployment, state: Path, port: int) -> None:
    assert not (state / "supernode.pid").exists() and not (state / "executor.pid").exists()
    assert not (state / "supernode.log").exists(), "a SuperNode was spawned"
    assert _processes_naming("flower-supernode", str(state)) == []
    assert _processes_naming("fedguard.client.executor", f"127.0.0.1:{port} ") == []


def _train_one_round(base: Path, signing_key: Path) -> Path:
    """A real ClientApp trains round 1 as a deployed silo would: charged, signed log."""
    app = make_client_app(lambda _: silo_settings(base, 0))
    settings = silo_settings(base, 0)
    context = Context(
        run_id=1,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 3, "signing-key": str(signing_key)},
        state=RecordDict(),
        run_config={},
    )
    reply = app(instruction(1, initial_weights(), local_scaler(settings)), context)
    assert protocol.reply_status(reply)[0] is ReplyStatus.OK
    return Path(settings.state_dir)


@pytest.mark.timeout(180)
def test_a_deleted_ledger_beside_a_log_that_records_spend_is_refused(site: Deployment) -> None:
    key = site.root / "keys" / "silo-0" / "node.key"
    state = _train_one_round(site.root / "trained", key)
    spent = [r.payload.get("epsilon") for r in read_records(state / SILO_LOG)]
    assert any(isinstance(e, float) and e > 0 for e in spent), spent
    (state / LEDGER).unlink()  # the fault: a fresh budget, if nothing checked

    port = site.runtime_ports[0]
    done = site.fedguard(
        *site.client_start_args("silo-0", state, port, "--silo-id", "silo-0"), check=False
    )
    assert done.returncode != 0, f"client start succeeded on a deleted ledger:\n{done.stdout}"
    assert "LedgerIntegrityError" in done.stderr and "missing" in done.stderr, done.stderr
    assert str(state / LEDGER) in done.stderr, done.stderr
    _nothing_started(site, state, port)
    assert not (state / LEDGER).exists(), "the start re-created the ledger"


def _make_read_only(path: Path) -> bool:
    """chmod 0444; as root (which ignores modes) also the immutable flag. False: cannot."""
    path.chmod(0o444)
    if os.geteuid() != 0:
        return True
    chattr = shutil.which("chattr")
    return (
        chattr is not None
        and subprocess.run([chattr, "+i", str(path)], check=False).returncode == 0
    )


@pytest.mark.timeout(180)
def test_a_read_only_ledger_is_refused_before_connecting(site: Deployment) -> None:
    state = site.root / "silos" / "silo-ro"
    state.mkdir(parents=True)
    PrivacyLedger.open(state, "silo-ro", BUDGET).close()
    ledger = state / LEDGER
    if not _make_read_only(ledger):
        pytest.skip("running as root without chattr +i: cannot make a file read-only")
    port = site.runtime_ports[1]
    try:
        done = site.fedguard(*site.client_start_args("silo-ro", state, port), check=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ledger)], check=False)
        ledger.chmod(0o644)
    assert done.returncode != 0, f"client start succeeded on a read-only ledger:\n{done.stdout}"
    assert str(ledger) in done.stderr and "no SuperNode was started" in done.stderr, done.stderr
    _nothing_started(site, state, port)
