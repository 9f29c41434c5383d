"""One segment file: its in-memory description, the record scanner, positioned reads.

A :class:`Segment` describes a ``<base:020d>.seg`` file: where its records end, its
last offset, its sparse index. The writer (:mod:`felix.shard.disklog`) mutates the
active segment's description on the loop thread; readers never look at ``size`` of
the active segment directly but at the end position published with the log's view,
so they never read bytes whose write has not returned.

:class:`Scanner` walks records with ``os.pread`` in chunks (bounded memory), checking
both CRCs and that offsets increase. It stops at the first bad record and says where
and why, so each caller decides what that means: recovery may cut a torn tail of the
active segment, a read raises :class:`~felix.errors.LogDamaged`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from felix import _logscan
from felix.shard.log_format import (
    MAX_PAYLOAD_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
)
from felix.shard.log_index import SparseIndex

__all__ = ["SCAN_CHUNK", "DiskRecord", "Scanner", "Segment", "index_path", "segment_name"]

#: Bytes a scan reads per ``pread``: big enough to amortise the syscall, small enough
#: that a reader thread holds little memory.
SCAN_CHUNK = 256 * 1024


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}.seg"


def index_path(seg_path: Path) -> Path:
    return seg_path.with_suffix(".idx")


@dataclass(eq=False)
class Segment:
    """What the log knows about one segment file (positions are file positions)."""

    path: Path
    base_offset: int
    created_us: int
    #: End of the last whole record (for the active segment: written by the writer).
    size: int = SEGMENT_HEADER_SIZE
    last_offset: int = -1  # -1: no record yet
    max_ts: int = 0
    records: int = 0
    #: The sparse index (every segment has one in memory; sealed ones also on disk).
    index: SparseIndex = field(default_factory=SparseIndex)

    @property
    def first_offset(self) -> int:
        """The first record's offset (the base when the segment holds no record)."""
        return self.index.offsets[0] if self.records else self.base_offset


class DiskRecord(NamedTuple):
    """One record read from a log (re-exported by :mod:`felix.shard.disklog`)."""

    offset: int
    timestamp_us: int
    payload: bytes


#: (records collected, index entries) of one compiled scan call.
_Batch = tuple[list[DiskRecord], list[tuple[int, int, int]]]


class Scanner:
    """Scan the records of a segment from ``start`` up to ``end`` (exclusive).

    Iterating yields ``(position, offset, timestamp_us, payload)``; :meth:`collect`,
    :meth:`index` and :meth:`run` are the fast paths (reads, recovery). After a scan,
    ``stopped_at`` is the end of the last whole, valid record and ``error`` is
    ``None`` or why the record at ``stopped_at`` is not valid (a short record at
    ``end`` counts: the scanner cannot tell a torn write from damage; callers can).
    ``after_offset`` is the offset the first record must exceed. The per-record work
    is compiled (:mod:`felix._logscan`); this class reads ``chunk`` bytes per
    ``pread`` (more when one record is bigger), so memory stays bounded.
    """

    def __init__(
        self, fd: int, start: int, end: int, after_offset: int, chunk: int = SCAN_CHUNK
    ) -> None:
        self.fd = fd
        self.start = start
        self.end = end
        self.after_offset = after_offset
        self.chunk = chunk
        self.stopped_at = start
        self.error: str | None = None
        self.last_offset = after_offset
        self.max_ts = 0
        self.records = 0
        #: True when a collection limit (records, bytes) ended the scan.
        self.limited = False

    def _batches(
        self,
        *,
        records: bool,
        min_offset: int = -1,
        max_records: int = sys.maxsize,
        max_bytes: int = sys.maxsize,
        index_interval: int | None = None,
        index_mark: int = 0,
    ) -> Iterator[_Batch]:
        fd, end, chunk = self.fd, self.end, self.chunk
        pos = self.stopped_at
        buf = b""
        buf_pos = pos  # file position of buf[0]
        need = RECORD_HEADER_SIZE
        collected = nbytes = 0
        while pos < end:
            if pos - buf_pos + need > len(buf):
                buf = os.pread(fd, min(max(chunk, need), end - pos), pos)
                buf_pos = pos
                if len(buf) < need:
                    left = end - pos
                    self.error = (
                        f"truncated record header ({left} bytes left)"
                        if need == RECORD_HEADER_SIZE
                        else f"record of {need - RECORD_HEADER_SIZE} bytes runs past the end "
                        f"({left} left)"
                    )
                    return
            out: list[DiskRecord] | None = [] if records else None
            entries: list[tuple[int, int, int]] | None = [] if index_interval is not None else None
            rel, last, max_ts, scanned, got, nb, index_mark, need, error = _logscan.scan(
                buf,
                pos - buf_pos,
                self.last_offset,
                MAX_PAYLOAD_BYTES,
                min_offset,
                max_records - collected,
                max_bytes - nbytes,
                collected > 0,
                DiskRecord,
                out,
                entries,
                index_mark,
                index_interval or 0,
                buf_pos,
                self.max_ts,
            )
            pos = buf_pos + rel
            self.stopped_at = pos
            self.last_offset, self.max_ts = last, max_ts
            self.records += scanned
            collected += got
            nbytes += nb
            if scanned:
                yield out or [], entries or []
            if error is not None:
                self.error = error
                return
            if need == 0:
                self.limited = True
                return

    def __iter__(self) -> Iterator[tuple[int, int, int, bytes]]:
        for recs, entries in self._batches(records=True, index_interval=0):
            for rec, entry in zip(recs, entries, strict=True):
                yield entry[1], rec.offset, rec.timestamp_us, rec.payload

    def collect(self, min_offset: int, max_records: int, max_bytes: int) -> list[DiskRecord]:
        """Records with offsets >= ``min_offset``, at most ``max_records``, their
        payloads within ``max_bytes`` (the first one whatever its size)."""
        out: list[DiskRecord] = []
        for recs, _ in self._batches(
            records=True, min_offset=min_offset, max_records=max_records, max_bytes=max_bytes
        ):
            out.extend(recs)
        return out

    def index(self, interval: int, mark: int) -> list[tuple[int, int, int]]:
        """Scan to the end or the first bad record; the sparse index entries due."""
        entries: list[tuple[int, int, int]] = []
        for _, ents in self._batches(records=False, index_interval=interval, index_mark=mark):
            entries.extend(ents)
        return entries

    def run(self) -> None:
        """Scan to the end or the first bad record, keeping only the counters."""
        for _ in self._batches(records=False):
            pass


def valid_record_after(fd: int, start: int, end: int, after_offset: int, limit: int) -> int | None:
    """The position of a valid record in ``(start, end)`` (header CRC, payload CRC and
    an offset above ``after_offset`` all check out), looking at no more than ``limit``
    bytes; ``None`` if there is none. Recovery uses it to tell a torn tail (nothing
    valid after the bad spot) from damage in the middle of the active segment."""
    data = os.pread(fd, min(end, start + limit) - start, start)
    found = _logscan.find_record(data, 0, after_offset, MAX_PAYLOAD_BYTES)
    return None if found < 0 else start + found
