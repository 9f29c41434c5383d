"""Child processes of a node: ``python -m felix.node.worker`` (started by the supervisor).

A child gets its role, its index, the node configuration, the names of its
rings and the file descriptors of its doorbells (and, for a gateway, of its UDP
socket) as JSON in ``FELIX_CHILD_SPEC``; the descriptors themselves arrive
through ``pass_fds``. It talks to the supervisor over one socket (``control_fd``)
in the messages of felix/node/messages.py: ``Ready`` once serving, ``Stats`` every
second (counters for /metrics), ``Pong`` for each heartbeat ``Ping``; commands
from the supervisor are resource changes, shard down/up (gateways), quiesce and
drain.

No child outlives its supervisor: a child exits when the supervisor's end of the
socket closes, and on Linux the kernel kills it (SIGKILL, which also ends a
stopped process) when the supervisor dies (``PR_SET_PDEATHSIG``), so a frozen
orphan cannot keep a socket in the port's reuseport group or use the data dir
under the next node.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import uvloop

from felix import ipc
from felix.cluster.ownership import OwnershipMap
from felix.errors import FelixError, RemoteProtocolError
from felix.gateway.auth import TokenAuthenticator
from felix.gateway.cluster import ClusterGate
from felix.gateway.connection import connection_factory
from felix.gateway.gateway import Gateway
from felix.gateway.links import ShardLinks
from felix.ipc import RecordType
from felix.logs import configure as configure_logs
from felix.node import messages as msg
from felix.node.config import NodeConfig
from felix.node.disk_io import (
    DiskIO,
    core_stats,
    durable_store,
    fsync_failed,
    fsync_fault_file,
    sum_stats,
)
from felix.node.links import SWEEP_INTERVAL, LocalShards, RingLinks
from felix.quic import load_engine, load_reset_key, serve_on_socket
from felix.ring import Ring, RingReader
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.offsets import OffsetReservations
from felix.shard.queue.settings import GroupSettings
from felix.shard.resources import (
    cache_settings,
    durable_settings,
    stream_settings,
    tenant_quota,
)
from felix.shm.server import ShmServer
from felix.tls import node_certificates

log = logging.getLogger("felix.node")

SPEC_ENV = "FELIX_CHILD_SPEC"
STATS_INTERVAL = 1.0
#: Seconds between reports of streams and caches created on first use (msg.AutoCreated).
AUTO_REPORT_INTERVAL = 0.25
#: Start-up progress reports (msg.Starting) at most this often.
STARTING_INTERVAL = 1.0
#: linux/prctl.h: the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1
#: Records a shard holds for a gateway whose ring is full; pushes beyond it are dropped
#: (subscribers notice the gap and READ), replies are bounded by the gateway's in-flight cap.
MAX_OVERFLOW_PUSHES = 10_000


@dataclass(frozen=True, slots=True)
class RingSpec:
    """One ring a child uses: its shared-memory name and the doorbell its consumer watches."""

    name: str
    doorbell: int


@dataclass(frozen=True, slots=True)
class ChildSpec:
    role: str  # "gateway" | "shard" | "control"
    index: int
    incarnation: int
    config: NodeConfig
    #: Rings this child reads, by peer index (gateway: from each shard; shard: from each gateway).
    inbound: list[RingSpec]
    #: Rings this child writes, by peer index.
    outbound: list[RingSpec]
    control_fd: int
    #: The socket this child serves on: a gateway's UDP socket, the control process's
    #: TCP listener (-1: none).
    socket_fd: int = -1
    #: The supervisor's pid: a child whose parent is already another process exits.
    supervisor_pid: int = 0
    #: A gateway's copy of the node's listening shm socket (-1: none; felix/shm).
    shm_fd: int = -1
    #: The control process's: a pipe holding ``config.control_store`` (a DSN that may
    #: carry a password, so neither in the spec nor in the environment; -1: none).
    secret_fd: int = -1

    def to_json(self) -> str:
        return json.dumps(
            {
                "role": self.role,
                "index": self.index,
                "incarnation": self.incarnation,
                "config": self.config.to_json(),
                "inbound": [[r.name, r.doorbell] for r in self.inbound],
                "outbound": [[r.name, r.doorbell] for r in self.outbound],
                "control_fd": self.control_fd,
                "socket_fd": self.socket_fd,
                "supervisor_pid": self.supervisor_pid,
                "shm_fd": self.shm_fd,
                "secret_fd": self.secret_fd,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ChildSpec:
        raw = json.loads(text)
        return cls(
            role=raw["role"],
            index=raw["index"],
            incarnation=raw["incarnation"],
            config=NodeConfig.from_json(raw["config"]),
            inbound=[RingSpec(n, d) for n, d in raw["inbound"]],
            outbound=[RingSpec(n, d) for n, d in raw["outbound"]],
            control_fd=raw["control_fd"],
            socket_fd=raw["socket_fd"],
            supervisor_pid=raw["supervisor_pid"],
            shm_fd=raw.get("shm_fd", -1),
            secret_fd=raw.get("secret_fd", -1),
        )

    def read_secret(self) -> str | None:
        """What the supervisor wrote to :attr:`secret_fd` (read once; closes it)."""
        if self.secret_fd < 0:
            return None
        chunks = []
        with os.fdopen(self.secret_fd, "rb", closefd=True) as pipe:
            while chunk := pipe.read(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()


class ControlChannel:
    """The child's end of its supervisor socket."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(
            sock=self._sock, limit=msg.MAX_LINE_BYTES
        )

    def send(self, event: msg.Event) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(msg.encode(event))

    async def commands(self) -> AsyncIterator[msg.Command]:
        """The supervisor's commands until it closes the socket (bad lines are logged)."""
        assert self._reader is not None
        while line := await self._reader.readline():
            try:
                message = msg.decode(line)
            except RemoteProtocolError as exc:
                log.error("bad command from the supervisor: %s", exc)
                continue
            if isinstance(message, msg.Command):
                yield message


