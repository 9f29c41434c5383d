"""felix's one error tree.

Everything felix raises on purpose is a :class:`FelixError`. Protocol errors are
split the h11 way: :class:`LocalProtocolError` means *this* side misused the API
(a caller mistake, such as a request id without an ack mode), while
:class:`RemoteProtocolError` means the peer sent bytes that break the wire
format. Errors that a broker reports to a client carry a stable wire ``code``
(see docs/wire-protocol.md, "Error codes") and map to exactly one class each.
"""

from __future__ import annotations


class FelixError(Exception):
    """Root of every error felix raises on purpose."""

    #: Stable wire code for errors a broker sends (0: not a server error).
    code: int = 0
    #: True when the same call may succeed if retried (after a backoff).
    retryable: bool = False


class ProtocolError(FelixError):
    """The FLX1 wire format was broken, by this side or by the peer."""


class LocalProtocolError(ProtocolError):
    """The caller asked the codec for something the wire format cannot say."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a malformed, truncated, oversized or unknown frame."""


class ConfigError(FelixError, ValueError):
    """A setting, flag or file felix was given cannot be used."""


class HandshakeFailed(FelixError, ConnectionError):
    """The QUIC/TLS handshake with the peer failed (certificate, ALPN, timeout)."""


class RingError(FelixError):
    """A shared-memory ring could not be created, attached or used."""


class ServerError(FelixError):
    """An error reported by the broker in reply to one request."""

    code = 1


class BadRequest(ServerError):
    """The broker understood the frame but refused the request as invalid."""

    code = 1


class NotFound(ServerError):
    """The named tenant, namespace, stream or cache does not exist."""

    code = 2


class PermissionDenied(ServerError):
    """The session's token does not grant this operation."""

    code = 3


class Unauthenticated(ServerError):
    """No valid token: missing, expired or rejected."""

    code = 4


class Overloaded(ServerError):
    """A bound was hit (ring full, budget spent); retry after a backoff."""

    code = 5
    retryable = True


class Unavailable(ServerError):
    """The owner of the request is down or restarting; retry after a backoff."""

    code = 6
    retryable = True


class TooLarge(ServerError):
    """A key, value, payload or frame exceeds its configured limit."""

    code = 7


class CursorError(ServerError):
    """A subscription's start offset cannot be served.

    ``reason`` is ``"too_old"`` (``available`` is the oldest retained offset) or
    ``"in_future"`` (``available`` is the current tail).
    """

    code = 8

    def __init__(self, reason: str, requested: int, available: int) -> None:
        super().__init__(f"cursor {reason}: requested {requested}, available {available}")
        self.reason = reason
        self.requested = requested
        self.available = available


class FelixTimeoutError(FelixError, TimeoutError):
    """A call did not complete within its timeout."""


class ConnectionLost(FelixError):
    """The connection closed while the call was in flight."""

    retryable = True


class ClientClosed(ConnectionLost):
    """The call was made on a client that is closed or draining (not retryable)."""

    retryable = False


_BY_CODE: dict[int, type[ServerError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        Overloaded,
        Unavailable,
        TooLarge,
    )
}


def error_for_code(code: int, message: str) -> ServerError:
    """The exception a client raises for a wire error ``code`` (unknown codes: ServerError)."""
    cls = _BY_CODE.get(code, ServerError)
    err = cls(message)
    if cls is ServerError:
        err.code = code
    return err
