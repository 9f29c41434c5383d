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
``on_fatal`` is called and must end the process (no further ack may go out;
:func:`fsync_failed` does, with status 75).

Also here, for the worker: :func:`durable_store` (a shard's store from the node's
options) and :func:`durable_stats` (its counters for /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from felix.keys.store import KEYS_DIR, KeyStore, resolve_region_key
from felix.node.config import NodeConfig
from felix.shard.core import ShardCore
from felix.shard.disk_read import ReadJob
from felix.shard.durable import FREE_SPACE_REFRESH, DiskSettings, DurableSettings, DurableStore
from felix.shard.fsyncer import Fsyncer, SyncOutcome

log = logging.getLogger("felix.shard")

#: Fault injection for tests: while the file this names exists, every fsync of a
#: durable stream fails with EIO (docs/operations.md, "Durable streams").
FSYNC_FAULT_ENV = "FELIX_FAULT_FSYNC_FILE"
#: Exit status of a shard whose fsync failed (the supervisor restarts it).
EXIT_FSYNC_FAILED = 75
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
        syncs = self._core.take_syncs()
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


def durable_store(config: NodeConfig, index: int) -> DurableStore:
    """Shard ``index``'s durable streams under ``DATA_DIR/streams``, per the node's options."""
    auto = None
    if config.durable_streams:
        fsync: Any = config.fsync  # checked by NodeConfig and DurableSettings
        auto = DurableSettings(fsync=fsync, fsync_interval_ms=config.fsync_interval_ms)
    budget = None if config.disk_budget is None else config.disk_budget // config.shards
    # The supervisor resolved (and in dev mode generated) the region key before any
    # shard started; a shard only reads it.
    kek, missing = resolve_region_key(config.data_dir, config.region_key, generate=False)
    keys = KeyStore(config.data_dir / KEYS_DIR, kek, missing=missing)
    return DurableStore(
        DiskSettings(
            root=config.data_dir / "streams",
            segment_bytes=config.segment_bytes,
            budget_bytes=budget,
            reserve_bytes=config.disk_reserve,
            max_streams=config.max_durable_streams_per_shard,
            auto=auto,
            encrypt=config.encryption,
        ),
        shard=index,
        shards=config.shards,
        keys=keys,
    )


def sum_stats(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """The stats of several shard cores as one (sums; the largest of a maximum)."""
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            if key.endswith("_max"):
                total[key] = max(total.get(key, 0), value)
            else:
                total[key] = total.get(key, 0) + value
    return total


def fsync_fault_file() -> Path | None:
    value = os.environ.get(FSYNC_FAULT_ENV)
    return Path(value) if value else None


def fsync_failed(why: str) -> None:
    """An fsync failed: exit now, before anything else is acknowledged (never retried)."""
    log.critical("%s: exiting so the supervisor restarts this shard from disk", why)
    logging.shutdown()
    os._exit(EXIT_FSYNC_FAILED)


def core_stats(core: ShardCore) -> dict[str, int]:
    """A shard core's counters and gauges for /metrics, durable ones included (the same
    whether the core runs in a shard process or inside the gateway)."""
    return {
        "published": core.published,
        "pushes": core.pushes,
        "streams": core.streams,
        "budget_trims": core.budget_trims,
        "blocked": core.blocked,
        "memory_used": core.memory_used,
        "quota_trims": core.quota_trims,
        "duplicates": core.duplicates,
        "trimmed_bytes": core.trimmed_bytes,
        "caches": core.caches,
        "auto_reports_dropped": core.auto_reports_dropped,
        **durable_stats(core),
        **cluster_stats(core),
    }


def cluster_stats(core: ShardCore) -> dict[str, int]:
    """A shard core's cluster counters for /metrics (none on a standalone node)."""
    if core.cluster is None:
        return {}
    return {
        "cluster_pin_waits": core.pins.held,
        "cluster_pin_waits_failed": core.pins.failed,
        "cluster_moved_streams": core.moved_streams,
        "cluster_moved_cache_entries": core.moved_cache_entries,
    }


def durable_stats(core: ShardCore) -> dict[str, int]:
    """A shard core's durable-stream counters for /metrics."""
    disk = core.disk
    if disk is None:
        return {}
    return {
        "disk_bytes": disk.disk_used,
        "stream_disk_max": disk.largest(),
        "durable_streams": len(disk.streams),
        "fsyncs": disk.fsyncs,
        "fsync_us": disk.fsync_us,
        "fsync_acks": disk.fsync_acks,
        "torn_bytes": disk.torn_bytes,
        "damaged_streams": disk.damaged,
        "disk_reads": disk.disk_reads,
        "disk_refused": disk.refused,
        **queue_stats(core),
    }


def queue_stats(core: ShardCore) -> dict[str, int]:
    """A shard core's queue-group figures for /metrics (counts by node, never by group:
    per-group figures are on the status route and ``felix group info``)."""
    queues = core.queues
    return {
        "queue_groups": len(queues.groups),
        "queue_members": queues.members,
        "queue_stalled": queues.stalled_now,
        "queue_delivered": queues.delivered,
        "queue_redelivered": queues.redelivered,
        "queue_acked": queues.acked,
        "queue_dead_lettered": queues.dead_lettered,
        "queue_stalls": queues.stalls,
        "queue_refused": queues.refused,
        "queue_dead_letter_failures": queues.relay_failures,
        "queue_write_failures": queues.write_failures,
    }
