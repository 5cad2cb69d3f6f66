"""Group fairness metrics from summed (and possibly noised) per-cohort counts.

Pure functions of the counts the fairness audit releases (see
:mod:`fedguard.client.statistic_release`): per cohort of the sensitive attribute, the
confusion counts TP, FP, TN, FN of the model's decision (class 1 when its
probability is the larger), and per score bin the number of positives, of
negatives and the sum of predicted probabilities. Definitions follow fairlearn
(``fairlearn.metrics``, which the tests check these against on the same counts):

* demographic parity difference: largest minus smallest selection rate
  P(ŷ = 1 | group) (Agarwal et al., "A Reductions Approach to Fair
  Classification", ICML 2018);
* equalized odds difference: the larger of the between-group spreads of the true
  positive rate and of the false positive rate (Hardt, Price, Srebro, "Equality
  of Opportunity in Supervised Learning", NeurIPS 2016);
* calibration per group: the observed positive rate against the mean predicted
  probability in each score bin, and the expected calibration error
  ECE = Σ_b (n_b / n) |observed_b − predicted_b| (Naeini, Cooper, Hauskrecht,
  AAAI 2015; Guo et al., ICML 2017);
* AUC per group from its score histograms (ties within a bin count one half).

Noised counts can be negative or zero: they are clipped at 0 first
(post-processing, no privacy cost), and a rate whose denominator is 0 is
undefined (``None``); a spread over groups ignores undefined rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedguard.core.errors import DataError
from fedguard.core.metrics import binned_auc

__all__ = [
    "CalibrationBin",
    "FairnessCounts",
    "GroupFairness",
    "calibration",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "group_metrics",
]


@dataclass(frozen=True)
class FairnessCounts:
    """Summed counts per cohort: ``(G,)`` confusion counts and ``(G, S)`` score bins."""

    groups: tuple[str, ...]
    tp: np.ndarray
    fp: np.ndarray
    tn: np.ndarray
    fn: np.ndarray
    positives: np.ndarray  # (G, S): true positives' scores per bin
    negatives: np.ndarray  # (G, S)
    score_sums: np.ndarray  # (G, S): Σ predicted probability per bin

    def __post_init__(self) -> None:
        g = len(self.groups)
        for name in ("tp", "fp", "tn", "fn"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (g,):
                raise DataError(f"{name} must have shape ({g},), got {value.shape}")
            object.__setattr__(self, name, value)
        shape = np.asarray(self.positives).shape
        if len(shape) != 2 or shape[0] != g or shape[1] < 1:
            raise DataError(f"score histograms must have shape ({g}, S), got {shape}")
        for name in ("positives", "negatives", "score_sums"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != shape:
                raise DataError(f"{name} must have shape {shape}, got {value.shape}")
            object.__setattr__(self, name, value)
        for name in ("tp", "fp", "tn", "fn", "positives", "negatives", "score_sums"):
            if not np.isfinite(getattr(self, name)).all():
                raise DataError(f"{name} holds non-finite values")

    def clipped(self) -> FairnessCounts:
        """Every count clipped at 0 (noise can push a small count below it)."""
        return FairnessCounts(
            self.groups,
            *(np.maximum(getattr(self, n), 0.0) for n in ("tp", "fp", "tn", "fn")),
            *(np.maximum(getattr(self, n), 0.0) for n in ("positives", "negatives", "score_sums")),
        )


@dataclass(frozen=True)
class GroupFairness:
    group: str
    n: float
    accuracy: float | None
    selection_rate: float | None
    tpr: float | None
    fpr: float | None
    auc: float | None
    ece: float | None


@dataclass(frozen=True)
class CalibrationBin:
    lower: float
    upper: float
    count: float
    mean_predicted: float | None
    observed_rate: float | None


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def calibration(counts: FairnessCounts, group: int) -> tuple[list[CalibrationBin], float | None]:
    """Reliability bins of one group and its expected calibration error."""
    c = counts.clipped()
    pos, neg, sums = c.positives[group], c.negatives[group], c.score_sums[group]
    bins = pos.shape[0]
    out: list[CalibrationBin] = []
    total = float((pos + neg).sum())
    ece = 0.0
    for b in range(bins):
        n_b = float(pos[b] + neg[b])
        predicted = _ratio(float(sums[b]), n_b)
        observed = _ratio(float(pos[b]), n_b)
        if predicted is not None and observed is not None:
            # A noised score sum can exceed its noised count: the mean stays a probability.
            predicted = min(predicted, 1.0)
            ece += n_b / total * abs(observed - predicted)
        out.append(CalibrationBin(b / bins, (b + 1) / bins, n_b, predicted, observed))
    return out, (ece if total > 0 else None)


def group_metrics(counts: FairnessCounts) -> list[GroupFairness]:
    """Accuracy, selection rate, TPR, FPR, AUC and ECE of every group."""
    c = counts.clipped()
    out: list[GroupFairness] = []
    for g, name in enumerate(c.groups):
        tp, fp, tn, fn = (float(c.tp[g]), float(c.fp[g]), float(c.tn[g]), float(c.fn[g]))
        n = tp + fp + tn + fn
        auc = binned_auc(c.positives[g], c.negatives[g])
        _, ece = calibration(c, g)
        out.append(
            GroupFairness(
                group=name,
                n=n,
                accuracy=_ratio(tp + tn, n),
                selection_rate=_ratio(tp + fp, n),
                tpr=_ratio(tp, tp + fn),
                fpr=_ratio(fp, fp + tn),
                auc=None if np.isnan(auc) else auc,
                ece=ece,
            )
        )
    return out


def _spread(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(max(defined) - min(defined)) if len(defined) >= 2 else None


def demographic_parity_difference(metrics: Sequence[GroupFairness]) -> float | None:
    """max − min selection rate over the groups (fairlearn's ``between_groups``)."""
    return _spread([m.selection_rate for m in metrics])


def equalized_odds_difference(metrics: Sequence[GroupFairness]) -> float | None:
    """The larger of the TPR spread and the FPR spread (fairlearn's ``worst_case``)."""
    spreads = [
        s
        for s in (_spread([m.tpr for m in metrics]), _spread([m.fpr for m in metrics]))
        if s is not None
    ]
    return max(spreads) if spreads else None
