"""The server side of SecAgg+ over Flower's ``Grid`` (five ``train.secagg_*`` stages).

Each stage sends every live silo its request and feeds the replies to
:class:`~fedguard.privacy.secagg.ServerRound`; a silo that does not answer, or
answers with a refusal, an error or a payload that does not validate, is a
dropout from that stage on. The result is the exact sum of the surviving silos'
encoded updates, decoded to Σ w_i Δ_i and Σ w_i: the server never holds one
silo's update (the ``ServerRound`` state keeps only a running sum of masked
vectors). Too few survivors anywhere raises
:class:`~fedguard.privacy.secagg.SecAggAbort`; the caller records the round as
failed and goes on.

Authentication: every round requires identity keys (``require_identity``). The
settings hold the consortium's signed roster and the node → silo mapping
(:class:`SecAggIdentities`); the setup carries the roster, the silo id of each
node and a nonce, and the round id commits to all three
(:func:`~fedguard.privacy.secagg.roster.bind_round_id`). Each silo verifies the
roster against its own consortium key (:mod:`fedguard.client.secure_identity`),
so the server cannot substitute one silo's advertisement keys; it verifies the
adverts under the same registry. A node whose silo id is unknown, missing from
the roster or claimed by two nodes is left out of the round (a dropout).

Why not Flower's SecAgg+: it runs only on the legacy API, expands masks with a
Mersenne Twister seeded from a 32-bit fold of the shared secret (flwr issue
7522), relays public keys unauthenticated, and hands Krum or the median n copies
of the aggregate. fedguard's protocol is in :mod:`fedguard.privacy.secagg`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from fedguard.client.secure import PAYLOAD, secagg_record
from fedguard.client.secure_identity import IDENTITY_QUERY, ROSTER, ROUND_NONCE, SILO_IDS
from fedguard.core import protocol
from fedguard.core.protocol import ReplyStatus
from fedguard.privacy.secagg import (
    AggregateResult,
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
from fedguard.privacy.secagg.errors import BelowThresholdError
from fedguard.privacy.secagg.roster import RosterError, SignedRoster, bind_round_id

Send = Callable[[str, Mapping[int, RecordDict]], dict[int, Message]]
#: SecAggConfig needs n >= 3: with two, each would learn the other's input.
_MIN_MEMBERS = 3


@dataclass(frozen=True)
class SecAggIdentities:
    """Who is who in a round: the signed roster and each node's silo id."""

    roster: SignedRoster
    silo_ids: Mapping[int, str]  # Flower node id -> silo id (from the silos' replies)

    def members(self, nodes: Sequence[int]) -> tuple[list[int], dict[int, str]]:
        """The nodes that can take part (a unique roster silo each), and why the others cannot."""
        listed = self.roster.roster.silos
        claims: dict[str, list[int]] = {}
        for node in nodes:
            claims.setdefault(self.silo_ids.get(node, ""), []).append(node)
        excluded: dict[int, str] = {}
        for node in nodes:
            silo = self.silo_ids.get(node)
            if silo is None:
                excluded[node] = "no silo id known for this node"
            elif silo not in listed:
                excluded[node] = f"silo {silo!r} is not in the consortium's roster"
            elif len(claims[silo]) > 1:
                excluded[node] = f"silo id {silo!r} is claimed by nodes {claims[silo]}"
        return [n for n in nodes if n not in excluded], excluded


def secagg_identities(
    roster: SignedRoster | None,
    known: dict[int, str],
    nodes: Sequence[int],
    send: Send,
) -> SecAggIdentities | None:
    """The identities of a round over ``nodes``; asks the nodes whose silo id is unknown.

    ``known`` (node -> silo id, learned from earlier replies) is updated in place.
    None without a roster.
    """
    if roster is None:
        return None
    unknown = [n for n in nodes if n not in known]
    if unknown:
        replies = send(IDENTITY_QUERY, {n: RecordDict() for n in unknown})
        for node, reply in replies.items():
            if node in unknown and reply.has_content():
                status = reply.content.config_records.get(protocol.STATUS)
                if status is not None and isinstance(status.get("silo-id"), str):
                    known.setdefault(node, str(status["silo-id"]))
    return SecAggIdentities(roster, dict(known))


