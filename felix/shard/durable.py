"""Durable streams inside one shard: disk logs, commit acks, the disk budget.

How it works
------------
A durable stream keeps its in-memory :class:`~felix.shard.stream_log.StreamLog` as
the hot tail (live fanout and READs near the tail never touch the disk) and writes
every publish to its :class:`~felix.shard.disklog.DiskLog` first, with one write per
publish, before the records become visible in memory. What happens next depends on
the stream's fsync policy (docs/operations.md, "Durable streams"):

* ``none``: the ack says WRITTEN (handed to the kernel: survives ``kill -9`` of
  felix, not a power loss); the kernel writes back when it likes.
* ``interval``: the ack says WRITTEN; the stream is fsynced at most
  ``fsync_interval_ms`` after its first unsynced write.
* ``commit``: the ack waits until an fsync covers the publish and then says SYNCED
  (survives a power loss). Group commit: the fsync thread syncs each stream once per
  round, and a round covers every publish written before it started, so one
  fdatasync acknowledges every publisher waiting on that stream.

This module is the bookkeeping, sans event loop: the shard core calls it on the loop
thread, and collects *jobs* (streams to sync, disk reads to run) that the worker's
I/O driver (felix/node/disk_io.py) runs in threads and reports back to the core.
File I/O happens here only through the DiskLog (appends, open, delete, retention),
the same way the offset reservations write their file.

Encryption at rest (docs/log-format.md, "Encrypted records"): with
``DiskSettings.encrypt`` every record is written as an encrypted envelope (kind 1)
with its tenant's current data key (felix/keys/store.py); records of either kind are
read back through :func:`~felix.shard.log_format.decode_record`. A tenant whose data
keys cannot be used (wrong or missing region key, a damaged or altered key file) has
its durable streams refused with :class:`~felix.errors.KeyUnavailable` (Unavailable
on the wire); nothing is ever written in plaintext instead.

Bounds: every durable stream is one directory with one open segment; a shard holds
at most ``DiskSettings.max_streams`` of them. Commit acks waiting for an fsync are
bounded by the gateways' in-flight limits (one per request). Disk space is bounded
by the shard's share of ``--disk-budget`` and by ``--disk-reserve`` (free space kept
on the file system): new durable data beyond either is refused with Overloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from felix import ipc, wire
from felix.errors import BadRequest, DiskFull, FelixError, LogDamaged, Overloaded, Unavailable
from felix.keys.store import KeyStore
from felix.shard.disk_read import ReadJob
from felix.shard.disklog import DiskLog, DiskLogSettings, fsync_dir
from felix.shard.log_format import encode_envelope, seal_batch

__all__ = [
    "FSYNC_POLICIES",
    "DiskSettings",
    "DurableSettings",
    "DurableStore",
    "DurableStream",
    "FsyncPolicy",
    "Waiter",
]

log = logging.getLogger("felix.shard")

FsyncPolicy: TypeAlias = Literal["none", "interval", "commit"]
FSYNC_POLICIES: Final = ("none", "interval", "commit")
#: Prefix of a deleted stream's directory while it is being removed:
#: ``.deleted.<16 hex digits>.<stream>`` (no stream name starts with a dot, felix/names.py).
_TRASH: Final = ".deleted."
#: Free-space checks of the data file system are refreshed this often (seconds).
FREE_SPACE_REFRESH: Final = 1.0
#: The envelope head of a record without headers (felix/shard/log_format.py): prefixed
#: to the body in one concatenation instead of a call per record.
_BARE: Final = encode_envelope(None, b"")
#: A waiting ack: (end offset it needs synced, gateway, ring token, request id, reply).
Waiter: TypeAlias = tuple[int, int, int, int, bytes]


@dataclass(frozen=True, slots=True)
class DurableSettings:
    """How one durable stream is kept on disk (the control plane's stream spec).

    Attributes:
        fsync: ``none``, ``interval`` or ``commit`` (see the module docstring).
        fsync_interval_ms: with ``interval``, the longest a written record stays
            unsynced (1..60000).
        retention_age_s: whole sealed segments older than this are deleted.
        retention_bytes: the oldest sealed segments are deleted beyond this size.
    """

    fsync: FsyncPolicy = "commit"
    fsync_interval_ms: int = 100
    retention_age_s: float | None = None
    retention_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise BadRequest(
                f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {self.fsync!r}"
            )
        if type(self.fsync_interval_ms) is not int or not 1 <= self.fsync_interval_ms <= 60_000:
            raise BadRequest(
                f"fsync_interval_ms must be an integer in 1..60000, got {self.fsync_interval_ms!r}"
            )
        if self.retention_age_s is not None and not self.retention_age_s > 0:
            raise BadRequest(f"retention_age_s must be > 0, got {self.retention_age_s!r}")
        if self.retention_bytes is not None and self.retention_bytes < 1:
            raise BadRequest(f"retention_bytes must be >= 1, got {self.retention_bytes!r}")

    @property
    def durability(self) -> int:
        """What a publish ack on such a stream promises (``wire.DURABILITY_*``)."""
        if self.fsync == "commit":
            return int(wire.DURABILITY_SYNCED)
        return int(wire.DURABILITY_WRITTEN)


@dataclass(frozen=True, slots=True)
class DiskSettings:
    """What a shard needs to keep durable streams (from the node's options).

    Attributes:
        root: ``<data-dir>/streams``; a stream lives in ``root/<tenant>/<ns>/<stream>``.
        segment_bytes: segment files roll at this size (``--segment-bytes``).
        budget_bytes: this shard's share of ``--disk-budget`` (None: no budget).
        reserve_bytes: new durable data is refused while the file system has less
            free space than this (``--disk-reserve``).
        max_streams: most durable streams this shard holds
            (``--max-durable-streams-per-shard``).
        auto: settings of streams created by their first publish (``--durable-streams``
            with ``--fsync``); None: auto-created streams are in memory only.
        encrypt: write records (and queue group state) encrypted with the tenant's
            data key (``--encryption on``); needs the store's ``keys``. Off: written
            in plaintext (kind 0); encrypted records already there stay readable.
    """

    root: Path
    segment_bytes: int = 256 * 2**20
    budget_bytes: int | None = None
    reserve_bytes: int = 0
    max_streams: int = 1024
    auto: DurableSettings | None = None
    encrypt: bool = False


class DurableStream:
    """One durable stream's disk state, owned by the shard's loop thread."""

    __slots__ = (
        "damaged",
        "key",
        "keys",
        "log",
        "settings",
        "sync_due",
        "synced",
        "tenant",
        "waiting",
        "written",
    )

    def __init__(
        self,
        key: str,
        disk_log: DiskLog | None,
        settings: DurableSettings,
        keys: KeyStore | None = None,
    ) -> None:
        self.key = key
        self.tenant = key.split("/", 1)[0]
        #: The node's data keys (None: no encryption here; encrypted records unreadable).
        self.keys = keys
        self.log: DiskLog = disk_log  # type: ignore[assignment]  # None only when damaged
        self.settings = settings
        #: Why the stream is refused (its log is damaged: names the file and byte).
        self.damaged: str | None = None
        #: Commit acks waiting for an fsync, in offset order.
        self.waiting: deque[Waiter] = deque()
        #: Offsets below ``written`` were handed to the kernel; below ``synced`` fsynced.
        self.written = 0 if disk_log is None else disk_log.next_offset
        self.synced = 0 if disk_log is None else disk_log.synced_offset
        #: With ``interval``: when the oldest unsynced write must be synced (monotonic s).
        self.sync_due: float | None = None

    @property
    def opened(self) -> bool:
        """Whether the log is open (False: its damage was found when opening it)."""
        return self.log is not None

    @property
    def unsynced(self) -> bool:
        return self.written > self.synced

    def low(self) -> int:
        """The oldest offset still on disk (``next_offset`` when the log is empty)."""
        return int(self.log.first_offset)

    def key_problem(self) -> str | None:
        """Why this stream's tenant's data keys cannot be used now (None: they can, or
        it has none): the stream is then refused."""
        return None if self.keys is None else self.keys.problem(self.tenant)


class DurableStore:
    """A shard's durable streams: opening, appends, acks waiting for fsync, budget.

    Sans event loop: :meth:`take_syncs` and :attr:`reads` are the work the I/O driver
    runs in threads; :meth:`synced`, :meth:`sync_failed` report back.
    """

    def __init__(
        self,
        settings: DiskSettings,
        *,
        shard: int = 0,
        shards: int = 1,
        keys: KeyStore | None = None,
    ) -> None:
        if settings.encrypt and keys is None:
            raise ValueError("DiskSettings.encrypt needs a KeyStore")
        self.settings = settings
        #: Per-tenant data keys (felix/keys/store.py); None: no encryption at rest.
        self.keys = keys
        self.shard = shard
        self.shards = shards
        self.streams: dict[str, DurableStream] = {}
        #: Bytes of every durable stream's files on this shard, and per tenant.
        self.disk_used = 0
        self.tenant_disk: dict[str, int] = {}
        #: Free bytes of the data file system at the last check (None: not checked).
        self.free_bytes: int | None = None
        self._sync_wanted: dict[DurableStream, None] = {}
        # ``interval`` streams with an unsynced write (their sync_due is set): only these
        # are looked at by due(), so it costs nothing per batch for the other streams.
        self._interval: dict[DurableStream, None] = {}
        #: READs to run from disk (the I/O driver takes them).
        self.reads: deque[ReadJob] = deque()
        #: Set when an fsync failed: the shard must stop acknowledging and exit.
        self.fatal: str | None = None
        # Counters (metrics).
        self.fsyncs = 0
        self.fsync_us = 0
        self.fsync_acks = 0
        self.torn_bytes = 0
        self.disk_reads = 0
        self.refused = 0

    # -- paths and opening -----------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """``root/<tenant>/<ns>/<stream>``; names are validated, checked again here."""
        parts = key.split("/")
        if len(parts) != 3 or any(
            not p or p in (".", "..") or os.sep in p or "\0" in p for p in parts
        ):
            raise BadRequest(f"bad stream key {key!r} for a durable stream")
        return self.settings.root.joinpath(*parts)

    def discover(self) -> list[str]:
        """Keys of the stream directories under the root that this shard owns (and the
        removal of deleted streams' directories a crash left behind)."""
        root = self.settings.root
        if not root.is_dir():
            return []
        keys = []
        for tenant in sorted(_subdirs(root)):
            for ns in sorted(_subdirs(root / tenant)):
                for stream in sorted(_subdirs(root / tenant / ns)):
                    if stream.startswith(_TRASH):
                        # .deleted.<16 hex>.<name>: finish a removal a crash cut short.
                        name = stream.removeprefix(_TRASH).partition(".")[2]
                        owner = ipc.shard_for(ipc.stream_key(tenant, ns, name), self.shards)
                        if owner == self.shard:
                            shutil.rmtree(root / tenant / ns / stream, ignore_errors=True)
                        continue
                    key = ipc.stream_key(tenant, ns, stream)
                    if ipc.shard_for(key, self.shards) == self.shard:
                        keys.append(key)
        return keys

    def admit(self, key: str) -> None:
        """Refuse a new durable stream beyond the cap (before anything is created)."""
        if key not in self.streams and len(self.streams) >= self.settings.max_streams:
            self.refused += 1
            raise Overloaded(
                f"shard {self.shard} holds its maximum of {self.settings.max_streams} durable "
                "streams (--max-durable-streams-per-shard)"
            )

    def open(self, key: str, settings: DurableSettings, first_offset: int) -> DurableStream:
        """Open (recovering) or create ``key``'s log. A damaged log gives a stream that
        refuses every request (:attr:`DurableStream.damaged`); nothing is deleted.

        Raises:
            Unavailable: the directory cannot be created or read (I/O error).
        """
        self.admit(key)
        path = self.path_for(key)
        try:
            path.mkdir(parents=True, exist_ok=True)
            disk_log = DiskLog.open(path, self._log_settings(settings), first_offset=first_offset)
        except LogDamaged as exc:
            stream = DurableStream(key, None, settings, self.keys)
            stream.damaged = f"stream {key} is damaged on disk: {exc}"
            log.error("shard %d: %s (refused until repaired)", self.shard, stream.damaged)
            self.streams[key] = stream
            return stream
        except OSError as exc:
            raise Unavailable(f"cannot open the log of stream {key} in {path}: {exc}") from exc
        stream = DurableStream(key, disk_log, settings, self.keys)
        problem = stream.key_problem()
        if problem is not None:
            log.error("shard %d: stream %s is refused: %s", self.shard, key, problem)
        report = disk_log.recovery
        if report.torn_bytes_cut:
            self.torn_bytes += report.torn_bytes_cut
            log.warning(
                "shard %d: stream %s: cut a torn tail of %d bytes from its active segment "
                "(a write that never completed, so never acknowledged); %d records kept",
                self.shard,
                key,
                report.torn_bytes_cut,
                report.records,
            )
        self.streams[key] = stream
        self._used(stream.tenant, disk_log.size_bytes)
        return stream

    def _used(self, tenant: str, delta: int) -> None:
        """Count ``delta`` bytes more (or fewer) of ``tenant``'s files on this shard."""
        self.disk_used += delta
        left = self.tenant_disk.get(tenant, 0) + delta
        if left > 0:
            self.tenant_disk[tenant] = left
        else:
            self.tenant_disk.pop(tenant, None)

    def _log_settings(self, settings: DurableSettings) -> DiskLogSettings:
        return DiskLogSettings(
            segment_bytes=self.settings.segment_bytes,
            retention_age_s=settings.retention_age_s,
            retention_bytes=settings.retention_bytes,
        )

    def reconfigure(self, stream: DurableStream, settings: DurableSettings) -> None:
        """New fsync/retention settings for an open stream (from the control plane)."""
        stream.settings = settings
        if stream.opened:
            stream.log.settings = self._log_settings(settings)
        if settings.fsync == "commit" and stream.unsynced:
            self._sync_wanted[stream] = None
        if settings.fsync != "interval":
            stream.sync_due = None

    # -- writing -------------------------------------------------------------------

    def check_room(self, stream: DurableStream, nbytes: int, quota: int | None = None) -> None:
        """Refuse a publish the log cannot take (damage, fatal error, the tenant's disk
        quota on this shard, ``quota`` bytes; the disk budget or reserve)."""
        if stream.damaged is not None:
            raise Unavailable(stream.damaged)
        if self.fatal is not None:
            raise Unavailable(f"shard {self.shard} stopped acknowledging: {self.fatal}")
        keys = self.keys
        if keys is not None:
            # Raises KeyUnavailable (or Overloaded at the tenant bound) before anything
            # is reserved or written: never plaintext instead.
            if self.settings.encrypt:
                keys.current(stream.tenant)
            else:
                keys.keys(stream.tenant)
        if quota is not None:
            # Retention deletes whole sealed segments and keeps the active one: a share
            # below two segments could fill up and never be freed.
            quota = max(quota, 2 * self.settings.segment_bytes)
            used = self.tenant_disk.get(stream.tenant, 0)
            if used + nbytes > quota:
                self.refused += 1
                raise DiskFull(
                    f"tenant {stream.tenant} has used its disk quota on shard {self.shard}: "
                    f"{used} of {quota} bytes (its disk_quota_bytes, or the node's "
                    "--tenant-disk-quota, over the shards); delete streams or lower their "
                    "retention"
                )
        budget = self.settings.budget_bytes
        if budget is not None and self.disk_used + nbytes > budget:
            self.refused += 1
            raise DiskFull(
                f"disk budget for durable streams is used up on shard {self.shard}: "
                f"{self.disk_used} of {budget} bytes (--disk-budget); delete streams or "
                "lower their retention"
            )
        free = self.free_bytes
        if free is not None and free - nbytes < self.settings.reserve_bytes:
            self.refused += 1
            raise DiskFull(
                f"the data disk has {free} bytes free, less than the reserve of "
                f"{self.settings.reserve_bytes} bytes (--disk-reserve): new durable data "
                "is refused"
            )

    def append(
        self,
        stream: DurableStream,
        base: int,
        payloads: Sequence[bytes],
        headers: Sequence[Mapping[str, str] | None] | None,
        timestamp_us: int,
        now: float,
    ) -> None:
        """Write records ``base..`` with one write (they are then WRITTEN).

        Raises:
            Unavailable: the write failed (nothing of the batch is acknowledged).
        """
        if headers is None or not any(headers):
            bare = _BARE  # the envelope of a record without headers, then its body
            batch = [(base + i, timestamp_us, bare + p) for i, p in enumerate(payloads)]
        else:
            batch = [
                (base + i, timestamp_us, encode_envelope(h, p) if h else _BARE + p)
                for i, (p, h) in enumerate(zip(payloads, headers, strict=True))
            ]
        if self.settings.encrypt:
            assert self.keys is not None
            key_id, aead = self.keys.current(stream.tenant)
            batch = seal_batch(batch, stream.key, key_id, aead)
        disk_log = stream.log
        before = disk_log.size_bytes
        if base > disk_log.next_offset:
            disk_log.skip_to(base)  # offsets reserved but never written: a gap
        try:
            disk_log.append(batch)
        except OSError as exc:
            raise Unavailable(f"cannot write stream {stream.key} to disk: {exc}") from exc
        # _used, inline (the publish path): an append only grows.
        grown = disk_log.size_bytes - before
        self.disk_used += grown
        tenant_disk = self.tenant_disk
        tenant_disk[stream.tenant] = tenant_disk.get(stream.tenant, 0) + grown
        stream.written = base + len(batch)
        settings = stream.settings
        if settings.fsync == "commit":
            self._sync_wanted[stream] = None
        elif settings.fsync == "interval" and stream.sync_due is None:
            stream.sync_due = now + settings.fsync_interval_ms / 1000.0
            self._interval[stream] = None

    def wait_sync(
        self,
        stream: DurableStream,
        end: int,
        gateway: int,
        token: int,
        request_id: int,
        reply: bytes,
    ) -> None:
        """Hold a commit ack until an fsync covers offsets below ``end``."""
        stream.waiting.append((end, gateway, token, request_id, reply))

    # -- fsync ------------------------------------------------------------------------

    def due(self, now: float) -> float | None:
        """Queue the ``interval`` streams whose time came; return the next deadline."""
        if not self._interval:
            return None
        nearest: float | None = None
        for stream in list(self._interval):
            due = stream.sync_due
            if due is None:
                del self._interval[stream]
            elif due <= now:
                stream.sync_due = None
                del self._interval[stream]
                self._sync_wanted[stream] = None
            elif nearest is None or due < nearest:
                nearest = due
        return nearest

    @property
    def interval_pending(self) -> bool:
        """Whether an ``interval`` stream has an unsynced write (due() has work)."""
        return bool(self._interval)

    def take_syncs(self) -> list[DurableStream]:
        """The streams to fsync in the next round (each once, whatever waits on it)."""
        if not self._sync_wanted or self.fatal is not None:
            return []
        wanted = [s for s in self._sync_wanted if s.damaged is None and s.unsynced]
        self._sync_wanted.clear()
        return wanted

    def synced(self, stream: DurableStream, synced_offset: int, seconds: float) -> list[Waiter]:
        """An fsync round finished for ``stream``: the acks it releases, in order."""
        self.fsyncs += 1
        self.fsync_us += int(seconds * 1e6)
        if self.streams.get(stream.key) is not stream:
            return []  # deleted meanwhile
        stream.synced = max(stream.synced, synced_offset)
        released = []
        waiting = stream.waiting
        while waiting and waiting[0][0] <= stream.synced:
            released.append(waiting.popleft())
        self.fsync_acks += len(released)
        if waiting:
            self._sync_wanted[stream] = None  # written after the round started
        return released

    def sync_failed(self, stream: DurableStream, exc: BaseException) -> None:
        """An fsync failed: never retried; every ack stops (the worker exits)."""
        if self.streams.get(stream.key) is not stream:
            return  # the stream was deleted while its sync ran
        self.fatal = f"fsync of stream {stream.key} failed: {exc}"
        for s in self.streams.values():
            s.waiting.clear()
        self._sync_wanted.clear()

    # -- reads -------------------------------------------------------------------------

    def read(
        self,
        stream: DurableStream,
        gateway: int,
        token: int,
        from_offset: int,
        max_records: int,
        max_bytes: int,
    ) -> None:
        self.disk_reads += 1
        self.reads.append(ReadJob(stream, gateway, token, from_offset, max_records, max_bytes))

    def take_reads(self) -> list[ReadJob]:
        jobs = list(self.reads)
        self.reads.clear()
        return jobs

    # -- housekeeping ------------------------------------------------------------------

    def enforce_retention(
        self, now_us: int, keep_from: Callable[[str], int | None] | None = None
    ) -> int:
        """Delete whole sealed segments beyond each stream's age/byte retention.

        ``keep_from(key)``: the lowest offset still pending in a queue group of the
        stream (None: none); no segment holding it or anything above is deleted.
        """
        freed = 0
        for stream in self.streams.values():
            s = stream.settings
            if stream.damaged is not None or (
                s.retention_age_s is None and s.retention_bytes is None
            ):
                continue
            try:
                floor = None if keep_from is None else keep_from(stream.key)
                gone = stream.log.enforce_retention(now_us, floor)
            except OSError as exc:
                log.error(
                    "shard %d: retention of stream %s failed: %s", self.shard, stream.key, exc
                )
                continue
            if gone:
                self._used(stream.tenant, -gone)
            freed += gone
        return freed

    def refresh_free(self) -> None:
        """Measure the data file system's free space (for ``--disk-reserve``)."""
        root = self.settings.root
        try:
            st = os.statvfs(root if root.exists() else root.parent)
        except OSError:
            return
        self.free_bytes = st.f_bavail * st.f_frsize

    def remove(self, key: str) -> list[Waiter]:
        """Delete ``key``'s files; returns the acks that were still waiting."""
        stream = self.streams.pop(key, None)
        if stream is None:
            return []
        self._sync_wanted.pop(stream, None)
        self._interval.pop(stream, None)
        waiting = list(stream.waiting)
        stream.waiting.clear()
        # An explicit delete removes the files, damaged or not (recovery never does).
        # First an atomic rename out of the way (fsynced), so a crash in the middle
        # never brings back part of a deleted stream; then the removal.
        path = self.path_for(key)
        trash = path.with_name(f"{_TRASH}{os.urandom(8).hex()}.{path.name}")
        try:
            if stream.opened:
                self._used(stream.tenant, -stream.log.size_bytes)
                stream.log.close()
            os.replace(path, trash)
            fsync_dir(path.parent)
            shutil.rmtree(trash)
        except OSError as exc:
            log.error("shard %d: cannot delete the files of %s: %s", self.shard, key, exc)
        return waiting

    def close(self) -> None:
        """Sync what is written and close every log (a clean stop)."""
        for stream in self.streams.values():
            if not stream.opened:
                continue
            try:
                if self.fatal is None and stream.damaged is None and stream.unsynced:
                    stream.log.sync()
            except OSError as exc:
                log.error("shard %d: final fsync of %s failed: %s", self.shard, stream.key, exc)
            try:
                stream.log.close()
            except OSError as exc:  # pragma: no cover - close of a file we own
                log.error("shard %d: cannot close %s: %s", self.shard, stream.key, exc)

    @property
    def damaged(self) -> int:
        return sum(1 for s in self.streams.values() if s.damaged is not None)

    def largest(self) -> int:
        """Bytes on disk of the largest durable stream (metrics carry no stream names)."""
        return max((s.log.size_bytes for s in self.streams.values() if s.opened), default=0)

    def status(self, key: str) -> dict[str, Any] | None:
        """The status route's JSON for ``key`` (None: not a durable stream here)."""
        stream = self.streams.get(key)
        if stream is None:
            return None
        s = stream.settings
        out: dict[str, Any] = {
            "durable": True,
            "fsync": s.fsync,
            "fsync_interval_ms": s.fsync_interval_ms,
            "retention_age_s": s.retention_age_s,
            "retention_bytes": s.retention_bytes,
            "damaged": stream.damaged,
            "waiting_acks": len(stream.waiting),
            "encryption": self._encryption_status(stream),
        }
        if not stream.opened:
            return out
        disk_log = stream.log
        report = disk_log.recovery
        out.update(
            first_offset=disk_log.first_offset,
            next_offset=disk_log.next_offset,
            synced_offset=disk_log.synced_offset,
            disk_bytes=disk_log.size_bytes,
            segments=disk_log.segments,
            recovery={
                "torn_bytes_cut": report.torn_bytes_cut,
                "segments": report.segments,
                "records": report.records,
                "first_offset": report.first_offset,
                "next_offset": report.next_offset,
                "rebuilt_indexes": report.rebuilt_indexes,
            },
        )
        return out

    def _encryption_status(self, stream: DurableStream) -> dict[str, Any]:
        """The status route's ``encryption``: whether new records are encrypted, the
        tenant's current data key, and why its keys cannot be used (None: they can)."""
        keys = self.keys
        current = None
        problem = stream.key_problem()
        if keys is not None and problem is None:
            tenant_keys = keys.keys(stream.tenant)
            current = None if tenant_keys is None else tenant_keys.current
        return {"on": self.settings.encrypt, "key_id": current, "problem": problem}


def _subdirs(path: Path) -> Iterator[str]:
    """Directories in ``path`` (stream names never start with a dot; trash may)."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if entry.is_dir(follow_symlinks=False) and (
                    not name.startswith(".") or name.startswith(_TRASH)
                ):
                    yield name
    except OSError as exc:
        raise FelixError(f"cannot list {path}: {exc}") from exc
