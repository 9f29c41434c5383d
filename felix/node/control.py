"""The node's link to the control plane: serve it, and follow its change feed.

How it works: `felix up` runs the control plane's REST API in a child process of
its own (felix/node/control_process.py; SQLite in the data dir by default), so
the control plane's failures (a memory blowup, a crash, descriptors exhausted by
its clients) stay in that process: the supervisor restarts it and the data plane
never notices. The supervisor follows it over the child's control socket
(:class:`ChildFeed`). Or the node follows a remote control plane
(``--control-url``, :class:`HttpFeed`). Either way a :class:`ControlFollower` seeds the node from a
snapshot before the node reports ready, then follows the change feed with long
polls and applies each stream, cache and queue group change to the shards that
own it (a stream, and each of its queue groups: the shard the stream's key hashes
to; a cache: every shard, each holding its share of the budget). If the control
plane is away, the node keeps serving what it knows and retries with backoff; if
the feed moved past the follower's position, it re-snapshots and applies the
difference.

Regions (issue #15): a node follows only a control plane of its own region. Each
seed asks the source for its region (a remote control plane's /v1/system/info) and
checks every tenant, namespace, stream and cache of the snapshot, and each change,
for the region it records. A mismatch is refused: nothing of it is applied, the
refusal is logged (an error) and audited, and the follower stops following. At
start `felix up` exits with the error; later, /readyz reports the node not ready
(it keeps serving what it had) and the follower tries again every
:data:`REFUSED_RETRY` seconds, taking up the feed once the region matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol

import uvicorn

from felix import audit, ipc
from felix.cancel import raise_if_cancelled
from felix.control.limits import HttpLimits
from felix.control.model import REGIONAL, Change, Op, Resource, ResourceKind
from felix.control.quotas import NodeQuotas
from felix.control.store import CursorTooOld, Store
from felix.errors import WrongRegion
from felix.node import messages as msg
from felix.node.messages import ApplyResource
from felix.regions import DEV_REGION

log = logging.getLogger("felix.control.follower")

#: Changes per feed request and seconds a long poll waits.
PAGE = 500
LONG_POLL = 10.0
RETRY_MIN, RETRY_MAX = 0.2, 10.0

#: Deleted streams and caches a follower remembers for restarted shards.
MAX_DELETED = 10_000
#: Kinds the shards apply: a tenant's quotas, streams, caches and queue groups.
APPLIED = (ResourceKind.TENANT, ResourceKind.STREAM, ResourceKind.CACHE, ResourceKind.GROUP)
#: What a shard applies: (kind, path) -> spec, for the APPLIED kinds.
Resources = dict[tuple[ResourceKind, tuple[str, ...]], dict[str, Any]]


#: Seconds between attempts to follow again after a feed of another region was refused.
REFUSED_RETRY = 30.0


class FeedSource(Protocol):
    """Where the follower reads from: a store in this process, or the REST API."""

    async def region(self) -> str | None:
        """The region of the control plane behind this source (None: the node's own,
        by construction: its embedded control plane)."""
        ...

    async def snapshot(self) -> tuple[int, list[Resource]]: ...

    async def changes(self, since: int, limit: int, wait: float) -> tuple[list[Change], int]: ...


class StoreFeed:
    """Follow a store in this process directly (the embedded control plane)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def region(self) -> str | None:
        return None

    async def snapshot(self) -> tuple[int, list[Resource]]:
        return await self._store.snapshot()

    async def changes(self, since: int, limit: int, wait: float) -> tuple[list[Change], int]:
        changes, nxt = await self._store.changes(since, limit)
        if not changes and wait > 0:
            await self._store.wait(since, wait)
            changes, nxt = await self._store.changes(since, limit)
        return changes, nxt


