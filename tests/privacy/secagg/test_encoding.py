"""Fixed-point encoding: exact decoding of sums, counted clipping, unbiased rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.encoding import FixedPointEncoder, StochasticRounder
from fedguard.privacy.secagg.errors import EncodingError, SecAggConfigError


def _config(n: int = 10, **kw: object) -> SecAggConfig:
    return SecAggConfig(num_clients=n, degree=n - 1, threshold=n // 2 + 1, **kw)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(3, 12),
    m=st.integers(1, 64),
    clip=st.sampled_from([0.1, 1.0, 8.0]),
    value_bits=st.integers(1, 16),
    weight_bits=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_of_sum_equals_sum_of_quantised_inputs(
    n: int, m: int, clip: float, value_bits: int, weight_bits: int, seed: int
) -> None:
    cfg = _config(n, clip_range=clip, value_bits=value_bits, weight_bits=weight_bits)
    encoder = FixedPointEncoder(cfg)
    rng = np.random.default_rng(seed)
    encoded = [
        encoder.encode(
            rng.normal(scale=clip, size=m),
            weight=int(rng.integers(0, 2**weight_bits + 1)),
            rounder=StochasticRounder(rng.bytes(32)),
        )
        for _ in range(n)
    ]
    total = np.zeros(m + 1, dtype=np.uint32)
    exact = np.zeros(m + 1, dtype=object)
    for e in encoded:
        total += e.values
        exact += e.values.astype(object)
    # The budget n·2^q < 2^32 means the uint32 sum never wrapped: it IS the integer sum.
    assert [int(v) for v in total] == list(exact)
    decoded = encoder.decode(total)
    expected = sum(encoder.dequantise(e) for e in encoded)
    step = 2 * clip / cfg.levels
    # Each quantised value is an integer number of steps: compare in steps, exactly.
    in_steps = (decoded.weighted_sum + clip * decoded.total_weight) / step
    assert np.array_equal(np.round(in_steps), exact[:-1].astype(np.float64))
    np.testing.assert_allclose(
        decoded.weighted_sum, expected, rtol=0, atol=1e-9 * (1 + clip * n * 2**weight_bits)
    )
    assert decoded.total_weight == sum(e.weight for e in encoded)


def test_quantised_value_is_within_one_step_and_weighted_mean_is_close() -> None:
    cfg = _config(4, clip_range=1.0, value_bits=16)
    encoder = FixedPointEncoder(cfg)
    x = np.linspace(-0.99, 0.99, 101)
    encoded = encoder.encode(x, weight=3)
    assert np.all(np.abs(encoder.dequantise(encoded) / 3 - x) <= encoder.step + 1e-12)
    decoded = encoder.decode(encoded.values)
    np.testing.assert_allclose(decoded.mean(), x, atol=encoder.step)


def test_clipping_is_counted_never_silent() -> None:
    encoder = FixedPointEncoder(_config(clip_range=1.0))
    x = np.array([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0000001, 7.0])
    encoded = encoder.encode(x)
    assert encoded.num_clipped == 3
    decoded = encoder.decode(encoded.values).weighted_sum
    assert decoded[0] == -1.0 and decoded[-1] == 1.0


def test_stochastic_rounding_is_unbiased() -> None:
    cfg = _config(clip_range=1.0, value_bits=4)  # coarse grid: step 2/15
    encoder = FixedPointEncoder(cfg)
    value = 0.123456  # between two grid points
    n = 200_000
    decoded = encoder.dequantise(
        encoder.encode(np.full(n, value), rounder=StochasticRounder(b"u" * 32))
    )
    step = encoder.step
    low = math.floor((value + 1.0) / step) * step - 1.0
    fraction = (value - low) / step
    # Only the two neighbouring grid points occur, in proportion 1 − f : f.
    assert set(np.round((decoded - low) / step).astype(int).tolist()) <= {0, 1}
    std_of_mean = step * math.sqrt(fraction * (1 - fraction) / n)
    assert abs(decoded.mean() - value) < 5 * std_of_mean
    # ...and it really is stochastic, unlike rounding to nearest.
    assert 0.5 * fraction < np.mean(decoded > low + step / 2) < 1.5 * fraction


def test_rounding_with_os_keys_differs_between_calls() -> None:
    encoder = FixedPointEncoder(_config(value_bits=4))
    x = np.full(256, 0.3)
    assert not np.array_equal(encoder.encode(x).values, encoder.encode(x).values)


def test_explicit_key_is_reproducible_and_hidden_in_repr() -> None:
    encoder = FixedPointEncoder(_config(value_bits=4))
    x = np.full(64, 0.3)
    a = encoder.encode(x, rounder=StochasticRounder(b"a" * 32))
    b = encoder.encode(x, rounder=StochasticRounder(b"a" * 32))
    assert np.array_equal(a.values, b.values)
    assert "aaaa" not in repr(StochasticRounder(b"a" * 32))


@pytest.mark.parametrize(
    ("n", "value_bits", "weight_bits"),
    [(4, 22, 8), (100, 18, 8), (2**8, 16, 8), (3, 30, 1)],
)
def test_overflow_budget_is_checked_at_construction(
    n: int, value_bits: int, weight_bits: int
) -> None:
    with pytest.raises(SecAggConfigError, match="overflow budget"):
        SecAggConfig(n, n - 1, n // 2 + 1, value_bits=value_bits, weight_bits=weight_bits)


def test_overflow_budget_boundary() -> None:
    # n · 2^q < 2^32: 3·2^30 fits, 4·2^30 = 2^32 does not.
    SecAggConfig(3, 2, 2, value_bits=22, weight_bits=8)
    with pytest.raises(SecAggConfigError):
        SecAggConfig(4, 3, 2, value_bits=22, weight_bits=8)
    assert SecAggConfig.max_bits_per_value(100) == 25
    SecAggConfig(100, 42, 24, value_bits=17, weight_bits=8)


def test_maximal_inputs_sum_without_wrapping() -> None:
    n = 3
    cfg = SecAggConfig(n, 2, 2, clip_range=1.0, value_bits=22, weight_bits=8)
    encoder = FixedPointEncoder(cfg)
    encoded = [encoder.encode(np.full(4, 1.0), weight=cfg.max_weight) for _ in range(n)]
    total = sum((e.values for e in encoded), np.zeros(5, dtype=np.uint32))
    decoded = encoder.decode(total)
    assert decoded.total_weight == n * cfg.max_weight
    np.testing.assert_allclose(decoded.weighted_sum, n * cfg.max_weight * 1.0)


@pytest.mark.parametrize(
    ("values", "weight"),
    [
        (np.array([0.0, np.nan]), 1),
        (np.array([np.inf]), 1),
        (np.array([]), 1),
        (np.array([0.1]), -1),
        (np.array([0.1]), 2**8 + 1),
        (np.array([0.1]), 1.5),
        (np.array(["a"]), 1),
    ],
)
def test_bad_inputs_are_refused(values: np.ndarray, weight: object) -> None:
    with pytest.raises(EncodingError):
        FixedPointEncoder(_config()).encode(values, weight=weight)  # type: ignore[arg-type]


def test_decode_refuses_malformed_sums() -> None:
    encoder = FixedPointEncoder(_config())
    with pytest.raises(EncodingError):
        encoder.decode(np.zeros(3, dtype=np.int64))
    with pytest.raises(EncodingError, match="total weight"):
        encoder.decode(np.array([0, 2**31], dtype=np.uint32))
    with pytest.raises(EncodingError, match="total weight is 0"):
        encoder.decode(np.zeros(3, dtype=np.uint32)).mean()
