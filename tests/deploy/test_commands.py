"""The deployment commands that need no running Flower process, through ``fedguard.cli.main``."""

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.audit.pki import load_private_key
from fedguard.audit.registry import ModelRegistry
from fedguard.audit.server_log import AuditLog
from fedguard.cli import main
from fedguard.core.config import DatasetName, PrivacyBudget
from fedguard.core.errors import ConfigError
from fedguard.deploy.bundles import node_config_toml
from fedguard.deploy.layouts import ServerLayout


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


def test_client_start_checks_its_inputs_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["client", "start", "--data", str(tmp_path / "absent.csv"), "--state-dir", str(tmp_path)]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "supernode.pid").exists()


def test_the_ca_signs_the_roster_the_silos_and_the_server_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.common.config import parse_config_args

    from fedguard.client.silo import settings_from_node_config
    from fedguard.deploy.roster import silo_identity_paths
    from fedguard.privacy.secagg.roster import SignedRoster, load_consortium_key

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
