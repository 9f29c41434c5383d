"""Which certificates a client trusts.

* ``ca`` given: only that PEM file (one or more CA certificates). This is how a
  client pins a node's own CA (``DATA_DIR/ca-cert.pem``).
* ``ca`` None and ``FELIX_CA_FILE`` set: the system trust store plus that file
  (operations.md). The engines take one CA file, so the system store's
  certificates are passed beside it as PEM data (both engines add ``cadata``
  and ``cafile`` together).
* neither: the system trust store (qh3: the ``ssl`` module's default
  certificates; aioquic: the certifi bundle).

Certificate verification cannot be turned off (felix.quic refuses to).
"""

from __future__ import annotations

import os
import ssl
from functools import cache
from pathlib import Path

from felix.errors import ConfigError
from felix.quic import QuicConfiguration, QuicEngine

__all__ = ["CA_ENV", "client_configuration"]

#: Environment variable naming a CA file trusted in addition to the system store.
CA_ENV = "FELIX_CA_FILE"


@cache
def _system_ca_pem() -> bytes | None:
    context = ssl.create_default_context()
    context.load_default_certs()
    ders = context.get_ca_certs(binary_form=True)
    if not ders:
        return None
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in ders).encode("ascii")


def client_configuration(
    engine: QuicEngine, ca: str | os.PathLike[str] | None, server_name: str
) -> QuicConfiguration:
    """The QUIC client configuration for ``server_name`` (see the module doc for ``ca``).

    Raises ConfigError if the CA file does not exist.
    """
    extra_system_store = False
    if ca is None:
        env = os.environ.get(CA_ENV, "").strip()
        if env:
            ca, extra_system_store = env, True
    if ca is not None and not Path(ca).is_file():
        where = f" (from {CA_ENV})" if extra_system_store else ""
        raise ConfigError(f"CA file not found: {ca}{where}")
    config = engine.client_configuration(ca_file=ca, server_name=server_name)
    if extra_system_store:
        config.cadata = _system_ca_pem()
    return config
