"""A malicious consortium server, driving real silo agents with crafted messages.

Everything on the silo side is real: the deployed handler table
(:func:`fedguard.client.app.make_client_app`), called as Flower calls it
(``app(message, context)``, one persistent :class:`~flwr.app.Context` per node),
with real data, a real privacy ledger and a real outbox in each silo's state
folder. The server side of secure aggregation is the real
:class:`~fedguard.privacy.secagg.ServerRound`, stepped by hand so that the
adversary picks the round id, the cohort, the configuration, who "drops out", and
may rewrite any request before it leaves.

The harness tolerates both the starting commit and the fixed code: where the
fixed code needs something new (a signed consortium roster for authenticated
SecAgg), it is looked up lazily, so that on the old code the same test still runs
the attack and fails on an assertion that shows it working.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedguard.client.app import make_client_app
from fedguard.client.outbox import Outbox
from fedguard.client.secure import STATE_KEY
from fedguard.client.silo import SiloSettings
from fedguard.core.builtin_datasets import load_pooled_frame
from fedguard.core.config import LocalDPConfig, NoiseSource
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.serialization import ModelWeights, flatten_weights
from fedguard.privacy.ledger import LedgerEntry, PrivacyLedger
from fedguard.privacy.secagg import (
    ClientRound,
    ConsistencySignature,
    FixedPointEncoder,
    KeyAdvertisement,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    ServerRound,
    ShareKeysResponse,
    UnmaskResponse,
)
from fedguard.trust.silo_statistics import SILO_AND_TRUST_PRODUCERS
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.secagg import PAYLOAD, secagg_record
from tests.factories import DATASET, instruction, silo_settings

#: Node ids are not partition indices on purpose (as on a real SuperLink).
FIRST_NODE = 1000
NODE_STEP = 7

#: The SecAgg+ stages after setup, in order: (name, message type, reply parser).
STAGES: tuple[tuple[str, str, Callable[[bytes], Any]], ...] = (
    ("share-keys", protocol.SECAGG_SHARE, ShareKeysResponse.from_bytes),
    ("masked-input", protocol.SECAGG_MASK, MaskedInput.from_bytes),
    ("consistency", protocol.SECAGG_CONSISTENCY, ConsistencySignature.from_bytes),
    ("unmask", protocol.SECAGG_UNMASK, UnmaskResponse.from_bytes),
)
SETUP = "advertise-keys"


# --------------------------------------------------------------------------- messages


def act_as_server() -> None:
    """Flower stamps new Messages with the running task's identity (as tests/conftest.py
    does per test; module-scoped fixtures run before that fixture)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1


def message_to(node: int, content: RecordDict, message_type: str, group_id: str = "1") -> Message:
    """A server message as a SuperLink delivers it (its own copy, a fresh id)."""
    message = Message(
        copy.deepcopy(content), dst_node_id=node, message_type=message_type, group_id=group_id
    )
    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return message


def status(reply: Message) -> tuple[ReplyStatus, str]:
    return protocol.reply_status(reply)


def has_update(reply: Message) -> bool:
    """Does the reply carry model weights (a release)?"""
    return reply.has_content() and protocol.ARRAYS in reply.content.array_records


def reply_weights(reply: Message) -> dict[str, np.ndarray]:
    record = reply.content.array_records[protocol.ARRAYS]
    return {name: record[name].numpy() for name in record}


def reply_payload(reply: Message) -> bytes:
    value = reply.content.config_records[protocol.SECAGG][PAYLOAD]
    assert isinstance(value, bytes)
    return value


def content_payload(content: RecordDict) -> bytes:
    """The SecAgg payload of a message the server is about to send."""
    value = content.config_records[protocol.SECAGG][PAYLOAD]
    assert isinstance(value, bytes)
    return value


def train_dp(noise_source: NoiseSource = NoiseSource.CSPRNG) -> LocalDPConfig:
    return LocalDPConfig(noise_source=noise_source)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.corrcoef(a, b)[0, 1])


# --------------------------------------------------------------------------- roster


def roster_module() -> Any | None:
    """The authenticated-SecAgg roster module of the fixed code (None on the old code)."""
    try:
        return importlib.import_module("fedguard.privacy.secagg.roster")
    except ImportError:
        return None


