"""The deployed ServerApp's audit log and model registry writer."""

from pathlib import Path

import pytest

from fedguard.audit.registry import ModelRegistry
from fedguard.deploy.layouts import ServerLayout
from fedguard.deploy.recorder import DeploymentRecorder


def test_deployment_recorder_audits_and_registers_each_round_once(tmp_path: Path) -> None:
    from fedguard.audit.chain import read_records
    from fedguard.audit.pki import init_ca, issue_server_cert
    from fedguard.audit.pki import load_public_key as load_pub
    from fedguard.audit.server_log import verify_audit_log
    from fedguard.server.app import make_server_app
    from fedguard.simulation.inprocess import run_inprocess
    from tests.factories import silo_settings, small_config

    init_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "server")
    layout = ServerLayout(tmp_path / "server")
    config = small_config(tmp_path, num_rounds=2)
    run_dir = tmp_path / "run"

    from fedguard.client.app import make_client_app

    client = make_client_app(lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"])))
    # A server that died after checkpointing every round but before recording any.
    run_inprocess(make_server_app(config, "r", run_dir), client, 3)
    # The restarted server records what the checkpoints hold, then resumes (nothing left).
    for _ in range(2):
        with DeploymentRecorder.open(layout, "r", config.to_options(), run_dir) as recorder:
            run_inprocess(
                make_server_app(config, "r", run_dir, on_round=recorder.on_round), client, 3
            )
    records = read_records(layout.audit_log)
    assert [r.kind for r in records] == [
        "run-start", "round", "round", "run-end", "run-start", "run-end",
    ]  # fmt: skip
    assert records[0].payload["resumed_after_round"] == 2
    assert records[-1].payload["status"] == "completed"
    assert verify_audit_log(layout.audit_log, load_pub(layout.audit_public_key)).ok
    with ModelRegistry.open(layout.registry) as registry:
        models = registry.list("r")
        assert [m.round for m in models] == [0, 1, 2]
        assert models[1].parent_sha256 == models[0].sha256
        assert models[2].parent_sha256 == models[1].sha256
        assert records[2].payload["model_sha256"] == models[2].sha256
        assert registry.head("r").sha256 == models[2].sha256  # type: ignore[union-attr]


def test_deployment_recorder_records_a_failed_run(tmp_path: Path) -> None:
    from fedguard.audit.chain import read_records
    from fedguard.audit.pki import init_ca, issue_server_cert

    init_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "server")
    layout = ServerLayout(tmp_path / "server")
    with (
        pytest.raises(RuntimeError, match="boom"),
        DeploymentRecorder.open(layout, "r", {"rounds": 1}, tmp_path / "run"),
    ):
        raise RuntimeError("boom")
    end = read_records(layout.audit_log)[-1]
    assert end.kind == "run-end" and end.payload["status"] == "failed"
    assert end.payload["reasons"] == ["RuntimeError: boom"]
