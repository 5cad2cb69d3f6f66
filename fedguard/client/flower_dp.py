"""fedguard's DP-SGD silo as handlers for a plain Flower ``ClientApp`` (FedAvg or any
Message API strategy), with the user's own torch model and data.

::

    silo = DpSgdSilo(make_model, train_data, test_data)  # policy from node_config
    app = ClientApp()
    app.train()(silo.train)
    app.evaluate()(silo.evaluate)
    # or: app = silo.client_app()

In: a ``train`` message with ``content["arrays"]`` (the global model) and
``content["config"]`` (``server-round`` and whatever the strategy's
``train_config`` holds). Out: ``content["arrays"]`` (the locally trained model,
under the user's own state-dict keys) and ``content["metrics"]``
(``num-examples``, which FedAvg weights by, ``epsilon-spent``, ``epsilon-budget``,
``delta``, ``noise-multiplier``, ``sample-rate``, ``steps``, ``ledger-resets``,
``epsilon-archived``). No training loss: it is a function of the private batches
and is not noised (docs/threat-model.md).

One ``train`` message, charged at release (as :mod:`fedguard.client.release`):

1. the silo's own :class:`~fedguard.client.flower_dp_policy.DpSiloPolicy`; a
   server config naming a privacy setting is refused;
2. the user's model, checked by Opacus's ``ModuleValidator`` (fixed only where
   the policy allows), loaded with the server's arrays (same keys and shapes,
   finite, else refused);
3. the ledger opened through :func:`fedguard.client.ledger_guard.open_silo_ledger`
   (a deleted, rolled-back or replaced ledger is refused); a (run, round) already
   charged is refused (one release per round, no outbox here); the round's event
   (σ fixed, or calibrated once per run and kept as the run's plan) checked
   affordable: past the budget the silo refuses and trains nothing;
4. :func:`fedguard.client.training.run_dp_sgd`: Opacus with Poisson batches and
   Gaussian noise from fedguard's CSPRNG;
5. the charge committed (ledger, then the silo log's ``charged`` record, then
   ``completed``) right before the reply leaves, plus a ``sent`` record. A round
   that fails before this charges nothing.

A refusal is a Flower error reply (:mod:`fedguard.client.flower_dp_policy`). A
simulated ClientApp is rebuilt for every message: nothing is kept in memory, all
state is in the policy's state folder. ``evaluate`` returns ``eval-loss``,
``eval-acc`` and ``num-examples`` of the global model on the test data, exact
(not DP: the evaluation split is not trained on, but its records are people too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedguard.audit.logs import SiloLog
from fedguard.audit.pki import load_private_key
from fedguard.client.flower_dp_policy import (
    REFUSAL_PREFIX,
    DpRefusal,
    DpSiloPolicy,
    DpSiloRefusedError,
    check_server_config,
)
from fedguard.client.ledger_guard import (
    LedgerIntegrityError,
    ledger_resets,
    open_silo_ledger,
    record_charge,
)
from fedguard.client.training import TrainingError, run_dp_sgd
from fedguard.core.errors import (
    BudgetExhaustedError,
    ConfigError,
    DataError,
    FedguardError,
    InfeasibleBudgetError,
    NonFiniteUpdateError,
    ShapeMismatchError,
)
from fedguard.core.serialization import weights_sha256
from fedguard.privacy.analysis.dp_sgd import calibrate_noise_multiplier, poisson_schedule
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import ChargeStatus, LedgerEntry, PrivacyLedger, RoundPlan

__all__ = [
    "DpSgdSilo",
    "ModelUnsupportedError",
    "SiloData",
    "make_dp_client_app",
    "prepare_model",
    "state_arrays",
]

log = logging.getLogger(__name__)

#: What a user's data function returns: a TensorDataset (features, labels, ...) or a
#: (features, labels) pair of tensors or arrays.
SiloData: TypeAlias = TensorDataset | tuple[Any, Any]
_OPACUS_PREFIX = "_module."
_Metrics: TypeAlias = dict[str, int | float | list[int] | list[float]]


class ModelUnsupportedError(FedguardError):
    """Opacus cannot train the user's model privately (its reasons are in the message)."""


