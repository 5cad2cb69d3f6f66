"""Attack 1: the server chooses the noise (and so can subtract it).

On the starting commit a train instruction's ``noise-source`` decides where a
silo's DP-SGD noise comes from; ``seeded`` derives it from
``derive_seed(run seed, "train", silo id, round)``, all values the server knows,
so the server regenerates the noise and removes it from the update. A deployed
silo decides its noise source itself: it refuses a seeded request before it
loads, trains or charges anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedguard.core.config import NoiseSource
from fedguard.core.serialization import flatten_weights
from fedguard.wire.protocol import ReplyStatus
from tests.adversarial.harness import (
    Silo,
    deployed_silo,
    has_update,
    make_silo,
    plain_instruction,
    reply_weights,
    status,
)
from tests.adversarial.observe import (
    digest,
    recorded_batches,
)
from tests.factories import initial_weights, local_scaler

NOISE_SOURCE = "[noise-source]"


def _assert_refused_for_noise_source(silo: Silo) -> None:
    weights, scaler = initial_weights(), local_scaler(silo.settings)
    reply = silo.deliver(plain_instruction(1, weights, scaler, noise_source=NoiseSource.SEEDED))
    got, reason = status(reply)
    released = "released a trained update" if has_update(reply) else "released nothing"
    assert got is ReplyStatus.REFUSED, (
        f"{silo.silo_id} accepted the server's seeded noise: status {got.value} and it "
        f"{released}; its ledger now holds {len(silo.ledger_entries())} charge(s) for noise "
        "the server can regenerate"
    )
    assert reason.startswith(NOISE_SOURCE), reason
    assert not has_update(reply)
    assert silo.ledger_entries() == [], "a refused instruction must charge nothing"
    assert silo.secagg_secrets() == []


def test_a_deployed_silo_refuses_the_servers_seeded_noise(tmp_path: Path) -> None:
    """The shipped ``app`` with a hospital's own ``--node-config`` (default policy)."""
    _assert_refused_for_noise_source(deployed_silo(tmp_path))


def test_default_silo_settings_refuse_the_servers_seeded_noise(tmp_path: Path) -> None:
    """``SiloSettings`` with the default policy (what the simulation builds)."""
    _assert_refused_for_noise_source(make_silo(tmp_path, 0))


@pytest.mark.parametrize("noise_source", [NoiseSource.SEEDED, NoiseSource.CSPRNG])
def test_two_fresh_copies_of_a_silo_never_release_a_reproducible_update(
    tmp_path: Path, noise_source: NoiseSource
) -> None:
    """The server's view: same instruction, same silo id, same data, fresh state.

    Whatever the server asked for, what a silo releases must not be a function of
    values the server knows: two fresh copies of one silo (empty state folders)
    given the same instruction must release different updates, drawn from
    different Poisson batches. (A refusal releases nothing, which is fine too.)
    """
    copies = [make_silo(tmp_path, 0, state_name=f"copy-{c}") for c in "ab"]
    weights, scaler = initial_weights(), local_scaler(copies[0].settings)
    message = plain_instruction(1, weights, scaler, noise_source=noise_source)
    updates: list[np.ndarray] = []
    batch_runs: list[str] = []
    for silo in copies:
        with recorded_batches() as batches:
            reply = silo.deliver(message)
        got, reason = status(reply)
        if got is not ReplyStatus.OK:
            assert not has_update(reply), reason
            continue
        updates.append(flatten_weights(reply_weights(reply)) - flatten_weights(weights))
        batch_runs.append(digest(batches))
    if len(updates) < 2:
        return
    first, second = updates
    assert not np.array_equal(first, second), (
        f"two fresh copies released the identical update (‖Δ‖ = {np.linalg.norm(first):.4f}) "
        f"for {noise_source.value!r} noise: the server regenerates the silo's DP noise from "
        "derive_seed(seed, 'train', silo id, round) and subtracts it"
    )
    assert batch_runs[0] != batch_runs[1], (
        f"two fresh copies trained on the very same Poisson batches (digest {batch_runs[0]}): "
        "the batches follow from values the server knows (run seed, silo id, round, data size)"
    )
