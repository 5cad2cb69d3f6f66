"""Per-feature histograms on fixed bins: what a silo summarizes its inputs with.

The edges are fixed once, at training time, from the federated feature scaler
(no pooled records): in the scaler's output space a standardized feature is cut
at the standard normal's quantiles ``Φ⁻¹(k / bins)`` (equally likely bins were
the feature normal), a feature left unscaled (one-hot, indicators, pixels in
[0, 1]) at ``k / bins``. Bins left (nearly) empty by a skewed or binary feature
are merged later, on the released reference (:mod:`fedguard.trust.drift`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import norm

from fedguard.core.errors import DataError

__all__ = ["bin_edges", "histogram_counts"]


def bin_edges(standardized: Sequence[bool], bins: int) -> np.ndarray:
    """``(d, bins − 1)`` inner edges per feature, in the scaler's output space."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise DataError(f"bins must be an integer >= 2, got {bins!r}")
    k = np.arange(1, bins) / bins
    normal = norm.ppf(k)
    return np.stack([normal if s else k for s in standardized]).astype(np.float64)


def histogram_counts(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``(d, bins)`` counts of the scaled ``(n, d)`` features on the fixed edges."""
    x = np.asarray(features, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if x.ndim != 2 or e.ndim != 2 or x.shape[1] != e.shape[0]:
        raise DataError(f"features {x.shape} and edges {e.shape} do not match")
    bins = e.shape[1] + 1
    out = np.zeros((e.shape[0], bins), dtype=np.float64)
    for j in range(e.shape[0]):
        index = np.searchsorted(e[j], x[:, j], side="right")
        out[j] = np.bincount(index, minlength=bins)
    return out
