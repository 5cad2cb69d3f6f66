"""Evaluation metrics the server can pool from silo sums.

Silos never send a score per record: for binary tasks they send histograms of
the predicted positive-class probability per true label, and the server sums them.
"""

from __future__ import annotations

import numpy as np

# Bins of width 1e-4: the binned AUC differs from the exact one only through ties
# inside one bin (counted one half).
AUC_BINS = 10_000


def score_histograms(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histograms (positive, negative) of probabilities in [0, 1] over ``AUC_BINS`` bins."""
    bins = np.clip(
        (np.asarray(scores, dtype=np.float64) * AUC_BINS).astype(np.int64), 0, AUC_BINS - 1
    )
    positive = np.bincount(bins[labels == 1], minlength=AUC_BINS).astype(np.int64)
    negative = np.bincount(bins[labels == 0], minlength=AUC_BINS).astype(np.int64)
    return positive, negative


def binned_auc(positive_histogram: np.ndarray, negative_histogram: np.ndarray) -> float:
    """ROC AUC from per-label score histograms (ties within a bin count one half).

    Mann–Whitney form: P(score of a random positive > score of a random negative).
    """
    pos = np.asarray(positive_histogram, dtype=np.float64)
    neg = np.asarray(negative_histogram, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    negatives_below = np.cumsum(neg) - neg
    return float((pos * (negatives_below + 0.5 * neg)).sum() / (n_pos * n_neg))
