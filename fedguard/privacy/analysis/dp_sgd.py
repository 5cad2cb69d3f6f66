"""Privacy analysis of DP-SGD and DP-FedAvg: pure functions, no state.

Every formula is delegated to Google's ``dp_accounting`` (version 0.6.0); this
module only builds the :class:`dp_accounting.DpEvent` that describes a training
procedure, asks an accountant for its ε, and searches over the noise multiplier.
Nothing here re-derives an RDP or PLD bound. The stateful wrappers live in
:mod:`fedguard.privacy.accountant` and :mod:`fedguard.privacy.ledger` (the same
split as Opacus's ``accountants/analysis/rdp.py`` against ``accountants/rdp.py``).

References
----------
* Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD,
  Algorithm 1): each step clips per-example gradients to norm C and adds
  N(0, σ²C²) to their sum; the batch is a Poisson sample of rate q.
* Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian
  Mechanism", arXiv 1908.10530 (2019): the RDP of the Poisson-subsampled Gaussian,
  implemented by ``dp_accounting.rdp.RdpAccountant``.
* Koskela, Jälkö, Honkela, "Computing Tight Differential Privacy Guarantees Using
  FFT", AISTATS 2020, and Doroshenko, Ghazi, Kamath, Kumar, Manurangsi,
  "Connect the Dots: Tighter Discrete Approximations of Privacy Loss
  Distributions", PETS 2022: the privacy-loss-distribution (PLD) accountant,
  ``dp_accounting.pld.PLDAccountant`` (pessimistic estimate: the reported ε is an
  upper bound up to the discretization, which rounds privacy losses up).
* McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
  Language Models", ICLR 2018 (DP-FedAvg, user-level DP, Poisson client sampling).

All ε are for the add-or-remove-one neighbouring relation (dp_accounting's
default), which is what the Poisson-subsampled Gaussian analyses assume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedguard.core.checks import fraction, positive, positive_int, rate
from fedguard.core.errors import InfeasibleBudgetError, UnsupportedEventError

__all__ = [
    "MIN_NOISE_MULTIPLIER",
    "REPORTING_DISCRETIZATION",
    "SEARCH_DISCRETIZATION",
    "calibrate_noise_multiplier",
    "compose_grouped",
    "dp_fedavg_event",
    "dp_sgd_event",
    "epsilon_pld",
    "epsilon_rdp",
    "poisson_schedule",
]

#: PLD discretization interval of every ε fedguard reports or enforces.
REPORTING_DISCRETIZATION = 1e-4
#: Coarser PLD discretization used only while searching for σ (then verified at
#: :data:`REPORTING_DISCRETIZATION`).
SEARCH_DISCRETIZATION = 1e-3
#: The calibration never returns a σ below this. DP-SGD is run at σ ≥ 0.5 in
#: practice; below it one step alone costs ε of several units at q = 0.01
#: (ε = 3.0 at σ = 0.5, 10.5 at σ = 0.3, δ = 1e-5), and a PLD at such σ takes
#: seconds to compute at the reporting discretization. If a budget would allow
#: less noise, this σ is returned: more noise than needed, never less.
MIN_NOISE_MULTIPLIER = 0.5

# Relative precision of the σ search (brentq works on log σ).
_LOG_SIGMA_TOLERANCE = 1e-3
# Step by which σ is raised when the search result does not verify.
_VERIFY_STEP = 1.002
_VERIFY_MAX_TRIES = 200
# Relative slack below the target that triggers a second search at the reporting
# discretization.
_REFINE_SLACK = 0.005


# --------------------------------------------------------------------------- validation


def _check_event(event: object) -> dp_accounting.DpEvent:
    if not isinstance(event, dp_accounting.DpEvent):
        raise UnsupportedEventError(f"not a dp_accounting DpEvent: {event!r}")
    return event


# --------------------------------------------------------------------------- schedules


def poisson_schedule(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample_rate, steps) of ``local_epochs`` epochs of Opacus's Poisson DataLoader.

    Mirrors Opacus 1.6.0 exactly, which is what trains (``make_private(...,
    poisson_sampling=True)`` calls ``DPDataLoader.from_data_loader``):

    * ``opacus/data_loader.py``, ``DPDataLoader.from_data_loader``:
      ``sample_rate = 1 / len(data_loader)``, where for a map-style data set with
      ``drop_last=False`` torch gives ``len(data_loader) = ceil(n / B)``;
    * ``opacus/utils/uniform_sampler.py``, ``UniformWithReplacementSampler``:
      ``steps = int(1 / sample_rate)`` batches per epoch.

    ``int(1 / (1 / L))`` is ``L - 1`` for some L (93, 99, 105, ...: the float
    reciprocal rounds down), and then Opacus runs one batch fewer per epoch; this
    function reproduces that, so the ledger charges the steps that really run.
    The expected batch size is ``q·n``, close to but not exactly ``B``.
    """
    n = positive_int("num_examples", num_examples)
    b = positive_int("batch_size", batch_size)
    epochs = positive_int("local_epochs", local_epochs)
    batches = math.ceil(n / b)  # len(DataLoader(dataset, batch_size=b, drop_last=False))
    sample_rate = 1 / batches  # DPDataLoader.from_data_loader
    steps_per_epoch = int(1 / sample_rate)  # UniformWithReplacementSampler.__init__
    return sample_rate, epochs * steps_per_epoch


