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

Why not Flower's SecAgg+: it runs only on the legacy API, expands masks with a
Mersenne Twister seeded from a 32-bit fold of the shared secret (flwr issue
7522), relays public keys unauthenticated, and hands Krum or the median n copies
of the aggregate. fedguard's protocol is in :mod:`fedguard.privacy.secagg`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import Message, RecordDict

from fedguard.client.secure import PAYLOAD, secagg_record
from fedguard.core import protocol
from fedguard.core.protocol import ReplyStatus
from fedguard.privacy.secagg import (
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

Send = Callable[[str, Mapping[int, RecordDict]], dict[int, Message]]
Reply = TypeVar("Reply")


@dataclass(frozen=True)
class SecureAggregationSettings:
    """How the server sets up each round (validated again by ``SecAggConfig``)."""

    clip_range: float = 0.5
    value_bits: int = 16
    dropout_rate: float = 0.1
    weight_unit: int = 1  # weights = ceil(examples / unit); 0 = every silo weighs 1
    clip_norm: float = 0.0  # > 0: silos clip Δ to this L2 norm first (central DP)

    def config_for(self, num_clients: int) -> SecAggConfig:
        weight_bits = SecAggConfig.max_bits_per_value(num_clients) - self.value_bits
        return SecAggConfig.recommended(
            num_clients,
            dropout_rate=self.dropout_rate,
            clip_range=self.clip_range,
            value_bits=self.value_bits,
            weight_bits=max(weight_bits, 0),
        )


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
) -> SecureRoundResult:
    """One SecAgg+ round: train + advertise, share, mask, check, unmask, decode."""
    config = settings.config_for(len(nodes))
    server = ServerRound.begin(config, nodes, vector_length + 1, round_id=secrets.token_bytes(16))
    dropped: dict[int, str] = {}
    metrics: dict[int, dict[str, float]] = {}

    def collect(
        stage: str,
        message_type: str,
        requests: Mapping[int, Any],
        parse: Callable[[bytes], Reply],
        base: RecordDict | None = None,
    ) -> dict[int, Reply]:
        contents: dict[int, RecordDict] = {}
        for node, request in requests.items():
            content = RecordDict(dict(base.items())) if base is not None else RecordDict()
            content[protocol.SECAGG] = secagg_record(
                request.to_bytes(),
                **(
                    {"clip-norm": settings.clip_norm, "weight-unit": settings.weight_unit}
                    if base is not None
                    else {}
                ),
            )
            contents[node] = content
        replies = send(message_type, contents)
        parsed: dict[int, Reply] = {}
        for node in requests:
            reply = replies.get(node)
            if reply is None:
                dropped.setdefault(node, f"{stage}: no reply")
                continue
            status, reason = protocol.reply_status(reply)
            if status is not ReplyStatus.OK:
                dropped.setdefault(node, f"{stage}: {status.value}: {reason}")
                continue
            try:
                parsed[node] = parse(_payload(reply))
            except (SecAggError, KeyError, TypeError, ValueError) as bad:
                dropped.setdefault(node, f"{stage}: malformed reply: {bad}")
                continue
            if base is not None:
                metrics[node] = _metrics(reply)
        return parsed

    ads = collect(
        "advertise-keys",
        protocol.SECAGG_SETUP,
        server.setup_requests(),
        KeyAdvertisement.from_bytes,
        base=instruction,
    )
    share_requests = server.receive_advertisements(ads)
    shares = collect(
        "share-keys", protocol.SECAGG_SHARE, share_requests, ShareKeysResponse.from_bytes
    )
    mask_requests = server.receive_shares(shares)
    masked = collect("masked-input", protocol.SECAGG_MASK, mask_requests, MaskedInput.from_bytes)
    consistency_requests = server.receive_masked_inputs(masked)
    masked.clear()  # the server keeps only the running sum (ServerRound.masked_sum)
    signatures = collect(
        "consistency",
        protocol.SECAGG_CONSISTENCY,
        consistency_requests,
        ConsistencySignature.from_bytes,
    )
    unmask_requests = server.receive_signatures(signatures)
    reveals = collect("unmask", protocol.SECAGG_UNMASK, unmask_requests, UnmaskResponse.from_bytes)
    result = server.receive_unmask(reveals)
    for node, reason in server.rejected.items():
        dropped.setdefault(node, f"rejected: {reason}")
    decoded = FixedPointEncoder(config).decode(result.total)
    return SecureRoundResult(
        config=config,
        weighted_sum=decoded.weighted_sum,
        total_weight=decoded.total_weight,
        contributors=result.contributors,
        dropped_at=dropped,
        metrics=metrics,
    )
