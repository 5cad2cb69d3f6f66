"""Knowledge distillation of the global model (teacher) into an edge-sized student.

Loss (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
2015): ``α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)`` with
teacher logits ``t``, student logits ``s``, temperature ``T``; the ``T²`` keeps
the soft term's gradients on the scale of the hard term's as ``T`` grows.

Two modes (:class:`DistillMode`):

``federated`` — extra federated rounds in which every silo trains the student on
    its own training split against the teacher's soft labels (teacher logits
    computed locally by the silo on its own records) **under DP-SGD**, and the
    server averages the students with the run's aggregation pipeline. Each silo
    charges its own persistent :class:`~fedguard.privacy.ledger.PrivacyLedger`
    (the same ledger file, a new run id), exactly as
    :class:`~fedguard.client.app.SiloAgent` does: before the first round σ is
    calibrated so that the planned distillation rounds fit the silo's whole
    budget *with everything already spent composed in*; every round is checked
    against the budget before training and charged at release (after training,
    before the student's update leaves the silo), as a training round is. A silo whose
    budget cannot pay stops the export before anything is charged. Each record's
    tuple (features, label, teacher logits) is one sample of DP-SGD, so the
    usual sample-level guarantee holds; the teacher itself is a DP release (post-
    processing), and the student's guarantee is the silo ledger's composition of
    both runs.

    **This is the in-process path**: :func:`distill_federated` runs the silos'
    side in this process over silo data rebuilt from a saved simulation run
    (:func:`fedguard.core.silos.simulation_silos` with the run's config). A
    deployed path needs a ``distill`` message type in fedguard's protocol carrying
    teacher and student weights, a silo handler (in ``SiloAgent``) that computes
    the teacher's logits on its records, charges its ledger and calls
    :func:`train_dp_sgd_distill`, and a server loop like the orchestrator's; the
    functions here are written to be those handlers' bodies.

``server`` — the server distils on an unlabeled transfer set: a public data set
    when one is given, otherwise synthetic rows drawn from the federated feature
    statistics (:func:`fedguard.edge.quantize.synthetic_features`). No silo record
    is touched and **no privacy budget is spent**: the student is post-processing
    of the (DP) teacher and of the statistics the server already holds (which are
    not DP-protected; the model card says so). There are no labels, so the loss
    is the soft term alone (``α = 1``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedguard.aggregation.pipeline import AggregationPipeline, ClientUpdate
from fedguard.audit.logs import SILO_LOG_NAME
from fedguard.client.ledger_guard import open_silo_ledger, record_charge
from fedguard.client.training import (
    BatchLoss,
    LocalData,
    TrainingError,
    TrainResult,
    run_dp_sgd,
    run_non_private,
    training_result,
)
from fedguard.core.checks import positive, positive_int
from fedguard.core.config import (
    CentralDPConfig,
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    OptimizerKind,
    PrivacyBudget,
)
from fedguard.core.errors import (
    BudgetExhaustedError,
    ConfigError,
    InfeasibleBudgetError,
    LedgerError,
)
from fedguard.core.seeding import derive_seed, numpy_rng, seed_torch
from fedguard.core.serialization import (
    flatten_weights,
    load_weights,
    model_weights,
    unflatten_weights,
)
from fedguard.edge.student import StudentCNN, StudentKind, StudentSpec
from fedguard.privacy.analysis.dp_sgd import calibrate_noise_multiplier, poisson_schedule
from fedguard.privacy.central_accounting import accounted_round
from fedguard.privacy.events import DpFedAvgRound, DpSgdRound
from fedguard.privacy.ledger import ChargeStatus, PrivacyLedger, RoundPlan

__all__ = [
    "DistillConfig",
    "DistillMode",
    "DistillSilo",
    "FederatedDistillResult",
    "ServerDistillResult",
    "SiloDistillPlan",
    "StudentCNN",
    "StudentKind",
    "StudentSpec",
    "distill_federated",
    "distill_on_transfer_set",
    "distillation_loss",
    "next_distill_run_id",
    "teacher_logits",
    "train_dp_sgd_distill",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config


class DistillMode(StrEnum):
    FEDERATED = "federated"
    SERVER = "server"


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings for both modes.

    ``alpha`` weighs the soft (teacher) term against the hard (label) term in the
    federated mode; the server mode has no labels and uses the soft term alone.
    ``alpha = 0`` in the federated mode trains the student directly on the labels
    (no teacher): the baseline distillation is compared with.
    """

    mode: DistillMode = DistillMode.SERVER
    temperature: float = 4.0
    alpha: float = 0.7
    # federated mode
    rounds: int = 5
    training: LocalTrainingConfig = field(
        default_factory=lambda: LocalTrainingConfig(
            local_epochs=1, batch_size=64, learning_rate=0.05, optimizer=OptimizerKind.SGD
        )
    )
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS
    # server mode
    transfer_rows: int = 8192
    server_epochs: int = 20
    server_batch_size: int = 128
    server_learning_rate: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.mode, DistillMode):
            raise ConfigError(f"distillation mode must be a DistillMode, got {self.mode!r}")
        positive("temperature", self.temperature)
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        positive_int("distillation rounds", self.rounds)
        positive_int("transfer_rows", self.transfer_rows)
        positive_int("server_epochs", self.server_epochs)
        positive_int("server_batch_size", self.server_batch_size)
        positive("server_learning_rate", self.server_learning_rate)
        if not isinstance(self.training, LocalTrainingConfig):
            raise ConfigError("training must be a LocalTrainingConfig")
        if self.grad_sample_mode is GradSampleMode.GHOST:
            raise ConfigError(
                "ghost clipping needs a two-argument criterion; the distillation loss takes "
                "teacher logits too: use hooks, functorch or ew"
            )