@dataclass(frozen=True)
class SecureAggregationSettings:
    """How the server sets up each round (validated again by ``SecAggConfig``)."""

    clip_range: float = 0.5
    value_bits: int = 16
    dropout_rate: float = 0.1
    weight_unit: int = 1  # weights = ceil(examples / unit); 0 = every silo weighs 1
    clip_norm: float = 0.0  # > 0: silos clip Δ to this L2 norm first (central DP)
    # The signed roster and node -> silo mapping; every round needs them unless
    # require_identity is False (which every fedguard silo refuses: tests only).
    identities: SecAggIdentities | None = None
    require_identity: bool = True

    def config_for(self, num_clients: int) -> SecAggConfig:
        weight_bits = SecAggConfig.max_bits_per_value(num_clients) - self.value_bits
        return SecAggConfig.recommended(
            num_clients,
            dropout_rate=self.dropout_rate,
            clip_range=self.clip_range,
            value_bits=self.value_bits,
            weight_bits=max(weight_bits, 0),
            require_identity=self.require_identity,
        )

    def begin(self, nodes: Sequence[int], vector_length: int) -> tuple[ServerRound, dict[str, Any]]:
        """A new round over ``nodes`` and the options its setup carries (roster, silo ids)."""
        config = self.config_for(len(nodes))
        nonce = secrets.token_bytes(16)
        if not self.require_identity:
            server = ServerRound.begin(config, list(nodes), vector_length, round_id=nonce)
            return server, {}
        if self.identities is None:
            raise RosterError(
                "authenticated secure aggregation needs the consortium's signed roster "
                "and each node's silo id; none were given"
            )
        ordered = sorted(nodes)
        silo_ids = [self.identities.silo_ids[n] for n in ordered]
        roster = self.identities.roster.roster
        server = ServerRound.begin(
            config,
            ordered,
            vector_length,
            round_id=bind_round_id(nonce, roster, silo_ids),
            identity_registry=roster.registry(ordered, silo_ids),
        )
        options = {
            ROSTER: self.identities.roster.to_bytes(),
            SILO_IDS: silo_ids,
            ROUND_NONCE: nonce,
        }
        return server, options


@dataclass
class SecureRoundResult:
    """What the server learned: a sum, its total weight, and who took part."""

    config: SecAggConfig
    weighted_sum: np.ndarray
    total_weight: int
    contributors: tuple[int, ...]
    dropped_at: dict[int, str] = field(default_factory=dict)  # node -> stage and reason
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)


def _payload(reply: Message) -> bytes:
    value = reply.content.config_records[protocol.SECAGG][PAYLOAD]
    if not isinstance(value, bytes):
        raise TypeError("payload is not bytes")
    return value


def _metrics(reply: Message) -> dict[str, float]:
    if protocol.METRICS not in reply.content.metric_records:
        return {}
    return {
        k: float(v)
        for k, v in reply.content.metric_records[protocol.METRICS].items()
        if isinstance(v, (int, float))
    }


def run_secure_round(
    send: Send,
    nodes: list[int],
    instruction: RecordDict,
    vector_length: int,
    settings: SecureAggregationSettings,
    setup_message_type: str = protocol.SECAGG_SETUP,
) -> SecureRoundResult:
    """One SecAgg+ round: train + advertise, share, mask, check, unmask, decode."""
    (outcome,) = run_secure_groups(
        send, [nodes], instruction, vector_length, settings, setup_message_type
    )
    if isinstance(outcome, SecAggError):
        raise outcome
    return outcome


@dataclass
class _Group:
    """One group's server state while its stages run."""

    nodes: list[int]
    config: SecAggConfig
    server: ServerRound
    requests: Mapping[int, Any]
    options: dict[str, Any] = field(default_factory=dict)  # the setup's roster options
    dropped: dict[int, str] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failure: SecAggError | None = None


