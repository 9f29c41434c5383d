"""GroupLog: a queue group's state file, a snapshot followed by deltas.

``<data-dir>/groups/<tenant>/<namespace>/<stream>/<group>.glog`` (docs/queues.md,
"Group state files"). The format is specified in docs/log-format.md, "Group state";
this module is its executable form (:func:`decode_file` is the reusable reader).
All integers are big-endian and every CRC is CRC-32 (IEEE, ``zlib.crc32``)::

    file header (16 bytes): b"FLGS" | u16 version=1 | u16 flags=0 | u32 reserved=0
                            | u32 crc of the 12 bytes before it
    frame:                  u32 length | u32 crc | u8 type | body
                            (length = 1 + len(body); crc covers type + body)
    SNAPSHOT (1), first:    u64 floor | u64 next | u64 acked | u64 dead | u64 skipped
                            | u32 entry_count | entries
    SNAPSHOT_MORE (3):      more entries of the snapshot (until entry_count are read)
    snapshot entry:         u64 offset | u8 state | u32 attempts | u32 failures
                            | u64 not_before_us | str reason | str detail
    DELTA (2):              one or more journal entries, back to back
    journal entry:          u8 tag | fields (see _TAGS); str = u16 length | UTF-8

Encrypted files (encryption at rest; header flags bit 0 = 1): every frame's body is
``u32 key_id | 12-byte nonce | AES-256-GCM ciphertext of the plain body | 16-byte
tag`` with the tenant's data key, associated data ``b"FLGF" | u8 type | u32 key_id |
"tenant/namespace/stream/group"`` (:class:`GroupCipher`); the frame's CRC covers the
stored (encrypted) bytes, so framing, torn-tail detection and recovery are the same.
A file is encrypted or plain as a whole: :meth:`GroupLog.open` rewrites one in the
other mode at once (a compaction) when the node's ``--encryption`` says otherwise.

Writing and durability:

* A new file (a new group in :meth:`GroupLog.open`) is only ever *created* whole:
  header + snapshot go to ``<file>.tmp``, which is fsynced, renamed over ``<file>``
  and the directory fsynced. So the snapshot is never torn; a ``.tmp`` found by
  :meth:`GroupLog.open` is an unfinished rewrite (never the truth) and is removed.
* :meth:`GroupLog.append` frames its entries into one DELTA frame and hands it to the
  kernel with one ``os.write`` (no user-space buffer: bytes in a Python buffer die
  with ``kill -9``, bytes in the page cache do not). Only the last frame can be torn.
* Compaction runs in the background, without an fsync on the owner thread:
  :meth:`~GroupLog.begin_compaction` writes header + snapshot to ``<file>.tmp`` (no
  fsync); from then on every append writes its frame to *both* files. The next
  :meth:`~GroupLog.sync` (fsync thread) fdatasyncs the tmp file with the live one
  (same entry count); then :meth:`~GroupLog.finish_compaction` (owner thread) renames
  the tmp file over the file and appends to it from then on; the next sync fsyncs the
  directory too. A crash at any point leaves the old file (it got every frame up to
  the rename) or the new one (snapshot + every frame since the compaction began):
  the same state. :meth:`~GroupLog.compact` does it all at once on the calling thread.

Threads: one owner thread (the shard loop) calls :meth:`~GroupLog.append`,
:meth:`~GroupLog.begin_compaction`, :meth:`~GroupLog.finish_compaction`,
:meth:`~GroupLog.compact`, :meth:`~GroupLog.close`, :meth:`~GroupLog.delete`; the fsync
thread may call :meth:`~GroupLog.sync` at any time. ``sync`` takes the lock only to
read :attr:`~GroupLog.written` and ``dup`` the fds (live file, and the tmp file while
a compaction is in progress), then fdatasyncs the dups (and fsyncs the directory when
a rename is not known durable) without the lock. The owner swaps or closes the fds
(switch, close) under the same lock, and bumps ``written`` only after its writes (to
both files) returned, so a sync never claims an entry it did not cover. What a sync
may claim (:attr:`~GroupLog.synced`):

* no switch since it began: its entry count, but only after the directory fsync when
  it began after a rename (entries written after a rename are only in the new file;
  if the rename were lost they would be too);
* a switch since it began: its fdatasync covered the *old* file, which a crash may
  or may not leave under the name, so at most the entries the new file held on disk
  at the switch (the tmp file's last fdatasync). A switch happens only after such an
  fdatasync, which covered everything claimed before it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, NamedTuple, Protocol, TypeVar

from cryptography.exceptions import InvalidTag

from felix.errors import (
    BadRequest,
    DiskFull,
    KeyUnavailable,
    LocalProtocolError,
    LogDamaged,
    LogPoisoned,
)
from felix.names import validate_name
from felix.shard.disklog import fsync_dir
from felix.shard.queue._terms import MAX_DETAIL_BYTES
from felix.shard.queue.journal import (
    Ack,
    Dead,
    Dying,
    Entry,
    EntryState,
    Fail,
    GroupSnapshot,
    JournalEntry,
    Lease,
    Release,
    Skip,
    Start,
)
from felix.shard.queue.settings import MAX_SPAN

__all__ = [
    "FILE_HEADER_SIZE",
    "FLAG_ENCRYPTED",
    "FRAME_DELTA",
    "FRAME_HEAD_SIZE",
    "FRAME_SNAPSHOT",
    "FRAME_SNAPSHOT_MORE",
    "GLOG_MAGIC",
    "GLOG_SUFFIX",
    "GLOG_VERSION",
    "MAX_FILE_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_SNAPSHOT_BYTES",
    "MAX_STR_BYTES",
    "Delta",
    "GroupCipher",
    "GroupFile",
    "GroupLog",
    "decode_bytes",
    "decode_file",
    "discover",
    "encode_entries",
    "encode_file",
    "encode_frame",
    "path_for",
]

GLOG_MAGIC: Final = b"FLGS"
GLOG_VERSION: Final = 1
GLOG_SUFFIX: Final = ".glog"
TMP_SUFFIX: Final = ".tmp"
FILE_HEADER_SIZE: Final = 16
FRAME_HEAD_SIZE: Final = 8
FRAME_SNAPSHOT: Final = 1
FRAME_DELTA: Final = 2
FRAME_SNAPSHOT_MORE: Final = 3
#: The largest frame (its ``length`` field: type byte + body). A reader refuses more
#: (a flipped length bit must not ask for gigabytes); the writer splits before that.
MAX_FRAME_BYTES: Final = 64 * 2**20
#: A snapshot is written in frames of about this many bytes (SNAPSHOT, SNAPSHOT_MORE...).
SNAPSHOT_PART_BYTES: Final = 1 << 20
#: The longest string (reason, detail) in UTF-8 bytes: its length is a u16. The engine
#: bounds details to 1024 bytes well before this.
MAX_STR_BYTES: Final = 0xFFFF
#: Directories above the file's own that :meth:`GroupLog.open` fsyncs: the stream,
#: namespace and tenant directories and ``groups`` (the shard may just have made them).
PARENT_DIRS_SYNCED: Final = 3

_HEADER_BODY = struct.Struct(">4sHHI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_FRAME_HEAD = struct.Struct(">II")
_SNAP_HEAD = struct.Struct(">QQQQQI")
_SNAP_ENTRY = struct.Struct(">QBIIQ")
#: The fewest bytes a snapshot entry takes (fixed fields + two empty strings).
_SNAP_ENTRY_MIN = _SNAP_ENTRY.size + 4
_crc32 = zlib.crc32

# Journal entry tags and their fixed fields (after the tag byte).
TAG_START: Final = 1
TAG_LEASE: Final = 2
TAG_ACK: Final = 3
TAG_FAIL: Final = 4
TAG_RELEASE: Final = 5
TAG_DYING: Final = 6
TAG_DEAD: Final = 7
TAG_SKIP: Final = 8
_T_OFF = struct.Struct(">BQ")  # Start, Release, Dead: offset
_T_LEASE = struct.Struct(">BQI")  # offset, attempts
_T_RANGE = struct.Struct(">BQQ")  # Ack, Skip: first, count
_T_FAIL = struct.Struct(">BQIQ")  # offset, failures, not_before_us; then str detail
_Q = struct.Struct(">Q")
_QI = struct.Struct(">QI")
_QQ = struct.Struct(">QQ")
_QIQ = struct.Struct(">QIQ")
_EMPTY_STR = b"\x00\x00"

#: The directory fsync every file change here ends with (a module name tests patch).
_fsync_dir = fsync_dir


#: File header flag: every frame body is encrypted (GroupCipher).
FLAG_ENCRYPTED: Final = 1
_SEAL_HEAD = struct.Struct(">I")  # key_id
_FRAME_AAD = struct.Struct(">4sBI")  # b"FLGF", frame type, key_id
_NONCE: Final = 12
#: Bytes encryption adds to a frame body: key id, nonce, tag.
SEAL_OVERHEAD: Final = 4 + _NONCE + 16
#: The longest reason the engine writes (``max_deliveries``, ``term``), with room.
_MAX_REASON_BYTES: Final = 32
#: The largest snapshot a node writes: the widest window (MAX_SPAN entries, each with
#: a reason and a detail of at most MAX_DETAIL_BYTES) in sealed frames of at most
#: SNAPSHOT_PART_BYTES (plus one entry).
_ENTRY_MAX: Final = _SNAP_ENTRY.size + 2 + _MAX_REASON_BYTES + 2 + MAX_DETAIL_BYTES
_FRAME_OVERHEAD: Final = FRAME_HEAD_SIZE + 1 + SEAL_OVERHEAD
MAX_SNAPSHOT_BYTES: Final = (
    FILE_HEADER_SIZE
    + _SNAP_HEAD.size
    + MAX_SPAN * _ENTRY_MAX
    + (MAX_SPAN * _ENTRY_MAX // SNAPSHOT_PART_BYTES + 1) * (_FRAME_OVERHEAD + _ENTRY_MAX)
)
#: The largest group file a node keeps (an importer refuses larger ones): its
#: snapshot, the deltas, rewritten once they outgrow ``max(compact_bytes, 4 x the
#: snapshot)`` (``compact_bytes`` being at most the snapshot's bound), and what is
#: appended while a compaction runs (bounded here by one more snapshot's size and two
#: maximal frames).
MAX_FILE_BYTES: Final = 6 * MAX_SNAPSHOT_BYTES + 2 * (FRAME_HEAD_SIZE + MAX_FRAME_BYTES)


class _Aead(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


class _Keys(Protocol):
    """What a group file needs of the node's data keys (felix/keys/store.py KeyStore)."""

    def current(self, tenant: str) -> tuple[int, _Aead]: ...

    def aead(self, tenant: str, key_id: int) -> _Aead: ...


