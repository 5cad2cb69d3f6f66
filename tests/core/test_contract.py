"""The data contract: TOML round trip, hashing, typed errors, inference from values only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.core.config import DatasetName
from fedguard.core.contract import (
    ColumnType,
    ContractError,
    contract_from_mapping,
    contract_to_toml,
    load_contract,
)
from fedguard.core.contract_inference import infer_contract
from fedguard.core.contract_validation import validate_frame
from fedguard.core.datasets import builtin_contract, schema_for


@pytest.mark.parametrize("name", list(DatasetName))
def test_builtin_contracts_round_trip_and_hash_stably(tmp_path: Path, name: DatasetName) -> None:
    contract = builtin_contract(name)
    path = tmp_path / "c.toml"
    path.write_text(contract_to_toml(contract, ["a comment does not change the hash"]))
    again = load_contract(path)
    assert again == contract
    assert again.content_hash() == contract.content_hash()
    assert schema_for(again) == schema_for(name)


def _minimal(**label: object) -> dict[str, object]:
    return {
        "name": "t",
        "label": {"column": "y", "task": "binary", "classes": ["no", "yes"], **label},
        "column": [{"name": "x", "type": "numeric", "min": 0, "max": 1}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("label"), "needs a name and a"),
        (lambda d: d.update(colour="red"), "unknown key"),
        (lambda d: d["column"][0].update(type="date"), "is not one of"),
        (lambda d: d["column"][0].update(min=2), "exceeds max"),
        (lambda d: d["column"][0].update(max_missing_share=0.2), "impute = 'indicator'"),
        (lambda d: d["label"].update(positive="no"), "must be the second"),
        (lambda d: d["label"].update(classes=["a"]), "needs 2 classes"),
        (lambda d: d.update(protected=["nope"]), "not feature columns"),
        (lambda d: d["column"].append({"name": "x", "type": "numeric"}), "repeats"),
        (lambda d: d.update(drop=[{"name": "x"}]), "both used and dropped"),
    ],
)
def test_malformed_contracts_are_typed_errors_naming_the_problem(change, message) -> None:  # type: ignore[no-untyped-def]
    data = _minimal()
    contract_from_mapping(data)  # the base is fine
    change(data)
    with pytest.raises(ContractError, match=message):
        contract_from_mapping(data)


def test_a_broken_toml_file_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ContractError, match="not valid TOML"):
        load_contract(path)


def test_inference_looks_at_values_never_at_names() -> None:
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame(
        {
            "a": np.arange(n),  # a run of row numbers: an identifier
            "b": rng.normal(50, 5, n).round(2),
            "c": rng.choice(["p", "q", "r"], n),
            "d": rng.choice(["u", "v"], n),
            "e": rng.integers(0, 9, n),
            "f": [f"free text {i}" for i in rng.integers(0, 10_000, n)],
            "g": pd.date_range("2020-01-01", periods=n).astype(str),
            "h": rng.choice([0, 1], n),
        }
    )
    frame.loc[:9, "b"] = np.nan
    inferred = infer_contract(frame, "h", "anon")
    contract = inferred.contract
    kinds = {c.name: c.type for c in contract.columns}
    assert kinds == {
        "b": ColumnType.NUMERIC,
        "c": ColumnType.CATEGORICAL,
        "d": ColumnType.BINARY,
        "e": ColumnType.INTEGER,
    }
    assert {d.name for d in contract.dropped} == {"a", "f", "g"}
    assert contract.column("b").max_missing_share == 0.05
    assert contract.label.classes == ("0", "1")
    # Renaming every column changes nothing but the names.
    renamed = frame.set_axis([f"col_{i}" for i in range(frame.shape[1])], axis=1)
    other = infer_contract(renamed, "col_7", "anon").contract
    assert [c.type for c in other.columns] == [c.type for c in contract.columns]
    # The draft accepts the table it was drawn from.
    assert validate_frame(contract, frame).ok


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=25, max_size=60),
    st.lists(st.sampled_from(["x", "y", "z"]), min_size=25, max_size=60),
)
def test_a_drafted_contract_accepts_its_own_table(values: list[float], levels: list[str]) -> None:
    n = min(len(values), len(levels))
    frame = pd.DataFrame({"v": values[:n], "k": levels[:n], "y": [i % 2 for i in range(n)]})
    if frame["v"].nunique() == 1 and frame["k"].nunique() == 1:
        with pytest.raises(ContractError, match="every column was dropped"):
            infer_contract(frame, "y", "h")
        return
    contract = infer_contract(frame, "y", "h").contract
    assert validate_frame(contract, frame).ok
    # One value outside the observed range is caught with its column and count.
    column = next((c for c in contract.columns if c.name == "v"), None)
    if column is not None and column.maximum is not None:
        broken = frame.assign(v=frame["v"].where(frame.index != 0, column.maximum + 1))
        (violation,) = validate_frame(contract, broken).violations
        assert (violation.kind.value, violation.column, violation.count) == ("out-of-range", "v", 1)


def test_an_edited_builtin_contract_hashes_otherwise() -> None:
    own = builtin_contract(DatasetName.CREDIT)
    widened = dataclasses.replace(
        own, columns=(dataclasses.replace(own.columns[0], maximum=99.0), *own.columns[1:])
    )
    assert widened.content_hash() != own.content_hash()
