"""How a gateway reaches its shards: the :class:`ShardLinks` seam.

A gateway talks to shards only through :class:`ShardLinks`: ``send(shard,
record) -> bool`` (False: that shard cannot take it now) and a ``deliver``
callback receiving, per shard, the records it sent back, in order. The
implementations live with the node (felix/node/links.py): rings to shard worker
processes, or shard cores hosted in the gateway's own process. The gateway
imports nothing of felix/shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

#: Called with (shard index, records from that shard in order).
Deliver = Callable[[int, Sequence[bytes | memoryview]], None]


class ShardLinks(Protocol):
    """The gateway's side of its connections to every shard."""

    @property
    def shards(self) -> int: ...

    @property
    def max_record_size(self) -> int:
        """Largest record ``send`` takes (a larger request is answered TooLarge)."""

    def attach(self, gateway: int, deliver: Deliver) -> None:
        """Start delivering records from the shards to ``deliver``."""

    def send(self, shard: int, record: bytes) -> bool:
        """Queue ``record`` for ``shard``; False when it cannot take it now (full or down)."""

    def close(self) -> None:
        """Stop delivering; idempotent."""
