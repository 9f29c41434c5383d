"""Queue consumers: the members of a group share a durable stream's records.

How it works (docs/queues.md): a :class:`Consumer` joins its group with CONSUME on
one control stream of a pooled connection, under a consumer id registered on that
connection first (deliveries come back on the same control stream, as DELIVERIES
frames whose request id is the consumer id). The broker sends at most ``prefetch``
unsettled records (and ``max_bytes`` of payload); settling a record (ack, nak,
release, term) makes room for the next. Acks made in the same loop tick leave as one
ACK frame with ranges.

Leases live on the connection: when it is lost, every record the application still
holds is void (settling it raises :class:`~felix.errors.LeaseLost`; the broker
redelivers it), buffered records are dropped, and after the reconnect the consumer
joins its group again by itself. Closing the consumer releases what it buffered
(no failure counted) and stops it gracefully.

In a cluster the consumer joins on the node owning its stream's logical shard
(CONSUME is routed by the stream key; settles go on the consumer's own control
stream, so they follow). When its shard moves (CONSUMER_END Unavailable, a lost
connection, a REDIRECT when joining again) it joins again through the client's shard
map (:meth:`Consumer._reroute`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from felix import wire
from felix.client._backoff import Backoff
from felix.client._cluster import Redirected
from felix.client._connection import Connection, expect_reply
from felix.client._e2e import E2EKeys, E2EReceived, Opened, open_record
from felix.errors import (
    ConnectionLost,
    FelixError,
    FelixTimeoutError,
    LeaseLost,
    LocalProtocolError,
    error_for_code,
)

if TYPE_CHECKING:
    from felix.client._client import Client

__all__ = ["Consumer", "QueueMessage", "Role"]

log = logging.getLogger("felix.client")

#: A NAK without a delay: the group's backoff decides.
_BACKOFF = wire.NAK_BACKOFF
_REFUSALS = {
    wire.REFUSED_STALE: "stale",
    wire.REFUSED_DEAD: "dead",
    wire.REFUSED_UNKNOWN: "unknown",
}
#: Detail text sent with a nak or term at most (the broker keeps 1024 bytes).
_MAX_DETAIL = 1024
#: Offset ranges one ACK frame carries at most (docs/wire-protocol.md).
_MAX_RANGES = 1024


class Role(enum.IntEnum):
    """A consumer's part in its group: any member, or (exclusive groups) active/standby."""

    MEMBER = 0
    ACTIVE = 1
    STANDBY = 2


