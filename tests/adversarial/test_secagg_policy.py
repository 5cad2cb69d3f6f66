"""Attack 4: unauthenticated or weakened secure aggregation.

The server sends each round's SecAgg+ parameters, and on the starting commit a
silo takes whatever it is sent: unauthenticated key advertisements (so the
server can stand in for any neighbour and collect its shares), a sparse graph
with a tiny threshold, a cohort smaller than the silo would ever accept. A fixed
silo checks every setup against its own policy and the consortium's signed
roster, before it trains or charges anything, and refuses with a reason code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flwr.app import RecordDict

from fedguard.privacy.secagg import (
    KeyAdvertisement,
    SecAggConfig,
    SetupRequest,
    ShareKeysRequest,
)
from fedguard.privacy.secagg.crypto import (
    ed25519_keypair,
    ed25519_sign,
    random_bytes,
    x25519_keypair,
)
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.secagg import secagg_record
from tests.adversarial.harness import (
    SETUP,
    Consortium,
    RosterKit,
    Silo,
    consortium,
    content_payload,
    deployed_silo,
    node_of,
    plain_instruction,
    status,
    vector_length,
)
from tests.factories import initial_weights, local_scaler

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

RUN = "run-a"


def _setup_reply(group: Consortium, silo: Silo, config: SecAggConfig) -> tuple[ReplyStatus, str]:
    """Send ``silo`` the setup of a round over every roster member with ``config``."""
    weights, scaler = initial_weights(), local_scaler(silo.settings)
    base = RecordDict(dict(plain_instruction(1, weights, scaler).content.items()))
    nodes = sorted(group.members)
    server, options = group.begin(nodes, config, vector_length(weights))
    setup = server.setup_requests()[silo.node_id].to_bytes()
    reply = silo.send(
        group.setup_content(base, setup, {"clip-norm": 0.0, "weight-unit": 1, **options}),
        protocol.SECAGG_SETUP,
    )
    got, reason = status(reply)
    if got is ReplyStatus.OK:
        charged = silo.ledger_entries()
        return got, (
            f"the silo trained, charged its ledger ({len(charged)} entry) and advertised its "
            f"round keys for {config}"
        )
    return got, reason


def _assert_refused(got: ReplyStatus, reason: str, code: str, silo: Silo, what: str) -> None:
    assert got is ReplyStatus.REFUSED, f"{what}: {got.value}: {reason}"
    assert reason.startswith(code), reason
    assert silo.ledger_entries() == [], f"{what}: the refusal charged {silo.ledger_entries()}"
    assert silo.secagg_secrets() == []


def test_an_unauthenticated_setup_is_refused(tmp_path: Path) -> None:
    group = consortium(tmp_path, 1, num_silos=3, roster_size=3)
    silo = group[0]
    config = group.secagg_config(3, require_identity=False)
    got, reason = _setup_reply(group, silo, config)
    _assert_refused(got, reason, "[secagg-unauthenticated]", silo, "a setup without identity keys")


def test_a_sparse_graph_with_a_tiny_threshold_is_refused(tmp_path: Path) -> None:
    """k = 2, t = 2 at n = 20: a privacy failure bound of about 2^1.6, not 2^-40."""
    group = consortium(tmp_path, 1, num_silos=3, roster_size=20)
    silo = group[0]
    config = dataclasses.replace(group.secagg_config(20), degree=2, threshold=2)
    got, reason = _setup_reply(group, silo, config)
    _assert_refused(got, reason, "[secagg-too-weak]", silo, "k=2, t=2 at n=20")


def test_a_cohort_below_the_silos_own_minimum_is_refused(tmp_path: Path) -> None:
    """The hospital's node config says ``min-cohort = 5``; the server asks for a sum of 4."""
    ids = ["hospital-0", "silo-1", "silo-2", "silo-3"]
    kit = RosterKit.create(ids)
    silo = deployed_silo(tmp_path, 0, node_config={"min-cohort": "5"}, kit=kit)
    members = {node_of(i): silo_id for i, silo_id in enumerate(ids)}
    group = Consortium([silo], kit, members)
    got, reason = _setup_reply(group, silo, group.secagg_config(4))
    _assert_refused(got, reason, "[cohort-too-small]", silo, "a cohort of 4 (minimum 5)")


