"""The TOML files fedguard hands to Flower: a silo's node config and a run's app bundle."""

import tomllib
from pathlib import Path

from fedguard.core.config import DatasetName, PrivacyBudget, RunConfig
from fedguard.deploy.bundles import node_config_toml, write_app


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
    assert settings.data.contract.name == DatasetName.BREAST_CANCER.value
    assert parsed["signing-key"] == str(tmp_path / "node.key")
    assert parsed["data-path"] == str(data)


def test_generated_app_carries_the_whole_run_config(tmp_path: Path) -> None:
    options = RunConfig().to_options()
    path = write_app(tmp_path / "app", options)
    project = tomllib.loads(path.read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedguard.apps.server:server_app",
        "clientapp": "fedguard.apps.silo:client_app",
    }
    assert RunConfig.from_options(app["config"]) == RunConfig.from_options(options)
    assert list(path.parent.iterdir()) == [path]  # no code in the bundle


def test_flower_accepts_the_generated_app(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    path = write_app(tmp_path / "app", RunConfig().to_options())
    config, warnings = load_and_validate(path)
    assert config is not None, warnings
