"""The server's round loop, against real silo agents on fedguard's in-process engine."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedguard.client.app import make_client_app
from fedguard.client.policy import SiloPolicy
from fedguard.client.silo import SiloSettings
from fedguard.core.config import PrivacyBudget, RunConfig
from fedguard.core.errors import CheckpointError
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import ChargePurpose, PrivacyLedger
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.server.app import make_server_app
from fedguard.server.orchestrator import RoundRecord
from fedguard.simulation.inprocess import run_inprocess
from fedguard.wire import protocol
from tests.factories import silo_settings, small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def _corrupt_silo0(change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Mod:
    """A Flower mod: silo 0 sends a corrupted model in every train reply."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if (
            message.metadata.message_type == protocol.TRAIN
            and context.node_config["partition-id"] == 0
        ):
            arrays = {k: v.numpy() for k, v in reply.content.array_records[protocol.ARRAYS].items()}
            reply.content.array_records[protocol.ARRAYS] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in change(arrays).items()}
            )
        return reply

    return mod


def _run(
    tmp_path: Path,
    config: RunConfig,
    resolve: Callable[[Context], SiloSettings] | None = None,
    mods: list[Mod] | None = None,
) -> list[RoundRecord]:
    records: list[RoundRecord] = []
    server = make_server_app(config, "test-run", tmp_path / "run", records.append)
    client = make_client_app(
        resolve or (lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"]))),
        allow_non_private=True,
        mods=mods,
    )
    run_inprocess(server, client, config.num_clients)
    return records


def test_dp_run_improves_and_spends_budget_within_target(tmp_path: Path) -> None:
    records = _run(tmp_path, small_config(tmp_path))
    assert [r.round for r in records] == [0, 1, 2, 3]
    assert records[-1].evaluation.auc is not None and records[0].evaluation.auc is not None
    assert records[-1].evaluation.loss < records[0].evaluation.loss
    # The silos' noise is their own CSPRNG's: ranking (AUC) is the stable signal; the
    # argmax accuracy moves with calibration (0.82 at AUC 0.99 seen once).
    assert records[-1].evaluation.auc > 0.95
    assert records[-1].evaluation.accuracy > 0.75
    for r in records[1:]:
        assert r.count("ok") == 3
    eps = [max(r.silo_epsilon.values()) for r in records[1:]]
    assert eps[0] < eps[1] < eps[2] <= 3.0 + 1e-9
    # One checkpoint per round, and the final history on disk.
    assert CheckpointStore(tmp_path / "run" / "checkpoints").rounds() == [0, 1, 2, 3]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()}, "NaN"),
        (lambda a: {k: np.zeros((v.size + 1,), np.float32) for k, v in a.items()}, "shape"),
        (lambda a: {k: v.astype(np.float64) for k, v in a.items()}, "dtype"),
        (lambda a: dict(list(a.items())[:-1]), "missing"),
    ],
    ids=["nan", "shape", "dtype", "missing-tensor"],
)
def test_a_bad_update_is_rejected_with_its_reason_and_the_round_completes(
    tmp_path: Path, change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], reason: str
) -> None:
    config = small_config(tmp_path, num_rounds=2)
    records = _run(tmp_path, config, mods=[_corrupt_silo0(change)])
    for record in records[1:]:
        by_silo = {o.silo_id: o for o in record.outcomes}
        assert by_silo["silo-0"].status == "rejected"
        assert reason in by_silo["silo-0"].reason
        assert {by_silo["silo-1"].status, by_silo["silo-2"].status} == {"ok"}
        assert record.aggregation["accepted"] == 2
    assert np.isfinite(records[-1].evaluation.loss)


def test_a_refusing_silo_is_skipped_and_the_run_goes_on(tmp_path: Path) -> None:
    # silo-0 spent almost its whole budget (ε≈2.9955 of 3) in an earlier run: the rest
    # cannot pay for this run, so it refuses every round.
    budget = PrivacyBudget(3.0, 1e-5)
    spent = silo_settings(tmp_path, 0, budget)
    with PrivacyLedger.open(spent.state_dir, "silo-0", budget) as ledger:
        ledger.charge("earlier-run", 1, DpSgdRound(0.2, 2.985, 100))
    # silo-0's own policy caps σ at 3 (more noise would make its update useless); the
    # server has no say in it.
    capped = SiloPolicy(max_noise_multiplier=3.0)
    records = _run(
        tmp_path,
        small_config(tmp_path, num_rounds=2),
        resolve=lambda c: silo_settings(
            tmp_path, int(c.node_config["partition-id"]), budget, policy=capped
        ),
    )
    for record in records[1:]:
        by_silo = {o.silo_id: o for o in record.outcomes}
        assert by_silo["silo-0"].status == "refused"
        assert "budget" in by_silo["silo-0"].reason
        assert record.aggregation["accepted"] == 2


def test_non_private_run_has_no_ledgers(tmp_path: Path) -> None:
    config = small_config(tmp_path, num_rounds=1)
    config = RunConfig.from_options({**config.to_options(), "no-dp": True})
    records = _run(tmp_path, config)
    assert records[-1].count("ok") == 3
    assert not any((tmp_path / f"silo-{i}" / PrivacyLedger.FILENAME).exists() for i in range(3))


def test_central_dp_is_accounted_and_noised(tmp_path: Path) -> None:
    config = RunConfig.from_options(
        {
            **small_config(tmp_path, num_rounds=2).to_options(),
            "central-dp": True,
            "central-noise-multiplier": 1.0,
            "client-sampling-rate": 0.9,
            "central-clip-norm": 0.5,
        }
    )
    records = _run(tmp_path, config)
    eps = [r.central_epsilon for r in records[1:]]
    assert eps[0] is not None and eps[1] is not None and 0 < eps[0] < eps[1]
    assert all(r.aggregation["rule"] == "dp-fedavg" for r in records[1:])


def test_a_crashed_server_resumes_without_lost_doubled_or_recharged_rounds(tmp_path: Path) -> None:
    config = small_config(tmp_path, num_rounds=3)
    first = _run(tmp_path, config)
    assert [r.round for r in first] == [0, 1, 2, 3]
    # The crash: round 3 was trained and charged by every silo, but the server died
    # before its checkpoint was whole.
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "round-0003.json").unlink()
    (tmp_path / "run" / "history.json").unlink()
    resumed = _run(tmp_path, config)
    assert [r.round for r in resumed] == [3]  # only the lost round runs again
    assert all(o.status == "ok" for o in resumed[0].outcomes)
    assert all(o.metrics.get("replayed") == 1 for o in resumed[0].outcomes)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    for i in range(3):
        with PrivacyLedger.open(
            tmp_path / f"silo-{i}", f"silo-{i}", PrivacyBudget(3.0, 1e-5)
        ) as ledger:
            # The scaler's feature moments (query round 0), then the three training rounds:
            # nothing charged twice.
            assert [(e.round, e.purpose) for e in ledger.entries()] == [
                (0, ChargePurpose.FEATURE_MOMENTS),
                (1, ChargePurpose.TRAINING),
                (2, ChargePurpose.TRAINING),
                (3, ChargePurpose.TRAINING),
            ]


def test_checkpoints_of_another_run_are_not_resumed(tmp_path: Path) -> None:
    _run(tmp_path, small_config(tmp_path, num_rounds=1))
    with pytest.raises(CheckpointError, match="another run"):
        _run(tmp_path, small_config(tmp_path, num_rounds=2))
