"""The node's HTTP endpoint: /livez, /startupz, /readyz, /metrics (Prometheus text format),
/status (the node at a glance as JSON, for ``felix status``), /cluster (cluster mode:
the agent's view and the node's shard map, for ``felix cluster status``),
/streams/<tenant>/<namespace>/<stream> (a stream's status as JSON) and
/caches/<tenant>/<namespace>/<cache> (a cache's counters, summed over its partitions).
On a node with auth those two name a tenant's resources and need the node's admin token
(``Authorization: Bearer``; tenants ask the control plane's ``/v1/node/...`` routes,
which check their permissions); the others stay open to probes and scrapers.

A deliberately small HTTP/1.1 responder on asyncio streams: seven GET routes,
bounded request size, one response per connection. /livez never checks
dependencies (a wedged supervisor cannot answer at all); /startupz is 503 until the
node has started (every shard and gateway ready once, as the ``felix ready`` line
says) and 200 from then on, whatever happens later; /readyz is false until
every shard and gateway is ready, while one is restarting or unresponsive, and
while draining; its body is ``ready`` or ``not ready`` and then one line per
problem, e.g. ``shard-1: restart failing (attempt 4): ...`` (the control
process's problems are listed too, but do not make the node unready: the data
plane serves without it); /metrics exports
the counters every child reports each second, labelled by role and index; the
stream route asks the shard owning the stream (durable, fsync, first/next/synced
offsets, disk bytes, segments, recovery report; 404 when no shard holds it).

Bounds: a request head of :data:`MAX_REQUEST_BYTES` read within
:data:`READ_TIMEOUT` seconds, and at most :data:`MAX_CONNECTIONS` connections at
once; a new connection beyond that closes the oldest one still waiting for its
request (counted in ``felix_health_connections_evicted_total``), so idle or
slow connections can neither exhaust the supervisor's descriptors nor keep a
probe out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from felix.errors import FelixError
from felix.names import validate_name

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
#: The answer of a per-tenant route without the node's admin token (a node with auth).
UNAUTHORIZED = (
    b"the node's admin token is required for this route (Authorization: Bearer; "
    b"DATA_DIR/admin-token), or ask the control plane: GET /v1/node/streams/... with a "
    b"token allowed to manage the resource\n"
)


class ChildView(Protocol):
    """What the health server reads of one child process."""

    @property
    def role(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def stats(self) -> Mapping[str, int]: ...


class NodeView(Protocol):
    """What the health server reads of the node (the supervisor implements it)."""

    @property
    def children(self) -> Sequence[ChildView]: ...

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether the node serves, and each reason it does not."""
        ...

    @property
    def started(self) -> bool:
        """Whether the node has finished starting (latched: stays true afterwards)."""
        ...

    def supervisor_counters(self) -> list[tuple[str, str, int]]:
        """(metric name, help, value) of the supervisor's own counters."""
        ...

    def node_status(self) -> dict[str, Any]:
        """Identity, state, children, budgets and rings (the /status route adds the
        children's counters)."""
        ...

    async def cache_status(self, key: str) -> dict[str, Any] | None:
        """Cache ``key``'s counters summed over its partitions (None: not held).

        Raises TimeoutError when a shard does not answer."""
        ...

    async def stream_status(self, key: str) -> dict[str, Any] | None:
        """The status of stream ``key`` from the shard owning it (None: not held).

        Raises TimeoutError when the shard does not answer."""
        ...

    def cluster_status(self) -> dict[str, Any] | None:
        """The /cluster route: the cluster agent's snapshot and the node's shard map
        (None: a standalone node)."""
        ...

    def cluster_metrics(self) -> dict[str, Any] | None:
        """``lease_renewals`` (by result), ``shards_owned``, ``ownership_changes``,
        ``serving`` and ``placer`` (None: a standalone node)."""
        ...


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
    "duplicates": (
        "felix_publish_duplicates",
        "Records not stored: their felix-msg-id was stored within the dedup window",
        True,
    ),
    "auto_reports_dropped": (
        "felix_autocreate_reports_dropped",
        "Streams and caches created on first use a shard could not report for registration "
        "(its outbox was full)",
        True,
    ),
    "memory_used": ("felix_memory_used_bytes", "Replay ring, cache and msg id bytes held", False),
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
    "deferred_unwatches": (
        "felix_deferred_unwatches",
        "Watch releases retried because a shard's ring was full",
        True,
    ),
    "permission_denials": (
        "felix_permission_denials",
        "Requests refused for lack of permission",
        True,
    ),
    "disk_bytes": ("felix_node_disk_bytes", "Bytes of durable stream files held", False),
    "durable_streams": ("felix_durable_streams", "Durable streams held", False),
    # Never labelled by stream (no metric names a tenant or resource): the largest
    # durable stream of the shard; each stream's own size is on /streams/<t>/<ns>/<s>.
    "stream_disk_max": (
        "felix_stream_disk_bytes",
        "Bytes of the largest durable stream's files on the shard",
        False,
    ),
    "torn_bytes": (
        "felix_log_torn_bytes",
        "Bytes of torn records cut from active segments at recovery",
        True,
    ),
    "damaged_streams": (
        "felix_log_damaged_streams",
        "Durable streams refused because their log is damaged",
        False,
    ),
    "fsync_acks": ("felix_fsync_acks", "Commit acks released by fsyncs (group commit)", True),
    "disk_reads": ("felix_disk_reads", "READs served from durable stream files", True),
    "disk_refused": (
        "felix_disk_refused",
        "Durable writes or streams refused at the disk budget, reserve or stream cap",
        True,
    ),
    "queue_groups": ("felix_queue_groups", "Queue groups open on the node's shards", False),
    "queue_members": ("felix_queue_members", "Consumers in the node's queue groups", False),
    "queue_stalled": (
        "felix_queue_stalled_groups",
        "Queue groups whose oldest unsettled record holds their window full",
        False,
    ),
    "queue_delivered": ("felix_queue_delivered", "Queue records handed to consumers", True),
    "queue_redelivered": (
        "felix_queue_redelivered",
        "Queue records handed out again (after a nak, expiry, loss or release)",
        True,
    ),
    "queue_acked": ("felix_queue_acked", "Queue records acknowledged", True),
    "queue_dead_lettered": (
        "felix_queue_dead_lettered",
        "Queue records moved to a dead-letter stream",
        True,
    ),
    "queue_stalls": ("felix_queue_stalls", "Times a queue group became stalled", True),
    "queue_refused": (
        "felix_queue_refused",
        "Publishes refused because a lagging queue group holds the retention cap",
        True,
    ),
    "queue_dead_letter_failures": (
        "felix_queue_dead_letter_failures",
        "Dead-letter appends that failed (retried with backoff; the record stays dying)",
        True,
    ),
    "queue_write_failures": (
        "felix_queue_write_failures",
        "Queue group state file writes that failed (kept and retried; nothing confirmed)",
        True,
    ),
    "queue_too_slow": (
        "felix_queue_consumers_too_slow",
        "Queue consumers ended by a gateway for not reading their deliveries",
        True,
    ),
    "cluster_redirects": (
        "felix_cluster_redirects",
        "Requests answered with REDIRECT to the logical shard's owner",
        True,
    ),
    "cluster_refused": (
        "felix_cluster_refused",
        "Requests refused (Unavailable) for the cluster: no owner, a handoff, no valid lease",
        True,
    ),
    "cluster_dead_letters_refused": (
        "felix_cluster_dead_letters_refused",
        "Dead-letter appends refused: the dead-letter stream's logical shard is not "
        "served by this node (the record stays dying and is retried)",
        True,
    ),
    "cluster_pin_waits": (
        "felix_cluster_pin_waits",
        "Durable publishes whose ack waited for their logical shard to be pinned to this "
        "node (its first durable records here)",
        True,
    ),
    "cluster_pin_waits_failed": (
        "felix_cluster_pin_waits_failed",
        "Durable publishes answered Unavailable instead: their logical shard left this node, "
        "or its lease lapsed, before the pin",
        True,
    ),
    "cluster_moved_streams": (
        "felix_cluster_moved_streams",
        "In-memory streams dropped because their logical shard left this node",
        True,
    ),
    "cluster_moved_cache_entries": (
        "felix_cluster_moved_cache_entries",
        "Cache entries dropped because their logical shard left this node",
        True,
    ),
    "connections": ("felix_connections", "Open client connections", False),
    "shm_connections": (
        "felix_shm_connections",
        "Open same-host client connections over shared memory (also in felix_connections)",
        False,
    ),
    "shm_refused": (
        "felix_shm_refused",
        "Shared-memory connections refused (at the limit, or a bad or late hello)",
        True,
    ),
    "streams": ("felix_streams", "Streams held", False),
    "caches": ("felix_caches", "Cache partitions held", False),
}