# --- shard -------------------------------------------------------------------------------


def new_shard_core(
    config: NodeConfig, index: int, progress: Callable[[int, int], None] | None = None
) -> ShardCore:
    """Shard ``index`` of the node, with its share of the budget and its offset file,
    its durable streams opened (``progress(done, total)`` while they are)."""
    settings = ShardSettings(
        index=index,
        shards=config.shards,
        stream_defaults=config.stream_defaults,
        cache_defaults=config.cache_defaults,
        auto_create=config.auto_create,
        memory_budget=config.memory_budget // config.shards,
        max_streams=config.max_streams_per_shard,
        tenant_quota=tenant_quota({}, config.tenant_defaults, config.shards),
    )
    path = config.data_dir / f"shard-{index}.offsets"
    offsets = OffsetReservations(path, max_entries=config.max_streams_per_shard)
    disk = durable_store(config, index)
    core = ShardCore(settings, offsets, disk)
    if config.clustered:
        core.join_cluster()  # writes wait for the node's first shard map
    opened = core.open_durable(progress)
    if opened:
        log.info(
            "shard %d: opened %d durable streams (%d damaged, %d torn bytes cut)",
            index,
            opened,
            disk.damaged,
            disk.torn_bytes,
        )
    return core


async def run_shard(spec: ChildSpec, control: ControlChannel) -> None:
    config = spec.config
    last = [0.0]

    def progress(done: int, total: int) -> None:
        # Keeps the supervisor's ready timeout from killing a long recovery.
        now = time.monotonic()
        if now - last[0] >= STARTING_INTERVAL:
            last[0] = now
            control.send(msg.Starting(f"opening durable streams: {done} of {total}"))

    core = new_shard_core(config, spec.index, progress)
    inbound = [Ring.attach(r.name, doorbell_fd=r.doorbell) for r in spec.inbound]
    outbound = [Ring.attach(r.name, doorbell_fd=r.doorbell) for r in spec.outbound]
    # Requests left in our rings by a previous incarnation were already failed by the
    # gateways (Unavailable): never act on them now.
    for ring in inbound:
        while ring.read_batch():
            ring.commit()
    overflow: list[deque[bytes]] = [deque() for _ in outbound]
    stats = {"requests": 0, "published": 0, "pushes": 0, "dropped_pushes": 0, "ring_full": 0}
    loop = asyncio.get_running_loop()
    retry: list[asyncio.TimerHandle | None] = [None]

    def send_out() -> None:
        retry[0] = None
        for gateway, records in core.flush().items():
            overflow[gateway].extend(records)
        pending = False
        for gateway, queue in enumerate(overflow):
            ring = outbound[gateway]
            while queue and ring.write(queue[0], publish=False):
                queue.popleft()
            ring.publish()
            if queue:
                pending = True
                stats["ring_full"] += 1
                _shed_pushes(queue, stats)
        if pending and retry[0] is None:
            # The gateway is behind: try again shortly (it frees space as it reads).
            retry[0] = loop.call_later(0.001, send_out)

    disk_io = DiskIO(core, send_out, fsync_failed, fault_file=fsync_fault_file())

    def on_batch(gateway: int, views: list[memoryview]) -> None:
        now = time.monotonic()
        for view in views:
            core.handle(gateway, view, now)
        stats["requests"] += len(views)
        disk_io.kick()
        if core.pins.wanted:
            control.send(msg.PinWanted(core.pins.take_wanted()))  # before any ack it holds
        send_out()

    spin_ns = config.spin_us * 1000
    readers = [
        RingReader(ring, functools.partial(on_batch, g), spin_ns=spin_ns)
        for g, ring in enumerate(inbound)
    ]
    tasks = [loop.create_task(r.run()) for r in readers]

    def sweep() -> None:
        core.sweep(time.monotonic())
        # Queue groups: leases that expired and retries that came due deliver now.
        disk_io.kick()
        send_out()
        loop.call_later(SWEEP_INTERVAL, sweep)

    sweep()
    control.send(msg.Ready())

    def on_command(cmd: msg.Command) -> None:
        if isinstance(cmd, msg.ApplyResource):
            apply_resource(core, config, cmd, send_out)
            disk_io.kick()
        elif isinstance(cmd, msg.StreamStatusRequest):
            control.send(msg.StreamStatusReply(cmd.request, resource_status([core], cmd)))
        elif isinstance(cmd, msg.Ownership):
            version = apply_ownership([core], cmd.map, f"shard {spec.index}")
            if version is not None:
                send_out()  # END of the streams dropped
                # What a handoff waits for: this shard stores nothing more for the
                # logical shards the map does not serve here.
                control.send(msg.OwnershipAck(version))

    await serve_commands(
        control,
        lambda: {**stats, **core_stats(core)},
        on_command,
        reports=lambda: auto_created_reports([core]),
    )
    for r in readers:
        r.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    core.shutdown(time.monotonic())  # queue groups release their leases: no failures
    send_out()
    disk_io.close()