def prepare_model(model: nn.Module, *, allow_fix: bool = False) -> nn.Module:
    """``model`` if Opacus's ``ModuleValidator`` accepts it, else its fixed copy.

    With ``allow_fix`` the layers Opacus names (BatchNorm, LSTM, ...) are replaced by
    ``ModuleValidator.fix`` (logged); what is still invalid, or anything invalid
    without ``allow_fix``, raises :class:`ModelUnsupportedError` with Opacus's
    reasons. The server's initial model must be the prepared one (its keys change).
    """
    if not isinstance(model, nn.Module):
        raise ModelUnsupportedError(f"the model function returned {type(model).__name__}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors and allow_fix:
        log.info("Opacus replaced layers it cannot train privately: %s", errors)
        model = ModuleValidator.fix(model)
        errors = ModuleValidator.validate(model, strict=False)
    if errors:
        fix = "" if allow_fix else " (fix-model is off)"
        raise ModelUnsupportedError(
            f"Opacus cannot train this model with DP-SGD{fix}: "
            + "; ".join(f"{type(e).__name__}: {e}" for e in errors)
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelUnsupportedError("the model has no trainable parameter")
    return model


def state_arrays(model: nn.Module) -> ArrayRecord:
    """``model``'s state as an ArrayRecord under the user's keys (no ``_module.``)."""
    return ArrayRecord(torch_state_dict=_user_state(model))


def _user_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        key.removeprefix(_OPACUS_PREFIX): value.detach().cpu()
        for key, value in model.state_dict().items()
    }


def _load_global(model: nn.Module, record: ArrayRecord) -> None:
    """Load the server's arrays into ``model``: same keys and shapes, finite, else refused."""
    expected = _user_state(model)
    try:
        stored = record.to_torch_state_dict()
    except Exception as unreadable:  # flwr raises plain exceptions here
        raise ShapeMismatchError(f"the server's arrays cannot be read: {unreadable}") from None
    received: dict[str, torch.Tensor] = {
        key.removeprefix(_OPACUS_PREFIX)
        if key not in expected and key.removeprefix(_OPACUS_PREFIX) in expected
        else key: value
        for key, value in stored.items()
    }
    missing, extra = sorted(expected.keys() - received), sorted(received.keys() - expected)
    if missing or extra:
        raise ShapeMismatchError(
            f"the server's arrays do not match the model: missing {missing}, unexpected {extra}"
        )
    for key, mine in expected.items():
        theirs = received[key]
        if tuple(theirs.shape) != tuple(mine.shape):
            raise ShapeMismatchError(
                f"array {key!r} has shape {tuple(theirs.shape)}, the model's is {tuple(mine.shape)}"
            )
        if mine.is_floating_point() != theirs.is_floating_point():
            raise ShapeMismatchError(f"array {key!r} is {theirs.dtype}, the model's {mine.dtype}")
        if theirs.is_floating_point() and not bool(torch.isfinite(theirs).all()):
            raise NonFiniteUpdateError(f"the server's array {key!r} holds NaN or Inf")
    loadable = {key: received[key].to(mine.dtype) for key, mine in expected.items()}
    model.load_state_dict(loadable, strict=True)


def _as_dataset(data: object, what: str) -> TensorDataset:
    """The user's data as a TensorDataset of float32 features and int64 labels."""
    if isinstance(data, TensorDataset):
        tensors = data.tensors
    elif isinstance(data, tuple) and len(data) == 2:
        tensors = tuple(torch.as_tensor(np.asarray(part)) for part in data)
    else:
        raise DataError(
            f"the {what} function must return a TensorDataset or (features, labels), "
            f"got {type(data).__name__}"
        )
    if len(tensors) < 2:
        raise DataError(f"the {what} data needs features and labels")
    features, labels = tensors[0], tensors[1]
    if not features.is_floating_point() or labels.is_floating_point() or labels.ndim != 1:
        raise DataError(
            f"the {what} data needs floating-point features and 1-D integer class labels, "
            f"got {features.dtype} and {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if len(features) != len(labels) or len(labels) == 0:
        raise DataError(f"the {what} data has {len(features)} rows and {len(labels)} labels")
    return TensorDataset(features.float(), labels.long(), *tensors[2:])


PolicyFn = Callable[[Context], DpSiloPolicy]
DataFn = Callable[[Context], SiloData]


def _policy_from_context(context: Context) -> DpSiloPolicy:
    return DpSiloPolicy.from_node_config(context.node_config)


class DpSgdSilo:
    """The ``train`` and ``evaluate`` handlers of a DP-SGD silo under any Flower server.

    ``model_fn()``: a fresh instance of the user's model (the same architecture the
    server's arrays come from). ``train_data_fn(context)`` / ``test_data_fn(context)``:
    this node's data (:data:`SiloData`). ``policy_fn(context)``: the silo's
    :class:`DpSiloPolicy`, by default from ``context.node_config``. Holds no state.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        train_data_fn: DataFn,
        test_data_fn: DataFn | None = None,
        policy_fn: PolicyFn = _policy_from_context,
    ) -> None:
        self._model_fn = model_fn
        self._train_data_fn = train_data_fn
        self._test_data_fn = test_data_fn
        self._policy_fn = policy_fn

    def client_app(self) -> ClientApp:
        """A ``ClientApp`` with these handlers as its ``train`` and ``evaluate``."""
        app = ClientApp()
        app.train()(self.train)
        app.evaluate()(self.evaluate)
        return app

    # -- handlers ----------------------------------------------------------------------

    def train(self, msg: Message, context: Context) -> Message:
        """One DP-SGD round, or an error reply with its refusal (nothing charged)."""
        try:
            policy = self._policy_fn(context)
        except FedguardError as bad:
            return _error_reply(msg, _refusal(bad), f"silo misconfigured: {bad}")
        try:
            return self._train(msg, context, policy)
        except FedguardError as refused:
            refusal = _refusal(refused)
            log.warning("DP silo %s refused: %s", policy.silo_id, refused)
            _log_sent(policy, msg, None, None, f"refused:{refusal.value}", str(refused))
            return _error_reply(msg, refusal, f"silo {policy.silo_id}: {refused}")

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Loss, accuracy and size of the global model on the test data (not DP)."""
        try:
            policy = self._policy_fn(context)
            if self._test_data_fn is None:
                raise DpSiloRefusedError(DpRefusal.MISCONFIGURED, "this silo has no test data")
            model = prepare_model(self._model_fn(), allow_fix=policy.fix_model)
            _load_global(model, _arrays(msg))
            data = _as_dataset(self._test_data_fn(context), "test data")
            return Message(
                RecordDict({"metrics": MetricRecord(_evaluate(model, data))}), reply_to=msg
            )
        except FedguardError as refused:
            return _error_reply(msg, _refusal(refused), str(refused))

    # -- one round -----------------------------------------------------------------------

    def _train(self, msg: Message, context: Context, policy: DpSiloPolicy) -> Message:
        config = _config(msg)
        check_server_config(config)
        server_round = _server_round(config)
        run_id = f"flower-run-{msg.metadata.run_id}"
        model = prepare_model(self._model_fn(), allow_fix=policy.fix_model)
        _load_global(model, _arrays(msg))
        dataset = _as_dataset(self._train_data_fn(context), "training data")
        event = _affordable_event(policy, run_id, server_round, len(dataset))
        # Seed unused: CSPRNG noise and batches (policy.local_dp is never seeded).
        run = run_dp_sgd(
            model, dataset, policy.training, policy.local_dp, event.noise_multiplier, 0
        )
        if run.steps != event.steps or run.sample_rate != event.sample_rate:
            raise TrainingError(f"trained q={run.sample_rate}, {run.steps} steps; planned {event}")
        state = _user_state(model)
        if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
            raise TrainingError("local DP-SGD diverged: the model holds NaN or Inf")
        entry = _charge(policy, run_id, server_round, event)
        resets = ledger_resets(policy.state_dir)
        metrics: _Metrics = {
            "num-examples": len(dataset),
            "steps": event.steps,
            "sample-rate": event.sample_rate,
            "noise-multiplier": event.noise_multiplier,
            "epsilon-spent": entry.epsilon_after,
            "epsilon-budget": policy.epsilon_budget,
            "delta": policy.delta,
            "ledger-resets": resets.count,
            "epsilon-archived": resets.archived_epsilon,
        }
        sha = weights_sha256({k: v.numpy() for k, v in state.items()})
        _log_sent(policy, msg, sha, entry.epsilon_after, "ok", "", strict=True)
        content = RecordDict(
            {"arrays": ArrayRecord(torch_state_dict=state), "metrics": MetricRecord(metrics)}
        )
        return Message(content, reply_to=msg)


def _affordable_event(
    policy: DpSiloPolicy, run_id: str, server_round: int, num_examples: int
) -> DpSgdRound:
    """This round's DP-SGD event, checked affordable under the (verified) ledger."""
    where = f"round {server_round} of {run_id}"
    with open_silo_ledger(policy) as ledger:
        if ledger.find(run_id, server_round) is not None:
            raise DpSiloRefusedError(
                DpRefusal.REPLAYED_ROUND,
                f"{where} was already trained and released; a second update would be a "
                "second release",
            )
        event = _round_event(ledger, policy, run_id, num_examples)
        ledger.check_affordable(event, where)
    return event


def _round_event(
    ledger: PrivacyLedger, policy: DpSiloPolicy, run_id: str, num_examples: int
) -> DpSgdRound:
    """Fixed σ, or σ calibrated on the run's first round and kept as its plan."""
    q, steps = poisson_schedule(num_examples, policy.batch_size, policy.local_epochs)
    if policy.noise_multiplier is not None:
        return DpSgdRound(q, policy.noise_multiplier, steps)
    plan = ledger.plan(run_id)
    if plan is None:
        if policy.round_epsilon is not None:
            rounds, target, prior = 1, policy.round_epsilon, []
        else:
            rounds, target = policy.planned_rounds or 1, policy.epsilon_budget
            prior = [entry.event.to_dp_event() for entry in ledger.entries()]
        sigma = calibrate_noise_multiplier(
            q, steps, rounds, target, policy.delta, policy.max_noise_multiplier, prior=prior
        )
        # planned_rounds is 1 for round-epsilon: σ was calibrated for one round alone.
        plan = RoundPlan(q, sigma, steps, rounds)
        ledger.set_plan(run_id, plan)
    elif plan.sample_rate != q or plan.steps_per_round != steps:
        raise ConfigError(
            f"{run_id} was planned with q={plan.sample_rate}, {plan.steps_per_round} steps a "
            f"round; this round would run q={q}, {steps} steps: the silo's data or batch "
            "settings changed mid-run"
        )
    return plan.round_event()


def _charge(policy: DpSiloPolicy, run_id: str, server_round: int, event: DpSgdRound) -> LedgerEntry:
    """Commit the round's charge (ledger, silo log, completed) right before release."""
    with open_silo_ledger(policy) as ledger:
        entry = ledger.charge(run_id, server_round, event)
        record_charge(policy, ledger, entry)
        ledger.mark(entry.entry_id, ChargeStatus.COMPLETED)
    return entry


@torch.no_grad()
def _evaluate(model: nn.Module, data: TensorDataset) -> _Metrics:
    model.eval()
    loss_sum, correct = 0.0, 0
    for features, labels, *_ in DataLoader(data, batch_size=1024):
        logits = model(features)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    n = len(data)
    return {"eval-loss": loss_sum / n, "eval-acc": correct / n, "num-examples": n}


# -- messages ------------------------------------------------------------------------------


def _config(msg: Message) -> ConfigRecord:
    records = msg.content.config_records
    if "config" not in records:
        raise DpSiloRefusedError(DpRefusal.BAD_MESSAGE, "the train message has no 'config'")
    return records["config"]


def _server_round(config: Mapping[str, Any]) -> int:
    value = config.get("server-round")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DpSiloRefusedError(
            DpRefusal.BAD_MESSAGE,
            f"the train config's 'server-round' must be an integer >= 0, got {value!r}",
        )
    return value


def _arrays(msg: Message) -> ArrayRecord:
    records = msg.content.array_records
    if "arrays" not in records:
        raise DpSiloRefusedError(DpRefusal.BAD_MESSAGE, "the message has no 'arrays' record")
    return records["arrays"]


def _refusal(error: FedguardError) -> DpRefusal:
    if isinstance(error, DpSiloRefusedError):
        return error.refusal
    for types, refusal in _REFUSALS:
        if isinstance(error, types):
            return refusal
    return DpRefusal.FAILED


_REFUSALS: tuple[tuple[type[FedguardError] | tuple[type[FedguardError], ...], DpRefusal], ...] = (
    ((BudgetExhaustedError, InfeasibleBudgetError), DpRefusal.BUDGET_EXHAUSTED),
    (LedgerIntegrityError, DpRefusal.LEDGER_INTEGRITY),
    ((ShapeMismatchError, NonFiniteUpdateError), DpRefusal.BAD_ARRAYS),
    (ModelUnsupportedError, DpRefusal.MODEL_UNSUPPORTED),
    (TrainingError, DpRefusal.TRAINING_FAILED),
    ((ConfigError, DataError), DpRefusal.MISCONFIGURED),
)


def _error_reply(msg: Message, refusal: DpRefusal, detail: str) -> Message:
    reason = f"{REFUSAL_PREFIX}:{refusal.value}: {detail}"
    return Message(Error(code=refusal.code, reason=reason), reply_to=msg)


def _log_sent(
    policy: DpSiloPolicy,
    msg: Message,
    update_sha256: str | None,
    epsilon: float | None,
    status: str,
    reason: str,
    *,
    strict: bool = False,
) -> None:
    """A ``sent`` record in the silo log; a refusal that cannot be logged is still sent."""
    try:
        key = None if policy.signing_key is None else load_private_key(policy.signing_key)
        SiloLog.open(Path(policy.state_dir), key).sent(
            f"flower-run-{msg.metadata.run_id}",
            _round_or_none(msg),
            msg.metadata.message_type,
            update_sha256,
            epsilon,
            status,
            reason=reason,
        )
    except (FedguardError, OSError) as unlogged:
        if strict:
            raise
        log.warning("DP silo %s could not log its refusal: %s", policy.silo_id, unlogged)


def _round_or_none(msg: Message) -> int | None:
    config = msg.content.config_records.get("config")
    value = None if config is None else config.get("server-round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def make_dp_client_app(
    model_fn: Callable[[], nn.Module],
    train_data_fn: DataFn,
    test_data_fn: DataFn | None = None,
    policy_fn: PolicyFn = _policy_from_context,
) -> ClientApp:
    """A ready ``ClientApp`` with a :class:`DpSgdSilo`'s ``train`` and ``evaluate``."""
    return DpSgdSilo(model_fn, train_data_fn, test_data_fn, policy_fn).client_app()