class _ChildStats(Collector):
    def __init__(self, node: NodeView, server: HealthServer) -> None:
        self._node = node
        self._server = server

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Any] = {}
        for child in self._node.children:
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
        fsync = SummaryMetricFamily(
            "felix_fsync_seconds", "fsyncs of durable streams", labels=["role", "index"]
        )
        for child in self._node.children:
            stats = child.stats
            if "fsyncs" in stats:
                fsync.add_metric(
                    [child.role, str(child.index)], stats["fsyncs"], stats.get("fsync_us", 0) / 1e6
                )
        yield fsync
        restarts = CounterMetricFamily(
            "felix_process_restarts", "Child restarts", labels=["role", "index"]
        )
        for child in self._node.children:
            restarts.add_metric([child.role, str(child.index)], child.restarts)
        yield from families.values()
        yield restarts
        if self._server.info:
            # One constant series: its labels say what this node is (a bounded set: the
            # node's own region and version, nothing a client chooses).
            labels = sorted(self._server.info)
            info = GaugeMetricFamily(
                "felix_node_info", "This node: its region and felix version", labels=labels
            )
            info.add_metric([self._server.info[k] for k in labels], 1)
            yield info
        own = [
            *self._node.supervisor_counters(),
            (
                "felix_health_connections_evicted",
                "Health port connections closed to admit a newer one",
                self._server.evicted,
            ),
        ]
        for name, help_text, value in own:
            family = CounterMetricFamily(name, help_text, labels=["role", "index"])
            family.add_metric(["supervisor", "0"], value)
            yield family
        # Views written before clusters (tests' fakes) have no cluster to report.
        metrics = getattr(self._node, "cluster_metrics", None)
        cluster = metrics() if metrics is not None else None
        if cluster is not None:
            yield from _cluster_families(cluster)


