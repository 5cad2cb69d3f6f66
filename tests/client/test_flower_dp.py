"""The DP-SGD silo under a plain Flower server: handlers called in-process (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedguard.audit.chain import read_records
from fedguard.audit.logs import SILO_LOG_NAME
from fedguard.client import flower_dp
from fedguard.client.flower_dp import DpSgdSilo, prepare_model, state_arrays
from fedguard.client.flower_dp_policy import DpRefusal, DpSiloPolicy, refusal_of
from fedguard.client.training import TrainingError
from fedguard.core.config import PrivacyBudget
from fedguard.core.errors import ConfigError
from fedguard.privacy.accountant import AccountantKind, PrivacyAccountant
from fedguard.privacy.analysis.dp_sgd import poisson_schedule
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import PrivacyLedger

N_TRAIN, N_FEATURES, BATCH, SIGMA, DELTA = 60, 4, 16, 1.0, 1e-5


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_FEATURES, 8), nn.ReLU(), nn.Linear(8, 2))


def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_FEATURES, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def data(n: int = N_TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(n, N_FEATURES, generator=generator)
    return features, (features[:, 0] > 0).long()


def node_config(state_dir: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "partition-id": 0,
        "num-partitions": 3,
        "silo-id": "hospital-a",
        "state-dir": str(state_dir),
        "epsilon-budget": 50.0,
        "delta": DELTA,
        "clip-norm": 1.0,
        "batch-size": BATCH,
        "noise-multiplier": SIGMA,
        "learning-rate": 0.5,
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def context(config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def train_message(server_round: int, arrays: ArrayRecord | None = None, **config: Any) -> Message:
    record = ConfigRecord({"server-round": server_round, **config})
    arrays = arrays if arrays is not None else state_arrays(small_model())
    content = RecordDict({"arrays": arrays, "config": record})
    message = Message(content, dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = f"m-{server_round}"
    return message


def silo(model_fn: Any = small_model) -> DpSgdSilo:
    return DpSgdSilo(model_fn, lambda ctx: data(), lambda ctx: data(30))


def charges(state_dir: Path, budget: float = 50.0) -> list[Any]:
    if not (state_dir / PrivacyLedger.FILENAME).exists():
        return []
    with PrivacyLedger.open(state_dir, "hospital-a", PrivacyBudget(budget, DELTA)) as ledger:
        return ledger.entries()


def refusal(reply: Message) -> DpRefusal | None:
    assert reply.has_error(), "expected an error reply"
    return refusal_of(reply.error.code, reply.error.reason)


@pytest.fixture
def trainings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the DP-SGD runs the silo starts."""
    calls: list[int] = []
    real = flower_dp.run_dp_sgd

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flower_dp, "run_dp_sgd", counted)
    return calls


def one_round_epsilon(rounds: int) -> float:
    q, steps = poisson_schedule(N_TRAIN, BATCH, 1)
    accountant = PrivacyAccountant(AccountantKind.PLD)
    accountant.compose(DpSgdRound(q, SIGMA, steps), rounds)
    return accountant.epsilon(DELTA)


# -- a round -----------------------------------------------------------------------------


def test_train_returns_the_users_keys_and_charges_one_round(tmp_path: Path) -> None:
    ctx = context(node_config(tmp_path))
    sent = state_arrays(small_model())
    reply = silo().train(train_message(1, sent, lr=0.01), ctx)

    assert not reply.has_error(), reply.error
    arrays = reply.content["arrays"].to_torch_state_dict()
    assert list(arrays) == list(small_model().state_dict())  # no "_module." prefix
    global_weights = sent.to_torch_state_dict()
    assert any(not torch.equal(arrays[k], global_weights[k]) for k in arrays)  # trained
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == N_TRAIN
    assert metrics["noise-multiplier"] == SIGMA
    assert metrics["epsilon-spent"] == pytest.approx(one_round_epsilon(1), rel=1e-6)
    assert "train-loss" not in metrics  # not DP: never sent
    [entry] = charges(tmp_path)
    assert (entry.round, entry.event.noise_multiplier) == (1, SIGMA)

    second = silo().train(train_message(2), ctx)  # a rebuilt silo: state on disk only
    assert second.content["metrics"]["epsilon-spent"] > metrics["epsilon-spent"]
    assert [e.round for e in charges(tmp_path)] == [1, 2]
    logged = [r.payload for r in read_records(tmp_path / SILO_LOG_NAME)]
    assert [p["event"] for p in logged if p.get("event") == "charged"] == ["charged"] * 2
    assert [p["status"] for p in logged if "status" in p] == ["ok", "ok"]


