"""Fixed-point encoding of model updates into Z_{2^32}, and exact decoding of sums.

Secure aggregation sums integers modulo R (Bonawitz et al., CCS 2017; Bell
et al., CCS 2020, §3); a float update must first be made an integer vector. Each
value x is

1. clipped to ``[-c, c]`` — the number of clipped values is returned, never
   hidden (a large count means ``clip_range`` is too small for the update);
2. mapped to ``s = (x + c) · L / (2c)`` in ``[0, L]`` with ``L = 2^value_bits − 1``
   and rounded **stochastically** to ``u = ⌊s⌋ + Bernoulli(s − ⌊s⌋)``, so that
   E[u] = s: the quantisation error is unbiased and averages out over clients
   and rounds (Suresh et al., "Distributed Mean Estimation with Limited
   Communication", ICML 2017; Kairouz et al., "The Distributed Discrete
   Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML
   2021, use the same unbiased rounding before SecAgg). The Bernoulli draws
   come from an AES-256-CTR keystream keyed from ``os.urandom``: the rounding
   bits depend on the private data's fractional parts, so they are drawn from a
   CSPRNG like every other secret of the protocol;
3. multiplied by the client's integer weight ``w ∈ [0, 2^weight_bits]`` (e.g. its
   capped number of examples, for weighted FedAvg); ``w`` itself is appended as
   the last coordinate, so the server learns Σw with the sum.

The configuration guarantees ``n · 2^q < 2^32`` (q = value_bits + weight_bits), so
the sum over the survivors never wraps and decoding is exact: the integer sum
``T = Σ w_i u_i`` and ``W = Σ w_i`` give
``Σ_i w_i (u_i · 2c/L − c) = T · 2c/L − c · W``, the sum of the clients'
quantised, weighted inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.errors import EncodingError

__all__ = ["DecodedSum", "EncodedInput", "FixedPointEncoder", "StochasticRounder"]

_TWO_POW_MINUS_32 = 2.0**-32


class StochasticRounder:
    """Uniform [0, 1) draws (32-bit resolution) from an AES-256-CTR keystream.

    Args:
        key: 32 bytes. ``None`` (production) draws a fresh key from ``os.urandom``;
            an explicit key makes the rounding reproducible, for tests only.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and (not isinstance(key, bytes) or len(key) != 32):
            raise EncodingError("a stochastic-rounding key is 32 bytes")
        self._explicit = key is not None
        self._encryptor = Cipher(
            algorithms.AES(key if key is not None else os.urandom(32)), modes.CTR(b"\x00" * 16)
        ).encryptor()

    def __repr__(self) -> str:  # never show the key
        return f"StochasticRounder(key={'explicit' if self._explicit else 'os.urandom'})"

    def uniform(self, size: int) -> np.ndarray:
        words = np.frombuffer(self._encryptor.update(bytes(4 * size)), dtype="<u4")
        return words.astype(np.float64) * _TWO_POW_MINUS_32


@dataclass(frozen=True)
class EncodedInput:
    """A client's encoded update: ``m`` weighted fixed-point values, then the weight."""

    values: np.ndarray
    num_clipped: int
    weight: int

    @property
    def length(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class DecodedSum:
    """The decoded aggregate: Σ_i w_i x̃_i (x̃ the quantised input) and Σ_i w_i."""

    weighted_sum: np.ndarray
    total_weight: int

    def mean(self) -> np.ndarray:
        """The weighted mean Σ w_i x̃_i / Σ w_i."""
        if self.total_weight <= 0:
            raise EncodingError("the total weight is 0: no weighted mean exists")
        result: np.ndarray = self.weighted_sum / float(self.total_weight)
        return result


class FixedPointEncoder:
    """Encodes one client's float vector and decodes aggregated sums (see module docs)."""

    def __init__(self, config: SecAggConfig) -> None:
        if not isinstance(config, SecAggConfig):
            raise EncodingError("FixedPointEncoder needs a SecAggConfig")
        self.config = config
        self.clip = float(config.clip_range)
        self.levels = config.levels
        self.step = 2.0 * self.clip / self.levels

    def encoded_length(self, num_values: int) -> int:
        """Length of the uint32 vector the protocol masks: the values and the weight."""
        return num_values + 1

    def encode(
        self,
        values: np.ndarray,
        weight: int = 1,
        rounder: StochasticRounder | None = None,
    ) -> EncodedInput:
        """Clip (counted), stochastically round, weight; append the weight."""
        x = np.asarray(values)
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise EncodingError(f"values must be a numeric array, got dtype {x.dtype}")
        x = x.astype(np.float64, copy=False).ravel()
        if x.size == 0:
            raise EncodingError("cannot encode an empty vector")
        if not np.all(np.isfinite(x)):
            raise EncodingError("values hold NaN or Inf: refusing to encode (not clipped)")
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
            raise EncodingError(f"weight must be an integer, got {weight!r}")
        w = int(weight)
        if not 0 <= w <= self.config.max_weight:
            raise EncodingError(
                f"weight {w} outside [0, 2^weight_bits = {self.config.max_weight}]; "
                "scale or cap weights before encoding (never silently clamped)"
            )
        num_clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        scaled = (np.clip(x, -self.clip, self.clip) + self.clip) * (self.levels / (2.0 * self.clip))
        # Only floating-point rounding can push s outside [0, L] here; clipped values
        # are already counted above.
        np.clip(scaled, 0.0, float(self.levels), out=scaled)
        floor = np.floor(scaled)
        draws = (rounder if rounder is not None else StochasticRounder()).uniform(x.size)
        quantised = floor + (draws < (scaled - floor))
        encoded = np.empty(x.size + 1, dtype=np.uint32)
        encoded[:-1] = quantised.astype(np.uint64) * np.uint64(w)
        encoded[-1] = w
        return EncodedInput(encoded, num_clipped, w)

    def dequantise(self, encoded: EncodedInput) -> np.ndarray:
        """One client's quantised, weighted input w · x̃ (a reference for tests)."""
        return self.decode(encoded.values).weighted_sum

    def decode(self, total: np.ndarray) -> DecodedSum:
        """Σ_i w_i x̃_i and Σ_i w_i from the unmasked uint32 sum (exact integers)."""
        t = np.asarray(total)
        if t.dtype != np.uint32 or t.ndim != 1 or t.size < 2:
            raise EncodingError("a sum to decode is a 1-D uint32 vector of length >= 2")
        total_weight = int(t[-1])
        weighted = t[:-1].astype(np.float64) * self.step - self.clip * total_weight
        if total_weight > self.config.num_clients * self.config.max_weight:
            raise EncodingError("total weight exceeds n · 2^weight_bits: the sum is corrupt")
        return DecodedSum(weighted, total_weight)
