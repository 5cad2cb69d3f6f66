"""What a data set looks like to a model: its schema and encoding, read off its contract.

Every data set, built-in or a consortium's own, is described by a data contract
(:mod:`fedguard.core.contract`); the built-ins' are ``fedguard/core/contracts/*.toml``.
The data sets themselves (sources, sizes, licences, the optional extra) are listed in
:mod:`fedguard.core.builtin_datasets`; silos and their train/test split are in
:mod:`fedguard.core.silos`, the audited cohorts of a raw column in
:mod:`fedguard.core.sensitive_groups`.

Missing values in the public data: flchain ``creatinine`` 1350; credit ``Income`` 381,
``Assets`` 47, ``Debt`` 18, ``Home`` 6, ``Job`` 2, ``Marital`` 1 (415 rows in all). Only
those columns may be missing (their contracts say ``impute = "indicator"``); each gets
a ``<col>_missing`` 0/1 indicator.

Encoding is data-independent, so that no silo fits anything on pooled data: a table is
first validated against the contract (:mod:`fedguard.core.contract_validation`), then
categorical columns are one-hot over the contract's categories (not learned from
data), binary columns become one 0/1 feature, numeric and integer columns stay float
(NaN where missing) and are standardized later from federated statistics
(:mod:`fedguard.core.preprocessing`), and ``divide-by-max`` columns (digit pixels) are
divided by the contract's maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from fedguard.core.config import DatasetName
from fedguard.core.contract import (
    ColumnType,
    ContractColumn,
    DataContract,
    Scaling,
    Task,
    packaged_contract,
)
from fedguard.core.contract_validation import (
    ContractViolationError,
    ValidationReport,
    category_codes,
    missing_mask,
    numeric_values,
    validate_frame,
)
from fedguard.core.data_sources import DataSource, read_table
from fedguard.core.errors import DataError

# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class FeatureSchema:
    """What a model sees of a data set: encoded features, classes, and the raw columns.

    Derived from the data set's contract alone (:func:`schema_for`); the contract
    travels with it, so that whoever holds a schema can encode, validate and
    compare by the contract's hash.
    """

    contract: DataContract
    feature_names: tuple[str, ...]
    standardize: tuple[bool, ...]
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    raw_columns: tuple[str, ...]
    label_column: str

    def __post_init__(self) -> None:
        if not isinstance(self.contract, DataContract):
            raise DataError(f"a schema needs its DataContract, got {self.contract!r}")
        if not self.input_shape or any(
            not isinstance(size, int) or size < 1 for size in self.input_shape
        ):
            raise DataError(f"input_shape must be positive integers, got {self.input_shape!r}")
        if len(self.feature_names) != self.num_features:
            raise DataError(
                f"{len(self.feature_names)} feature names do not fit input_shape "
                f"{self.input_shape} ({self.num_features} features)"
            )
        if len(self.standardize) != self.num_features:
            raise DataError(
                f"standardize has {len(self.standardize)} flags for {self.num_features} features"
            )
        _require_unique("feature names", self.feature_names)
        _require_unique("raw columns", self.raw_columns)
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise DataError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"{len(self.class_names)} class names for num_classes={self.num_classes}"
            )
        if self.label_column not in self.raw_columns:
            raise DataError(f"label column {self.label_column!r} is not among the raw columns")

    @property
    def dataset(self) -> str:
        """The data set's name: its contract's (``credit``, ``covid-testing``)."""
        return self.contract.name

    @property
    def contract_hash(self) -> str:
        return self.contract.content_hash()

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2


def _require_unique(what: str, names: Sequence[str]) -> None:
    duplicates = sorted({name for name in names if list(names).count(name) > 1})
    if duplicates:
        raise DataError(f"{what} must be unique; repeated: {duplicates}")


@dataclass(frozen=True)
class EncodedData:
    """Encoded rows of one data set: float64 features (NaN = missing) and int64 labels."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.features, np.ndarray) or not isinstance(self.labels, np.ndarray):
            raise DataError("features and labels must be numpy arrays")
        if self.features.dtype != np.float64 or self.features.ndim != 2:
            raise DataError(
                f"features must be a float64 (n, d) array, got {self.features.dtype} "
                f"with shape {self.features.shape}"
            )
        if self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise DataError(
                f"labels must be an int64 (n,) array, got {self.labels.dtype} "
                f"with shape {self.labels.shape}"
            )
        if self.features.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"{self.features.shape[0]} feature rows but {self.labels.shape[0]} labels"
            )
        if np.isinf(self.features).any():
            raise DataError("features hold infinite values")
        if self.labels.size and self.labels.min() < 0:
            raise DataError("labels must be class indices >= 0")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, rows: np.ndarray) -> EncodedData:
        """The rows at the given indices, as a new EncodedData."""
        return EncodedData(self.features[rows], self.labels[rows])


