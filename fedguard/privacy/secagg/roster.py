"""The consortium's SecAgg roster: each silo's identity key, signed by the consortium.

Authenticated SecAgg+ (Bonawitz et al., CCS 2017, §6; Bell et al., CCS 2020,
§4) assumes a PKI: every client signs its key advertisement with a long-term
key, and every client looks its neighbours' keys up in a registry the server
cannot change. Here that registry is the **roster**: a list ``silo id → Ed25519
identity public key`` (32 raw bytes) signed by the consortium, which silos
verify against a trusted key from *their own* configuration (the deployment's
X.509 CA certificate, or an Ed25519 consortium key in simulation). The server
only relays it: it cannot add a silo, drop one or swap a key without the
consortium's private key.

File format (``secagg-roster.json``, UTF-8 JSON, every field signed)::

    {
      "format": "fedguard-secagg-roster/v1",
      "consortium": "fedguard consortium CA",     # who signs (free text)
      "serial": 3,                                 # >= 1; a silo never goes back
      "issued-at": "2026-12-03T10:00:00Z",
      "silos": {"hospital-a": "<base64 of 32 bytes>", ...},
      "signature": {
        "algorithm": "ecdsa-p384-sha384" | "ed25519",
        "signer": "sha256:<hex of the signer's SubjectPublicKeyInfo DER>",
        "value": "<base64>"                        # DER ECDSA or raw Ed25519
      }
    }

The signature covers :meth:`Roster.canonical_bytes` (a length-prefixed binary
encoding of format, consortium, serial, issue time and the silos sorted by id),
not the JSON text, so formatting does not matter and nothing unsigned is read.
The algorithm is fixed by the *trusted* key's type, never by the file.

A round binds its roster and its node → silo assignment into the round id
(:func:`bind_round_id`): the round id is part of the setup digest that every
advert signature, share encryption and consistency signature covers, so silos
that were shown different rosters or assignments cannot complete a round
together.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedguard.audit.pki import PkiError, load_private_key, load_public_key
from fedguard.privacy.secagg.crypto import KEY_BYTES, ed25519_public
from fedguard.privacy.secagg.errors import SecAggError

__all__ = [
    "ECDSA_P384",
    "ED25519",
    "ROSTER_FORMAT",
    "ConsortiumKey",
    "ConsortiumSigningKey",
    "Roster",
    "RosterError",
    "SignedRoster",
    "SiloIdentity",
    "bind_round_id",
    "key_fingerprint",
    "load_consortium_key",
    "load_identity_private_key",
    "load_identity_public_key",
    "sign_roster",
]

ROSTER_FORMAT = "fedguard-secagg-roster/v1"
ED25519 = "ed25519"
ECDSA_P384 = "ecdsa-p384-sha384"
MAX_SILO_ID_CHARS = 128
MAX_ROSTER_BYTES = 16 * 1024 * 1024
_DOMAIN = b"fedguard/secagg/roster/v1\x00"
_BINDING = b"fedguard/secagg/roster-binding/v1\x00"
_TOP = {"format", "consortium", "serial", "issued-at", "silos", "signature"}
_SIGNATURE = {"algorithm", "signer", "value"}

#: The key that verifies a roster: the CA's ECDSA P-384 key or an Ed25519 consortium key.
ConsortiumKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
ConsortiumSigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class RosterError(SecAggError):
    """A roster is malformed, forged, signed by another key, or does not fit the round."""


# -- the roster ------------------------------------------------------------------------------


def _text(name: str, value: object, limit: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise RosterError(f"roster {name} must be a non-empty string, got {value!r}")
    if len(value) > limit or not value.isprintable() or value != value.strip():
        raise RosterError(f"roster {name} {value[:40]!r} is too long or not printable text")
    return value


def check_silo_id(silo_id: object) -> str:
    """A silo id as rosters carry it: printable, no '/', at most 128 characters."""
    text = _text("silo id", silo_id, MAX_SILO_ID_CHARS)
    if "/" in text:
        raise RosterError(f"silo id {text!r} contains '/'")
    return text


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class Roster:
    """Silo id → Ed25519 identity public key (32 raw bytes), as the consortium signs it."""

    consortium: str
    serial: int
    silos: Mapping[str, bytes]
    issued_at: str = ""

    def __post_init__(self) -> None:
        _text("consortium", self.consortium, 256)
        _text("issued-at", self.issued_at, 64, allow_empty=True)
        serial = self.serial
        if isinstance(serial, bool) or not isinstance(serial, int) or not 1 <= serial < 2**63:
            raise RosterError(f"roster serial must be an integer in [1, 2^63), got {serial!r}")
        if not isinstance(self.silos, Mapping) or not self.silos:
            raise RosterError("a roster lists at least one silo")
        keys: dict[bytes, str] = {}
        for silo_id, key in self.silos.items():
            check_silo_id(silo_id)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise RosterError(f"silo {silo_id!r}: an identity key is {KEY_BYTES} raw bytes")
            if key in keys:
                raise RosterError(f"silos {keys[key]!r} and {silo_id!r} share one identity key")
            keys[key] = silo_id
        frozen = MappingProxyType({s: bytes(self.silos[s]) for s in sorted(self.silos)})
        object.__setattr__(self, "silos", frozen)

    def canonical_bytes(self) -> bytes:
        """What the consortium signs: every field, length-prefixed, silos sorted by id."""
        parts = [
            _DOMAIN,
            _field(ROSTER_FORMAT.encode()),
            _field(self.consortium.encode()),
            struct.pack(">Q", self.serial),
            _field(self.issued_at.encode()),
            struct.pack(">I", len(self.silos)),
        ]
        for silo_id, key in self.silos.items():
            parts += [_field(silo_id.encode()), key]
        return b"".join(parts)

    def digest(self) -> bytes:
        return hashlib.sha256(self.canonical_bytes()).digest()

    def key_of(self, silo_id: str) -> bytes:
        try:
            return self.silos[silo_id]
        except KeyError:
            raise RosterError(f"silo {silo_id!r} is not in the consortium's roster") from None

    def registry(self, node_ids: Sequence[int], silo_ids: Sequence[str]) -> dict[int, bytes]:
        """``{node: identity key}`` for a round whose ``node_ids[i]`` is silo ``silo_ids[i]``.

        Refuses a list of another length, a silo id given twice (one silo cannot
        stand for two nodes) and a silo id the roster does not list.
        """
        if len(silo_ids) != len(node_ids):
            raise RosterError(f"{len(silo_ids)} silo ids for a round of {len(node_ids)} nodes")
        seen: set[str] = set()
        for silo_id in silo_ids:
            if silo_id in seen:
                raise RosterError(f"silo {silo_id!r} is assigned to two nodes of the round")
            seen.add(silo_id)
        return {node: self.key_of(silo) for node, silo in zip(node_ids, silo_ids, strict=True)}


def bind_round_id(nonce: bytes, roster: Roster, silo_ids: Sequence[str]) -> bytes:
    """The round id that commits to ``nonce``, the roster and the node → silo list."""
    if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
        raise RosterError("the round nonce must be 16..64 bytes")
    parts = [_BINDING, _field(nonce), roster.digest(), struct.pack(">I", len(silo_ids))]
    parts += [_field(check_silo_id(s).encode()) for s in silo_ids]
    return hashlib.sha256(b"".join(parts)).digest()


# -- signing and verifying -------------------------------------------------------------------


def _spki(key: ConsortiumKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_fingerprint(key: ConsortiumKey) -> str:
    """``sha256:<hex>`` of the key's SubjectPublicKeyInfo DER."""
    return "sha256:" + hashlib.sha256(_spki(key)).hexdigest()


