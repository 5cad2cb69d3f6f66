"""The neighbour graph of SecAgg+: a random k-regular graph from public randomness.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020, §3: replacing Bonawitz et al.'s complete graph (CCS 2017) by a sparse
random graph of degree k = O(log n) keeps privacy and dropout tolerance with high
probability, while each client agrees keys, shares secrets and expands masks
with its k neighbours only. The graph must be sampled from randomness the
server does not control after seeing the clients (§3–4); here it is derived
from the round's setup digest (round id, configuration, sampled node list), so
every client recomputes it and a server cannot hand clients different graphs.

Construction (as in Flower's SecAgg+ and Bell et al.'s implementation advice): a
Harary graph on a uniformly random cyclic order — each node is joined to the
k/2 nodes before and after it on the ring. It is exactly k-regular, each node's
neighbourhood is marginally a uniformly random k-subset of the others, and
removing nodes disconnects it only if k/2 consecutive nodes of the ring are
removed (the bound :mod:`fedguard.privacy.secagg.analysis` uses). With
k = n − 1 it is the complete graph, i.e. Bonawitz et al.'s SecAgg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedguard.privacy.secagg.crypto import KEY_BYTES, hkdf_sha256
from fedguard.privacy.secagg.errors import MalformedMessageError, SecAggConfigError

__all__ = ["MAX_NODE_ID", "NeighbourGraph", "validate_node_ids"]

#: Flower node ids are unsigned 64-bit integers.
MAX_NODE_ID = 2**64 - 1
_TWO_64 = 2**64


def validate_node_ids(node_ids: Sequence[int]) -> tuple[int, ...]:
    """The sorted, de-duplicated node ids; anything else is a typed error."""
    ids = tuple(node_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise MalformedMessageError("node ids must be integers")
    if any(not 0 <= i <= MAX_NODE_ID for i in ids):
        raise MalformedMessageError("node ids must lie in [0, 2^64)")
    if len(set(ids)) != len(ids):
        raise MalformedMessageError("node ids must be distinct")
    return tuple(sorted(ids))


class _KeystreamIntegers:
    """Unbiased integers in [0, bound) from an AES-256-CTR keystream (rejection sampling)."""

    def __init__(self, seed: bytes) -> None:
        self._encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
        self._words: list[int] = []

    def below(self, bound: int) -> int:
        limit = _TWO_64 - _TWO_64 % bound
        while True:
            if not self._words:
                self._words = np.frombuffer(self._encryptor.update(bytes(8 * 64)), "<u8").tolist()
            word = self._words.pop()
            if word < limit:
                return int(word % bound)


@dataclass(frozen=True)
class NeighbourGraph:
    """Who is whose neighbour in one round; every party computes the same graph."""

    node_ids: tuple[int, ...]
    degree: int
    ring: tuple[int, ...]
    _neighbours: dict[int, tuple[int, ...]] = field(repr=False, compare=False)

    @classmethod
    def build(cls, node_ids: Sequence[int], degree: int, seed: bytes) -> NeighbourGraph:
        """The Harary graph of ``degree`` on the cyclic order shuffled by ``seed``.

        ``degree`` is ``n − 1`` (complete graph) or even with ``2 <= degree <= n − 2``.
        """
        ids = validate_node_ids(node_ids)
        n = len(ids)
        if n < 2:
            raise SecAggConfigError("a neighbour graph needs at least 2 nodes")
        if isinstance(degree, bool) or not isinstance(degree, int):
            raise SecAggConfigError(f"degree must be an integer, got {degree!r}")
        if degree != n - 1 and not (degree % 2 == 0 and 2 <= degree <= n - 2):
            raise SecAggConfigError(
                f"degree must be n-1={n - 1} or even in [2, n-2], got {degree} (n={n})"
            )
        if not isinstance(seed, bytes) or len(seed) != KEY_BYTES:
            raise MalformedMessageError(f"graph seed must be {KEY_BYTES} bytes")
        # Fisher–Yates with an unbiased keystream: a uniformly random cyclic order.
        draw = _KeystreamIntegers(hkdf_sha256(seed, b"fedguard/secagg/v1/graph-permutation"))
        order = list(ids)
        for i in range(n - 1, 0, -1):
            j = draw.below(i + 1)
            order[i], order[j] = order[j], order[i]
        if degree == n - 1:
            neighbours = {node: tuple(x for x in ids if x != node) for node in ids}
        else:
            half = degree // 2
            neighbours = {}
            for position, node in enumerate(order):
                around = [order[(position + d) % n] for d in range(-half, half + 1) if d != 0]
                neighbours[node] = tuple(sorted(around))
        return cls(ids, degree, tuple(order), neighbours)

    def neighbours(self, node: int) -> tuple[int, ...]:
        """The sorted neighbours of ``node`` (never ``node`` itself)."""
        try:
            return self._neighbours[node]
        except KeyError:
            raise MalformedMessageError(f"node {node} is not in this round") from None

    def are_neighbours(self, a: int, b: int) -> bool:
        return b in self._neighbours.get(a, ())

    def share_x(self, owner: int, holder: int) -> int:
        """The Shamir x-coordinate of ``owner``'s share held by ``holder``: 1 + its rank."""
        try:
            return self.neighbours(owner).index(holder) + 1
        except ValueError:
            raise MalformedMessageError(
                f"node {holder} is not a neighbour of node {owner}"
            ) from None
