"""A whole felix node in the current process: one gateway hosting its shard cores.

This is the architecture's explicit knob for one-core machines and latency
experiments, and what tests use when they do not need real processes. It runs
the same gateway, shard core, codec and QUIC code as ``felix up``; only the
rings between gateway and shards are replaced by direct calls.

    async with LocalNode.start(tmp_path) as node:
        client = await felix.connect(node.url, ca=node.ca_file)

With ``shm_socket=PATH`` it also serves same-host clients over shared memory
(``node.shm_url``), as ``felix up --shm-socket`` does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Coroutine, Generator
from pathlib import Path
from types import TracebackType

from felix.gateway.auth import Authenticator
from felix.gateway.connection import connection_factory
from felix.gateway.gateway import Gateway, GatewayLimits
from felix.node.links import LocalShards
from felix.quic import QuicServerHandle, bind_udp, load_engine, load_reset_key, serve_on_socket
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.offsets import OffsetReservations
from felix.shm.server import ShmServer
from felix.tls import ensure_node_certificates


class LocalNode:
    """A running in-process node; create it with :meth:`start`."""

    def __init__(
        self,
        gateway: Gateway,
        links: LocalShards,
        server: QuicServerHandle,
        host: str,
        port: int,
        ca_file: Path,
        shm: tuple[ShmServer, socket.socket, Path] | None = None,
    ) -> None:
        self.gateway = gateway
        self._shm = shm
        self.links = links
        self._server = server
        self.host = host
        self.port = port
        self.ca_file = ca_file
        self._closed = False

    @property
    def url(self) -> str:
        return f"felix://{self.host}:{self.port}"

    @property
    def shm_url(self) -> str | None:
        """``felix+shm://PATH`` when the node serves shared-memory clients, else None."""
        return None if self._shm is None else f"felix+shm://{self._shm[2]}"

    @classmethod
    def start(cls, data_dir: Path, **options: object) -> _Starting:
        """Start a node: ``await LocalNode.start(...)`` or ``async with LocalNode.start(...)``.

        Options are those of :meth:`open`.
        """
        return _Starting(cls.open(data_dir, **options))  # type: ignore[arg-type]

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shards: int = 2,
        limits: GatewayLimits | None = None,
        shard_settings: dict[str, object] | None = None,
        engine: str | None = None,
        sock: socket.socket | None = None,
        authenticator: Authenticator | None = None,
        shm_socket: Path | None = None,
        shm_max_connections: int = 64,
    ) -> LocalNode:
        """Start a node serving QUIC on ``host:port`` (0: a free port), state in ``data_dir``.

        ``sock`` (from :func:`felix.quic.bind_udp`) reuses a socket, e.g. to restart
        a node on the same port in a test.
        """
        data_dir.mkdir(parents=True, exist_ok=True)
        certs = ensure_node_certificates(data_dir / "tls", hostnames=["localhost"], ips=[host])
        assert certs.ca_cert is not None
        cores = [
            ShardCore(
                ShardSettings(index=i, shards=shards, **(shard_settings or {})),  # type: ignore[arg-type]
                OffsetReservations(data_dir / f"shard-{i}.offsets"),
            )
            for i in range(shards)
        ]
        links = LocalShards(cores)
        gateway = Gateway(0, links, limits, authenticator=authenticator)
        quic = load_engine(engine)
        udp = sock or bind_udp(host, port)
        server = await serve_on_socket(
            quic,
            udp,
            quic.server_configuration(certs),
            connection_factory(gateway),
            reset_key=load_reset_key(data_dir),
        )
        shm = None
        if shm_socket is not None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(str(shm_socket))
                os.chmod(shm_socket, 0o600)
                listener.listen(128)
                shm_server = ShmServer(
                    listener, connection_factory(gateway), max_connections=shm_max_connections
                )
            except BaseException:
                listener.close()
                server.close()
                raise
            shm_server.start()
            shm = (shm_server, listener, shm_socket)
        return cls(gateway, links, server, host, int(server.sockname[1]), certs.ca_cert, shm)

    async def close(self) -> None:
        """Close every connection and the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._shm is not None:
            shm_server, listener, path = self._shm
            shm_server.close()
            listener.close()
            path.unlink(missing_ok=True)
        self._server.close()
        self.links.close()

    async def __aenter__(self) -> LocalNode:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Starting:
    """Awaitable and async context manager around a node being started."""

    def __init__(self, coro: Coroutine[None, None, LocalNode]) -> None:
        self._coro = coro
        self._node: LocalNode | None = None

    def __await__(self) -> Generator[None, None, LocalNode]:
        return self._coro.__await__()

    async def __aenter__(self) -> LocalNode:
        self._node = await self._coro
        return self._node

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._node is not None:
            await self._node.close()
