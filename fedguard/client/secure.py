"""The silo side of SecAgg+ over Flower messages (five ``train.secagg_*`` stages).

Stage 0 (``secagg_setup``) carries the usual training instruction: the silo
trains (charging its ledger first, as for plain ``train``), turns its update
Δ = new − global into a fixed-point vector (:class:`FixedPointEncoder`: clipped
values counted, stochastic rounding, integer weight) and answers with its key
advertisement only. The encoded vector and the round's secrets stay in the
node's ``context.state``, which Flower keeps on the silo between messages (the
ClientApp object itself is rebuilt per message). Later stages load that state,
run one :class:`ClientRound` step and store it again; after unmasking it is
deleted.

With central DP on, the silo clips its Δ to the central L2 bound before
encoding (the server adds the Gaussian noise to the unmasked sum) and every
weight is 1 (DP-FedAvg needs a sensitivity that does not depend on silo size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedguard.core import protocol
from fedguard.core.errors import ProtocolError
from fedguard.core.protocol import ReplyStatus
from fedguard.core.serialization import flatten_weights
from fedguard.privacy.secagg import (
    ClientRound,
    ConsistencyRequest,
    FixedPointEncoder,
    MaskedInputRequest,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
)

STATE_KEY = "fedguard.secagg"
PAYLOAD = "payload"


def payload(message: Message) -> bytes:
    records = message.content.config_records
    if protocol.SECAGG not in records or PAYLOAD not in records[protocol.SECAGG]:
        raise ProtocolError("SecAgg message has no payload")
    value = records[protocol.SECAGG][PAYLOAD]
    if not isinstance(value, bytes):
        raise ProtocolError("SecAgg payload must be bytes")
    return value


def secagg_record(data: bytes, **extra: int | float | str) -> ConfigRecord:
    return ConfigRecord({PAYLOAD: data, **extra})


def clip_to_norm(vector: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector if norm <= bound else vector * (bound / norm)


class SecureAggregationClient:
    """One silo's SecAgg+ stages; ``update`` trains and returns (Δ, metrics, examples)."""

    def __init__(self, context: Context, silo_id: str) -> None:
        self.context = context
        self.silo_id = silo_id

    def _reply(
        self, message: Message, data: bytes, metrics: dict[str, float] | None = None
    ) -> Message:
        records: dict[str, Any] = {
            protocol.STATUS: protocol.status_record(ReplyStatus.OK, "", self.silo_id),
            protocol.SECAGG: secagg_record(data),
        }
        if metrics is not None:
            records[protocol.METRICS] = MetricRecord(dict(metrics))
        return Message(RecordDict(records), reply_to=message)

    def _save(self, state: ClientRound, encoded: np.ndarray | None = None) -> None:
        record = ConfigRecord({"round": state.to_bytes()})
        previous = self.context.state.config_records.get(STATE_KEY)
        if encoded is not None:
            record["encoded"] = encoded.astype("<u4").tobytes()
        elif previous is not None and "encoded" in previous:
            record["encoded"] = previous["encoded"]
        self.context.state.config_records[STATE_KEY] = record

    def _load(self) -> tuple[ClientRound, np.ndarray]:
        record = self.context.state.config_records.get(STATE_KEY)
        if record is None:
            raise ProtocolError("no SecAgg round in progress on this silo")
        round_bytes, encoded = record["round"], record.get("encoded", b"")
        if not isinstance(round_bytes, bytes) or not isinstance(encoded, bytes):
            raise ProtocolError("the stored SecAgg state is corrupt")
        return ClientRound.from_bytes(round_bytes), np.frombuffer(encoded, dtype="<u4").copy()

    def setup(
        self,
        message: Message,
        train: Callable[[Message], tuple[np.ndarray, dict[str, float]]],
        clip: bool = True,
    ) -> Message:
        """Stage 0: train, encode, keep the secrets, advertise keys.

        ``clip`` False plays a silo that ignores the requested L2 clip (simulated
        Byzantine silos); the server's group-norm check is what catches it.
        """
        setup = SetupRequest.from_bytes(payload(message))
        options = message.content.config_records[protocol.SECAGG]
        clip_norm = _number(options, "clip-norm")
        weight_unit = int(_number(options, "weight-unit"))
        self.context.state.config_records.pop(STATE_KEY, None)  # a new round replaces any old one
        delta, metrics = train(message)
        if clip_norm > 0 and clip:
            delta = clip_to_norm(delta, clip_norm)
        examples = int(metrics["num-examples"])
        weight = 1 if weight_unit <= 0 else math.ceil(examples / weight_unit)
        encoded = FixedPointEncoder(setup.config).encode(delta, weight)
        if encoded.length != setup.vector_length:
            raise ProtocolError(
                f"the round expects vectors of {setup.vector_length} values, "
                f"this silo's update encodes to {encoded.length}"
            )
        state, advertisement = ClientRound.start(setup, self.context.node_id)
        self._save(state, encoded.values)
        metrics = {**metrics, "secagg-clipped": encoded.num_clipped, "secagg-weight": weight}
        return self._reply(message, advertisement.to_bytes(), metrics)

    def share_keys(self, message: Message) -> Message:
        state, _ = self._load()
        reply = state.share_keys(ShareKeysRequest.from_bytes(payload(message)))
        self._save(state)
        return self._reply(message, reply.to_bytes())

    def mask(self, message: Message) -> Message:
        state, encoded = self._load()
        reply = state.mask_input(MaskedInputRequest.from_bytes(payload(message)), encoded)
        self._save(state)
        return self._reply(message, reply.to_bytes())

    def consistency(self, message: Message) -> Message:
        state, _ = self._load()
        reply = state.sign_survivors(ConsistencyRequest.from_bytes(payload(message)))
        self._save(state)
        return self._reply(message, reply.to_bytes())

    def unmask(self, message: Message) -> Message:
        state, _ = self._load()
        try:
            reply = state.unmask(UnmaskRequest.from_bytes(payload(message)))
        finally:
            # Whatever happens, this round's secrets and encoded update are done with.
            self.context.state.config_records.pop(STATE_KEY, None)
        return self._reply(message, reply.to_bytes())


def _number(record: ConfigRecord, key: str) -> float:
    value = record.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"SecAgg option {key!r} must be a finite number, got {value!r}")
    return float(value)


def update_delta(
    global_weights: dict[str, np.ndarray], weights: dict[str, np.ndarray]
) -> np.ndarray:
    delta: np.ndarray = flatten_weights(weights) - flatten_weights(global_weights)
    return delta
