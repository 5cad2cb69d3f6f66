"""Key material for a consortium, made with ``cryptography``.

Five kinds of keys, each in the exact format the component that reads it expects:

* **Consortium CA** (:func:`init_ca`): a self-signed ECDSA P-384 certificate
  (``ca.crt``, PEM) and its key (``ca.key``, PEM PKCS#8). Every silo trusts the
  SuperLink through ``ca.crt`` (``flower-supernode --root-certificates``).
* **SuperLink TLS certificate** (:func:`issue_server_cert`): an ECDSA P-384 leaf
  signed by the CA (``server.crt``, ``server.key``, and a copy of ``ca.crt``),
  with every host name and IP address in the subjectAltName (``localhost`` and
  ``127.0.0.1`` are always added), for ``flower-superlink --ssl-certfile
  --ssl-keyfile --ssl-ca-certfile``. The same call makes the server's Ed25519
  audit signing key (``audit.key``, ``audit.pub``, PEM) if it does not exist: it
  signs every record of the audit log (:mod:`fedguard.audit.server_log`).
* **SuperNode authentication key** (:func:`node_keygen`): ECDSA P-384 in
  OpenSSH format, as Flower 1.41 reads it: the private key with
  ``load_ssh_private_key`` (``flower-supernode --auth-supernode-private-key``),
  the public key with ``load_ssh_public_key`` (``flwr supernode register``). The
  same as ``ssh-keygen -t ecdsa -b 384 -N ''``.
* **SecAgg identity key** (:func:`secagg_identity_keygen`, made by ``fedguard node
  keygen`` beside the node key): the silo's long-term Ed25519 key that signs its
  secure-aggregation key advertisements (``secagg-identity.key`` PEM PKCS#8,
  ``secagg-identity.pub`` PEM). The consortium lists every silo's public half in
  its signed roster (:mod:`fedguard.privacy.secagg.roster`).
* **Ed25519 consortium key** (:func:`consortium_keygen`): what a simulation (or a
  consortium without an X.509 CA) signs the roster with instead of ``ca.key``.

Private keys are written unencrypted with mode 0600 (the operator protects the
folder; Flower reads them without a pass phrase), created with ``O_EXCL`` so an
existing key is never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedguard.core.errors import FedguardError

__all__ = [
    "AUDIT_KEY",
    "AUDIT_PUB",
    "CA_CERT",
    "CA_KEY",
    "CONSORTIUM_KEY",
    "CONSORTIUM_PUB",
    "NODE_KEY",
    "NODE_PUB",
    "SECAGG_IDENTITY_KEY",
    "SECAGG_IDENTITY_PUB",
    "SERVER_CERT",
    "SERVER_KEY",
    "CaFiles",
    "NodeKeyFiles",
    "PkiError",
    "ServerFiles",
    "SigningKey",
    "VerifyingKey",
    "audit_keygen",
    "consortium_keygen",
    "init_ca",
    "issue_server_cert",
    "load_private_key",
    "load_public_key",
    "node_keygen",
    "secagg_identity_keygen",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
AUDIT_KEY = "audit.key"
AUDIT_PUB = "audit.pub"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
SECAGG_IDENTITY_KEY = "secagg-identity.key"
SECAGG_IDENTITY_PUB = "secagg-identity.pub"
CONSORTIUM_KEY = "consortium.key"
CONSORTIUM_PUB = "consortium.pub"

_CURVE = ec.SECP384R1
_ALWAYS_HOSTS = ("localhost", "127.0.0.1")

#: A key that can sign audit records: Ed25519 (the server) or ECDSA (a silo's node key).
SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class PkiError(FedguardError):
    """Key material is missing, malformed, of the wrong kind, or would be overwritten."""


@dataclass(frozen=True)
class CaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerFiles:
    cert: Path
    key: Path
    ca_cert: Path
    audit_key: Path
    audit_public_key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class NodeKeyFiles:
    private_key: Path
    public_key: Path


# -- writing -------------------------------------------------------------------------------


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL)
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists; refusing to overwrite key material") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # O_CREAT's mode is masked by the umask; an existing file kept its own


def _pem_private(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"{', '.join(existing)} already exist(s); refusing to overwrite")


# -- the consortium CA ---------------------------------------------------------------------


def init_ca(
    ca_dir: Path,
    *,
    common_name: str = "fedguard consortium CA",
    valid_days: int = 3650,
    overwrite: bool = False,
) -> CaFiles:
    """Create a self-signed consortium CA (``ca.crt``, ``ca.key``) in ``ca_dir``."""
    if valid_days < 1:
        raise PkiError(f"valid_days must be >= 1, got {valid_days}")
    files = CaFiles(ca_dir / CA_CERT, ca_dir / CA_KEY)
    _refuse_existing([files.cert, files.key], overwrite)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    _write(files.key, _pem_private(key), private=True, overwrite=overwrite)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=True)
    return files


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"no CA certificate at {cert_path}; run `fedguard ca init` first") from None
    except ValueError as bad:
        raise PkiError(f"{cert_path} is not a PEM certificate: {bad}") from None
    key = load_private_key(key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an ECDSA key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise PkiError(f"{key_path} does not belong to {cert_path}")
    return cert, key


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise PkiError(f"{host!r} is neither an IP address nor a host name")
    return x509.DNSName(host)


def issue_server_cert(
    ca_dir: Path,
    out_dir: Path,
    hosts: Sequence[str] = (),
    *,
    valid_days: int = 825,
    overwrite: bool = False,
) -> ServerFiles:
    """Issue the SuperLink's TLS certificate; also make its audit signing key if absent.

    ``hosts`` are the names and addresses silos use to reach the SuperLink;
    ``localhost`` and ``127.0.0.1`` are always included.
    """
    if valid_days < 1:
        raise PkiError(f"valid_days must be >= 1, got {valid_days}")
    ca_cert, ca_key = _load_ca(ca_dir)
    all_hosts = tuple(dict.fromkeys([*hosts, *_ALWAYS_HOSTS]))
    sans = [_san_entry(h) for h in all_hosts]
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    _refuse_existing([cert_path, key_path], overwrite)
    key = ec.generate_private_key(_CURVE())
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _pem_private(key), private=True, overwrite=overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=True)
    ca_copy = out_dir / CA_CERT
    if ca_copy.resolve() != (ca_dir / CA_CERT).resolve():
        shutil.copyfile(ca_dir / CA_CERT, ca_copy)
    audit_key, audit_pub = out_dir / AUDIT_KEY, out_dir / AUDIT_PUB
    if not audit_key.exists():
        audit_keygen(out_dir)
    return ServerFiles(cert_path, key_path, ca_copy, audit_key, audit_pub, all_hosts)


def audit_keygen(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Make the server's Ed25519 audit signing key: ``audit.key`` (0600) and ``audit.pub``."""
    return _ed25519_keygen(out_dir / AUDIT_KEY, out_dir / AUDIT_PUB, overwrite)


