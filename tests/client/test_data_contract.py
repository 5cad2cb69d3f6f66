"""A silo validates its table against the data contract before it trains or answers.

Each violation is a refusal naming the check and the column (the counts stay in the
silo's own report file beside its ledger), and nothing is charged.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedguard.client.app import make_client_app
from fedguard.client.policy import RefusalReason, SiloPolicy
from fedguard.client.silo import (
    VALIDATION_REPORT,
    SiloSettings,
    TableSiloSource,
    settings_from_node_config,
)
from fedguard.core.builtin_datasets import load_pooled_frame
from fedguard.core.config import PrivacyBudget
from fedguard.core.data_sources import DataSource
from fedguard.core.datasets import builtin_contract
from fedguard.privacy.ledger import PrivacyLedger
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from tests.factories import DATASET, initial_weights, instruction, local_scaler, node_context

Breakage = Callable[[pd.DataFrame], None]


def _silo_frame() -> pd.DataFrame:
    return load_pooled_frame(DATASET).head(120).reset_index(drop=True)


def _settings(tmp_path: Path, source: DataSource) -> SiloSettings:
    return SiloSettings(
        silo_id="silo-0",
        state_dir=tmp_path / "state",
        budget=PrivacyBudget(3.0, 1e-5),
        data=TableSiloSource(source, DATASET),
        policy=SiloPolicy(),
    )


def _csv(tmp_path: Path, frame: pd.DataFrame) -> DataSource:
    path = tmp_path / "silo.csv"
    frame.to_csv(path, index=False)
    return DataSource.file(path)


def _train(settings: SiloSettings) -> tuple[ReplyStatus, str, str]:
    clean = _settings(settings.state_dir.parent / "clean", _csv_clean(settings.state_dir.parent))
    message = instruction(1, initial_weights(), local_scaler(clean))
    app = make_client_app(lambda context: settings)
    reply = app(message, node_context(0))
    status, reason = protocol.reply_status(reply)
    refusal = str(reply.content.config_records[protocol.STATUS].get("refusal", ""))
    return status, reason, refusal


def _csv_clean(tmp_path: Path) -> DataSource:
    path = tmp_path / "clean.csv"
    if not path.exists():
        _silo_frame().to_csv(path, index=False)
    return DataSource.file(path)


def _charged(settings: SiloSettings) -> int:
    ledger_files = list(settings.state_dir.glob("privacy-ledger*"))
    if not ledger_files:
        return 0
    with PrivacyLedger.open(settings.state_dir, settings.silo_id, settings.budget) as ledger:
        return len(ledger.entries())


def _unknown_category(frame: pd.DataFrame) -> None:
    frame["target"] = frame["target"].astype(object)
    frame.loc[[1, 2, 3], "target"] = "maybe"


def _out_of_range(frame: pd.DataFrame) -> None:
    frame.loc[[4, 5], "mean radius"] = -3.0


def _wrong_type(frame: pd.DataFrame) -> None:
    frame["mean texture"] = frame["mean texture"].astype(object)
    frame.loc[7, "mean texture"] = "high"


def _missing(frame: pd.DataFrame) -> None:
    frame.loc[[0, 9], "worst area"] = np.nan


def _dropped_column(frame: pd.DataFrame) -> None:
    del frame["mean area"]


def _duplicates(frame: pd.DataFrame) -> None:
    frame.loc[10:19] = frame.loc[0:9].to_numpy()


def _missing_label(frame: pd.DataFrame) -> None:
    frame["target"] = frame["target"].astype(object)
    frame.loc[3, "target"] = None


CASES: dict[str, tuple[Breakage, str, str, int]] = {
    "label outside": (_unknown_category, "label-outside-contract", "target", 3),
    "out of range": (_out_of_range, "out-of-range", "mean radius", 2),
    "wrong type": (_wrong_type, "wrong-type", "mean texture", 1),
    "missing": (_missing, "too-many-missing", "worst area", 2),
    "no column": (_dropped_column, "missing-column", "mean area", 0),
    "duplicates": (_duplicates, "duplicate-rows", "", 10),
    "missing label": (_missing_label, "label-missing", "target", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_silo_whose_data_break_the_contract_refuses_and_charges_nothing(
    tmp_path: Path, case: str
) -> None:
    breakage, kind, column, count = CASES[case]
    frame = _silo_frame()
    breakage(frame)
    settings = _settings(tmp_path, _csv(tmp_path, frame))
    status, reason, refusal = _train(settings)
    assert status is ReplyStatus.REFUSED, reason
    assert refusal == RefusalReason.DATA_CONTRACT.value
    assert kind in reason and column in reason
    assert "row(s)" not in reason  # no counts leave the silo
    report = json.loads((settings.state_dir / VALIDATION_REPORT).read_text())
    assert report["ok"] is False
    found = [(v["kind"], v["column"], v["count"]) for v in report["violations"]]
    assert (kind, column, count) in found
    assert _charged(settings) == 0


def test_a_silo_with_clean_data_trains_and_keeps_a_passing_report(tmp_path: Path) -> None:
    settings = _settings(tmp_path, _csv_clean(tmp_path))
    status, reason, _ = _train(settings)
    assert status is ReplyStatus.OK, reason
    report = json.loads((settings.state_dir / VALIDATION_REPORT).read_text())
    assert report["ok"] is True
    assert report["contract_hash"] == builtin_contract(DATASET).content_hash()
    assert _charged(settings) == 1


def test_parquet_and_sqlite_sources_read_the_same_table_as_csv(tmp_path: Path) -> None:
    frame = _silo_frame()
    csv = _csv(tmp_path, frame)
    parquet = tmp_path / "silo.parquet"
    frame.to_parquet(parquet, index=False)
    database = tmp_path / "silo.sqlite"
    with sqlite3.connect(database) as connection:
        frame.assign(patient_id=range(len(frame))).to_sql("records", connection, index=False)
    sources = [
        csv,
        DataSource.file(parquet),
        DataSource.sql(f"sqlite:///{database}", "SELECT * FROM records ORDER BY patient_id"),
    ]
    tables = []
    for source in sources:
        silo = TableSiloSource(source, DATASET).load()
        rows = np.vstack([silo.train.features, silo.test.features])
        labels = np.concatenate([silo.train.labels, silo.test.labels])
        table = np.column_stack([rows, labels])
        tables.append(table[np.lexsort(table.T[::-1])])
    assert tables[0].shape == (120, 31)
    for other in tables[1:]:
        np.testing.assert_array_equal(other, tables[0])


def test_node_config_names_a_sql_source_and_hides_its_password(tmp_path: Path) -> None:
    settings = settings_from_node_config(
        {
            "silo-id": "h1",
            "dataset": DATASET.value,
            "data-url": "postgresql://fed:s3cret@db.internal/records",
            "data-query": "SELECT * FROM cohort",
            "state-dir": str(tmp_path),
            "target-epsilon": "2.5",
            "delta": "1e-6",
        }
    )
    assert isinstance(settings.data, TableSiloSource)
    assert "s3cret" not in settings.data.table.describe()
    with pytest.raises(Exception, match="query") as failed:
        settings_from_node_config(
            {
                "silo-id": "h1",
                "dataset": DATASET.value,
                "data-url": "sqlite:///x.db",
                "state-dir": str(tmp_path),
                "target-epsilon": "2.5",
                "delta": "1e-6",
            }
        )
    assert "ConfigError" in type(failed.value).__name__


def test_a_failing_query_is_a_typed_error_without_the_password(tmp_path: Path) -> None:
    from fedguard.core.data_sources import read_table
    from fedguard.core.errors import DataError

    source = DataSource.sql(f"sqlite:///{tmp_path / 'none.sqlite'}", "SELECT * FROM absent")
    with pytest.raises(DataError, match="query failed"):
        read_table(source)


def test_a_server_under_another_version_of_the_contract_is_refused(tmp_path: Path) -> None:
    """Same name, other content (a widened range): the hashes differ, the silo refuses."""
    import dataclasses

    own = builtin_contract(DATASET)
    edited = dataclasses.replace(own, version=own.version + 1)
    assert edited.name == own.name and edited.content_hash() != own.content_hash()
    settings = dataclasses.replace(
        _settings(tmp_path, _csv_clean(tmp_path)),
        data=TableSiloSource(_csv_clean(tmp_path), edited),
    )
    status, reason, refusal = _train(settings)
    assert status is ReplyStatus.REFUSED
    assert refusal == RefusalReason.DATA_CONTRACT.value
    assert own.content_hash()[:12] in reason and edited.content_hash()[:12] in reason
    assert _charged(settings) == 0
    assert not (settings.state_dir / VALIDATION_REPORT).exists()  # refused before loading
