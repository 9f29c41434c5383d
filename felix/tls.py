"""TLS material for a felix node: a local CA and the server certificate it signs.

QUIC always runs TLS 1.3, so every gateway needs a certificate. For a node that
was not given one (``--tls-cert``/``--tls-key``), :func:`ensure_node_certificates`
keeps a small private PKI in the node's data directory:

* a CA: ECDSA P-256, self-signed, ``BasicConstraints(ca=True)``, key usage
  cert_sign + crl_sign, valid ~10 years. Clients trust this file (``ca_cert``).
* a server certificate: ECDSA P-256, signed by that CA, ``BasicConstraints(ca=False)``,
  extended key usage serverAuth, subject alternative names for every DNS name and
  IP address the node is reached by, valid ~1 year.

Why this layout: qh3 2.x refuses Ed25519 server certificates and self-signed
leaves that are marked as a CA; aioquic accepts both. A P-256 CA plus a separate
non-CA leaf works for both engines and is what real deployments look like.

Client certificates (mTLS, ``felix up --tls-client-ca``): :func:`issue_client_certificate`
signs one from the same CA (extended key usage clientAuth), and
:class:`ClientCertificateVerifier` checks what a client presents against a CA file.

Files (PEM): ``ca-cert.pem``, ``ca-key.pem``, ``server-cert.pem``,
``server-key.pem``. Keys are written with mode 0600, every file atomically
(temporary file in the same directory, fsync, rename), so a crash never leaves a
half-written key behind. Call this from one process (the supervisor) before the
gateways start: concurrent first starts would each create a different CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from felix.errors import FelixError

__all__ = [
    "CA_VALIDITY",
    "CLIENT_VALIDITY",
    "DEFAULT_HOSTNAMES",
    "DEFAULT_IPS",
    "RENEW_BEFORE",
    "SERVER_VALIDITY",
    "ClientCertificateError",
    "ClientCertificateVerifier",
    "NodeCerts",
    "ensure_node_certificates",
    "issue_client_certificate",
    "node_certificates",
]

log = logging.getLogger(__name__)

#: Always in the server certificate, so local clients and tests just work.
DEFAULT_HOSTNAMES: tuple[str, ...] = ("localhost",)
DEFAULT_IPS: tuple[str, ...] = ("127.0.0.1", "::1")

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=365)
CLIENT_VALIDITY = dt.timedelta(days=365)
#: A server certificate expiring sooner than this is reissued at start.
RENEW_BEFORE = dt.timedelta(days=30)
#: Certificates start this far in the past, so peers with a slightly slow
#: clock do not reject a certificate issued a second ago.
_BACKDATE = dt.timedelta(minutes=5)

_CA_CERT = "ca-cert.pem"
_CA_KEY = "ca-key.pem"
_SERVER_CERT = "server-cert.pem"
_SERVER_KEY = "server-key.pem"


#: Key usage of every leaf certificate (server and client): ECDSA keys only sign,
#: here the TLS 1.3 CertificateVerify.
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True, slots=True)
class NodeCerts:
    """Paths of a node's TLS material (PEM files).

    ``server_cert``/``server_key`` are what a gateway loads. ``ca_cert`` is what
    clients verify the server against; it is None for operator-provided
    certificates that chain to the system's trust store. ``ca_key`` is only set
    for the generated CA (it signs reissued server certificates).
    """

    server_cert: Path
    server_key: Path
    ca_cert: Path | None = None
    ca_key: Path | None = None

    @classmethod
    def from_files(
        cls,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        *,
        ca_cert: str | os.PathLike[str] | None = None,
    ) -> NodeCerts:
        """Certificates given explicitly (``--tls-cert/--tls-key``): nothing is generated.

        Raises FileNotFoundError if ``cert``, ``key`` or ``ca_cert`` (when given)
        does not exist, so a typo fails at start rather than at the first handshake.
        """
        paths = [Path(cert), Path(key)] + ([Path(ca_cert)] if ca_cert is not None else [])
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"TLS file not found: {path}")
        return cls(
            server_cert=Path(cert),
            server_key=Path(key),
            ca_cert=Path(ca_cert) if ca_cert is not None else None,
        )


def node_certificates(
    data_dir: Path,
    *,
    hostnames: Iterable[str] = (),
    ips: Iterable[str] = (),
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca_cert: str | os.PathLike[str] | None = None,
) -> NodeCerts:
    """The node's certificates: the explicit ``cert``/``key`` if given, else generated ones.

    ``cert`` and ``key`` go together: giving only one raises ValueError. With
    neither, this is :func:`ensure_node_certificates` on ``data_dir``.
    """
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key must be given together")
    if cert is not None and key is not None:
        return NodeCerts.from_files(cert, key, ca_cert=ca_cert)
    return ensure_node_certificates(data_dir, hostnames=list(hostnames), ips=list(ips))


def ensure_node_certificates(data_dir: Path, *, hostnames: list[str], ips: list[str]) -> NodeCerts:
    """Create (first start) or reuse (later starts) the node's CA and server certificate.

    Contract:

    * No CA certificate in ``data_dir``: a new CA and server certificate are
      generated (``data_dir`` is created with mode 0700 if needed).
    * CA files present: the CA is reused as is. The server certificate is reused
      byte for byte if it was issued by this CA, matches its key, names every
      requested DNS name and IP address (plus ``localhost``, ``127.0.0.1``,
      ``::1``) and does not expire within 30 days; otherwise a new server key and
      certificate are issued from the existing CA, so clients that trust the CA
      keep working.
    * The SANs of a reissued certificate are exactly the requested ones plus the
      defaults; names dropped from the request are dropped from the certificate.
      A name in ``hostnames`` that is an IP literal is treated as an IP address.

    Raises ValueError for an entry of ``ips`` that is not an IP address, and
    FelixError when the CA certificate exists but its key is missing, does not
    match or is not P-256, or the certificate is not a CA: replacing a CA
    silently would break every client that trusts it, so an operator decides
    (delete ``ca-cert.pem`` to start a new CA). Unparseable PEM in the CA files
    raises the cryptography library's ValueError.
    """
    data_dir = Path(data_dir)
    dns_names, ip_addrs = _requested_names(hostnames, ips)
    ca_cert_path, ca_key_path = data_dir / _CA_CERT, data_dir / _CA_KEY
    certs = NodeCerts(
        server_cert=data_dir / _SERVER_CERT,
        server_key=data_dir / _SERVER_KEY,
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
    )
    now = dt.datetime.now(dt.UTC)

    # The CA key is written before the CA certificate, so a key without its
    # certificate is an interrupted first start: no client can trust a CA
    # certificate that was never written, and starting over is safe.
    if not ca_cert_path.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue_ca(ca_key, now)
        _write_atomic(ca_key_path, _key_pem(ca_key), mode=0o600)
        _write_atomic(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        log.info("generated a new TLS CA in %s", data_dir)
    else:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)

    if not _server_cert_usable(certs, ca_cert, dns_names, ip_addrs, now):
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = _issue_server(ca_cert, ca_key, server_key, dns_names, ip_addrs, now)
        # Key before certificate: a crash in between leaves a cert/key mismatch,
        # which the next start detects and repairs by reissuing.
        _write_atomic(certs.server_key, _key_pem(server_key), mode=0o600)
        _write_atomic(
            certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644
        )
        log.info(
            "issued a TLS server certificate for %s",
            ", ".join([*dns_names, *map(str, ip_addrs)]),
        )
    return certs


# -- client certificates (mTLS) ---------------------------------------------------------


class ClientCertificateError(FelixError):
    """A client certificate that must be refused; ``expired`` tells why (for the alert)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def issue_client_certificate(
    ca_cert: str | os.PathLike[str],
    ca_key: str | os.PathLike[str],
    name: str,
    cert_out: str | os.PathLike[str],
    key_out: str | os.PathLike[str],
    *,
    validity: dt.timedelta = CLIENT_VALIDITY,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign a client certificate for ``name`` with the CA ``ca_cert``/``ca_key`` (P-256).

    The new ECDSA P-256 key goes to ``key_out`` (PKCS#8, mode 0600) and the
    certificate to ``cert_out`` (mode 0644), both written atomically; parent
    directories are created. The certificate: subject CN ``name``, not a CA,
    key usage digitalSignature, extended key usage clientAuth, valid from
    ``not_before`` (default: 5 minutes ago) for ``validity`` and never past the
    CA's own expiry. With the node's CA that is ``DATA_DIR/tls/ca-cert.pem`` and
    ``ca-key.pem``. Raises FelixError for an unusable CA (as
    :func:`ensure_node_certificates`) and ValueError for an empty ``name``.
    """
    if not name:
        raise ValueError("a client certificate needs a name")
    ca, signer = _load_ca(Path(ca_cert), Path(ca_key))
    start = not_before if not_before is not None else dt.datetime.now(dt.UTC) - _BACKDATE
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + validity, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _LEAF_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public(ca)), critical=False
        )
        .sign(signer, hashes.SHA256())
    )
    cert_path, key_path = Path(cert_out), Path(key_out)
    for parent in {cert_path.parent, key_path.parent}:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomic(key_path, _key_pem(key), mode=0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    log.info("issued a TLS client certificate for %s (%s)", name, cert_path)
    return cert


class ClientCertificateVerifier:
    """Checks client certificates against the CA certificates in ``ca_file`` (PEM).

    A certificate passes if it is within its validity period and chains to one
    of those CAs (intermediates the client sent may sit in between), with the
    key usages a TLS client certificate needs (RFC 5280 path validation by the
    cryptography library; an extended key usage, when present, must allow
    clientAuth). Raises OSError if ``ca_file`` cannot be read and ValueError if
    it holds no PEM certificate.
    """

    def __init__(self, ca_file: str | os.PathLike[str]) -> None:
        from cryptography.x509.verification import Store

        self.ca_file = Path(ca_file)
        cas = x509.load_pem_x509_certificates(self.ca_file.read_bytes())
        self._store = Store(cas)

    def verify(
        self,
        leaf: x509.Certificate,
        intermediates: Iterable[x509.Certificate] = (),
        *,
        now: dt.datetime | None = None,
    ) -> None:
        """Return if ``leaf`` is acceptable, else raise ClientCertificateError."""
        from cryptography.x509.verification import (
            Criticality,
            ExtensionPolicy,
            PolicyBuilder,
            VerificationError,
        )

        now = now if now is not None else dt.datetime.now(dt.UTC)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise ClientCertificateError(
                "the client certificate is expired or not yet valid", expired=True
            )
        # Web PKI defaults, except that a client certificate need not carry subject
        # alternative names (felix identifies clients by token, not by name).
        leaf_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy
            )
            .build_client_verifier()
        )
        try:
            verifier.verify(leaf, list(intermediates))
        except VerificationError as exc:
            raise ClientCertificateError(f"the client certificate is not trusted: {exc}") from None


# -- names -------------------------------------------------------------------------------


_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _requested_names(
    hostnames: Iterable[str], ips: Iterable[str]
) -> tuple[list[str], list[_IPAddress]]:
    """Deduplicated DNS names and IP addresses, defaults first, in a stable order."""
    dns_names: list[str] = []
    ip_addrs: list[_IPAddress] = []
    for ip in (*DEFAULT_IPS, *ips):
        addr = ipaddress.ip_address(ip)  # ValueError for a non-IP: the documented contract
        if addr not in ip_addrs:
            ip_addrs.append(addr)
    for name in (*DEFAULT_HOSTNAMES, *hostnames):
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            name = name.lower().rstrip(".")
            if name and name not in dns_names:
                dns_names.append(name)
        else:
            if addr not in ip_addrs:
                ip_addrs.append(addr)
    return dns_names, ip_addrs


# -- issuing -----------------------------------------------------------------------------


def _issue_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "felix node CA")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _issue_server(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    dns_names: list[str],
    ip_addrs: list[_IPAddress],
    now: dt.datetime,
) -> x509.Certificate:
    public = key.public_key()
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    san += [x509.IPAddress(a) for a in ip_addrs]
    # A leaf must not outlive its CA: verifiers reject the chain after the CA expires.
    not_after = min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _LEAF_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public(ca_cert)),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


# -- checking what is on disk ------------------------------------------------------------


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not key_path.exists():
        raise FelixError(
            f"{key_path} is missing but {cert_path} exists; restore the key, or delete "
            f"{cert_path.name} to create a new CA (clients must then trust the new one)"
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)):
        raise FelixError(f"{key_path} is not an ECDSA P-256 private key")
    if key.public_key() != _ec_public(cert):
        raise FelixError(f"{key_path} does not match {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise FelixError(f"{cert_path} is not a CA certificate")
    return cert, key


def _server_cert_usable(
    certs: NodeCerts,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    ip_addrs: list[_IPAddress],
    now: dt.datetime,
) -> bool:
    """True if the server cert/key on disk can be kept (see ensure_node_certificates)."""
    try:
        cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
        key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    except (OSError, ValueError):
        return False  # missing or unreadable: reissue
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return False
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return have_dns.issuperset(dns_names) and have_ips.issuperset(ip_addrs)


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise FelixError("the CA certificate does not hold an EC public key")
    return public


# -- files -------------------------------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 ("BEGIN PRIVATE KEY"): the form both engines' load_cert_chain expect.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix.

    The temporary file is created 0600 by mkstemp, so a key is never readable
    by others, not even for an instant; ``mode`` is applied before the rename.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
