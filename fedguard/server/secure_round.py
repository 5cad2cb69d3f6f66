"""The server side of SecAgg+ over Flower's ``Grid`` (five ``train.secagg_*`` stages).

Each stage sends every live silo its request and feeds the replies to
:class:`~fedguard.privacy.secagg.ServerRound`; a silo that does not answer, or
answers with a refusal, an error or a payload that does not validate, is a
dropout from that stage on. The result is the exact sum of the surviving silos'
encoded updates, decoded to Σ w_i Δ_i and Σ w_i: the server never holds one
silo's update (the ``ServerRound`` state keeps only a running sum of masked
vectors). Too few survivors anywhere raises :class:`SecureRoundAborted` (a
:class:`~fedguard.privacy.secagg.SecAggAbort`) carrying what each node did
(:class:`SecureNodeReport`: the stage it stopped at and why, the metrics of every
stage's reply, whether it released its masked input); the caller records the round
as failed, every silo with its status, and goes on.

Silos charge their ledger at release, when they send their masked input: that
reply carries ``epsilon-spent`` (earlier silos sent it with the setup reply). The
metrics of every stage's reply are merged per node, so the ε is read from
whichever reply carries it, also in a round that aborts after the release.

Authentication: every round requires identity keys (``require_identity``). The
settings hold the consortium's signed roster and the node → silo mapping
(:class:`SecAggIdentities`); the setup carries the roster, the silo id of each
node and a nonce, and the round id commits to all three
(:func:`~fedguard.privacy.secagg.roster.bind_round_id`). Each silo verifies the
roster against its own consortium key (:mod:`fedguard.client.secure_identity`),
so the server cannot substitute one silo's advertisement keys; it verifies the
adverts under the same registry. A node whose silo id is unknown, missing from
the roster or claimed by two nodes is left out of the round (a dropout).

Why not Flower's SecAgg+: it runs only on the legacy API, expands masks with a
Mersenne Twister seeded from a 32-bit fold of the shared secret (flwr issue
7522), relays public keys unauthenticated, and hands Krum or the median n copies
of the aggregate. fedguard's protocol is in :mod:`fedguard.privacy.secagg`.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import Message, RecordDict

from fedguard.aggregation.registry import check_inputs_suffice
from fedguard.core.config import RunConfig
from fedguard.core.errors import ConfigError
from fedguard.privacy.secagg import (
    AggregateResult,
    ConsistencySignature,
    FixedPointEncoder,
    KeyAdvertisement,
    MaskedInput,
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    ServerRound,
    ShareKeysResponse,
    UnmaskResponse,
)
from fedguard.privacy.secagg.errors import BelowThresholdError
from fedguard.privacy.secagg.roster import RosterError, SignedRoster, bind_round_id
from fedguard.server.round_records import NodeOutcome, OutcomeStatus, charge_state, reply_outcome
from fedguard.wire import protocol
from fedguard.wire.secagg import (
    IDENTITY_QUERY,
    PAYLOAD,
    ROSTER,
    ROUND_NONCE,
    SILO_IDS,
    secagg_record,
)

Send = Callable[[str, Mapping[int, RecordDict]], dict[int, Message]]
#: SecAggConfig needs n >= 3: with two, each would learn the other's input.
_MIN_MEMBERS = 3


@dataclass(frozen=True)
class SecAggIdentities:
    """Who is who in a round: the signed roster and each node's silo id."""

    roster: SignedRoster
    silo_ids: Mapping[int, str]  # Flower node id -> silo id (from the silos' replies)

    def members(self, nodes: Sequence[int]) -> tuple[list[int], dict[int, str]]:
        """The nodes that can take part (a unique roster silo each), and why the others cannot."""
        listed = self.roster.roster.silos
        claims: dict[str, list[int]] = {}
        for node in nodes:
            claims.setdefault(self.silo_ids.get(node, ""), []).append(node)
        excluded: dict[int, str] = {}
        for node in nodes:
            silo = self.silo_ids.get(node)
            if silo is None:
                excluded[node] = "no silo id known for this node"
            elif silo not in listed:
                excluded[node] = f"silo {silo!r} is not in the consortium's roster"
            elif len(claims[silo]) > 1:
                excluded[node] = f"silo id {silo!r} is claimed by nodes {claims[silo]}"
        return [n for n in nodes if n not in excluded], excluded