def apply_resource(
    core: ShardCore, config: NodeConfig, cmd: msg.ApplyResource, flush: Callable[[], None]
) -> None:
    """Apply a control-plane resource the supervisor sent (``define`` / ``delete``)."""
    kind, spec = cmd.kind, cmd.spec
    if kind == "tenant":  # messages.decode checked the path's length for its kind
        quota = tenant_quota(spec, config.tenant_defaults, config.shards)
        core.define_tenant(cmd.path[0], quota if cmd.op == "define" else None)
        flush()
        return
    path = (cmd.path[0], cmd.path[1], cmd.path[2])
    try:
        if kind == "group":  # path: the stream's, then the group's name
            key = ipc.stream_key(*path)
            if cmd.op == "define":
                core.define_group(key, cmd.path[3], GroupSettings.from_spec(spec))
            else:
                core.delete_group(key, cmd.path[3])
        elif cmd.op == "define" and kind == "stream":
            key = ipc.stream_key(*path)
            core.define_stream(
                key, stream_settings(spec, config.stream_defaults), durable_settings(spec)
            )
        elif cmd.op == "define" and kind == "cache":
            core.define_cache(path, cache_settings(spec, config.cache_defaults, config.shards))
        elif cmd.op == "delete" and kind == "stream":
            core.delete_stream(ipc.stream_key(*path))
        elif cmd.op == "delete" and kind == "cache":
            core.delete_cache(path)
    except FelixError as exc:
        log.error("cannot apply %s %s %s: %s", cmd.op, kind, "/".join(cmd.path), exc)
    flush()


