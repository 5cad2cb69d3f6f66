"""The trust layer's questions, answered at the silo: fairness counts and drift histograms.

Producers of :mod:`fedguard.client.statistic_release` (the silo computes the
vector and states its L2 sensitivity; the release machinery noises it from the
CSPRNG, charges the ledger and hands it to SecAgg+). The silo agent answers only
the kinds in its producer table; :data:`TRUST_PRODUCERS` is what the composition
root (:mod:`fedguard.apps.silo`) adds to the silo's own (:data:`SILO_PRODUCERS`).
The attribution producer needs Captum (the ``explain`` extra): it is imported when
an attribution query arrives, and a silo without Captum refuses that query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedguard.client.statistic_release import (
    SILO_PRODUCERS,
    Producers,
    SecureStatistic,
    scaled_inputs,
)
from fedguard.core.datasets import SiloData
from fedguard.core.errors import ConfigError, ProtocolError
from fedguard.core.histograms import histogram_counts
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.sensitive_groups import sensitive_groups
from fedguard.wire.statistics import SCORE_BINS, StatisticKind

__all__ = [
    "SILO_AND_TRUST_PRODUCERS",
    "TRUST_PRODUCERS",
    "attribution_statistic",
    "drift_statistic",
    "fairness_statistic",
]


def fairness_statistic(
    silo: SiloData, model: nn.Module | None, scaler: FeatureScaler, options: Mapping[str, Any]
) -> SecureStatistic:
    """Confusion counts and score histograms per cohort, on the silo's test split.

    One record adds 1 to one confusion count, 1 to one score bin and its score
    (in [0, 1]) to one score sum: L2 sensitivity √3.
    """
    if model is None:
        raise ProtocolError("a fairness query needs the model")
    if not silo.schema.is_binary:
        raise ConfigError(f"the fairness audit needs a binary task; {silo.schema.dataset} is not")
    groups = sensitive_groups(
        silo.schema, str(options["attribute"]), tuple(float(b) for b in options.get("bands", ()))
    )
    bins = int(options.get("score-bins", SCORE_BINS))
    model.eval()
    with torch.no_grad():
        logits = model(scaled_inputs(silo, scaler, train=False))
    scores = torch.softmax(logits, dim=1)[:, 1].double().numpy()
    predicted = logits.argmax(dim=1).numpy()
    labels = silo.test.labels
    codes = groups.assign(silo.test.features)
    g_count = groups.num_groups
    score_bin = np.clip((scores * bins).astype(np.int64), 0, bins - 1)

    def per_group(mask: np.ndarray) -> np.ndarray:
        return np.bincount(codes[mask], minlength=g_count).astype(np.float64)

    flat = codes * bins + score_bin
    hist = np.zeros((3, g_count * bins))
    hist[0] = np.bincount(flat[labels == 1], minlength=g_count * bins)
    hist[1] = np.bincount(flat[labels == 0], minlength=g_count * bins)
    hist[2] = np.bincount(flat, weights=scores, minlength=g_count * bins)
    values = np.concatenate(
        [
            per_group((predicted == 1) & (labels == 1)),
            per_group((predicted == 1) & (labels == 0)),
            per_group((predicted == 0) & (labels == 0)),
            per_group((predicted == 0) & (labels == 1)),
            hist.reshape(-1),
        ]
    )
    return SecureStatistic(values, math.sqrt(3.0), metadata={"num-examples": float(len(labels))})


def drift_statistic(
    silo: SiloData, model: nn.Module | None, scaler: FeatureScaler, options: Mapping[str, Any]
) -> SecureStatistic:
    """Per-feature histograms of the scaled features on the server's fixed bin edges.

    Options: ``edges`` (d, bins − 1) and ``split`` (``train`` or ``test``). One
    record adds 1 to one bin of each of the d features: L2 sensitivity √d.
    """
    edges = np.asarray(options["edges"], dtype=np.float64)
    split = str(options.get("split", "train"))
    if split not in ("train", "test"):
        raise ProtocolError(f"split must be train or test, got {split!r}")
    part = silo.train if split == "train" else silo.test
    counts = histogram_counts(scaler.transform(part.features), edges)
    return SecureStatistic(
        counts.reshape(-1),
        math.sqrt(counts.shape[0]),
        metadata={"num-examples": float(len(part))},
    )


def attribution_statistic(
    silo: SiloData, model: nn.Module | None, scaler: FeatureScaler, options: Mapping[str, Any]
) -> SecureStatistic:
    """Summed clipped Integrated-Gradients attributions (:mod:`fedguard.trust.explanations`)."""
    try:
        from fedguard.trust.explanations import attribution_statistic as attribute
    except ImportError as missing:  # captum is the optional ``explain`` extra
        raise ConfigError(f"this silo cannot answer attribution statistics: {missing}") from None
    return attribute(silo, model, scaler, options)


#: The trust layer's producers, by the kind of query they answer.
TRUST_PRODUCERS: Producers = {
    StatisticKind.FAIRNESS: fairness_statistic,
    StatisticKind.DRIFT: drift_statistic,
    StatisticKind.ATTRIBUTION: attribution_statistic,
}
#: What a fedguard silo answers: its own statistics and the trust layer's.
SILO_AND_TRUST_PRODUCERS: Producers = {**SILO_PRODUCERS, **TRUST_PRODUCERS}
