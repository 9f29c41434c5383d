"""``felix.connect``: the client's entry point, awaitable and an async context manager."""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import Any

from felix.client._client import Client
from felix.client._convert import parse_url
from felix.client._options import ClientOptions
from felix.errors import ConfigError

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


def connect(url: str, options: ClientOptions | None = None, /, **changes: Any) -> Connect:
    """Connect to the felix node at ``url``: ``client = await felix.connect(url)`` or
    ``async with felix.connect(url) as client:`` (closes it on exit).

    ``url`` is ``felix://host[:port]`` (port 5000 by default). The options are
    the fields of :class:`ClientOptions` (tenant, namespace, token or
    token_provider, ca, client_cert, pool_size, control_streams, max_in_flight,
    connect_timeout, request_timeout, keepalive, reconnect_backoff, engine,
    on_event, random_source, e2e), given as keyword arguments, as one
    ``ClientOptions``, or both (the keywords change that one)::

        felix.connect("felix://127.0.0.1:5000", ca="data/tls/ca-cert.pem", tenant="acme")
        felix.connect(url, ClientOptions(tenant="acme", pool_size=2))

    Awaiting raises ConfigError for bad arguments (also raised by this call
    itself), FelixTimeoutError, HandshakeFailed (TLS or ALPN, or a broker
    without the felix extension family), Unauthenticated, ConnectionLost.
    """
    return Connect(Client(parse_url(url), ClientOptions.build(options, changes)))
