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

Nothing here reads the clock or does I/O, except the offset reservations, which
rewrite one small file when a stream crosses its reserved block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from felix import ipc, wire
from felix.errors import BadRequest, CursorError, FelixError, NotFound, Overloaded, ServerError
from felix.ipc import RecordType
from felix.names import validate_name
from felix.shard.cache import CachePartition, CacheSettings
from felix.shard.offsets import OffsetReservations
from felix.shard.resources import cache_settings
from felix.shard.stream_log import StreamLog, StreamSettings

log = logging.getLogger("felix.shard")

#: Records per READ reply at most, whatever the gateway asks (bounds one ring record).
MAX_READ_RECORDS = 4096
#: Bytes per READ reply at most (a READ always returns at least one record).
MAX_READ_BYTES = 1024 * 1024


#: Slow-subscriber policies as the aux of a SUBSCRIBED reply record.
POLICY_CODES = {"drop_old": 0, "disconnect": 1, "block": 2}
POLICY_NAMES = {code: name for name, code in POLICY_CODES.items()}


@dataclass(frozen=True, slots=True)
class ShardSettings:
    """What a shard needs to know about the node."""

    index: int
    shards: int
    stream_defaults: StreamSettings = field(default_factory=StreamSettings)
    cache_defaults: CacheSettings = field(default_factory=CacheSettings)
    #: Create streams and caches on first use; when False a missing one is NotFound.
    auto_create: bool = True
    #: Most streams plus caches this shard holds.
    max_resources: int = 100_000
    #: Bytes this shard may hold in replay rings and caches (its share of the node's
    #: budget). Caches reserve their share when created; streams beyond the rest are
    #: trimmed oldest-first, largest stream first.
    memory_budget: int = 1 << 62


class _Stream:
    __slots__ = ("cursors", "key", "log", "pending_base", "pending_count", "watchers")

    def __init__(self, key: str, log: StreamLog) -> None:
        self.key = key
        self.log = log
        self.watchers: set[int] = set()
        # block policy: per gateway, the lowest offset one of its subscribers still needs.
        self.cursors: dict[int, int] = {}
        # Records appended in the current batch and not yet pushed.
        self.pending_base = 0
        self.pending_count = 0