@dataclass(frozen=True)
class SiloData:
    """One silo's encoded data with its own held-out test set."""

    schema: FeatureSchema
    train: EncodedData
    test: EncodedData

    def __post_init__(self) -> None:
        for part_name, part in (("train", self.train), ("test", self.test)):
            if part.features.shape[1] != self.schema.num_features:
                raise DataError(
                    f"{part_name} data has {part.features.shape[1]} features; schema of "
                    f"{self.schema.dataset} has {self.schema.num_features}"
                )
            if part.labels.size and part.labels.max() >= self.schema.num_classes:
                raise DataError(
                    f"{part_name} labels exceed the {self.schema.num_classes} classes of "
                    f"{self.schema.dataset}"
                )


# ------------------------------------------------------------------------ code books
# A code book is a built-in data set's contract seen as an encoding: the contract
# (fedguard/core/contracts/<name>.toml) is the only place columns are described.


def builtin_contract(name: DatasetName) -> DataContract:
    """The data contract of a built-in data set (shipped with fedguard)."""
    return packaged_contract(DatasetName.parse(str(name)).value)


@dataclass(frozen=True)
class CodeBook:
    """How a data set's raw columns become features, read off its contract."""

    contract: DataContract

    @property
    def dataset(self) -> str:
        return self.contract.name

    @property
    def columns(self) -> tuple[ContractColumn, ...]:
        return self.contract.columns

    @property
    def label_column(self) -> str:
        return self.contract.label.column

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.contract.label.classes


def column_feature_names(column: ContractColumn) -> list[str]:
    """The encoded feature names of one contract column, missing flag included."""
    if column.type is ColumnType.CATEGORICAL:
        names = [f"{column.name}={level}" for level in column.categories]
    elif column.type is ColumnType.BINARY:
        names = [f"{column.name}={column.categories[1]}"]
    else:
        names = [column.name]
    if column.may_be_missing:
        names.append(f"{column.name}_missing")
    return names


def _standardize_flags(column: ContractColumn) -> list[bool]:
    standardized = not column.is_categorical and column.scaling is Scaling.STANDARDIZE
    flags = [standardized] * (len(column_feature_names(column)) - column.may_be_missing)
    return flags + [False] * column.may_be_missing


@cache
def schema_from_contract(contract: DataContract) -> FeatureSchema:
    """The feature schema a contract defines (classification tasks only, for now)."""
    if contract.label.task is Task.REGRESSION:
        raise DataError(
            f"contract {contract.name!r} has a regression label; fedguard trains "
            "classification models only so far (regression is not done)"
        )
    feature_names = [n for column in contract.columns for n in column_feature_names(column)]
    standardize = [f for column in contract.columns for f in _standardize_flags(column)]
    return FeatureSchema(
        contract=contract,
        feature_names=tuple(feature_names),
        standardize=tuple(standardize),
        num_classes=contract.label.num_classes,
        class_names=contract.label.classes,
        input_shape=contract.input_shape or (len(feature_names),),
        raw_columns=contract.raw_columns,
        label_column=contract.label.column,
    )


def schema_for(data: DatasetName | DataContract) -> FeatureSchema:
    """The schema of a contract, or of a built-in data set by name (needs no data)."""
    if isinstance(data, DataContract):
        return schema_from_contract(data)
    # Accept the plain string at this boundary too; parse raises UnknownDatasetError.
    return schema_from_contract(builtin_contract(DatasetName.parse(str(data))))


