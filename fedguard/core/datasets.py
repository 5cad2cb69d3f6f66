"""What a built-in data set looks like to a model: its schema and fixed encoding.

The data sets themselves (sources, sizes, licences, the optional extra) are listed in
:mod:`fedguard.core.builtin_datasets`; silos and their train/test split are in
:mod:`fedguard.core.silos`, the audited cohorts of a raw column in
:mod:`fedguard.core.sensitive_groups`.

Missing values in the public data: flchain ``creatinine`` 1350; credit ``Income`` 381,
``Assets`` 47, ``Debt`` 18, ``Home`` 6, ``Job`` 2, ``Marital`` 1 (415 rows in all). Only
those columns may be missing; each gets a ``<col>_missing`` 0/1 indicator.

Encoding is data-independent, so that no silo fits anything on pooled data: categorical
columns are one-hot over the fixed code book written below (not learned from data),
two-level columns become one 0/1 feature, numeric columns stay float (NaN where
missing) and are standardized later from federated statistics
(:mod:`fedguard.core.preprocessing`), digit pixels are divided by 16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from fedguard.core.config import DatasetName
from fedguard.core.errors import DataError, DataFileNotFoundError

# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class FeatureSchema:
    """What a model sees of a data set: encoded features, classes, and the raw columns."""

    dataset: DatasetName
    feature_names: tuple[str, ...]
    standardize: tuple[bool, ...]
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    raw_columns: tuple[str, ...]
    label_column: str

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, DatasetName):
            raise DataError(f"schema dataset must be a DatasetName, got {self.dataset!r}")
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


class ColumnKind(Enum):
    NUMERIC = "numeric"  # float, standardized from federated statistics
    CATEGORICAL = "categorical"  # one-hot over the code book levels
    BINARY = "binary"  # two levels -> one 0/1 feature (1 = second level)
    PIXEL = "pixel"  # bounded intensity, divided by its maximum


@dataclass(frozen=True)
class RawColumn:
    name: str
    kind: ColumnKind
    levels: tuple[str, ...] = ()
    # Other spellings of a level seen in other exports of the same data (e.g. R's 0/1).
    aliases: tuple[tuple[str, str], ...] = ()
    may_be_missing: bool = False
    max_value: float = 0.0

    def feature_names(self) -> list[str]:
        if self.kind is ColumnKind.CATEGORICAL:
            names = [f"{self.name}={level}" for level in self.levels]
        elif self.kind is ColumnKind.BINARY:
            names = [f"{self.name}={self.levels[1]}"]
        else:
            names = [self.name]
        if self.may_be_missing:
            names.append(f"{self.name}_missing")
        return names

    def standardize_flags(self) -> list[bool]:
        flags = [self.kind is ColumnKind.NUMERIC] * (
            len(self.feature_names()) - self.may_be_missing
        )
        return flags + [False] * self.may_be_missing


@dataclass(frozen=True)
class CodeBook:
    dataset: DatasetName
    columns: tuple[RawColumn, ...]
    label_column: str
    class_names: tuple[str, ...]
    # Accepted spellings of each label value -> class index.
    label_levels: tuple[tuple[str, int], ...]
    raw_order: tuple[str, ...]  # raw columns, label included, in the data's own order
    input_shape: tuple[int, ...] | None = None
    label_map: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_map", dict(self.label_levels))


def _numeric(name: str, may_be_missing: bool = False) -> RawColumn:
    return RawColumn(name, ColumnKind.NUMERIC, may_be_missing=may_be_missing)


_BREAST_CANCER_MEASURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
# sklearn's names: "mean <m>" x10, "<m> error" x10, "worst <m>" x10.
_BREAST_CANCER_COLUMNS = (
    tuple(f"mean {m}" for m in _BREAST_CANCER_MEASURES)
    + tuple(f"{m} error" for m in _BREAST_CANCER_MEASURES)
    + tuple(f"worst {m}" for m in _BREAST_CANCER_MEASURES)
)
_DIGIT_COLUMNS = tuple(f"pixel_{row}_{col}" for row in range(8) for col in range(8))

_CREDIT_COLUMNS = (
    _numeric("Seniority"),
    RawColumn(
        "Home",
        ColumnKind.CATEGORICAL,
        ("rent", "owner", "priv", "ignore", "parents", "other"),
        may_be_missing=True,
    ),
    _numeric("Time"),
    _numeric("Age"),
    RawColumn(
        "Marital",
        ColumnKind.CATEGORICAL,
        ("single", "married", "widow", "separated", "divorced"),
        may_be_missing=True,
    ),
    RawColumn("Records", ColumnKind.BINARY, ("no", "yes")),
    RawColumn(
        "Job",
        ColumnKind.CATEGORICAL,
        ("fixed", "partime", "freelance", "others"),
        may_be_missing=True,
    ),
    _numeric("Expenses"),
    _numeric("Income", may_be_missing=True),
    _numeric("Assets", may_be_missing=True),
    _numeric("Debt", may_be_missing=True),
    _numeric("Amount"),
    _numeric("Price"),
)

_FLCHAIN_COLUMNS = (
    _numeric("age"),
    RawColumn("sex", ColumnKind.BINARY, ("F", "M")),
    _numeric("sample.yr"),
    _numeric("kappa"),
    _numeric("lambda"),
    _numeric("flc.grp"),
    _numeric("creatinine", may_be_missing=True),
    # scikit-survival spells mgus no/yes; R's survival package 0/1.
    RawColumn("mgus", ColumnKind.BINARY, ("no", "yes"), aliases=(("0", "no"), ("1", "yes"))),
)

_CODE_BOOKS: dict[DatasetName, CodeBook] = {
    DatasetName.BREAST_CANCER: CodeBook(
        dataset=DatasetName.BREAST_CANCER,
        columns=tuple(_numeric(name) for name in _BREAST_CANCER_COLUMNS),
        label_column="target",
        class_names=("malignant", "benign"),
        label_levels=(("0", 0), ("1", 1), ("malignant", 0), ("benign", 1)),
        raw_order=(*_BREAST_CANCER_COLUMNS, "target"),
    ),
    DatasetName.DIGITS: CodeBook(
        dataset=DatasetName.DIGITS,
        columns=tuple(RawColumn(name, ColumnKind.PIXEL, max_value=16.0) for name in _DIGIT_COLUMNS),
        label_column="target",
        class_names=tuple(str(digit) for digit in range(10)),
        label_levels=tuple((str(digit), digit) for digit in range(10)),
        raw_order=(*_DIGIT_COLUMNS, "target"),
        input_shape=(1, 8, 8),
    ),
    DatasetName.FLCHAIN: CodeBook(
        dataset=DatasetName.FLCHAIN,
        columns=_FLCHAIN_COLUMNS,
        label_column="death",
        class_names=("alive", "death"),
        label_levels=(("0", 0), ("1", 1)),
        raw_order=(*(column.name for column in _FLCHAIN_COLUMNS), "death"),
    ),
    DatasetName.CREDIT: CodeBook(
        dataset=DatasetName.CREDIT,
        columns=_CREDIT_COLUMNS,
        label_column="Status",
        class_names=("good", "bad"),
        label_levels=(("good", 0), ("bad", 1)),
        raw_order=("Status", *(column.name for column in _CREDIT_COLUMNS)),
    ),
}


@cache
def schema_for(name: DatasetName) -> FeatureSchema:
    """The fixed schema of a built-in data set (needs no data and no optional package)."""
    book = code_book_for(name)
    feature_names = [n for column in book.columns for n in column.feature_names()]
    standardize = [f for column in book.columns for f in column.standardize_flags()]
    return FeatureSchema(
        dataset=book.dataset,
        feature_names=tuple(feature_names),
        standardize=tuple(standardize),
        num_classes=len(book.class_names),
        class_names=book.class_names,
        input_shape=book.input_shape or (len(feature_names),),
        raw_columns=book.raw_order,
        label_column=book.label_column,
    )


def code_book_for(name: DatasetName) -> CodeBook:
    """The fixed code book of a built-in data set, by name."""
    if not isinstance(name, DatasetName):
        # Accept the plain string at this boundary too; parse raises UnknownDatasetError.
        name = DatasetName.parse(str(name))
    return _CODE_BOOKS[name]


def code_book(schema: FeatureSchema) -> CodeBook:
    """The code book of ``schema``, which must be fedguard's own schema of its data set."""
    if schema != schema_for(schema.dataset):
        raise DataError(
            f"the schema given does not match fedguard's schema of {schema.dataset}; "
            "encodings are fixed per data set: get the schema from schema_for()"
        )
    return _CODE_BOOKS[schema.dataset]


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


