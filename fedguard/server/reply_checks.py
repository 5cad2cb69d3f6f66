"""The server's checks of one silo's training reply (the plain, non-secure path).

Split from :mod:`fedguard.server.orchestrator`. Each reply is classified: an ``ok``
update is checked (model arrays present, names, shapes and dtype as the global
model's, finite values, the norm guard on ‖Δ‖, a positive integer example count) and
rejected with a reason otherwise; ``refused`` (a silo's budget) and ``error`` replies
and silent silos keep the status :func:`~fedguard.server.round_records.reply_outcome`
gives them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from fedguard.aggregation.pipeline import ClientUpdate
from fedguard.core.errors import ProtocolError, UpdateRejectedError
from fedguard.core.serialization import (
    ModelWeights,
    flatten_weights,
    record_to_weights,
    validate_weights,
)
from fedguard.server.norm_guard import check_update_norm
from fedguard.server.round_records import NodeOutcome, OutcomeStatus, reply_outcome
from fedguard.wire import protocol

__all__ = ["check_train_reply", "reply_metrics"]


def check_train_reply(
    node: int,
    name: str,
    replies: Mapping[int, Message],
    weights: ModelWeights,
    global_vector: np.ndarray,
    update_clip_norm: float,
) -> tuple[NodeOutcome, ClientUpdate | None]:
    """Silo ``name`` (node ``node``)'s outcome, and its update when it is accepted."""
    status, reason = reply_outcome(replies, node)
    reply = replies.get(node)
    if reply is None or status is OutcomeStatus.NO_REPLY:
        # Silent or gone: it may have charged and died before its update left.
        return NodeOutcome(node, name, status, reason), None
    metrics = reply_metrics(reply)
    if status is not OutcomeStatus.OK:
        # Refused or failed: nothing left the silo (it charges at release).
        return NodeOutcome(node, name, status, reason, metrics, released=False), None
    try:
        if protocol.ARRAYS not in reply.content.array_records:
            raise ProtocolError("reply has no model arrays")
        candidate = record_to_weights(reply.content.array_records[protocol.ARRAYS])
        validate_weights(weights, candidate)
        new_vector = flatten_weights(candidate)
        delta = new_vector - global_vector
        # The norm guard (fedguard.server.norm_guard): ‖Δ‖ within update_clip_norm.
        check_update_norm(delta, update_clip_norm, float(np.linalg.norm(new_vector)))
        num_examples = metrics.get("num-examples", float("nan"))
        if not (math.isfinite(num_examples) and num_examples >= 1 and num_examples.is_integer()):
            raise UpdateRejectedError(
                f"num-examples must be a positive integer, got {num_examples}"
            )
    except (UpdateRejectedError, ProtocolError, ValueError, TypeError) as bad:
        reason = getattr(bad, "reason", str(bad))
        rejected = NodeOutcome(node, name, OutcomeStatus.REJECTED, reason, metrics, released=True)
        return rejected, None
    return (
        NodeOutcome(node, name, OutcomeStatus.OK, "", metrics, released=True),
        ClientUpdate(node, name, delta, int(num_examples)),
    )


def reply_metrics(reply: Message) -> dict[str, float]:
    """The reply's numeric metrics (``{}`` when it has none)."""
    if not reply.has_content() or protocol.METRICS not in reply.content.metric_records:
        return {}
    out: dict[str, float] = {}
    for key, value in reply.content.metric_records[protocol.METRICS].items():
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out
