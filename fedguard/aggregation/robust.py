"""Byzantine-robust aggregation rules.

Each rule is a frozen dataclass implementing :class:`~fedguard.aggregation.aggregators.Aggregator`:
it checks its inputs, then its paper's precondition for the declared number ``f``
of Byzantine inputs, and raises :class:`PreconditionError` (rule, condition, numbers)
instead of clamping anything. How each rule uses the example weights is stated in
its docstring and in its ``uses_weights`` property. The numpy kernels they run on
(and their cost) are in :mod:`fedguard.aggregation.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedguard.aggregation.aggregators import (
    AggregationError,
    PreconditionError,
    RuleParameterError,
    check_byzantine,
    check_inputs,
    finite_output,
    require_inputs,
)
from fedguard.aggregation.kernels import (
    centered_clip,
    coordinate_median,
    coordinate_trimmed_mean,
    krum_ranking,
    krum_scores,
    mix_rows,
    norm_clip_factors,
    pairwise_sq_distances,
    smoothed_weiszfeld,
)
from fedguard.core.aggregation_config import AggregatorName, CenterReference
from fedguard.core.checks import positive, positive_int


def _normalized(rule: str, weights: np.ndarray) -> np.ndarray:
    total = float(weights.sum())
    if total <= 0:
        raise AggregationError(f"{rule}: weights sum to zero: no update carries any examples")
    return np.asarray(weights / total, dtype=np.float64)


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median (Yin et al., ICML 2018). Needs ``n ≥ 2f + 1``.

    Ignores the weights: a weighted median would let one silo claiming many
    examples move every coordinate, and Yin et al. and Flower's FedMedian are
    unweighted. Each coordinate of the output lies between the smallest and the
    largest honest value of that coordinate whenever ``f < n/2``.
    """

    f: int = 0

    def __post_init__(self) -> None:
        check_byzantine(self.name, self.f)

    @property
    def name(self) -> str:
        return AggregatorName.MEDIAN.value

    @property
    def min_inputs(self) -> int:
        return 2 * self.f + 1

    @property
    def uses_weights(self) -> bool:
        return False

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        require_inputs(self.name, updates.shape[0], self.f, self.min_inputs, "n >= 2f + 1")
        return finite_output(self.name, coordinate_median(updates))


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Drops ``k`` values per side in every coordinate and averages the other
    ``n − 2k``. ``k = f`` when ``trim_fraction`` is ``None``; otherwise
    ``k = ⌊β·n⌋`` with ``β = trim_fraction`` in ``[0, 0.5)``, computed as
    ``int(β·n)`` like Flower's FedTrimmedAvg and ``scipy.stats.trim_mean``.
    Preconditions: ``n > 2k`` and ``k ≥ f`` (fewer trimmed values than Byzantine
    inputs leave an outlier in). Ignores the weights (as Yin et al. and Flower).
    """

    f: int = 0
    trim_fraction: float | None = None

    def __post_init__(self) -> None:
        check_byzantine(self.name, self.f)
        beta = self.trim_fraction
        if beta is not None and (
            isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 0.5
        ):
            raise RuleParameterError(
                f"{self.name}: trim_fraction must lie in [0, 0.5), got {beta!r}"
            )
        if beta is not None and beta == 0 and self.f > 0:
            raise RuleParameterError(
                f"{self.name}: trim_fraction 0 trims nothing and cannot tolerate f = {self.f}"
            )

    @property
    def name(self) -> str:
        return AggregatorName.TRIMMED_MEAN.value

    def trim_count(self, n: int) -> int:
        """Values dropped per side at ``n`` inputs."""
        return self.f if self.trim_fraction is None else int(self.trim_fraction * n)

    @property
    def min_inputs(self) -> int:
        n = 2 * self.f + 1
        if self.trim_fraction is None:
            return n
        while self.trim_count(n) < self.f or n <= 2 * self.trim_count(n):
            n += 1
        return n

    @property
    def uses_weights(self) -> bool:
        return False

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        n = updates.shape[0]
        k = self.trim_count(n)
        if k < self.f:
            raise PreconditionError(
                self.name,
                "k >= f values trimmed per side",
                n,
                self.f,
                f"trim_fraction {self.trim_fraction} trims k = int({self.trim_fraction} * {n})"
                f" = {k} per side",
            )
        require_inputs(self.name, n, self.f, 2 * k + 1, f"n >= 2k + 1 (k = {k} per side)")
        return finite_output(self.name, coordinate_trimmed_mean(updates, k))


@dataclass(frozen=True)
class Krum:
    """Krum (Blanchard et al., NeurIPS 2017). Needs ``n ≥ 2f + 3``.

    Scores each input by the sum of squared distances to its ``n − f − 2`` closest
    other inputs and returns the input with the lowest score (ties broken by the
    inputs' content: see :func:`order_by`). Ignores the weights (as the
    paper and Flower's ``aggregate_krum``).
    """

    f: int = 0

    def __post_init__(self) -> None:
        check_byzantine(self.name, self.f)

    @property
    def name(self) -> str:
        return AggregatorName.KRUM.value

    @property
    def min_inputs(self) -> int:
        return 2 * self.f + 3

    @property
    def uses_weights(self) -> bool:
        return False

    def scores(self, updates: np.ndarray) -> np.ndarray:
        return krum_scores(pairwise_sq_distances(updates), self.f)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        require_inputs(self.name, updates.shape[0], self.f, self.min_inputs, "n >= 2f + 3")
        best = int(krum_ranking(updates, self.f, cut=1)[0])
        return np.array(updates[best], dtype=np.float64)


@dataclass(frozen=True)
class MultiKrum:
    """Multi-Krum (Blanchard et al., NeurIPS 2017). Needs ``n ≥ 2f + 3`` and ``1 ≤ m ≤ n − f``.

    Keeps the ``m`` inputs with the lowest Krum scores (``m = n − f`` when ``None``;
    ties ranked by :func:`order_by`) and returns their example-weighted mean, as
    Flower's ``aggregate_krum``: it uses the weights, of the selected inputs only.
    """

    f: int = 0
    m: int | None = None

    def __post_init__(self) -> None:
        check_byzantine(self.name, self.f)
        if self.m is not None:
            positive_int(f"{self.name}: m (inputs kept)", self.m, error=RuleParameterError)

    @property
    def name(self) -> str:
        return AggregatorName.MULTI_KRUM.value

    @property
    def min_inputs(self) -> int:
        return max(2 * self.f + 3, (self.m or 0) + self.f)

    @property
    def uses_weights(self) -> bool:
        return True

    def selected(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Indices of the kept inputs, best score first."""
        n = updates.shape[0]
        m = n - self.f if self.m is None else self.m
        return krum_ranking(updates, self.f, weights, cut=m)[:m]

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        n = updates.shape[0]
        require_inputs(self.name, n, self.f, 2 * self.f + 3, "n >= 2f + 3")
        if self.m is not None and self.m > n - self.f:
            raise PreconditionError(
                self.name, f"m <= n - f = {n - self.f}", n, self.f, f"m = {self.m}"
            )
        keep = self.selected(updates, weights)
        share = np.zeros(n)
        share[keep] = _normalized(self.name, weights[keep])
        return finite_output(self.name, mix_rows(share, updates))


@dataclass(frozen=True)
class GeometricMedian:
    """Geometric median by smoothed Weiszfeld: RFA (Pillutla, Kakade, Harchaoui, IEEE TSP 2022).

    Minimizes ``Σ α_i ‖v − x_i‖`` with ``α`` the normalized example weights (RFA
    weighs by the example counts: it uses the weights, and trusts them: the
    breakdown point is Byzantine *weight* below one half). Starts from the zero
    update, smooths distances below ``nu``, runs at most ``iterations`` updates and
    stops early once an update moves the point by no more than ``tolerance`` times
    the weighted median distance to the inputs (see :func:`smoothed_weiszfeld`).
    Precondition ``n ≥ 2f + 1`` (an honest majority of inputs).
    """

    f: int = 0
    nu: float = 1e-6
    iterations: int = 100
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        check_byzantine(self.name, self.f)
        positive(f"{self.name}: nu", self.nu, error=RuleParameterError)
        positive_int(f"{self.name}: iterations", self.iterations, error=RuleParameterError)
        positive(
            f"{self.name}: tolerance", self.tolerance, allow_zero=True, error=RuleParameterError
        )

    @property
    def name(self) -> str:
        return AggregatorName.GEOMETRIC_MEDIAN.value

    @property
    def min_inputs(self) -> int:
        return 2 * self.f + 1

    @property
    def uses_weights(self) -> bool:
        return True

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        require_inputs(self.name, updates.shape[0], self.f, self.min_inputs, "n >= 2f + 1")
        alpha = _normalized(self.name, weights)
        point, _ = smoothed_weiszfeld(
            updates, alpha, nu=self.nu, iterations=self.iterations, tolerance=self.tolerance
        )
        return finite_output(self.name, point)


@dataclass
class _Memory:
    center: np.ndarray | None = None


@dataclass(frozen=True)
class CenteredClipping:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021).

    ``v ← v + (1/n) Σ (x_i − v) min(1, τ/‖x_i − v‖)``, ``iterations`` (the paper's
    ``L``) times, from ``v₀`` = the zero update (``reference=zero``) or the
    aggregate this object returned last time (``reference=previous``, the paper's
    choice: with the updates being model deltas, the previous round's aggregated
    delta; the first call starts from zero; :meth:`reset` forgets it). Each step
    moves ``v`` by at most ``τ``, and the ``f`` Byzantine inputs by at most
    ``f·τ/n``. Ignores the weights (uniform ``1/n``, as the paper). Precondition
    ``n ≥ 2f + 1``.
    """

    tau: float
    iterations: int = 1
    reference: CenterReference = CenterReference.ZERO
    f: int = 0
    _memory: _Memory = field(default_factory=_Memory, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_byzantine(self.name, self.f)
        positive(f"{self.name}: tau", self.tau, error=RuleParameterError)
        positive_int(f"{self.name}: iterations", self.iterations, error=RuleParameterError)
        if not isinstance(self.reference, CenterReference):
            raise RuleParameterError(
                f"{self.name}: reference must be a CenterReference, got {self.reference!r}"
            )

    @property
    def name(self) -> str:
        return AggregatorName.CENTERED_CLIPPING.value

    @property
    def min_inputs(self) -> int:
        return 2 * self.f + 1

    @property
    def uses_weights(self) -> bool:
        return False

    def reset(self) -> None:
        """Forget the previous aggregate: the next call starts from zero."""
        self._memory.center = None

    def center_for(self, d: int) -> np.ndarray:
        """The starting point the next call with ``d``-dimensional updates will use."""
        previous = self._memory.center
        if self.reference is CenterReference.ZERO or previous is None:
            return np.zeros(d)
        if previous.shape != (d,):
            raise AggregationError(
                f"{self.name}: the previous aggregate has shape {previous.shape}, this round's "
                f"updates ({d},); call reset() when the model changes"
            )
        return previous

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        require_inputs(self.name, updates.shape[0], self.f, self.min_inputs, "n >= 2f + 1")
        result = finite_output(
            self.name,
            centered_clip(updates, self.center_for(updates.shape[1]), self.tau, self.iterations),
        )
        if self.reference is CenterReference.PREVIOUS:
            self._memory.center = result.copy()
        return result


@dataclass(frozen=True)
class NormBounding:
    """Norm bounding (Sun et al., "Can you really backdoor federated learning?", 2019).

    Scales every update to norm at most ``bound`` and returns the example-weighted
    mean of the clipped updates (FedAvg after clipping: it uses the weights). It has
    no Byzantine count and no breakdown point; it bounds each input's pull to
    ``bound · w_i / Σ w``, and the output's norm to ``bound``.
    """

    bound: float

    def __post_init__(self) -> None:
        positive(f"{self.name}: bound", self.bound, error=RuleParameterError)

    @property
    def name(self) -> str:
        return AggregatorName.NORM_BOUNDING.value

    @property
    def min_inputs(self) -> int:
        return 1

    @property
    def uses_weights(self) -> bool:
        return True

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        check_inputs(updates, weights)
        share = _normalized(self.name, weights) * norm_clip_factors(updates, self.bound)
        return finite_output(self.name, mix_rows(share, updates))
