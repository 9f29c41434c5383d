"""The shard core: sans-IO owner of a partition of streams and caches.

How it works: a shard worker (or, as a knob, a gateway hosting shards
in-process) feeds ring records to :meth:`ShardCore.handle` with the gateway they
came from and the current monotonic time, then calls :meth:`ShardCore.flush`,
which returns the records to send back, per gateway. Replies are produced while
handling; live deliveries are collected during a batch and encoded at flush time
as ONE EVENTS frame per stream covering everything appended in the batch, sent
to every gateway that watches the stream (encode once, for all subscribers).

Subscriptions themselves live in the gateways: the shard only knows which
gateways watch a stream, resolves a subscription's start, and serves READs for
subscribers that fell behind. So a slow subscriber costs the shard nothing.

Nothing is created by a read: with auto-create on, a cache get/ttl/delete of a
cache that does not exist answers "missing", a subscription to a stream that does
not exist yet is remembered as a *watch* (bounded, removed when the subscriber
leaves) and the stream is created by its first publish; only writes (publish,
cache set), which the gateway has checked against the token's write permission,
create. A stream or cache deleted through the control plane is remembered as a
tombstone (the newest ``max_tombstones``; the node tells a restarted shard its
deletions again): writes to it are refused with NotFound until the control plane
defines it again.

Memory is charged to tenants as used (felix/shard/tenants.py): a tenant over its
quota trims its own data, a shard over its budget trims the biggest tenants.

Durable streams (felix/shard/durable.py) write each publish to their disk log before
it is visible in memory; a ``commit`` ack is held until the I/O driver reports an
fsync covering it (:meth:`ShardCore.sync_done`), and a READ below the in-memory hot
tail becomes a disk read job answered by :meth:`ShardCore.read_done`.

A publish whose records carry ``felix-msg-id`` headers is checked against its
stream's recent message ids (felix/shard/dedup.py): a duplicate is not stored again
and is acknowledged with the original record's offset; a durable stream reads the ids
of its log tail back when it is opened.

Nothing here reads the clock or does I/O, except the offset reservations, which
write one small file when a stream crosses its reserved block (felix/shard/offsets.py),
and the disk logs' appends, opens, deletes and the message-id rebuild's reads of a
log tail (the wall clock for record timestamps and message-id windows is passed in
as ``wall_us``).

In cluster mode (:meth:`ShardCore.join_cluster`, felix/shard/cluster.py) the core gets
its node's shard maps (:meth:`ShardCore.apply_ownership`): it stores writes (publishes,
cache sets, and every change of a queue group's state) only for the logical shards its
node serves, and drops the in-memory state (streams' replay rings and message ids, cache
entries, queue consumers) of those a map takes away, so a logical shard that comes back
to this node starts empty, as on any other node. Cache entries are fenced off at once
and their memory reclaimed by the sweep in bounded steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from felix import ipc, wire
from felix.cluster.ownership import cluster_clock, logical_shard
from felix.errors import (
    BadRequest,
    CursorError,
    DuplicatesInBatch,
    FelixError,
    NotFound,
    Overloaded,
    ServerError,
    Unavailable,
)
from felix.ipc import RecordType
from felix.names import validate_name
from felix.shard.cache import CachePartition, CacheSettings
from felix.shard.cluster import HeldAck, PinWaits, ShardOwnership
from felix.shard.dedup import DedupTable, msg_ids, rebuild
from felix.shard.disk_read import ReadJob, durable_start
from felix.shard.durable import DurableSettings, DurableStore, DurableStream
from felix.shard.fsyncer import Syncable
from felix.shard.offsets import OffsetReservations
from felix.shard.queue.manager import GroupHandle, QueueManager, StreamView
from felix.shard.queue.settings import MAX_GROUPS_PER_STREAM, GroupSettings
from felix.shard.resources import (
    SHARD_MAX_RESOURCES,
    auto_cache_spec,
    auto_stream_spec,
    cache_settings,
)
from felix.shard.stream_log import StreamLog, StreamSettings
from felix.shard.tenants import TenantQuota, TenantUsage, water_level

if TYPE_CHECKING:
    from felix.cluster.ownership import OwnershipMap

log = logging.getLogger("felix.shard")

#: Records per READ reply at most, whatever the gateway asks (bounds one ring record).
MAX_READ_RECORDS = 4096
#: Bytes per READ reply at most (a READ always returns at least one record).
MAX_READ_BYTES = 1024 * 1024
#: Streams and caches created on first use waiting to be reported to the node (for the
#: control plane) at most; more are counted in ``auto_reports_dropped``.
MAX_AUTO_REPORTS = 10_000

#: Cache entries of logical shards that moved away looked at per :meth:`ShardCore.sweep`
#: at most (cluster mode; about 3 ms of the shard's loop every 100 ms sweep).
RECLAIM_PER_SWEEP = 4096

#: One resource created on first use: kind ("stream" | "cache"), path, spec.
AutoCreated = tuple[str, tuple[str, ...], dict[str, object]]


# A publish whose ack waits for an fsync: _request sends nothing now.
_DEFERRED = b""


def _wall_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class ShardSettings:
    """What a shard needs to know about the node."""

    index: int
    shards: int
    stream_defaults: StreamSettings = field(default_factory=StreamSettings)
    cache_defaults: CacheSettings = field(default_factory=CacheSettings)
    #: Create streams and caches on their first write; when False a missing one is NotFound.
    auto_create: bool = True
    #: Most streams, caches and watches of streams not created yet this shard holds.
    max_resources: int = SHARD_MAX_RESOURCES
    #: Most streams this shard holds (the offset reservation table is sized from it).
    max_streams: int = 65_536
    #: Bytes this shard may hold in replay rings and caches (its share of the node's
    #: budget), charged as used. Beyond it the biggest tenants are trimmed.
    memory_budget: int = 1 << 62
    #: A tenant's quota on this shard when the control plane sets none (the node's
    #: per-tenant defaults divided by the shards).
    tenant_quota: TenantQuota = field(default_factory=lambda: TenantQuota(1 << 62, 10_000))
    #: Deleted streams and caches remembered (refusing writes), oldest forgotten first.
    max_tombstones: int = 10_000


class _Stream:
    __slots__ = (
        "cursors",
        "dedup",
        "defined",
        "disk",
        "key",
        "log",
        "pending_base",
        "pending_count",
        "tenant",
        "watchers",
    )

    def __init__(self, key: str, log: StreamLog, tenant: TenantUsage) -> None:
        self.key = key
        self.log = log
        self.tenant = tenant
        self.watchers: set[int] = set()
        # block policy: per gateway, the lowest offset one of its subscribers still needs.
        self.cursors: dict[int, int] = {}
        # Records appended in the current batch and not yet pushed.
        self.pending_base = 0
        self.pending_count = 0
        #: The disk log of a durable stream (None: in memory only).
        self.disk: DurableStream | None = None
        #: The message ids it stored recently (None: dedup_window_s is 0).
        self.dedup: DedupTable | None = None
        #: Defined by the control plane (not only created on first use): its settings
        #: must outlive its records (cluster mode: its logical shard moving away).
        self.defined = False

    @property
    def held_bytes(self) -> int:
        dedup = self.dedup
        return self.log.retained_bytes + (0 if dedup is None else dedup.nbytes)

    def trim_bytes(self, nbytes: int) -> int:
        """Replay records first (a durable stream keeps them on disk), then message ids."""
        before = self.log.retained_bytes
        self.log.trim(nbytes)
        freed = before - self.log.retained_bytes
        if freed < nbytes and self.dedup is not None:
            freed += self.dedup.trim(nbytes - freed)
        return freed


class ShardCore:
    """One shard's streams and caches, fed ring records and ``now``.

    ``offsets`` keeps stream offsets monotonic across restarts (None: start at 0,
    for tests). ``disk`` keeps durable streams (None: every stream is in memory);
    ``wall_us`` is the wall clock records are stamped with (microseconds; durable
    streams only). Errors in a request become ERROR replies with the request's id; a
    malformed record is logged and dropped. Nothing a gateway sends can raise out
    of :meth:`handle`.
    """

    def __init__(
        self,
        settings: ShardSettings,
        offsets: OffsetReservations | None = None,
        disk: DurableStore | None = None,
        wall_us: Callable[[], int] = _wall_us,
    ) -> None:
        self.settings = settings
        self._offsets = offsets
        #: Durable streams of this shard (None: the node keeps no data on disk).
        self.disk = disk
        self._wall_us = wall_us
        # Where the request being handled came from (for acks that wait for an fsync).
        self._gateway = 0
        self._token = 0
        self._aux = 0
        # The ``now`` of the last record handled (deliveries planned at flush use it).
        self._now = 0.0
        if offsets is not None:
            # Entries of streams not in memory may be folded into the floor when full.
            offsets.in_use = self._streams_contains
        self._streams: dict[str, _Stream] = {}
        self._caches: dict[tuple[str, str, str], CachePartition] = {}
        # Gateways watching streams that do not exist yet (subscribed before any publish).
        self._waiting: dict[str, set[int]] = {}
        self._tenants: dict[str, TenantUsage] = {}
        self._quotas: dict[str, TenantQuota] = {}
        self._tombstones: OrderedDict[object, None] = OrderedDict()
        # Queue groups defined by the control plane: stream key -> group -> settings.
        self._group_defs: dict[str, dict[str, GroupSettings]] = {}
        self._out: dict[int, list[bytes]] = {}
        self._dirty: list[_Stream] = []
        # Created on first use (or found on disk at start), not yet handed to the node.
        self._auto: list[AutoCreated] = []
        self._handlers: dict[int, Callable[[wire.ExtMessage, float], bytes]] = {
            wire.OP_CACHE_GET: self._cache_get,
            wire.OP_CACHE_SET: self._cache_set,
            wire.OP_CACHE_DELETE: self._cache_delete,
            wire.OP_CACHE_TTL: self._cache_ttl,
            wire.OP_PUBLISH: self._publish,
            wire.OP_CONSUME: self._consume,
            wire.OP_CONSUMER_WINDOW: self._consumer_window,
            wire.OP_ACK: self._settle,
            wire.OP_NAK: self._settle,
            wire.OP_RELEASE: self._settle,
            wire.OP_IN_PROGRESS: self._settle,
            wire.OP_TERM: self._settle,
            wire.OP_STOP_CONSUME: self._stop_consume,
            # A barrier: the answer comes after everything sent before it (gateway drain).
            wire.OP_PING: lambda msg, now: wire.encode_ok(msg.request_id),
        }
        self._memory = 0
        groups_root = None if disk is None else disk.settings.root.parent / "groups"
        #: Queue groups of this shard's durable streams (docs/queues.md).
        self.queues = QueueManager(
            settings.index,
            groups_root,
            self._stream_view,
            self._emit,
            wall_us,
            auto_create=settings.auto_create,
            keys=None if disk is None else disk.keys,
            encrypt=disk is not None and disk.settings.encrypt,
        )
        # Counters (exported as metrics by the worker).
        self.budget_trims = 0
        self.quota_trims = 0
        self.trimmed_bytes = 0
        self.blocked = 0
        self.requests = 0
        self.errors = 0
        self.malformed = 0
        self.published = 0
        self.pushes = 0
        #: Records not stored because their felix-msg-id was stored within the window.
        self.duplicates = 0
        # Streams whose dedup table holds ids (the sweep expires them).
        self._dedup_streams: dict[_Stream, None] = {}
        self.auto_reports_dropped = 0
        #: Cluster mode: the node's newest shard map as writes are checked against it
        #: (None: a standalone node; :meth:`join_cluster`).
        self.cluster: ShardOwnership | None = None
        #: Cluster mode: acks of durable records waiting for their logical shard's pin.
        self.pins = PinWaits()
        #: Cluster mode: in-memory streams and cache entries dropped because their
        #: logical shard moved to another node (cache entries as they are reclaimed).
        self.moved_streams = 0
        self.moved_cache_entries = 0
        #: Cluster mode: consumers ended because their stream's logical shard moved.
        self.moved_consumers = 0
        # Cache partitions with entries fenced off and not yet reclaimed (cluster mode).
        self._reclaiming: dict[tuple[str, str, str], CachePartition] = {}

    def _streams_contains(self, key: str) -> bool:
        return key in self._streams

    # -- feeding -------------------------------------------------------------------

    def handle(self, gateway: int, record: bytes | memoryview, now: float) -> None:
        """Process one ring record from ``gateway``."""
        try:
            kind, token, aux = ipc.decode_header(record)
            # No copy: every decoder below copies what it keeps, and the record is
            # handled completely before the ring slot is released.
            body = record[ipc.HEADER_SIZE :]
            self._now = now
            if kind == RecordType.REQUEST:
                self._request(gateway, token, body, now, aux)
            elif kind == RecordType.READ:
                self._read(gateway, token, body)
            elif kind == RecordType.WATCH:
                self._watch(gateway, body, bool(aux))
            elif kind == RecordType.HELLO:
                self.forget_gateway(gateway)
                self.queues.gateway_seen(gateway)
            elif kind == RecordType.LEAVE:
                self.queues.leave(gateway, token, now, graceful=bool(aux))
            elif kind == RecordType.RELAY_REPLY:
                self.queues.relay_reply(token, body, now)
            elif kind == RecordType.CURSOR:
                self._cursor(gateway, body, None if token == 1 else aux)
            else:
                raise BadRequest(f"unexpected ring record kind {kind}")
        except FelixError as exc:
            self.malformed += 1
            log.warning(
                "shard %d: dropped a bad record from gateway %d: %s",
                self.settings.index,
                gateway,
                exc,
            )

    def flush(self) -> dict[int, list[bytes]]:
        """Encode this batch's live deliveries and hand over every pending record."""
        self.queues.deliver(self._now)
        for stream in self._dirty:
            if stream.pending_count and stream.watchers:
                # Records appended in this batch may already have left a small replay
                # ring: push what is left; watchers see the gap and apply their policy.
                log_ = stream.log
                base = max(stream.pending_base, log_.earliest)
                if base >= log_.next_offset:
                    # Trimmed away already: still push the new tail (no records), so
                    # every subscriber READs, gets too_old and is told what it lost.
                    frame = wire.encode_events(log_.next_offset, [])
                else:
                    batch = log_.read(base, log_.next_offset - base, 1 << 62)
                    frame = wire.encode_events(
                        batch.first_offset, batch.payloads, headers=_headers_or_none(batch.headers)
                    )
                record = ipc.encode(RecordType.PUSH, 0, 0, ipc.encode_key(stream.key) + frame)
                for gateway in stream.watchers:
                    self._emit(gateway, record)
                self.pushes += 1
            stream.pending_count = 0
        self._dirty.clear()
        out, self._out = self._out, {}
        return out

    def forget_gateway(self, gateway: int) -> None:
        """A gateway restarted or left: drop its watches."""
        for stream in self._streams.values():
            stream.watchers.discard(gateway)
            stream.cursors.pop(gateway, None)
        for key in list(self._waiting):
            self._unwait(key, gateway)
        self.queues.forget_gateway(gateway, self._now)

    def sweep(self, now: float, max_work: int = 1000) -> int:
        """Reclaim expired cache entries, bounded work per cache; returns entries removed.
        In cluster mode also the entries of logical shards that moved away
        (:meth:`_drop_moved`), :data:`RECLAIM_PER_SWEEP` looked at per call at most."""
        self._now = now
        self.queues.tick(now)
        if self.pins:
            self._settle_pins()  # acks held for a pin fail once the lease lapses
        if self._dedup_streams:
            self._expire_ids(self._wall_us())
        removed = 0
        for scope, cache in self._caches.items():
            before = cache.used_bytes
            removed += cache.sweep(now, max_work)
            self._charge(self._tenants[scope[0]], cache.used_bytes - before)
        if self._reclaiming:
            self._reclaim(RECLAIM_PER_SWEEP)
        return removed

    def _reclaim(self, max_work: int) -> None:
        """Free up to ``max_work`` fenced cache entries (of logical shards that moved)."""
        work = 0
        for scope, cache in list(self._reclaiming.items()):
            if work >= max_work:
                break
            if self._caches.get(scope) is not cache:  # deleted or redefined: gone with it
                del self._reclaiming[scope]
                continue
            before = cache.used_bytes
            work += cache.reclaim(max_work - work)
            self._charge(self._tenants[scope[0]], cache.used_bytes - before)
            self.moved_cache_entries += cache.take_discarded()
            if not cache.reclaim_pending:
                del self._reclaiming[scope]
        if not self._reclaiming:
            log.info(
                "shard %d: cache entries of moved logical shards reclaimed (%d in all)",
                self.settings.index,
                self.moved_cache_entries,
            )

    # -- requests -----------------------------------------------------------------

    def _request(
        self, gateway: int, token: int, body: bytes | memoryview, now: float, aux: int = 0
    ) -> None:
        self.requests += 1
        frame = wire.decode_frame(body, extensions=True)
        try:
            msg = wire.decode_ext(frame)
        except FelixError as exc:
            prefix = wire.ext_request_id(frame)
            if prefix is None:
                raise
            reply = wire.encode_error(prefix[1], BadRequest.code, str(exc))
        else:
            self._gateway, self._token, self._aux = gateway, token, aux
            reply = self._dispatch(msg, now)
            if reply is _DEFERRED:
                return  # a commit ack: sent by sync_done once an fsync covers it
            if isinstance(msg, wire.Subscribe) and reply[wire.HEADER_SIZE] == wire.OP_SUBSCRIBED:
                # The gateway now has a subscriber here: send it this stream's live records,
                # and tell it the stream's slow-subscriber policy (in the record's aux).
                key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
                self._watch_key(gateway, key)
                stream = self._streams.get(key)
                settings = stream.log.settings if stream else self.settings.stream_defaults
                policy = settings.slow_subscriber_policy
                aux = ipc.SlowSubscriberPolicy.of(policy)
                self._emit(gateway, ipc.encode(RecordType.REPLY, token, aux, reply))
                return
        self._emit(gateway, ipc.encode(RecordType.REPLY, token, 0, reply))

    def _dispatch(self, msg: wire.ExtMessage, now: float) -> bytes:
        try:
            if isinstance(msg, wire.Subscribe):
                return self._subscribe(msg)
            handler = self._handlers.get(msg.opcode)
            if handler is None:
                raise BadRequest(f"opcode 0x{msg.opcode:02x} is not a shard request")
            return handler(msg, now)
        except CursorError as exc:
            return wire.encode_cursor_error(
                msg.request_id, exc.reason, exc.requested, exc.available
            )
        except ServerError as exc:
            self.errors += 1
            return wire.encode_error(msg.request_id, exc.code, str(exc))
        except FelixError as exc:
            self.errors += 1
            return wire.encode_error(msg.request_id, BadRequest.code, str(exc))
        except Exception:  # a bug must cost one request, never the shard
            self.errors += 1
            log.exception("shard %d: request 0x%02x failed", self.settings.index, msg.opcode)
            return wire.encode_error(msg.request_id, BadRequest.code, "internal error")

    # tenants, limits and tombstones

    def _usage(self, tenant: str) -> TenantUsage:
        usage = self._tenants.get(tenant)
        if usage is None:
            quota = self._quotas.get(tenant, self.settings.tenant_quota)
            usage = self._tenants[tenant] = TenantUsage(tenant, quota)
        return usage

    def _release(self, usage: TenantUsage, item: object) -> None:
        """``item`` (a stream key, cache scope or watch) left ``usage``'s tenant."""
        usage.holdings.pop(item, None)
        usage.resources -= 1
        if usage.resources <= 0 and not usage.memory:
            # Only tenants that hold something are tracked: the table stays bounded.
            self._tenants.pop(usage.name, None)

    def _admit(
        self, what: str, item: object, names: Sequence[str], *, force: bool = False
    ) -> TenantUsage:
        """Check that a new stream, cache or watch may be created; count it to its tenant.

        ``force``: defined by the control plane (neither auto-create nor tombstones apply).
        """
        label = "/".join(names)
        if not force:
            if item in self._tombstones:
                raise NotFound(
                    f"{what} {label} was deleted through the control plane; define it there again"
                )
            if not self.settings.auto_create:
                raise NotFound(f"{what} {label} does not exist")
        for kind, name in zip(("tenant", "namespace", what), names, strict=True):
            validate_name(kind, name)
        held = len(self._streams) + len(self._caches) + len(self._waiting)
        if held >= self.settings.max_resources:
            raise Overloaded(
                f"shard {self.settings.index} holds its maximum of "
                f"{self.settings.max_resources} streams, caches and watches"
            )
        if what == "stream" and len(self._streams) >= self.settings.max_streams:
            raise Overloaded(
                f"shard {self.settings.index} holds its maximum of {self.settings.max_streams} "
                "streams (--max-streams-per-shard)"
            )
        usage = self._usage(names[0])
        if usage.resources >= usage.quota.max_resources:
            raise Overloaded(
                f"tenant {names[0]} holds its quota of {usage.quota.max_resources} streams, "
                f"caches and watches on shard {self.settings.index}"
            )
        usage.resources += 1
        return usage

    def _charge(self, usage: TenantUsage, delta: int) -> None:
        usage.memory += delta
        self._memory += delta

    def _enforce(self, usage: TenantUsage) -> None:
        """After ``usage``'s tenant grew: bring it under its quota, then the shard under budget."""
        quota = usage.quota.memory_bytes
        if usage.memory > quota:
            # Its own data pays, with slack (a tenth of its quota) so this stays rare.
            self._trim(usage, usage.memory - quota + quota // 10)
            self.quota_trims += 1
        budget = self.settings.memory_budget
        if self._memory > budget:
            excess = self._memory - budget + budget // 10
            level = water_level((t.memory for t in self._tenants.values()), excess)
            for tenant in list(self._tenants.values()):
                if tenant.memory > level:
                    self._trim(tenant, tenant.memory - level)
            self.budget_trims += 1

    def _trim(self, usage: TenantUsage, nbytes: int) -> None:
        freed = usage.trim(nbytes)
        self._charge(usage, -freed)
        self.trimmed_bytes += freed

    def _bury(self, item: object) -> None:
        self._tombstones.pop(item, None)
        self._tombstones[item] = None
        while len(self._tombstones) > self.settings.max_tombstones:
            self._tombstones.popitem(last=False)

    # caches

    def _cache(self, msg: wire.CacheRequest, *, create: bool) -> CachePartition | None:
        """The cache ``msg`` names; created only for a write (``create``), else None if absent."""
        scope = (msg.tenant_id, msg.namespace, msg.cache)
        cache = self._caches.get(scope)
        if cache is None:
            if not create:
                if scope in self._tombstones or not self.settings.auto_create:
                    raise NotFound(f"cache {'/'.join(scope)} does not exist")
                for kind, name in zip(("tenant", "namespace", "cache"), scope, strict=True):
                    validate_name(kind, name)
                return None  # would be created by its first write: empty until then
            usage = self._admit("cache", scope, scope)
            cache = self._caches[scope] = CachePartition(self._partition_settings())
            usage.holdings[scope] = cache
            self._report_auto("cache", scope, auto_cache_spec(self.settings.cache_defaults))
        return cache

    def _partition_settings(self) -> CacheSettings:
        # A cache is spread over every shard by key: each holds its share of the budget.
        return self._capped(cache_settings({}, self.settings.cache_defaults, self.settings.shards))

    def _capped(self, settings: CacheSettings) -> CacheSettings:
        """A partition's budget never above the shard's (the data plane enforces it)."""
        if settings.budget_bytes <= self.settings.memory_budget:
            return settings
        return dataclasses.replace(settings, budget_bytes=self.settings.memory_budget)

    def _cache_get(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest)
        cache = self._cache(msg, create=False)
        if cache is None:
            return wire.encode_cache_value(msg.request_id, None)
        before = cache.used_bytes
        value = cache.get(msg.key, now)
        if cache.used_bytes != before:  # an expired entry was dropped
            self._charge(self._tenants[msg.tenant_id], cache.used_bytes - before)
        return wire.encode_cache_value(msg.request_id, value)

    def _cache_set(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest) and msg.value is not None
        cluster = self.cluster
        if cluster is not None:
            cluster.check(f"{msg.tenant_id}/{msg.namespace}/{msg.cache}/{msg.key}")
        ttl = msg.ttl_ms / 1000.0 if msg.ttl_ms else None
        cache = self._cache(msg, create=True)
        assert cache is not None
        before = cache.used_bytes
        stored = cache.set(
            msg.key,
            msg.value,
            now,
            ttl=ttl,
            nx=msg.mode == wire.SET_IF_ABSENT,
            xx=msg.mode == wire.SET_IF_PRESENT,
        )
        usage = self._tenants[msg.tenant_id]
        self._charge(usage, cache.used_bytes - before)
        self._enforce(usage)
        return wire.encode_cache_stored(msg.request_id, stored)

    def _cache_delete(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest)
        cache = self._cache(msg, create=False)
        if cache is None:
            return wire.encode_cache_deleted(msg.request_id, False)
        before = cache.used_bytes
        deleted = cache.delete(msg.key, now)
        self._charge(self._tenants[msg.tenant_id], cache.used_bytes - before)
        return wire.encode_cache_deleted(msg.request_id, deleted)

    def _cache_ttl(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest)
        cache = self._cache(msg, create=False)
        if cache is None:
            return wire.encode_cache_ttl_reply(msg.request_id, wire.TTL_MISSING)
        before = cache.used_bytes
        left = cache.ttl(msg.key, now)
        if cache.used_bytes != before:
            self._charge(self._tenants[msg.tenant_id], cache.used_bytes - before)
        if left is None:
            return wire.encode_cache_ttl_reply(msg.request_id, wire.TTL_MISSING)
        if math.isinf(left):
            return wire.encode_cache_ttl_reply(msg.request_id, wire.TTL_PERSISTENT)
        # Round up: a client never sees less time than the key really has.
        return wire.encode_cache_ttl_reply(
            msg.request_id, wire.TTL_EXPIRING, math.ceil(left * 1000.0)
        )

    # streams

    def _create_stream(
        self,
        key: str,
        *,
        force: bool = False,
        durable: DurableSettings | None = None,
        auto: bool = True,
    ) -> _Stream:
        """Create the stream ``key`` (a write, or a control-plane definition with ``force``).

        ``durable``: keep it on disk with these settings; otherwise it is durable when the
        node makes auto-created streams durable (``DiskSettings.auto``). ``auto``: not
        defined by the control plane (reported to it, :meth:`take_auto_created`).
        """
        names = tuple(key.split("/"))
        if len(names) != 3:
            raise BadRequest(f"bad stream key {key!r}")
        waiting = self._waiting.pop(key, None)
        if waiting is not None:
            # The watch becomes the stream: it stops counting as a resource of its own.
            self._tenants[names[0]].resources -= 1
        first = self._offsets.start_offset(key) if self._offsets is not None else 0
        store = self.disk
        if durable is None and store is not None and not force:
            durable = store.settings.auto  # --durable-streams: auto-created streams
        disk = None
        try:
            usage = self._admit("stream", key, names, force=force)
            if store is not None and durable is not None:
                try:
                    disk = store.open(key, durable, first)
                except FelixError:
                    self._release(usage, key)
                    raise
        except FelixError:
            if waiting is not None:
                self._waiting[key] = waiting
                self._tenants[names[0]].resources += 1
            raise
        if disk is not None and disk.damaged is None:
            # Offsets continue above everything on disk and everything reserved.
            first = max(first, disk.log.next_offset)
        settings = self.settings.stream_defaults
        stream = _Stream(key, StreamLog(settings, first_offset=first), usage)
        stream.disk = disk
        stream.defined = not auto
        self._streams[key] = stream
        usage.holdings[key] = stream
        self._tombstones.pop(key, None)
        if waiting is not None:
            stream.watchers = waiting
        self._configure_dedup(stream, settings)
        if auto:
            spec = auto_stream_spec(stream.log.settings, None if disk is None else disk.settings)
            self._report_auto("stream", names, spec)
        return stream

    # message ids (felix/shard/dedup.py)

    def _configure_dedup(self, stream: _Stream, settings: StreamSettings) -> None:
        """Apply ``settings``' dedup window to ``stream`` (at creation or a definition).

        A durable stream's table is rebuilt from its log tail whenever it is created
        or its bounds change: its log holds every record it stored, so the table comes
        back exactly (within the rebuild's bound). Charges the change to its tenant.
        """
        table = stream.dedup
        window, most = settings.dedup_window_s, settings.dedup_max_entries
        now_us = self._wall_us()
        if not window:
            if table is not None:
                self._charge(stream.tenant, table.clear())
                stream.dedup = None
                self._dedup_streams.pop(stream, None)
            return
        if table is not None and table.window_s == window and table.max_entries == most:
            return
        if table is None:
            table = stream.dedup = DedupTable(window, most)
        else:
            self._charge(stream.tenant, table.resize(window, most, now_us))
        disk = stream.disk
        if disk is not None:
            before = table.nbytes
            try:
                rebuild(table, disk, now_us)
            except (FelixError, OSError) as exc:
                log.error(
                    "shard %d: stream %s: message ids not rebuilt from its log (%s); "
                    "%d of them are remembered",
                    self.settings.index,
                    stream.key,
                    exc,
                    len(table),
                )
            self._charge(stream.tenant, table.nbytes - before)
        if len(table):
            self._dedup_streams[stream] = None
            self._enforce(stream.tenant)

    def _expire_ids(self, now_us: int) -> None:
        for stream in list(self._dedup_streams):
            table = stream.dedup
            if table is None:
                del self._dedup_streams[stream]
                continue
            delta = table.expire(now_us)
            if delta:
                self._charge(stream.tenant, delta)
            if not len(table):
                del self._dedup_streams[stream]

    def _remember(
        self, stream: _Stream, ids: Sequence[str | None], base: int, stamp_us: int
    ) -> None:
        """The records from ``base`` were stored: remember their ids."""
        table = stream.dedup
        assert table is not None
        delta = 0
        for i, msg_id in enumerate(ids):
            if msg_id is not None:
                delta += table.add(msg_id, base + i, stamp_us)
        if delta:
            self._dedup_streams[stream] = None
            self._charge(stream.tenant, delta)
            self._enforce(stream.tenant)

    def _ack_duplicates(
        self, stream: _Stream, msg: wire.Publish, first: int, lshard: int | None
    ) -> bytes:
        """Every record of ``msg`` was stored before, from ``first`` on: the ack the
        original publish got (for ``commit``, once an fsync covers the originals)."""
        count = len(msg.payloads)
        disk = stream.disk
        if disk is not None:
            store = self.disk
            assert store is not None
            if disk.damaged is not None:
                raise Unavailable(disk.damaged)
            if store.fatal is not None:
                raise Unavailable(
                    f"shard {self.settings.index} stopped acknowledging: {store.fatal}"
                )
        if msg.ack == wire.ACK_NONE:
            return wire.encode_ok(msg.request_id)
        if disk is None:
            return wire.encode_publish_offsets(msg.request_id, first, count)
        reply = wire.encode_publish_offsets(
            msg.request_id, first, count, durability=disk.settings.durability
        )
        # A retry must not be acked before the original could be (its pin, its fsync).
        return self._durable_ack(disk, first + count, msg.request_id, reply, lshard)

    def _report_auto(self, kind: str, names: tuple[str, ...], spec: dict[str, object]) -> None:
        if len(self._auto) >= MAX_AUTO_REPORTS:
            self.auto_reports_dropped += 1
            return
        self._auto.append((kind, names, spec))

    def take_auto_created(self) -> list[AutoCreated]:
        """Streams and caches created on first use (and durable streams found on disk at
        start) since the last call, with the settings they got, for the node to register
        in the control plane (felix/node/registrar.py)."""
        out, self._auto = self._auto, []
        return out

    def _publish(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.Publish)
        key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
        stream = self._streams.get(key)
        dead_letter = self._aux == ipc.AUX_DEAD_LETTER
        cluster = self.cluster
        lshard: int | None = None  # cluster mode: the logical shard (its pin, if durable)
        if cluster is not None:
            # Ownership, and the lease for a write that goes (or may go) to disk.
            if stream is not None:
                durable = stream.disk is not None
            else:
                store = self.disk
                durable = store is not None and (dead_letter or store.settings.auto is not None)
            lshard = cluster.check(key, durable)
        if dead_letter:
            stream = self._dead_letter_stream(key, stream)
        elif stream is None:
            stream = self._create_stream(key)
        if not msg.payloads:
            raise BadRequest("a publish needs at least one record")
        payloads, headers = msg.payloads, msg.headers
        # Message ids (felix/shard/dedup.py): only a batch with headers pays for them.
        # A dead-letter append copies the id of the record it carries: not a retry.
        ids: list[str | None] | None = None
        first: int | None = None  # the ack's first offset when duplicates are dropped
        stamp = 0
        if headers is not None and not dead_letter:
            ids = msg_ids(headers)
            if ids is not None and stream.dedup is not None:
                stamp = self._wall_us()
                plan = stream.dedup.plan(ids, stream.log.next_offset, stamp)
                if plan is not None:
                    # Without an ack no offsets are owed: the duplicates are just dropped.
                    if not plan.contiguous and msg.ack != wire.ACK_NONE:
                        raise DuplicatesInBatch(
                            f"stream {key}: {plan.duplicates} of the batch's {len(ids)} "
                            "records repeat a felix-msg-id stored before (or in the batch) "
                            "and their offsets are not one run with the others: nothing was "
                            "stored; publish them one by one"
                        )
                    self.duplicates += plan.duplicates
                    if not plan.keep:
                        return self._ack_duplicates(stream, msg, plan.first, lshard)
                    first = plan.first
                    payloads = [payloads[i] for i in plan.keep]
                    headers = [headers[i] for i in plan.keep]
                    ids = [ids[i] for i in plan.keep]
            else:
                ids = None  # nothing to remember
        if stream.disk is not None:
            return self._publish_durable(
                stream, stream.disk, msg, payloads, headers, ids, first, stamp, now, lshard
            )
        if stream.cursors and stream.log.settings.slow_subscriber_policy == "block":
            needed = min(stream.cursors.values())
            if stream.log.earliest_after(payloads, headers) > needed:
                self.blocked += 1
                raise Overloaded(
                    f"stream {stream.key} is full: a subscriber still needs offset {needed} "
                    "(block policy); retry"
                )
        if self._offsets is not None:
            self._offsets.ensure(stream.key, stream.log.next_offset + len(payloads))
        before = stream.log.retained_bytes
        base, count = stream.log.append(payloads, headers)
        self.published += count
        # _charge and the checks of _enforce, inline: this is the hottest path.
        usage = stream.tenant
        delta = stream.log.retained_bytes - before
        usage.memory += delta
        self._memory += delta
        if usage.memory > usage.quota.memory_bytes or self._memory > self.settings.memory_budget:
            self._enforce(usage)
        if ids is not None:
            self._remember(stream, ids, base, stamp)
        if stream.watchers:
            if not stream.pending_count:
                stream.pending_base = base
                self._dirty.append(stream)
            stream.pending_count += count
        if msg.ack == wire.ACK_NONE:
            return wire.encode_ok(msg.request_id)
        if first is not None:
            return wire.encode_publish_offsets(msg.request_id, first, len(msg.payloads))
        return wire.encode_publish_offsets(msg.request_id, base, count)

    def _dead_letter_stream(self, key: str, stream: _Stream | None) -> _Stream:
        """The stream a relayed dead-letter append goes to: durable, like the stream its
        records come from (created so if missing, whatever --durable-streams says)."""
        store = self.disk
        if store is None:
            raise Unavailable(f"dead-letter stream {key}: this shard keeps no data on disk")
        if stream is None:
            return self._create_stream(
                key, force=True, durable=store.settings.auto or DurableSettings()
            )
        if stream.disk is None:
            raise BadRequest(
                f"dead-letter stream {key} is held in memory only: dead letters of a durable "
                "stream need a durable stream (define it durable)"
            )
        return stream

    def _publish_durable(
        self,
        stream: _Stream,
        disk: DurableStream,
        msg: wire.Publish,
        payloads: list[bytes],
        headers: list[dict[str, str] | None] | None,
        ids: list[str | None] | None,
        first: int | None,
        stamp: int,
        now: float,
        lshard: int | None = None,
    ) -> bytes:
        """Disk first (one write), then the hot tail in memory; the ack per fsync policy
        (and, in cluster mode, once logical shard ``lshard`` is pinned here: PinWaits).

        ``payloads``/``headers`` are what is stored (``msg``'s, less the duplicates);
        ``first``: the offset the ack starts at when duplicates were dropped (they
        precede the stored records); ``ids``: the stored records' message ids to
        remember, stamped ``stamp``. The block policy does not apply: a subscriber
        that falls behind reads from disk.
        """
        store = self.disk
        assert store is not None
        log_ = stream.log
        nbytes = log_.validate(payloads, headers)
        store.check_room(disk, nbytes, stream.tenant.quota.disk_bytes)
        if stream.key in self.queues.streams_with_groups:
            self._check_group_room(stream.key, disk, nbytes)
        base = log_.next_offset
        count = len(payloads)
        if self._offsets is not None:
            self._offsets.ensure(stream.key, base + count)
        # The ids' stamp is the records' timestamp: a rebuild from the log finds the same.
        timestamp = stamp if ids is not None else self._wall_us()
        store.append(disk, base, payloads, headers, timestamp, now)
        before = log_.retained_bytes
        log_.append(payloads, headers)
        self.published += count
        usage = stream.tenant
        delta = log_.retained_bytes - before
        usage.memory += delta
        self._memory += delta
        if usage.memory > usage.quota.memory_bytes or self._memory > self.settings.memory_budget:
            self._enforce(usage)  # trims only the hot tail: the records stay on disk
        if ids is not None:
            self._remember(stream, ids, base, timestamp)
        if stream.watchers:
            if not stream.pending_count:
                stream.pending_base = base
                self._dirty.append(stream)
            stream.pending_count += count
        if stream.key in self.queues.streams_with_groups and disk.settings.fsync != "commit":
            self.queues.stream_written(stream.key)  # commit: once synced (sync_done)
        if msg.ack == wire.ACK_NONE:
            cluster = self.cluster
            if cluster is not None and lshard is not None and not cluster.pinned(lshard):
                self.pins.want(lshard)  # no ack to hold, but the pin all the same
            return wire.encode_ok(msg.request_id)
        reply = wire.encode_publish_offsets(
            msg.request_id,
            base if first is None else first,
            len(msg.payloads),
            durability=disk.settings.durability,
        )
        if lshard is not None:  # cluster mode: the pin first (_durable_ack)
            return self._durable_ack(disk, base + count, msg.request_id, reply, lshard)
        if disk.settings.fsync == "commit" and disk.synced < base + count:
            store.wait_sync(disk, base + count, self._gateway, self._token, msg.request_id, reply)
            return _DEFERRED
        return reply

    def _durable_ack(
        self, disk: DurableStream, end: int, request_id: int, reply: bytes, lshard: int | None
    ) -> bytes:
        """``reply``, the ack of durable records below offset ``end``, or _DEFERRED: it
        waits for logical shard ``lshard``'s pin (cluster mode: PinWaits), then for an
        fsync covering them (``commit``)."""
        cluster = self.cluster
        if cluster is not None and lshard is not None and not cluster.pinned(lshard):
            self.pins.hold(
                lshard, HeldAck(disk, end, self._gateway, self._token, request_id, reply)
            )
            return _DEFERRED
        return self._after_sync(disk, end, self._gateway, self._token, request_id, reply)

    def _after_sync(
        self, disk: DurableStream, end: int, gateway: int, token: int, request_id: int, reply: bytes
    ) -> bytes:
        """``reply`` now, or _DEFERRED until an fsync covers offsets below ``end``."""
        if disk.settings.fsync == "commit" and disk.synced < end:
            assert self.disk is not None
            self.disk.wait_sync(disk, end, gateway, token, request_id, reply)
            return _DEFERRED
        return reply

    # queue groups (felix/shard/queue/manager.py)

    def _check_group_room(self, key: str, disk: DurableStream, nbytes: int) -> None:
        """Retention never deletes a record a queue group still needs: a stream over its
        byte retention because of a lagging group refuses publishes instead, and so does
        a stream whose age retention a group holds up by twice the age (found by the
        disk sweep: :meth:`_find_held_retention`), so a forgotten group cannot fill the
        disk that every tenant shares."""
        held = self.queues.holding.get(key)
        if held is not None:
            self.queues.refused += 1
            age = disk.settings.retention_age_s
            raise Overloaded(
                f"stream {key}: a queue group still needs its records from offset {held}, "
                f"older than twice its retention age of {age:g} s: publishes are refused "
                "until the groups catch up (pending records are never deleted; remove an "
                "unused group with felix group rm)"
            )
        cap = disk.settings.retention_bytes
        store = self.disk
        if cap is None or store is None:
            return
        # Retention keeps the active segment and rolls whole segments: slack of two.
        limit = cap + 2 * store.settings.segment_bytes
        if disk.log.size_bytes + nbytes <= limit:
            return
        floor = self.queues.min_floor(key)
        if floor is not None and floor < disk.log.next_offset:
            self.queues.refused += 1
            raise Overloaded(
                f"stream {key} is over its retention of {cap} bytes and a queue group still "
                f"needs its records from offset {floor}: publishes are refused until the "
                "groups catch up (pending records are never deleted)"
            )

    def _stream_view(self, key: str) -> StreamView | None:
        stream = self._streams.get(key)
        if stream is None or stream.disk is None:
            return None
        return StreamView(key, stream.log, stream.disk)

    def _group_settings(self, key: str, group: str) -> GroupSettings | None:
        return self._group_defs.get(key, {}).get(group)

    def _consume(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.Consume)
        validate_name("group", msg.group)
        key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
        if self.cluster is not None:
            # Before anything is created: a join hands out deliveries, and opening the
            # group (or the stream) writes its state.
            self.cluster.check(key, True)
        store = self.disk
        if key not in self._streams and store is not None and store.settings.auto is not None:
            # A consumer may come before the first publish: the stream is created durable
            # like a publish would create it (--durable-streams).
            self._create_stream(key)
        stream = self._streams.get(key)
        if stream is not None and stream.disk is None:
            raise BadRequest(
                f"stream {key} is held in memory only: queue groups run over durable "
                "streams (define it durable, or run the node with --durable-streams)"
            )
        settings = self._group_settings(key, msg.group)
        return self.queues.consume(self._gateway, self._token, msg, settings)

    def _consumer_window(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.ConsumerWindow)
        return self.queues.window(self._gateway, self._aux, msg)

    def _settle(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.Settle)
        reply = self.queues.settle(self._gateway, self._aux, self._token, msg, now)
        return _DEFERRED if reply is None else reply

    def _stop_consume(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.ConsumerOp)
        return self.queues.stop(self._gateway, self._aux, msg, now)

    def shutdown(self, now: float) -> None:
        """A graceful stop (nothing is handled after it): queue groups release their
        leases (no failure counted), and the offset reservations are written down to
        where each stream stopped, so the next run continues without a gap."""
        self.queues.shutdown(now)
        if self._offsets is not None:
            ends = {key: stream.log.next_offset for key, stream in self._streams.items()}
            try:
                self._offsets.settle(ends)
            except FelixError as exc:  # the old marks stay: safe, with the usual gap
                log.warning("shard %d: offsets not settled at stop: %s", self.settings.index, exc)

    @property
    def memory_used(self) -> int:
        """Accounted bytes in replay rings and caches (charged as used)."""
        return self._memory

    def tenant_memory(self, tenant: str) -> int:
        """Accounted bytes ``tenant`` holds on this shard."""
        usage = self._tenants.get(tenant)
        return 0 if usage is None else usage.memory

    def _subscribe(self, msg: wire.Subscribe) -> bytes:
        key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
        stream = self._streams.get(key)
        at = msg.start
        if stream is not None:
            if stream.disk is not None:
                start = durable_start(stream.disk, stream.log, at)
            elif isinstance(at, wire.StartAtTime):
                raise BadRequest(
                    f"stream {key} is held in memory only: its records carry no timestamps, "
                    "so a subscription cannot start at a time (define it durable)"
                )
            else:
                start = stream.log.resolve_start(at)
        else:
            # Not created yet: a read creates nothing. Start where its first record will
            # be, and remember the watch (the caller adds the gateway right away).
            first = self._offsets.start_offset(key) if self._offsets is not None else 0
            start = StreamLog(self.settings.stream_defaults, first_offset=first).resolve_start(
                "earliest" if isinstance(at, wire.StartAtTime) else at
            )
            if key not in self._waiting:
                self._admit("stream", key, (msg.tenant_id, msg.namespace, msg.stream))
                self._waiting[key] = set()
        return wire.encode_subscribed(msg.request_id, msg.subscription_id, start)

    def _read(self, gateway: int, token: int, body: bytes | memoryview) -> None:
        key, from_offset, max_records, max_bytes = ipc.decode_read(body)
        stream = self._streams.get(key)
        if stream is None:
            # Not (or no longer) here, e.g. after a restart: nothing to read yet.
            frame = wire.encode_events(from_offset, [])
            tail = from_offset
        else:
            log_ = stream.log
            tail = log_.next_offset
            disk = stream.disk
            if disk is not None and from_offset < log_.earliest:
                # Below the hot tail: from disk, in a reader thread (read_done answers).
                if disk.damaged is not None:
                    frame = wire.encode_error(0, Unavailable.code, disk.damaged)
                elif from_offset < min(disk.low(), log_.earliest):
                    low = min(disk.low(), log_.earliest)
                    frame = wire.encode_cursor_error(0, "too_old", from_offset, low)
                else:
                    assert self.disk is not None
                    self.disk.read(
                        disk,
                        gateway,
                        token,
                        from_offset,
                        min(max_records, MAX_READ_RECORDS) or 1,
                        min(max_bytes, MAX_READ_BYTES) or 1,
                    )
                    return
            elif from_offset < log_.earliest:
                frame = wire.encode_cursor_error(0, "too_old", from_offset, log_.earliest)
            elif from_offset > tail:
                frame = wire.encode_cursor_error(0, "in_future", from_offset, tail)
            else:
                batch = log_.read(
                    from_offset,
                    min(max_records, MAX_READ_RECORDS) or 1,
                    min(max_bytes, MAX_READ_BYTES) or 1,
                )
                frame = wire.encode_events(
                    batch.first_offset, batch.payloads, headers=_headers_or_none(batch.headers)
                )
        self._emit(gateway, ipc.encode(RecordType.READ_REPLY, token, tail, frame))

    def _cursor(self, gateway: int, body: bytes | memoryview, offset: int | None) -> None:
        key, _ = ipc.decode_key(body)
        stream = self._streams.get(key)
        if stream is None:
            return
        if offset is None:
            stream.cursors.pop(gateway, None)
        else:
            stream.cursors[gateway] = offset

    def _watch(self, gateway: int, body: bytes | memoryview, on: bool) -> None:
        key, _ = ipc.decode_key(body)
        if on:
            self._watch_key(gateway, key)
        else:
            stream = self._streams.get(key)
            if stream is not None:
                stream.watchers.discard(gateway)
            self._unwait(key, gateway)

    def _watch_key(self, gateway: int, key: str) -> None:
        stream = self._streams.get(key)
        if stream is not None:
            stream.watchers.add(gateway)
            return
        waiting = self._waiting.get(key)
        if waiting is None:
            try:
                names = tuple(key.split("/"))
                if len(names) != 3:
                    raise BadRequest(f"bad stream key {key!r}")
                self._admit("stream", key, names)
            except FelixError as exc:
                log.warning("shard %d: cannot watch %s: %s", self.settings.index, key, exc)
                return
            waiting = self._waiting[key] = set()
        waiting.add(gateway)

    def _unwait(self, key: str, gateway: int) -> None:
        waiting = self._waiting.get(key)
        if waiting is None:
            return
        waiting.discard(gateway)
        if not waiting:
            del self._waiting[key]
            usage = self._tenants.get(key.split("/", 1)[0])
            if usage is not None:
                self._release(usage, ("watch", key))

    def _emit(self, gateway: int, record: bytes) -> None:
        out = self._out.get(gateway)
        if out is None:
            self._out[gateway] = [record]
        else:
            out.append(record)

    # -- resources defined by the control plane ------------------------------------------

    def define_tenant(self, tenant: str, quota: TenantQuota | None) -> None:
        """Set ``tenant``'s quota on this shard (None: back to the node's defaults).

        A lower memory quota takes effect at once (the tenant's own data is trimmed).
        """
        if quota is None:
            self._quotas.pop(tenant, None)
        else:
            self._quotas[tenant] = quota
        usage = self._tenants.get(tenant)
        if usage is not None:
            usage.quota = quota or self.settings.tenant_quota
            self._enforce(usage)

    def define_stream(
        self, key: str, settings: StreamSettings, durable: DurableSettings | None = None
    ) -> None:
        """Create the stream with ``settings``, or apply them to the existing stream.

        ``durable``: keep it on disk with these settings. An in-memory stream defined
        durable writes to disk from its next record on; a durable stream stays durable
        (its files are only deleted with the stream).
        """
        stream = self._streams.get(key)
        if durable is not None and self.disk is None:
            raise Unavailable(f"stream {key} is durable but this shard keeps no data on disk")
        if stream is None:
            stream = self._create_stream(key, force=True, durable=durable, auto=False)
        elif stream.log.settings == settings and (
            durable == (None if stream.disk is None else stream.disk.settings)
        ):
            # Defined with what it has (e.g. an auto-created stream coming back from the
            # control plane once registered): nothing to do.
            stream.defined = True
            return
        elif durable is not None and self.disk is not None:
            if stream.disk is None:
                stream.disk = self.disk.open(key, durable, stream.log.next_offset)
            else:
                self.disk.reconfigure(stream.disk, durable)
        elif stream.disk is not None:
            log.warning(
                "shard %d: stream %s is defined in memory but has a log on disk: it stays "
                "durable (delete and create it to drop its records)",
                self.settings.index,
                key,
            )
        stream.defined = True
        before = stream.log.retained_bytes
        stream.log.reconfigure(settings)
        self._charge(stream.tenant, stream.log.retained_bytes - before)
        self._configure_dedup(stream, settings)

    def delete_stream(self, key: str) -> bool:
        """Remove the stream; every gateway watching it is told to end its subscriptions.

        Until the control plane defines it again (or the tombstone is forgotten), a
        publish to it is refused with NotFound instead of creating it again.
        """
        self._bury(key)
        stream = self._streams.pop(key, None)
        waiting = self._waiting.pop(key, None)
        watchers = stream.watchers if stream is not None else waiting or set()
        record = ipc.encode(RecordType.END, 0, 0, ipc.encode_key(key))
        for gateway in watchers:
            self._emit(gateway, record)
        if stream is None:
            usage = self._tenants.get(key.split("/", 1)[0])
            if waiting is not None and usage is not None:
                self._release(usage, ("watch", key))
            return False
        self._charge(stream.tenant, -stream.held_bytes)
        self._dedup_streams.pop(stream, None)
        self._release(stream.tenant, key)
        self.queues.remove(key)
        if stream.disk is not None and self.disk is not None:
            for _end, gateway, token, request_id, _reply in self.disk.remove(key):
                error = wire.encode_error(
                    request_id, NotFound.code, f"stream {key} was deleted before an fsync"
                )
                self._emit(gateway, ipc.encode(RecordType.REPLY, token, 0, error))
            if self.pins:
                for ack in self.pins.drop(stream.disk):
                    error = wire.encode_error(
                        ack.request_id,
                        NotFound.code,
                        f"stream {key} was deleted before its logical shard was pinned here",
                    )
                    self._emit(ack.gateway, ipc.encode(RecordType.REPLY, ack.token, 0, error))
        if self._offsets is not None:
            # Keep a re-created stream's offsets above everything this one issued.
            self._offsets.remove(key, stream.log.next_offset)
        return True

    def define_cache(self, scope: tuple[str, str, str], settings: CacheSettings) -> None:
        """Create the cache partition with ``settings`` (its share), or replace its limits.

        Changing the limits of an existing partition starts it afresh (cached data is
        disposable; the budget must never be exceeded).
        """
        settings = self._capped(settings)
        current = self._caches.get(scope)
        if current is not None and current.settings == settings:
            # Defined with what it has (e.g. an auto-created cache coming back from the
            # control plane once registered): its entries stay.
            self._tombstones.pop(scope, None)
            return
        old = self._caches.pop(scope, None)
        if old is None:
            usage = self._admit("cache", scope, scope, force=True)
        else:
            usage = self._tenants[scope[0]]
            self._charge(usage, -old.used_bytes)
        cache = self._caches[scope] = CachePartition(settings)
        usage.holdings[scope] = cache
        self._tombstones.pop(scope, None)

    def delete_cache(self, scope: tuple[str, str, str]) -> bool:
        self._bury(scope)
        cache = self._caches.pop(scope, None)
        if cache is None:
            return False
        usage = self._tenants[scope[0]]
        self._charge(usage, -cache.used_bytes)
        self._release(usage, scope)
        return True

    # -- cluster mode (felix/shard/cluster.py) ---------------------------------------------

    def join_cluster(self, clock: Callable[[], float] = cluster_clock) -> None:
        """Cluster mode: from now on a write is stored only for a logical shard the
        newest map (:meth:`apply_ownership`) serves here; none before the first map;
        a publish to a durable stream only while ``clock() < serve_until`` (``clock``:
        the supervisor's, which ``serve_until`` is on)."""
        if self.cluster is None:
            self.cluster = ShardOwnership(clock)
            # Queue groups: requests refused, and state files written only, while the
            # newest map serves their stream's logical shard and the lease is valid.
            self.queues.check = self.cluster.check
            self.queues.may_write = self.cluster.may_write

    def apply_ownership(self, new: OwnershipMap) -> set[int] | None:
        """Take the node's newest shard map; drop the in-memory state of the logical
        shards it takes away from this node (:meth:`ShardOwnership.apply`). Returns
        them (None: ``new`` is not newer than the map held)."""
        self.join_cluster()
        assert self.cluster is not None
        lost = self.cluster.apply(new)
        if lost is None:
            return None
        if lost:
            self._drop_moved(lost, new.logical_shards)
        # Groups that waited for their shard (or the lease) deliver and write again if
        # this map allows it (else they wait for the next one).
        self.queues.resume()
        self._settle_pins()
        return lost

    def _settle_pins(self) -> None:
        """Send the held acks whose logical shard the newest map pins here; fail those
        whose shard left this node, or all of them once this node's lease lapsed."""
        cluster = self.cluster
        if cluster is None or not self.pins:
            return
        release, fail = self.pins.settle(cluster)
        for ack in release:
            reply = self._after_sync(*ack)
            if reply is not _DEFERRED:
                self._emit(ack.gateway, ipc.encode(RecordType.REPLY, ack.token, 0, reply))
        for why, ack in fail:
            frame = wire.encode_error(ack.request_id, Unavailable.code, why)
            self._emit(ack.gateway, ipc.encode(RecordType.REPLY, ack.token, 0, frame))

    def _drop_moved(self, lost: set[int], count: int) -> None:
        """Forget what this shard holds in memory of logical shards ``lost`` (of
        ``count``): it must not be served again if one comes back. In-memory streams
        go as if deleted but without a tombstone (one the control plane defined keeps
        its definition, empty), their watchers are told (END, "moved"); offsets never
        go back: a stream created again continues above what it issued here.

        Cache entries are fenced off at once, in O(caches) (:meth:`CachePartition.fence`:
        no request finds one again, and a later map giving the shard back does not bring
        them back) and reclaimed by :meth:`sweep` in bounded steps.

        Durable streams stay: their records are on disk and their logical shard is only
        ever placed with them. So do their queue groups' persisted states (the files and
        what they hold in memory); their consumers are ended (CONSUMER_END Unavailable,
        "moved") and leave gracefully, their leases released without a failure
        (:meth:`QueueManager.end_moved`); nothing of them is written, delivered or timed
        until a map serves the shard here again."""
        gone_shards = frozenset(lost)  # the fences below keep it: a copy

        def moved(key: str) -> bool:
            return logical_shard(key, count) in gone_shards

        streams = [s for k, s in self._streams.items() if s.disk is None and moved(k)]
        for stream in streams:
            self._forget_stream(stream)
        for key in [k for k in self._waiting if moved(k)]:
            self._end_watchers(key, self._waiting.pop(key))
            usage = self._tenants.get(key.split("/", 1)[0])
            if usage is not None:
                self._release(usage, ("watch", key))
        fenced = 0
        for scope, cache in self._caches.items():
            if not len(cache):
                continue
            # The routing key of an entry is tenant/ns/cache/key: crc32 continues over it.
            seed = zlib.crc32(("/".join(scope) + "/").encode())

            def gone(key: str, seed: int = seed) -> bool:
                return zlib.crc32(key.encode(), seed) % count in gone_shards

            cache.fence(gone)
            self._reclaiming[scope] = cache
            fenced += 1
        consumers = self.queues.end_moved(moved, self._now)
        self.moved_streams += len(streams)
        self.moved_consumers += consumers
        log.info(
            "shard %d: %d logical shard(s) moved to other nodes: dropped %d in-memory "
            "stream(s), ended %d consumer(s); the cache entries of %d cache(s) are "
            "reclaimed by the sweep",
            self.settings.index,
            len(lost),
            len(streams),
            consumers,
            fenced,
        )

    def _end_watchers(self, key: str, watchers: set[int]) -> None:
        record = ipc.encode(RecordType.END, 0, ipc.END_MOVED, ipc.encode_key(key))
        for gateway in watchers:
            self._emit(gateway, record)

    def _forget_stream(self, stream: _Stream) -> None:
        """Drop an in-memory stream's records and message ids (its logical shard moved)."""
        self._end_watchers(stream.key, stream.watchers)
        stream.watchers = set()
        stream.cursors.clear()
        stream.pending_count = 0
        self._dedup_streams.pop(stream, None)
        log_ = stream.log
        if stream.defined:
            # Its definition stays (the control plane sends it once): empty, and
            # continuing at the next offset.
            before = stream.held_bytes
            stream.log = StreamLog(log_.settings, first_offset=log_.next_offset)
            if stream.dedup is not None:
                stream.dedup.clear()
            self._charge(stream.tenant, stream.held_bytes - before)
            return
        del self._streams[stream.key]
        self._charge(stream.tenant, -stream.held_bytes)
        self._release(stream.tenant, stream.key)
        if self._offsets is not None:
            self._offsets.release(stream.key, log_.next_offset)

    # -- queue groups defined by the control plane ----------------------------------------

    def define_group(self, key: str, group: str, settings: GroupSettings) -> None:
        """Define (or reconfigure) queue group ``group`` on stream ``key`` (docs/queues.md)."""
        validate_name("group", group)
        defs = self._group_defs.setdefault(key, {})
        if group not in defs and len(defs) >= MAX_GROUPS_PER_STREAM:
            raise Overloaded(f"stream {key} holds its maximum of {MAX_GROUPS_PER_STREAM} groups")
        defs[group] = settings
        self.queues.define(key, group, settings)

    def delete_group(self, key: str, group: str) -> bool:
        """Remove queue group ``group`` of stream ``key``; False if it was not defined."""
        defs = self._group_defs.get(key)
        defined = defs is not None and defs.pop(group, None) is not None
        if defs is not None and not defs:
            del self._group_defs[key]
        opened = (key, group) in self.queues.groups  # also one a consumer opened
        self.queues.remove(key, group)
        return defined or opened

    # -- durable streams: startup and the I/O driver's reports ------------------------

    def open_durable(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Open every durable stream this shard owns on disk (at start); returns how many.

        Streams come back with the node's settings for durable streams until the control
        plane defines them again. A damaged log refuses its stream, not the shard.
        ``progress(done, total)`` is called before each stream (recovery scans the
        newest segment of each: a start with many streams takes a while).
        """
        store = self.disk
        if store is None:
            return 0
        opened = 0
        keys = store.discover()
        for done, key in enumerate(keys):
            if progress is not None:
                progress(done, len(keys))
            if key in self._streams:
                continue
            try:
                self._create_stream(
                    key, force=True, durable=store.settings.auto or DurableSettings()
                )
            except FelixError as exc:
                log.error(
                    "shard %d: cannot open durable stream %s: %s", self.settings.index, key, exc
                )
                continue
            opened += 1
        self.queues.open_all(self._group_settings)
        return opened

    def sync_done(self, disk: Syncable, synced_offset: int, seconds: float) -> None:
        """An fsync of ``disk`` (a stream's log, or a queue group's state file) covered
        offsets (entries) below ``synced_offset``: send the acks it frees."""
        assert self.disk is not None
        if isinstance(disk, GroupHandle):
            for gateway, token, reply in self.queues.synced(disk, synced_offset):
                self._emit(gateway, ipc.encode(RecordType.REPLY, token, 0, reply))
            return
        assert isinstance(disk, DurableStream)
        for _end, gateway, token, _rid, reply in self.disk.synced(disk, synced_offset, seconds):
            self._emit(gateway, ipc.encode(RecordType.REPLY, token, 0, reply))
        if disk.key in self.queues.streams_with_groups:
            self.queues.stream_written(disk.key)  # commit: groups hand out synced records

    def sync_failed(self, disk: Syncable, exc: BaseException) -> None:
        """An fsync failed: no ack is sent any more (:attr:`fatal`; the worker exits)."""
        assert self.disk is not None
        if isinstance(disk, GroupHandle):
            self.queues.sync_failed(disk, exc)
        else:
            assert isinstance(disk, DurableStream)
            self.disk.sync_failed(disk, exc)
        if self.fatal is not None:
            log.critical("shard %d: %s; no further acks", self.settings.index, self.fatal)

    def take_syncs(self) -> list[Syncable]:
        """What the fsync thread should sync next: stream logs and group state files."""
        assert self.disk is not None
        syncs: list[Syncable] = list(self.disk.take_syncs())
        syncs.extend(self.queues.take_syncs())
        return syncs

    @property
    def fatal(self) -> str | None:
        """Why this shard must stop (an fsync failed), or None."""
        if self.queues.fatal is not None:
            return self.queues.fatal
        return None if self.disk is None else self.disk.fatal

    def read_done(self, job: ReadJob) -> None:
        """A disk read finished (in a reader thread): answer the gateway's READ."""
        stream = self._streams.get(job.key)
        if stream is None or stream.disk is not job.disk:
            # Deleted (or re-created) meanwhile: nothing to read here.
            frame = wire.encode_events(job.from_offset, [])
            tail = job.from_offset
        else:
            frame = job.reply(stream.log, self.settings.index)
            tail = stream.log.next_offset
        self._emit(job.gateway, ipc.encode(RecordType.READ_REPLY, job.token, tail, frame))

    def disk_sweep(self) -> int:
        """Housekeeping of durable streams (about once a second, by the I/O driver):
        measure free disk space for the reserve, apply retention; returns bytes freed."""
        if self.disk is None:
            return 0
        if self.disk.keys is not None:
            self.disk.keys.refresh()  # a tenant key rotated by `felix keys`: reread
        self.disk.refresh_free()
        now_us = self._wall_us()
        self._find_held_retention(now_us)
        return self.disk.enforce_retention(now_us, self.queues.min_floor)

    def _find_held_retention(self, now_us: int) -> None:
        """Streams whose age retention a queue group holds up by over twice the age
        (their oldest pending record is that old): publishes to them are refused."""
        holding = self.queues.holding
        holding.clear()
        for key in self.queues.streams_with_groups:
            stream = self._streams.get(key)
            disk = None if stream is None else stream.disk
            if disk is None or disk.damaged is not None or not disk.settings.retention_age_s:
                continue
            floor = self.queues.min_floor(key)
            if floor is None or floor >= disk.written:
                continue
            try:
                records = disk.log.read(floor, 1, 1)
            except FelixError:
                continue
            limit_us = 2 * disk.settings.retention_age_s * 1_000_000
            if records and now_us - records[0].timestamp_us > limit_us:
                holding[key] = floor

    def stream_status(self, key: str) -> dict[str, object] | None:
        """The node status route's JSON for stream ``key`` (None: not held here)."""
        stream = self._streams.get(key)
        if stream is None:
            return None
        log_ = stream.log
        memory: dict[str, object] = {
            "earliest": log_.earliest,
            "next_offset": log_.next_offset,
            "retained_records": log_.retained_records,
            "retained_bytes": log_.retained_bytes,
        }
        # Gateways with a subscriber of the stream (each may hold many).
        watching = len(stream.watchers)
        dedup: dict[str, object] = {"window_s": 0, "entries": 0}
        if stream.dedup is not None:
            dedup = stream.dedup.status()
        if stream.disk is None or self.disk is None:
            return {
                "durable": False,
                "fsync": "none",
                "memory": memory,
                "gateways_watching": watching,
                "dedup": dedup,
            }
        status = self.disk.status(key) or {}
        status["memory"] = memory
        status["gateways_watching"] = watching
        status["dedup"] = dedup
        live = self.queues.status(key)
        groups: dict[str, dict[str, object]] = {}
        for name in sorted(set(live) | set(self._group_defs.get(key, {}))):
            entry: dict[str, object] = {"open": name in live}
            settings = self._group_defs.get(key, {}).get(name)
            if settings is not None:
                entry["settings"] = settings.to_spec()
            entry.update(live.get(name, {}))
            floor = entry.get("floor")
            if isinstance(floor, int):
                # Records not finished by the group: in its window (pending) or not yet
                # handed out, up to the stream's end.
                entry["lag"] = max(0, log_.next_offset - floor)
                entry["pending"] = sum(
                    int(entry.get(k, 0))  # type: ignore[call-overload]
                    for k in ("leased", "available", "dying")
                )
            groups[name] = entry
        status["groups"] = groups
        return status

    def cache_status(self, scope: tuple[str, str, str]) -> dict[str, int] | None:
        """This shard's partition of cache ``scope`` as the node's cache route sums it
        (None: no partition here)."""
        cache = self._caches.get(scope)
        return None if cache is None else dataclasses.asdict(cache.stats())

    # -- introspection (metrics, tests) ----------------------------------------------

    @property
    def streams(self) -> int:
        return len(self._streams)

    @property
    def caches(self) -> int:
        return len(self._caches)

    def resources_held(self) -> int:
        """Streams, caches and watches of streams not created yet."""
        return len(self._streams) + len(self._caches) + len(self._waiting)

    def stream_log(self, key: str) -> StreamLog | None:
        stream = self._streams.get(key)
        return None if stream is None else stream.log


def _headers_or_none(
    headers: Sequence[Mapping[str, str] | None],
) -> list[dict[str, str] | None] | None:
    """Headers as the codec takes them: None when no record has any."""
    if not any(headers):
        return None
    return [h if h is None or isinstance(h, dict) else dict(h) for h in headers]