@dataclass
class RosterKit:
    """The consortium's signing key, each silo's identity key and the signed roster."""

    module: Any
    consortium_private: Any
    consortium_raw: bytes
    consortium_spki: bytes
    identity_keys: dict[str, bytes]
    signed: Any

    @classmethod
    def create(cls, silo_ids: Sequence[str]) -> RosterKit | None:
        module = roster_module()
        if module is None:
            return None
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from fedguard.privacy.secagg.crypto import ed25519_keypair

        consortium = ed25519.Ed25519PrivateKey.generate()
        public = consortium.public_key()
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        spki = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        keys = {silo_id: ed25519_keypair() for silo_id in silo_ids}
        roster = module.Roster(
            "adversarial-test consortium", 1, {s: pub for s, (_, pub) in keys.items()}
        )
        signed = module.sign_roster(roster, consortium)
        return cls(module, consortium, raw, spki, {s: k for s, (k, _) in keys.items()}, signed)

    def identity(self, silo_id: str) -> Any:
        return self.module.SiloIdentity(self.identity_keys[silo_id], self.consortium_spki)

    def node_config(self, folder: Path, silo_id: str) -> dict[str, str]:
        """The two node-config keys of a deployed silo's identity (raw key files)."""
        folder.mkdir(parents=True, exist_ok=True)
        key, trusted = folder / f"{silo_id}.identity", folder / "consortium.pub"
        key.write_bytes(self.identity_keys[silo_id])
        trusted.write_bytes(self.consortium_raw)
        return {"secagg-identity-key": str(key), "consortium-key": str(trusted)}

    def options(self, silo_ids: Sequence[str], nonce: bytes) -> dict[str, Any]:
        return {
            "roster": self.signed.to_bytes(),
            "silo-ids": list(silo_ids),
            "round-nonce": nonce,
        }

    def round_id(self, nonce: bytes, silo_ids: Sequence[str]) -> bytes:
        return bytes(self.module.bind_round_id(nonce, self.signed.roster, list(silo_ids)))

    def registry(self, nodes: Sequence[int], silo_ids: Sequence[str]) -> dict[int, bytes]:
        return dict(self.signed.roster.registry(list(nodes), list(silo_ids)))


# --------------------------------------------------------------------------- silos


@dataclass
class Silo:
    """One deployed silo: its own settings, its node's Flower context, its handlers."""

    index: int
    settings: SiloSettings
    context: Context
    app: ClientApp

    @property
    def node_id(self) -> int:
        return int(self.context.node_id)

    @property
    def silo_id(self) -> str:
        return self.settings.silo_id

    def send(self, content: RecordDict, message_type: str, group_id: str = "1") -> Message:
        """Deliver one message to this silo's ClientApp; return its reply."""
        return self.app(message_to(self.node_id, content, message_type, group_id), self.context)

    def deliver(self, message: Message) -> Message:
        return self.app(message, self.context)

    def ledger_entries(self) -> list[LedgerEntry]:
        if not (self.settings.state_dir / PrivacyLedger.FILENAME).exists():
            return []
        with PrivacyLedger.open(
            self.settings.state_dir, self.settings.silo_id, self.settings.budget
        ) as ledger:
            return list(ledger.entries())

    def sent_update(self, run_id: str, round_number: int) -> ModelWeights | None:
        sent = Outbox(self.settings.state_dir).load(run_id, round_number)
        return None if sent is None else sent.weights

    def secagg_secrets(self) -> list[str]:
        """What of a SecAgg round's secrets the node's state still holds (empty: none)."""
        record = self.context.state.config_records.get(STATE_KEY)
        if record is None:
            return []
        held: list[str] = []
        encoded = record.get("encoded")
        if isinstance(encoded, bytes) and encoded:
            held.append(f"the encoded update ({len(encoded)} bytes)")
        round_bytes = record.get("round")
        if isinstance(round_bytes, bytes) and round_bytes:
            try:
                state = ClientRound.from_bytes(round_bytes)
            except (SecAggError, ValueError):
                held.append("an unreadable round state")
            else:
                for name in ("mask_private", "share_private", "verify_private", "self_seed"):
                    if getattr(state, name):
                        held.append(name)
                if state.held_shares:
                    held.append(f"{len(state.held_shares)} held share(s)")
                if held:
                    held.append(f"(at stage {state.stage.value})")
        return held


def _client_app(settings: SiloSettings) -> ClientApp:
    """The deployed silo's handler table (its own and the trust layer's statistics)."""

    def resolve(_context: Context) -> SiloSettings:
        return settings

    return make_client_app(resolve, producers=SILO_AND_TRUST_PRODUCERS)


