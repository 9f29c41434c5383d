"""The fsync thread of a shard: group commit off the event loop.

How it works: the loop thread hands over the durable streams that have written
records to sync (:meth:`Fsyncer.request`); the thread takes *everything* requested
so far as one round and fdatasyncs each stream's log once (``DiskLog.sync``, which
releases the GIL in the system call). A publish written before a round starts is
covered by that round, so however many publishers wait on a stream, one fdatasync
acknowledges them all; requests arriving during a round form the next one. Each
round syncing several streams runs their fdatasyncs on a few threads at once (the
file system can commit them together; a round is as slow as its slowest file, not
the sum of them). Each round's outcomes go back through ``report`` (the worker passes a
``loop.call_soon_threadsafe`` wrapper), one :class:`SyncOutcome` per stream.

An fsync error is reported, never retried (after a failed fsync the kernel may
have dropped the dirty pages: retrying could report success for data that is
gone); the DiskLog poisons itself and the shard exits.

Fault injection for tests: when ``fault_file`` is set and that file exists at the
time of a sync, the sync fails with EIO instead of running (``FELIX_FAULT_FSYNC_FILE``
in the worker; docs/operations.md, "Durable streams").
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Protocol


class _SyncsLog(Protocol):
    def sync(self) -> int: ...


class Syncable(Protocol):
    """What the fsync thread syncs: a durable stream (its log) or a queue group (its
    state file); ``log.sync()`` fdatasyncs and returns the position it covered."""

    @property
    def log(self) -> _SyncsLog: ...


__all__ = ["FSYNC_THREADS", "Fsyncer", "SyncOutcome", "Syncable"]

#: Threads that fdatasync the streams of one round in parallel (besides the round's own).
FSYNC_THREADS = 4


class SyncOutcome(NamedTuple):
    """One stream's part of a round: the new synced offset, or the error."""

    stream: Syncable
    synced_offset: int
    seconds: float
    error: BaseException | None


class Fsyncer:
    """One thread fsyncing durable logs in rounds (see the module docstring)."""

    def __init__(
        self,
        report: Callable[[list[SyncOutcome]], None],
        *,
        fault_file: Path | None = None,
        name: str = "felix-fsync",
    ) -> None:
        self._report = report
        self._fault_file = fault_file
        self._cond = threading.Condition()
        self._pending: dict[Syncable, None] = {}
        self._closed = False
        #: Rounds run and streams synced (for metrics: streams per round).
        self.rounds = 0
        self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix=f"{name}-pool")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def request(self, streams: Iterable[Syncable]) -> None:
        """Sync these streams in the next round (loop thread; never blocks on I/O)."""
        with self._cond:
            for stream in streams:
                self._pending[stream] = None
            if self._pending:
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the round in progress and the requested ones, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return  # closed, nothing left
                batch = list(self._pending)
                self._pending.clear()
            self.rounds += 1
            if len(batch) == 1:
                outcomes = [self._sync(batch[0])]
            else:
                outcomes = list(self._pool.map(self._sync, batch))
            self._report(outcomes)

    def _sync(self, stream: Syncable) -> SyncOutcome:
        start = time.perf_counter()
        try:
            if self._fault_file is not None and self._fault_file.exists():
                raise OSError(errno.EIO, f"injected fsync error ({self._fault_file} exists)")
            synced = stream.log.sync()
        except Exception as exc:  # an OSError, or a log closed by a delete meanwhile
            return SyncOutcome(stream, 0, time.perf_counter() - start, exc)
        return SyncOutcome(stream, synced, time.perf_counter() - start, None)
