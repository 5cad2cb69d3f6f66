"""Sensitive groups: the cohorts of one raw column, read back from encoded features."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fedguard.core.config import DatasetName
from fedguard.core.contract import ColumnType, Scaling
from fedguard.core.datasets import FeatureSchema, code_book, column_feature_names
from fedguard.core.errors import ConfigError, DataError

# Age bands used when a numeric age column is audited without explicit bands.
_DEFAULT_BANDS: dict[tuple[str, str], tuple[float, ...]] = {
    (DatasetName.FLCHAIN, "age"): (60.0, 70.0, 80.0),
    (DatasetName.CREDIT, "Age"): (30.0, 40.0, 50.0),
}


class GroupKind(StrEnum):
    BINARY = "binary"
    CATEGORICAL = "categorical"
    NUMERIC = "numeric"


@dataclass(frozen=True)
class SensitiveGroups:
    """Cohorts of one raw column, read back from the encoded features.

    The fixed encoding keeps every raw column recoverable: a binary column is its
    0/1 feature, a categorical one its one-hot block, a numeric one its raw value
    (standardization happens later). Numeric columns are cut into ``bands``
    (left-closed intervals). Rows whose value is missing form the group
    ``missing`` when the column may be missing.
    """

    attribute: str
    names: tuple[str, ...]
    columns: tuple[int, ...]  # feature indices holding the column (missing indicator last)
    kind: GroupKind
    bands: tuple[float, ...] = ()
    unit: float = 1.0  # raw value = feature value x unit (pixels are stored divided)
    has_missing: bool = False

    @property
    def num_groups(self) -> int:
        return len(self.names)

    def assign(self, features: np.ndarray) -> np.ndarray:
        """Group index (0 .. num_groups - 1) of each encoded row."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or (x.shape[1] <= max(self.columns)):
            raise DataError(f"features of shape {x.shape} do not hold column {self.attribute!r}")
        missing_group = self.num_groups - 1
        if self.kind is GroupKind.BINARY:
            codes = (x[:, self.columns[0]] > 0.5).astype(np.int64)
        elif self.kind is GroupKind.CATEGORICAL:
            k = self.num_groups - self.has_missing
            block = x[:, list(self.columns[:k])]
            codes = np.argmax(block, axis=1).astype(np.int64)
            if self.has_missing:
                codes[block.max(axis=1) < 0.5] = missing_group
        else:
            raw = x[:, self.columns[0]] * self.unit
            codes = np.searchsorted(np.asarray(self.bands), raw, side="right").astype(np.int64)
            if self.has_missing:
                codes[np.isnan(raw)] = missing_group
        return codes


def sensitive_groups(
    schema: FeatureSchema, attribute: str, bands: Sequence[float] = ()
) -> SensitiveGroups:
    """The cohorts of raw column ``attribute`` of a built-in data set.

    Raises ConfigError naming the columns that exist when the data set has no such
    column, when bands are given for a categorical column, or when a numeric column
    has no bands (and no default).
    """
    book = code_book(schema)
    columns = {column.name: column for column in book.columns}
    if attribute not in columns:
        raise ConfigError(
            f"the {schema.dataset} data set has no column {attribute!r} to audit; its columns: "
            f"{[column.name for column in book.columns]}"
        )
    column = columns[attribute]
    features = column_feature_names(column)
    first = schema.feature_names.index(features[0])
    indices = tuple(range(first, first + len(features)))
    missing = ("missing",) if column.may_be_missing else ()
    if column.is_categorical:
        if bands:
            raise ConfigError(f"column {attribute!r} is categorical; it takes no bands")
        kind = GroupKind.BINARY if column.type is ColumnType.BINARY else GroupKind.CATEGORICAL
        return SensitiveGroups(
            attribute,
            (*column.categories, *missing),
            indices,
            kind,
            has_missing=column.may_be_missing,
        )
    cuts = tuple(float(b) for b in bands) or _DEFAULT_BANDS.get((book.dataset, attribute), ())
    if not cuts:
        raise ConfigError(
            f"column {attribute!r} is numeric: give the band edges to audit it by "
            f'(for example fairness-bands = "40,60")'
        )
    if not all(math.isfinite(b) for b in cuts) or any(b >= c for b, c in itertools.pairwise(cuts)):
        raise ConfigError(f"band edges must be finite and strictly increasing, got {cuts}")
    names = (
        f"{attribute}<{cuts[0]:g}",
        *(f"{lo:g}<={attribute}<{hi:g}" for lo, hi in itertools.pairwise(cuts)),
        f"{attribute}>={cuts[-1]:g}",
        *missing,
    )
    scaled = column.scaling is Scaling.DIVIDE_BY_MAX and column.maximum is not None
    unit = column.maximum if scaled and column.maximum is not None else 1.0
    return SensitiveGroups(
        attribute, names, indices, GroupKind.NUMERIC, cuts, unit, has_missing=column.may_be_missing
    )
