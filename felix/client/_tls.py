"""Which certificates a client trusts.

* ``ca`` given: only that PEM file (one or more CA certificates). This is how a
  client pins a node's own CA (``DATA_DIR/ca-cert.pem``).
* ``ca`` None and ``FELIX_CA_FILE`` set: the system trust store plus that file
  (docs/operations.md, "Where clients connect"). The engines take one CA file, so the system store's
  certificates are passed beside it as PEM data (both engines add ``cadata``
  and ``cafile`` together).
* neither: the system trust store (qh3: the ``ssl`` module's default
  certificates; aioquic: the certifi bundle).

Certificate verification cannot be turned off (felix.quic refuses to).

A client certificate (mTLS, for a node run with ``--tls-client-ca``) is a pair of
PEM files, certificate chain and private key: ``client_cert`` given, else
``FELIX_CLIENT_CERT`` and ``FELIX_CLIENT_KEY`` when both are set. It is presented
only when the server asks for one.
"""

from __future__ import annotations

import os
import ssl
from functools import cache
from pathlib import Path

from felix.errors import ConfigError
from felix.quic import QuicConfiguration, QuicEngine

__all__ = ["CA_ENV", "CLIENT_CERT_ENV", "CLIENT_KEY_ENV", "client_configuration"]

#: Environment variable naming a CA file trusted in addition to the system store.
CA_ENV = "FELIX_CA_FILE"
#: Environment variables naming the client certificate chain and its key (mTLS).
CLIENT_CERT_ENV = "FELIX_CLIENT_CERT"
CLIENT_KEY_ENV = "FELIX_CLIENT_KEY"

#: (certificate chain, private key): PEM file paths.
ClientCert = tuple[str | os.PathLike[str], str | os.PathLike[str]]


@cache
def _system_ca_pem() -> bytes | None:
    context = ssl.create_default_context()
    context.load_default_certs()
    ders = context.get_ca_certs(binary_form=True)
    if not ders:
        return None
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in ders).encode("ascii")


def client_configuration(
    engine: QuicEngine,
    ca: str | os.PathLike[str] | None,
    server_name: str,
    *,
    client_cert: ClientCert | None = None,
) -> QuicConfiguration:
    """The QUIC client configuration for ``server_name`` (see the module doc for ``ca``
    and ``client_cert``).

    Raises ConfigError if the CA file or a client certificate file does not exist,
    or only one of ``FELIX_CLIENT_CERT``/``FELIX_CLIENT_KEY`` is set.
    """
    extra_system_store = False
    if ca is None:
        env = os.environ.get(CA_ENV, "").strip()
        if env:
            ca, extra_system_store = env, True
    if ca is not None and not Path(ca).is_file():
        where = f" (from {CA_ENV})" if extra_system_store else ""
        raise ConfigError(f"CA file not found: {ca}{where}")
    client_cert = _client_cert(client_cert)
    config = engine.client_configuration(
        ca_file=ca, server_name=server_name, client_cert=client_cert
    )
    if extra_system_store:
        config.cadata = _system_ca_pem()
    return config


def _client_cert(given: ClientCert | None) -> ClientCert | None:
    """``given``, else the pair from the environment, checked to exist."""
    where = ""
    if given is None:
        cert = os.environ.get(CLIENT_CERT_ENV, "").strip()
        key = os.environ.get(CLIENT_KEY_ENV, "").strip()
        if bool(cert) != bool(key):
            raise ConfigError(f"{CLIENT_CERT_ENV} and {CLIENT_KEY_ENV} must be set together")
        if not cert:
            return None
        given, where = (cert, key), f" (from {CLIENT_CERT_ENV}/{CLIENT_KEY_ENV})"
    for path in given:
        if not Path(path).is_file():
            raise ConfigError(f"client certificate file not found: {path}{where}")
    return given
