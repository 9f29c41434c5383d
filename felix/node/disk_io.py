"""Runs a shard core's disk work on the event loop: fsync rounds, disk reads, timers.

The shard core (felix/shard/core.py) is sans-IO apart from its appends: it leaves
*jobs* in its :class:`~felix.shard.durable.DurableStore` (streams to fsync, READs to
serve from disk). After every batch of ring records the worker calls
:meth:`DiskIO.kick`, which hands the fsyncs to the fsync thread
(felix/shard/fsyncer.py: group commit) and the reads to a small thread pool, and
arms the ``interval`` timer. Results come back on the loop thread
(``call_soon_threadsafe``): acks released by an fsync and READ replies are emitted
by the core, and ``deliver`` sends them out.

An fsync error makes the core :attr:`~felix.shard.core.ShardCore.fatal`:
``on_fatal`` is called and must end the process (no further ack may go out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from felix.shard.core import ShardCore
from felix.shard.disk_read import ReadJob
from felix.shard.durable import FREE_SPACE_REFRESH
from felix.shard.fsyncer import Fsyncer, SyncOutcome

log = logging.getLogger("felix.shard")

#: Threads reading durable streams from disk per shard (each read is bounded by
#: MAX_READ_RECORDS / MAX_READ_BYTES in felix/shard/core.py).
READ_THREADS = 2


class DiskIO:
    """The disk side of one shard core on the running loop (see the module docstring)."""

    def __init__(
        self,
        core: ShardCore,
        deliver: Callable[[], None],
        on_fatal: Callable[[str], None],
        *,
        fault_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert core.disk is not None
        self._core = core
        self._store = core.disk
        self._deliver = deliver
        self._on_fatal = on_fatal
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._fsyncer = Fsyncer(self._rounds_done, fault_file=fault_file)
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="felix-read")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self._sweeper = self._loop.call_soon(self._sweep)

    def kick(self) -> None:
        """Start the fsyncs and disk reads the last batch asked for; arm the interval timer."""
        if self._closed:
            return
        store = self._store
        # Interval streams whose time came join this round.
        due = store.due(self._clock()) if store.interval_pending else None
        syncs = store.take_syncs()
        if syncs:
            self._fsyncer.request(syncs)
        if store.reads:
            for job in store.take_reads():
                self._pool.submit(self._run_read, job)
        if due is not None and (self._timer is None or due < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = self._loop.call_later(max(0.0, due - self._clock()), self._on_timer)

    def _run_read(self, job: ReadJob) -> None:
        """In a reader thread: the read, then its answer on the loop thread."""
        job.run()
        self._from_thread(self._read_done, job)

    def _on_timer(self) -> None:
        self._timer = None
        self.kick()

    def _from_thread(self, callback: Callable[..., None], *args: object) -> None:
        # A closed loop (RuntimeError): the process is ending, nobody waits.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _rounds_done(self, outcomes: list[SyncOutcome]) -> None:
        self._from_thread(self._synced, outcomes)

    def _synced(self, outcomes: list[SyncOutcome]) -> None:
        if self._closed:
            return  # shutting down: close() syncs what is left
        core = self._core
        for outcome in outcomes:
            if outcome.error is None:
                core.sync_done(outcome.stream, outcome.synced_offset, outcome.seconds)
            else:
                core.sync_failed(outcome.stream, outcome.error)
        if core.fatal is not None:
            self._on_fatal(core.fatal)
            return
        self._deliver()
        self.kick()

    def _read_done(self, job: ReadJob) -> None:
        if self._closed:
            return
        self._core.read_done(job)
        self._deliver()

    def _sweep(self) -> None:
        """Free space (for --disk-reserve) and retention, once per FREE_SPACE_REFRESH."""
        try:
            self._core.disk_sweep()
        except Exception:  # housekeeping must never take the shard down
            log.exception("shard %d: disk sweep failed", self._core.settings.index)
        if not self._closed:
            self._sweeper = self._loop.call_later(FREE_SPACE_REFRESH, self._sweep)

    def close(self) -> None:
        """Finish the fsync rounds and reads in flight, then close the logs (syncing them)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._sweeper.cancel()
        self._fsyncer.close()
        self._pool.shutdown(wait=True)
        self._store.close()
