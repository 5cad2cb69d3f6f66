"""SecAgg+ as explicit stages over a client state and a server state (no transport).

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

Every client stage is a method of :class:`ClientRound` (serialisable with
``to_bytes``/``from_bytes``, since Flower rebuilds the ClientApp per message);
every server stage a method of :class:`ServerRound`. :func:`run_round` runs a
whole round in memory with any dropout schedule; it is the reference for the
Flower transport.

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
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import (
    KEY_BYTES,
    MaskExpander,
    aead_open,
    aead_seal,
    ed25519_keypair,
    ed25519_public,
    ed25519_sign,
    ed25519_verify,
    hkdf_sha256,
    random_bytes,
    sha256,
    x25519_agree,
    x25519_keypair,
    x25519_private,
    x25519_public,
)
from fedguard.privacy.secagg.errors import (
    AdvertisementError,
    BelowThresholdError,
    ConsistencyError,
    IdentityError,
    MalformedMessageError,
    ReconstructionError,
    RoundMismatchError,
    SecAggConfigError,
    SecAggError,
    ShareDecryptionError,
    SignatureError,
    StageOrderError,
)
from fedguard.privacy.secagg.graph import NeighbourGraph
from fedguard.privacy.secagg.messages import (
    SHARE_BYTES,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    Payload,
    Reader,
    RevealedShare,
    SetupRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
    Writer,
)
from fedguard.privacy.secagg.shamir import CHUNKS_PER_SECRET, combine, elements_to_secret, split

T = TypeVar("T")
RequestT = TypeVar("RequestT", bound="Payload")
ReplyT = TypeVar("ReplyT", bound="Payload")

__all__ = [
    "AggregateResult",
    "ClientRound",
    "RoundOutcome",
    "ServerRound",
    "Stage",
    "run_round",
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


def _share_key(
    share_private: bytes | X25519PrivateKey, peer_share_public: bytes, digest: bytes, a: int, b: int
) -> bytes:
    secret = x25519_agree(share_private, peer_share_public)
    return hkdf_sha256(secret, _pair_info(b"share-encryption", digest, a, b))


def _share_aad(digest: bytes, sender: int, receiver: int) -> bytes:
    # Directional: a share from a to b never opens as one from b to a.
    return Writer(b"SAAD").raw(digest).u64(sender).u64(receiver).finish()


def seed_commitment(digest: bytes, node: int, seed: bytes) -> bytes:
    return sha256(b"fedguard/secagg/v1/seed-commitment", digest, node.to_bytes(8, "big"), seed)


def consistency_message(digest: bytes, survivors: Sequence[int]) -> bytes:
    """What each survivor signs in the consistency check."""
    return Writer(b"CONS").raw(digest).ids(survivors).finish()


def _graph_for(setup: SetupRequest) -> NeighbourGraph:
    return _graph_cached(setup.digest(), setup.node_ids, setup.config.degree)


@functools.lru_cache(maxsize=32)
def _graph_cached(digest: bytes, node_ids: tuple[int, ...], degree: int) -> NeighbourGraph:
    # Public and immutable: a client reloading its state each stage reuses it.
    seed = hkdf_sha256(digest, b"fedguard/secagg/v1/graph-seed")
    return NeighbourGraph.build(node_ids, degree, seed)


def _elements_bytes(elements: np.ndarray) -> bytes:
    return np.asarray(elements, dtype=np.int64).astype(">u4").tobytes()


def _check_round(expected: bytes, got: bytes, what: str) -> None:
    if got != expected:
        raise RoundMismatchError(
            f"{what} carries round id {got.hex()[:16]}…, this round is {expected.hex()[:16]}…"
        )


def _share_plaintext(owner: int, holder: int, x: int, seed: bytes, key: bytes) -> bytes:
    return Writer(b"SHPT").u64(owner).u64(holder).u32(x).raw(seed).raw(key).finish()


# ===================================================================== client side


@dataclass
class ClientRound:
    """One client's secret state for one round; ``to_bytes`` for Flower's ``context.state``.

    Build it with :meth:`start`; then call, in order, :meth:`share_keys`,
    :meth:`mask_input`, :meth:`sign_survivors` and :meth:`unmask`. Each checks that
    it is the expected stage (a replayed or reordered request is a
    :class:`StageOrderError`). Secrets are erased as soon as they are no longer
    needed: the private keys and the self-mask seed after masking, the held shares
    after unmasking. The serialised state holds secrets: keep it in the node's
    local state only, never in a message or a log.
    """

    setup: SetupRequest
    node_id: int
    stage: Stage
    advertisement: KeyAdvertisement
    identity_keys: dict[int, bytes] = field(repr=False)
    mask_private: bytes = field(repr=False)
    share_private: bytes = field(repr=False)
    verify_private: bytes = field(repr=False)
    self_seed: bytes = field(repr=False)
    neighbour_ads: dict[int, KeyAdvertisement] = field(default_factory=dict, repr=False)
    held_shares: dict[int, tuple[int, bytes, bytes]] = field(default_factory=dict, repr=False)
    masked_with: tuple[int, ...] = ()
    signed_survivors: tuple[int, ...] = ()
    _digest: bytes = field(init=False, repr=False, compare=False)
    _graph: NeighbourGraph = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.setup, SetupRequest):
            raise MalformedMessageError("setup must be a SetupRequest")
        if self.node_id not in self.setup.node_ids:
            raise MalformedMessageError(f"node {self.node_id} is not in this round")
        if not isinstance(self.stage, Stage) or self.stage is Stage.ADVERTISE_KEYS:
            raise MalformedMessageError(f"invalid client stage {self.stage!r}")
        if self.advertisement.node_id != self.node_id:
            raise MalformedMessageError("own advertisement names another node")
        for name in ("mask_private", "share_private", "verify_private", "self_seed"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) not in (0, KEY_BYTES):
                raise MalformedMessageError(f"{name} must be {KEY_BYTES} bytes or erased")
        for owner, (_, seed_share, key_share) in self.held_shares.items():
            if len(seed_share) != SHARE_BYTES or len(key_share) != SHARE_BYTES:
                raise MalformedMessageError(f"held share of node {owner} has the wrong size")
        self._digest = self.setup.digest()
        self._graph = _graph_for(self.setup)

    # ------------------------------------------------------------------ helpers

    @property
    def round_id(self) -> bytes:
        return self.setup.round_id

    @property
    def config(self) -> SecAggConfig:
        return self.setup.config

    @property
    def neighbours(self) -> tuple[int, ...]:
        return self._graph.neighbours(self.node_id)

    @contextmanager
    def _refusing(self, stage: Stage) -> Iterator[None]:
        """Run a stage; on any refusal erase every secret, so nothing is revealed later."""
        if self.stage is not stage:
            self._erase()
            raise StageOrderError(
                f"node {self.node_id} got a {stage.value} request while at stage "
                f"{self.stage.value} (replayed or out-of-order message)"
            )
        try:
            yield
        except SecAggError:
            self._erase()
            raise

    def _erase(self) -> None:
        self.mask_private = self.share_private = self.verify_private = self.self_seed = b""
        self.held_shares = {}
        self.stage = Stage.DONE

    def _below(self, stage: Stage, what: str, have: int) -> BelowThresholdError:
        return BelowThresholdError(
            stage.value,
            f"node {self.node_id} has {what} from only {have} neighbour(s); threshold "
            f"t={self.config.threshold}: refusing, nothing revealed",
        )

    # ------------------------------------------------------------------ stage 0

    @classmethod
    def start(
        cls,
        setup: SetupRequest,
        node_id: int,
        *,
        identity_key: bytes | None = None,
        identity_registry: Mapping[int, bytes] | None = None,
        expected_config: SecAggConfig | None = None,
    ) -> tuple[ClientRound, KeyAdvertisement]:
        """AdvertiseKeys: fresh per-round keys, self-mask seed and (signed) advert.

        ``identity_key`` is this node's Ed25519 private key (32 raw bytes) and
        ``identity_registry`` maps every node id to its Ed25519 public key, from the
        consortium's own registry, never from the server. A node that holds a
        registry refuses a round that does not require identities (no downgrade).
        ``expected_config``, when given, is the configuration the consortium agreed
        on: a server that asks for anything else (a smaller threshold, a sparser
        graph) is refused.
        """
        if not isinstance(setup, SetupRequest):
            raise MalformedMessageError("setup must be a SetupRequest")
        if node_id not in setup.node_ids:
            raise MalformedMessageError(f"node {node_id} is not among the round's nodes")
        config = setup.config
        if expected_config is not None and config != expected_config:
            raise SecAggConfigError(
                f"the server asked for {config}, not the agreed {expected_config}: refusing"
            )
        identity_keys: dict[int, bytes] = {}
        if identity_registry is not None and not config.require_identity:
            raise IdentityError(
                "this node requires authenticated key advertisements, but the server "
                "asked for a round without identity keys"
            )
        if config.require_identity:
            if identity_key is None or identity_registry is None:
                raise IdentityError("the round requires identity keys: give key and registry")
            missing = [n for n in setup.node_ids if n not in identity_registry]
            if missing:
                raise IdentityError(f"no registered identity key for node(s) {missing[:5]}")
            identity_keys = {n: bytes(identity_registry[n]) for n in setup.node_ids}
            if ed25519_public(identity_key) != identity_keys[node_id]:
                raise IdentityError("the identity key does not match this node's registry entry")
        digest = setup.digest()
        mask_private, mask_public = x25519_keypair()
        share_private, share_public = x25519_keypair()
        verify_private, verify_public = ed25519_keypair()
        self_seed = random_bytes(KEY_BYTES)
        unsigned = KeyAdvertisement(
            setup.round_id,
            node_id,
            mask_public,
            share_public,
            verify_public,
            seed_commitment(digest, node_id, self_seed),
        )
        advertisement = unsigned
        if config.require_identity and identity_key is not None:
            signature = ed25519_sign(identity_key, unsigned.signed_bytes(digest))
            advertisement = KeyAdvertisement(
                unsigned.round_id,
                node_id,
                mask_public,
                share_public,
                verify_public,
                unsigned.seed_commitment,
                signature,
            )
        state = cls(
            setup=setup,
            node_id=node_id,
            stage=Stage.SHARE_KEYS,
            advertisement=advertisement,
            identity_keys=identity_keys,
            mask_private=mask_private,
            share_private=share_private,
            verify_private=verify_private,
            self_seed=self_seed,
        )
        return state, advertisement

    # ------------------------------------------------------------------ stage 1

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysResponse:
        """ShareKeys: verify the neighbours' adverts, send each its encrypted shares."""
        with self._refusing(Stage.SHARE_KEYS):
            return self._share_keys(request)

    def _share_keys(self, request: ShareKeysRequest) -> ShareKeysResponse:
        _check_round(self.round_id, request.round_id, "share-keys request")
        neighbours = set(self.neighbours)
        own = self.advertisement
        accepted: dict[int, KeyAdvertisement] = {}
        seen_keys = {own.mask_public, own.share_public, own.verify_public}
        for ad in request.advertisements:
            _check_round(self.round_id, ad.round_id, f"advertisement of node {ad.node_id}")
            if ad.node_id == self.node_id:
                if ad != own:
                    raise AdvertisementError("the relayed copy of this node's advert was altered")
                continue
            if ad.node_id not in neighbours:
                raise AdvertisementError(f"advertisement from non-neighbour node {ad.node_id}")
            if ad.node_id in accepted:
                raise AdvertisementError(f"two advertisements for node {ad.node_id}")
            if self.config.require_identity and not ed25519_verify(
                self.identity_keys[ad.node_id], ad.signature, ad.signed_bytes(self._digest)
            ):
                raise SignatureError(
                    f"advertisement of node {ad.node_id} does not verify under its identity key"
                )
            keys = {ad.mask_public, ad.share_public, ad.verify_public}
            if len(keys) != 3 or keys & seen_keys:
                raise AdvertisementError(f"advertisement of node {ad.node_id} reuses a key")
            seen_keys |= keys
            accepted[ad.node_id] = ad
        if len(accepted) < self.config.threshold:
            raise self._below(Stage.SHARE_KEYS, "key advertisements", len(accepted))
        shares = split(
            [self.self_seed, self.mask_private], self.config.threshold, self.config.degree
        )
        share_private = x25519_private(self.share_private)
        out = []
        for holder in sorted(accepted):
            x = self._graph.share_x(self.node_id, holder)
            row = shares[x - 1]
            plaintext = _share_plaintext(
                self.node_id,
                holder,
                x,
                _elements_bytes(row[:CHUNKS_PER_SECRET]),
                _elements_bytes(row[CHUNKS_PER_SECRET:]),
            )
            key = _share_key(
                share_private,
                accepted[holder].share_public,
                self._digest,
                self.node_id,
                holder,
            )
            ciphertext = aead_seal(key, plaintext, _share_aad(self._digest, self.node_id, holder))
            out.append(EncryptedShare(self.node_id, holder, ciphertext))
        self.neighbour_ads = accepted
        self.stage = Stage.MASKED_INPUT
        return ShareKeysResponse(self.round_id, self.node_id, tuple(out))

    # ------------------------------------------------------------------ stage 2

    def _open_share(
        self, share: EncryptedShare, share_private: X25519PrivateKey
    ) -> tuple[int, bytes, bytes]:
        if share.receiver != self.node_id:
            raise ShareDecryptionError(
                f"share from node {share.sender} is addressed to node {share.receiver}"
            )
        ad = self.neighbour_ads.get(share.sender)
        if ad is None:
            raise ShareDecryptionError(f"share from node {share.sender}, not an accepted neighbour")
        key = _share_key(share_private, ad.share_public, self._digest, share.sender, self.node_id)
        plaintext = aead_open(
            key, share.ciphertext, _share_aad(self._digest, share.sender, self.node_id)
        )
        try:
            reader = Reader(plaintext, b"SHPT")
            owner, holder, x = reader.u64(), reader.u64(), reader.u32()
            seed_share, key_share = reader.fixed(SHARE_BYTES), reader.fixed(SHARE_BYTES)
            reader.end()
        except MalformedMessageError:
            raise ShareDecryptionError("decrypted share is malformed") from None
        if (owner, holder, x) != (
            share.sender,
            self.node_id,
            self._graph.share_x(share.sender, self.node_id),
        ):
            raise ShareDecryptionError(f"decrypted share of node {share.sender} is mislabelled")
        return x, seed_share, key_share

    def mask_input(self, request: MaskedInputRequest, encoded: np.ndarray) -> MaskedInput:
        """MaskedInputCollection: open the relayed shares, upload y_i (uint32)."""
        with self._refusing(Stage.MASKED_INPUT):
            return self._mask_input(request, encoded)

    def _mask_input(self, request: MaskedInputRequest, encoded: np.ndarray) -> MaskedInput:
        _check_round(self.round_id, request.round_id, "masked-input request")
        x = np.asarray(encoded)
        if x.dtype != np.uint32 or x.shape != (self.setup.vector_length,):
            raise MalformedMessageError(
                f"the encoded input must be uint32 of shape ({self.setup.vector_length},), "
                f"got {x.dtype} {x.shape}"
            )
        held: dict[int, tuple[int, bytes, bytes]] = {}
        share_private = x25519_private(self.share_private)
        for share in request.shares:
            if share.sender in held:
                raise MalformedMessageError(f"two shares from node {share.sender}")
            held[share.sender] = self._open_share(share, share_private)
        if len(held) < self.config.threshold:
            raise self._below(Stage.MASKED_INPUT, "encrypted shares", len(held))
        masked = x.copy()
        expander = MaskExpander(masked.size)
        expander.add(masked, self.self_seed)
        mask_private = x25519_private(self.mask_private)
        for peer in sorted(held):
            seed = pairwise_mask_seed(
                mask_private,
                self.neighbour_ads[peer].mask_public,
                self._digest,
                self.node_id,
                peer,
            )
            if peer < self.node_id:
                expander.add(masked, seed)
            else:
                expander.subtract(masked, seed)
        self.held_shares = held
        self.masked_with = tuple(sorted(held))
        # Forward secrecy: nothing after this stage needs these secrets.
        self.mask_private = self.share_private = self.self_seed = b""
        self.stage = Stage.CONSISTENCY_CHECK
        return MaskedInput(self.round_id, self.node_id, masked)

    # ------------------------------------------------------------------ stage 3

    def sign_survivors(self, request: ConsistencyRequest) -> ConsistencySignature:
        """ConsistencyCheck: sign (setup digest, survivors) with the per-round key."""
        with self._refusing(Stage.CONSISTENCY_CHECK):
            return self._sign_survivors(request)

    def _sign_survivors(self, request: ConsistencyRequest) -> ConsistencySignature:
        _check_round(self.round_id, request.round_id, "consistency request")
        survivors = request.survivors
        if self.node_id not in survivors:
            raise ConsistencyError("this node's masked input is missing from the survivor list")
        unknown = set(survivors) - set(self.setup.node_ids)
        if unknown:
            raise ConsistencyError(
                f"survivor list names nodes outside the round: {sorted(unknown)}"
            )
        live_holders = len(set(self.neighbour_ads) & set(survivors))
        if live_holders < self.config.threshold:
            raise self._below(Stage.CONSISTENCY_CHECK, "surviving share holders", live_holders)
        signature = ed25519_sign(self.verify_private, consistency_message(self._digest, survivors))
        self.signed_survivors = survivors
        self.stage = Stage.UNMASK
        return ConsistencySignature(self.round_id, self.node_id, signature)

    # ------------------------------------------------------------------ stage 4

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Unmasking: check lists and signatures, then reveal one share per neighbour."""
        with self._refusing(Stage.UNMASK):
            return self._unmask(request)

    def _unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        _check_round(self.round_id, request.round_id, "unmask request")
        if request.survivors != self.signed_survivors:
            raise ConsistencyError("the survivor list differs from the one this node signed")
        alive, dropped = set(request.survivors), set(request.dropped)
        both = alive & dropped
        if both:
            raise ConsistencyError(
                f"node(s) {sorted(both)[:5]} listed both dropped and alive: revealing shares "
                "would hand the server both secrets of a node; refusing"
            )
        unknown = dropped - set(self.setup.node_ids)
        if unknown:
            raise ConsistencyError(f"dropped list names nodes outside the round: {sorted(unknown)}")
        message = consistency_message(self._digest, request.survivors)
        signers: set[int] = set()
        own_verify = self.advertisement.verify_public
        for signed in request.signatures:
            _check_round(self.round_id, signed.round_id, f"signature of node {signed.node_id}")
            if signed.node_id in signers:
                raise ConsistencyError(f"two signatures from node {signed.node_id}")
            if signed.node_id not in alive:
                raise ConsistencyError(f"signature from node {signed.node_id}, not a survivor")
            if signed.node_id == self.node_id:
                key = own_verify
            elif signed.node_id in self.neighbour_ads:
                key = self.neighbour_ads[signed.node_id].verify_public
            else:
                raise ConsistencyError(
                    f"signature from node {signed.node_id}, whose key this node never received"
                )
            if not ed25519_verify(key, signed.signature, message):
                raise SignatureError(f"consistency signature of node {signed.node_id} is invalid")
            signers.add(signed.node_id)
        neighbour_signers = len(signers - {self.node_id})
        if neighbour_signers < self.config.threshold:
            raise self._below(Stage.UNMASK, "consistency signatures", neighbour_signers)
        seed_shares, key_shares = [], []
        for owner in sorted(self.held_shares):
            x, seed_share, key_share = self.held_shares[owner]
            if owner in alive:
                seed_shares.append(RevealedShare(owner, x, seed_share))
            elif owner in dropped:
                key_shares.append(RevealedShare(owner, x, key_share))
        # One reveal per round: a second unmask request is refused as out of stage.
        self.held_shares = {}
        self.verify_private = b""
        self.stage = Stage.DONE
        return UnmaskResponse(self.round_id, self.node_id, tuple(seed_shares), tuple(key_shares))

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        writer = (
            Writer(b"CLST")
            .blob(self.setup.to_bytes())
            .u64(self.node_id)
            .blob(self.stage.value.encode())
            .blob(self.advertisement.to_bytes())
        )
        writer.u32(len(self.identity_keys))
        for node in sorted(self.identity_keys):
            writer.u64(node).raw(self.identity_keys[node])
        for secret in (self.mask_private, self.share_private, self.verify_private, self.self_seed):
            writer.blob(secret)
        writer.u32(len(self.neighbour_ads))
        for node in sorted(self.neighbour_ads):
            writer.blob(self.neighbour_ads[node].to_bytes())
        writer.u32(len(self.held_shares))
        for owner in sorted(self.held_shares):
            x, seed_share, key_share = self.held_shares[owner]
            writer.u64(owner).u32(x).raw(seed_share).raw(key_share)
        return writer.ids(self.masked_with).ids(self.signed_survivors).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientRound:
        reader = Reader(data, b"CLST")
        setup = SetupRequest.from_bytes(reader.blob())
        node_id = reader.u64()
        try:
            stage = Stage(reader.blob().decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise MalformedMessageError("unknown stage in client state") from None
        advertisement = KeyAdvertisement.from_bytes(reader.blob())
        identity_keys = {reader.u64(): reader.fixed(KEY_BYTES) for _ in range(reader.u32())}
        mask_private, share_private = reader.blob(), reader.blob()
        verify_private, self_seed = reader.blob(), reader.blob()
        ads = [KeyAdvertisement.from_bytes(reader.blob()) for _ in range(reader.u32())]
        held = {}
        for _ in range(reader.u32()):
            owner, x = reader.u64(), reader.u32()
            held[owner] = (x, reader.fixed(SHARE_BYTES), reader.fixed(SHARE_BYTES))
        masked_with, signed = reader.ids(), reader.ids()
        reader.end()
        return cls(
            setup=setup,
            node_id=node_id,
            stage=stage,
            advertisement=advertisement,
            identity_keys=identity_keys,
            mask_private=mask_private,
            share_private=share_private,
            verify_private=verify_private,
            self_seed=self_seed,
            neighbour_ads={ad.node_id: ad for ad in ads},
            held_shares=held,
            masked_with=masked_with,
            signed_survivors=signed,
        )


# ===================================================================== server side


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The unmasked sum (uint32, exact mod 2^32) and who it is the sum of."""

    total: np.ndarray
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]
    rejected: dict[int, str]


