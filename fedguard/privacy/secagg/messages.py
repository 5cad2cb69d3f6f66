"""Payloads exchanged between the SecAgg+ server and clients, and their wire format.

One frozen dataclass per message of Bonawitz et al., CCS 2017, Fig. 4 (rounds
AdvertiseKeys, ShareKeys, MaskedInputCollection, ConsistencyCheck, Unmasking),
made only of ``bytes``, ``int`` and (for the masked vector) a uint32 numpy array.
Each has ``to_bytes()`` / ``from_bytes()``: a canonical, versioned, length-checked
binary encoding that fits one ``bytes`` value of a Flower ``ConfigRecord``
(:class:`MaskedInput` also exposes its array for an ``ArrayRecord``).

Decoding never trusts lengths: every read is bounds-checked and any surplus or
missing byte is a :class:`MalformedMessageError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self

import numpy as np

from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import KEY_BYTES, SIGNATURE_BYTES, sha256
from fedguard.privacy.secagg.errors import MalformedMessageError
from fedguard.privacy.secagg.graph import MAX_NODE_ID, validate_node_ids
from fedguard.privacy.secagg.shamir import CHUNKS_PER_SECRET

__all__ = [
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShare",
    "KeyAdvertisement",
    "MaskedInput",
    "MaskedInputRequest",
    "RevealedShare",
    "SetupRequest",
    "ShareKeysRequest",
    "ShareKeysResponse",
    "UnmaskRequest",
    "UnmaskResponse",
]

_MAGIC = b"FGSA"
_VERSION = 1
MIN_ROUND_ID_BYTES = 8
MAX_ROUND_ID_BYTES = 64
MAX_VECTOR_LENGTH = 2**31 - 1
#: Bytes of one revealed Shamir share of a 32-byte secret (16 uint32 field elements).
SHARE_BYTES = 4 * CHUNKS_PER_SECRET


# --------------------------------------------------------------------------- codec


class Writer:
    """Canonical big-endian encoder (also used for signed transcripts)."""

    def __init__(self, tag: bytes) -> None:
        self._parts: list[bytes] = [_MAGIC, tag, bytes([_VERSION])]

    def u8(self, value: int) -> Writer:
        self._parts.append(int(value).to_bytes(1, "big"))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(int(value).to_bytes(4, "big"))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(int(value).to_bytes(8, "big"))
        return self

    def blob(self, value: bytes) -> Writer:
        self.u32(len(value))
        self._parts.append(bytes(value))
        return self

    def ids(self, values: Sequence[int]) -> Writer:
        self.u32(len(values))
        for value in values:
            self.u64(value)
        return self

    def raw(self, value: bytes) -> Writer:
        self._parts.append(value)
        return self

    def finish(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Bounds-checked decoder matching :class:`Writer`."""

    def __init__(self, data: bytes, tag: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessageError("a payload must be bytes")
        self._data = memoryview(bytes(data))
        self._pos = 0
        head = self._take(len(_MAGIC) + len(tag) + 1)
        if head[: len(_MAGIC)] != _MAGIC or head[len(_MAGIC) : -1] != tag:
            raise MalformedMessageError(f"not a {tag.decode()} secagg payload")
        if head[-1] != _VERSION:
            raise MalformedMessageError(f"unsupported secagg payload version {head[-1]}")

    def _take(self, count: int) -> bytes:
        if count < 0 or self._pos + count > len(self._data):
            raise MalformedMessageError("payload truncated")
        chunk = self._data[self._pos : self._pos + count].tobytes()
        self._pos += count
        return chunk

    def fixed(self, count: int) -> bytes:
        return self._take(count)

    def u8(self) -> int:
        return self._take(1)[0]

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def blob(self) -> bytes:
        return self._take(self.u32())

    def ids(self) -> tuple[int, ...]:
        count = self.u32()
        if 8 * count > len(self._data) - self._pos:
            raise MalformedMessageError("payload truncated")
        return tuple(self.u64() for _ in range(count))

    def rest(self) -> memoryview:
        view = self._data[self._pos :]
        self._pos = len(self._data)
        return view

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedMessageError("payload has trailing bytes")


# --------------------------------------------------------------------------- checks


def _check_round_id(round_id: bytes) -> None:
    if not isinstance(round_id, bytes) or not (
        MIN_ROUND_ID_BYTES <= len(round_id) <= MAX_ROUND_ID_BYTES
    ):
        raise MalformedMessageError(
            f"round id must be {MIN_ROUND_ID_BYTES}..{MAX_ROUND_ID_BYTES} bytes"
        )


def _check_node(name: str, node: int) -> None:
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= MAX_NODE_ID:
        raise MalformedMessageError(f"{name} must be a node id in [0, 2^64), got {node!r}")


def _check_key(name: str, key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise MalformedMessageError(f"{name} must be {KEY_BYTES} bytes")


def _sorted_ids(name: str, ids: Sequence[int]) -> tuple[int, ...]:
    try:
        normalised = validate_node_ids(ids)
    except MalformedMessageError as bad:
        raise MalformedMessageError(f"{name}: {bad}") from None
    if tuple(ids) != normalised:
        raise MalformedMessageError(f"{name} must be sorted ascending")
    return normalised


class Payload(ABC):
    """Base of every message: canonical ``to_bytes`` / ``from_bytes``."""

    TAG: ClassVar[bytes]

    @abstractmethod
    def to_bytes(self) -> bytes: ...

    @classmethod
    @abstractmethod
    def _read(cls, reader: Reader) -> Self: ...

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        reader = Reader(data, cls.TAG)
        payload = cls._read(reader)
        reader.end()
        return payload


# --------------------------------------------------------------------------- stage 0


@dataclass(frozen=True)
class SetupRequest(Payload):
    """Server → every sampled client: the round's parameters (AdvertiseKeys request).

    ``digest()`` binds all of it; every key derivation, AES-GCM associated data and
    signature of the round includes the digest, so clients that were shown
    different setups cannot complete a round together.
    """

    TAG: ClassVar[bytes] = b"SETU"

    round_id: bytes
    config: SecAggConfig
    node_ids: tuple[int, ...]
    vector_length: int

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        if not isinstance(self.config, SecAggConfig):
            raise MalformedMessageError("config must be a SecAggConfig")
        _sorted_ids("node_ids", self.node_ids)
        if len(self.node_ids) != self.config.num_clients:
            raise MalformedMessageError(
                f"{len(self.node_ids)} node ids for a config of {self.config.num_clients} clients"
            )
        length = self.vector_length
        if isinstance(length, bool) or not isinstance(length, int):
            raise MalformedMessageError("vector_length must be an integer")
        if not 1 <= length <= MAX_VECTOR_LENGTH:
            raise MalformedMessageError(f"vector_length must lie in [1, 2^31), got {length}")

    def to_bytes(self) -> bytes:
        c = self.config
        return (
            Writer(self.TAG)
            .blob(self.round_id)
            .u32(c.num_clients)
            .u32(c.degree)
            .u32(c.threshold)
            .blob(repr(float(c.clip_range)).encode())
            .u8(c.value_bits)
            .u8(c.weight_bits)
            .u8(int(c.require_identity))
            .ids(self.node_ids)
            .u32(self.vector_length)
            .finish()
        )

    @classmethod
    def _read(cls, reader: Reader) -> SetupRequest:
        round_id = reader.blob()
        n, k, t = reader.u32(), reader.u32(), reader.u32()
        try:
            clip = float(reader.blob().decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise MalformedMessageError("clip_range is not a number") from None
        value_bits, weight_bits, identity = reader.u8(), reader.u8(), reader.u8()
        if identity not in (0, 1):
            raise MalformedMessageError("require_identity must be 0 or 1")
        config = SecAggConfig(n, k, t, clip, value_bits, weight_bits, bool(identity))
        return cls(round_id, config, reader.ids(), reader.u32())

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding: the round's transcript anchor."""
        return sha256(b"fedguard/secagg/v1/setup", self.to_bytes())


@dataclass(frozen=True)
class KeyAdvertisement(Payload):
    """Client → server (AdvertiseKeys): the client's per-round public keys.

    ``mask_public`` (X25519) agrees the pairwise mask seeds, ``share_public``
    (X25519) the share-encryption keys, ``verify_public`` (Ed25519) verifies the
    client's consistency-check signature; ``seed_commitment`` commits to the
    self-mask seed so a wrongly reconstructed seed is detected. ``signature`` is an
    Ed25519 signature by the node's identity key over all of it and the setup
    digest (empty when the round runs without identity keys).
    """

    TAG: ClassVar[bytes] = b"ADVT"

    round_id: bytes
    node_id: int
    mask_public: bytes
    share_public: bytes
    verify_public: bytes
    seed_commitment: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        _check_node("node_id", self.node_id)
        for name in ("mask_public", "share_public", "verify_public", "seed_commitment"):
            _check_key(name, getattr(self, name))
        if not isinstance(self.signature, bytes) or len(self.signature) not in (
            0,
            SIGNATURE_BYTES,
        ):
            raise MalformedMessageError(f"signature must be empty or {SIGNATURE_BYTES} bytes")

    def signed_bytes(self, setup_digest: bytes) -> bytes:
        """What the identity key signs: everything but the signature, with the digest."""
        return (
            Writer(b"ADVS")
            .raw(setup_digest)
            .blob(self.round_id)
            .u64(self.node_id)
            .raw(self.mask_public)
            .raw(self.share_public)
            .raw(self.verify_public)
            .raw(self.seed_commitment)
            .finish()
        )

    def to_bytes(self) -> bytes:
        return (
            Writer(self.TAG)
            .blob(self.round_id)
            .u64(self.node_id)
            .raw(self.mask_public)
            .raw(self.share_public)
            .raw(self.verify_public)
            .raw(self.seed_commitment)
            .blob(self.signature)
            .finish()
        )

    @classmethod
    def _read(cls, reader: Reader) -> KeyAdvertisement:
        round_id = reader.blob()
        node = reader.u64()
        keys = [reader.fixed(KEY_BYTES) for _ in range(4)]
        return cls(round_id, node, keys[0], keys[1], keys[2], keys[3], reader.blob())


def _write_ads(writer: Writer, ads: Sequence[KeyAdvertisement]) -> Writer:
    writer.u32(len(ads))
    for ad in ads:
        writer.blob(ad.to_bytes())
    return writer


def _read_ads(reader: Reader) -> tuple[KeyAdvertisement, ...]:
    return tuple(KeyAdvertisement.from_bytes(reader.blob()) for _ in range(reader.u32()))


# --------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class ShareKeysRequest(Payload):
    """Server → client (ShareKeys): the advertisements of the client's live neighbours."""

    TAG: ClassVar[bytes] = b"SHKQ"

    round_id: bytes
    advertisements: tuple[KeyAdvertisement, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        if not all(isinstance(ad, KeyAdvertisement) for ad in self.advertisements):
            raise MalformedMessageError("advertisements must be KeyAdvertisement objects")

    def to_bytes(self) -> bytes:
        return _write_ads(Writer(self.TAG).blob(self.round_id), self.advertisements).finish()

    @classmethod
    def _read(cls, reader: Reader) -> ShareKeysRequest:
        return cls(reader.blob(), _read_ads(reader))


@dataclass(frozen=True)
class EncryptedShare:
    """AES-256-GCM ciphertext of ``sender``'s Shamir shares for ``receiver``."""

    sender: int
    receiver: int
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_node("sender", self.sender)
        _check_node("receiver", self.receiver)
        if not isinstance(self.ciphertext, bytes):
            raise MalformedMessageError("ciphertext must be bytes")


def _write_shares(writer: Writer, shares: Sequence[EncryptedShare]) -> Writer:
    writer.u32(len(shares))
    for share in shares:
        writer.u64(share.sender).u64(share.receiver).blob(share.ciphertext)
    return writer


def _read_shares(reader: Reader) -> tuple[EncryptedShare, ...]:
    return tuple(
        EncryptedShare(reader.u64(), reader.u64(), reader.blob()) for _ in range(reader.u32())
    )


@dataclass(frozen=True)
class ShareKeysResponse(Payload):
    """Client → server (ShareKeys): one encrypted share bundle per live neighbour."""

    TAG: ClassVar[bytes] = b"SHKR"

    round_id: bytes
    node_id: int
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        _check_node("node_id", self.node_id)
        if not all(isinstance(s, EncryptedShare) for s in self.shares):
            raise MalformedMessageError("shares must be EncryptedShare objects")

    def to_bytes(self) -> bytes:
        writer = Writer(self.TAG).blob(self.round_id).u64(self.node_id)
        return _write_shares(writer, self.shares).finish()

    @classmethod
    def _read(cls, reader: Reader) -> ShareKeysResponse:
        return cls(reader.blob(), reader.u64(), _read_shares(reader))


# --------------------------------------------------------------------------- stage 2


@dataclass(frozen=True)
class MaskedInputRequest(Payload):
    """Server → client (MaskedInputCollection): the shares addressed to the client."""

    TAG: ClassVar[bytes] = b"MSKQ"

    round_id: bytes
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        if not all(isinstance(s, EncryptedShare) for s in self.shares):
            raise MalformedMessageError("shares must be EncryptedShare objects")

    def to_bytes(self) -> bytes:
        return _write_shares(Writer(self.TAG).blob(self.round_id), self.shares).finish()

    @classmethod
    def _read(cls, reader: Reader) -> MaskedInputRequest:
        return cls(reader.blob(), _read_shares(reader))


@dataclass(frozen=True, eq=False)
class MaskedInput(Payload):
    """Client → server (MaskedInputCollection): y = x + PRG(b) ± Σ PRG(s_ij) mod 2^32."""

    TAG: ClassVar[bytes] = b"MSKR"

    round_id: bytes
    node_id: int
    masked: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        _check_node("node_id", self.node_id)
        if (
            not isinstance(self.masked, np.ndarray)
            or self.masked.dtype != np.uint32
            or self.masked.ndim != 1
        ):
            raise MalformedMessageError("masked must be a 1-D uint32 array")

    def to_bytes(self) -> bytes:
        writer = Writer(self.TAG).blob(self.round_id).u64(self.node_id).u32(self.masked.size)
        return writer.raw(self.masked.astype("<u4", copy=False).tobytes()).finish()

    @classmethod
    def _read(cls, reader: Reader) -> MaskedInput:
        round_id, node, length = reader.blob(), reader.u64(), reader.u32()
        body = reader.rest()
        if len(body) != 4 * length:
            raise MalformedMessageError("masked vector length does not match its header")
        masked = np.frombuffer(body, dtype="<u4").astype(np.uint32)
        return cls(round_id, node, masked)


# --------------------------------------------------------------------------- stage 3


@dataclass(frozen=True)
class ConsistencyRequest(Payload):
    """Server → client (ConsistencyCheck): the nodes whose masked input arrived."""

    TAG: ClassVar[bytes] = b"CONQ"

    round_id: bytes
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        _sorted_ids("survivors", self.survivors)

    def to_bytes(self) -> bytes:
        return Writer(self.TAG).blob(self.round_id).ids(self.survivors).finish()

    @classmethod
    def _read(cls, reader: Reader) -> ConsistencyRequest:
        return cls(reader.blob(), reader.ids())


@dataclass(frozen=True)
class ConsistencySignature(Payload):
    """Client → server (ConsistencyCheck): Ed25519 over (setup digest, survivors)."""

    TAG: ClassVar[bytes] = b"CONR"

    round_id: bytes
    node_id: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        _check_node("node_id", self.node_id)
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise MalformedMessageError(f"signature must be {SIGNATURE_BYTES} bytes")

    def to_bytes(self) -> bytes:
        return Writer(self.TAG).blob(self.round_id).u64(self.node_id).raw(self.signature).finish()

    @classmethod
    def _read(cls, reader: Reader) -> ConsistencySignature:
        return cls(reader.blob(), reader.u64(), reader.fixed(SIGNATURE_BYTES))


# --------------------------------------------------------------------------- stage 4


@dataclass(frozen=True)
class UnmaskRequest(Payload):
    """Server → client (Unmasking): survivors, dropped nodes, relayed signatures."""

    TAG: ClassVar[bytes] = b"UNMQ"

    round_id: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[ConsistencySignature, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        _sorted_ids("survivors", self.survivors)
        _sorted_ids("dropped", self.dropped)
        if not all(isinstance(s, ConsistencySignature) for s in self.signatures):
            raise MalformedMessageError("signatures must be ConsistencySignature objects")

    def to_bytes(self) -> bytes:
        writer = Writer(self.TAG).blob(self.round_id).ids(self.survivors).ids(self.dropped)
        writer.u32(len(self.signatures))
        for signature in self.signatures:
            writer.blob(signature.to_bytes())
        return writer.finish()

    @classmethod
    def _read(cls, reader: Reader) -> UnmaskRequest:
        round_id, survivors, dropped = reader.blob(), reader.ids(), reader.ids()
        signatures = tuple(
            ConsistencySignature.from_bytes(reader.blob()) for _ in range(reader.u32())
        )
        return cls(round_id, survivors, dropped, signatures)


@dataclass(frozen=True)
class RevealedShare:
    """One Shamir share of ``owner``'s secret, at x-coordinate ``x`` (16 uint32 words)."""

    owner: int
    x: int
    share: bytes

    def __post_init__(self) -> None:
        _check_node("owner", self.owner)
        if isinstance(self.x, bool) or not isinstance(self.x, int) or not 1 <= self.x < 2**31:
            raise MalformedMessageError("share x-coordinate must lie in [1, 2^31)")
        if not isinstance(self.share, bytes) or len(self.share) != SHARE_BYTES:
            raise MalformedMessageError(f"a revealed share is {SHARE_BYTES} bytes")

    def elements(self) -> np.ndarray:
        return np.frombuffer(self.share, dtype=">u4").astype(np.int64)


def _write_revealed(writer: Writer, shares: Sequence[RevealedShare]) -> Writer:
    writer.u32(len(shares))
    for share in shares:
        writer.u64(share.owner).u32(share.x).raw(share.share)
    return writer


def _read_revealed(reader: Reader) -> tuple[RevealedShare, ...]:
    return tuple(
        RevealedShare(reader.u64(), reader.u32(), reader.fixed(SHARE_BYTES))
        for _ in range(reader.u32())
    )


@dataclass(frozen=True)
class UnmaskResponse(Payload):
    """Client → server (Unmasking): self-mask-seed shares of surviving neighbours and
    mask-key shares of dropped neighbours; never both for one node."""

    TAG: ClassVar[bytes] = b"UNMR"

    round_id: bytes
    node_id: int
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)
        _check_node("node_id", self.node_id)
        if not all(isinstance(s, RevealedShare) for s in (*self.seed_shares, *self.key_shares)):
            raise MalformedMessageError("shares must be RevealedShare objects")

    def to_bytes(self) -> bytes:
        writer = Writer(self.TAG).blob(self.round_id).u64(self.node_id)
        return _write_revealed(_write_revealed(writer, self.seed_shares), self.key_shares).finish()

    @classmethod
    def _read(cls, reader: Reader) -> UnmaskResponse:
        round_id, node = reader.blob(), reader.u64()
        return cls(round_id, node, _read_revealed(reader), _read_revealed(reader))
