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

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from felix.shard.log_format import SEGMENT_HEADER_SIZE

__all__ = ["INDEX_MAGIC", "IndexInfo", "decode_index", "encode_index", "write_index"]

INDEX_MAGIC: Final = b"FLIX"
INDEX_VERSION: Final = 1
_HEAD = struct.Struct(">4sHHQQQQII")
_ENTRY = struct.Struct(">QQQ")
_U32 = struct.Struct(">I")
#: An index never holds more entries than this (a 4 GiB segment at a 4 KiB interval
#: needs a million): a larger count in a file is damage, not an allocation request.
MAX_ENTRIES: Final = 4 * 2**20


@dataclass
class IndexInfo:
    """What a segment's index says (and what the writer keeps for the active one)."""

    base_offset: int
    segment_size: int
    last_offset: int  # -1 when the segment holds no record
    max_ts: int
    records: int
    #: (offset, file_position, max_ts_before), positions strictly increasing.
    entries: list[tuple[int, int, int]] = field(default_factory=list)


def encode_index(info: IndexInfo) -> bytes:
    parts = [
        _HEAD.pack(
            INDEX_MAGIC,
            INDEX_VERSION,
            0,
            info.base_offset,
            info.segment_size,
            max(info.last_offset, 0),
            info.max_ts,
            info.records,
            len(info.entries),
        )
    ]
    parts.extend(_ENTRY.pack(*e) for e in info.entries)
    body = b"".join(parts)
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
    if count > MAX_ENTRIES or len(data) != _HEAD.size + count * _ENTRY.size + 4:
        return "index length does not match its entry count"
    if base != base_offset:
        return f"index is for base offset {base}, the segment's is {base_offset}"
    if size != segment_size:
        return f"index describes {size} segment bytes, the segment has {segment_size} (stale)"
    entries = [_ENTRY.unpack_from(data, _HEAD.size + i * _ENTRY.size) for i in range(count)]
    prev_off, prev_pos = base_offset - 1, SEGMENT_HEADER_SIZE - 1
    for off, pos, _ts in entries:
        if off <= prev_off or pos <= prev_pos or pos >= segment_size or off > last:
            return "index entries out of order or outside the segment"
        prev_off, prev_pos = off, pos
    if records and (not entries or entries[0][1] != SEGMENT_HEADER_SIZE):
        return "index does not start at the first record"
    if not records and (entries or size != SEGMENT_HEADER_SIZE):
        return "index of an empty segment lists records"
    return IndexInfo(base, size, last if records else -1, max_ts, records, entries)


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
