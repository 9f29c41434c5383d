"""The one patch felix applies to a QUIC engine: aioquic as a server requiring client certificates.

aioquic 1.x has everything for a server to ask for a client certificate but
keeps it behind a private switch (``tls.Context._request_client_certificate``,
"for test purposes"), accepts an empty Certificate message, and checks only the
CertificateVerify signature, never the chain. :class:`ClientAuthConnection` is
the aioquic server connection felix creates when a configuration has
``verify_mode`` CERT_REQUIRED (``server_configuration(client_ca=...)``): its TLS
context gets the switch on and a subclass that refuses a missing certificate
and checks the chain with :class:`felix.tls.ClientCertificateVerifier`.

Everything private this relies on is named here and nowhere else; pyproject
pins aioquic <2 and tests/test_mtls.py runs real handshakes against it (the pin
test fails first if an aioquic release moves these names). qh3 2.x cannot ask
for a client certificate at all (its TLS is native), so only aioquic serves mTLS.
"""

from __future__ import annotations

from typing import Any, cast

from aioquic import tls as aioquic_tls
from aioquic.quic.connection import QuicConnection as AioquicConnection

from felix.tls import ClientCertificateError, ClientCertificateVerifier

__all__ = [
    "PRIVATE_CONTEXT_FIELDS",
    "PRIVATE_METHODS",
    "ClientAuthConnection",
    "client_auth_connection",
]

#: The aioquic internals the patch uses: (class, method) pairs, and the TLS context's
#: instance fields it reads or sets. tests/test_mtls.py checks they all exist.
PRIVATE_METHODS = (
    (aioquic_tls.Context, "_server_handle_certificate"),
    (aioquic_tls.Context, "_server_handle_certificate_verify"),
    (AioquicConnection, "_initialize"),
)
PRIVATE_CONTEXT_FIELDS = (
    "_peer_certificate",
    "_peer_certificate_chain",
    "_request_client_certificate",
)


class _CertificateRequired(aioquic_tls.Alert):
    description = aioquic_tls.AlertDescription.certificate_required


class _ClientAuthContext(aioquic_tls.Context):
    felix_verifier: ClientCertificateVerifier

    def _server_handle_certificate(self, input_buf: Any) -> None:
        super()._server_handle_certificate(input_buf)
        if self._peer_certificate is None:  # an empty Certificate message
            raise _CertificateRequired("a client certificate is required")

    def _server_handle_certificate_verify(self, input_buf: Any) -> None:
        super()._server_handle_certificate_verify(input_buf)  # the client holds the key
        if self._peer_certificate is None:  # pragma: no cover - checked above
            raise _CertificateRequired("a client certificate is required")
        try:
            self.felix_verifier.verify(self._peer_certificate, self._peer_certificate_chain)
        except ClientCertificateError as exc:
            alert = (
                aioquic_tls.AlertCertificateExpired
                if exc.expired
                else aioquic_tls.AlertBadCertificate
            )
            raise alert(str(exc)) from None


class ClientAuthConnection(AioquicConnection):
    """An aioquic server connection whose handshake requires a verified client certificate."""

    def __init__(self, *, verifier: ClientCertificateVerifier, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._felix_verifier = verifier

    def _initialize(self, peer_cid: bytes) -> None:
        # aioquic makes its TLS context here, on the first packet; there is no
        # other place to choose its class, so it is switched right after.
        super()._initialize(peer_cid)
        self.tls.__class__ = _ClientAuthContext
        context = cast(_ClientAuthContext, self.tls)
        context._request_client_certificate = True
        context.felix_verifier = self._felix_verifier


def client_auth_connection(configuration: Any) -> Any:
    """Makes ClientAuthConnection objects checking chains against ``configuration.cafile``."""
    verifier = ClientCertificateVerifier(configuration.cafile)

    def create(**kwargs: Any) -> ClientAuthConnection:
        return ClientAuthConnection(verifier=verifier, configuration=configuration, **kwargs)

    return create
