"""Parsing of flat option values (CLI flags, TOML, Flower's ``run_config``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedguard.core.errors import ConfigError


def float_text(value: float) -> str:
    """``value`` as short text that parses back to exactly ``value`` (``0.5``, ``1``,
    ``0.123456789``): option values must survive ``to_options`` -> ``from_options``."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class Option:
    """One flat option: its name (CLI flag without dashes, TOML key, ``run_config`` key),
    the dataclass field it sets, its parser and its help text."""

    name: str
    field: str
    parse: Callable[[str, Any], Any]
    help: str


#: The run's participation policy (:class:`fedguard.core.config.ParticipationPolicy`).
PARTICIPATION_OPTIONS: tuple[Option, ...] = (
    Option(
        "min-silos-per-round",
        "min_silos_per_round",
        as_int,
        "fewest silos whose updates a round must aggregate; a run with rounds below it "
        "ends degraded (failed if no round reaches it)",
    ),
    Option(
        "max-failed-rounds",
        "max_failed_rounds",
        as_int,
        "most rounds that may fail (aborted, no aggregate) before the run stops as "
        "failed; a run with fewer, but some, ends degraded",
    ),
)


def parse_table(table: Iterable[Option], options: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a table's options set, parsed once (options absent from ``options`` are
    left out, so the dataclass keeps its defaults)."""
    return {o.field: o.parse(o.name, options[o.name]) for o in table if o.name in options}


def add_table_options(group: Any, table: Iterable[Option], defaults: Mapping[str, Any]) -> None:
    """argparse flags for a table's options (``--NAME``, default None: the config decides)."""
    for o in table:
        kinds: dict[Callable[[str, Any], Any], type] = {as_int: int, as_float: float}
        kind = kinds.get(o.parse, str)
        group.add_argument(
            f"--{o.name}",
            type=kind,
            default=None,
            help=f"{o.help} [default: {defaults.get(o.name)}]",
        )
