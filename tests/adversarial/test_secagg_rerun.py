"""Attack 3: re-running a round defeats secure aggregation.

The server runs round 1 under SecAgg+ over {A, B, C, D, V} and learns the sum.
It then runs round 1 again, as a fresh SecAgg instance, without V. On the
starting commit every silo answers the second setup from its outbox (the very
same update: "a replayed round costs no budget"), so the second sum is
A + B + C + D and the difference of the two sums is V's update, exactly
(correlation 1.0). A fixed silo takes part in at most one SecAgg instance per
(run, round, purpose): any other setup is refused (``[secagg-second-instance]``)
and charges nothing; a byte-identical repeat may be answered with the same
advertisement, but never yields a second masked input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.serialization import ModelWeights
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.statistics import SECAGG_STATISTIC
from tests.adversarial.harness import (
    SETUP,
    Consortium,
    SecAggRun,
    act_as_server,
    consortium,
    correlation,
    has_update,
    plain_instruction,
    reply_payload,
    reply_weights,
    status,
    update_of,
    vector_length,
)
from tests.adversarial.observe import (
    drift_query,
    released_statistic,
)
from tests.factories import initial_weights, local_scaler

SECOND_INSTANCE = "[secagg-second-instance]"
RUN = "run-a"
NONCE = b"round-1-nonce-0001"  # 18 bytes: a valid round id and a valid nonce
COHORT = 5
VICTIM = COHORT - 1


@dataclass
class RoundOne:
    """Five silos after an honest SecAgg+ round 1 (the server holds its sum)."""

    group: Consortium
    weights: ModelWeights
    scaler: FeatureScaler
    base: RecordDict
    first: SecAggRun


@pytest.fixture(scope="module")
def round_one(tmp_path_factory: pytest.TempPathFactory) -> RoundOne:
    act_as_server()
    tmp = tmp_path_factory.mktemp("round-one")
    group = consortium(tmp, COHORT)
    weights, scaler = initial_weights(), local_scaler(group[0].settings)
    base = RecordDict(dict(plain_instruction(1, weights, scaler).content.items()))
    first = group.run_secagg(
        group.node_ids, base, vector_length=vector_length(weights), nonce=NONCE
    )
    assert first.completed, first.describe()
    return RoundOne(group, weights, scaler, base, first)


def _fresh(round_one: RoundOne, tmp_path: Path) -> Consortium:
    return round_one.group.clone(tmp_path)


def _leak(group: Consortium, r1: RoundOne, second: SecAggRun) -> str:
    """What the server learns from the two sums (only if the second one was formed)."""
    assert r1.first.weighted_sum is not None and second.weighted_sum is not None
    left_out = sorted(set(r1.first.contributors) - set(second.contributors))
    difference = r1.first.weighted_sum - second.weighted_sum
    if not left_out:
        return "a second sum of the same inputs"
    victim = group.silos[left_out[0]]
    corr = correlation(difference, update_of(victim, RUN, 1, r1.weights))
    weight = (r1.first.total_weight or 0) - (second.total_weight or 0)
    return (
        f"the difference of the two sums is {victim.silo_id}'s update "
        f"(correlation {corr:.6f}, weight {weight})"
    )


def _assert_every_setup_refused(second: SecAggRun, nodes: list[int]) -> None:
    replies = second.replies(SETUP)
    for node in nodes:
        got, reason = replies[node]
        assert got is ReplyStatus.REFUSED, f"node {node}: {got.value} {reason}"
        assert reason.startswith(SECOND_INSTANCE), reason
    for later in ("share-keys", "masked-input", "consistency", "unmask"):
        assert not second.replies(later), f"a silo answered {later} of a second instance"


@pytest.mark.parametrize(
    "variant",
    [
        "new-nonce-without-victim",
        "same-nonce-without-victim",
        "new-nonce-same-cohort",
        "new-config",
    ],
)
def test_a_second_secagg_instance_of_a_round_is_refused(
    round_one: RoundOne, tmp_path: Path, variant: str
) -> None:
    group = _fresh(round_one, tmp_path)
    everyone = group.node_ids
    without_victim = [n for n in everyone if n != group[VICTIM].node_id]
    nodes = without_victim if "without-victim" in variant else everyone
    nonce = NONCE if variant in ("same-nonce-without-victim", "new-config") else None
    config = group.secagg_config(len(nodes), clip_range=0.25) if variant == "new-config" else None
    second = group.run_secagg(
        nodes,
        round_one.base,
        vector_length=vector_length(round_one.weights),
        nonce=nonce,
        config=config,
    )
    if second.completed:
        pytest.fail(
            f"the server ran round 1 a second time ({variant}) and got a second sum: "
            f"{_leak(group, round_one, second)}\n{second.describe()}"
        )
    _assert_every_setup_refused(second, nodes)
    for silo in group.silos.values():
        entries = silo.ledger_entries()
        assert [(e.run_id, e.round) for e in entries] == [(RUN, 1)], (
            f"{silo.silo_id}: the refusal charged something: {entries}"
        )


def test_a_byte_identical_repeat_of_a_finished_round_yields_no_second_masked_input(
    round_one: RoundOne, tmp_path: Path
) -> None:
    """Same round id, config, cohort and length: the same setup bytes. The server then
    plays V "dropped" after setup, so V's masks are unmasked away and the second sum
    would be everyone but V."""
    group = _fresh(round_one, tmp_path)
    victim = group[VICTIM].node_id
    first_ads = {
        node: reply_payload(reply) for node, reply in round_one.first.stages[SETUP].replies.items()
    }
    repeat = group.run_secagg(
        group.node_ids,
        round_one.base,
        vector_length=vector_length(round_one.weights),
        nonce=NONCE,
        silent={stage: {victim} for stage in ("share-keys", "masked-input", "consistency")},
    )
    assert repeat.server.setup.to_bytes() == round_one.first.server.setup.to_bytes()
    if repeat.completed:
        pytest.fail(
            "a byte-identical repeat of round 1's setup let the server form a second sum: "
            f"{_leak(group, round_one, repeat)}\n{repeat.describe()}"
        )
    for node, reply in repeat.stages[SETUP].replies.items():
        if status(reply)[0] is ReplyStatus.OK:
            assert reply_payload(reply) == first_ads[node], (
                f"node {node} answered the repeated setup with a new advertisement"
            )
    masked = repeat.replies("masked-input")
    assert not [n for n, (got, _) in masked.items() if got is ReplyStatus.OK], (
        f"a silo produced a second masked input of its round-1 update: {repeat.describe()}"
    )


def test_a_plain_train_replay_does_not_reveal_an_update_sent_only_under_secagg(
    round_one: RoundOne, tmp_path: Path
) -> None:
    """After the secure round, the server asks V for round 1 again, as plain ``train``.

    The update was only ever released inside a secure sum; answering from the
    outbox would hand it to the server in the clear, which is the same leak as a
    second SecAgg instance without V.
    """
    group = _fresh(round_one, tmp_path)
    victim = group[VICTIM]
    reply = victim.deliver(plain_instruction(1, round_one.weights, round_one.scaler))
    got, reason = status(reply)
    if has_update(reply):
        sent = reply_weights(reply)
        kept = victim.sent_update(RUN, 1)
        same = kept is not None and all(np.array_equal(sent[k], kept[k]) for k in kept)
        pytest.fail(
            f"{victim.silo_id} answered a plain train replay of a SecAgg round with "
            f"{'its masked-only update, in the clear' if same else 'a second update'} "
            f"(status {got.value})"
        )
    assert got is not ReplyStatus.OK, reason
    assert [(e.run_id, e.round) for e in victim.ledger_entries()] == [(RUN, 1)]


def test_a_redelivered_setup_mid_round_is_answered_with_the_same_advertisement(
    tmp_path: Path,
) -> None:
    """Flower may deliver a message twice: the repeat gets the same keys, or a refusal."""
    group = consortium(tmp_path, 1, num_silos=3, roster_size=3)
    silo = group[0]
    weights, scaler = initial_weights(), local_scaler(silo.settings)
    base = RecordDict(dict(plain_instruction(1, weights, scaler).content.items()))
    nodes = sorted(group.members)
    config = group.secagg_config(len(nodes))
    server, options = group.begin(nodes, config, vector_length(weights), nonce=NONCE)
    setup = server.setup_requests()[silo.node_id].to_bytes()
    content = group.setup_content(base, setup, {"clip-norm": 0.0, "weight-unit": 1, **options})
    first = silo.send(content, "train.secagg_setup")
    assert status(first)[0] is ReplyStatus.OK, status(first)
    again = silo.send(content, "train.secagg_setup")
    got, reason = status(again)
    if got is ReplyStatus.OK:
        assert reply_payload(again) == reply_payload(first), (
            "the redelivered setup was answered with fresh keys: a second key set (and a "
            "second self mask) for the same update"
        )
    # Nothing released yet (the masked input is the release): nothing charged.
    assert silo.ledger_entries() == [], reason


def test_a_second_secagg_instance_of_a_statistic_is_refused(
    round_one: RoundOne, tmp_path: Path
) -> None:
    """The trust layer's secure statistics: one SecAgg instance per (run, query, kind)."""
    group = _fresh(round_one, tmp_path)
    query = drift_query(round_one.weights, round_one.scaler)
    everyone = group.node_ids
    victim = group[VICTIM]
    without_victim = [n for n in everyone if n != victim.node_id]
    first = group.run_secagg(
        everyone,
        query.content,
        vector_length=query.vector_length,
        config=query.config(group, len(everyone)),
        setup_message_type=SECAGG_STATISTIC,
        options={"clip-norm": 0.0, "weight-unit": 0},
    )
    assert first.completed, first.describe()
    second = group.run_secagg(
        without_victim,
        query.content,
        vector_length=query.vector_length,
        config=query.config(group, len(without_victim)),
        setup_message_type=SECAGG_STATISTIC,
        options={"clip-norm": 0.0, "weight-unit": 0},
    )
    if second.completed:
        difference = query.values(first) - query.values(second)
        release = released_statistic(victim, RUN, query.query_round)
        corr = correlation(difference, release) if release is not None else float("nan")
        pytest.fail(
            "the server ran the drift query a second time without "
            f"{victim.silo_id}: the difference of the sums is its release "
            f"(correlation {corr:.6f})\n{second.describe()}"
        )
    _assert_every_setup_refused(second, without_victim)
    for silo in group.silos.values():
        drift = [e for e in silo.ledger_entries() if e.purpose.value == "drift"]
        assert len(drift) == 1, f"{silo.silo_id}: {drift}"
