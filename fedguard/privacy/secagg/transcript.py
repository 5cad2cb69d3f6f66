"""The SecAgg+ round transcript: the stages and what both sides derive from the setup.

This module holds what a client and the server of a round both compute: the
:class:`Stage` names, the pairwise mask seeds and share-encryption keys (HKDF
bound to the setup digest and the pair), the self-mask seed commitments, the
message signed in the consistency check, the share plaintext and its associated
data, and the round's neighbour graph.

The protocol is Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Fig. 4 (rounds 0–4:
AdvertiseKeys, ShareKeys, MaskedInputCollection, ConsistencyCheck, Unmasking),
on the sparse neighbour graph of Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020, §3 (each client only agrees keys,
shares secrets and masks with its k neighbours) and §4 (consistency checks
against a malicious server).

Round, for client i with neighbours N(i) (``graph``), threshold t:

0. **AdvertiseKeys.** i draws fresh X25519 keys (``c`` for masks, ``s`` for share
   encryption), a per-round Ed25519 key for the consistency check and a 32-byte
   self-mask seed ``b_i`` (``os.urandom``); it advertises the public keys and a
   commitment to ``b_i``, signed with its Ed25519 identity key when the round
   requires identities. The server relays each client its neighbours' adverts.
1. **ShareKeys.** i verifies every relayed advert (round, neighbour, signature,
   no duplicates or reflected keys), then Shamir-shares ``b_i`` and ``c_i^SK``
   t-of-k and encrypts each neighbour's shares with AES-256-GCM under
   HKDF(X25519(s_i, s_j)), with the setup digest, sender and receiver as
   associated data.
2. **MaskedInputCollection.** i decrypts the shares relayed to it (any AAD or tag
   mismatch is refused), then uploads
   y_i = x_i + PRG(b_i) + Σ_{j∈N(i), j<i} PRG(s_ij) − Σ_{j∈N(i), j>i} PRG(s_ij) mod 2^32,
   s_ij = HKDF(X25519(c_i, c_j)), PRG = AES-256-CTR, over the neighbours that
   shared with it. The server only keeps the running sum of the y_i.
3. **ConsistencyCheck.** The server sends the survivors U3 (who uploaded); each
   signs (setup digest, U3) with its per-round Ed25519 key.
4. **Unmasking.** The server sends U3, the dropped list U2 \\ U3 and the
   neighbours' signatures. i refuses (typed error, nothing revealed) if the
   round id, the survivor list or a signature does not match, if a node is
   listed both dropped and alive, or if fewer than t neighbours signed;
   otherwise it reveals, per neighbour, the ``b`` share (alive) or the ``c^SK``
   share (dropped), never both. The server reconstructs the survivors' self
   masks and the dropped nodes' mask keys, checks them against the commitments
   and public keys, and removes the masks: the result is the exact sum of the
   survivors' encoded inputs mod 2^32.

Every client stage is a method of
:class:`~fedguard.privacy.secagg.client_round.ClientRound` (serialisable with
``to_bytes``/``from_bytes``, since Flower rebuilds the ClientApp per message);
every server stage a method of
:class:`~fedguard.privacy.secagg.server_round.ServerRound`.
:func:`~fedguard.privacy.secagg.driver.run_round` runs a whole round in memory
with any dropout schedule; it is the reference for the Flower transport.

Threat model notes: with ``require_identity`` every advert is signed with a
long-term Ed25519 key that clients look up in their own registry, so a server
cannot substitute keys (Bonawitz et al.'s security against an active server
likewise assumes a PKI). Without identity keys the protocol is secure against an
honest-but-curious server only. With adversarially chosen dropouts a server can
learn sums of disjoint groups of at least t + 1 clients (the components of the
surviving graph; Bell et al. §4). Client-side refusals are errors the ClientApp
turns into an error reply; the server then sees the client as dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from enum import StrEnum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard.privacy.secagg.crypto import hkdf_sha256, sha256, x25519_agree
from fedguard.privacy.secagg.errors import RoundMismatchError
from fedguard.privacy.secagg.graph import NeighbourGraph
from fedguard.privacy.secagg.messages import SetupRequest, Writer

__all__ = [
    "Stage",
    "check_round",
    "consistency_message",
    "elements_bytes",
    "pairwise_mask_seed",
    "round_graph",
    "seed_commitment",
    "share_aad",
    "share_encryption_key",
    "share_plaintext",
]


class Stage(StrEnum):
    """Protocol stages (Bonawitz et al. Fig. 4 rounds 0–4); ``DONE`` ends a state."""

    ADVERTISE_KEYS = "advertise-keys"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    CONSISTENCY_CHECK = "consistency-check"
    UNMASK = "unmask"
    DONE = "done"


# ----------------------------------------------------------------- transcript helpers


def _pair_info(label: bytes, digest: bytes, a: int, b: int) -> bytes:
    low, high = min(a, b), max(a, b)
    return Writer(b"INFO").blob(label).raw(digest).u64(low).u64(high).finish()


def pairwise_mask_seed(
    mask_private: bytes | X25519PrivateKey, peer_mask_public: bytes, digest: bytes, a: int, b: int
) -> bytes:
    """s_ab: HKDF-SHA256 of the X25519 secret, bound to the round and the (unordered) pair."""
    secret = x25519_agree(mask_private, peer_mask_public)
    return hkdf_sha256(secret, _pair_info(b"pairwise-mask", digest, a, b))


def share_encryption_key(
    share_private: bytes | X25519PrivateKey, peer_share_public: bytes, digest: bytes, a: int, b: int
) -> bytes:
    """The AES-256-GCM key for shares between a and b: HKDF of their share-key secret."""
    secret = x25519_agree(share_private, peer_share_public)
    return hkdf_sha256(secret, _pair_info(b"share-encryption", digest, a, b))


def share_aad(digest: bytes, sender: int, receiver: int) -> bytes:
    """Associated data of the share ``sender`` encrypts for ``receiver``."""
    # Directional: a share from a to b never opens as one from b to a.
    return Writer(b"SAAD").raw(digest).u64(sender).u64(receiver).finish()


def seed_commitment(digest: bytes, node: int, seed: bytes) -> bytes:
    return sha256(b"fedguard/secagg/v1/seed-commitment", digest, node.to_bytes(8, "big"), seed)


def consistency_message(digest: bytes, survivors: Sequence[int]) -> bytes:
    """What each survivor signs in the consistency check."""
    return Writer(b"CONS").raw(digest).ids(survivors).finish()


def round_graph(setup: SetupRequest) -> NeighbourGraph:
    """The round's neighbour graph, seeded by the setup digest (cached)."""
    return _graph_cached(setup.digest(), setup.node_ids, setup.config.degree)


@functools.lru_cache(maxsize=32)
def _graph_cached(digest: bytes, node_ids: tuple[int, ...], degree: int) -> NeighbourGraph:
    # Public and immutable: a client reloading its state each stage reuses it.
    seed = hkdf_sha256(digest, b"fedguard/secagg/v1/graph-seed")
    return NeighbourGraph.build(node_ids, degree, seed)


def elements_bytes(elements: np.ndarray) -> bytes:
    """Field elements (each < 2^32) as big-endian uint32 bytes."""
    return np.asarray(elements, dtype=np.int64).astype(">u4").tobytes()


def check_round(expected: bytes, got: bytes, what: str) -> None:
    """``RoundMismatchError`` unless a message's round id ``got`` is this round's."""
    if got != expected:
        raise RoundMismatchError(
            f"{what} carries round id {got.hex()[:16]}…, this round is {expected.hex()[:16]}…"
        )


def share_plaintext(owner: int, holder: int, x: int, seed: bytes, key: bytes) -> bytes:
    """What a share ciphertext encrypts: who owns it, who holds it, x, both secret shares."""
    return Writer(b"SHPT").u64(owner).u64(holder).u32(x).raw(seed).raw(key).finish()