class GroupCipher:
    """Encrypts and decrypts one group file's frame bodies with its tenant's data keys.

    ``identity`` is ``tenant/namespace/stream/group`` (in every frame's associated
    data: a frame copied into another group's file does not decrypt); ``encrypt``:
    whether files are written encrypted (``--encryption``); False still reads
    encrypted files (then rewritten plain)."""

    __slots__ = ("encrypt", "identity", "keys", "tenant")

    def __init__(self, keys: _Keys, identity: str, *, encrypt: bool = True) -> None:
        self.keys = keys
        self.identity = identity.encode()
        self.tenant = identity.split("/", 1)[0]
        self.encrypt = encrypt

    def seal(self, kind: int, body: bytes) -> bytes:
        key_id, aead = self.keys.current(self.tenant)
        nonce = os.urandom(_NONCE)
        aad = _FRAME_AAD.pack(b"FLGF", kind, key_id) + self.identity
        return _SEAL_HEAD.pack(key_id) + nonce + aead.encrypt(nonce, body, aad)

    def open(self, kind: int, sealed: bytes, where: str) -> bytes:
        if len(sealed) < SEAL_OVERHEAD:
            raise KeyUnavailable(f"{where}: encrypted frame of {len(sealed)} bytes is too short")
        (key_id,) = _SEAL_HEAD.unpack_from(sealed)
        aead = self.keys.aead(self.tenant, key_id)
        aad = _FRAME_AAD.pack(b"FLGF", kind, key_id) + self.identity
        try:
            return aead.decrypt(sealed[4 : 4 + _NONCE], sealed[4 + _NONCE :], aad)
        except InvalidTag:
            raise KeyUnavailable(
                f"{where} does not authenticate with data key {key_id} of tenant "
                f"{self.tenant}: it was altered or copied from another group, or the key "
                "file is not the one it was written with"
            ) from None