def load_silo_frame(path: Path, schema: FeatureSchema) -> pd.DataFrame:
    """A silo's own CSV file, reduced to ``schema.raw_columns`` (extra columns are ignored)."""
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError(
            f"silo data file {path} does not exist; check the data path given to this silo"
        )
    if not path.is_file():
        raise DataError(f"silo data path {path} is not a file; give the path of a CSV file")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"silo data file {path} is empty; it needs a header and rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"cannot read silo data file {path} as CSV: {error}") from None
    if frame.empty:
        raise DataError(f"silo data file {path} has a header but no rows")
    require_columns(schema, frame.columns, f"silo data file {path}")
    return frame.loc[:, list(schema.raw_columns)]


# ------------------------------------------------------------------------ encoding


def _level_text(value: object) -> str:
    # One spelling per value whatever the reader produced: 1, 1.0, True and "1" -> "1".
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _as_levels(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(level texts, missing mask) of a column; texts are '' where missing."""
    values = series.astype(object).to_numpy()
    missing = np.asarray(pd.isna(values), dtype=bool)
    texts = np.array(
        [
            "" if is_missing else _level_text(value)
            for value, is_missing in zip(values, missing, strict=True)
        ],
        dtype=object,
    )
    return texts, missing


def _examples(values: Iterable[object], limit: int = 5) -> str:
    unique = sorted({str(value) for value in values})
    shown = ", ".join(repr(value) for value in unique[:limit])
    return shown + (f" (and {len(unique) - limit} more)" if len(unique) > limit else "")


def _check_missing(dataset: DatasetName, column: RawColumn, missing: np.ndarray) -> None:
    if missing.any() and not column.may_be_missing:
        raise DataError(
            f"column {column.name!r} has {int(missing.sum())} missing value(s), but the "
            f"{dataset} schema allows none there; fill them in or drop those rows"
        )


def _encode_column(dataset: DatasetName, column: RawColumn, series: pd.Series) -> np.ndarray:
    """The (n, k) float64 block of one raw column, missing indicator included."""
    if column.kind in (ColumnKind.NUMERIC, ColumnKind.PIXEL):
        raw = series.astype(object)
        missing = np.asarray(pd.isna(raw), dtype=bool)
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        not_numeric = np.isnan(values) & ~missing
        if not_numeric.any():
            raise DataError(
                f"column {column.name!r} must be numeric; found "
                f"{_examples(raw.to_numpy()[not_numeric])}"
            )
        if np.isinf(values).any():
            raise DataError(f"column {column.name!r} holds infinite values; fix or drop them")
        _check_missing(dataset, column, missing)
        if column.kind is ColumnKind.PIXEL:
            outside = (values < 0) | (values > column.max_value)
            if outside.any():
                raise DataError(
                    f"column {column.name!r} must lie in [0, {column.max_value:g}]; found "
                    f"{_examples(values[outside])}"
                )
            values = values / column.max_value
        block = values[:, None]
    else:
        texts, missing = _as_levels(series)
        _check_missing(dataset, column, missing)
        aliases = dict(column.aliases)
        index_of = {level: i for i, level in enumerate(column.levels)}
        codes = np.full(texts.shape[0], -1, dtype=np.int64)
        unknown: list[str] = []
        for row, text in enumerate(texts):
            if missing[row]:
                continue
            code = index_of.get(aliases.get(text, text))
            if code is None:
                unknown.append(text)
            else:
                codes[row] = code
        if unknown:
            raise DataError(
                f"column {column.name!r} holds value(s) outside the {dataset} code book: "
                f"{_examples(unknown)}; allowed: {list(column.levels)}"
            )
        if column.kind is ColumnKind.BINARY:
            block = (codes == 1).astype(np.float64)[:, None]
        else:
            block = np.zeros((texts.shape[0], len(column.levels)), dtype=np.float64)
            present = np.flatnonzero(codes >= 0)
            block[present, codes[present]] = 1.0
    if column.may_be_missing:
        block = np.concatenate([block, missing.astype(np.float64)[:, None]], axis=1)
    return np.asarray(block, dtype=np.float64)


def encode_labels(book: CodeBook, series: pd.Series) -> np.ndarray:
    """Class indices of a label column; DataError for a missing or unknown label."""
    texts, missing = _as_levels(series)
    if missing.any():
        raise DataError(
            f"label column {book.label_column!r} has {int(missing.sum())} missing value(s); "
            "drop the rows without a label"
        )
    codes = np.array([book.label_map.get(text, -1) for text in texts], dtype=np.int64)
    unknown = texts[codes < 0]
    if unknown.size:
        raise DataError(
            f"label column {book.label_column!r} holds value(s) outside the classes of "
            f"{book.dataset}: {_examples(unknown)}; allowed: "
            f"{[level for level, _ in book.label_levels]}"
        )
    return np.asarray(codes, dtype=np.int64)


def _check_frame(schema: FeatureSchema, frame: pd.DataFrame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    require_columns(schema, frame.columns, "the data frame")
    columns = list(frame.columns)
    repeated = sorted({c for c in columns if c in schema.raw_columns and columns.count(c) > 1})
    if repeated:
        raise DataError(f"the data frame has repeated column(s) {repeated}; keep one of each")


def encode_frame(schema: FeatureSchema, frame: pd.DataFrame) -> EncodedData:
    """Encode raw rows with the data set's fixed, data-independent encoding.

    Raises DataError naming the column for a missing required column, a category
    outside the code book, a non-numeric value in a numeric column, a missing value
    where the schema allows none, a missing label or a label outside the classes.
    """
    book = code_book(schema)
    _check_frame(schema, frame)
    blocks = [_encode_column(book.dataset, column, frame[column.name]) for column in book.columns]
    features = np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float64)
    labels = encode_labels(book, frame[book.label_column])
    return EncodedData(features, labels)
