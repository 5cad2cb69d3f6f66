"""Checking a silo's table against the consortium's data contract, before anything else.

A silo validates its own rows before it trains or answers any statistic. The full
report (:class:`ValidationReport`: every violation with its column, count and, for
the silo's own eyes, example values) stays at the silo, in a file beside its
ledger. What may leave the silo is only what :meth:`ContractViolationError.public_reason`
says: which checks failed on which contract columns (names the consortium wrote),
with no count and no value; counts and rates across silos go through the DP
statistics path instead.

Checks, each a :class:`ViolationKind`: a contract column absent from the table or
present twice, a value of the wrong type (text in a numeric column, a fraction in an
integer column, infinity), a value outside the contract's range, a category the
contract does not list, more missing values than the column's allowed share, a
missing label or a label outside the contract's classes (or range, for regression),
more duplicate rows than allowed, fewer rows than the contract's minimum.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd

from fedguard.core.contract import ColumnType, ContractColumn, DataContract, LabelSpec, Task
from fedguard.core.errors import DataError

__all__ = [
    "ContractViolationError",
    "ValidationReport",
    "Violation",
    "ViolationKind",
    "category_codes",
    "level_text",
    "missing_mask",
    "numeric_values",
    "validate_frame",
]


class ViolationKind(Enum):
    MISSING_COLUMN = "missing-column"
    REPEATED_COLUMN = "repeated-column"
    WRONG_TYPE = "wrong-type"
    OUT_OF_RANGE = "out-of-range"
    UNKNOWN_CATEGORY = "unknown-category"
    TOO_MANY_MISSING = "too-many-missing"
    LABEL_MISSING = "label-missing"
    LABEL_OUTSIDE_CONTRACT = "label-outside-contract"
    DUPLICATE_ROWS = "duplicate-rows"
    TOO_FEW_ROWS = "too-few-rows"


@dataclass(frozen=True)
class Violation:
    kind: ViolationKind
    column: str  # "" for whole-table checks (duplicates, row count)
    count: int
    detail: str
    # Example offending values: for the silo's own report only, never sent.
    examples: tuple[str, ...] = ()

    def describe(self) -> str:
        where = f"column {self.column!r}: " if self.column else ""
        return f"{where}{self.detail} ({self.kind.value}, {self.count} row(s))"


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of validating one silo's table against one contract."""

    contract_name: str
    contract_hash: str
    rows: int
    violations: tuple[Violation, ...]
    missing_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "contract": self.contract_name,
            "contract_hash": self.contract_hash,
            "rows": self.rows,
            "ok": self.ok,
            "missing_counts": self.missing_counts,
            "violations": [
                {
                    "kind": v.kind.value,
                    "column": v.column,
                    "count": v.count,
                    "detail": v.detail,
                    "examples": list(v.examples),
                }
                for v in self.violations
            ],
        }
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"

    def summary(self) -> str:
        if self.ok:
            return (
                f"{self.rows} rows satisfy data contract {self.contract_name!r} "
                f"({self.contract_hash[:12]})"
            )
        lines = [
            f"{self.rows} rows break data contract {self.contract_name!r} "
            f"({self.contract_hash[:12]}) in {len(self.violations)} way(s):"
        ]
        lines += [f"  - {v.describe()}" for v in self.violations]
        return "\n".join(lines)


class ContractViolationError(DataError):
    """A silo's table breaks the data contract; it trains nothing and charges nothing."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def public_reason(self) -> str:
        """What the silo may tell the server: the failed checks and columns, no counts."""
        checks = sorted(
            {
                f"{v.kind.value}:{v.column}" if v.column else v.kind.value
                for v in self.report.violations
            }
        )
        return (
            f"the silo's data breaks data contract {self.report.contract_name!r} "
            f"({', '.join(checks)}); its full report stays at the silo"
        )


def level_text(value: object) -> str:
    """One spelling per category whatever the reader produced: 1, 1.0, True, "1" -> "1"."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _examples(values: Iterable[object], limit: int = 5) -> tuple[str, ...]:
    return tuple(sorted({str(v) for v in values})[:limit])


