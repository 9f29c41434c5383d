"""felix.tls: the node's generated CA and server certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from felix import tls
from felix.errors import FelixError
from felix.tls import NodeCerts, ensure_node_certificates, node_certificates

pytestmark = pytest.mark.timeout(30)


def _cert(path: Path | None) -> x509.Certificate:
    assert path is not None
    return x509.load_pem_x509_certificate(path.read_bytes())


def _key(path: Path | None) -> ec.EllipticCurvePrivateKey:
    assert path is not None
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def _files(certs: NodeCerts) -> dict[str, bytes]:
    paths = {
        "ca_cert": certs.ca_cert,
        "ca_key": certs.ca_key,
        "server_cert": certs.server_cert,
        "server_key": certs.server_key,
    }
    return {name: path.read_bytes() for name, path in paths.items() if path is not None}


def test_first_start_generates_ca_and_server_cert(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"  # does not exist yet
    certs = ensure_node_certificates(data_dir, hostnames=["felix.example"], ips=["10.1.2.3"])
    now = dt.datetime.now(dt.UTC)

    assert certs.ca_cert is not None and certs.ca_key is not None
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700

    ca = _cert(certs.ca_cert)
    ca_key = _key(certs.ca_key)
    assert isinstance(ca_key.curve, ec.SECP256R1)
    assert ca_key.public_key() == ca.public_key()
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)  # self-signed
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert dt.timedelta(days=3640) < ca.not_valid_after_utc - now < dt.timedelta(days=3660)
    assert ca.not_valid_before_utc <= now

    server = _cert(certs.server_cert)
    server_key = _key(certs.server_key)
    assert isinstance(server_key.curve, ec.SECP256R1)
    assert server_key.public_key() == server.public_key()
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    dns, ips = _sans(server)
    assert dns == {"localhost", "felix.example"}
    assert ips == {"127.0.0.1", "::1", "10.1.2.3"}
    assert dt.timedelta(days=360) < server.not_valid_after_utc - now < dt.timedelta(days=370)
    assert server.not_valid_before_utc <= now

    for key_path in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "ca-cert.pem",
        "ca-key.pem",
        "server-cert.pem",
        "server-key.pem",
    ]


def test_second_start_reuses_identical_files(tmp_path: Path) -> None:
    first = ensure_node_certificates(tmp_path, hostnames=["a.example"], ips=[])
    before = _files(first)
    # Same names in another order and case, defaults repeated: nothing to change.
    second = ensure_node_certificates(
        tmp_path, hostnames=["A.example", "localhost"], ips=["127.0.0.1"]
    )
    assert second == first
    assert _files(second) == before


def test_new_san_reissues_server_cert_keeping_ca(tmp_path: Path) -> None:
    first = ensure_node_certificates(tmp_path, hostnames=["a.example"], ips=[])
    before = _files(first)

    second = ensure_node_certificates(tmp_path, hostnames=["a.example", "b.example"], ips=["::2"])
    after = _files(second)
    assert after["ca_cert"] == before["ca_cert"]
    assert after["ca_key"] == before["ca_key"]
    assert after["server_cert"] != before["server_cert"]
    assert after["server_key"] != before["server_key"]
    server = _cert(second.server_cert)
    server.verify_directly_issued_by(_cert(second.ca_cert))
    assert _sans(server) == ({"localhost", "a.example", "b.example"}, {"127.0.0.1", "::1", "::2"})
    assert stat.S_IMODE(second.server_key.stat().st_mode) == 0o600

    # A subset of the names is still covered: nothing is reissued.
    assert _files(ensure_node_certificates(tmp_path, hostnames=["b.example"], ips=[])) == after


def test_ip_literal_in_hostnames_becomes_ip_san(tmp_path: Path) -> None:
    certs = ensure_node_certificates(tmp_path, hostnames=["192.0.2.7"], ips=[])
    dns, ips = _sans(_cert(certs.server_cert))
    assert "192.0.2.7" in ips and "192.0.2.7" not in dns


def test_bad_ip_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ensure_node_certificates(tmp_path, hostnames=[], ips=["not-an-ip"])


def test_expiring_server_cert_is_reissued(tmp_path: Path) -> None:
    certs = ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    ca = _cert(certs.ca_cert)
    ca_key = _key(certs.ca_key)
    # A server cert issued 340 days ago expires in 25 days: inside the 30-day window.
    key = ec.generate_private_key(ec.SECP256R1())
    old_now = dt.datetime.now(dt.UTC) - dt.timedelta(days=340)
    dns, ips = ["localhost"], [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    old = tls._issue_server(ca, ca_key, key, dns, ips, old_now)
    certs.server_cert.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    certs.server_key.write_bytes(tls._key_pem(key))

    again = ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    renewed = _cert(again.server_cert)
    assert renewed.serial_number != old.serial_number
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=360)
    assert _cert(again.ca_cert) == ca


def test_mismatched_server_key_is_reissued(tmp_path: Path) -> None:
    certs = ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    cert_before = certs.server_cert.read_bytes()
    certs.server_key.write_bytes(tls._key_pem(ec.generate_private_key(ec.SECP256R1())))
    ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    assert certs.server_cert.read_bytes() != cert_before
    assert _key(certs.server_key).public_key() == _cert(certs.server_cert).public_key()


def test_server_cert_from_another_ca_is_reissued(tmp_path: Path) -> None:
    certs = ensure_node_certificates(tmp_path / "a", hostnames=[], ips=[])
    other = ensure_node_certificates(tmp_path / "b", hostnames=[], ips=[])
    certs.server_cert.write_bytes(other.server_cert.read_bytes())
    certs.server_key.write_bytes(other.server_key.read_bytes())
    ensure_node_certificates(tmp_path / "a", hostnames=[], ips=[])
    _cert(certs.server_cert).verify_directly_issued_by(_cert(certs.ca_cert))


def test_ca_cert_without_key_is_an_error(tmp_path: Path) -> None:
    certs = ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    assert certs.ca_cert is not None and certs.ca_key is not None
    ca_before = certs.ca_cert.read_bytes()
    certs.ca_key.unlink()
    with pytest.raises(FelixError, match=r"ca-key\.pem"):
        ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    assert certs.ca_cert.read_bytes() == ca_before  # never replaced silently


def test_ca_key_without_cert_is_an_interrupted_first_start(tmp_path: Path) -> None:
    certs = ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    assert certs.ca_cert is not None
    old_ca_key = _files(certs)["ca_key"]
    certs.ca_cert.unlink()
    again = ensure_node_certificates(tmp_path, hostnames=[], ips=[])
    assert _files(again)["ca_key"] != old_ca_key
    _cert(again.server_cert).verify_directly_issued_by(_cert(again.ca_cert))


def test_explicit_certificates_bypass_generation(tmp_path: Path) -> None:
    real = ensure_node_certificates(tmp_path / "real", hostnames=[], ips=[])
    data_dir = tmp_path / "node"
    certs = node_certificates(data_dir, cert=real.server_cert, key=real.server_key)
    assert certs == NodeCerts(server_cert=real.server_cert, server_key=real.server_key)
    assert not data_dir.exists()

    with_ca = node_certificates(
        data_dir, cert=real.server_cert, key=real.server_key, ca_cert=real.ca_cert
    )
    assert with_ca.ca_cert == real.ca_cert and with_ca.ca_key is None

    with pytest.raises(ValueError):
        node_certificates(data_dir, cert=real.server_cert)
    with pytest.raises(FileNotFoundError):
        node_certificates(data_dir, cert=tmp_path / "missing.pem", key=real.server_key)

    generated = node_certificates(data_dir, hostnames=["x.example"])
    assert generated.ca_cert == data_dir / "ca-cert.pem"
    assert "x.example" in _sans(_cert(generated.server_cert))[0]


# -- client certificates (mTLS) ----------------------------------------------------------


def test_issue_client_certificate_from_the_node_ca(tmp_path: Path) -> None:
    node = ensure_node_certificates(tmp_path / "node", hostnames=[], ips=[])
    assert node.ca_cert is not None and node.ca_key is not None
    out = tmp_path / "clients" / "new"  # created
    cert = tls.issue_client_certificate(
        node.ca_cert, node.ca_key, "alice", out / "c.pem", out / "k.pem"
    )
    assert cert == _cert(out / "c.pem")
    assert _key(out / "k.pem").public_key() == cert.public_key()
    assert stat.S_IMODE((out / "k.pem").stat().st_mode) == 0o600
    cert.verify_directly_issued_by(_cert(node.ca_cert))
    assert cert.subject.rfc4514_string() == "CN=alice"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    now = dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=360) < cert.not_valid_after_utc - now < dt.timedelta(days=370)

    with pytest.raises(ValueError):
        tls.issue_client_certificate(node.ca_cert, node.ca_key, "", out / "x.pem", out / "y.pem")
    # The server key is no CA key.
    with pytest.raises(FelixError):
        tls.issue_client_certificate(
            node.server_cert, node.server_key, "bob", out / "x.pem", out / "y.pem"
        )


def test_client_certificate_verifier(tmp_path: Path) -> None:
    node = ensure_node_certificates(tmp_path / "node", hostnames=[], ips=[])
    other = ensure_node_certificates(tmp_path / "other", hostnames=[], ips=[])
    assert node.ca_cert and node.ca_key and other.ca_cert and other.ca_key
    verifier = tls.ClientCertificateVerifier(node.ca_cert)

    good = tls.issue_client_certificate(
        node.ca_cert, node.ca_key, "a", tmp_path / "a.pem", tmp_path / "a.key"
    )
    verifier.verify(good)

    stranger = tls.issue_client_certificate(
        other.ca_cert, other.ca_key, "b", tmp_path / "b.pem", tmp_path / "b.key"
    )
    with pytest.raises(tls.ClientCertificateError) as caught:
        verifier.verify(stranger)
    assert not caught.value.expired

    expired = tls.issue_client_certificate(
        node.ca_cert,
        node.ca_key,
        "c",
        tmp_path / "c.pem",
        tmp_path / "c.key",
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
        validity=dt.timedelta(days=1),
    )
    with pytest.raises(tls.ClientCertificateError) as caught:
        verifier.verify(expired)
    assert caught.value.expired
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(tls.ClientCertificateError):
        verifier.verify(good, now=later)

    # A server certificate (serverAuth only) is no client certificate.
    with pytest.raises(tls.ClientCertificateError, match="EKU"):
        verifier.verify(_cert(node.server_cert))

    # A file with both CAs trusts both.
    both = tmp_path / "both.pem"
    both.write_bytes(node.ca_cert.read_bytes() + other.ca_cert.read_bytes())
    tls.ClientCertificateVerifier(both).verify(stranger)
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(ValueError):
        tls.ClientCertificateVerifier(empty)
