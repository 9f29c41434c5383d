"""Open-time recovery of a log directory: find the segments, check them, cut a torn tail.

Rules (docs/log-format.md, "Recovery"):

* Segment files are ``<base:020d>.seg``; anything else is ignored (``.tmp`` files are
  unfinished index writes). Their header must name the base their file name does.
* Sealed segments (all but the newest) are checked by header + index: a missing,
  stale or damaged index is rebuilt by a full scan, and so is every index with
  ``full_check``. Any bad record found by such a scan is :class:`LogDamaged`.
* The active (newest) segment is always scanned. A bad spot with no valid record
  after it is a torn tail: the file is truncated to the end of the last whole
  record and the cut bytes are reported. A bad spot with a valid record after it is
  damage (bit flip, overwritten block): :class:`LogDamaged`, nothing changed.
* A newest segment shorter than its 32-byte header is a roll that did not finish;
  its header is written again (counted as torn bytes).
* Offsets must increase across segments: a segment's records lie in
  ``[base, next segment's base)``.

Every step either changes nothing or does what a second run would do again, so a
crash during recovery leaves a directory that recovers the same way (idempotent).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from felix.errors import LogDamaged
from felix.shard.log_format import (
    SEGMENT_HEADER_SIZE,
    decode_segment_header,
    encode_segment_header,
)
from felix.shard.log_index import IndexInfo, SparseIndex, decode_index, write_index
from felix.shard.log_segment import Scanner, Segment, index_path, valid_record_after

__all__ = ["TORN_SEARCH_LIMIT", "RecoveryReport", "recover_segments"]

_SEG_RE = re.compile(r"^(\d{20})\.seg$")
#: How far past a bad spot in the active segment recovery looks for a valid record
#: (to tell a torn tail from damage). A bad spot followed by more bytes than this is
#: refused as damage: an operator decides (a torn write is at most one batch).
TORN_SEARCH_LIMIT = 8 * 2**20


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`DiskLog.open` found and did."""

    torn_bytes_cut: int
    segments: int
    records: int
    first_offset: int
    next_offset: int
    rebuilt_indexes: int


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in os.scandir(directory):
        m = _SEG_RE.match(entry.name)
        if m:
            found.append((int(m.group(1)), Path(entry.path)))
    found.sort()
    return found


def _read_header(path: Path, fd: int, base: int) -> int:
    """The created_us of a segment whose header is valid and names ``base``."""
    got = decode_segment_header(os.pread(fd, SEGMENT_HEADER_SIZE, 0))
    if isinstance(got, str):
        raise LogDamaged(str(path), 0, got)
    if got.base_offset != base:
        raise LogDamaged(str(path), 8, f"header base {got.base_offset} != file name's {base}")
    return got.created_us


def _scan_into(seg: Segment, fd: int, end: int, index_interval: int) -> Scanner:
    """Scan ``seg`` from its first record to ``end``, filling its index entries."""
    scanner = Scanner(fd, SEGMENT_HEADER_SIZE, end, seg.base_offset - 1)
    seg.index = SparseIndex()
    seg.index.add(scanner.index(index_interval, SEGMENT_HEADER_SIZE))
    seg.size = scanner.stopped_at
    seg.last_offset = scanner.last_offset if scanner.records else -1
    seg.max_ts = scanner.max_ts
    seg.records = scanner.records
    return scanner


def _open_sealed(
    path: Path, base: int, index_interval: int, full_check: bool
) -> tuple[Segment, bool]:
    """A sealed segment, checked; True when its index had to be rebuilt."""
    fd = os.open(path, os.O_RDONLY)
    try:
        created = _read_header(path, fd, base)
        size = os.fstat(fd).st_size
        seg = Segment(path, base, created, size)
        ipath = index_path(path)
        info: IndexInfo | str
        try:
            info = decode_index(ipath.read_bytes(), base, size)
        except FileNotFoundError:
            info = "index missing"
        if isinstance(info, IndexInfo) and not full_check and _spot_check(fd, size, info):
            seg.index = info.index
            seg.last_offset, seg.max_ts, seg.records = info.last_offset, info.max_ts, info.records
            return seg, False
        scanner = _scan_into(seg, fd, size, index_interval)
        if scanner.error is not None:
            raise LogDamaged(str(path), scanner.stopped_at, scanner.error)
        write_index(ipath, _info_of(seg))
        return seg, True
    finally:
        os.close(fd)


def _spot_check(fd: int, size: int, info: IndexInfo) -> bool:
    """Does the last indexed record really start where the index says? (Cheap: one
    header read; catches an index that is whole but belongs to other bytes.)"""
    if not len(info.index):
        return True
    off, pos = info.index.offsets[-1], info.index.positions[-1]
    scanner = Scanner(fd, pos, size, off - 1, chunk=4096)
    for _pos, offset, _ts, _p in scanner:
        return offset == off
    return False


def _info_of(seg: Segment) -> IndexInfo:
    return IndexInfo(seg.base_offset, seg.size, seg.last_offset, seg.max_ts, seg.records, seg.index)


def _open_active(
    path: Path, base: int, index_interval: int, created_us: int
) -> tuple[Segment, int]:
    """The active segment, its torn tail cut; returns it and the bytes cut."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size < SEGMENT_HEADER_SIZE:
            # A roll that did not finish writing the header: no record can be in it.
            os.ftruncate(fd, 0)
            os.pwrite(fd, encode_segment_header(base, created_us), 0)
            os.fsync(fd)
            return Segment(path, base, created_us), size
        created = _read_header(path, fd, base)
        seg = Segment(path, base, created, size)
        scanner = _scan_into(seg, fd, size, index_interval)
        if scanner.error is None:
            return seg, 0
        bad = scanner.stopped_at
        later = valid_record_after(fd, bad, size, scanner.last_offset, TORN_SEARCH_LIMIT)
        if later is not None or size - bad > TORN_SEARCH_LIMIT:
            why = scanner.error
            why += (
                f"; a valid record follows at byte {later}, so this is not a torn tail"
                if later is not None
                else f"; {size - bad} bytes follow, too many for a torn tail"
            )
            raise LogDamaged(str(path), bad, why)
        os.ftruncate(fd, bad)
        os.fsync(fd)  # the cut is final before anything new is appended after it
        return seg, size - bad
    finally:
        os.close(fd)


def recover_segments(
    directory: Path, index_interval: int, created_us: int, full_check: bool
) -> tuple[list[Segment], int, int]:
    """Check and repair ``directory``: its segments (oldest first), the torn bytes
    cut and the number of indexes rebuilt. No segment at all: an empty list."""
    found = list_segments(directory)
    segments: list[Segment] = []
    rebuilt = 0
    torn = 0
    for i, (base, path) in enumerate(found):
        if i + 1 < len(found):
            seg, did = _open_sealed(path, base, index_interval, full_check)
            rebuilt += did
        else:
            seg, torn = _open_active(path, base, index_interval, created_us)
        if segments and segments[-1].last_offset >= base:
            prev = segments[-1]
            raise LogDamaged(
                str(prev.path),
                prev.size,
                f"last offset {prev.last_offset} is not below the next segment's base {base}",
            )
        segments.append(seg)
    return segments, torn, rebuilt