# --------------------------------------------------------------------------- loss


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Mean over the batch of ``α T² KL(p_t^T ‖ p_s^T) + (1 − α) CE(s, y)``.

    ``labels=None`` (no labels) requires ``alpha == 1``.
    """
    t = float(temperature)
    soft = nn.functional.kl_div(
        torch.log_softmax(student_logits / t, dim=1),
        torch.log_softmax(teacher_logits / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    if alpha >= 1.0:
        return soft
    if labels is None:
        raise ConfigError("alpha < 1 needs labels for the cross-entropy term")
    hard = nn.functional.cross_entropy(student_logits, labels)
    if alpha <= 0.0:
        return hard
    return alpha * soft + (1.0 - alpha) * hard


@torch.no_grad()
def teacher_logits(teacher: nn.Module, features: np.ndarray, batch: int = 1024) -> np.ndarray:
    """float32 logits of the teacher on model-shaped, scaled features."""
    teacher.eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    parts = [teacher(x[i : i + batch]) for i in range(0, x.shape[0], batch)]
    return torch.cat(parts).numpy().astype(np.float32)


# --------------------------------------------------------------------------- server mode


@dataclass(frozen=True)
class ServerDistillResult:
    rows: int
    epochs: int
    final_loss: float
    transfer_source: str


def distill_on_transfer_set(
    teacher: nn.Module,
    student: nn.Module,
    transfer: np.ndarray,
    config: DistillConfig,
    seed: int,
    transfer_source: str,
) -> ServerDistillResult:
    """Train ``student`` (in place) to match ``teacher`` on unlabeled transfer rows.

    ``transfer`` is scaled and model-shaped (float32). No silo data and no privacy
    budget are used; the soft loss alone is minimized with Adam.
    """
    if transfer.shape[0] == 0:
        raise ConfigError("the transfer set is empty")
    soft = torch.from_numpy(teacher_logits(teacher, transfer))
    x = torch.from_numpy(np.ascontiguousarray(transfer, dtype=np.float32))
    generator = torch.Generator().manual_seed(derive_seed(seed, "edge-server-distill"))
    optimizer = torch.optim.Adam(student.parameters(), lr=config.server_learning_rate)
    student.train()
    loss_value = float("nan")
    for _ in range(config.server_epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        losses = []
        for i in range(0, x.shape[0], config.server_batch_size):
            rows = order[i : i + config.server_batch_size]
            optimizer.zero_grad()
            loss = distillation_loss(student(x[rows]), soft[rows], None, config.temperature, 1.0)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
        loss_value = float(np.mean(losses))
    student.eval()
    if not all(np.isfinite(v).all() for v in model_weights(student).values()):
        raise TrainingError("server-side distillation diverged: the student holds NaN or Inf")
    return ServerDistillResult(
        rows=int(x.shape[0]),
        epochs=config.server_epochs,
        final_loss=loss_value,
        transfer_source=transfer_source,
    )


# --------------------------------------------------------------------------- DP-SGD with KD


def _distill_dataset(data: LocalData, soft_targets: np.ndarray) -> TensorDataset:
    """Features, labels and the teacher's soft targets, sampled together."""
    return TensorDataset(
        torch.from_numpy(data.features),
        torch.from_numpy(data.labels),
        torch.from_numpy(np.ascontiguousarray(soft_targets, dtype=np.float32)),
    )


