import pytest
import torch
from opacus.validators import ModuleValidator

from fedguard.core.config import DatasetName, ModelSpec
from fedguard.core.datasets import schema_for
from fedguard.core.errors import ConfigError
from fedguard.core.models import SmallCNN, TabularMLP, build_model, count_parameters


@pytest.mark.parametrize("name", list(DatasetName))
def test_each_dataset_gets_a_model_opacus_accepts(name: DatasetName) -> None:
    schema = schema_for(name)
    model = build_model(schema, ModelSpec())
    assert ModuleValidator.validate(model, strict=False) == []  # no BatchNorm, all supported
    logits = model(torch.zeros((3, *schema.input_shape)))
    assert logits.shape == (3, schema.num_classes)


def test_image_data_gets_the_cnn_and_tables_the_mlp() -> None:
    assert isinstance(build_model(schema_for(DatasetName.DIGITS), ModelSpec()), SmallCNN)
    mlp = build_model(schema_for(DatasetName.FLCHAIN), ModelSpec(hidden=(8,)))
    assert isinstance(mlp, TabularMLP)
    d = schema_for(DatasetName.FLCHAIN).num_features
    assert count_parameters(mlp) == d * 8 + 8 + 8 * 2 + 2


def test_groupnorm_not_batchnorm() -> None:
    cnn = build_model(schema_for(DatasetName.DIGITS), ModelSpec())
    kinds = {type(m) for m in cnn.modules()}
    assert torch.nn.GroupNorm in kinds
    assert not any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds)


def test_cnn_needs_an_image_shape() -> None:
    with pytest.raises(ConfigError):
        SmallCNN((64,), 10)
