"""Round orchestration over Flower's ``Grid`` (Message API).

One :class:`FederatedRun` drives a whole run:

1. **Feature statistics.** Every silo releases the moments of its training
   features on public bounds (count, Σu, Σu²) as a DP statistic charged to its
   ledger; the server gets their sum (under SecAgg+ when it is on) and builds the
   one feature scaler every silo applies (:mod:`fedguard.server.secure_metrics`).
2. **Rounds.** Sample silos (all of them, or Poisson sampling when central DP is
   on), send the global model, collect replies. Each reply is classified: ``ok``
   updates are checked (names, shapes, dtype, finite values, example count) and
   rejected with a reason otherwise; ``refused`` (a silo's budget) and ``error``
   replies and silent silos are logged. The accepted updates go through the
   :class:`~fedguard.aggregation.pipeline.AggregationPipeline` as one input
   (:mod:`fedguard.aggregation.combinations` says which: the silos' own updates,
   one secure sum, or one secure sum per group). Reply checks live in
   :mod:`fedguard.server.reply_checks`, the secure paths in
   :mod:`fedguard.server.secure_updates`.
3. **Evaluation.** Every silo evaluates the new model on its own held-out test
   split; its sums (loss, correct answers, score histograms) are pooled into
   loss, accuracy and, for binary tasks, the pooled ROC AUC. With SecAgg on they
   are summed under SecAgg+ and the records hold no per-silo metric.
4. **Checkpoint.** The round's model, scaler and the run history so far are
   written atomically before the next round starts.
5. **Outcome.** After every round the run is judged against its participation
   policy (:class:`~fedguard.core.config.ParticipationPolicy`): too many failed
   rounds stop it as ``failed``; at the end it is ``completed``, ``degraded``
   (rounds failed or aggregated too few silos) or ``stopped`` (central DP budget).
   The outcome is written to ``outcome.json`` beside ``history.json`` and kept in
   :attr:`FederatedRun.outcome` (the deployed server puts it in the audit log's
   ``run-end``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedguard.aggregation.aggregators import AggregationError, Aggregator
from fedguard.aggregation.combinations import InputKind, checked_rule, input_kind
from fedguard.aggregation.pipeline import (
    AggregationOutcome,
    AggregationPipeline,
    ClientUpdate,
    ClientUpdates,
)
from fedguard.aggregation.registry import build_aggregator
from fedguard.core.config import RunConfig
from fedguard.core.datasets import schema_for
from fedguard.core.errors import (
    CheckpointError,
    ConfigError,
)
from fedguard.core.files import atomic_write_json
from fedguard.core.models import build_model, model_hash_for
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.seeding import derive_seed, numpy_rng, seed_torch
from fedguard.core.serialization import (
    ModelWeights,
    flatten_weights,
    model_weights,
    unflatten_weights,
    weights_to_record,
)
from fedguard.privacy.central_accounting import CentralPrivacy
from fedguard.privacy.secagg.roster import SignedRoster
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.runs.layout import VariantFolder
from fedguard.server.post_training import FinalModel, PostTrainingPhase
from fedguard.server.reply_checks import check_train_reply
from fedguard.server.round_records import (
    NodeOutcome,
    OutcomeStatus,
    RoundRecord,
    RunOutcome,
    RunStatus,
    assess_run,
    charge_state,
    round_failure,
    send_messages,
)
from fedguard.server.secure_metrics import (
    EvaluationSummary,
    RunAbortedError,
    evaluate_round,
    federated_scaler,
    public_outcome_metrics,
    write_moments,
)
from fedguard.server.secure_round import (
    SecAggIdentities,
    check_dropout_tolerance,
    secagg_identities,
)
from fedguard.server.secure_updates import (
    grouped_secure_updates,
    secure_updates,
)
from fedguard.wire import protocol
from fedguard.wire.protocol import RoundInstructions

log = logging.getLogger(__name__)


__all__ = [
    "EvaluationSummary",
    "FederatedRun",
    "NodeOutcome",
    "RoundRecord",
    "RunAbortedError",
    "RunOutcome",
]

RoundCallback = Callable[[RoundRecord], None]
#: Collects one round's input from the sampled silos and aggregates it:
#: (round, sampled, weights, scaler, global vector, population) -> (outcomes, outcome, accepted).
Collector = Callable[
    [int, list[int], ModelWeights, FeatureScaler, np.ndarray, int],
    tuple[list[NodeOutcome], AggregationOutcome, int],
]


class FederatedRun:
    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        run_id: str,
        run_dir: Path,
        on_round: RoundCallback | None = None,
        connect_timeout: float = 300.0,
        aggregator: Aggregator | None = None,
        roster: SignedRoster | None = None,
        post_training: PostTrainingPhase | None = None,
    ) -> None:
        if config.trust.enabled and post_training is None:
            raise ConfigError(
                "the run asks for the trust layer, but no post-training phase was given "
                "(fedguard.trust.phase.trust_phase; the composition roots in fedguard.apps "
                "and the simulator pass it)"
            )
        self.post_training = post_training
        self.roster = roster  # the consortium's signed SecAgg roster (roster.py)
        self.grid = grid
        self.connect_timeout = connect_timeout
        self.config = config
        self.run_id = run_id
        self.run_dir = run_dir
        self.on_round = on_round
        self.reply_timeout = config.participation.reply_timeout_s
        self.checkpoints = CheckpointStore(VariantFolder(run_dir).checkpoints)
        self.pipeline = AggregationPipeline(
            aggregator=checked_rule(config, aggregator),
            central_dp=config.central_dp,
            byzantine_f=config.aggregation.f if aggregator is None else 0,
            rule_for_f=lambda f: build_aggregator(dataclasses.replace(config.aggregation, f=f)),
        )
        # Central DP: CSPRNG sampling, no amplification, a budget (privacy.central_accounting).
        self.central = CentralPrivacy(config.central_dp) if config.central_dp.enabled else None
        self.central_accountant = self.central.accountant if self.central is not None else None
        # One silo dropping must not abort every round, unless the run says so.
        check_dropout_tolerance(config)
        self.history: list[RoundRecord] = []
        self._prior_history: list[dict[str, Any]] = []
        self.silo_names: dict[int, str] = {}
        self.outcome: RunOutcome | None = None

    # -- the run -----------------------------------------------------------------------

    def run(self) -> list[RoundRecord]:
        """Run every round; after a crash, resume from the last completed round.

        Sets :attr:`outcome` (and writes ``outcome.json``); a run that breaks its
        participation policy stops early as ``failed`` without raising. An error
        that ends the run raises, after recording it as ``failed``.
        """
        try:
            return self._run()
        except Exception as raised:
            if self.outcome is None:
                self._set_outcome(
                    RunOutcome(
                        RunStatus.FAILED,
                        (f"{type(raised).__name__}: {raised}",),
                        self.config.num_rounds,
                        len([r for r in self.history_dicts() if int(r.get("round", 0)) > 0]),
                    )
                )
            raise

    def _set_outcome(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(VariantFolder(self.run_dir).outcome, outcome.to_json())
        if outcome.status is not RunStatus.COMPLETED:
            log.error("run %s %s", self.run_id, outcome.summary)

    def _assess(self, *, finished: bool, stop_reason: str = "") -> RunOutcome:
        return assess_run(
            self.history_dicts(),
            self.config.participation,
            self.config.num_rounds,
            finished=finished,
            stop_reason=stop_reason,
        )

    def _run(self) -> list[RoundRecord]:
        if self.roster is None and (self.config.secagg.enabled or self.config.trust.enabled):
            raise ConfigError(
                "secure aggregation (and every trust-layer statistic) is authenticated: "
                "the run needs the consortium's signed SecAgg roster"
            )
        nodes = self._wait_for_silos()
        resumed = self._resume()
        if resumed is None:
            scaler = self._federated_scaler(nodes)
            seed_torch(derive_seed(self.config.seed, "initial-model"))
            weights = model_weights(
                build_model(schema_for(self.config.contract), self.config.model)
            )
            self._round_zero(nodes, weights, scaler)
            first = 1
        else:
            completed, weights, scaler = resumed
            log.warning("resuming run %s after round %d", self.run_id, completed)
            first = completed + 1
        stop_reason = ""
        outcome = self._assess(finished=False)
        for round_number in range(first, self.config.num_rounds + 1):
            if outcome.status is RunStatus.FAILED:
                break  # it broke the policy: it can no longer succeed
            stop = self.central.check_round(round_number) if self.central is not None else None
            if stop is not None:
                log.error("%s", stop.reason)
                stop_reason = stop.reason
                break
            weights = self._round(round_number, nodes, weights, scaler)
            outcome = self._assess(finished=False)
        if outcome.status is not RunStatus.FAILED:
            outcome = self._assess(finished=True, stop_reason=stop_reason)
        atomic_write_json(VariantFolder(self.run_dir).history, self.history_dicts())
        if self.central is not None:
            self.central.write(self.run_dir)
        if outcome.status is RunStatus.FAILED:
            self._set_outcome(outcome)  # no trust phase over a failed run's model
            return self.history
        if self.post_training is not None:  # the trust layer: audit, drift, attributions
            self.post_training(
                FinalModel(
                    send=lambda kind, contents: self.send_each(
                        kind, self.config.num_rounds + 1, contents
                    ),
                    nodes=nodes,
                    config=self.config,
                    run_dir=self.run_dir,
                    instruction=self._instruction(self.config.num_rounds, weights, scaler),
                    silo_name=self.silo_name,
                    identities=self.identities_for(self.config.num_rounds + 1, nodes),
                )
            )
        self._set_outcome(outcome)
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
        weights, scaler = checkpoint.weights(), checkpoint.scaler()
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
        record = RoundRecord(0, time.monotonic() - started, 0, [], {}, evaluation, {}, None)
        self._finish_round(record, weights, scaler)
        return record

    def _round(
        self, round_number: int, nodes: list[int], weights: ModelWeights, scaler: FeatureScaler
    ) -> ModelWeights:
        started = time.monotonic()
        sampled = self._sample(round_number, nodes)
        global_vector = flatten_weights(weights)
        collect = self._collectors()[input_kind(self.config.secagg)]
        outcomes, aggregated, accepted_count = collect(
            round_number, sampled, weights, scaler, global_vector, len(nodes)
        )
        private = self.config.local_dp.enabled
        outcomes = [dataclasses.replace(o, charge=charge_state(o, private)) for o in outcomes]
        for outcome in outcomes:
            if outcome.status is not OutcomeStatus.OK:
                log.warning(
                    "round %d: silo %s %s: %s",
                    round_number,
                    outcome.silo_id,
                    outcome.status,
                    outcome.reason,
                )
        new_weights = unflatten_weights(aggregated.new_global, weights)
        central_epsilon = self.central.charge_round() if self.central is not None else None
        evaluation = self._evaluate(round_number, nodes, new_weights, scaler)
        if self.config.secagg.enabled:  # only plan and ledger values, never a metric
            outcomes = [
                dataclasses.replace(o, metrics=public_outcome_metrics(o.metrics)) for o in outcomes
            ]
        # Each silo's own report of its lifetime ε after this round's charges (training,
        # and an evaluation it noised), from whichever reply carried it.
        silo_epsilon = {o.silo_id: o.epsilon for o in outcomes if o.epsilon is not None}
        for silo, spent in evaluation.epsilon_spent.items():
            silo_epsilon[silo] = max(spent, silo_epsilon.get(silo, spent))
        details = {**aggregated.details, "accepted": accepted_count}
        failure = round_failure(details)
        record = RoundRecord(
            round=round_number,
            seconds=time.monotonic() - started,
            sampled=len(sampled),
            outcomes=outcomes,
            aggregation=details,
            evaluation=evaluation,
            silo_epsilon=silo_epsilon,
            central_epsilon=central_epsilon,
            failure=failure,
            contributors=0 if failure else accepted_count,
        )
        self._finish_round(record, new_weights, scaler)
        return new_weights

    def _collectors(self) -> dict[InputKind, Collector]:
        """How each kind of round input is collected from the sampled silos."""
        return {
            InputKind.CLIENT_UPDATES: self._plain_updates,
            InputKind.SECURE_SUM: self._secure_updates,
            InputKind.GROUP_SUMS: self._grouped_secure_updates,
        }

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
            outcome, update = check_train_reply(
                node,
                self.silo_name(node),
                replies,
                weights,
                global_vector,
                self.config.update_clip_norm,
            )
            outcomes.append(outcome)
            if update is not None:
                updates.append(update)
        try:
            aggregated = self.pipeline.apply(
                ClientUpdates(global_vector, tuple(updates), population)
            )
        except AggregationError as failed:
            # Too few accepted updates for the rule (dropouts, rejections): the round
            # fails and the model stays as it was; never fall back to another rule.
            log.error("round %d: aggregation failed: %s", round_number, failed)
            aggregated = AggregationOutcome(
                global_vector.copy(),
                {"rule": self.pipeline.aggregator.name, "failed": str(failed)},
            )
            return outcomes, aggregated, 0
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
        population: int,
    ) -> tuple[list[NodeOutcome], AggregationOutcome, int]:
        del population  # each group's sum is over its own members
        return grouped_secure_updates(
            self,
            round_number,
            sampled,
            self._instruction(round_number, weights, scaler),
            global_vector,
        )

    def _secure_updates(
        self,
        round_number: int,
        sampled: list[int],
        weights: ModelWeights,
        scaler: FeatureScaler,
        global_vector: np.ndarray,
        population: int,
    ) -> tuple[list[NodeOutcome], AggregationOutcome, int]:
        return secure_updates(
            self,
            round_number,
            sampled,
            self._instruction(round_number, weights, scaler),
            global_vector,
            population,
        )

    def _finish_round(
        self, record: RoundRecord, weights: ModelWeights, scaler: FeatureScaler
    ) -> None:
        self.history.append(record)
        state: dict[str, Any] = {
            "run_id": self.run_id,
            "config": self.config.to_options(),
            "history": self.history_dicts(),
        }
        if self.central_accountant is not None:
            state["central_accountant"] = self.central_accountant.state_dict()
        self.checkpoints.save_model(record.round, weights, scaler, state)
        if self.on_round is not None:
            self.on_round(record)

    # -- sampling and messages ---------------------------------------------------------

    def _sample(self, round_number: int, nodes: list[int]) -> list[int]:
        # Central DP: Poisson sampling from the server's OS CSPRNG, never the run seed.
        return self.central.sample(nodes) if self.central is not None else list(nodes)

    def _instructions(self, round_number: int) -> RoundInstructions:
        return RoundInstructions(
            run_id=self.run_id,
            round=round_number,
            planned_rounds=self.config.num_rounds,
            seed=self.config.seed,
            contract_name=self.config.contract.name,
            contract_hash=self.config.contract.content_hash(),
            model=self.config.model,
            training=self.config.training,
            local_dp=self.config.local_dp,
            planned_releases=self.config.trust.planned_releases(),
            update_clip_norm=self.config.update_clip_norm,
            model_hash=model_hash_for(schema_for(self.config.contract), self.config.model),
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
        return self.send_each(message_type, round_number, dict.fromkeys(nodes, content))

    def send_each(
        self, message_type: str, round_number: int, contents: Mapping[int, RecordDict]
    ) -> dict[int, Message]:
        """Send each node its own content; collect replies until the timeout.

        The result is a :class:`~fedguard.server.round_records.Replies`: a reply the
        SuperLink sent for a node it lost is under that node, and the send's timing
        lets a reason say ``no reply within 900 s`` or ``disconnected after 7 s``.
        """
        messages = [
            Message(
                content, dst_node_id=node, message_type=message_type, group_id=str(round_number)
            )
            for node, content in contents.items()
        ]
        if not messages:
            return {}
        replies = send_messages(self.grid, messages, self.reply_timeout)
        for source, reply in replies.items():
            status_record = (
                reply.content.config_records.get(protocol.STATUS) if reply.has_content() else None
            )
            if status_record is not None and "silo-id" in status_record:
                self.silo_names.setdefault(source, str(status_record["silo-id"]))
        return replies

    def silo_name(self, node: int) -> str:
        return self.silo_names.get(node, f"node-{node}")

    def identities_for(
        self, round_number: int, nodes: list[int], secure_only: bool = False
    ) -> SecAggIdentities | None:
        """The roster and node -> silo ids of a secure round (asks nodes not heard from);
        ``secure_only``: None unless the run has secure aggregation on."""
        if secure_only and not self.config.secagg.enabled:
            return None
        return secagg_identities(
            self.roster, self.silo_names, nodes, lambda t, c: self.send_each(t, round_number, c)
        )

    def _federated_scaler(self, nodes: list[int]) -> FeatureScaler:
        """The scaler from the silos' DP feature moments (see fedguard.server.secure_metrics)."""
        release = federated_scaler(
            lambda kind, contents: self.send_each(kind, 0, contents),
            nodes,
            self.config,
            self._instructions(0).to_record(),
            self.silo_name,
            identities=self.identities_for(0, nodes, secure_only=True),
        )
        write_moments(self.run_dir, release, self.config.data_name)
        return release.scaler

    def _evaluate(
        self, round_number: int, nodes: list[int], weights: ModelWeights, scaler: FeatureScaler
    ) -> EvaluationSummary:
        """Pooled evaluation: a secure sum with SecAgg on, per-silo sums otherwise."""
        return evaluate_round(
            lambda kind, contents: self.send_each(kind, round_number, contents),
            nodes,
            self.config,
            self._instruction(round_number, weights, scaler),
            round_number,
            self.silo_name,
            identities=self.identities_for(round_number, nodes, secure_only=True),
        )