@dataclass
class ServerRound:
    """The server's state for one round. It never stores an individual masked or
    unmasked vector: masked inputs are added to ``masked_sum`` on arrival, and the
    only other array is the final ``total`` (a sum over >= t + 1 clients).

    Build with :meth:`begin`, send :meth:`setup_requests`, then feed each stage's
    replies (keyed by the sender's node id; a missing node is a dropout) to the
    ``receive_*`` methods in order; each returns the next stage's requests, the
    last one the :class:`AggregateResult`. A reply that fails validation is not
    used (its sender counts as dropped; the reason is kept in ``rejected``). A
    threshold failure raises :class:`BelowThresholdError` (a :class:`SecAggAbort`)
    before any further secret is requested.
    """

    setup: SetupRequest
    identity_keys: dict[int, bytes] = field(repr=False)
    stage: Stage = Stage.ADVERTISE_KEYS
    advertisements: dict[int, KeyAdvertisement] = field(default_factory=dict, repr=False)
    share_senders: tuple[int, ...] = ()
    masked_with: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)
    holders: dict[int, frozenset[int]] = field(default_factory=dict, repr=False)
    masked_sum: np.ndarray | None = field(default=None, repr=False)
    contributors: tuple[int, ...] = ()
    signers: tuple[int, ...] = ()
    signatures: dict[int, ConsistencySignature] = field(default_factory=dict, repr=False)
    total: np.ndarray | None = field(default=None, repr=False)
    rejected: dict[int, str] = field(default_factory=dict)
    aborted: str | None = None
    _digest: bytes = field(init=False, repr=False)
    _graph: NeighbourGraph = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.setup, SetupRequest):
            raise MalformedMessageError("setup must be a SetupRequest")
        if self.setup.config.require_identity:
            missing = [n for n in self.setup.node_ids if n not in self.identity_keys]
            if missing:
                raise IdentityError(f"no registered identity key for node(s) {missing[:5]}")
        self._digest = self.setup.digest()
        self._graph = _graph_for(self.setup)

    @classmethod
    def begin(
        cls,
        config: SecAggConfig,
        node_ids: Sequence[int],
        vector_length: int,
        *,
        round_id: bytes | None = None,
        identity_registry: Mapping[int, bytes] | None = None,
    ) -> ServerRound:
        """A new round over ``node_ids`` (exactly ``config.num_clients`` of them).

        ``round_id``: 8–64 bytes, unique per round (default: 16 random bytes). It is
        public; everything of the round is bound to it and to the setup digest.
        """
        setup = SetupRequest(
            round_id if round_id is not None else random_bytes(16),
            config,
            tuple(sorted(node_ids)),
            vector_length,
        )
        registry = (
            {n: bytes(key) for n, key in identity_registry.items()}
            if identity_registry is not None
            else {}
        )
        return cls(setup=setup, identity_keys=registry)

    @property
    def round_id(self) -> bytes:
        return self.setup.round_id

    @property
    def config(self) -> SecAggConfig:
        return self.setup.config

    @property
    def graph(self) -> NeighbourGraph:
        return self._graph

    @property
    def dropped(self) -> tuple[int, ...]:
        """Nodes that shared keys but sent no masked input (their masks get removed)."""
        return tuple(sorted(set(self.share_senders) - set(self.contributors)))

    # ------------------------------------------------------------------ helpers

    def _expect(self, stage: Stage) -> None:
        if self.aborted is not None:
            raise StageOrderError(f"the round was aborted: {self.aborted}")
        if self.stage is not stage:
            raise StageOrderError(f"server is at stage {self.stage.value}, not {stage.value}")

    def _abort(self, stage: Stage, reason: str) -> BelowThresholdError:
        self.aborted = reason
        self.masked_sum = None
        self.total = None
        return BelowThresholdError(stage.value, reason)

    def _reject(self, node: int, reason: str) -> None:
        self.rejected[node] = reason

    def _holders(self, owner: int) -> frozenset[int]:
        """Nodes that received (and so hold) ``owner``'s shares."""
        return self.holders.get(owner, frozenset())

    def _needed_secrets(self) -> set[int]:
        """Survivors (self masks) and dropped nodes some survivor masked with (mask keys)."""
        needed = set(self.contributors)
        for survivor in self.contributors:
            needed |= set(self.masked_with.get(survivor, ()))
        return needed

    def _require_live(self, stage: Stage, live: Collection[int]) -> None:
        # Each live client needs t live neighbours, so fewer than t + 1 can never finish;
        # this also stops a round in which nobody is left.
        t = self.config.threshold
        if len(live) < t + 1:
            raise self._abort(
                stage, f"only {len(live)} client(s) left, at least t+1={t + 1} are needed"
            )

    def _check_holders(self, stage: Stage, live: set[int]) -> None:
        self._require_live(stage, live)
        t = self.config.threshold
        for owner in sorted(self._needed_secrets()):
            count = len(self._holders(owner) & live)
            if count < t:
                raise self._abort(
                    stage,
                    f"only {count} live holder(s) of node {owner}'s shares, threshold t={t}; "
                    "no further secrets are requested",
                )

    # ------------------------------------------------------------------ stage 0

    def setup_requests(self) -> dict[int, SetupRequest]:
        """AdvertiseKeys requests: the same setup for every sampled node."""
        self._expect(Stage.ADVERTISE_KEYS)
        return {node: self.setup for node in self.setup.node_ids}

    def receive_advertisements(
        self, replies: Mapping[int, KeyAdvertisement]
    ) -> dict[int, ShareKeysRequest]:
        self._expect(Stage.ADVERTISE_KEYS)
        for node, ad in replies.items():
            if node not in self.setup.node_ids:
                self._reject(node, "not sampled for this round")
            elif not isinstance(ad, KeyAdvertisement) or ad.node_id != node:
                self._reject(node, "advertisement names another node")
            elif ad.round_id != self.round_id:
                self._reject(node, "advertisement from another round")
            elif self.config.require_identity and not ed25519_verify(
                self.identity_keys[node], ad.signature, ad.signed_bytes(self._digest)
            ):
                self._reject(node, "advertisement signature does not verify")
            else:
                self.advertisements[node] = ad
        live = set(self.advertisements)
        self._require_live(Stage.ADVERTISE_KEYS, live)
        t = self.config.threshold
        for node in sorted(live):
            count = len(set(self._graph.neighbours(node)) & live)
            if count < t:
                raise self._abort(
                    Stage.ADVERTISE_KEYS,
                    f"node {node} has {count} neighbour(s) with keys, threshold t={t}; "
                    "no secrets were shared",
                )
        self.stage = Stage.SHARE_KEYS
        return {
            node: ShareKeysRequest(
                self.round_id,
                tuple(self.advertisements[j] for j in self._graph.neighbours(node) if j in live),
            )
            for node in sorted(live)
        }

    # ------------------------------------------------------------------ stage 1

    def receive_shares(
        self, replies: Mapping[int, ShareKeysResponse]
    ) -> dict[int, MaskedInputRequest]:
        self._expect(Stage.SHARE_KEYS)
        advertised = set(self.advertisements)
        routes: dict[int, dict[int, EncryptedShare]] = {}
        for node, response in replies.items():
            reason = self._share_reply_problem(node, response, advertised)
            if reason is not None:
                self._reject(node, reason)
                continue
            for share in response.shares:
                routes.setdefault(share.receiver, {})[node] = share
        senders = {node for node in replies if node in advertised and node not in self.rejected}
        self.share_senders = tuple(sorted(senders))
        # Only shares between live senders are forwarded; the server keeps no ciphertext.
        forwarded = {
            receiver: {s: share for s, share in routes.get(receiver, {}).items()}
            for receiver in self.share_senders
        }
        self.masked_with = {r: tuple(sorted(f)) for r, f in forwarded.items()}
        inverse: dict[int, set[int]] = {}
        for receiver, received_from in self.masked_with.items():
            for sender in received_from:
                inverse.setdefault(sender, set()).add(receiver)
        self.holders = {owner: frozenset(nodes) for owner, nodes in inverse.items()}
        self._require_live(Stage.SHARE_KEYS, senders)
        t = self.config.threshold
        for receiver, shares in sorted(forwarded.items()):
            if len(shares) < t:
                raise self._abort(
                    Stage.SHARE_KEYS,
                    f"node {receiver} would get shares from {len(shares)} neighbour(s), "
                    f"threshold t={t}; no masked input was requested",
                )
        for owner in self.share_senders:
            holders = len(self._holders(owner))
            if holders < t:
                raise self._abort(
                    Stage.SHARE_KEYS,
                    f"node {owner}'s shares reach {holders} live neighbour(s), threshold t={t}",
                )
        self.stage = Stage.MASKED_INPUT
        return {
            receiver: MaskedInputRequest(self.round_id, tuple(shares[s] for s in sorted(shares)))
            for receiver, shares in forwarded.items()
        }

    def _share_reply_problem(
        self, node: int, response: ShareKeysResponse, advertised: set[int]
    ) -> str | None:
        if node not in advertised:
            return "did not advertise keys"
        if not isinstance(response, ShareKeysResponse) or response.node_id != node:
            return "share response names another node"
        if response.round_id != self.round_id:
            return "share response from another round"
        allowed = set(self._graph.neighbours(node)) & advertised
        receivers = [share.receiver for share in response.shares]
        if len(set(receivers)) != len(receivers):
            return "two shares for one receiver"
        for share in response.shares:
            if share.sender != node or share.receiver not in allowed:
                return f"share for node {share.receiver}, not a live neighbour"
        return None

    # ------------------------------------------------------------------ stage 2

    def receive_masked_inputs(
        self, replies: Mapping[int, MaskedInput]
    ) -> dict[int, ConsistencyRequest]:
        self._expect(Stage.MASKED_INPUT)
        accepted = []
        for node, reply in sorted(replies.items()):
            if node not in self.masked_with:
                self._reject(node, "sent masked input without having shared keys")
            elif not isinstance(reply, MaskedInput) or reply.node_id != node:
                self._reject(node, "masked input names another node")
            elif reply.round_id != self.round_id:
                self._reject(node, "masked input from another round")
            elif reply.masked.shape != (self.setup.vector_length,):
                self._reject(node, f"masked input has shape {reply.masked.shape}")
            else:
                accepted.append(reply)
        total = np.zeros(self.setup.vector_length, dtype=np.uint32)
        for reply in accepted:
            np.add(total, reply.masked, out=total)  # wraps mod 2^32
        self.masked_sum = total
        self.contributors = tuple(reply.node_id for reply in accepted)
        self._check_holders(Stage.MASKED_INPUT, set(self.contributors))
        self.stage = Stage.CONSISTENCY_CHECK
        return {
            node: ConsistencyRequest(self.round_id, self.contributors) for node in self.contributors
        }

    # ------------------------------------------------------------------ stage 3

    def receive_signatures(
        self, replies: Mapping[int, ConsistencySignature]
    ) -> dict[int, UnmaskRequest]:
        self._expect(Stage.CONSISTENCY_CHECK)
        message = consistency_message(self._digest, self.contributors)
        for node, reply in sorted(replies.items()):
            if node not in self.contributors:
                self._reject(node, "signed without having sent masked input")
            elif not isinstance(reply, ConsistencySignature) or reply.node_id != node:
                self._reject(node, "signature names another node")
            elif reply.round_id != self.round_id:
                self._reject(node, "signature from another round")
            elif not ed25519_verify(
                self.advertisements[node].verify_public, reply.signature, message
            ):
                self._reject(node, "consistency signature does not verify")
            else:
                self.signatures[node] = reply
        self.signers = tuple(sorted(self.signatures))
        self._check_holders(Stage.CONSISTENCY_CHECK, set(self.signers))
        self.stage = Stage.UNMASK
        dropped = self.dropped
        return {
            node: UnmaskRequest(
                self.round_id,
                self.contributors,
                dropped,
                tuple(
                    self.signatures[j]
                    for j in (node, *self._graph.neighbours(node))
                    if j in self.signatures
                ),
            )
            for node in self.signers
        }

    # ------------------------------------------------------------------ stage 4

    def receive_unmask(self, replies: Mapping[int, UnmaskResponse]) -> AggregateResult:
        self._expect(Stage.UNMASK)
        alive, dropped = set(self.contributors), set(self.dropped)
        seed_shares: dict[int, dict[int, np.ndarray]] = {}
        key_shares: dict[int, dict[int, np.ndarray]] = {}
        responders: set[int] = set()
        for node, reply in sorted(replies.items()):
            reason = self._unmask_reply_problem(node, reply, alive, dropped)
            if reason is not None:
                self._reject(node, reason)
                continue
            responders.add(node)
            for share in reply.seed_shares:
                seed_shares.setdefault(share.owner, {})[share.x] = share.elements()
            for share in reply.key_shares:
                key_shares.setdefault(share.owner, {})[share.x] = share.elements()
        self._check_holders(Stage.UNMASK, responders)
        t = self.config.threshold
        # Reconstruct and verify every secret before touching the sum.
        seeds = {
            node: self._reconstruct(node, seed_shares.get(node, {}), t, "self-mask seed")
            for node in self.contributors
        }
        for node, seed in seeds.items():
            if (
                seed_commitment(self._digest, node, seed)
                != self.advertisements[node].seed_commitment
            ):
                raise ReconstructionError(
                    f"node {node}'s reconstructed self-mask seed does not match its commitment"
                )
        mask_keys: dict[int, bytes] = {}
        for node in sorted(self._needed_secrets() - alive):
            key = self._reconstruct(node, key_shares.get(node, {}), t, "mask key")
            if x25519_public(key) != self.advertisements[node].mask_public:
                raise ReconstructionError(
                    f"node {node}'s reconstructed mask key does not match its public key"
                )
            mask_keys[node] = key
        if self.masked_sum is None:
            raise StageOrderError("no masked sum to unmask")
        total = self.masked_sum
        self.masked_sum = None
        expander = MaskExpander(total.size)
        for seed in seeds.values():
            expander.subtract(total, seed)
        for gone, raw_key in mask_keys.items():
            gone_key = x25519_private(raw_key)
            for survivor in self.contributors:
                if gone not in self.masked_with.get(survivor, ()):
                    continue
                seed = pairwise_mask_seed(
                    gone_key,
                    self.advertisements[survivor].mask_public,
                    self._digest,
                    gone,
                    survivor,
                )
                # y_survivor holds +PRG(s) if gone < survivor, −PRG(s) otherwise: undo it.
                if gone < survivor:
                    expander.subtract(total, seed)
                else:
                    expander.add(total, seed)
        self.total = total
        self.stage = Stage.DONE
        return AggregateResult(total, self.contributors, self.dropped, dict(self.rejected))

    def _unmask_reply_problem(
        self, node: int, reply: UnmaskResponse, alive: set[int], dropped: set[int]
    ) -> str | None:
        if node not in self.signatures:
            return "unmask reply from a node that did not sign"
        if not isinstance(reply, UnmaskResponse) or reply.node_id != node:
            return "unmask reply names another node"
        if reply.round_id != self.round_id:
            return "unmask reply from another round"
        owners: set[int] = set()
        for kind, shares, allowed in (
            ("seed", reply.seed_shares, alive),
            ("key", reply.key_shares, dropped),
        ):
            for share in shares:
                if share.owner not in allowed or share.owner in owners:
                    return f"unexpected {kind} share of node {share.owner}"
                if node not in self.masked_with or share.owner not in self.masked_with[node]:
                    return f"{kind} share of node {share.owner}, which never shared with it"
                if share.x != self._graph.share_x(share.owner, node):
                    return f"{kind} share of node {share.owner} at the wrong x-coordinate"
                owners.add(share.owner)
        return None

    def _reconstruct(
        self, owner: int, shares: Mapping[int, np.ndarray], t: int, what: str
    ) -> bytes:
        if len(shares) < t:
            raise self._abort(
                Stage.UNMASK, f"only {len(shares)} share(s) of node {owner}'s {what}, t={t}"
            )
        xs = sorted(shares)[:t]
        values = combine(xs, np.stack([shares[x] for x in xs]))
        return elements_to_secret(values)