def run_secure_groups(
    send: Send,
    groups: Sequence[Sequence[int]],
    instruction: RecordDict,
    vector_length: int,
    settings: SecureAggregationSettings,
    setup_message_type: str = protocol.SECAGG_SETUP,
) -> list[SecureRoundResult | SecAggError]:
    """Independent SecAgg+ rounds, one per group, run stage by stage side by side.

    Each stage sends every group's requests in one ``send`` (so the groups train
    and mask at the same time, not one after another), then feeds each group's
    replies to that group's own :class:`ServerRound` (its own keys, graph,
    threshold and round id: a group learns nothing of another). A group that
    aborts (too few survivors, a share that does not reconstruct) is reported as
    its error and drops out of the later stages; the other groups go on. The
    result lists, per group, its decoded sum or its error.
    """
    seen: set[int] = set()
    for group in groups:
        if seen & set(group):
            raise ValueError("a node is in two secure groups")
        seen.update(group)
    states: list[_Group | SecAggError] = []
    for group in groups:
        members, excluded = (
            settings.identities.members(group)
            if settings.require_identity and settings.identities is not None
            else (list(group), {})
        )
        if len(members) < _MIN_MEMBERS:
            reasons = "; ".join(f"node {n}: {r}" for n, r in excluded.items())
            states.append(
                BelowThresholdError(
                    "setup",
                    f"{len(members)} of {len(group)} nodes can take part ({reasons}); "
                    f"a secure aggregate needs {_MIN_MEMBERS}",
                )
            )
            continue
        server, options = settings.begin(members, vector_length + 1)
        state = _Group(members, server.config, server, server.setup_requests(), options)
        state.dropped.update(
            {n: f"advertise-keys: not authenticated: {r}" for n, r in excluded.items()}
        )
        states.append(state)
    live = [s for s in states if isinstance(s, _Group)]

    def stage(
        name: str,
        message_type: str,
        parse: Callable[[bytes], Any],
        advance: Callable[[ServerRound, dict[int, Any]], Any],
        base: RecordDict | None = None,
    ) -> None:
        contents: dict[int, RecordDict] = {}
        for state in live:
            if state.failure is not None:
                continue
            for node, request in state.requests.items():
                content = RecordDict(dict(base.items())) if base is not None else RecordDict()
                content[protocol.SECAGG] = secagg_record(
                    request.to_bytes(),
                    **(
                        {
                            "clip-norm": settings.clip_norm,
                            "weight-unit": settings.weight_unit,
                            **state.options,
                        }
                        if base is not None
                        else {}
                    ),
                )
                contents[node] = content
        replies = send(message_type, contents) if contents else {}
        for state in live:
            if state.failure is not None:
                continue
            parsed: dict[int, Any] = {}
            for node in state.requests:
                reply = replies.get(node)
                if reply is None:
                    state.dropped.setdefault(node, f"{name}: no reply")
                    continue
                status, reason = protocol.reply_status(reply)
                if status is not ReplyStatus.OK:
                    state.dropped.setdefault(node, f"{name}: {status.value}: {reason}")
                    continue
                try:
                    parsed[node] = parse(_payload(reply))
                except (SecAggError, KeyError, TypeError, ValueError) as bad:
                    state.dropped.setdefault(node, f"{name}: malformed reply: {bad}")
                    continue
                if base is not None:
                    state.metrics[node] = _metrics(reply)
            try:
                state.requests = advance(state.server, parsed)
            except SecAggError as failed:
                state.failure = failed
                state.requests = {}

    stage(
        "advertise-keys",
        setup_message_type,
        KeyAdvertisement.from_bytes,
        ServerRound.receive_advertisements,
        base=instruction,
    )
    stage(
        "share-keys",
        protocol.SECAGG_SHARE,
        ShareKeysResponse.from_bytes,
        ServerRound.receive_shares,
    )
    # The server keeps only the running sum of masked vectors (ServerRound.masked_sum).
    stage(
        "masked-input",
        protocol.SECAGG_MASK,
        MaskedInput.from_bytes,
        ServerRound.receive_masked_inputs,
    )
    stage(
        "consistency",
        protocol.SECAGG_CONSISTENCY,
        ConsistencySignature.from_bytes,
        ServerRound.receive_signatures,
    )
    results: dict[int, AggregateResult] = {}

    def unmask(server: ServerRound, replies: dict[int, Any]) -> dict[int, Any]:
        results[id(server)] = server.receive_unmask(replies)
        return {}

    stage("unmask", protocol.SECAGG_UNMASK, UnmaskResponse.from_bytes, unmask)
    out: list[SecureRoundResult | SecAggError] = []
    for entry in states:
        if isinstance(entry, SecAggError):
            out.append(entry)
            continue
        state = entry
        for node, reason in state.server.rejected.items():
            state.dropped.setdefault(node, f"rejected: {reason}")
        if state.failure is not None:
            out.append(state.failure)
            continue
        result = results[id(state.server)]
        decoded = FixedPointEncoder(state.config).decode(result.total)
        out.append(
            SecureRoundResult(
                config=state.config,
                weighted_sum=decoded.weighted_sum,
                total_weight=decoded.total_weight,
                contributors=result.contributors,
                dropped_at=state.dropped,
                metrics=state.metrics,
            )
        )
    return out