def apply_ownership(cores: Sequence[ShardCore], raw: dict[str, Any], who: str) -> int | None:
    """Give shard ``cores`` the supervisor's shard map (cluster mode): they store writes
    only for the logical shards it serves here, and drop their in-memory state of those
    it takes away. Returns its version (None: bad, or not newer)."""
    try:
        new = OwnershipMap.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        log.error("%s: bad shard map from the supervisor: %r", who, exc)
        return None
    applied = [core.apply_ownership(new) for core in cores]
    return None if all(lost is None for lost in applied) else new.version


def auto_created_reports(cores: list[ShardCore]) -> list[msg.Event]:
    """What ``cores`` created on first use since the last call, as AutoCreated messages."""
    items = [
        {"kind": kind, "path": list(path), "spec": spec}
        for core in cores
        for kind, path, spec in core.take_auto_created()
    ]
    part = msg.AUTO_CREATED_PART
    return [msg.AutoCreated(items[i : i + part]) for i in range(0, len(items), part)]


def _shed_pushes(queue: deque[bytes], stats: dict[str, int]) -> None:
    """Bound a gateway's overflow: drop live pushes (subscribers recover them by READ)."""
    if len(queue) <= MAX_OVERFLOW_PUSHES:
        return
    kept = deque(r for r in queue if r[0] != RecordType.PUSH)
    stats["dropped_pushes"] += len(queue) - len(kept)
    queue.clear()
    queue.extend(kept)


# --- gateway -----------------------------------------------------------------------------


