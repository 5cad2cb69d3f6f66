"""fedguard's privacy events: what one round of training costs, as data.

Stability contract
------------------
These events are written to disk (the per-silo privacy ledger, the server's
accountant checkpoint) and read back by later versions of fedguard, possibly
years later, to decide whether a silo may train again. So:

* The ``type`` tag of a serialized event and each field's **name, unit and
  meaning never change**. ``dp-sgd-round`` always means one round of DP-SGD
  with Poisson sampling of examples (Abadi et al., CCS 2016) at rate
  ``sample_rate``, Gaussian noise of standard deviation
  ``noise_multiplier × clip norm`` on each step's clipped gradient sum, for
  ``steps`` steps; ``dp-fedavg-round`` always means one round of DP-FedAvg
  (McMahan et al., ICLR 2018) with Poisson client sampling at rate
  ``client_sampling_rate`` and Gaussian noise of ``noise_multiplier × clip norm``
  on the sum of clipped updates; ``gaussian-release`` always means ``count``
  independent releases of the Gaussian mechanism (Dwork & Roth, "The
  Algorithmic Foundations of Differential Privacy", 2014, Thm. A.1; Balle & Wang,
  ICML 2018 for the exact analysis dp_accounting implements), each adding
  N(0, (``noise_multiplier`` × its L2 sensitivity)²) to a statistic of the
  silo's records, with no sampling (every record takes part).
* Every serialized form carries ``"version"``. A change of meaning, or a new
  field, is a new version (or a new type); readers **reject** versions and types
  they do not know, and fields they do not expect, with
  :class:`~fedguard.core.errors.LedgerError`: an event that cannot be
  understood is never silently accounted for as something else. (Reading is
  data from disk, so a bad record means the stored state is corrupt or from a
  newer fedguard: hence ``LedgerError``, not ``ConfigError``; a value out of
  range while *constructing* an event in code raises ``ConfigError``.)
* Events are frozen; floats are stored as Python floats and compare exactly
  (JSON round-trips an IEEE double exactly), so two records of the same round
  are equal, which the accountant uses to group them.
* The mapping to a ``dp_accounting`` event is given by ``to_dp_event`` and never
  changes for a given version.

Arbitrary ``dp_accounting`` events (for the accountant's checkpoint) are
serialized by :func:`dp_event_to_json` as ``{"type": "dp-accounting-event",
"version": 1, "event": {...}}``; only classes of ``dp_accounting.dp_event`` are
accepted back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import attr
import dp_accounting
from dp_accounting import dp_event as _dp_event_module

from fedguard.core.checks import positive, positive_int, rate
from fedguard.core.errors import ConfigError, LedgerError
from fedguard.privacy.analysis.dp_sgd import dp_fedavg_event, dp_sgd_event

__all__ = [
    "DpFedAvgRound",
    "DpSgdRound",
    "FedguardEvent",
    "GaussianRelease",
    "dp_event_from_json",
    "dp_event_to_json",
    "event_from_json",
    "event_to_json",
]

JsonDict: TypeAlias = dict[str, Any]


def _check_header(data: object, type_tag: str, version: int, fields: set[str]) -> JsonDict:
    if not isinstance(data, dict):
        raise LedgerError(f"a {type_tag} event must be a JSON object, got {data!r}")
    if data.get("type") != type_tag:
        raise LedgerError(f"expected event type {type_tag!r}, got {data.get('type')!r}")
    if data.get("version") != version or isinstance(data.get("version"), bool):
        raise LedgerError(
            f"unknown {type_tag} event version {data.get('version')!r}; this fedguard "
            f"reads version {version} (was the state written by a newer fedguard?)"
        )
    expected = fields | {"type", "version"}
    if set(data) != expected:
        missing = sorted(expected - set(data))
        extra = sorted(set(data) - expected)
        raise LedgerError(f"malformed {type_tag} event: missing {missing}, unexpected {extra}")
    return data


@dataclass(frozen=True)
class DpSgdRound:
    """One silo's round of DP-SGD: ``steps`` Poisson-sampled steps (sample-level DP)."""

    TYPE: ClassVar[str] = "dp-sgd-round"
    VERSION: ClassVar[int] = 1

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", rate("sample_rate", self.sample_rate))
        object.__setattr__(
            self, "noise_multiplier", positive("noise_multiplier", self.noise_multiplier)
        )
        positive_int("steps", self.steps)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        return dp_sgd_event(self.sample_rate, self.noise_multiplier, self.steps)

    def to_json(self) -> JsonDict:
        return {
            "type": self.TYPE,
            "version": self.VERSION,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
        }

    @classmethod
    def from_json(cls, data: object) -> DpSgdRound:
        d = _check_header(data, cls.TYPE, cls.VERSION, {"sample_rate", "noise_multiplier", "steps"})
        try:
            return cls(d["sample_rate"], d["noise_multiplier"], d["steps"])
        except ConfigError as exc:
            raise LedgerError(f"invalid {cls.TYPE} event {d!r}: {exc}") from exc


