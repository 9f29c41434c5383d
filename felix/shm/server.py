"""The node side of the shared-memory transport: accept, hand out rings, serve.

How it works: each gateway process watches the node's listening Unix socket
(several gateways may share it; whoever accepts first serves the client). For
each accepted client it reads the hello within HANDSHAKE_TIMEOUT, checks its
limit of connections, creates the two memfd rings and two eventfd doorbells of
the connection itself, and sends them with the OK reply (felix/shm/handshake.py).
The connection is then a :class:`~felix.shm.transport.ShmTransport` whose
handler comes from the same create-handler as the QUIC server's, so the gateway
serves it with the same session, permission checks, limits and slow-consumer
policies. Its peer is ``unix:pid=P,uid=U`` (SO_PEERCRED), which audit lines carry.

Bounds: at most ``max_connections`` connections (more get a BUSY refusal), at
most MAX_PENDING handshakes at once (more are closed unanswered), a hello of a
fixed size, read within HANDSHAKE_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket

from felix.errors import HandshakeFailed, RingError
from felix.quic.transport import CreateHandler
from felix.ring import Ring, make_doorbell
from felix.shm import handshake as hs
from felix.shm.framing import ShmStreams
from felix.shm.transport import DEFAULT_MAX_BACKLOG, BacklogBudget, ShmTransport

__all__ = ["DEFAULT_LIMITS", "HANDSHAKE_TIMEOUT", "ShmServer"]

log = logging.getLogger("felix.shm")

#: Seconds a client has to send its hello once connected.
HANDSHAKE_TIMEOUT = 2.0
#: Handshakes in progress at once (beyond: closed at once, the client retries).
MAX_PENDING = 64
#: Handshakes in progress at once for one user (uid, from SO_PEERCRED at accept): one
#: user holding silent connections cannot take every pending slot from the others.
MAX_PENDING_PER_UID = 16
#: Connections accepted per wake-up of the listening socket (then the loop runs others).
MAX_ACCEPTS_PER_WAKE = 16
#: Bytes of frames waiting for ring space over all of one gateway's shm connections
#: (each also has its own bound, DEFAULT_MAX_BACKLOG): past it, the connection whose
#: frame would cross it is closed (0x109), as one over its own bound is.
DEFAULT_MAX_TOTAL_BACKLOG = 256 * 1024 * 1024
#: Streams a client may hold open towards the node at once: (bidirectional, unidirectional).
DEFAULT_LIMITS = (128, 16)


class ShmServer:
    """Serves shared-memory connections on a listening Unix socket (see the module doc)."""

    def __init__(
        self,
        sock: socket.socket,
        create_handler: CreateHandler,
        *,
        max_connections: int,
        ring_capacity: int = hs.DEFAULT_RING,
        limits: tuple[int, int] = DEFAULT_LIMITS,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_total_backlog: int = DEFAULT_MAX_TOTAL_BACKLOG,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        sock.setblocking(False)
        self._sock = sock
        self._create_handler = create_handler
        self.max_connections = max_connections
        self.ring_capacity = ring_capacity
        self.limits = limits
        self._max_backlog = max_backlog
        self._handshake_timeout = handshake_timeout
        self.backlog = BacklogBudget(max_total_backlog)
        self._transports: set[ShmTransport] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._pending_by_uid: dict[int, int] = {}
        self._loop = asyncio.get_running_loop()
        self._serving = False
        #: Connections refused: at the limit (busy) or for a bad or late hello.
        self.refused_busy = 0
        self.refused_bad = 0

    @property
    def connections(self) -> int:
        """Shared-memory connections currently served."""
        return len(self._transports)

    def start(self) -> None:
        if not self._serving:
            self._serving = True
            self._loop.add_reader(self._sock.fileno(), self._on_accept)

    def stop_accepting(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())

    def close(self) -> None:
        """Stop accepting, abandon handshakes, close every connection (code 0).

        The listening socket belongs to the caller (the supervisor keeps it)."""
        self.stop_accepting()
        for task in self._pending:
            task.cancel()
        for transport in list(self._transports):
            transport.close(0, "the node is shutting down")

    # -- accepting -------------------------------------------------------------------------

    def _on_accept(self) -> None:
        for _ in range(MAX_ACCEPTS_PER_WAKE):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left (or another gateway took it)
            except OSError as exc:  # e.g. out of descriptors: the client waits in the backlog
                log.warning("cannot accept a shm connection: %s", exc)
                return
            try:
                uid = hs.peer_credentials(conn)[1]
            except OSError:
                conn.close()
                continue
            if len(self._pending) >= MAX_PENDING or (
                self._pending_by_uid.get(uid, 0) >= MAX_PENDING_PER_UID
            ):
                conn.close()
                self.refused_bad += 1
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._handshake(conn))
            self._pending.add(task)
            self._pending_by_uid[uid] = self._pending_by_uid.get(uid, 0) + 1
            task.add_done_callback(functools.partial(self._handshake_done, uid))

    def _handshake_done(self, uid: int, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        left = self._pending_by_uid.pop(uid, 1) - 1
        if left > 0:
            self._pending_by_uid[uid] = left

    async def _handshake(self, conn: socket.socket) -> None:
        try:
            async with asyncio.timeout(self._handshake_timeout):
                hello = await hs.read_hello(conn)
        except TimeoutError:
            self._refuse(conn, hs.REFUSED, f"no hello within {self._handshake_timeout:g} s")
            return
        except HandshakeFailed as exc:
            self._refuse(conn, hs.REFUSED, str(exc))
            return
        except OSError:
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        try:
            pid, uid, _ = hs.peer_credentials(conn)
        except OSError:
            conn.close()
            return
        if len(self._transports) >= self.max_connections:
            self._refuse(
                conn,
                hs.BUSY,
                f"this gateway is at its limit of {self.max_connections} shm connections",
            )
            return
        self._open(conn, hello, f"unix:pid={pid},uid={uid}")

    def _refuse(self, conn: socket.socket, status: int, reason: str) -> None:
        if status == hs.BUSY:
            self.refused_busy += 1
        else:
            self.refused_bad += 1
        with contextlib.suppress(OSError):
            conn.send(hs.encode_reply(hs.Reply(status, reason=reason)))
            # Bytes left unread would make the close a reset, which can discard the
            # reply before the client reads it: read (a bounded amount of) them first.
            conn.recv(4096)
        conn.close()

    def _open(self, conn: socket.socket, hello: hs.Hello, peer: str) -> None:
        capacity = hello.ring_capacity or self.ring_capacity
        made: list[Ring] = []
        bells: list[int] = []
        try:
            bells = [make_doorbell(), make_doorbell()]  # client->node, node->client
            made.append(Ring.create_memfd(capacity=capacity, doorbell_fd=bells[0]))
            made.append(Ring.create_memfd(capacity=capacity, doorbell_fd=bells[1]))
            inbound, outbound = made
            reply = hs.Reply(hs.OK, capacity, self.limits[0], self.limits[1])
            fds = [inbound.fd, outbound.fd, bells[0], bells[1]]
            # The reply is small and the socket's buffer empty: it is sent whole or fails.
            sent = socket.send_fds(conn, [hs.encode_reply(reply)], fds)
            if sent != hs.REPLY_HEADER:
                raise OSError("the shm reply was cut short")
        except (OSError, RingError, ValueError) as exc:
            log.warning("cannot open a shm connection for %s: %s", peer, exc)
            for ring in made:
                ring.close()
            for fd in bells:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()
            return
        streams = ShmStreams(
            is_client=False,
            local_limits=self.limits,
            peer_limits=(hello.max_bidi_streams, hello.max_uni_streams),
        )
        transport = ShmTransport(
            sock=conn,
            outbound=outbound,
            inbound=inbound,
            doorbells=(bells[0], bells[1]),
            streams=streams,
            peer=peer,
            create_handler=self._create_handler,
            max_backlog=self._max_backlog,
            on_ended=self._transports.discard,
            budget=self.backlog,
        )
        self._transports.add(transport)
        transport.start()
