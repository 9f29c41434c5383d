"""How a gateway reaches its shards: through rings to shard processes, or in-process.

A gateway talks to shards only through :class:`ShardLinks`: ``send(shard,
record) -> bool`` (False: that shard cannot take it now) and a ``deliver``
callback receiving, per shard, the records it sent back, in order. Two
implementations: :class:`LocalShards` hosts :class:`~felix.shard.core.ShardCore`
objects in the gateway's own process (tests, one-core machines, latency
experiments: the architecture's explicit knob), and ``felix.node.ringlinks``
connects to shard worker processes through shared-memory rings.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from felix.shard.core import ShardCore

#: Called with (shard index, records from that shard in order).
Deliver = Callable[[int, Sequence[bytes | memoryview]], None]

#: How often in-process shards reclaim expired cache entries (seconds).
SWEEP_INTERVAL = 0.1


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


class LocalShards:
    """Shard cores hosted inside the gateway process.

    Records sent during one loop tick are handled immediately and their results
    flushed once, at the end of the tick (``call_soon``), so batching behaves as
    with rings: one flush, one EVENTS frame per stream, per tick.
    """

    def __init__(self, cores: list[ShardCore], clock: Callable[[], float] = time.monotonic) -> None:
        self._cores = cores
        self._clock = clock
        self._gateway = 0
        self._deliver: Deliver | None = None
        self._flush_scheduled = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def shards(self) -> int:
        return len(self._cores)

    @property
    def max_record_size(self) -> int:
        return sys.maxsize  # direct calls: the frame limit is the only bound

    @property
    def cores(self) -> list[ShardCore]:
        return self._cores

    def attach(self, gateway: int, deliver: Deliver) -> None:
        self._gateway = gateway
        self._deliver = deliver
        self._schedule_sweep()

    def send(self, shard: int, record: bytes) -> bool:
        if self._closed:
            return False
        self._cores[shard].handle(self._gateway, record, self._clock())
        self.flush_soon()
        return True

    def flush_soon(self) -> None:
        """Deliver what the cores produced at the end of this loop tick (once per tick)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._deliver is None or self._closed:
            return
        for index, core in enumerate(self._cores):
            records = core.flush().get(self._gateway)
            if records:
                self._deliver(index, records)

    def _schedule_sweep(self) -> None:
        if self._closed:
            return
        now = self._clock()
        for core in self._cores:
            core.sweep(now)
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._schedule_sweep)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
