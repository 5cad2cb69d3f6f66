"""Every rule cross-checked against independent implementations on random inputs.

References: the ``byzfl`` package (EPFL DCL, 0.0.11) and Flower's plain functions in
``flwr.server.strategy.aggregate``.

Installing byzfl: ``pip install --no-deps byzfl==0.0.11``. Its dependencies must not be
installed: it asks for torchvision, which pulls a CUDA build of a newer torch. Its
package ``__init__`` imports ``byzfl.fed_framework`` and ``byzfl.benchmark``, which
import torchvision, so the tests load ``byzfl.aggregators`` without running it: a
bare module named ``byzfl`` whose ``__path__`` is the installed folder is put in
``sys.modules`` first. ``byzfl.aggregators`` itself needs only numpy, scipy and torch.

Conventions that differ, and how the comparisons map them:

- byzfl's Krum and MultiKrum score each input over its ``n − f − 1`` closest
  others (a mean, the argmin is the same), Blanchard et al. and Flower over
  ``n − f − 2``: fedguard's ``Krum(f)`` is byzfl's ``Krum(f + 1)``, and both then
  require ``n ≥ 2f + 3``. byzfl's ``MultiKrum(f + 1)`` keeps ``n − f − 1`` inputs:
  fedguard's ``MultiKrum(f, m=n − f − 1)`` with equal weights.
- byzfl's ``CenteredClipping(m=...)`` raises ``TypeError`` for any ``m`` (its check
  ``not isinstance(m, np.ndarray) or not isinstance(m, torch.Tensor)`` is always
  true); it is built without ``m`` and its ``m`` attribute set afterwards. It
  starts from zero and then from its own last output: fedguard's
  ``reference=previous``.
- byzfl's GeometricMedian runs exactly ``T`` smoothed Weiszfeld steps from zero with
  uniform weights: compared with fedguard's kernel at ``tolerance=0``, and, both
  run to convergence, with fedguard's rule.
- byzfl's Bucketing shuffles with numpy's global ``RandomState``: the same
  permutation is drawn again from the same seed and fed to fedguard's bucket means.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import numpy as np
import pytest
from flwr.server.strategy.aggregate import (
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from fedguard.aggregation.kernels import smoothed_weiszfeld
from fedguard.aggregation.preaggregation import NearestNeighborMixing, bucket_means
from fedguard.aggregation.robust import (
    CenteredClipping,
    CenterReference,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    TrimmedMean,
)

SEEDS = range(6)


def _load_byzfl_aggregators() -> Any:
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None or not spec.submodule_search_locations:
            pytest.fail(
                "byzfl is not installed: pip install --no-deps byzfl==0.0.11 "
                "(never with its dependencies: they replace torch)",
                pytrace=False,
            )
        package = types.ModuleType("byzfl")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = package
    return importlib.import_module("byzfl.aggregators")


@pytest.fixture(scope="module")
def byzfl() -> Any:
    return _load_byzfl_aggregators()


def _case(seed: int) -> tuple[np.ndarray, int]:
    """Random inputs with a few far outliers, and an f the rules accept."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(7, 16))
    d = int(rng.integers(1, 30))
    f = int(rng.integers(1, (n - 3) // 2 + 1))
    x = rng.normal(size=(n, d)) * rng.choice([0.01, 1.0, 100.0])
    x[rng.choice(n, f, replace=False)] += rng.normal(size=(f, d)) * 50
    return x, f


def test_byzfl_loads_without_torchvision(byzfl: Any) -> None:
    assert hasattr(byzfl, "Median")
    assert "torchvision" not in sys.modules


@pytest.mark.parametrize("seed", SEEDS)
def test_median(byzfl: Any, seed: int) -> None:
    x, f = _case(seed)
    ours = CoordinateMedian(f).aggregate(x, np.ones(len(x)))
    np.testing.assert_array_equal(ours, byzfl.Median()(x))
    np.testing.assert_array_equal(ours, aggregate_median([([row], 1) for row in x])[0])


@pytest.mark.parametrize("seed", SEEDS)
def test_trimmed_mean(byzfl: Any, seed: int) -> None:
    x, f = _case(seed)
    ours = TrimmedMean(f).aggregate(x, np.ones(len(x)))
    np.testing.assert_allclose(ours, byzfl.TrMean(f)(x), rtol=1e-12, atol=1e-12)
    beta = 0.1 + 0.35 * np.random.default_rng(seed).random()
    flower = aggregate_trimmed_avg([([row], 1) for row in x], beta)[0]
    np.testing.assert_allclose(
        TrimmedMean(trim_fraction=beta).aggregate(x, np.ones(len(x))), flower, rtol=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_krum(byzfl: Any, seed: int) -> None:
    x, f = _case(seed)
    ours = Krum(f).aggregate(x, np.ones(len(x)))
    np.testing.assert_array_equal(ours, byzfl.Krum(f + 1)(x))
    flower = aggregate_krum([([row], 1) for row in x], num_malicious=f, to_keep=0)[0]
    np.testing.assert_array_equal(ours, flower)


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_krum(byzfl: Any, seed: int) -> None:
    x, f = _case(seed)
    n = len(x)
    ours = MultiKrum(f, m=n - f - 1).aggregate(x, np.ones(n))
    np.testing.assert_allclose(ours, byzfl.MultiKrum(f + 1)(x), rtol=1e-12, atol=1e-12)
    # Flower keeps m and averages them weighted by their example counts, as fedguard.
    examples = np.random.default_rng(seed).integers(1, 100, n)
    m = n - f
    flower = aggregate_krum(
        [([row], int(e)) for row, e in zip(x, examples, strict=True)],
        num_malicious=f,
        to_keep=m,
    )[0]
    ours = MultiKrum(f, m=m).aggregate(x, examples.astype(np.float64))
    np.testing.assert_allclose(ours, flower, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_geometric_median(byzfl: Any, seed: int) -> None:
    x, _ = _case(seed)
    n = len(x)
    for steps in (1, 3, 8):
        theirs = byzfl.GeometricMedian(nu=1e-6, T=steps)(x)
        ours, _ = smoothed_weiszfeld(x, np.full(n, 1 / n), nu=1e-6, iterations=steps, tolerance=0.0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9 * float(np.abs(x).max()))
    converged = byzfl.GeometricMedian(nu=1e-6, T=2000)(x)
    rule = GeometricMedian(iterations=2000, tolerance=1e-12)
    np.testing.assert_allclose(
        rule.aggregate(x, np.ones(n)), converged, atol=1e-6 * float(np.abs(x).max())
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_centered_clipping(byzfl: Any, seed: int) -> None:
    x, f = _case(seed)
    tau = float(np.median(np.linalg.norm(x, axis=1)))
    with pytest.raises(TypeError):  # the documented call fails: see the module docstring
        byzfl.CenteredClipping(m=np.zeros(x.shape[1]))
    theirs = byzfl.CenteredClipping(L=3, tau=tau)
    ours = CenteredClipping(tau, 3, CenterReference.PREVIOUS, f=f)
    scale = float(np.abs(x).max())
    for round_ in range(3):  # both carry their last output into the next call
        shifted = x + round_
        np.testing.assert_allclose(
            ours.aggregate(shifted, np.ones(len(x))), theirs(shifted), atol=1e-10 * scale
        )
    start = np.random.default_rng(seed).normal(size=(x.shape[1],))
    theirs = byzfl.CenteredClipping(L=2, tau=tau)
    theirs.m = start
    ours = CenteredClipping(tau, 2, CenterReference.PREVIOUS)
    ours._memory.center = start.copy()
    np.testing.assert_allclose(ours.aggregate(x, np.ones(len(x))), theirs(x), atol=1e-10 * scale)


@pytest.mark.parametrize("seed", SEEDS)
def test_nnm(byzfl: Any, seed: int) -> None:
    x, f = _case(seed)
    ours, _ = NearestNeighborMixing(f).transform(x, np.ones(len(x)))
    np.testing.assert_allclose(ours, byzfl.NNM(f)(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_bucketing(byzfl: Any, seed: int, s: int) -> None:
    x, _ = _case(seed)
    n = len(x)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        theirs = byzfl.Bucketing(s)(x)
        np.random.seed(seed)
        order = np.random.permutation(n)
    finally:
        np.random.set_state(state)
    buckets = [order[i : i + s] for i in range(0, n, s)]
    ours, totals = bucket_means(x, np.ones(n), buckets)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(totals, [len(b) for b in buckets])
