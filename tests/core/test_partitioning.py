from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.core.config import PartitionKind, PartitionSpec
from fedguard.core.errors import ConfigError, PartitionError
from fedguard.core.partitioning import (
    column_partition,
    dirichlet_partition,
    iid_partition,
    partition_indices,
)

FAST = settings(max_examples=60, deadline=None)


def assert_is_partition(parts: list[np.ndarray], num_rows: int, num_silos: int) -> None:
    assert len(parts) == num_silos
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices must be sorted and unique"
    merged = np.concatenate(parts)
    assert merged.size == num_rows, "silos must be disjoint and cover all rows"
    np.testing.assert_array_equal(np.sort(merged), np.arange(num_rows))


@st.composite
def rows_and_silos(draw: st.DrawFn, max_rows: int = 300) -> tuple[int, int]:
    num_rows = draw(st.integers(1, max_rows))
    return num_rows, draw(st.integers(1, min(num_rows, 12)))


# ----------------------------------------------------------------------------- iid


@FAST
@given(shape=rows_and_silos(), seed=st.integers(0, 2**32))
def test_iid_is_a_balanced_partition(shape: tuple[int, int], seed: int) -> None:
    num_rows, num_silos = shape
    parts = iid_partition(num_rows, num_silos, np.random.default_rng(seed))
    assert_is_partition(parts, num_rows, num_silos)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_too_many_silos() -> None:
    with pytest.raises(PartitionError, match="a silo would be empty"):
        iid_partition(3, 4, np.random.default_rng(0))
    with pytest.raises(PartitionError, match=">= 1"):
        iid_partition(3, 0, np.random.default_rng(0))


# ----------------------------------------------------------------------- dirichlet


