"""Parsing of flat option values (CLI flags, TOML, Flower's ``run_config``).

The options themselves are listed in :mod:`fedguard.core.run_options`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

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


_E = TypeVar("_E", bound=StrEnum)


def as_choice(enum: type[_E], name: str, value: Any) -> _E:
    try:
        return enum(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise ConfigError(f"{name} must be one of {choices}; got {value!r}") from None


def _items(value: Any) -> list[Any]:
    """A list, or comma-separated text, as its non-blank items."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [item for item in items if str(item).strip()]


def as_ints(name: str, value: Any) -> tuple[int, ...]:
    """``"64,64"`` or ``[64, 64]`` as ``(64, 64)``."""
    return tuple(as_int(name, item) for item in _items(value))


def as_floats(name: str, value: Any) -> tuple[float, ...]:
    """``"60,70.5"`` or ``[60, 70.5]`` as ``(60.0, 70.5)``."""
    return tuple(as_float(name, item) for item in _items(value))