@dataclass(frozen=True)
class DpFedAvgRound:
    """One round of central DP-FedAvg (user/silo-level DP, Poisson client sampling)."""

    TYPE: ClassVar[str] = "dp-fedavg-round"
    VERSION: ClassVar[int] = 1

    client_sampling_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "client_sampling_rate",
            rate("client_sampling_rate", self.client_sampling_rate),
        )
        object.__setattr__(
            self, "noise_multiplier", positive("noise_multiplier", self.noise_multiplier)
        )

    def to_dp_event(self) -> dp_accounting.DpEvent:
        return dp_fedavg_event(self.client_sampling_rate, self.noise_multiplier, 1)

    def to_json(self) -> JsonDict:
        return {
            "type": self.TYPE,
            "version": self.VERSION,
            "client_sampling_rate": self.client_sampling_rate,
            "noise_multiplier": self.noise_multiplier,
        }

    @classmethod
    def from_json(cls, data: object) -> DpFedAvgRound:
        d = _check_header(data, cls.TYPE, cls.VERSION, {"client_sampling_rate", "noise_multiplier"})
        try:
            return cls(d["client_sampling_rate"], d["noise_multiplier"])
        except ConfigError as exc:
            raise LedgerError(f"invalid {cls.TYPE} event {d!r}: {exc}") from exc


@dataclass(frozen=True)
class GaussianRelease:
    """``count`` Gaussian-mechanism releases of statistics of one silo's records.

    A silo's fairness counts, drift histograms or summed attributions: the silo adds
    N(0, (σ·Δ)²) to each vector itself (Δ its L2 sensitivity to adding or removing
    one record) before the vector is summed by secure aggregation. ``count`` > 1
    when one release holds several independent queries, each noised with σ at its
    own sensitivity (composed ``count`` times).
    """

    TYPE: ClassVar[str] = "gaussian-release"
    VERSION: ClassVar[int] = 1

    noise_multiplier: float
    count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", positive("noise_multiplier", self.noise_multiplier)
        )
        positive_int("count", self.count)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.count == 1:
            return gaussian
        return dp_accounting.SelfComposedDpEvent(gaussian, self.count)

    def to_json(self) -> JsonDict:
        return {
            "type": self.TYPE,
            "version": self.VERSION,
            "noise_multiplier": self.noise_multiplier,
            "count": self.count,
        }

    @classmethod
    def from_json(cls, data: object) -> GaussianRelease:
        d = _check_header(data, cls.TYPE, cls.VERSION, {"noise_multiplier", "count"})
        try:
            return cls(d["noise_multiplier"], d["count"])
        except ConfigError as exc:
            raise LedgerError(f"invalid {cls.TYPE} event {d!r}: {exc}") from exc


FedguardEvent: TypeAlias = DpSgdRound | DpFedAvgRound | GaussianRelease

# --------------------------------------------------------------------------- dp_accounting events

_DP_EVENT_TYPE = "dp-accounting-event"
_DP_EVENT_VERSION = 1


def _encode(value: object) -> object:
    if isinstance(value, dp_accounting.DpEvent):
        cls = type(value)
        if getattr(_dp_event_module, cls.__name__, None) is not cls:
            raise ConfigError(f"only dp_accounting.dp_event classes serialize, got {cls!r}")
        out: JsonDict = {"class": cls.__name__}
        for field in attr.fields(cls):
            out[field.name] = _encode(getattr(value, field.name))
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"cannot serialize {value!r} inside a DpEvent")


def _decode(value: object) -> object:
    if isinstance(value, dict):
        name = value.get("class")
        cls = getattr(_dp_event_module, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)):
            raise LedgerError(f"unknown dp_accounting event class {name!r}")
        kwargs = {k: _decode(v) for k, v in value.items() if k != "class"}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise LedgerError(f"malformed {name} event {value!r}: {exc}") from exc
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dp_event_to_json(event: dp_accounting.DpEvent) -> JsonDict:
    """A JSON-able form of a ``dp_accounting`` event (classes of ``dp_event`` only)."""
    return {"type": _DP_EVENT_TYPE, "version": _DP_EVENT_VERSION, "event": _encode(event)}


def dp_event_from_json(data: object) -> dp_accounting.DpEvent:
    d = _check_header(data, _DP_EVENT_TYPE, _DP_EVENT_VERSION, {"event"})
    event = _decode(d["event"])
    if not isinstance(event, dp_accounting.DpEvent):
        raise LedgerError(f"not a dp_accounting event: {d['event']!r}")
    return event


def event_to_json(event: FedguardEvent | dp_accounting.DpEvent) -> JsonDict:
    if isinstance(event, (DpSgdRound, DpFedAvgRound, GaussianRelease)):
        return event.to_json()
    return dp_event_to_json(event)


def event_from_json(data: object) -> FedguardEvent | dp_accounting.DpEvent:
    """Read any serialized event; unknown types and versions raise LedgerError."""
    tag = data.get("type") if isinstance(data, dict) else None
    if tag == DpSgdRound.TYPE:
        return DpSgdRound.from_json(data)
    if tag == DpFedAvgRound.TYPE:
        return DpFedAvgRound.from_json(data)
    if tag == GaussianRelease.TYPE:
        return GaussianRelease.from_json(data)
    if tag == _DP_EVENT_TYPE:
        return dp_event_from_json(data)
    raise LedgerError(f"unknown privacy event type {tag!r} in {data!r}")