def encode_file_header(flags: int = 0) -> bytes:
    body = _HEADER_BODY.pack(GLOG_MAGIC, GLOG_VERSION, flags, 0)
    return body + _U32.pack(_crc32(body))


def encode_frame(kind: int, body: bytes) -> bytes:
    """One frame: ``u32 length | u32 crc | u8 type | body``."""
    typed = bytes((kind,)) + body
    return _FRAME_HEAD.pack(len(typed), _crc32(typed)) + typed


# -- encoding ------------------------------------------------------------------------


def _str(text: str, what: str) -> bytes:
    if not text:
        return _EMPTY_STR
    try:
        raw = text.encode()
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"group state: {what} is not encodable as UTF-8: {exc}") from None
    if len(raw) > MAX_STR_BYTES:
        raise LocalProtocolError(
            f"group state: {what} of {len(raw)} bytes exceeds {MAX_STR_BYTES} "
            "(the engine bounds details to 1024 bytes)"
        )
    return _U16.pack(len(raw)) + raw


def _encode_entry(entry: JournalEntry, out: list[bytes]) -> None:
    if type(entry) is Lease:
        out.append(_T_LEASE.pack(TAG_LEASE, entry.offset, entry.attempts))
    elif type(entry) is Ack:
        out.append(_T_RANGE.pack(TAG_ACK, entry.first, entry.count))
    elif type(entry) is Fail:
        out.append(_T_FAIL.pack(TAG_FAIL, entry.offset, entry.failures, entry.not_before_us))
        out.append(_str(entry.detail, "Fail detail"))
    elif type(entry) is Release:
        out.append(_T_OFF.pack(TAG_RELEASE, entry.offset))
    elif type(entry) is Dying:
        out.append(_T_OFF.pack(TAG_DYING, entry.offset))
        out.append(_str(entry.reason, "Dying reason"))
        out.append(_str(entry.detail, "Dying detail"))
    elif type(entry) is Dead:
        out.append(_T_OFF.pack(TAG_DEAD, entry.offset))
    elif type(entry) is Skip:
        out.append(_T_RANGE.pack(TAG_SKIP, entry.first, entry.count))
    elif type(entry) is Start:
        out.append(_T_OFF.pack(TAG_START, entry[0]))
    else:
        raise LocalProtocolError(f"group state: not a journal entry: {entry!r}")


def encode_entries(entries: Sequence[JournalEntry]) -> bytes:
    """The body of a DELTA frame holding ``entries`` (raises LocalProtocolError for an
    entry the format cannot hold: a negative or too large number, a string over 65535
    bytes or not encodable as UTF-8)."""
    out: list[bytes] = []
    try:
        for entry in entries:
            _encode_entry(entry, out)
    except struct.error as exc:
        raise LocalProtocolError(f"group state: entry {entry!r} does not fit: {exc}") from None
    return b"".join(out)


_Seal = Callable[[int, bytes], bytes]
_T = TypeVar("_T")


def _frame(kind: int, body: bytes, seal: _Seal | None) -> bytes:
    return encode_frame(kind, body if seal is None else seal(kind, body))


def _delta_frames(entries: Sequence[JournalEntry], seal: _Seal | None = None) -> bytes:
    """DELTA frame(s) for ``entries``: one frame, unless the body would exceed
    :data:`MAX_FRAME_BYTES` (then several, written with the same single write);
    ``seal`` encrypts each body (an encrypted file)."""
    body = encode_entries(entries)
    # A plain body of at most this fits MAX_FRAME_BYTES once encrypted too.
    limit = MAX_FRAME_BYTES - (0 if seal is None else SEAL_OVERHEAD)
    if len(body) < limit:
        return _frame(FRAME_DELTA, body, seal)
    frames: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for entry in entries:
        one: list[bytes] = []
        _encode_entry(entry, one)
        n = sum(len(p) for p in one)
        if parts and size + n >= limit:
            frames.append(_frame(FRAME_DELTA, b"".join(parts), seal))
            parts, size = [], 0
        parts += one
        size += n
    frames.append(_frame(FRAME_DELTA, b"".join(parts), seal))
    return b"".join(frames)


def encode_file(snapshot: GroupSnapshot, cipher: GroupCipher | None = None) -> bytes:
    """A whole group file holding ``snapshot`` (header + SNAPSHOT frame(s), no delta),
    encrypted when ``cipher`` encrypts."""
    seal = cipher.seal if cipher is not None and cipher.encrypt else None
    if not 0 <= snapshot.floor <= snapshot.next:
        raise LocalProtocolError(
            f"group state: floor {snapshot.floor} / next {snapshot.next} out of order"
        )
    offsets = sorted(snapshot.entries)
    if offsets and not (snapshot.floor <= offsets[0] and offsets[-1] < snapshot.next):
        raise LocalProtocolError(
            f"group state: entries {offsets[0]}..{offsets[-1]} outside the window "
            f"[{snapshot.floor}, {snapshot.next})"
        )
    frames = [encode_file_header(0 if seal is None else FLAG_ENCRYPTED)]
    try:
        parts = [
            _SNAP_HEAD.pack(
                snapshot.floor,
                snapshot.next,
                snapshot.acked,
                snapshot.dead,
                snapshot.skipped,
                len(offsets),
            )
        ]
        kind, size = FRAME_SNAPSHOT, len(parts[0])
        for off in offsets:
            e = snapshot.entries[off]
            fixed = _SNAP_ENTRY.pack(off, e.state, e.attempts, e.failures, e.not_before_us)
            reason = _str(e.reason, f"reason of entry {off}")
            detail = _str(e.detail, f"detail of entry {off}")
            n = len(fixed) + len(reason) + len(detail)
            if parts and size + n > SNAPSHOT_PART_BYTES:
                frames.append(_frame(kind, b"".join(parts), seal))
                kind, parts, size = FRAME_SNAPSHOT_MORE, [], 0
            parts += (fixed, reason, detail)
            size += n
    except struct.error as exc:
        raise LocalProtocolError(f"group state: snapshot does not fit the format: {exc}") from None
    frames.append(_frame(kind, b"".join(parts), seal))
    return b"".join(frames)


