"""Where everything lives in a run folder (the one place its names are spelled).

A simulated run::

    RUN/report.json, report.md                 the run's report (both variants)
    RUN/<variant>/checkpoints/round-NNNN.*     model, scaler, config, history (runs.checkpoints)
    RUN/<variant>/history.json                 per-round records
    RUN/<variant>/outcome.json                 how the run ended
    RUN/<variant>/silos/silo-K/                each simulated silo's state folder
    RUN/edge/                                  ``fedguard export``'s artifacts

A deployed run folder is one variant folder (its checkpoints, history and outcome).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedguard.core.errors import ConfigError

__all__ = [
    "CHECKPOINTS",
    "EDGE",
    "HISTORY",
    "OUTCOME",
    "REPORT",
    "SILOS",
    "VARIANTS",
    "RunFolder",
    "VariantFolder",
    "silo_id",
    "silo_index",
]

CHECKPOINTS = "checkpoints"
SILOS = "silos"
HISTORY = "history.json"
OUTCOME = "outcome.json"
REPORT = "report.json"
EDGE = "edge"
#: A simulated run's variants, in the order a reader prefers them.
VARIANTS = ("dp", "no-dp")
_SILO_PREFIX = "silo-"


def silo_id(index: int) -> str:
    """The simulated silo id of silo ``index`` (0-based): ``silo-0``, ``silo-1``, ..."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"a silo index is an integer >= 0, got {index!r}")
    return f"{_SILO_PREFIX}{index}"


def silo_index(name: str) -> int:
    """The index of a simulated silo id (the inverse of :func:`silo_id`)."""
    digits = name.removeprefix(_SILO_PREFIX)
    if digits == name or not digits.isdigit() or silo_id(int(digits)) != name:
        raise ConfigError(f"{name!r} is not a simulated silo id (silo-0, silo-1, ...)")
    return int(digits)


@dataclass(frozen=True)
class VariantFolder:
    """One variant's folder (a simulated run's ``dp`` or ``no-dp``, or a deployed run)."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def history(self) -> Path:
        return self.root / HISTORY

    @property
    def outcome(self) -> Path:
        return self.root / OUTCOME

    def silo(self, silo: str) -> Path:
        """A simulated silo's state folder (its ledger, keys and log)."""
        return self.root / SILOS / silo

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir()


@dataclass(frozen=True)
class RunFolder:
    """A simulated run's folder: its report and its variants."""

    root: Path

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def edge(self) -> Path:
        return self.root / EDGE

    def variant(self, name: str) -> VariantFolder:
        if name not in VARIANTS:
            raise ConfigError(f"variant must be one of {list(VARIANTS)}, got {name!r}")
        return VariantFolder(self.root / name)

    def variants_present(self) -> list[str]:
        """The variants that hold checkpoints, in :data:`VARIANTS` order."""
        return [v for v in VARIANTS if self.variant(v).has_checkpoints()]
