"""What a round did, and what a run came to: the records history.json, report.json and
the audit log are written from.

* :class:`NodeOutcome` is one sampled silo in one round: its :class:`OutcomeStatus`
  (``ok``, ``refused``, ``error``, ``no-reply``, ``rejected``, ``dropout``,
  ``aborted``), why, the SecAgg stage it stopped at, and what it reported (its
  plan and its lifetime ε after this round's charge).
* :class:`RoundRecord` is one round (a history.json row).
* :class:`Replies` are the replies of one ``send`` with what the server knows of
  their delivery, so that a reason says what happened: ``no reply within 900 s``
  (the timeout ran out), ``disconnected after 7 s`` (Flower's SuperLink answered
  for a node that stopped sending heartbeats), a ClientApp that crashed.
* :class:`RunOutcome` is how a run ended (:class:`RunStatus`), judged against the
  run's :class:`~fedguard.core.config.ParticipationPolicy` by :func:`assess_run`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from flwr.app import Message

from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedguard.core.config import ParticipationPolicy
    from fedguard.server.secure_metrics import EvaluationSummary

__all__ = [
    "SUPERLINK_NODE_ID",
    "ChargeState",
    "NodeOutcome",
    "OutcomeStatus",
    "Replies",
    "RoundRecord",
    "RunOutcome",
    "RunStatus",
    "assess_run",
    "charge_state",
    "reply_outcome",
    "round_failure",
    "send_messages",
]

#: The node id Flower's SuperLink answers from when it replies for a node (an error).
SUPERLINK_NODE_ID = 1

# Flower's ErrorCode values (flwr.common.constant.ErrorCode).
_CLIENT_APP_RAISED_EXCEPTION = 2
_MESSAGE_UNAVAILABLE = 3
_REPLY_MESSAGE_UNAVAILABLE = 4
_NODE_UNAVAILABLE = 5
_CLIENT_APP_CRASHED = 8


class OutcomeStatus(StrEnum):
    """What one sampled silo did in one round (the JSON values of the records)."""

    OK = "ok"  # its update (or masked input) is in the aggregate
    REFUSED = "refused"  # its policy refused (budget, a weak SecAgg config, ...)
    ERROR = "error"  # it answered with an error, or its ClientApp failed
    NO_REPLY = "no-reply"  # nothing came back: timeout, or it disconnected
    REJECTED = "rejected"  # the server's checks refused its update
    DROPOUT = "dropout"  # it joined SecAgg and dropped at a later stage (``stage``)
    ABORTED = "aborted"  # it was live, but its secure aggregation aborted


class ChargeState(StrEnum):
    """What a silo's ledger paid for the round, as far as the server can know.

    Silos charge at release (right before the masked input, the plain update or a
    statistic leaves): ``charged`` when it reported its ε after the charge;
    ``nothing`` when it released nothing this round (refused, failed, or its round
    aborted before it released); ``unknown`` when it went silent at or after the
    release, or did not say.
    """

    CHARGED = "charged"
    NOTHING = "nothing"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class NodeOutcome:
    """What one silo did in one round; ``reason`` says why when it is not ``ok``.

    ``stage``: the SecAgg+ stage the silo stopped at (empty for plain rounds);
    ``released``: whether the server received something derived from its records
    this round (None: unknown); ``charge``: see :class:`ChargeState`.
    """

    node_id: int
    silo_id: str
    status: OutcomeStatus
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    stage: str = ""
    released: bool | None = None
    charge: ChargeState = ChargeState.UNKNOWN

    @property
    def epsilon(self) -> float | None:
        """The silo's lifetime ε after this round's charge, as it reported it."""
        return self.metrics.get("epsilon-spent")


def charge_state(outcome: NodeOutcome, private: bool = True) -> ChargeState:
    """What ``outcome``'s silo paid (see :class:`ChargeState`); ``private``: the run has DP."""
    if "epsilon-spent" in outcome.metrics:
        return ChargeState.CHARGED
    if not private or outcome.released is False:
        return ChargeState.NOTHING
    return ChargeState.UNKNOWN


