"""Authenticated SecAgg+ end to end: real silo agents, a server that cheats, in process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict

from fedguard.client.app import make_client_app
from fedguard.client.secure import STATE_KEY
from fedguard.core.config import LocalDPConfig
from fedguard.core.serialization import flatten_weights
from fedguard.privacy.secagg import (
    KeyAdvertisement,
    SecAggAbort,
    SetupRequest,
    ShareKeysRequest,
)
from fedguard.privacy.secagg.crypto import (
    ed25519_keypair,
    ed25519_sign,
    random_bytes,
    x25519_keypair,
)
from fedguard.privacy.secagg.roster import Roster, RosterError, sign_roster
from fedguard.server.secure_round import (
    SecAggIdentities,
    SecureAggregationSettings,
    SecureRoundResult,
    Send,
    run_secure_round,
    secagg_identities,
)
from fedguard.server.statistic_collection import grid_send
from fedguard.simulation.inprocess import InProcessGrid
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.secagg import PAYLOAD, ROSTER
from tests.factories import (
    consortium_identities,
    initial_weights,
    inprocess_node,
    instruction,
    local_scaler,
    silo_settings,
)

SILOS = 5
Rewrite = Callable[[str, int, RecordDict], RecordDict]


class Recorder:
    """The server's wire: every reply by message type, and an optional rewrite per message."""

    def __init__(self, grid: InProcessGrid, rewrite: Rewrite | None = None) -> None:
        self.send = grid_send(grid, "1")
        self.rewrite = rewrite
        self.replies: dict[str, dict[int, Message]] = {}

    def __call__(self, message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        if self.rewrite is not None:
            contents = {n: self.rewrite(message_type, n, c) for n, c in contents.items()}
        replies = self.send(message_type, contents)
        self.replies.setdefault(message_type, {}).update(replies)
        return replies

    def refusals(self, message_type: str) -> dict[int, tuple[str, str]]:
        out = {}
        for node, reply in self.replies.get(message_type, {}).items():
            status, reason = protocol.reply_status(reply)
            if status is ReplyStatus.REFUSED:
                record = reply.content.config_records[protocol.STATUS]
                out[node] = (str(record["refusal"]), reason)
        return out


def _grid(tmp_path: Path) -> InProcessGrid:
    app = make_client_app(
        lambda c: silo_settings(tmp_path, int(str(c.node_config["partition-id"])), num_silos=SILOS),
        allow_non_private=True,
    )
    return InProcessGrid(app, SILOS)


def _round(
    tmp_path: Path,
    send: Send,
    settings: SecureAggregationSettings,
    nodes: list[int] | None = None,
    round_number: int = 1,
) -> SecureRoundResult:
    weights = initial_weights()
    scaler = local_scaler(silo_settings(tmp_path, 0, num_silos=SILOS))
    content = instruction(
        round_number,
        weights,
        scaler,
        dp=LocalDPConfig(enabled=False),
        message_type=protocol.SECAGG_SETUP,
    ).content
    return run_secure_round(
        send,
        nodes or [inprocess_node(i) for i in range(SILOS)],
        content,
        flatten_weights(weights).size,
        settings,
    )


def _payload(content: RecordDict) -> bytes:
    value = content.config_records[protocol.SECAGG][PAYLOAD]
    assert isinstance(value, bytes)
    return value


def test_an_authenticated_round_completes(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    recorder = Recorder(grid)
    settings = SecureAggregationSettings(identities=consortium_identities(tmp_path, SILOS))
    result = _round(tmp_path, recorder, settings)
    assert sorted(result.contributors) == [inprocess_node(i) for i in range(SILOS)]
    assert result.config.require_identity
    # Every advertisement the server relayed carried an identity signature.
    for reply in recorder.replies[protocol.SECAGG_SETUP].values():
        ad = KeyAdvertisement.from_bytes(_payload(reply.content))
        assert len(ad.signature) == 64


def test_a_server_substituting_a_neighbours_keys_is_refused(tmp_path: Path) -> None:
    """The attack: relay the victim a neighbour's advert with the server's own keys."""
    victim, neighbour = inprocess_node(0), inprocess_node(1)
    server_identity, _ = ed25519_keypair()  # the server holds no silo's identity key
    digests: dict[int, bytes] = {}

    def substitute(message_type: str, node: int, content: RecordDict) -> RecordDict:
        if message_type == protocol.SECAGG_SETUP:
            digests[node] = SetupRequest.from_bytes(_payload(content)).digest()
        if message_type != protocol.SECAGG_SHARE or node != victim:
            return content
        request = ShareKeysRequest.from_bytes(_payload(content))
        ads = []
        for ad in request.advertisements:
            if ad.node_id != neighbour:
                ads.append(ad)
                continue
            unsigned = KeyAdvertisement(
                ad.round_id,
                neighbour,
                x25519_keypair()[1],
                x25519_keypair()[1],
                ed25519_keypair()[1],
                random_bytes(32),
            )
            signature = ed25519_sign(server_identity, unsigned.signed_bytes(digests[node]))
            ads.append(dataclasses.replace(unsigned, signature=signature))
        forged = ShareKeysRequest(request.round_id, tuple(ads))
        return RecordDict({protocol.SECAGG: ConfigRecord({PAYLOAD: forged.to_bytes()})})

    grid = _grid(tmp_path)
    recorder = Recorder(grid, substitute)
    settings = SecureAggregationSettings(identities=consortium_identities(tmp_path, SILOS))
    result = _round(tmp_path, recorder, settings)
    refused = recorder.refusals(protocol.SECAGG_SHARE)
    assert list(refused) == [victim]
    code, reason = refused[victim]
    assert code == "secagg-stage" and "does not verify under its identity key" in reason
    # The victim sent no shares, no masked input: its update is in no sum.
    assert victim not in result.contributors
    assert victim not in recorder.replies.get(protocol.SECAGG_MASK, {})
    assert STATE_KEY not in grid._contexts[victim].state.config_records  # secrets erased


def test_a_roster_forged_by_the_server_is_refused_by_every_silo(tmp_path: Path) -> None:
    identities = consortium_identities(tmp_path, SILOS)
    keys = dict(identities.roster.roster.silos)
    keys["silo-1"] = ed25519_keypair()[1]  # the server's own key for silo-1
    server_roster = sign_roster(Roster("the server", 99, keys), Ed25519PrivateKey.generate())

    def swap(message_type: str, node: int, content: RecordDict) -> RecordDict:
        if message_type == protocol.SECAGG_SETUP:
            content.config_records[protocol.SECAGG][ROSTER] = server_roster.to_bytes()
        return content

    recorder = Recorder(_grid(tmp_path), swap)
    with pytest.raises(SecAggAbort):
        _round(tmp_path, recorder, SecureAggregationSettings(identities=identities))
    refused = recorder.refusals(protocol.SECAGG_SETUP)
    assert sorted(refused) == [inprocess_node(i) for i in range(SILOS)]
    assert {code for code, _ in refused.values()} == {"secagg-roster"}
    assert all("does not verify" in reason for _, reason in refused.values())


def test_an_unauthenticated_round_is_refused_by_every_silo(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    recorder = Recorder(grid)
    settings = SecureAggregationSettings(
        identities=consortium_identities(tmp_path, SILOS), require_identity=False
    )
    with pytest.raises(SecAggAbort):
        _round(tmp_path, recorder, settings)
    refused = recorder.refusals(protocol.SECAGG_SETUP)
    assert sorted(refused) == [inprocess_node(i) for i in range(SILOS)]
    assert {code for code, _ in refused.values()} == {"secagg-unauthenticated"}
    for context in grid._contexts.values():  # refused before training: nothing kept
        assert STATE_KEY not in context.state.config_records


def test_nodes_without_a_unique_roster_identity_are_left_out(tmp_path: Path) -> None:
    identities = consortium_identities(tmp_path, SILOS)
    nodes = [inprocess_node(i) for i in range(SILOS)]
    grid = _grid(tmp_path)
    unknown = dict(identities.silo_ids)
    del unknown[nodes[4]]  # never said who it is
    recorder = Recorder(grid)
    settings = SecureAggregationSettings(identities=SecAggIdentities(identities.roster, unknown))
    result = _round(tmp_path, recorder, settings, round_number=1)
    assert sorted(result.contributors) == nodes[:4]
    assert "no silo id known" in result.dropped_at[nodes[4]]
    assert set(recorder.replies[protocol.SECAGG_SETUP]) == set(nodes[:4])  # never asked
    twice = {**identities.silo_ids, nodes[4]: "silo-3"}  # claims another silo's name
    recorder = Recorder(grid)
    settings = SecureAggregationSettings(identities=SecAggIdentities(identities.roster, twice))
    result = _round(tmp_path, recorder, settings, round_number=2)
    assert sorted(result.contributors) == nodes[:3]
    for node in nodes[3:]:
        assert "claimed by nodes" in result.dropped_at[node]
    assert set(recorder.replies[protocol.SECAGG_SETUP]) == set(nodes[:3])


def test_the_server_learns_silo_ids_by_asking(tmp_path: Path) -> None:
    identities = consortium_identities(tmp_path, SILOS)
    grid = _grid(tmp_path)
    known: dict[int, str] = {}
    nodes = [inprocess_node(i) for i in range(SILOS)]
    asked = secagg_identities(identities.roster, known, nodes, grid_send(grid, "who"))
    assert asked is not None and dict(asked.silo_ids) == dict(identities.silo_ids) == known
    assert secagg_identities(None, {}, nodes, grid_send(grid, "who")) is None


def test_no_secure_round_without_a_roster() -> None:
    with pytest.raises(RosterError, match="signed roster"):
        SecureAggregationSettings().begin([1, 2, 3], 4)