def missing_mask(series: pd.Series) -> np.ndarray:
    """True where a cell is missing: NaN, None, or an empty or blank string."""
    values = series.astype(object)
    mask = np.asarray(pd.isna(values), dtype=bool)
    # An empty or blank cell is missing too (CSV and SQL exports write it both ways).
    blank = values.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(dtype=bool)
    return np.asarray(mask | blank, dtype=bool)


def _range_violations(
    name: str, values: np.ndarray, minimum: float | None, maximum: float | None
) -> list[Violation]:
    present = values[~np.isnan(values)]
    outside = np.zeros(present.shape, dtype=bool)
    if minimum is not None:
        outside |= present < minimum
    if maximum is not None:
        outside |= present > maximum
    if not outside.any():
        return []
    low = "-inf" if minimum is None else f"{minimum:g}"
    high = "inf" if maximum is None else f"{maximum:g}"
    return [
        Violation(
            ViolationKind.OUT_OF_RANGE,
            name,
            int(outside.sum()),
            f"values outside the contract's range [{low}, {high}]",
            _examples(present[outside]),
        )
    ]


def numeric_values(series: pd.Series, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN where missing or unparseable, mask of unparseable cells)."""
    raw = series.astype(object).where(~missing, None)
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return values, np.isnan(values) & ~missing


def _numeric_violations(
    column: ContractColumn, series: pd.Series, missing: np.ndarray
) -> list[Violation]:
    values, not_numeric = numeric_values(series, missing)
    found: list[Violation] = []
    if not_numeric.any():
        found.append(
            Violation(
                ViolationKind.WRONG_TYPE,
                column.name,
                int(not_numeric.sum()),
                f"non-numeric values in a {column.type.value} column",
                _examples(series.to_numpy()[not_numeric]),
            )
        )
    infinite = np.isinf(values)
    if infinite.any():
        found.append(
            Violation(ViolationKind.WRONG_TYPE, column.name, int(infinite.sum()), "infinite values")
        )
    finite = np.where(infinite, np.nan, values)
    if column.type is ColumnType.INTEGER:
        fractional = ~np.isnan(finite) & (finite != np.round(finite))
        if fractional.any():
            found.append(
                Violation(
                    ViolationKind.WRONG_TYPE,
                    column.name,
                    int(fractional.sum()),
                    "fractional values in an integer column",
                    _examples(finite[fractional]),
                )
            )
    return found + _range_violations(column.name, finite, column.minimum, column.maximum)


def category_codes(
    categories: tuple[str, ...],
    aliases: tuple[tuple[str, str], ...],
    series: pd.Series,
    missing: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(category index per row, -1 where missing or unknown; mask of unknown cells)."""
    index_of = {level: i for i, level in enumerate(categories)}
    spelled = dict(aliases)
    codes = np.full(len(series), -1, dtype=np.int64)
    unknown = np.zeros(len(series), dtype=bool)
    for row, value in enumerate(series.astype(object).to_numpy()):
        if missing[row]:
            continue
        text = level_text(value)
        code = index_of.get(spelled.get(text, text))
        if code is None:
            unknown[row] = True
        else:
            codes[row] = code
    return codes, unknown


def _column_violations(
    column: ContractColumn, series: pd.Series, whole_table: bool
) -> tuple[list[Violation], int]:
    missing = missing_mask(series)
    found: list[Violation] = []
    share = float(missing.mean()) if len(series) else 0.0
    # A share is a property of a table; a few records (one to explain) may only be
    # missing where the contract imputes at all.
    allowed = column.max_missing_share if whole_table else float(column.may_be_missing)
    if missing.any() and share > allowed:
        found.append(
            Violation(
                ViolationKind.TOO_MANY_MISSING,
                column.name,
                int(missing.sum()),
                f"{share:.1%} missing, the contract allows {allowed:.1%}",
            )
        )
    if column.is_categorical:
        _, unknown = category_codes(column.categories, column.aliases, series, missing)
        if unknown.any():
            found.append(
                Violation(
                    ViolationKind.UNKNOWN_CATEGORY,
                    column.name,
                    int(unknown.sum()),
                    f"categories the contract does not list (allowed: {list(column.categories)})",
                    _examples(level_text(v) for v in series.to_numpy()[unknown]),
                )
            )
    else:
        found += _numeric_violations(column, series, missing)
    return found, int(missing.sum())


