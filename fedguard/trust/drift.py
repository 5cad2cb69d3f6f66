"""Input drift from per-feature histograms: merged bins, PSI, Jensen–Shannon, alerts.

Pure functions. Silos histogram their scaled features on edges fixed at
training time (:mod:`fedguard.core.histograms`); the server merges, per feature,
adjacent bins of the released training-time reference until each holds at least
``min_share`` of it (:func:`merge_bins`: post-processing of the DP reference,
free): a bin a skewed or binary feature leaves empty would otherwise hold DP
noise alone, and PSI's log ratio blows such noise up. Monitoring rounds are
merged the same way and compared with the reference:

* population stability index PSI = Σ_b (p_b − q_b) ln(p_b / q_b) (Yurdakul,
  "Statistical Properties of Population Stability Index", 2018), with both
  distributions floored at :data:`PROBABILITY_FLOOR` so an empty bin is finite;
* Jensen–Shannon distance √JSD (base 2, in [0, 1]; Lin, IEEE Trans. Inf. Theory
  1991), the quantity ``scipy.spatial.distance.jensenshannon(p, q, base=2)``
  returns.

Noised counts are clipped at 0 before normalizing (post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedguard.core.errors import DataError
from fedguard.core.histograms import bin_edges, histogram_counts

__all__ = [
    "MIN_BIN_SHARE",
    "PROBABILITY_FLOOR",
    "FeatureDriftScore",
    "bin_edges",
    "drift_scores",
    "histogram_counts",
    "jensen_shannon",
    "merge_bins",
    "merged_counts",
    "population_stability_index",
    "proportions",
]

#: Smallest bin probability used in PSI (an empty bin would make it infinite).
PROBABILITY_FLOOR = 1e-4


def proportions(counts: np.ndarray) -> np.ndarray:
    """Rows of (noised) counts as probability vectors (negative counts clipped at 0)."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    totals = c.sum(axis=-1, keepdims=True)
    if (totals <= 0).any():
        raise DataError("a histogram with no mass cannot be normalized")
    result: np.ndarray = c / totals
    return result


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of two probability vectors, each floored at :data:`PROBABILITY_FLOOR`."""
    p = np.maximum(np.asarray(reference, dtype=np.float64), PROBABILITY_FLOOR)
    q = np.maximum(np.asarray(current, dtype=np.float64), PROBABILITY_FLOOR)
    if p.shape != q.shape or p.ndim != 1:
        raise DataError(f"PSI needs two vectors of one length, got {p.shape} and {q.shape}")
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen–Shannon distance (base 2) of two probability vectors."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(current, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1 or p.sum() <= 0 or q.sum() <= 0:
        raise DataError(f"JS needs two non-empty vectors of one length, got {p.shape}, {q.shape}")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return float(np.sqrt(max((kl(p) + kl(q)) / 2, 0.0)))


#: Smallest share of the reference a merged bin holds.
MIN_BIN_SHARE = 0.05


def merge_bins(reference: np.ndarray, min_share: float = MIN_BIN_SHARE) -> np.ndarray:
    """``(d, bins)`` merged-bin index of every fine bin, from the reference counts.

    Left to right, fine bins join the current merged bin until it holds
    ``min_share`` of the feature's reference mass; a last bin short of it joins
    the one before.
    """
    p = proportions(reference)
    if not 0 < min_share < 1:
        raise DataError(f"min_share must lie in (0, 1), got {min_share}")
    out = np.zeros(p.shape, dtype=np.int64)
    for j in range(p.shape[0]):
        current, mass = 0, 0.0
        for b in range(p.shape[1]):
            out[j, b] = current
            mass += p[j, b]
            if mass >= min_share and b < p.shape[1] - 1:
                current, mass = current + 1, 0.0
        if mass < min_share and current > 0:
            out[j][out[j] == current] = current - 1
    return out


def merged_counts(counts: np.ndarray, merge: np.ndarray) -> list[np.ndarray]:
    """Per feature, the counts summed into its merged bins."""
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != merge.shape:
        raise DataError(f"counts {c.shape} do not match the bin merge {merge.shape}")
    return [np.bincount(merge[j], weights=c[j]) for j in range(c.shape[0])]


@dataclass(frozen=True)
class FeatureDriftScore:
    feature: str
    psi: float
    js: float
    alert: bool


def drift_scores(
    names: Sequence[str],
    reference: np.ndarray,
    current: np.ndarray,
    threshold: float,
    merge: np.ndarray | None = None,
) -> list[FeatureDriftScore]:
    """PSI and JS per feature of two ``(d, bins)`` count arrays; alert when PSI > threshold.

    With ``merge`` (from :func:`merge_bins`) both are compared on the merged bins.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 2 or ref.shape[0] != len(names):
        raise DataError(f"histograms {ref.shape}, {cur.shape} do not match {len(names)} features")
    groups = merge if merge is not None else np.tile(np.arange(ref.shape[1]), (ref.shape[0], 1))
    out = []
    for j, (r, c) in enumerate(
        zip(merged_counts(ref, groups), merged_counts(cur, groups), strict=True)
    ):
        p, q = proportions(r), proportions(c)
        psi = population_stability_index(p, q)
        out.append(FeatureDriftScore(names[j], psi, jensen_shannon(p, q), psi > threshold))
    return out