def secagg_identities(
    roster: SignedRoster | None,
    known: dict[int, str],
    nodes: Sequence[int],
    send: Send,
) -> SecAggIdentities | None:
    """The identities of a round over ``nodes``; asks the nodes whose silo id is unknown.

    ``known`` (node -> silo id, learned from earlier replies) is updated in place.
    None without a roster.
    """
    if roster is None:
        return None
    unknown = [n for n in nodes if n not in known]
    if unknown:
        replies = send(IDENTITY_QUERY, {n: RecordDict() for n in unknown})
        for node, reply in replies.items():
            if node in unknown and reply.has_content():
                status = reply.content.config_records.get(protocol.STATUS)
                if status is not None and isinstance(status.get("silo-id"), str):
                    known.setdefault(node, str(status["silo-id"]))
    return SecAggIdentities(roster, dict(known))


@dataclass(frozen=True)
class SecureAggregationSettings:
    """How the server sets up each round (validated again by ``SecAggConfig``)."""

    clip_range: float = 0.5
    value_bits: int = 16
    dropout_rate: float = 0.1
    weight_unit: int = 1  # weights = ceil(examples / unit); 0 = every silo weighs 1
    clip_norm: float = 0.0  # > 0: silos clip Δ to this L2 norm first (central DP)
    # The signed roster and node -> silo mapping; every round needs them unless
    # require_identity is False (which every fedguard silo refuses: tests only).
    identities: SecAggIdentities | None = None
    require_identity: bool = True

    def config_for(self, num_clients: int) -> SecAggConfig:
        weight_bits = SecAggConfig.max_bits_per_value(num_clients) - self.value_bits
        return SecAggConfig.recommended(
            num_clients,
            dropout_rate=self.dropout_rate,
            clip_range=self.clip_range,
            value_bits=self.value_bits,
            weight_bits=max(weight_bits, 0),
            require_identity=self.require_identity,
        )

    def begin(self, nodes: Sequence[int], vector_length: int) -> tuple[ServerRound, dict[str, Any]]:
        """A new round over ``nodes`` and the options its setup carries (roster, silo ids)."""
        config = self.config_for(len(nodes))
        nonce = secrets.token_bytes(16)
        if not self.require_identity:
            server = ServerRound.begin(config, list(nodes), vector_length, round_id=nonce)
            return server, {}
        if self.identities is None:
            raise RosterError(
                "authenticated secure aggregation needs the consortium's signed roster "
                "and each node's silo id; none were given"
            )
        ordered = sorted(nodes)
        silo_ids = [self.identities.silo_ids[n] for n in ordered]
        roster = self.identities.roster.roster
        server = ServerRound.begin(
            config,
            ordered,
            vector_length,
            round_id=bind_round_id(nonce, roster, silo_ids),
            identity_registry=roster.registry(ordered, silo_ids),
        )
        options = {
            ROSTER: self.identities.roster.to_bytes(),
            SILO_IDS: silo_ids,
            ROUND_NONCE: nonce,
        }
        return server, options


@dataclass(frozen=True)
class NodeFailure:
    """Where and why one node left a secure round: the stage, its status, the reason."""

    stage: str
    status: OutcomeStatus  # refused | error | no-reply | rejected
    reason: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.status.value}: {self.reason}"


