"""A shard's queue groups: members, deliveries, settles, state files, dead letters.

How it works (docs/queues.md): the shard core hands queue requests and ring records
to :class:`QueueManager` with the gateway and member token they came with. Each group
is a sans-IO :class:`~felix.shard.queue.group.Group` (which offsets go to whom) with
its state file (:class:`~felix.shard.queue.group_log.GroupLog`). After each batch the
core calls :meth:`QueueManager.deliver`, which plans every group that may have work,
writes the hand-outs to the group's file *before* the records are sent, and emits
one DELIVERIES frame per member. Journal entries are written at the end of every
operation; an ack of a group whose stream fsyncs on ``commit`` is answered only once
an fsync of the group's file covers it (the fsync thread syncs group files like
stream logs: :meth:`take_syncs`, :meth:`synced`).

Dead letters are appended through a gateway (a RELAY record), because the dead-letter
stream may live on another shard; the entry is ``dying`` until that append is
acknowledged (RELAY_REPLY), and dying entries found after a restart are appended
again (at least once, never both dead and redelivered).

In a cluster (docs/queues.md, "In a cluster") the core sets :attr:`QueueManager.check`
and :attr:`QueueManager.may_write` (felix/shard/cluster.py): requests that change a
group or hand out its records are refused (Unavailable) unless this node serves the
stream's logical shard by the newest map (and, for those that write, its lease is
valid); nothing else (deliveries, lease expiries, retries, dead-letter relays, leaves)
writes a group's state file meanwhile: a group that cannot write is *parked*, its
journal entries wait in memory, and :meth:`QueueManager.resume` (each new map) lets it
go on. :meth:`QueueManager.end_moved` ends the consumers of a logical shard taken away.

Bounds: groups per stream and per shard (felix/shard/queue/settings.py: defined or
opened by a consumer alike), members per group
(the engine), relays in flight (:data:`MAX_RELAYS`), acks waiting for an fsync (one
per request: the gateways' in-flight limits).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from felix import ipc, wire
from felix.errors import BadRequest, FelixError, NotFound, Overloaded, Unavailable
from felix.ipc import RecordType
from felix.keys.store import KeyStore
from felix.shard.durable import DurableStream
from felix.shard.log_format import decode_record
from felix.shard.queue.group import DeadLetter, Group, MemberId, SettleOp
from felix.shard.queue.group_log import GroupCipher, GroupLog, discover, path_for
from felix.shard.queue.journal import GroupSnapshot, Skip, Start
from felix.shard.queue.settings import (
    MAX_GROUPS_PER_SHARD,
    MAX_GROUPS_PER_STREAM,
    MAX_GROUPS_PER_TENANT,
    GroupSettings,
)
from felix.shard.stream_log import StreamLog

__all__ = ["MAX_RELAYS", "GroupHandle", "QueueManager", "StreamView"]

log = logging.getLogger("felix.shard")

#: Dead-letter appends in flight through gateways, per shard (more wait their turn).
MAX_RELAYS: Final = 256
#: Seconds before a dead-letter append that failed is tried again (doubling up to
#: RELAY_RETRY_MAX), and how long an append may go unanswered before it counts failed.
RELAY_RETRY: Final = 1.0
RELAY_RETRY_MAX: Final = 60.0
RELAY_TIMEOUT: Final = 10.0
#: Bytes of payload one DELIVERIES frame carries at most (a frame is one ring record).
MAX_DELIVERY_BYTES: Final = 1 << 20
#: Records one DELIVERIES frame carries at most.
MAX_DELIVERY_RECORDS: Final = 1024
#: A consumer that asks for the default window gets this many records (bytes: ipc).
DEFAULT_CREDIT_RECORDS: Final = 64
#: The largest window in records a consumer may ask for (bytes: ipc).
MAX_CREDIT_RECORDS: Final = 65_536


@dataclass(slots=True)
class StreamView:
    """What the manager needs of a durable stream (the core's view of it)."""

    key: str
    log: StreamLog
    disk: DurableStream


class GroupHandle:
    """One group: the engine, its state file, and what waits on it."""

    __slots__ = ("dlq_key", "group", "key", "name", "relaying", "state_log", "waiting")

    def __init__(self, key: str, name: str, group: Group, state_log: GroupLog, dlq_key: str):
        self.key = key
        self.name = name
        self.group = group
        self.state_log = state_log
        self.dlq_key = dlq_key
        #: Replies waiting for an fsync of the state file: (entries needed, gw, token, reply).
        self.waiting: deque[tuple[int, int, int, bytes]] = deque()
        #: Offsets whose dead-letter append is in flight.
        self.relaying: set[int] = set()

    @property
    def log(self) -> GroupLog:
        """What the fsync thread syncs (it calls ``log.sync()`` like a stream's)."""
        return self.state_log


class QueueManager:
    """Every queue group of one shard (see the module docstring)."""

    def __init__(
        self,
        shard: int,
        root: Path | None,
        stream_view: Callable[[str], StreamView | None],
        emit: Callable[[int, bytes], None],
        wall_us: Callable[[], int],
        *,
        auto_create: bool = True,
        keys: KeyStore | None = None,
        encrypt: bool = False,
    ) -> None:
        self.shard = shard
        #: The node's data keys (group files are encrypted per tenant when ``encrypt``;
        #: None: plain files only) and whether new group files are written encrypted.
        self.keys = keys
        self.encrypt = encrypt
        #: ``<data-dir>/groups`` (None: no durable streams here, so no groups).
        self.root = root
        self._view = stream_view
        self._emit = emit
        self._wall_us = wall_us
        self.auto_create = auto_create
        #: Deltas (bytes) a group file may grow by before it is compacted (at least 4x
        #: its snapshot; GroupLog.needs_compaction).
        self.compact_bytes = 1 << 20
        self.groups: dict[tuple[str, str], GroupHandle] = {}
        self._by_stream: dict[str, dict[str, GroupHandle]] = {}
        self._per_tenant: dict[str, int] = {}  # open groups per tenant
        #: Streams whose age retention a group holds up too long (the core's disk sweep
        #: fills it): stream key -> the floor that holds it. Publishes are refused.
        self.holding: dict[str, int] = {}
        self._members: dict[MemberId, GroupHandle] = {}
        self._consumers: dict[MemberId, int] = {}  # member -> its client's consumer id
        self._dirty: dict[GroupHandle, None] = {}
        self._sync_wanted: dict[GroupHandle, None] = {}
        self._relays: dict[int, tuple[GroupHandle, int, float]] = {}
        self._relay_queue: deque[tuple[GroupHandle, DeadLetter]] = deque()
        # Dead letters whose append failed: (group, offset) -> (failures, retry at);
        # retried with a doubling delay (RELAY_RETRY .. RELAY_RETRY_MAX), never in a loop.
        # (None: queued again, waiting for its turn).
        self._relay_backoff: dict[tuple[GroupHandle, int], tuple[int, float | None]] = {}
        self._next_relay = 1
        self._gateways: set[int] = set()
        #: Set when a group file's fsync failed (the shard must stop acking and exit).
        self.fatal: str | None = None
        # Counters (metrics).
        self.delivered = 0
        self.redelivered = 0
        self.acked = 0
        self.dead_lettered = 0
        self.stalls = 0
        self.refused = 0  # publishes refused: a lagging group holds the retention cap
        self.relay_failures = 0  # dead-letter appends that failed (retried later)
        self.write_failures = 0  # group state file writes that failed (kept, retried)
        self._stalled: set[GroupHandle] = set()
        #: Cluster mode (set by the core): raises Unavailable unless a request on stream
        #: ``key`` may go ahead now (``durable``: it writes the group's state).
        self.check: Callable[[str, bool], object] | None = None
        #: Cluster mode: whether a group of stream ``key`` may write its state file now.
        self.may_write: Callable[[str], bool] | None = None
        # Groups that had work but could not write (cluster mode): resume() wakes them.
        self._parked: dict[GroupHandle, None] = {}
        # Members end_moved() ended -> their stream: a request of one that was on its way
        # is refused Unavailable (not "not a member") while the shard is not served here.
        # At most the members there were; forgotten when the shard is served again.
        self._moved: dict[MemberId, str] = {}

    def _writable(self, handle: GroupHandle) -> bool:
        """Whether ``handle``'s state file may be written now; if not, it is parked."""
        may_write = self.may_write
        if may_write is None or may_write(handle.key):
            return True
        self._parked[handle] = None
        return False

    def resume(self) -> None:
        """A new shard map: parked groups try again (each parks again if still fenced)."""
        for handle in self._parked:
            if self.groups.get((handle.key, handle.name)) is handle:
                self._dirty[handle] = None
        self._parked.clear()
        may_write = self.may_write
        if self._moved and may_write is not None:
            self._moved = {m: key for m, key in self._moved.items() if not may_write(key)}

    def end_moved(self, moved: Callable[[str], bool], now: float) -> int:
        """Cluster mode: the logical shards of the streams ``moved`` names left this node.
        Their groups stay (their state is on disk, with the stream), but their consumers
        are ended (CONSUMER_END Unavailable, "moved": the client consumes through the
        new owner) and leave gracefully: what they hold is released, no failure counted
        (the entries are written if the shard comes back, else the file keeps the
        leases, which a restart counts as failures like after a crash). Returns how
        many consumers were ended."""
        ended = 0
        for handle in [h for h in self.groups.values() if moved(h.key)]:
            members = list(handle.group.members())
            if not members:
                continue
            wall = self._wall_us()
            for member in members:
                gateway, token = member
                consumer = self._consumers.pop(member, 0)
                self._members.pop(member, None)
                end = wire.encode_consumer_end(
                    consumer,
                    Unavailable.code,
                    "the stream's shard moved to another node: consume again",
                )
                self._emit(gateway, ipc.encode(RecordType.DELIVER, token, 0, end))
                handle.group.leave(member, True, now, wall)
                self._moved[member] = handle.key
                ended += 1
            handle.group.roles_changed()  # nobody left to tell
            self._stalled.discard(handle)
            self._dirty.pop(handle, None)
            self._write_or_log(handle)  # parks it: its shard is not served
        return ended

    # -- groups --------------------------------------------------------------------------

    def open_all(self, defined: Callable[[str, str], GroupSettings | None]) -> int:
        """Recover every group file of this shard's streams (at start); returns how many."""
        if self.root is None:
            return 0
        opened = 0
        for key, name in discover(self.root):
            view = self._view(key)
            if view is None:
                continue  # not this shard's (or its stream is gone)
            try:
                self._open(view, name, defined(key, name) or GroupSettings(), recovered=True)
            except FelixError as exc:
                log.error("shard %d: cannot open group %s of %s: %s", self.shard, name, key, exc)
                continue
            opened += 1
        return opened

    def define(self, key: str, name: str, settings: GroupSettings) -> None:
        """The control plane (re)defined a group: apply its settings if it is open."""
        handle = self.groups.get((key, name))
        if handle is not None:
            handle.group.reconfigure(settings)
            handle.dlq_key = _dlq_key(key, settings)
            # Not just dirty: a toggled ``exclusive`` reassigns roles, which must reach
            # the members now (their CONSUMER_ROLE notices were otherwise sent only at
            # some later leave or lease expiry), and a lowered max_deliveries journals
            # Dying entries whose dead letters must go out.
            self._after_change(handle)

    def remove(self, key: str, name: str | None = None) -> None:
        """Drop a group (``name`` None: every group of the stream) and its state file."""
        handles = self._by_stream.get(key, {})
        for handle in [h for n, h in handles.items() if name is None or n == name]:
            self._close(handle, delete=True)

    def _open(
        self, view: StreamView, name: str, settings: GroupSettings, *, recovered: bool
    ) -> GroupHandle:
        assert self.root is not None
        held = len(self._by_stream.get(view.key, ()))
        if held >= MAX_GROUPS_PER_STREAM:
            raise Overloaded(
                f"stream {view.key} holds its maximum of {MAX_GROUPS_PER_STREAM} queue groups"
            )
        if len(self.groups) >= MAX_GROUPS_PER_SHARD:
            raise Overloaded(
                f"shard {self.shard} holds its maximum of {MAX_GROUPS_PER_SHARD} queue groups"
            )
        tenant = view.key.split("/", 1)[0]
        if self._per_tenant.get(tenant, 0) >= MAX_GROUPS_PER_TENANT:
            raise Overloaded(
                f"tenant {tenant} holds its maximum of {MAX_GROUPS_PER_TENANT} queue groups on "
                f"shard {self.shard} (remove unused groups: felix group rm)"
            )
        dlq_key = _dlq_key(view.key, settings)
        cipher = None
        if self.keys is not None:
            cipher = GroupCipher(self.keys, f"{view.key}/{name}", encrypt=self.encrypt)
        state_log, snapshot = GroupLog.open(
            path_for(self.root, view.key, name), compact_bytes=self.compact_bytes, cipher=cipher
        )
        now, wall = time.monotonic(), self._wall_us()
        fresh = not recovered and snapshot.next == 0 and snapshot.floor == 0
        if fresh:
            start = _resolve_start(settings.start, view)
            snapshot = GroupSnapshot()
            snapshot.apply(Start(start))
            state_log.append([Start(start)])
        group = Group(name, settings, snapshot, now, wall, recovered=not fresh)
        handle = GroupHandle(view.key, name, group, state_log, dlq_key)
        self.groups[(view.key, name)] = handle
        self._by_stream.setdefault(view.key, {})[name] = handle
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        # A consumer's open was checked by the core; a group recovered at start before
        # the node's first shard map writes what recovery journaled once a map allows.
        if not recovered or self._writable(handle):
            self._write(handle)
        self._dirty[handle] = None
        return handle

    def _close(self, handle: GroupHandle, *, delete: bool) -> None:
        for member in list(handle.group.members()):
            self._members.pop(member, None)
            gateway, token = member
            consumer = self._consumers.pop(member, 0)
            end = wire.encode_consumer_end(
                consumer, NotFound.code, f"group {handle.name} was removed"
            )
            self._emit(gateway, ipc.encode(RecordType.DELIVER, token, 0, end))
        if self.groups.pop((handle.key, handle.name), None) is not None:
            tenant = handle.key.split("/", 1)[0]
            left = self._per_tenant.get(tenant, 1) - 1
            if left > 0:
                self._per_tenant[tenant] = left
            else:
                self._per_tenant.pop(tenant, None)
        by = self._by_stream.get(handle.key)
        if by is not None:
            by.pop(handle.name, None)
            if not by:
                del self._by_stream[handle.key]
        self._dirty.pop(handle, None)
        self._sync_wanted.pop(handle, None)
        self._stalled.discard(handle)
        for relay in [r for r, (h, _o, _t) in self._relays.items() if h is handle]:
            del self._relays[relay]
        for key in [k for k in self._relay_backoff if k[0] is handle]:
            del self._relay_backoff[key]
        for gateway, token, reply in _drop_waiting(handle):
            self._emit(gateway, ipc.encode(RecordType.REPLY, token, 0, reply))
        if delete:
            handle.state_log.delete()
        else:
            handle.state_log.close()

    def groups_of(self, key: str) -> Iterable[GroupHandle]:
        return self._by_stream.get(key, {}).values()

    @property
    def streams_with_groups(self) -> Mapping[str, object]:
        """Stream keys that have open groups (membership tests on the publish path)."""
        return self._by_stream

    # -- requests ------------------------------------------------------------------------

    def consume(
        self, gateway: int, token: int, msg: wire.Consume, settings: GroupSettings | None
    ) -> bytes:
        """A member joins (``token``: its member token); ``settings``: the group's
        definition (None: not defined, created with the node's defaults if allowed)."""
        self._gateways.add(gateway)
        key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
        member = (gateway, token)
        if member in self._members:
            raise BadRequest(f"member token {token} already consumes")
        handle = self.groups.get((key, msg.group))
        if handle is None:
            view = self._view(key)
            if view is None:
                raise NotFound(
                    f"stream {key} is not a durable stream on this node: queue groups run "
                    "over durable streams (define it durable, or publish to it first)"
                )
            if settings is None and not self.auto_create:
                raise NotFound(f"group {msg.group} of stream {key} does not exist")
            if self.root is None:
                raise Unavailable("this shard keeps no data on disk: no queue groups")
            handle = self._open(view, msg.group, settings or GroupSettings(), recovered=False)
        records = _credit(msg.credit_records, DEFAULT_CREDIT_RECORDS, MAX_CREDIT_RECORDS)
        nbytes = ipc.queue_credit_bytes(msg.credit_bytes)  # the rule the gateway applies
        role = handle.group.join(member, msg.consumer_id, records, nbytes, time.monotonic())
        self._members[member] = handle
        self._consumers[member] = msg.consumer_id
        self._dirty[handle] = None
        return wire.encode_consuming(msg.request_id, msg.consumer_id, int(role))

    def window(self, gateway: int, token: int, msg: wire.ConsumerWindow) -> bytes:
        handle = self._member(gateway, token)
        if self.check is not None:
            self.check(handle.key, False)  # more credit hands out more records
        records = _credit(msg.credit_records, DEFAULT_CREDIT_RECORDS, MAX_CREDIT_RECORDS)
        nbytes = ipc.queue_credit_bytes(msg.credit_bytes)  # the rule the gateway applies
        handle.group.set_window((gateway, token), records, nbytes)
        self._dirty[handle] = None
        return wire.encode_ok(msg.request_id)

    def settle(
        self, gateway: int, token: int, reply_token: int, msg: wire.Settle, now: float
    ) -> bytes | None:
        """ack / nak / release / in_progress / term of member ``token``; None: the reply
        (to the request's ring token ``reply_token``) waits for an fsync."""
        handle = self._member(gateway, token)
        if self.check is not None:
            self.check(handle.key, True)  # before anything changes: it is written
        op = SettleOp(msg.opcode)
        delay = None if msg.delay_ms == wire.NAK_BACKOFF else int(msg.delay_ms)
        acked_before = handle.group.state.acked
        refused = handle.group.settle(
            (gateway, token),
            op,
            msg.ranges,
            now,
            self._wall_us(),
            delay_ms=delay,
            detail=msg.detail,
        )
        self.acked += handle.group.state.acked - acked_before
        reply = wire.encode_settled(msg.request_id, [(o, int(r)) for o, r in refused])
        self._write(handle)  # raises when the file cannot take it: not confirmed
        self._dirty[handle] = None
        view = self._view(handle.key)
        state_log = handle.state_log
        if (
            view is not None
            and view.disk.settings.fsync == "commit"
            and state_log.synced < state_log.written
        ):
            # Also when this settle wrote nothing new (a retry of an ack whose entry an
            # earlier write holds): answered once everything written so far is synced.
            handle.waiting.append((handle.state_log.written, gateway, reply_token, reply))
            self._sync_wanted[handle] = None
            return None
        return reply

    def stop(self, gateway: int, token: int, msg: wire.ConsumerOp, now: float) -> bytes:
        """A member stops gracefully: what it holds is released (no failure counted)."""
        handle = self._members.pop((gateway, token), None)
        self._consumers.pop((gateway, token), None)
        if handle is not None:
            handle.group.leave((gateway, token), True, now, self._wall_us())
            self._after_change(handle)
        return wire.encode_ok(msg.request_id)

    def leave(self, gateway: int, token: int, now: float, *, graceful: bool = False) -> None:
        """A member is gone (its stream or connection): its leases fail, or are released
        when ``graceful`` (the node drains)."""
        handle = self._members.pop((gateway, token), None)
        self._consumers.pop((gateway, token), None)
        if handle is not None:
            handle.group.leave((gateway, token), graceful, now, self._wall_us())
            self._after_change(handle)

    def forget_gateway(self, gateway: int, now: float) -> None:
        """A gateway restarted: every member it had is gone (abruptly)."""
        for member in [m for m in self._members if m[0] == gateway]:
            self.leave(member[0], member[1], now)
        if self._moved:
            self._moved = {m: key for m, key in self._moved.items() if m[0] != gateway}

    def _member(self, gateway: int, token: int) -> GroupHandle:
        handle = self._members.get((gateway, token))
        if handle is None:
            moved = self._moved.get((gateway, token))
            if moved is not None and self.check is not None:
                self.check(moved, False)  # Unavailable while its shard is not served here
            raise BadRequest("this consumer is not a member of a group here (consume again)")
        return handle

    def _after_change(self, handle: GroupHandle) -> None:
        self._write_or_log(handle)
        self._notify_roles(handle)
        self._dirty[handle] = None

    def _notify_roles(self, handle: GroupHandle) -> None:
        for (gateway, token), role in handle.group.roles_changed():
            consumer = self._consumers.get((gateway, token))
            if consumer is None:
                continue
            notice = wire.encode_consumer_role(consumer, int(role))
            self._emit(gateway, ipc.encode(RecordType.DELIVER, token, 0, notice))

    # -- journal -------------------------------------------------------------------------

    def _write(self, handle: GroupHandle) -> bool:
        """Write the group's new journal entries (one write); True if there were any.

        A failed write (a full disk) raises and keeps the entries, to be written first
        by the next write of the group: nothing that depends on them is answered or
        sent meanwhile (an ack retried finds its entry still pending, not confirmed).
        """
        entries = handle.group.journal
        if entries:
            handle.group.journal = []
            try:
                handle.state_log.append(entries)
            except BaseException:
                handle.group.journal = entries + handle.group.journal
                self.write_failures += 1
                raise
            if handle.state_log.needs_compaction():
                self._begin_compaction(handle)
        # Dead letters are appended only once their Dying entry is written (above, or
        # before a crash). Drained even without new entries: a recovered group whose only
        # news is a dying entry from before the crash journals nothing, and its append
        # used to wait for some unrelated later entry (forever on an idle group).
        for dead in handle.group.dead_letters:
            self._relay_queue.append((handle, dead))
        handle.group.dead_letters = []
        return bool(entries)

    def _begin_compaction(self, handle: GroupHandle) -> None:
        """Start compacting the group's file (no fsync on the loop): the fsync thread
        makes the new file durable, :meth:`synced` then switches to it."""
        try:
            handle.state_log.begin_compaction(handle.group.state)
        except (FelixError, OSError) as exc:
            log.warning(
                "shard %d: group %s of %s: cannot compact its state file (%s); it keeps "
                "growing, tried again later",
                self.shard,
                handle.name,
                handle.key,
                exc,
            )
            return
        self._sync_wanted[handle] = None

    def _write_or_log(self, handle: GroupHandle) -> bool:
        """:meth:`_write` where no request waits for the answer (timers, leaves,
        dead-letter confirmations): a failure is logged; the entries wait for the next
        write. False: not written (also in a cluster while the group may not write: it
        is parked, its entries wait)."""
        if not self._writable(handle):
            return False
        try:
            self._write(handle)
        except (FelixError, OSError) as exc:
            log.error(
                "shard %d: group %s of %s: cannot write its state file (%s); retrying with "
                "its next change",
                self.shard,
                handle.name,
                handle.key,
                exc,
            )
            return False
        return True

    def take_syncs(self) -> list[GroupHandle]:
        """Group files to fsync in the next round (acks wait on them)."""
        if not self._sync_wanted or self.fatal is not None:
            return []
        wanted = list(self._sync_wanted)
        self._sync_wanted.clear()
        return wanted

    def synced(self, handle: GroupHandle, synced: int) -> list[tuple[int, int, bytes]]:
        """An fsync of ``handle``'s file covered ``synced`` entries: the replies it frees.
        A compaction that sync made durable switches to its new file here (a rename,
        no fsync); the next sync fsyncs the directory, so one is requested."""
        state_log = handle.state_log
        if state_log.compaction_ready():
            try:
                state_log.finish_compaction()
            except (FelixError, OSError) as exc:
                self.sync_failed(handle, exc)  # the log is poisoned: the shard exits
                return []
            self._sync_wanted[handle] = None
        out = []
        waiting = handle.waiting
        while waiting and waiting[0][0] <= synced:
            _need, gateway, token, reply = waiting.popleft()
            out.append((gateway, token, reply))
        if waiting:
            self._sync_wanted[handle] = None
        return out

    def sync_failed(self, handle: GroupHandle, exc: BaseException) -> None:
        self.fatal = f"fsync of group {handle.name} of {handle.key} failed: {exc}"
        for h in self.groups.values():
            h.waiting.clear()
        self._sync_wanted.clear()

    # -- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Lease expiry, delayed retries and dead-letter retries that came due."""
        wall = self._wall_us()
        for handle in list(self.groups.values()):
            group = handle.group
            deadline = group.next_deadline()
            if deadline is not None and deadline <= now:
                if not self._writable(handle):
                    continue  # its shard is not served here now: no lease expires
                group.expire(now, wall)
                self._after_change(handle)
            retry = group.next_retry_us()
            if retry is not None and retry <= wall:
                self._dirty[handle] = None  # deliver() parks it if it may not write
        for relay, (handle, offset, sent) in list(self._relays.items()):
            if now - sent > RELAY_TIMEOUT:
                # No answer (the gateway restarted?): try again, later.
                del self._relays[relay]
                handle.relaying.discard(offset)
                self._relay_failed(handle, offset, now, "no answer from the gateway")
        for key, (failures, due) in list(self._relay_backoff.items()):
            if due is not None and due <= now:
                self._relay_backoff[key] = (failures, None)  # queued: once
                self._requeue_dead(*key)
        self._pump_relays(now)

    def stream_written(self, key: str) -> None:
        """Records were appended to (or synced on) stream ``key``: its groups may deliver."""
        for handle in self._by_stream.get(key, {}).values():
            self._dirty[handle] = None

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, now: float) -> None:
        """Plan every group that may have work; emit the deliveries (state written first)."""
        if not self._dirty:
            self._pump_relays(now)
            return
        dirty = list(self._dirty)
        self._dirty.clear()
        wall = self._wall_us()
        for handle in dirty:
            view = self._view(handle.key)
            if view is None or view.disk.damaged is not None:
                continue
            if not self._writable(handle):
                continue  # hand-outs are written first: none while it may not write
            try:
                self._deliver_group(handle, view, now, wall)
            except FelixError as exc:
                log.error(
                    "shard %d: group %s of %s cannot deliver: %s",
                    self.shard,
                    handle.name,
                    handle.key,
                    exc,
                )
        self._pump_relays(now)

    def _deliver_group(self, handle: GroupHandle, view: StreamView, now: float, wall: int) -> None:
        group = handle.group
        disk = view.disk
        readable = disk.synced if disk.settings.fsync == "commit" else view.log.next_offset
        readable = min(readable, view.log.next_offset)
        self._skip_gap(handle, view, readable)
        cache: dict[int, tuple[int, dict[str, str] | None, bytes] | None] = {}

        def size_of(offset: int) -> int | None:
            record = cache.get(offset)
            if record is None and offset not in cache:
                record = cache[offset] = _fetch(view, offset)
            return None if record is None else len(record[2])

        if group.journal and not self._write_or_log(handle):
            return  # earlier entries are still not on disk: hand out nothing new
        plan = group.plan(readable, size_of, now, wall)
        if not self._write_or_log(handle):
            # The hand-outs are not on disk: nothing is sent (the leases expire and the
            # records go out again once the file takes writes).
            return
        for (gateway, token), consumer, items in plan:
            batch: list[tuple[int, int, int, int, dict[str, str] | None, bytes]] = []
            nbytes = 0
            for offset, attempts, failures in items:
                record = cache.get(offset)
                if record is None:
                    record = _fetch(view, offset)
                if record is None:
                    continue  # vanished meanwhile: its lease expires and it is skipped then
                ts, headers, payload = record
                if batch and (
                    len(batch) >= MAX_DELIVERY_RECORDS or nbytes + len(payload) > MAX_DELIVERY_BYTES
                ):
                    self._send_batch(gateway, token, consumer, batch)
                    batch, nbytes = [], 0
                batch.append((offset, ts, attempts, failures, headers, payload))
                nbytes += len(payload)
                if attempts > 1:
                    self.redelivered += 1
            if batch:
                self._send_batch(gateway, token, consumer, batch)
        stalled = group.stalled()
        if stalled and handle not in self._stalled:
            self._stalled.add(handle)
            self.stalls += 1
            log.warning(
                "shard %d: group %s of %s is stalled: its oldest record %d holds the window "
                "full (max_span %d); nothing newer is handed out until it is settled",
                self.shard,
                handle.name,
                handle.key,
                group.state.floor,
                group.settings.max_span,
            )
        elif not stalled:
            self._stalled.discard(handle)

    def _send_batch(
        self,
        gateway: int,
        token: int,
        consumer: int,
        batch: list[tuple[int, int, int, int, dict[str, str] | None, bytes]],
    ) -> None:
        frame = wire.encode_deliveries(consumer, batch)
        self._emit(gateway, ipc.encode(RecordType.DELIVER, token, 0, frame))
        self.delivered += len(batch)

    def _skip_gap(self, handle: GroupHandle, view: StreamView, readable: int) -> None:
        """Jump the group over offsets that hold no record (a restart's reservation gap)
        in one journal entry, instead of looking at each of them."""
        state = handle.group.state
        start = state.next
        if start >= readable:
            return
        log_ = view.log
        if log_.earliest <= start < log_.next_offset:
            return  # in the hot tail: offsets there are contiguous
        first = None
        if start < log_.earliest:
            records = view.disk.log.read(start, 1, 1)
            if records:
                first = records[0].offset
        if first is None or first >= log_.earliest:
            first = log_.earliest if log_.earliest < log_.next_offset else readable
        first = min(first, readable)
        if first > start:
            entry = Skip(start, first - start)
            state.apply(entry)
            handle.group.journal.append(entry)

    # -- dead letters --------------------------------------------------------------------

    def _requeue_dead(self, handle: GroupHandle, offset: int) -> None:
        entry = handle.group.state.entries.get(offset)
        if entry is None:
            return
        self._relay_queue.append(
            (
                handle,
                DeadLetter(offset, entry.reason, entry.detail, entry.attempts, entry.failures, ""),
            )
        )

    def _pump_relays(self, now: float) -> None:
        if not self._relay_queue or not self._gateways:
            return
        gateways = sorted(self._gateways)
        while self._relay_queue and len(self._relays) < MAX_RELAYS:
            # Spread over the gateways: one that is restarting delays only its share.
            gateway = gateways[self._next_relay % len(gateways)]
            handle, dead = self._relay_queue.popleft()
            if self.groups.get((handle.key, handle.name)) is not handle:
                continue  # removed meanwhile
            if not self._writable(handle):
                # Its confirmation could not be written: queued again by the group's
                # next write (once its shard is served here again).
                handle.group.dead_letters.append(dead)
                continue
            if dead.offset in handle.relaying:
                continue
            backoff = self._relay_backoff.get((handle, dead.offset))
            if backoff is not None and backoff[1] is not None:
                continue  # failed before: tick() queues it again when its delay is over
            view = self._view(handle.key)
            if view is None:
                continue
            try:
                frame = self._dead_letter_frame(handle, view, dead)
            except FelixError as exc:  # its record cannot be read now (a key problem)
                self._relay_failed(handle, dead.offset, now, str(exc))
                continue
            if frame is None:
                # The record is gone (retention): nothing to append; finished.
                handle.group.dead(dead.offset)
                self._write_or_log(handle)
                continue
            relay = self._next_relay
            self._next_relay += 1
            self._relays[relay] = (handle, dead.offset, now)
            handle.relaying.add(dead.offset)
            body = ipc.encode_key(handle.dlq_key) + frame
            self._emit(gateway, ipc.encode(RecordType.RELAY, relay, 0, body))

    def _dead_letter_frame(
        self, handle: GroupHandle, view: StreamView, dead: DeadLetter
    ) -> bytes | None:
        record = _fetch(view, dead.offset, timestamps=True)
        if record is None:
            return None
        ts, headers, payload = record
        tenant, namespace, _stream = handle.key.split("/")
        out = dict(headers or {})
        out.update(
            {
                "felix-dlq-id": f"{handle.name}:{dead.offset}",
                "felix-dlq-reason": dead.reason,
                "felix-dlq-detail": dead.detail,
                "felix-dlq-stream": handle.key,
                "felix-dlq-offset": str(dead.offset),
                "felix-dlq-timestamp-us": str(ts),
                "felix-dlq-group": handle.name,
                "felix-dlq-attempts": str(dead.attempts),
                "felix-dlq-failures": str(dead.failures),
                "felix-dlq-consumer": dead.consumer,
            }
        )
        dlq = handle.dlq_key.split("/")[2]
        return wire.encode_publish(
            0, tenant, namespace, dlq, [payload], ack=wire.ACK_PER_BATCH, headers=[out]
        )

    def relay_reply(self, relay: int, frame: bytes | memoryview, now: float) -> None:
        """A gateway answered a dead-letter append."""
        entry = self._relays.pop(relay, None)
        if entry is None:
            return
        handle, offset, _sent = entry
        handle.relaying.discard(offset)
        if self.groups.get((handle.key, handle.name)) is not handle:
            return
        if len(frame) > wire.HEADER_SIZE and frame[wire.HEADER_SIZE] == wire.OP_PUBLISH_OFFSETS:
            self._relay_backoff.pop((handle, offset), None)
            handle.group.dead(offset)
            self.dead_lettered += 1
            self._write_or_log(handle)
            self._dirty[handle] = None
            return
        why = "refused"
        try:
            reply = wire.decode_ext(wire.decode_frame(bytes(frame), extensions=True))
            if isinstance(reply, wire.ErrorReply):
                why = reply.message
        except FelixError:
            pass
        self._relay_failed(handle, offset, now, why)

    def _relay_failed(self, handle: GroupHandle, offset: int, now: float, why: str) -> None:
        """A dead-letter append failed: retry later, with a doubling delay. The record
        stays ``dying`` (never redelivered) and holds the group's floor meanwhile: the
        failures are counted (felix_queue_dead_letter_failures_total) and in the status."""
        self.relay_failures += 1
        failures = self._relay_backoff.get((handle, offset), (0, None))[0] + 1
        delay = min(RELAY_RETRY * 2 ** (failures - 1), RELAY_RETRY_MAX)
        self._relay_backoff[(handle, offset)] = (failures, now + delay)
        if failures == 1 or failures % 10 == 0:
            log.warning(
                "shard %d: dead-letter append of %s offset %d to %s failed (%d times): %s; "
                "retrying in %.0f s",
                self.shard,
                handle.key,
                offset,
                handle.dlq_key,
                failures,
                why,
                delay,
            )

    @property
    def members(self) -> int:
        """Consumers in this shard's groups."""
        return len(self._members)

    @property
    def stalled_now(self) -> int:
        """Groups stalled at their last delivery round."""
        return len(self._stalled)

    def gateway_seen(self, gateway: int) -> None:
        self._gateways.add(gateway)

    # -- shutdown and status -------------------------------------------------------------

    def shutdown(self, now: float) -> None:
        """Graceful stop: every lease is released (no failure counted), files closed."""
        wall = self._wall_us()
        for handle in list(self.groups.values()):
            for member in list(handle.group.members()):
                handle.group.leave(member, True, now, wall)
                self._members.pop(member, None)
            self._write_or_log(handle)
            try:
                handle.state_log.sync()
            except OSError as exc:
                log.error("shard %d: final fsync of group %s: %s", self.shard, handle.name, exc)
            handle.state_log.close()

    def status(self, key: str) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for name, handle in sorted(self._by_stream.get(key, {}).items()):
            status = dict(handle.group.status())
            status["dead_letter"] = handle.dlq_key
            status["dead_letter_failing"] = sum(1 for k in self._relay_backoff if k[0] is handle)
            out[name] = status
        return out

    def min_floor(self, key: str) -> int | None:
        """The lowest floor of the stream's groups (retention keeps everything above)."""
        floors = [h.group.state.floor for h in self._by_stream.get(key, {}).values()]
        return min(floors, default=None)