def code_book_for(data: DatasetName | DataContract) -> CodeBook:
    """The code book of a contract, or of a built-in data set by name."""
    if isinstance(data, DataContract):
        return CodeBook(data)
    return CodeBook(builtin_contract(DatasetName.parse(str(data))))


def code_book(schema: FeatureSchema) -> CodeBook:
    """The code book of ``schema``, which must be the schema its own contract defines."""
    if schema != schema_from_contract(schema.contract):
        raise DataError(
            f"the schema given does not match the schema of data contract {schema.dataset!r}; "
            "encodings are fixed by the contract: get the schema from schema_for()"
        )
    return CodeBook(schema.contract)


# ------------------------------------------------------------------------ silo files


def require_columns(schema: FeatureSchema, present: Iterable[object], where: str) -> None:
    """Raise DataError naming ``where`` unless ``present`` holds every raw column."""
    present_names = {str(column) for column in present}
    missing = [column for column in schema.raw_columns if column not in present_names]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {missing} that the {schema.dataset} schema needs; "
            f"required columns: {list(schema.raw_columns)}"
        )


def load_silo_frame(source: DataSource | Path, schema: FeatureSchema) -> pd.DataFrame:
    """A silo's own table (CSV, Parquet or SQL), reduced to the contract's columns.

    Columns the contract does not name are dropped here and never read further; a
    contract column the table lacks is left for validation to report with the rest.
    """
    if not isinstance(source, DataSource):
        source = DataSource.file(Path(source))
    frame = read_table(source)
    present = {str(column) for column in frame.columns}
    frame = frame.set_axis([str(column) for column in frame.columns], axis=1)
    return frame.loc[:, [c for c in schema.raw_columns if c in present]]


# ------------------------------------------------------------------------ encoding
# Encoding runs only on a table that passed the contract (validate_frame), so it
# has no error paths of its own: every check lives in one place.


def _encode_column(column: ContractColumn, series: pd.Series) -> np.ndarray:
    """The (n, k) float64 block of one validated column, missing flag included."""
    missing = missing_mask(series)
    if column.is_categorical:
        codes, _ = category_codes(column.categories, column.aliases, series, missing)
        if column.type is ColumnType.BINARY:
            block = (codes == 1).astype(np.float64)[:, None]
        else:
            block = np.zeros((len(series), len(column.categories)), dtype=np.float64)
            present = np.flatnonzero(codes >= 0)
            block[present, codes[present]] = 1.0
    else:
        values, _ = numeric_values(series, missing)
        if column.scaling is Scaling.DIVIDE_BY_MAX and column.maximum is not None:
            values = values / column.maximum
        block = values[:, None]
    if column.may_be_missing:
        block = np.concatenate([block, missing.astype(np.float64)[:, None]], axis=1)
    return np.asarray(block, dtype=np.float64)


def encode_labels(book: CodeBook, series: pd.Series) -> np.ndarray:
    """Class indices of a validated label column."""
    label = book.contract.label
    codes, _ = category_codes(label.classes, label.aliases, series, missing_mask(series))
    return np.asarray(codes, dtype=np.int64)


def check_frame(
    contract: DataContract, frame: pd.DataFrame, *, whole_table: bool = True
) -> ValidationReport:
    """Validate ``frame`` against ``contract``; ContractViolationError if it breaks it."""
    report = validate_frame(contract, frame, whole_table=whole_table)
    if not report.ok:
        raise ContractViolationError(report)
    return report


def encode_frame(
    schema: FeatureSchema, frame: pd.DataFrame, *, whole_table: bool = True
) -> EncodedData:
    """Validate raw rows against the data set's contract, then encode them.

    Raises ContractViolationError (a DataError) naming each violated check, its
    column and its count (:mod:`fedguard.core.contract_validation`).
    ``whole_table=False``: records checked one by one (see ``validate_frame``).
    """
    book = code_book(schema)
    check_frame(book.contract, frame, whole_table=whole_table)
    frame = frame.set_axis([str(c) for c in frame.columns], axis=1)
    blocks = [_encode_column(column, frame[column.name]) for column in book.columns]
    features = np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float64)
    labels = encode_labels(book, frame[book.label_column])
    return EncodedData(features, labels)
