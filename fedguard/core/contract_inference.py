"""Drafting a data contract from one silo's own table (``fedguard contract infer``).

Runs locally at the silo: it reads the table, guesses each column's type, range,
categories and missing share, and says what it guessed and why, line by line. The
draft is a starting point for the consortium, not a decision: observed ranges and
categories are one silo's, and a person must widen them, fix units and
descriptions, confirm the positive class and sign off. Nothing here looks at a
column's name: a guess comes from the values alone, so a table fedguard has never
seen gets the same treatment as a built-in one.

The heuristics (each one a line in the notes):

- a column whose every value is distinct text or whole numbers in a run of row
  numbers is an identifier: dropped;
- text that parses as dates is dropped (dates are not supported);
- one distinct value at this silo: dropped (the consortium adds it back if the
  other silos vary);
- two distinct values: binary; text with at most ``max_categories`` distinct
  values: categorical; more distinct texts: dropped as free text;
- numbers: integer if every value is whole, else numeric, with the observed range;
- a missing share above zero: allowed up to that share rounded up to 5%, imputed
  with an indicator;
- the label's task: two values binary (the positive class is the rarer one, or the
  larger of two numbers), up to ``max_categories`` values multiclass, otherwise
  numbers make a regression target.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedguard.core.contract import (
    ColumnType,
    ContractColumn,
    ContractError,
    DataContract,
    DroppedColumn,
    ImputeMethod,
    LabelSpec,
    Task,
)
from fedguard.core.contract_validation import level_text, missing_mask

__all__ = ["InferredContract", "infer_contract"]


@dataclass(frozen=True)
class InferredContract:
    contract: DataContract
    notes: tuple[str, ...]


def _share_allowance(share: float) -> float:
    return min(1.0, math.ceil(share * 20 - 1e-9) / 20) if share > 0 else 0.0


def _numbers(values: pd.Series) -> np.ndarray | None:
    parsed = pd.to_numeric(values, errors="coerce")
    if parsed.isna().any():
        return None
    return np.asarray(parsed.to_numpy(dtype=np.float64), dtype=np.float64)


def _looks_like_dates(texts: pd.Series) -> bool:
    if texts.empty or _numbers(texts) is not None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = pd.to_datetime(texts, errors="coerce", format="mixed")
    return bool(parsed.notna().mean() > 0.95)


def _identifier(values: pd.Series, numbers: np.ndarray | None, rows: int) -> bool:
    if rows < 20 or values.nunique() != len(values) or len(values) != rows:
        return False
    if numbers is None:
        return True
    ordered = np.sort(numbers)
    whole = bool(np.all(ordered == np.round(ordered)))
    return whole and bool(np.all(np.diff(ordered) == 1))


def _categories(values: pd.Series) -> tuple[str, ...]:
    texts = sorted({level_text(v) for v in values})
    numbers = _numbers(pd.Series(texts))
    if numbers is not None:
        texts = [t for _, t in sorted(zip(numbers, texts, strict=True))]
    return tuple(texts)


def _infer_column(
    name: str, series: pd.Series, max_categories: int
) -> tuple[ContractColumn | DroppedColumn, str]:
    missing = missing_mask(series)
    present = series[~missing]
    share = float(missing.mean())
    allowance = _share_allowance(share)
    impute = ImputeMethod.INDICATOR if allowance > 0 else ImputeMethod.NONE
    missing_note = f", {share:.1%} missing (allowed {allowance:.0%})" if share else ""
    if present.empty:
        return DroppedColumn(name, "no values at this silo"), "dropped: every value is missing"
    numbers = _numbers(present)
    distinct = present.map(level_text).nunique()
    if distinct == 1:
        only = level_text(present.iloc[0])
        reason = f"one value ({only!r}) at this silo: add it back if other silos vary"
        return DroppedColumn(name, reason), f"dropped: {reason}"
    if _identifier(present, numbers, len(series)):
        return DroppedColumn(name, "identifier: every value distinct"), "dropped: an identifier"
    if numbers is None and _looks_like_dates(present.astype(str)):
        return DroppedColumn(name, "a date (not supported)"), "dropped: dates are not supported"
    if distinct == 2 or (numbers is None and distinct <= max_categories):
        kind = ColumnType.BINARY if distinct == 2 else ColumnType.CATEGORICAL
        categories = _categories(present)
        column = ContractColumn(
            name, kind, categories=categories, max_missing_share=allowance, impute=impute
        )
        return column, f"{kind.value} {list(categories)}{missing_note}"
    if numbers is None:
        reason = f"free text: {distinct} distinct values (more than {max_categories})"
        return DroppedColumn(name, reason), f"dropped: {reason}"
    whole = bool(np.all(numbers == np.round(numbers)))
    kind = ColumnType.INTEGER if whole else ColumnType.NUMERIC
    low, high = float(numbers.min()), float(numbers.max())
    column = ContractColumn(
        name, kind, minimum=low, maximum=high, max_missing_share=allowance, impute=impute
    )
    return column, f"{kind.value} in [{low:g}, {high:g}] as observed{missing_note}"


def _infer_label(name: str, series: pd.Series, max_categories: int) -> tuple[LabelSpec, str]:
    present = series[~missing_mask(series)]
    if present.empty:
        raise ContractError(f"the label column {name!r} has no values")
    numbers = _numbers(present)
    texts = present.map(level_text)
    counts = texts.value_counts()
    if len(counts) == 2:
        classes = _categories(present)
        numeric = numbers is not None
        positive = classes[1] if numeric else str(counts.index[-1])
        negative = next(c for c in classes if c != positive)
        note = (
            f"binary, positive class {positive!r} ("
            + ("the larger value" if numeric else "the rarer class")
            + f", {int(counts[positive])} of {len(present)} rows): confirm it"
        )
        return LabelSpec(name, Task.BINARY, classes=(negative, positive), positive=positive), note
    if len(counts) < 2:
        raise ContractError(f"the label column {name!r} holds one value only: nothing to learn")
    if len(counts) <= max_categories and (numbers is None or bool(np.all(numbers % 1 == 0))):
        classes = _categories(present)
        return LabelSpec(name, Task.MULTICLASS, classes=classes), f"multiclass {list(classes)}"
    if numbers is None:
        raise ContractError(
            f"the label column {name!r} holds {len(counts)} distinct texts: neither classes "
            "nor numbers; recode it"
        )
    low, high = float(numbers.min()), float(numbers.max())
    return (
        LabelSpec(name, Task.REGRESSION, minimum=low, maximum=high),
        f"regression target in [{low:g}, {high:g}] as observed",
    )


def infer_contract(
    frame: pd.DataFrame,
    label: str,
    name: str,
    *,
    drop: tuple[str, ...] = (),
    max_categories: int = 30,
) -> InferredContract:
    """A draft contract for ``frame`` with ``label`` as the target, and what was guessed."""
    columns = [str(c) for c in frame.columns]
    frame = frame.set_axis(columns, axis=1)
    if label not in columns:
        raise ContractError(f"the table has no label column {label!r}; its columns: {columns}")
    unknown = sorted(set(drop) - set(columns))
    if unknown:
        raise ContractError(f"columns to drop {unknown} are not in the table")
    label_spec, label_note = _infer_label(label, frame[label], max_categories)
    notes = [f"label {label!r}: {label_note}"]
    kept: list[ContractColumn] = []
    dropped = [DroppedColumn(c, "dropped by hand") for c in drop]
    notes += [f"column {c!r}: dropped by hand" for c in drop]
    for column in columns:
        if column == label or column in drop:
            continue
        inferred, note = _infer_column(column, frame[column], max_categories)
        notes.append(f"column {column!r}: {note}")
        if isinstance(inferred, DroppedColumn):
            dropped.append(inferred)
        else:
            kept.append(inferred)
    if not kept:
        raise ContractError(
            "every column was dropped (identifiers, constants, free text or dates): "
            "nothing is left to learn from; " + "; ".join(notes)
        )
    # Duplicates over what the contract keeps: rows that differ only in dropped
    # columns (an identifier) repeat once those are gone.
    kept_columns = [c.name for c in kept] + [label]
    duplicates = float(frame.loc[:, kept_columns].duplicated().mean()) if len(frame) else 0.0
    if duplicates:
        notes.append(f"{duplicates:.1%} of rows repeat an earlier row: allowed up to that share")
    notes.append(
        "check every range and category list against the other silos, add units and "
        "descriptions, list the protected attributes, and mark leaking columns to drop"
    )
    contract = DataContract(
        name=name,
        label=label_spec,
        columns=tuple(kept),
        dropped=tuple(dropped),
        min_rows=20,
        max_duplicate_share=_share_allowance(duplicates),
        description=f"drafted by fedguard contract infer from a table of {len(frame)} rows",
    )
    return InferredContract(contract, tuple(notes))
