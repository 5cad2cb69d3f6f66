"""Model families, a consortium's own model from a factory, and the architecture hash."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from torch import nn

from fedguard.client.app import make_client_app
from fedguard.client.policy import RefusalReason
from fedguard.core.config import ConfigError, DatasetName, ModelFamily, ModelSpec
from fedguard.core.datasets import schema_for
from fedguard.core.models import (
    ModelCheckError,
    architecture_hash,
    build_model,
    model_hash_for,
)
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus, RoundInstructions
from tests.factories import initial_weights, instruction, local_scaler, node_context, silo_settings

SCHEMA = schema_for(DatasetName.BREAST_CANCER)


def _factory(function: str) -> ModelSpec:
    return ModelSpec(family=ModelFamily.FACTORY, factory=f"tests.core.user_models:{function}")


OWN = "tests.core.user_models:wide_net"


def test_families_build_what_they_say() -> None:
    logistic = build_model(SCHEMA, ModelSpec(family=ModelFamily.LOGISTIC))
    assert [type(m) for m in logistic.modules() if isinstance(m, nn.Linear)] == [nn.Linear]
    mlp = build_model(SCHEMA, ModelSpec(hidden=(8,), family=ModelFamily.MLP))
    assert sum(isinstance(m, nn.Linear) for m in mlp.modules()) == 2
    cnn = build_model(schema_for(DatasetName.DIGITS), ModelSpec())
    assert any(isinstance(m, nn.Conv2d) for m in cnn.modules())


def test_a_factory_model_is_fixed_by_opacus_or_refused_with_its_reason() -> None:
    fixed = build_model(SCHEMA, _factory("batchnorm_net"))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    with pytest.raises(ModelCheckError, match=r"fails a per-sample-gradient pass .*\[30\]"):
        build_model(SCHEMA, _factory("wrong_width_net"))
    with pytest.raises(ModelCheckError, match=r"not a torch nn\.Module"):
        build_model(SCHEMA, _factory("not_a_module"))
    with pytest.raises(ModelCheckError, match="cannot import"):
        build_model(SCHEMA, ModelSpec(family=ModelFamily.FACTORY, factory="no_such_pkg.m:f"))
    with pytest.raises(ConfigError, match="go together"):
        ModelSpec(family=ModelFamily.FACTORY)
    with pytest.raises(ConfigError, match=r"package\.module:function"):
        ModelSpec(family=ModelFamily.FACTORY, factory="not a path")


def test_the_architecture_hash_sees_shapes_and_layers_not_values() -> None:
    a = build_model(SCHEMA, ModelSpec(hidden=(8,)))
    b = build_model(SCHEMA, ModelSpec(hidden=(8,)))
    assert architecture_hash(a) == architecture_hash(b)  # other random weights
    assert architecture_hash(a) != architecture_hash(build_model(SCHEMA, ModelSpec(hidden=(9,))))
    tanh = nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 2))
    relu = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2))
    assert architecture_hash(tanh) != architecture_hash(relu)  # same shapes, other layer


def _instruction_for(spec: ModelSpec) -> object:
    message = instruction(1, initial_weights(), local_scaler(silo_settings(Path("/tmp"), 0)))
    record = message.content.config_records[protocol.CONFIG]
    instructions = RoundInstructions.from_record(record)
    changed = dataclasses.replace(instructions, model=spec, model_hash=model_hash_for(SCHEMA, spec))
    message.content.config_records[protocol.CONFIG] = changed.to_record()
    return message


def _reply(tmp_path: Path, message: object, factory: str = "") -> tuple[ReplyStatus, str, str]:
    settings = dataclasses.replace(silo_settings(tmp_path, 0), model_factory=factory)
    reply = make_client_app(lambda _: settings)(message, node_context(0))  # type: ignore[arg-type]
    status, reason = protocol.reply_status(reply)
    return status, reason, str(reply.content.config_records[protocol.STATUS].get("refusal", ""))


def test_a_silo_builds_the_factory_from_its_own_config_and_checks_the_hash(
    tmp_path: Path,
) -> None:
    spec = ModelSpec(family=ModelFamily.FACTORY, factory=OWN)
    # The server's weights must fit the model: send the factory model's own.
    message = _instruction_for(spec)
    from fedguard.core.serialization import model_weights, weights_to_record

    model = build_model(SCHEMA, spec)
    message.content.array_records[protocol.ARRAYS] = weights_to_record(model_weights(model))  # type: ignore[attr-defined]
    status, reason, _ = _reply(tmp_path / "a", message, factory=OWN)
    assert status is ReplyStatus.OK, reason
    # No factory of its own: refused, nothing imported from the server's name.
    status, reason, refusal = _reply(tmp_path / "b", message)
    assert status is ReplyStatus.REFUSED and refusal == RefusalReason.MODEL_ARCHITECTURE.value
    # Another model of its own: the hashes differ, refused.
    status, reason, refusal = _reply(
        tmp_path / "c", message, factory="tests.core.user_models:batchnorm_net"
    )
    assert status is ReplyStatus.REFUSED and refusal == RefusalReason.MODEL_ARCHITECTURE.value


def test_a_server_lying_about_the_architecture_hash_is_refused(tmp_path: Path) -> None:
    message = _instruction_for(ModelSpec())
    record = message.content.config_records[protocol.CONFIG]  # type: ignore[attr-defined]
    record["model-hash"] = "0" * 64
    status, _, refusal = _reply(tmp_path, message)
    assert status is ReplyStatus.REFUSED and refusal == RefusalReason.MODEL_ARCHITECTURE.value
