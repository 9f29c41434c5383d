"""A child process that appends to a DiskLog in a loop until it is killed.

Run as ``python -m tests.disklog_appender DIR SYNC_EVERY``. It opens the
log (recovering what a previous child left), continues at its next offset and
appends deterministic batches forever. After each ``append`` returns it prints
``A <next_offset>`` (every record below was handed to the kernel) and after each
``sync`` ``S <synced_offset>``, flushing stdout, so the parent knows exactly what
was acknowledged when it sends SIGKILL. The first line is ``O <next_offset>
<torn_bytes_cut>`` after opening.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from felix.shard.disklog import DiskLog, DiskLogSettings


def payload_for(offset: int) -> bytes:
    """The payload every writer uses for ``offset``: checkable without a record."""
    size = offset * 7919 % 700
    seed = hashlib.sha256(offset.to_bytes(8, "big")).digest()
    return (seed * (size // 32 + 1))[:size]


def timestamp_for(offset: int) -> int:
    return 1_700_000_000_000_000 + offset * 10


def batch_size_for(start: int) -> int:
    return 1 + start * 31 % 17


def main() -> None:
    directory, sync_every = Path(sys.argv[1]), int(sys.argv[2])
    settings = DiskLogSettings(segment_bytes=8192, index_interval_bytes=1024)
    log = DiskLog.open(directory, settings, first_offset=0)
    out = sys.stdout
    out.write(f"O {log.next_offset} {log.recovery.torn_bytes_cut}\n")
    out.flush()
    rounds = 0
    while True:
        start = log.next_offset
        n = batch_size_for(start)
        log.append([(o, timestamp_for(o), payload_for(o)) for o in range(start, start + n)])
        out.write(f"A {log.next_offset}\n")
        rounds += 1
        if sync_every and rounds % sync_every == 0:
            out.write(f"S {log.sync()}\n")
        out.flush()


if __name__ == "__main__":
    main()
