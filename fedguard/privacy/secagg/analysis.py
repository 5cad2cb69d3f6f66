"""Choosing the graph degree k and threshold t of SecAgg+: pure formulas.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020, §3 (semi-honest) and §4 (malicious/semi-malicious server) show that a
random graph of degree k = O(log n) suffices when k and t are chosen from a
statistical security parameter σ (privacy fails with probability ≤ 2^-σ) and a
correctness parameter η (a round aborts because of dropouts with probability
≤ 2^-η), given a bound γ on the fraction of clients colluding with the server
and a dropout rate δ. Their theorems bound these events for Erdős–Rényi graphs;
fedguard's graph is a Harary graph on a uniformly random cyclic order
(:mod:`fedguard.privacy.secagg.graph`), for which the same three events have the
simple bounds below (union bounds over the n nodes; dropouts independent with
rate δ, corrupt clients fixed before the graph is sampled).

1. **Both secrets of a node.** A node's k neighbours each reveal one share per
   neighbour, either of its self-mask seed or of its mask key, never both
   (Bonawitz et al., CCS 2017, Fig. 4). A server that equivocates about who dropped
   can collect t shares of each kind only if the c corrupt neighbours make up the
   overlap: 2t ≤ k + c. With c ~ Hypergeometric(n − 1, ⌈γn⌉, k),
   P₁ ≤ n · P[c ≥ 2t − k]. (t > k/2 is the c = 0 case; the consistency check
   additionally detects equivocation.)
2. **Disconnected honest survivors.** If the graph restricted to honest surviving
   clients falls apart, the server learns the partial sum of each component
   (Bell et al. §3). On the ring this needs a run of k/2 consecutive corrupt or
   dropped nodes: P₂ ≤ n · (γ + δ)^(k/2). (0 for the complete graph.)
3. **Too few live neighbours (correctness).** The round aborts if a node keeps
   fewer than t of its k neighbours: P₃ ≤ n · P[Binomial(k, 1 − δ) < t].

:func:`choose_parameters` returns the smallest even k (cheapest for clients and
server) with the smallest t meeting P₁, P₂ ≤ 2^-σ and P₃ ≤ 2^-η. For small n no
sparse graph qualifies and it returns the complete graph k = n − 1 (Bonawitz et
al.'s SecAgg) with the smallest secure t, reporting P₃ as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedguard.privacy.secagg.errors import SecAggConfigError

__all__ = [
    "GraphParameters",
    "binomial_cdf_below",
    "choose_parameters",
    "hypergeometric_sf",
    "log2_correctness_failure",
    "log2_disconnection",
    "log2_equivocation_failure",
]


def _log2(probability: float) -> float:
    return -math.inf if probability <= 0.0 else math.log2(probability)


def hypergeometric_sf(population: int, successes: int, draws: int, at_least: int) -> float:
    """P[X ≥ ``at_least``] for X ~ Hypergeometric(population, successes, draws), exactly."""
    if at_least <= 0:
        return 1.0
    upper = min(successes, draws)
    if at_least > upper:
        return 0.0
    numerator = sum(
        math.comb(successes, i) * math.comb(population - successes, draws - i)
        for i in range(at_least, upper + 1)
    )
    denominator = math.comb(population, draws)
    return 2.0 ** (math.log2(numerator) - math.log2(denominator)) if numerator else 0.0


def binomial_cdf_below(trials: int, p: float, below: int) -> float:
    """P[X < ``below``] for X ~ Binomial(trials, p)."""
    if below <= 0:
        return 0.0
    if below > trials:
        return 1.0
    q = 1.0 - p
    return float(sum(math.comb(trials, i) * p**i * q ** (trials - i) for i in range(0, below)))


def log2_equivocation_failure(n: int, degree: int, threshold: int, corrupt: int) -> float:
    """log2 of bound 1: n · P[corrupt neighbours ≥ 2t − k]."""
    tail = hypergeometric_sf(n - 1, min(corrupt, n - 1), degree, 2 * threshold - degree)
    return _log2(n * tail)


def log2_disconnection(n: int, degree: int, corrupt_fraction: float, dropout_rate: float) -> float:
    """log2 of bound 2: n · (γ + δ)^(k/2); −inf for the complete graph."""
    if degree >= n - 1:
        return -math.inf
    bad = min(1.0, corrupt_fraction + dropout_rate)
    if bad <= 0.0:
        return -math.inf
    return math.log2(n) + (degree // 2) * math.log2(bad)


def log2_correctness_failure(n: int, degree: int, threshold: int, dropout_rate: float) -> float:
    """log2 of bound 3: n · P[Binomial(k, 1 − δ) < t]."""
    return _log2(n * binomial_cdf_below(degree, 1.0 - dropout_rate, threshold))


@dataclass(frozen=True)
class GraphParameters:
    """A degree and threshold, with the log2 failure bounds they achieve."""

    num_clients: int
    degree: int
    threshold: int
    log2_privacy_failure: float
    log2_correctness_failure: float

    @property
    def complete_graph(self) -> bool:
        return self.degree == self.num_clients - 1


def _smallest_secure_threshold(
    n: int, degree: int, corrupt: int, security_bits: float
) -> int | None:
    for threshold in range(max(2, degree // 2 + 1), degree + 1):
        if log2_equivocation_failure(n, degree, threshold, corrupt) <= -security_bits:
            return threshold
    return None


def choose_parameters(
    num_clients: int,
    *,
    dropout_rate: float = 0.1,
    corrupt_fraction: float = 0.05,
    security_bits: float = 40.0,
    correctness_bits: float = 20.0,
) -> GraphParameters:
    """The cheapest (k, t) meeting the bounds in the module docstring (see there)."""
    n = num_clients
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise SecAggConfigError(f"secure aggregation needs at least 3 clients, got {n!r}")
    for name, value in (("dropout_rate", dropout_rate), ("corrupt_fraction", corrupt_fraction)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise SecAggConfigError(f"{name} must lie in [0, 1), got {value!r}")
    if not (security_bits > 0 and correctness_bits > 0):
        raise SecAggConfigError("security_bits and correctness_bits must be > 0")
    corrupt = math.ceil(corrupt_fraction * n)
    candidates = [k for k in range(2, n - 1, 2)] + [n - 1]
    for degree in candidates:
        threshold = _smallest_secure_threshold(n, degree, corrupt, security_bits)
        if threshold is None:
            continue
        privacy = max(
            log2_equivocation_failure(n, degree, threshold, corrupt),
            log2_disconnection(n, degree, corrupt_fraction, dropout_rate),
        )
        correctness = log2_correctness_failure(n, degree, threshold, dropout_rate)
        complete = degree == n - 1
        if privacy <= -security_bits and (complete or correctness <= -correctness_bits):
            return GraphParameters(n, degree, threshold, privacy, correctness)
    raise SecAggConfigError(
        f"no threshold keeps privacy failure below 2^-{security_bits:g} with {corrupt} "
        f"corrupt client(s) among {n}: lower corrupt_fraction or security_bits"
    )
