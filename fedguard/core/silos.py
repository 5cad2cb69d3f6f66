"""Silo data: a silo's own rows split into train and test, and simulated silos.

A real silo encodes its own file (:func:`silo_from_frame`); a simulation partitions a
pooled public data set (:mod:`fedguard.core.builtin_datasets`) into silos
(:func:`simulation_silos`), each of which then encodes and splits only its own rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedguard.core.builtin_datasets import load_pooled_frame
from fedguard.core.checks import fraction
from fedguard.core.config import DatasetName, PartitionKind, PartitionSpec
from fedguard.core.contract_validation import ContractViolationError
from fedguard.core.datasets import (
    EncodedData,
    FeatureSchema,
    SiloData,
    code_book_for,
    encode_frame,
    encode_labels,
    schema_for,
)
from fedguard.core.errors import ConfigError, PartitionError
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
    fraction("test_fraction", test_fraction)
    book = code_book_for(name)
    schema = schema_for(book.dataset)
    frame = load_pooled_frame(book.dataset)
    labels = encode_labels(book, frame[book.label_column])
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
        except (PartitionError, ContractViolationError) as error:
            # The public data meet their contracts; a partition can still leave a silo
            # too small for it (too-few-rows) or for a train/test split.
            raise PartitionError(f"silo {index}: {error}") from None
    return silos