class ShardCore:
    """One shard's streams and caches, fed ring records and ``now``.

    ``offsets`` keeps stream offsets monotonic across restarts (None: start at 0,
    for tests). Errors in a request become ERROR replies with the request's id; a
    malformed record is logged and dropped. Nothing a gateway sends can raise out
    of :meth:`handle`.
    """

    def __init__(self, settings: ShardSettings, offsets: OffsetReservations | None = None) -> None:
        self.settings = settings
        self._offsets = offsets
        self._streams: dict[str, _Stream] = {}
        self._caches: dict[tuple[str, str, str], CachePartition] = {}
        self._out: dict[int, list[bytes]] = {}
        self._dirty: list[_Stream] = []
        self._handlers: dict[int, Callable[[wire.ExtMessage, float], bytes]] = {
            wire.OP_CACHE_GET: self._cache_get,
            wire.OP_CACHE_SET: self._cache_set,
            wire.OP_CACHE_DELETE: self._cache_delete,
            wire.OP_CACHE_TTL: self._cache_ttl,
            wire.OP_PUBLISH: self._publish,
            # A barrier: the answer comes after everything sent before it (gateway drain).
            wire.OP_PING: lambda msg, now: wire.encode_ok(msg.request_id),
        }
        self._cache_reserved = 0
        self._stream_bytes = 0
        # Counters (exported as metrics by the worker).
        self.budget_trims = 0
        self.blocked = 0
        self.requests = 0
        self.errors = 0
        self.malformed = 0
        self.published = 0
        self.pushes = 0

    # -- feeding -------------------------------------------------------------------

    def handle(self, gateway: int, record: bytes | memoryview, now: float) -> None:
        """Process one ring record from ``gateway``."""
        try:
            kind, token, aux = ipc.decode_header(record)
            # No copy: every decoder below copies what it keeps, and the record is
            # handled completely before the ring slot is released.
            body = record[ipc.HEADER_SIZE :]
            if kind == RecordType.REQUEST:
                self._request(gateway, token, body, now)
            elif kind == RecordType.READ:
                self._read(gateway, token, body)
            elif kind == RecordType.WATCH:
                self._watch(gateway, body, bool(aux))
            elif kind == RecordType.HELLO:
                self.forget_gateway(gateway)
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
        for stream in self._dirty:
            if stream.pending_count and stream.watchers:
                # Records appended in this batch may already have left a small replay
                # ring: push what is left; watchers see the gap and apply their policy.
                log_ = stream.log
                base = max(stream.pending_base, log_.earliest)
                if base >= log_.next_offset:
                    stream.pending_count = 0
                    continue
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

    def sweep(self, now: float, max_work: int = 1000) -> int:
        """Reclaim expired cache entries, bounded work per cache; returns entries removed."""
        return sum(cache.sweep(now, max_work) for cache in self._caches.values())

    # -- requests -----------------------------------------------------------------

    def _request(self, gateway: int, token: int, body: bytes | memoryview, now: float) -> None:
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
            reply = self._dispatch(msg, now)
            if isinstance(msg, wire.Subscribe) and reply[wire.HEADER_SIZE] == wire.OP_SUBSCRIBED:
                # The gateway now has a subscriber here: send it this stream's live records,
                # and tell it the stream's slow-subscriber policy (in the record's aux).
                key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
                self._watch_key(gateway, key)
                policy = self._streams[key].log.settings.slow_subscriber_policy
                aux = POLICY_CODES.get(policy, 0)
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

    # caches

    def _cache(self, msg: wire.CacheRequest) -> CachePartition:
        scope = (msg.tenant_id, msg.namespace, msg.cache)
        cache = self._caches.get(scope)
        if cache is None:
            if not self.settings.auto_create:
                raise NotFound(f"cache {'/'.join(scope)} does not exist")
            for kind, name in zip(("tenant", "namespace", "cache"), scope, strict=True):
                validate_name(kind, name)
            self._check_room()
            settings = self._partition_settings()
            if self._cache_reserved + settings.budget_bytes > self.settings.memory_budget:
                raise Overloaded(
                    f"shard {self.settings.index}: the memory budget has no room for "
                    f"another cache ({settings.budget_bytes} bytes)"
                )
            cache = CachePartition(settings)
            self._caches[scope] = cache
            self._cache_reserved += settings.budget_bytes
        return cache

    def _partition_settings(self) -> CacheSettings:
        # A cache is spread over every shard by key: each holds its share of the budget.
        return cache_settings({}, self.settings.cache_defaults, self.settings.shards)

    def _cache_get(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest)
        return wire.encode_cache_value(msg.request_id, self._cache(msg).get(msg.key, now))

    def _cache_set(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest) and msg.value is not None
        ttl = msg.ttl_ms / 1000.0 if msg.ttl_ms else None
        stored = self._cache(msg).set(
            msg.key,
            msg.value,
            now,
            ttl=ttl,
            nx=msg.mode == wire.SET_IF_ABSENT,
            xx=msg.mode == wire.SET_IF_PRESENT,
        )
        return wire.encode_cache_stored(msg.request_id, stored)

    def _cache_delete(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest)
        return wire.encode_cache_deleted(msg.request_id, self._cache(msg).delete(msg.key, now))

    def _cache_ttl(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.CacheRequest)
        left = self._cache(msg).ttl(msg.key, now)
        if left is None:
            return wire.encode_cache_ttl_reply(msg.request_id, wire.TTL_MISSING)
        if math.isinf(left):
            return wire.encode_cache_ttl_reply(msg.request_id, wire.TTL_PERSISTENT)
        # Round up: a client never sees less time than the key really has.
        return wire.encode_cache_ttl_reply(
            msg.request_id, wire.TTL_EXPIRING, math.ceil(left * 1000.0)
        )

    # streams

    def _stream(
        self, key: str, names: tuple[str, str, str] | None = None, *, force: bool = False
    ) -> _Stream:
        stream = self._streams.get(key)
        if stream is None:
            if not self.settings.auto_create and not force:
                raise NotFound(f"stream {key} does not exist")
            parts = names or tuple(key.split("/"))
            if len(parts) != 3:
                raise BadRequest(f"bad stream key {key!r}")
            for kind, name in zip(("tenant", "namespace", "stream"), parts, strict=True):
                validate_name(kind, name)
            self._check_room()
            first = self._offsets.start_offset(key) if self._offsets is not None else 0
            stream = _Stream(key, StreamLog(self.settings.stream_defaults, first_offset=first))
            self._streams[key] = stream
        return stream

    def _check_room(self) -> None:
        if len(self._streams) + len(self._caches) >= self.settings.max_resources:
            raise BadRequest(
                f"shard {self.settings.index} holds its maximum of "
                f"{self.settings.max_resources} streams and caches"
            )

    def _publish(self, msg: wire.ExtMessage, now: float) -> bytes:
        assert isinstance(msg, wire.Publish)
        names = (msg.tenant_id, msg.namespace, msg.stream)
        stream = self._stream(ipc.stream_key(*names), names)
        if not msg.payloads:
            raise BadRequest("a publish needs at least one record")
        if stream.cursors and stream.log.settings.slow_subscriber_policy == "block":
            needed = min(stream.cursors.values())
            if stream.log.earliest_after(msg.payloads, msg.headers) > needed:
                self.blocked += 1
                raise Overloaded(
                    f"stream {stream.key} is full: a subscriber still needs offset {needed} "
                    "(block policy); retry"
                )
        if self._offsets is not None:
            self._offsets.ensure(stream.key, stream.log.next_offset + len(msg.payloads))
        before = stream.log.retained_bytes
        base, count = stream.log.append(msg.payloads, msg.headers)
        self._stream_bytes += stream.log.retained_bytes - before
        self.published += count
        if self._stream_bytes + self._cache_reserved > self.settings.memory_budget:
            self._trim_streams()
        if stream.watchers:
            if not stream.pending_count:
                stream.pending_base = base
                self._dirty.append(stream)
            stream.pending_count += count
        if msg.ack == wire.ACK_NONE:
            return wire.encode_ok(msg.request_id)
        return wire.encode_publish_offsets(msg.request_id, base, count)

    def _trim_streams(self) -> None:
        """Bring replay rings back under the budget, with slack so this stays rare."""
        budget = self.settings.memory_budget - self._cache_reserved
        excess = self._stream_bytes - budget + budget // 10
        for stream in sorted(self._streams.values(), key=lambda s: -s.log.retained_bytes):
            if excess <= 0:
                break
            before = stream.log.retained_bytes
            stream.log.trim(excess)
            freed = before - stream.log.retained_bytes
            self._stream_bytes -= freed
            excess -= freed
        self.budget_trims += 1

    @property
    def memory_used(self) -> int:
        """Accounted bytes in replay rings plus the budgets reserved by caches."""
        return self._stream_bytes + self._cache_reserved

    def _subscribe(self, msg: wire.Subscribe) -> bytes:
        names = (msg.tenant_id, msg.namespace, msg.stream)
        stream = self._stream(ipc.stream_key(*names), names)
        start = stream.log.resolve_start(msg.start)
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
            if from_offset < log_.earliest:
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

    def _watch_key(self, gateway: int, key: str) -> None:
        try:
            self._stream(key).watchers.add(gateway)
        except FelixError as exc:
            log.warning("shard %d: cannot watch %s: %s", self.settings.index, key, exc)

    def _emit(self, gateway: int, record: bytes) -> None:
        out = self._out.get(gateway)
        if out is None:
            self._out[gateway] = [record]
        else:
            out.append(record)

    # -- resources defined by the control plane ------------------------------------------

    def define_stream(self, key: str, settings: StreamSettings) -> None:
        """Create the stream with ``settings``, or apply them to the existing stream."""
        stream = self._streams.get(key)
        if stream is None:
            stream = self._stream(key, force=True)
        before = stream.log.retained_bytes
        stream.log.reconfigure(settings)
        self._stream_bytes -= before - stream.log.retained_bytes

    def delete_stream(self, key: str) -> bool:
        """Remove the stream; every gateway watching it is told to end its subscriptions."""
        stream = self._streams.pop(key, None)
        if stream is None:
            return False
        self._stream_bytes -= stream.log.retained_bytes
        record = ipc.encode(RecordType.END, 0, 0, ipc.encode_key(key))
        for gateway in stream.watchers:
            self._emit(gateway, record)
        if self._offsets is not None:
            # Keep a re-created stream's offsets above everything this one issued.
            self._offsets.remove(key)
        return True

    def define_cache(self, scope: tuple[str, str, str], settings: CacheSettings) -> None:
        """Create the cache partition with ``settings`` (its share), or replace its limits.

        Changing the limits of an existing partition starts it afresh (cached data is
        disposable; the budget must never be exceeded).
        """
        old = self._caches.pop(scope, None)
        if old is not None:
            self._cache_reserved -= old.settings.budget_bytes
        self._caches[scope] = CachePartition(settings)
        self._cache_reserved += settings.budget_bytes

    def delete_cache(self, scope: tuple[str, str, str]) -> bool:
        cache = self._caches.pop(scope, None)
        if cache is None:
            return False
        self._cache_reserved -= cache.settings.budget_bytes
        return True

    # -- introspection (metrics, tests) ----------------------------------------------

    @property
    def streams(self) -> int:
        return len(self._streams)

    @property
    def caches(self) -> int:
        return len(self._caches)

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
