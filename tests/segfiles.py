"""An independent reader (and tiny writer) of felix's durable log files, for tests.

Written from the on-disk format in docs/log-format.md (the design contract of issue
#12), deliberately without importing ``felix.shard``: the fault tests use it to check
what is really in the files after a crash, a power loss or a bit flip, so a bug in
felix's own reader cannot hide a bug in its writer. The writer half lets tests build
files by hand and check that felix reads what the specification says.

Layout: ``<stream dir>/<base:020d>.seg`` (+ ``.idx``, derived data, not read here).
All integers big-endian; every CRC is CRC-32 IEEE (``zlib.crc32``).

Segment header (32 bytes)::

    b"FLSG" | u16 version=1 | u16 flags=0 | u64 base_offset | u64 created_us
    | u32 reserved=0 | u32 crc of the 28 bytes before it

Record: a 28-byte header, then ``length`` payload bytes::

    u32 length | u64 offset | u64 timestamp_us | u32 payload_crc | u32 crc of the 24
    bytes before it

Payload (felix's record envelope)::

    u8 kind (0 = data) | u16 header_count | per header: u16 key_len key u16 value_len
    value (UTF-8) | body

Encrypted payload (kind 1; docs/log-format.md, "Encryption at rest")::

    u8 kind=1 | u32 key_id | 12-byte nonce | AES-256-GCM ciphertext || 16-byte tag
    plaintext: a kind-0 envelope; associated data: b"FLXR" | u8 1 | u32 key_id
    | u64 offset | u64 timestamp_us | "tenant/namespace/stream"

    data keys: DATA_DIR/keys/tenants/<tenant>.json, each "wrapped" (base64) =
    12-byte nonce | AES-256-GCM(region key) of the 32-byte key | tag, associated data
    "felix data key v1" 0x00 tenant 0x00 u32 id; the region key: 32 bytes, raw or
    64 hex digits (dev mode: DATA_DIR/keys/region.key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEG_MAGIC = b"FLSG"
SEG_VERSION = 1
SEG_HEADER = struct.Struct(">4sHHQQII")
REC_HEADER = struct.Struct(">IQQII")
SEG_HEADER_SIZE = SEG_HEADER.size  # 32
REC_HEADER_SIZE = REC_HEADER.size  # 28
_SEG_NAME = re.compile(r"^(\d{20})\.seg$")


class FormatError(Exception):
    """The bytes of a log file are not what the format allows."""

    def __init__(self, file: Path, position: int, why: str) -> None:
        super().__init__(f"{file} at byte {position}: {why}")
        self.file = file
        self.position = position
        self.why = why


@dataclass(frozen=True)
class Rec:
    offset: int
    timestamp_us: int
    payload: bytes
    position: int = -1  # byte position of the record header in its segment file


@dataclass
class SegmentScan:
    """What a whole segment file holds, read front to back.

    ``good_end`` is the byte position just after the last whole, valid record.
    ``problem`` says why reading stopped before the end of the file (None: it did
    not); ``short`` tells whether that problem is only the file ending inside a
    record (what a crash mid-write leaves), as opposed to bytes that are wrong.
    """

    path: Path
    base_offset: int
    created_us: int
    size: int
    records: list[Rec] = field(default_factory=list)
    good_end: int = SEG_HEADER_SIZE
    problem: str | None = None
    short: bool = False

    @property
    def clean(self) -> bool:
        return self.problem is None


# -- encoding ----------------------------------------------------------------------


def segment_header(base_offset: int, created_us: int = 0) -> bytes:
    body = SEG_HEADER.pack(SEG_MAGIC, SEG_VERSION, 0, base_offset, created_us, 0, 0)[:28]
    return body + struct.pack(">I", zlib.crc32(body))


def record(offset: int, timestamp_us: int, payload: bytes) -> bytes:
    head = struct.pack(">IQQI", len(payload), offset, timestamp_us, zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + payload


def envelope(headers: Mapping[str, str] | None, body: bytes) -> bytes:
    items = list((headers or {}).items())
    out = [struct.pack(">BH", 0, len(items))]
    for key, value in items:
        for text in (key.encode(), value.encode()):
            out.append(struct.pack(">H", len(text)) + text)
    out.append(body)
    return b"".join(out)


def write_segment(
    directory: Path, base_offset: int, records: Iterable[tuple[int, int, bytes]]
) -> Path:
    """Write a segment file by the specification (no index); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{base_offset:020d}.seg"
    parts = [segment_header(base_offset, 1)]
    parts += [record(off, ts, payload) for off, ts, payload in records]
    path.write_bytes(b"".join(parts))
    return path


