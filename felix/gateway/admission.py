"""Which connections a gateway holds; idle unauthenticated ones never crowd out clients.

How it works: a connection enters the table when its QUIC handshake completes
and counts as *unauthenticated* until one of its streams authenticates (its
session then hands the shell ``ConnectionAuthenticated``), and again once its
authenticated streams and subscriptions are all gone (``ConnectionUnauthenticated``):
one authentication does not hold a slot for good. The policy, chosen so
that a client with a valid token can always get in while an attacker holds idle
connections (issue 11, item 4):

- at most ``max_unauthenticated_per_source`` unauthenticated connections per
  source address: one more from that address is refused;
- when the table is at ``max_connections``, or holds ``max_unauthenticated``
  unauthenticated connections, the *oldest unauthenticated* connection is
  evicted (closed) to admit the new one; only a table full of authenticated
  connections refuses a newcomer;
- every connection must authenticate a stream within ``auth_timeout`` of its
  handshake anyway (felix/gateway/session.py), so idle ones also age out.

No I/O here: :meth:`ConnectionTable.admit` says whom to close; the shell closes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class ConnectionTable(Generic[C]):
    """The connections of one gateway (see the module docstring)."""

    def __init__(
        self, max_connections: int, max_unauthenticated: int, max_unauthenticated_per_source: int
    ) -> None:
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_source = max_unauthenticated_per_source
        #: Every admitted connection.
        self.connections: set[C] = set()
        self._unauthenticated: OrderedDict[C, str] = OrderedDict()  # oldest first -> source
        self._per_source: dict[str, int] = {}

    @property
    def unauthenticated(self) -> int:
        return len(self._unauthenticated)

    def admit(self, conn: C, source: str) -> tuple[bool, list[C]]:
        """Whether ``conn`` from ``source`` is admitted, and the connections to evict for it."""
        if self._per_source.get(source, 0) >= self.max_unauthenticated_per_source:
            return False, []
        evicted: list[C] = []
        while self._unauthenticated and (
            len(self._unauthenticated) >= self.max_unauthenticated
            or len(self.connections) >= self.max_connections
        ):
            oldest = next(iter(self._unauthenticated))
            self.remove(oldest)
            evicted.append(oldest)
        if len(self.connections) >= self.max_connections:
            return False, evicted  # every slot holds an authenticated connection
        self.connections.add(conn)
        self._unauthenticated[conn] = source
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return True, evicted

    def authenticated(self, conn: C) -> None:
        """``conn`` authenticated a stream: it is no longer evictable."""
        source = self._unauthenticated.pop(conn, None)
        if source is not None:
            left = self._per_source[source] - 1
            if left:
                self._per_source[source] = left
            else:
                del self._per_source[source]

    def idle_again(self, conn: C, source: str) -> None:
        """``conn`` has no authenticated stream left: evictable again, as the newest idle one."""
        if conn in self.connections and conn not in self._unauthenticated:
            self._unauthenticated[conn] = source
            self._per_source[source] = self._per_source.get(source, 0) + 1

    def remove(self, conn: C) -> None:
        self.connections.discard(conn)
        self.authenticated(conn)


def admission_source(peer: str) -> str:
    """The source a connection counts against in the admission table (per-source bound
    on unauthenticated connections): the address of a QUIC peer; for a same-host shm
    peer (``unix:pid=P,uid=U``, felix/shm/server.py) its user, since one user can start
    any number of processes. Failed authentications are backed off by the same source."""
    if peer.startswith("unix:"):
        uid = peer.rpartition("uid=")[2]
        return f"unix:uid={uid}"
    return peer
