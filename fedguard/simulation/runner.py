"""``fedguard simulate``: a consortium of silos on one machine.

The same ServerApp and ClientApp code as a deployment, on Flower's Ray
simulation engine (or fedguard's in-process engine). Each virtual silo holds one
part of a seeded partition of a built-in data set, a state directory with its
own persistent privacy ledger, and its own held-out test split.

A run folder holds one or two variants of the run: ``dp`` (local DP-SGD) and
``no-dp`` (the same everything else, without DP), plus the report. Each variant
makes its consortium's SecAgg identities first (a roster key, one identity key
per silo, the signed roster: :mod:`fedguard.simulation.identities`), so secure
aggregation and the trust layer's statistics run authenticated, as deployed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedguard.aggregation.aggregators import Aggregator
from fedguard.client.app import make_client_app
from fedguard.client.policy import SiloPolicy
from fedguard.client.silo import SiloSettings, SimulatedSiloSource
from fedguard.core.config import Engine, NoiseSource, RunConfig
from fedguard.core.datasets import SiloData
from fedguard.core.errors import InfeasibleBudgetError
from fedguard.core.silos import PooledData, simulation_silos
from fedguard.privacy.analysis.dp_sgd import calibrate_noise_multiplier, poisson_schedule
from fedguard.privacy.ledger import PrivacyLedger
from fedguard.runs.layout import VariantFolder, silo_id
from fedguard.server.app import make_server_app
from fedguard.server.orchestrator import RoundRecord
from fedguard.server.secure_round import check_dropout_tolerance
from fedguard.simulation.attacks import AttackConfig, adversaries
from fedguard.simulation.identities import provision_identities, silo_identity
from fedguard.simulation.inprocess import run_inprocess
from fedguard.trust.phase import trust_phase
from fedguard.trust.silo_statistics import SILO_AND_TRUST_PRODUCERS

log = logging.getLogger(__name__)

Printer = Callable[[str], None]


@dataclass(frozen=True)
class SiloPlan:
    """What a silo will hold and spend, known before the engine starts."""

    silo_id: str
    train_examples: int
    test_examples: int
    positive_rate: float | None
    sample_rate: float | None
    steps_per_round: int | None
    noise_multiplier: float | None


@dataclass(frozen=True)
class VariantResult:
    """One variant (``dp`` or ``no-dp``) of a simulated run."""

    name: str
    config: RunConfig
    run_dir: Path
    history: list[dict[str, Any]]
    ledgers: dict[str, list[dict[str, Any]]]
    seconds: float
    # How the run ended (outcome.json: status completed/degraded/failed/stopped, reasons).
    outcome: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def plan_silos(config: RunConfig) -> tuple[list[SiloData], list[SiloPlan]]:
    """Partition the data and, with DP, calibrate each silo's σ: fails fast on bad input.

    The silos calibrate again themselves when the run starts (the server never
    sets a silo's noise); this pre-flight only reports errors before any engine
    starts: an empty silo, a budget too small for one round.
    """
    silos = simulation_silos(
        PooledData.for_run(config),
        config.num_clients,
        config.partition,
        config.test_fraction,
        config.seed,
    )
    plans = []
    for index, silo in enumerate(silos):
        positive = float(silo.train.labels.mean()) if silo.schema.num_classes == 2 else None
        q = steps = sigma = None
        if config.local_dp.enabled:
            q, steps = poisson_schedule(
                len(silo.train), config.training.batch_size, config.training.local_epochs
            )
            try:
                sigma = calibrate_noise_multiplier(
                    sample_rate=q,
                    steps_per_round=steps,
                    rounds=config.num_rounds,
                    target_epsilon=config.budget.epsilon,
                    delta=config.budget.delta,
                    max_noise_multiplier=config.local_dp.max_noise_multiplier,
                )
            except InfeasibleBudgetError as too_small:
                raise InfeasibleBudgetError(f"{silo_id(index)}: {too_small}") from None
        plans.append(
            SiloPlan(silo_id(index), len(silo.train), len(silo.test), positive, q, steps, sigma)
        )
    return silos, plans


def simulated_silo_policy(config: RunConfig) -> SiloPolicy:
    """The policy each simulated silo holds: the deployed defaults, the run's noise source.

    Seeded noise is research mode: the ledger plans and the report say the ε is not
    a guarantee against the server.
    """
    seeded = config.local_dp.noise_source is NoiseSource.SEEDED
    return SiloPolicy(
        noise_source=config.local_dp.noise_source,
        research_mode=seeded,
        max_noise_multiplier=config.local_dp.max_noise_multiplier,
        max_clip_norm=max(SiloPolicy.max_clip_norm, config.local_dp.max_grad_norm),
    )


def _client_settings(config: RunConfig, run_dir: Path) -> Callable[[Context], SiloSettings]:
    policy = simulated_silo_policy(config)

    def resolve(context: Context) -> SiloSettings:
        index = int(str(context.node_config["partition-id"]))
        return SiloSettings(
            silo_id=silo_id(index),
            state_dir=VariantFolder(run_dir).silo(silo_id(index)),
            budget=config.budget,
            data=SimulatedSiloSource(
                data=PooledData.for_run(config),
                num_silos=config.num_clients,
                partition=config.partition,
                index=index,
                test_fraction=config.test_fraction,
                seed=config.seed,
            ),
            policy=policy,
            # The silo's SecAgg identity key and the consortium key, from its own files.
            identity=silo_identity(run_dir, silo_id(index)),
        )

    return resolve


def run_variant(
    config: RunConfig,
    name: str,
    run_dir: Path,
    on_round: Callable[[RoundRecord], None] | None = None,
    attack: AttackConfig | None = None,
    aggregator: Aggregator | None = None,
) -> VariantResult:
    """Run one variant on the configured engine and read back its history and ledgers.

    With ``attack``, the Byzantine silos it draws run :class:`ByzantineSilo`
    adversaries in the same ClientApp (simulation only).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    history: list[RoundRecord] = []

    def record(round_record: RoundRecord) -> None:
        history.append(round_record)
        if on_round is not None:
            on_round(round_record)

    run_id = f"{run_dir.parent.name}/{name}"
    # Authenticated SecAgg: keys and a signed roster, as `fedguard ca sign-roster` makes.
    roster = provision_identities(run_dir, [silo_id(i) for i in range(config.num_clients)])
    server_app = make_server_app(
        config,
        run_id,
        run_dir,
        record,
        aggregator=aggregator,
        roster=roster,
        post_training=trust_phase,
    )
    byzantine = adversaries(attack, config) if attack is not None else {}
    client_app = make_client_app(
        _client_settings(config, run_dir),
        allow_non_private=True,
        adversary_for=lambda settings: byzantine.get(settings.silo_id),
        producers=SILO_AND_TRUST_PRODUCERS,
    )
    started = time.monotonic()
    if config.engine is Engine.INPROCESS:
        run_inprocess(server_app, client_app, config.num_clients)
    else:
        _run_on_ray(server_app, client_app, config.num_clients)
    seconds = time.monotonic() - started
    return VariantResult(
        name=name,
        config=config,
        run_dir=run_dir,
        history=[r.to_dict() for r in history],
        ledgers=read_ledgers(config, run_dir) if config.local_dp.enabled else {},
        seconds=seconds,
        outcome=read_outcome(run_dir),
    )


def read_outcome(run_dir: Path) -> dict[str, Any] | None:
    """The run's outcome the server wrote (``outcome.json``), None if it wrote none."""
    path = VariantFolder(run_dir).outcome
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def _run_on_ray(server_app: Any, client_app: Any, num_clients: int) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    cpus = os.cpu_count() or 1
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={
            # One CPU per virtual silo (Flower's default is two, which on a 2-core
            # machine runs one silo at a time).
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
        },
    )


