"""Fairness metrics from counts, checked against fairlearn on the same counts."""

import numpy as np
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, roc_auc_score

from fedguard.trust import fairness as fg

GROUPS = ("F", "M", "other")
BINS = 10


def _records(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random labels, scores and groups; prediction = score > 1/2, as argmax decides."""
    rng = np.random.default_rng(seed)
    n = 900
    groups = rng.integers(0, len(GROUPS), n)
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels + 0.05 * groups, 0.2), 0, 0.999)
    return labels, (scores > 0.5).astype(int), scores, groups


def _counts(labels: np.ndarray, pred: np.ndarray, scores: np.ndarray, groups: np.ndarray):
    g = len(GROUPS)

    def per(mask: np.ndarray) -> np.ndarray:
        return np.bincount(groups[mask], minlength=g).astype(float)

    bins = np.clip((scores * BINS).astype(int), 0, BINS - 1)
    pos, neg, sums = (np.zeros((g, BINS)) for _ in range(3))
    np.add.at(pos, (groups[labels == 1], bins[labels == 1]), 1)
    np.add.at(neg, (groups[labels == 0], bins[labels == 0]), 1)
    np.add.at(sums, (groups, bins), scores)
    return fg.FairnessCounts(
        GROUPS,
        per((pred == 1) & (labels == 1)),
        per((pred == 1) & (labels == 0)),
        per((pred == 0) & (labels == 0)),
        per((pred == 0) & (labels == 1)),
        pos,
        neg,
        sums,
    )


def _expand(counts: fg.FairnessCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label, prediction and group arrays holding exactly the counts."""
    y, p, s = [], [], []
    for g, name in enumerate(counts.groups):
        for label, pred, c in (
            (1, 1, counts.tp[g]),
            (0, 1, counts.fp[g]),
            (0, 0, counts.tn[g]),
            (1, 0, counts.fn[g]),
        ):
            y += [label] * int(c)
            p += [pred] * int(c)
            s += [name] * int(c)
    return np.array(y), np.array(p), np.array(s)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_fairlearns_on_the_same_counts(seed: int) -> None:
    counts = _counts(*_records(seed))
    metrics = fg.group_metrics(counts)
    y, p, s = _expand(counts)
    frame = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
        },
        y_true=y,
        y_pred=p,
        sensitive_features=s,
    )
    for m in metrics:
        row = frame.by_group.loc[m.group]
        assert m.n == (s == m.group).sum()
        for name in ("accuracy", "selection_rate", "tpr", "fpr"):
            assert getattr(m, name) == pytest.approx(row[name], abs=1e-9)
    assert fg.demographic_parity_difference(metrics) == pytest.approx(
        demographic_parity_difference(y, p, sensitive_features=s), abs=1e-9
    )
    assert fg.equalized_odds_difference(metrics) == pytest.approx(
        equalized_odds_difference(y, p, sensitive_features=s), abs=1e-9
    )


def test_binned_auc_and_calibration_follow_the_records() -> None:
    labels, pred, scores, groups = _records(3)
    counts = _counts(labels, pred, scores, groups)
    metrics = fg.group_metrics(counts)
    for g, m in enumerate(metrics):
        mask = groups == g
        exact = roc_auc_score(labels[mask], scores[mask])
        assert m.auc is not None and abs(m.auc - exact) < 0.02  # ties inside 10 bins only
        bins, ece = fg.calibration(counts, g)
        b = np.clip((scores[mask] * BINS).astype(int), 0, BINS - 1)
        want = sum(
            (b == k).sum()
            / mask.sum()
            * abs(labels[mask][b == k].mean() - scores[mask][b == k].mean())
            for k in range(BINS)
            if (b == k).any()
        )
        assert ece == pytest.approx(want, abs=1e-12)
        assert sum(x.count for x in bins) == mask.sum()


def test_noised_counts_are_clipped_and_empty_rates_undefined() -> None:
    zero = np.zeros((2, BINS))
    counts = fg.FairnessCounts(
        ("a", "b"),
        np.array([5.0, -2.0]),
        np.array([1.0, 0.0]),
        np.array([4.0, 3.0]),
        np.array([0.0, -1.0]),
        zero,
        zero,
        zero,
    )
    a, b = fg.group_metrics(counts)
    assert a.tpr == 1.0 and a.fpr == 0.2
    assert b.tpr is None and b.selection_rate == 0.0 and b.auc is None
    assert fg.equalized_odds_difference([a, b]) == pytest.approx(0.2)
