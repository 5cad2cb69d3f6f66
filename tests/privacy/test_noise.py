"""CSPRNG Gaussian noise: distribution, independence, determinism, the 4-draw construction.

Statistical tests use explicit keys, so they are deterministic (never flaky); they
would catch a wrong scale or shape with the power stated at each test.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedguard.core.errors import ConfigError, PrivacyError
from fedguard.privacy.noise import CsprngGaussian, seeded_torch_generator

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
N = 1_000_000
SIGMA = 2.5


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return CsprngGaussian(KEY_A).sample((N,), SIGMA, dtype=torch.float64).numpy()


def test_kolmogorov_smirnov_against_normal(samples: np.ndarray) -> None:
    # KS at n=10^6: the 0.1% critical distance is 1.95/sqrt(n) = 0.002, so a
    # shape error (say uniform sums, or a 1.5% scale error: sup |ΔF| ≈ 0.0036)
    # is rejected with power ≈ 1.
    result = stats.kstest(samples, "norm", args=(0.0, SIGMA))
    assert result.pvalue > 1e-3, result


def test_variance_in_chi_square_interval(samples: np.ndarray) -> None:
    # (n-1)s²/σ² ~ χ²(n-1); the two-sided 1e-6 interval is ±0.69% of the variance,
    # so a 1% error in σ (2% in variance, 14 standard errors) is caught with power ≈ 1.
    statistic = (N - 1) * samples.var(ddof=1) / SIGMA**2
    lo, hi = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], N - 1)
    assert lo < statistic < hi


def test_mean_is_zero(samples: np.ndarray) -> None:
    assert abs(samples.mean()) < 5 * SIGMA / math.sqrt(N)


def test_higher_moments(samples: np.ndarray) -> None:
    # Skewness 0, excess kurtosis 0 (a sum of uniforms would have kurtosis -0.3).
    assert abs(stats.skew(samples)) < 5 * math.sqrt(6 / N)
    assert abs(stats.kurtosis(samples)) < 5 * math.sqrt(24 / N)


def test_no_serial_correlation(samples: np.ndarray) -> None:
    lag1 = np.corrcoef(samples[:-1], samples[1:])[0, 1]
    assert abs(lag1) < 5 / math.sqrt(N)


def test_two_os_keyed_generators_are_independent() -> None:
    n = 200_000
    a = CsprngGaussian().sample((n,), 1.0, dtype=torch.float64).numpy()
    b = CsprngGaussian().sample((n,), 1.0, dtype=torch.float64).numpy()
    assert not np.array_equal(a, b)
    # |r| < 5/sqrt(n) holds for independent streams with probability 1 - 6e-7.
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)


def test_explicit_key_is_deterministic_and_the_stream_advances() -> None:
    first = CsprngGaussian(KEY_A).sample((1000,), 1.0, dtype=torch.float64)
    again = CsprngGaussian(KEY_A).sample((1000,), 1.0, dtype=torch.float64)
    other = CsprngGaussian(KEY_B).sample((1000,), 1.0, dtype=torch.float64)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    sampler = CsprngGaussian(KEY_A)
    assert torch.equal(sampler.sample((1000,), 1.0, dtype=torch.float64), first)
    assert not torch.equal(sampler.sample((1000,), 1.0, dtype=torch.float64), first)


def test_construction_is_aes_ctr_box_muller_four_draws_over_two() -> None:
    """Recompute the samples from the raw AES-256-CTR keystream, independently."""
    n = 1000
    keystream = (
        Cipher(algorithms.AES(KEY_A), modes.CTR(bytes(16))).encryptor().update(bytes(32 * n))
    )
    words = np.frombuffer(keystream, dtype="<u8")
    uniforms = (words >> np.uint64(11)).astype(np.float64) / 2.0**53  # 53-bit uniforms
    u1 = uniforms[: 2 * n] + 2.0**-53  # (0, 1]
    u2 = uniforms[2 * n :]
    r = np.sqrt(-2 * np.log(u1))
    cos_draws, sin_draws = r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)
    # Sample i: both draws of Box–Muller pairs 2i and 2i+1, summed, over 2.
    expected = (
        np.array(
            [
                cos_draws[2 * i] + sin_draws[2 * i] + cos_draws[2 * i + 1] + sin_draws[2 * i + 1]
                for i in range(n)
            ]
        )
        / 2
    )  # Holohan & Braghin §5.1, n = 2
    got = CsprngGaussian(KEY_A).sample((n,), 1.0, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_shapes_and_dtypes(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    out = CsprngGaussian(KEY_A).sample(shape, 0.5, dtype=dtype)
    assert out.shape == torch.Size(shape)
    assert out.dtype == dtype
    assert out.device.type == "cpu"
    assert torch.isfinite(out).all()


def test_default_dtype_zero_std_and_sample_like() -> None:
    sampler = CsprngGaussian(KEY_A)
    assert sampler.sample((3,), 1.0).dtype == torch.float32
    assert torch.equal(sampler.sample((4,), 0.0), torch.zeros(4))
    reference = torch.empty(2, 3, dtype=torch.float64)
    like = sampler.sample_like(reference, 1.0)
    assert like.shape == reference.shape and like.dtype == torch.float64


@pytest.mark.parametrize(
    ("shape", "std", "dtype"),
    [
        ([3], 1.0, torch.float32),
        ((3, -1), 1.0, torch.float32),
        ((3,), -1.0, torch.float32),
        ((3,), math.nan, torch.float32),
        ((3,), 1.0, torch.int64),
    ],
)
def test_bad_arguments(shape: object, std: float, dtype: torch.dtype) -> None:
    with pytest.raises(ConfigError):
        CsprngGaussian(KEY_A).sample(shape, std, dtype=dtype)  # type: ignore[arg-type]


def test_key_must_be_32_bytes_and_is_never_shown() -> None:
    with pytest.raises(ConfigError):
        CsprngGaussian(b"short")
    assert KEY_A.hex() not in repr(CsprngGaussian(KEY_A))


def test_fork_safety() -> None:
    # Simulate being in a forked child: the recorded pid no longer matches.
    keyed = CsprngGaussian(KEY_A)
    keyed._pid = -1
    with pytest.raises(PrivacyError, match="fork"):
        keyed.sample((3,), 1.0)
    os_keyed = CsprngGaussian()
    old_encryptor = os_keyed._encryptor
    os_keyed._pid = -1
    os_keyed.sample((3,), 1.0)  # re-keys from os.urandom instead of repeating the stream
    assert os_keyed._encryptor is not old_encryptor
    assert os_keyed._pid > 0


def test_a_million_samples_well_under_a_second() -> None:
    sampler = CsprngGaussian()
    sampler.sample((1000,), 1.0)  # warm up
    start = time.perf_counter()
    sampler.sample((N,), 1.0)
    assert time.perf_counter() - start < 1.0  # measured ~0.1 s


def test_seeded_generator_is_reproducible() -> None:
    a = torch.normal(0.0, 1.0, size=(5,), generator=seeded_torch_generator(7))
    b = torch.normal(0.0, 1.0, size=(5,), generator=seeded_torch_generator(7))
    c = torch.normal(0.0, 1.0, size=(5,), generator=seeded_torch_generator(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ConfigError):
            seeded_torch_generator(bad)  # type: ignore[arg-type]