#: The SecAgg+ stages in order (names as in the round log).
STAGES = ("advertise-keys", "share-keys", "masked-input", "consistency", "unmask")
#: The stage whose reply is the release (the masked input): silos charge right before it.
RELEASE_STAGE = "masked-input"


@dataclass
class SecureNodeReport:
    """What every node of one secure group did, kept whether the group summed or aborted."""

    members: tuple[int, ...]
    failures: dict[int, NodeFailure] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # all stages, merged
    released: set[int] = field(default_factory=set)  # sent their masked input

    @property
    def dropped_at(self) -> dict[int, str]:
        return {node: str(failure) for node, failure in self.failures.items()}

    def fail(self, node: int, failure: NodeFailure) -> None:
        self.failures.setdefault(node, failure)


@dataclass
class SecureRoundResult:
    """What the server learned: a sum, its total weight, and who took part."""

    config: SecAggConfig
    weighted_sum: np.ndarray
    total_weight: int
    contributors: tuple[int, ...]
    dropped_at: dict[int, str] = field(default_factory=dict)  # node -> stage and reason
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    report: SecureNodeReport | None = None


class SecureRoundAborted(SecAggAbort):
    """A secure group that did not produce a sum, with what each of its nodes did.

    ``cause`` is the protocol's error (a :class:`SecAggAbort`, or a protocol error
    the server hit while unmasking); ``report`` the per-node record.
    """

    def __init__(self, cause: SecAggError, report: SecureNodeReport) -> None:
        if isinstance(cause, SecAggAbort):
            stage, reason = cause.stage, cause.reason
        else:
            stage, reason = "unmask", f"{type(cause).__name__}: {cause}"
        super().__init__(stage, reason)
        self.cause = cause
        self.report = report

    def __str__(self) -> str:
        return str(self.cause) if isinstance(self.cause, SecAggAbort) else super().__str__()


def _payload(reply: Message) -> bytes:
    value = reply.content.config_records[protocol.SECAGG][PAYLOAD]
    if not isinstance(value, bytes):
        raise TypeError("payload is not bytes")
    return value


def run_secure_round(
    send: Send,
    nodes: list[int],
    instruction: RecordDict,
    vector_length: int,
    settings: SecureAggregationSettings,
    setup_message_type: str = protocol.SECAGG_SETUP,
) -> SecureRoundResult:
    """One SecAgg+ round: train + advertise, share, mask, check, unmask, decode.

    Raises:
        SecureRoundAborted: no sum (too few survivors, or the setup could not start).
    """
    (outcome,) = run_secure_groups(
        send, [nodes], instruction, vector_length, settings, setup_message_type
    )
    if isinstance(outcome, SecAggError):
        raise outcome
    return outcome


@dataclass
class _Group:
    """One group's server state while its stages run."""

    nodes: list[int]
    config: SecAggConfig
    server: ServerRound
    requests: Mapping[int, Any]
    report: SecureNodeReport
    options: dict[str, Any] = field(default_factory=dict)  # the setup's roster options
    failure: SecAggError | None = None


