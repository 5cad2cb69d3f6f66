"""A stateful privacy accountant: which events happened, how often; no formulas.

:class:`PrivacyAccountant` records composed events and asks
:mod:`fedguard.privacy.analysis.dp_sgd` (which asks ``dp_accounting``) for ε.
It stores events, not an accountant's internal numbers, so ε is always
recomputed from the full record (identical mechanisms grouped into one
self-composition, which is exact and fast: see
:func:`~fedguard.privacy.analysis.dp_sgd.compose_grouped`), and the state is
plain JSON that any later fedguard can re-account.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeAlias

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedguard.core.checks import fraction, positive_int
from fedguard.core.errors import ConfigError, LedgerError, UnsupportedEventError
from fedguard.privacy.analysis import dp_sgd
from fedguard.privacy.events import (
    DpFedAvgRound,
    DpSgdRound,
    GaussianRelease,
    event_from_json,
    event_to_json,
)

__all__ = ["AccountantKind", "AnyEvent", "PrivacyAccountant"]

AnyEvent: TypeAlias = DpSgdRound | DpFedAvgRound | GaussianRelease | dp_accounting.DpEvent

_STATE_VERSION = 1


class AccountantKind(StrEnum):
    """Which dp_accounting accountant turns events into ε."""

    PLD = "pld"  # privacy loss distributions: tight; fedguard's default and what it enforces
    RDP = "rdp"  # Rényi DP: looser; for comparison with Opacus's RDP accountant


def _as_dp_event(event: object) -> dp_accounting.DpEvent:
    if isinstance(event, (DpSgdRound, DpFedAvgRound, GaussianRelease)):
        return event.to_dp_event()
    if isinstance(event, dp_accounting.DpEvent):
        return event
    raise UnsupportedEventError(
        f"not a privacy event: {event!r} (expected DpSgdRound, DpFedAvgRound, "
        f"GaussianRelease or a dp_accounting DpEvent)"
    )


class PrivacyAccountant:
    """Composes privacy events and reports ε (default: PLD, discretization 1e-4).

    ``compose`` dry-runs every event through a fresh dp_accounting accountant of
    the chosen kind before recording it, so an unsupported event is refused
    (``UnsupportedEventError`` naming the sub-event) and the record never holds
    something ε cannot be computed for.
    """

    def __init__(
        self,
        kind: AccountantKind = AccountantKind.PLD,
        value_discretization_interval: float = dp_sgd.REPORTING_DISCRETIZATION,
    ) -> None:
        if not isinstance(kind, AccountantKind):
            raise ConfigError(f"kind must be an AccountantKind, got {kind!r}")
        if not (
            isinstance(value_discretization_interval, float) and value_discretization_interval > 0
        ):
            raise ConfigError(
                "value_discretization_interval must be a float > 0, got "
                f"{value_discretization_interval!r}"
            )
        self._kind = kind
        self._interval = value_discretization_interval
        self._events: list[tuple[AnyEvent, int]] = []
        self._epsilon_cache: dict[float, float] = {}

    @property
    def kind(self) -> AccountantKind:
        return self._kind

    @property
    def value_discretization_interval(self) -> float:
        return self._interval

    @property
    def events(self) -> tuple[tuple[AnyEvent, int], ...]:
        """Composed events with their total counts; equal events appear once."""
        return tuple(self._events)

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        if self._kind is AccountantKind.PLD:
            return pld_privacy_accountant.PLDAccountant(
                value_discretization_interval=self._interval
            )
        return rdp_privacy_accountant.RdpAccountant()

    def _problem(self, event: dp_accounting.DpEvent, count: int) -> str | None:
        # dp_accounting's dry run: _maybe_compose(..., do_compose=False) walks the
        # event, changes nothing, and names the first sub-event it cannot handle.
        details = self._fresh()._maybe_compose(event, count, False)
        if details is None:
            return None
        return (
            f"the {self._kind.value.upper()} accountant cannot compose sub-event "
            f"{details.invalid_event!r}: {details.error_message} (in {event!r})"
        )

    def supports(self, event: AnyEvent) -> bool:
        try:
            dp_event = _as_dp_event(event)
        except UnsupportedEventError:
            return False
        return self._problem(dp_event, 1) is None

    def compose(self, event: AnyEvent, count: int = 1) -> None:
        """Record ``count`` repetitions of ``event``; nothing is recorded on error."""
        positive_int("count", count)
        problem = self._problem(_as_dp_event(event), count)
        if problem is not None:
            raise UnsupportedEventError(problem)
        for i, (known, total) in enumerate(self._events):
            if type(known) is type(event) and known == event:
                self._events[i] = (known, total + count)
                break
        else:
            self._events.append((event, count))
        self._epsilon_cache.clear()

    def composed_event(self) -> dp_accounting.DpEvent:
        """Everything composed so far as one dp_accounting event (mechanisms grouped)."""
        return dp_sgd.compose_grouped((_as_dp_event(e), c) for e, c in self._events)

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` of everything composed so far; 0.0 when nothing was."""
        key = fraction("delta", delta)
        if not self._events:
            return 0.0
        if key not in self._epsilon_cache:
            event = self.composed_event()
            if self._kind is AccountantKind.PLD:
                eps = dp_sgd.epsilon_pld(event, key, value_discretization_interval=self._interval)
            else:
                eps = dp_sgd.epsilon_rdp(event, key)
            self._epsilon_cache[key] = eps
        return self._epsilon_cache[key]

    # ----------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the kind, the interval and the events with counts."""
        return {
            "version": _STATE_VERSION,
            "kind": self._kind.value,
            "value_discretization_interval": self._interval,
            "events": [{"event": event_to_json(e), "count": c} for e, c in self._events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this accountant's record by ``state`` (validated before anything changes).

        Raises ``LedgerError`` if the state is malformed, of an unknown version,
        or from an accountant of another kind or discretization (ε would change
        silently).
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise LedgerError(
                f"unknown accountant state (version {_get(state, 'version')!r}; "
                f"expected {_STATE_VERSION})"
            )
        if state.get("kind") != self._kind.value:
            raise LedgerError(
                f"accountant state is for kind {state.get('kind')!r}, this accountant is "
                f"{self._kind.value!r}"
            )
        if state.get("value_discretization_interval") != self._interval:
            raise LedgerError(
                "accountant state has value_discretization_interval "
                f"{state.get('value_discretization_interval')!r}, this accountant "
                f"{self._interval!r}"
            )
        rows = state.get("events")
        if not isinstance(rows, list):
            raise LedgerError("accountant state has no list of events")
        fresh = PrivacyAccountant(self._kind, self._interval)
        for row in rows:
            if not isinstance(row, Mapping) or set(row) != {"event", "count"}:
                raise LedgerError(f"malformed accountant state row {row!r}")
            count = row["count"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise LedgerError(f"malformed count in accountant state row {row!r}")
            try:
                fresh.compose(event_from_json(row["event"]), count)
            except UnsupportedEventError as exc:
                raise LedgerError(f"accountant state holds an unsupported event: {exc}") from exc
        self._events = fresh._events
        self._epsilon_cache.clear()


def _get(state: object, key: str) -> object:
    return state.get(key) if isinstance(state, Mapping) else None