def _cluster_families(values: Mapping[str, Any]) -> Iterator[Metric]:
    """The felix_cluster_* metrics of the supervisor's cluster agent."""
    renewals = CounterMetricFamily(
        "felix_cluster_lease_renewals", "Lease renewals of this node, by result", labels=["result"]
    )
    for result, count in sorted(dict(values.get("lease_renewals") or {}).items()):
        renewals.add_metric([str(result)], count)
    yield renewals
    yield GaugeMetricFamily(
        "felix_cluster_shards_owned",
        "Logical shards this node owns in its newest shard map",
        value=values.get("shards_owned", 0),
    )
    yield CounterMetricFamily(
        "felix_cluster_ownership_changes",
        "Changes of a logical shard's owner or epoch seen in the shard map",
        value=values.get("ownership_changes", 0),
    )
    yield GaugeMetricFamily(
        "felix_cluster_serving",
        "1 while this node's lease is valid (it serves its shards), else 0",
        value=values.get("serving", 0),
    )
    yield GaugeMetricFamily(
        "felix_cluster_placer",
        "1 while this node is the cluster's placer, else 0",
        value=values.get("placer", 0),
    )


class HealthServer:
    def __init__(
        self,
        node: NodeView,
        *,
        max_connections: int = MAX_CONNECTIONS,
        info: Mapping[str, str] | None = None,
        resource_token: str | None = None,
    ) -> None:
        self._node = node
        #: With auth (``felix up --auth``): the node's admin token, which the per-tenant
        #: routes (/streams/..., /caches/...) require as ``Authorization: Bearer``. The
        #: others (probes, metrics, /status, /cluster) name no tenant's resources.
        self._resource_token = resource_token
        #: Labels of the felix_node_info gauge (region, version); none: no gauge.
        self.info = dict(info or {})
        self._server: asyncio.Server | None = None
        self._registry = CollectorRegistry()
        self._registry.register(_ChildStats(node, self))
        self.address: tuple[str, int] = ("", 0)
        self._max_connections = max_connections
        self._open = 0
        # Connections still waiting for their request head, oldest first.
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self.evicted = 0

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
        if self._open >= self._max_connections and self._waiting:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.transport.abort()  # its handler sees the connection end, and closes
            self.evicted += 1
        self._open += 1
        self._waiting[writer] = None
        try:
            await self._serve(reader, writer)
        finally:
            self._open -= 1
            self._waiting.pop(writer, None)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            self._waiting.pop(writer, None)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            tenant_route = path.startswith(("/streams/", "/caches/"))
            if method == "GET" and tenant_route and not self._authorized(head):
                status, ctype, body = "401 Unauthorized", "text/plain", UNAUTHORIZED
            elif method == "GET" and path.startswith("/streams/"):
                status, ctype, body = await self._resource("stream", path)
            elif method == "GET" and path.startswith("/caches/"):
                status, ctype, body = await self._resource("cache", path)
            else:
                status, ctype, body = self._route(method, path)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        except ConnectionError:
            return
        if writer.is_closing():
            return
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(Exception):
            await writer.drain()

    def _authorized(self, head: bytes) -> bool:
        """Whether the request ``head`` may read a tenant's resource here: always without
        auth, else only with the node's admin token (compared in constant time)."""
        want = self._resource_token
        if want is None:
            return True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), want.encode()
                )
        return False

    async def _resource(self, kind: str, path: str) -> tuple[str, str, bytes]:
        """/streams/<t>/<ns>/<stream> or /caches/<t>/<ns>/<cache>."""
        parts = path.removeprefix(f"/{kind}s/").split("/")
        try:
            if len(parts) != 3:
                raise FelixError(f"the route is /{kind}s/<tenant>/<namespace>/<{kind}>")
            for what, name in zip(("tenant", "namespace", kind), parts, strict=True):
                validate_name(what, name)
        except FelixError as exc:
            return "400 Bad Request", "text/plain", f"{exc}\n".encode()
        key = "/".join(parts)
        try:
            if kind == "stream":
                status = await self._node.stream_status(key)
            else:
                status = await self._node.cache_status(key)
        except TimeoutError as exc:
            text = f"a shard holding {kind} {key} did not answer: {exc}\n"
            return "503 Service Unavailable", "text/plain", text.encode()
        if status is None:
            return (
                "404 Not Found",
                "text/plain",
                f"{kind} {key} is not held by this node\n".encode(),
            )
        body = json.dumps({kind: key, **status}, sort_keys=True).encode() + b"\n"
        return "200 OK", "application/json", body

    def _status(self) -> dict[str, Any]:
        """/status: the node's own view plus every child's counters and their sums
        (the metric names of /metrics without ``felix_``; ``felix status`` renders it)."""
        status = self._node.node_status()
        totals: dict[str, int] = {}
        stats_by_child: dict[str, dict[str, int]] = {}
        for child in self._node.children:
            own = {
                _METRICS[key][0].removeprefix("felix_"): value
                for key, value in child.stats.items()
                if key in _METRICS and isinstance(value, int)
            }
            stats_by_child[f"{child.role}-{child.index}"] = own
            for name, value in own.items():
                totals[name] = totals.get(name, 0) + value
        for entry in status.get("children", ()):
            entry["stats"] = stats_by_child.get(entry["name"], {})
        status["totals"] = totals
        return status

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/livez":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/startupz":
            # Latched: a child restarting later makes the node unready, not un-started
            # (a Kubernetes startup probe must not restart a pod for that).
            if self._node.started:
                return "200 OK", "text/plain", b"started\n"
            _, problems = self._node.readiness()
            text = "".join(f"{line}\n" for line in ["starting", *problems])
            return "503 Service Unavailable", "text/plain", text.encode()
        if path == "/readyz":
            ready, problems = self._node.readiness()
            text = "".join(f"{line}\n" for line in ["ready" if ready else "not ready", *problems])
            if ready:
                return "200 OK", "text/plain", text.encode()
            return "503 Service Unavailable", "text/plain", text.encode()
        if path == "/status":
            body = json.dumps(self._status(), sort_keys=True).encode() + b"\n"
            return "200 OK", "application/json", body
        if path == "/cluster":
            view = getattr(self._node, "cluster_status", None)
            cluster = view() if view is not None else None
            if cluster is None:
                return "404 Not Found", "text/plain", b"this node is not part of a cluster\n"
            body = json.dumps(cluster, sort_keys=True).encode() + b"\n"
            return "200 OK", "application/json", body
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", generate_latest(self._registry)
        return "404 Not Found", "text/plain", b"not found\n"