def run_secure_groups(
    send: Send,
    groups: Sequence[Sequence[int]],
    instruction: RecordDict,
    vector_length: int,
    settings: SecureAggregationSettings,
    setup_message_type: str = protocol.SECAGG_SETUP,
) -> list[SecureRoundResult | SecureRoundAborted]:
    """Independent SecAgg+ rounds, one per group, run stage by stage side by side.

    Each stage sends every group's requests in one ``send`` (so the groups train
    and mask at the same time, not one after another), then feeds each group's
    replies to that group's own :class:`ServerRound` (its own keys, graph,
    threshold and round id: a group learns nothing of another). A group that
    aborts (too few survivors, a share that does not reconstruct) is reported as
    a :class:`SecureRoundAborted` (its error and what each node did) and drops
    out of the later stages; the other groups go on. The result lists, per group,
    its decoded sum or its abort.
    """
    _check_disjoint(groups)
    states = [_open_group(group, settings, vector_length) for group in groups]
    live = [s for s in states if isinstance(s, _Group)]
    _run_stage(
        send,
        live,
        settings,
        "advertise-keys",
        setup_message_type,
        KeyAdvertisement.from_bytes,
        ServerRound.receive_advertisements,
        base=instruction,
    )
    _run_stage(
        send,
        live,
        settings,
        "share-keys",
        protocol.SECAGG_SHARE,
        ShareKeysResponse.from_bytes,
        ServerRound.receive_shares,
    )
    # The server keeps only the running sum of masked vectors (ServerRound.masked_sum).
    _run_stage(
        send,
        live,
        settings,
        RELEASE_STAGE,
        protocol.SECAGG_MASK,
        MaskedInput.from_bytes,
        ServerRound.receive_masked_inputs,
    )
    _run_stage(
        send,
        live,
        settings,
        "consistency",
        protocol.SECAGG_CONSISTENCY,
        ConsistencySignature.from_bytes,
        ServerRound.receive_signatures,
    )
    results: dict[int, AggregateResult] = {}

    def unmask(server: ServerRound, replies: dict[int, Any]) -> dict[int, Any]:
        results[id(server)] = server.receive_unmask(replies)
        return {}

    _run_stage(
        send, live, settings, "unmask", protocol.SECAGG_UNMASK, UnmaskResponse.from_bytes, unmask
    )
    return [_outcome(entry, results) for entry in states]


def _check_disjoint(groups: Sequence[Sequence[int]]) -> None:
    seen: set[int] = set()
    for group in groups:
        if seen & set(group):
            raise ValueError("a node is in two secure groups")
        seen.update(group)


def _open_group(
    group: Sequence[int], settings: SecureAggregationSettings, vector_length: int
) -> _Group | SecureRoundAborted:
    """Begin one group's ServerRound without its unauthenticated nodes (an abort if too
    few are left)."""
    members, excluded = (
        settings.identities.members(group)
        if settings.require_identity and settings.identities is not None
        else (list(group), {})
    )
    report = SecureNodeReport(tuple(group))
    for node, why in excluded.items():
        report.fail(
            node, NodeFailure(STAGES[0], OutcomeStatus.REJECTED, f"not authenticated: {why}")
        )
    if len(members) < _MIN_MEMBERS:
        reasons = "; ".join(f"node {n}: {r}" for n, r in excluded.items())
        return SecureRoundAborted(
            BelowThresholdError(
                "setup",
                f"{len(members)} of {len(group)} nodes can take part ({reasons}); "
                f"a secure aggregate needs {_MIN_MEMBERS}",
            ),
            report,
        )
    server, options = settings.begin(members, vector_length + 1)
    return _Group(members, server.config, server, server.setup_requests(), report, options)


def _run_stage(
    send: Send,
    live: Sequence[_Group],
    settings: SecureAggregationSettings,
    name: str,
    message_type: str,
    parse: Callable[[bytes], Any],
    advance: Callable[[ServerRound, dict[int, Any]], Any],
    base: RecordDict | None = None,
) -> None:
    """One stage for every group still running: one ``send``, then each group's replies."""
    contents = {
        node: content
        for state in live
        if state.failure is None
        for node, content in _stage_requests(state, settings, base).items()
    }
    replies = send(message_type, contents) if contents else {}
    for state in live:
        if state.failure is None:
            _take_replies(state, name, replies, parse, advance)


def _stage_requests(
    state: _Group, settings: SecureAggregationSettings, base: RecordDict | None
) -> dict[int, RecordDict]:
    """This stage's message to each node of a group; the setup's (on ``base``, the
    training instruction) also carries the round's options."""
    options: dict[str, Any] = (
        {"clip-norm": settings.clip_norm, "weight-unit": settings.weight_unit, **state.options}
        if base is not None
        else {}
    )
    contents: dict[int, RecordDict] = {}
    for node, request in state.requests.items():
        content = RecordDict(dict(base.items())) if base is not None else RecordDict()
        content[protocol.SECAGG] = secagg_record(request.to_bytes(), **options)
        contents[node] = content
    return contents