def _label_violations(label: LabelSpec, series: pd.Series) -> list[Violation]:
    missing = missing_mask(series)
    found: list[Violation] = []
    if missing.any():
        found.append(
            Violation(
                ViolationKind.LABEL_MISSING,
                label.column,
                int(missing.sum()),
                "rows without a label",
            )
        )
    if label.task is Task.REGRESSION:
        values, not_numeric = numeric_values(series, missing)
        outside = not_numeric | np.isinf(values)
        if label.minimum is not None:
            outside |= values < label.minimum
        if label.maximum is not None:
            outside |= values > label.maximum
        detail = "label values that are not finite numbers within the contract's range"
    else:
        _, outside = category_codes(label.classes, label.aliases, series, missing)
        detail = f"labels outside the contract's classes {list(label.classes)}"
    if outside.any():
        found.append(
            Violation(
                ViolationKind.LABEL_OUTSIDE_CONTRACT,
                label.column,
                int(outside.sum()),
                detail,
                _examples(level_text(v) for v in series.to_numpy()[outside]),
            )
        )
    return found


def _table_violations(contract: DataContract, frame: pd.DataFrame) -> list[Violation]:
    found: list[Violation] = []
    if len(frame) < contract.min_rows:
        found.append(
            Violation(
                ViolationKind.TOO_FEW_ROWS,
                "",
                len(frame),
                f"{len(frame)} rows, the contract needs at least {contract.min_rows}",
            )
        )
    duplicates = int(frame.duplicated().sum()) if len(frame) else 0
    if duplicates and duplicates / len(frame) > contract.max_duplicate_share:
        found.append(
            Violation(
                ViolationKind.DUPLICATE_ROWS,
                "",
                duplicates,
                f"{duplicates / len(frame):.1%} of rows repeat an earlier row, the contract "
                f"allows {contract.max_duplicate_share:.1%}",
            )
        )
    return found


def validate_frame(
    contract: DataContract, frame: pd.DataFrame, *, whole_table: bool = True
) -> ValidationReport:
    """Every way ``frame`` breaks ``contract`` (an empty list: it satisfies it).

    Only the contract's columns are looked at; other columns of the table are ignored
    and never read into the model (drop lists are the consortium's record of why).
    ``whole_table=False`` checks records one by one (a record to explain or score):
    no row count, no duplicate share, no missing share.
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    present = [str(c) for c in frame.columns]
    violations: list[Violation] = []
    usable: list[str] = []
    for name in contract.raw_columns:
        count = present.count(name)
        if count == 0:
            violations.append(
                Violation(ViolationKind.MISSING_COLUMN, name, 0, "the table has no such column")
            )
        elif count > 1:
            violations.append(
                Violation(ViolationKind.REPEATED_COLUMN, name, count, "the column appears twice")
            )
        else:
            usable.append(name)
    table = frame.set_axis(present, axis=1).loc[:, usable]
    missing_counts: dict[str, int] = {}
    for column in contract.columns:
        if column.name in usable:
            found, missing_counts[column.name] = _column_violations(
                column, table[column.name], whole_table
            )
            violations += found
    if contract.label.column in usable:
        violations += _label_violations(contract.label, table[contract.label.column])
    if whole_table:
        violations += _table_violations(contract, table)
    return ValidationReport(
        contract_name=contract.name,
        contract_hash=contract.content_hash(),
        rows=len(frame),
        violations=tuple(violations),
        missing_counts=missing_counts,
    )
