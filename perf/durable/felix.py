"""felix in the durable benchmark: one node per fsync policy, plus an in-memory node.

Each durable node runs ``felix up --durable-streams --fsync POLICY`` so every stream
it auto-creates is durable with that policy (the node options of issue #12); the
memory node is plain ``felix up``, the baseline of what the disk costs. A felix
whose ``felix up`` has no ``--durable-streams`` gets only the memory node (the
durable systems are reported as unavailable).

The node's /metrics (``felix_fsync_seconds`` histogram) is read around each run:
fsyncs done and their total time, hence the group-commit size (acks per fsync).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import sys
import urllib.request
from typing import Any

from perf.durable.base import DurableSystem, Publisher, ReplaySource, unique
from perf.harness.node import FelixNode

POLICIES = ("commit", "interval", "none")
#: Bytes a memory stream keeps for replay (``felix up --replay-bytes``); the memory
#: baseline's replay stream is capped below it so the reader gets every record.
MEMORY_REPLAY_BYTES = 64 * 2**20
_DURABILITY = {0: "memory", 1: "written", 2: "synced"}


def supports_durable() -> bool:
    """Does this felix's ``felix up`` take ``--durable-streams``?"""
    out = subprocess.run(
        [sys.executable, "-m", "felix.cli", "up", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--durable-streams" in out.stdout


def node_args(
    policy: str, fsync_interval_ms: int | None = None, hot_tail: str | None = None
) -> list[str]:
    """``felix up`` options for a node whose auto-created streams have ``policy``.

    ``hot_tail``: ``--replay-bytes`` of a durable node (what each stream keeps in
    memory; older records are read from disk); None or "default": felix's default.
    """
    if policy == "memory":
        return []
    args = ["--durable-streams", "--fsync", policy]
    if policy == "interval" and fsync_interval_ms is not None:
        args += ["--fsync-interval-ms", str(fsync_interval_ms)]
    if hot_tail not in (None, "default"):
        args += ["--replay-bytes", str(hot_tail)]
    return args


class _FelixPublisher(Publisher):
    def __init__(self, client: Any, stream: str) -> None:
        self.client, self.stream = client, stream
        self.seen: collections.Counter[str] = collections.Counter()

    async def publish(self, data: bytes) -> None:
        ack = await self.client.publish(self.stream, data)
        # The publish reply's durability (wire byte added by issue #12); older
        # clients' PublishAck has none.
        level = getattr(ack, "durability", None)
        if level is None:
            key = "unreported"
        elif isinstance(level, int) and level in _DURABILITY:
            key = _DURABILITY[level]
        else:  # an enum or a string
            key = str(getattr(level, "name", level)).lower()
        self.seen[key] += 1

    def details(self) -> dict[str, Any]:
        return {"ack_durability": dict(self.seen)}

    async def close(self) -> None:
        await self.client.close()


class _FelixReplay(ReplaySource):
    def __init__(self, client: Any, stream: str, records: int, size: int, batch: int) -> None:
        self.client, self.stream = client, stream
        self.records, self.record_bytes, self.batch = records, size, batch

    async def fill(self) -> None:
        """``records`` records in acked batches of ``batch``, 4 batches in flight."""
        batch, window = self.batch, 4
        body = b"r" * self.record_bytes
        batches, rest = divmod(self.records, batch)
        sizes = [batch] * batches + ([rest] if rest else [])
        it = iter(sizes)

        async def worker() -> None:
            for k in it:
                await self.client.publish_batch(self.stream, [body] * k)

        await asyncio.gather(*(worker() for _ in range(window)))

    async def read_all(self) -> int:
        got = 0
        async with self.client.subscribe(self.stream, start="earliest", credit=4096) as sub:
            async for _ in sub:
                got += 1
                if got >= self.records:
                    break
        return got

    async def close(self) -> None:
        await self.client.close()


class FelixDurable(DurableSystem):
    """felix with streams of one policy: ``commit``, ``interval``, ``none`` or ``memory``."""

    def __init__(
        self,
        policy: str,
        topology: tuple[int | None, int | None, bool],
        fsync_interval_ms: int | None = None,
        hot_tail: str | None = None,
    ) -> None:
        self.policy = policy
        self.name = f"felix {policy}"
        self.args = node_args(policy, fsync_interval_ms, hot_tail)
        self.hot_tail_bytes = MEMORY_REPLAY_BYTES
        if policy != "memory" and hot_tail not in (None, "default"):
            from felix.node.config import parse_size

            self.hot_tail_bytes = parse_size(str(hot_tail))
        self.promise = {
            "commit": "fsynced before the ack (group commit): survives power loss",
            "interval": "written to the kernel before the ack, fsynced within "
            f"{fsync_interval_ms or 100} ms: survives kill -9, not power loss",
            "none": "written to the kernel before the ack, fsync left to the OS: "
            "survives kill -9, not power loss",
            "memory": "held in the shard's memory: lost with the node",
        }[policy]
        g, s, emb = topology
        self.node = FelixNode(g, s, emb, extra_args=self.args)
        self.url = self.node.url
        self.server = f"felix up {' '.join(self.node.args)} ({self.node.label})"

    def server_cpu(self) -> float | None:
        return self.node.cpu()

    async def version(self) -> str:
        import felix

        return felix.__version__

    async def _connect(self, in_flight: int = 256) -> Any:
        import felix

        return await felix.connect(
            self.node.url, ca=self.node.ca, max_in_flight=max(256, in_flight)
        )

    async def probe(self) -> None:
        client = await self._connect()
        await client.close()

    async def publisher(self, in_flight: int) -> Publisher:
        return _FelixPublisher(await self._connect(in_flight), unique("perfdur-"))

    def replay_cap(self) -> int | None:
        # A memory stream keeps only --replay-bytes; leave room for record overhead.
        return MEMORY_REPLAY_BYTES * 3 // 4 if self.policy == "memory" else None

    async def replay_source(self, records: int, record_bytes: int) -> ReplaySource:
        # One batch must fit the stream's in-memory ring (else TooLarge) and a request
        # (2 MiB): at most a quarter of the hot tail and 1 MiB.
        limit = min(2**20, self.hot_tail_bytes // 4)
        batch = max(1, min(256, limit // (record_bytes + 64)))
        client = await self._connect()
        return _FelixReplay(client, unique("perfdur-replay-"), records, record_bytes, batch)

    def metrics(self) -> dict[str, float]:
        """fsync count, seconds and commit acks so far, summed over the node's shards.

        Only for ``commit`` and ``interval`` (``none`` leaves fsync to the OS; memory
        streams have no files): the caller waits for a fresh stats report after each
        run, time not worth spending where nothing is fsynced.
        """
        if self.policy not in ("commit", "interval"):
            return {}
        return self.scrape()

    def scrape(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://{self.node.info['http']}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        return parse_fsync_metrics(text)

    def stop(self) -> None:
        self.node.stop()


def parse_fsync_metrics(text: str) -> dict[str, float]:
    """``fsyncs``, ``fsync_seconds`` and ``fsync_acks`` summed over the node's processes.

    From Prometheus text: the ``felix_fsync_seconds`` summary (count, sum) and the
    ``felix_fsync_acks`` counter (commit acks released by fsyncs). Empty if the node
    exports no fsync summary.
    """
    out = {"fsyncs": 0.0, "fsync_seconds": 0.0, "fsync_acks": 0.0}
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        with contextlib.suppress(ValueError, IndexError):
            value = float(line.rsplit(" ", 1)[1])
            if name == "felix_fsync_seconds_count":
                out["fsyncs"] += value
                found = True
            elif name == "felix_fsync_seconds_sum":
                out["fsync_seconds"] += value
            elif name in ("felix_fsync_acks_total", "felix_fsync_acks"):
                out["fsync_acks"] += value
            elif name in ("felix_disk_reads_total", "felix_disk_reads"):
                out["disk_reads"] = out.get("disk_reads", 0.0) + value
    return out if found else {}
