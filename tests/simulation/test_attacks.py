"""Byzantine silos: the attacks' formulas, their configuration, and what a silo sends."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from flwr.app import Message

from fedguard.client.app import SiloAgent
from fedguard.client.secure import update_delta
from fedguard.core.config import LocalDPConfig
from fedguard.core.errors import ConfigError
from fedguard.core.seeding import derive_seed
from fedguard.core.serialization import flatten_weights
from fedguard.simulation.attack_config import AttackConfig, AttackName
from fedguard.simulation.attacks import (
    ByzantineSilo,
    _scaled,
    _trained_delta,
    adversaries,
    alie_z,
    craft_alie,
    craft_ipm,
    craft_sign_flip,
    stamp_trigger,
    trigger_features,
)
from tests.factories import (
    initial_weights,
    instruction,
    local_scaler,
    silo_settings,
    small_config,
)


def test_alie_z_follows_baruch_et_al() -> None:
    # n = 50, f = 12: s = floor(26) - 12 = 14, z = Phi^-1(36 / 50).
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))
    # n = 20, f = 4: s = 11 - 4 = 7, z = Phi^-1(13 / 20).
    assert alie_z(20, 4) == pytest.approx(0.38532, abs=1e-5)


def test_crafted_updates() -> None:
    benign = np.array([[1.0, 2.0], [3.0, 2.0]])
    np.testing.assert_allclose(craft_sign_flip(benign, 4.0), [-8.0, -8.0])
    np.testing.assert_allclose(craft_ipm(benign, 0.1), [-0.2, -0.2])
    np.testing.assert_allclose(craft_alie(benign, 1.0), [2.0 - 1.0, 2.0 - 0.0])


def test_trigger_sets_the_last_features_only() -> None:
    rows = np.zeros((3, 64), dtype=np.float32)
    stamped = stamp_trigger(rows)
    assert list(trigger_features(64)) == [60, 61, 62, 63]
    assert (stamped[:, 60:] == 3.0).all() and (stamped[:, :60] == 0).all()
    assert (rows == 0).all()  # a copy


def test_byzantine_silos_are_a_seeded_minority() -> None:
    attack = AttackConfig(AttackName.SIGN_FLIP, 0.2)
    chosen = attack.byzantine_indices(20, seed=3)
    assert len(chosen) == 4 and chosen == attack.byzantine_indices(20, seed=3)
    assert chosen != attack.byzantine_indices(20, seed=4)
    with pytest.raises(ConfigError, match="not a minority"):
        AttackConfig(AttackName.SIGN_FLIP, 0.45).byzantine_indices(4, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"byzantine_fraction": 0.5}, r"\(0, 0.5\)"),
        ({"strength": -1.0}, "strength"),
        ({"name": AttackName.ALIE, "collusion": False}, "collusion"),
        ({"poison_fraction": 0.0}, "poison"),
    ],
)
def test_attack_config_refuses_bad_settings(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"name": AttackName.SIGN_FLIP, "byzantine_fraction": 0.2}
    with pytest.raises(ConfigError, match=match):
        AttackConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_options_round_trip() -> None:
    attack = AttackConfig(AttackName.BACKDOOR, 0.1, collusion=False, strength=5.0)
    assert AttackConfig.from_options(attack.to_options()) == attack
    with pytest.raises(ConfigError, match="unknown attack"):
        AttackConfig.from_options({"attack": "bit-flip"})


def _message(tmp_path: Path) -> Message:
    return instruction(
        1,
        initial_weights(),
        local_scaler(silo_settings(tmp_path, 0)),
        dp=LocalDPConfig(enabled=False),
    )


def test_colluding_sign_flip_sends_minus_s_times_the_colluders_mean(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    attack = AttackConfig(AttackName.SIGN_FLIP, 0.3, strength=2.0)
    ((silo_id, adversary),) = adversaries(attack, config).items()
    index = int(silo_id.removeprefix("silo-"))
    agent = SiloAgent(silo_settings(tmp_path, index), allow_non_private=True, adversary=adversary)
    message = _message(tmp_path)
    update = agent.round_update(message)
    sent = update_delta(update.global_weights, update.weights)
    # The colluders' honest update, recomputed independently.
    instructions = agent.instructions(message)
    silo = agent.settings.data.load()
    seed = derive_seed(instructions.seed, "attack-benign", index, instructions.round)
    honest = _trained_delta(
        instructions,
        update.global_weights,
        silo,
        _scaled(silo, agent.scaler(message), train=True),
        seed,
    )
    np.testing.assert_allclose(sent, -2.0 * honest, rtol=1e-5, atol=1e-6)
    assert ByzantineSilo.skips_clipping


def test_scaling_boosts_a_label_flipped_update(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    attack = AttackConfig(AttackName.SCALING, 0.3)
    ((silo_id, adversary),) = adversaries(attack, config).items()
    agent = SiloAgent(
        silo_settings(tmp_path, int(silo_id.removeprefix("silo-"))),
        allow_non_private=True,
        adversary=adversary,
    )
    update = agent.round_update(_message(tmp_path))
    sent = flatten_weights(update.weights) - flatten_weights(update.global_weights)
    assert adversary.strength == 3.0  # γ = the number of silos
    honest = agent.local_update(_message(tmp_path))
    honest_norm = np.linalg.norm(update_delta(honest.global_weights, honest.weights))
    assert np.linalg.norm(sent) > 2.0 * honest_norm


def test_backdoor_stamps_a_share_of_the_examples(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    attack = AttackConfig(AttackName.BACKDOOR, 0.3, poison_fraction=0.5, backdoor_target=1)
    adversary = next(iter(adversaries(attack, config).values()))
    silo = silo_settings(tmp_path, 0).data.load()
    data = _scaled(silo, local_scaler(silo_settings(tmp_path, 0)), train=True)
    poisoned = adversary._poisoned(data, silo, seed=1)
    stamped = (poisoned.features[:, trigger_features(data.features.shape[1])] == 3.0).all(axis=1)
    assert 0.3 < stamped.mean() < 0.7
    assert (poisoned.labels[stamped] == 1).all()
    np.testing.assert_array_equal(poisoned.labels[~stamped], data.labels[~stamped])
