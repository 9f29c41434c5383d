"""Shared-memory rings between felix processes, and the asyncio loop that drains one.

The ring itself is :class:`felix._ring.Ring` (Cython). A consumer's event loop
watches the ring's doorbell, an eventfd that the producer writes only after the
consumer said it is going to sleep. The consumer side of one wake-up is always::

    drain the eventfd -> read_batch -> handle -> commit -> prepare_sleep
    (prepare_sleep returned False: data raced in, read again)

``Ring.next_batch()`` does "commit, read_batch, prepare_sleep when empty" in one call.

:class:`RingReader` runs exactly that with ``loop.add_reader``::

    ring = Ring.attach(name, doorbell_fd=fd)
    reader = RingReader(ring, on_batch)
    await reader.run()          # until reader.stop(); raises what on_batch raised

The producer needs no glue: ``write``/``write_batch``/``publish`` ring the doorbell
themselves. A full ring is answered with ``False`` (``write``) or a short count
(``write_batch``); what to do then (drop, retry later, push back) is the caller's
policy.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from felix._ring import DEFAULT_CAPACITY, Ring
from felix.errors import RingError

__all__ = ["DEFAULT_CAPACITY", "Ring", "RingError", "RingReader", "make_doorbell"]


def make_doorbell() -> int:
    """Create a doorbell: a non-blocking, close-on-exec eventfd; the caller owns it.

    Children get it by fork (multiprocessing) or through ``subprocess``'s
    ``pass_fds``; rings never close it.
    """
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class RingReader:
    """Drain a ring from an asyncio event loop, sleeping on its doorbell when idle.

    ``on_batch`` gets each batch of record views; the views are committed (and must
    not be used) after it returns. A wake-up handles at most ``max_batches_per_wake``
    batches, then yields to the loop without sleeping, so a busy ring cannot starve
    other callbacks. ``spin_ns`` > 0 busy-polls that long before each sleep (blocking
    the loop meanwhile): lower latency for a whole core, off by default.
    """

    def __init__(
        self,
        ring: Ring,
        on_batch: Callable[[list[memoryview]], None],
        *,
        max_records: int = 1024,
        max_bytes: int = 1 << 20,
        spin_ns: int = 0,
        max_batches_per_wake: int = 64,
    ) -> None:
        if ring.doorbell_fd < 0:
            raise ValueError("RingReader needs a ring with a doorbell_fd")
        if max_batches_per_wake < 1:
            raise ValueError("max_batches_per_wake must be >= 1")
        self._ring = ring
        self._on_batch = on_batch
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._spin_ns = spin_ns
        self._max_batches = max_batches_per_wake
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._again: asyncio.Handle | None = None
        self._stopped = False

    async def run(self) -> None:
        """Drain the ring until stop(); re-raise the first exception from on_batch.

        The batch that raised is not committed. Cancelling run() stops the reader.
        """
        if self._done is not None:
            raise RuntimeError("RingReader.run() was already called")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        fd = self._ring.doorbell_fd
        loop.add_reader(fd, self._on_readable)
        # Records may already be waiting, and nobody rings for a consumer that never slept.
        self._again = loop.call_soon(self._on_readable)
        try:
            await self._done
        finally:
            self._stopped = True
            loop.remove_reader(fd)
            if self._again is not None:
                self._again.cancel()
                self._again = None

    def stop(self) -> None:
        """Make run() return (idempotent); no batch is handled after this call."""
        self._stopped = True
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _on_readable(self) -> None:
        # The hot path of every wake-up: locals only, no allocation beyond read_batch's.
        self._again = None
        if self._stopped:
            return
        ring = self._ring
        on_batch = self._on_batch
        max_records = self._max_records
        max_bytes = self._max_bytes
        batches = self._max_batches
        spin_ns = self._spin_ns
        # Drain first: a ring that arrives after this is for data we may not see below,
        # and must stay pending to wake us again.
        ring.drain_doorbell()
        try:
            while batches:
                # Commits the previous batch; [] means asleep: the producer rings next time.
                views = ring.next_batch(max_records, max_bytes, spin_ns)
                if not views:
                    return
                on_batch(views)
                if self._stopped:  # on_batch called stop()
                    ring.commit()
                    return
                batches -= 1
            ring.commit()
        except Exception as exc:
            self._stopped = True
            if self._done is not None and not self._done.done():
                self._done.set_exception(exc)
            return
        # Still busy after max_batches: let other callbacks run, then continue awake.
        assert self._loop is not None
        self._again = self._loop.call_soon(self._on_readable)
