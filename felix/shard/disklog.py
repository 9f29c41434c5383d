"""DiskLog: one durable stream's append-only log on disk (segments + sparse indexes).

Threads (and why this is safe):

* **One writer** (the shard's loop thread) calls :meth:`append`, :meth:`skip_to`,
  :meth:`enforce_retention`, :meth:`close`. An append frames the whole batch into one
  bytes object and hands it to the kernel with one ``os.write`` (no user-space buffer:
  bytes in a Python buffer die with ``kill -9``, bytes in the page cache do not).
  The hot path neither rescans nor re-checksums what it wrote.
* **One fsync thread** may call :meth:`sync` concurrently with appends. It takes the
  lock only to copy what to sync (a ``dup`` of the active fd and the published end),
  then runs ``fdatasync`` without the lock, so the writer is never blocked by a sync.
* **Reader threads** call :meth:`read` / :meth:`offset_for_time` concurrently. Each
  call opens its own fd and reads with ``pread`` only below the end position the
  writer published *after* its write returned (one tuple assignment, atomic under the
  GIL), so a reader never sees a partially written record. A segment removed by
  retention under a reader is noticed and the read restarts at the new first offset.

Rolling: a batch that would grow the active segment past ``segment_bytes`` goes to a
new segment. The old one (and the directory) is fsynced *before* the new file is
created (on the writer thread, once per ``segment_bytes``), so a sealed segment is
always whole on disk: only the newest segment can have a torn tail after a crash or
power loss, and :attr:`synced_offset` covers everything below the new base.

Failures: an ``OSError`` from ``fdatasync`` (or a write that cannot be undone) is
raised once and poisons the log: every later call raises
:class:`~felix.errors.LogPoisoned`. fsync errors are never retried (the kernel may
have dropped the dirty pages; a second fsync would lie). A write refused for lack of
space is cut back and raised as :class:`~felix.errors.DiskFull`, the log stays usable.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from felix.errors import DiskFull, LogDamaged, LogPoisoned
from felix.shard.log_format import SEGMENT_HEADER_SIZE, encode_batch, encode_segment_header
from felix.shard.log_index import IndexInfo, write_index
from felix.shard.log_recovery import RecoveryReport, recover_segments
from felix.shard.log_segment import DiskRecord, Scanner, Segment, index_path, segment_name

__all__ = ["DiskLog", "DiskLogSettings", "DiskRecord", "RecoveryReport"]

_log = logging.getLogger(__name__)

#: How many directories above a log's own are fsynced when it opens: the stream's
#: directory sits in <data-dir>/streams/<tenant>/<namespace>/, which the shard may
#: just have created; their entries must be on disk before anything is called synced.
PARENT_DIRS_SYNCED = 3


@dataclass(frozen=True)
class DiskLogSettings:
    segment_bytes: int = 256 * 2**20
    index_interval_bytes: int = 4096
    retention_age_s: float | None = None
    retention_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {self.segment_bytes}")
        if self.index_interval_bytes < 64:
            raise ValueError("index_interval_bytes must be at least 64")
        if self.retention_age_s is not None and self.retention_age_s < 0:
            raise ValueError("retention_age_s must not be negative")
        if self.retention_bytes is not None and self.retention_bytes < 0:
            raise ValueError("retention_bytes must not be negative")


class _View(NamedTuple):
    """What readers may see: replaced whole (one assignment) after each change."""

    segments: tuple[Segment, ...]
    end: int  # readable bytes of the active (last) segment
    next_offset: int


def _wall_us() -> int:
    return time.time_ns() // 1000


def fsync_dir(path: Path) -> None:
    """fsync a directory (a rename or a new file in it is durable after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskLog:
    """The log of one durable stream; see the module docstring for threads."""

    recovery: RecoveryReport

    def __init__(self, directory: Path, settings: DiskLogSettings, clock: Callable[[], int]):
        # Use DiskLog.open(): this only sets fields.
        self.directory = directory
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._fd = -1  # write fd of the active segment
        self._next_offset = 0
        self._synced_offset = 0
        self._size_bytes = 0
        self._index_mark = SEGMENT_HEADER_SIZE
        self._dir_dirty = False
        self._poisoned: BaseException | None = None
        self._closed = False
        self._view = _View((), SEGMENT_HEADER_SIZE, 0)

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        settings: DiskLogSettings,
        *,
        first_offset: int,
        full_check: bool = False,
        clock: Callable[[], int] = _wall_us,
    ) -> DiskLog:
        """Open (creating when missing) and recover the log in ``directory``.

        ``first_offset`` is where a new log starts; an existing log continues at
        ``max(its end, first_offset)``. A torn tail of the newest segment is cut and
        reported in :attr:`recovery`; any other damage raises
        :class:`~felix.errors.LogDamaged` and changes nothing. ``full_check``
        verifies every record of every sealed segment too (else they are checked by
        header and index, and their records when read).
        """
        if first_offset < 0:
            raise ValueError(f"first_offset must not be negative, got {first_offset}")
        if ".." in directory.parts:
            raise ValueError(f"log directory {directory} must not contain '..'")
        log = cls(directory, settings, clock)
        directory.mkdir(parents=True, exist_ok=True)
        segments, torn, rebuilt = recover_segments(
            directory, settings.index_interval_bytes, clock(), full_check
        )
        if not segments:
            segments = [log._create_segment(first_offset)]
        log._segments = segments
        active = segments[-1]
        log._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
        # What a killed writer left in the page cache is not on disk yet: flush it
        # (sealed segments were flushed when they rolled) before calling it synced.
        os.fdatasync(log._fd)
        # ... and the directory entries down to it (whoever created the directories):
        # the stream, namespace, tenant and streams directories of the layout.
        for level in (directory, *directory.parents[:PARENT_DIRS_SYNCED]):
            fsync_dir(level)
        log._dir_dirty = False
        log._size_bytes = sum(s.size for s in segments)
        end = max(active.last_offset + 1, active.base_offset)
        log._next_offset = max(end, first_offset)
        log._synced_offset = end
        log._index_mark = (
            active.index.last_position() + settings.index_interval_bytes
            if len(active.index)
            else SEGMENT_HEADER_SIZE
        )
        log._publish()
        log.recovery = RecoveryReport(
            torn_bytes_cut=torn,
            segments=len(segments),
            records=sum(s.records for s in segments),
            first_offset=log.first_offset,
            next_offset=log._next_offset,
            rebuilt_indexes=rebuilt,
        )
        return log

    def _create_segment(self, base: int) -> Segment:
        """A new segment file holding only its header (the directory is not fsynced
        here: :meth:`sync` does that before it reports anything in it as synced).
        On failure no file is left behind (a retry must be able to create it)."""
        created = self._clock()
        path = self.directory / segment_name(base)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            header = encode_segment_header(base, created)
            if os.write(fd, header) != len(header):
                raise OSError(errno.ENOSPC, "short write of a segment header")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        os.close(fd)
        self._dir_dirty = True
        return Segment(path, base, created)

    # -- state -----------------------------------------------------------------------

    @property
    def next_offset(self) -> int:
        return self._next_offset

    @property
    def first_offset(self) -> int:
        """The lowest offset a read can return (``next_offset`` when empty)."""
        for seg in self._view.segments:
            if seg.records:
                return seg.first_offset
        return self._view.next_offset

    def tail_start(self, records: int) -> int:
        """An offset from which the log holds at least its newest ``records`` records
        (or all of them): the first offset of the newest whole segments holding that
        many. For a reader that wants the tail and knows offsets may have gaps."""
        start = self._view.next_offset
        held = 0
        for seg in reversed(self._view.segments):
            if held >= records:
                break
            if seg.records:
                start = seg.first_offset
                held += seg.records
        return start

    @property
    def synced_offset(self) -> int:
        """Every record below this offset is fsynced (survives power loss)."""
        return self._synced_offset

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def segments(self) -> int:
        return len(self._view.segments)

    def _check(self) -> None:
        if self._poisoned is not None:
            raise LogPoisoned(f"log {self.directory} failed earlier: {self._poisoned}")
        if self._closed:
            raise LogPoisoned(f"log {self.directory} is closed")

    def _publish(self, segments_changed: bool = True) -> None:
        """Give readers a new view (one assignment). ``segments_changed=False`` (every
        append that does not roll) reuses the segment tuple of the current view."""
        segs = tuple(self._segments) if segments_changed else self._view.segments
        self._view = _View(segs, segs[-1].size, self._next_offset)

    # -- writing ---------------------------------------------------------------------

    def append(self, records: Sequence[tuple[int, int, bytes]]) -> None:
        """Append (offset, timestamp_us, payload) records with one ``os.write``.

        Offsets must be strictly increasing and >= :attr:`next_offset` (gaps are
        allowed). An invalid record refuses the whole batch before anything is written.
        """
        self._check()
        if not records:
            return
        active = self._segments[-1]
        interval = self.settings.index_interval_bytes
        data, entries, mark, max_ts = encode_batch(
            records, self._next_offset, active.size, self._index_mark, interval, active.max_ts
        )
        if active.records and active.size + len(data) > self.settings.segment_bytes:
            active = self._roll()
            data, entries, mark, max_ts = encode_batch(
                records, self._next_offset, active.size, self._index_mark, interval, 0
            )
        self._write(data, active.size)
        active.index.add(entries)
        active.size += len(data)
        active.records += len(records)
        active.last_offset = records[-1][0]
        active.max_ts = max_ts
        self._index_mark = mark
        self._size_bytes += len(data)
        self._next_offset = records[-1][0] + 1
        self._publish(segments_changed=False)

    def _write(self, data: bytes, at: int) -> None:
        """One ``os.write``; a short write (disk full, signal) continues; a failure
        cuts the file back to ``at`` (nothing of this batch stays) or poisons the log."""
        fd = self._fd
        try:
            n = os.write(fd, data)
            if n < len(data):
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            try:
                os.ftruncate(fd, at)
            except OSError as cut:
                self._poisoned = cut
                raise LogPoisoned(
                    f"log {self.directory}: write failed and could not be undone: {cut}"
                ) from exc
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full writing log {self.directory}: {exc}") from exc
            self._poisoned = exc
            raise

    def _roll(self) -> Segment:
        """Seal the active segment (fdatasync it, write its index) and start a new one.

        The new base is :attr:`next_offset`, not the batch's first offset: should the
        batch's write fail, a later batch may still use any offset >= next_offset.
        """
        base = self._next_offset
        old = self._segments[-1]
        try:
            # The old segment and its directory entry are on disk before the new file
            # exists: a sealed segment is never torn, and everything below ``base``
            # is synced (the directory is flushed every time: a sync thread may hold
            # the dirty flag at this moment, and this is once per segment_bytes).
            os.fdatasync(self._fd)
            fsync_dir(self.directory)
        except OSError as exc:
            self._poisoned = exc
            raise
        try:
            write_index(index_path(old.path), _info(old))
        except OSError as exc:  # derived data: open() rebuilds a missing index
            _log.warning(
                "log %s: could not write the index of %s: %s", self.directory, old.path, exc
            )
        try:
            new = self._create_segment(base)
            fd = os.open(new.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    f"disk full starting a segment of log {self.directory}: {exc}"
                ) from exc
            raise
        with self._lock:
            os.close(self._fd)
            self._fd = fd
            self._segments.append(new)
            self._size_bytes += new.size
            self._index_mark = SEGMENT_HEADER_SIZE
            self._synced_offset = max(self._synced_offset, base)
            self._publish()
        return new

    def skip_to(self, offset: int) -> None:
        """Make the next offset ``offset`` (a reserved or lost range becomes a gap)."""
        self._check()
        if offset < self._next_offset:
            raise ValueError(f"skip_to({offset}) is below next_offset {self._next_offset}")
        self._next_offset = offset
        self._publish(segments_changed=False)

    def sync(self) -> int:
        """fdatasync everything written so far; returns the new :attr:`synced_offset`.

        Safe from one fsync thread while the writer appends. An ``OSError`` is raised
        once and poisons the log (never retried). After :meth:`close` it changes
        nothing and returns the last synced offset.
        """
        with self._lock:
            if self._closed and self._poisoned is None:
                return self._synced_offset  # a late call from the fsync thread
            self._check()
            target = self._view.next_offset
            if target <= self._synced_offset and not self._dir_dirty:
                return self._synced_offset  # nothing written since the last sync
            fd = os.dup(self._fd)
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        try:
            os.fdatasync(fd)
            if dir_dirty:
                fsync_dir(self.directory)
        except OSError as exc:
            self._poisoned = exc
            raise
        finally:
            os.close(fd)
        with self._lock:
            if target > self._synced_offset:
                self._synced_offset = target
            return self._synced_offset

    # -- reading ---------------------------------------------------------------------

    def read(self, from_offset: int, max_records: int, max_bytes: int) -> list[DiskRecord]:
        """Records with offsets >= ``from_offset`` (the first one even when it alone
        exceeds ``max_bytes``), at most ``max_records``. Below the first retained
        offset the read starts at the first record. Safe from reader threads."""
        self._check()
        if max_records <= 0:
            return []
        for _attempt in range(8):
            view = self._view
            try:
                return self._read_view(view, from_offset, max_records, max_bytes)
            except FileNotFoundError:
                if self._view.segments[0] is view.segments[0]:
                    raise  # not retention: a file vanished under the log
        raise LogPoisoned(f"log {self.directory}: segments kept vanishing under a read")

    def _read_view(
        self, view: _View, from_offset: int, max_records: int, max_bytes: int
    ) -> list[DiskRecord]:
        segs = view.segments
        bases = [s.base_offset for s in segs]
        i = max(bisect.bisect_right(bases, from_offset) - 1, 0)
        out: list[DiskRecord] = []
        nbytes = 0
        for seg in segs[i:]:
            end = view.end if seg is segs[-1] else seg.size
            if seg.records == 0 or end <= SEGMENT_HEADER_SIZE:
                continue
            pos = seg.index.position_for(from_offset, end)
            fd = os.open(seg.path, os.O_RDONLY)
            try:
                chunk = min(max(max_bytes - nbytes + 64 * 28, 4096), 1 << 20)
                scanner = Scanner(fd, pos, end, -1, chunk=chunk)
                got = scanner.collect(from_offset, max_records - len(out), max_bytes - nbytes)
                if out and got and nbytes + len(got[0].payload) > max_bytes:
                    return out  # the first record of this segment would not fit
                out.extend(got)
                nbytes += sum(len(r.payload) for r in got)
                if scanner.error is not None:
                    raise LogDamaged(str(seg.path), scanner.stopped_at, scanner.error)
                if scanner.limited:
                    return out
            finally:
                os.close(fd)
        return out

    def offset_for_time(self, timestamp_us: int) -> int:
        """The first offset whose record has a timestamp >= ``timestamp_us``
        (:attr:`next_offset` when there is none)."""
        self._check()
        view = self._view
        for seg in view.segments:
            if seg.records == 0 or seg.max_ts < timestamp_us:
                continue
            end = view.end if seg is view.segments[-1] else seg.size
            fd = os.open(seg.path, os.O_RDONLY)
            try:
                scanner = Scanner(fd, seg.index.position_for_time(timestamp_us, end), end, -1)
                for _pos, offset, ts, _payload in scanner:
                    if ts >= timestamp_us:
                        return offset
                if scanner.error is not None:
                    raise LogDamaged(str(seg.path), scanner.stopped_at, scanner.error)
            finally:
                os.close(fd)
        return view.next_offset

    # -- retention and lifecycle -----------------------------------------------------

    def enforce_retention(self, now_us: int, keep_from: int | None = None) -> int:
        """Delete whole sealed segments beyond the age or byte cap; returns bytes freed.

        Never the active segment, never one holding an offset >= ``keep_from``.
        """
        self._check()
        age = self.settings.retention_age_s
        cap = self.settings.retention_bytes
        freed = 0
        while len(self._segments) > 1:
            seg, nxt = self._segments[0], self._segments[1]
            if keep_from is not None and nxt.base_offset > keep_from:
                break
            too_old = age is not None and seg.max_ts < now_us - age * 1e6
            too_big = cap is not None and self._size_bytes > cap
            if not (too_old or too_big):
                break
            with self._lock:
                self._segments.pop(0)
                self._size_bytes -= seg.size
                self._dir_dirty = True
                self._publish()
            freed += seg.size
            # The index first: a crash between the two leaves a sealed segment without
            # an index (rebuilt on open, deleted by the next run), never an orphan index
            # that nothing would ever remove.
            for path in (index_path(seg.path), seg.path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return freed

    def close(self) -> None:
        """Close the files (writing the active segment's index is not needed: the
        newest segment is always scanned on open)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def delete(self) -> None:
        """Close the log and remove its directory."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=False)
        with contextlib.suppress(OSError):
            fsync_dir(self.directory.parent)


def _info(seg: Segment) -> IndexInfo:
    return IndexInfo(seg.base_offset, seg.size, seg.last_offset, seg.max_ts, seg.records, seg.index)