# ===================================================================== in-memory driver


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    """What :func:`run_round` measured: the result, compute times and traffic."""

    result: AggregateResult
    client_seconds: dict[int, float]
    server_seconds: float
    upload_bytes: dict[int, int]
    download_bytes: dict[int, int]


PayloadT = TypeVar("PayloadT", bound=Payload)


class _Wire:
    """Copies messages and client states through their byte encodings, counting bytes."""

    def __init__(self, enabled: bool, node_ids: Sequence[int]) -> None:
        self.enabled = enabled
        self.upload = dict.fromkeys(node_ids, 0)
        self.download = dict.fromkeys(node_ids, 0)
        self._states: dict[int, bytes | ClientRound] = {}

    def send(self, node: int, message: PayloadT) -> PayloadT:
        return self._carry(message, self.download, node)

    def reply(self, node: int, message: PayloadT) -> PayloadT:
        return self._carry(message, self.upload, node)

    def _carry(self, message: PayloadT, counter: dict[int, int], node: int) -> PayloadT:
        if not self.enabled:
            return message
        data = message.to_bytes()
        counter[node] += len(data)
        return type(message).from_bytes(data)

    def save(self, node: int, state: ClientRound) -> None:
        self._states[node] = state.to_bytes() if self.enabled else state

    def load(self, node: int) -> ClientRound:
        saved = self._states[node]
        return ClientRound.from_bytes(saved) if isinstance(saved, bytes) else saved


