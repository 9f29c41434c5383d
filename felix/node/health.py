"""The node's HTTP endpoint: /livez, /readyz and /metrics (Prometheus text format).

A deliberately small HTTP/1.1 responder on asyncio streams: three GET routes,
bounded request size, one response per connection. /livez never checks
dependencies (a wedged supervisor cannot answer at all); /readyz is false until
every child is ready and while draining; /metrics exports the counters every
child reports each second, labelled by role and index.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from felix.node.supervisor import Supervisor

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 5.0

#: Child stat -> (metric name, help, is a counter).
_METRICS: dict[str, tuple[str, str, bool]] = {
    "requests": ("felix_requests", "Requests handled", True),
    "published": ("felix_messages_published", "Records appended to streams", True),
    "pushes": ("felix_event_batches_pushed", "Event batches pushed to gateways", True),
    "dropped_pushes": ("felix_pushes_dropped", "Pushes shed while a gateway ring was full", True),
    "ring_full": ("felix_ring_full_events", "Times a ring was full on write", True),
    "budget_trims": ("felix_budget_trims", "Times a shard over its budget trimmed", True),
    "quota_trims": ("felix_quota_trims", "Times a quota was exceeded and trimmed", True),
    "trimmed_bytes": ("felix_trimmed_bytes", "Bytes trimmed for memory quotas and budgets", True),
    "blocked": ("felix_publishes_blocked", "Publishes refused by the block policy", True),
    "memory_used": ("felix_memory_used_bytes", "Replay ring and cache bytes held", False),
    "delivered": ("felix_messages_delivered", "Records delivered to subscribers", True),
    "protocol_errors": ("felix_protocol_errors", "Streams closed for protocol errors", True),
    "overloaded": ("felix_overloaded_replies", "Requests refused as Overloaded", True),
    "slow_consumer_events": ("felix_slow_consumer_events", "Slow-subscriber policy firings", True),
    "dropped_records": ("felix_subscriber_dropped_records", "Records subscribers lost", True),
    "gap_offsets": ("felix_subscriber_gap_offsets", "Never-assigned offsets skipped", True),
    "auth_failures": ("felix_auth_failures", "Failed authentications", True),
    "expired_sessions": (
        "felix_expired_sessions",
        "Streams or connections closed at token expiry",
        True,
    ),
    "refused_connections": ("felix_connections_refused", "Connections refused at a limit", True),
    "evicted_connections": (
        "felix_connections_evicted",
        "Unauthenticated connections closed to admit new ones",
        True,
    ),
    "auth_throttled": ("felix_auth_throttled", "Authentications delayed by failure back-off", True),
    "input_limit_closes": (
        "felix_input_limit_closes",
        "Connections closed over the incomplete-frame budget or deadline",
        True,
    ),
    "internal_errors": ("felix_internal_errors", "Unexpected errors handled by a gateway", True),
    "permission_denials": (
        "felix_permission_denials",
        "Requests refused for lack of permission",
        True,
    ),
    "connections": ("felix_connections", "Open client connections", False),
    "streams": ("felix_streams", "Streams held", False),
    "caches": ("felix_caches", "Cache partitions held", False),
}


class _ChildStats(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Any] = {}
        for child in self._sup.children:
            for key, value in child.stats.items():
                spec = _METRICS.get(key)
                if spec is None or not isinstance(value, int):
                    continue
                name, help_text, counter = spec
                family = families.get(name)
                if family is None:
                    cls = CounterMetricFamily if counter else GaugeMetricFamily
                    family = families[name] = cls(name, help_text, labels=["role", "index"])
                family.add_metric([child.role, str(child.index)], value)
        restarts = CounterMetricFamily(
            "felix_process_restarts", "Child restarts", labels=["role", "index"]
        )
        for child in self._sup.children:
            restarts.add_metric([child.role, str(child.index)], child.restarts)
        yield from families.values()
        yield restarts
        yield from self._key_metrics()

    def _key_metrics(self) -> Iterator[Metric]:
        """The supervisor's key work: JWK sets synced from a control plane, rotations."""
        labels = ["role", "index"]
        sync = getattr(self._sup, "jwks_sync", None)
        if sync is not None:
            for name, help_text, value in (
                ("felix_jwks_sync_writes", "JWK sets written from the control plane", sync.writes),
                ("felix_jwks_sync_removals", "JWK sets removed (tenant gone)", sync.removals),
                (
                    "felix_jwks_sync_failures",
                    "JWK set fetches that failed (the last known set was kept)",
                    sync.failures,
                ),
            ):
                family = CounterMetricFamily(name, help_text, labels=labels)
                family.add_metric(["supervisor", "0"], value)
                yield family
        rotator = getattr(self._sup, "key_rotator", None)
        if rotator is not None:
            family = CounterMetricFamily(
                "felix_key_rotations", "Scheduled key ring rotations", labels=labels
            )
            family.add_metric(["supervisor", "0"], rotator.rotations)
            yield family


class HealthServer:
    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor
        self._server: asyncio.Server | None = None
        self._registry = CollectorRegistry()
        self._registry.register(_ChildStats(supervisor))
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_BYTES)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, ctype, body = self._route(method, path.split("?", 1)[0])
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/livez":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._sup.ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", generate_latest(self._registry)
        return "404 Not Found", "text/plain", b"not found\n"
