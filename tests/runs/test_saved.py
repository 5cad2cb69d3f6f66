"""The run folder's owner: layout names, checkpoint encoding, the one config form."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedguard.core.config import PartitionKind, PartitionSpec, RunConfig
from fedguard.core.errors import CheckpointError, ConfigError, RunFolderError
from fedguard.core.options import float_text
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.trust_config import TrustConfig
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.runs.layout import RunFolder, VariantFolder, silo_id, silo_index
from fedguard.runs.saved import load_saved_run


def _scaler() -> FeatureScaler:
    return FeatureScaler(mean=np.array([0.5, -1.0]), scale=np.array([2.0, 0.25]))


def _weights() -> OrderedDict[str, np.ndarray]:
    return OrderedDict(
        [("layer.weight", np.arange(6.0).reshape(2, 3)), ("layer.bias", np.array([1.0, 2.0]))]
    )


@pytest.mark.parametrize(
    "config",
    [
        RunConfig(),
        # Lost digits before: PartitionSpec.__str__ wrote alpha with ``:g``.
        RunConfig(partition=PartitionSpec(PartitionKind.DIRICHLET, alpha=0.123456789)),
        # And fairness bands likewise.
        RunConfig(trust=TrustConfig(fairness_attribute="age", fairness_bands=(40.123456, 65.5))),
    ],
    ids=["default", "dirichlet-alpha", "fairness-bands"],
)
def test_a_config_survives_its_option_form(config: RunConfig) -> None:
    options = json.loads(json.dumps(config.to_options()))  # as a checkpoint stores it
    assert RunConfig.from_options(options) == config


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_text_parses_back_to_the_same_float(value: float) -> None:
    assert float(float_text(value)) == value


def test_a_checkpoint_gives_back_the_model_and_scaler_it_was_saved_with(tmp_path: Path) -> None:
    store = CheckpointStore(VariantFolder(tmp_path).checkpoints)
    store.save_model(3, _weights(), _scaler(), {"run_id": "r"})
    checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.round == 3
    weights = checkpoint.weights()
    assert list(weights) == list(_weights())  # order kept: load_weights needs it
    for name, value in _weights().items():
        np.testing.assert_array_equal(weights[name], value)
    np.testing.assert_array_equal(checkpoint.scaler().mean, _scaler().mean)
    np.testing.assert_array_equal(checkpoint.scaler().scale, _scaler().scale)


def test_a_checkpoint_without_a_scaler_is_a_typed_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, {"weights/w": np.ones(2)}, {})
    checkpoint = store.load(1)
    with pytest.raises(CheckpointError, match="scaler"):
        checkpoint.scaler()


def test_silo_ids_and_indices_are_inverse() -> None:
    assert [silo_id(i) for i in range(3)] == ["silo-0", "silo-1", "silo-2"]
    assert silo_index("silo-12") == 12
    for bad in ("silo-", "hospital-a", "silo-01", "silo--1"):
        with pytest.raises(ConfigError):
            silo_index(bad)
    with pytest.raises(ConfigError):
        silo_id(-1)


def test_variants_present_in_reading_order(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    assert run.variants_present() == []
    run.variant("no-dp").checkpoints.mkdir(parents=True)
    run.variant("dp").checkpoints.mkdir(parents=True)
    assert run.variants_present() == ["dp", "no-dp"]
    with pytest.raises(ConfigError):
        run.variant("central")


def _saved_folder(root: Path, config: RunConfig) -> Path:
    run = RunFolder(root)
    run.report.parent.mkdir(parents=True, exist_ok=True)
    run.report.write_text("{}")
    store = CheckpointStore(run.variant("dp").checkpoints)
    store.save_model(1, _weights(), _scaler(), {"run_id": "x/dp", "config": config.to_options()})
    return root


def test_a_saved_run_reads_its_config_from_the_checkpoint(tmp_path: Path) -> None:
    config = dataclasses.replace(
        RunConfig(), partition=PartitionSpec(PartitionKind.DIRICHLET, alpha=0.3)
    )
    saved = load_saved_run(_saved_folder(tmp_path / "run", config))
    assert saved.config == config and saved.variant == "dp" and saved.run_id == "x/dp"
    assert saved.silo_dir("silo-1") == tmp_path / "run" / "dp" / "silos" / "silo-1"
    assert list(saved.teacher_weights) == list(_weights())


def test_a_saved_run_with_a_bad_config_is_a_run_folder_error(tmp_path: Path) -> None:
    root = _saved_folder(tmp_path / "run", RunConfig())
    state_file = next((root / "dp" / "checkpoints").glob("round-*.json"))
    data = json.loads(state_file.read_text())
    data["state"]["config"]["rounds"] = -2
    state_file.write_text(json.dumps(data))
    with pytest.raises(RunFolderError, match="config"):
        load_saved_run(root)
    with pytest.raises(RunFolderError, match="no-dp"):
        load_saved_run(root, "no-dp")
