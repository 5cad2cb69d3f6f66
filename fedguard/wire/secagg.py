"""The SecAgg+ messages' wire form: the record that carries a stage's payload.

Both sides of every ``train.secagg_*`` stage put the protocol's bytes
(fedguard.privacy.secagg.messages) in the ``secagg`` config record under
:data:`PAYLOAD`; the setup request also names the signed roster, the cohort's
silo ids and the round nonce.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message

from fedguard.core.errors import ProtocolError
from fedguard.wire import protocol

__all__ = [
    "IDENTITY_QUERY",
    "PAYLOAD",
    "ROSTER",
    "ROUND_NONCE",
    "SILO_IDS",
    "payload",
    "secagg_record",
]

PAYLOAD = "payload"
ROSTER = "roster"
SILO_IDS = "silo-ids"
ROUND_NONCE = "round-nonce"
#: The server asks a node which silo it is (its reply's status record says).
IDENTITY_QUERY = "query.secagg_identity"


def payload(message: Message) -> bytes:
    """The stage's protocol bytes; ``ProtocolError`` if the message carries none."""
    records = message.content.config_records
    if protocol.SECAGG not in records or PAYLOAD not in records[protocol.SECAGG]:
        raise ProtocolError("SecAgg message has no payload")
    value = records[protocol.SECAGG][PAYLOAD]
    if not isinstance(value, bytes):
        raise ProtocolError("SecAgg payload must be bytes")
    return value


def secagg_record(data: bytes, **extra: int | float | str) -> ConfigRecord:
    return ConfigRecord({PAYLOAD: data, **extra})