@dataclass(frozen=True)
class RoundRecord:
    round: int
    seconds: float
    sampled: int
    outcomes: list[NodeOutcome]
    aggregation: dict[str, Any]
    evaluation: EvaluationSummary
    silo_epsilon: dict[str, float]
    central_epsilon: float | None
    # Why the round produced no new model ("" when it aggregated), and how many
    # silos' updates are in the aggregate.
    failure: str = ""
    contributors: int = 0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def round_failure(aggregation: Mapping[str, Any]) -> str:
    """Why a round left the model unchanged, from its aggregation details ("" if it did not)."""
    for key in ("aborted", "failed", "rejected"):
        if aggregation.get(key):
            return f"{key}: {aggregation[key]}"
    return ""


# --------------------------------------------------------------------------- replies


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


class Replies(dict[int, Message]):
    """The replies of one send, by node, with when they were sent and the timeout."""

    def __init__(
        self,
        replies: Mapping[int, Message] | None = None,
        *,
        sent_at: float,
        timeout: float | None,
        waited: float,
    ) -> None:
        super().__init__(replies or {})
        self.sent_at = sent_at  # wall clock (Flower's created_at is wall clock too)
        self.timeout = timeout
        self.waited = waited  # how long the send waited for replies

    def missing_reason(self) -> str:
        if self.timeout is not None and self.waited >= self.timeout:
            return f"no reply within {_seconds(self.timeout)}"
        return f"no reply (waited {_seconds(self.waited)})"

    def elapsed(self, reply: Message) -> float:
        created = float(getattr(reply.metadata, "created_at", 0.0) or 0.0)
        return max(created - self.sent_at, 0.0) if created > 0 else self.waited


def _flower_error(reply: Message, elapsed: float | None) -> tuple[OutcomeStatus, str]:
    code, reason = int(reply.error.code), str(reply.error.reason)
    after = f" after {_seconds(elapsed)}" if elapsed is not None else ""
    if code == _NODE_UNAVAILABLE:
        return (
            OutcomeStatus.NO_REPLY,
            f"disconnected{after} (the SuperLink lost the silo's heartbeat; Flower error 5)",
        )
    if code in (_REPLY_MESSAGE_UNAVAILABLE, _MESSAGE_UNAVAILABLE):
        return OutcomeStatus.NO_REPLY, f"message expired{after} (Flower error {code}: {reason})"
    if code == _CLIENT_APP_CRASHED:
        return OutcomeStatus.ERROR, f"the silo's ClientApp crashed{after}: {reason}"
    if code == _CLIENT_APP_RAISED_EXCEPTION:
        return OutcomeStatus.ERROR, f"the silo's ClientApp raised: {reason}"
    return OutcomeStatus.ERROR, f"Flower error {code}: {reason}"


def reply_outcome(replies: Mapping[int, Message], node: int) -> tuple[OutcomeStatus, str]:
    """The status and reason of ``node``'s reply in ``replies`` (a missing reply too)."""
    reply = replies.get(node)
    timed = replies if isinstance(replies, Replies) else None
    if reply is None:
        return OutcomeStatus.NO_REPLY, timed.missing_reason() if timed is not None else "no reply"
    if reply.has_error():
        return _flower_error(reply, timed.elapsed(reply) if timed is not None else None)
    status, reason = protocol.reply_status(reply)
    return {
        ReplyStatus.OK: OutcomeStatus.OK,
        ReplyStatus.REFUSED: OutcomeStatus.REFUSED,
        ReplyStatus.ERROR: OutcomeStatus.ERROR,
    }[status], reason


def send_messages(grid: Grid, messages: Sequence[Message], timeout: float | None) -> Replies:
    """``grid.send_and_receive`` keyed by the node each reply answers for.

    A SuperLink answers for a node it lost (Flower error 5, node unavailable) from its
    own node id: the reply is matched to the node by the message it replies to. A
    reply from a node that was not asked, or a second reply, is left out.
    """
    sent_at = time.time()
    started = time.monotonic()
    pulled = list(grid.send_and_receive(messages, timeout=timeout))
    replies = Replies(sent_at=sent_at, timeout=timeout, waited=time.monotonic() - started)
    expected = {m.metadata.dst_node_id for m in messages}
    by_id = {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }
    for reply in pulled:
        source = reply.metadata.src_node_id
        node = by_id.get(reply.metadata.reply_to_message_id, source)
        if source != node and not (reply.has_error() and source == SUPERLINK_NODE_ID):
            continue  # a reply that claims another node's message
        if node in expected and node not in replies:
            replies[node] = reply
    return replies


