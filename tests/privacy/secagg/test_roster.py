"""The consortium's signed SecAgg roster: format, signatures, forgeries, key files."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedguard.audit import pki
from fedguard.privacy.secagg.crypto import ed25519_keypair
from fedguard.privacy.secagg.roster import (
    ECDSA_P384,
    ED25519,
    Roster,
    RosterError,
    SignedRoster,
    SiloIdentity,
    bind_round_id,
    load_consortium_key,
    load_identity_private_key,
    load_identity_public_key,
    sign_roster,
)

SILOS = ("hospital-a", "hospital-b", "hospital-c")


def _roster(serial: int = 1, keys: dict[str, bytes] | None = None) -> Roster:
    silos = keys or {s: ed25519_keypair()[1] for s in SILOS}
    return Roster("test consortium", serial, silos, "2026-12-03T10:00:00Z")


def _edit(signed: SignedRoster, change: Any) -> bytes:
    doc = json.loads(signed.to_bytes())
    change(doc)
    return json.dumps(doc).encode()


def test_ed25519_roster_round_trips_and_verifies() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    roster = _roster()
    signed = sign_roster(roster, key)
    assert signed.algorithm == ED25519
    parsed = SignedRoster.from_bytes(signed.to_bytes())
    assert parsed == signed
    assert parsed.verify(key.public_key()) == roster
    assert list(roster.silos) == sorted(SILOS)


def test_the_ca_key_signs_and_the_ca_certificate_verifies(tmp_path: Path) -> None:
    files = pki.init_ca(tmp_path / "ca")
    key = pki.load_private_key(files.key)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signed = sign_roster(_roster(), key)
    assert signed.algorithm == ECDSA_P384
    trusted = load_consortium_key(files.cert)  # a silo's own copy of ca.crt
    assert SignedRoster.from_bytes(signed.to_bytes()).verify(trusted) == signed.roster


def test_a_forged_signature_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signed = sign_roster(_roster(), key)
    forged = bytearray(signed.signature)
    forged[0] ^= 1

    def flip(doc: dict[str, Any]) -> None:
        doc["signature"]["value"] = base64.b64encode(bytes(forged)).decode()

    with pytest.raises(RosterError, match="does not verify"):
        SignedRoster.from_bytes(_edit(signed, flip)).verify(key.public_key())


def test_a_substituted_silo_key_breaks_the_signature() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signed = sign_roster(_roster(), key)
    _, server_key = ed25519_keypair()

    def substitute(doc: dict[str, Any]) -> None:
        doc["silos"]["hospital-b"] = base64.b64encode(server_key).decode()

    tampered = SignedRoster.from_bytes(_edit(signed, substitute))
    assert tampered.roster.silos["hospital-b"] == server_key
    with pytest.raises(RosterError, match="does not verify"):
        tampered.verify(key.public_key())


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.__setitem__("serial", 2),
        lambda d: d.__setitem__("consortium", "another"),
        lambda d: d.__setitem__("issued-at", "2027-01-01T00:00:00Z"),
        lambda d: d["silos"].pop("hospital-c"),
        lambda d: d["silos"].__setitem__("hospital-z", d["silos"].pop("hospital-c")),
    ],
)
def test_every_field_is_signed(change: Any) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signed = sign_roster(_roster(), key)
    with pytest.raises(RosterError, match="does not verify"):
        SignedRoster.from_bytes(_edit(signed, change)).verify(key.public_key())


def test_a_roster_signed_by_another_consortium_key_is_refused(tmp_path: Path) -> None:
    signed = sign_roster(_roster(), ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(RosterError, match="does not verify"):
        signed.verify(ed25519.Ed25519PrivateKey.generate().public_key())
    # An ECDSA-trusting silo refuses an Ed25519 roster whatever its signature says.
    ca = pki.init_ca(tmp_path / "ca")
    with pytest.raises(RosterError, match="trusted consortium key is ecdsa"):
        signed.verify(load_consortium_key(ca.cert))
    other_ca = pki.init_ca(tmp_path / "other")
    ca_key = pki.load_private_key(ca.key)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    with pytest.raises(RosterError, match="does not verify"):
        sign_roster(_roster(), ca_key).verify(load_consortium_key(other_ca.cert))


def test_a_p256_consortium_key_is_refused() -> None:
    weak = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(RosterError, match="P-384"):
        sign_roster(_roster(), weak)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not json", "not JSON"),
        (b'{"format": 1, "format": 2}', "twice"),
        (b"[]", "exactly the fields"),
        (b'{"serial": NaN}', "NaN"),
    ],
)
def test_malformed_roster_bytes_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(RosterError, match=match):
        SignedRoster.from_bytes(data)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("serial"), "exactly the fields"),
        (lambda d: d.__setitem__("extra", 1), "exactly the fields"),
        (lambda d: d.__setitem__("format", "fedguard-secagg-roster/v0"), "format"),
        (lambda d: d.__setitem__("serial", True), "serial"),
        (lambda d: d.__setitem__("serial", 0), "serial"),
        (lambda d: d.__setitem__("serial", "1"), "serial"),
        (lambda d: d.__setitem__("silos", {}), "at least one silo"),
        (lambda d: d.__setitem__("silos", []), "object"),
        (lambda d: d["silos"].__setitem__("hospital-a", "***"), "base64"),
        (lambda d: d["silos"].__setitem__("hospital-a", "AAAA"), "32 raw bytes"),
        (lambda d: d["silos"].__setitem__("a/b", d["silos"]["hospital-a"]), "'/'"),
        (lambda d: d["silos"].__setitem__("", d["silos"]["hospital-a"]), "non-empty"),
        (lambda d: d["signature"].__setitem__("algorithm", "rsa"), "algorithm"),
        (lambda d: d["signature"].pop("signer"), "exactly the fields"),
    ],
)
def test_malformed_roster_fields_are_refused(change: Any, match: str) -> None:
    signed = sign_roster(_roster(), ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(RosterError, match=match):
        SignedRoster.from_bytes(_edit(signed, change))


def test_two_silos_with_one_key_are_refused() -> None:
    _, shared = ed25519_keypair()
    with pytest.raises(RosterError, match="share one identity key"):
        Roster("c", 1, {"a": shared, "b": shared})


def test_the_registry_refuses_duplicate_unknown_and_misaligned_silo_ids() -> None:
    roster = _roster()
    nodes = [11, 12, 13]
    registry = roster.registry(nodes, list(SILOS))
    assert registry == {n: roster.silos[s] for n, s in zip(nodes, SILOS, strict=True)}
    with pytest.raises(RosterError, match="assigned to two nodes"):
        roster.registry(nodes, ["hospital-a", "hospital-a", "hospital-c"])
    with pytest.raises(RosterError, match="not in the consortium's roster"):
        roster.registry(nodes, ["hospital-a", "hospital-b", "hospital-x"])
    with pytest.raises(RosterError, match="2 silo ids for a round of 3"):
        roster.registry(nodes, ["hospital-a", "hospital-b"])


def test_the_round_id_commits_to_nonce_roster_and_assignment() -> None:
    roster, nonce = _roster(), bytes(range(16))
    base = bind_round_id(nonce, roster, list(SILOS))
    assert len(base) == 32 and base == bind_round_id(nonce, roster, list(SILOS))
    assert base != bind_round_id(nonce, roster, ["hospital-b", "hospital-a", "hospital-c"])
    assert base != bind_round_id(bytes(16), roster, list(SILOS))
    assert base != bind_round_id(nonce, _roster(serial=2, keys=dict(roster.silos)), list(SILOS))
    with pytest.raises(RosterError, match="nonce"):
        bind_round_id(b"short", roster, list(SILOS))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_key_files_pem_and_raw(tmp_path: Path) -> None:
    key_path, pub_path = pki.secagg_identity_keygen(tmp_path / "silo")
    assert _mode(key_path) == 0o600
    private = load_identity_private_key(key_path)
    public = load_identity_public_key(pub_path)
    assert len(private) == len(public) == 32
    raw_key, raw_pub = tmp_path / "raw.key", tmp_path / "raw.pub"
    raw_key.write_bytes(private)
    raw_pub.write_bytes(public)
    assert load_identity_private_key(raw_key) == private
    assert load_identity_public_key(raw_pub) == public
    with pytest.raises(pki.PkiError):
        pki.secagg_identity_keygen(tmp_path / "silo")  # never overwritten
    consortium_key, consortium_pub = pki.consortium_keygen(tmp_path / "consortium")
    identity = SiloIdentity.load(key_path, consortium_pub)
    assert identity.public_key == public
    trusted = identity.trusted_key()
    assert isinstance(trusted, ed25519.Ed25519PublicKey)
    assert private.hex() not in repr(identity)
    # The consortium's raw 32-byte public key is accepted too.
    raw_consortium = tmp_path / "consortium.raw"
    raw_consortium.write_bytes(
        trusted.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert SiloIdentity.load(key_path, raw_consortium) == identity
    assert _mode(consortium_key) == 0o600


def test_a_node_key_is_not_an_identity_key(tmp_path: Path) -> None:
    files = pki.node_keygen(tmp_path, secagg_identity=True)
    assert (tmp_path / pki.SECAGG_IDENTITY_KEY).exists()
    assert _mode(tmp_path / pki.SECAGG_IDENTITY_KEY) == 0o600
    with pytest.raises(RosterError, match="not an Ed25519 key"):
        load_identity_private_key(files.private_key)
    with pytest.raises(RosterError, match=r"no private key|cannot read"):
        load_identity_private_key(tmp_path / "missing.key")


def test_a_roster_file_round_trips(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signed = sign_roster(_roster(), key)
    path = signed.save(tmp_path / "secagg-roster.json")
    assert SignedRoster.load(path) == signed
    with pytest.raises(RosterError, match="cannot read"):
        SignedRoster.load(tmp_path / "absent.json")
