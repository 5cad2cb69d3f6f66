"""Attack 5: a refusal that does not stick.

A silo that refuses (or fails) a SecAgg+ stage must forget that round: its
secrets (per-round private keys, self-mask seed, the shares it holds for its
neighbours) and its encoded update leave the node's ``context.state``, and
neither a corrected retry of the stage nor a fresh setup for the same (run,
round) is answered. On the starting commit the in-memory round state is erased
but never written back, so the node's state still holds every secret, and the
server simply retries with the request it should have sent: probing a silo's
reactions stage by stage costs it nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedguard.core.serialization import ModelWeights
from fedguard.privacy.secagg import (
    ConsistencyRequest,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    ServerRound,
    ShareKeysRequest,
    ShareKeysResponse,
)
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.secagg import PAYLOAD
from tests.adversarial.harness import (
    Consortium,
    act_as_server,
    consortium,
    plain_instruction,
    reply_payload,
    status,
    vector_length,
)
from tests.factories import initial_weights, local_scaler

RUN = "run-a"
FOREIGN_ROUND = b"another-round-id-0001"


@dataclass
class AfterSetup:
    """Three silos that trained round 1 and advertised keys; the server holds the adverts."""

    group: Consortium
    server: ServerRound
    share_requests: Mapping[int, ShareKeysRequest]
    base: RecordDict
    weights: ModelWeights

    def clone(self, tmp_path: Path) -> AfterSetup:
        return AfterSetup(
            self.group.clone(tmp_path),
            copy.deepcopy(self.server),
            self.share_requests,
            self.base,
            self.weights,
        )


@pytest.fixture(scope="module")
def after_setup(tmp_path_factory: pytest.TempPathFactory) -> AfterSetup:
    act_as_server()
    group = consortium(tmp_path_factory.mktemp("after-setup"), 3)
    weights, scaler = initial_weights(), local_scaler(group[0].settings)
    base = RecordDict(dict(plain_instruction(1, weights, scaler).content.items()))
    config = group.secagg_config(3)
    server, options = group.begin(group.node_ids, config, vector_length(weights))
    extra = {"clip-norm": 0.0, "weight-unit": 1, **options}
    ads: dict[int, KeyAdvertisement] = {}
    for node, request in server.setup_requests().items():
        reply = group.silos[node].send(
            group.setup_content(base, request.to_bytes(), extra), protocol.SECAGG_SETUP
        )
        assert status(reply)[0] is ReplyStatus.OK, status(reply)
        ads[node] = KeyAdvertisement.from_bytes(reply_payload(reply))
    return AfterSetup(group, server, server.receive_advertisements(ads), base, weights)


def _content(data: bytes) -> RecordDict:
    return RecordDict({protocol.SECAGG: ConfigRecord({PAYLOAD: data})})


def _exchange(
    group: Consortium, message_type: str, requests: Mapping[int, Any], parse: Callable[[bytes], Any]
) -> dict[int, Any]:
    """One honest stage with every silo."""
    parsed = {}
    for node, request in requests.items():
        reply = group.silos[node].send(_content(request.to_bytes()), message_type)
        assert status(reply)[0] is ReplyStatus.OK, status(reply)
        parsed[node] = parse(reply_payload(reply))
    return parsed


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


#: fault name → (the stage it hits, the bad message built from the honest request).
Fault = Callable[[Any], RecordDict]
FAULTS: dict[str, tuple[str, Fault]] = {
    "share-garbage-payload": (
        protocol.SECAGG_SHARE,
        lambda _request: _content(b"FGSA this is not a share-keys request"),
    ),
    "share-missing-payload": (
        protocol.SECAGG_SHARE,
        lambda _request: RecordDict({protocol.SECAGG: ConfigRecord({"clip-norm": 0.0})}),
    ),
    "share-altered-neighbour-keys": (
        protocol.SECAGG_SHARE,
        lambda request: _content(
            dataclasses.replace(
                request,
                advertisements=tuple(
                    dataclasses.replace(ad, mask_public=_flip(ad.mask_public))
                    for ad in request.advertisements
                ),
            ).to_bytes()
        ),
    ),
    "share-duplicated-advertisement": (
        protocol.SECAGG_SHARE,
        lambda request: _content(
            dataclasses.replace(
                request, advertisements=(*request.advertisements, request.advertisements[0])
            ).to_bytes()
        ),
    ),
    "share-foreign-round-id": (
        protocol.SECAGG_SHARE,
        lambda request: _content(
            ShareKeysRequest(FOREIGN_ROUND, request.advertisements).to_bytes()
        ),
    ),
    "mask-garbage-payload": (
        protocol.SECAGG_MASK,
        lambda _request: _content(b"\x00" * 40),
    ),
    "mask-foreign-round-id": (
        protocol.SECAGG_MASK,
        lambda request: _content(MaskedInputRequest(FOREIGN_ROUND, request.shares).to_bytes()),
    ),
    "consistency-foreign-round-id": (
        protocol.SECAGG_CONSISTENCY,
        lambda request: _content(ConsistencyRequest(FOREIGN_ROUND, request.survivors).to_bytes()),
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_refused_stage_erases_the_round_and_the_refusal_sticks(
    after_setup: AfterSetup, tmp_path: Path, fault: str
) -> None:
    state = after_setup.clone(tmp_path)
    group, server = state.group, state.server
    victim = group[0]
    message_type, bad = FAULTS[fault]
    requests: Mapping[int, Any] = state.share_requests
    # The honest stages before the faulted one, with every silo.
    if message_type in (protocol.SECAGG_MASK, protocol.SECAGG_CONSISTENCY):
        shares = _exchange(group, protocol.SECAGG_SHARE, requests, ShareKeysResponse.from_bytes)
        requests = server.receive_shares(shares)
    if message_type == protocol.SECAGG_CONSISTENCY:
        masked = _exchange(group, protocol.SECAGG_MASK, requests, MaskedInput.from_bytes)
        requests = server.receive_masked_inputs(masked)
    honest = requests[victim.node_id]
    assert victim.secagg_secrets(), "the harness should reach the stage with secrets held"

    reply = victim.send(bad(honest), message_type)
    got, reason = status(reply)
    assert got is not ReplyStatus.OK, f"the silo answered the faulty {fault} request"
    assert protocol.SECAGG not in reply.content.config_records

    held = victim.secagg_secrets()
    assert held == [], (
        f"after {got.value} ({reason[:100]}), the node's state still holds {held}: the "
        "refusal was not written back"
    )
    retry = victim.send(_content(honest.to_bytes()), message_type)
    retry_status, retry_reason = status(retry)
    assert retry_status is not ReplyStatus.OK, (
        f"the corrected retry of {message_type} was answered after the refusal: the server "
        "may probe the silo stage by stage at no cost"
    )
    assert protocol.SECAGG not in retry.content.config_records, retry_reason

    fresh, options = group.begin(group.node_ids, server.config, vector_length(state.weights))
    setup = fresh.setup_requests()[victim.node_id].to_bytes()
    again = victim.send(
        group.setup_content(state.base, setup, {"clip-norm": 0.0, "weight-unit": 1, **options}),
        protocol.SECAGG_SETUP,
    )
    again_status, again_reason = status(again)
    assert again_status is not ReplyStatus.OK, (
        "after refusing round 1 the silo joined a fresh SecAgg instance for round 1: a second "
        "masked input of the same update"
    )
    # Charged at release (the masked input): a refusal up to the mask stage released
    # nothing and cost nothing; a later one comes after the charge.
    released = message_type not in (protocol.SECAGG_SHARE, protocol.SECAGG_MASK)
    expected = [(RUN, 1)] if released else []
    assert [(e.run_id, e.round) for e in victim.ledger_entries()] == expected, again_reason
