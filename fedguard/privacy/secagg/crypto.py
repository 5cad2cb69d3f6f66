"""Cryptographic building blocks of fedguard's SecAgg+, all from ``cryptography``.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, Fig. 4, names the primitives the protocol needs: a key
agreement (here X25519), a key-derivation function (HKDF-SHA256), an
authenticated encryption (AES-256-GCM), a signature scheme for the consistency
check and key authentication (Ed25519) and a pseudo-random generator that
expands a seed into a mask vector (AES-256 in counter mode). Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020,
§3, keep the same primitives on a sparse graph.

Why these choices:

* X25519 instead of Flower's ECDH P-384: the same ~128-bit security at ~10× the
  speed, and no point validation pitfalls (every 32-byte string is a valid public
  key; a low-order key is rejected because the shared secret would be zero).
* Masks come from AES-256-CTR keyed with a full 32-byte seed (the HKDF output of
  the X25519 secret, or a 32-byte ``os.urandom`` self-mask seed), never a
  Mersenne Twister seeded from a folded 32-bit value (flwr issue 7522): a 32-bit
  seed can be brute-forced and an MT stream predicted from 624 outputs.
* Every derived key and every AES-GCM associated data binds a domain label and
  the round's setup digest, so no key, share or signature from one round, stage
  or node pair is accepted in another.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from fedguard.core.checks import positive_int
from fedguard.privacy.secagg.errors import (
    AdvertisementError,
    MalformedMessageError,
    ShareDecryptionError,
)

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "SIGNATURE_BYTES",
    "MaskExpander",
    "aead_open",
    "aead_seal",
    "ed25519_keypair",
    "ed25519_public",
    "ed25519_sign",
    "ed25519_verify",
    "hkdf_sha256",
    "prg_uint32",
    "random_bytes",
    "sha256",
    "x25519_agree",
    "x25519_keypair",
    "x25519_private",
    "x25519_public",
]

KEY_BYTES = 32
NONCE_BYTES = 12
SIGNATURE_BYTES = 64
_ZERO_IV = b"\x00" * 16
_RAW = Encoding.Raw
_RAW_PRIVATE = PrivateFormat.Raw
_RAW_PUBLIC = PublicFormat.Raw
_NO_ENCRYPTION = NoEncryption()


def _require_key(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        raise MalformedMessageError(f"{name} must be {KEY_BYTES} bytes")


def random_bytes(count: int = KEY_BYTES) -> bytes:
    """``count`` bytes from the operating system's CSPRNG."""
    return os.urandom(count)


def sha256(*parts: bytes) -> bytes:
    """SHA-256 of length-prefixed parts (so that no two splits collide)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def hkdf_sha256(ikm: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) with an all-zero salt, as for a uniformly random ``ikm``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


# ------------------------------------------------------------------------ X25519


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(private, public)``, 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(_RAW, _RAW_PRIVATE, _NO_ENCRYPTION),
        private.public_key().public_bytes(_RAW, _RAW_PUBLIC),
    )


def x25519_public(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    _require_key("an X25519 private key", private)
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, _RAW_PUBLIC)


def x25519_private(private: bytes) -> X25519PrivateKey:
    """A raw private key as a key object (load once, agree many times: loading costs
    as much as one agreement)."""
    _require_key("an X25519 private key", private)
    return X25519PrivateKey.from_private_bytes(private)


def x25519_agree(private: bytes | X25519PrivateKey, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret; a low-order peer key is an :class:`AdvertisementError`."""
    key = private if isinstance(private, X25519PrivateKey) else x25519_private(private)
    _require_key("an X25519 public key", peer_public)
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        # cryptography refuses an all-zero shared secret (a low-order public key).
        raise AdvertisementError("X25519 public key of low order (all-zero secret)") from None


# ------------------------------------------------------------------------ Ed25519


def ed25519_keypair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair ``(private, public)``, 32 raw bytes each."""
    private = Ed25519PrivateKey.generate()
    return (
        private.private_bytes(_RAW, _RAW_PRIVATE, _NO_ENCRYPTION),
        private.public_key().public_bytes(_RAW, _RAW_PUBLIC),
    )


def ed25519_public(private: bytes) -> bytes:
    """The public key of a raw Ed25519 private key."""
    _require_key("an Ed25519 private key", private)
    return (
        Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, _RAW_PUBLIC)
    )


def ed25519_sign(private: bytes, message: bytes) -> bytes:
    _require_key("an Ed25519 private key", private)
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public``."""
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# ------------------------------------------------------------------------ AES-GCM


def aead_seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: a random 96-bit nonce followed by ciphertext and tag."""
    _require_key("an AES-256 key", key)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_open(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Open :func:`aead_seal`'s output; any mismatch is a :class:`ShareDecryptionError`."""
    _require_key("an AES-256 key", key)
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + 16:
        raise ShareDecryptionError("encrypted share is too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise ShareDecryptionError(
            "encrypted share fails AES-GCM authentication: it was made for another "
            "round, sender or receiver, or was tampered with"
        ) from None


# ------------------------------------------------------------------------ mask PRG


def prg_uint32(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 words: the AES-256-CTR keystream under ``seed``.

    Each seed is used for one mask only (seeds are per round and per pair), so a
    fixed all-zero counter block is safe.
    """
    _require_key("a mask seed", seed)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


class MaskExpander:
    """Adds or subtracts AES-CTR masks into a uint32 accumulator in place.

    Reuses one scratch buffer, so expanding k masks of m words costs k keystream
    passes and k in-place additions, with no allocation per mask.
    """

    def __init__(self, length: int) -> None:
        positive_int("vector length", length, error=MalformedMessageError)
        self.length = length
        self._zeros = bytes(4 * length)
        # cryptography's update_into wants block_size - 1 spare bytes.
        self._buffer = bytearray(4 * length + 15)
        self._words = np.frombuffer(self._buffer, dtype="<u4", count=length)

    def _expand(self, seed: bytes) -> np.ndarray:
        _require_key("a mask seed", seed)
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
        encryptor.update_into(self._zeros, self._buffer)
        return self._words

    def add(self, accumulator: np.ndarray, seed: bytes) -> None:
        np.add(accumulator, self._expand(seed), out=accumulator)

    def subtract(self, accumulator: np.ndarray, seed: bytes) -> None:
        np.subtract(accumulator, self._expand(seed), out=accumulator)
