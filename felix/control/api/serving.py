"""Serving the control-plane app with uvicorn, within :class:`HttpLimits`.

uvicorn bounds the request head (``h11_max_incomplete_event_size``) and idle
keep-alive connections, but never closes a connection that is slow to send its
request head (or sends none: half-open sockets), and ``limit_concurrency`` answers
503 to every new request while idle sockets hold the count, locking valid clients
out. :class:`ConnectionGuard` closes both gaps without touching uvicorn's HTTP
parsing: it wraps uvicorn's h11 protocol (for the connection's life) and the ASGI
app (to know when a request is being served on a connection)::

    limits = HttpLimits(max_connections=256)
    app = create_app(store, limits=limits, ...)
    server = uvicorn.Server(server_config(app, host, port, limits=limits, **tls))

- a connection with no request being served is closed ``header_timeout`` seconds
  after it opened or after its last answer (a request whose head is complete is
  being served, however slow its body: that has ``body_timeout``);
- at ``max_connections`` open, the oldest connection with no request being served is
  closed to admit the new one; if all are busy the new one is closed at once.

Each bound is counted on the guard (:attr:`ConnectionGuard.counts`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from felix.control.limits import HttpLimits

__all__ = ["ConnectionGuard", "HttpLimits", "server_config"]

log = logging.getLogger("felix.control.api")

_Peer = tuple[str, int]


class _Connection(asyncio.Protocol):
    """One connection: uvicorn's protocol inside, a deadline for serving a request."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.peer: _Peer | None = None
        self.busy = 0  # requests of this connection the app is serving
        self.refused = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, list | tuple) and len(peer) >= 2:
            self.peer = (str(peer[0]), int(peer[1]))
        if not self.guard.admit(self):
            self.refused = True
            self.transport.abort()
            return
        self.inner.connection_made(self.transport)
        self.arm()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.refused:
            return
        self.guard.forget(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def arm(self) -> None:
        """(Re)start the deadline for the next request head."""
        self.disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.guard.limits.header_timeout, self._expire)

    def disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close(self, why: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.guard.counts[why] += 1
            self.transport.close()

    def _expire(self) -> None:
        self._deadline = None
        if self.busy == 0:
            self.close("timed_out")


class ConnectionGuard:
    """The connection limits of one HTTP server (see the module's docs).

    ``app`` is the ASGI app to serve; pass the guard itself as uvicorn's app and
    :meth:`protocol` as its ``http`` (as :func:`server_config` does).
    """

    def __init__(self, app: ASGIApp, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits
        #: Open connections, oldest first.
        self._open: OrderedDict[int, _Connection] = OrderedDict()
        self._by_peer: dict[_Peer, _Connection] = {}
        #: How often each bound was hit: connections closed for taking longer than
        #: header_timeout ("timed_out"), closed to admit a new one ("evicted"), and new
        #: ones closed because every open one was busy ("refused").
        self.counts = {"timed_out": 0, "evicted": 0, "refused": 0}

    def __len__(self) -> int:
        """How many connections are open."""
        return len(self._open)

    def protocol(self, **uvicorn_args: Any) -> asyncio.Protocol:
        """uvicorn's ``http`` protocol factory: its h11 protocol, guarded."""
        return _Connection(self, H11Protocol(**uvicorn_args))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        conn = self._by_peer.get(tuple(client)) if client else None
        if conn is None:
            await self.app(scope, receive, send)
            return
        conn.busy += 1
        conn.disarm()
        try:
            await self.app(scope, receive, send)
        finally:
            conn.busy -= 1
            if conn.busy == 0:
                conn.arm()

    def admit(self, conn: _Connection) -> bool:
        """Count ``conn`` in, making room if need be; False: refuse it."""
        if len(self._open) >= self.limits.max_connections:
            idle = next((c for c in self._open.values() if c.busy == 0), None)
            if idle is None:
                self.counts["refused"] += 1
                log.warning("control plane: %d connections, all busy: refusing one", len(self))
                return False
            self.forget(idle)
            idle.close("evicted")
        self._open[id(conn)] = conn
        if conn.peer is not None:
            self._by_peer[conn.peer] = conn
        return True

    def forget(self, conn: _Connection) -> None:
        self._open.pop(id(conn), None)
        if conn.peer is not None and self._by_peer.get(conn.peer) is conn:
            del self._by_peer[conn.peer]


def server_config(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    limits: HttpLimits | None = None,
    **options: Any,
) -> uvicorn.Config:
    """A uvicorn config serving ``app`` on ``host:port`` within ``limits``.

    ``options`` go to :class:`uvicorn.Config` as they are (TLS files, ``log_level``,
    ``timeout_graceful_shutdown``, ``lifespan``...). The guard is ``config.app``.
    Forwarded-for headers are not trusted: the audit log and the connection guard
    see the real peer.
    """
    limits = limits or HttpLimits()
    guard = ConnectionGuard(app, limits)
    return uvicorn.Config(
        guard,
        host=host,
        port=port,
        http=guard.protocol,  # type: ignore[arg-type]
        ws="none",
        proxy_headers=False,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=limits.keep_alive_timeout,
        **options,
    )
