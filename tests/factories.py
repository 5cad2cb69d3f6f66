"""Builders shared by the tests: real silos, real messages, real apps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fedguard.audit import pki
from fedguard.client.policy import SiloPolicy
from fedguard.client.silo import SiloSettings, SimulatedSiloSource
from fedguard.core.config import (
    DatasetName,
    Engine,
    LocalDPConfig,
    LocalTrainingConfig,
    ModelSpec,
    NoiseSource,
    PartitionSpec,
    PrivacyBudget,
    RunConfig,
)
from fedguard.core.datasets import builtin_contract, schema_for
from fedguard.core.models import build_model, model_hash_for
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.seeding import seed_torch
from fedguard.core.serialization import ModelWeights, model_weights, weights_to_record
from fedguard.privacy.secagg.roster import (
    SignedRoster,
    SiloIdentity,
    roster_from_files,
    sign_roster,
)
from fedguard.server.secure_round import SecAggIdentities
from fedguard.wire import protocol
from fedguard.wire.protocol import RoundInstructions

DATASET = DatasetName.BREAST_CANCER
PARTITION = PartitionSpec.parse("iid", min_silo_size=20)


def small_config(tmp_path: Path, **overrides: object) -> RunConfig:
    base = dict(
        dataset=DATASET,
        num_clients=3,
        num_rounds=3,
        partition=PARTITION,
        budget=PrivacyBudget(3.0, 1e-5),
        training=LocalTrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.1),
        local_dp=LocalDPConfig(),
        out=tmp_path / "runs",
        engine=Engine.INPROCESS,
        seed=0,
    )
    base.update(overrides)
    return RunConfig(**base)  # type: ignore[arg-type]


#: A simulated silo in research mode (seeded noise and batches: reproducible tests).
RESEARCH_POLICY = SiloPolicy(noise_source=NoiseSource.SEEDED, research_mode=True)


def silo_settings(
    tmp_path: Path,
    index: int,
    budget: PrivacyBudget | None = None,
    num_silos: int = 3,
    policy: SiloPolicy | None = None,
    identity: bool = True,
) -> SiloSettings:
    """Silo ``index`` of ``tmp_path``; ``identity``: with its SecAgg identity key and
    the test consortium's key (:func:`consortium_roster` signs the roster of these keys)."""
    return SiloSettings(
        silo_id=f"silo-{index}",
        state_dir=tmp_path / f"silo-{index}",
        budget=budget or PrivacyBudget(3.0, 1e-5),
        data=SimulatedSiloSource(DATASET, num_silos, PARTITION, index, 0.2, 0),
        policy=policy or SiloPolicy(),
        identity=silo_identity(tmp_path, index) if identity else None,
    )


def initial_weights(model: ModelSpec | None = None) -> ModelWeights:
    seed_torch(0)
    return model_weights(build_model(schema_for(DATASET), model or ModelSpec()))


def local_scaler(settings: SiloSettings) -> FeatureScaler:
    silo = settings.data.load()
    return FeatureScaler.from_statistics(FeatureStatistics.from_features(silo.train), silo.schema)


def instruction(
    round_number: int,
    weights: ModelWeights,
    scaler: FeatureScaler,
    *,
    planned_rounds: int = 3,
    dp: LocalDPConfig | None = None,
    run_id: str = "run-a",
    dataset: DatasetName = DATASET,
    message_type: str = protocol.TRAIN,
) -> Message:
    instructions = RoundInstructions(
        run_id=run_id,
        round=round_number,
        planned_rounds=planned_rounds,
        seed=0,
        contract_name=builtin_contract(dataset).name,
        contract_hash=builtin_contract(dataset).content_hash(),
        model=ModelSpec(),
        model_hash=model_hash_for(schema_for(dataset), ModelSpec()),
        training=LocalTrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.1),
        local_dp=dp or LocalDPConfig(),
    )
    content = RecordDict(
        {
            protocol.CONFIG: instructions.to_record(),
            protocol.ARRAYS: weights_to_record(weights),
            protocol.SCALER: ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in scaler.to_arrays().items()}
            ),
        }
    )
    message = Message(content, dst_node_id=7, message_type=message_type, group_id=str(round_number))
    message.metadata.__dict__["_message_id"] = f"m-{round_number}"
    return message


def node_context(partition: int, num: int = 3) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": num},
        state=RecordDict(),
        run_config={},
    )


Resolver = Callable[[Context], SiloSettings]


# -- SecAgg identities: keys and a signed roster, as `fedguard ca sign-roster` makes --------


def inprocess_node(index: int) -> int:
    """The in-process engine's node id of partition ``index`` (``InProcessGrid``)."""
    return 1000 + 7 * index


def _consortium_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "consortium"
    if not (folder / pki.CONSORTIUM_KEY).exists():
        pki.consortium_keygen(folder)
    return folder


def silo_identity(tmp_path: Path, index: int) -> SiloIdentity:
    """Silo ``index``'s identity key (made once, in its state folder) and the consortium key."""
    state = tmp_path / f"silo-{index}"
    if not (state / pki.SECAGG_IDENTITY_KEY).exists():
        pki.secagg_identity_keygen(state)
    return SiloIdentity.load(
        state / pki.SECAGG_IDENTITY_KEY, _consortium_dir(tmp_path) / pki.CONSORTIUM_PUB
    )


def consortium_roster(tmp_path: Path, num_silos: int = 3) -> SignedRoster:
    """The test consortium's roster of silo-0 .. silo-(n-1), signed once (kept on disk)."""
    folder = _consortium_dir(tmp_path)
    path = folder / "secagg-roster.json"
    names = [f"silo-{i}" for i in range(num_silos)]
    if path.exists():
        signed = SignedRoster.load(path)
        if list(signed.roster.silos) == sorted(names):
            return signed
    for i in range(num_silos):
        silo_identity(tmp_path, i)
    serial = SignedRoster.load(path).roster.serial + 1 if path.exists() else 1
    roster = roster_from_files(
        "test consortium",
        serial,
        {f"silo-{i}": tmp_path / f"silo-{i}" / pki.SECAGG_IDENTITY_PUB for i in range(num_silos)},
    )
    signed = sign_roster(roster, pki.load_private_key(folder / pki.CONSORTIUM_KEY))
    signed.save(path)
    return signed


def consortium_identities(tmp_path: Path, num_silos: int = 3) -> SecAggIdentities:
    """The roster and the in-process engine's node → silo ids, for a server-side round."""
    return SecAggIdentities(
        consortium_roster(tmp_path, num_silos),
        {inprocess_node(i): f"silo-{i}" for i in range(num_silos)},
    )