# -- decoding ------------------------------------------------------------------------


class Delta(NamedTuple):
    """One DELTA frame: its file position and the journal entries it holds."""

    position: int
    entries: tuple[JournalEntry, ...]


class GroupFile(NamedTuple):
    """What a group file holds: the snapshot as written (deltas not applied), the
    DELTA frames in order, the bytes of a torn last frame (not cut here), and whether
    its frames are encrypted."""

    snapshot: GroupSnapshot
    deltas: list[Delta]
    torn_bytes: int
    encrypted: bool = False

    def state(self) -> GroupSnapshot:
        """The group's state: the snapshot with every delta applied (a new object)."""
        snap = self.snapshot
        state = GroupSnapshot(
            snap.floor,
            snap.next,
            {off: _copy_entry(e) for off, e in snap.entries.items()},
            snap.acked,
            snap.dead,
            snap.skipped,
        )
        return _apply_all(state, self.deltas)


def _apply_all(state: GroupSnapshot, deltas: Sequence[Delta]) -> GroupSnapshot:
    for delta in deltas:
        for entry in delta.entries:
            state.apply(entry)
    return state


def _copy_entry(e: Entry) -> Entry:
    return Entry(e.state, e.attempts, e.failures, e.not_before_us, e.reason, e.detail)


class _Damage(Exception):
    """Internal: a bad spot at ``position`` (turned into LogDamaged with the file)."""

    def __init__(self, position: int, why: str) -> None:
        super().__init__(why)
        self.position = position
        self.why = why


def _frame_at(data: bytes, pos: int) -> tuple[int, int] | str:
    """(type, end) of the valid frame at ``pos``, or why there is none."""
    size = len(data)
    if size - pos < FRAME_HEAD_SIZE:
        return f"truncated frame header ({size - pos} bytes left)"
    length, crc = _FRAME_HEAD.unpack_from(data, pos)
    if length == 0 or length > MAX_FRAME_BYTES:
        return f"frame length {length} outside 1..{MAX_FRAME_BYTES}"
    end = pos + FRAME_HEAD_SIZE + length
    if end > size:
        return f"frame of {length} bytes runs past the end ({size - pos - FRAME_HEAD_SIZE} left)"
    if _crc32(data[pos + FRAME_HEAD_SIZE : end]) != crc:
        return "frame CRC mismatch"
    kind = data[pos + FRAME_HEAD_SIZE]
    if kind not in (FRAME_SNAPSHOT, FRAME_DELTA, FRAME_SNAPSHOT_MORE):
        return f"unknown frame type {kind}"
    return kind, end


def _valid_frame_after(data: bytes, start: int) -> int | None:
    """The position of a valid frame (length in bounds, CRC, known type) starting in
    ``(start, len(data))``, or None: tells a torn tail from damage."""
    for m in _CANDIDATE.finditer(data, start + 1):
        pos = m.start()
        if not isinstance(_frame_at(data, pos), str):
            return pos
    return None


#: Where a frame could start: a length whose top byte allows <= 64 MiB, and a known
#: type byte 8 bytes on (a zero-width match at every such position).
_CANDIDATE = re.compile(rb"(?=[\x00-\x04].{7}[\x01-\x03])", re.DOTALL)


