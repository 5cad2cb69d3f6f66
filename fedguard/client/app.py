"""The silo agent: a Flower ``ClientApp`` (Message API) that trains with DP-SGD.

:class:`SiloAgent` holds the handlers and knows nothing of how Flower built it,
so a Flower user can put them in their own ``ClientApp``::

    app = make_client_app(lambda context: settings_from_node_config(context.node_config))

Privacy flow of one ``train`` message (charged at release, fedguard.client.release):

1. parse and check the instruction and the global model against the silo's policy;
2. open the silo's persistent ledger (checked against its signed log); on the
   run's first round, calibrate the noise multiplier σ so that the planned rounds
   fit the silo's whole budget, and store that plan in the ledger (σ stays fixed
   for the run);
3. check this round's DP-SGD event fits the budget; if not, reply ``refused``
   and train nothing;
4. train with Opacus;
5. charge the round durably (ledger, then the silo log) right before the update
   leaves: in the ``train`` reply, or, under SecAgg, at the masked-input stage
   (a round that aborts before it costs nothing); keep the update in the
   outbox; reply with the new weights and the ledger's ε.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn

from fedguard.client.ledger_guard import open_silo_ledger
from fedguard.client.outbox import Outbox, SentUpdate, weights_sha256
from fedguard.client.policy import PolicyRefusalError, RefusalReason
from fedguard.client.release import PendingCharge, charge_release, spend_metrics
from fedguard.client.secagg_instances import InstanceKey
from fedguard.client.secure import SecureAggregationClient, clip_update, update_delta
from fedguard.client.secure_identity import identity_reply
from fedguard.client.silo import SiloSettings, check_contract, load_silo_data
from fedguard.client.silo_log import SIGNING_KEY, record_reply
from fedguard.client.statistic_release import (
    SILO_PRODUCERS,
    Producers,
    planned_release_events,
    release_statistic,
    released_values,
)
from fedguard.client.training import (
    LocalData,
    TrainResult,
    evaluate,
    silo_model,
    train_dp_sgd,
    train_non_private,
)
from fedguard.core.contract_validation import ContractViolationError
from fedguard.core.datasets import SiloData
from fedguard.core.errors import (
    BudgetExhaustedError,
    FedguardError,
    InfeasibleBudgetError,
    LedgerError,
    ProtocolError,
    TrainingRefusedError,
)
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.seeding import derive_seed
from fedguard.core.serialization import (
    ModelWeights,
    load_weights,
    record_to_weights,
    weights_to_record,
)
from fedguard.privacy.analysis.dp_sgd import calibrate_noise_multiplier, poisson_schedule
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger, RoundPlan
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus, RoundInstructions
from fedguard.wire.secagg import IDENTITY_QUERY
from fedguard.wire.statistics import StatisticKind, StatisticRequest

log = logging.getLogger(__name__)


def _reply(
    message: Message,
    silo_id: str,
    status: ReplyStatus,
    reason: str = "",
    records: dict[str, Any] | None = None,
    refusal: str = "",
) -> Message:
    content = RecordDict(
        {
            protocol.STATUS: protocol.status_record(status, reason, silo_id, refusal),
            **(records or {}),
        }
    )
    return Message(content, reply_to=message)


@dataclass(frozen=True)
class LocalUpdate:
    """A silo's trained model for one round, the global model it started from, metrics."""

    global_weights: ModelWeights
    weights: ModelWeights
    metrics: dict[str, float]
    # Under SecAgg: the charge the masked input will pay (fedguard.client.release).
    pending: PendingCharge | None = None


class UpdateAdversary(Protocol):
    """A misbehaving silo's update (research simulations play Byzantine silos with it).

    ``local_update`` replaces the honest round update; ``skips_clipping`` says the
    silo ignores the server's request to clip Δ before masking (a Byzantine silo
    would). The real agent never has one: :func:`make_client_app` passes one only
    where the caller asks, and the deployed ``app`` never does.
    """

    skips_clipping: bool

    def local_update(self, agent: SiloAgent, message: Message) -> LocalUpdate: ...


