"""Robust and secure together: SecAgg+ inside random groups, a robust rule over group means."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedguard.client.app import make_client_app
from fedguard.core.aggregation_config import AggregatorConfig, AggregatorName
from fedguard.core.config import (
    CentralDPConfig,
    LocalDPConfig,
    RunConfig,
    SecureAggregationConfig,
)
from fedguard.core.errors import ConfigError
from fedguard.core.serialization import flatten_weights
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.server.app import make_server_app
from fedguard.server.orchestrator import FederatedRun, RoundRecord
from fedguard.simulation.attack_config import AttackConfig, AttackName
from fedguard.simulation.attacks import adversaries
from fedguard.simulation.inprocess import InProcessGrid, run_inprocess
from fedguard.wire import protocol
from tests.factories import consortium_roster, silo_settings, small_config

Mod = Callable[[Message, Context, ClientAppCallable], Message]
SILOS = 9


def _config(tmp_path: Path, groups: int, rule: AggregatorConfig, **secagg: object) -> RunConfig:
    config = small_config(
        tmp_path, num_clients=SILOS, num_rounds=2, local_dp=LocalDPConfig(enabled=False)
    )
    # Groups of 3 silos tolerate no dropout (README): these tests form them on purpose.
    secagg.setdefault("allow_no_dropout", groups > 0)
    return dataclasses.replace(
        config,
        secagg=SecureAggregationConfig(enabled=groups > 0, groups=max(groups, 1), **secagg),  # type: ignore[arg-type]
        aggregation=rule,
    )


def _client(
    tmp_path: Path, config: RunConfig, attack: AttackConfig | None, mods: list[Mod]
) -> object:
    byzantine = adversaries(attack, config) if attack is not None else {}
    return make_client_app(
        lambda c: silo_settings(
            tmp_path, int(c.node_config["partition-id"]), num_silos=config.num_clients
        ),
        allow_non_private=True,
        mods=mods,
        adversary_for=lambda settings: byzantine.get(settings.silo_id),
    )


def _run(
    tmp_path: Path,
    config: RunConfig,
    attack: AttackConfig | None = None,
    mods: list[Mod] | None = None,
) -> list[RoundRecord]:
    records: list[RoundRecord] = []
    roster = consortium_roster(tmp_path, config.num_clients)
    server = make_server_app(config, "groups", tmp_path / "run", records.append, roster=roster)
    run_inprocess(server, _client(tmp_path, config, attack, mods or []), config.num_clients)  # type: ignore[arg-type]
    return records


def _model(run_dir: Path, round_number: int) -> np.ndarray:
    arrays = CheckpointStore(run_dir / "checkpoints").load(round_number).arrays
    return flatten_weights({k: v for k, v in arrays.items() if k.startswith("weights/")})


MEAN = AggregatorConfig()
MEDIAN_F1 = AggregatorConfig(AggregatorName.MEDIAN, f=1)


def test_groups_partition_each_round_and_their_mean_equals_plain_fedavg(tmp_path: Path) -> None:
    plain_dir, grouped_dir = tmp_path / "plain", tmp_path / "grouped"
    _run(plain_dir, _config(plain_dir, 0, MEAN))
    records = _run(grouped_dir, _config(grouped_dir, 3, MEAN))
    for record in records[1:]:
        groups = record.aggregation["groups"]
        members = [m for g in groups for m in g["members"]]
        assert len(groups) == 3 and all(len(g["members"]) == 3 for g in groups)
        assert sorted(members) == sorted(f"silo-{i}" for i in range(SILOS))
        assert record.aggregation["rule"] == "secure-groups+weighted-mean"
        assert record.count("ok") == SILOS
    # Training is seeded, so both runs train the same updates; the groups' weighted means,
    # weighted again by their totals, are the plain weighted mean up to fixed-point rounding.
    np.testing.assert_allclose(
        _model(grouped_dir / "run", 1), _model(plain_dir / "run", 1), atol=1e-3
    )
    assert not np.allclose(_model(grouped_dir / "run", 1), _model(grouped_dir / "run", 0))


def test_the_group_assignment_is_public_seeded_randomness(tmp_path: Path) -> None:
    config = _config(tmp_path, 3, MEAN)
    grid = InProcessGrid(_client(tmp_path, config, None, []), SILOS)  # type: ignore[arg-type]
    run = FederatedRun(grid, config, "r", tmp_path / "run")
    nodes = sorted(grid.get_node_ids())
    first = run.secure_groups(1, nodes)
    assert first == FederatedRun(grid, config, "r", tmp_path / "run2").secure_groups(1, nodes)
    assert sorted(n for g in first for n in g) == nodes
    assert any(run.secure_groups(r, nodes) != first for r in range(2, 6))


def test_a_silo_that_does_not_clip_gets_its_group_flagged_and_left_out(tmp_path: Path) -> None:
    config = _config(tmp_path, 3, MEDIAN_F1, clip_norm=0.5)
    # One silo of nine; a boost of 50 takes its group's mean far over the bound.
    attack = AttackConfig(AttackName.SCALING, byzantine_fraction=0.12, strength=50.0)
    (byzantine,) = adversaries(attack, config)
    records = _run(tmp_path, config, attack)
    for record in records[1:]:
        flagged = record.aggregation["flagged-groups"]
        assert len(flagged) == 1, record.aggregation
        assert byzantine in flagged[0]["members"]
        assert flagged[0]["norm"] > 0.5
        assert record.aggregation["f-after-flags"] == 0
        assert len(record.aggregation["groups-used"]) == 2
        # The update applied is a median of honest, clipped group means.
    step = _model(tmp_path / "run", 1) - _model(tmp_path / "run", 0)
    assert np.linalg.norm(step) <= 0.5 + 1e-3


def test_one_group_aborting_leaves_the_others_to_aggregate(tmp_path: Path) -> None:
    config = _config(tmp_path, 3, MEAN)
    grid = InProcessGrid(_client(tmp_path, config, None, []), SILOS)  # type: ignore[arg-type]
    group = FederatedRun(grid, config, "r", tmp_path / "probe").secure_groups(
        1, sorted(grid.get_node_ids())
    )[0]
    partitions = {(node - 1000) // 7 for node in group[:2]}  # InProcessGrid's node ids

    def silent(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            message.metadata.message_type == protocol.SECAGG_SHARE
            and message.metadata.group_id == "1"
            and context.node_config["partition-id"] in partitions
        ):
            return Message(Error(code=0, reason="simulated dropout"), reply_to=message)
        return call_next(message, context)

    records = _run(tmp_path, dataclasses.replace(config, num_rounds=1), mods=[silent])
    record = records[1]
    statuses = {o.silo_id: o.status for o in record.outcomes}
    aborted = [g for g in record.aggregation["groups"] if "aborted" in g]
    assert len(aborted) == 1
    # The two silent members dropped at share-keys; the third was live when it aborted.
    assert sorted(statuses[m] for m in aborted[0]["members"]) == ["aborted", "dropout", "dropout"]
    assert record.count("ok") == 6
    assert record.aggregation["groups-used"] == [0, 1]
    assert not np.allclose(_model(tmp_path / "run", 1), _model(tmp_path / "run", 0))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"secagg": SecureAggregationConfig(enabled=True), "aggregation": MEDIAN_F1}, "single sum"),
        (
            {"secagg": SecureAggregationConfig(enabled=True, groups=4), "aggregation": MEAN},
            "need 12 silos",
        ),
        (
            {
                "central_dp": CentralDPConfig(enabled=True),
                "aggregation": MEDIAN_F1,
            },
            "central DP",
        ),
    ],
)
def test_configurations_that_cannot_be_robust_are_refused(
    tmp_path: Path, change: dict[str, object], match: str
) -> None:
    base = small_config(tmp_path, num_clients=SILOS)
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(base, **change)  # type: ignore[arg-type]


def test_groups_without_secure_aggregation_are_refused() -> None:
    with pytest.raises(ConfigError, match="which is off"):
        SecureAggregationConfig(groups=2)


def test_too_few_groups_for_the_rule_is_refused_before_any_round(tmp_path: Path) -> None:
    config = _config(tmp_path, 3, AggregatorConfig(AggregatorName.KRUM, f=1))
    grid = InProcessGrid(_client(tmp_path, config, None, []), SILOS)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs at least 5 secure groups"):
        FederatedRun(grid, config, "r", tmp_path / "run")
