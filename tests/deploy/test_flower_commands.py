"""The Flower commands fedguard runs, its folders and run options (no Flower process)."""

import tomllib
from pathlib import Path

import pytest

from fedguard.core.errors import ConfigError
from fedguard.deploy.layouts import SERVER_DIR_ENV, ServerLayout, write_connection
from fedguard.deploy.submit import run_options
from fedguard.deploy.superlink import superlink_command
from fedguard.deploy.supernode import supernode_command


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


def test_server_layout_from_env(tmp_path: Path) -> None:
    assert ServerLayout.from_env({}) is None
    layout = ServerLayout.from_env({SERVER_DIR_ENV: str(tmp_path)})
    assert layout is not None and layout.audit_log == tmp_path / "audit.jsonl"
    assert layout.registry == tmp_path / "registry"
