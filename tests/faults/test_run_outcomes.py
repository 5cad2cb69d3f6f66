"""Issue 13, item 4: runs must not report success when they produced nothing.

A run config holds a participation policy (``min-silos-per-round``,
``max-failed-rounds``); a run that breaks it ends ``failed`` (stopping early once it
can no longer succeed) or ``degraded``, in ``outcome.json`` and the audit log's
``run-end``, and ``fedguard run --wait`` exits non-zero. A run that stops on the
central DP budget says so. A SecAgg configuration in which one silo dropping aborts
every round (3 silos with the defaults) is refused at start unless asked for.

In process (fedguard's in-process engine, real silo agents); ``fedguard run`` is
called through its command-line entry point up to where it would start Flower.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedguard.audit.chain import read_records
from fedguard.audit.pki import init_ca, issue_server_cert
from fedguard.cli import main
from fedguard.client.app import make_client_app
from fedguard.core.config import (
    CentralDPConfig,
    LocalDPConfig,
    RunConfig,
    SecureAggregationConfig,
    dataclass_field_names,
)
from fedguard.core.errors import ConfigError
from fedguard.deploy.layouts import ServerLayout
from fedguard.deploy.recorder import DeploymentRecorder
from fedguard.server.orchestrator import FederatedRun, RoundRecord
from fedguard.simulation.inprocess import InProcessGrid
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from tests.factories import consortium_roster, silo_settings, small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

Mod = Callable[[Message, Context, ClientAppCallable], Message]
NO_DP = LocalDPConfig(enabled=False)


def _layout(tmp_path: Path) -> ServerLayout:
    init_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "server")
    return ServerLayout(tmp_path / "server")


def _secagg() -> SecureAggregationConfig:
    """SecAgg on for 3 silos, allowed explicitly where the code knows the option."""
    allow = "allow_no_dropout" in dataclass_field_names(SecureAggregationConfig)
    return SecureAggregationConfig(enabled=True, **({"allow_no_dropout": True} if allow else {}))


def _client(tmp_path: Path, config: RunConfig, mods: list[Mod]) -> Any:
    return make_client_app(
        lambda c: silo_settings(
            tmp_path, int(c.node_config["partition-id"]), num_silos=config.num_clients
        ),
        allow_non_private=True,
        mods=mods,
    )


def _deployed_run(
    tmp_path: Path, config: RunConfig, mods: list[Mod], run_id: str = "outcome"
) -> tuple[list[RoundRecord], dict[str, Any], Path]:
    """A run under a DeploymentRecorder (as the deployed ServerApp does): its rounds,
    its audit-log run-end and its run folder."""
    layout = _layout(tmp_path)
    run_dir = tmp_path / "runs" / run_id
    records: list[RoundRecord] = []
    grid = InProcessGrid(_client(tmp_path, config, mods), config.num_clients)
    with DeploymentRecorder.open(layout, run_id, config.to_options(), run_dir) as recorder:

        def on_round(record: RoundRecord) -> None:
            records.append(record)
            recorder.on_round(record)

        run = FederatedRun(
            grid,
            config,
            run_id,
            run_dir,
            on_round,
            roster=consortium_roster(tmp_path, config.num_clients),
        )
        run.run()
        if hasattr(recorder, "finish"):
            recorder.finish(run.outcome)
    (end,) = [r.payload for r in read_records(layout.audit_log) if r.kind == "run-end"]
    return records, dict(end), run_dir


def _exit_status(end: dict[str, Any]) -> int:
    """What `fedguard run --wait` exits with once Flower says finished:completed."""
    from fedguard.deploy import submit as commands

    mapping = getattr(commands, "run_exit_status", None)
    if mapping is None:  # before: exit 0 whenever Flower said finished:completed
        return 0
    return int(mapping("finished:completed", end))


def _round_of(message: Message) -> int:
    group = message.metadata.group_id
    return int(group) if group.isdigit() else -1


def test_a_run_whose_secure_rounds_keep_aborting_fails_and_stops_early(tmp_path: Path) -> None:
    # Three silos under SecAgg: from round 3 on, silo-2 fails at share-keys and every
    # round aborts (a 3-silo SecAgg+ round tolerates no dropout).
    def silo2_gone(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            message.metadata.message_type == protocol.SECAGG_SHARE
            and _round_of(message) >= 3
            and context.node_config["partition-id"] == 2
        ):
            return Message(Error(code=0, reason="silo-2 went away"), reply_to=message)
        return call_next(message, context)

    config = small_config(tmp_path, num_rounds=6, local_dp=NO_DP, secagg=_secagg())
    records, end, run_dir = _deployed_run(tmp_path, config, [silo2_gone])
    rounds = [r.round for r in records]
    assert all("aborted" in r.aggregation for r in records if r.round >= 3)
    assert end["status"] == "failed", end
    # max-failed-rounds 1: the second aborted round stops it; rounds 5 and 6 never run.
    assert rounds == [0, 1, 2, 3, 4], rounds
    reasons = " ".join(end["reasons"])
    assert "2 of 4 rounds" in reasons and "max-failed-rounds 1" in reasons, reasons
    outcome = json.loads((run_dir / "outcome.json").read_text())
    assert outcome["status"] == "failed" and outcome["failed_rounds"] == [3, 4]
    assert _exit_status(end) == 1


def test_a_run_in_which_one_silo_of_three_trains_each_round_is_not_completed(
    tmp_path: Path,
) -> None:
    # silo-1 refuses every round (its budget), silo-2 answers every round with an error.
    def refuse_and_fail(
        message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        part = context.node_config["partition-id"]
        if message.metadata.message_type == protocol.TRAIN and part in (1, 2):
            status = ReplyStatus.REFUSED if part == 1 else ReplyStatus.ERROR
            why = "privacy budget exhausted" if part == 1 else "out of memory"
            record = protocol.status_record(status, why, f"silo-{part}")
            return Message(RecordDict({protocol.STATUS: record}), reply_to=message)
        return call_next(message, context)

    config = small_config(tmp_path, num_rounds=2, local_dp=NO_DP)
    records, end, run_dir = _deployed_run(tmp_path, config, [refuse_and_fail])
    for record in records[1:]:
        assert [o.status for o in record.outcomes] == ["ok", "refused", "error"]
        assert record.aggregation["accepted"] == 1
    assert end["status"] in ("failed", "degraded"), end
    assert "min-silos-per-round 2" in " ".join(end["reasons"])
    assert json.loads((run_dir / "outcome.json").read_text())["status"] == end["status"]
    assert _exit_status(end) != 0


def test_a_run_stopped_by_the_central_dp_budget_says_so(tmp_path: Path) -> None:
    config = small_config(
        tmp_path,
        num_rounds=3,
        local_dp=NO_DP,
        central_dp=CentralDPConfig(
            enabled=True, clip_norm=0.5, noise_multiplier=1.0, epsilon_budget=6.0
        ),
    )
    records, end, _ = _deployed_run(tmp_path, config, [])
    assert [r.round for r in records] == [0, 1, 2]  # the third round would overspend
    assert end["status"] == "stopped", end
    assert "central ε budget reached" in " ".join(end["reasons"])
    assert _exit_status(end) == 3


def test_the_run_end_status_decides_the_exit_status_of_run_wait() -> None:
    from fedguard.deploy.submit import run_exit_status

    done = "finished:completed"
    assert run_exit_status(done, {"status": "completed", "reasons": []}) == 0
    assert run_exit_status(done, {"status": "degraded", "reasons": ["r"]}) == 3
    assert run_exit_status(done, {"status": "stopped", "reasons": ["r"]}) == 3
    assert run_exit_status(done, {"status": "failed", "reasons": ["r"]}) == 1
    assert run_exit_status(done, {"status": "killed", "reasons": ["r"]}) == 1
    assert run_exit_status(done, None) == 1  # no run-end: it ended without a final record
    assert run_exit_status("finished:failed", {"status": "completed"}) == 1


def test_the_policy_fails_too_many_aborted_rounds_and_degrades_fewer() -> None:
    from fedguard.core.config import ParticipationPolicy
    from fedguard.server.round_records import assess_run

    def history(aborted: set[int], contributors: int = 3) -> list[dict[str, Any]]:
        return [
            {
                "round": r,
                "aggregation": {"aborted": "secure aggregation aborted"} if r in aborted else {},
                "contributors": 0 if r in aborted else contributors,
            }
            for r in range(7)
        ]

    four_of_six = history({2, 3, 5, 6})
    assert assess_run(four_of_six, ParticipationPolicy(), 6, finished=True).status == "failed"
    lenient = ParticipationPolicy(max_failed_rounds=4)
    degraded = assess_run(four_of_six, lenient, 6, finished=True)
    assert degraded.status == "degraded" and degraded.failed_rounds == (2, 3, 5, 6)
    assert assess_run(history(set()), ParticipationPolicy(), 6, finished=True).status == (
        "completed"
    )
    one_silo = history(set(), contributors=1)
    assert assess_run(one_silo, ParticipationPolicy(), 6, finished=True).status == "failed"
    with pytest.raises(ConfigError, match="min-silos-per-round"):
        ParticipationPolicy(min_silos_per_round=0)
    with pytest.raises(ConfigError, match="min-silos-per-round"):
        RunConfig.from_options({"clients": 3, "min-silos-per-round": 4})


def test_a_secagg_config_that_tolerates_no_dropout_at_three_silos_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = small_config(tmp_path, secagg=SecureAggregationConfig(enabled=True))
    grid = InProcessGrid(_client(tmp_path, config, []), 3)
    with pytest.raises(ConfigError, match="tolerate no dropout") as refused:
        FederatedRun(grid, config, "r", tmp_path / "run", roster=consortium_roster(tmp_path))
    assert "secagg-allow-no-dropout" in str(refused.value)
    assert "at least 5 silos" in str(refused.value)

    # `fedguard run` refuses it before anything starts (no app written, no Flower run).
    server = tmp_path / "server"
    (server / "flwr-home").mkdir(parents=True)
    (server / "flwr-home" / "config.toml").write_text("")
    run_toml = tmp_path / "three.toml"
    run_toml.write_text(
        'dataset = "breast-cancer"\nclients = 3\nrounds = 1\nsecagg = true\nrun-name = "three"\n'
    )
    assert main(["run", str(run_toml), "--server-dir", str(server)]) == 2
    assert "tolerate no dropout" in capsys.readouterr().err
    assert not (server / "apps" / "three").exists()

    # Asked for explicitly, it runs; five silos tolerate one dropout with the defaults.
    allowed = dataclasses.replace(config, secagg=_secagg())
    FederatedRun(grid, allowed, "r", tmp_path / "run", roster=consortium_roster(tmp_path))
    five = small_config(tmp_path, num_clients=5, secagg=SecureAggregationConfig(enabled=True))
    FederatedRun(InProcessGrid(_client(tmp_path, five, []), 5), five, "r5", tmp_path / "run5")
