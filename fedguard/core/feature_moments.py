"""The federated scaler's statistic: feature moments on public bounds, with a finite sensitivity.

:class:`~fedguard.core.preprocessing.FeatureScaler` standardizes the numeric
features with the mean and standard deviation of the union of the silos'
training rows. Their sums (count, Σx, Σx²) depend on the training records, so
each silo releases them as a DP statistic (:mod:`fedguard.client.statistic_release`,
kind ``feature-moments``): that needs a finite L2 sensitivity, so every numeric
feature has a **public range** ``[lo, hi]`` written in the data set's contract
(``public_range``, else ``min``/``max``: domain knowledge, not fitted on any silo),
each value is clipped to it and mapped to ``u = (x − c) / r ∈ [−1, 1]`` (``c`` the
range's centre, ``r`` its half width).

Layout of one silo's vector (only the features the schema standardizes;
one-hot, indicator and pixel features need no statistic)::

    [N, count_j for each feature that may be missing, Σu_j (d), Σu_j² (d)]

``N`` is the silo's number of training rows; a feature without a missing
indicator in the schema is present in every row, so its count is ``N``. One
record adds 1 to ``N`` and to each of its m possible-missing counts, and at most
1 in absolute value to each Σu_j and Σu_j²: L2 sensitivity √(1 + m + 2d).

:meth:`MomentLayout.scaler` turns the (noised) sum over the silos into the
scaler: post-processing only, so the scaler is as private as the releases. A
noised mean and variance are combined with public priors by precision, so
where the noise swamps the moments the scale falls back to the public range
rather than to noise (which could produce a near-zero scale and blow a feature up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from fedguard.core.datasets import FeatureSchema, code_book
from fedguard.core.errors import ConfigError, DataError
from fedguard.core.preprocessing import FeatureScaler

__all__ = ["MomentLayout", "moment_layout"]

# Below this standard deviation (in the feature's own units) a feature is constant.
_MIN_STD = 1e-8
# Public priors of a normalized feature (u in [-1, 1]) that noised moments are combined
# with: mean 0 ± 1/2; variance (1/4)^2 ± (1/4)^2 (a standard deviation of 1/8 the range).
_PRIOR_MEAN, _PRIOR_MEAN_ERROR = 0.0, 0.5
_PRIOR_VARIANCE, _PRIOR_VARIANCE_ERROR = 0.0625, 0.0625


@dataclass(frozen=True)
class MomentLayout:
    """Where each moment of each standardized feature sits in the statistic vector."""

    schema: FeatureSchema
    features: tuple[int, ...]  # schema indices of the standardized features
    missable: tuple[int, ...]  # positions (into ``features``) that may be missing
    lower: np.ndarray
    upper: np.ndarray

    @property
    def num_features(self) -> int:
        return len(self.features)

    @property
    def length(self) -> int:
        return 1 + len(self.missable) + 2 * self.num_features

    @property
    def l2_sensitivity(self) -> float:
        return math.sqrt(1 + len(self.missable) + 2 * self.num_features)

    @property
    def centre(self) -> np.ndarray:
        return np.asarray((self.lower + self.upper) / 2, dtype=np.float64)

    @property
    def half_width(self) -> np.ndarray:
        return np.asarray((self.upper - self.lower) / 2, dtype=np.float64)

    def vector(self, features: np.ndarray) -> np.ndarray:
        """One silo's moments of its (encoded, unscaled) training features."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.schema.num_features:
            raise DataError(
                f"features must have shape (n, {self.schema.num_features}), got {x.shape}"
            )
        block = x[:, list(self.features)]
        present = ~np.isnan(block)
        u = np.where(present, (np.clip(block, self.lower, self.upper) - self.centre), 0.0)
        u = u / self.half_width
        counts = present.sum(axis=0).astype(np.float64)[list(self.missable)]
        return np.concatenate(
            [[float(x.shape[0])], counts, u.sum(axis=0), np.square(u).sum(axis=0)]
        )

    def scaler(self, values: np.ndarray, noise_std: float = 0.0) -> FeatureScaler:
        """The scaler of the summed (noised) moments; ``noise_std``: the noise per value.

        Post-processing only. Counts below 1 count as 1. With noise, the normalized
        mean and variance are each combined with a public prior (mean 0 ± ½, the
        range's centre; variance ¼² ± ¼², a standard deviation of an eighth of the
        range) in proportion to their precisions, the estimate's standard error
        being ``noise_std / count``: where the noise swamps the moments (small
        silos, many features) the scale falls back to the public range instead of
        to noise. Without noise the moments are used as they are.
        """
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (self.length,) or not np.isfinite(v).all():
            raise DataError(f"feature moments must be {self.length} finite values, got {v.shape}")
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ConfigError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        d, m = self.num_features, len(self.missable)
        count = np.full(d, max(v[0], 1.0))
        count[list(self.missable)] = np.maximum(v[1 : 1 + m], 1.0)
        error = noise_std / count  # standard error of each normalized moment
        raw_mean = np.clip(v[1 + m : 1 + m + d] / count, -1.0, 1.0)
        raw_variance = np.clip(v[1 + m + d :] / count - np.square(raw_mean), 0.0, 1.0)
        mean_u = _combine(raw_mean, error, _PRIOR_MEAN, _PRIOR_MEAN_ERROR)
        variance = np.clip(
            _combine(raw_variance, error, _PRIOR_VARIANCE, _PRIOR_VARIANCE_ERROR), 0.0, 1.0
        )
        mean = np.zeros(self.schema.num_features)
        scale = np.ones(self.schema.num_features)
        index = list(self.features)
        std = np.sqrt(variance) * self.half_width
        mean[index] = self.centre + self.half_width * mean_u
        scale[index] = np.where(std < _MIN_STD, 1.0, std)
        return FeatureScaler(mean=mean, scale=scale)


def _combine(
    estimate: np.ndarray, error: np.ndarray, prior: float, prior_error: float
) -> np.ndarray:
    """Precision-weighted mean of an estimate (standard error ``error``) and a prior."""
    weight = prior_error**2 / (prior_error**2 + np.square(error))
    return np.asarray(weight * estimate + (1 - weight) * prior, dtype=np.float64)


@cache
def moment_layout(schema: FeatureSchema) -> MomentLayout:
    """The moment layout of a schema, from its contract's public ranges.

    Every standardized column needs a public range (``public_range``, else the
    contract's ``min`` and ``max``): the statistic clips each value to it, which is
    what bounds one record's influence.
    """
    contract = code_book(schema).contract
    bounds = {c.name: c.clip_range for c in contract.columns if not c.is_categorical}
    names = schema.feature_names
    features = tuple(i for i, flag in enumerate(schema.standardize) if flag)
    lacking = [names[i] for i in features if bounds.get(names[i]) is None]
    if lacking:
        raise ConfigError(
            f"data contract {contract.name!r} gives no public range for the standardized "
            f"column(s) {lacking}: give each a public_range (or min and max)"
        )
    ranges = [bounds[names[i]] for i in features]
    lower = np.array([r[0] for r in ranges if r is not None], dtype=np.float64)
    upper = np.array([r[1] for r in ranges if r is not None], dtype=np.float64)
    missable = tuple(k for k, i in enumerate(features) if f"{names[i]}_missing" in names)
    return MomentLayout(schema, features, missable, lower, upper)
