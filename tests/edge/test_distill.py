"""Distillation: the loss, the students, server-side KD and federated DP-SGD rounds."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedguard.audit.chain import read_records
from fedguard.audit.logs import SILO_LOG_NAME
from fedguard.client.ledger_guard import LedgerIntegrityError, open_silo_ledger, record_charge
from fedguard.client.training import LocalData, train_non_private
from fedguard.core.config import (
    CentralDPConfig,
    DatasetName,
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    ModelSpec,
    NoiseSource,
    PartitionSpec,
    PrivacyBudget,
)
from fedguard.core.datasets import schema_for
from fedguard.core.errors import ConfigError, InfeasibleBudgetError
from fedguard.core.models import build_model
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.silos import simulation_silos
from fedguard.edge.distill import (
    DistillConfig,
    DistillMode,
    DistillSilo,
    StudentCNN,
    StudentKind,
    StudentSpec,
    distill_federated,
    distill_on_transfer_set,
    distillation_loss,
    next_distill_run_id,
    teacher_logits,
    train_dp_sgd_distill,
)
from fedguard.edge.quantize import scaled_for_model, synthetic_features
from fedguard.privacy.analysis.dp_sgd import poisson_schedule
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import ChargeStatus, PrivacyLedger

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

DP = LocalDPConfig(noise_source=NoiseSource.SEEDED)


def test_loss_is_hinton_kd_plus_cross_entropy() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    temperature = 3.0
    p_t = torch.softmax(t / temperature, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temperature, 1))).sum(1).mean()
    assert distillation_loss(s, t, y, temperature, 0.0) == pytest.approx(float(ce))
    soft = float(distillation_loss(s, t, None, temperature, 1.0))
    assert soft == pytest.approx(temperature**2 * float(kl), rel=1e-5)
    mixed = float(distillation_loss(s, t, y, temperature, 0.25))
    assert mixed == pytest.approx(0.25 * soft + 0.75 * float(ce), rel=1e-5)
    assert float(distillation_loss(t, t, None, temperature, 1.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError):
        distillation_loss(s, t, None, temperature, 0.5)


def test_students_are_edge_sized_and_configurable() -> None:
    digits, table = schema_for(DatasetName.DIGITS), schema_for(DatasetName.BREAST_CANCER)
    assert isinstance(StudentSpec().build(digits), StudentCNN)
    mlp = StudentSpec().build(table)
    teacher = build_model(table, ModelSpec())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(mlp) * 8 < n(teacher)
    assert n(StudentSpec().build(digits)) * 5 < n(build_model(digits, ModelSpec()))
    assert n(StudentSpec(hidden=(32, 8)).build(table)) == 30 * 32 + 32 + 32 * 8 + 8 + 8 * 2 + 2
    assert isinstance(StudentSpec(kind=StudentKind.MLP).build(digits), torch.nn.Module)
    with pytest.raises(ConfigError):
        StudentSpec(kind=StudentKind.CNN).build(table)
    for bad in ({"hidden": ()}, {"hidden": (0,)}, {"channels": 0}):
        with pytest.raises(ConfigError):
            StudentSpec(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 0.0},
        {"alpha": 1.5},
        {"rounds": 0},
        {"transfer_rows": 0},
        {"grad_sample_mode": GradSampleMode.GHOST},
        {"mode": "server"},
    ],
)
def test_distill_config_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DistillConfig(**bad)  # type: ignore[arg-type]


def _silos(tmp_path: Path, budget: PrivacyBudget) -> tuple[list[DistillSilo], torch.nn.Module]:
    silos = simulation_silos(DatasetName.BREAST_CANCER, 2, PartitionSpec.parse("iid"), 0.2, seed=0)
    schema = silos[0].schema
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos])
    scaler = FeatureScaler.from_statistics(stats, schema)
    torch.manual_seed(0)
    teacher = build_model(schema, ModelSpec()).eval()
    out = [
        DistillSilo(
            f"silo-{i}",
            tmp_path / f"silo-{i}",
            budget,
            LocalData(scaled_for_model(scaler, schema, s.train.features), s.train.labels),
        )
        for i, s in enumerate(silos)
    ]
    return out, teacher


def _charge(silo: DistillSilo, run_id: str, event: DpSgdRound) -> float:
    """One completed training round of ``run_id``, charged as the ClientApp charges it."""
    with open_silo_ledger(silo) as ledger:
        entry = ledger.charge(run_id, 1, event)
        record_charge(silo, ledger, entry)
        ledger.mark(entry.entry_id, ChargeStatus.COMPLETED)
        return ledger.spent_epsilon()


def test_dp_sgd_distill_takes_the_accounted_steps(tmp_path: Path) -> None:
    silos, teacher = _silos(tmp_path, PrivacyBudget(3.0, 1e-5))
    data = silos[0].train
    student = StudentSpec().build(schema_for(DatasetName.BREAST_CANCER))
    soft = teacher_logits(teacher, data.features)
    config = DistillConfig()
    result = train_dp_sgd_distill(
        student, data, soft, config.training, DP, 1.0, seed=1, temperature=4.0, alpha=0.7
    )
    q, steps = poisson_schedule(len(data), config.training.batch_size, 1)
    assert (result.steps, result.sample_rate) == (steps, q)
    assert math.isfinite(result.mean_loss)
    with pytest.raises(ConfigError):
        train_dp_sgd_distill(student, data, soft[:-1], config.training, DP, 1.0, 1, 4.0, 0.7)


def test_federated_distillation_plans_against_prior_spending(tmp_path: Path) -> None:
    budget = PrivacyBudget(4.0, 1e-5)
    silos, teacher = _silos(tmp_path, budget)
    prior = DpSgdRound(0.25, 1.5, 8)
    for silo in silos:
        spent_before = _charge(silo, "teacher-run", prior)
    run_id = next_distill_run_id("teacher-run", silos)
    assert run_id == "teacher-run/edge-distill-1"
    student = StudentSpec().build(schema_for(DatasetName.BREAST_CANCER))
    before = [p.detach().clone() for p in student.parameters()]
    config = DistillConfig(mode=DistillMode.FEDERATED, rounds=2)
    result = distill_federated(
        teacher, student, silos, config, DP, CentralDPConfig(), run_id, seed=0
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert [r["round"] for r in result.round_log] == [1, 2]
    for silo, plan in zip(silos, result.plans, strict=True):
        assert plan.epsilon_before == pytest.approx(spent_before)
        with PrivacyLedger.open(silo.state_dir, silo.silo_id, budget) as ledger:
            mine = [e for e in ledger.entries() if e.run_id == run_id]
            assert [e.status for e in mine] == [ChargeStatus.COMPLETED] * 2
            assert mine[0].event.noise_multiplier == plan.noise_multiplier
            assert ledger.plan(run_id) is not None
            # σ was calibrated so that prior + 2 rounds fit the whole budget, tightly.
            assert 0.95 * budget.epsilon < ledger.spent_epsilon() <= budget.epsilon
    assert next_distill_run_id("teacher-run", silos) == "teacher-run/edge-distill-2"


def test_an_exhausted_budget_stops_before_anything_is_charged(tmp_path: Path) -> None:
    budget = PrivacyBudget(2.0, 1e-5)
    silos, teacher = _silos(tmp_path, budget)
    _charge(silos[1], "teacher-run", DpSgdRound(0.25, 2.5, 14))  # ε ≈ 1.74 of 2
    with PrivacyLedger.open(silos[1].state_dir, "silo-1", budget) as ledger:
        before = ledger.entries()
    student = StudentSpec().build(schema_for(DatasetName.BREAST_CANCER))
    with pytest.raises(InfeasibleBudgetError, match=r"silo-1.*Nothing was charged"):
        distill_federated(
            teacher,
            student,
            silos,
            DistillConfig(mode=DistillMode.FEDERATED, rounds=2),
            # σ ≤ 3: silo-0 (nothing spent) can pay for 2 rounds, silo-1 cannot.
            LocalDPConfig(noise_source=NoiseSource.SEEDED, max_noise_multiplier=3.0),
            CentralDPConfig(),
            "x/edge-distill-1",
            seed=0,
        )
    with PrivacyLedger.open(silos[1].state_dir, "silo-1", budget) as ledger:
        assert ledger.entries() == before and ledger.plan("x/edge-distill-1") is None
    assert (
        not (silos[0].state_dir / PrivacyLedger.FILENAME).exists()
        or not PrivacyLedger.open(silos[0].state_dir, "silo-0", budget).entries()
    )


@pytest.mark.parametrize("tamper", ["deleted", "restored-older-copy"])
def test_a_lost_or_rolled_back_ledger_stops_federated_distillation(
    tmp_path: Path, tamper: str
) -> None:
    """Issue 13: distillation charges through the silo's ledger guard, not around it.

    Deleting a silo's ledger (or restoring an older copy) beside its silo log must
    not give it a fresh budget for the distillation rounds.
    """
    budget = PrivacyBudget(8.0, 1e-5)
    silos, teacher = _silos(tmp_path, budget)
    for silo in silos:
        _charge(silo, "teacher-run", DpSgdRound(0.25, 1.5, 8))
    ledger_file = silos[1].state_dir / PrivacyLedger.FILENAME
    if tamper == "deleted":
        ledger_file.unlink()
    else:
        backup = tmp_path / "backup.sqlite"
        shutil.copy2(ledger_file, backup)
        _charge(silos[1], "teacher-run-2", DpSgdRound(0.25, 1.5, 8))
        shutil.copy2(backup, ledger_file)
    student = StudentSpec().build(schema_for(DatasetName.BREAST_CANCER))
    config = DistillConfig(mode=DistillMode.FEDERATED, rounds=2)
    with pytest.raises(LedgerIntegrityError, match="silo-1"):
        distill_federated(
            teacher, student, silos, config, DP, CentralDPConfig(), "t/edge-distill-1", seed=0
        )
    with pytest.raises(LedgerIntegrityError, match="silo-1"):
        next_distill_run_id("teacher-run", silos)
    with PrivacyLedger.open(silos[0].state_dir, "silo-0", budget) as ledger:
        assert [e.run_id for e in ledger.entries()] == ["teacher-run"]  # nothing charged


def test_distillation_charges_are_committed_to_the_silo_log(tmp_path: Path) -> None:
    budget = PrivacyBudget(3.0, 1e-5)
    silos, teacher = _silos(tmp_path, budget)
    student = StudentSpec().build(schema_for(DatasetName.BREAST_CANCER))
    config = DistillConfig(mode=DistillMode.FEDERATED, rounds=2)
    distill_federated(teacher, student, silos, config, DP, CentralDPConfig(), "t/d-1", seed=0)
    for silo in silos:
        charged = [
            r.payload
            for r in read_records(silo.state_dir / SILO_LOG_NAME)
            if r.payload.get("event") == "charged"
        ]
        assert [(c["run_id"], c["round"]) for c in charged] == [("t/d-1", 1), ("t/d-1", 2)]
        with PrivacyLedger.open(silo.state_dir, silo.silo_id, budget) as ledger:
            assert charged[-1]["epsilon"] == pytest.approx(ledger.spent_epsilon())


def test_server_distillation_moves_the_student_towards_the_teacher() -> None:
    schema = schema_for(DatasetName.BREAST_CANCER)
    silos = simulation_silos(DatasetName.BREAST_CANCER, 2, PartitionSpec.parse("iid"), 0.2, seed=0)
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos])
    scaler = FeatureScaler.from_statistics(stats, schema)
    torch.manual_seed(0)
    teacher = build_model(schema, ModelSpec())
    train = LocalData(
        scaled_for_model(scaler, schema, silos[0].train.features), silos[0].train.labels
    )
    train_non_private(teacher, train, LocalTrainingConfig(local_epochs=5), seed=0)
    teacher.eval()
    student = StudentSpec().build(schema)
    transfer = scaled_for_model(scaler, schema, synthetic_features(stats, schema, 1024, 0))
    held_out = scaled_for_model(scaler, schema, silos[1].test.features)

    def gap() -> float:
        with torch.no_grad():
            a = teacher(torch.from_numpy(held_out))
            b = student(torch.from_numpy(held_out))
        return float((a - b).abs().mean())

    before = gap()
    result = distill_on_transfer_set(
        teacher, student, transfer, DistillConfig(server_epochs=10), seed=0, transfer_source="s"
    )
    assert result.rows == 1024 and np.isfinite(result.final_loss)
    assert gap() < 0.5 * before
    with torch.no_grad():
        x = torch.from_numpy(held_out)
        agree = (teacher(x).argmax(1) == student(x).argmax(1)).float().mean()
    assert float(agree) >= 0.9  # on real records the student never saw


def test_a_distillation_round_that_fails_in_training_charges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: charged at release. Training that fails released nothing and pays nothing."""
    from fedguard.client.training import TrainingError
    from fedguard.edge import distill

    budget = PrivacyBudget(3.0, 1e-5)
    silos, teacher = _silos(tmp_path, budget)
    real = distill.train_dp_sgd_distill

    def diverges_on_silo_1(*args: object, **kwargs: object) -> object:
        if args[1] is silos[1].train:
            raise TrainingError("DP-SGD distillation diverged: the student holds NaN or Inf")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(distill, "train_dp_sgd_distill", diverges_on_silo_1)
    student = StudentSpec().build(schema_for(DatasetName.BREAST_CANCER))
    config = DistillConfig(mode=DistillMode.FEDERATED, rounds=1)
    with pytest.raises(TrainingError):
        distill_federated(teacher, student, silos, config, DP, CentralDPConfig(), "t/d-1", seed=0)
    with PrivacyLedger.open(silos[1].state_dir, silos[1].silo_id, budget) as ledger:
        assert [e for e in ledger.entries() if e.run_id == "t/d-1"] == []
        assert ledger.spent_epsilon() == 0.0
    charged = [
        r.payload
        for r in read_records(silos[1].state_dir / SILO_LOG_NAME)
        if r.payload.get("event") == "charged"
    ]
    assert charged == []
