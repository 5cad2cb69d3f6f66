"""Every field of every silo reply is one the threat model lists (docs/threat-model.md §3.1).

The real silo agent answers each message type a server can send (plain training,
evaluation, the five SecAgg+ stages of a training round, a trust statistic);
every (message type, record, field) of every reply must appear in the threat
model's table, so a new value cannot start leaving the silo unnoticed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict

from fedguard.core.config import NoiseSource
from fedguard.server.secure_metrics import federated_scaler
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.secagg import IDENTITY_QUERY
from fedguard.wire.statistics import SECAGG_STATISTIC
from tests.adversarial.harness import (
    act_as_server,
    consortium,
    plain_instruction,
    status,
    vector_length,
)
from tests.adversarial.observe import (
    drift_query,
)
from tests.factories import initial_weights, local_scaler, small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

THREAT_MODEL = Path(__file__).resolve().parents[2] / "docs" / "threat-model.md"
ANY_MESSAGE = "*"
MODEL_TENSORS = "(every model tensor)"

Field = tuple[str, str, str]


def listed_fields() -> set[Field]:
    """(message, record, field) of every row of the §3.1 table."""
    text = THREAT_MODEL.read_text(encoding="utf-8")
    section = text.split("### 3.1", 1)[1].split("\n### ", 1)[0]
    rows: set[Field] = set()
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("message", "") or set(cells[0]) <= {"-"}:
            continue
        rows.add((cells[0], cells[1], cells[2]))
    return rows


def reply_fields(message_type: str, reply: Message) -> set[Field]:
    """What one reply carries: every key of every record."""
    content = reply.content
    fields: set[Field] = set()
    for name, config in content.config_records.items():
        fields |= {(message_type, name, key) for key in config}
    for name, metrics in content.metric_records.items():
        fields |= {(message_type, name, key) for key in metrics}
    for name, arrays in content.array_records.items():
        if message_type == protocol.TRAIN and name == protocol.ARRAYS:
            fields.add((message_type, name, MODEL_TENSORS))
        else:
            fields |= {(message_type, name, key) for key in arrays}
    return fields


def unlisted(sent: Iterable[Field], listed: set[Field]) -> list[Field]:
    return sorted(f for f in sent if f not in listed and (ANY_MESSAGE, f[1], f[2]) not in listed)


def test_the_threat_model_table_parses() -> None:
    listed = listed_fields()
    assert (ANY_MESSAGE, protocol.STATUS, "status") in listed
    assert (protocol.TRAIN, protocol.ARRAYS, MODEL_TENSORS) in listed
    assert all(re.fullmatch(r"[a-z*_.]+", m) for m, _, _ in listed)


def test_every_reply_field_is_listed_in_the_threat_model(tmp_path: Path) -> None:
    act_as_server()
    listed = listed_fields()
    group = consortium(tmp_path, 3)
    weights = initial_weights()
    scaler = local_scaler(group[0].settings)
    sent: set[Field] = set()
    replies: list[tuple[str, Message]] = []

    # Plain training and evaluation.
    train = group[0].deliver(plain_instruction(1, weights, scaler, run_id="plain"))
    evaluation = group[0].deliver(
        plain_instruction(1, weights, scaler, run_id="plain", message_type=protocol.EVALUATE)
    )
    replies += [(protocol.TRAIN, train), (protocol.EVALUATE, evaluation)]

    # A SecAgg+ training round: all five stages.
    base = plain_instruction(1, weights, scaler, message_type=protocol.SECAGG_SETUP).content
    run = group.run_secagg(group.node_ids, base, vector_length=vector_length(weights))
    assert run.completed, run.describe()
    for stage in run.stages.values():
        for reply in stage.replies.values():
            replies.append((reply.metadata.message_type, reply))

    # A trust-layer statistic (its setup is a query).
    query = drift_query(weights, scaler)
    statistic = group.run_secagg(
        group.node_ids,
        query.content,
        vector_length=query.vector_length,
        config=query.config(group, 3),
        setup_message_type=SECAGG_STATISTIC,
        options={"weight-unit": 0},
    )
    assert statistic.completed, statistic.describe()
    for stage in statistic.stages.values():
        for reply in stage.replies.values():
            replies.append((reply.metadata.message_type, reply))

    # The federated scaler's feature moments in plain mode, as the server asks for them.
    def send(message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        answers = {node: group.silos[node].send(c, message_type) for node, c in contents.items()}
        replies.extend((message_type, reply) for reply in answers.values())
        return answers

    config = small_config(tmp_path)
    federated_scaler(
        send,
        group.node_ids,
        config,
        plain_instruction(1, weights, scaler, run_id="scaler").content.config_records[
            protocol.CONFIG
        ],
        lambda node: group.members[node],
    )
    assert any(t == protocol.FEATURE_STATISTICS for t, _ in replies)

    # The server's question "which silo are you" (SecAgg+ needs every node's silo id).
    replies.append((IDENTITY_QUERY, group[2].send(RecordDict({}), IDENTITY_QUERY)))

    # A refusal (its status record has the refusal code).
    refused = group[1].deliver(
        plain_instruction(1, weights, scaler, run_id="plain", noise_source=NoiseSource.SEEDED)
    )
    assert status(refused)[0] is ReplyStatus.REFUSED
    replies.append((protocol.TRAIN, refused))

    for message_type, reply in replies:
        assert status(reply)[0] in (ReplyStatus.OK, ReplyStatus.REFUSED), status(reply)
        sent |= reply_fields(message_type, reply)
    missing = unlisted(sent, listed)
    assert not missing, f"reply fields the threat model does not list: {missing}"
    for must in ("train-loss", "secagg-clipped"):
        assert not any(f[2] == must for f in sent), f"{must} left the silo"