def test_a_replayed_round_is_refused_and_charged_once(tmp_path: Path, trainings: list[int]) -> None:
    ctx = context(node_config(tmp_path))
    assert not silo().train(train_message(1), ctx).has_error()
    assert refusal(silo().train(train_message(1), ctx)) is DpRefusal.REPLAYED_ROUND
    assert len(charges(tmp_path)) == 1 and len(trainings) == 1


def test_fedavg_aggregates_updates_and_leaves_refusals_out(tmp_path: Path) -> None:
    ok = silo().train(train_message(1), context(node_config(tmp_path / "a")))
    refused = silo().train(
        train_message(1, noise_multiplier=0.0), context(node_config(tmp_path / "b"))
    )
    arrays, metrics = FedAvg().aggregate_train(1, [ok, refused])
    assert arrays is not None and metrics is not None
    # The refusal is left out: the aggregate is the one update, its metrics are its own.
    mine = ok.content["arrays"].to_torch_state_dict()
    assert all(torch.allclose(v, mine[k]) for k, v in arrays.to_torch_state_dict().items())
    assert metrics["epsilon-spent"] == pytest.approx(ok.content["metrics"]["epsilon-spent"])


# -- what the server cannot set ----------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "noise-multiplier",
        "noise_multiplier",
        "max-grad-norm",
        "clip-norm",
        "epsilon",
        "epsilon-budget",
        "target_epsilon",
        "delta",
        "batch-size",
        "local-epochs",
        "sample-rate",
        "state-dir",
        "noiseMultiplier",
    ],
)
def test_a_server_config_setting_privacy_is_refused(
    tmp_path: Path, key: str, trainings: list[int]
) -> None:
    reply = silo().train(train_message(1, **{key: 0.0}), context(node_config(tmp_path)))
    assert refusal(reply) is DpRefusal.SERVER_PRIVACY_SETTING
    assert repr(key) in (reply.error.reason or "")
    assert charges(tmp_path) == [] and trainings == []


def test_other_server_keys_are_ignored(tmp_path: Path) -> None:
    reply = silo().train(
        train_message(1, lr=123.0, momentum=0.0, **{"learning-rate": 9.0}),
        context(node_config(tmp_path)),
    )
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["noise-multiplier"] == SIGMA


# -- the budget and the ledger -----------------------------------------------------------


def test_past_the_budget_the_silo_refuses_and_trains_nothing(
    tmp_path: Path, trainings: list[int]
) -> None:
    budget = (one_round_epsilon(1) + one_round_epsilon(2)) / 2  # pays for one round only
    ctx = context(node_config(tmp_path, **{"epsilon-budget": budget}))
    assert not silo().train(train_message(1), ctx).has_error()
    before = charges(tmp_path, budget)

    reply = silo().train(train_message(2), ctx)
    assert refusal(reply) is DpRefusal.BUDGET_EXHAUSTED
    assert "past the budget" in (reply.error.reason or "")
    assert charges(tmp_path, budget) == before and len(trainings) == 1


def test_a_round_that_fails_in_training_charges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverge(*args: Any, **kwargs: Any) -> Any:
        raise TrainingError("diverged")

    monkeypatch.setattr(flower_dp, "run_dp_sgd", diverge)
    reply = silo().train(train_message(1), context(node_config(tmp_path)))
    assert refusal(reply) is DpRefusal.TRAINING_FAILED
    assert charges(tmp_path) == []


def test_a_deleted_ledger_beside_its_silo_log_is_refused(
    tmp_path: Path, trainings: list[int]
) -> None:
    ctx = context(node_config(tmp_path))
    assert not silo().train(train_message(1), ctx).has_error()
    (tmp_path / PrivacyLedger.FILENAME).unlink()

    reply = silo().train(train_message(2), ctx)
    assert refusal(reply) is DpRefusal.LEDGER_INTEGRITY
    assert not (tmp_path / PrivacyLedger.FILENAME).exists() and len(trainings) == 1


def test_round_epsilon_calibrates_sigma_once_per_run(tmp_path: Path) -> None:
    ctx = context(node_config(tmp_path, **{"noise-multiplier": None, "round-epsilon": 2.0}))
    first = silo().train(train_message(1), ctx).content["metrics"]
    second = silo().train(train_message(2), ctx).content["metrics"]
    assert 1.9 < first["epsilon-spent"] <= 2.0
    assert second["noise-multiplier"] == first["noise-multiplier"] > 0.5


# -- the model and the arrays ------------------------------------------------------------


def test_a_model_opacus_cannot_train_is_refused_with_its_reason(tmp_path: Path) -> None:
    arrays = state_arrays(batchnorm_model())
    reply = silo(batchnorm_model).train(train_message(1, arrays), context(node_config(tmp_path)))
    assert refusal(reply) is DpRefusal.MODEL_UNSUPPORTED
    assert "BatchNorm cannot support training with differential privacy" in (
        reply.error.reason or ""
    )
    assert charges(tmp_path) == []