@FAST
@given(
    labels=st.lists(st.integers(0, 4), min_size=10, max_size=300),
    num_silos=st.integers(1, 5),
    alpha=st.floats(0.05, 100.0),
    min_size=st.integers(1, 3),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_is_a_partition_with_min_size(
    labels: list[int], num_silos: int, alpha: float, min_size: int, seed: int
) -> None:
    label_array = np.array(labels, dtype=np.int64)
    failure = ""
    try:
        parts = dirichlet_partition(
            label_array, num_silos, alpha, min_size, np.random.default_rng(seed)
        )
    except PartitionError as error:
        failure = str(error)
    if failure:
        # An allowed outcome for hard settings, but the message must say what to change.
        assert "use fewer silos" in failure
        return
    assert_is_partition(parts, len(labels), num_silos)
    assert min(p.size for p in parts) >= min_size


def _label_skew(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance between each silo's label mix and the global one."""
    overall = np.bincount(labels, minlength=num_classes) / labels.size
    distances = []
    for part in parts:
        mix = np.bincount(labels[part], minlength=num_classes) / part.size
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_low_alpha_skews_labels_more_than_high_alpha() -> None:
    labels = np.repeat(np.arange(10), 200)
    low, high = [], []
    for seed in range(5):
        rng_low, rng_high = np.random.default_rng(seed), np.random.default_rng(seed + 100)
        low.append(_label_skew(dirichlet_partition(labels, 10, 0.1, 5, rng_low), labels, 10))
        high.append(_label_skew(dirichlet_partition(labels, 10, 100.0, 5, rng_high), labels, 10))
    assert min(low) > 0.4
    assert max(high) < 0.1
    assert min(low) > 4 * max(high)


def test_dirichlet_impossible_min_size_says_what_to_change() -> None:
    labels = np.array([0, 1] * 250)
    with pytest.raises(PartitionError, match="raise alpha, use fewer silos, or lower"):
        dirichlet_partition(labels, 10, 0.01, 45, np.random.default_rng(0), max_attempts=20)
    with pytest.raises(PartitionError, match="cannot give 10 silos at least 60 rows"):
        dirichlet_partition(labels, 10, 1.0, 60, np.random.default_rng(0))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(PartitionError, match="alpha"):
        dirichlet_partition(np.zeros(10, dtype=np.int64), 2, alpha, 1, np.random.default_rng(0))


def test_dirichlet_rejects_non_integer_labels() -> None:
    with pytest.raises(PartitionError, match="integers"):
        dirichlet_partition(np.array([0.5, 1.0]), 1, 1.0, 1, np.random.default_rng(0))


# -------------------------------------------------------------------------- column


@FAST
@given(
    values=st.lists(st.sampled_from(["a", "b", "c", "d", "e", None]), min_size=1, max_size=200),
    data=st.data(),
)
def test_column_partition_groups_rows_by_value(
    values: list[str | None], data: st.DataObject
) -> None:
    array = np.array(values, dtype=object)
    distinct = len(set(values))
    num_silos = data.draw(st.integers(1, distinct))
    parts = column_partition(array, num_silos)
    assert_is_partition(parts, len(values), num_silos)
    # A value's rows never straddle two silos.
    silo_of_value: dict[str | None, int] = {}
    for silo, part in enumerate(parts):
        assert part.size > 0
        for row in part:
            assert silo_of_value.setdefault(values[row], silo) == silo


def test_column_partition_packs_largest_group_onto_smallest_silo() -> None:
    values = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 1)
    parts = column_partition(values, 2)
    # a (5) -> silo 0; b (3) -> silo 1; c (2) -> silo 1 (3 < 5); d (1) -> tie at 5, silo 0.
    np.testing.assert_array_equal(parts[0], np.r_[0:5, 10])
    np.testing.assert_array_equal(parts[1], np.r_[5:10])


def test_column_partition_is_deterministic_with_numeric_and_missing_values() -> None:
    values = np.array([1.0, np.nan, 2.0, np.nan, 1.0, 3.0])
    first = column_partition(values, 3)
    assert_is_partition(first, 6, 3)
    for other in (column_partition(values.copy(), 3), column_partition(values, 3)):
        for a, b in zip(first, other, strict=True):
            np.testing.assert_array_equal(a, b)
    # NaNs form one group: rows 1 and 3 share a silo.
    assert any({1, 3} <= set(part.tolist()) for part in first)


def test_column_partition_needs_enough_distinct_values() -> None:
    with pytest.raises(PartitionError, match="2 distinct values, fewer than the 3 silos"):
        column_partition(np.array(["F", "M", "F", "M"]), 3)


# ---------------------------------------------------------------- partition_indices


@FAST
@given(
    kind=st.sampled_from(list(PartitionKind)),
    labels=st.lists(st.integers(0, 2), min_size=20, max_size=200),
    num_silos=st.integers(1, 4),
    seed=st.integers(0, 2**40),
)
def test_partition_indices_properties(
    kind: PartitionKind, labels: list[int], num_silos: int, seed: int
) -> None:
    label_array = np.array(labels, dtype=np.int64)
    column = np.arange(len(labels)) % 7
    spec = PartitionSpec(
        kind,
        alpha=1.0 if kind is PartitionKind.DIRICHLET else None,
        column="site" if kind is PartitionKind.COLUMN else None,
        min_silo_size=1,
    )
    parts = partition_indices(spec, label_array, num_silos, seed, column_values=column)
    assert_is_partition(parts, len(labels), num_silos)
    again = partition_indices(spec, label_array, num_silos, seed, column_values=column)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec_text", ["iid", "dirichlet:1.0"])
def test_partition_indices_depends_on_seed(spec_text: str) -> None:
    labels = np.repeat(np.arange(3), 300)
    spec = PartitionSpec.parse(spec_text, min_silo_size=5)
    first = partition_indices(spec, labels, 4, seed=1)
    same = partition_indices(spec, labels, 4, seed=1)
    other = partition_indices(spec, labels, 4, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, same, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_partition_indices_names_the_too_small_silo() -> None:
    labels = np.zeros(103, dtype=np.int64)
    column = np.array(["big"] * 100 + ["tiny"] * 3)
    spec = PartitionSpec.parse("column:site", min_silo_size=10)
    with pytest.raises(PartitionError, match=r"silo 1 only 3 rows, fewer than min_silo_size=10"):
        partition_indices(spec, labels, 2, 0, column_values=column)


def test_partition_indices_empty_silo_is_a_clear_error() -> None:
    spec = PartitionSpec.parse("iid", min_silo_size=1)
    with pytest.raises(PartitionError, match="a silo would be empty"):
        partition_indices(spec, np.zeros(3, dtype=np.int64), 5, 0)
    with pytest.raises(PartitionError, match=">= 1"):
        partition_indices(spec, np.zeros(3, dtype=np.int64), 0, 0)


def test_partition_indices_iid_min_size() -> None:
    spec = PartitionSpec.parse("iid", min_silo_size=30)
    with pytest.raises(PartitionError, match="fewer than min_silo_size=30"):
        partition_indices(spec, np.zeros(100, dtype=np.int64), 4, 0)
    parts = partition_indices(spec, np.zeros(120, dtype=np.int64), 4, 0)
    assert [p.size for p in parts] == [30, 30, 30, 30]


def test_partition_indices_column_needs_values() -> None:
    spec = PartitionSpec.parse("column:site", min_silo_size=1)
    with pytest.raises(ConfigError, match="needs the values of column 'site'"):
        partition_indices(spec, np.zeros(10, dtype=np.int64), 2, 0)
    with pytest.raises(PartitionError, match="same rows"):
        partition_indices(spec, np.zeros(10, dtype=np.int64), 2, 0, column_values=np.zeros(9))
