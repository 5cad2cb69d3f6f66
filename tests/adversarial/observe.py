"""What a malicious server can observe besides replies: Poisson batches, statistic sums.

Split from :mod:`tests.adversarial.harness` (which drives the silos).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedguard.core.datasets import schema_for
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.serialization import ModelWeights
from fedguard.privacy.secagg import SecAggConfig
from fedguard.wire import protocol
from tests.adversarial.harness import Consortium, SecAggRun, Silo, train_dp
from tests.factories import DATASET, instruction

# --------------------------------------------------------------------------- batches


#: One Poisson batch as the model saw it: the sorted bytes of its feature rows.
Batch = tuple[bytes, ...]


def feature_width() -> int:
    return int(np.prod(schema_for(DATASET).input_shape))


@contextmanager
def recorded_batches(width: int | None = None) -> Iterator[list[Batch]]:
    """Record every batch of feature rows a model is run on (a global forward hook).

    The private model, its inner model and its first layer all see the same input
    tensor: consecutive calls with the very same tensor count once. Empty Poisson
    batches take a noise-only step without a forward pass and are not recorded.
    """
    columns = width if width is not None else feature_width()
    batches: list[Batch] = []
    last: list[torch.Tensor | None] = [None]

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        if x.ndim != 2 or x.shape[-1] != columns or x is last[0]:
            return
        last[0] = x
        rows = np.ascontiguousarray(x.detach().to(torch.float32).numpy())
        batches.append(tuple(sorted(row.tobytes() for row in rows)))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield batches
    finally:
        handle.remove()


def row_index(features: np.ndarray) -> dict[bytes, int]:
    """Map each (float32) feature row to its index in the silo's training split."""
    rows = np.ascontiguousarray(features, dtype=np.float32)
    return {row.tobytes(): i for i, row in enumerate(rows)}


def digest(batches: Sequence[Batch]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        h.update(len(batch).to_bytes(4, "big"))
        for row in batch:
            h.update(row)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class StatisticQuery:
    """A trust-layer drift query as the server sends it (``query.secagg_statistic``)."""

    content: RecordDict
    vector_length: int  # with the weight column
    resolution: float
    query_round: int

    def config(self, group: Consortium, num_clients: int) -> SecAggConfig:
        from fedguard.server.statistic_collection import statistic_settings

        config = statistic_settings(num_clients).config_for(num_clients)
        return dataclasses.replace(config, require_identity=group.kit is not None)

    def values(self, run: SecAggRun) -> np.ndarray:
        """The decoded sum, as the server's ``collect_secure_statistic`` decodes it."""
        assert run.weighted_sum is not None and run.total_weight is not None
        return np.asarray((run.weighted_sum + 0.5 * run.total_weight) * self.resolution)


def drift_query(
    weights: ModelWeights, scaler: FeatureScaler, *, query_round: int = 0, bins: int = 8
) -> StatisticQuery:
    from fedguard.core.histograms import bin_edges
    from fedguard.core.trust_config import TrustNoise
    from fedguard.server.statistic_collection import DEFAULT_RESOLUTION
    from fedguard.wire.statistics import REQUEST, REQUEST_ARRAYS, StatisticKind, StatisticRequest

    edges = bin_edges(schema_for(DATASET).standardize, bins)
    length = int(edges.shape[0]) * bins
    step = DEFAULT_RESOLUTION[StatisticKind.DRIFT]
    request = StatisticRequest(
        kind=StatisticKind.DRIFT,
        query_round=query_round,
        target_epsilon=1.0,
        noise=TrustNoise.GAUSSIAN,
        resolution=step,
        vector_length=length,
        options={"edges": edges, "split": "train"},
    )
    config, arrays = request.to_records()
    message = instruction(0, weights, scaler, dp=train_dp())
    content = RecordDict({k: v for k, v in message.content.items() if k != protocol.ARRAYS})
    content[REQUEST] = ConfigRecord(config)
    content[REQUEST_ARRAYS] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )
    return StatisticQuery(content, length + 1, step, query_round)


def released_statistic(silo: Silo, run_id: str, query_round: int) -> np.ndarray | None:
    """The noised drift vector a silo released for a query (its own release store)."""
    from fedguard.client.statistic_release import ReleaseStore
    from fedguard.wire.statistics import StatisticKind

    stored = ReleaseStore(silo.settings.state_dir).load(
        run_id, StatisticKind.DRIFT.purpose, query_round
    )
    return None if stored is None else stored[0]
