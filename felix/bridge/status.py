"""What a bridge runner reports: per-bridge figures, as JSON and as Prometheus metrics,
over a small HTTP endpoint of the runner (``--http HOST:PORT``: ``/metrics``,
``/bridges``) and in ``STATE_DIR/status.json``.

Labels are the bridge's tenant and name only, and a runner runs at most
:data:`MAX_BRIDGES_PER_RUNNER` bridges, so the series are bounded (the node's own
/metrics carries no tenant label at all; these live on the runner's endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["MAX_BRIDGES_PER_RUNNER", "BridgeStatus", "StatusServer", "write_status_file"]

log = logging.getLogger("felix.bridge")

#: Bridges one runner copies at once (each: a task, two QUIC connections, a checkpoint,
#: nine metric series). More are reported as refused in the runner's status, not run.
MAX_BRIDGES_PER_RUNNER = 256
#: Longest error text kept per bridge.
MAX_ERROR_CHARS = 500
#: Samples the rate is computed over (one per status refresh).
_RATE_SAMPLES = 10


@dataclass
class BridgeStatus:
    """One bridge as its runner sees it."""

    tenant: str
    name: str
    #: starting, running, paused, retrying (a transient error, backing off), failed (a
    #: permanent refusal by the target or bad settings: retried slowly until fixed),
    #: refused (over the runner's bridge bound).
    state: str = "starting"
    source: str = ""
    target: str = ""
    #: Next source offset to copy (every record below is acked by the target).
    checkpoint: int | None = None
    #: The source stream's end offset, as last seen.
    source_end: int | None = None
    forwarded: int = 0
    forwarded_bytes: int = 0
    filtered: int = 0
    #: Source records that were gone (retention) before the bridge copied them.
    skipped: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    #: The durability the target's last ack promised (memory, written, synced).
    target_durability: str | None = None
    _samples: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=_RATE_SAMPLES), repr=False
    )

    @property
    def lag(self) -> int | None:
        if self.source_end is None or self.checkpoint is None:
            return None
        return max(self.source_end - self.checkpoint, 0)

    def error(self, text: str) -> None:
        self.errors += 1
        self.last_error = text[:MAX_ERROR_CHARS]
        self.last_error_at = time.time()

    def sample(self, now: float) -> None:
        self._samples.append((now, self.forwarded))

    @property
    def rate(self) -> float:
        """Records forwarded per second over the last samples."""
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "name": self.name,
            "state": self.state,
            "source": self.source,
            "target": self.target,
            "checkpoint": self.checkpoint,
            "source_end": self.source_end,
            "lag": self.lag,
            "rate": round(self.rate, 2),
            "forwarded": self.forwarded,
            "forwarded_bytes": self.forwarded_bytes,
            "filtered": self.filtered,
            "skipped": self.skipped,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "target_durability": self.target_durability,
        }


class _Collector(Collector):
    def __init__(self, statuses: dict[tuple[str, str], BridgeStatus]) -> None:
        self.statuses = statuses

    def collect(self) -> Any:
        labels = ["tenant", "bridge"]
        counters = {
            "forwarded": ("felix_bridge_records", "Records copied to the target and acked"),
            "forwarded_bytes": ("felix_bridge_bytes", "Payload bytes copied and acked"),
            "filtered": ("felix_bridge_filtered", "Source records the header filter left out"),
            "skipped": ("felix_bridge_skipped", "Source records gone before they were copied"),
            "errors": ("felix_bridge_errors", "Errors (each retried, or stopping the flow)"),
        }
        gauges = {
            "lag": ("felix_bridge_lag_records", "Source end offset minus the checkpoint"),
            "checkpoint": ("felix_bridge_checkpoint_offset", "Next source offset to copy"),
            "rate": ("felix_bridge_records_per_second", "Records copied per second, recently"),
        }
        for attr, (name, doc) in counters.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for st in self.statuses.values():
                family.add_metric([st.tenant, st.name], getattr(st, attr))
            yield family
        for attr, (name, doc) in gauges.items():
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for st in self.statuses.values():
                value = getattr(st, attr)
                if value is not None:
                    gauge.add_metric([st.tenant, st.name], value)
            yield gauge
        running = GaugeMetricFamily(
            "felix_bridge_running", "1 while the bridge's records flow", labels=labels
        )
        for st in self.statuses.values():
            running.add_metric([st.tenant, st.name], 1 if st.state == "running" else 0)
        yield running


def status_document(statuses: dict[tuple[str, str], BridgeStatus]) -> dict[str, Any]:
    return {"bridges": [st.to_json() for _, st in sorted(statuses.items())]}


def write_status_file(path: Path, statuses: dict[tuple[str, str], BridgeStatus]) -> None:
    """``status.json`` beside the checkpoints (atomic replace; a report, not state)."""
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(status_document(statuses), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


class StatusServer:
    """``GET /metrics`` (Prometheus text) and ``GET /bridges`` (JSON), one request per
    connection, a request head of at most 8 KiB read within 5 s, at most 64 connections
    (more are closed at once)."""

    MAX_CONNECTIONS = 64
    HEAD_TIMEOUT = 5.0
    MAX_HEAD = 8192

    def __init__(self, statuses: dict[tuple[str, str], BridgeStatus]) -> None:
        self.statuses = statuses
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(statuses))
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port)
        sock = self._server.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            async with asyncio.timeout(self.HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > self.MAX_HEAD:
                raise ValueError("head too large")
            method, path = head.split(b" ", 2)[:2]
            status, ctype, body = self._answer(method.decode("latin-1"), path.decode("latin-1"))
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            pass
        finally:
            self._open -= 1
            writer.close()

    def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", generate_latest(self.registry)
        if path == "/bridges":
            doc = status_document(self.statuses)
            return "200 OK", "application/json", json.dumps(doc).encode()
        return "404 Not Found", "text/plain", b"/metrics or /bridges\n"
