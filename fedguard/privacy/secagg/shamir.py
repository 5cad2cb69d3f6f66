"""Shamir t-of-k secret sharing of 32-byte secrets, vectorised with numpy.

Shamir, "How to Share a Secret", CACM 1979; used by Bonawitz et al., CCS 2017,
Fig. 4 (round ShareKeys) to share each client's self-mask seed and
mask-agreement private key, and by Bell et al., CCS 2020, §3, with the shares
spread over the client's k graph neighbours only.

Field: GF(p) with the Mersenne prime p = 2^31 − 1, so that a product of two
field elements fits in an int64 and Horner evaluation and Lagrange
interpolation run as whole-array numpy operations. A 32-byte secret is cut into
sixteen 16-bit chunks, each one a field element shared with its own random
polynomial of degree t − 1 (all chunks of all secrets of a client are shared in
one pass). Any t shares determine every chunk; t − 1 shares are uniformly
distributed whatever the secret (perfect secrecy of each chunk, hence of the
whole secret, since the polynomials are independent). Coefficients are uniform
in GF(p) by rejection sampling from ``os.urandom``.

A reconstructed chunk that is not below 2^16 proves that a share was wrong;
higher layers also check every reconstructed secret against a public value (a
commitment or an X25519 public key), so wrong shares are detected, not used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fedguard.core.checks import positive_int
from fedguard.privacy.secagg.errors import MalformedMessageError, ReconstructionError

__all__ = [
    "CHUNKS_PER_SECRET",
    "PRIME",
    "SECRET_BYTES",
    "combine",
    "elements_to_secret",
    "secret_to_elements",
    "split",
]

PRIME = 2**31 - 1
SECRET_BYTES = 32
_CHUNK_BYTES = 2
CHUNKS_PER_SECRET = SECRET_BYTES // _CHUNK_BYTES
_CHUNK_LIMIT = 1 << (8 * _CHUNK_BYTES)


def secret_to_elements(secret: bytes) -> np.ndarray:
    """A 32-byte secret as sixteen field elements (big-endian 16-bit chunks)."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise MalformedMessageError(f"a shared secret is {SECRET_BYTES} bytes")
    return np.frombuffer(secret, dtype=">u2").astype(np.int64)


def elements_to_secret(elements: np.ndarray) -> bytes:
    """Inverse of :func:`secret_to_elements`; an out-of-range chunk is a wrong share."""
    values = np.asarray(elements, dtype=np.int64)
    if values.shape != (CHUNKS_PER_SECRET,):
        raise MalformedMessageError(f"a secret is {CHUNKS_PER_SECRET} field elements")
    if np.any(values < 0) or np.any(values >= _CHUNK_LIMIT):
        raise ReconstructionError("shares reconstruct a value outside the secret's range")
    return values.astype(">u2").tobytes()


def _uniform_field(count: int) -> np.ndarray:
    """``count`` independent uniform elements of GF(p), by rejection from os.urandom."""
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        need = count - out.size
        draw = np.frombuffer(os.urandom(4 * (need + 8)), dtype="<u4") & np.uint32(0x7FFFFFFF)
        # 2^31 − 1 itself is the only 31-bit value outside GF(p): reject it (probability 2^-31).
        kept = draw[draw != np.uint32(PRIME)].astype(np.int64)
        out = np.concatenate([out, kept[:need]])
    return out


def split(secrets: Sequence[bytes], threshold: int, num_shares: int) -> np.ndarray:
    """Shares of ``secrets`` at x = 1..num_shares, any ``threshold`` of which reconstruct.

    Returns an int64 array of shape ``(num_shares, len(secrets) * 16)``: row r is
    the share at x = r + 1, the concatenation of the shares of every secret.
    """
    positive_int("threshold", threshold, error=MalformedMessageError)
    if not isinstance(num_shares, int) or not threshold <= num_shares < PRIME:
        raise MalformedMessageError(
            f"need threshold <= num_shares < p, got t={threshold}, k={num_shares}"
        )
    chunks = np.concatenate([secret_to_elements(s) for s in secrets])
    coefficients = _uniform_field((threshold - 1) * chunks.size).reshape(threshold - 1, chunks.size)
    xs = np.arange(1, num_shares + 1, dtype=np.int64)[:, None]
    # Horner from the highest coefficient; each product < 2^62 fits an int64.
    values = np.zeros((num_shares, chunks.size), dtype=np.int64)
    for row in coefficients[::-1]:
        values = (values * xs + row) % PRIME
    shares: np.ndarray = (values * xs + chunks) % PRIME
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> np.ndarray:
    """Lagrange coefficients λ_j with f(0) = Σ λ_j f(x_j) over GF(p)."""
    points = [int(x) for x in xs]
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise MalformedMessageError("share x-coordinates must be distinct and in [1, p)")
    coefficients = []
    for j, xj in enumerate(points):
        numerator = 1
        denominator = 1
        for m, xm in enumerate(points):
            if m != j:
                numerator = numerator * xm % PRIME
                denominator = denominator * (xm - xj) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return np.array(coefficients, dtype=np.int64)


def combine(xs: Sequence[int], shares: np.ndarray) -> np.ndarray:
    """The shared values (at x = 0) from shares ``shares[j]`` taken at ``xs[j]``.

    Exactly the given shares are used: pass t of them (more are consistent only
    if all are honest; fewer than t give a wrong value, not an error).
    """
    ys = np.asarray(shares, dtype=np.int64)
    if ys.ndim != 2 or ys.shape[0] != len(xs) or ys.shape[0] == 0:
        raise MalformedMessageError("shares must be a (count, length) array, one row per x")
    if np.any(ys < 0) or np.any(ys >= PRIME):
        raise MalformedMessageError("share values must lie in [0, p)")
    lambdas = lagrange_at_zero(xs)
    # Each product < 2^62; reduce before summing so the sum of t terms stays < 2^63.
    terms: np.ndarray = (ys * lambdas[:, None]) % PRIME
    result: np.ndarray = terms.sum(axis=0) % PRIME
    return result
