from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.core.config import DatasetName, PartitionSpec
from fedguard.core.datasets import EncodedData, FeatureSchema, builtin_contract, schema_for
from fedguard.core.errors import DataError
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.silos import simulation_silos


def make_schema(standardize: list[bool]) -> FeatureSchema:
    d = len(standardize)
    return FeatureSchema(
        contract=builtin_contract(DatasetName.BREAST_CANCER),
        feature_names=tuple(f"f{i}" for i in range(d)),
        standardize=tuple(standardize),
        num_classes=2,
        class_names=("a", "b"),
        input_shape=(d,),
        raw_columns=(*(f"f{i}" for i in range(d)), "y"),
        label_column="y",
    )


def encoded(features: np.ndarray) -> EncodedData:
    return EncodedData(features, np.zeros(features.shape[0], dtype=np.int64))


# Values on a 1/8 grid: a non-constant column then has a standard deviation far above the
# 1e-8 "constant" threshold, so the expected scale is unambiguous.
grid_value = st.one_of(
    st.integers(-8000, 8000).map(lambda k: k / 8.0),
    st.just(float("nan")),
)


@st.composite
def silos_of_features(draw: st.DrawFn) -> tuple[list[np.ndarray], list[bool]]:
    d = draw(st.integers(1, 4))
    num_silos = draw(st.integers(1, 4))
    parts = []
    for _ in range(num_silos):
        rows = draw(st.integers(0, 12))
        values = draw(st.lists(grid_value, min_size=rows * d, max_size=rows * d))
        parts.append(np.array(values, dtype=np.float64).reshape(rows, d))
    standardize = draw(st.lists(st.booleans(), min_size=d, max_size=d))
    return parts, standardize


def pooled_mean_and_scale(
    pooled: np.ndarray, standardize: list[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """What a centralized scaler would compute on the concatenated rows (reference)."""
    d = pooled.shape[1]
    mean, scale = np.zeros(d), np.ones(d)
    for j in range(d):
        column = pooled[:, j][~np.isnan(pooled[:, j])]
        if not standardize[j] or column.size == 0:
            continue
        mean[j] = column.mean()
        std = column.std()  # population standard deviation
        scale[j] = std if std > 0 else 1.0
    return mean, scale


@settings(max_examples=150, deadline=None)
@given(case=silos_of_features())
def test_federated_statistics_are_exact(case: tuple[list[np.ndarray], list[bool]]) -> None:
    parts, standardize = case
    schema = make_schema(standardize)
    summed = FeatureStatistics.sum([FeatureStatistics.from_features(encoded(p)) for p in parts])
    pooled = np.concatenate(parts)
    np.testing.assert_array_equal(summed.count, (~np.isnan(pooled)).sum(axis=0))

    scaler = FeatureScaler.from_statistics(summed, schema)
    expected_mean, expected_scale = pooled_mean_and_scale(pooled, standardize)
    np.testing.assert_allclose(scaler.mean, expected_mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scaler.scale, expected_scale, rtol=1e-6, atol=1e-9)

    # Same result as statistics of the pooled rows, whatever the order of the silos.
    direct = FeatureStatistics.from_features(encoded(pooled))
    reversed_sum = FeatureStatistics.sum(
        [FeatureStatistics.from_features(encoded(p)) for p in reversed(parts)]
    )
    for stats in (direct, reversed_sum):
        np.testing.assert_allclose(stats.total, summed.total, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(stats.total_squares, summed.total_squares, rtol=1e-12)

    transformed = scaler.transform(pooled)
    assert transformed.dtype == np.float32
    expected = np.where(np.isnan(pooled), 0.0, (pooled - expected_mean) / expected_scale)
    np.testing.assert_allclose(transformed, expected, rtol=1e-5, atol=1e-5)


def test_statistics_of_known_values() -> None:
    data = encoded(np.array([[1.0, np.nan], [3.0, 4.0], [5.0, np.nan]]))
    stats = FeatureStatistics.from_features(data)
    np.testing.assert_array_equal(stats.count, [3.0, 1.0])
    np.testing.assert_array_equal(stats.total, [9.0, 4.0])
    np.testing.assert_array_equal(stats.total_squares, [35.0, 16.0])
    scaler = FeatureScaler.from_statistics(stats, make_schema([True, True]))
    np.testing.assert_allclose(scaler.mean, [3.0, 4.0])
    np.testing.assert_allclose(scaler.scale, [np.sqrt(8 / 3), 1.0])  # 2nd: one value, std 0
    # Missing values are imputed with the mean, i.e. 0 after scaling.
    np.testing.assert_allclose(
        scaler.transform(data.features)[:, 1], np.array([0.0, 0.0, 0.0], dtype=np.float32)
    )


def test_non_standardized_and_empty_features_are_left_alone() -> None:
    stats = FeatureStatistics.from_features(encoded(np.array([[np.nan, 1.0], [np.nan, 0.0]])))
    scaler = FeatureScaler.from_statistics(stats, make_schema([True, False]))
    np.testing.assert_array_equal(scaler.mean, [0.0, 0.0])
    np.testing.assert_array_equal(scaler.scale, [1.0, 1.0])


def test_constant_feature_with_large_mean_is_not_blown_up() -> None:
    # E[x^2] - mean^2 cancels imperfectly for values near 1997: must not yield a tiny scale.
    values = np.full((1000, 1), 1997.3)
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(encoded(values))] * 7)
    scaler = FeatureScaler.from_statistics(stats, make_schema([True]))
    assert scaler.scale[0] == 1.0
    assert np.abs(scaler.transform(values)).max() < 1e-6


def test_scaler_on_real_silos_standardizes_the_union() -> None:
    schema = schema_for(DatasetName.FLCHAIN)
    silos = simulation_silos(DatasetName.FLCHAIN, 4, PartitionSpec.parse("dirichlet:1"), 0.2, 3)
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos])
    scaler = FeatureScaler.from_statistics(stats, schema)
    union = np.concatenate([s.train.features for s in silos])
    scaled = scaler.transform(union).astype(np.float64)
    for j, standardize in enumerate(schema.standardize):
        present = ~np.isnan(union[:, j])
        if standardize:
            assert abs(scaled[present, j].mean()) < 1e-4
            assert abs(scaled[present, j].std() - 1.0) < 1e-4
        else:
            np.testing.assert_array_equal(scaled[:, j], union[:, j])