# -- decoding ----------------------------------------------------------------------


def decode_envelope(payload: bytes) -> tuple[int, dict[str, str], bytes]:
    """(kind, headers, body) of a record payload; ValueError when malformed."""
    if len(payload) < 3:
        raise ValueError(f"envelope of {len(payload)} bytes")
    kind, count = struct.unpack_from(">BH", payload)
    pos = 3
    headers: dict[str, str] = {}
    for _ in range(count):
        texts = []
        for _ in range(2):
            if pos + 2 > len(payload):
                raise ValueError("envelope header length past the payload")
            (n,) = struct.unpack_from(">H", payload, pos)
            pos += 2
            if pos + n > len(payload):
                raise ValueError("envelope header text past the payload")
            texts.append(payload[pos : pos + n].decode("utf-8"))
            pos += n
        headers[texts[0]] = texts[1]
    return kind, headers, payload[pos:]


def region_key(data_dir: Path, path: Path | None = None) -> bytes:
    """The region key: ``path``, else the dev-mode key in the data dir."""
    raw = (path or data_dir / "keys" / "region.key").read_bytes()
    return raw if len(raw) == 32 else bytes.fromhex(raw.decode().strip())


def data_keys(data_dir: Path, key: bytes | None = None) -> dict[tuple[str, int], bytes]:
    """Every tenant's data keys, unwrapped: (tenant, key id) -> 32-byte key."""
    kek = AESGCM(key if key is not None else region_key(data_dir))
    out: dict[tuple[str, int], bytes] = {}
    tenants = data_dir / "keys" / "tenants"
    for path in sorted(tenants.glob("*.json")) if tenants.is_dir() else []:
        doc = json.loads(path.read_text())
        tenant = doc["tenant"]
        for k in doc["keys"]:
            blob = base64.b64decode(k["wrapped"])
            ctx = b"felix data key v1\x00" + tenant.encode() + b"\x00" + struct.pack(">I", k["id"])
            out[(tenant, k["id"])] = kek.decrypt(blob[:12], blob[12:], ctx)
    return out


def open_payload(
    payload: bytes, stream: str, offset: int, timestamp_us: int, keys: dict[tuple[str, int], bytes]
) -> bytes:
    """The kind-0 envelope of a payload (an encrypted one decrypted; raises
    cryptography's InvalidTag or KeyError when it does not open)."""
    if not payload or payload[0] != 1:
        return payload
    (key_id,) = struct.unpack_from(">I", payload, 1)
    aad = struct.pack(">4sBIQQ", b"FLXR", 1, key_id, offset, timestamp_us) + stream.encode()
    key = keys[(stream.split("/")[0], key_id)]
    return AESGCM(key).decrypt(payload[5:17], payload[17:], aad)


def decode_record(
    rec: Rec, stream: str, keys: dict[tuple[str, int], bytes]
) -> tuple[int, dict[str, str], bytes]:
    """(kind as stored, headers, body) of a record, plain or encrypted."""
    kind = rec.payload[0] if rec.payload else -1
    _, headers, body = decode_envelope(
        open_payload(rec.payload, stream, rec.offset, rec.timestamp_us, keys)
    )
    return kind, headers, body


