"""Privacy analysis of a silo's Gaussian releases of statistics: pure functions.

A release adds N(0, (σ·Δ)²) to a vector statistic of the silo's records (Δ its
L2 sensitivity to adding or removing one record), ``count`` times for
``count`` independent queries. Its (ε, δ) is that of the Gaussian mechanism
(Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy:
Analytical Calibration and Optimal Denoising", ICML 2018), computed here, as
every other ε of fedguard, by ``dp_accounting``'s PLD accountant at
:data:`~fedguard.privacy.analysis.dp_sgd.REPORTING_DISCRETIZATION`; σ for a
target ε is searched on dp_accounting's exact Gaussian privacy-loss curve.
Nothing is re-derived here.
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting.pld import privacy_loss_mechanism
from scipy import optimize

from fedguard.core.checks import positive, positive_int
from fedguard.core.errors import ConfigError
from fedguard.privacy.analysis.dp_sgd import epsilon_pld

__all__ = ["calibrate_release_noise", "gaussian_release_event", "release_epsilon"]

# Relative precision of the σ search (on log σ); the result is then verified.
_LOG_SIGMA_TOLERANCE = 1e-5
_VERIFY_STEP = 1.001
_VERIFY_MAX_TRIES = 100
# σ is searched in [_SIGMA_LO, _SIGMA_HI]: below 0.05 one release costs ε > 50, above
# 1e4 less than 1e-3 at δ = 1e-9; targets outside are refused.
_SIGMA_LO = 0.05
_SIGMA_HI = 1e4


def gaussian_release_event(noise_multiplier: float, count: int = 1) -> dp_accounting.DpEvent:
    """``count`` Gaussian mechanisms of noise multiplier σ (no sampling)."""
    sigma = positive("noise_multiplier", noise_multiplier)
    n = positive_int("count", count)
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return gaussian if n == 1 else dp_accounting.SelfComposedDpEvent(gaussian, n)


def release_epsilon(noise_multiplier: float, delta: float, count: int = 1) -> float:
    """ε at ``delta`` of one release (PLD, the discretization fedguard reports)."""
    return epsilon_pld(gaussian_release_event(noise_multiplier, count), delta)


def calibrate_release_noise(target_epsilon: float, delta: float, count: int = 1) -> float:
    """Smallest σ (to 0.1 %) whose release costs at most ``target_epsilon`` at ``delta``.

    ``count`` Gaussians of multiplier σ compose exactly into one of multiplier
    σ/√count (both are √count/σ-GDP: Dong, Roth, Su, "Gaussian Differential
    Privacy", JRSS-B 2022, Cor. 3.3), whose exact δ(ε) is dp_accounting's
    ``GaussianPrivacyLoss.get_delta_for_epsilon`` (Balle & Wang 2018, Thm. 8). σ
    is found by brentq on log σ against that curve, then verified with the PLD
    accountant fedguard reports with and raised by 0.1 % steps until
    :func:`release_epsilon` is within the target: never less noise than asked.
    """
    target = positive("target_epsilon", target_epsilon)
    d = positive("delta", delta, upper=1.0)
    n = positive_int("count", count)

    def excess_delta(log_sigma: float) -> float:
        loss = privacy_loss_mechanism.GaussianPrivacyLoss(
            standard_deviation=math.exp(log_sigma) / math.sqrt(n), sensitivity=1.0
        )
        return float(loss.get_delta_for_epsilon(target)) - d

    lo, hi = math.log(_SIGMA_LO), math.log(_SIGMA_HI)
    if excess_delta(hi) > 0:
        raise ConfigError(f"ε={target:g} at δ={d:g} is too small for a release (σ > {_SIGMA_HI:g})")
    if excess_delta(lo) <= 0:
        raise ConfigError(f"ε={target:g} is too large to calibrate a release (σ < {_SIGMA_LO:g})")
    sigma = math.exp(float(optimize.brentq(excess_delta, lo, hi, xtol=_LOG_SIGMA_TOLERANCE)))
    for _ in range(_VERIFY_MAX_TRIES):
        if release_epsilon(sigma, d, n) <= target:
            return sigma
        sigma *= _VERIFY_STEP
    raise ConfigError(f"could not calibrate a release to ε={target:g}")  # pragma: no cover