def _read_str(data: bytes, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise _Damage(pos, "string length runs past the frame")
    (n,) = _U16.unpack_from(data, pos)
    pos += 2
    if pos + n > end:
        raise _Damage(pos - 2, f"string of {n} bytes runs past the frame")
    try:
        return data[pos : pos + n].decode(), pos + n
    except UnicodeDecodeError as exc:
        raise _Damage(pos, f"string is not UTF-8: {exc}") from None


def _decode_snapshot_entries(
    data: bytes, pos: int, end: int, want: int, snap: GroupSnapshot, last: int
) -> tuple[int, int]:
    """Decode entries from ``data[pos:end]`` into ``snap`` until ``want`` are read or
    the frame ends; returns (entries read, last offset)."""
    got = 0
    entries = snap.entries
    floor, nxt = snap.floor, snap.next
    fixed = _SNAP_ENTRY.size
    while got < want and pos < end:
        if pos + fixed > end:
            raise _Damage(pos, "snapshot entry runs past the frame")
        off, state, attempts, failures, not_before = _SNAP_ENTRY.unpack_from(data, pos)
        if state > EntryState.DYING:
            raise _Damage(pos + 8, f"unknown entry state {state}")
        if off <= last or not floor <= off < nxt:
            raise _Damage(
                pos, f"entry offset {off} out of order or outside the window [{floor}, {nxt})"
            )
        reason, p = _read_str(data, pos + fixed, end)
        detail, pos = _read_str(data, p, end)
        entries[off] = Entry(EntryState(state), attempts, failures, not_before, reason, detail)
        last = off
        got += 1
    if pos != end:
        raise _Damage(pos, f"{end - pos} bytes after the snapshot's last entry in its frame")
    return got, last


def _decode_entries(data: bytes, pos: int, end: int) -> tuple[JournalEntry, ...]:
    out: list[JournalEntry] = []
    append = out.append
    if pos == end:
        raise _Damage(pos, "DELTA frame without entries")
    while pos < end:
        tag = data[pos]
        start = pos
        pos += 1
        try:
            if tag == TAG_LEASE:
                append(Lease(*_QI.unpack_from(data, pos)))
                pos += 12
            elif tag == TAG_ACK:
                append(Ack(*_QQ.unpack_from(data, pos)))
                pos += 16
            elif tag == TAG_FAIL:
                off, failures, nb = _QIQ.unpack_from(data, pos)
                detail, pos = _read_str(data, pos + 20, end)
                append(Fail(off, failures, nb, detail))
            elif tag == TAG_RELEASE:
                append(Release(_Q.unpack_from(data, pos)[0]))
                pos += 8
            elif tag == TAG_DYING:
                (off,) = _Q.unpack_from(data, pos)
                reason, p = _read_str(data, pos + 8, end)
                detail, pos = _read_str(data, p, end)
                append(Dying(off, reason, detail))
            elif tag == TAG_DEAD:
                append(Dead(_Q.unpack_from(data, pos)[0]))
                pos += 8
            elif tag == TAG_SKIP:
                append(Skip(*_QQ.unpack_from(data, pos)))
                pos += 16
            elif tag == TAG_START:
                append(Start(_Q.unpack_from(data, pos)[0]))
                pos += 8
            else:
                raise _Damage(start, f"unknown journal entry tag {tag}")
        except struct.error:
            raise _Damage(start, "journal entry runs past the frame") from None
        if pos > end:
            raise _Damage(start, "journal entry runs past the frame")
    return tuple(out)


class _Bodies:
    """A file's frame bodies: slices of the file, or decrypted (an encrypted file).

    ``get`` returns (buffer, start, end) for the body of the frame at ``pos``; damage
    found inside a decrypted body is reported at its frame's position."""

    def __init__(self, data: bytes, cipher: GroupCipher | None, name: str) -> None:
        self.data = data
        self.cipher = cipher
        self.name = name

    def get(self, pos: int, kind: int, end: int) -> tuple[bytes, int, int]:
        body = pos + FRAME_HEAD_SIZE + 1
        if self.cipher is None:
            return self.data, body, end
        plain = self.cipher.open(kind, self.data[body:end], f"group file {self.name} at byte {pos}")
        return plain, 0, len(plain)


def _in_frame(pos: int, encrypted: bool, fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)``; damage in a decrypted body is reported at its frame's position."""
    if not encrypted:
        return fn(*args)
    try:
        return fn(*args)
    except _Damage as exc:
        raise _Damage(pos, f"{exc.why} (byte {exc.position} of the decrypted frame)") from None


def _decode(data: bytes, cipher: GroupCipher | None = None, name: str = "<bytes>") -> GroupFile:
    size = len(data)
    if size < FILE_HEADER_SIZE:
        raise _Damage(0, f"file header truncated ({size} of {FILE_HEADER_SIZE} bytes)")
    magic, version, flags, reserved = _HEADER_BODY.unpack_from(data)
    (crc,) = _U32.unpack_from(data, 12)
    if crc != _crc32(data[:12]):
        raise _Damage(0, "file header CRC mismatch")
    if magic != GLOG_MAGIC:
        raise _Damage(0, f"bad magic {magic!r}")
    if version != GLOG_VERSION:
        raise _Damage(4, f"unsupported version {version}")
    if flags & ~FLAG_ENCRYPTED or reserved:
        raise _Damage(6, f"unknown flags {flags:#x} / reserved {reserved:#x}")
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if encrypted and cipher is None:
        raise KeyUnavailable(f"group file {name} is encrypted and no data keys were given")
    bodies = _Bodies(data, cipher if encrypted else None, name)

    # The snapshot: written whole before the file got its name, so never torn.
    pos = FILE_HEADER_SIZE
    got = _frame_at(data, pos)
    if isinstance(got, str):
        raise _Damage(pos, f"snapshot: {got}")
    kind, end = got
    if kind != FRAME_SNAPSHOT:
        raise _Damage(pos, f"first frame has type {kind}, not SNAPSHOT")
    buf, body, stop = bodies.get(pos, kind, end)
    frame_pos = pos

    def head() -> tuple[GroupSnapshot, int, int, int]:
        if stop - body < _SNAP_HEAD.size:
            raise _Damage(body, "snapshot frame shorter than its head")
        floor, nxt, acked, dead, skipped, count = _SNAP_HEAD.unpack_from(buf, body)
        if floor > nxt:
            raise _Damage(body, f"snapshot floor {floor} above next {nxt}")
        # The plain entries take no more bytes than the file holds after the head.
        room = (stop - body - _SNAP_HEAD.size) + (size - end)
        if count > room // _SNAP_ENTRY_MIN or count > nxt - floor:
            raise _Damage(body + 40, f"snapshot entry count {count} cannot fit the file or window")
        snap = GroupSnapshot(floor, nxt, {}, acked, dead, skipped)
        read, last = _decode_snapshot_entries(buf, body + _SNAP_HEAD.size, stop, count, snap, -1)
        return snap, count, read, last

    snap, count, read, last = _in_frame(frame_pos, encrypted, head)
    pos = end
    while read < count:
        got = _frame_at(data, pos)
        if isinstance(got, str):
            raise _Damage(pos, f"snapshot ({read} of {count} entries read): {got}")
        kind, end = got
        if kind != FRAME_SNAPSHOT_MORE:
            raise _Damage(pos, f"frame type {kind} before the snapshot's {count} entries")
        buf, body, stop = bodies.get(pos, kind, end)
        n, last = _in_frame(
            pos, encrypted, _decode_snapshot_entries, buf, body, stop, count - read, snap, last
        )
        if n == 0:
            raise _Damage(pos, "empty SNAPSHOT_MORE frame")
        read += n
        pos = end

    # The deltas: only the last frame may be torn.
    deltas: list[Delta] = []
    while pos < size:
        got = _frame_at(data, pos)
        if isinstance(got, str):
            rest = size - pos
            if rest > FRAME_HEAD_SIZE + MAX_FRAME_BYTES:
                raise _Damage(pos, f"{got}; {rest} bytes follow, too many for a torn frame")
            later = _valid_frame_after(data, pos)
            if later is not None:
                raise _Damage(
                    pos, f"{got}; a valid frame follows at byte {later}, so not a torn tail"
                )
            return GroupFile(snap, deltas, rest, encrypted)
        kind, end = got
        if kind != FRAME_DELTA:
            raise _Damage(pos, f"frame type {kind} after the snapshot (DELTA expected)")
        buf, body, stop = bodies.get(pos, kind, end)
        entries = _in_frame(pos, encrypted, _decode_entries, buf, body, stop)
        deltas.append(Delta(pos, entries))
        pos = end
    return GroupFile(snap, deltas, 0, encrypted)


def decode_bytes(
    data: bytes, name: str = "<bytes>", cipher: GroupCipher | None = None
) -> GroupFile:
    """Decode a whole group file's bytes (``name`` is for errors). Raises
    :class:`~felix.errors.LogDamaged` naming ``name`` and the byte position for
    anything but a torn last DELTA frame, whose size is reported, not cut. An
    encrypted file needs ``cipher`` (its tenant's keys): KeyUnavailable without it,
    or when a frame does not decrypt."""
    try:
        return _decode(data, cipher, name)
    except _Damage as exc:
        raise LogDamaged(name, exc.position, exc.why) from None


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(size - pos, 1 << 30), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def decode_file(path: Path, cipher: GroupCipher | None = None) -> GroupFile:
    """Read and decode a group file without changing it (``felix log dump`` style):
    (snapshot, deltas, torn_bytes, encrypted). LogDamaged on damage;
    FileNotFoundError; KeyUnavailable for an encrypted file without its keys."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = _read_all(fd)
    finally:
        os.close(fd)
    return decode_bytes(data, str(path), cipher)


# -- layout --------------------------------------------------------------------------


def path_for(root: Path, stream_key: str, group: str) -> Path:
    """``<root>/<tenant>/<namespace>/<stream>/<group>.glog`` (names validated:
    :func:`felix.names.validate_name`; BadRequest otherwise)."""
    parts = stream_key.split("/")
    if len(parts) != 3:
        raise BadRequest(f"stream key {stream_key[:200]!r} is not tenant/namespace/stream")
    for kind, name in zip(("tenant", "namespace", "stream"), parts, strict=True):
        validate_name(kind, name)
    validate_name("group", group)
    return root.joinpath(*parts, group + GLOG_SUFFIX)


def _valid(kind: str, name: str) -> bool:
    try:
        validate_name(kind, name)
    except BadRequest:
        return False
    return True


def discover(root: Path) -> list[tuple[str, str]]:
    """Every group file under ``root``: sorted ``(stream key, group)`` pairs.

    Only ``<root>/<tenant>/<namespace>/<stream>/<group>.glog`` with valid names counts;
    other files (``.tmp`` rewrites, strays) are ignored. A missing root: nothing."""
    found: list[tuple[str, str]] = []

    def subdirs(d: Path, kind: str) -> list[Path]:
        try:
            with os.scandir(d) as it:
                return [
                    Path(e.path)
                    for e in it
                    if e.is_dir(follow_symlinks=False) and _valid(kind, e.name)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []

    dirs = [root]
    for kind in ("tenant", "namespace", "stream"):
        dirs = [sub for d in dirs for sub in subdirs(d, kind)]
    for d in dirs:
        key = "/".join(d.relative_to(root).parts)
        with os.scandir(d) as it:
            for e in it:
                if not e.name.endswith(GLOG_SUFFIX) or not e.is_file(follow_symlinks=False):
                    continue
                group = e.name[: -len(GLOG_SUFFIX)]
                if _valid("group", group):
                    found.append((key, group))
    found.sort()
    return found


# -- the log -------------------------------------------------------------------------


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


class GroupLog:
    """A group's state file, open for appending; see the module docstring."""

    #: Bytes of a torn last frame cut by :meth:`open` (0: none).
    torn_bytes: int

    def __init__(
        self,
        path: Path,
        fd: int,
        size: int,
        snapshot_bytes: int,
        compact_bytes: int,
        cipher: GroupCipher | None = None,
    ):
        # Use GroupLog.open(): this only sets fields.
        self.path = path
        self.compact_bytes = compact_bytes
        #: Encrypts new frames when it encrypts (the file is then encrypted as a whole).
        self._cipher = cipher
        self._seal: _Seal | None = cipher.seal if cipher is not None and cipher.encrypt else None
        self.torn_bytes = 0
        self._fd = fd
        self._size = size
        self._snapshot_bytes = snapshot_bytes  # header + snapshot frame(s)
        self._lock = threading.Lock()
        self._written = 0
        self._synced = 0
        self._closed = False
        self._poisoned: BaseException | None = None
        # Background compaction (begin_compaction / finish_compaction):
        self._compaction: _Compaction | None = None
        self._gen = 0  # bumped by every switch to a new file (under the lock)
        self._dir_dirty = False  # the last switch's rename is not known durable yet
        self._switch_durable = 0  # entries durable in both files at the last switch
        self._retry_size = 0  # after a failed compaction: not again below this size

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path, *, compact_bytes: int = 1 << 20, cipher: GroupCipher | None = None
    ) -> tuple[GroupLog, GroupSnapshot]:
        """Open ``path`` (created when missing: an empty group) and recover its state.

        ``cipher``: the tenant's data keys (None: plain files only). A file whose mode
        (encrypted or plain) differs from the cipher's ``encrypt`` is rewritten in that
        mode at once (a compaction: temporary file, fsync, rename); a key problem
        raises KeyUnavailable and changes nothing.

        A stale ``<path>.tmp`` is removed; a torn last DELTA frame is cut (ftruncate +
        fsync; reported in :attr:`torn_bytes`); any other damage raises
        :class:`~felix.errors.LogDamaged` (file, byte position) and changes nothing.
        Then the file is fdatasynced and its directory (and the three above it) fsynced,
        so everything recovered counts as synced. Idempotent: a crash at any step
        leaves files that recover to the same state.
        """
        if ".." in path.parts:
            raise ValueError(f"group file {path} must not contain '..'")
        tmp = _tmp_path(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # an unfinished rewrite: never the truth
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            os.makedirs(path.parent, exist_ok=True)
            snapshot = GroupSnapshot()
            data = encode_file(snapshot, cipher)
            try:
                fd = _write_new(path, data)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"disk full creating group file {path}: {exc}") from exc
                raise
            try:
                _sync_dirs(path)
            except BaseException:
                os.close(fd)
                raise
            return cls(path, fd, len(data), len(data), compact_bytes, cipher), snapshot
        try:
            data = _read_all(fd)
            decoded = decode_bytes(data, str(path), cipher)
            good = len(data) - decoded.torn_bytes
            if decoded.torn_bytes:
                os.ftruncate(fd, good)
                os.fsync(fd)  # the cut is final before anything is appended after it
            else:
                # What a killed writer left in the page cache: on disk before "synced".
                os.fdatasync(fd)
            _sync_dirs(path)
        except BaseException:
            os.close(fd)
            raise
        snapshot_end = decoded.deltas[0].position if decoded.deltas else good
        log = cls(path, fd, good, snapshot_end, compact_bytes, cipher)
        log.torn_bytes = decoded.torn_bytes
        # The decoded snapshot is ours alone: apply in place (no copy of a big window).
        state = _apply_all(decoded.snapshot, decoded.deltas)
        if decoded.encrypted != (log._seal is not None):
            # --encryption changed since the file was written: the whole file in the
            # node's mode now (appends and compactions then stay in it).
            try:
                log.compact(state)
            except BaseException:
                log.close()
                raise
        return log, state

    # -- state -----------------------------------------------------------------------

    @property
    def written(self) -> int:
        """Entries appended since open (monotonic: compaction does not reset it)."""
        return self._written

    @property
    def synced(self) -> int:
        """Entries covered by the last :meth:`sync` (or compaction)."""
        return self._synced

    @property
    def size_bytes(self) -> int:
        return self._size

    def _check(self) -> None:
        if self._poisoned is not None:
            raise LogPoisoned(f"group file {self.path} failed earlier: {self._poisoned}")
        if self._closed:
            raise LogPoisoned(f"group file {self.path} is closed")

    # -- writing ---------------------------------------------------------------------

    def append(self, entries: Sequence[JournalEntry]) -> None:
        """Write ``entries`` as one DELTA frame with one ``os.write`` (survives kill -9
        once this returns; power loss once a :meth:`sync` covered it). An entry the
        format cannot hold raises LocalProtocolError before anything is written."""
        self._check()
        if not entries:
            return
        data = _delta_frames(entries, self._seal)
        fd = self._fd
        try:
            n = os.write(fd, data)
            if n < len(data):
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            try:
                os.ftruncate(fd, self._size)
            except OSError as cut:
                self._poisoned = cut
                raise LogPoisoned(
                    f"group file {self.path}: write failed and could not be undone: {cut}"
                ) from exc
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full writing group file {self.path}: {exc}") from exc
            self._poisoned = exc
            raise
        comp = self._compaction
        if comp is not None:
            # The new file gets the frame too: its fdatasync (by sync) then covers
            # every entry it claims, before the rename can make it the truth.
            try:
                _write_all(comp.fd, data)
            except OSError:
                self._abandon_compaction()  # the live file has the frame: no error
            else:
                comp.size += len(data)
        with self._lock:
            self._size += len(data)
            self._written += len(entries)

    def sync(self) -> int:
        """fdatasync; returns the :attr:`written` count now known durable (:attr:`synced`).

        Safe from the fsync thread while the owner appends, compacts or closes. While a
        background compaction runs it fdatasyncs the new file (``<file>.tmp``) too, and
        after its rename it fsyncs the directory: entries written after a rename count
        only once the directory was fsynced as well. An ``OSError`` is raised once and
        poisons the log (never retried). After :meth:`close` it changes nothing and
        returns :attr:`synced`."""
        with self._lock:
            if self._closed and self._poisoned is None:
                return self._synced  # a late call from the fsync thread
            self._check()
            target = self._written
            comp = self._compaction
            sync_tmp = comp is not None and comp.durable < target
            dirty = self._dir_dirty
            gen = self._gen
            if target <= self._synced and not sync_tmp and not dirty:
                return self._synced
            fd = os.dup(self._fd)
            tmp_fd = -1
            if sync_tmp:
                assert comp is not None
                try:
                    tmp_fd = os.dup(comp.fd)
                except BaseException:
                    os.close(fd)
                    raise
        try:
            os.fdatasync(fd)
            if tmp_fd >= 0:
                os.fdatasync(tmp_fd)
            if dirty:
                _fsync_dir(self.path.parent)
        except OSError as exc:
            self._poisoned = exc
            raise
        finally:
            os.close(fd)
            if tmp_fd >= 0:
                os.close(tmp_fd)
        with self._lock:
            if sync_tmp and self._compaction is comp:
                assert comp is not None
                comp.durable = max(comp.durable, target)
            if gen == self._gen:
                if dirty:
                    self._dir_dirty = False
                claim = target
            elif gen + 1 == self._gen:
                # The file was switched meanwhile: what this fdatasync of the old file
                # covered counts only as far as the new file held it durably too (which
                # name a crash leaves is unknown until the directory is fsynced).
                claim = min(target, self._switch_durable)
            else:
                claim = self._synced
            if claim > self._synced:
                self._synced = claim
            return self._synced

    def needs_compaction(self) -> bool:
        """The deltas outgrew ``max(compact_bytes, 4 x the snapshot's size)`` and no
        compaction is in progress (nor failed at this size)."""
        return (
            self._compaction is None
            and self._size >= self._retry_size
            and self._size - self._snapshot_bytes
            > max(self.compact_bytes, 4 * self._snapshot_bytes)
        )

    @property
    def compacting(self) -> bool:
        """A background compaction is in progress (begun, not yet switched)."""
        return self._compaction is not None

    def begin_compaction(self, snapshot: GroupSnapshot) -> None:
        """Start replacing the file by one holding ``snapshot`` (the group's live
        state: every entry appended so far), without an fsync on the calling thread.

        ``<file>.tmp`` gets the snapshot (written, not fsynced); from now on every
        :meth:`append` writes its frame to both files. The next :meth:`sync` (the fsync
        thread's) fdatasyncs the tmp file as well; then :meth:`finish_compaction`
        renames it over the file. A failure here leaves the log as it was (DiskFull
        for lack of space) and no compaction is tried again before the deltas grew
        by another threshold."""
        self._check()
        if self._compaction is not None:
            raise LocalProtocolError(f"group file {self.path}: a compaction is in progress")
        data = encode_file(snapshot, self._cipher)
        tmp = _tmp_path(self.path)
        try:
            fd = _write_tmp(tmp, data, sync=False)
        except OSError as exc:
            self._retry_size = self._size + max(self.compact_bytes, 4 * self._snapshot_bytes)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full compacting group file {self.path}: {exc}") from exc
            raise
        with self._lock:
            self._compaction = _Compaction(fd, len(data), self._written)

    def compaction_ready(self) -> bool:
        """The compaction in progress may switch: a sync made its file durable."""
        with self._lock:
            return self._compaction is not None and self._compaction.durable >= 0

    def finish_compaction(self) -> None:
        """Rename the compacted file over the file and append to it from now on (owner
        thread, once :meth:`compaction_ready`). No fsync here: the next :meth:`sync`
        fsyncs the directory, and entries written from now on count as synced only
        after it. A crash before that leaves the old file (it got every frame up to
        the rename) or the new one (snapshot + the same frames). A failed rename
        poisons the log."""
        self._check()
        comp = self._compaction
        if comp is None or comp.durable < 0:
            raise LocalProtocolError(f"group file {self.path}: no compaction ready to switch")
        try:
            os.replace(_tmp_path(self.path), self.path)
        except BaseException as exc:
            self._poisoned = exc
            raise
        with self._lock:
            old, self._fd = self._fd, comp.fd
            self._size = comp.size
            self._snapshot_bytes = comp.snapshot_bytes
            self._compaction = None
            self._gen += 1
            self._dir_dirty = True
            self._switch_durable = comp.durable
        os.close(old)

    def _abandon_compaction(self) -> None:
        """Drop the compaction in progress (its tmp file); the old file stays."""
        with self._lock:
            comp, self._compaction = self._compaction, None
        if comp is None:
            return
        self._retry_size = self._size + max(self.compact_bytes, 4 * self._snapshot_bytes)
        os.close(comp.fd)
        with contextlib.suppress(OSError):
            os.unlink(_tmp_path(self.path))

    def compact(self, snapshot: GroupSnapshot) -> None:
        """Replace the file by one holding ``snapshot`` at once (the group's live state:
        it must include every entry appended so far), fsyncs on the calling thread
        (tests, tools; the shard uses :meth:`begin_compaction`). ``<file>.tmp`` is
        written, fsynced, renamed over the file and the directory fsynced: a crash at
        any point leaves the old file or the new one, whole. Afterwards everything
        written is synced. A compaction in progress is abandoned first. A failure
        before the rename leaves the log as it was (DiskFull for lack of space); one
        after it poisons the log."""
        self._check()
        self._abandon_compaction()
        data = encode_file(snapshot, self._cipher)
        tmp = _tmp_path(self.path)
        try:
            fd = _write_tmp(tmp, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full compacting group file {self.path}: {exc}") from exc
            raise
        try:
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException as exc:
            os.close(fd)
            # Which file holds the name is unknown now: only a reopen can tell.
            self._poisoned = exc
            raise
        with self._lock:
            old, self._fd = self._fd, fd
            self._size = self._snapshot_bytes = len(data)
            self._synced = self._switch_durable = self._written
            self._gen += 1
            self._dir_dirty = False
        os.close(old)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the file; a compaction in progress is abandoned (its tmp removed)."""
        if self._closed:
            return
        self._abandon_compaction()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def delete(self) -> None:
        """The group is gone: close, remove its file (and a stale ``.tmp``), fsync the
        directory. The directories stay (other groups of the stream may use them)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_tmp_path(self.path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        _fsync_dir(self.path.parent)


class _Compaction:
    """A background compaction: the new file's fd and size, the entries its snapshot
    covers, and how many entries a sync made durable in it (-1: none yet)."""

    __slots__ = ("durable", "fd", "size", "snapshot_bytes", "start")

    def __init__(self, fd: int, size: int, start: int) -> None:
        self.fd = fd
        self.size = size
        self.snapshot_bytes = size
        self.start = start
        self.durable = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_tmp(tmp: Path, data: bytes, *, sync: bool = True) -> int:
    """``data`` in a fresh ``tmp`` (fsynced unless not ``sync``); returns its fd
    (O_RDWR | O_APPEND). On failure the tmp file is removed."""
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _write_new(path: Path, data: bytes) -> int:
    """Create ``path`` holding ``data`` through a fsynced tmp file and a rename."""
    tmp = _tmp_path(path)
    fd = _write_tmp(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sync_dirs(path: Path) -> None:
    """fsync the file's directory and the ones above it (their entries must be on
    disk before anything in the file is called synced)."""
    directory = path.parent
    for level in (directory, *directory.parents[:PARENT_DIRS_SYNCED]):
        _fsync_dir(level)
