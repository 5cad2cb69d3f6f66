"""A malicious server: every tampering is refused with a typed error, nothing revealed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest

from fedguard.privacy.secagg.client_round import ClientRound
from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import ed25519_keypair
from fedguard.privacy.secagg.errors import (
    AdvertisementError,
    BelowThresholdError,
    ConsistencyError,
    IdentityError,
    RoundMismatchError,
    SecAggConfigError,
    SecAggError,
    ShareDecryptionError,
    SignatureError,
    StageOrderError,
)
from fedguard.privacy.secagg.messages import (
    ConsistencyRequest,
    EncryptedShare,
    MaskedInputRequest,
    ShareKeysRequest,
    UnmaskRequest,
)
from fedguard.privacy.secagg.server_round import ServerRound
from fedguard.privacy.secagg.transcript import Stage
from tests.privacy.secagg.helpers import ManualRound


def _pick(requests: Mapping[int, object]) -> int:
    return sorted(requests)[0]


# ------------------------------------------------------------- unmasking


def test_node_listed_both_dropped_and_alive_is_refused_and_nothing_revealed() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    requests = round_.to_unmask()
    node = _pick(requests)
    honest = requests[node]
    victim = next(n for n in honest.survivors if n != node)
    bad = replace(honest, dropped=tuple(sorted({*honest.dropped, victim})))
    with pytest.raises(ConsistencyError, match="both dropped and alive"):
        round_.clients[node].unmask(bad)
    # Refusing erased the held shares: even the honest request now reveals nothing.
    state = round_.clients[node]
    assert state.held_shares == {} and state.stage is Stage.DONE
    with pytest.raises(StageOrderError):
        state.unmask(honest)


def test_equivocating_server_cannot_collect_both_secrets_of_a_node() -> None:
    """Flower's flaw: tell some clients a node dropped and others that it is alive.

    Here the server shows half of the clients a survivor list without the victim
    and the other half one with it. No client of the first half can gather t
    neighbour signatures on its list, so none reveals the victim's mask key.
    """
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    consistency = round_.mask(round_.share(round_.advertise()))
    nodes = sorted(consistency)
    victim, told_dropped = nodes[0], nodes[1:3]
    everyone = consistency[victim].survivors
    without_victim = tuple(n for n in everyone if n != victim)
    signatures = {}
    for node in nodes:
        survivors = without_victim if node in told_dropped else everyone
        request = ConsistencyRequest(consistency[node].round_id, survivors)
        signatures[node] = round_.clients[node].sign_survivors(request)
    for node in told_dropped:
        request_all = UnmaskRequest(
            round_.server.round_id,
            without_victim,
            (victim,),
            tuple(signatures[n] for n in nodes if n != victim),
        )
        with pytest.raises(SignatureError):
            round_.clients[node].unmask(request_all)
    # Relaying only the signatures that do verify leaves fewer than t.
    fresh = ManualRound(SecAggConfig(5, 4, 3), round_id=b"round-0002")
    consistency = fresh.mask(fresh.share(fresh.advertise()))
    nodes = sorted(consistency)
    victim, told_dropped = nodes[0], nodes[1:3]
    everyone = consistency[victim].survivors
    without_victim = tuple(n for n in everyone if n != victim)
    signatures = {
        node: fresh.clients[node].sign_survivors(
            ConsistencyRequest(
                fresh.server.round_id, without_victim if node in told_dropped else everyone
            )
        )
        for node in nodes
    }
    node = told_dropped[0]
    valid_only = UnmaskRequest(
        fresh.server.round_id,
        without_victim,
        (victim,),
        tuple(signatures[n] for n in told_dropped),
    )
    with pytest.raises(BelowThresholdError, match="consistency signatures"):
        fresh.clients[node].unmask(valid_only)


def test_survivor_list_that_differs_from_the_signed_one_is_refused() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    requests = round_.to_unmask()
    node = _pick(requests)
    honest = requests[node]
    shorter = tuple(n for n in honest.survivors if n != honest.survivors[-1])
    with pytest.raises(ConsistencyError, match="differs from the one this node signed"):
        round_.clients[node].unmask(replace(honest, survivors=shorter))


def test_bad_consistency_signature_is_refused() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    requests = round_.to_unmask()
    node = _pick(requests)
    honest = requests[node]
    forged = list(honest.signatures)
    index = next(i for i, s in enumerate(forged) if s.node_id != node)
    flipped = bytes([forged[index].signature[0] ^ 1]) + forged[index].signature[1:]
    forged[index] = replace(forged[index], signature=flipped)
    with pytest.raises(SignatureError, match="consistency signature"):
        round_.clients[node].unmask(replace(honest, signatures=tuple(forged)))


def test_too_few_signatures_is_refused() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    requests = round_.to_unmask()
    node = _pick(requests)
    honest = requests[node]
    with pytest.raises(BelowThresholdError):
        round_.clients[node].unmask(replace(honest, signatures=honest.signatures[:2]))


def test_signature_from_a_non_survivor_is_refused() -> None:
    round_ = ManualRound(SecAggConfig(6, 5, 3))
    consistency = round_.mask(round_.share(round_.advertise()), skip=[round_.node_ids[-1]])
    requests = round_.sign(consistency)
    node = _pick(requests)
    honest = requests[node]
    # A signature of the dropped node over another list, relayed as if it had survived.
    dropped = round_.node_ids[-1]
    assert dropped in honest.dropped
    fake = replace(honest.signatures[0], node_id=dropped)
    with pytest.raises(ConsistencyError, match="not a survivor"):
        round_.clients[node].unmask(replace(honest, signatures=(*honest.signatures, fake)))


# ------------------------------------------------------------- replays


def test_request_replayed_from_another_round_is_refused() -> None:
    first = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-A-0001")
    second = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-B-0002")
    old_requests = first.advertise()
    second.advertise()
    node = _pick(old_requests)
    with pytest.raises(RoundMismatchError):
        second.clients[node].share_keys(old_requests[node])


def test_advertisement_from_another_round_is_refused() -> None:
    first = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-A-0001")
    second = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-B-0002")
    first.advertise()
    requests = second.advertise()
    node = _pick(requests)
    stale = tuple(first.ads[ad.node_id] for ad in requests[node].advertisements)
    with pytest.raises(RoundMismatchError):
        second.clients[node].share_keys(ShareKeysRequest(second.server.round_id, stale))


def test_share_replayed_from_another_round_fails_authentication() -> None:
    # Same nodes, same keys would still differ: the digest is in the key and the AAD.
    first = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-A-0001")
    second = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-B-0002")
    old = first.share(first.advertise())
    new = second.share(second.advertise())
    node = _pick(new)
    replayed = MaskedInputRequest(second.server.round_id, old[node].shares)
    with pytest.raises(ShareDecryptionError, match="AES-GCM"):
        second.clients[node].mask_input(replayed, second.inputs[node])


def test_replayed_stage_request_is_refused() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2))
    requests = round_.advertise()
    node = _pick(requests)
    round_.clients[node].share_keys(requests[node])
    with pytest.raises(StageOrderError, match="replayed or out-of-order"):
        round_.clients[node].share_keys(requests[node])


# ------------------------------------------------------------- advertisements


def test_reordered_advertisements_are_harmless() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    requests = round_.advertise()
    reordered = {
        node: replace(request, advertisements=request.advertisements[::-1])
        for node, request in requests.items()
    }
    result = round_.finish(round_.reveal(round_.sign(round_.mask(round_.share(reordered)))))
    np.testing.assert_array_equal(result.total, round_.expected_sum(round_.node_ids))


def test_tampered_advertisement_fails_its_identity_signature() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3), identity=True)
    requests = round_.advertise()
    node = _pick(requests)
    ads = list(requests[node].advertisements)
    # Swap two neighbours' mask keys (a man-in-the-middle substitution).
    a, b = ads[0], ads[1]
    ads[0], ads[1] = replace(a, mask_public=b.mask_public), replace(b, mask_public=a.mask_public)
    with pytest.raises(SignatureError, match="identity key"):
        round_.clients[node].share_keys(replace(requests[node], advertisements=tuple(ads)))


def test_relabelled_advertisement_fails_its_identity_signature() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3), identity=True)
    requests = round_.advertise()
    node = _pick(requests)
    ads = list(requests[node].advertisements)
    ads[0], ads[1] = (
        replace(ads[0], node_id=ads[1].node_id),
        replace(ads[1], node_id=ads[0].node_id),
    )
    with pytest.raises(SignatureError):
        round_.clients[node].share_keys(replace(requests[node], advertisements=tuple(ads)))


def test_substituted_keys_are_refused_by_the_server_too() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2), identity=True)
    for node, request in round_.server.setup_requests().items():
        state, ad = ClientRound.start(
            request,
            node,
            identity_key=round_.identity_keys[node],  # type: ignore[index]
            identity_registry=round_.registry,
        )
        round_.clients[node] = state
        round_.ads[node] = ad
    victim = round_.node_ids[0]
    round_.ads[victim] = replace(round_.ads[victim], share_public=b"\x09" * 32)
    round_.server.receive_advertisements(round_.ads)
    assert "signature" in round_.server.rejected[victim]


def test_duplicate_own_and_foreign_advertisement_checks() -> None:
    round_ = ManualRound(SecAggConfig(6, 4, 3))
    requests = round_.advertise()
    node = _pick(requests)
    request = requests[node]
    with pytest.raises(AdvertisementError, match="two advertisements"):
        round_.clients[node].share_keys(
            replace(request, advertisements=(*request.advertisements, request.advertisements[0]))
        )
    fresh = ManualRound(SecAggConfig(6, 4, 3))
    requests = fresh.advertise()
    own = replace(fresh.ads[node], mask_public=bytes(reversed(fresh.ads[node].mask_public)))
    with pytest.raises(AdvertisementError, match="altered"):
        fresh.clients[node].share_keys(
            replace(requests[node], advertisements=(*requests[node].advertisements, own))
        )
    fresh = ManualRound(SecAggConfig(6, 4, 3))
    requests = fresh.advertise()
    stranger = next(
        n for n in fresh.node_ids if n != node and n not in fresh.server.graph.neighbours(node)
    )
    with pytest.raises(AdvertisementError, match="non-neighbour"):
        fresh.clients[node].share_keys(
            replace(
                requests[node],
                advertisements=(*requests[node].advertisements, fresh.ads[stranger]),
            )
        )


def test_reflected_key_is_refused() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2))
    requests = round_.advertise()
    node = _pick(requests)
    ads = list(requests[node].advertisements)
    ads[0] = replace(ads[0], mask_public=round_.ads[node].mask_public)
    with pytest.raises(AdvertisementError, match="reuses a key"):
        round_.clients[node].share_keys(replace(requests[node], advertisements=tuple(ads)))


# ------------------------------------------------------------- shares


def test_share_for_another_receiver_fails_aes_gcm() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2))
    requests = round_.share(round_.advertise())
    node, other = sorted(requests)[:2]
    # A ciphertext meant for ``other`` relabelled as addressed to ``node``.
    foreign = next(s for s in requests[other].shares if s.sender != node)
    relabelled = EncryptedShare(foreign.sender, node, foreign.ciphertext)
    shares = tuple(relabelled if s.sender == foreign.sender else s for s in requests[node].shares)
    with pytest.raises(ShareDecryptionError, match="AES-GCM"):
        round_.clients[node].mask_input(replace(requests[node], shares=shares), round_.inputs[node])


def test_shares_swapped_between_senders_fail_aes_gcm() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2))
    requests = round_.share(round_.advertise())
    node = _pick(requests)
    a, b = requests[node].shares[:2]
    swapped = (
        EncryptedShare(a.sender, node, b.ciphertext),
        EncryptedShare(b.sender, node, a.ciphertext),
        *requests[node].shares[2:],
    )
    with pytest.raises(ShareDecryptionError):
        round_.clients[node].mask_input(
            replace(requests[node], shares=swapped), round_.inputs[node]
        )


def test_share_addressed_elsewhere_is_refused() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2))
    requests = round_.share(round_.advertise())
    node, other = sorted(requests)[:2]
    wrong = requests[other].shares[0]
    with pytest.raises(ShareDecryptionError, match="addressed to"):
        round_.clients[node].mask_input(
            replace(requests[node], shares=(*requests[node].shares[1:], wrong)),
            round_.inputs[node],
        )


def test_too_few_shares_is_refused_before_masking() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    requests = round_.share(round_.advertise())
    node = _pick(requests)
    with pytest.raises(BelowThresholdError, match="encrypted shares"):
        round_.clients[node].mask_input(
            replace(requests[node], shares=requests[node].shares[:2]), round_.inputs[node]
        )


# ------------------------------------------------------------- identities


def test_client_with_a_registry_refuses_an_unauthenticated_round() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2))
    registry = {n: ed25519_keypair()[1] for n in round_.node_ids}
    setup = round_.server.setup
    with pytest.raises(IdentityError, match="without identity"):
        ClientRound.start(setup, round_.node_ids[0], identity_registry=registry)


def test_client_refuses_a_config_other_than_the_agreed_one() -> None:
    agreed = SecAggConfig(6, 4, 3)
    weaker = ManualRound(SecAggConfig(6, 2, 2))
    with pytest.raises(SecAggConfigError, match="agreed"):
        ClientRound.start(weaker.server.setup, weaker.node_ids[0], expected_config=agreed)
    same = ManualRound(agreed)
    ClientRound.start(same.server.setup, same.node_ids[0], expected_config=agreed)


def test_identity_key_must_match_the_registry() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2, require_identity=True), identity=True)
    node = round_.node_ids[0]
    with pytest.raises(IdentityError, match="does not match"):
        ClientRound.start(
            round_.server.setup,
            node,
            identity_key=ed25519_keypair()[0],
            identity_registry=round_.registry,
        )
    with pytest.raises(IdentityError, match="requires identity keys"):
        ClientRound.start(round_.server.setup, node)


def test_server_requires_identity_keys_for_every_node() -> None:
    with pytest.raises(IdentityError):
        ServerRound.begin(SecAggConfig(4, 3, 2, require_identity=True), [1, 2, 3, 4], 8)


def test_server_rejects_replies_from_another_round() -> None:
    first = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-A-0001")
    second = ManualRound(SecAggConfig(4, 3, 2), round_id=b"round-B-0002")
    first.advertise()
    node = first.node_ids[0]
    ads = {}
    for n, request in second.server.setup_requests().items():
        state, ad = ClientRound.start(request, n)
        second.clients[n] = state
        ads[n] = ad
    ads[node] = first.ads[node]
    second.server.receive_advertisements(ads)
    assert "another round" in second.server.rejected[node]


def test_every_refusal_is_a_secagg_error() -> None:
    assert all(
        issubclass(e, SecAggError)
        for e in (
            AdvertisementError,
            BelowThresholdError,
            ConsistencyError,
            IdentityError,
            RoundMismatchError,
            ShareDecryptionError,
            SignatureError,
            StageOrderError,
        )
    )
