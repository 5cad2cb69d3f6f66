"""A silo's own record of what it sent: one ``sent`` record per reply, in its state folder.

The silo agent appends to :class:`~fedguard.audit.logs.SiloLog`
(``<state-dir>/silo-log.jsonl``, next to its privacy ledger) once for every
reply it sends to a ``train``, ``train.secagg_setup``, ``train.secagg_mask`` (the
masked input: the release under SecAgg, charged right before it) or ``evaluate`` message
(and for every ``refused`` reply, whatever the message: a policy refusal names its
:class:`~fedguard.client.policy.RefusalReason` in ``reason``),
*after* the reply is built and *before* Flower sends it. Each record holds:

* ``run_id`` and ``round``: the fedguard run and round of the instruction
  (``null`` if the instruction was too malformed to say), and ``flower_run_id``;
* ``message_type``;
* ``update_sha256``: the order-independent content hash
  (:func:`fedguard.core.serialization.weights_sha256`) of the model the silo
  trained: the weights in a ``train`` reply, or, for ``train.secagg_setup``, the
  weights kept in the silo's outbox whose difference to the global model was
  encoded for secure aggregation (the server never sees them unmasked);
  ``null`` for ``evaluate`` and for a reply without an update;
* ``global_sha256``: the hash of the global model the instruction carried;
* ``epsilon``: the silo's total ε after the reply (the reply's
  ``epsilon-spent``, else the ledger's last charge, else 0);
* ``status``: ``ok``, ``refused``, ``error`` or ``replayed`` (a replayed round
  answered from the outbox, charging nothing), and the ``reason`` if any.

The log is signed with the silo's node key when its node config names one
(``signing-key``, the SuperNode authentication key ``fedguard client start``
writes there); otherwise it is only chained. If the record cannot be written the
reply is not sent as it is: :func:`record_reply` raises :class:`SiloLogError`, and
the agent answers ``error`` with that reason instead. An update that was trained
stays in the outbox, so a replayed round resends it, charging nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedguard.audit.logs import SiloLog
from fedguard.audit.pki import SigningKey, load_private_key
from fedguard.client.silo import SiloSettings
from fedguard.core.errors import FedguardError, LedgerError
from fedguard.core.serialization import record_to_weights, weights_sha256
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus, RoundInstructions

__all__ = ["LOGGED_MESSAGE_TYPES", "SIGNING_KEY", "SiloLogError", "record_reply"]

log = logging.getLogger(__name__)

#: The messages whose replies a silo logs (the ones that release something).
LOGGED_MESSAGE_TYPES = frozenset(
    {protocol.TRAIN, protocol.SECAGG_SETUP, protocol.SECAGG_MASK, protocol.EVALUATE}
)
#: Node config key: path of the private key the silo signs its log with.
SIGNING_KEY = "signing-key"

_LEDGER_FILE = "privacy-ledger.sqlite"


class SiloLogError(FedguardError):
    """The silo could not record a reply in its own log (the reply is not sent)."""


def _signing_key(node_config: Mapping[str, Any]) -> SigningKey | None:
    path = node_config.get(SIGNING_KEY)
    if path in (None, ""):
        return None
    return load_private_key(Path(str(path)))


def _instructions(message: Message) -> RoundInstructions | None:
    try:
        return RoundInstructions.from_record(message.content.config_records[protocol.CONFIG])
    except Exception:  # malformed: the reply says why; the log records what it can
        return None


def _global_sha256(message: Message) -> str | None:
    try:
        return weights_sha256(record_to_weights(message.content.array_records[protocol.ARRAYS]))
    except Exception:  # no or malformed model: nothing to name
        return None


def _metrics(reply: Message) -> dict[str, Any]:
    if reply.has_error() or protocol.METRICS not in reply.content.metric_records:
        return {}
    return dict(reply.content.metric_records[protocol.METRICS])


def _update_sha256(
    message_type: str, reply: Message, state_dir: Path, instructions: RoundInstructions | None
) -> str | None:
    if message_type == protocol.TRAIN:
        if reply.has_error() or protocol.ARRAYS not in reply.content.array_records:
            return None
        return weights_sha256(record_to_weights(reply.content.array_records[protocol.ARRAYS]))
    if message_type == protocol.SECAGG_SETUP and instructions is not None:
        from fedguard.client.outbox import Outbox

        sent = Outbox(state_dir).load(instructions.run_id, instructions.round)
        return None if sent is None else weights_sha256(sent.weights)
    return None


def _epsilon_after(settings: SiloSettings, metrics: Mapping[str, Any]) -> float | None:
    state_dir = Path(settings.state_dir)
    if "epsilon-spent" in metrics:
        return float(metrics["epsilon-spent"])
    if not (state_dir / _LEDGER_FILE).exists():
        return 0.0
    from fedguard.privacy.ledger import PrivacyLedger

    try:
        with PrivacyLedger.open(state_dir, settings.silo_id, settings.budget) as ledger:
            entries = ledger.entries()
    except LedgerError:
        # An unreadable ledger (a damaged page) must not keep the error reply that
        # says so out of the log: the record carries no ε instead.
        return None
    return float(entries[-1].epsilon_after) if entries else 0.0


def record_reply(
    settings: SiloSettings, node_config: Mapping[str, Any], message: Message, reply: Message
) -> Message:
    """Append the ``sent`` record for ``reply`` to the silo's log; return ``reply``.

    Replies to other message types pass through unrecorded. Raises :class:`SiloLogError`
    when the record cannot be written (or the signing key cannot be loaded).
    """
    message_type = message.metadata.message_type
    status, reason = protocol.reply_status(reply)
    # Every refusal is logged, whatever the stage: the silo's policy decisions are the
    # record an auditor reads to see what a server tried.
    if message_type not in LOGGED_MESSAGE_TYPES and status is not ReplyStatus.REFUSED:
        return reply
    state_dir = Path(settings.state_dir)
    try:
        metrics = _metrics(reply)
        instructions = _instructions(message)
        text = status.value
        if status is ReplyStatus.OK and float(metrics.get("replayed", 0)) == 1:
            text = "replayed"
        payload_update = _update_sha256(message_type, reply, state_dir, instructions)
        epsilon = _epsilon_after(settings, metrics)
        key = _signing_key(node_config)
        silo_log = SiloLog.open(state_dir, key)
        silo_log.sent(
            None if instructions is None else instructions.run_id,
            None if instructions is None else instructions.round,
            message_type,
            payload_update,
            epsilon,
            status=text,
            reason=reason,
            flower_run_id=int(message.metadata.run_id),
            global_sha256=_global_sha256(message),
        )
    except (FedguardError, OSError) as failed:
        raise SiloLogError(
            f"silo {settings.silo_id} could not record its {message_type} reply in "
            f"{state_dir / 'silo-log.jsonl'}, so it does not send it: "
            f"{type(failed).__name__}: {failed}"
        ) from failed
    return reply
