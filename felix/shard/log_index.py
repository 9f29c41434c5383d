"""The sparse offset index of a sealed segment (``<base:020d>.idx``).

The index is derived data: it lets a reader find an offset (or a time) in a sealed
segment without scanning it, and lets open() learn a sealed segment's last offset,
record count and newest timestamp without reading it. It is never trusted blindly:
a missing file, a CRC mismatch, or a file that describes a different segment size or
base than the ``.seg`` next to it makes the opener rebuild it from a full scan.

Layout (big-endian)::

    magic b"FLIX" | u16 version=1 | u16 flags=0 | u64 base_offset | u64 segment_size
    | u64 last_offset | u64 max_timestamp_us | u32 record_count | u32 entry_count
    then entry_count entries: u64 offset | u64 file_position | u64 max_ts_before
    then u32 crc (CRC-32 of every byte before it)

An entry names a record that starts at ``file_position``; ``max_ts_before`` is the
highest timestamp of the records before it in the segment (0 for none), which makes
"first record with timestamp >= t" a binary search even when the clock stepped back.
Entries are written about every ``index_interval_bytes`` of segment; the first
record always has one.
"""

from __future__ import annotations

import bisect
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Final

from felix.shard.log_format import SEGMENT_HEADER_SIZE

__all__ = [
    "INDEX_MAGIC",
    "IndexInfo",
    "SparseIndex",
    "decode_index",
    "encode_index",
    "write_index",
]

INDEX_MAGIC: Final = b"FLIX"
INDEX_VERSION: Final = 1
_HEAD = struct.Struct(">4sHHQQQQII")
_ENTRY_SIZE = 24  # u64 offset | u64 file_position | u64 max_ts_before
_U32 = struct.Struct(">I")
#: An index never holds more entries than this (a 4 GiB segment at a 4 KiB interval
#: needs a million): a larger count in a file is damage, not an allocation request.
MAX_ENTRIES: Final = 4 * 2**20


class SparseIndex:
    """Index entries of one segment in three ``array('q')`` columns: 24 bytes an entry
    (a 256 MiB segment at the 4 KiB default: 1.5 MiB), not ~170 bytes of tuples.

    The writer thread adds entries while reader threads look positions up. Each
    ``extend`` is atomic under the GIL, and the columns grow in the order positions,
    max_ts_before, offsets, so a reader that found an index in ``offsets`` (or in
    ``max_ts_before``) always finds its position; entries past the end a reader may
    see are skipped by the ``end`` argument.
    """

    __slots__ = ("max_ts_before", "offsets", "positions")

    def __init__(self) -> None:
        self.offsets = array("q")
        self.positions = array("q")
        self.max_ts_before = array("q")

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.offsets, self.positions, self.max_ts_before, strict=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseIndex) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def add(self, entries: Sequence[tuple[int, int, int]]) -> None:
        """Append (offset, file_position, max_ts_before) entries (see the class doc)."""
        if not entries:
            return
        self.positions.extend(e[1] for e in entries)
        self.max_ts_before.extend(e[2] for e in entries)
        self.offsets.extend(e[0] for e in entries)

    def last_position(self) -> int:
        return self.positions[len(self.offsets) - 1]

    def position_for(self, offset: int, end: int) -> int:
        """A record start at or before the first record with an offset >= ``offset``,
        among entries below ``end``."""
        i = bisect.bisect_right(self.offsets, offset) - 1
        positions = self.positions
        while i >= 0 and positions[i] >= end:
            i -= 1  # an entry the writer added past what this reader may see
        return positions[i] if i >= 0 else SEGMENT_HEADER_SIZE

    def position_for_time(self, timestamp_us: int, end: int) -> int:
        """A record start at or before the first record with a timestamp >= the given
        one: the last entry whose earlier records are all older (``max_ts_before`` is
        non-decreasing, so this is a binary search)."""
        i = bisect.bisect_left(self.max_ts_before, timestamp_us)
        positions = self.positions
        while i > 0 and positions[i - 1] >= end:
            i -= 1
        return positions[i - 1] if i > 0 else SEGMENT_HEADER_SIZE

    def to_bytes(self) -> bytes:
        """The entries as the file stores them: big-endian (offset, position, ts)."""
        n = len(self.offsets)
        flat = array("q", bytes(24 * n))
        flat[0::3] = self.offsets[:n]
        flat[1::3] = self.positions[:n]
        flat[2::3] = self.max_ts_before[:n]
        if sys.byteorder == "little":
            flat.byteswap()
        return flat.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SparseIndex:
        """Entries stored as :meth:`to_bytes` writes them (values must fit 63 bits)."""
        flat = array("q")
        flat.frombytes(data)
        if sys.byteorder == "little":
            flat.byteswap()
        index = cls()
        index.positions = flat[1::3]
        index.max_ts_before = flat[2::3]
        index.offsets = flat[0::3]
        return index


@dataclass
class IndexInfo:
    """What a segment's index file says."""

    base_offset: int
    segment_size: int
    last_offset: int  # -1 when the segment holds no record
    max_ts: int
    records: int
    index: SparseIndex = field(default_factory=SparseIndex)


def encode_index(info: IndexInfo) -> bytes:
    body = (
        _HEAD.pack(
            INDEX_MAGIC,
            INDEX_VERSION,
            0,
            info.base_offset,
            info.segment_size,
            max(info.last_offset, 0),
            info.max_ts,
            info.records,
            len(info.index),
        )
        + info.index.to_bytes()
    )
    return body + _U32.pack(zlib.crc32(body))


def decode_index(data: bytes, base_offset: int, segment_size: int) -> IndexInfo | str:
    """The index in ``data`` if it is whole and describes this segment, else why not."""
    if len(data) < _HEAD.size + 4:
        return "index truncated"
    (crc,) = _U32.unpack_from(data, len(data) - 4)
    if crc != zlib.crc32(memoryview(data)[:-4]):
        return "index CRC mismatch"
    magic, version, flags, base, size, last, max_ts, records, count = _HEAD.unpack_from(data)
    if magic != INDEX_MAGIC or version != INDEX_VERSION or flags:
        return "not a version 1 index"
    if count > MAX_ENTRIES or len(data) != _HEAD.size + count * _ENTRY_SIZE + 4:
        return "index length does not match its entry count"
    if base != base_offset:
        return f"index is for base offset {base}, the segment's is {base_offset}"
    if size != segment_size:
        return f"index describes {size} segment bytes, the segment has {segment_size} (stale)"
    index = SparseIndex.from_bytes(memoryview(data)[_HEAD.size : -4])
    offs, poss = index.offsets, index.positions
    if count and (
        offs[0] < base_offset
        or poss[0] != SEGMENT_HEADER_SIZE
        or offs[-1] > last
        or poss[-1] >= segment_size
        or not all(a < b for a, b in pairwise(offs))
        or not all(a < b for a, b in pairwise(poss))
        or min(index.max_ts_before) < 0
    ):
        return "index entries out of order or outside the segment"
    if records and not count:
        return "index does not start at the first record"
    if not records and (count or size != SEGMENT_HEADER_SIZE):
        return "index of an empty segment lists records"
    return IndexInfo(base, size, last if records else -1, max_ts, records, index)


def write_index(path: Path, info: IndexInfo) -> None:
    """Write ``path`` whole or not at all (temporary file + rename).

    No fsync: the index is derived; after a power loss a stale or torn index is
    detected by its CRC and size and rebuilt from the segment.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = encode_index(info)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)
