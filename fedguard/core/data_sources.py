"""Where a silo's table comes from: a CSV or Parquet file, or a SQL query.

A hospital or a bank keeps its records in files or in a database; the silo reads
them where they are, inside its own walls. Nothing here sends a row anywhere: the
table goes to validation (:mod:`fedguard.core.contract_validation`) and encoding,
both at the silo.

- CSV: any other path (pandas ``read_csv``; empty cells are missing).
- Parquet: ``.parquet`` / ``.pq`` (pandas with pyarrow; the ``sources`` extra).
- SQL: a SQLAlchemy database URL and a query (the ``sources`` extra; SQLite ships
  with Python, PostgreSQL needs its driver, e.g. ``psycopg``). The URL's password
  never appears in a message or a log: errors show it as ``***``.

The node config names one source: ``data-path`` for a file, or ``data-url`` with
``data-query`` for a database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd

from fedguard.core.errors import ConfigError, DataError, DataFileNotFoundError, MissingExtraError

__all__ = [
    "DataSource",
    "SourceKind",
    "read_table",
    "source_from_node_config",
]

_SOURCES_HINT = "install the optional extra: pip install 'fedguard[sources]'"
_PARQUET_SUFFIXES = (".parquet", ".pq")


class SourceKind(Enum):
    CSV = "csv"
    PARQUET = "parquet"
    SQL = "sql"


@dataclass(frozen=True)
class DataSource:
    """One silo table: a file (CSV or Parquet) or a query against a database URL."""

    kind: SourceKind
    location: str  # the file's path, or the database URL
    query: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, SourceKind):
            raise ConfigError(f"source kind must be a SourceKind, got {self.kind!r}")
        if not self.location:
            raise ConfigError("a data source needs a path or a database URL")
        if self.kind is SourceKind.SQL and not self.query.strip():
            raise ConfigError("a SQL data source needs a query (node config 'data-query')")
        if self.kind is not SourceKind.SQL and self.query:
            raise ConfigError("only a SQL data source takes a query")

    @classmethod
    def file(cls, path: Path | str) -> DataSource:
        """A Parquet file if it ends in .parquet or .pq; any other file is read as CSV."""
        if Path(path).suffix.lower() in _PARQUET_SUFFIXES:
            return cls(SourceKind.PARQUET, str(path))
        return cls(SourceKind.CSV, str(path))

    @classmethod
    def sql(cls, url: str, query: str) -> DataSource:
        return cls(SourceKind.SQL, url, query)

    @property
    def path(self) -> Path:
        if self.kind is SourceKind.SQL:
            raise ConfigError("a SQL data source has no path")
        return Path(self.location)

    def describe(self) -> str:
        """For messages and logs: the path, or the URL with its password hidden."""
        if self.kind is SourceKind.SQL:
            return f"SQL query on {redacted_url(self.location)}"
        return f"{self.kind.value} file {self.location}"


def redacted_url(url: str) -> str:
    """A database URL with its password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # Unparseable or no SQLAlchemy: show only the scheme, never the rest.
        return url.split(":", 1)[0] + "://***"


def source_from_node_config(node_config: Mapping[str, object]) -> DataSource:
    """The one source a silo's node config names (``data-path``, or ``data-url`` + query)."""
    path, url = node_config.get("data-path"), node_config.get("data-url")
    if path not in (None, "") and url not in (None, ""):
        raise ConfigError("node config names both 'data-path' and 'data-url'; give one source")
    if url not in (None, ""):
        return DataSource.sql(str(url), str(node_config.get("data-query", "")))
    if path in (None, ""):
        raise ConfigError("node config names no data: give 'data-path' or 'data-url'")
    return DataSource.file(str(path))


def read_table(source: DataSource) -> pd.DataFrame:
    """The silo's raw table; DataError (typed) for a missing, unreadable or empty source."""
    frame = _read_sql(source) if source.kind is SourceKind.SQL else _read_file(source)
    if frame.empty:
        raise DataError(f"{source.describe()} has a header but no rows")
    return frame


def _read_file(source: DataSource) -> pd.DataFrame:
    path = source.path
    if not path.exists():
        raise DataFileNotFoundError(
            f"silo data file {path} does not exist; check the data path given to this silo"
        )
    if not path.is_file():
        raise DataError(f"silo data path {path} is not a file; give the path of a data file")
    if source.kind is SourceKind.CSV:
        try:
            return pd.read_csv(path)
        except pd.errors.EmptyDataError:
            raise DataError(f"silo data file {path} is empty; it needs a header and rows") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
            raise DataError(f"cannot read silo data file {path} as CSV: {error}") from None
    try:
        import pyarrow  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"reading the Parquet file {path} needs pyarrow; {_SOURCES_HINT}"
        ) from None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read silo data file {path} as Parquet: {error}") from None


def _read_sql(source: DataSource) -> pd.DataFrame:
    try:
        import sqlalchemy
    except ImportError:
        raise MissingExtraError(f"a SQL data source needs SQLAlchemy; {_SOURCES_HINT}") from None
    where = source.describe()
    try:
        engine: Any = sqlalchemy.create_engine(source.location)
    except (sqlalchemy.exc.ArgumentError, ImportError, ValueError) as error:
        raise DataError(f"cannot open {where}: {_without_url(error, source)}") from None
    try:
        with engine.connect() as connection:
            return pd.read_sql_query(sqlalchemy.text(source.query), connection)
    except (sqlalchemy.exc.SQLAlchemyError, pd.errors.DatabaseError) as error:
        raise DataError(f"the query failed on {where}: {_without_url(error, source)}") from None
    finally:
        engine.dispose()


def _without_url(error: BaseException, source: DataSource) -> str:
    # Driver messages may quote the URL; never let its password into a log.
    text = str(error).split("\n")[0]
    return text.replace(source.location, redacted_url(source.location))