# --------------------------------------------------------------------------- run outcome


class RunStatus(StrEnum):
    """How a run ended (the ``status`` of the audit log's ``run-end``)."""

    COMPLETED = "completed"  # every planned round, within the participation policy
    DEGRADED = "degraded"  # finished, but rounds failed or had too few silos
    FAILED = "failed"  # it broke the policy (stopped early) or raised
    STOPPED = "stopped"  # stopped before its planned rounds on the central DP budget
    KILLED = "killed"  # ended without a final record (found at the next start)


@dataclass(frozen=True)
class RunOutcome:
    status: RunStatus
    reasons: tuple[str, ...] = ()
    planned_rounds: int = 0
    rounds_run: int = 0
    failed_rounds: tuple[int, ...] = ()
    short_rounds: tuple[int, ...] = ()  # aggregated fewer silos than the policy's minimum

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "reasons": list(self.reasons),
            "planned_rounds": self.planned_rounds,
            "rounds_run": self.rounds_run,
            "failed_rounds": list(self.failed_rounds),
            "short_rounds": list(self.short_rounds),
        }

    @property
    def summary(self) -> str:
        return self.status.value + (": " + "; ".join(self.reasons) if self.reasons else "")


def _contributors(record: Mapping[str, Any]) -> int:
    if "contributors" in record:
        return int(record["contributors"])
    return sum(1 for o in record.get("outcomes", []) if o.get("status") == OutcomeStatus.OK)


def _rounds_text(rounds: Iterable[int]) -> str:
    return ", ".join(str(r) for r in rounds)


def assess_run(
    history: Sequence[Mapping[str, Any]],
    policy: ParticipationPolicy,
    planned_rounds: int,
    *,
    finished: bool,
    stop_reason: str = "",
) -> RunOutcome:
    """The run's outcome so far (``finished``: no round is left to run).

    FAILED as soon as more rounds failed than ``policy.max_failed_rounds`` (the run
    can no longer succeed: stop it), or, once finished, when no round aggregated
    ``policy.min_silos_per_round`` silos. DEGRADED when it finished with failed rounds
    or rounds below the minimum; STOPPED when the central DP budget ended it early;
    COMPLETED otherwise. Reasons name the rounds and what happened in them.
    """
    rounds = [r for r in history if int(r.get("round", 0)) > 0]
    failed = [r for r in rounds if r.get("failure") or round_failure(r.get("aggregation", {}))]
    numbers = tuple(int(r["round"]) for r in failed)
    short = [
        r
        for r in rounds
        if int(r["round"]) not in numbers and _contributors(r) < policy.min_silos_per_round
    ]
    short_numbers = tuple(int(r["round"]) for r in short)
    reasons: list[str] = []
    if failed:
        first = failed[0].get("failure") or round_failure(failed[0].get("aggregation", {}))
        reasons.append(
            f"{len(failed)} of {len(rounds)} rounds left the model unchanged "
            f"(rounds {_rounds_text(numbers)}; max-failed-rounds {policy.max_failed_rounds}); "
            f"round {numbers[0]}: {first}"
        )
    if short:
        counts = ", ".join(f"round {int(r['round'])}: {_contributors(r)}" for r in short[:10])
        reasons.append(
            f"{len(short)} of {len(rounds)} rounds aggregated fewer than "
            f"min-silos-per-round {policy.min_silos_per_round} silos ({counts})"
        )

    def outcome(status: RunStatus, extra: Sequence[str] = ()) -> RunOutcome:
        return RunOutcome(
            status, (*extra, *reasons), planned_rounds, len(rounds), numbers, short_numbers
        )

    if len(failed) > policy.max_failed_rounds:
        return outcome(RunStatus.FAILED)
    if not finished:
        return outcome(RunStatus.COMPLETED)  # so far within the policy
    if rounds and len(failed) + len(short) == len(rounds):
        return outcome(
            RunStatus.FAILED,
            [f"no round aggregated at least {policy.min_silos_per_round} silos"],
        )
    if stop_reason:
        return outcome(RunStatus.STOPPED, [stop_reason])
    if not rounds and planned_rounds > 0:
        return outcome(RunStatus.FAILED, ["no round ran"])
    if failed or short:
        return outcome(RunStatus.DEGRADED)
    return outcome(RunStatus.COMPLETED)
