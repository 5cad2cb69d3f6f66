"""Value checks for config and events: one definition of "positive", "rate", "fraction", "count".

Each raises a typed error (``ConfigError`` unless told another) naming the value,
never an ``assert``; each returns the value as the type it checked, so a caller
can check and convert in one step. ``bool`` is rejected where a number is asked
for (``True`` is an ``int`` to Python, never a meaningful ε or rate).
"""

from __future__ import annotations

import math

from fedguard.core.errors import ConfigError, FedguardError

__all__ = ["fraction", "positive", "positive_int", "rate"]


def _number(value: object) -> float | None:
    """``value`` as a float if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def positive(
    name: str,
    value: object,
    *,
    allow_zero: bool = False,
    upper: float | None = None,
    error: type[FedguardError] = ConfigError,
) -> float:
    """``value`` as a float if it is finite and > 0 (>= 0 with ``allow_zero``;
    < ``upper`` if given), else ``error`` naming ``name``."""
    number = _number(value)
    if (
        number is None
        or number < 0
        or (number == 0 and not allow_zero)
        or (upper is not None and number >= upper)
    ):
        bound = f" and < {upper:g}" if upper is not None else ""
        raise error(
            f"{name} must be a finite number {'>=' if allow_zero else '>'} 0{bound}, got {value!r}"
        )
    return number


def rate(name: str, value: object, *, error: type[FedguardError] = ConfigError) -> float:
    """``value`` as a float if it lies in (0, 1], else ``error`` naming ``name``."""
    number = _number(value)
    if number is None or not 0.0 < number <= 1.0:
        raise error(f"{name} must be a number in (0, 1], got {value!r}")
    return number


def fraction(name: str, value: object, *, error: type[FedguardError] = ConfigError) -> float:
    """``value`` as a float if it lies in (0, 1), both ends open (a δ, a test share),
    else ``error`` naming ``name``."""
    number = _number(value)
    if number is None or not 0.0 < number < 1.0:
        raise error(f"{name} must lie in (0, 1), got {value!r}")
    return number


def positive_int(
    name: str,
    value: object,
    *,
    allow_zero: bool = False,
    error: type[FedguardError] = ConfigError,
) -> int:
    """``value`` if it is an ``int`` >= 1 (>= 0 with ``allow_zero``; not a bool), else
    ``error`` naming ``name``."""
    least = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise error(f"{name} must be an integer >= {least}, got {value!r}")
    return value