def make_silo(
    tmp_path: Path,
    index: int,
    num_silos: int = 3,
    *,
    state_name: str | None = None,
    kit: RosterKit | None = None,
    policy: Any = None,
) -> Silo:
    """A silo with the default (deployed) policy, its own state folder, its own handlers."""
    settings = silo_settings(tmp_path, index, num_silos=num_silos)
    if policy is not None:
        settings = dataclasses.replace(settings, policy=policy)
    if state_name is not None:
        settings = dataclasses.replace(settings, state_dir=tmp_path / state_name)
    if kit is not None:
        settings = dataclasses.replace(settings, identity=kit.identity(settings.silo_id))
    context = Context(
        run_id=1,
        node_id=node_of(index),
        node_config={"partition-id": index, "num-partitions": num_silos},
        state=RecordDict(),
        run_config={},
    )
    return Silo(index, settings, context, _client_app(settings))


def deployed_silo(
    tmp_path: Path,
    index: int = 0,
    num_silos: int = 3,
    node_config: Mapping[str, Any] | None = None,
    kit: RosterKit | None = None,
) -> Silo:
    """A silo exactly as deployed: its own CSV, ``--node-config``, the shipped ``app``."""
    from fedguard.apps.silo import client_app as deployed_app
    from fedguard.client.silo import settings_from_node_config

    folder = tmp_path / "hospital-data"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"hospital-{index}.csv"
    if not path.exists():
        frame = load_pooled_frame(DATASET).sample(frac=1.0, random_state=0)
        frame.iloc[index::num_silos].to_csv(path, index=False)
    silo_id = f"hospital-{index}"
    config: dict[str, Any] = {
        "silo-id": silo_id,
        "dataset": DATASET.value,
        "data-path": str(path),
        "state-dir": str(tmp_path / f"{silo_id}-state"),
        "target-epsilon": "3.0",
        "delta": "1e-5",
        **(kit.node_config(tmp_path / "keys", silo_id) if kit is not None else {}),
        **dict(node_config or {}),
    }
    context = Context(
        run_id=1,
        node_id=node_of(index),
        node_config=config,
        state=RecordDict(),
        run_config={},
    )
    return Silo(index, settings_from_node_config(config), context, deployed_app)


# --------------------------------------------------------------------------- consortium


@dataclass
class StageLog:
    """What each node answered at one stage."""

    replies: dict[int, Message] = field(default_factory=dict)

    def statuses(self) -> dict[int, tuple[ReplyStatus, str]]:
        return {node: status(reply) for node, reply in self.replies.items()}


@dataclass
class SecAggRun:
    """One SecAgg+ instance as the adversary ran it."""

    server: ServerRound
    stages: dict[str, StageLog] = field(default_factory=dict)
    failure: SecAggError | None = None
    weighted_sum: np.ndarray | None = None
    total_weight: int | None = None
    contributors: tuple[int, ...] = ()

    @property
    def completed(self) -> bool:
        return self.weighted_sum is not None

    def replies(self, stage: str) -> dict[int, tuple[ReplyStatus, str]]:
        log = self.stages.get(stage)
        return {} if log is None else log.statuses()

    def describe(self) -> str:
        """One line per stage: who answered ok, and every other answer with its reason."""
        lines = [f"aborted: {self.failure}" if self.failure is not None else "completed"]
        for name, log in self.stages.items():
            statuses = log.statuses()
            ok = [n for n, (s, _) in statuses.items() if s is ReplyStatus.OK]
            others = [
                f"{n} {s.value} {reason[:120]!r}"
                for n, (s, reason) in sorted(statuses.items())
                if s is not ReplyStatus.OK
            ]
            lines.append(f"  {name}: ok from {sorted(ok)}" + "".join(f"; {o}" for o in others))
        return "\n".join(lines)


#: Rewrites what one node is sent at one stage (the adversary's pen):
#: ``(stage, node, content) -> content``.
Tamper = Callable[[str, int, RecordDict], RecordDict]


