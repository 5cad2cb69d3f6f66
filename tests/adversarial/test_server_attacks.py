"""Attacks 6, 7 and 8: what a whole run shows, driven in process with real silos.

6. Central DP claimed amplification by client sampling although who took part is
   derivable from the run seed (and written in the history), and had no budget.
7. Per-silo values in clear even with ``--secagg``: evaluation sums, training loss,
   clipped counts, feature statistics, kept per silo in history.json.
8. One silo sending a finite update of 1e38 destroyed the run under the weighted mean.

Each test uses only what the starting commit already had (RunConfig options,
``make_server_app``, ``run_inprocess``, ``simulate``), so it fails there on the
attack itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedguard.client.app import make_client_app
from fedguard.core.config import RunConfig
from fedguard.server.app import make_server_app
from fedguard.server.orchestrator import RoundRecord
from fedguard.simulation.inprocess import run_inprocess
from fedguard.simulation.runner import simulate
from fedguard.wire import protocol
from tests.factories import silo_settings, small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def _run(tmp_path: Path, config: RunConfig, mods: list[Mod] | None = None) -> list[RoundRecord]:
    records: list[RoundRecord] = []
    server = make_server_app(config, "attack", tmp_path / "run", records.append)
    client = make_client_app(
        lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"])),
        allow_non_private=True,
        mods=mods,
    )
    run_inprocess(server, client, config.num_clients)
    return records


def _central(tmp_path: Path, rounds: int, rate: float) -> RunConfig:
    # Local DP off keeps the run fast; central DP is what is under test.
    options = {
        **small_config(tmp_path, num_rounds=rounds).to_options(),
        "no-dp": True,
        "central-dp": True,
        "central-noise-multiplier": 1.0,
        "central-clip-norm": 1.0,
        "client-sampling-rate": rate,
        "central-delta": 1e-3,
    }
    return RunConfig.from_options(options)


def _unamplified_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """An independent figure: Gaussian mechanism composed ``rounds`` times, no sampling."""
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def test_central_dp_takes_no_amplification_from_a_published_seed(tmp_path: Path) -> None:
    records = _run(tmp_path, _central(tmp_path, rounds=3, rate=0.6))
    reported = records[-1].central_epsilon
    honest = _unamplified_epsilon(3, 1.0, 1e-3)
    assert reported is not None
    assert reported == pytest.approx(honest, rel=5e-3), (
        f"central ε {reported:.3f} reported for 3 rounds at z = 1; without amplification by "
        f"sampling (the cohorts are public) it is {honest:.3f}"
    )


def test_the_central_budget_stops_training(tmp_path: Path) -> None:
    # 7 rounds at q = 1, z = 1, δ = 1e-3: round 7 would take ε from 9.93 to 11.02.
    records = _run(tmp_path, _central(tmp_path, rounds=7, rate=1.0))
    spent = [r.central_epsilon for r in records if r.central_epsilon is not None]
    assert spent and max(spent) <= 10.0 + 1e-9, f"central ε ran to {max(spent):.3f} > 10"
    assert max(r.round for r in records) < 7


def _huge_update(partition: int) -> Mod:
    """Silo ``partition`` answers every train message with all weights 1e38 (finite)."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        is_train = message.metadata.message_type == protocol.TRAIN
        if is_train and int(str(context.node_config["partition-id"])) == partition:
            arrays = reply.content.array_records[protocol.ARRAYS]
            reply.content.array_records[protocol.ARRAYS] = ArrayRecord(
                {k: Array(np.full_like(v.numpy(), 1e38)) for k, v in arrays.items()}
            )
        return reply

    return mod


def test_one_silo_cannot_destroy_a_run_with_a_huge_finite_update(tmp_path: Path) -> None:
    records = _run(tmp_path, small_config(tmp_path, num_rounds=3), mods=[_huge_update(0)])
    assert [r.round for r in records] == [0, 1, 2, 3]
    for record in records[1:]:
        by_silo = {o.silo_id: o for o in record.outcomes}
        assert by_silo["silo-0"].status == "rejected", by_silo["silo-0"]
        assert record.aggregation["accepted"] == 2, record.aggregation
        assert np.isfinite(record.evaluation.loss)
    assert records[-1].evaluation.accuracy > 0.8


def _walk(document: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(document, dict):
        for key, value in document.items():
            yield f"{path}/{key}", value
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _walk(value, f"{path}/{index}")


def test_a_secagg_run_publishes_no_per_silo_metric(tmp_path: Path) -> None:
    options = {**small_config(tmp_path, num_rounds=1, run_name="secure").to_options()}
    # Three silos tolerate no dropout under SecAgg (README): allowed for this test.
    config = RunConfig.from_options({**options, "secagg": True, "secagg-allow-no-dropout": True})
    run_dir, _, _ = simulate(config, baseline=False, echo=lambda _: None)
    history = json.loads((run_dir / "dp" / "history.json").read_text())
    silo_ids = {f"silo-{i}" for i in range(config.num_clients)}
    per_silo_metrics = {"loss", "accuracy", "auc", "loss-sum", "correct", "train-loss"}
    found = []
    for path, value in _walk(history):
        leaf = path.rsplit("/", 1)[-1]
        if "clipped" in leaf or (leaf in {"train_loss", "train-loss", "per_silo"} and value):
            found.append(path)
        if isinstance(value, dict) and leaf in silo_ids and set(value) & per_silo_metrics:
            found.append(path)
        if leaf == "metrics" and isinstance(value, dict) and set(value) & per_silo_metrics:
            found.append(path)
    assert not found, f"per-silo values in the history of a --secagg run: {found[:8]}"
