"""Round orchestration over Flower's ``Grid`` (Message API).

One :class:`FederatedRun` drives a whole run:

1. **Feature statistics.** Every silo sends the sums of its training features
   (counts, sums, sums of squares); the server adds them into the one feature
   scaler every silo applies. No preprocessing is fitted on pooled records.
2. **Rounds.** Sample silos (all of them, or Poisson sampling when central DP is
   on), send the global model, collect replies. Each reply is classified: ``ok``
   updates are checked (names, shapes, dtype, finite values, example count) and
   rejected with a reason otherwise; ``refused`` (a silo's budget) and ``error``
   replies and silent silos are logged. The accepted updates go through the
   :class:`~fedguard.strategies.pipeline.AggregationPipeline`.
3. **Evaluation.** Every silo evaluates the new model on its own held-out test
   split and returns sums (loss, correct answers, score histograms); the server
   pools them into loss, accuracy and, for binary tasks, the pooled ROC AUC.
4. **Checkpoint.** The round's model, scaler and the run history so far are
   written atomically before the next round starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedguard.core import protocol
from fedguard.core.config import RunConfig
from fedguard.core.datasets import schema_for
from fedguard.core.errors import (
    CheckpointError,
    ConfigError,
    FedguardError,
    ProtocolError,
    UpdateRejectedError,
)
from fedguard.core.files import atomic_write_json
from fedguard.core.metrics import AUC_BINS, binned_auc
from fedguard.core.models import build_model
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.protocol import ReplyStatus, RoundInstructions
from fedguard.core.seeding import derive_seed, numpy_rng, seed_torch
from fedguard.core.serialization import (
    ModelWeights,
    flatten_weights,
    model_weights,
    record_to_weights,
    unflatten_weights,
    validate_weights,
    weights_to_record,
)
from fedguard.privacy.accountant import PrivacyAccountant
from fedguard.privacy.events import DpFedAvgRound
from fedguard.privacy.secagg import FixedPointEncoder, SecAggAbort, SecAggError
from fedguard.server.checkpoints import CheckpointStore
from fedguard.server.secure_round import (
    SecureAggregationSettings,
    run_secure_groups,
    run_secure_round,
)
from fedguard.server.trust import run_trust_phase
from fedguard.strategies.aggregators import AggregationError, Aggregator
from fedguard.strategies.pipeline import (
    AggregationOutcome,
    AggregationPipeline,
    ClientUpdate,
    GroupSum,
)
from fedguard.strategies.registry import build_aggregator, check_inputs_suffice

log = logging.getLogger(__name__)

# SecAggConfig needs n >= 3: with two silos each would learn the other's update.
SECAGG_MIN_CLIENTS = 3


class RunAbortedError(FedguardError):
    """The run cannot continue (for example, no silo answered the statistics query)."""


@dataclass(frozen=True)
class NodeOutcome:
    """What one silo did in one round; ``reason`` says why when it is not ``ok``."""

    node_id: int
    silo_id: str
    status: str  # ok | refused | error | rejected | no-reply
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationSummary:
    num_examples: int
    loss: float
    accuracy: float
    auc: float | None
    per_silo: dict[str, dict[str, float]]


@dataclass(frozen=True)
class RoundRecord:
    round: int
    seconds: float
    sampled: int
    outcomes: list[NodeOutcome]
    aggregation: dict[str, Any]
    train_loss: float | None
    evaluation: EvaluationSummary
    silo_epsilon: dict[str, float]
    central_epsilon: float | None

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RoundCallback = Callable[[RoundRecord], None]


class FederatedRun:
    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        run_id: str,
        run_dir: Path,
        on_round: RoundCallback | None = None,
        reply_timeout: float | None = 900.0,
        connect_timeout: float = 300.0,
        aggregator: Aggregator | None = None,
    ) -> None:
        self.grid = grid
        self.connect_timeout = connect_timeout
        self.config = config
        self.run_id = run_id
        self.run_dir = run_dir
        self.on_round = on_round
        self.reply_timeout = reply_timeout
        self.checkpoints = CheckpointStore(run_dir / "checkpoints")
        self.pipeline = AggregationPipeline(
            aggregator=self._checked_aggregator(config, aggregator),
            central_dp=config.central_dp,
            byzantine_f=config.aggregation.f if aggregator is None else 0,
            rule_for_f=lambda f: build_aggregator(dataclasses.replace(config.aggregation, f=f)),
        )
        self.central_accountant = PrivacyAccountant() if config.central_dp.enabled else None
        self.history: list[RoundRecord] = []
        self._prior_history: list[dict[str, Any]] = []
        self.silo_names: dict[int, str] = {}

    @staticmethod
    def _checked_aggregator(config: RunConfig, given: Aggregator | None) -> Aggregator:
        """The rule, refused now if a full round cannot meet its precondition."""
        inputs, what = (
            (config.secagg.groups, "secure groups")
            if config.secagg.enabled
            else (config.num_clients, "silo updates")
        )
        if given is None:
            return check_inputs_suffice(config.aggregation, inputs, what)
        if inputs < given.min_inputs:
            raise ConfigError(
                f"{given.name} needs at least {given.min_inputs} {what} per round, "
                f"a round will have {inputs}"
            )
        if config.secagg.enabled and config.secagg.groups == 1 and given.name != "weighted-mean":
            raise ConfigError(f"{given.name} over one secure sum is a plain mean: set groups > 1")
        return given

    # -- the run -----------------------------------------------------------------------

    def run(self) -> list[RoundRecord]:
        """Run every round; after a crash, resume from the last completed round."""
        nodes = self._wait_for_silos()
        resumed = self._resume()
        if resumed is None:
            scaler = self._federated_scaler(nodes)
            seed_torch(derive_seed(self.config.seed, "initial-model"))
            weights = model_weights(build_model(schema_for(self.config.dataset), self.config.model))
            self._round_zero(nodes, weights, scaler)
            first = 1
        else:
            completed, weights, scaler = resumed
            log.warning("resuming run %s after round %d", self.run_id, completed)
            first = completed + 1
        for round_number in range(first, self.config.num_rounds + 1):
            weights = self._round(round_number, nodes, weights, scaler)
        atomic_write_json(self.run_dir / "history.json", self.history_dicts())
        if self.config.trust.enabled:  # fairness audit, drift reference, attributions
            run_trust_phase(
                lambda kind, contents: self._send_each(kind, self.config.num_rounds + 1, contents),
                nodes,
                self.config,
                self.run_dir,
                self._instruction(self.config.num_rounds, weights, scaler),
                self.silo_name,
            )
        return self.history

    def _resume(self) -> tuple[int, ModelWeights, FeatureScaler] | None:
        """The last completed round's model, scaler and history, if this run has one.

        A round counts as completed once its checkpoint is whole (the JSON is
        written last), so a crash mid-round re-runs that round from the previous
        model; silos answer a replayed round from what they already sent, so no
        budget is charged twice.
        """
        checkpoint = self.checkpoints.latest()
        if checkpoint is None:
            return None
        state = checkpoint.state
        if state.get("run_id") != self.run_id or state.get("config") != self.config.to_options():
            raise CheckpointError(
                f"{self.checkpoints.directory} holds checkpoints of another run or config "
                f"(run {state.get('run_id')!r}); use a new run folder"
            )
        weights: ModelWeights = OrderedDict(
            (k.removeprefix("weights/"), v)
            for k, v in checkpoint.arrays.items()
            if k.startswith("weights/")
        )
        scaler = FeatureScaler.from_arrays(
            {
                k.removeprefix("scaler/"): v
                for k, v in checkpoint.arrays.items()
                if k.startswith("scaler/")
            }
        )
        self._prior_history = list(state.get("history", []))
        if self.central_accountant is not None and "central_accountant" in state:
            self.central_accountant.load_state_dict(state["central_accountant"])
        return checkpoint.round, weights, scaler

    def _wait_for_silos(self) -> list[int]:
        """Wait until ``num_clients`` silos are connected (engines register them late)."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.num_clients:
                return nodes
            if time.monotonic() >= deadline:
                raise RunAbortedError(
                    f"{len(nodes)} of {self.config.num_clients} silos connected after "
                    f"{self.connect_timeout:.0f} s; start the missing silos or lower --clients"
                )
            time.sleep(0.2)

    def history_dicts(self) -> list[dict[str, Any]]:
        """Rounds completed before a resume (as saved) followed by this process's rounds."""
        return self._prior_history + [r.to_dict() for r in self.history]

    def _round_zero(
        self, nodes: list[int], weights: ModelWeights, scaler: FeatureScaler
    ) -> RoundRecord:
        started = time.monotonic()
        evaluation = self._evaluate(0, nodes, weights, scaler)
        record = RoundRecord(0, time.monotonic() - started, 0, [], {}, None, evaluation, {}, None)
        self._finish_round(record, weights, scaler)
        return record

    def _round(
        self, round_number: int, nodes: list[int], weights: ModelWeights, scaler: FeatureScaler
    ) -> ModelWeights:
        started = time.monotonic()
        sampled = self._sample(round_number, nodes)
        global_vector = flatten_weights(weights)
        if self.config.secagg.enabled and self.config.secagg.groups > 1:
            outcomes, aggregated, accepted_count = self._grouped_secure_updates(
                round_number, sampled, weights, scaler, global_vector
            )
        elif self.config.secagg.enabled:
            outcomes, aggregated, accepted_count = self._secure_updates(
                round_number, sampled, weights, scaler, global_vector, len(nodes)
            )
        else:
            outcomes, aggregated, accepted_count = self._plain_updates(
                round_number, sampled, weights, scaler, global_vector, len(nodes)
            )
        for outcome in outcomes:
            if outcome.status != "ok":
                log.warning(
                    "round %d: silo %s %s: %s",
                    round_number,
                    outcome.silo_id,
                    outcome.status,
                    outcome.reason,
                )
        new_weights = unflatten_weights(aggregated.new_global, weights)
        central_epsilon = None
        if self.central_accountant is not None:
            self.central_accountant.compose(
                DpFedAvgRound(
                    self.config.central_dp.client_sampling_rate,
                    self.config.central_dp.noise_multiplier,
                )
            )
            central_epsilon = self.central_accountant.epsilon(self.config.central_dp.delta)
        evaluation = self._evaluate(round_number, nodes, new_weights, scaler)
        accepted = [o for o in outcomes if o.status == "ok"]
        examples = sum(o.metrics.get("num-examples", 0.0) for o in accepted)
        train_loss = (
            sum(o.metrics["train-loss"] * o.metrics["num-examples"] for o in accepted) / examples
            if examples > 0
            else None
        )
        silo_epsilon = {
            o.silo_id: o.metrics["epsilon-spent"] for o in outcomes if "epsilon-spent" in o.metrics
        }
        record = RoundRecord(
            round=round_number,
            seconds=time.monotonic() - started,
            sampled=len(sampled),
            outcomes=outcomes,
            aggregation={**aggregated.details, "accepted": accepted_count},
            train_loss=train_loss,
            evaluation=evaluation,
            silo_epsilon=silo_epsilon,
            central_epsilon=central_epsilon,
        )
        self._finish_round(record, new_weights, scaler)
        return new_weights

    def _plain_updates(
        self,
        round_number: int,
        sampled: list[int],
        weights: ModelWeights,
        scaler: FeatureScaler,
        global_vector: np.ndarray,
        population: int,
    ) -> tuple[list[NodeOutcome], AggregationOutcome, int]:
        """Every sampled silo sends its model; each is checked, then aggregated."""
        content = self._instruction(round_number, weights, scaler)
        replies = self._send(protocol.TRAIN, round_number, sampled, content)
        outcomes: list[NodeOutcome] = []
        updates: list[ClientUpdate] = []
        for node in sampled:
            outcome, update = self._check_train_reply(
                node, replies.get(node), weights, global_vector
            )
            outcomes.append(outcome)
            if update is not None:
                updates.append(update)
        try:
            aggregated = self.pipeline.apply(global_vector, updates, population)
        except AggregationError as failed:
            # Too few accepted updates for the rule (dropouts, rejections): the round
            # fails and the model stays as it was; never fall back to another rule.
            log.error("round %d: aggregation failed: %s", round_number, failed)
            aggregated = AggregationOutcome(
                global_vector.copy(),
                {"rule": self.pipeline.aggregator.name, "failed": str(failed)},
            )
        return outcomes, aggregated, len(updates)

    def secure_groups(self, round_number: int, sampled: list[int]) -> list[list[int]]:
        """This round's random partition of the sampled silos into secure groups.

        Public seeded randomness (the run's seed and the round number): anyone can
        recompute it from the round log; the server cannot pick who shares a group.
        """
        rng = numpy_rng(self.config.seed, "secure-groups", round_number)
        order = [sampled[i] for i in rng.permutation(len(sampled))]
        return [
            list(map(int, g))
            for g in np.array_split(np.asarray(order, dtype=np.int64), self.config.secagg.groups)
        ]

    def _grouped_secure_updates(
        self,
        round_number: int,
        sampled: list[int],
        weights: ModelWeights,
        scaler: FeatureScaler,
        global_vector: np.ndarray,
    ) -> tuple[list[NodeOutcome], AggregationOutcome, int]:
        """SecAgg+ inside random groups; the robust rule runs over the group means.

        The server learns one sum per group, never one silo's update. Silos clip Δ
        to ``secagg.clip_norm`` before masking (when set); a group whose mean breaks
        the bound is flagged and left out. A group that aborts is left out too; the
        rule's precondition is checked against the groups that remain.
        """
        secagg = self.config.secagg
        groups = self.secure_groups(round_number, sampled)
        names = [[self.silo_name(n) for n in g] for g in groups]
        rule = self.pipeline.aggregator.name
        small = [len(g) for g in groups if len(g) < secagg.min_group_size]
        if small:
            reason = (
                f"{len(sampled)} silos sampled make groups of {small} silos, below the minimum "
                f"group size {secagg.min_group_size}"
            )
            log.error("round %d: %s", round_number, reason)
            aborted = [NodeOutcome(n, self.silo_name(n), "aborted", reason) for n in sampled]
            return (
                aborted,
                AggregationOutcome(
                    global_vector.copy(), {"rule": rule, "groups": names, "aborted": reason}
                ),
                0,
            )
        settings = SecureAggregationSettings(
            clip_range=secagg.clip_range,
            value_bits=secagg.value_bits,
            dropout_rate=secagg.dropout_rate,
            weight_unit=1,
            clip_norm=secagg.clip_norm,
        )

        def send(message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
            return self._send_each(message_type, round_number, contents)

        results = run_secure_groups(
            send,
            groups,
            self._instruction(round_number, weights, scaler),
            global_vector.size,
            settings,
        )
        outcomes: list[NodeOutcome] = []
        sums: list[GroupSum] = []
        group_log: list[dict[str, Any]] = []
        tolerance = 0.0
        for index, (group, result) in enumerate(zip(groups, results, strict=True)):
            if isinstance(result, SecAggError):
                reason = f"group {index} aborted: {result}"
                log.error("round %d: %s", round_number, reason)
                outcomes += [NodeOutcome(n, self.silo_name(n), "aborted", reason) for n in group]
                group_log.append({"group": index, "members": names[index], "aborted": str(result)})
                continue
            contributors = set(result.contributors)
            outcomes += [
                NodeOutcome(
                    n,
                    self.silo_name(n),
                    "ok" if n in contributors else "dropout",
                    result.dropped_at.get(n, ""),
                    result.metrics.get(n, {}),
                )
                for n in group
            ]
            members = tuple(self.silo_name(n) for n in result.contributors)
            sums.append(GroupSum(members, result.weighted_sum, float(result.total_weight)))
            group_log.append(
                {
                    "group": index,
                    "members": names[index],
                    "contributors": list(members),
                    "total-weight": float(result.total_weight),
                }
            )
            # Stochastic rounding moves each coordinate of the mean by < one step.
            tolerance = max(
                tolerance, FixedPointEncoder(result.config).step * math.sqrt(global_vector.size)
            )
        try:
            aggregated = self.pipeline.apply_groups(
                global_vector, sums, norm_bound=secagg.clip_norm, norm_tolerance=tolerance
            )
        except AggregationError as failed:
            log.error("round %d: aggregation over groups failed: %s", round_number, failed)
            aggregated = AggregationOutcome(
                global_vector.copy(), {"rule": rule, "failed": str(failed)}
            )
        for flagged in aggregated.details.get("flagged-groups", []):
            log.warning(
                "round %d: secure group %s flagged: %s",
                round_number,
                flagged["group"],
                flagged["reason"],
            )
        aggregated.details.update({"groups": group_log, "group-seed": self.config.seed})
        accepted = sum(1 for o in outcomes if o.status == "ok")
        return outcomes, aggregated, accepted

    def _secure_updates(
        self,
        round_number: int,
        sampled: list[int],
        weights: ModelWeights,
        scaler: FeatureScaler,
        global_vector: np.ndarray,
        population: int,
    ) -> tuple[list[NodeOutcome], AggregationOutcome, int]:
        """SecAgg+: the server learns only the sum of the surviving silos' updates.

        Per-silo checks of names, shapes and finite values move to the silo (its
        encoder refuses NaN/Inf and counts clipped values); the server checks the
        masked vectors' length and every protocol message. A SecAgg abort leaves
        the model unchanged and the run goes on with the next round.
        """
        central = self.config.central_dp
        settings = SecureAggregationSettings(
            clip_range=self.config.secagg.clip_range,
            value_bits=self.config.secagg.value_bits,
            dropout_rate=self.config.secagg.dropout_rate,
            # DP-FedAvg needs uniform weights and a per-silo L2 bound before the sum.
            weight_unit=0 if central.enabled else 1,
            clip_norm=central.clip_norm if central.enabled else self.config.secagg.clip_norm,
        )

        def send(message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
            return self._send_each(message_type, round_number, contents)

        try:
            if len(sampled) < SECAGG_MIN_CLIENTS:
                raise SecAggAbort(
                    "setup",
                    f"{len(sampled)} silo(s) sampled; secure aggregation needs at least "
                    f"{SECAGG_MIN_CLIENTS}",
                )
            result = run_secure_round(
                send,
                sampled,
                self._instruction(round_number, weights, scaler),
                global_vector.size,
                settings,
            )
        except SecAggAbort as abort:
            log.error("round %d: secure aggregation aborted: %s", round_number, abort)
            outcomes = [
                NodeOutcome(node, self.silo_name(node), "aborted", str(abort)) for node in sampled
            ]
            details = {"rule": "secagg", "aborted": str(abort)}
            return outcomes, AggregationOutcome(global_vector.copy(), details), 0
        contributors = set(result.contributors)
        outcomes = [
            NodeOutcome(
                node,
                self.silo_name(node),
                "ok" if node in contributors else "dropout",
                result.dropped_at.get(node, ""),
                result.metrics.get(node, {}),
            )
            for node in sampled
        ]
        aggregated = self.pipeline.apply_sum(
            global_vector, result.weighted_sum, result.total_weight, population
        )
        aggregated.details.update(
            {
                "secagg-degree": result.config.degree,
                "secagg-threshold": result.config.threshold,
                "secagg-clipped-values": sum(
                    int(m.get("secagg-clipped", 0)) for m in result.metrics.values()
                ),
            }
        )
        return outcomes, aggregated, len(contributors)

    def _finish_round(
        self, record: RoundRecord, weights: ModelWeights, scaler: FeatureScaler
    ) -> None:
        self.history.append(record)
        arrays = {f"weights/{k}": v for k, v in weights.items()}
        arrays.update({f"scaler/{k}": v for k, v in scaler.to_arrays().items()})
        state: dict[str, Any] = {
            "run_id": self.run_id,
            "config": self.config.to_options(),
            "history": self.history_dicts(),
        }
        if self.central_accountant is not None:
            state["central_accountant"] = self.central_accountant.state_dict()
        self.checkpoints.save(record.round, arrays, state)
        if self.on_round is not None:
            self.on_round(record)

    # -- sampling and messages ---------------------------------------------------------

    def _sample(self, round_number: int, nodes: list[int]) -> list[int]:
        rate = (
            self.config.central_dp.client_sampling_rate if self.config.central_dp.enabled else 1.0
        )
        if rate >= 1.0:
            return list(nodes)
        # Poisson sampling, as the central accountant assumes. Public seeded randomness:
        # who takes part is not secret from the server, only what they send.
        rng = numpy_rng(self.config.seed, "client-sampling", round_number)
        return [n for n in nodes if rng.random() < rate]

    def _instructions(self, round_number: int) -> RoundInstructions:
        return RoundInstructions(
            run_id=self.run_id,
            round=round_number,
            planned_rounds=self.config.num_rounds,
            seed=self.config.seed,
            dataset=self.config.dataset,
            model=self.config.model,
            training=self.config.training,
            local_dp=self.config.local_dp,
            planned_releases=self.config.trust.planned_releases(),
        )

    def _instruction(
        self, round_number: int, weights: ModelWeights, scaler: FeatureScaler
    ) -> RecordDict:
        return RecordDict(
            {
                protocol.CONFIG: self._instructions(round_number).to_record(),
                protocol.ARRAYS: weights_to_record(weights),
                protocol.SCALER: ArrayRecord(
                    {k: Array(np.ascontiguousarray(v)) for k, v in scaler.to_arrays().items()}
                ),
            }
        )

    def _send(
        self, message_type: str, round_number: int, nodes: Iterable[int], content: RecordDict
    ) -> dict[int, Message]:
        return self._send_each(message_type, round_number, dict.fromkeys(nodes, content))

    def _send_each(
        self, message_type: str, round_number: int, contents: Mapping[int, RecordDict]
    ) -> dict[int, Message]:
        """Send each node its own content; collect replies until the timeout."""
        messages = [
            Message(
                content, dst_node_id=node, message_type=message_type, group_id=str(round_number)
            )
            for node, content in contents.items()
        ]
        if not messages:
            return {}
        expected = {m.metadata.dst_node_id for m in messages}
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.reply_timeout):
            source = reply.metadata.src_node_id
            if source not in expected or source in replies:
                log.warning("ignoring an unexpected or duplicate reply from node %s", source)
                continue
            replies[source] = reply
            status_record = (
                reply.content.config_records.get(protocol.STATUS) if reply.has_content() else None
            )
            if status_record is not None and "silo-id" in status_record:
                self.silo_names.setdefault(source, str(status_record["silo-id"]))
        return replies

    def silo_name(self, node: int) -> str:
        return self.silo_names.get(node, f"node-{node}")

    # -- replies -----------------------------------------------------------------------

    def _check_train_reply(
        self,
        node: int,
        reply: Message | None,
        weights: ModelWeights,
        global_vector: np.ndarray,
    ) -> tuple[NodeOutcome, ClientUpdate | None]:
        name = self.silo_name(node)
        if reply is None:
            return NodeOutcome(node, name, "no-reply", "no reply before the timeout"), None
        status, reason = protocol.reply_status(reply)
        metrics = _metrics(reply)
        if status is ReplyStatus.REFUSED:
            return NodeOutcome(node, name, "refused", reason, metrics), None
        if status is ReplyStatus.ERROR:
            return NodeOutcome(node, name, "error", reason, metrics), None
        try:
            if protocol.ARRAYS not in reply.content.array_records:
                raise ProtocolError("reply has no model arrays")
            candidate = record_to_weights(reply.content.array_records[protocol.ARRAYS])
            validate_weights(weights, candidate)
            num_examples = metrics.get("num-examples", float("nan"))
            if not (
                math.isfinite(num_examples) and num_examples >= 1 and num_examples.is_integer()
            ):
                raise UpdateRejectedError(
                    f"num-examples must be a positive integer, got {num_examples}"
                )
        except (UpdateRejectedError, ProtocolError, ValueError, TypeError) as bad:
            reason = getattr(bad, "reason", str(bad))
            return NodeOutcome(node, name, "rejected", reason, metrics), None
        delta = flatten_weights(candidate) - global_vector
        return (
            NodeOutcome(node, name, "ok", "", metrics),
            ClientUpdate(node, name, delta, int(num_examples)),
        )

    def _federated_scaler(self, nodes: list[int]) -> FeatureScaler:
        content = RecordDict({protocol.CONFIG: self._instructions(0).to_record()})
        replies = self._send(protocol.FEATURE_STATISTICS, 0, nodes, content)
        parts: list[FeatureStatistics] = []
        for node in nodes:
            reply = replies.get(node)
            if reply is None:
                log.warning("silo %s sent no feature statistics", self.silo_name(node))
                continue
            status, reason = protocol.reply_status(reply)
            if (
                status is not ReplyStatus.OK
                or protocol.STATISTICS not in reply.content.array_records
            ):
                log.warning("silo %s: no feature statistics (%s)", self.silo_name(node), reason)
                continue
            record = reply.content.array_records[protocol.STATISTICS]
            try:
                parts.append(
                    FeatureStatistics.from_arrays({k: v.numpy() for k, v in record.items()})
                )
            except FedguardError as bad:
                log.warning("silo %s: feature statistics rejected: %s", self.silo_name(node), bad)
        if not parts:
            raise RunAbortedError("no silo sent usable feature statistics; cannot preprocess")
        return FeatureScaler.from_statistics(
            FeatureStatistics.sum(parts), schema_for(self.config.dataset)
        )

    def _evaluate(
        self, round_number: int, nodes: list[int], weights: ModelWeights, scaler: FeatureScaler
    ) -> EvaluationSummary:
        content = self._instruction(round_number, weights, scaler)
        replies = self._send(protocol.EVALUATE, round_number, nodes, content)
        total = 0
        loss_sum = 0.0
        correct = 0
        positive: np.ndarray | None = None
        negative: np.ndarray | None = None
        per_silo: dict[str, dict[str, float]] = {}
        for node in nodes:
            reply = replies.get(node)
            if reply is None or protocol.reply_status(reply)[0] is not ReplyStatus.OK:
                continue
            m = _metrics(reply)
            n = int(m.get("num-examples", 0))
            if n <= 0 or not math.isfinite(m.get("loss-sum", float("nan"))):
                continue
            total += n
            loss_sum += m["loss-sum"]
            correct += int(m["correct"])
            silo: dict[str, float] = {
                "num-examples": n,
                "loss": m["loss-sum"] / n,
                "accuracy": m["correct"] / n,
            }
            if protocol.HISTOGRAMS in reply.content.array_records:
                pos, neg = _histograms(reply.content.array_records[protocol.HISTOGRAMS])
                if pos is None or neg is None:
                    log.warning("silo %s sent malformed score histograms", self.silo_name(node))
                    continue
                silo["auc"] = binned_auc(pos, neg)
                positive = pos if positive is None else positive + pos
                negative = neg if negative is None else negative + neg
            per_silo[self.silo_name(node)] = silo
        auc = (
            binned_auc(positive, negative)
            if positive is not None and negative is not None
            else None
        )
        return EvaluationSummary(
            num_examples=total,
            loss=loss_sum / total if total else float("nan"),
            accuracy=correct / total if total else float("nan"),
            auc=auc,
            per_silo=per_silo,
        )


def _histograms(record: ArrayRecord) -> tuple[np.ndarray | None, np.ndarray | None]:
    try:
        pos, neg = record["positive"].numpy(), record["negative"].numpy()
    except KeyError:
        return None, None
    for hist in (pos, neg):
        if hist.shape != (AUC_BINS,) or hist.dtype.kind not in "iu" or (hist < 0).any():
            return None, None
    return pos.astype(np.int64), neg.astype(np.int64)


def _metrics(reply: Message) -> dict[str, float]:
    if not reply.has_content() or protocol.METRICS not in reply.content.metric_records:
        return {}
    out: dict[str, float] = {}
    for key, value in reply.content.metric_records[protocol.METRICS].items():
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out