class Consortium:
    """Silos under a malicious server (with a signed roster where the code has one)."""

    def __init__(
        self,
        silos: Sequence[Silo],
        kit: RosterKit | None = None,
        members: Mapping[int, str] | None = None,
    ) -> None:
        self.silos = {silo.node_id: silo for silo in silos}
        self.kit = kit
        # Node → silo id of every roster member, also those with no silo here (the
        # adversary may list them in a cohort; they never answer).
        self.members = {**dict(members or {}), **{n: s.silo_id for n, s in self.silos.items()}}

    def clone(self, tmp_path: Path) -> Consortium:
        """The same silos in the same state (state folders, node state), elsewhere."""
        silos = []
        for silo in self.silos.values():
            state_dir = tmp_path / silo.settings.state_dir.name
            if silo.settings.state_dir.exists():
                shutil.copytree(silo.settings.state_dir, state_dir)
            settings = dataclasses.replace(silo.settings, state_dir=state_dir)
            context = Context(
                run_id=silo.context.run_id,
                node_id=silo.context.node_id,
                node_config=dict(silo.context.node_config),
                state=copy.deepcopy(silo.context.state),
                run_config={},
            )
            silos.append(Silo(silo.index, settings, context, _client_app(settings)))
        return Consortium(silos, self.kit, self.members)

    def __getitem__(self, index: int) -> Silo:
        return next(s for s in self.silos.values() if s.index == index)

    @property
    def node_ids(self) -> list[int]:
        return sorted(self.silos)

    def nodes(self, *indices: int) -> list[int]:
        return sorted(self[i].node_id for i in indices)

    def silo_ids(self, nodes: Sequence[int]) -> list[str]:
        return [self.members[n] for n in sorted(nodes)]

    # -- configuration --------------------------------------------------------------

    def secagg_config(self, num_clients: int, **overrides: Any) -> SecAggConfig:
        """The config an honest server would use (authenticated where the code can)."""
        from fedguard.server.secure_round import SecureAggregationSettings

        config = SecureAggregationSettings().config_for(num_clients)
        config = dataclasses.replace(config, require_identity=self.kit is not None)
        return dataclasses.replace(config, **overrides) if overrides else config

    def begin(
        self,
        nodes: Iterable[int],
        config: SecAggConfig,
        vector_length: int,
        *,
        nonce: bytes | None = None,
        round_id: bytes | None = None,
    ) -> tuple[ServerRound, dict[str, Any]]:
        """A real ``ServerRound`` and the roster options its setup carries.

        With a roster the round id commits to ``nonce``, the roster and the silo
        list (as the fixed server does); without one it is ``nonce`` itself.
        ``round_id`` overrides both (a server that does not bind its rounds).
        """
        cohort = sorted(nodes)
        nonce = nonce if nonce is not None else secrets.token_bytes(16)
        options: dict[str, Any] = {}
        registry = None
        bound = nonce
        if self.kit is not None:
            silo_ids = self.silo_ids(cohort)
            options = self.kit.options(silo_ids, nonce)
            bound = self.kit.round_id(nonce, silo_ids)
            if config.require_identity:
                registry = self.kit.registry(cohort, silo_ids)
        server = ServerRound.begin(
            config,
            cohort,
            vector_length,
            round_id=round_id if round_id is not None else bound,
            identity_registry=registry,
        )
        return server, options

    def setup_content(
        self, base: RecordDict, data: bytes, options: Mapping[str, Any]
    ) -> RecordDict:
        content = RecordDict(dict(base.items()))
        content[protocol.SECAGG] = secagg_record(data, **dict(options))
        return content

    # -- one SecAgg+ instance, stage by stage -----------------------------------------

    def run_secagg(
        self,
        nodes: Iterable[int],
        base: RecordDict,
        *,
        vector_length: int,
        config: SecAggConfig | None = None,
        nonce: bytes | None = None,
        round_id: bytes | None = None,
        setup_message_type: str = protocol.SECAGG_SETUP,
        options: Mapping[str, Any] | None = None,
        silent: Mapping[str, set[int]] | None = None,
        tamper: Tamper | None = None,
    ) -> SecAggRun:
        """Run one SecAgg+ instance over ``nodes`` with the real ``ServerRound``.

        ``vector_length`` counts the weight column. ``silent[stage]``: nodes the
        server does not contact at that stage (it plays them dropped). ``tamper``
        rewrites a message before it is delivered.
        """
        cohort = sorted(nodes)
        cfg = config or self.secagg_config(len(cohort))
        server, roster_options = self.begin(
            cohort, cfg, vector_length, nonce=nonce, round_id=round_id
        )
        run = SecAggRun(server)
        silent = silent or {}
        extra = {
            "clip-norm": 0.0,
            "weight-unit": 1,
            **roster_options,
            **dict(options or {}),
        }
        requests: Mapping[int, Any] = server.setup_requests()
        parsed = self._stage(
            run,
            SETUP,
            setup_message_type,
            requests,
            KeyAdvertisement.from_bytes,
            lambda data: self.setup_content(base, data, extra),
            silent.get(SETUP, set()),
            tamper,
        )
        try:
            requests = server.receive_advertisements(parsed)
        except SecAggError as failed:
            run.failure = failed
            return run
        result = None
        for name, message_type, parse in STAGES:
            parsed = self._stage(
                run,
                name,
                message_type,
                requests,
                parse,
                lambda data: RecordDict({protocol.SECAGG: secagg_record(data)}),
                silent.get(name, set()),
                tamper,
            )
            try:
                if name == "share-keys":
                    requests = server.receive_shares(parsed)
                elif name == "masked-input":
                    requests = server.receive_masked_inputs(parsed)
                elif name == "consistency":
                    requests = server.receive_signatures(parsed)
                else:
                    result = server.receive_unmask(parsed)
            except SecAggError as failed:
                run.failure = failed
                return run
        assert result is not None
        decoded = FixedPointEncoder(cfg).decode(result.total)
        run.weighted_sum = decoded.weighted_sum
        run.total_weight = decoded.total_weight
        run.contributors = tuple(result.contributors)
        return run

    def _stage(
        self,
        run: SecAggRun,
        name: str,
        message_type: str,
        requests: Mapping[int, Any],
        parse: Callable[[bytes], Any],
        content_for: Callable[[bytes], RecordDict],
        silent: set[int],
        tamper: Tamper | None,
    ) -> dict[int, Any]:
        log = run.stages.setdefault(name, StageLog())
        parsed: dict[int, Any] = {}
        for node, request in requests.items():
            if node in silent or node not in self.silos:
                continue
            content = content_for(request.to_bytes())
            if tamper is not None:
                content = tamper(name, node, content)
            reply = self.silos[node].send(content, message_type)
            log.replies[node] = reply
            if status(reply)[0] is not ReplyStatus.OK:
                continue
            try:
                parsed[node] = parse(reply_payload(reply))
            except (SecAggError, KeyError, TypeError, ValueError, AssertionError):
                continue
        return parsed


