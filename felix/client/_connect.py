"""``felix.connect``: the client's entry point, awaitable and an async context manager."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any

from felix.client._client import Client, TokenProvider
from felix.client._convert import parse_url
from felix.client._events import EventListener
from felix.errors import ConfigError
from felix.quic import QuicEngine

__all__ = ["Connect", "connect"]


class Connect:
    """What :func:`connect` returns: await it, or use it with ``async with``."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._started = False

    async def _connect(self) -> Client:
        if self._started:
            raise ConfigError("this connect() result was already awaited; call connect() again")
        self._started = True
        await self._client._start()
        return self._client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()


def connect(
    url: str,
    *,
    tenant: str = "default",
    namespace: str = "default",
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    ca: str | os.PathLike[str] | None = None,
    client_cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    pool_size: int = 1,
    control_streams: int = 2,
    max_in_flight: int = 256,
    connect_timeout: float = 10.0,
    request_timeout: float = 10.0,
    keepalive: float = 10.0,
    reconnect_backoff: tuple[float, float] = (0.1, 10.0),
    engine: QuicEngine | str | None = None,
    on_event: EventListener | None = None,
    random_source: Callable[[], float] = random.random,
) -> Connect:
    """Connect to the felix node at ``url``: ``client = await felix.connect(url)`` or
    ``async with felix.connect(url) as client:`` (closes it on exit).

    Arguments:
        url: ``felix://host[:port]`` (port 5000 by default).
        tenant: the tenant every request names; namespace: where relative
            stream and cache names live (``"ns/name"`` reaches another one).
        token / token_provider: the credential sent in ``auth``; neither: an
            empty token (loopback dev mode). A provider (a function, async or
            sync, returning the token) is asked again for every new connection,
            and, when its token is a JWT with ``exp``, before that expires
            (at 80% of its lifetime, or 30 s before, with jitter): the fresh
            token is presented on the live connection (REAUTH), which keeps
            its subscriptions. If no fresh token can be had (bounded retries),
            the broker closes the connection at expiry: its subscriptions and
            calls fail with Unauthenticated, and new calls use a new connection.
            A static ``token`` that expires ends the client's subscriptions
            and calls with Unauthenticated.
        ca: PEM file of the CA(s) to trust, exclusively. None: the system trust
            store, plus the file named by ``FELIX_CA_FILE`` if set.
        client_cert: (certificate chain PEM, private key PEM) presented to a
            node that requires client certificates (``felix up
            --tls-client-ca``). None: ``FELIX_CLIENT_CERT``/``FELIX_CLIENT_KEY``
            if set, else no certificate.
        pool_size: QUIC connections (1); control_streams: control streams per
            connection (2), each authenticated separately.
        max_in_flight: concurrent requests; further calls wait for a slot.
        connect_timeout: seconds for a connection's handshake plus auth.
        request_timeout: seconds for one call (after its in-flight slot),
            including waiting for a connection while reconnecting.
        keepalive: seconds of silence after which a PING is sent.
        reconnect_backoff: (base, cap) seconds of the full-jitter backoff.
        engine: QUIC engine ("qh3", "aioquic" or a QuicEngine); None: FELIX_QUIC_ENGINE.
        on_event: a listener for connection events (see ``Client.add_listener``).
        random_source: floats in [0, 1) for the backoff jitter (tests).

    Awaiting raises ConfigError for bad arguments (also raised by this call
    itself), FelixTimeoutError, HandshakeFailed (TLS or ALPN, or a broker
    without the felix extension family), Unauthenticated, ConnectionLost.
    """
    return Connect(
        Client(
            parse_url(url),
            tenant=tenant,
            namespace=namespace,
            token=token,
            token_provider=token_provider,
            ca=ca,
            client_cert=client_cert,
            pool_size=pool_size,
            control_streams=control_streams,
            max_in_flight=max_in_flight,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            keepalive=keepalive,
            reconnect_backoff=reconnect_backoff,
            engine=engine,
            on_event=on_event,
            random_source=random_source,
        )
    )
