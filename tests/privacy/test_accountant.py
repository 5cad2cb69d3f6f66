"""PrivacyAccountant (state, grouping, dry runs, checkpoints) and the event contract."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from opacus.accountants.rdp import RDPAccountant as OpacusRDPAccountant

from fedguard.core.errors import ConfigError, LedgerError, UnsupportedEventError
from fedguard.privacy.accountant import AccountantKind, PrivacyAccountant
from fedguard.privacy.analysis.dp_sgd import (
    dp_fedavg_event,
    dp_sgd_event,
    epsilon_pld,
    epsilon_rdp,
)
from fedguard.privacy.events import (
    DpFedAvgRound,
    DpSgdRound,
    dp_event_from_json,
    dp_event_to_json,
    event_from_json,
)

DELTA = 1e-5
# Large σ keeps every PLD here cheap (a few ms).
ROUND = DpSgdRound(0.05, 6.0, 20)
OTHER = DpSgdRound(0.05, 8.0, 20)
CENTRAL = DpFedAvgRound(0.2, 8.0)
FIXED_SIZE = dp_accounting.SampledWithoutReplacementDpEvent(
    1000, 10, dp_accounting.GaussianDpEvent(1.0)
)

KINDS = [AccountantKind.PLD, AccountantKind.RDP]


def _reference_epsilon(kind: AccountantKind, event: dp_accounting.DpEvent) -> float:
    return epsilon_pld(event, DELTA) if kind is AccountantKind.PLD else epsilon_rdp(event, DELTA)


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("kind", KINDS)
def test_k_identical_rounds_equal_one_self_composition(kind: AccountantKind) -> None:
    accountant = PrivacyAccountant(kind)
    for _ in range(7):
        accountant.compose(ROUND)
    expected = _reference_epsilon(kind, dp_sgd_event(0.05, 6.0, 7 * 20))
    assert accountant.epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    assert accountant.events == ((ROUND, 7),)


@pytest.mark.parametrize("kind", KINDS)
def test_grouping_is_exact_against_dp_accounting_one_by_one(kind: AccountantKind) -> None:
    """fedguard groups; dp_accounting composed event by event gives the same ε."""
    raw: dp_accounting.PrivacyAccountant = (
        dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        if kind is AccountantKind.PLD
        else dp_accounting.rdp.RdpAccountant()
    )
    ours = PrivacyAccountant(kind)
    for event in [ROUND, OTHER, ROUND, ROUND, OTHER]:
        raw.compose(event.to_dp_event())
        ours.compose(event)
    assert ours.events == ((ROUND, 3), (OTHER, 2))
    assert ours.epsilon(DELTA) == pytest.approx(raw.get_epsilon(DELTA), abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "event",
    [
        ROUND,
        CENTRAL,
        DpFedAvgRound(1.0, 8.0),
        dp_accounting.GaussianDpEvent(8.0),
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(8.0)),
        dp_accounting.LaplaceDpEvent(20.0),
    ],
    ids=["dp-sgd", "dp-fedavg", "dp-fedavg-q1", "gaussian", "poisson-gaussian", "laplace"],
)
def test_count_is_honoured_for_every_event_type(kind: AccountantKind, event: object) -> None:
    """compose(e, 3) == compose(e) three times == SelfComposed(e, 3), and > compose(e).

    REFERENCE warns that some dp_accounting accountants ignore ``count`` for some
    event types; this pins that they do not for the types fedguard uses.
    """
    once = PrivacyAccountant(kind)
    once.compose(event)
    counted = PrivacyAccountant(kind)
    counted.compose(event, count=3)
    repeated = PrivacyAccountant(kind)
    for _ in range(3):
        repeated.compose(event)
    dp_event = event.to_dp_event() if hasattr(event, "to_dp_event") else event
    self_composed = _reference_epsilon(kind, dp_accounting.SelfComposedDpEvent(dp_event, 3))
    assert counted.epsilon(DELTA) == pytest.approx(self_composed, rel=1e-9)
    assert repeated.epsilon(DELTA) == pytest.approx(self_composed, rel=1e-9)
    assert counted.epsilon(DELTA) > once.epsilon(DELTA) * 1.2


def test_heterogeneous_events() -> None:
    accountant = PrivacyAccountant()
    accountant.compose(ROUND, 2)
    accountant.compose(OTHER)
    expected = epsilon_pld(
        dp_accounting.ComposedDpEvent([dp_sgd_event(0.05, 6.0, 40), dp_sgd_event(0.05, 8.0, 20)]),
        DELTA,
    )
    assert accountant.epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    alone = [
        epsilon_pld(dp_sgd_event(0.05, 6.0, 40), DELTA),
        epsilon_pld(OTHER.to_dp_event(), DELTA),
    ]
    assert max(alone) < accountant.epsilon(DELTA) <= sum(alone)


def test_rdp_kind_matches_opacus_rdp_accountant_on_mixed_history() -> None:
    opacus = OpacusRDPAccountant()
    ours = PrivacyAccountant(AccountantKind.RDP)
    for event in [ROUND, OTHER, ROUND]:
        for _ in range(event.steps):
            opacus.step(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate)
        ours.compose(event)
    assert ours.epsilon(DELTA) == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-6)


def test_central_rounds_compose_like_dp_fedavg() -> None:
    accountant = PrivacyAccountant()
    for _ in range(10):
        accountant.compose(CENTRAL)
    assert accountant.epsilon(1e-3) == pytest.approx(
        epsilon_pld(dp_fedavg_event(0.2, 8.0, 10), 1e-3), rel=1e-12
    )


def test_empty_accountant_and_bad_arguments() -> None:
    accountant = PrivacyAccountant()
    assert accountant.epsilon(DELTA) == 0.0
    assert accountant.events == ()
    with pytest.raises(ConfigError):
        accountant.epsilon(0.0)
    with pytest.raises(ConfigError):
        accountant.compose(ROUND, 0)
    with pytest.raises(ConfigError):
        accountant.compose(ROUND, True)
    with pytest.raises(UnsupportedEventError):
        accountant.compose("not an event")
    with pytest.raises(ConfigError):
        PrivacyAccountant("pld")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dry run


@pytest.mark.parametrize(
    ("kind", "bad", "named"),
    [
        (AccountantKind.PLD, FIXED_SIZE, "SampledWithoutReplacementDpEvent"),
        (AccountantKind.RDP, FIXED_SIZE, "SampledWithoutReplacementDpEvent"),
        (
            AccountantKind.PLD,
            dp_accounting.dp_event.RepeatAndSelectDpEvent(
                dp_accounting.GaussianDpEvent(1.0), 3.0, 1.0
            ),
            "RepeatAndSelectDpEvent",
        ),
        (AccountantKind.PLD, dp_accounting.UnsupportedDpEvent(), "UnsupportedDpEvent"),
    ],
)
def test_dry_run_names_the_unsupported_sub_event(
    kind: AccountantKind, bad: dp_accounting.DpEvent, named: str
) -> None:
    accountant = PrivacyAccountant(kind)
    accountant.compose(ROUND)
    before = accountant.epsilon(DELTA)
    nested = dp_accounting.ComposedDpEvent([ROUND.to_dp_event(), bad])
    assert not accountant.supports(nested)
    with pytest.raises(UnsupportedEventError, match=named):
        accountant.compose(nested)
    # Nothing was composed: same record, same ε.
    assert accountant.events == ((ROUND, 1),)
    assert accountant.epsilon(DELTA) == before


def test_supports() -> None:
    accountant = PrivacyAccountant()
    assert accountant.supports(ROUND)
    assert accountant.supports(CENTRAL)
    assert accountant.supports(dp_accounting.LaplaceDpEvent(1.0))
    assert not accountant.supports(FIXED_SIZE)
    assert not accountant.supports("nope")
    assert PrivacyAccountant(AccountantKind.RDP).supports(
        dp_accounting.dp_event.RepeatAndSelectDpEvent(dp_accounting.GaussianDpEvent(1.0), 3.0, 1.0)
    )


# --------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_through_json() -> None:
    accountant = PrivacyAccountant()
    accountant.compose(CENTRAL, 3)
    accountant.compose(ROUND)
    raw = dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(6.0))
    accountant.compose(raw, 2)
    state = json.loads(json.dumps(accountant.state_dict()))
    restored = PrivacyAccountant()
    restored.compose(OTHER)  # replaced by the load
    restored.load_state_dict(state)
    assert restored.events == accountant.events
    assert restored.epsilon(DELTA) == accountant.epsilon(DELTA)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(version=2), "version"),
        (lambda s: s.update(kind="rdp"), "kind"),
        (lambda s: s.update(value_discretization_interval=1e-3), "discretization"),
        (lambda s: s.update(events="x"), "events"),
        (lambda s: s["events"].append({"event": ROUND.to_json(), "count": 0}), "count"),
        (lambda s: s["events"].append({"event": {"type": "dp-sgd-round"}}), "malformed"),
        (
            lambda s: s["events"].append({"event": dp_event_to_json(FIXED_SIZE), "count": 1}),
            "unsupported",
        ),
    ],
)
def test_load_state_dict_rejects_bad_state(mutate: object, message: str) -> None:
    accountant = PrivacyAccountant()
    accountant.compose(ROUND)
    state = accountant.state_dict()
    mutate(state)  # type: ignore[operator]
    target = PrivacyAccountant()
    target.compose(OTHER)
    with pytest.raises(LedgerError, match=message):
        target.load_state_dict(state)
    assert target.events == ((OTHER, 1),)  # unchanged


# --------------------------------------------------------------------------- event contract


@pytest.mark.parametrize("event", [ROUND, CENTRAL, DpSgdRound(1, 2, 3)])
def test_event_json_round_trip(event: DpSgdRound | DpFedAvgRound) -> None:
    data = json.loads(json.dumps(event.to_json()))
    assert data["version"] == 1
    assert data["type"] in {"dp-sgd-round", "dp-fedavg-round"}
    assert type(event).from_json(data) == event
    assert event_from_json(data) == event


def test_event_json_form_is_stable() -> None:
    # The stability contract: these exact forms must always read back.
    assert ROUND.to_json() == {
        "type": "dp-sgd-round",
        "version": 1,
        "sample_rate": 0.05,
        "noise_multiplier": 6.0,
        "steps": 20,
    }
    assert CENTRAL.to_json() == {
        "type": "dp-fedavg-round",
        "version": 1,
        "client_sampling_rate": 0.2,
        "noise_multiplier": 8.0,
    }


@pytest.mark.parametrize(
    "data",
    [
        {**ROUND.to_json(), "version": 2},
        {**ROUND.to_json(), "version": True},
        {**ROUND.to_json(), "type": "dp-sgd-epoch"},
        {**ROUND.to_json(), "clip_norm": 1.0},
        {k: v for k, v in ROUND.to_json().items() if k != "steps"},
        {**ROUND.to_json(), "steps": 0},
        {**ROUND.to_json(), "sample_rate": 2.0},
        [1, 2],
    ],
)
def test_unknown_or_malformed_events_are_rejected(data: object) -> None:
    with pytest.raises(LedgerError):
        DpSgdRound.from_json(data)
    with pytest.raises(LedgerError):
        event_from_json(data)


@pytest.mark.parametrize(
    "args",
    [(0.0, 1.0, 1), (1.1, 1.0, 1), (0.1, 0.0, 1), (0.1, float("nan"), 1), (0.1, 1.0, 0)],
)
def test_invalid_events_are_config_errors(args: tuple[float, float, int]) -> None:
    with pytest.raises(ConfigError):
        DpSgdRound(*args)


def test_fedavg_round_validation_and_event() -> None:
    with pytest.raises(ConfigError):
        DpFedAvgRound(0.0, 1.0)
    with pytest.raises(ConfigError):
        DpFedAvgRound(0.5, -1.0)
    assert CENTRAL.to_dp_event() == dp_fedavg_event(0.2, 8.0, 1)
    assert ROUND.to_dp_event() == dp_sgd_event(0.05, 6.0, 20)


def test_events_are_frozen_and_hashable() -> None:
    with pytest.raises(AttributeError):
        ROUND.steps = 5  # type: ignore[misc]
    assert len({ROUND, DpSgdRound(0.05, 6, 20), OTHER}) == 2


def test_dp_event_json_accepts_only_dp_accounting_classes() -> None:
    nested = dp_accounting.ComposedDpEvent([ROUND.to_dp_event(), FIXED_SIZE])
    assert dp_event_from_json(json.loads(json.dumps(dp_event_to_json(nested)))) == nested
    forged = {"type": "dp-accounting-event", "version": 1, "event": {"class": "Popen"}}
    with pytest.raises(LedgerError):
        dp_event_from_json(forged)