def test_fix_model_replaces_batchnorm_and_trains(tmp_path: Path) -> None:
    fixed = prepare_model(batchnorm_model(), allow_fix=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    ctx = context(node_config(tmp_path, **{"fix-model": "true"}))
    reply = silo(batchnorm_model).train(train_message(1, state_arrays(fixed)), ctx)
    assert not reply.has_error(), reply.error
    assert list(reply.content["arrays"]) == list(fixed.state_dict())


def test_arrays_under_opacus_prefix_are_accepted_and_returned_unprefixed(tmp_path: Path) -> None:
    prefixed = {f"_module.{k}": v for k, v in small_model().state_dict().items()}
    reply = silo().train(
        train_message(1, ArrayRecord(torch_state_dict=prefixed)), context(node_config(tmp_path))
    )
    assert not reply.has_error(), reply.error
    assert list(reply.content["arrays"]) == list(small_model().state_dict())


def _tampered(kind: str) -> ArrayRecord:
    state = {k: v.clone() for k, v in small_model().state_dict().items()}
    if kind == "nan":
        state["0.weight"][0, 0] = math.nan
    elif kind == "inf":
        state["2.bias"][0] = math.inf
    elif kind == "shape":
        state["0.weight"] = torch.zeros(8, N_FEATURES + 1)
    elif kind == "missing":
        del state["2.bias"]
    else:
        state["extra"] = torch.zeros(1)
    return ArrayRecord(torch_state_dict=state)


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "missing", "extra"])
def test_bad_server_arrays_are_refused(tmp_path: Path, kind: str, trainings: list[int]) -> None:
    reply = silo().train(train_message(1, _tampered(kind)), context(node_config(tmp_path)))
    assert refusal(reply) is DpRefusal.BAD_ARRAYS
    assert charges(tmp_path) == [] and trainings == []


# -- the policy --------------------------------------------------------------------------


def test_the_policy_comes_from_node_config(tmp_path: Path) -> None:
    policy = DpSiloPolicy.from_node_config(node_config(tmp_path, **{"local-epochs": "2"}))
    assert (policy.state_dir, policy.local_epochs, policy.noise_multiplier) == (tmp_path, 2, SIGMA)
    assert policy.budget == PrivacyBudget(50.0, DELTA)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clip-norm": None}, "'clip-norm' is missing"),
        ({"state-dir": None}, "'state-dir' is missing"),
        ({"batch-size": "many"}, "'batch-size' must be int"),
        ({"round-epsilon": 1.0}, "exactly one of"),
        ({"noise-multiplier": None}, "exactly one of"),
        ({"noise-multiplier": 0.0}, "noise-multiplier must be"),
        ({"delta": 1.5}, "delta must lie in"),
        ({"noise-source": "seeded"}, "noise-source"),
    ],
)
def test_a_bad_policy_is_a_typed_error(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    config = node_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        DpSiloPolicy.from_node_config(config)
    reply = silo().train(train_message(1), context(config))
    assert refusal(reply) is DpRefusal.MISCONFIGURED


# -- evaluation --------------------------------------------------------------------------


def test_evaluate_reports_loss_accuracy_and_size(tmp_path: Path) -> None:
    ctx = context(node_config(tmp_path))
    message = train_message(1)
    message.metadata.__dict__["_message_type"] = "evaluate"
    metrics = silo().evaluate(message, ctx).content["metrics"]
    assert metrics["num-examples"] == 30
    assert 0.0 <= metrics["eval-acc"] <= 1.0 and metrics["eval-loss"] > 0
    assert refusal(silo().evaluate(train_message(1, _tampered("nan")), ctx)) is (
        DpRefusal.BAD_ARRAYS
    )
    assert charges(tmp_path) == []


def _threat_model_rows(message: str) -> set[tuple[str, str]]:
    """(record, field) rows of docs/threat-model.md §3.4 for ``message``."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "threat-model.md").read_text()
    section = text.split("### 3.4", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] == message:
            rows.add((cells[1], cells[2]))
    return rows


def test_every_reply_field_is_the_threat_models(tmp_path: Path) -> None:
    ctx = context(node_config(tmp_path))
    trained = silo().train(train_message(1, state_arrays(small_model())), ctx)
    sent = {("metrics", key) for key in trained.content["metrics"]}
    sent.add(("arrays", "(every model tensor)"))
    assert set(trained.content.keys()) == {"arrays", "metrics"}
    assert sent == _threat_model_rows("train")
    message = train_message(1)
    message.metadata.__dict__["_message_type"] = "evaluate"
    evaluated = silo().evaluate(message, ctx)
    assert set(evaluated.content.keys()) == {"metrics"}
    assert {("metrics", k) for k in evaluated.content["metrics"]} == _threat_model_rows("evaluate")
