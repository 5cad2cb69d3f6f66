"""The consortium's signed SecAgg roster of the silos' identity keys (``ca sign-roster``).

Each silo makes its identity key with ``fedguard node keygen`` (beside its node
key: ``secagg-identity.key`` stays with the silo, ``secagg-identity.pub`` goes to
the consortium). The consortium signs the list with its CA key (``ca.key``,
ECDSA P-384) or an Ed25519 consortium key, and gives the file to the server
(``SERVER_DIR/secagg-roster.json``): the deployed ServerApp relays it in every
SecAgg setup and each silo verifies it against its own copy of ``ca.crt`` (the
``consortium-key`` of its node config). Format: :mod:`fedguard.privacy.secagg.roster`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedguard.audit.pki import CA_CERT, SECAGG_IDENTITY_KEY, load_private_key
from fedguard.core.errors import ConfigError
from fedguard.privacy.secagg.roster import (
    ECDSA_P384,
    SignedRoster,
    SiloIdentity,
    load_consortium_key,
    roster_from_files,
    sign_roster,
)

__all__ = [
    "ROSTER_FILE",
    "load_server_roster",
    "parse_silo_keys",
    "sign_roster_files",
    "silo_identity_paths",
]

#: Where the server keeps the signed roster (``SERVER_DIR/secagg-roster.json``).
ROSTER_FILE = "secagg-roster.json"
DEFAULT_CONSORTIUM = "fedguard consortium"


def parse_silo_keys(items: Sequence[str]) -> dict[str, Path]:
    """``["hospital-a=keys/a/secagg-identity.pub", ...]`` → ``{silo id: path}``."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--silo takes SILO_ID=PUBLIC_KEY_FILE, got {item!r}")
        if name in out:
            raise ConfigError(f"silo {name!r} is given twice")
        out[name] = Path(path)
    if not out:
        raise ConfigError("a roster needs at least one --silo SILO_ID=PUBLIC_KEY_FILE")
    return out


def _common_name(cert_path: Path) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def sign_roster_files(
    key: Path,
    silos: Mapping[str, Path],
    out: Path,
    *,
    serial: int | None = None,
    consortium: str | None = None,
) -> SignedRoster:
    """Sign a roster of ``silos`` (id → ``secagg-identity.pub``) with ``key``; write ``out``.

    ``serial`` None: one more than the roster already at ``out`` (else 1). Silos
    refuse a roster older than one they accepted, so every new roster needs a
    higher serial.
    """
    if serial is None:
        serial = 1
        if Path(out).exists():
            serial = SignedRoster.load(Path(out)).roster.serial + 1
    name = consortium or _common_name(Path(key).parent / CA_CERT) or DEFAULT_CONSORTIUM
    roster = roster_from_files(name, serial, silos)
    signed = sign_roster(roster, load_private_key(Path(key)))
    signed.save(Path(out))
    return signed


def load_server_roster(server_dir: Path) -> SignedRoster | None:
    """``SERVER_DIR/secagg-roster.json`` (None if absent), checked against the server's
    ``ca.crt`` when the CA signed it: a roster that does not verify fails the run now."""
    path = Path(server_dir) / ROSTER_FILE
    if not path.exists():
        return None
    signed = SignedRoster.load(path)
    ca_cert = Path(server_dir) / CA_CERT
    if signed.algorithm == ECDSA_P384 and ca_cert.exists():
        signed.verify(load_consortium_key(ca_cert))
    return signed


def silo_identity_paths(
    identity: str | None, node_key: Path, consortium: str | None, ca_cert: Path
) -> tuple[Path, Path] | None:
    """The SecAgg identity key and trusted consortium key ``client start`` writes.

    ``identity`` None: ``secagg-identity.key`` beside the node key, if it exists
    (else None: the silo will refuse secure aggregation). ``consortium`` None: the
    CA certificate. Both are loaded once here, so a broken file fails now.
    """
    path = Path(identity) if identity else Path(node_key).parent / SECAGG_IDENTITY_KEY
    if not path.is_file():
        if identity:
            raise ConfigError(f"SecAgg identity key {path} does not exist")
        print(
            f"warning: no SecAgg identity key at {path}: this silo will refuse secure "
            "aggregation (make one with `fedguard node keygen`, or pass --secagg-identity)"
        )
        return None
    trusted = Path(consortium) if consortium else Path(ca_cert)
    SiloIdentity.load(path, trusted)
    return path.resolve(), trusted.resolve()
