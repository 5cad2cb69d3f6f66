"""A plain Flower app whose server uses fedguard's coordinate-wise median as its strategy.

The ClientApp is ordinary Flower code with its own small torch model and data (the
breast cancer set that ships with scikit-learn, split across 5 nodes): nothing of
fedguard runs on the clients. One of the five (partition 0) is Byzantine: it trains
honestly, then sends ``global − 10 × (its update)``, a negated and scaled update.

The ServerApp runs the same 3 rounds twice over the same nodes, first with Flower's
own FedAvg, then with fedguard's :class:`~fedguard.server.flower_strategy.RobustFedAvg`
(median, f = 1), and prints the held-out accuracy of the global model after every
round: the mean follows the attacker, the median holds it off.

Run it from the repository root: ``python examples/flower_robust_strategy/app.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.simulation import run_simulation
from sklearn.datasets import load_breast_cancer
from torch import nn

from fedguard.aggregation.registry import AggregatorConfig, AggregatorName
from fedguard.server.flower_strategy import RobustFedAvg

NUM_NODES = 5
NUM_ROUNDS = 3
BYZANTINE_PARTITION = 0
ATTACK_SCALE = -10.0  # the Byzantine node sends global + ATTACK_SCALE × (its honest update)
LOCAL_EPOCHS = 5
BATCH_SIZE = 16
LEARNING_RATE = 0.05


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial model for both strategies
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def load_split() -> tuple[
    list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]
]:
    """Five training partitions and a held-out test set (20%), always the same.

    Features are standardized with the whole set's moments: a simplification for a
    short example (a real federation would agree on them without pooling the data).
    """
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[: len(y) // 5], order[len(y) // 5 :]

    def tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(x[rows], dtype=torch.float32), torch.tensor(y[rows], dtype=torch.long)

    return [tensors(part) for part in np.array_split(train, NUM_NODES)], tensors(test)


# ----------------------------------------------------------------------------- client
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD on this node's partition; the Byzantine partition flips and scales it."""
    torch.set_num_threads(1)
    # A simulated ClientApp is rebuilt for every message: the data choice comes from the node.
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    x, y = load_split()[0][partition]
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(1000 * server_round + partition)
    loss = torch.tensor(0.0)
    for _ in range(LOCAL_EPOCHS):
        for batch in torch.randperm(len(y), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    state = model.state_dict()
    if partition == BYZANTINE_PARTITION:
        state = {k: sent[k] + ATTACK_SCALE * (v - sent[k]) for k, v in state.items()}
    metrics = MetricRecord({"train-loss": loss.item(), "num-examples": len(y)})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- server
server_app = ServerApp()


def accuracy(arrays: ArrayRecord) -> float:
    x, y = load_split()[1]
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def strategies() -> list[tuple[str, Strategy]]:
    """Flower's FedAvg, then fedguard's median (f = 1: 5 >= 2f + 1 inputs) on the same nodes."""
    median = AggregatorConfig(AggregatorName.MEDIAN, f=1)
    return [
        (
            "fedavg",
            FedAvg(fraction_evaluate=0.0, min_train_nodes=NUM_NODES, min_available_nodes=NUM_NODES),
        ),
        (
            "median",
            RobustFedAvg(
                median,
                fraction_evaluate=0.0,
                min_train_nodes=NUM_NODES,
                min_available_nodes=NUM_NODES,
            ),
        ),
    ]


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    final: dict[str, float] = {}
    for label, strategy in strategies():

        def evaluate(server_round: int, arrays: ArrayRecord, label: str = label) -> MetricRecord:
            acc = accuracy(arrays)
            print(f"{label} round {server_round} accuracy {acc:.3f}", flush=True)
            final[label] = acc
            return MetricRecord({"accuracy": acc})

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(make_model().state_dict()),
            num_rounds=NUM_ROUNDS,
            evaluate_fn=evaluate,
        )
    print(
        "final accuracy " + " ".join(f"{label} {acc:.3f}" for label, acc in final.items()),
        flush=True,
    )


if __name__ == "__main__":
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