class HttpFeed:
    """Follow a remote control plane through its REST API (blocking client, in a thread)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca: Path | None = None,
        cert: tuple[Path, Path] | None = None,
    ) -> None:
        from felix.control.client import ControlClient

        # token: sent as Authorization: Bearer (a control plane that requires auth).
        # ca: verifies an https control plane; cert: (chain, key) presented to one that
        # requires client certificates (mTLS). None: $FELIX_CONTROL_CA / _CERT / _KEY.
        self._client = ControlClient(url, token=token, ca=ca, cert=cert)
        self.url = url

    async def region(self) -> str | None:
        info = await asyncio.to_thread(self._client.info)
        region = info.get("region")
        if not isinstance(region, str):
            raise ConnectionError(f"{self.url}/v1/system/info names no region")
        return region

    async def snapshot(self) -> tuple[int, list[Resource]]:
        return await asyncio.to_thread(self._client.snapshot)

    async def changes(self, since: int, limit: int, wait: float) -> tuple[list[Change], int]:
        return await asyncio.to_thread(self._client.changes, since, limit, wait)

    async def register(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Register auto-created resources (``POST /v1/registrations``, felix/node/registrar.py)."""
        return await asyncio.to_thread(self._client.register, items)


#: Delivers one resource change to the process that holds the shard it names.
Send = Callable[[ApplyResource], None]

#: Seconds the control process may take to answer a feed request (beyond its long poll).
REPLY_TIMEOUT = 10.0


class ChildFeed:
    """Follow the control plane served by the node's control process, over its socket.

    ``send`` delivers a command to the control process (False: it is not running);
    the supervisor hands this feed the process's feed events (:meth:`on_event`) and
    tells it when the process exits (:meth:`lost`). A request to a process that is
    down or restarting fails with ConnectionError, and the follower retries.
    """

    def __init__(self, send: Callable[[msg.Command], bool]) -> None:
        self._send = send
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._parts: dict[int, list[dict[str, Any]]] = {}

    async def region(self) -> str | None:
        return None  # the node's own control process, started with the node's region

    async def snapshot(self) -> tuple[int, list[Resource]]:
        position, raw = await self._call(msg.SnapshotRequest, REPLY_TIMEOUT)
        return position, [Resource.model_validate(r) for r in raw]

    async def changes(self, since: int, limit: int, wait: float) -> tuple[list[Change], int]:
        def request(rid: int) -> msg.ChangesRequest:
            return msg.ChangesRequest(rid, since, limit, wait)

        raw, nxt = await self._call(request, wait + REPLY_TIMEOUT)
        return [Change.model_validate(c) for c in raw], nxt

    async def register(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Register auto-created resources in the control process's store
        (felix/node/registrar.py, felix/control/registration.py)."""

        def request(rid: int) -> msg.RegisterRequest:
            return msg.RegisterRequest(rid, items)

        results: list[dict[str, Any]] = await self._call(request, REPLY_TIMEOUT)
        if len(results) != len(items):
            raise ConnectionError("the control process answered a registration badly")
        return results

    async def _call(self, make: Callable[[int], msg.Command], timeout: float) -> Any:
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            if not self._send(make(rid)):
                raise ConnectionError("the control process is not running")
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(rid, None)
            self._parts.pop(rid, None)

    def on_event(self, event: msg.Event) -> None:
        if isinstance(event, msg.SnapshotPart):
            future = self._pending.get(event.request)
            if future is None:
                return
            parts = self._parts.setdefault(event.request, [])
            parts.extend(event.resources)
            if event.done and not future.done():
                future.set_result((event.position, parts))
        elif isinstance(event, msg.ChangesReply):
            future = self._pending.get(event.request)
            if future is not None and not future.done():
                future.set_result((event.changes, event.next_position))
        elif isinstance(event, msg.RegisterReply):
            future = self._pending.get(event.request)
            if future is not None and not future.done():
                future.set_result(event.results)
        elif isinstance(event, msg.FeedFailed):
            future = self._pending.get(event.request)
            if future is not None and not future.done():
                error: Exception = ConnectionError(event.error)
                if event.cursor_too_old:
                    error = CursorTooOld(-1, -1)
                future.set_exception(error)

    def lost(self) -> None:
        """The control process exited: its requests will never be answered."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the control process exited"))