class SiloAgent:
    """The handlers of one silo, for one message."""

    def __init__(
        self,
        settings: SiloSettings,
        allow_non_private: bool = False,
        adversary: UpdateAdversary | None = None,
        producers: Producers = SILO_PRODUCERS,
    ) -> None:
        self.settings = settings
        self.allow_non_private = allow_non_private
        self.adversary = adversary
        # Which statistics this silo answers (the composition root adds the trust layer's).
        self.producers = producers

    # -- handlers ----------------------------------------------------------------------

    def handle(self, message: Message, action: Callable[[Message], Message]) -> Message:
        """Run ``action``; a typed fedguard error becomes an ``error`` reply with its reason."""
        try:
            return action(message)
        except (BudgetExhaustedError, InfeasibleBudgetError, TrainingRefusedError) as refused:
            # Policy decisions of the silo: a budget that cannot pay, a non-private request.
            log.warning("silo %s refused: %s", self.settings.silo_id, refused)
            code = refused.reason.value if isinstance(refused, PolicyRefusalError) else ""
            return _reply(
                message, self.settings.silo_id, ReplyStatus.REFUSED, str(refused), refusal=code
            )
        except ContractViolationError as broken:
            # The full report (columns, counts, examples) stays in the silo's log and
            # its report file; the server learns which checks failed, no counts.
            log.warning("silo %s refused: %s", self.settings.silo_id, broken)
            return _reply(
                message,
                self.settings.silo_id,
                ReplyStatus.REFUSED,
                broken.public_reason(),
                refusal=RefusalReason.DATA_CONTRACT.value,
            )
        except FedguardError as failed:
            log.error("silo %s failed: %s", self.settings.silo_id, failed)
            return _reply(
                message,
                self.settings.silo_id,
                ReplyStatus.ERROR,
                f"{type(failed).__name__}: {failed}",
            )

    def feature_statistics(self, message: Message) -> Message:
        """The federated scaler's feature moments, released in clear (plain mode).

        The same DP release as under SecAgg+ (``feature-moments`` statistic, noised
        and charged first, replayed from the release store): only the transport
        differs. With SecAgg on, the server asks through ``query.secagg_statistic``.
        """
        request = StatisticRequest.from_message(message)
        if request.kind is not StatisticKind.FEATURE_MOMENTS:
            raise ProtocolError(
                f"a feature-statistics query asks for feature moments, not {request.kind.value}"
            )
        _, values, metrics, _ = released_values(
            self.settings, self.allow_non_private, self.producers, message
        )
        return _reply(
            message,
            self.settings.silo_id,
            ReplyStatus.OK,
            records={
                protocol.STATISTICS: ArrayRecord({"moments": _array(values)}),
                protocol.METRICS: MetricRecord(dict(metrics)),
            },
        )

    def train(self, message: Message) -> Message:
        update = self.round_update(message)
        return self._train_reply(message, update.weights, update.metrics)

    def round_update(self, message: Message) -> LocalUpdate:
        """What this silo sends this round: its honest update, or its adversary's."""
        if self.adversary is not None:
            return self.adversary.local_update(self, message)
        return self.local_update(message)

    def local_update(self, message: Message) -> LocalUpdate:
        """Train on the global model in ``message`` (charging the ledger first)."""
        instructions = self._instructions(message)
        self._check_request(instructions)
        silo = self._load(message)
        model = silo_model(self.settings, silo.schema, instructions)
        global_weights = record_to_weights(self._record(message, protocol.ARRAYS))
        load_weights(model, global_weights)
        data = self._local_data(message, silo, train=True)
        # Used only where randomness may be public: research mode's seeded DP-SGD and
        # the non-private baseline; CSPRNG DP-SGD ignores it (fedguard.client.training).
        seed = derive_seed(instructions.seed, "train", self.settings.silo_id, instructions.round)
        if not instructions.local_dp.enabled:
            result = train_non_private(model, data, instructions.training, seed)
            weights = clip_update(global_weights, result.weights, instructions.update_clip_norm)
            return LocalUpdate(global_weights, weights, self._metrics(result, {"dp": 0}))
        return self._dp_update(message, instructions, model, data, global_weights, seed)

    def _check_request(self, instructions: RoundInstructions) -> None:
        """Refuse, before anything is loaded, trained or charged, what the policy forbids."""
        policy = self.settings.policy
        if not instructions.local_dp.enabled:
            if not self.allow_non_private:
                raise PolicyRefusalError(
                    RefusalReason.NON_PRIVATE,
                    f"silo {self.settings.silo_id} only trains with DP-SGD; "
                    "the server asked for non-private training",
                )
        else:
            policy.check_noise_source(instructions.local_dp.noise_source)
            policy.check_clip(instructions.local_dp.max_grad_norm)

    def _dp_update(
        self,
        message: Message,
        instructions: RoundInstructions,
        model: nn.Module,
        data: LocalData,
        global_weights: ModelWeights,
        seed: int,
    ) -> LocalUpdate:
        """A DP-SGD round: the update already sent if replayed, else train and charge."""
        policy = self.settings.policy
        # The silo's own noise source and σ ceiling, whatever the instruction says.
        local_dp = replace(
            instructions.local_dp,
            noise_source=policy.noise_source,
            max_noise_multiplier=policy.max_noise_multiplier,
        )
        outbox = Outbox(self.settings.state_dir)
        global_sha256 = weights_sha256(global_weights)
        channel = "secure" if message.metadata.message_type == protocol.SECAGG_SETUP else "plain"
        planned = self._sent_or_event(instructions, outbox, global_sha256, channel, len(data))
        if isinstance(planned, SentUpdate):
            return LocalUpdate(global_weights, planned.weights, {**planned.metrics, "replayed": 1})
        event = planned
        result = train_dp_sgd(
            model,
            data,
            instructions.training,
            local_dp,
            event.noise_multiplier,
            seed,
        )
        # Post-processing of the DP output: the run's robustness bound on Δ.
        weights = clip_update(global_weights, result.weights, instructions.update_clip_norm)
        pending = PendingCharge(
            instructions.run_id, instructions.round, ChargePurpose.TRAINING, event
        )
        metrics = self._metrics(result, {"noise-multiplier": event.noise_multiplier})
        if channel == "plain":
            # The reply is the release: charge now. Under SecAgg the masked input is
            # the release, charged at the mask stage (fedguard.client.secure).
            entry = charge_release(self.settings, pending)
            metrics.update(spend_metrics(self.settings, entry))
        # Kept before the reply leaves, so a replay can be answered identically.
        outbox.save(
            instructions.run_id,
            instructions.round,
            global_sha256,
            weights,
            metrics,
            channel,
        )
        return LocalUpdate(
            global_weights, weights, metrics, pending if channel == "secure" else None
        )

    def _sent_or_event(
        self,
        instructions: RoundInstructions,
        outbox: Outbox,
        global_sha256: str,
        channel: str,
        num_examples: int,
    ) -> SentUpdate | DpSgdRound:
        """Under the silo's ledger: the update already sent in a replayed round, or
        this round's DP-SGD event, checked affordable (not charged yet)."""
        where = f"round {instructions.round} of run {instructions.run_id!r}"
        with open_silo_ledger(self.settings) as ledger:  # checked against the silo log
            sent = outbox.load(instructions.run_id, instructions.round)
            if sent is not None:
                self._check_replay(instructions, sent, global_sha256, channel)
                # A replayed plain round (the server resumed after a crash): resend the
                # update already released and charged (the outbox is written after the
                # charge); training again would be a second release.
                log.warning(
                    "silo %s: %s replayed; resending the update already sent",
                    self.settings.silo_id,
                    where,
                )
                return sent
            event = self._round_event(ledger, instructions, num_examples)
            # Checked before training; charged only right before the update leaves
            # (fedguard.client.release): a round that ends before that costs nothing.
            if ledger.find(instructions.run_id, instructions.round) is None:
                ledger.check_affordable(event, where)
        return event

    def _check_replay(
        self, instructions: RoundInstructions, sent: SentUpdate, global_sha256: str, channel: str
    ) -> None:
        """Refuse a replay that would release more than the first answer did."""
        where = f"round {instructions.round} of run {instructions.run_id!r}"
        if sent.global_sha256 != global_sha256:
            raise PolicyRefusalError(
                RefusalReason.REPLAYED_ROUND,
                f"{where} was already trained from another global model; "
                "a second update would be a second release",
            )
        if sent.channel == "secure" or channel == "secure":
            raise PolicyRefusalError(
                RefusalReason.REPLAYED_ROUND,
                f"{where} was already answered ({sent.channel}); resending its update "
                f"{'in clear' if channel == 'plain' else 'in another secure aggregation'} "
                "would reveal it",
            )

    def encodable_update(
        self, message: Message
    ) -> tuple[np.ndarray, dict[str, float], PendingCharge | None]:
        """The round's update as one vector Δ = new − global, for secure aggregation,
        with the charge its masked input will pay."""
        update = self.round_update(message)
        return (
            update_delta(update.global_weights, update.weights),
            update.metrics,
            update.pending,
        )

    def _metrics(self, result: TrainResult, extra: dict[str, float]) -> dict[str, float]:
        # No training loss: it is a function of the private batches, not DP-noised
        # (docs/threat-model.md lists every field a silo sends).
        return {
            "num-examples": result.num_examples,
            "steps": result.steps,
            "sample-rate": result.sample_rate,
            "epsilon-budget": self.settings.budget.epsilon,
            "delta": self.settings.budget.delta,
            **extra,
        }

    def _train_reply(
        self, message: Message, weights: ModelWeights, metrics: dict[str, float]
    ) -> Message:
        return _reply(
            message,
            self.settings.silo_id,
            ReplyStatus.OK,
            records={
                protocol.ARRAYS: weights_to_record(weights),
                protocol.METRICS: MetricRecord(dict(metrics)),
            },
        )

    def evaluate(self, message: Message) -> Message:
        """Exact evaluation sums in clear (plain mode; SecAgg runs use the statistic path)."""
        if self.settings.policy.evaluation_epsilon is not None:
            raise PolicyRefusalError(
                RefusalReason.NON_PRIVATE,
                f"silo {self.settings.silo_id} releases its evaluations only with DP noise "
                "(evaluation-epsilon), under secure aggregation; not exact sums in clear",
            )
        instructions = self._instructions(message)
        silo = self._load(message)
        model = silo_model(self.settings, silo.schema, instructions)
        load_weights(model, record_to_weights(self._record(message, protocol.ARRAYS)))
        result = evaluate(
            model, self._local_data(message, silo, train=False), silo.schema.num_classes
        )
        records: dict[str, Any] = {
            protocol.METRICS: MetricRecord(
                {
                    "num-examples": result.num_examples,
                    "loss-sum": result.loss_sum,
                    "correct": result.correct,
                }
            )
        }
        if result.positive_histogram is not None and result.negative_histogram is not None:
            records[protocol.HISTOGRAMS] = ArrayRecord(
                {
                    "positive": _array(result.positive_histogram),
                    "negative": _array(result.negative_histogram),
                }
            )
        return _reply(message, self.settings.silo_id, ReplyStatus.OK, records=records)

    # -- what a round's message holds (also read by simulated adversaries) -------------

    def instructions(self, message: Message) -> RoundInstructions:
        return self._instructions(message)

    def global_weights(self, message: Message) -> ModelWeights:
        return record_to_weights(self._record(message, protocol.ARRAYS))

    def scaler(self, message: Message) -> FeatureScaler:
        return FeatureScaler.from_arrays(
            {k: v.numpy() for k, v in self._record(message, protocol.SCALER).items()}
        )

    # -- helpers -----------------------------------------------------------------------

    def _round_event(
        self, ledger: PrivacyLedger, instructions: RoundInstructions, num_examples: int
    ) -> DpSgdRound:
        """This round's DP-SGD event, from the run's plan (calibrated on first use)."""
        sample_rate, steps = poisson_schedule(
            num_examples, instructions.training.batch_size, instructions.training.local_epochs
        )
        plan = ledger.plan(instructions.run_id)
        if plan is None:
            entries = ledger.entries()
            spent = ledger.spent_epsilon()
            # The run is planned against the whole budget with everything already spent
            # composed in (exactly as the ledger will measure it), not against "budget
            # minus spent", which is not a valid composition rule at a fixed δ.
            try:
                sigma = calibrate_noise_multiplier(
                    sample_rate=sample_rate,
                    steps_per_round=steps,
                    rounds=instructions.planned_rounds,
                    target_epsilon=self.settings.budget.epsilon,
                    delta=self.settings.budget.delta,
                    max_noise_multiplier=self.settings.policy.max_noise_multiplier,
                    # Trust-layer releases planned after training are kept budget for.
                    prior=[e.event.to_dp_event() for e in entries]
                    + planned_release_events(
                        instructions.planned_releases, self.settings.budget.delta
                    )
                    + self._planned_evaluations(instructions),
                )
            except InfeasibleBudgetError as too_small:
                raise InfeasibleBudgetError(
                    f"silo {self.settings.silo_id} (spent ε={spent:.4g} of its budget "
                    f"ε={self.settings.budget.epsilon:g} in {len(entries)} earlier rounds): "
                    f"{too_small}"
                ) from None
            # The server's planned_rounds sets σ; a plan too thin for the silo's floor
            # is refused (charging nothing) rather than trained.
            self.settings.policy.check_noise_multiplier(sigma)
            plan = RoundPlan(
                sample_rate,
                sigma,
                steps,
                instructions.planned_rounds,
                private_against_server=self.settings.policy.private_against_server,
            )
            ledger.set_plan(instructions.run_id, plan)
        elif plan.sample_rate != sample_rate or plan.steps_per_round != steps:
            raise LedgerError(
                f"run {instructions.run_id} was planned with q={plan.sample_rate}, "
                f"{plan.steps_per_round} steps/round, but this round would use q={sample_rate}, "
                f"{steps} steps: the silo's data or the batch settings changed mid-run"
            )
        return DpSgdRound(plan.sample_rate, plan.noise_multiplier, plan.steps_per_round)

    def _planned_evaluations(self, instructions: RoundInstructions) -> list[Any]:
        """Noised evaluations (the silo's own policy) of this round and every later one.

        The plan is made at the run's first training round; the evaluations before
        it (round 0's) and the feature moments are charged already, so they are in
        the ledger's entries, not here.
        """
        epsilon = self.settings.policy.evaluation_epsilon
        if epsilon is None:
            return []
        count = max(instructions.planned_rounds - instructions.round + 1, 0)
        return planned_release_events([epsilon] * count, self.settings.budget.delta)

    def _instructions(self, message: Message) -> RoundInstructions:
        if protocol.CONFIG not in message.content.config_records:
            raise ProtocolError("instruction has no config record")
        instructions = RoundInstructions.from_record(
            message.content.config_records[protocol.CONFIG]
        )
        check_contract(self.settings, instructions.contract_name, instructions.contract_hash)
        return instructions

    def _load(self, message: Message) -> SiloData:
        return load_silo_data(self.settings)

    @staticmethod
    def _record(message: Message, key: str) -> ArrayRecord:
        if key not in message.content.array_records:
            raise ProtocolError(f"instruction has no {key!r} array record")
        return message.content.array_records[key]

    def _local_data(self, message: Message, silo: SiloData, *, train: bool) -> LocalData:
        scaler_arrays = {k: v.numpy() for k, v in self._record(message, protocol.SCALER).items()}
        scaler = FeatureScaler.from_arrays(scaler_arrays)
        part = silo.train if train else silo.test
        features = scaler.transform(part.features).reshape((-1, *silo.schema.input_shape))
        return LocalData(np.ascontiguousarray(features, dtype=np.float32), part.labels)


