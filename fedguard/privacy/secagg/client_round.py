"""One client's side of a SecAgg+ round: :class:`ClientRound`, stage by stage.

The protocol and its transcript are described in :mod:`.transcript`. A client
state is serialisable (``to_bytes``/``from_bytes``, since Flower rebuilds the
ClientApp per message) and holds secrets: keep it in the node's local state only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    random_bytes,
    x25519_keypair,
    x25519_private,
)
from fedguard.privacy.secagg.errors import (
    AdvertisementError,
    BelowThresholdError,
    ConsistencyError,
    IdentityError,
    MalformedMessageError,
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
    Reader,
    RevealedShare,
    SetupRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
    Writer,
)
from fedguard.privacy.secagg.shamir import CHUNKS_PER_SECRET, split
from fedguard.privacy.secagg.transcript import (
    Stage,
    check_round,
    consistency_message,
    elements_bytes,
    pairwise_mask_seed,
    round_graph,
    seed_commitment,
    share_aad,
    share_encryption_key,
    share_plaintext,
)

__all__ = ["ClientRound"]


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
        self._graph = round_graph(self.setup)

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
        identity_keys = _start_identity_keys(
            setup, node_id, identity_key, identity_registry, expected_config
        )
        config = setup.config
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
        check_round(self.round_id, request.round_id, "share-keys request")
        neighbours = set(self.neighbours)
        own = self.advertisement
        accepted: dict[int, KeyAdvertisement] = {}
        seen_keys = {own.mask_public, own.share_public, own.verify_public}
        for ad in request.advertisements:
            check_round(self.round_id, ad.round_id, f"advertisement of node {ad.node_id}")
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
            plaintext = share_plaintext(
                self.node_id,
                holder,
                x,
                elements_bytes(row[:CHUNKS_PER_SECRET]),
                elements_bytes(row[CHUNKS_PER_SECRET:]),
            )
            key = share_encryption_key(
                share_private,
                accepted[holder].share_public,
                self._digest,
                self.node_id,
                holder,
            )
            ciphertext = aead_seal(key, plaintext, share_aad(self._digest, self.node_id, holder))
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
        key = share_encryption_key(
            share_private, ad.share_public, self._digest, share.sender, self.node_id
        )
        plaintext = aead_open(
            key, share.ciphertext, share_aad(self._digest, share.sender, self.node_id)
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
        check_round(self.round_id, request.round_id, "masked-input request")
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
        check_round(self.round_id, request.round_id, "consistency request")
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
        check_round(self.round_id, request.round_id, "unmask request")
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
            check_round(self.round_id, signed.round_id, f"signature of node {signed.node_id}")
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


def _start_identity_keys(
    setup: SetupRequest,
    node_id: int,
    identity_key: bytes | None,
    identity_registry: Mapping[int, bytes] | None,
    expected_config: SecAggConfig | None,
) -> dict[int, bytes]:
    """:meth:`ClientRound.start`'s checks of the setup; the round's identity keys."""
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
    return identity_keys