class ControlFollower:
    """Keeps the shards' resource definitions equal to the control plane's."""

    def __init__(
        self,
        source: FeedSource,
        shards: int,
        send: Send,
        *,
        on_tenants: Callable[[frozenset[str]], None] | None = None,
        region: str = DEV_REGION,
        describe: str = "the control plane",
    ) -> None:
        self._source = source
        #: This node's region: a feed of another region is refused.
        self.region = region
        self._describe = describe
        #: Why the feed is refused (None: it is not); set with ``refusal``.
        self.refused: str | None = None
        self.refusal = asyncio.Event()
        self._shards = shards
        self._send = send
        # on_tenants(all tenants): called after a seed and each tenant created or
        # deleted (the JWKS sync of a node following a remote control plane).
        self._on_tenants = on_tenants
        self.tenants: set[str] = set()
        self.resources: Resources = {}
        # Streams and caches deleted since this node started (newest MAX_DELETED): a
        # restarted shard is told again, so a write cannot create them again.
        self.deleted: OrderedDict[tuple[ResourceKind, tuple[str, ...]], None] = OrderedDict()
        self.position = 0
        self.seeded = asyncio.Event()
        self.applied = 0
        self._resync = False

    def targets(self, kind: ResourceKind, path: tuple[str, ...]) -> Iterable[int]:
        if kind in (ResourceKind.STREAM, ResourceKind.GROUP):
            # A group lives beside its stream: path[:3] names the stream.
            return (ipc.shard_for(ipc.stream_key(*path[:3]), self._shards),)
        return range(self._shards)

    async def seed(self) -> None:
        """Take a snapshot and define everything in it (replacing what was known).

        Raises WrongRegion (applying nothing) if the source's control plane, or a
        resource in the snapshot, is of another region than this node's."""
        remote = await self._source.region()
        if remote is not None and remote != self.region:
            raise WrongRegion(
                f"{self._describe} is region {remote!r}; this node is region "
                f"{self.region!r}: a node follows only a control plane of its own region",
                region=remote,
                expected=self.region,
            )
        position, resources = await self._source.snapshot()
        for res in resources:
            self._check_region(res)
        fresh: Resources = {(r.kind, tuple(r.path)): r.spec for r in resources if r.kind in APPLIED}
        for kind, path in self.resources.keys() - fresh.keys():
            self._apply("delete", kind, path, {})
            self._deleted(kind, path)
        for (kind, path), spec in fresh.items():
            if self.resources.get((kind, path)) != spec:
                self._apply("define", kind, path, spec)
        self.resources = fresh
        self.position = position
        self.tenants = {r.path[0] for r in resources if r.kind is ResourceKind.TENANT}
        self._tenants_changed()
        self.seeded.set()
        if self.refused is not None:
            log.warning("following %s again (region %s)", self._describe, self.region)
            self.refused = None
            self.refusal.clear()

    def _check_region(self, res: Resource) -> None:
        """Refuse a resource recording another home region than this node's."""
        region = res.spec.get("region") if res.kind in REGIONAL else None
        if region is not None and region != self.region:
            raise WrongRegion(
                f"{self._describe} holds {res.kind} {'/'.join(res.path)} of region "
                f"{region!r}; this node is region {self.region!r}",
                region=region,
                expected=self.region,
            )

    def _refuse(self, exc: WrongRegion) -> None:
        """Stop following: log and audit why (once per reason), report not ready."""
        reason = str(exc)
        if reason != self.refused:
            log.error("refusing to follow %s: %s", self._describe, reason)
            audit.emit(
                "auth",
                who="node",
                tenant=None,
                action="control.follow",
                object=self._describe,
                result="denied",
                reason="wrong-region",
                detail=reason,
            )
        self.refused = reason
        self.refusal.set()
        self._resync = True  # take it up again only from a fresh, checked snapshot

    def resync(self) -> None:
        """Take a fresh snapshot before the next change (the source may have started
        over, e.g. a store in memory that was restarted); the node stays seeded and
        keeps serving meanwhile, and only the difference is applied."""
        self._resync = True

    def _tenants_changed(self) -> None:
        if self._on_tenants is not None:
            self._on_tenants(frozenset(self.tenants))

    async def run(self) -> None:
        """Seed (retrying until the control plane answers), then follow the feed forever."""
        delay = RETRY_MIN
        while True:
            try:
                if self._resync or not self.seeded.is_set():
                    await self.seed()
                    self._resync = False
                changes, nxt = await self._source.changes(self.position, PAGE, LONG_POLL)
                for change in changes:
                    self._on_change(change)
                self.position = nxt
                delay = RETRY_MIN
            except CursorTooOld:
                log.warning(
                    "the control plane's feed moved past position %d: re-snapshot", self.position
                )
                self.seeded.clear()
            except WrongRegion as exc:
                self._refuse(exc)
                await asyncio.sleep(REFUSED_RETRY)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled()  # a reply that came with a cancellation: stop
                # The control plane is away: keep serving what we know, retry with jitter.
                log.warning("control plane unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, RETRY_MAX)

    def _on_change(self, change: Change) -> None:
        r = change.resource
        self._check_region(r)
        if r.kind is ResourceKind.TENANT:
            known = r.path[0] in self.tenants
            if change.op is Op.DELETE and known:
                self.tenants.discard(r.path[0])
                self._tenants_changed()
            elif change.op is not Op.DELETE and not known:
                self.tenants.add(r.path[0])
                self._tenants_changed()
        if r.kind not in APPLIED:
            return
        key = (r.kind, tuple(r.path))
        if change.op is Op.DELETE:
            if self.resources.pop(key, None) is not None:
                self._apply("delete", r.kind, key[1], {})
                self._deleted(r.kind, key[1])
        else:
            self.resources[key] = r.spec
            self.deleted.pop(key, None)
            self._apply("define", r.kind, key[1], r.spec)

    def end(self, kind: ResourceKind, path: tuple[str, ...]) -> None:
        """End ``kind`` ``path`` on the shards (as a delete from the feed would) unless the
        control plane defines it: a resource created on first use that the control plane
        deleted (or whose namespace or tenant it deleted) before the node knew."""
        if (kind, path) in self.resources:
            return
        self._apply("delete", kind, path, {})
        self._deleted(kind, path)

    def _deleted(self, kind: ResourceKind, path: tuple[str, ...]) -> None:
        if kind in (ResourceKind.TENANT, ResourceKind.GROUP):
            # A tenant's quota simply falls back to the node's default; a restarted
            # shard starts without group definitions, so there is nothing to undo.
            return
        self.deleted[(kind, path)] = None
        self.deleted.move_to_end((kind, path))
        while len(self.deleted) > MAX_DELETED:
            self.deleted.popitem(last=False)

    def _apply(
        self,
        op: Literal["define", "delete"],
        kind: ResourceKind,
        path: tuple[str, ...],
        spec: dict[str, Any],
    ) -> None:
        self.applied += 1
        for shard in self.targets(kind, path):
            self._send(ApplyResource(op, kind.value, list(path), shard, spec))

    def replay(self, shard: int) -> None:
        """Tell a restarted ``shard`` (it starts with nothing) what was deleted, then
        define everything it owns again."""
        for kind, path in self.deleted:
            if shard in self.targets(kind, path):
                self._send(ApplyResource("delete", kind.value, list(path), shard))
        for (kind, path), spec in self.resources.items():
            if shard in self.targets(kind, path):
                self._send(ApplyResource("define", kind.value, list(path), shard, spec))


class _QuietServer(uvicorn.Server):
    """uvicorn inside the supervisor: the supervisor owns SIGTERM/SIGINT, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class EmbeddedControl:
    """The REST API over ``store``, served on a listening socket (the node's control
    process gets it from the supervisor, which keeps the port across restarts)."""

    def __init__(
        self,
        store: Store,
        sock: socket.socket,
        *,
        region: str = "local",
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        node_info: Callable[[], dict[str, Any]] | None = None,
        keys_dir: Path | None = None,
        admin_token: str | None = None,
        require_auth: bool = False,
        limits: HttpLimits | None = None,
        quotas: NodeQuotas | None = None,
    ) -> None:
        from felix.control.api import create_app
        from felix.control.api.serving import server_config

        self.store = store
        # keys_dir: the tenants' key rings, for the token exchange, the JWKS route and
        # (with require_auth) checking the Felix tokens callers send.
        app = create_app(
            store,
            region=region,
            node_info=node_info,
            keys_dir=keys_dir,
            admin_token=admin_token,
            require_auth=require_auth,
            limits=limits,
            quotas=quotas,
        )
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])}
            if client_ca is not None:  # mTLS: uvicorn requires and verifies client certs
                options |= {"ssl_ca_certs": str(client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        elif client_ca is not None:
            raise ValueError("client_ca needs tls")
        # limits: body size and time, header timeout, connection cap (HttpLimits defaults).
        config = server_config(
            app,
            *sock.getsockname()[:2],
            limits=limits,
            log_level="warning",
            lifespan="off",
            # Long polls would hold shutdown for up to 30 s: the drain cannot wait that long.
            timeout_graceful_shutdown=1,
            **options,
        )
        self._server = _QuietServer(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None
        self.scheme = "https" if tls else "http"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve([self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it failed
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
