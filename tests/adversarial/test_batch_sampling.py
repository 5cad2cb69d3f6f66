"""Attack 2: predictable Poisson batches.

Amplification by subsampling (the q in every DP-SGD ε) assumes the adversary does
not know which records are in each batch. On the starting commit the batches come
from torch's global generator seeded with ``derive_seed(run seed, "train", silo
id, round)``: the server can replay the sampler and learn, for every step, which
records (by index) and how many the silo used. With CSPRNG noise the batches must
come from the CSPRNG too; only the seeded research mode may reproduce them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedguard.client.training import run_dp_sgd
from fedguard.core.config import LocalDPConfig, LocalTrainingConfig, NoiseSource
from fedguard.core.seeding import derive_seed
from fedguard.privacy.analysis.dp_sgd import poisson_schedule
from fedguard.wire.protocol import ReplyStatus
from tests.adversarial.harness import (
    make_silo,
    plain_instruction,
    status,
)
from tests.adversarial.observe import (
    recorded_batches,
    row_index,
)
from tests.factories import initial_weights, local_scaler

SEED = 1234


def _members(dp: LocalDPConfig, seed: int = SEED) -> list[tuple[int, ...]]:
    """The record indices of each non-empty Poisson batch of one ``run_dp_sgd`` call."""
    torch.manual_seed(0)
    n = 200
    features = torch.randn(n, 4)
    labels = (features[:, 0] > 0).long()
    dataset = TensorDataset(features, labels, torch.arange(n))
    model = nn.Sequential(nn.Linear(4, 2))
    seen: list[tuple[int, ...]] = []
    loss_fn = nn.CrossEntropyLoss()

    def batch_loss(private: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        seen.append(tuple(int(i) for i in batch[2].tolist()))
        loss: torch.Tensor = loss_fn(private(batch[0]), batch[1])
        return loss

    run_dp_sgd(
        model,
        dataset,
        LocalTrainingConfig(local_epochs=2, batch_size=20, learning_rate=0.1),
        dp,
        1.0,
        seed,
        batch_loss=batch_loss,
    )
    return seen


def test_run_dp_sgd_with_csprng_noise_draws_fresh_batches_for_the_same_seed() -> None:
    dp = LocalDPConfig(noise_source=NoiseSource.CSPRNG)
    first, second = _members(dp), _members(dp)
    assert first != second, (
        f"the same seed gave the same {len(first)} Poisson batches twice "
        f"(sizes {[len(b) for b in first]}): whoever knows the seed knows every batch"
    )


def test_the_server_cannot_replay_a_silos_poisson_sampler(tmp_path: Path) -> None:
    """The server's attack, end to end: predict each batch's members from public values.

    It knows the run seed (its own instruction), the silo id and round, and the
    silo's data size (reported as ``num-examples``); on the starting commit that is
    enough to replay Opacus's sampler and name the record indices of every batch.
    """
    silo = make_silo(tmp_path, 0)
    weights, scaler = initial_weights(), local_scaler(silo.settings)
    message = plain_instruction(1, weights, scaler, noise_source=NoiseSource.CSPRNG)
    with recorded_batches() as observed:
        reply = silo.deliver(message)
    got, reason = status(reply)
    assert got is ReplyStatus.OK, reason
    # The batches as indices into the silo's training split.
    data = silo.settings.data.load()
    index = row_index(scaler.transform(data.train.features))
    seen = [tuple(sorted(index[row] for row in batch)) for batch in observed]
    # The server's replay: seed → torch's generator; the DataLoader's iterator draws its
    # base seed (64 bits), then Opacus draws one Bernoulli(q) per record and step.
    n = len(data.train)
    q, steps = poisson_schedule(n, 32, 1)
    torch.manual_seed(derive_seed(0, "train", silo.silo_id, 1))
    torch.empty((), dtype=torch.int64).random_()
    predicted = []
    for _ in range(steps):
        chosen = tuple(int(i) for i in np.flatnonzero((torch.rand(n) < q).numpy()))
        if chosen:
            predicted.append(chosen)
    assert seen, "no DP-SGD batch was recorded"
    assert seen != predicted, (
        f"the server predicted the members of all {len(seen)} Poisson batches of "
        f"{silo.silo_id} (sizes {[len(b) for b in seen]}) from the run seed, silo id, round "
        "and data size alone"
    )