def training_instance(message: Message) -> InstanceKey:
    """The SecAgg instance a training round's setup belongs to: (run, round, training)."""
    if protocol.CONFIG not in message.content.config_records:
        raise ProtocolError("instruction has no config record")
    instructions = RoundInstructions.from_record(message.content.config_records[protocol.CONFIG])
    return InstanceKey(instructions.run_id, instructions.round, "training")


def statistic_instance(message: Message) -> InstanceKey:
    """The SecAgg instance of a statistic query: (run, query round, statistic kind)."""
    if protocol.CONFIG not in message.content.config_records:
        raise ProtocolError("statistic query has no config record")
    instructions = RoundInstructions.from_record(message.content.config_records[protocol.CONFIG])
    request = StatisticRequest.from_message(message)
    return InstanceKey(instructions.run_id, request.query_round, f"statistic:{request.kind.value}")


def _array(value: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(value))


#: What a handler does with the silo agent built for its message.
AgentAction = Callable[[SiloAgent, Message], Message]
#: One SecAgg+ stage of a silo: (its SecAgg client, the agent, the message) -> reply.
SecureStage = Callable[[SecureAggregationClient, SiloAgent, Message], Message]


@dataclass(frozen=True)
class _Handlers:
    """The ClientApp's handlers: each builds the silo agent from its message's context."""

    resolve_settings: Callable[[Context], SiloSettings]
    allow_non_private: bool = False
    adversary_for: Callable[[SiloSettings], UpdateAdversary | None] | None = None
    producers: Producers = field(default_factory=lambda: SILO_PRODUCERS)

    def agent(self, context: Context) -> SiloAgent:
        """The silo agent of ``context``, with the node's signing key if its settings lack one."""
        settings = self.resolve_settings(context)
        key = context.node_config.get(SIGNING_KEY)
        if settings.signing_key is None and key not in (None, ""):
            # One key signs every record of the silo log: the replies and the
            # ledger's commitments (fedguard.client.ledger_guard).
            settings = replace(settings, signing_key=Path(str(key)))
        return SiloAgent(
            settings,
            allow_non_private=self.allow_non_private,
            adversary=self.adversary_for(settings) if self.adversary_for is not None else None,
            producers=self.producers,
        )

    def dispatch(self, message: Message, context: Context, action: AgentAction) -> Message:
        """Run ``action`` on the agent of ``context``, then record its reply in the silo log."""
        try:
            silo_agent = self.agent(context)
        except FedguardError as misconfigured:
            log.error("silo misconfigured: %s", misconfigured)
            refusal = RecordDict(
                {
                    protocol.STATUS: protocol.status_record(
                        ReplyStatus.ERROR, f"{type(misconfigured).__name__}: {misconfigured}"
                    )
                }
            )
            return Message(refusal, reply_to=message)
        answer = silo_agent.handle(message, lambda m: action(silo_agent, m))
        # The silo's own log of what it sent (fedguard.client.silo_log); a reply that
        # cannot be recorded is not sent: it becomes an ``error`` reply saying why.
        return silo_agent.handle(
            message, lambda m: record_reply(silo_agent.settings, context.node_config, m, answer)
        )

    def plain(self, action: AgentAction) -> Callable[[Message, Context], Message]:
        """A Flower handler running ``action``."""
        return partial(self._plain, action)

    def secure(self, stage: SecureStage) -> Callable[[Message, Context], Message]:
        """A Flower handler running SecAgg+ ``stage`` with the silo's SecAgg client."""
        return partial(self._secure, stage)

    def _plain(self, action: AgentAction, message: Message, context: Context) -> Message:
        return self.dispatch(message, context, action)

    def _secure(self, stage: SecureStage, message: Message, context: Context) -> Message:
        return self.dispatch(message, context, partial(_run_secure_stage, stage, context))


