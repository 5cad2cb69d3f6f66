"""The silo side of authenticated SecAgg+: the roster check before a round starts.

The server sends, in the ``secagg`` record of the setup (next to ``clip-norm``
and ``weight-unit``):

* ``roster``: the consortium's signed roster (:mod:`fedguard.privacy.secagg.roster`,
  the JSON file's bytes);
* ``silo-ids``: the silo id of each node of ``setup.node_ids``, in that order;
* ``round-nonce``: 16–64 random bytes; the setup's round id must equal
  :func:`~fedguard.privacy.secagg.roster.bind_round_id` of the nonce, the roster
  and the silo list, so every signature of the round commits to them.

:func:`authenticate_setup` checks them against the silo's own settings (its
policy, its identity key, the consortium key it trusts) and returns the
identity key and the ``node → identity key`` registry that
:meth:`~fedguard.privacy.secagg.ClientRound.start` needs. Every problem is a
:class:`~fedguard.client.policy.PolicyRefusalError` (``secagg-roster``), so the
silo replies ``refused``, before it trains or charges anything.

Roll-back: the silo keeps, in ``secagg-roster-seen.json`` in its state folder, the
highest roster serial (and its digest) it has accepted under each consortium
key; an older roster, or another roster with the same serial, is refused (a
server replaying a roster that still lists a since-replaced key).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, RecordDict

from fedguard.client.policy import PolicyRefusalError, RefusalReason
from fedguard.core.files import atomic_write_json
from fedguard.privacy.secagg.messages import SetupRequest
from fedguard.privacy.secagg.roster import (
    Roster,
    RosterError,
    SignedRoster,
    bind_round_id,
    key_fingerprint,
)
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.secagg import ROSTER, ROUND_NONCE, SILO_IDS

if TYPE_CHECKING:
    from fedguard.client.silo import SiloSettings

__all__ = [
    "ROSTER_STATE",
    "RoundIdentity",
    "authenticate_setup",
    "identity_reply",
]

ROSTER_STATE = "secagg-roster-seen.json"


@dataclass(frozen=True)
class RoundIdentity:
    """This silo's identity key and the round's verified ``node → identity key`` registry."""

    key: bytes = field(repr=False)
    registry: Mapping[int, bytes]


def _refuse(detail: str) -> PolicyRefusalError:
    return PolicyRefusalError(RefusalReason.SECAGG_ROSTER, detail)


def _option_bytes(options: ConfigRecord, key: str) -> bytes:
    value = options.get(key)
    if not isinstance(value, bytes):
        raise RosterError(f"the setup carries no {key!r} (bytes)")
    return value


def _option_strings(options: ConfigRecord, key: str) -> list[str]:
    value = options.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RosterError(f"the setup carries no {key!r} (a list of silo ids)")
    return [str(v) for v in value]


def authenticate_setup(
    setup: SetupRequest, options: ConfigRecord, settings: SiloSettings, node_id: int
) -> RoundIdentity:
    """Check a SecAgg setup against the silo's policy and the signed roster.

    Raises :class:`PolicyRefusalError`: the policy's reasons (cohort, identity not
    required, degree or threshold too weak), or ``secagg-roster`` for a silo with
    no identity, a roster that does not verify under the silo's consortium key, a
    roster whose entry for this silo is not its identity key, an older roster, a
    silo list that repeats a silo, names one the roster does not list, does not
    match the node list or puts this node under another silo's name, and a round
    id that does not commit to the roster and the list.
    """
    settings.policy.check_secagg(setup.config)
    identity = settings.identity
    if identity is None:
        raise _refuse(
            f"silo {settings.silo_id} has no SecAgg identity configured (node config "
            "'secagg-identity-key' and 'consortium-key'): it takes part in no secure "
            "aggregation"
        )
    try:
        trusted = identity.trusted_key()
        roster = SignedRoster.from_bytes(_option_bytes(options, ROSTER)).verify(trusted)
        silo_ids = _option_strings(options, SILO_IDS)
        registry = roster.registry(setup.node_ids, silo_ids)
        if node_id not in setup.node_ids:
            raise RosterError(f"node {node_id} is not among the round's nodes")
        claimed = silo_ids[setup.node_ids.index(node_id)]
        if claimed != settings.silo_id:
            raise RosterError(
                f"the server lists this node as silo {claimed!r}; it is {settings.silo_id!r}"
            )
        if roster.key_of(settings.silo_id) != identity.public_key:
            raise RosterError(
                f"the roster's identity key for {settings.silo_id!r} is not this silo's "
                "own key: a substituted roster entry, or a key this silo does not hold"
            )
        if bind_round_id(_option_bytes(options, ROUND_NONCE), roster, silo_ids) != setup.round_id:
            raise RosterError("the round id does not commit to the roster and the silo list")
        _check_serial(settings.state_dir, key_fingerprint(trusted), roster)
    except RosterError as bad:
        raise _refuse(str(bad)) from None
    return RoundIdentity(identity.private_key, registry)


def _check_serial(state_dir: Path, signer: str, roster: Roster) -> None:
    """Refuse a roster older than (or conflicting with) one accepted before; remember it."""
    path = Path(state_dir) / ROSTER_STATE
    seen: dict[str, dict[str, object]] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as bad:
            raise RosterError(f"{path} is unreadable ({bad}); remove it to start over") from None
        if not isinstance(loaded, dict):
            raise RosterError(f"{path} is not a roster record; remove it to start over")
        seen = loaded
    digest = roster.digest().hex()
    last = seen.get(signer)
    if isinstance(last, dict):
        serial = last.get("serial")
        if not isinstance(serial, int):
            raise RosterError(f"{path} is corrupt; remove it to start over")
        if roster.serial < serial:
            raise RosterError(
                f"roster serial {roster.serial} is older than serial {serial}, which this "
                "silo accepted before: refusing a rolled-back roster"
            )
        if roster.serial == serial:
            if last.get("digest") != digest:
                raise RosterError(
                    f"another roster with serial {serial} was accepted before: the consortium "
                    "key signed two different rosters with one serial"
                )
            return
    seen[signer] = {"serial": roster.serial, "digest": digest}
    atomic_write_json(path, seen)


def identity_reply(settings: SiloSettings, message: Message) -> Message:
    """The answer to :data:`IDENTITY_QUERY`: the silo's id, in the status record only."""
    status = protocol.status_record(ReplyStatus.OK, "", settings.silo_id)
    return Message(RecordDict({protocol.STATUS: status}), reply_to=message)
