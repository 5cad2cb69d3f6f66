import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fedguard.core.metrics import AUC_BINS, binned_auc, score_histograms


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 300))
def test_binned_auc_matches_sklearn_up_to_bin_ties(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    # Scores on bin centres: no two distinct scores share a bin, so binning is exact.
    scores = (rng.integers(0, AUC_BINS, n) + 0.5) / AUC_BINS
    pos, neg = score_histograms(scores, labels)
    assert abs(binned_auc(pos, neg) - roc_auc_score(labels, scores)) < 1e-12


def test_pooled_histograms_give_the_pooled_auc() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 1000)
    scores = np.clip(0.3 * labels + rng.normal(0.4, 0.2, 1000), 0, 1)
    parts = np.array_split(np.arange(1000), 4)
    hists = [score_histograms(scores[p], labels[p]) for p in parts]
    pooled = binned_auc(sum(h[0] for h in hists), sum(h[1] for h in hists))
    assert abs(pooled - roc_auc_score(labels, scores)) < 1e-3


def test_one_class_auc_is_nan() -> None:
    pos, neg = score_histograms(np.array([0.2, 0.7]), np.array([1, 1]))
    assert np.isnan(binned_auc(pos, neg))