# --------------------------------------------------------------------------- events


def dp_sgd_event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` steps of DP-SGD with Poisson sampling (Abadi et al., CCS 2016, Alg. 1).

    ``SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)``: each step includes
    every example independently with probability ``q`` and releases the clipped
    gradient sum plus N(0, σ²C²). Sample-level DP, add-or-remove-one.
    """
    q = rate("sample_rate", sample_rate)
    sigma = positive("noise_multiplier", noise_multiplier)
    count = positive_int("steps", steps)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count
    )


def dp_fedavg_event(
    client_sampling_rate: float, noise_multiplier: float, rounds: int
) -> dp_accounting.DpEvent:
    """``rounds`` rounds of DP-FedAvg (McMahan et al., ICLR 2018, Algorithm 1).

    User-level (here: silo-level) DP: each round samples every client
    independently with probability ``client_sampling_rate`` (Poisson), clips each
    update to norm S and adds N(0, z²S²) to the sum with a fixed denominator.
    The event is ``SelfComposed(PoissonSampled(q_c, Gaussian(z)), rounds)``; at
    ``q_c = 1`` (every silo, every round) it is the plain Gaussian mechanism.
    """
    q = rate("client_sampling_rate", client_sampling_rate)
    z = positive("noise_multiplier", noise_multiplier)
    count = positive_int("rounds", rounds)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count
    )


def compose_grouped(parts: Iterable[tuple[dp_accounting.DpEvent, int]]) -> dp_accounting.DpEvent:
    """One event for a sequence of ``(event, count)``, identical mechanisms merged.

    Top-level ``SelfComposedDpEvent`` and ``ComposedDpEvent`` wrappers are
    flattened into ``(mechanism, count)``; equal mechanisms (say the same
    ``PoissonSampled(q, Gaussian(σ))`` from different rounds) have their counts
    summed, and the result is ``Composed([SelfComposed(m, total_m), ...])`` in
    order of first appearance. Nothing inside a sampling event is touched.

    This is exact, not an approximation: adaptive composition of mechanisms is
    commutative and associative for both accountants (PLD composition is a
    convolution of privacy-loss distributions, RDP composition a sum), and
    composing k copies of one mechanism is by definition its k-fold
    self-composition (dp_accounting, ``SelfComposedDpEvent`` docstring). It is
    much faster: dp_accounting self-composes one PLD in a single FFT power instead
    of convolving k PLDs one by one (measured: 20 rounds of 20 steps, 0.6 s
    grouped against 10 s one by one, same ε to 1e-9).
    """
    mechanisms: list[dp_accounting.DpEvent] = []  # DpEvents may be unhashable: no dict
    totals: list[int] = []

    def add(event: dp_accounting.DpEvent, count: int) -> None:
        if isinstance(event, dp_accounting.NoOpDpEvent) or count == 0:
            return
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            add(event.event, event.count * count)
            return
        if isinstance(event, dp_accounting.ComposedDpEvent):
            for inner in event.events:
                add(inner, count)
            return
        for i, known in enumerate(mechanisms):
            if known == event:
                totals[i] += count
                return
        mechanisms.append(event)
        totals.append(count)

    for event, count in parts:
        add(_check_event(event), positive_int("count", count, allow_zero=True))
    composed = [
        dp_accounting.SelfComposedDpEvent(m, c) for m, c in zip(mechanisms, totals, strict=True)
    ]
    if not composed:
        return dp_accounting.NoOpDpEvent()
    if len(composed) == 1:
        return composed[0]
    return dp_accounting.ComposedDpEvent(composed)


# --------------------------------------------------------------------------- epsilon


def _compose_or_raise(
    accountant: dp_accounting.PrivacyAccountant, event: dp_accounting.DpEvent
) -> dp_accounting.PrivacyAccountant:
    # Dry run first (dp_accounting's _maybe_compose(..., do_compose=False)) so the
    # error names the offending sub-event and nothing is composed.
    problem = accountant._maybe_compose(event, 1, False)
    if problem is not None:
        raise UnsupportedEventError(
            f"{type(accountant).__name__} cannot compose {problem.invalid_event!r}: "
            f"{problem.error_message}"
        )
    accountant.compose(event)
    return accountant


def epsilon_pld(
    event: dp_accounting.DpEvent,
    delta: float,
    value_discretization_interval: float = REPORTING_DISCRETIZATION,
) -> float:
    """ε at ``delta`` from dp_accounting 0.6.0's ``PLDAccountant`` (pessimistic estimate).

    The discretization interval is passed by keyword: ``PLDAccountant``'s first
    positional argument is the neighbouring relation.
    """
    d = fraction("delta", delta)
    interval = positive("value_discretization_interval", value_discretization_interval)
    # A PLD composition costs up to seconds, and a silo asks for the same one several
    # times per round (affordability check, charge, reports). dp_accounting's events are
    # attrs classes whose repr names the class and every field (floats exactly, nested
    # events and lists in order), so equal reprs are equal compositions.
    key = (repr(_check_event(event)), d, interval)
    cached = _PLD_EPSILONS.get(key)
    if cached is None:
        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
        cached = float(_compose_or_raise(accountant, event).get_epsilon(d))
        if len(_PLD_EPSILONS) >= _PLD_CACHE_SIZE:
            _PLD_EPSILONS.pop(next(iter(_PLD_EPSILONS)))  # oldest first
        _PLD_EPSILONS[key] = cached
    return cached


#: epsilon_pld's results, by (repr of the event, δ, discretization interval).
_PLD_EPSILONS: dict[tuple[str, float, float], float] = {}
_PLD_CACHE_SIZE = 4096


def epsilon_rdp(event: dp_accounting.DpEvent, delta: float) -> float:
    """ε at ``delta`` from dp_accounting 0.6.0's ``RdpAccountant`` (default orders).

    RDP-to-(ε, δ) conversion of Canonne, Kamath, Steinke (NeurIPS 2020) as
    implemented by ``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon``.
    Looser than :func:`epsilon_pld`; kept to compare with Opacus's RDP accountant.
    """
    d = fraction("delta", delta)
    accountant = rdp_privacy_accountant.RdpAccountant()
    return float(_compose_or_raise(accountant, _check_event(event)).get_epsilon(d))


# --------------------------------------------------------------------------- calibration


def calibrate_noise_multiplier(
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    max_noise_multiplier: float,
    *,
    prior: Sequence[dp_accounting.DpEvent] = (),
) -> float:
    """Smallest σ with which ``rounds`` rounds of DP-SGD stay within ``target_epsilon``.

    Each round is ``steps_per_round`` Poisson-sampled steps at rate
    ``sample_rate``. ``prior`` is what the silo has already spent (events from its
    ledger); the whole composition must fit, measured exactly as
    :class:`fedguard.privacy.ledger.PrivacyLedger` measures it (PLD at
    :data:`REPORTING_DISCRETIZATION`, identical mechanisms grouped).

    Method: ``dp_accounting.calibrate_dp_mechanism`` (brentq) on log σ with the
    PLD accountant at :data:`SEARCH_DISCRETIZATION` (about 10× faster), to a
    relative precision of 0.1 %; the result is then verified with the reporting
    accountant and raised by 0.2 % steps until it verifies; if instead it verifies
    with more than 0.5 % to spare (the coarse accountant over-rounds at small ε
    over many steps), the search is redone with the reporting accountant, which is
    cheap in that regime (large σ). The returned σ lies in
    ``[MIN_NOISE_MULTIPLIER, max_noise_multiplier]``.

    Raises:
        ConfigError: an argument is out of range.
        InfeasibleBudgetError: even ``max_noise_multiplier`` overspends on one
            round, or on ``rounds`` rounds (the message says how many would fit).
    """
    q = rate("sample_rate", sample_rate)
    steps = positive_int("steps_per_round", steps_per_round)
    n_rounds = positive_int("rounds", rounds)
    target = positive("target_epsilon", target_epsilon)
    d = fraction("delta", delta)
    sigma_max = positive("max_noise_multiplier", max_noise_multiplier)
    prior_parts = [(_check_event(e), 1) for e in prior]

    def event_for(sigma: float, k_rounds: int) -> dp_accounting.DpEvent:
        return compose_grouped([*prior_parts, (dp_sgd_event(q, sigma, k_rounds * steps), 1)])

    def reported(sigma: float, k_rounds: int) -> float:
        return epsilon_pld(event_for(sigma, k_rounds), d, REPORTING_DISCRETIZATION)

    spent_before = epsilon_pld(compose_grouped(prior_parts), d) if prior_parts else 0.0
    already = f" on top of ε={spent_before:.4g} already spent" if prior_parts else ""
    _check_feasible(reported, already, q, steps, n_rounds, target, d, sigma_max)
    return _verified_sigma(lambda sigma: event_for(sigma, n_rounds), target, d, sigma_max)


def _check_feasible(
    reported: Callable[[float, int], float],
    already: str,
    q: float,
    steps: int,
    n_rounds: int,
    target: float,
    d: float,
    sigma_max: float,
) -> None:
    """InfeasibleBudgetError unless ``n_rounds`` rounds at ``sigma_max`` fit ``target``
    (``reported(σ, k)``: the ε of ``k`` rounds at σ, prior spending included)."""
    one_round = reported(sigma_max, 1)
    if one_round > target:
        raise InfeasibleBudgetError(
            f"ε={target:g} (δ={d:g}) cannot support even one round{already}: at q={q:.4g}, "
            f"steps={steps} one round needs σ > max_noise_multiplier={sigma_max:g} "
            f"(at σ={sigma_max:g} it spends ε={one_round:.4g}); raise the budget or "
            f"max_noise_multiplier, or train fewer steps per round (fewer local epochs, "
            f"larger batches)"
        )
    all_rounds = reported(sigma_max, n_rounds)
    if all_rounds > target:
        fit = _max_rounds_within(lambda k: reported(sigma_max, k) <= target, 1, n_rounds)
        raise InfeasibleBudgetError(
            f"ε={target:g} (δ={d:g}) cannot pay for {n_rounds} rounds{already}: at q={q:.4g}, "
            f"steps={steps} per round and σ=max_noise_multiplier={sigma_max:g} only {fit} "
            f"round(s) fit ({n_rounds} rounds spend ε={all_rounds:.4g}); plan at most "
            f"{fit} rounds, or raise the budget or max_noise_multiplier"
        )


def _verified_sigma(
    make_event: Callable[[float], dp_accounting.DpEvent],
    target: float,
    d: float,
    sigma_max: float,
) -> float:
    """The searched σ, verified at :data:`REPORTING_DISCRETIZATION` (raised until it
    verifies, searched again there if it leaves slack); ε(sigma_max) ≤ target."""
    interval = SEARCH_DISCRETIZATION
    if epsilon_pld(make_event(sigma_max), d, interval) > target:
        # The coarser accountant rounds privacy losses up more and overspends even at
        # sigma_max: search with the reporting accountant (cheap at large σ).
        interval = REPORTING_DISCRETIZATION
    sigma = _search_sigma(make_event, target, d, sigma_max, interval, first_step=2.0)
    for _ in range(_VERIFY_MAX_TRIES):
        if sigma >= sigma_max:
            return sigma_max  # verified above
        eps = epsilon_pld(make_event(sigma), d, REPORTING_DISCRETIZATION)
        if eps <= target:
            if interval != REPORTING_DISCRETIZATION and eps < target * (1 - _REFINE_SLACK):
                # The coarse search left slack (it happens at small ε over many steps,
                # where σ is large and the reporting accountant is cheap): search again
                # below sigma with the reporting accountant itself.
                sigma = _search_sigma(
                    make_event, target, d, sigma, REPORTING_DISCRETIZATION, first_step=1.02
                )
            return sigma
        sigma = min(sigma * _VERIFY_STEP, sigma_max)
    return sigma_max  # pragma: no cover - the loop reaches sigma_max first


def _search_sigma(
    make_event: Callable[[float], dp_accounting.DpEvent],
    target: float,
    delta: float,
    sigma_top: float,
    interval: float,
    first_step: float,
) -> float:
    """Smallest σ in [MIN_NOISE_MULTIPLIER, sigma_top] with ε ≤ target at ``interval``.

    Assumes ε(sigma_top) ≤ target. First brackets the crossing, moving down from
    ``sigma_top / first_step`` along a secant of log ε against log σ (ε of the
    subsampled Gaussian is close to a power law in σ, so this needs few and only
    moderately small σ, whose PLDs are the expensive ones), then hands the
    bracket to ``dp_accounting.calibrate_dp_mechanism`` (brentq on log σ).
    """

    def eps(sigma: float) -> float:
        return epsilon_pld(make_event(sigma), delta, interval)

    floor = min(MIN_NOISE_MULTIPLIER, sigma_top)
    hi, e_hi = sigma_top, eps(sigma_top)
    s = max(sigma_top / first_step, floor)
    while True:
        if s >= hi:
            return hi
        e = eps(s)
        if e > target:
            lo, e_lo = s, e
            break
        if s <= floor:
            return floor
        crossing = _power_law_crossing(hi, e_hi, s, e, target)
        predicted = s / 2 if crossing is None else crossing
        hi, e_hi = s, e
        s = max(min(s / 1.02, max(predicted * 0.98, s / 8)), floor)
    for _ in range(2):  # narrow the bracket around the power-law crossing
        if hi / lo <= 1.03:
            break
        guess = _power_law_crossing(lo, e_lo, hi, e_hi, target)
        if guess is None:
            break
        probe = min(max(guess * 1.01, lo * 1.005), hi / 1.005)
        e = eps(probe)
        if e <= target:
            hi, e_hi = probe, e
        else:
            lo, e_lo = probe, e

    def make_fresh() -> dp_accounting.PrivacyAccountant:
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)

    log_sigma = mechanism_calibration.calibrate_dp_mechanism(
        make_fresh,
        lambda u: make_event(math.exp(u)),
        target,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(math.log(lo), math.log(hi)),
        tol=_LOG_SIGMA_TOLERANCE,
    )
    return min(math.exp(float(log_sigma)), sigma_top)


def _power_law_crossing(s1: float, e1: float, s2: float, e2: float, target: float) -> float | None:
    """σ where the line through (log s1, log e1), (log s2, log e2) reaches log target."""
    if min(s1, s2, e1, e2, target) <= 0 or s1 == s2 or e1 == e2:
        return None
    slope = math.log(e2 / e1) / math.log(s2 / s1)
    return float(s2 * (target / e2) ** (1 / slope))


def _max_rounds_within(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest k in [lo, hi) with fits(k), given fits(lo) and not fits(hi).

    Bisection; valid because ε never decreases as rounds are composed.
    """
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
