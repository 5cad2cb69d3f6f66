"""Validated configuration of one secure-aggregation round.

The parameters follow Bell et al., CCS 2020, §3–4 (degree k of the neighbour
graph and Shamir threshold t, with t > k/2 against a malicious server) and
Bonawitz et al., CCS 2017 (inputs are vectors over Z_R; here R = 2^32, so a
masked vector uploads as uint32, the size of float32 plaintext).

The overflow budget is checked when the config is built: every encoded value
is ``u · w`` with ``u < 2^value_bits`` and ``w <= 2^weight_bits``, i.e. below
``2^q`` with ``q = value_bits + weight_bits``, so the sum over ``n`` clients is
exact in Z_{2^32} iff ``n · 2^q <= 2^32``; the config requires the strict
``n · 2^q < 2^32`` of the issue, which also leaves the weight column exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedguard.core.checks import positive
from fedguard.privacy.secagg.analysis import choose_parameters
from fedguard.privacy.secagg.errors import SecAggConfigError

__all__ = ["RING_BITS", "SecAggConfig"]

#: Masked vectors live in Z_{2^32} and travel as uint32.
RING_BITS = 32
#: Largest clients count any config accepts (Shamir x-coordinates, message sizes).
MAX_CLIENTS = 65_536


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SecAggConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """One round's SecAgg+ parameters; the server sends them, each client re-validates.

    Attributes:
        num_clients: n, the number of clients sampled for the round (>= 3).
        degree: k, neighbours per client: ``n − 1`` (complete graph, Bonawitz et al.)
            or even in ``[2, n − 2]`` (Harary graph, Bell et al.).
        threshold: t, shares needed to reconstruct a secret; ``2 <= t <= k`` and
            ``t > k/2`` so a malicious server cannot obtain both secrets of a node
            from its honest neighbours (Bell et al. §4). t >= 2 also means the
            server never learns a "sum" of one client.
        clip_range: inputs are clipped to ``[-clip_range, clip_range]`` (counted).
        value_bits: fixed-point levels per value: ``2^value_bits − 1`` steps.
        weight_bits: integer weights lie in ``[0, 2^weight_bits]``.
        require_identity: every participant signs its key advertisement with its
            Ed25519 identity key and every client verifies its neighbours'.
    """

    num_clients: int
    degree: int
    threshold: int
    clip_range: float = 1.0
    value_bits: int = 16
    weight_bits: int = 8
    require_identity: bool = False

    def __post_init__(self) -> None:
        n, k, t = self.num_clients, self.degree, self.threshold
        _require(
            _is_int(n) and 3 <= n <= MAX_CLIENTS,
            f"num_clients must be an integer in [3, {MAX_CLIENTS}], got {n!r}",
        )
        _require(_is_int(k), f"degree must be an integer, got {k!r}")
        _require(
            k == n - 1 or (k % 2 == 0 and 2 <= k <= n - 2),
            f"degree must be n-1={n - 1} (complete graph) or even in [2, {n - 2}], got {k}",
        )
        _require(_is_int(t), f"threshold must be an integer, got {t!r}")
        _require(2 <= t <= k, f"threshold must lie in [2, degree={k}], got {t}")
        _require(
            2 * t > k,
            f"threshold t={t} must exceed degree/2={k / 2:g}: otherwise a malicious server "
            "can collect both secrets of a client from two halves of its neighbours",
        )
        positive("clip_range", self.clip_range, error=SecAggConfigError)
        _require(
            _is_int(self.value_bits) and 1 <= self.value_bits <= RING_BITS - 2,
            f"value_bits must be an integer in [1, {RING_BITS - 2}], got {self.value_bits!r}",
        )
        _require(
            _is_int(self.weight_bits) and 0 <= self.weight_bits <= RING_BITS - 2,
            f"weight_bits must be an integer in [0, {RING_BITS - 2}], got {self.weight_bits!r}",
        )
        _require(
            isinstance(self.require_identity, bool),
            f"require_identity must be a bool, got {self.require_identity!r}",
        )
        q = self.bits_per_value
        _require(
            n * 2**q < 2**RING_BITS,
            f"overflow budget: n·2^q = {n}·2^{q} must be < 2^{RING_BITS} "
            f"(q = value_bits {self.value_bits} + weight_bits {self.weight_bits}); "
            f"lower value_bits or weight_bits to at most q = {self.max_bits_per_value(n)} bits",
        )

    @property
    def bits_per_value(self) -> int:
        """q: bits of one encoded value, weight included."""
        return self.value_bits + self.weight_bits

    @property
    def max_weight(self) -> int:
        return int(2**self.weight_bits)

    @property
    def levels(self) -> int:
        """L = 2^value_bits − 1: a clipped value maps to an integer in [0, L]."""
        return int(2**self.value_bits - 1)

    @staticmethod
    def max_bits_per_value(num_clients: int) -> int:
        """The largest q with n · 2^q < 2^32."""
        return RING_BITS - 1 - math.floor(math.log2(num_clients)) if num_clients > 0 else 0

    @classmethod
    def recommended(
        cls,
        num_clients: int,
        *,
        dropout_rate: float = 0.1,
        corrupt_fraction: float = 0.05,
        security_bits: float = 40.0,
        correctness_bits: float = 20.0,
        clip_range: float = 1.0,
        value_bits: int = 16,
        weight_bits: int = 8,
        require_identity: bool = False,
    ) -> SecAggConfig:
        """k and t from :func:`fedguard.privacy.secagg.analysis.choose_parameters`."""
        chosen = choose_parameters(
            num_clients,
            dropout_rate=dropout_rate,
            corrupt_fraction=corrupt_fraction,
            security_bits=security_bits,
            correctness_bits=correctness_bits,
        )
        return cls(
            num_clients=num_clients,
            degree=chosen.degree,
            threshold=chosen.threshold,
            clip_range=clip_range,
            value_bits=value_bits,
            weight_bits=weight_bits,
            require_identity=require_identity,
        )

    def to_fields(self) -> dict[str, int | float | bool]:
        """A flat mapping of Flower ``ConfigRecord``-compatible values."""
        return {
            "num_clients": self.num_clients,
            "degree": self.degree,
            "threshold": self.threshold,
            "clip_range": float(self.clip_range),
            "value_bits": self.value_bits,
            "weight_bits": self.weight_bits,
            "require_identity": self.require_identity,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> SecAggConfig:
        """Inverse of :meth:`to_fields`; unknown or missing keys are errors."""
        expected = {"num_clients", "degree", "threshold", "clip_range", "value_bits"}
        expected |= {"weight_bits", "require_identity"}
        if set(fields) != expected:
            raise SecAggConfigError(
                f"secagg config fields must be exactly {sorted(expected)}, got {sorted(fields)}"
            )
        return cls(
            num_clients=fields["num_clients"],
            degree=fields["degree"],
            threshold=fields["threshold"],
            clip_range=fields["clip_range"],
            value_bits=fields["value_bits"],
            weight_bits=fields["weight_bits"],
            require_identity=fields["require_identity"],
        )
