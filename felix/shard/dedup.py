"""Duplicate suppression by message id: the ``felix-msg-id`` header, per stream.

How it works
------------
A publisher that may send a record twice (a retry after a lost ack, a bridge
restarting from its checkpoint) gives each record a message id in the header
``felix-msg-id`` (1 to :data:`MAX_MSG_ID_BYTES` bytes of UTF-8). A stream with a
dedup window remembers, in a :class:`DedupTable`, the offset each id was stored at
and when; a publish of an id it remembers is not stored again (so it is not
delivered again) and is acknowledged with the *original* record's offset, so a
retry is idempotent. Ids are remembered for the stream's ``dedup_window_s`` and at
most ``dedup_max_entries`` of them; past either bound the oldest are forgotten
first, and a record published again after that is stored again.

Batches: a PUBLISH_OFFSETS ack says "offsets base .. base+count-1", so a batch can
only be acknowledged when its records' offsets (the originals for duplicates, the
new ones for the rest) are contiguous. :meth:`DedupTable.plan` works that out
before anything is stored: a batch whose duplicates are all a run ending at the
stream's tail, followed by new records (a retried batch, or a retry that also
carries records sent after it) is acknowledged as one run; any other batch with a
duplicate (duplicates among new records, or an id twice in the batch) is refused
whole with :class:`~felix.errors.DuplicatesInBatch`, nothing stored, and the
client publishes its records one by one.

Time is the wall clock in microseconds, the clock durable records are stamped
with: a durable stream's table is rebuilt at start from the records of its log
tail stamped within the window (:func:`rebuild`), with the same stamps it had.
An in-memory stream's table is lost with its records when the shard process ends.

Memory: each entry is accounted :data:`ENTRY_OVERHEAD` bytes plus its id's UTF-8
bytes (measured on CPython 3.11: an OrderedDict entry with a str key and a tuple of
two ints), charged to the stream's tenant like its replay ring; a tenant over its
quota trims its ids too, oldest first, after its replay rings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from felix.errors import BadRequest, FelixError
from felix.shard.log_format import decode_record
from felix.shard.stream_log import MAX_DEDUP_ENTRIES as MAX_ENTRIES
from felix.shard.stream_log import MAX_DEDUP_WINDOW_S as MAX_WINDOW_S

if TYPE_CHECKING:
    from felix.shard.disklog import DiskRecord
    from felix.shard.durable import DurableStream

__all__ = [
    "ENTRY_OVERHEAD",
    "MAX_ENTRIES",
    "MAX_MSG_ID_BYTES",
    "MAX_WINDOW_S",
    "MSG_ID_HEADER",
    "DedupTable",
    "Plan",
    "msg_ids",
    "rebuild",
]

#: The header carrying a publisher-chosen message id (docs/api.md).
MSG_ID_HEADER: Final = "felix-msg-id"
#: Longest message id, in UTF-8 bytes: room for a bridge's id
#: (``bridge:<region>/<tenant>/<ns>/<stream>@<offset>``, at most 286 bytes with names
#: of 64 characters), bounded so an id costs a known amount of memory.
MAX_MSG_ID_BYTES: Final = 512
#: Accounted bytes per remembered id on top of the id's UTF-8 bytes.
ENTRY_OVERHEAD: Final = 272
#: Records a rebuild reads per DiskLog read.
_REBUILD_CHUNK: Final = 4096


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def msg_ids(headers: Sequence[Mapping[str, str] | None]) -> list[str | None] | None:
    """Each record's message id (None for a record without one), checked; None when no
    record of the batch has one.

    Raises:
        BadRequest: an id is empty or longer than :data:`MAX_MSG_ID_BYTES` bytes.
    """
    ids: list[str | None] | None = None
    for i, hdrs in enumerate(headers):
        value = hdrs.get(MSG_ID_HEADER) if hdrs else None
        if value is None:
            if ids is not None:
                ids.append(None)
            continue
        size = _utf8_len(value)
        if not 0 < size <= MAX_MSG_ID_BYTES:
            raise BadRequest(
                f"header {MSG_ID_HEADER} of record {i} is {size} bytes: a message id is 1 "
                f"to {MAX_MSG_ID_BYTES} bytes of UTF-8"
            )
        if ids is None:
            ids = [None] * i
        ids.append(value)
    return ids


@dataclass(frozen=True, slots=True)
class Plan:
    """What a batch with duplicates does (:meth:`DedupTable.plan`).

    ``first``: the offset the ack names first (the first record's, original or new);
    ``keep``: indexes of the records to store (in order); ``duplicates``: how many
    are not stored; ``contiguous``: whether the ack can say ``first .. first+n-1``
    (else the batch is refused whole).
    """

    first: int
    keep: list[int]
    duplicates: int
    contiguous: bool


class DedupTable:
    """The message ids one stream stored recently: id -> (offset, stamp in us).

    Bounded by a window (entries stamped at or before ``now - window`` are gone) and
    by ``max_entries`` (the oldest are forgotten first). Not thread-safe: the shard's
    loop thread owns it. :attr:`nbytes` is the accounted size; every method that
    changes it returns the change, for the caller to charge.
    """

    __slots__ = ("_entries", "evicted", "expired", "max_entries", "nbytes", "trimmed", "window_us")

    def __init__(self, window_s: float, max_entries: int) -> None:
        self.window_us = int(window_s * 1_000_000)
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.nbytes = 0
        #: Ids forgotten for the entry bound, by the window, by memory trims.
        self.evicted = 0
        self.expired = 0
        self.trimmed = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._entries

    @property
    def window_s(self) -> float:
        return self.window_us / 1_000_000

    def find(self, msg_id: str, now_us: int) -> int | None:
        """The offset ``msg_id`` was stored at, if it is remembered and within the window."""
        entry = self._entries.get(msg_id)
        if entry is None or entry[1] <= now_us - self.window_us:
            return None
        return entry[0]

    def plan(self, ids: Sequence[str | None], tail: int, now_us: int) -> Plan | None:
        """How a batch with these ids is stored when the stream's next offset is
        ``tail``; None when it holds no duplicate (store it as it is)."""
        if len(ids) == 1:  # the common case, without the lists
            msg_id = ids[0]
            orig = None if msg_id is None else self.find(msg_id, now_us)
            return None if orig is None else Plan(orig, [], 1, True)
        first_dup = -1
        seen: dict[str, int] | None = None  # ids new in this batch: their new offsets
        offsets: list[int] = []
        keep: list[int] = []
        new = tail
        for i, msg_id in enumerate(ids):
            if msg_id is not None:
                orig = self.find(msg_id, now_us)
                if orig is None and seen is not None:
                    orig = seen.get(msg_id)
                if orig is not None:
                    if first_dup < 0:
                        first_dup = i
                    offsets.append(orig)
                    continue
                if seen is None:
                    seen = {}
                seen[msg_id] = new
            offsets.append(new)
            keep.append(i)
            new += 1
        if first_dup < 0:
            return None
        first = offsets[0]
        contiguous = all(off == first + i for i, off in enumerate(offsets))
        return Plan(first, keep, len(ids) - len(keep), contiguous)

    def add(self, msg_id: str, offset: int, stamp_us: int) -> int:
        """Remember ``msg_id`` stored at ``offset``; returns the change of :attr:`nbytes`."""
        entries = self._entries
        size = ENTRY_OVERHEAD + _utf8_len(msg_id)
        delta = size
        if entries.pop(msg_id, None) is not None:
            delta -= size
        entries[msg_id] = (offset, stamp_us)
        while len(entries) > self.max_entries:
            delta -= self._pop_oldest()
            self.evicted += 1
        self.nbytes += delta
        return delta

    def _pop_oldest(self) -> int:
        msg_id, _ = self._entries.popitem(last=False)
        return ENTRY_OVERHEAD + _utf8_len(msg_id)

    def expire(self, now_us: int) -> int:
        """Forget the ids past the window (oldest first; stops at the first one within
        it); returns the change of :attr:`nbytes` (<= 0)."""
        entries = self._entries
        cutoff = now_us - self.window_us
        freed = 0
        while entries:
            oldest = next(iter(entries))
            if entries[oldest][1] > cutoff:
                break
            freed += self._pop_oldest()
            self.expired += 1
        self.nbytes -= freed
        return -freed

    def trim(self, nbytes: int) -> int:
        """Forget the oldest ids until ``nbytes`` are freed (memory pressure); returns
        the bytes freed."""
        freed = 0
        while self._entries and freed < nbytes:
            freed += self._pop_oldest()
            self.trimmed += 1
        self.nbytes -= freed
        return freed

    def resize(self, window_s: float, max_entries: int, now_us: int) -> int:
        """New bounds, applied now; returns the change of :attr:`nbytes`."""
        self.window_us = int(window_s * 1_000_000)
        self.max_entries = max_entries
        delta = self.expire(now_us)
        freed = 0
        while len(self._entries) > max_entries:
            freed += self._pop_oldest()
            self.evicted += 1
        self.nbytes -= freed
        return delta - freed

    def clear(self) -> int:
        """Forget everything; returns the change of :attr:`nbytes`."""
        freed = self.nbytes
        self._entries.clear()
        self.nbytes = 0
        return -freed

    def status(self) -> dict[str, object]:
        return {
            "window_s": self.window_s,
            "max_entries": self.max_entries,
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "evicted": self.evicted,
            "expired": self.expired,
            "trimmed": self.trimmed,
        }


def record_headers(disk: DurableStream, record: DiskRecord) -> Mapping[str, str] | None:
    """The headers of a record read from ``disk``'s log, plain or encrypted (opened
    with the stream's data keys): the one place the rebuild decodes a stored record."""
    headers, _body = decode_record(
        record.payload, disk.key, record.offset, record.timestamp_us, disk.keys
    )
    return headers


def rebuild(
    table: DedupTable,
    disk: DurableStream,
    now_us: int,
    headers_of: Callable[[DurableStream, DiskRecord], Mapping[str, str] | None] = record_headers,
) -> int:
    """Fill ``table`` from ``disk``'s log tail (a durable stream opened at start, or its
    window changed): the ids of the records stamped within the window, read from the
    newest segments that hold ``max_entries`` records (at most that plus one segment's
    records are read). Returns the change of :attr:`nbytes`.

    Records a dead-letter append wrote (``felix-dlq-id``) keep the id of the record
    they copy, which is not an id published to this stream: they are skipped, as the
    shard skips them when they are appended.

    Raises:
        FelixError: the log cannot be read (damage; what was read so far stays).
    """
    delta = table.clear()
    if not table.window_us or not disk.opened or disk.damaged is not None:
        return delta
    log = disk.log
    cutoff = now_us - table.window_us
    end = log.next_offset
    # Offsets may have gaps (a restart skips the rest of a reserved block), so the
    # newest max_entries records are found by segment; the table keeps the newest ids.
    pos = max(log.offset_for_time(cutoff + 1), log.tail_start(table.max_entries))
    while pos < end:
        records = log.read(pos, _REBUILD_CHUNK, 1 << 20)
        if not records:
            break
        for record in records:
            if record.offset >= end:
                return delta
            if record.timestamp_us <= cutoff:
                continue  # the wall clock stepped back: older than it looks by offset
            try:
                headers = headers_of(disk, record)
            except FelixError:
                continue  # not a record we can read ids from; the reader reports it
            if not headers or "felix-dlq-id" in headers:
                continue
            msg_id = headers.get(MSG_ID_HEADER)
            if msg_id is not None:
                delta += table.add(msg_id, record.offset, record.timestamp_us)
        pos = records[-1].offset + 1
    return delta
