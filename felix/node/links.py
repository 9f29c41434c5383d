"""The two ways a gateway reaches its shards (felix.gateway.links.ShardLinks).

- :class:`RingLinks`: shared-memory rings to shard worker processes, one pair per
  (gateway, shard), read by a :class:`~felix.ring.RingReader` per inbound ring.
- :class:`LocalShards`: :class:`~felix.shard.core.ShardCore` objects hosted in the
  gateway's own process (``--embedded-shards``, tests, one-core machines, latency
  experiments: the architecture's explicit knob).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable, Sequence

from felix.gateway.links import Deliver
from felix.ring import Ring, RingReader
from felix.shard.core import ShardCore

#: How often in-process shards reclaim expired cache entries (seconds).
SWEEP_INTERVAL = 0.1


class RingLinks:
    """A gateway's rings to every shard (implements felix.gateway.links.ShardLinks)."""

    def __init__(self, outbound: Sequence[Ring], inbound: Sequence[Ring]) -> None:
        self._out = list(outbound)
        self._in = list(inbound)
        self._readers: list[RingReader] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def shards(self) -> int:
        return len(self._out)

    @property
    def max_record_size(self) -> int:
        return min(ring.max_record_size for ring in self._out)

    def attach(self, gateway: int, deliver: Deliver) -> None:
        for shard, ring in enumerate(self._in):
            # Records a previous incarnation of this gateway did not read are for
            # tokens nobody waits for: skip them.
            while ring.read_batch():
                ring.commit()
            reader = RingReader(ring, functools.partial(deliver, shard))
            self._readers.append(reader)
            self._tasks.append(asyncio.get_running_loop().create_task(reader.run()))

    def send(self, shard: int, record: bytes) -> bool:
        return self._out[shard].write(record)

    def close(self) -> None:
        for reader in self._readers:
            reader.stop()


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
        # The loop, once known: asyncio.get_running_loop() costs a getpid() system call
        # on every request otherwise.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        #: Called with a core's index before its records are flushed (the worker starts
        #: the core's disk work there: fsyncs, disk reads).
        self.before_flush: Callable[[int], None] | None = None

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
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._deliver is None or self._closed:
            return
        for index, core in enumerate(self._cores):
            if self.before_flush is not None:
                self.before_flush(index)
            records = core.flush().get(self._gateway)
            if records:
                self._deliver(index, records)

    def _schedule_sweep(self) -> None:
        if self._closed:
            return
        now = self._clock()
        for core in self._cores:
            core.sweep(now)
        self.flush_soon()  # queue groups: expired leases and due retries deliver now
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._schedule_sweep)

    def close(self) -> None:
        if not self._closed:
            for core in self._cores:
                core.shutdown(self._clock())  # queue groups release their leases
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
