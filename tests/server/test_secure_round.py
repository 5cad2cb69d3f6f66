"""SecAgg+ inside fedguard's rounds: real silo agents, real protocol, in-process engine."""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedguard.client.app import make_client_app
from fedguard.client.outbox import Outbox
from fedguard.core.config import RunConfig, SecureAggregationConfig
from fedguard.core.serialization import flatten_weights
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.server.app import make_server_app
from fedguard.server.orchestrator import RoundRecord
from fedguard.simulation.inprocess import run_inprocess
from fedguard.wire import protocol
from tests.factories import consortium_roster, silo_settings, small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def _secure(tmp_path: Path, **overrides: object) -> RunConfig:
    config = small_config(tmp_path, **overrides)
    # Three silos tolerate no dropout (README); these tests run them on purpose.
    return dataclasses.replace(
        config, secagg=SecureAggregationConfig(enabled=True, allow_no_dropout=True)
    )


def _run(tmp_path: Path, config: RunConfig, mods: list[Mod] | None = None) -> list[RoundRecord]:
    records: list[RoundRecord] = []
    roster = consortium_roster(tmp_path, config.num_clients)
    server = make_server_app(config, "secure-run", tmp_path / "run", records.append, roster=roster)
    client = make_client_app(
        lambda c: silo_settings(
            tmp_path, int(c.node_config["partition-id"]), num_silos=config.num_clients
        ),
        allow_non_private=True,
        mods=mods,
    )
    run_inprocess(server, client, config.num_clients)
    return records


def _silent_at(message_type: str, partitions: set[int]) -> Mod:
    """A Flower mod: the listed silos fail (an error reply) at one SecAgg stage."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            message.metadata.message_type == message_type
            and context.node_config["partition-id"] in partitions
        ):
            return Message(Error(code=0, reason="simulated dropout"), reply_to=message)
        return call_next(message, context)

    return mod


def _model(tmp_path: Path, round_number: int) -> np.ndarray:
    arrays = CheckpointStore(tmp_path / "run" / "checkpoints").load(round_number).arrays
    return flatten_weights({k: v for k, v in arrays.items() if k.startswith("weights/")})


def _expected_mean(tmp_path: Path, round_number: int, silos: list[int]) -> np.ndarray:
    """The plain weighted FedAvg of what the silos trained (their outboxes hold it)."""
    before = _model(tmp_path, round_number - 1)
    total, weight = np.zeros_like(before), 0.0
    for i in silos:
        sent = Outbox(tmp_path / f"silo-{i}").load("secure-run", round_number)
        assert sent is not None
        examples = sent.metrics["num-examples"]
        total += examples * (flatten_weights(sent.weights) - before)
        weight += examples
    return before + total / weight


def test_secure_round_equals_plain_fedavg_up_to_quantisation(tmp_path: Path) -> None:
    records = _run(tmp_path, _secure(tmp_path, num_rounds=2))
    for record in records[1:]:
        assert [o.status for o in record.outcomes] == ["ok", "ok", "ok"]
        assert record.aggregation["rule"] == "secagg+weighted-mean"
        # No per-silo clipped counts: they are a function of each silo's update.
        assert "secagg-clipped-values" not in record.aggregation
        assert record.evaluation.secure and record.evaluation.per_silo == {}
    for round_number in (1, 2):
        got = _model(tmp_path, round_number)
        want = _expected_mean(tmp_path, round_number, [0, 1, 2])
        # One quantisation step is 2c/(2^16 - 1) ≈ 1.5e-5; rounding is unbiased.
        np.testing.assert_allclose(got, want, atol=2e-5)
    # The secure evaluation pools every silo's test split (the loss after two DP rounds
    # is CSPRNG-noisy: whether it fell is no check of the secure sum).
    final = records[-1].evaluation
    assert final.contributors == 3 and final.num_examples == records[0].evaluation.num_examples


def test_a_silo_dropping_after_sharing_keys_is_unmasked_away(tmp_path: Path) -> None:
    # 5 silos, complete graph, t = 3: a sum needs t + 1 = 4 survivors, so one may drop.
    config = _secure(tmp_path, num_rounds=1, num_clients=5)
    records = _run(tmp_path, config, mods=[_silent_at(protocol.SECAGG_MASK, {0})])
    by_silo = {o.silo_id: o for o in records[1].outcomes}
    assert by_silo["silo-0"].status == "dropout"
    assert "masked-input" in by_silo["silo-0"].reason
    assert {by_silo[f"silo-{i}"].status for i in range(1, 5)} == {"ok"}
    want = _expected_mean(tmp_path, 1, [1, 2, 3, 4])
    np.testing.assert_allclose(_model(tmp_path, 1), want, atol=2e-5)


def test_below_threshold_aborts_the_round_and_the_next_round_runs(tmp_path: Path) -> None:
    calls = {"n": 0}

    def two_silos_vanish_in_round_one(
        message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if message.metadata.message_type == protocol.SECAGG_SETUP:
            calls["n"] += 1
            if calls["n"] <= 3 and context.node_config["partition-id"] in {1, 2}:
                return Message(Error(code=0, reason="offline"), reply_to=message)
        return call_next(message, context)

    records = _run(tmp_path, _secure(tmp_path, num_rounds=2), mods=[two_silos_vanish_in_round_one])
    first, second = records[1], records[2]
    by_silo = {o.silo_id: o for o in first.outcomes}
    # Every sampled silo with what it did: two failed at setup, the live one was aborted.
    assert by_silo["silo-0"].status == "aborted" and "at least t+1" in by_silo["silo-0"].reason
    for silo in ("silo-1", "silo-2"):
        assert by_silo[silo].status == "error" and "offline" in by_silo[silo].reason
        assert by_silo[silo].stage == "advertise-keys"
    assert "at least t+1" in first.aggregation["aborted"]
    assert first.failure and first.contributors == 0
    np.testing.assert_array_equal(_model(tmp_path, 1), _model(tmp_path, 0))  # nothing applied
    assert [o.status for o in second.outcomes] == ["ok", "ok", "ok"]


def test_secure_aggregation_composes_with_central_dp(tmp_path: Path) -> None:
    config = RunConfig.from_options(
        {
            **_secure(tmp_path, num_rounds=1).to_options(),
            "secagg": True,
            "central-dp": True,
            "central-clip-norm": 0.5,
            "central-noise-multiplier": 0.8,
        }
    )
    records = _run(tmp_path, config)
    assert records[1].aggregation["rule"] == "secagg+dp-fedavg"
    assert records[1].central_epsilon is not None and records[1].central_epsilon > 0
    assert all(o.metrics["secagg-weight"] == 1 for o in records[1].outcomes)
