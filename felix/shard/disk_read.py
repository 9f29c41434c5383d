"""A READ of a durable stream below its hot tail, served from disk in a reader thread.

The shard core queues a :class:`ReadJob` (felix/shard/durable.py) instead of
answering; the I/O driver (felix/node/disk_io.py) runs :meth:`ReadJob.run` in its
small thread pool (DiskLog reads are safe beside the loop thread's appends) and
hands the job back to the core, which sends the READ_REPLY. The job decodes the
records and encodes the EVENTS frame in the thread too, so the loop only copies the
finished frame into the gateway's ring. A read is bounded by the READ's records and
bytes (at most MAX_READ_RECORDS / MAX_READ_BYTES of felix/shard/core.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from felix import wire
from felix.shard.log_format import decode_envelope

if TYPE_CHECKING:
    from felix.shard.durable import DurableStream

__all__ = ["ReadJob"]


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
            for record in records:
                if record.offset != expected:
                    break
                hdrs, body = decode_envelope(record.payload)
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
