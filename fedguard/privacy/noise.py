"""Where DP-SGD's Gaussian noise comes from, and why it matters.

Threat model
------------
DP-SGD's guarantee assumes the noise added to each clipped gradient sum is
*unpredictable* to whoever sees the result. In fedguard that is the server
operator, the other silos (they receive the aggregated model), and anyone who
obtains a model update in transit or from a checkpoint. If one of them could
predict the noise, they could subtract it and recover the exact clipped
gradient sum of the silo's Poisson batch, which with small batches and known
architectures can leak individual records (gradient inversion, membership); the
(ε, δ) figures in the ledger would then mean nothing.

* **Mersenne Twister is not enough.** Opacus's default noise is
  ``torch.normal`` on MT19937. MT19937 is not cryptographic: its whole 19937-bit
  state can be reconstructed from 624 consecutive 32-bit outputs, and torch
  seeds it from a 64-bit value, which a determined adversary can search or may
  know outright (seeds are logged, derived from run ids, or reused across
  silos). Opacus's ``secure_mode=True`` swaps in ``torchcsprng``, which cannot be
  installed here, so fedguard brings its own CSPRNG: :class:`CsprngGaussian`,
  AES-256 in counter mode (a PRF; predicting its output without the key is as
  hard as breaking AES).
* **A fresh OS key per training session.** The key is 32 bytes from
  ``os.urandom`` drawn when the sampler is made, lives only in memory and is
  never logged, persisted or sent. Nothing observable (run id, round, seed) can
  reproduce it; a key compromised later does not reveal other sessions' noise.
  A forked child process (Ray, DataLoader workers) would share the parent's
  keystream, so an OS-keyed sampler re-keys itself after a fork.
* **Floating-point attacks.** Even perfect uniform bits can leak through the
  way floats are turned into Gaussians: Mironov (CCS 2012, "On significance of
  the least significant bits for differential privacy") showed that the set of
  doubles a textbook Laplace sampler can output depends on the true value, so a
  single release can reveal it; Jin, McMurtry, Rubinstein, Ohrimenko ("Are We
  There Yet? Timing and Floating-Point Attacks on Differential Privacy
  Systems", IEEE S&P 2022, arXiv 2112.05307) showed the same for Gaussian
  samplers, Opacus's included. fedguard applies the mitigation Opacus applies in
  secure mode, from Holohan & Braghin ("Secure Random Sampling in Differential
  Privacy", ESORICS 2021, arXiv 2107.10138, §5.1): each output is the sum of
  2n = 4 independent Gaussian draws divided by 2 (still N(0, σ²)), which raises
  the attacker's search cost from about 2^53 to 2^159. Box–Muller is evaluated in
  float64 from 53-bit uniforms and rounded to the training dtype only at the end.

What remains: this protects the noise against everyone *outside* the silo host.
The silo's own operating system RNG (``os.urandom``) and its host are trusted;
side channels on that host (timing, memory disclosure, a co-tenant reading the
key) are out of scope, as are attacks on the clipping or on the data pipeline.

:func:`seeded_torch_generator` gives reproducible noise for research runs. It is
MT19937 with a known seed: **never use it in production**.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedguard.core.checks import positive, positive_int
from fedguard.core.errors import ConfigError, PrivacyError

__all__ = ["CsprngGaussian", "seeded_torch_generator"]

logger = logging.getLogger(__name__)

_KEY_BYTES = 32  # AES-256
_DRAWS_PER_SAMPLE = 4  # Holohan & Braghin 2021, §5.1 with n = 2: sum of 2n draws / sqrt(2n)
_TWO_POW_MINUS_53 = 2.0**-53


class CsprngGaussian:
    """Gaussian samples from an AES-256-CTR keystream (``cryptography``).

    Each sample: four 64-bit keystream words → four 53-bit uniforms → two
    Box–Muller pairs (float64) → four N(0, 1) draws → their sum / 2 → × std.

    Args:
        key: 32 bytes. ``None`` (production) draws a fresh key from ``os.urandom``.
            An explicit key makes the stream deterministic: for tests only.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and (not isinstance(key, bytes) or len(key) != _KEY_BYTES):
            raise ConfigError(f"an AES-256 key is {_KEY_BYTES} bytes")
        self._explicit_key = key is not None
        self._lock = threading.Lock()
        self._rekey(key)

    def _rekey(self, key: bytes | None) -> None:
        key = key if key is not None else os.urandom(_KEY_BYTES)
        # A fresh key per sampler, so a fixed all-zero initial counter block is safe.
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
        self._pid = os.getpid()

    def __repr__(self) -> str:  # never show the key
        return f"CsprngGaussian(key={'explicit' if self._explicit_key else 'os.urandom'})"

    def _words(self, count: int) -> np.ndarray:
        """``count`` uniformly random 64-bit words from the keystream."""
        with self._lock:
            if os.getpid() != self._pid:
                if self._explicit_key:
                    raise PrivacyError(
                        "a CsprngGaussian with an explicit key was used after fork(); parent "
                        "and child would add the same noise"
                    )
                self._rekey(None)
            stream = self._encryptor.update(bytes(8 * count))
        return np.frombuffer(stream, dtype="<u8")

    def uniform(self, size: int) -> np.ndarray:
        """``size`` uniforms in [0, 1) (float64, 53 random bits each)."""
        positive_int("size", size, allow_zero=True)
        mantissas = (self._words(size) >> np.uint64(11)).astype(np.float64)
        uniforms: np.ndarray = mantissas * _TWO_POW_MINUS_53
        return uniforms

    def standard_normal(self, size: int) -> np.ndarray:
        """``size`` N(0, 1) samples in float64 (each the sum of four draws / 2)."""
        positive_int("size", size, allow_zero=True)
        # Two Box–Muller pairs per sample, both outputs of each used: four N(0, 1)
        # draws r·cos θ, r·sin θ per sample. Row 0 of the words gives the radii' uniforms,
        # row 1 the angles'; columns (2i, 2i+1) are the pairs of sample i.
        words = self._words(_DRAWS_PER_SAMPLE * size).reshape(2, 2 * size)
        mantissas = (words >> np.uint64(11)).astype(np.float64)  # top 53 bits, exact in float64
        u1 = (mantissas[0] + 1.0) * _TWO_POW_MINUS_53  # (0, 1]: log(u1) is finite
        u2 = mantissas[1] * _TWO_POW_MINUS_53  # [0, 1)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = (2.0 * math.pi) * u2
        draws_per_pair = radius * (np.cos(angle) + np.sin(angle))  # sum of the pair's two draws
        total: np.ndarray = draws_per_pair.reshape(size, 2).sum(axis=1)
        return total / math.sqrt(_DRAWS_PER_SAMPLE)  # sum of 4 N(0, 1) / 2 ~ N(0, 1)

    def sample(
        self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A tensor of i.i.d. N(0, std²) samples (on the CPU)."""
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ConfigError(f"shape must be a tuple of integers >= 0, got {shape!r}")
        positive("std", std, allow_zero=True)
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point dtype, got {dtype}")
        size = math.prod(shape)
        values = self.standard_normal(size) * float(std)
        return torch.from_numpy(values.reshape(shape)).to(dtype)

    def sample_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std²) noise with ``reference``'s shape, dtype and device."""
        noise = self.sample(tuple(reference.shape), std, dtype=reference.dtype)
        return noise.to(reference.device)


@functools.cache
def _warn_seeded_once() -> None:
    # Once per process: the choice is made per run, not per training step.
    logger.warning(
        "DP-SGD noise from a seeded Mersenne Twister: reproducible but predictable; "
        "use noise_source=csprng outside research"
    )


def seeded_torch_generator(seed: int) -> torch.Generator:
    """A torch Generator (MT19937) seeded with ``seed``, for reproducible research runs.

    NOT for production: anyone who knows or guesses the seed can reproduce the
    noise and subtract it from the silo's updates (see the module docstring).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    _warn_seeded_once()
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