def read_ledgers(config: RunConfig, run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each silo's ledger entries, straight from its SQLite file (the authority on ε)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for index in range(config.num_clients):
        state_dir = VariantFolder(run_dir).silo(silo_id(index))
        if not (state_dir / PrivacyLedger.FILENAME).exists():
            out[silo_id(index)] = []
            continue
        with PrivacyLedger.open(state_dir, silo_id(index), config.budget) as ledger:
            out[silo_id(index)] = [
                {
                    "run_id": e.run_id,
                    "round": e.round,
                    "purpose": e.purpose.value,
                    "epsilon_after": e.epsilon_after,
                    "status": e.status.value,
                    **e.event.to_json(),
                }
                for e in ledger.entries()
            ]
    return out


def default_run_name(config: RunConfig) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return config.run_name or f"{config.data_name}-{stamp}"


def simulate(
    config: RunConfig,
    *,
    baseline: bool = True,
    echo: Printer = print,
    on_round: Callable[[str, RoundRecord], None] | None = None,
    attack: AttackConfig | None = None,
) -> tuple[Path, list[VariantResult], list[SiloPlan]]:
    """Run the configured variant and, with ``baseline``, its non-private twin."""
    run_dir = config.out / default_run_name(config)
    if run_dir.exists() and any(run_dir.iterdir()):
        from fedguard.core.errors import ConfigError

        raise ConfigError(f"run folder {run_dir} exists and is not empty; pick another --run-name")
    check_dropout_tolerance(config)  # before any engine starts
    _, plans = plan_silos(config)
    variants: list[tuple[str, RunConfig]] = []
    if config.local_dp.enabled:
        variants.append(("dp", config))
        if baseline:
            no_dp = dataclasses.replace(
                config, local_dp=dataclasses.replace(config.local_dp, enabled=False)
            )
            variants.append(("no-dp", no_dp))
    else:
        variants.append(("no-dp", config))
    results = []
    for name, variant_config in variants:
        echo(
            f"--- {name}: {variant_config.num_clients} silos, {variant_config.num_rounds} rounds, "
            f"engine {variant_config.engine.value} ---"
        )

        def forward(record: RoundRecord, variant: str = name) -> None:
            if on_round is not None:
                on_round(variant, record)

        results.append(run_variant(variant_config, name, run_dir / name, forward, attack))
    return run_dir, results, plans