# --------------------------------------------------------------------------- builders


def node_of(index: int) -> int:
    return FIRST_NODE + NODE_STEP * index


def consortium(
    tmp_path: Path,
    count: int,
    *,
    num_silos: int | None = None,
    roster_size: int | None = None,
    policy: Any = None,
) -> Consortium:
    """``count`` silos (partitions of one data set), enrolled in a signed roster where
    the code has authenticated SecAgg. The roster lists ``roster_size`` silos
    (``silo-0``…): those beyond ``count`` exist only on paper (they never answer)."""
    total = num_silos or count
    listed = max(roster_size or count, count)
    members = {node_of(i): f"silo-{i}" for i in range(listed)}
    kit = RosterKit.create(list(members.values()))
    silos = [make_silo(tmp_path, i, total, kit=kit, policy=policy) for i in range(count)]
    return Consortium(silos, kit, members)


def plain_instruction(
    round_number: int,
    weights: ModelWeights,
    scaler: FeatureScaler,
    *,
    run_id: str = "run-a",
    planned_rounds: int = 3,
    noise_source: NoiseSource = NoiseSource.CSPRNG,
    message_type: str = protocol.TRAIN,
) -> Message:
    return instruction(
        round_number,
        weights,
        scaler,
        planned_rounds=planned_rounds,
        dp=train_dp(noise_source),
        run_id=run_id,
        message_type=message_type,
    )


def vector_length(weights: ModelWeights) -> int:
    """Values of a model update, plus the weight column."""
    return int(flatten_weights(weights).size) + 1


def update_of(silo: Silo, run_id: str, round_number: int, weights: ModelWeights) -> np.ndarray:
    """The update Δ a silo trained (from its own outbox), as one vector."""
    sent = silo.sent_update(run_id, round_number)
    assert sent is not None, f"{silo.silo_id} kept no update for round {round_number}"
    delta: np.ndarray = flatten_weights(sent) - flatten_weights(weights)
    return delta