class _State(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    ENDED = "ended"  # by the broker (CONSUMER_END)
    CLOSED = "closed"  # by this side


class QueueMessage(E2EReceived):
    """One record leased to this consumer. Settle it exactly once: :meth:`ack`,
    :meth:`nak`, :meth:`release` or :meth:`term` (``in_progress`` extends the lease)."""

    __slots__ = (
        "_consumer",
        "_generation",
        "_opened",
        "attempts",
        "failures",
        "headers",
        "offset",
        "raw",
        "settled",
        "stream",
        "timestamp",
    )

    def __init__(self, consumer: Consumer, generation: int, delivery: wire.Delivery) -> None:
        self._consumer = consumer
        self._generation = generation
        #: The stream name as given to ``consume()``.
        self.stream = consumer.stream
        #: The record's offset in the stream.
        self.offset: int = delivery.offset
        #: The payload as the broker stored it (the ciphertext of an e2e record).
        self.raw: bytes = delivery.payload
        #: The record's headers (empty if it has none).
        self.headers: Mapping[str, str] = delivery.headers or {}
        e2e = consumer._e2e
        self._opened: Opened | None = (
            None
            if e2e is None
            else open_record(
                e2e, consumer.stream, self.offset, consumer._path, self.raw, self.headers
            )
        )
        #: Times the record was handed out (this delivery included).
        self.attempts: int = delivery.attempts
        #: Failures so far (nak, lease expiry, a consumer lost while holding it).
        self.failures: int = delivery.failures
        #: When the record was published (None when the broker did not say).
        self.timestamp: datetime | None = (
            datetime.fromtimestamp(delivery.timestamp_us / 1e6, UTC)
            if delivery.timestamp_us
            else None
        )
        #: Whether it was acked, nak'ed, released or terminated through this object.
        self.settled = False

    def __repr__(self) -> str:
        return (
            f"<QueueMessage {self.stream!r}@{self.offset} attempts={self.attempts} "
            f"failures={self.failures}>"
        )

    async def ack(self) -> None:
        """Done: the broker confirms once its group state holds it (fsynced under commit).

        Raises LeaseLost if the lease went to another consumer meanwhile (the record
        was redelivered) or the connection it came on was lost.
        """
        await self._consumer._settle(self, wire.OP_ACK)

    async def nak(self, delay: float | None = None, *, detail: str = "") -> None:
        """Not done, try again later (counts a failure): after ``delay`` seconds, or the
        group's backoff when None. After ``max_deliveries`` failures the record goes to
        the group's dead-letter stream with ``detail`` in its headers."""
        if delay is None:
            delay_ms = _BACKOFF
        elif not 0 <= delay <= 3600:
            raise LocalProtocolError(f"delay must be within 0..3600 s, got {delay!r}")
        else:
            delay_ms = int(delay * 1000)
        await self._consumer._settle(self, wire.OP_NAK, delay_ms=delay_ms, detail=detail)

    async def release(self) -> None:
        """Not processed (e.g. shutting down): redelivered at once, no failure counted."""
        await self._consumer._settle(self, wire.OP_RELEASE)

    async def in_progress(self) -> None:
        """Still working on it: the lease is extended by the group's lease time."""
        await self._consumer._settle(self, wire.OP_IN_PROGRESS, final=False)

    async def term(self, reason: str = "") -> None:
        """Never retry it: moved to the group's dead-letter stream now (``reason`` kept)."""
        await self._consumer._settle(self, wire.OP_TERM, detail=reason)

    @contextlib.asynccontextmanager
    async def process(self) -> AsyncIterator[QueueMessage]:
        """``async with msg.process():`` acks when the block succeeds and naks with the
        exception's text when it raises (the exception propagates)."""
        try:
            yield self
        except BaseException as exc:
            if not self.settled:
                with contextlib.suppress(FelixError):
                    await self.nak(detail=f"{type(exc).__name__}: {exc}")
            raise
        if not self.settled:
            await self.ack()


class Consumer:
    """A member of queue group ``group`` on ``stream``; create it with ``client.consume()``.

    ``async with client.consume("orders", "workers") as c: async for msg in c:`` yields
    :class:`QueueMessage` objects; iteration goes on across reconnects and ends when
    the consumer or the client is closed (or raises the broker's error when it ends
    the consumer, e.g. the group was removed).
    """

    def __init__(
        self,
        client: Client,
        stream: str,
        group: str,
        namespace: str,
        name: str,
        prefetch: int,
        max_bytes: int,
        e2e: E2EKeys | None = None,
    ) -> None:
        self._client = client
        #: The stream name as given to ``consume()``.
        self.stream = stream
        #: The group's name.
        self.group = group
        self._namespace = namespace
        self._name = name
        # End-to-end encryption: the keys, and what a record's encryption is bound to.
        self._e2e = e2e
        self._path = "" if e2e is None else f"{client.tenant}/{namespace}/{name}"
        self._prefetch = prefetch
        self._max_bytes = max_bytes
        self._state = _State.NEW
        self._error: FelixError | None = None
        self._queue: deque[QueueMessage] = deque()
        self._wakeup = asyncio.Event()
        self._conn: Connection | None = None
        self._consumer_id: int | None = None
        self._stream_id: int | None = None
        # Bumped on every (re)join: messages of an older one hold no lease any more.
        self._generation = 0
        self._resume_task: asyncio.Task[None] | None = None
        # Acks of this loop tick: sent as one ACK frame.
        self._acks: list[tuple[QueueMessage, asyncio.Future[None]]] = []
        self._ack_handle: asyncio.Handle | None = None
        self._ack_tasks: set[asyncio.Task[None]] = set()
        #: This consumer's part in its group (exclusive groups: ACTIVE or STANDBY).
        self.role = Role.MEMBER

    # -- public API ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records received and not yet taken by the application."""
        return len(self._queue)

    async def start(self) -> None:
        """Join the group (what ``async with`` does on entry). Call once."""
        if self._state is not _State.NEW:
            raise LocalProtocolError("a consumer can be started only once")
        try:
            await self._client._start_consumer(self)
        except BaseException:
            self._state = _State.CLOSED
            raise
        if self._state is _State.NEW:
            self._state = _State.ACTIVE

    async def close(self) -> None:
        """Leave the group gracefully: the broker releases every record this consumer holds
        (no failure counted; settling one of them afterwards raises LeaseLost or is a
        late ack). Idempotent."""
        if self._state is _State.CLOSED:
            return
        # Acks of this tick go out (and are answered) before the STOP releases the rest.
        if self._ack_handle is not None:
            self._ack_handle.cancel()
            self._flush_acks()
        if self._ack_tasks:
            await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        self._state = _State.CLOSED
        self._wakeup.set()
        conn, consumer_id, stream_id = self._conn, self._consumer_id, self._stream_id
        self._queue.clear()
        self._detach()
        self._client._forget_consumer(self)
        if conn is None or consumer_id is None or not conn.alive:
            return
        # STOP is a graceful leave: the broker releases everything this consumer holds
        # (buffered here or in the application's hands), no failure counted. (A RELEASE
        # first would let the broker hand the records back to it before the STOP.)
        with contextlib.suppress(FelixError, TimeoutError):
            async with asyncio.timeout(self._client.request_timeout):
                await conn.call(
                    lambda rid: wire.encode_stop_consume(rid, consumer_id), stream_id=stream_id
                )

    async def next(self, timeout: float | None = None) -> QueueMessage:
        """The next record; FelixTimeoutError after ``timeout`` seconds (None: wait)."""
        message = await self._next(timeout)
        if message is None:
            raise StopAsyncIteration
        return message

    async def fetch(self, n: int, timeout: float | None = None) -> list[QueueMessage]:
        """Up to ``n`` records: waits up to ``timeout`` seconds for the first, then takes
        what has arrived (an empty list when nothing came in time)."""
        if n < 1:
            raise LocalProtocolError("fetch needs n >= 1")
        try:
            first = await self._next(timeout)
        except FelixTimeoutError:
            return []
        if first is None:
            return []
        out = [first]
        while len(out) < n and self._queue:
            out.append(self._queue.popleft())
        return out

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> QueueMessage:
        message = await self._next(None)
        if message is None:
            raise StopAsyncIteration
        return message

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Consumer {self.stream!r} group={self.group!r} {self._state.value}>"

    # -- receiving -----------------------------------------------------------------------

    async def _next(self, timeout: float | None) -> QueueMessage | None:
        if self._state is _State.NEW:
            raise LocalProtocolError("start the consumer first (async with client.consume(...))")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._queue:
                        return self._queue.popleft()
                    if self._error is not None:
                        raise self._error
                    if self._state is not _State.ACTIVE:
                        return None
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except TimeoutError as exc:
            if isinstance(exc, FelixError):
                raise
            raise FelixTimeoutError(
                f"no message for group {self.group!r} within {timeout} s"
            ) from None

    def _on_deliveries(self, message: wire.Deliveries) -> None:
        generation = self._generation
        for delivery in message.records:
            self._queue.append(QueueMessage(self, generation, delivery))
        self._wakeup.set()

    def _on_role(self, role: int) -> None:
        self.role = Role(role)

    def _on_consumer_end(self, code: int, text: str) -> None:
        """The broker ended this consumer (its group was removed, its shard restarted)."""
        error = error_for_code(code, text) if code else None
        conn = self._conn
        self._detach()
        self._generation += 1
        self._queue.clear()
        if self._state is not _State.ACTIVE:
            return
        if self._client._reroutes(error):
            # A cluster's shard moved: join where it is now.
            self._client._forget_consumer(self)
            self._reroute()
            return
        if error is not None and error.retryable and conn is not None and conn.alive:
            # Its shard restarted: join again (in the background, backing off).
            self._resume_task = asyncio.create_task(self._resume_on(conn))
            return
        self._on_end(error)

    def _on_end(self, error: FelixError | None) -> None:
        """The consumer ends for good (``error`` None: cleanly); iteration raises it."""
        self._detach()
        self._queue.clear()
        if self._state in (_State.NEW, _State.ACTIVE):
            self._state = _State.ENDED
            self._error = error
            self._client._forget_consumer(self)
            self._wakeup.set()

    # -- settling ------------------------------------------------------------------------

    def _check_lease(self, message: QueueMessage) -> tuple[Connection, int, int]:
        if message.settled:
            raise LocalProtocolError(f"record {message.offset} was settled already")
        conn, consumer_id, stream_id = self._conn, self._consumer_id, self._stream_id
        if (
            message._generation != self._generation
            or conn is None
            or consumer_id is None
            or stream_id is None
            or not conn.alive
        ):
            raise LeaseLost(
                message.offset,
                "lost",
                "the connection this record came on was lost: the broker redelivers it",
            )
        return conn, consumer_id, stream_id

    async def _settle(
        self,
        message: QueueMessage,
        opcode: int,
        *,
        delay_ms: int = 0,
        detail: str = "",
        final: bool = True,
    ) -> None:
        conn, consumer_id, stream_id = self._check_lease(message)
        if opcode == wire.OP_ACK:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            message.settled = True
            self._acks.append((message, future))
            if self._ack_handle is None:
                self._ack_handle = asyncio.get_running_loop().call_soon(self._flush_acks)
            await future
            return
        detail = _clip(detail)
        if final:
            message.settled = True
        try:
            reply = await self._client._with_timeout(
                conn.call(
                    lambda rid: wire.encode_settle(
                        opcode,
                        rid,
                        consumer_id,
                        [(message.offset, 1)],
                        delay_ms=delay_ms,
                        detail=detail,
                    ),
                    stream_id=stream_id,
                )
            )
        except ConnectionLost as exc:
            message.settled = False
            raise _unconfirmed(exc, message.offset) from exc
        except BaseException:
            message.settled = False
            raise
        _raise_refused(expect_reply(reply, wire.Settled, wire.OP_SETTLED))

    def _flush_acks(self) -> None:
        self._ack_handle = None
        acks, self._acks = self._acks, []
        if not acks:
            return
        conn, consumer_id, stream_id = self._conn, self._consumer_id, self._stream_id
        live = [(m, f) for m, f in acks if m._generation == self._generation]
        for message, future in acks:
            if message._generation != self._generation and not future.done():
                future.set_exception(
                    LeaseLost(message.offset, "lost", "its connection was lost: redelivered")
                )
        if not live:
            return
        if conn is None or consumer_id is None or stream_id is None or not conn.alive:
            for message, future in live:
                if not future.done():
                    future.set_exception(
                        LeaseLost(message.offset, "lost", "its connection was lost: redelivered")
                    )
            return
        live.sort(key=lambda pair: pair[0].offset)
        loop = asyncio.get_running_loop()
        # One ACK frame carries at most MAX_RANGES ranges: a tick's acks of interleaved
        # offsets (round-robin hands a member every n-th record) may need several.
        chunk: list[tuple[QueueMessage, asyncio.Future[None]]] = []
        ranges = 0
        previous = -2
        for pair in live:
            offset = pair[0].offset
            if offset != previous + 1:
                if ranges == _MAX_RANGES:
                    self._spawn(loop, self._send_acks(conn, consumer_id, stream_id, chunk))
                    chunk, ranges = [], 0
                ranges += 1
            chunk.append(pair)
            previous = offset
        self._spawn(loop, self._send_acks(conn, consumer_id, stream_id, chunk))

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
        # Kept until done: the loop holds tasks only weakly.
        task = loop.create_task(coro)
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _send_acks(
        self,
        conn: Connection,
        consumer_id: int,
        stream_id: int,
        acks: list[tuple[QueueMessage, asyncio.Future[None]]],
    ) -> None:
        offsets = [m.offset for m, _f in acks]
        try:
            reply = await self._client._with_timeout(
                conn.call(
                    lambda rid: wire.encode_ack(rid, consumer_id, _ranges(offsets)),
                    stream_id=stream_id,
                )
            )
            settled = expect_reply(reply, wire.Settled, wire.OP_SETTLED)
        except BaseException as exc:
            for message, future in acks:  # every waiting ack learns what happened
                message.settled = False
                if not future.done():
                    future.set_exception(_unconfirmed(exc, message.offset))
            if not isinstance(exc, Exception):
                raise  # cancelled: the task ends as cancelled
            return
        refused = {offset: reason for offset, reason in settled.refused}
        for message, future in acks:
            if future.done():
                continue
            reason = refused.get(message.offset)
            if reason is None:
                future.set_result(None)
            else:
                future.set_exception(_refusal(message.offset, reason))

    # -- connection changes (called by the client and its pool) --------------------------

    @property
    def _route(self) -> tuple[str, str]:
        """The names after the tenant in its routing key (the stream's): namespace, stream."""
        return (self._namespace, self._name)

    async def _consume_on(self, conn: Connection) -> None:
        """Join the group on ``conn``; raise what the broker answers."""
        consumer_id = conn.new_consumer_id()
        stream_id = conn.control_stream_for((self._namespace, self._name, self.group))
        conn.consumers[consumer_id] = self
        self._generation += 1
        self._conn, self._consumer_id, self._stream_id = conn, consumer_id, stream_id
        client = self._client
        try:
            reply = await conn.call(
                lambda rid: wire.encode_consume(
                    rid,
                    client.tenant,
                    self._namespace,
                    self._name,
                    self.group,
                    consumer_id,
                    credit_records=self._prefetch,
                    credit_bytes=self._max_bytes,
                ),
                stream_id=stream_id,
            )
            consuming = expect_reply(reply, wire.Consuming, wire.OP_CONSUMING)
        except BaseException as exc:
            conn.consumers.pop(consumer_id, None)
            if self._consumer_id == consumer_id:
                self._conn = self._consumer_id = self._stream_id = None
            if not isinstance(exc, FelixError) or isinstance(exc, FelixTimeoutError):
                # Cancelled or timed out: the broker may have joined it anyway.
                conn.send_nowait(lambda rid: wire.encode_stop_consume(rid, consumer_id))
            raise
        self.role = Role(consuming.role)

    # The pool calls these three like a subscription's (felix/client/_links.py).

    def _on_disconnected(self) -> None:
        self._conn = self._consumer_id = self._stream_id = None
        self._generation += 1  # every lease is gone with the connection
        self._queue.clear()
        for message, future in self._acks:
            if not future.done():
                future.set_exception(
                    LeaseLost(message.offset, "lost", "its connection was lost: redelivered")
                )
        self._acks.clear()
        if self._resume_task is not None:
            self._resume_task.cancel()
            self._resume_task = None

    def _resume(self, conn: Connection) -> None:
        if self._state is _State.ACTIVE:
            self._resume_task = asyncio.create_task(self._resume_on(conn))

    async def _resume_on(self, conn: Connection) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while self._state is _State.ACTIVE and conn.alive:
            try:
                async with asyncio.timeout(self._client.request_timeout):
                    await self._consume_on(conn)
                return
            except Redirected as exc:
                # A cluster's node that no longer owns the stream: go where the map says.
                self._client._learn(exc.redirect)
                self._client._forget_consumer(self)
                await self._reroute_loop()
                return
            except ConnectionLost:
                return  # the next reconnect resumes again
            except TimeoutError:
                conn.fail(FelixTimeoutError(f"re-joining group {self.group!r} timed out"))
                return
            except FelixError as exc:
                if not exc.retryable:
                    self._on_end(exc)
                    return
                log.info("felix client: re-joining group %r: %s; retrying", self.group, exc)
            await asyncio.sleep(backoff.next_delay())

    def _reroute(self) -> None:
        """Join again through the client's shard map, in the background."""
        if self._state is _State.ACTIVE:
            if self._resume_task is not None:
                self._resume_task.cancel()
            self._resume_task = asyncio.create_task(self._reroute_loop())

    async def _reroute_loop(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while self._state is _State.ACTIVE:
            await asyncio.sleep(backoff.next_delay())
            try:
                async with asyncio.timeout(self._client.request_timeout):
                    await self._client._rejoin(self)
                return
            except TimeoutError:
                log.info("felix client: re-joining group %r timed out; retrying", self.group)
            except FelixError as exc:
                if not exc.retryable:
                    self._on_end(exc)
                    return
                log.info("felix client: re-joining group %r: %s; retrying", self.group, exc)

    def _on_client_closed(self) -> None:
        if self._state is not _State.CLOSED:
            self._state = _State.CLOSED
            self._queue.clear()
            self._detach()
            self._wakeup.set()

    def _detach(self) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
            self._resume_task = None
        conn, consumer_id = self._conn, self._consumer_id
        self._conn = self._consumer_id = self._stream_id = None
        if conn is not None and consumer_id is not None:
            conn.consumers.pop(consumer_id, None)


def _unconfirmed(exc: BaseException, offset: int) -> BaseException:
    """What a settle that got no answer raises: a lost connection took the lease with it
    (LeaseLost, reason ``lost``: the broker may redeliver the record); anything else as is."""
    if isinstance(exc, ConnectionLost):
        return LeaseLost(
            offset, "lost", f"the connection was lost before the broker confirmed it ({exc})"
        )
    return exc


def _ranges(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets as (first, count) ranges."""
    out: list[tuple[int, int]] = []
    for offset in offsets:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        elif not out or out[-1][0] + out[-1][1] < offset:
            out.append((offset, 1))
    return out


def _clip(text: str) -> str:
    raw = text.encode()
    if len(raw) <= _MAX_DETAIL:
        return text
    return raw[:_MAX_DETAIL].decode(errors="ignore")


def _refusal(offset: int, reason: int) -> LeaseLost:
    why = _REFUSALS.get(reason, "unknown")
    text = {
        "stale": "leased to another consumer since (it was redelivered)",
        "dead": "moved to the dead-letter stream already",
        "unknown": "never delivered to this group",
    }[why]
    return LeaseLost(offset, why, text)


def _raise_refused(settled: wire.Settled) -> None:
    if settled.refused:
        offset, reason = settled.refused[0]
        raise _refusal(offset, reason)