def _take_replies(
    state: _Group,
    name: str,
    replies: Mapping[int, Message],
    parse: Callable[[bytes], Any],
    advance: Callable[[ServerRound, dict[int, Any]], Any],
) -> None:
    """Feed a group's replies to its ServerRound, recording each node that fails."""
    report = state.report
    parsed: dict[int, Any] = {}
    for node in state.requests:
        status, reason = reply_outcome(replies, node)
        reply = replies.get(node)
        if reply is not None and reply.has_content():
            # ε may come with any stage's reply (the release's, since charge at release)
            report.metrics.setdefault(node, {}).update(protocol.reply_metrics(reply))
        if status is not OutcomeStatus.OK:
            report.fail(node, NodeFailure(name, status, reason))
            continue
        if name == RELEASE_STAGE:
            report.released.add(node)
        try:
            parsed[node] = parse(_payload(cast(Message, reply)))
        except (SecAggError, KeyError, TypeError, ValueError) as bad:
            report.fail(node, NodeFailure(name, OutcomeStatus.REJECTED, f"malformed reply: {bad}"))
    try:
        state.requests = advance(state.server, parsed)
    except SecAggError as failed:
        state.failure = failed
        state.requests = {}
    for node, why in state.server.rejected.items():
        report.fail(node, NodeFailure(name, OutcomeStatus.REJECTED, why))


def _outcome(
    entry: _Group | SecureRoundAborted, results: Mapping[int, AggregateResult]
) -> SecureRoundResult | SecureRoundAborted:
    """A group's decoded sum, or its abort."""
    if isinstance(entry, SecureRoundAborted):
        return entry
    if entry.failure is not None:
        return SecureRoundAborted(entry.failure, entry.report)
    result = results[id(entry.server)]
    decoded = FixedPointEncoder(entry.config).decode(result.total)
    return SecureRoundResult(
        config=entry.config,
        weighted_sum=decoded.weighted_sum,
        total_weight=decoded.total_weight,
        contributors=result.contributors,
        dropped_at=entry.report.dropped_at,
        metrics=entry.report.metrics,
        report=entry.report,
    )


def node_outcomes(
    report: SecureNodeReport,
    contributors: Sequence[int],
    silo_name: Callable[[int], str],
    aborted: str = "",
) -> list[NodeOutcome]:
    """Every node of a secure group as a :class:`NodeOutcome`, in ``report.members`` order.

    In the sum: ``ok``. Left at the setup stage: its own answer (``refused``,
    ``error``, ``no-reply``) or ``rejected`` (not authenticated, malformed); left
    later: ``dropout`` with the stage and why. ``aborted``: the group's abort, for
    the nodes that were still live when it happened.
    """
    summed = set(contributors)
    out: list[NodeOutcome] = []
    for node in report.members:
        failure = report.failures.get(node)
        metrics = dict(report.metrics.get(node, {}))
        released = node in report.released
        if node in summed:
            note = f"in the sum; then {failure}" if failure is not None else ""
            status, reason, stage = OutcomeStatus.OK, note, ""
        elif failure is not None and failure.stage == STAGES[0]:
            status, reason, stage = failure.status, failure.reason, failure.stage
        elif failure is not None:
            # Left after it joined: the stage it left at and what happened there.
            status, reason, stage = OutcomeStatus.DROPOUT, str(failure), failure.stage
            if failure.status is OutcomeStatus.REJECTED:
                status = OutcomeStatus.REJECTED
        elif aborted:
            status, reason, stage = OutcomeStatus.ABORTED, aborted, ""
        else:
            status, reason, stage = OutcomeStatus.DROPOUT, "not in the sum", ""
        # Released unless it never got to (or past) the masked-input stage; a silent
        # node at that stage may have charged before it went away: unknown.
        known: bool | None = released or None
        if not released and not (
            failure is not None
            and failure.stage == RELEASE_STAGE
            and failure.status is OutcomeStatus.NO_REPLY
        ):
            known = False
        outcome = NodeOutcome(
            node, silo_name(node), status, reason, metrics, stage=stage, released=known
        )
        out.append(dataclasses.replace(outcome, charge=charge_state(outcome)))
    return out


