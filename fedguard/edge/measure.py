"""Measuring exported models: latency and throughput, artifact size, pooled metrics.

Used by :mod:`fedguard.edge.export` for the card's ``size_latency`` and ``metrics``
sections.
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedguard.client.training import LocalData
from fedguard.core.datasets import FeatureSchema
from fedguard.core.errors import ConfigError
from fedguard.core.metrics import binned_auc, score_histograms
from fedguard.core.preprocessing import FeatureScaler
from fedguard.edge.quantize import FoldedScalerModel

__all__ = [
    "Timing",
    "TorchThreads",
    "pooled_metrics",
    "time_model",
    "torch_bytes",
    "torch_logits",
    "torch_runner",
]


@dataclass(frozen=True)
class Timing:
    runtime: str
    bytes: int
    p50_latency_ms: float
    throughput_batch256: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def time_model(
    run: Callable[[np.ndarray], object], features: np.ndarray, repeats: int
) -> tuple[float, float]:
    """(p50 single-record latency in ms, batch-256 records/s) of ``run`` on encoded rows."""
    rows = np.ascontiguousarray(features, dtype=np.float32)
    if rows.shape[0] == 0:
        raise ConfigError("timing needs at least one row")
    single = rows[:1]
    batch = np.ascontiguousarray(np.resize(rows, (256, rows.shape[1])), dtype=np.float32)
    for _ in range(max(5, repeats // 10)):
        run(single)
        run(batch)
    singles = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(single)
        singles.append(time.perf_counter() - started)
    batches = []
    for _ in range(max(10, repeats // 4)):
        started = time.perf_counter()
        run(batch)
        batches.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(singles), 256.0 / statistics.median(batches)


def torch_runner(
    model: nn.Module, scaler: FeatureScaler, schema: FeatureSchema
) -> Callable[[np.ndarray], object]:
    """A torch fp32 forward pass on encoded rows (the scaler folded in, as on the edge)."""
    folded = FoldedScalerModel(model, scaler, schema.input_shape).eval()

    @torch.no_grad()
    def run(rows: np.ndarray) -> object:
        return folded(torch.from_numpy(rows))

    return run


def torch_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the fp32 torch artifact."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


class TorchThreads:
    """Torch's intra-op thread count set for a ``with`` block, restored after it."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.before = torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def pooled_metrics(parts: Sequence[tuple[np.ndarray, np.ndarray]], binary: bool) -> dict[str, Any]:
    """Accuracy (and binary AUC from summed histograms) over (logits, labels) parts."""
    n = sum(len(labels) for _, labels in parts)
    correct = sum(int((logits.argmax(axis=1) == labels).sum()) for logits, labels in parts)
    out: dict[str, Any] = {"num_examples": n, "accuracy": correct / n if n else math.nan}
    out["auc"] = None
    if binary and parts:
        histograms = [
            score_histograms(
                1.0 / (1.0 + np.exp(-np.diff(logits.astype(np.float64))[:, 0])), labels
            )
            for logits, labels in parts
        ]
        out["auc"] = binned_auc(
            np.sum([h[0] for h in histograms], axis=0), np.sum([h[1] for h in histograms], axis=0)
        )
    return out


@torch.no_grad()
def torch_logits(model: nn.Module, data: LocalData) -> np.ndarray:
    model.eval()
    return np.asarray(model(torch.from_numpy(data.features)).numpy(), dtype=np.float32)