def scan_segment(path: Path) -> SegmentScan:
    """Read one segment file whole. Raises FormatError only for a bad segment header
    (a file that is not a segment at all); damage after it is reported in the scan."""
    data = path.read_bytes()
    if len(data) < SEG_HEADER_SIZE:
        raise FormatError(path, 0, f"segment header truncated: {len(data)} bytes")
    magic, version, flags, base, created, reserved, crc = SEG_HEADER.unpack_from(data)
    if crc != zlib.crc32(data[:28]):
        raise FormatError(path, 28, "segment header CRC mismatch")
    if magic != SEG_MAGIC or version != SEG_VERSION or flags or reserved:
        raise FormatError(path, 0, f"bad segment header {magic!r} v{version} {flags} {reserved}")
    match = _SEG_NAME.match(path.name)
    if match is None or int(match.group(1)) != base:
        raise FormatError(path, 8, f"base offset {base} does not match the file name")
    scan = SegmentScan(path, base, created, len(data))
    pos = SEG_HEADER_SIZE
    last = base - 1
    while pos < len(data):
        if len(data) - pos < REC_HEADER_SIZE:
            scan.problem, scan.short = f"short record header at {pos}", True
            break
        length, offset, ts, pcrc, hcrc = REC_HEADER.unpack_from(data, pos)
        if hcrc != zlib.crc32(data[pos : pos + 24]):
            scan.problem = f"record header CRC mismatch at {pos}"
            break
        if offset <= last:
            scan.problem = f"record offset {offset} at {pos} not above {last}"
            break
        end = pos + REC_HEADER_SIZE + length
        if end > len(data):
            scan.problem, scan.short = f"short payload at {pos}", True
            break
        payload = data[pos + REC_HEADER_SIZE : end]
        if zlib.crc32(payload) != pcrc:
            scan.problem = f"payload CRC mismatch at {pos}"
            break
        scan.records.append(Rec(offset, ts, payload, pos))
        last = offset
        pos = end
        scan.good_end = pos
    return scan


IDX_HEADER = struct.Struct(">4sHHQQQQII")  # 48 bytes
IDX_ENTRY = struct.Struct(">QQQ")


@dataclass(frozen=True)
class Index:
    base_offset: int
    segment_size: int
    last_offset: int
    max_timestamp_us: int
    record_count: int
    entries: list[tuple[int, int, int]]  # (offset, file_position, max_ts_before)


def parse_index(path: Path) -> Index:
    """An index file (``.idx``), verified on its own: magic, version, CRC, size."""
    data = path.read_bytes()
    if len(data) < IDX_HEADER.size + 4:
        raise FormatError(path, 0, f"index of {len(data)} bytes")
    (crc,) = struct.unpack_from(">I", data, len(data) - 4)
    if crc != zlib.crc32(data[:-4]):
        raise FormatError(path, len(data) - 4, "index CRC mismatch")
    magic, version, flags, base, size, last, max_ts, count, n = IDX_HEADER.unpack_from(data)
    if magic != b"FLIX" or version != 1 or flags:
        raise FormatError(path, 0, f"bad index header {magic!r} v{version} {flags}")
    if len(data) != IDX_HEADER.size + n * IDX_ENTRY.size + 4:
        raise FormatError(path, 44, f"{n} entries do not fit {len(data)} bytes")
    entries = [IDX_ENTRY.unpack_from(data, IDX_HEADER.size + i * IDX_ENTRY.size) for i in range(n)]
    return Index(base, size, last, max_ts, count, entries)


def check_index(segment: Path, interval: int) -> Index:
    """Parse ``segment``'s index and check it against the segment itself: it describes
    this segment (base, size, last offset, max timestamp, count), every entry names a
    record start with its offset and the maximum timestamp before it, the first record
    has an entry, and entries are no further apart than ``interval`` plus one record."""
    idx_path = segment.with_suffix(".idx")
    index = parse_index(idx_path)
    scan = scan_segment(segment)
    if not scan.clean:
        raise FormatError(segment, scan.good_end, f"indexed segment not clean: {scan.problem}")
    recs = scan.records
    want = (scan.base_offset, scan.size, recs[-1].offset if recs else 0, len(recs))
    got = (index.base_offset, index.segment_size, index.last_offset, index.record_count)
    if got != want:
        raise FormatError(idx_path, 8, f"index header {got} != segment {want}")
    if index.max_timestamp_us != max((r.timestamp_us for r in recs), default=0):
        raise FormatError(idx_path, 32, "index max_timestamp_us is not the segment's")
    by_pos = {r.position: i for i, r in enumerate(recs)}
    prev_pos = None
    for offset, pos, max_before in index.entries:
        i = by_pos.get(pos)
        if i is None or recs[i].offset != offset:
            raise FormatError(idx_path, 48, f"entry ({offset}, {pos}) is not a record start")
        if max_before != max((r.timestamp_us for r in recs[:i]), default=0):
            raise FormatError(idx_path, 48, f"entry ({offset}, {pos}): wrong max_ts_before")
        if prev_pos is not None:
            gap = pos - prev_pos
            longest = max(REC_HEADER_SIZE + len(r.payload) for r in recs)
            if gap <= 0 or gap > interval + longest:
                raise FormatError(idx_path, 48, f"entries {prev_pos} -> {pos}: gap {gap}")
        prev_pos = pos
    if recs and (not index.entries or index.entries[0][1] != recs[0].position):
        raise FormatError(idx_path, 48, "the first record has no entry")
    if recs and scan.size - (prev_pos or 0) > interval + max(
        REC_HEADER_SIZE + len(r.payload) for r in recs
    ):
        raise FormatError(idx_path, 48, "the segment's tail is not indexed")
    return index


