"""Standardization from federated statistics, never from pooled data.

Each silo shares only per-feature sums (:class:`FeatureStatistics`): the count of
non-missing values, their total and their total of squares. Sums add, so the server
(or a secure aggregation protocol, which can only add) combines them into exactly the
statistics of the union of all silos' training rows, and every silo then applies the
same :class:`FeatureScaler`. Mean and population standard deviation from the summed
statistics equal those computed on the concatenated data.

Missing values (NaN) are left out of the sums and imputed with the mean (0 after
scaling) by :meth:`FeatureScaler.transform`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedguard.core.checks import positive_int
from fedguard.core.datasets import EncodedData, FeatureSchema
from fedguard.core.errors import DataError

# Below this standard deviation a feature is treated as constant and left unscaled.
_MIN_STD = 1e-8
# E[x^2] - mean^2 cancels to within a few ulps of mean^2: a spread below this relative
# level cannot be told apart from zero using the sums alone.
_RELATIVE_STD_FLOOR = 1e-7


def _vector(name: str, value: object) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True)
    if array.ndim != 1:
        raise DataError(f"{name} must be a 1-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return array


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"statistic arrays differ in length: {lengths}")


def _from_mapping(
    arrays: Mapping[str, np.ndarray], keys: Sequence[str], what: str
) -> list[np.ndarray]:
    missing = [key for key in keys if key not in arrays]
    extra = sorted(set(arrays) - set(keys))
    if missing or extra:
        raise DataError(
            f"{what} arrays must have exactly the keys {list(keys)}; "
            f"missing {missing}, unexpected {extra}"
        )
    return [arrays[key] for key in keys]


@dataclass(frozen=True)
class FeatureStatistics:
    """Per-feature sufficient statistics one silo shares: sums only, no rows."""

    count: np.ndarray
    total: np.ndarray
    total_squares: np.ndarray

    def __post_init__(self) -> None:
        # Copies as float64, so that later changes to the caller's arrays cannot leak in.
        object.__setattr__(self, "count", _vector("count", self.count))
        object.__setattr__(self, "total", _vector("total", self.total))
        object.__setattr__(self, "total_squares", _vector("total_squares", self.total_squares))
        _same_length(count=self.count, total=self.total, total_squares=self.total_squares)
        if (self.count < 0).any():
            raise DataError("count must be >= 0 for every feature")
        if (self.total_squares < 0).any():
            raise DataError("total_squares must be >= 0 for every feature")

    @property
    def num_features(self) -> int:
        return int(self.count.shape[0])

    @classmethod
    def from_features(cls, data: EncodedData) -> FeatureStatistics:
        """The statistics of one silo's rows; missing values (NaN) are not counted."""
        features = data.features
        present = ~np.isnan(features)
        values = np.where(present, features, 0.0)
        return cls(
            count=present.sum(axis=0).astype(np.float64),
            total=values.sum(axis=0),
            total_squares=np.square(values).sum(axis=0),
        )

    def __add__(self, other: object) -> FeatureStatistics:
        if not isinstance(other, FeatureStatistics):
            return NotImplemented
        if other.num_features != self.num_features:
            raise DataError(
                f"cannot add statistics of {self.num_features} and {other.num_features} "
                "features: the silos do not share one schema"
            )
        return FeatureStatistics(
            count=self.count + other.count,
            total=self.total + other.total,
            total_squares=self.total_squares + other.total_squares,
        )

    @classmethod
    def sum(cls, parts: Sequence[FeatureStatistics]) -> FeatureStatistics:
        """The statistics of the union of the parts' rows."""
        if len(parts) == 0:
            raise DataError("no statistics to sum: at least one silo must report statistics")
        result = parts[0]
        for part in parts[1:]:
            result = result + part
        return result

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "count": self.count.copy(),
            "total": self.total.copy(),
            "total_squares": self.total_squares.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureStatistics:
        count, total, total_squares = _from_mapping(
            arrays, ("count", "total", "total_squares"), "feature statistics"
        )
        return cls(count=count, total=total, total_squares=total_squares)


@dataclass(frozen=True)
class FeatureScaler:
    """``(x - mean) / scale`` per feature, the same in every silo."""

    mean: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _vector("mean", self.mean))
        object.__setattr__(self, "scale", _vector("scale", self.scale))
        _same_length(mean=self.mean, scale=self.scale)
        if (self.scale <= 0).any():
            raise DataError("scale must be > 0 for every feature")

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_statistics(cls, stats: FeatureStatistics, schema: FeatureSchema) -> FeatureScaler:
        """Mean and population standard deviation of the standardized features.

        Features the schema does not standardize (one-hot, indicators, pixels) get mean
        0 and scale 1. A feature with no values gets mean 0, scale 1; a constant one
        keeps its mean and gets scale 1.
        """
        if stats.num_features != schema.num_features:
            raise DataError(
                f"statistics cover {stats.num_features} features, but the {schema.dataset} "
                f"schema has {schema.num_features}"
            )
        standardize = np.asarray(schema.standardize, dtype=bool)
        has_values = stats.count > 0
        safe_count = np.where(has_values, stats.count, 1.0)
        mean = np.where(has_values, stats.total / safe_count, 0.0)
        variance = np.maximum(stats.total_squares / safe_count - np.square(mean), 0.0)
        std = np.sqrt(variance)
        is_constant = (std < _MIN_STD) | (std < _RELATIVE_STD_FLOOR * np.abs(mean)) | ~has_values
        scale = np.where(is_constant, 1.0, std)
        return cls(
            mean=np.where(standardize, mean, 0.0),
            scale=np.where(standardize, scale, 1.0),
        )

    @classmethod
    def identity(cls, d: int) -> FeatureScaler:
        positive_int("number of features", d, error=DataError)
        return cls(mean=np.zeros(d), scale=np.ones(d))

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Scaled float32 features; missing values (NaN) become 0, i.e. the mean."""
        array = np.asarray(features, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.num_features:
            raise DataError(f"features must have shape (n, {self.num_features}), got {array.shape}")
        if np.isinf(array).any():
            raise DataError("features hold infinite values; only NaN may mark a missing value")
        scaled = (array - self.mean) / self.scale
        return np.where(np.isnan(scaled), 0.0, scaled).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.copy(), "scale": self.scale.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureScaler:
        mean, scale = _from_mapping(arrays, ("mean", "scale"), "feature scaler")
        return cls(mean=mean, scale=scale)