def test_statistics_add_and_sum_errors() -> None:
    two = FeatureStatistics.from_features(encoded(np.ones((3, 2))))
    three = FeatureStatistics.from_features(encoded(np.ones((3, 3))))
    with pytest.raises(DataError, match="2 and 3 features"):
        _ = two + three
    with pytest.raises(DataError, match="no statistics to sum"):
        FeatureStatistics.sum([])
    np.testing.assert_array_equal((two + two).count, [6.0, 6.0])


def test_statistics_arrays_round_trip_and_validation() -> None:
    stats = FeatureStatistics.from_features(encoded(np.array([[1.0, 2.0], [3.0, np.nan]])))
    arrays = stats.to_arrays()
    restored = FeatureStatistics.from_arrays(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(restored, key), value)
    arrays["count"][0] = 99.0  # to_arrays hands out copies
    assert stats.count[0] == 2.0

    good = stats.to_arrays()
    with pytest.raises(DataError, match="NaN or infinite"):
        FeatureStatistics.from_arrays({**good, "total": np.array([np.nan, 1.0])})
    with pytest.raises(DataError, match="count must be >= 0"):
        FeatureStatistics.from_arrays({**good, "count": np.array([-1.0, 1.0])})
    with pytest.raises(DataError, match="differ in length"):
        FeatureStatistics.from_arrays({**good, "total": np.zeros(3)})
    with pytest.raises(DataError, match="1-D"):
        FeatureStatistics.from_arrays({**good, "total": np.zeros((2, 1))})
    with pytest.raises(DataError, match=r"missing \['total_squares'\]"):
        FeatureStatistics.from_arrays({"count": good["count"], "total": good["total"]})


def test_scaler_arrays_round_trip_and_validation() -> None:
    scaler = FeatureScaler(mean=np.array([1.0, -2.0]), scale=np.array([0.5, 3.0]))
    restored = FeatureScaler.from_arrays(scaler.to_arrays())
    np.testing.assert_array_equal(restored.mean, scaler.mean)
    np.testing.assert_array_equal(restored.scale, scaler.scale)
    with pytest.raises(DataError, match="scale must be > 0"):
        FeatureScaler.from_arrays({"mean": np.zeros(2), "scale": np.array([1.0, 0.0])})
    with pytest.raises(DataError, match="NaN or infinite"):
        FeatureScaler.from_arrays({"mean": np.array([np.inf, 0.0]), "scale": np.ones(2)})
    with pytest.raises(DataError, match="unexpected \\['extra'\\]"):
        FeatureScaler.from_arrays({"mean": np.zeros(2), "scale": np.ones(2), "extra": np.ones(2)})


def test_scaler_transform_checks_and_identity() -> None:
    identity = FeatureScaler.identity(3)
    features = np.array([[1.0, np.nan, -2.0]])
    np.testing.assert_array_equal(identity.transform(features), [[1.0, 0.0, -2.0]])
    with pytest.raises(DataError, match=r"shape \(n, 3\)"):
        identity.transform(np.zeros((2, 4)))
    with pytest.raises(DataError, match=r"shape \(n, 3\)"):
        identity.transform(np.zeros(3))
    with pytest.raises(DataError, match="infinite"):
        identity.transform(np.array([[np.inf, 0.0, 0.0]]))
    with pytest.raises(DataError, match=">= 1"):
        FeatureScaler.identity(0)
    stats = FeatureStatistics.from_features(encoded(np.ones((2, 3))))
    with pytest.raises(DataError, match="cover 3 features, but the breast-cancer schema has 2"):
        FeatureScaler.from_statistics(stats, make_schema([True, True]))
