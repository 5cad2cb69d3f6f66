"""Consortium key material: formats Flower reads, chains that verify, 0600 private keys."""

import contextlib
import ipaddress
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedguard.audit import pki
from fedguard.audit.pki import PkiError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pki.ServerFiles]:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca")
    server = pki.issue_server_cert(root / "ca", root / "server", ["link.example.org", "10.0.0.7"])
    return root, server


def test_ca_is_a_self_signed_p384_ca_with_a_private_key_of_mode_0600(
    consortium: tuple[Path, pki.ServerFiles],
) -> None:
    root, _ = consortium
    cert = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    assert cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    cert.verify_directly_issued_by(cert)
    assert _mode(root / "ca" / "ca.key") == 0o600


def test_server_certificate_chains_to_the_ca_and_names_every_host(
    consortium: tuple[Path, pki.ServerFiles],
) -> None:
    root, server = consortium
    ca = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert _mode(server.key) == 0o600
    assert server.ca_cert.read_bytes() == (root / "ca" / "ca.crt").read_bytes()


def test_python_tls_accepts_the_pair_and_verifies_localhost(
    consortium: tuple[Path, pki.ServerFiles],
) -> None:
    _, server = consortium
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(server.cert, server.key)  # the pair uvicorn loads
    client_side = ssl.create_default_context(cafile=str(server.ca_cert))
    client_side.verify_flags |= ssl.VERIFY_X509_STRICT
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    back_in, back_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_side.wrap_bio(incoming, outgoing, server_hostname="localhost")
    srv = server_side.wrap_bio(back_in, back_out, server_side=True)
    for _ in range(10):  # pump the handshake between the two in memory
        for side in (client, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        back_in.write(outgoing.read())
        incoming.write(back_out.read())
    assert client.version() is not None
    assert client.getpeercert()["subject"][0][0][1] == "link.example.org"


def test_audit_key_is_ed25519_and_made_once(consortium: tuple[Path, pki.ServerFiles]) -> None:
    root, server = consortium
    key = pki.load_private_key(server.audit_key)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert isinstance(pki.load_public_key(server.audit_public_key), ed25519.Ed25519PublicKey)
    assert _mode(server.audit_key) == 0o600
    before = server.audit_key.read_bytes()
    pki.issue_server_cert(root / "ca", root / "server", overwrite=True)  # renew the TLS pair
    assert server.audit_key.read_bytes() == before  # the audit identity survives a renewal


def test_node_key_is_what_flower_loads(tmp_path: Path) -> None:
    files = pki.node_keygen(tmp_path / "silo", comment="hospital-a")
    private = load_ssh_private_key(files.private_key.read_bytes(), None)  # flower-supernode
    public = load_ssh_public_key(files.public_key.read_bytes().split(b" hospital-a")[0])
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1"
    assert files.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert files.public_key.read_text().rstrip().endswith("hospital-a")
    assert _mode(files.private_key) == 0o600
    assert isinstance(pki.load_private_key(files.private_key), ec.EllipticCurvePrivateKey)
    assert isinstance(pki.load_public_key(files.public_key), ec.EllipticCurvePublicKey)


def test_flower_register_reads_the_public_key(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    files = pki.node_keygen(tmp_path)
    assert len(try_load_public_key(files.public_key)) > 0


def test_ssh_keygen_reads_the_private_key_if_available(tmp_path: Path) -> None:
    files = pki.node_keygen(tmp_path)
    try:
        done = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(files.private_key)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("ssh-keygen is not installed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == files.public_key.read_text().split()[:2]


def test_existing_keys_are_never_overwritten_unless_forced(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    key_before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="refusing to overwrite"):
        pki.init_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == key_before
    pki.init_ca(tmp_path, overwrite=True)
    assert (tmp_path / "ca.key").read_bytes() != key_before
    pki.node_keygen(tmp_path / "n")
    with pytest.raises(PkiError):
        pki.node_keygen(tmp_path / "n")


def test_bad_inputs_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="fedguard ca init"):
        pki.issue_server_cert(tmp_path / "missing", tmp_path / "out")
    pki.init_ca(tmp_path / "ca")
    with pytest.raises(PkiError, match="neither an IP address nor a host name"):
        pki.issue_server_cert(tmp_path / "ca", tmp_path / "out", ["bad host"])
    with pytest.raises(PkiError, match="valid_days"):
        pki.init_ca(tmp_path / "x", valid_days=0)
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(PkiError, match="not an unencrypted PEM or OpenSSH private key"):
        pki.load_private_key(tmp_path / "junk.key")
    with pytest.raises(PkiError, match="not a PEM or OpenSSH public key"):
        pki.load_public_key(tmp_path / "junk.key")
    with pytest.raises(PkiError, match="no private key"):
        pki.load_private_key(tmp_path / "absent.key")
    with pytest.raises(PkiError, match="white space"):
        pki.node_keygen(tmp_path / "c", comment="two words")


def test_a_ca_key_that_does_not_match_its_certificate_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(PkiError, match="does not belong"):
        pki.issue_server_cert(tmp_path / "a", tmp_path / "out")


def test_module_runs_without_importing_torch() -> None:
    code = "import sys, fedguard.audit.pki; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
