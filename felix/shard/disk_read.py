"""Reading durable streams: where a subscription starts, and READs served from disk.

:func:`durable_start` resolves a SUBSCRIBE's start against everything still on disk
(an offset, earliest, latest, or a time through the log's sparse index).

A READ below a durable stream's hot tail is served from disk in a reader thread:
the shard core queues a :class:`ReadJob` (felix/shard/durable.py) instead of
answering; the I/O driver (felix/node/disk_io.py) runs :meth:`ReadJob.run` in its
small thread pool (DiskLog reads are safe beside the loop thread's appends) and
hands the job back to the core, which sends the READ_REPLY. The job decodes the
records and encodes the EVENTS frame in the thread too, so the loop only copies the
finished frame into the gateway's ring. A read is bounded by the READ's records and
bytes (at most MAX_READ_RECORDS / MAX_READ_BYTES of felix/shard/core.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from felix import wire
from felix.errors import CursorError, KeyUnavailable, LogDamaged, Unavailable
from felix.shard.log_format import decode_record

if TYPE_CHECKING:
    from felix.shard.durable import DurableStream
    from felix.shard.stream_log import StreamLog

log = logging.getLogger("felix.shard")

__all__ = ["ReadJob", "durable_start"]


def durable_start(disk: DurableStream, mem: StreamLog, at: object) -> int:
    """Where a subscription to a durable stream starts: anywhere still on disk.

    ``at`` is the SUBSCRIBE's start (``"earliest"``, ``"latest"``, an offset or a
    ``wire.StartAtTime``); ``mem`` is the stream's hot tail.

    Raises:
        Unavailable: the stream's log is damaged.
        CursorError: an offset below what is on disk or beyond the tail.
    """
    if disk.damaged is not None:
        raise Unavailable(disk.damaged)
    problem = disk.key_problem()
    if problem is not None:
        raise KeyUnavailable(f"stream {disk.key} is refused: {problem}")
    low = min(disk.low(), mem.earliest)
    if at == "earliest":
        return low
    if isinstance(at, wire.StartAtTime):
        # The sparse index makes this a few small reads, not a scan.
        found = disk.log.offset_for_time(at.timestamp_us)
        return min(max(found, low), mem.next_offset)
    if at == "latest" or type(at) is not int or at < 0:
        return mem.resolve_start(at)  # type: ignore[arg-type]
    if at < low:
        raise CursorError("too_old", at, low)
    if at > mem.next_offset:
        raise CursorError("in_future", at, mem.next_offset)
    return at


class ReadJob:
    """A READ below the hot tail, run from disk in a reader thread (:meth:`run`)."""

    __slots__ = (
        "count",
        "disk",
        "error",
        "first_offset",
        "frame",
        "from_offset",
        "gateway",
        "key",
        "max_bytes",
        "max_records",
        "token",
    )

    def __init__(
        self,
        disk: DurableStream,
        gateway: int,
        token: int,
        from_offset: int,
        max_records: int,
        max_bytes: int,
    ) -> None:
        self.disk = disk
        self.key = disk.key
        self.gateway = gateway
        self.token = token
        self.from_offset = from_offset
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.first_offset = from_offset
        self.count = 0
        self.frame = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        """Read and encode one EVENTS frame (in a reader thread; never raises).

        Only the run of consecutive offsets from the first record found is sent: the
        gateway sees a jump to it as a gap of offsets never assigned (or lost when
        unsynced), and the next READ continues after it.
        """
        try:
            records = self.disk.log.read(self.from_offset, self.max_records, self.max_bytes)
            if not records:
                return
            first = records[0].offset
            payloads: list[bytes] = []
            headers: list[dict[str, str] | None] = []
            expected = first
            key, keys = self.key, self.disk.keys
            for record in records:
                if record.offset != expected:
                    break
                # Plain or encrypted (decrypted here, in the reader thread).
                hdrs, body = decode_record(
                    record.payload, key, record.offset, record.timestamp_us, keys
                )
                payloads.append(body)
                headers.append(dict(hdrs) if hdrs else None)
                expected += 1
            self.first_offset = first
            self.count = len(payloads)
            self.frame = wire.encode_events(
                first, payloads, headers=headers if any(headers) else None
            )
        except Exception as exc:  # reported to the loop thread, never lost
            self.error = exc

    def reply(self, mem: StreamLog, shard: int) -> bytes:
        """The READ_REPLY frame once :meth:`run` finished (loop thread; ``mem`` is the
        stream's hot tail, still the same stream's)."""
        if self.error is not None:
            return self._failed(mem, shard)
        if self.count:
            return self.frame
        # Nothing on disk from there below the hot tail (offsets never assigned, or
        # unsynced records lost): continue in memory; the jump is a gap.
        batch = mem.read(max(self.from_offset, mem.earliest), self.max_records, self.max_bytes)
        headers = batch.headers if any(batch.headers) else None
        return wire.encode_events(
            batch.first_offset,
            batch.payloads,
            headers=[h if h is None else dict(h) for h in headers] if headers else None,
        )

    def _failed(self, mem: StreamLog, shard: int) -> bytes:
        disk, err = self.disk, self.error
        if isinstance(err, LogDamaged):
            disk.damaged = f"stream {self.key} is damaged on disk: {err}"
            log.error("shard %d: %s (refused until repaired)", shard, disk.damaged)
            return wire.encode_error(0, Unavailable.code, disk.damaged)
        if isinstance(err, KeyUnavailable):
            # Not damage: the right key makes it readable again (not remembered).
            log.error("shard %d: disk read of %s refused: %s", shard, self.key, err)
            return wire.encode_error(0, Unavailable.code, str(err))
        low = min(disk.low(), mem.earliest)
        if self.from_offset < low:  # retention deleted the segment while it was read
            return wire.encode_cursor_error(0, "too_old", self.from_offset, low)
        log.error("shard %d: disk read of %s failed: %r", shard, self.key, err)
        return wire.encode_error(0, Unavailable.code, f"disk read of stream {self.key} failed")