def _credit(asked: int, default: int, limit: int) -> int:
    return default if asked == 0 else min(asked, limit)


def _dlq_key(key: str, settings: GroupSettings) -> str:
    tenant, namespace, stream = key.split("/")
    return ipc.stream_key(tenant, namespace, settings.dead_letter_for(stream))


def _resolve_start(start: str | int, view: StreamView) -> int:
    if start == "latest":
        return view.log.next_offset
    low = min(view.disk.low(), view.log.earliest)
    if start == "earliest":
        return low
    assert isinstance(start, int)
    if start > view.log.next_offset:
        raise BadRequest(f"start offset {start} is beyond the stream's end {view.log.next_offset}")
    return max(start, low)


def _fetch(
    view: StreamView, offset: int, *, timestamps: bool = False
) -> tuple[int, dict[str, str] | None, bytes] | None:
    """The record at ``offset``: (timestamp_us or 0, headers, payload); None if none."""
    log_ = view.log
    if not timestamps and log_.earliest <= offset < log_.next_offset:
        batch = log_.read(offset, 1, 1)
        headers = batch.headers[0]
        return 0, (None if headers is None else dict(headers)), batch.payloads[0]
    disk = view.disk
    if offset < disk.written:
        records = disk.log.read(offset, 1, 1)
        if records and records[0].offset == offset:
            rec = records[0]
            headers, body = decode_record(
                rec.payload, view.key, offset, rec.timestamp_us, disk.keys
            )
            return rec.timestamp_us, headers, body
    return None


def _drop_waiting(handle: GroupHandle) -> list[tuple[int, int, bytes]]:
    out = []
    while handle.waiting:
        _need, gateway, token, reply = handle.waiting.popleft()
        request_id = int.from_bytes(reply[wire.HEADER_SIZE + 1 : wire.HEADER_SIZE + 9], "big")
        error = wire.encode_error(request_id, NotFound.code, "the group was removed")
        out.append((gateway, token, error))
    return out
