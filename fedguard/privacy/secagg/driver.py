"""The in-memory SecAgg+ driver: :func:`run_round`, the reference for the transport.

It runs a whole round between :class:`~fedguard.privacy.secagg.client_round.ClientRound`
states and a :class:`~fedguard.privacy.secagg.server_round.ServerRound`, with any
dropout schedule, passing every message and client state through its byte encoding
as the Flower transport does, and measures compute time and traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedguard.privacy.secagg.client_round import ClientRound
from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import ed25519_public
from fedguard.privacy.secagg.errors import MalformedMessageError
from fedguard.privacy.secagg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    Payload,
    SetupRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from fedguard.privacy.secagg.server_round import AggregateResult, ServerRound
from fedguard.privacy.secagg.transcript import Stage

T = TypeVar("T")
RequestT = TypeVar("RequestT", bound="Payload")
ReplyT = TypeVar("ReplyT", bound="Payload")
PayloadT = TypeVar("PayloadT", bound=Payload)

__all__ = ["RoundOutcome", "run_round"]


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    """What :func:`run_round` measured: the result, compute times and traffic."""

    result: AggregateResult
    client_seconds: dict[int, float]
    server_seconds: float
    upload_bytes: dict[int, int]
    download_bytes: dict[int, int]


class _Wire:
    """Copies messages and client states through their byte encodings, counting bytes."""

    def __init__(self, enabled: bool, node_ids: Sequence[int]) -> None:
        self.enabled = enabled
        self.upload = dict.fromkeys(node_ids, 0)
        self.download = dict.fromkeys(node_ids, 0)
        self._states: dict[int, bytes | ClientRound] = {}

    def send(self, node: int, message: PayloadT) -> PayloadT:
        return self._carry(message, self.download, node)

    def reply(self, node: int, message: PayloadT) -> PayloadT:
        return self._carry(message, self.upload, node)

    def _carry(self, message: PayloadT, counter: dict[int, int], node: int) -> PayloadT:
        if not self.enabled:
            return message
        data = message.to_bytes()
        counter[node] += len(data)
        return type(message).from_bytes(data)

    def save(self, node: int, state: ClientRound) -> None:
        self._states[node] = state.to_bytes() if self.enabled else state

    def load(self, node: int) -> ClientRound:
        saved = self._states[node]
        return ClientRound.from_bytes(saved) if isinstance(saved, bytes) else saved


def run_round(
    config: SecAggConfig,
    inputs: Mapping[int, np.ndarray],
    *,
    dropouts: Mapping[Stage, Collection[int]] | None = None,
    identity_keys: Mapping[int, bytes] | None = None,
    round_id: bytes | None = None,
    wire: bool = True,
    observer: Callable[[Stage, ServerRound], None] | None = None,
) -> RoundOutcome:
    """Run one SecAgg+ round between ``len(inputs)`` clients and the server in memory.

    Args:
        inputs: node id → encoded uint32 vector (all of one length).
        dropouts: stage → nodes that do not answer that stage's request (nor any
            later one): ``Stage.ADVERTISE_KEYS`` drops before advertising, and so on.
        identity_keys: node id → Ed25519 private key, for rounds that require
            identities (the registry is derived from them).
        wire: pass every message and client state through ``to_bytes`` /
            ``from_bytes``, as the Flower transport will (and count the bytes).
        observer: called as ``observer(stage, server)`` after every server step,
            e.g. to inspect the server state.

    Raises :class:`SecAggAbort` on a threshold failure, and any client's
    :class:`SecAggProtocolError` as it is.
    """
    node_ids = tuple(sorted(inputs))
    vectors = {node: np.asarray(inputs[node]) for node in node_ids}
    shapes = {v.shape for v in vectors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise MalformedMessageError("inputs must be 1-D uint32 vectors of one length")
    length = next(iter(shapes))[0]
    schedule = {Stage(stage): set(nodes) for stage, nodes in (dropouts or {}).items()}
    registry = (
        {node: ed25519_public(key) for node, key in identity_keys.items()}
        if identity_keys is not None
        else None
    )
    driver = _Driver(vectors, schedule, identity_keys, registry, _Wire(wire, node_ids), observer)
    return driver.run(config, length, round_id)


class _Driver:
    """One :func:`run_round`: the clients' saved states, their dropouts and the timings."""

    def __init__(
        self,
        vectors: Mapping[int, np.ndarray],
        schedule: Mapping[Stage, set[int]],
        identity_keys: Mapping[int, bytes] | None,
        registry: Mapping[int, bytes] | None,
        channel: _Wire,
        observer: Callable[[Stage, ServerRound], None] | None,
    ) -> None:
        self._vectors = vectors
        self._schedule = schedule
        self._identity_keys = identity_keys
        self._registry = registry
        self._channel = channel
        self._observer = observer
        self._gone: set[int] = set()
        self.client_seconds = dict.fromkeys(vectors, 0.0)
        self.server_seconds = 0.0

    def run(self, config: SecAggConfig, length: int, round_id: bytes | None) -> RoundOutcome:
        """Every stage in order, each client stage followed by the server's step."""
        began = time.perf_counter()
        server = ServerRound.begin(
            config,
            tuple(self._vectors),
            length,
            round_id=round_id,
            identity_registry=self._registry,
        )
        setup_requests = server.setup_requests()
        self.server_seconds += time.perf_counter() - began
        if self._observer is not None:
            self._observer(Stage.ADVERTISE_KEYS, server)

        ads = self._client_stage(Stage.ADVERTISE_KEYS, setup_requests, self._advertise)
        share_requests = self._server_step(
            server, Stage.ADVERTISE_KEYS, lambda: server.receive_advertisements(ads)
        )
        share_replies = self._client_stage(Stage.SHARE_KEYS, share_requests, self._share)
        mask_requests = self._server_step(
            server, Stage.SHARE_KEYS, lambda: server.receive_shares(share_replies)
        )
        masked = self._client_stage(Stage.MASKED_INPUT, mask_requests, self._mask)
        consistency_requests = self._server_step(
            server, Stage.MASKED_INPUT, lambda: server.receive_masked_inputs(masked)
        )
        masked.clear()  # the driver, like the server, keeps no individual masked vector
        signatures = self._client_stage(Stage.CONSISTENCY_CHECK, consistency_requests, self._sign)
        unmask_requests = self._server_step(
            server, Stage.CONSISTENCY_CHECK, lambda: server.receive_signatures(signatures)
        )
        reveals = self._client_stage(Stage.UNMASK, unmask_requests, self._reveal)
        result = self._server_step(server, Stage.UNMASK, lambda: server.receive_unmask(reveals))
        channel = self._channel
        return RoundOutcome(
            result, self.client_seconds, self.server_seconds, channel.upload, channel.download
        )

    def _answering(self, stage: Stage, requests: Mapping[int, object]) -> list[int]:
        self._gone.update(self._schedule.get(stage, set()))
        return [node for node in sorted(requests) if node not in self._gone]

    def _server_step(self, server: ServerRound, stage: Stage, step: Callable[[], T]) -> T:
        began = time.perf_counter()
        try:
            return step()
        finally:
            self.server_seconds += time.perf_counter() - began
            if self._observer is not None:
                self._observer(stage, server)

    def _client_stage(
        self,
        stage: Stage,
        requests: Mapping[int, RequestT],
        step: Callable[[int, RequestT], ReplyT],
    ) -> dict[int, ReplyT]:
        replies: dict[int, ReplyT] = {}
        channel = self._channel
        for node in self._answering(stage, requests):
            # Client time includes decoding the request and encoding the reply.
            began = time.perf_counter()
            reply = channel.reply(node, step(node, channel.send(node, requests[node])))
            self.client_seconds[node] += time.perf_counter() - began
            replies[node] = reply
        return replies

    def _advertise(self, node: int, request: SetupRequest) -> KeyAdvertisement:
        identity_keys = self._identity_keys
        state, advertisement = ClientRound.start(
            request,
            node,
            identity_key=None if identity_keys is None else identity_keys.get(node),
            identity_registry=self._registry,
        )
        self._channel.save(node, state)
        return advertisement

    def _share(self, node: int, request: ShareKeysRequest) -> ShareKeysResponse:
        state = self._channel.load(node)
        reply = state.share_keys(request)
        self._channel.save(node, state)
        return reply

    def _mask(self, node: int, request: MaskedInputRequest) -> MaskedInput:
        state = self._channel.load(node)
        reply = state.mask_input(request, self._vectors[node])
        self._channel.save(node, state)
        return reply

    def _sign(self, node: int, request: ConsistencyRequest) -> ConsistencySignature:
        state = self._channel.load(node)
        reply = state.sign_survivors(request)
        self._channel.save(node, state)
        return reply

    def _reveal(self, node: int, request: UnmaskRequest) -> UnmaskResponse:
        state = self._channel.load(node)
        reply = state.unmask(request)
        self._channel.save(node, state)
        return reply
