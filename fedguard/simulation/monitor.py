"""``fedguard monitor``: drift monitoring rounds against a finished simulated run.

Loads the run variant's last checkpoint (model, scaler, configuration) and its
drift reference, rebuilds the same simulated silos (same state folders, so the
same privacy ledgers pay for the monitoring releases) and runs monitoring rounds
on the in-process engine. Drift can be injected into chosen silos from a chosen
round on: their features are shifted by ``shift`` standard deviations of the
federated scaler (raw units ``shift × scale``) before they summarize them, which
shows whether, and after how many rounds, the monitor alerts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedguard.client.app import make_client_app
from fedguard.client.silo import SiloDataSource, SiloSettings, SimulatedSiloSource
from fedguard.core.checks import positive_int
from fedguard.core.config import RunConfig
from fedguard.core.contract import DataContract
from fedguard.core.datasets import EncodedData, SiloData, schema_for
from fedguard.core.errors import ConfigError, DataError
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.serialization import ModelWeights
from fedguard.core.silos import PooledData
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.runs.layout import VariantFolder, silo_id
from fedguard.server.post_training import FinalModel
from fedguard.server.secure_round import secagg_identities
from fedguard.server.statistic_collection import grid_send
from fedguard.simulation.identities import load_roster, silo_identity
from fedguard.simulation.inprocess import run_inprocess
from fedguard.trust.phase import (
    DriftReference,
    monitor_drift,
    record_monitoring,
    trust_instruction,
)
from fedguard.trust.results import DriftResult, read_trust_results
from fedguard.trust.silo_statistics import SILO_AND_TRUST_PRODUCERS

__all__ = ["DriftedSiloSource", "MonitoringRun", "drift_shift", "load_run", "simulate_monitoring"]


@dataclass(frozen=True)
class DriftedSiloSource:
    """A simulated silo whose inputs drifted: ``shift`` (raw units) added to every row."""

    inner: SiloDataSource
    shift: tuple[float, ...]

    @property
    def contract(self) -> DataContract:
        return self.inner.contract

    def load(self) -> SiloData:
        silo = self.inner.load()
        delta = np.asarray(self.shift, dtype=np.float64)
        if delta.shape != (silo.schema.num_features,):
            raise DataError(f"a shift of {delta.shape} values for {silo.schema.num_features}")

        def moved(part: EncodedData) -> EncodedData:
            return EncodedData(part.features + delta[None, :], part.labels)

        return dataclasses.replace(silo, train=moved(silo.train), test=moved(silo.test))


def drift_shift(
    scaler: FeatureScaler, contract: DataContract, k: float, features: Sequence[str] | None
) -> tuple[float, ...]:
    """``k`` standard deviations (the federated scaler's) of the chosen features, raw units.

    ``features`` None: every standardized feature.
    """
    schema = schema_for(contract)
    chosen = set(features) if features else None
    if chosen is not None and not chosen <= set(schema.feature_names):
        raise ConfigError(
            f"unknown feature(s) {sorted(chosen - set(schema.feature_names))}; the "
            f"{contract.name} features are {list(schema.feature_names)}"
        )
    return tuple(
        float(k * scaler.scale[j])
        if (chosen is None and schema.standardize[j]) or (chosen is not None and name in chosen)
        else 0.0
        for j, name in enumerate(schema.feature_names)
    )


@dataclass(frozen=True)
class MonitoringRun:
    config: RunConfig
    run_id: str
    weights: ModelWeights
    scaler: FeatureScaler


def load_run(run_dir: Path) -> MonitoringRun:
    """The configuration, run id, final model and scaler of a finished run variant."""
    checkpoint = CheckpointStore(VariantFolder(Path(run_dir)).checkpoints).latest()
    if checkpoint is None:
        raise ConfigError(f"{run_dir} holds no checkpoints: give a run variant's folder")
    config = RunConfig.from_options(checkpoint.state["config"])
    weights, scaler = checkpoint.weights(), checkpoint.scaler()
    return MonitoringRun(config, str(checkpoint.state["run_id"]), weights, scaler)


def _next_query_round(run_dir: Path) -> int:
    results = read_trust_results(run_dir)
    done = sum(1 for d in results.drift if d.label != "reference") if results is not None else 0
    return done + 1


def simulate_monitoring(
    run_dir: Path,
    rounds: int = 1,
    drift_silos: Sequence[int] = (),
    shift: float = 0.0,
    features: Sequence[str] | None = None,
    start: int = 1,
    threshold: float | None = None,
) -> list[DriftResult]:
    """Run ``rounds`` monitoring rounds; silos in ``drift_silos`` drift from round ``start``.

    Rounds are numbered on from those the run already monitored; each result is
    appended to ``trust.json`` and ``trust-log.jsonl``.
    """
    positive_int("rounds", rounds)
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    config = run.config
    unknown = sorted(set(drift_silos) - set(range(config.num_clients)))
    if unknown:
        raise ConfigError(f"drift silos {unknown} outside 0..{config.num_clients - 1}")
    reference = DriftReference.load(run_dir)
    roster = load_roster(run_dir)  # the run's signed SecAgg roster
    moved = drift_shift(run.scaler, config.contract, shift, features)
    first = _next_query_round(run_dir)
    state = {"round": first}

    def settings(context: Context) -> SiloSettings:
        index = int(str(context.node_config["partition-id"]))
        source: SiloDataSource = SimulatedSiloSource(
            PooledData.for_run(config),
            config.num_clients,
            config.partition,
            index,
            config.test_fraction,
            config.seed,
        )
        if index in drift_silos and state["round"] - first + 1 >= start:
            source = DriftedSiloSource(source, moved)
        return SiloSettings(
            silo_id=silo_id(index),
            state_dir=VariantFolder(run_dir).silo(silo_id(index)),
            budget=config.budget,
            data=source,
            identity=silo_identity(run_dir, silo_id(index)),
        )

    results: list[DriftResult] = []
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        nodes = sorted(grid.get_node_ids())
        instruction = trust_instruction(config, run.run_id, run.weights, run.scaler)
        silo_ids: dict[int, str] = {}
        for query_round in range(first, first + rounds):
            state["round"] = query_round
            send = grid_send(grid, f"monitor-{query_round}")
            identities = secagg_identities(roster, silo_ids, nodes, send)
            final = FinalModel(
                send=send,
                nodes=nodes,
                config=config,
                run_dir=run_dir,
                instruction=instruction,
                silo_name=lambda node: silo_ids.get(node, f"node-{node}"),
                identities=identities,
            )
            result = monitor_drift(final, reference, query_round, threshold=threshold)
            record_monitoring(run_dir, result)
            results.append(result)

    client = make_client_app(settings, allow_non_private=True, producers=SILO_AND_TRUST_PRODUCERS)
    run_inprocess(app, client, config.num_clients)
    return results
