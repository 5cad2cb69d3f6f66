"""Splitting a pooled data set's rows across simulated silos.

Pure functions: each takes row labels (or a column's values) and returns one array of
row indices per silo. Every returned array is sorted int64; silos are disjoint and
together cover every row exactly once.

* ``iid``: a uniform random split into near-equal parts.
* ``dirichlet``: label skew after Hsu, Qi and Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification" (2019): for each
  class, the silos' shares are drawn from Dir(alpha, ..., alpha). Small alpha gives
  silos dominated by few classes; large alpha approaches iid.
* ``column``: a natural split, one group of rows per distinct value of a column (a
  hospital, a region), groups packed onto silos largest-first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedguard.core.checks import positive_int
from fedguard.core.config import PartitionKind, PartitionSpec
from fedguard.core.errors import ConfigError, PartitionError
from fedguard.core.seeding import numpy_rng


def _check_num_silos(num_silos: int, num_rows: int) -> None:
    if isinstance(num_silos, bool) or not isinstance(num_silos, (int, np.integer)):
        raise PartitionError(f"number of silos must be an integer, got {num_silos!r}")
    if num_silos < 1:
        raise PartitionError(f"number of silos must be >= 1, got {num_silos}")
    if num_silos > num_rows:
        raise PartitionError(
            f"cannot split {num_rows} rows across {num_silos} silos: a silo would be empty; "
            f"use at most {num_rows} silos"
        )


def _check_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise PartitionError(f"labels must be integers, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise PartitionError("labels must be >= 0 (class indices)")
    return array.astype(np.int64, copy=False)


def _sorted_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def iid_partition(num_rows: int, num_silos: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniform random split of ``range(num_rows)``; silo sizes differ by at most one."""
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
        raise PartitionError(f"number of rows must be an integer >= 0, got {num_rows!r}")
    _check_num_silos(num_silos, num_rows)
    order = rng.permutation(num_rows)
    return _sorted_parts(np.array_split(order, num_silos))


def dirichlet_partition(
    labels: np.ndarray,
    num_silos: int,
    alpha: float,
    min_silo_size: int,
    rng: np.random.Generator,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class's rows are shared out by proportions ~ Dir(alpha).

    Draws are repeated until every silo holds at least ``min_silo_size`` rows.
    """
    label_array = _check_labels(labels)
    num_rows = int(label_array.size)
    _check_num_silos(num_silos, num_rows)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    positive_int("min_silo_size", min_silo_size, error=PartitionError)
    positive_int("max_attempts", max_attempts, error=PartitionError)
    if num_silos * min_silo_size > num_rows:
        raise PartitionError(
            f"{num_rows} rows cannot give {num_silos} silos at least {min_silo_size} rows each; "
            "use fewer silos or a lower min_silo_size"
        )

    class_rows = [np.flatnonzero(label_array == c) for c in np.unique(label_array)]
    smallest_seen = 0
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_silos)]
        for rows in class_rows:
            shuffled = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_silos, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * shuffled.size).astype(np.int64)
            for silo, chunk in enumerate(np.split(shuffled, cuts)):
                parts[silo].append(chunk)
        merged = [np.concatenate(chunks) for chunks in parts]
        sizes = [chunk.size for chunk in merged]
        if min(sizes) >= min_silo_size:
            return _sorted_parts(merged)
        smallest_seen = max(smallest_seen, min(sizes))
    raise PartitionError(
        f"dirichlet partition (alpha={alpha:g}) of {num_rows} rows into {num_silos} silos left "
        f"a silo with fewer than {min_silo_size} rows in all {max_attempts} attempts (best "
        f"smallest silo: {smallest_seen} rows); raise alpha, use fewer silos, or lower "
        "min_silo_size"
    )


def column_partition(values: np.ndarray, num_silos: int) -> list[np.ndarray]:
    """Natural split: rows grouped by value, groups packed largest-first onto the smallest silo.

    Deterministic: ties between equal-sized groups go by first appearance in ``values``,
    ties between equal-sized silos to the lower silo index. Missing values form one group.
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise PartitionError(f"column values must be a 1-D array, got shape {array.shape}")
    num_rows = int(array.size)
    _check_num_silos(num_silos, num_rows)
    # factorize numbers groups in order of first appearance and treats NaN as one group.
    codes, uniques = pd.factorize(array, use_na_sentinel=False)
    num_groups = len(uniques)
    if num_groups < num_silos:
        raise PartitionError(
            f"the column has {num_groups} distinct values, fewer than the {num_silos} silos "
            f"asked for; use at most {num_groups} silos or another column"
        )
    groups = [np.flatnonzero(codes == g) for g in range(num_groups)]
    # Stable sort on size only, so equal sizes keep first-appearance order.
    order = sorted(range(num_groups), key=lambda g: -groups[g].size)
    assigned: list[list[np.ndarray]] = [[] for _ in range(num_silos)]
    sizes = [0] * num_silos
    for g in order:
        target = min(range(num_silos), key=lambda s: (sizes[s], s))
        assigned[target].append(groups[g])
        sizes[target] += groups[g].size
    return _sorted_parts([np.concatenate(chunks) for chunks in assigned])


def partition_indices(
    spec: PartitionSpec,
    labels: np.ndarray,
    num_silos: int,
    seed: int,
    column_values: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split rows as ``spec`` says, then check every silo has ``spec.min_silo_size`` rows."""
    label_array = _check_labels(labels)
    num_rows = int(label_array.size)
    _check_num_silos(num_silos, num_rows)
    rng = numpy_rng(seed, "partition", spec.kind.value)

    if spec.kind is PartitionKind.IID:
        parts = iid_partition(num_rows, num_silos, rng)
    elif spec.kind is PartitionKind.DIRICHLET:
        if spec.alpha is None:  # PartitionSpec forbids this; checked for the type checker
            raise ConfigError("dirichlet partition needs alpha")
        parts = dirichlet_partition(label_array, num_silos, spec.alpha, spec.min_silo_size, rng)
    else:
        if column_values is None:
            raise ConfigError(
                f"partition {spec} needs the values of column {spec.column!r}; none were given"
            )
        column_array = np.asarray(column_values)
        if column_array.shape != (num_rows,):
            raise PartitionError(
                f"column {spec.column!r} has shape {column_array.shape}, but there are "
                f"{num_rows} labels; they must describe the same rows"
            )
        try:
            parts = column_partition(column_array, num_silos)
        except PartitionError as error:
            raise PartitionError(f"partition {spec}: {error}") from None

    for silo, part in enumerate(parts):
        if part.size < spec.min_silo_size:
            raise PartitionError(
                f"partition {spec} gives silo {silo} only {part.size} rows, fewer than "
                f"min_silo_size={spec.min_silo_size} (silo sizes: {[p.size for p in parts]}); "
                "use fewer silos, another partition, or a lower min_silo_size"
            )
    return parts