def secagg_identity_keygen(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Make a silo's Ed25519 SecAgg identity key: ``secagg-identity.key`` (0600) and ``.pub``."""
    return _ed25519_keygen(out_dir / SECAGG_IDENTITY_KEY, out_dir / SECAGG_IDENTITY_PUB, overwrite)


def consortium_keygen(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Make an Ed25519 consortium roster key: ``consortium.key`` (0600) and ``consortium.pub``."""
    return _ed25519_keygen(out_dir / CONSORTIUM_KEY, out_dir / CONSORTIUM_PUB, overwrite)


def _ed25519_keygen(key_path: Path, pub_path: Path, overwrite: bool) -> tuple[Path, Path]:
    _refuse_existing([key_path, pub_path], overwrite)
    key = ed25519.Ed25519PrivateKey.generate()
    _write(key_path, _pem_private(key), private=True, overwrite=overwrite)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(pub_path, public, private=False, overwrite=True)
    return key_path, pub_path


def node_keygen(
    out_dir: Path, *, comment: str = "", overwrite: bool = False, secagg_identity: bool = False
) -> NodeKeyFiles:
    """Make a SuperNode authentication key pair (ECDSA P-384, OpenSSH format).

    ``secagg_identity``: also make the silo's SecAgg identity key in ``out_dir``
    (:func:`secagg_identity_keygen`); no file is written if any of the four exists.
    """
    files = NodeKeyFiles(out_dir / NODE_KEY, out_dir / NODE_PUB)
    identity = [out_dir / SECAGG_IDENTITY_KEY, out_dir / SECAGG_IDENTITY_PUB]
    paths = [files.private_key, files.public_key, *(identity if secagg_identity else [])]
    _refuse_existing(paths, overwrite)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        if any(c.isspace() for c in comment):
            raise PkiError(f"key comment must not contain white space, got {comment!r}")
        public += b" " + comment.encode()
    _write(files.private_key, private, private=True, overwrite=overwrite)
    _write(files.public_key, public + b"\n", private=False, overwrite=True)
    if secagg_identity:
        secagg_identity_keygen(out_dir, overwrite=overwrite)
    return files


# -- reading -------------------------------------------------------------------------------


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"no {what} at {path}") from None
    except OSError as bad:
        raise PkiError(f"cannot read {what} {path}: {bad}") from None


def load_private_key(path: Path) -> SigningKey:
    """An unencrypted Ed25519 or ECDSA private key, in PEM (PKCS#8 / SEC1) or OpenSSH format."""
    data = _read_key_file(path, "private key")
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as bad:
        raise PkiError(f"{path} is not an unencrypted PEM or OpenSSH private key: {bad}") from None
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise PkiError(f"{path} holds a {type(key).__name__}; expected Ed25519 or ECDSA")
    return key


def load_public_key(path: Path) -> VerifyingKey:
    """An Ed25519 or ECDSA public key, in PEM (SubjectPublicKeyInfo) or OpenSSH format."""
    data = _read_key_file(path, "public key")
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as bad:
        raise PkiError(f"{path} is not a PEM or OpenSSH public key: {bad}") from None
    if not isinstance(key, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey)):
        raise PkiError(f"{path} holds a {type(key).__name__}; expected Ed25519 or ECDSA")
    return key