async def run_gateway(spec: ChildSpec, control: ControlChannel) -> None:
    config = spec.config
    links: ShardLinks
    cores: list[ShardCore] = []
    disk_ios: list[DiskIO] = []
    if config.embedded_shards:
        # The knob for one-core machines and latency experiments: the shard cores live
        # in this process and requests skip the ring hop (and its wake-up).
        cores = [new_shard_core(config, i) for i in range(config.shards)]
        local = LocalShards(cores)
        links = local
        fault = fsync_fault_file()
        disk_ios = [DiskIO(c, local.flush_soon, fsync_failed, fault_file=fault) for c in cores]

        def before_flush(index: int) -> None:
            disk_ios[index].kick()
            pins = cores[index].pins
            if pins.wanted:
                control.send(msg.PinWanted(pins.take_wanted()))

        local.before_flush = before_flush
    else:
        outbound = [Ring.attach(r.name, doorbell_fd=r.doorbell) for r in spec.outbound]
        inbound = [Ring.attach(r.name, doorbell_fd=r.doorbell) for r in spec.inbound]
        links = RingLinks(outbound, inbound)
    authenticator = None
    if config.auth:
        from felix.auth.files import AUDIENCE, ISSUER, JwksDirectory

        keys = JwksDirectory(config.data_dir / "auth")
        authenticator = TokenAuthenticator(
            keys.jwks, issuer=ISSUER, audience=AUDIENCE, region=config.region
        )
    gateway = Gateway(
        spec.index,
        links,
        config.limits,
        incarnation=spec.incarnation,
        authenticator=authenticator,
    )
    ownership: OwnershipFollower | None = None
    if config.clustered:
        # Nothing is served before the supervisor's first shard map arrives.
        gateway.cluster = ClusterGate()
        ownership = OwnershipFollower(gateway, control)
        if cores:
            ownership.cores = cores
            ownership.flush = local.flush_soon
    if not cores:
        for shard in range(config.shards):
            # Tell every shard this gateway (re)started: its old watches are void.
            links.send(shard, ipc.encode(RecordType.HELLO, 0, spec.index, b""))
    quic = load_engine(config.engine)
    certs = node_certificates(config.data_dir / "tls", cert=config.tls_cert, key=config.tls_key)
    sock = socket.socket(fileno=spec.socket_fd)
    sock.setblocking(False)
    server = await serve_on_socket(
        quic,
        sock,
        # client_ca: mTLS, every client presents a certificate from that CA.
        quic.server_configuration(certs, client_ca=config.tls_client_ca),
        connection_factory(gateway),
        # Survives restarts: clients of a killed gateway get a stateless reset.
        reset_key=load_reset_key(config.data_dir),
        spin=config.spin_us / 1e6,
    )
    shm: ShmServer | None = None
    if spec.shm_fd >= 0:
        # Same-host clients: the same connections (session, limits) over memfd rings.
        shm = ShmServer(
            socket.socket(fileno=spec.shm_fd),
            connection_factory(gateway),
            max_connections=-(-config.shm_max_connections // config.gateways),
        )
        shm.start()
    control.send(msg.Ready())

    async def on_command(cmd: msg.Command) -> None:
        if isinstance(cmd, msg.ApplyResource):
            if cores:
                apply_resource(cores[cmd.shard], config, cmd, local.flush_soon)
        elif isinstance(cmd, msg.StreamStatusRequest):
            control.send(msg.StreamStatusReply(cmd.request, resource_status(cores, cmd)))
        elif isinstance(cmd, msg.Ownership):
            if ownership is not None:
                ownership.apply(cmd.map)
        elif isinstance(cmd, msg.ShardDown):
            gateway.shard_down(cmd.shard)
        elif isinstance(cmd, msg.ShardUp):
            gateway.shard_up(cmd.shard)
        elif isinstance(cmd, msg.Quiesce):
            await gateway.quiesce(float(cmd.timeout))
            control.send(msg.Quiesced())
        elif isinstance(cmd, msg.Drain):
            if shm is not None:
                shm.stop_accepting()
            await gateway.drain(float(cmd.grace))
            server.close()
            if shm is not None:
                shm.close()
            control.send(msg.Drained())

    def stats() -> dict[str, int]:
        return {
            "connections": len(gateway.connections),
            "requests": gateway.requests,
            "protocol_errors": gateway.protocol_errors,
            "overloaded": gateway.overloaded,
            "slow_consumer_events": gateway.slow_consumer_events,
            "dropped_records": gateway.dropped_records,
            "gap_offsets": gateway.gap_offsets,
            "delivered": gateway.delivered_records,
            "auth_failures": gateway.auth_failures,
            "expired_sessions": gateway.expired_sessions,
            "permission_denials": gateway.permission_denials,
            "refused_connections": gateway.refused_connections,
            "evicted_connections": gateway.evicted_connections,
            "auth_throttled": gateway.auth_throttled,
            "input_limit_closes": gateway.input_limit_closes,
            "internal_errors": gateway.internal_errors,
            "deferred_unwatches": gateway.deferred_unwatches,
            "queue_too_slow": gateway.queues.too_slow,
            "shm_connections": shm.connections if shm is not None else 0,
            "shm_refused": shm.refused_busy + shm.refused_bad if shm is not None else 0,
            **(
                {
                    "cluster_redirects": gateway.cluster.redirects,
                    "cluster_refused": gateway.cluster.refused,
                    "cluster_dead_letters_refused": gateway.queues.relays_refused,
                }
                if gateway.cluster is not None
                else {}
            ),
        }

    await serve_commands(
        control,
        # Embedded shard cores report what a shard process would.
        lambda: {**stats(), **sum_stats(core_stats(c) for c in cores)},
        on_command,
        reports=(lambda: auto_created_reports(cores)) if cores else None,
    )
    server.close()
    if shm is not None:
        shm.close()
    links.close()
    for disk_io in disk_ios:
        disk_io.close()


#: Seconds between a gateway's log lines while requests in flight for shards a new map
#: took away keep it from acknowledging the map (it never acknowledges on a timeout).
OWNERSHIP_DRAIN_LOG_EVERY = 10.0


class OwnershipFollower:
    """A gateway's handling of the supervisor's shard maps (cluster mode): apply each
    (felix/gateway/cluster.py), and acknowledge it (msg.OwnershipAck) once no request
    is in flight for a shard this gateway now refuses. That is what a handoff waits
    for, so the acknowledgement is never sent on a timeout: while requests are still
    in flight the gateway only logs that it is waiting (and the handoff is retried
    later). Maps that come while an earlier one drains are acknowledged with it."""

    def __init__(
        self,
        gateway: Gateway,
        control: ControlChannel,
        *,
        log_every: float = OWNERSHIP_DRAIN_LOG_EVERY,
    ) -> None:
        self._gateway = gateway
        self._control = control
        self._log_every = log_every
        #: Logical shards taken away whose requests in flight are not all answered yet.
        self._draining: set[int] = set()
        self._version = 0  # the newest map applied
        self._task: asyncio.Task[None] | None = None
        #: Embedded shard cores: they get each map right after the gateway (same tick,
        #: so nothing the gateway refuses reaches them), and flush() sends their END.
        self.cores: list[ShardCore] = []
        self.flush: Callable[[], None] | None = None

    @property
    def draining(self) -> frozenset[int]:
        return frozenset(self._draining)

    def apply(self, raw: dict[str, Any]) -> None:
        try:
            new = OwnershipMap.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("gateway %d: bad shard map from the supervisor: %r", self._gateway.index, exc)
            return
        lost = self._gateway.apply_ownership(new)
        if self.cores:
            for core in self.cores:
                core.apply_ownership(new)
            if self.flush is not None:
                self.flush()
        if lost is None:
            return  # not newer
        self._version = new.version
        if lost:
            log.info(
                "gateway %d: map %d takes %d logical shard(s) from this node",
                self._gateway.index,
                new.version,
                len(lost),
            )
        # Only the shards this map refuses count (a map may give one back).
        gate = self._gateway.cluster
        self._draining = {s for s in self._draining | lost if gate is None or not gate.serves(s)}
        if self._task is not None:
            return  # the drain under way acknowledges the newest map
        if not self._draining or not self._gateway.in_flight_for(self._draining):
            self._draining.clear()
            self._control.send(msg.OwnershipAck(self._version))
        else:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            started = last_log = time.monotonic()
            while True:
                in_flight = self._gateway.in_flight_for(self._draining)
                if not in_flight:
                    break
                now = time.monotonic()
                if now - last_log >= self._log_every:
                    last_log = now
                    log.warning(
                        "gateway %d: still waiting for %d request(s) in flight for %d "
                        "logical shard(s) this node gave up (%.0fs); map %d not acknowledged "
                        "yet (their handoff waits)",
                        self._gateway.index,
                        in_flight,
                        len(self._draining),
                        now - started,
                        self._version,
                    )
                await asyncio.sleep(0.01)
            # No await between the check and the acknowledgement: nothing was admitted.
            self._draining.clear()
            self._control.send(msg.OwnershipAck(self._version))
        finally:
            self._task = None


async def serve_commands(
    control: ControlChannel,
    stats: Callable[[], dict[str, int]],
    on_command: Callable[[msg.Command], Awaitable[None] | None],
    reports: Callable[[], list[msg.Event]] | None = None,
) -> None:
    """Report stats every second (and ``reports()``, if given, every
    AUTO_REPORT_INTERVAL), answer heartbeats and run commands until the supervisor
    closes the socket."""
    loop = asyncio.get_running_loop()

    def report() -> None:
        control.send(msg.Stats(stats()))
        handle[0] = loop.call_later(STATS_INTERVAL, report)

    def report_created() -> None:
        assert reports is not None
        for event in reports():
            control.send(event)
        handle[1] = loop.call_later(AUTO_REPORT_INTERVAL, report_created)

    handle = [loop.call_later(STATS_INTERVAL, report)]
    if reports is not None:
        handle.append(loop.call_later(AUTO_REPORT_INTERVAL, report_created))
    running: set[asyncio.Future[None]] = set()
    try:
        async for cmd in control.commands():
            if isinstance(cmd, msg.Ping):
                # Answered from this loop: a frozen or wedged process cannot answer.
                control.send(msg.Pong(cmd.seq))
                continue
            result = on_command(cmd)
            if result is not None:
                task = asyncio.ensure_future(result)
                running.add(task)
                task.add_done_callback(running.discard)
    finally:
        for timer in handle:
            timer.cancel()


def die_with_supervisor(supervisor_pid: int) -> None:
    """Make the kernel kill this process when the supervisor dies (Linux), and exit
    now if it already did (our parent is then someone else)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    # Checked after the prctl: a supervisor that died before it is caught here.
    if supervisor_pid and os.getppid() != supervisor_pid:
        log.error("the supervisor (pid %d) is gone; exiting", supervisor_pid)
        sys.exit(1)


def resource_status(
    cores: Sequence[ShardCore], cmd: msg.StreamStatusRequest
) -> dict[str, Any] | None:
    """The status route's answer of these shard cores (a shard process has one; an
    embedded gateway all): a stream from the core owning it, a cache summed over them."""
    if not cores:
        return None
    if cmd.kind != "cache":
        return cores[ipc.shard_for(cmd.key, len(cores))].stream_status(cmd.key)
    tenant, namespace, cache = cmd.key.split("/", 2)
    return sum_cache_status(core.cache_status((tenant, namespace, cache)) for core in cores)


def sum_cache_status(parts: Iterable[Mapping[str, int] | None]) -> dict[str, int] | None:
    """Partitions' cache counters added up (None: no partition anywhere)."""
    total: dict[str, int] | None = None
    for part in parts:
        if part is None:
            continue
        total = total or {}
        for name, value in part.items():
            # Each partition has the same budget: the cache's is their sum.
            total[name] = total.get(name, 0) + value
    return total


def main() -> None:
    spec = ChildSpec.from_json(os.environ[SPEC_ENV])
    # The format and levels the supervisor chose ($FELIX_LOG_*).
    configure_logs(f"{spec.role}-{spec.index}")
    try:
        import setproctitle

        setproctitle.setproctitle(f"felix {spec.role} {spec.index}")
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    # The supervisor drains us over the control socket. Ctrl-C in a terminal (and
    # `timeout`, and some init systems) signal the whole process group: children
    # ignore those signals and leave shutdown to the supervisor. If the supervisor
    # dies, its socket closes and we exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_supervisor(spec.supervisor_pid)

    async def run() -> None:
        control = ControlChannel(spec.control_fd)
        await control.open()
        if spec.role == "shard":
            await run_shard(spec, control)
        elif spec.role == "control":
            from felix.node.control_process import run_control

            await run_control(spec, control)
        else:
            await run_gateway(spec, control)

    uvloop.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
