"""Central user-level DP for FedAvg (DP-FedAvg), as a mechanism with no state.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, Algorithm 1 with the fixed-denominator estimator:
each sampled client's update Δ_i is clipped to L2 norm ``S``; the server releases

    (Σ_i clip(Δ_i) + N(0, (z·S)² I)) / (q·N)

where clients are Poisson-sampled with rate ``q`` out of ``N`` and ``z`` is the
noise multiplier. The denominator does not depend on who took part, so the
sensitivity of the release to one client is ``S / (q·N)``; accounting is
:func:`fedguard.privacy.analysis.dp_sgd.dp_fedavg_event`. Noise comes from the
CSPRNG in :mod:`fedguard.privacy.noise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedguard.core.config import CentralDPConfig
from fedguard.core.errors import ConfigError
from fedguard.privacy.noise import CsprngGaussian


def clip_rows_to_norm(updates: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale each row to L2 norm ≤ ``bound``; also return which rows were clipped."""
    if bound <= 0 or not np.isfinite(bound):
        raise ConfigError(f"clip bound must be finite and > 0, got {bound}")
    norms = np.linalg.norm(updates, axis=1)
    # An all-zero row keeps factor 1 (no division by zero, unlike Flower's clip_inputs_inplace).
    factors = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
    return updates * factors[:, None], norms > bound


@dataclass(frozen=True)
class CentralDPRelease:
    mean_update: np.ndarray
    clipped: np.ndarray
    noise_std: float
    denominator: float


def dp_fedavg_release(
    updates: np.ndarray,
    config: CentralDPConfig,
    population: int,
    noise: CsprngGaussian,
) -> CentralDPRelease:
    """Clip, sum, add Gaussian noise, divide by the expected number of clients."""
    _check_population(population)
    dim = updates.shape[1] if updates.ndim == 2 else 0
    clipped_updates, clipped = clip_rows_to_norm(updates.reshape(-1, dim), config.clip_norm)
    return _noised_mean(clipped_updates.sum(axis=0), clipped, config, population, noise)


def dp_fedavg_release_from_sum(
    clipped_sum: np.ndarray,
    config: CentralDPConfig,
    population: int,
    noise: CsprngGaussian,
) -> CentralDPRelease:
    """The same release from ``Σ_i clip(Δ_i)`` computed elsewhere (SecAgg+: the silos clip).

    The server never sees one silo's update, so ``clipped`` is empty: which silos
    clipped is theirs to know.
    """
    _check_population(population)
    return _noised_mean(clipped_sum, np.zeros(0, dtype=bool), config, population, noise)


def _check_population(population: int) -> None:
    if population < 1:
        raise ConfigError(f"population must be >= 1, got {population}")


def _noised_mean(
    clipped_sum: np.ndarray,
    clipped: np.ndarray,
    config: CentralDPConfig,
    population: int,
    noise: CsprngGaussian,
) -> CentralDPRelease:
    """``(Σ clip(Δ_i) + N(0, (z·S)² I)) / (q·N)``: the one place DP-FedAvg's noise is drawn."""
    noise_std = config.noise_multiplier * config.clip_norm
    dim = clipped_sum.shape[0]
    total = clipped_sum + noise.sample((dim,), std=noise_std).numpy().astype(np.float64)
    denominator = config.client_sampling_rate * population
    return CentralDPRelease(total / denominator, clipped, noise_std, denominator)