def _distill_loss(temperature: float, alpha: float) -> BatchLoss:
    def batch_loss(student: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        features, labels, soft = batch
        return distillation_loss(student(features), soft, labels, temperature, alpha)

    return batch_loss


def train_dp_sgd_distill(
    model: nn.Module,
    data: LocalData,
    soft_targets: np.ndarray,
    training: LocalTrainingConfig,
    dp: LocalDPConfig,
    noise_multiplier: float,
    seed: int,
    temperature: float,
    alpha: float,
) -> TrainResult:
    """:func:`fedguard.client.training.train_dp_sgd` with the distillation loss.

    The same Opacus set-up, schedule check against
    :func:`~fedguard.privacy.analysis.dp_sgd.poisson_schedule`, noise-only steps for
    empty Poisson batches and CSPRNG noise as fedguard's DP-SGD; the only change is
    the loss, which also reads each sample's teacher logits (sampled with it).
    """
    if soft_targets.shape[0] != len(data) or soft_targets.dtype != np.float32:
        raise ConfigError("soft targets must be float32 with one row per training record")
    if dp.grad_sample_mode is GradSampleMode.GHOST:
        raise ConfigError("ghost clipping is not supported for the distillation loss")
    dataset = _distill_dataset(data, soft_targets)
    batch_loss = _distill_loss(temperature, alpha)
    run = run_dp_sgd(model, dataset, training, dp, noise_multiplier, seed, batch_loss)
    return training_result(model, len(data), run, "DP-SGD distillation diverged: the student")


def train_non_private_distill(
    model: nn.Module,
    data: LocalData,
    soft_targets: np.ndarray,
    config: DistillConfig,
    seed: int,
) -> TrainResult:
    """The non-private twin of :func:`train_dp_sgd_distill` (shuffled batches, no noise).

    Only for the ``no-dp`` research variant of a simulation, never for a DP run.
    """
    run = run_non_private(
        model,
        _distill_dataset(data, soft_targets),
        config.training,
        seed,
        _distill_loss(config.temperature, config.alpha),
    )
    return training_result(model, len(data), run, "distillation diverged: the student")


# --------------------------------------------------------------------------- federated mode


@dataclass(frozen=True)
class DistillSilo:
    """One silo's side of federated distillation: identity, ledger, budget, train split."""

    silo_id: str
    state_dir: Path
    budget: PrivacyBudget
    train: LocalData  # scaled, model-shaped float32 features and labels
    # The key the silo signs its log with (None: an unsigned log, as in simulation).
    # Every charge goes through the silo's ledger guard, like a training round's.
    signing_key: Path | None = None


@dataclass(frozen=True)
class SiloDistillPlan:
    silo_id: str
    train_examples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    epsilon_before: float


@dataclass(frozen=True)
class FederatedDistillResult:
    run_id: str
    rounds: int
    plans: list[SiloDistillPlan]
    round_log: list[dict[str, Any]]
    central_events: int
    private: bool = True


def next_distill_run_id(base_run_id: str, silos: Sequence[DistillSilo]) -> str:
    """``BASE/edge-distill-K`` with the smallest K no silo's ledger has seen yet."""
    used: set[str] = set()
    with_history: list[DistillSilo] = []
    for silo in silos:
        # A silo log without its ledger is opened too: the guard refuses it (a lost
        # ledger must not look like a silo that never spent anything).
        if any(
            (silo.state_dir / name).exists() for name in (PrivacyLedger.FILENAME, SILO_LOG_NAME)
        ):
            with open_silo_ledger(silo) as ledger:
                used.update(e.run_id for e in ledger.entries())
                with_history.append(silo)
    k = 1
    while True:
        candidate = f"{base_run_id}/edge-distill-{k}"
        if candidate not in used and not any(_has_plan(s, candidate) for s in with_history):
            return candidate
        k += 1


def _has_plan(silo: DistillSilo, run_id: str) -> bool:
    with open_silo_ledger(silo) as ledger:
        return ledger.plan(run_id) is not None


_Calibrated = dict[tuple[Any, ...], float]


def _plan_silo(
    silo: DistillSilo,
    run_id: str,
    config: DistillConfig,
    dp: LocalDPConfig,
    calibrated: _Calibrated,
) -> tuple[RoundPlan, float]:
    """The silo's distillation plan, calibrated as SiloAgent calibrates a run's first round.

    ``calibrated`` memoizes σ across silos with identical inputs (same schedule,
    budget and charged events: the calibration is a deterministic function of them).
    """
    sample_rate, steps = poisson_schedule(
        len(silo.train), config.training.batch_size, config.training.local_epochs
    )
    with open_silo_ledger(silo) as ledger:
        stored = ledger.plan(run_id)
        entries = ledger.entries()
        spent = ledger.spent_epsilon()
        key = (
            sample_rate,
            steps,
            config.rounds,
            silo.budget,
            dp.max_noise_multiplier,
            tuple(e.event for e in entries),
        )
        if stored is not None:
            if stored.sample_rate != sample_rate or stored.steps_per_round != steps:
                raise LedgerError(
                    f"silo {silo.silo_id}: run {run_id} was planned with q={stored.sample_rate}, "
                    f"{stored.steps_per_round} steps/round; this distillation would use "
                    f"q={sample_rate}, {steps}"
                )
            return stored, spent
        # Against the whole budget with everything already spent composed in (not
        # "budget minus spent", which is no valid composition rule at a fixed δ).
        try:
            sigma = calibrated.get(key) or calibrate_noise_multiplier(
                sample_rate=sample_rate,
                steps_per_round=steps,
                rounds=config.rounds,
                target_epsilon=silo.budget.epsilon,
                delta=silo.budget.delta,
                max_noise_multiplier=dp.max_noise_multiplier,
                prior=[e.event.to_dp_event() for e in entries],
            )
        except InfeasibleBudgetError as too_small:
            raise InfeasibleBudgetError(
                f"silo {silo.silo_id} (spent ε={spent:.4g} of its budget ε={silo.budget.epsilon:g} "
                f"in {len(entries)} earlier rounds) cannot pay for {config.rounds} federated "
                f"distillation rounds: {too_small}. Nothing was charged. Distil on the server "
                f"instead (--distill server: no privacy cost), or plan fewer rounds"
            ) from None
    calibrated[key] = sigma
    return RoundPlan(sample_rate, sigma, steps, config.rounds), spent


def distill_federated(
    teacher: nn.Module,
    student: nn.Module,
    silos: Sequence[DistillSilo],
    config: DistillConfig,
    local_dp: LocalDPConfig,
    central_dp: CentralDPConfig,
    run_id: str,
    seed: int,
    echo: Callable[[str], None] | None = None,
) -> FederatedDistillResult:
    """Federated DP distillation rounds over ``silos`` in this process (see module doc).

    ``student`` holds the initial global student and ends holding the final one.
    Every silo is planned (σ calibrated, plan stored) before any round is charged,
    so an infeasible budget anywhere stops the run with nothing charged.
    """
    if not silos:
        raise ConfigError("federated distillation needs at least one silo")
    dp = dataclasses.replace(local_dp, grad_sample_mode=config.grad_sample_mode)
    planned = _plan_all(silos, run_id, config, dp)
    soft = {silo.silo_id: teacher_logits(teacher, silo.train.features) for silo in silos}
    pipeline = AggregationPipeline(central_dp=central_dp)
    weights = model_weights(student)
    round_log: list[dict[str, Any]] = []
    for round_number in range(1, config.rounds + 1):
        global_vector = flatten_weights(weights)
        updates: list[ClientUpdate] = []
        outcomes: dict[str, Any] = {}
        for index, (silo, plan, _) in enumerate(planned):
            if not _sampled(central_dp, seed, round_number, index):
                outcomes[silo.silo_id] = {"status": "not-sampled"}
                continue
            local = _fresh_copy(student, weights)
            round_seed = derive_seed(seed, "edge-distill", silo.silo_id, round_number)
            job = _SiloRound(silo, plan, soft[silo.silo_id], run_id, round_number, round_seed)
            outcome, trained = _train_silo(job, local, config, dp)
            outcomes[silo.silo_id] = outcome
            if trained is not None:
                delta = flatten_weights(trained.weights) - global_vector
                updates.append(ClientUpdate(index, silo.silo_id, delta, trained.num_examples))
        aggregated = pipeline.apply(global_vector, updates, population=len(silos))
        weights = unflatten_weights(aggregated.new_global, weights)
        round_log.append(
            {"round": round_number, "silos": outcomes, "aggregation": aggregated.details}
        )
        if echo is not None:
            eps = [o["epsilon_after"] for o in outcomes.values() if "epsilon_after" in o]
            echo(
                f"[distill] round {round_number}/{config.rounds}: {len(updates)}/{len(silos)} "
                f"silos, max ε {max(eps) if eps else float('nan'):.3f}"
            )
    load_weights(student, weights)
    student.eval()
    return FederatedDistillResult(
        run_id=run_id,
        rounds=config.rounds,
        plans=[
            SiloDistillPlan(
                silo.silo_id,
                len(silo.train),
                plan.sample_rate,
                plan.steps_per_round,
                plan.noise_multiplier,
                spent,
            )
            for silo, plan, spent in planned
            if plan is not None
        ],
        private=dp.enabled,
        round_log=round_log,
        central_events=config.rounds if central_dp.enabled else 0,
    )


_Planned = list[tuple[DistillSilo, RoundPlan | None, float]]


def _plan_all(
    silos: Sequence[DistillSilo], run_id: str, config: DistillConfig, dp: LocalDPConfig
) -> _Planned:
    """Every silo's plan (and ε before), stored only once all of them are feasible."""
    if not dp.enabled:
        return [(silo, None, 0.0) for silo in silos]
    calibrated: _Calibrated = {}
    fixed = [(silo, *_plan_silo(silo, run_id, config, dp, calibrated)) for silo in silos]
    for silo, fixed_plan, _ in fixed:
        with open_silo_ledger(silo) as ledger:
            ledger.set_plan(run_id, fixed_plan)
    return list(fixed)


@dataclass(frozen=True)
class _SiloRound:
    silo: DistillSilo
    plan: RoundPlan | None  # None: the non-private research twin (no DP, no ledger)
    soft_labels: np.ndarray
    run_id: str
    round_number: int
    seed: int


def _train_silo(
    job: _SiloRound, local: nn.Module, config: DistillConfig, dp: LocalDPConfig
) -> tuple[dict[str, Any], TrainResult | None]:
    """One silo's round: its outcome for the round log, and what it trained (if it did)."""
    silo, plan = job.silo, job.plan
    if plan is None:
        result = train_non_private_distill(local, silo.train, job.soft_labels, config, job.seed)
        return {"status": "ok", "train_loss": result.mean_loss}, result
    event = DpSgdRound(plan.sample_rate, plan.noise_multiplier, plan.steps_per_round)
    what = f"distillation round {job.round_number} of run {job.run_id!r}"
    with open_silo_ledger(silo) as ledger:
        try:
            ledger.check_affordable(event, what)  # refuse before touching the records
        except BudgetExhaustedError as refused:
            return {"status": "refused", "reason": str(refused)}, None
    result = train_dp_sgd_distill(
        local,
        silo.train,
        job.soft_labels,
        config.training,
        dp,
        plan.noise_multiplier,
        job.seed,
        config.temperature,
        config.alpha,
    )
    # Charged at release, as a training round is (fedguard.client.release): the
    # student's update leaves the silo only after the charge is in the ledger and the
    # signed silo log. A run that fails in training released nothing and pays nothing;
    # a (run, round) already charged is never released a second time (LedgerError).
    with open_silo_ledger(silo) as ledger:
        try:
            entry = ledger.charge(job.run_id, job.round_number, event)
        except BudgetExhaustedError as refused:
            return {"status": "refused", "reason": str(refused)}, None
        record_charge(silo, ledger, entry)
        ledger.mark(entry.entry_id, ChargeStatus.COMPLETED)
    outcome = {"status": "ok", "epsilon_after": entry.epsilon_after, "train_loss": result.mean_loss}
    return outcome, result


def _sampled(central_dp: CentralDPConfig, seed: int, round_number: int, index: int) -> bool:
    """Poisson client sampling when central DP samples clients (its accountant assumes it)."""
    rate = central_dp.client_sampling_rate if central_dp.enabled else 1.0
    if rate >= 1.0:
        return True
    rng = numpy_rng(seed, "edge-distill-client-sampling", round_number, index)
    return bool(rng.random() < rate)


def central_round_event(central_dp: CentralDPConfig) -> DpFedAvgRound:
    """What one distillation round adds to the central (silo-level) guarantee.

    As in training (:func:`fedguard.privacy.central_accounting.accounted_round`): q = 1, no
    amplification, since the cohort is seeded and in the round log.
    """
    return accounted_round(central_dp)


def _fresh_copy(student: nn.Module, weights: Any) -> nn.Module:
    import copy

    local = copy.deepcopy(student)
    load_weights(local, weights)
    return local


def seed_student(seed: int) -> None:
    seed_torch(derive_seed(seed, "edge-student-init"))
