from pathlib import Path

import pytest

from fedguard.core.config import (
    CentralDPConfig,
    DatasetName,
    Engine,
    LocalTrainingConfig,
    PartitionKind,
    PartitionSpec,
    PrivacyBudget,
    RunConfig,
)
from fedguard.core.errors import ConfigError, UnknownDatasetError


def test_options_round_trip_is_identity() -> None:
    config = RunConfig(num_clients=3, seed=9, out=Path("x"), engine=Engine.INPROCESS)
    assert RunConfig.from_options(config.to_options()) == config


@pytest.mark.parametrize("epsilon", [0, -1, float("nan"), float("inf")])
def test_non_positive_or_non_finite_epsilon_is_refused(epsilon: float) -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        PrivacyBudget(epsilon, 1e-5)
    with pytest.raises(ConfigError, match="epsilon"):
        RunConfig.from_options({"target-epsilon": epsilon})


@pytest.mark.parametrize("delta", [0, 1, -0.1, 2])
def test_delta_outside_unit_interval_is_refused(delta: float) -> None:
    with pytest.raises(ConfigError, match="delta"):
        PrivacyBudget(1.0, delta)


def test_unknown_option_is_an_error_not_ignored() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        RunConfig.from_options({"target-epsilom": 3})


def test_unknown_dataset_names_the_known_ones() -> None:
    with pytest.raises(UnknownDatasetError, match="flchain"):
        DatasetName.parse("mnist")
    with pytest.raises(UnknownDatasetError):
        RunConfig.from_options({"dataset": "mnist"})


@pytest.mark.parametrize(
    ("text", "kind", "alpha", "column"),
    [
        ("iid", PartitionKind.IID, None, None),
        ("dirichlet:0.5", PartitionKind.DIRICHLET, 0.5, None),
        ("column:sex", PartitionKind.COLUMN, None, "sex"),
    ],
)
def test_partition_parse(
    text: str, kind: PartitionKind, alpha: float | None, column: str | None
) -> None:
    spec = PartitionSpec.parse(text)
    assert (spec.kind, spec.alpha, spec.column) == (kind, alpha, column)
    assert str(spec) == text


@pytest.mark.parametrize(
    "text", ["dirichlet", "dirichlet:x", "dirichlet:-1", "column:", "iid:3", "zipf"]
)
def test_bad_partition_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        PartitionSpec.parse(text)


@pytest.mark.parametrize(
    "options",
    [
        {"clients": 0},
        {"rounds": 0},
        {"local-epochs": 0},
        {"batch-size": 0},
        {"learning-rate": -0.1},
        {"test-fraction": 1.0},
        {"optimizer": "lbfgs"},
        {"grad-sample-mode": "magic"},
        {"hidden": "64,x"},
        {"clients": "three"},
        {"no-dp": "maybe"},
        {"central-dp": True, "client-sampling-rate": 0},
    ],
)
def test_bad_values_raise_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RunConfig.from_options(options)


def test_configs_are_frozen() -> None:
    config = LocalTrainingConfig()
    with pytest.raises(AttributeError):
        config.batch_size = 3  # type: ignore[misc]


def test_disabled_central_dp_skips_validation() -> None:
    assert not CentralDPConfig(enabled=False, client_sampling_rate=0.0).enabled
