"""The supervisor of `felix up`: owns sockets, rings and doorbells; runs and drains children.

How it works: the supervisor binds one UDP socket per gateway (SO_REUSEPORT, one
port), creates one ring per (gateway, shard) and direction with an eventfd
doorbell each, then starts the shards and the gateways as child processes
(felix/node/worker.py). It keeps every socket, ring and doorbell for the node's
lifetime, so a child that dies is replaced by one that re-attaches to the same
resources: the kernel's reuseport group never changes (other gateways'
connections are not rehashed) and the other processes never notice a new ring.
The embedded control plane is a child too (``control-0``,
felix/node/control_process.py): the supervisor keeps its listening socket and
follows its store over the child's control socket, so nothing the control
plane's clients do reaches the process that owns the rings.

When a shard dies, every gateway is told at once (requests in flight to it fail
with Unavailable, a retryable error) and again when its replacement is ready.
SIGTERM or SIGINT drains: /readyz turns false, gateways stop taking requests,
answer what is in flight and close their connections, then children exit.

Supervision never gives up on a child: a restart that fails (no descriptors, a
child that dies or hangs before it is ready) is retried with jittered backoff,
and /readyz names the child and why until it is back. A child that stops
answering the heartbeat (frozen, wedged) is reported and then killed and
restarted (felix/node/liveness.py). The node holds an exclusive lock on its data
dir and names its rings after it, so a node killed with -9 leaves nothing the
next start on that dir does not reclaim (felix/node/datadir.py); children die
with the supervisor (felix/node/worker.py). Descriptors: felix/node/fds.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
import urllib.parse
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import felix
from felix import ipc
from felix.auth.files import admin_token
from felix.auth.pgrings import PostgresRingStore
from felix.auth.ringstore import RingStore
from felix.auth.rotation import KeyRotator, RotationPolicy
from felix.cluster.archive import check_no_pending_import
from felix.cluster.ownership import cluster_clock
from felix.errors import ConfigError
from felix.keys.kek import FileKeyEncryptionKey
from felix.keys.store import KEYS_DIR, KeyStore, resolve_region_key
from felix.node import messages as msg
from felix.node.children import Child
from felix.node.cluster import NodeCluster
from felix.node.config import (
    CHILD_ENV_DROPPED,
    MAX_DSN_BYTES,
    NodeConfig,
    is_loopback,
    is_wildcard,
)
from felix.node.control import ChildFeed, ControlFollower, FeedSource, HttpFeed
from felix.node.datadir import DataDirLock, reclaim_rings, ring_prefix
from felix.node.fds import FdReserve, raise_nofile_limit
from felix.node.health import HealthServer
from felix.node.jwks_sync import HttpJwksFetcher, JwksSync
from felix.node.liveness import (
    HEARTBEAT_INTERVAL,
    UNRESPONSIVE_AFTER,
    Health,
    Heartbeat,
    RestartBackoff,
)
from felix.node.process import ChildProcess
from felix.node.registrar import Registrar
from felix.node.ring_mirror import RingMirror
from felix.node.worker import SPEC_ENV, ChildSpec, RingSpec
from felix.quic import bind_udp
from felix.ring import Ring, make_doorbell
from felix.tls import node_certificates

log = logging.getLogger("felix.supervisor")

#: Seconds a starting child may go without being ready or reporting progress.
READY_TIMEOUT = 30.0
READY_POLL = 0.5
#: How long the status route waits for a shard's answer, and how many may wait at once.
STATUS_TIMEOUT = 2.0
MAX_STATUS_WAITERS = 64
#: How long a node following a remote control plane waits for the tenants' keys.
JWKS_READY_TIMEOUT = 10.0


class Supervisor:
    """Runs one node until SIGTERM/SIGINT; :meth:`run` returns the exit code."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        # With embedded shards the only child is the gateway that hosts them.
        self.shards = (
            []
            if config.embedded_shards
            else [self._child("shard", i) for i in range(config.shards)]
        )
        self.gateways = [self._child("gateway", i) for i in range(config.gateways)]
        self._sockets: list[socket.socket] = []
        #: The listening Unix socket of same-host shm clients (felix/shm), and its inode
        #: (so cleanup removes only the file this node bound).
        self._shm_sock: socket.socket | None = None
        self._shm_inode: tuple[int, int] | None = None
        # _req[g][s]: gateway g -> shard s; _rep[s][g]: shard s -> gateway g.
        self._req: list[list[Ring]] = []
        self._rep: list[list[Ring]] = []
        self._doorbells: list[int] = []
        self._stopping = False
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock: DataDirLock | None = None
        self._fd_reserve: FdReserve | None = None
        self.health: HealthServer | None = None
        #: Cluster mode (--cluster): the agent and this node's shard map.
        self.cluster: NodeCluster | None = None
        self.follower: ControlFollower | None = None
        # Registers what shards create on first use in the control plane it follows.
        self.registrar = Registrar(region=config.region)
        # The embedded control plane: its process, its listening socket, its feed.
        self.control_child: Child | None = None
        self._control_sock: socket.socket | None = None
        self._control_feed: ChildFeed | None = None
        #: The bridges child (--bridges): a plain process, not on the heartbeat.
        self.bridges_proc: ChildProcess | None = None
        self.bridges_restarts = 0
        # Keys: the JWKS sync (following a remote control plane) or the scheduled
        # rotation (embedding one), with --auth; both stop at drain.
        self.jwks_sync: JwksSync | None = None
        self.key_rotator: KeyRotator | None = None
        # In a cluster (embedded control plane on PostgreSQL) the rings live in the
        # database: the mirror keeps DATA_DIR/auth equal to it.
        self.ring_mirror: RingMirror | None = None
        self._ring_store: PostgresRingStore | None = None
        self._jwks_fetcher: HttpJwksFetcher | None = None
        self._key_tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.ca_path: Path | None = None
        self._status_requests = 0
        #: Set once, when the node printed its ``felix ready`` line (/startupz).
        self.started = False
        #: time.time() when the supervisor was created (uptime in /status).
        self.created_at = time.time()

    def _child(self, role: str, index: int) -> Child:
        timeout = self.config.heartbeat_timeout
        child = Child(role, index, Heartbeat(min(UNRESPONSIVE_AFTER, timeout), timeout))
        if role in ("shard", "gateway"):
            child.on_auto_created = self._auto_created
            child.on_pin_wanted = self._pin_wanted
        return child

    def _pin_wanted(self, shards: list[int]) -> None:
        """A shard core's request to pin logical shards now (cluster mode)."""
        if self.cluster is not None:
            self.cluster.pin_wanted(shards)

    def _auto_created(self, resources: list[dict[str, Any]]) -> None:
        """A shard's report of streams and caches it created on first use."""
        for item in resources:
            kind, path, spec = item.get("kind"), item.get("path"), item.get("spec")
            if isinstance(kind, str) and isinstance(path, list) and isinstance(spec, dict):
                self.registrar.report(kind, [str(p) for p in path], spec)

    @property
    def children(self) -> list[Child]:
        control = [] if self.control_child is None else [self.control_child]
        return [*self.shards, *self.gateways, *control]

    def ready(self) -> bool:
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether the node serves, and every reason it does not (for /readyz)."""
        problems = []
        if self._stopping:
            problems.append("draining")
        if self.follower is None or not self.follower.seeded.is_set():
            problems.append("control plane: not seeded yet")
        elif self.follower.refused is not None:
            problems.append(f"control plane: feed refused: {self.follower.refused}")
        if self.cluster is not None:
            problems.extend(self.cluster.problems())
        now = time.monotonic()
        degraded: list[str] = []  # the control process: changes wait, the data plane serves
        for child in self.children:
            status = child.status(now)
            if status is not None:
                (problems if child.serves_data else degraded).append(f"{child.name}: {status}")
        return not problems, problems + degraded

    def supervisor_counters(self) -> list[tuple[str, str, int]]:
        """(metric name, help, value) of the supervisor's own counters."""
        counters = []
        if self.jwks_sync is not None:
            sync = self.jwks_sync
            counters += [
                ("felix_jwks_sync_writes", "JWK sets written from the control plane", sync.writes),
                ("felix_jwks_sync_removals", "JWK sets removed (tenant gone)", sync.removals),
                (
                    "felix_jwks_sync_failures",
                    "JWK set fetches that failed (the last known set was kept)",
                    sync.failures,
                ),
            ]
        if self.ring_mirror is not None:
            mirror = self.ring_mirror
            counters += [
                (
                    "felix_key_ring_mirror_writes",
                    "Key rings mirrored from the cluster",
                    mirror.writes,
                ),
                (
                    "felix_key_ring_mirror_removals",
                    "Key rings removed (gone from the cluster's database)",
                    mirror.removals,
                ),
                (
                    "felix_key_ring_mirror_failures",
                    "Mirror passes that failed (the files were kept)",
                    mirror.failures,
                ),
            ]
        if self.key_rotator is not None:
            counters.append(
                ("felix_key_rotations", "Scheduled key ring rotations", self.key_rotator.rotations)
            )
        counters += self.registrar.counters()
        counters.append(
            (
                "felix_child_restart_failures",
                "Starts of a replacement child that failed (retried with backoff)",
                sum(c.failed_starts for c in self.children),
            )
        )
        return counters

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> int:
        # First of all: no other node may use this data dir (raises DataDirInUse).
        self._lock = DataDirLock.acquire(self.config.data_dir)
        # Half an import (felix cluster import-shard) is never served: finish it first.
        try:
            check_no_pending_import(self.config.data_dir)
        except ConfigError:
            self._lock.release()
            raise
        # A node.json there describes a node that is gone (killed): not this one.
        (self.config.data_dir / "node.json").unlink(missing_ok=True)
        soft, hard = raise_nofile_limit()
        log.info("descriptor limit %d (hard %d)", soft, hard)
        self._fd_reserve = FdReserve()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._start()
            await self._stop.wait()
            await self._drain()
            return 0
        finally:
            self._cleanup()
            await self._end_tasks()
            # Last: nothing of this node writes to the data dir once another may own it.
            if self._lock is not None:
                self._lock.release()

    async def _start(self) -> None:
        config = self.config
        host, port = config.listen
        ips = [host] if _is_ip(host) else []
        names = ["localhost"] + ([host] if not _is_ip(host) and host else [])
        certs = node_certificates(
            config.data_dir / "tls",
            hostnames=names,
            ips=ips,
            cert=config.tls_cert,
            key=config.tls_key,
        )
        self.ca_path = certs.ca_cert
        self._check_region_key()
        for _ in range(config.gateways):
            sock = bind_udp(host, port)
            port = sock.getsockname()[1]  # port 0: every later socket joins the picked port
            self._sockets.append(sock)
        self.port = port
        if config.shm_socket is not None:
            self._shm_sock = self._bind_shm(config.shm_socket)
        if not config.embedded_shards:
            self._make_rings()
        self.health = HealthServer(
            self,
            info={"region": config.region, "version": felix.__version__},
            resource_token=(admin_token(config.data_dir / "admin-token") if config.auth else None),
        )
        await self.health.start(*config.http)
        if not config.control_url:
            await self._launch_control()
        for child in self.shards:
            await self._start_child(child)
        await self._wait_ready(self.shards)
        await self._start_control()
        if config.cluster is not None:
            await self._join_cluster(config.cluster)
        for child in self.gateways:
            await self._start_child(child)
        await self._wait_ready(self.gateways)
        if config.embedded_shards:
            # The seed went to gateway-0 before it ran (and was dropped): define again.
            self._replay_embedded()
        for child in [*self.shards, *self.gateways]:
            self._background(self._supervise(child))
        self._background(self._heartbeats())
        if config.bridges:
            self._background(self._run_bridges())
        self._write_node_json()
        self.started = True
        http_host, http_port = self.health.address
        print(
            f"felix ready quic={_fmt(host, self.port)} http={_fmt(http_host, http_port)} "
            f"control={self._control_url()} "
            f"shm={self.config.shm_socket or 'off'} "
            f"ca={self.ca_path} gateways={config.gateways} shards={config.shards} "
            f"pid={os.getpid()} data={config.data_dir}",
            flush=True,
        )

    async def _join_cluster(self, dsn: str) -> None:
        """Join the cluster (after the control plane: its store may be the same database)."""
        config = self.config
        assert self.health is not None
        if config.advertise is not None:
            address = _fmt(*config.advertise)
        else:
            address = _fmt(config.listen[0], self.port)
        http_host, http_port = self.health.address
        if is_wildcard(http_host):
            http_host = (config.advertise or config.listen)[0]
        self.cluster = NodeCluster(
            dsn=dsn,
            node_id=config.node_id,
            address=address,
            health_url=f"http://{_fmt(http_host, http_port)}",
            region=config.region,
            logical_shards=config.logical_shards,
            lease=config.cluster_lease,
            settle=config.cluster_settle,
            node_expiry=config.cluster_node_expiry,
            data_dir=config.data_dir,
            gateways=self._map_followers,
            clock=cluster_clock,  # serve_until's clock (CLOCK_BOOTTIME), as the gateways'
        )
        log.info("joining the cluster as %s (advertising %s)", config.node_id, address)
        await self.cluster.start()

    def _check_region_key(self) -> None:
        """Resolve the region key before any shard starts (and, in dev mode, generate
        it: one process, as for the TLS CA), and say loudly when it cannot serve the
        data keys here (their tenants' durable streams are refused, not the node)."""
        config = self.config
        kek, missing = resolve_region_key(
            config.data_dir, config.region_key, generate=config.encryption
        )
        store = KeyStore(config.data_dir / KEYS_DIR, kek, missing=missing)
        problem = store.check()
        if problem is not None:
            log.error("encryption at rest: %s", problem)
        elif kek is not None:
            log.info(
                "encryption at rest %s: region key %s (%s)",
                "on" if config.encryption else "off (new data in plaintext)",
                kek.key_id,
                kek.source,
            )
        elif not config.encryption:
            log.info("encryption at rest off: no region key")

    def _bind_shm(self, path: Path) -> socket.socket:
        """Bind the shm clients' Unix socket at ``path`` with the configured mode.

        A socket file already there is a stale one when nothing answers on it (a
        node killed with -9): it is replaced. One that answers belongs to a live
        node, and anything that is not a socket is never touched: both refuse.
        """
        mode = self.config.shm_socket_mode
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"--shm-socket {path} exists and is not a socket; refusing")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)  # stale: nobody listens on it
                log.info("removed the stale shm socket %s", path)
            except OSError as exc:  # not ours to judge (another user's, a full backlog)
                raise ConfigError(
                    f"--shm-socket {path} exists and cannot be probed: {exc}"
                ) from None
            else:
                raise ConfigError(f"--shm-socket {path} is served by another running node")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask makes the socket file get its mode at creation: no moment in which
        # a wider default mode lets someone connect.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot bind --shm-socket {path}: {exc}") from exc
        finally:
            os.umask(old)
        # No chmod afterwards: it would follow a symlink swapped in for the socket file
        # (in a directory others can write to) and change the mode of its target.
        sock.listen(1024)
        st = os.stat(path)
        self._shm_inode = (st.st_dev, st.st_ino)
        return sock

    async def _end_tasks(self) -> None:
        """Cancel the background tasks and wait until they ended, so ``felix up`` exits.
        Cancelled again while any is left: a task can swallow a cancellation (Python
        3.11's ``asyncio.wait_for`` returns a result that arrived together with it, and
        a loop that retries on errors then goes on), which left felix up hanging at
        exit after a refused start (found by a test that runs it under load)."""
        for _ in range(50):
            tasks = [t for t in (*self._tasks, *self._key_tasks) if not t.done()]
            if not tasks:
                return
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.1)
        log.warning("background tasks did not end on cancellation; exiting anyway")

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch_control(self) -> None:
        """Start the embedded control plane's process (it starts alongside the shards)."""
        # A process of its own (felix/node/control_process.py): the supervisor keeps
        # its port and follows it over its control socket.
        host, port = self.config.control
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._control_sock = socket.create_server((host, port), family=family, backlog=1024)
        child = self.control_child = self._child("control", 0)
        feed = self._control_feed = ChildFeed(child.send)
        child.on_feed_event = feed.on_event
        await self._start_child(child)

    async def _start_control(self) -> None:
        """Serve (or reach) the control plane and seed the shards before gateways start."""
        config = self.config
        source: FeedSource
        on_tenants = None
        if config.control_url:
            client_cert = None
            if config.control_client_cert and config.control_client_key:
                client_cert = (config.control_client_cert, config.control_client_key)
            source = HttpFeed(
                config.control_url,
                token=config.control_token,
                ca=config.control_ca,
                cert=client_cert,
            )
            if config.auth:
                # The gateways read DATA_DIR/auth: mirror the control plane's JWK sets there.
                self._jwks_fetcher = HttpJwksFetcher(
                    config.control_url,
                    token=config.control_token,
                    ca=config.control_ca,
                    cert=client_cert,
                )
                self.jwks_sync = JwksSync(
                    config.data_dir / "auth", self._jwks_fetcher, period=config.jwks_refresh
                )
                on_tenants = self.jwks_sync.set_tenants
                self._start_key_task(self.jwks_sync.run())
        else:
            assert self.control_child is not None and self._control_feed is not None
            source = self._control_feed
            await self._wait_ready([self.control_child])
            self._background(self._supervise(self.control_child))
            rings: RingStore | Path = config.data_dir / "auth"
            if config.auth and (shared := self._shared_ring_store()) is not None:
                # A cluster's rings live in its database; DATA_DIR/auth mirrors them.
                rings = self._ring_store = shared
                self.ring_mirror = RingMirror(
                    shared, config.data_dir / "auth", period=config.jwks_refresh
                )
                self._start_key_task(self.ring_mirror.run())
            if config.auth and config.key_rotation_interval > 0:
                # This process owns the rings (DATA_DIR/auth, or the cluster's database):
                # rotate them on schedule.
                policy = RotationPolicy(config.key_rotation_interval, config.key_publish_lead)
                if not policy.covers(config.jwks_refresh):
                    log.warning(
                        "--key-publish-lead %g s is short: nodes following this control "
                        "plane or in this cluster, refreshing keys every %g s, may see a "
                        "token before its key",
                        policy.lead,
                        config.jwks_refresh,
                    )
                self.key_rotator = KeyRotator(rings, policy)
                self._start_key_task(self.key_rotator.run())

        def send(message: msg.ApplyResource) -> None:
            # With embedded shards, the gateway hosts every shard core.
            target = self.gateways[0] if config.embedded_shards else self.shards[message.shard]
            target.send(message)

        describe = (
            f"the control plane at {_without_userinfo(config.control_url)}"
            if config.control_url
            else "the embedded control plane"
        )
        self.follower = ControlFollower(
            source,
            config.shards,
            send,
            on_tenants=on_tenants,
            region=config.region,
            describe=describe,
        )
        self._background(self.follower.run())
        if isinstance(source, HttpFeed | ChildFeed):
            self.registrar.attach(source, self.follower)
        self._background(self.registrar.run())
        if not self.follower.seeded.is_set():
            log.info("waiting for the control plane to seed this node")
        await _first(self.follower.seeded.wait(), self.follower.refusal.wait())
        if not self.follower.seeded.is_set():
            # A feed of another region at start: felix up stops with the reason (exit 2).
            raise ConfigError(f"refusing to follow {describe}: {self.follower.refused}")
        synced = self.jwks_sync or self.ring_mirror
        if synced is not None:
            # Start the gateways with the tenants' keys in place (bounded: a slow or
            # failing fetch keeps retrying in the background).
            try:
                await asyncio.wait_for(synced.synced.wait(), JWKS_READY_TIMEOUT)
            except TimeoutError:
                log.warning("the tenants' keys are not all synced yet; starting anyway")

    def _shared_ring_store(self) -> PostgresRingStore | None:
        """The cluster's key rings: in a cluster whose embedded control plane's store is
        PostgreSQL, that database (sealed with the region key when one is given:
        felix/auth/pgrings.py). None: the rings are DATA_DIR/auth's, as on a standalone
        node."""
        config = self.config
        store = config.control_store
        if not config.clustered or config.control_url or store is None:
            return None
        if store.partition("://")[0].lower() not in ("postgresql", "postgres"):
            return None
        kek = None
        if config.region_key is not None:
            kek = FileKeyEncryptionKey.load(config.region_key)
            log.info(
                "tenant key rings: in the cluster's database, sealed with region key %s", kek.key_id
            )
        else:
            log.warning(
                "tenant key rings: in the cluster's database, not sealed (no --region-key "
                "or $FELIX_REGION_KEY_FILE shared by the cluster's nodes): whoever can read "
                "the database, or a backup of it, can sign tokens"
            )
        return PostgresRingStore(store, kek=kek)

    def _replay_embedded(self) -> None:
        """Define every shard's resources again in gateway-0, which hosts the shard cores
        with --embedded-shards (it started, or restarted, with nothing)."""
        if self.follower is not None:
            for shard in range(self.config.shards):
                self.follower.replay(shard)

    def _start_key_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._key_tasks.append(task)

    def _make_rings(self) -> None:
        config = self.config
        # Named after the data dir: a node killed with -9 left these names behind, and
        # holding the data dir's lock, no live node can be using them.
        prefix = ring_prefix(config.data_dir)
        leftovers = reclaim_rings(prefix)
        if leftovers:
            log.warning("reclaimed %d rings a previous node on this data dir left", len(leftovers))

        def ring(name: str) -> Ring:
            bell = make_doorbell()
            self._doorbells.append(bell)
            return Ring.create(f"/{prefix}{name}", capacity=config.ring_bytes, doorbell_fd=bell)

        self._req = [
            [ring(f"g{g}s{s}") for s in range(config.shards)] for g in range(config.gateways)
        ]
        self._rep = [
            [ring(f"s{s}g{g}") for g in range(config.gateways)] for s in range(config.shards)
        ]

    def _spec(
        self, child: Child, control_fd: int, socket_fd: int, shm_fd: int = -1, secret_fd: int = -1
    ) -> ChildSpec:
        def specs(rings: list[Ring]) -> list[RingSpec]:
            return [RingSpec(r.name, r.doorbell_fd) for r in rings]

        if self.config.embedded_shards or child.role == "control":
            inbound, outbound = [], []
        elif child.role == "shard":
            inbound = [self._req[g][child.index] for g in range(self.config.gateways)]
            outbound = self._rep[child.index]
        else:
            inbound = [self._rep[s][child.index] for s in range(self.config.shards)]
            outbound = self._req[child.index]
        return ChildSpec(
            child.role,
            child.index,
            child.incarnation,
            self.config,
            specs(inbound),
            specs(outbound),
            control_fd,
            socket_fd,
            supervisor_pid=os.getpid(),
            shm_fd=shm_fd,
            secret_fd=secret_fd,
        )

    def _spawn(self, child: Child) -> socket.socket:
        """Start ``child``'s next incarnation; returns the supervisor's end of its socket.

        Synchronous on purpose: it frees the descriptor reserve and takes what it
        needs before anything else on the loop can run (felix/node/fds.py). Raises
        OSError when the start fails (the caller retries).
        """
        assert self._fd_reserve is not None
        child.ready.clear()
        child.quiesced.clear()
        child.drained.clear()
        child.kill_reason = None
        child.ownership_acked = 0
        with self._fd_reserve.released():
            parent_end, child_end = socket.socketpair()
            socket_fd = -1
            shm_fd = -1
            secret_fd = -1
            try:
                fds = [child_end.fileno(), *self._doorbells]
                # The child gets its own descriptor of its socket; the supervisor keeps
                # the original open, so the port (and the reuseport group) outlive it.
                if child.role == "gateway":
                    socket_fd = os.dup(self._sockets[child.index].fileno())
                elif child.role == "control" and self._control_sock is not None:
                    socket_fd = os.dup(self._control_sock.fileno())
                if socket_fd >= 0:
                    fds.append(socket_fd)
                if child.role == "gateway" and self._shm_sock is not None:
                    shm_fd = os.dup(self._shm_sock.fileno())
                    fds.append(shm_fd)
                if child.role == "control" and self.config.control_store is not None:
                    # The store's DSN (it may carry a password) only for this child, in
                    # a pipe: neither in its spec nor in any child's environment.
                    secret_fd = secret_pipe(self.config.control_store)
                    fds.append(secret_fd)
                spec = self._spec(child, child_end.fileno(), socket_fd, shm_fd, secret_fd)
                env = child_environment({SPEC_ENV: spec.to_json()})
                child.proc = ChildProcess(
                    [sys.executable, "-m", "felix.node.worker"], env=env, pass_fds=fds
                )
            except BaseException:
                parent_end.close()
                raise
            finally:
                child_end.close()
                if socket_fd >= 0:
                    os.close(socket_fd)
                if shm_fd >= 0:
                    os.close(shm_fd)
                if secret_fd >= 0:
                    os.close(secret_fd)
        child.incarnation += 1
        child.started_at = time.monotonic()
        return parent_end

    async def _start_child(self, child: Child) -> None:
        """Start an incarnation of ``child`` and read its events (raises OSError)."""
        parent_end = self._spawn(child)
        try:
            reader, child.writer = await asyncio.open_unix_connection(
                sock=parent_end, limit=msg.MAX_LINE_BYTES
            )
        except OSError:
            parent_end.close()
            if child.proc is not None:
                child.proc.kill()  # never leave an incarnation nobody talks to
            raise
        self._background(child.read_events(reader))
        if child.role in ("gateway", "shard") and self.cluster is not None:
            self.cluster.on_gateway_started(child)  # a shard process too (split topology)

    def _map_followers(self) -> list[Child]:
        """Who gets the cluster's shard maps, and acknowledges each (a handoff waits for
        all): shard processes, first (they refuse writes for shards a map does not serve
        here, and drop what it takes away: felix/shard/cluster.py), then gateways.
        Embedded shard cores get them from their gateway."""
        return [*self.shards, *self.gateways]

    async def _supervise(self, child: Child) -> None:
        """Restart ``child`` whenever it exits, for the node's whole life."""
        while not self._stopping:
            proc = child.proc
            if proc is None:  # pragma: no cover - a supervised child was started
                return
            code = await proc.wait()
            if child.role == "control" and self._control_feed is not None:
                self._control_feed.lost()
            if self._stopping:
                return
            why = child.kill_reason or f"exited with {code}"
            log.warning("%s (pid %d) %s; restarting", child.name, proc.pid, why)
            try:
                await self._restart(child, why)
            except asyncio.CancelledError:
                raise
            except Exception:  # never abandon a child: log, then try again
                log.exception("%s: restart failed unexpectedly; trying again", child.name)
                child.problem = "restart failed unexpectedly (see the log); retrying"
                await asyncio.sleep(child.backoff.maximum)

    async def _restart(self, child: Child, why: str) -> None:
        """Start ``child`` again, retrying with backoff until a replacement is ready."""
        child.ready.clear()
        child.problem = f"restarting ({why})"
        if child.role == "shard":
            for gateway in self.gateways:
                gateway.send(msg.ShardDown(child.index))
        # Only a child that ran counts as having been healthy: its failed replacements
        # did not, so their retries keep backing off.
        ran_since = child.started_at
        attempt = 0
        while True:
            delay = child.backoff.delay(ran_since, time.monotonic())
            await asyncio.sleep(delay)
            if self._stopping:
                return
            ran_since = time.monotonic()
            attempt += 1
            try:
                await self._start_child(child)
                child.restarts += 1
                failure = await self._ready_or_failure(child)
            except OSError as exc:
                failure = f"could not be started: {exc}"
            if failure is None:
                break
            child.failed_starts += 1
            log.error("%s: replacement %s; retrying (attempt %d)", child.name, failure, attempt)
            child.problem = f"restart failing (attempt {attempt}): replacement {failure}"
        child.problem = None
        if self.follower is not None:
            if child.role == "control":
                # A store in memory starts over empty: compare, don't assume.
                self.follower.resync()
            elif child.role == "shard":
                self.follower.replay(child.index)
            elif self.config.embedded_shards:  # its shard cores restarted with it
                self._replay_embedded()
        if child.role == "shard":
            for gateway in self.gateways:
                gateway.send(msg.ShardUp(child.index))
        self._write_node_json()
        log.info("%s is back (pid %d)", child.name, child.proc.pid if child.proc else -1)

    async def _ready_or_failure(self, child: Child) -> str | None:
        """None once the new incarnation is ready; why not if it exits or hangs first."""
        proc = child.proc
        assert proc is not None
        ready = asyncio.ensure_future(child.ready.wait())
        exited = asyncio.ensure_future(proc.wait())
        try:
            # The timeout counts from the start or the child's last progress report.
            while child.stalled_for(time.monotonic()) < READY_TIMEOUT:
                done, _ = await asyncio.wait(
                    {ready, exited}, timeout=READY_POLL, return_when="FIRST_COMPLETED"
                )
                if done:
                    break
        finally:
            ready.cancel()
            exited.cancel()
        if child.ready.is_set():
            return None
        if proc.returncode is not None:
            return f"exited with {proc.returncode} before it was ready"
        proc.kill()
        await proc.wait()
        return f"was not ready within {READY_TIMEOUT:g} s of its last progress (killed)"

    async def _heartbeats(self) -> None:
        """Ping every ready child; report the silent ones, kill and restart the dead."""
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                proc = child.proc
                if not child.ready.is_set() or proc is None or proc.returncode is not None:
                    continue
                beat = child.heartbeat
                health = beat.health(now)
                if health is Health.DEAD and child.kill_reason is None:
                    child.kill_reason = f"killed: no heartbeat for {beat.silent_for(now):.1f} s"
                    log.error(
                        "%s (pid %d) stopped answering; %s", child.name, proc.pid, child.kill_reason
                    )
                    proc.kill()
                elif health is Health.UNRESPONSIVE and not child.unresponsive:
                    log.warning(
                        "%s (pid %d) is unresponsive: no heartbeat for %.1f s (killed at %g s)",
                        child.name,
                        proc.pid,
                        beat.silent_for(now),
                        beat.kill_after,
                    )
                child.unresponsive = health is not Health.OK
                child.send(msg.Ping(beat.ping(now)))
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _wait_ready(self, children: list[Child]) -> None:
        """Wait until every child is ready; fail when one made no progress (msg.Starting)
        for READY_TIMEOUT seconds."""
        waiting = [asyncio.ensure_future(c.ready.wait()) for c in children]
        try:
            while not all(w.done() for w in waiting):
                await asyncio.wait(waiting, timeout=READY_POLL)
                now = time.monotonic()
                stalled = [
                    c.name
                    for c in children
                    if not c.ready.is_set() and c.stalled_for(now) >= READY_TIMEOUT
                ]
                if stalled:
                    raise RuntimeError(f"children did not become ready: {stalled}")
        finally:
            for w in waiting:
                w.cancel()

    async def _drain(self) -> None:
        grace = self.config.drain_grace
        log.info("draining (grace %.1fs)", grace)
        self._stopping = True
        await self._stop_bridges()
        if self.cluster is not None:
            # Leave first: the shards move now, not once the lease has run out.
            await self.cluster.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        live = [g for g in self.gateways if g.ready.is_set()]
        # Phase 1: every gateway stops taking requests and waits for its replies, so
        # no publish can be appended anywhere afterwards. Phase 2: each gateway
        # collects what the shards still owe its subscribers, delivers it, closes.
        for gateway in live:
            gateway.send(msg.Quiesce(grace / 2))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(g.quiesced.wait() for g in live)), grace / 2)
        for gateway in live:
            gateway.send(msg.Drain(max(deadline - loop.time() - 0.5, 0.1)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(g.drained.wait() for g in live)), max(deadline - loop.time(), 0.1)
            )
        # Closing the control sockets makes every child exit.
        for child in self.children:
            if child.writer is not None:
                child.writer.close()
        await self._reap(timeout=max(grace / 2, 2.0))
        if self.health is not None:
            await self.health.stop()
        if self._control_sock is not None:
            self._control_sock.close()
        for task in self._key_tasks:
            task.cancel()
        for task in self._key_tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._jwks_fetcher is not None:
            await self._jwks_fetcher.aclose()
        if self._ring_store is not None:
            await self._ring_store.close()

    async def _reap(self, timeout: float) -> None:
        procs = [c.proc for c in self.children if c.proc is not None and c.proc.returncode is None]
        if not procs:
            return
        _, alive = await asyncio.wait(
            [asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout
        )
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        del alive

    def _cleanup(self) -> None:
        self._stopping = True
        if self.bridges_proc is not None and self.bridges_proc.returncode is None:
            self.bridges_proc.kill()
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.kill()
        for rows in (self._req, self._rep):
            for row in rows:
                for ring in row:
                    with contextlib.suppress(Exception):
                        ring.close()
                    with contextlib.suppress(Exception):
                        ring.unlink()
        for fd in self._doorbells:
            with contextlib.suppress(OSError):
                os.close(fd)
        for sock in self._sockets:
            sock.close()
        self._close_shm()
        if self._fd_reserve is not None:
            self._fd_reserve.release_all()

    def _close_shm(self) -> None:
        if self._shm_sock is None:
            return
        self._shm_sock.close()
        self._shm_sock = None
        path = self.config.shm_socket
        if path is None or self._shm_inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._shm_inode:  # still ours: remove it
                path.unlink()

    # -- reporting --------------------------------------------------------------------------

    async def stream_status(self, key: str) -> dict[str, Any] | None:
        """Ask the shard owning stream ``key`` for its status (the health port's
        ``/streams/...`` route). None: the shard does not hold it.

        Raises:
            TimeoutError: the shard did not answer within STATUS_TIMEOUT seconds.
        """
        shard = ipc.shard_for(key, self.config.shards)
        # With embedded shards the gateway hosting the cores answers for them.
        child = self.gateways[0] if self.config.embedded_shards else self.shards[shard]
        return await self._ask(child, key, "stream")

    async def cache_status(self, key: str) -> dict[str, Any] | None:
        """Cache ``key`` (``tenant/ns/cache``) summed over the shards that hold a
        partition of it (the health port's ``/caches/...`` route). None: none does.

        Raises:
            TimeoutError: a shard did not answer within STATUS_TIMEOUT seconds.
        """
        from felix.node.worker import sum_cache_status

        children = self.gateways[:1] if self.config.embedded_shards else self.shards
        parts = await asyncio.gather(*(self._ask(c, key, "cache") for c in children))
        return sum_cache_status(parts)

    async def _ask(self, child: Child, key: str, kind: str) -> dict[str, Any] | None:
        if len(child.status_waiters) >= MAX_STATUS_WAITERS:
            raise TimeoutError("too many status requests in flight")
        self._status_requests += 1
        request = self._status_requests
        waiter: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        child.status_waiters[request] = waiter
        try:
            if not child.send(msg.StreamStatusRequest(request, key, kind)):
                raise TimeoutError(f"{child.name} is not running")
            return await asyncio.wait_for(waiter, STATUS_TIMEOUT)
        finally:
            child.status_waiters.pop(request, None)

    def node_status(self) -> dict[str, Any]:
        """The node's own part of /status: identity, state, children, budgets, rings."""
        ready, problems = self.readiness()
        now = time.monotonic()
        rings = [ring for rows in (self._req, self._rep) for row in rows for ring in row]
        return {
            "version": felix.__version__,
            "region": self.config.region,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.created_at, 3),
            "started": self.started,
            "ready": ready,
            "problems": problems,
            "gateways": self.config.gateways,
            "shards": self.config.shards,
            "embedded_shards": self.config.embedded_shards,
            "durable_streams": self.config.durable_streams,
            "auth": self.config.auth,
            "children": [
                {
                    "name": c.name,
                    "pid": c.proc.pid if c.proc is not None else None,
                    "restarts": c.restarts,
                    "status": c.status(now) or "serving",
                }
                for c in self.children
            ],
            "budgets": {
                "memory_bytes": self.config.memory_budget,
                "disk_bytes": self.config.disk_budget,
                "disk_reserve_bytes": self.config.disk_reserve,
            },
            # Streams and caches created on first use, registered in the control plane.
            "auto_created": self.registrar.status(),
            "cluster": self.cluster.summary() if self.cluster is not None else None,
            # Gateway<->shard rings (none with embedded shards): how full the fullest is.
            "rings": {
                "count": len(rings),
                "capacity_bytes": self.config.ring_bytes,
                "max_used_bytes": max((r.used_bytes for r in rings if not r.closed), default=0),
            },
        }

    def node_info(self) -> dict[str, Any]:
        host = self.config.listen[0]
        http = self.health.address if self.health is not None else self.config.http
        return {
            "quic": _fmt(host, self.port),
            "http": _fmt(*http),
            "control": self._control_url(),
            "shm": str(self.config.shm_socket) if self._shm_sock is not None else None,
            "ca": str(self.ca_path) if self.ca_path else None,
            "pid": os.getpid(),
            "region": self.config.region,
            "topology": {
                "gateways": self.config.gateways,
                "shards": self.config.shards,
                "embedded_shards": self.config.embedded_shards,
            },
            "processes": {
                **{c.name: c.proc.pid for c in self.children if c.proc is not None},
                **({"bridges-0": self.bridges_proc.pid} if self.bridges_proc else {}),
            },
            "cluster": (
                {
                    "node_id": self.cluster.node_id,
                    "address": self.cluster.address,
                    # felix cluster export-shard reads it from a stopped node's data dir.
                    "logical_shards": self.cluster.logical_shards,
                }
                if self.cluster is not None
                else None
            ),
            "restarts": {
                **{c.name: c.restarts for c in self.children},
                **({"bridges-0": self.bridges_restarts} if self.config.bridges else {}),
            },
        }

    def cluster_status(self) -> dict[str, Any] | None:
        """The /cluster route (None: a standalone node)."""
        return self.cluster.status() if self.cluster is not None else None

    def cluster_metrics(self) -> dict[str, Any] | None:
        """Values of the felix_cluster_* metrics (None: a standalone node)."""
        return self.cluster.metrics() if self.cluster is not None else None

    def _control_url(self) -> str | None:
        if self._control_sock is not None:
            host = self.config.control[0]
            https = not is_loopback(host) or self.config.control_client_ca is not None
            port = self._control_sock.getsockname()[1]
            return f"{'https' if https else 'http'}://{_fmt(host, port)}"
        return self.config.control_url

    # -- bridges (--bridges) ------------------------------------------------------------

    def _bridges_command(self) -> tuple[list[str], dict[str, str]]:
        """``felix bridge run --all`` against this node's control plane and QUIC port."""
        config = self.config
        host = config.listen[0]
        # The node's certificate names its listen IP, localhost and the loopback IPs.
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        source = f"felix://{_fmt(host, self.port)}"
        control = self._control_url()
        assert control is not None
        cmd = [
            sys.executable, "-m", "felix.cli", "bridge", "run", "--all",
            "--url", control, "--source-url", source,
            "--state-dir", str(config.data_dir / "bridges"),
            "--secrets-dir", str(config.data_dir / "bridge-secrets"),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self.ca_path is not None:
            cmd += ["--source-ca", str(self.ca_path)]
        if config.bridges_http:
            cmd += ["--http", config.bridges_http]
        env = child_environment()
        env.pop("FELIX_CONTROL_TOKEN", None)
        if config.control_url:
            if config.control_token:
                env["FELIX_CONTROL_TOKEN"] = config.control_token  # not on the command line
            if config.control_ca is not None:
                cmd += ["--ca", str(config.control_ca)]
            if config.control_client_cert and config.control_client_key:
                cmd += ["--cert", str(config.control_client_cert)]
                cmd += ["--key", str(config.control_client_key)]
        else:
            if control.startswith("https") and self.ca_path is not None:
                cmd += ["--ca", str(self.ca_path)]
            if config.auth:
                env["FELIX_CONTROL_TOKEN"] = (config.data_dir / "admin-token").read_text().strip()
        if config.auth:
            # The node mints each bridge a token that may read its source stream only.
            cmd += ["--source-keys-dir", str(config.data_dir / "auth")]
        return cmd, env

    async def _run_bridges(self) -> None:
        """Run the bridges child for the node's life, restarted with backoff when it exits."""
        backoff = RestartBackoff()
        while not self._stopping:
            started = time.monotonic()
            try:
                cmd, env = self._bridges_command()
                assert self._fd_reserve is not None
                with self._fd_reserve.released():
                    self.bridges_proc = ChildProcess(cmd, env=env, pass_fds=())
            except OSError as exc:
                log.error("bridges-0 could not be started: %s; retrying", exc)
            else:
                self._write_node_json()
                code = await self.bridges_proc.wait()
                if self._stopping:
                    return
                log.warning("bridges-0 (pid %d) exited with %d; restarting",
                            self.bridges_proc.pid, code)  # fmt: skip
                self.bridges_restarts += 1
            await asyncio.sleep(backoff.delay(started, time.monotonic()))

    async def _stop_bridges(self) -> None:
        proc = self.bridges_proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def _write_node_json(self) -> None:
        path = self.config.data_dir / "node.json"
        tmp = path.with_suffix(".json.tmp")
        # With the descriptor reserve freed: the write needs one, and runs synchronously.
        reserve = self._fd_reserve.released() if self._fd_reserve else contextlib.nullcontext()
        try:
            with reserve:
                tmp.write_text(json.dumps(self.node_info(), indent=2) + "\n")
                os.replace(tmp, path)
        except OSError as exc:  # e.g. no descriptor free: node.json is a report, not state
            log.warning("cannot write %s: %s", path, exc)


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Return once the first of ``waits`` is done (the others are cancelled)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process (workers, the bridges runner): the
    supervisor's, without what holds a DSN (``$FELIX_CLUSTER``, ``$FELIX_CONTROL_STORE``)."""
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROPPED}
    if extra:
        env.update(extra)
    return env


def secret_pipe(secret: str) -> int:
    """The read end of a pipe holding ``secret`` (the write end closed), for a child's
    ``pass_fds``. At most MAX_DSN_BYTES (less than a pipe buffer: written before the
    child starts, the write never blocks). Raises OSError (the start is retried)."""
    data = secret.encode()
    assert len(data) <= MAX_DSN_BYTES  # NodeConfig checks it
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def _without_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (it goes into log and audit lines)."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["Supervisor", "is_loopback"]