def segment_paths(stream_dir: Path) -> list[Path]:
    """The segment files of a stream, in offset order."""
    found = [p for p in stream_dir.iterdir() if _SEG_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(p.name[:20]))


def read_stream(stream_dir: Path, *, allow_torn_tail: bool = False) -> list[Rec]:
    """Every record of a stream, verified: clean segments, offsets strictly rising
    across them. ``allow_torn_tail``: the last segment may end inside a record."""
    out: list[Rec] = []
    paths = segment_paths(stream_dir)
    for i, path in enumerate(paths):
        last = i == len(paths) - 1
        if allow_torn_tail and last and path.stat().st_size < SEG_HEADER_SIZE:
            # A crash right after creating the file: not even its header is whole.
            break
        scan = scan_segment(path)
        if scan.problem is not None and not (allow_torn_tail and scan.short and last):
            raise FormatError(path, scan.good_end, scan.problem)
        if out and scan.base_offset <= out[-1].offset:
            raise FormatError(path, 8, f"base {scan.base_offset} not above {out[-1].offset}")
        out += scan.records
    return out


# -- faults ------------------------------------------------------------------------


def tree_digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (relative path -> hex digest)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def flip_bit(path: Path, position: int, bit: int = 0) -> None:
    with path.open("r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ (1 << bit)]))


def first_position_at_or_above(path: Path, offset: int) -> int:
    """Byte position in a segment where records with offsets >= ``offset`` begin
    (the end of its valid records when there are none)."""
    scan = scan_segment(path)
    for rec in scan.records:
        if rec.offset >= offset:
            return rec.position
    return scan.good_end


def power_loss(
    stream_dir: Path, synced_offset: int, rng: random.Random, *, mode: str = "prefix"
) -> dict[str, int]:
    """Drop bytes a power loss may drop: anything holding offsets >= ``synced_offset``.

    ``prefix``: what survives is one prefix of everything written (in segment order)
    that covers every synced record: a cut at a random byte past the synced data;
    segments created after the cut are gone. ``per_segment``: each segment
    independently keeps a random length between its synced data and its size (files
    written without fsync have no ordering between them). ``sealed_whole``: for a
    writer that fsyncs a segment when it seals it, only the newest segment loses
    bytes. A segment whose base is at or above ``synced_offset`` may lose even its
    header, or vanish (its directory entry was never synced). Returns the new size of
    each remaining segment file, by name.
    """
    if mode not in ("prefix", "per_segment", "sealed_whole"):
        raise ValueError(mode)
    sizes: dict[str, int] = {}
    cut_done = False
    paths = segment_paths(stream_dir)
    for path in paths:
        if cut_done:
            path.unlink()
            continue
        size = path.stat().st_size
        if mode == "sealed_whole" and path != paths[-1]:
            sizes[path.name] = size
            continue
        keep_min = first_position_at_or_above(path, synced_offset)
        if int(path.name[:20]) >= synced_offset:
            if rng.random() < 0.2:
                path.unlink()
                cut_done = mode == "prefix"
                continue
            keep_min = 0
        new = rng.randint(keep_min, size)
        if mode == "prefix" and keep_min < size:
            cut_done = True
        os.truncate(path, new)
        sizes[path.name] = new
    return sizes


def copy_tree(src: Path, dst: Path) -> Path:
    """A byte copy of a (possibly open) log directory, as a crash would leave it."""
    shutil.copytree(src, dst)
    return dst


def payloads(recs: Sequence[Rec]) -> list[tuple[int, bytes]]:
    return [(r.offset, r.payload) for r in recs]
