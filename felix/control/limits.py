"""The control plane's HTTP limits: one object for the app and the server that serves it."""

from __future__ import annotations

from dataclasses import dataclass

from felix.errors import ConfigError

__all__ = ["HttpLimits"]


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the control plane's HTTP server, and what happens at each bound.

    Attributes:
        max_body_bytes: largest request body; a larger one (declared or streamed) is
            answered 413 ``too-large`` after at most this plus one chunk was read.
        body_timeout: seconds a request's body may take to arrive (400 after it).
        max_header_bytes: largest request head (request line and headers); a larger
            one is answered 400 and the connection closed.
        header_timeout: seconds a connection may stay open with no request being
            served: from its opening, or from its last answer, until a complete
            request head arrived. Then it is closed without an answer (slowloris,
            half-open and idle connections).
        keep_alive_timeout: seconds an idle keep-alive connection is kept after an
            answer (whole seconds, as uvicorn takes them).
        max_connections: open connections at most. At the bound the oldest connection
            with no request being served is closed to admit the new one (so idle
            sockets cannot lock out a client with a request to make); if every one is
            busy, the new connection is closed at once.
    """

    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    keep_alive_timeout: int = 5
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes", "max_connections", "keep_alive_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("body_timeout", "header_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