def _run_secure_stage(
    stage: SecureStage, context: Context, silo_agent: SiloAgent, message: Message
) -> Message:
    client = SecureAggregationClient(context, silo_agent.settings)
    return stage(client, silo_agent, message)


def _training_setup(
    client: SecureAggregationClient, silo_agent: SiloAgent, message: Message
) -> Message:
    adversary = silo_agent.adversary
    return client.setup(
        message,
        silo_agent.encodable_update,
        training_instance(message),
        clip=adversary is None or not adversary.skips_clipping,
    )


def _statistic_setup(
    client: SecureAggregationClient, silo_agent: SiloAgent, message: Message
) -> Message:
    return client.setup(
        message,
        partial(
            release_statistic,
            silo_agent.settings,
            silo_agent.allow_non_private,
            silo_agent.producers,
        ),
        statistic_instance(message),
    )


def make_client_app(
    resolve_settings: Callable[[Context], SiloSettings],
    allow_non_private: bool = False,
    mods: list[Mod] | None = None,
    adversary_for: Callable[[SiloSettings], UpdateAdversary | None] | None = None,
    producers: Producers = SILO_PRODUCERS,
) -> ClientApp:
    """A ``ClientApp`` whose silo settings come from ``resolve_settings(context)``.

    ``mods`` are Flower mods wrapped around every handler (simulation uses them to
    play misbehaving silos). ``producers`` are the statistics the silo answers: its
    own (feature moments, evaluation) unless the caller adds more, as the composition
    root does with the trust layer's (:mod:`fedguard.apps.silo`).
    """
    app = ClientApp(mods=mods)
    handlers = _Handlers(resolve_settings, allow_non_private, adversary_for, producers)
    app.train("secagg_setup")(handlers.secure(_training_setup))
    app.train("secagg_share")(handlers.secure(lambda c, a, m: c.share_keys(m)))
    app.train("secagg_mask")(handlers.secure(lambda c, a, m: c.mask(m)))
    app.train("secagg_consistency")(handlers.secure(lambda c, a, m: c.consistency(m)))
    app.train("secagg_unmask")(handlers.secure(lambda c, a, m: c.unmask(m)))
    # Trust-layer statistics: the first SecAgg+ stage is a query, the rest as above.
    app.query("secagg_statistic")(handlers.secure(_statistic_setup))
    app.query("feature_statistics")(handlers.plain(SiloAgent.feature_statistics))
    # Which silo this node is (for the SecAgg roster): the silo id only, no data.
    app.query(IDENTITY_QUERY.removeprefix("query."))(
        handlers.plain(lambda a, m: identity_reply(a.settings, m))
    )
    app.train()(handlers.plain(SiloAgent.train))
    app.evaluate()(handlers.plain(SiloAgent.evaluate))
    return app
