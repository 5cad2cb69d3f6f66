"""The consortium's data contract: what every silo's table must look like.

A contract is agreed once by the consortium and kept as a versioned TOML file
(``fedguard contract infer`` drafts one from a silo's own file, locally; people
edit it and sign off). It names, per column: the type, the allowed range or
categories, unit and description, how much may be missing and how a missing
value is filled; the columns to drop (identifiers, columns that leak the label)
with the reason; the label and the task, the positive class; the protected
attributes the fairness audit groups by.

The contract is the only source of an encoding: :mod:`fedguard.core.datasets`
derives its one-hot code book and feature schema from it, so every silo encodes
the same columns the same way without fitting anything on pooled data. The four
built-in data sets are contracts too (``fedguard/core/contracts/*.toml``).

Its :meth:`DataContract.content_hash` (SHA-256 over the canonical JSON of the
parsed contract, so comments and key order do not matter) goes into the run
config, the audit log and the model card; a silo whose contract hashes otherwise
refuses the round.

TOML layout (every key but ``name``, ``[label]`` and one ``[[column]]`` optional)::

    name = "covid-testing"
    version = 1
    description = "..."
    min_rows = 50
    max_duplicate_share = 0.0
    protected = ["gender"]

    [label]
    column = "result"
    task = "binary"              # binary | multiclass | regression
    classes = ["negative", "positive"]   # index order; binary: [negative, positive]
    positive = "positive"
    aliases = { "0" = "negative", "1" = "positive" }   # other spellings

    [[column]]
    name = "age"
    type = "numeric"             # numeric | integer | binary | categorical
    min = 0
    max = 120
    unit = "years"
    description = "age at the test"
    max_missing_share = 0.05     # more than this at a silo is a violation
    impute = "indicator"         # none | indicator (a 0/1 missing flag; numerics get the
                                 # federated mean)
    public_range = [18, 90]      # what DP statistics clip to (default: [min, max]); a
                                 # standardized column needs one or the other

    [[column]]
    name = "clinic"
    type = "categorical"
    categories = ["a", "b", "c"]

    [[drop]]
    name = "id"
    reason = "row identifier"

Dates are not supported as a column type (not done): drop them or derive a number.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from fedguard.core.canonical import canonical_json
from fedguard.core.errors import ConfigError, DataFileNotFoundError

__all__ = [
    "ColumnType",
    "ContractColumn",
    "ContractError",
    "DataContract",
    "DroppedColumn",
    "ImputeMethod",
    "LabelSpec",
    "Scaling",
    "Task",
    "contract_from_mapping",
    "contract_to_toml",
    "load_contract",
    "packaged_contract",
]


class ContractError(ConfigError):
    """A data contract is malformed, inconsistent, or not the one the run agreed on."""


class ColumnType(Enum):
    NUMERIC = "numeric"  # float, standardized from federated statistics
    INTEGER = "integer"  # whole numbers (counts, years); encoded like numeric
    BINARY = "binary"  # two categories -> one 0/1 feature (1 = the second)
    CATEGORICAL = "categorical"  # one-hot over the contract's categories


class ImputeMethod(Enum):
    NONE = "none"  # no value may be missing
    INDICATOR = "indicator"  # a 0/1 missing flag; numerics get the federated mean


class Scaling(Enum):
    STANDARDIZE = "standardize"  # (x - federated mean) / federated std
    DIVIDE_BY_MAX = "divide-by-max"  # bounded intensities (pixels): x / max, no statistics


class Task(Enum):
    BINARY = "binary"
    MULTICLASS = "multiclass"
    REGRESSION = "regression"


def _enum(kind: type[Enum], value: object, where: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value))
    except ValueError:
        allowed = [member.value for member in kind]
        raise ContractError(f"{where}: {value!r} is not one of {allowed}") from None


def _finite(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContractError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ContractError(f"{where} must be finite, got {value!r}")
    return float(value)


def _share(value: object, where: str) -> float:
    share = _finite(value, where)
    if not 0.0 <= share <= 1.0:
        raise ContractError(f"{where} must lie in [0, 1], got {share:g}")
    return share


def _names(values: object, where: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ContractError(f"{where} must be a list of strings, got {values!r}")
    names = tuple(str(v) for v in values)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ContractError(f"{where} repeats {repeated}")
    if any(not n.strip() for n in names):
        raise ContractError(f"{where} holds an empty name")
    return names


def _aliases(values: object, targets: tuple[str, ...], where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(values, Mapping):
        raise ContractError(f"{where} must be a table of spelling = value, got {values!r}")
    pairs = tuple(sorted((str(k), str(v)) for k, v in values.items()))
    unknown = sorted({v for _, v in pairs if v not in targets})
    if unknown:
        raise ContractError(f"{where} maps to {unknown}, which are not among {list(targets)}")
    return pairs


@dataclass(frozen=True)
class ContractColumn:
    """One feature column of the contract."""

    name: str
    type: ColumnType
    description: str = ""
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    categories: tuple[str, ...] = ()
    # Other spellings of a category seen in other exports (R's 0/1 for no/yes).
    aliases: tuple[tuple[str, str], ...] = ()
    max_missing_share: float = 0.0
    impute: ImputeMethod = ImputeMethod.NONE
    scaling: Scaling = Scaling.STANDARDIZE
    # The public range the DP feature statistics clip this column to (values outside
    # are valid, only clipped); None: the contract's [min, max]. Standardized columns
    # need one or the other: the statistic's sensitivity is computed from it.
    public_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        where = f"column {self.name!r}"
        if not self.name or not self.name.strip():
            raise ContractError("a contract column needs a non-empty name")
        if not isinstance(self.type, ColumnType):
            raise ContractError(f"{where}: type must be a ColumnType, got {self.type!r}")
        _share(self.max_missing_share, f"{where}: max_missing_share")
        if self.max_missing_share > 0 and self.impute is ImputeMethod.NONE:
            raise ContractError(
                f"{where} allows a missing share of {self.max_missing_share:g} but says "
                "impute = 'none'; say impute = 'indicator', or allow no missing values"
            )
        if self.is_categorical:
            self._check_categories(where)
        else:
            self._check_range(where)

    def _check_categories(self, where: str) -> None:
        _names(self.categories, f"{where}: categories")
        wanted = 2 if self.type is ColumnType.BINARY else None
        if wanted is not None and len(self.categories) != wanted:
            raise ContractError(
                f"{where} is binary and needs exactly 2 categories, got {list(self.categories)}"
            )
        if len(self.categories) < 2:
            raise ContractError(f"{where} needs at least 2 categories, got {self.categories}")
        if self.minimum is not None or self.maximum is not None:
            raise ContractError(f"{where} is {self.type.value}: a range makes no sense there")
        if self.scaling is not Scaling.STANDARDIZE or self.public_range is not None:
            raise ContractError(f"{where} is {self.type.value}: it takes no scaling or range")

    def _check_range(self, where: str) -> None:
        if self.categories or self.aliases:
            raise ContractError(f"{where} is {self.type.value}: it takes no categories")
        if self.public_range is not None and not (
            len(self.public_range) == 2 and self.public_range[0] < self.public_range[1]
        ):
            raise ContractError(f"{where}: public_range must be [lo, hi] with lo < hi")
        if (
            self.minimum is not None
            and self.maximum is not None
            and not self.minimum <= self.maximum
        ):
            raise ContractError(f"{where}: min {self.minimum:g} exceeds max {self.maximum:g}")
        if self.scaling is Scaling.DIVIDE_BY_MAX and not (
            self.minimum is not None
            and self.minimum >= 0
            and self.maximum is not None
            and self.maximum > 0
        ):
            raise ContractError(
                f"{where}: scaling 'divide-by-max' needs min >= 0 and max > 0 in the contract"
            )

    @property
    def is_categorical(self) -> bool:
        return self.type in (ColumnType.BINARY, ColumnType.CATEGORICAL)

    @property
    def clip_range(self) -> tuple[float, float] | None:
        """The range DP statistics clip to: ``public_range``, else [min, max] if both set."""
        if self.public_range is not None:
            return self.public_range
        if self.minimum is not None and self.maximum is not None and self.minimum < self.maximum:
            return (self.minimum, self.maximum)
        return None

    @property
    def may_be_missing(self) -> bool:
        return self.impute is ImputeMethod.INDICATOR


@dataclass(frozen=True)
class LabelSpec:
    """The label column and the task it defines."""

    column: str
    task: Task
    classes: tuple[str, ...] = ()
    positive: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()
    description: str = ""
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if not self.column:
            raise ContractError("the contract's [label] needs a column")
        if not isinstance(self.task, Task):
            raise ContractError(f"label task must be a Task, got {self.task!r}")
        if self.task is Task.REGRESSION:
            if self.classes or self.positive is not None or self.aliases:
                raise ContractError("a regression label takes no classes, positive or aliases")
            return
        _names(self.classes, "label classes")
        if self.task is Task.BINARY:
            if len(self.classes) != 2:
                raise ContractError(
                    f"a binary label needs 2 classes [negative, positive], got {self.classes}"
                )
            if self.positive is not None and self.positive != self.classes[1]:
                raise ContractError(
                    f"the positive class {self.positive!r} must be the second of the classes "
                    f"{list(self.classes)} (index 1 is what the model scores)"
                )
        elif len(self.classes) < 3:
            raise ContractError(
                f"a multiclass label needs 3 or more classes, got {list(self.classes)}; "
                "two classes is task = 'binary'"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class DroppedColumn:
    name: str
    reason: str


@dataclass(frozen=True)
class DataContract:
    """The consortium's agreed description of every silo's table."""

    name: str
    label: LabelSpec
    columns: tuple[ContractColumn, ...]
    version: int = 1
    description: str = ""
    dropped: tuple[DroppedColumn, ...] = ()
    protected: tuple[str, ...] = ()
    min_rows: int = 20
    max_duplicate_share: float = 0.0
    # Images: the model's input shape (channels, height, width); None: a flat table.
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ContractError("a data contract needs a name")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise ContractError(f"contract version must be an integer, got {self.version!r}")
        if not self.columns:
            raise ContractError(f"contract {self.name!r} lists no feature columns")
        names = [c.name for c in self.columns]
        _names(names, f"contract {self.name!r} columns")
        if self.label.column in names:
            raise ContractError(f"the label {self.label.column!r} is also a feature column")
        clash = sorted({d.name for d in self.dropped} & {*names, self.label.column})
        if clash:
            raise ContractError(f"column(s) {clash} are both used and dropped")
        unknown = sorted(set(self.protected) - set(names))
        if unknown:
            raise ContractError(f"protected attribute(s) {unknown} are not feature columns")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int):
            raise ContractError(f"min_rows must be an integer, got {self.min_rows!r}")
        if self.min_rows < 2:
            raise ContractError(f"min_rows must be at least 2, got {self.min_rows}")
        _share(self.max_duplicate_share, "max_duplicate_share")
        if self.input_shape is not None and (
            not self.input_shape or any(s < 1 for s in self.input_shape)
        ):
            raise ContractError(f"input_shape must be positive sizes, got {self.input_shape}")

    def column(self, name: str) -> ContractColumn:
        for column in self.columns:
            if column.name == name:
                return column
        raise ContractError(f"contract {self.name!r} has no column {name!r}")

    @property
    def raw_columns(self) -> tuple[str, ...]:
        """The columns a silo's table must hold: the features, then the label."""
        return (*(c.name for c in self.columns), self.label.column)

    def to_mapping(self) -> dict[str, Any]:
        """Plain TOML/JSON types; :func:`contract_from_mapping` reads it back."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "min_rows": self.min_rows,
            "max_duplicate_share": self.max_duplicate_share,
            "protected": list(self.protected),
            "label": _label_mapping(self.label),
            "column": [_column_mapping(c) for c in self.columns],
            "drop": [{"name": d.name, "reason": d.reason} for d in self.dropped],
        }
        if self.input_shape is not None:
            out["input_shape"] = list(self.input_shape)
        return out

    def content_hash(self) -> str:
        """SHA-256 over the canonical JSON of the parsed contract (hex)."""
        return hashlib.sha256(canonical_json(self.to_mapping())).hexdigest()


def _label_mapping(label: LabelSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"column": label.column, "task": label.task.value}
    if label.classes:
        out["classes"] = list(label.classes)
    if label.positive is not None:
        out["positive"] = label.positive
    if label.aliases:
        out["aliases"] = dict(label.aliases)
    out.update(_optional_text_and_range(label.description, label.unit, label))
    return out


def _optional_text_and_range(
    description: str, unit: str, item: ContractColumn | LabelSpec
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if description:
        out["description"] = description
    if unit:
        out["unit"] = unit
    if item.minimum is not None:
        out["min"] = item.minimum
    if item.maximum is not None:
        out["max"] = item.maximum
    return out


def _column_mapping(column: ContractColumn) -> dict[str, Any]:
    out: dict[str, Any] = {"name": column.name, "type": column.type.value}
    if column.categories:
        out["categories"] = list(column.categories)
    if column.aliases:
        out["aliases"] = dict(column.aliases)
    out.update(_optional_text_and_range(column.description, column.unit, column))
    if column.max_missing_share:
        out["max_missing_share"] = column.max_missing_share
    if column.impute is not ImputeMethod.NONE:
        out["impute"] = column.impute.value
    if column.scaling is not Scaling.STANDARDIZE:
        out["scaling"] = column.scaling.value
    if column.public_range is not None:
        out["public_range"] = list(column.public_range)
    return out


# ---------------------------------------------------------------------------- parsing

_TOP_KEYS = {
    "name",
    "version",
    "description",
    "min_rows",
    "max_duplicate_share",
    "protected",
    "label",
    "column",
    "drop",
    "input_shape",
}
_COLUMN_KEYS = {
    "name",
    "type",
    "description",
    "unit",
    "min",
    "max",
    "categories",
    "aliases",
    "max_missing_share",
    "impute",
    "scaling",
    "public_range",
}
_LABEL_KEYS = {
    "column",
    "task",
    "classes",
    "positive",
    "aliases",
    "description",
    "unit",
    "min",
    "max",
}


def _table(value: object, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ContractError(f"{where} must be a table, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ContractError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return value


def _optional_number(table: Mapping[str, Any], key: str, where: str) -> float | None:
    return None if key not in table else _finite(table[key], f"{where}: {key}")


def _parse_column(table: Mapping[str, Any], index: int) -> ContractColumn:
    where = f"[[column]] #{index + 1}"
    table = _table(table, where, _COLUMN_KEYS)
    if "name" not in table or "type" not in table:
        raise ContractError(f"{where} needs a name and a type")
    where = f"column {table['name']!r}"
    categories = _names(table.get("categories", ()), f"{where}: categories")
    return ContractColumn(
        name=str(table["name"]),
        type=_enum(ColumnType, table["type"], f"{where}: type"),
        description=str(table.get("description", "")),
        unit=str(table.get("unit", "")),
        minimum=_optional_number(table, "min", where),
        maximum=_optional_number(table, "max", where),
        categories=categories,
        aliases=_aliases(table.get("aliases", {}), categories, f"{where}: aliases"),
        max_missing_share=_share(table.get("max_missing_share", 0.0), f"{where}: share"),
        impute=_enum(ImputeMethod, table.get("impute", "none"), f"{where}: impute"),
        scaling=_enum(Scaling, table.get("scaling", "standardize"), f"{where}: scaling"),
        public_range=_range(table.get("public_range"), f"{where}: public_range"),
    )


def _range(value: object, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    bounds = _sequence(value, where)
    if len(bounds) != 2:
        raise ContractError(f"{where} must be [lo, hi], got {value!r}")
    return (_finite(bounds[0], where), _finite(bounds[1], where))


def _parse_label(value: object) -> LabelSpec:
    table = _table(value, "[label]", _LABEL_KEYS)
    if "column" not in table or "task" not in table:
        raise ContractError("[label] needs a column and a task")
    classes = _names(table.get("classes", ()), "label classes")
    positive = table.get("positive")
    return LabelSpec(
        column=str(table["column"]),
        task=_enum(Task, table["task"], "label task"),
        classes=classes,
        positive=None if positive is None else str(positive),
        aliases=_aliases(table.get("aliases", {}), classes, "label aliases"),
        description=str(table.get("description", "")),
        unit=str(table.get("unit", "")),
        minimum=_optional_number(table, "min", "label"),
        maximum=_optional_number(table, "max", "label"),
    )


def _integer(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContractError(f"{where} must be an integer, got {value!r}")
    return value


def contract_from_mapping(data: Mapping[str, Any]) -> DataContract:
    """Parse a contract from its TOML table (or :meth:`DataContract.to_mapping`)."""
    data = _table(data, "the contract", _TOP_KEYS)
    if "name" not in data or "label" not in data:
        raise ContractError("a data contract needs a name and a [label] table")
    columns = data.get("column", [])
    if not isinstance(columns, list):
        raise ContractError("[[column]] must be an array of tables")
    drops = data.get("drop", [])
    if not isinstance(drops, list):
        raise ContractError("[[drop]] must be an array of tables")
    dropped = []
    for i, drop in enumerate(drops):
        table = _table(drop, f"[[drop]] #{i + 1}", {"name", "reason"})
        if "name" not in table:
            raise ContractError(f"[[drop]] #{i + 1} needs a name")
        dropped.append(DroppedColumn(str(table["name"]), str(table.get("reason", ""))))
    shape = data.get("input_shape")
    return DataContract(
        name=str(data["name"]),
        version=_integer(data.get("version", 1), "version"),
        description=str(data.get("description", "")),
        label=_parse_label(data["label"]),
        columns=tuple(_parse_column(c, i) for i, c in enumerate(columns)),
        dropped=tuple(dropped),
        protected=_names(data.get("protected", ()), "protected"),
        min_rows=_integer(data.get("min_rows", 20), "min_rows"),
        max_duplicate_share=_share(data.get("max_duplicate_share", 0.0), "max_duplicate_share"),
        input_shape=None
        if shape is None
        else tuple(_integer(s, "input_shape") for s in _sequence(shape, "input_shape")),
    )


def _sequence(value: object, where: str) -> Sequence[object]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ContractError(f"{where} must be a list, got {value!r}")
    return value


#: The built-in data sets' contracts, shipped with fedguard.
BUILTIN_CONTRACTS = Path(__file__).with_name("contracts")


@cache
def packaged_contract(name: str) -> DataContract:
    """The contract of a built-in data set, by its name (``flchain``)."""
    path = BUILTIN_CONTRACTS / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in BUILTIN_CONTRACTS.glob("*.toml"))
        raise ContractError(f"no built-in data contract {name!r}; built in: {known}")
    contract = load_contract(path)
    if contract.name != name:
        raise ContractError(f"the packaged contract {path.name} is named {contract.name!r}")
    return contract


def load_contract(path: Path) -> DataContract:
    """Read and check a contract file; ContractError says what is wrong and where."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"data contract {path} does not exist or is not a file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as bad:
        raise ContractError(f"data contract {path} is not valid TOML: {bad}") from None
    except OSError as bad:
        raise ContractError(f"cannot read data contract {path}: {bad}") from None
    try:
        return contract_from_mapping(data)
    except ContractError as bad:
        raise ContractError(f"data contract {path}: {bad}") from None


# ---------------------------------------------------------------------------- writing
# tomllib reads only; the writer is a few lines for the value types a contract holds
# (strings, numbers, lists of strings or numbers, one-level tables), not a dependency.


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ "
            + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items())
            + " }"
        )
    raise ContractError(f"cannot write {value!r} to TOML")


def _toml_lines(table: Mapping[str, Any]) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in table.items()]


def contract_to_toml(contract: DataContract, header: Sequence[str] = ()) -> str:
    """The contract as TOML text, with ``header`` lines written as comments on top."""
    data = contract.to_mapping()
    lines = [f"# {line}" if line else "#" for line in header]
    lines += _toml_lines({k: v for k, v in data.items() if k not in ("label", "column", "drop")})
    lines += ["", "[label]", *_toml_lines(data["label"])]
    for column in data["column"]:
        lines += ["", "[[column]]", *_toml_lines(column)]
    for drop in data["drop"]:
        lines += ["", "[[drop]]", *_toml_lines(drop)]
    return "\n".join(lines) + "\n"