def run_round(
    config: SecAggConfig,
    inputs: Mapping[int, np.ndarray],
    *,
    dropouts: Mapping[Stage, Collection[int]] | None = None,
    identity_keys: Mapping[int, bytes] | None = None,
    round_id: bytes | None = None,
    wire: bool = True,
    observer: Callable[[Stage, ServerRound], None] | None = None,
) -> RoundOutcome:
    """Run one SecAgg+ round between ``len(inputs)`` clients and the server in memory.

    Args:
        inputs: node id → encoded uint32 vector (all of one length).
        dropouts: stage → nodes that do not answer that stage's request (nor any
            later one): ``Stage.ADVERTISE_KEYS`` drops before advertising, and so on.
        identity_keys: node id → Ed25519 private key, for rounds that require
            identities (the registry is derived from them).
        wire: pass every message and client state through ``to_bytes`` /
            ``from_bytes``, as the Flower transport will (and count the bytes).
        observer: called as ``observer(stage, server)`` after every server step,
            e.g. to inspect the server state.

    Raises :class:`SecAggAbort` on a threshold failure, and any client's
    :class:`SecAggProtocolError` as it is.
    """
    node_ids = tuple(sorted(inputs))
    vectors = {node: np.asarray(inputs[node]) for node in node_ids}
    shapes = {v.shape for v in vectors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise MalformedMessageError("inputs must be 1-D uint32 vectors of one length")
    length = next(iter(shapes))[0]
    schedule = {Stage(stage): set(nodes) for stage, nodes in (dropouts or {}).items()}
    registry = (
        {node: ed25519_public(key) for node, key in identity_keys.items()}
        if identity_keys is not None
        else None
    )
    channel = _Wire(wire, node_ids)
    client_seconds = dict.fromkeys(node_ids, 0.0)
    server_seconds = 0.0
    gone: set[int] = set()

    def answering(stage: Stage, requests: Mapping[int, object]) -> list[int]:
        gone.update(schedule.get(stage, set()))
        return [node for node in sorted(requests) if node not in gone]

    def server_step(stage: Stage, step: Callable[[], T]) -> T:
        nonlocal server_seconds
        began = time.perf_counter()
        try:
            return step()
        finally:
            server_seconds += time.perf_counter() - began
            if observer is not None:
                observer(stage, server)

    def client_stage(
        stage: Stage,
        requests: Mapping[int, RequestT],
        step: Callable[[int, RequestT], ReplyT],
    ) -> dict[int, ReplyT]:
        replies: dict[int, ReplyT] = {}
        for node in answering(stage, requests):
            # Client time includes decoding the request and encoding the reply.
            began = time.perf_counter()
            reply = channel.reply(node, step(node, channel.send(node, requests[node])))
            client_seconds[node] += time.perf_counter() - began
            replies[node] = reply
        return replies

    def advertise(node: int, request: SetupRequest) -> KeyAdvertisement:
        state, advertisement = ClientRound.start(
            request,
            node,
            identity_key=None if identity_keys is None else identity_keys.get(node),
            identity_registry=registry,
        )
        channel.save(node, state)
        return advertisement

    def share(node: int, request: ShareKeysRequest) -> ShareKeysResponse:
        state = channel.load(node)
        reply = state.share_keys(request)
        channel.save(node, state)
        return reply

    def mask(node: int, request: MaskedInputRequest) -> MaskedInput:
        state = channel.load(node)
        reply = state.mask_input(request, vectors[node])
        channel.save(node, state)
        return reply

    def sign(node: int, request: ConsistencyRequest) -> ConsistencySignature:
        state = channel.load(node)
        reply = state.sign_survivors(request)
        channel.save(node, state)
        return reply

    def reveal(node: int, request: UnmaskRequest) -> UnmaskResponse:
        state = channel.load(node)
        reply = state.unmask(request)
        channel.save(node, state)
        return reply

    began = time.perf_counter()
    server = ServerRound.begin(
        config, node_ids, length, round_id=round_id, identity_registry=registry
    )
    setup_requests = server.setup_requests()
    server_seconds += time.perf_counter() - began
    if observer is not None:
        observer(Stage.ADVERTISE_KEYS, server)

    ads = client_stage(Stage.ADVERTISE_KEYS, setup_requests, advertise)
    share_requests = server_step(Stage.ADVERTISE_KEYS, lambda: server.receive_advertisements(ads))
    share_replies = client_stage(Stage.SHARE_KEYS, share_requests, share)
    mask_requests = server_step(Stage.SHARE_KEYS, lambda: server.receive_shares(share_replies))
    masked = client_stage(Stage.MASKED_INPUT, mask_requests, mask)
    consistency_requests = server_step(
        Stage.MASKED_INPUT, lambda: server.receive_masked_inputs(masked)
    )
    masked.clear()  # the driver, like the server, keeps no individual masked vector
    signatures = client_stage(Stage.CONSISTENCY_CHECK, consistency_requests, sign)
    unmask_requests = server_step(
        Stage.CONSISTENCY_CHECK, lambda: server.receive_signatures(signatures)
    )
    reveals = client_stage(Stage.UNMASK, unmask_requests, reveal)
    result = server_step(Stage.UNMASK, lambda: server.receive_unmask(reveals))
    return RoundOutcome(result, client_seconds, server_seconds, channel.upload, channel.download)
