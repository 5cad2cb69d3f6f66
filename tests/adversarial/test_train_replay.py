"""A replayed plain ``train`` round from another global model.

The server crashed (or says it did) and sends round r again, now from a different
global model. Training on it would be a second release for the same (run,
round), i.e. the server gets two noisy looks at the same batches' gradients for
the price of one. The silo must refuse it (a policy decision: ``refused``,
charging nothing) or answer with the update it already released; never train.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from fedguard.wire.protocol import ReplyStatus
from tests.adversarial.harness import (
    has_update,
    make_silo,
    plain_instruction,
    reply_weights,
    status,
)
from tests.factories import initial_weights, local_scaler

RUN = "run-a"


def test_a_replayed_round_from_another_model_is_refused_and_charged_once(
    tmp_path: Path,
) -> None:
    silo = make_silo(tmp_path, 0)
    weights, scaler = initial_weights(), local_scaler(silo.settings)
    first = silo.deliver(plain_instruction(1, weights, scaler))
    assert status(first)[0] is ReplyStatus.OK, status(first)
    released = reply_weights(first)
    other = OrderedDict((name, value + np.float32(1e-3)) for name, value in weights.items())
    replay = silo.deliver(plain_instruction(1, other, scaler))
    got, reason = status(replay)
    if has_update(replay):
        again = reply_weights(replay)
        assert all(np.array_equal(again[k], released[k]) for k in released), (
            "the silo trained round 1 a second time, from the server's new model: a "
            "second release of the same round"
        )
    else:
        assert got is ReplyStatus.REFUSED, (
            f"the replay from another model was answered {got.value} ({reason[:120]}), not "
            "refused: a silo's decision not to release twice is a refusal, not a failure"
        )
    entries = silo.ledger_entries()
    assert [(e.run_id, e.round) for e in entries] == [(RUN, 1)], entries
