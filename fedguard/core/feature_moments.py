"""The federated scaler's statistic: feature moments on public bounds, with a finite sensitivity.

:class:`~fedguard.core.preprocessing.FeatureScaler` standardizes the numeric
features with the mean and standard deviation of the union of the silos'
training rows. Their sums (count, Σx, Σx²) depend on the training records, so
each silo releases them as a DP statistic (:mod:`fedguard.client.statistic_release`,
kind ``feature-moments``): that needs a finite L2 sensitivity, so every numeric
feature has a **public range** ``[lo, hi]`` fixed per data set here (domain
knowledge, not fitted on any silo), each value is clipped to it and mapped to
``u = (x − c) / r ∈ [−1, 1]`` (``c`` the range's centre, ``r`` its half width).

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
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import numpy as np

from fedguard.core.config import DatasetName
from fedguard.core.datasets import FeatureSchema, schema_for
from fedguard.core.errors import ConfigError, DataError
from fedguard.core.preprocessing import FeatureScaler

__all__ = ["PUBLIC_BOUNDS", "MomentLayout", "moment_layout"]

# Below this standard deviation (in the feature's own units) a feature is constant.
_MIN_STD = 1e-8
# Public priors of a normalized feature (u in [-1, 1]) that noised moments are combined
# with: mean 0 ± 1/2; variance (1/4)^2 ± (1/4)^2 (a standard deviation of 1/8 the range).
_PRIOR_MEAN, _PRIOR_MEAN_ERROR = 0.0, 0.5
_PRIOR_VARIANCE, _PRIOR_VARIANCE_ERROR = 0.0625, 0.0625

_BREAST_CANCER_BOUNDS = {
    # Ranges of the measures of a fine-needle aspirate of a breast mass (Street, Wolberg
    # and Mangasarian 1993), rounded outward; "mean" and "worst" per nucleus, "error" the
    # standard error over nuclei.
    "radius": ((5.0, 30.0), (0.0, 3.0), (5.0, 40.0)),
    "texture": ((5.0, 40.0), (0.0, 5.0), (10.0, 50.0)),
    "perimeter": ((40.0, 200.0), (0.0, 22.0), (50.0, 260.0)),
    "area": ((100.0, 2500.0), (0.0, 550.0), (150.0, 4300.0)),
    "smoothness": ((0.05, 0.17), (0.0, 0.032), (0.07, 0.23)),
    "compactness": ((0.0, 0.35), (0.0, 0.14), (0.0, 1.1)),
    "concavity": ((0.0, 0.45), (0.0, 0.4), (0.0, 1.3)),
    "concave points": ((0.0, 0.21), (0.0, 0.053), (0.0, 0.3)),
    "symmetry": ((0.1, 0.31), (0.0, 0.08), (0.15, 0.67)),
    "fractal dimension": ((0.045, 0.1), (0.0, 0.03), (0.05, 0.21)),
}

#: Public range of every standardized feature, per data set (feature name -> (lo, hi)).
PUBLIC_BOUNDS: Mapping[DatasetName, Mapping[str, tuple[float, float]]] = {
    DatasetName.BREAST_CANCER: {
        name: bounds
        for measure, per_kind in _BREAST_CANCER_BOUNDS.items()
        for name, bounds in zip(
            (f"mean {measure}", f"{measure} error", f"worst {measure}"), per_kind, strict=True
        )
    },
    DatasetName.DIGITS: {},  # pixels are divided by their maximum: nothing is standardized
    DatasetName.FLCHAIN: {
        # The Olmsted County serum free light chain study (Dispenzieri et al. 2012):
        # residents aged 50 and over, samples from 1995 to 2003, FLC in mg/dL.
        "age": (50.0, 100.0),
        "sample.yr": (1995.0, 2003.0),
        "kappa": (0.0, 6.0),
        "lambda": (0.0, 6.0),
        "flc.grp": (1.0, 10.0),  # decile group of the total FLC
        "creatinine": (0.0, 4.0),  # mg/dL
    },
    DatasetName.CREDIT: {
        # Consumer credit applications (modeldata::credit_data): years, months, and
        # monetary amounts in the data set's own units.
        "Seniority": (0.0, 40.0),
        "Time": (0.0, 72.0),
        "Age": (18.0, 75.0),
        "Expenses": (30.0, 180.0),
        "Income": (0.0, 500.0),
        "Assets": (0.0, 40000.0),
        "Debt": (0.0, 5000.0),
        "Amount": (0.0, 5000.0),
        "Price": (0.0, 5000.0),
    },
}


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
def moment_layout(dataset: DatasetName) -> MomentLayout:
    """The moment layout of a built-in data set, from its schema and public bounds."""
    schema = schema_for(dataset)
    bounds = PUBLIC_BOUNDS.get(dataset, {})
    names = schema.feature_names
    features = tuple(i for i, flag in enumerate(schema.standardize) if flag)
    lacking = [names[i] for i in features if names[i] not in bounds]
    if lacking:
        raise ConfigError(f"no public range for the {dataset} feature(s) {lacking}")
    lower = np.array([bounds[names[i]][0] for i in features], dtype=np.float64)
    upper = np.array([bounds[names[i]][1] for i in features], dtype=np.float64)
    if not (lower < upper).all():
        raise ConfigError(f"the public ranges of {dataset} must have lo < hi")
    missable = tuple(k for k, i in enumerate(features) if f"{names[i]}_missing" in names)
    return MomentLayout(schema, features, missable, lower, upper)
