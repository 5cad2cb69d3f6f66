"""A plain Flower FedAvg server; each ClientApp is a fedguard DP-SGD silo with its own model.

The server (``server_app``) is stock Flower: ``flwr.serverapp.strategy.FedAvg``, no
fedguard. Each of the 3 nodes runs ``fedguard.client.flower_dp.DpSgdSilo`` with a
small torch MLP on its share of sklearn's breast cancer data (569 rows, 30
features), standardized with the statistics of its own training rows only. Each
silo's privacy settings and lifetime budget come from the silo side (here the
example's constants and the node's ``partition-id``), never from the server; its
ledger and signed log live in ``<state root>/hospital-<partition-id>``.

Run it::

    FLWR_TELEMETRY_ENABLED=0 python examples/flower_dp_silo/app.py [STATE_ROOT]

Without ``STATE_ROOT`` a fresh temporary folder is used. Re-running with the same
folder charges the same lifetime ledgers again (a silo refuses once its budget is
spent, and FedAvg then aggregates without it).
"""

from __future__ import annotations

import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from sklearn.datasets import load_breast_cancer
from torch import nn

from fedguard.client.flower_dp import DpSgdSilo
from fedguard.client.flower_dp_policy import DpSiloPolicy
from fedguard.core.config import PrivacyBudget
from fedguard.privacy.ledger import PrivacyLedger

NUM_NODES = 3
NUM_ROUNDS = 2
#: Each silo's lifetime ε budget (index: partition id), at δ = DELTA.
BUDGETS = (4.0, 6.0, 8.0)
DELTA = 1e-5
SPLIT_SEED = 7
TEST_SHARE = 0.25


# -- the user's own model and data -------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))


def node_split(partition_id: int, num_partitions: int) -> dict[str, np.ndarray]:
    """This node's rows, split train/test and standardized with its own training rows."""
    features, labels = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    rows = np.array_split(order, num_partitions)[partition_id]
    cut = int(len(rows) * (1 - TEST_SHARE))
    train, test = rows[:cut], rows[cut:]
    mean = features[train].mean(axis=0)
    std = features[train].std(axis=0) + 1e-8
    scaled = ((features - mean) / std).astype(np.float32)
    return {
        "train_x": scaled[train],
        "train_y": labels[train].astype(np.int64),
        "test_x": scaled[test],
        "test_y": labels[test].astype(np.int64),
    }


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def train_data(context: Context) -> tuple[np.ndarray, np.ndarray]:
    part = node_split(*_partition(context))
    return part["train_x"], part["train_y"]


def test_data(context: Context) -> tuple[np.ndarray, np.ndarray]:
    part = node_split(*_partition(context))
    return part["test_x"], part["test_y"]


# -- the silo's own privacy policy (silo side only) --------------------------------------


def silo_policy(state_root: Path, context: Context) -> DpSiloPolicy:
    partition_id, _ = _partition(context)
    return DpSiloPolicy(
        silo_id=f"hospital-{partition_id}",
        state_dir=state_root / f"hospital-{partition_id}",
        epsilon_budget=BUDGETS[partition_id],
        delta=DELTA,
        clip_norm=1.0,
        batch_size=16,
        local_epochs=1,
        learning_rate=0.1,
        # σ calibrated once per run so that NUM_ROUNDS rounds fit the lifetime budget.
        planned_rounds=NUM_ROUNDS,
    )


def make_client_app(state_root: Path) -> ClientApp:
    silo = DpSgdSilo(make_model, train_data, test_data, partial(silo_policy, state_root))
    app = ClientApp()
    app.train()(silo.train)
    app.evaluate()(silo.evaluate)
    return app


# -- a stock Flower server ---------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=NUM_NODES,
        min_evaluate_nodes=NUM_NODES,
        min_available_nodes=NUM_NODES,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model().state_dict()),
        num_rounds=NUM_ROUNDS,
        train_config=ConfigRecord({"note": "the silos set their own DP-SGD settings"}),
    )
    for server_round in range(1, NUM_ROUNDS + 1):
        train = result.train_metrics_clientapp.get(server_round)
        evaluated = result.evaluate_metrics_clientapp.get(server_round)
        if train is None or evaluated is None:
            print(f"round {server_round}: no aggregate (every silo refused)", flush=True)
            continue
        print(
            f"round {server_round}: mean epsilon-spent={train['epsilon-spent']:.4f} "
            f"noise-multiplier={train['noise-multiplier']:.4f} "
            f"eval-loss={evaluated['eval-loss']:.4f} eval-acc={evaluated['eval-acc']:.4f}",
            flush=True,
        )
    print(f"rounds completed: {len(result.train_metrics_clientapp)}", flush=True)


def report_silos(state_root: Path) -> None:
    """Each silo's ε spent, read from its own ledger."""
    for partition_id in range(NUM_NODES):
        state_dir = state_root / f"hospital-{partition_id}"
        budget = PrivacyBudget(BUDGETS[partition_id], DELTA)
        with PrivacyLedger.open(state_dir, f"hospital-{partition_id}", budget) as ledger:
            spent, count = ledger.spent_epsilon(), len(ledger.entries())
        print(
            f"silo hospital-{partition_id}: epsilon spent {spent:.4f} of budget "
            f"{budget.epsilon:g} in {count} rounds",
            flush=True,
        )


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="dp-silo-"))
    print(f"state root: {root}", flush=True)
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(root),
        num_supernodes=NUM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    report_silos(root)
