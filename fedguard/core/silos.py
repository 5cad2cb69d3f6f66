"""Silo data: a silo's own rows split into train and test, and simulated silos.

A real silo encodes its own file (:func:`silo_from_frame`); a simulation partitions a
pooled public data set (:mod:`fedguard.core.builtin_datasets`) into silos
(:func:`simulation_silos`), each of which then encodes and splits only its own rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedguard.core.builtin_datasets import load_pooled_frame
from fedguard.core.checks import fraction
from fedguard.core.config import DatasetName, PartitionKind, PartitionSpec, RunConfig
from fedguard.core.contract import DataContract
from fedguard.core.contract_validation import ContractViolationError
from fedguard.core.data_sources import DataSource, read_table
from fedguard.core.datasets import (
    CodeBook,
    EncodedData,
    FeatureSchema,
    SiloData,
    builtin_contract,
    code_book_for,
    encode_frame,
    encode_labels,
    schema_for,
)
from fedguard.core.errors import ConfigError, DataError, PartitionError, UnknownDatasetError
from fedguard.core.partitioning import partition_indices
from fedguard.core.seeding import derive_seed, numpy_rng


def _test_size(num_rows: int, test_fraction: float) -> int:
    # ceil like scikit-learn, with a tolerance so that 0.7 * 10 counts as 7, not 8.
    return math.ceil(num_rows * test_fraction - 1e-9)


def split_train_test(
    data: EncodedData, test_fraction: float, seed: int
) -> tuple[EncodedData, EncodedData]:
    """Split rows into (train, test), stratified by label when every class has >= 2 rows.

    The test part has ``ceil(n * test_fraction)`` rows; both parts must be non-empty.
    """
    fraction("test_fraction", test_fraction)
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


@dataclass(frozen=True)
class PooledData:
    """What a simulation partitions: rows under a contract.

    ``table`` None: the packaged rows of the built-in data set the contract is named
    after (its own contract, or the consortium's edit of it); else a researcher's
    own CSV or Parquet table.
    """

    contract: DataContract
    table: Path | None = None

    @classmethod
    def of(cls, data: PooledData | DatasetName | DataContract) -> PooledData:
        if isinstance(data, PooledData):
            return data
        if isinstance(data, DataContract):
            return cls(data)
        return cls(builtin_contract(DatasetName.parse(str(data))))

    @classmethod
    def for_run(cls, config: RunConfig) -> PooledData:
        table = None if config.data_table is None else config.data_table.resolve()
        return cls(config.contract, table)

    def frame(self, keep: tuple[str, ...] = ()) -> pd.DataFrame:
        """The pooled rows: the contract's columns the table has, and ``keep``.

        ``keep``: a column to split by that the contract drops (a clinic, a state):
        it assigns rows to silos and is never encoded.
        """
        if self.table is not None:
            frame = read_table(DataSource.file(self.table))
        else:
            try:
                name = DatasetName.parse(self.contract.name)
            except UnknownDatasetError:
                raise ConfigError(
                    f"data contract {self.contract.name!r} is not a built-in data set: give "
                    "the pooled table to split across the simulated silos (--data TABLE)"
                ) from None
            frame = load_pooled_frame(name)
        frame = frame.set_axis([str(c) for c in frame.columns], axis=1)
        wanted = [
            *self.contract.raw_columns,
            *(c for c in keep if c not in self.contract.raw_columns),
        ]
        present = [c for c in wanted if c in frame.columns]
        return frame.loc[:, present].reset_index(drop=True)


def _pooled_labels(pooled: PooledData, book: CodeBook, frame: pd.DataFrame) -> np.ndarray:
    """Class indices of the pooled rows (a label-skewed partition needs them)."""
    if book.label_column not in frame.columns:
        raise DataError(f"the pooled table has no label column {book.label_column!r}")
    labels = encode_labels(book, frame[book.label_column])
    bad = int((labels < 0).sum())
    if bad:
        where = pooled.table or f"the packaged {pooled.contract.name} data"
        raise DataError(
            f"{bad} row(s) of {where} have a missing label or one outside the classes of "
            f"contract {pooled.contract.name!r}: drop or fix them before splitting"
        )
    return labels


def simulation_silos(
    data: PooledData | DatasetName | DataContract,
    num_silos: int,
    partition: PartitionSpec,
    test_fraction: float,
    seed: int,
) -> list[SiloData]:
    """Partition pooled rows into simulated silos, each with its own test set.

    The pooled frame is only used to assign rows; each silo then validates, encodes
    and splits only its own rows, with a seed derived from ``seed`` and its index.
    """
    fraction("test_fraction", test_fraction)
    pooled = PooledData.of(data)
    name = pooled.contract.name
    book = code_book_for(pooled.contract)
    schema = schema_for(pooled.contract)
    split_by = (partition.column,) if partition.column is not None else ()
    frame = pooled.frame(keep=split_by)
    labels = _pooled_labels(pooled, book, frame)
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
    contract_columns = [c for c in frame.columns if c in schema.raw_columns]
    for index, rows in enumerate(parts):
        silo_frame = frame.iloc[rows].loc[:, contract_columns]
        split_seed = derive_seed(seed, "silo", index, "split")
        try:
            silos.append(silo_from_frame(schema, silo_frame, test_fraction, split_seed))
        except (PartitionError, ContractViolationError) as error:
            # The public data meet their contracts; a partition can still leave a silo
            # too small for it (too-few-rows) or for a train/test split.
            raise PartitionError(f"silo {index}: {error}") from None
    return silos