def test_a_substituted_neighbour_advertisement_is_refused_and_reveals_nothing(
    tmp_path: Path,
) -> None:
    """The server stands in for V: it hands A its own keys under V's node id.

    If A accepts, it encrypts its shares of its mask key and self-mask seed for
    "V" under the server's key: the server reads them.
    """
    group = consortium(tmp_path, 3)
    a, v = group[0], group[2]
    server_identity, _ = ed25519_keypair()
    substituted: dict[str, KeyAdvertisement] = {}

    def stand_in_for_v(stage: str, node: int, content: RecordDict) -> RecordDict:
        if stage != "share-keys" or node != a.node_id:
            return content
        request = ShareKeysRequest.from_bytes(content_payload(content))
        genuine = next(ad for ad in request.advertisements if ad.node_id == v.node_id)
        fake = KeyAdvertisement(
            genuine.round_id,
            v.node_id,
            x25519_keypair()[1],
            x25519_keypair()[1],
            ed25519_keypair()[1],
            random_bytes(32),
        )
        if genuine.signature:
            digest = run_digest[0]
            fake = dataclasses.replace(
                fake, signature=ed25519_sign(server_identity, fake.signed_bytes(digest))
            )
        substituted["ad"] = fake
        ads = tuple(fake if ad.node_id == v.node_id else ad for ad in request.advertisements)
        forged = RecordDict(dict(content.items()))
        forged[protocol.SECAGG] = secagg_record(ShareKeysRequest(request.round_id, ads).to_bytes())
        return forged

    run_digest: list[bytes] = []
    weights, scaler = initial_weights(), local_scaler(a.settings)
    base = RecordDict(dict(plain_instruction(1, weights, scaler).content.items()))

    def tamper(stage: str, node: int, content: RecordDict) -> RecordDict:
        if stage == SETUP and not run_digest:
            run_digest.append(SetupRequest.from_bytes(content_payload(content)).digest())
        return stand_in_for_v(stage, node, content)

    run = group.run_secagg(
        group.node_ids, base, vector_length=vector_length(weights), tamper=tamper
    )
    assert "ad" in substituted, run.describe()
    got, reason = run.replies("share-keys")[a.node_id]
    assert got is not ReplyStatus.OK, (
        f"{a.silo_id} accepted the server's keys in place of {v.silo_id}'s and encrypted its "
        "key shares to the server\n" + run.describe()
    )
    reply = run.stages["share-keys"].replies[a.node_id]
    assert protocol.SECAGG not in reply.content.config_records, reason
    assert a.secagg_secrets() == [], "the refusing silo still holds its round secrets"
    assert not run.completed


def test_claimed_dropouts_cannot_shrink_the_revealed_sum_below_the_minimum_cohort(
    tmp_path: Path,
) -> None:
    """Every silo's policy says ``min-cohort = 5``; the server starts a round of 5 and then
    plays one silo dropped before masking: SecAgg+ alone (t + 1 = 4 live) would reveal the
    sum of 4. The silos refuse to sign or unmask a survivor list below their minimum."""
    try:
        from fedguard.client.policy import SiloPolicy

        policy = SiloPolicy(min_cohort=5)
    except ImportError:  # the starting commit: no silo policy, the attack runs as is
        policy = None
    group = consortium(tmp_path, 5, policy=policy)
    weights = initial_weights()
    scaler = local_scaler(group[0].settings)
    base = plain_instruction(1, weights, scaler, message_type=protocol.SECAGG_SETUP).content
    dropped = group[4].node_id
    run = group.run_secagg(
        group.node_ids,
        base,
        vector_length=vector_length(weights),
        silent={"masked-input": {dropped}},
    )
    assert not run.completed, (
        f"the server revealed a sum over {len(run.contributors)} silos, below every silo's "
        f"minimum cohort of 5:\n{run.describe()}"
    )
    answered = {
        **run.replies("consistency"),
        **run.replies("unmask"),
    }
    assert answered and all(
        got is ReplyStatus.REFUSED and reason.startswith("[cohort-too-small]")
        for got, reason in answered.values()
    ), run.describe()