# --------------------------------------------------------------------------- small consortia


def dropout_tolerance(config: SecAggConfig) -> int:
    """How many dropouts, in any pattern, a round with ``config`` survives: k − t.

    Every survivor must keep t live neighbours of its k (to unmask, the server
    needs t shares of each secret); d dropouts take at most d of a node's
    neighbours, so any d ≤ k − t is survived and d = k − t + 1 among one node's
    neighbours is not.
    """
    return config.degree - config.threshold


def tolerance_table(
    sizes: Sequence[int], dropout_rate: float = 0.1
) -> list[tuple[int, int, int, int]]:
    """``(n, k, t, dropouts tolerated)`` of the config the server builds for n silos."""
    settings = SecureAggregationSettings(dropout_rate=dropout_rate)
    rows = []
    for n in sizes:
        config = settings.config_for(n)
        rows.append((n, config.degree, config.threshold, dropout_tolerance(config)))
    return rows


def _smallest_tolerant(start: int, dropout_rate: float) -> int:
    settings = SecureAggregationSettings(dropout_rate=dropout_rate)
    n = max(start, _MIN_MEMBERS)
    while dropout_tolerance(settings.config_for(n)) < 1:
        n += 1
    return n


def check_dropout_tolerance(config: RunConfig) -> None:
    """Refuse a ``--secagg`` run in which one silo dropping aborts rounds, unless allowed.

    Checked for the secure sums over all silos (the feature scaler before round 1,
    whose abort stops the run, and every round's evaluation) and for the training
    sums: one sum over the cohort, or, with groups, a group of the smallest size
    (a run with groups survives a group's abort when the rule still has enough
    groups left). ``secagg-allow-no-dropout`` runs it anyway.

    Raises:
        ConfigError: with what to change.
    """
    secagg = config.secagg
    if not secagg.enabled or secagg.allow_no_dropout:
        return
    settings = SecureAggregationSettings(dropout_rate=secagg.dropout_rate)
    n = config.num_clients
    if n < _MIN_MEMBERS:
        return  # refused elsewhere: a secure sum needs 3 silos
    whole = settings.config_for(n)
    allow = "or set secagg-allow-no-dropout = true to run it anyway"
    if dropout_tolerance(whole) < 1:
        raise ConfigError(
            f"with secure aggregation, {n} silos tolerate no dropout: SecAgg+ over {n} "
            f"uses k={whole.degree} neighbours and threshold t={whole.threshold}, so one silo "
            f"that drops aborts the round, its evaluation and (before round 1) the run; "
            f"use at least {_smallest_tolerant(n, secagg.dropout_rate)} silos (see the "
            f"README's table), {allow}"
        )
    if secagg.groups > 1:
        size = n // secagg.groups
        group = settings.config_for(size)
        if dropout_tolerance(group) < 1:
            try:
                check_inputs_suffice(config.aggregation, secagg.groups - 1, "secure groups")
            except ConfigError:
                raise ConfigError(
                    f"secure groups of {size} silos tolerate no dropout (k={group.degree}, "
                    f"t={group.threshold}) and {config.aggregation.label} cannot run on the "
                    f"{secagg.groups - 1} groups left when one aborts: use fewer, larger "
                    f"groups (at least {_smallest_tolerant(size, secagg.dropout_rate)} silos "
                    f"each), {allow}"
                ) from None
