"""What every system in the durable benchmark implements.

A ``DurableSystem`` hands out *publishers* (each on a fresh stream or queue, so runs
do not see each other's data) whose ``publish`` returns once the broker acknowledged
the record, and *replay sources*: a stream filled once with ``count`` records, then
read from the earliest record as fast as the client takes them.
"""

from __future__ import annotations

import itertools
from typing import Any

_names = itertools.count()


def unique(prefix: str) -> str:
    """A stream/queue name no earlier run of this process used."""
    return f"{prefix}{next(_names)}"


class Publisher:
    async def publish(self, data: bytes) -> None:
        """Publish one record and wait for the broker's ack."""
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """Facts about the acks seen (e.g. felix's durability level), for the report."""
        return {}

    async def close(self) -> None:
        raise NotImplementedError


class ReplaySource:
    records: int
    record_bytes: int

    async def fill(self) -> None:
        """Publish the ``records`` records (once, before the first read)."""
        raise NotImplementedError

    async def read_all(self) -> int:
        """Read every record from the earliest; return how many arrived."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class DurableSystem:
    name = "?"
    url = "?"
    #: What the server side is, for the report.
    server = "?"
    #: What an ack promises (which failure it survives), for the report.
    promise = "?"

    def server_cpu(self) -> float | None:
        return None

    async def probe(self) -> None:
        """Raise if the system cannot be reached or lacks what the benchmark needs."""

    async def version(self) -> str:
        return "?"

    async def publisher(self, in_flight: int) -> Publisher:
        raise NotImplementedError

    def can_replay(self) -> bool:
        return True

    def replay_cap(self) -> int | None:
        """Most bytes a replay stream can hold here (None: no cap besides the disk)."""
        return None

    async def replay_source(self, records: int, record_bytes: int) -> ReplaySource:
        """A new, still empty stream for ``records`` records of ``record_bytes`` bytes.

        The caller registers it for closing before it calls ``fill()``, so a stream
        is deleted even when the fill fails or the run is interrupted.
        """
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Server-side counters to difference around a run (felix: fsync count and time)."""
        return {}

    def stop(self) -> None:
        """Stop what this system started (servers of its own); idempotent."""
