"""The deployment commands that need no running Flower process."""

import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.core.config import DatasetName, PrivacyBudget, RunConfig
from fedguard.core.errors import ConfigError
from fedguard.core.pki import load_private_key
from fedguard.server.audit import AuditLog
from fedguard.server.commands import (
    SERVER_DIR_ENV,
    ServerLayout,
    main,
    node_config_toml,
    run_options,
    superlink_command,
    supernode_command,
    write_app,
    write_connection,
)
from fedguard.server.registry import ModelRegistry


def test_node_config_is_toml_flower_and_fedguard_both_read(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from fedguard.client.silo import settings_from_node_config

    data = tmp_path / 'odd "dir" with spaces' / "records.csv"
    text = node_config_toml(
        "hospital-a",
        DatasetName.BREAST_CANCER,
        data,
        tmp_path,
        PrivacyBudget(3.0, 1e-5),
        signing_key=tmp_path / "node.key",
    )
    path = tmp_path / "node-config.toml"
    path.write_text(text)
    parsed = parse_config_args([str(path)])  # what flower-supernode --node-config does
    settings = settings_from_node_config(parsed)
    assert settings.silo_id == "hospital-a"
    assert settings.budget == PrivacyBudget(3.0, 1e-5)
    assert settings.state_dir == tmp_path
    assert settings.data.dataset is DatasetName.BREAST_CANCER
    assert parsed["signing-key"] == str(tmp_path / "node.key")
    assert parsed["data-path"] == str(data)


def test_generated_app_carries_the_whole_run_config(tmp_path: Path) -> None:
    options = RunConfig().to_options()
    path = write_app(tmp_path / "app", options)
    project = tomllib.loads(path.read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedguard.server.app:app",
        "clientapp": "fedguard.client.app:app",
    }
    assert RunConfig.from_options(app["config"]) == RunConfig.from_options(options)
    assert list(path.parent.iterdir()) == [path]  # no code in the bundle


def test_flower_accepts_the_generated_app(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    path = write_app(tmp_path / "app", RunConfig().to_options())
    config, warnings = load_and_validate(path)
    assert config is not None, warnings


def test_run_options_resolve_out_and_name_the_run(tmp_path: Path) -> None:
    layout = ServerLayout(tmp_path / "server")
    config = tmp_path / "trial.toml"
    config.write_text('dataset = "breast-cancer"\nrounds = 2\n')
    options = run_options(config, layout)
    assert options["out"] == str((tmp_path / "server" / "runs").resolve())
    assert options["run-name"].startswith("trial-")
    config.write_text('rounds = 2\nout = "elsewhere"\nrun-name = "r1"\n')
    options = run_options(config, layout)
    assert options["out"] == str(Path("elsewhere").resolve())
    assert options["run-name"] == "r1"
    config.write_text("roundz = 2\n")
    with pytest.raises(ConfigError, match="unknown option"):
        run_options(config, layout)
    with pytest.raises(ConfigError, match="does not exist"):
        run_options(tmp_path / "absent.toml", layout)


def test_flower_commands_have_the_security_flags(tmp_path: Path) -> None:
    layout = ServerLayout(tmp_path)
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("x")
    link = superlink_command(layout, "0.0.0.0:9092")
    for flag in (
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--ssl-ca-certfile",
        "--database",
    ):
        assert flag in link
    assert "--insecure" not in link
    assert link[link.index("--host") + 1] == "0.0.0.0"
    node = supernode_command(
        "link:9092", tmp_path / "ca.crt", tmp_path / "k", tmp_path / "c.toml", 9100, "warm"
    )
    assert node[node.index("--isolation") + 1] == "process"
    assert "--auth-supernode-private-key" in node and "--root-certificates" in node
    assert "--isolation" not in supernode_command(
        "link:9092", tmp_path / "ca.crt", tmp_path / "k", tmp_path / "c.toml", 9100, "flower"
    )
    connection = tomllib.loads(write_connection(layout, "0.0.0.0:9092").read_text())
    assert connection["superlink"]["fedguard"]["address"] == "127.0.0.1:9092"


def test_ca_node_and_audit_commands_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["ca", "init", "--dir", "ca"]) == 0
    assert main(["ca", "issue-server", "--ca-dir", "ca", "--out", "server"]) == 0
    assert main(["node", "keygen", "--out", "silo-a"]) == 0
    assert main(["node", "keygen", "--out", "silo-a"]) == 2  # never overwritten
    assert "refusing to overwrite" in capsys.readouterr().err
    key = load_private_key(Path("server/audit.key"))
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    log = AuditLog.open(Path("server/audit.jsonl"), key)
    log.run_start("r", {"rounds": 1})
    log.run_end("r", "completed")
    assert main(["audit", "verify", "server/audit.jsonl", "--public-key", "server/audit.pub"]) == 0
    assert "OK: 2 records" in capsys.readouterr().out
    text = Path("server/audit.jsonl").read_text().replace('"rounds":1', '"rounds":2')
    Path("server/audit.jsonl").write_text(text)
    assert main(["audit", "verify", "server/audit.jsonl", "--public-key", "server/audit.pub"]) == 1
    assert "TAMPERED at seq 0" in capsys.readouterr().out
    assert main(["audit", "verify", "server/audit.jsonl"]) == 2  # a server log needs the key


def test_models_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    with ModelRegistry.open(tmp_path / "server" / "registry") as registry:
        first = registry.register(
            {"w": np.zeros(3, np.float32)}, run_id="r", round=0, parent_sha256=None, config={}
        )
        registry.register(
            {"w": np.ones(3, np.float32)},
            run_id="r",
            round=1,
            parent_sha256=first.sha256,
            config={},
            metrics={"accuracy": 0.9},
        )
    server = ["--server-dir", str(tmp_path / "server")]
    assert main(["models", "list", *server]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 2 and listing[1].startswith("*") and "accuracy 0.9" in listing[1]
    assert main(["models", "show", first.sha256[:8], *server]) == 0
    assert '"round": 0' in capsys.readouterr().out
    assert main(["models", "rollback", first.sha256[:8], "--reason", "bad", *server]) == 0
    assert "head is now" in capsys.readouterr().out
    assert main(["models", "list", *server]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("*")
    assert main(["models", "show", "zzzz", *server]) == 2


def test_server_layout_from_env(tmp_path: Path) -> None:
    assert ServerLayout.from_env({}) is None
    layout = ServerLayout.from_env({SERVER_DIR_ENV: str(tmp_path)})
    assert layout is not None and layout.audit_log == tmp_path / "audit.jsonl"
    assert layout.registry == tmp_path / "registry"


def test_client_start_checks_its_inputs_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["client", "start", "--data", str(tmp_path / "absent.csv"), "--state-dir", str(tmp_path)]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "supernode.pid").exists()


def test_deployment_recorder_audits_and_registers_each_round_once(tmp_path: Path) -> None:
    from fedguard.core.pki import init_ca, issue_server_cert
    from fedguard.core.pki import load_public_key as load_pub
    from fedguard.server.app import make_server_app
    from fedguard.server.audit import read_records, verify_audit_log
    from fedguard.server.commands import DeploymentRecorder
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
    from fedguard.core.pki import init_ca, issue_server_cert
    from fedguard.server.audit import read_records
    from fedguard.server.commands import DeploymentRecorder

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


def test_prompt_grid_pulls_replies_every_poll_and_keeps_flower_timeout_semantics() -> None:
    import time as clock

    from flwr.app import Message, RecordDict

    from fedguard.core.flower_runtime import PromptGrid

    class Replies:
        """Stands in for Flower's grid: message ``i`` gets its reply at pull ``i + 1``."""

        def __init__(self) -> None:
            self.pulls = 0

        def push_messages(self, messages: Any) -> list[str]:
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids: Any) -> list[Message]:
            self.pulls += 1
            out = []
            for message_id in sorted(ids):
                if int(message_id[1:]) < self.pulls:
                    reply = Message(RecordDict(), dst_node_id=1, message_type="train")
                    reply.metadata.__dict__["_reply_to_message_id"] = message_id
                    out.append(reply)
            return out

    fake = Replies()
    grid = PromptGrid(fake, poll=0.01)  # type: ignore[arg-type]
    started = clock.monotonic()
    replies = list(grid.send_and_receive([object(), object(), object()]))  # type: ignore[list-item]
    assert len(replies) == 3 and fake.pulls == 3
    assert clock.monotonic() - started < 1.0  # Flower's own grid would sleep 6 s here
    never = Replies()
    never.pulls = -100  # replies only after 100 pulls
    partial = PromptGrid(never, poll=0.01)  # type: ignore[arg-type]
    assert list(partial.send_and_receive([object()], timeout=0.05)) == []  # type: ignore[list-item]


def test_the_ca_signs_the_roster_the_silos_and_the_server_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.common.config import parse_config_args

    from fedguard.client.silo import settings_from_node_config
    from fedguard.privacy.secagg.roster import SignedRoster, load_consortium_key
    from fedguard.server.roster_commands import silo_identity_paths

    monkeypatch.chdir(tmp_path)
    assert main(["ca", "init", "--dir", "ca"]) == 0
    assert main(["ca", "issue-server", "--ca-dir", "ca", "--out", "server"]) == 0
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        assert main(["node", "keygen", "--out", f"keys/{name}", "--name", name]) == 0
        assert (tmp_path / "keys" / name / "secagg-identity.key").stat().st_mode & 0o777 == 0o600
    assert "SecAgg identity public key" in capsys.readouterr().out
    silos = [f"--silo={n}=keys/{n}/secagg-identity.pub" for n in ("hospital-a", "hospital-b")]
    assert main(["ca", "sign-roster", "--ca-dir", "ca", *silos]) == 0
    assert "serial 1, 2 silo(s)" in capsys.readouterr().out
    silos.append("--silo=hospital-c=keys/hospital-c/secagg-identity.pub")
    assert main(["ca", "sign-roster", "--ca-dir", "ca", *silos]) == 0  # the next serial
    signed = SignedRoster.load(Path("server/secagg-roster.json"))
    roster = signed.verify(load_consortium_key(Path("ca/ca.crt")))
    assert roster.serial == 2 and list(roster.silos) == ["hospital-a", "hospital-b", "hospital-c"]
    assert roster.consortium == "fedguard consortium CA"
    assert ServerLayout(Path("server")).load_roster() == signed
    assert main(["ca", "sign-roster", "--ca-dir", "ca", "--silo", "nokey"]) == 2
    # client start's node config: the identity beside the node key, the CA as trusted key.
    paths = silo_identity_paths(None, Path("keys/hospital-a/node.key"), None, Path("ca/ca.crt"))
    assert paths is not None
    text = node_config_toml(
        "hospital-a",
        DatasetName.BREAST_CANCER,
        tmp_path / "a.csv",
        tmp_path / "state",
        PrivacyBudget(3.0, 1e-5),
        secagg_identity=paths[0],
        consortium_key=paths[1],
    )
    Path("node-config.toml").write_text(text)
    settings = settings_from_node_config(parse_config_args(["node-config.toml"]))
    assert settings.identity is not None
    assert settings.identity.public_key == roster.silos["hospital-a"]
    assert silo_identity_paths(None, Path("elsewhere/node.key"), None, Path("ca/ca.crt")) is None
    assert "will refuse secure aggregation" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="does not exist"):
        silo_identity_paths(
            "missing.key", Path("keys/hospital-a/node.key"), None, Path("ca/ca.crt")
        )