def _algorithm(key: ConsortiumKey | ConsortiumSigningKey) -> str:
    if isinstance(key, (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey)):
        return ED25519
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        if key.curve.name != "secp384r1":
            raise RosterError(f"an ECDSA consortium key must be P-384, got {key.curve.name}")
        return ECDSA_P384
    raise RosterError(f"a consortium key is ECDSA P-384 or Ed25519, got {type(key).__name__}")


def sign_roster(roster: Roster, key: ConsortiumSigningKey) -> SignedRoster:
    """Sign ``roster`` with the consortium's key (``ca.key`` or an Ed25519 key)."""
    algorithm = _algorithm(key)
    data = roster.canonical_bytes()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(data)
    else:
        signature = key.sign(data, ec.ECDSA(hashes.SHA384()))
    return SignedRoster(roster, algorithm, key_fingerprint(key.public_key()), signature)


def _b64(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise RosterError(f"roster {name} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise RosterError(f"roster {name} is not valid base64") from None


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RosterError(f"roster JSON names {key!r} twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise RosterError(f"roster JSON holds {name}")


@dataclass(frozen=True)
class SignedRoster:
    """A roster with the consortium's signature; :meth:`verify` before trusting it."""

    roster: Roster
    algorithm: str
    signer: str
    signature: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        r = self.roster
        return {
            "format": ROSTER_FORMAT,
            "consortium": r.consortium,
            "serial": r.serial,
            "issued-at": r.issued_at,
            "silos": {s: base64.b64encode(k).decode() for s, k in r.silos.items()},
            "signature": {
                "algorithm": self.algorithm,
                "signer": self.signer,
                "value": base64.b64encode(self.signature).decode(),
            },
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRoster:
        """Parse (strictly: exact fields, types, sizes); the signature is not checked here."""
        if not isinstance(data, bytes) or len(data) > MAX_ROSTER_BYTES:
            raise RosterError(f"a roster is at most {MAX_ROSTER_BYTES} bytes of JSON")
        try:
            doc = json.loads(
                data.decode("utf-8"), object_pairs_hook=_unique_object, parse_constant=_no_constant
            )
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as bad:
            raise RosterError(f"the roster is not JSON: {bad}") from None
        if not isinstance(doc, dict) or set(doc) != _TOP:
            raise RosterError(f"a roster has exactly the fields {sorted(_TOP)}")
        if doc["format"] != ROSTER_FORMAT:
            raise RosterError(f"roster format {doc['format']!r}, expected {ROSTER_FORMAT!r}")
        silos, signature = doc["silos"], doc["signature"]
        if not isinstance(silos, dict):
            raise RosterError("roster silos must be an object of silo id -> base64 key")
        if not isinstance(signature, dict) or set(signature) != _SIGNATURE:
            raise RosterError(f"a roster signature has exactly the fields {sorted(_SIGNATURE)}")
        algorithm = signature["algorithm"]
        if algorithm not in (ED25519, ECDSA_P384):
            raise RosterError(f"unknown roster signature algorithm {algorithm!r}")
        signer = _text("signer", signature["signer"], 80)
        roster = Roster(
            consortium=doc["consortium"],
            serial=doc["serial"],
            silos={s: _b64(f"key of silo {s!r}", k) for s, k in silos.items()},
            issued_at=doc["issued-at"],
        )
        return cls(roster, algorithm, signer, _b64("signature", signature["value"]))

    def verify(self, trusted: ConsortiumKey) -> Roster:
        """The roster, if the consortium key ``trusted`` signed it; else :class:`RosterError`."""
        expected = _algorithm(trusted)
        if self.algorithm != expected:
            raise RosterError(
                f"the roster is signed with {self.algorithm}; the trusted consortium key "
                f"is {expected}: refusing"
            )
        data = self.roster.canonical_bytes()
        try:
            if isinstance(trusted, ed25519.Ed25519PublicKey):
                trusted.verify(self.signature, data)
            else:
                trusted.verify(self.signature, data, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise RosterError(
                "the roster's signature does not verify under the trusted consortium key "
                f"({key_fingerprint(trusted)}; the roster names {self.signer}): forged, "
                "altered or signed by another key"
            ) from None
        return self.roster

    def save(self, path: Path) -> Path:
        from fedguard.core.files import atomic_write_bytes

        atomic_write_bytes(Path(path), self.to_bytes())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> SignedRoster:
        try:
            data = Path(path).read_bytes()
        except OSError as bad:
            raise RosterError(f"cannot read the roster {path}: {bad}") from None
        return cls.from_bytes(data)


# -- key files -------------------------------------------------------------------------------


def load_consortium_key(path: Path) -> ConsortiumKey:
    """The trusted roster key: a PEM certificate (the CA's ``ca.crt``), a PEM or
    OpenSSH public key (ECDSA P-384 or Ed25519), or a raw 32-byte Ed25519 key."""
    try:
        data = Path(path).read_bytes()
    except OSError as bad:
        raise RosterError(f"cannot read the consortium key {path}: {bad}") from None
    key: object
    if data.lstrip().startswith(b"-----BEGIN CERTIFICATE"):
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except (ValueError, UnsupportedAlgorithm) as bad:
            raise RosterError(f"{path} is not a PEM certificate: {bad}") from None
    elif len(data) == KEY_BYTES:
        try:
            key = ed25519.Ed25519PublicKey.from_public_bytes(data)
        except ValueError as bad:
            raise RosterError(f"{path} is not a raw Ed25519 public key: {bad}") from None
    else:
        try:
            key = load_public_key(Path(path))
        except PkiError as bad:
            raise RosterError(str(bad)) from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise RosterError(f"{path} holds a {type(key).__name__}, not a consortium key")
    _algorithm(key)
    return key


def consortium_key_from_der(der: bytes) -> ConsortiumKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as bad:
        raise RosterError(f"not a DER public key: {bad}") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise RosterError(f"a {type(key).__name__} is not a consortium key")
    _algorithm(key)
    return key


def _raw_ed25519(path: Path, what: str, private: bool) -> bytes:
    """32 raw Ed25519 key bytes from a PEM/OpenSSH file or a raw one."""
    try:
        data = Path(path).read_bytes()
    except OSError as bad:
        raise RosterError(f"cannot read the {what} {path}: {bad}") from None
    if len(data) == KEY_BYTES:
        return data
    try:
        key = load_private_key(Path(path)) if private else load_public_key(Path(path))
    except PkiError as bad:
        raise RosterError(str(bad)) from None
    raw = serialization.Encoding.Raw
    if private and isinstance(key, ed25519.Ed25519PrivateKey):
        return key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    if not private and isinstance(key, ed25519.Ed25519PublicKey):
        return key.public_bytes(raw, serialization.PublicFormat.Raw)
    kind = "key" if private else "public key"
    raise RosterError(f"{path} is not an Ed25519 {kind} (a {what} is Ed25519)")


def load_identity_private_key(path: Path) -> bytes:
    """A silo's Ed25519 identity key, 32 raw bytes, from a PEM/OpenSSH file or a raw one."""
    return _raw_ed25519(path, "SecAgg identity key", private=True)


def load_identity_public_key(path: Path) -> bytes:
    """A silo's Ed25519 identity public key, 32 raw bytes (PEM, OpenSSH or raw file)."""
    return _raw_ed25519(path, "SecAgg identity public key", private=False)


def roster_from_files(consortium: str, serial: int, public_keys: Mapping[str, Path]) -> Roster:
    """A roster from the silos' ``secagg-identity.pub`` files, issued now (UTC)."""
    stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return Roster(
        consortium,
        serial,
        {check_silo_id(s): load_identity_public_key(p) for s, p in public_keys.items()},
        stamp,
    )


@dataclass(frozen=True)
class SiloIdentity:
    """What a silo authenticates SecAgg with: its identity key and the key it trusts.

    ``consortium_key`` is the SubjectPublicKeyInfo DER of the key that must have
    signed the roster; it comes from the silo's own configuration.
    """

    private_key: bytes = field(repr=False)
    consortium_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, bytes) or len(self.private_key) != KEY_BYTES:
            raise RosterError(f"a SecAgg identity key is {KEY_BYTES} raw bytes")
        consortium_key_from_der(self.consortium_key)

    @property
    def public_key(self) -> bytes:
        return ed25519_public(self.private_key)

    def trusted_key(self) -> ConsortiumKey:
        return consortium_key_from_der(self.consortium_key)

    @classmethod
    def load(cls, identity_key: Path, consortium_key: Path) -> SiloIdentity:
        trusted = load_consortium_key(consortium_key)
        return cls(load_identity_private_key(identity_key), _spki(trusted))
