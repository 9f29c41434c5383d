"""Subscriptions: an async iterator over a stream's records, with credit and resume.

How it works: a :class:`Subscription` is registered on one pooled connection
under a subscription id before SUBSCRIBE is sent (events may beat the
SUBSCRIBED reply, docs/wire-protocol.md "Sessions" item 3). Records go into the
bounded queue kept by :class:`~felix.client._flow.SubscriptionFlow`; consuming
them returns credit. When the connection is lost the subscription waits; after
the reconnect the client calls :meth:`Subscription._resume`, which subscribes
again from the next offset not yet received (``start=offset``), so records
queued locally are kept and nothing is delivered twice; records that left the
broker meanwhile are counted in ``dropped`` and reported as a SlowConsumer event.

In a cluster (felix/client/_cluster.py) a subscription whose shard moved (the
broker ends it with Unavailable, or its connection is lost, or a re-SUBSCRIBE is
redirected) subscribes again the same way, from the next offset, on the connection
the client's shard map picks (:meth:`Subscription._reroute`). An in-memory stream
starts empty on its new owner: there the subscription goes on from ``latest``, and
offsets begin again (the records it missed are not counted: they are unknown).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from types import TracebackType

from felix import wire
from felix.client._backoff import Backoff
from felix.client._cluster import Redirected
from felix.client._connection import Connection, expect_reply
from felix.client._convert import WireStart
from felix.client._e2e import E2EKeys
from felix.client._events import SlowConsumer
from felix.client._flow import Message, SubscriptionFlow
from felix.client._links import ClientLink
from felix.errors import (
    ConnectionLost,
    CursorError,
    FelixError,
    FelixTimeoutError,
    LocalProtocolError,
    RemoteProtocolError,
)

__all__ = ["Subscription"]

log = logging.getLogger("felix.client")


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    ACTIVE = "active"
    ENDED = "ended"  # by the broker (SUBSCRIPTION_END) or a broken event stream
    CLOSED = "closed"  # by this side


class Subscription:
    """A subscription to one stream; create it with ``client.subscribe()``.

    Use it as ``async with client.subscribe("orders") as sub: async for msg in sub:``.
    Entering subscribes (raising ``CursorError`` for an unservable start, or the
    broker's error); leaving unsubscribes. Iteration yields :class:`Message`
    objects in offset order and continues across reconnects; it ends when the
    subscription or the client is closed, and raises the mapped error when the
    broker ends the subscription (SUBSCRIPTION_END with a non-zero code).
    """

    def __init__(
        self,
        client: ClientLink,
        stream: str,
        namespace: str,
        name: str,
        start: WireStart,
        credit: int,
        e2e: E2EKeys | None = None,
    ) -> None:
        self._client = client
        #: The stream name as given to ``subscribe()``.
        self.stream = stream
        self._namespace = namespace
        self._name = name
        self._start = start
        # End-to-end encryption binds a record to its stream: tenant/namespace/name.
        path = "" if e2e is None else f"{client.tenant}/{namespace}/{name}"
        self._flow = SubscriptionFlow(stream, credit, e2e, path)
        self._state = _State.NEW
        self._error: FelixError | None = None
        self._wakeup = asyncio.Event()
        self._conn: Connection | None = None
        self._sub_id: int | None = None
        self._resume_task: asyncio.Task[None] | None = None

    # -- public API ----------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Records this subscription never received: slow-subscriber drops and offset gaps."""
        return self._flow.dropped

    @property
    def pending(self) -> int:
        """Records received and not yet taken by the application (at most about the window)."""
        return len(self._flow.queue)

    async def start(self) -> None:
        """Subscribe (what ``async with`` does on entry). Call once.

        Raises CursorError if the start offset cannot be served, the broker's
        error (NotFound, PermissionDenied, ...), FelixTimeoutError after the
        client's request timeout, ConnectionLost if the client is closed.
        """
        if self._state is not _State.NEW:
            raise LocalProtocolError("a subscription can be started only once")
        self._state = _State.STARTING
        try:
            await self._client._start_subscription(self)
        except BaseException:
            self._state = _State.CLOSED
            raise
        if self._state is _State.STARTING:  # not already ended by the broker
            self._state = _State.ACTIVE

    async def close(self) -> None:
        """Unsubscribe and end iteration (what leaving ``async with`` does). Idempotent.

        Does not wait for the broker's answer: events that still arrive are dropped.
        """
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._flow.queue.clear()
        self._detach(unsubscribe=True)
        self._client._forget_subscription(self)
        self._wakeup.set()

    async def next(self, timeout: float | None = None) -> Message:
        """The next message, waiting up to ``timeout`` seconds (None: no limit).

        Raises FelixTimeoutError when the time is up, the broker's error if it
        ended the subscription, ConnectionLost if the subscription or client
        was closed (or the broker ended it cleanly).
        """
        message = await self._next(timeout)
        if message is None:
            raise ConnectionLost("the subscription is closed")
        return message

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        message = await self._next(None)
        if message is None:
            raise StopAsyncIteration
        return message

    async def __aenter__(self) -> Subscription:
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
        return f"<Subscription {self.stream!r} {self._state.value} next={self._flow.next_offset}>"

    # -- receiving -----------------------------------------------------------------------

    async def _next(self, timeout: float | None) -> Message | None:
        if self._state in (_State.NEW, _State.STARTING):
            raise LocalProtocolError(
                "start the subscription first (async with client.subscribe(...))"
            )
        # A message already here needs no timer (the common case under load).
        message = self._flow.take()
        if message is not None:
            self._return_credit()
            return message
        if timeout is None:
            return await self._wait_next()
        try:
            async with asyncio.timeout(timeout):
                return await self._wait_next()
        except TimeoutError as exc:
            if isinstance(exc, FelixError):
                raise
            raise FelixTimeoutError(f"no message on {self.stream!r} within {timeout} s") from None

    async def _wait_next(self) -> Message | None:
        while True:
            message = self._flow.take()
            if message is not None:
                self._return_credit()
                return message
            if self._error is not None:
                raise self._error
            if self._state is not _State.ACTIVE:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    def _return_credit(self) -> None:
        credit = self._flow.credit_due()
        conn, sub_id = self._conn, self._sub_id
        if credit and conn is not None and sub_id is not None and conn.alive:
            conn.send_nowait(lambda rid: wire.encode_credit(rid, sub_id, credit))

    def _on_events(self, message: wire.Events) -> None:
        before = self._flow.next_offset
        gap = self._flow.on_events(message.base_offset, message.payloads, message.headers)
        self._report_gap(before, message.base_offset, gap)
        self._wakeup.set()

    def _on_slow_consumer(self, first_dropped: int, dropped: int) -> None:
        before = self._flow.next_offset
        gap = self._flow.on_slow_consumer(first_dropped, dropped)
        self._report_gap(before, first_dropped, gap)

    def _report_gap(self, before: int | None, first: int, gap: int) -> None:
        if gap:
            self._client._emit(SlowConsumer(self.stream, first if before is None else before, gap))

    def _on_end(self, error: FelixError | None) -> None:
        """The broker ended the subscription (error None: cleanly) or its event stream broke."""
        self._conn = self._sub_id = None
        if self._state is _State.ACTIVE and self._client._reroutes(error):
            # A cluster's shard moved (or its node is leaving): subscribe where it is now.
            self._client._forget_subscription(self)
            self._reroute()
            return
        if self._state in (_State.STARTING, _State.ACTIVE):
            self._state = _State.ENDED
            self._error = error
            self._client._forget_subscription(self)
            self._wakeup.set()

    # -- connection changes (called by the client) ---------------------------------------

    @property
    def _route(self) -> tuple[str, str]:
        """The names after the tenant in this subscription's routing key."""
        return (self._namespace, self._name)

    async def _subscribe_on(self, conn: Connection, start: WireStart | None = None) -> None:
        """Register on ``conn`` and SUBSCRIBE from ``start`` (None: the start asked for);
        raise what the broker answers."""
        if start is None:
            start = self._start
        sub_id = conn.new_subscription_id()
        credit = self._flow.subscribe_credit()
        conn.subscriptions[sub_id] = self
        self._conn, self._sub_id = conn, sub_id
        client = self._client
        try:
            reply = await conn.call(
                lambda rid: wire.encode_subscribe(
                    rid,
                    client.tenant,
                    self._namespace,
                    self._name,
                    sub_id,
                    start=start,
                    credit=credit,
                )
            )
            subscribed = expect_reply(reply, wire.Subscribed, wire.OP_SUBSCRIBED)
            if subscribed.subscription_id != sub_id:
                raise RemoteProtocolError(
                    f"SUBSCRIBED for subscription {subscribed.subscription_id}, expected {sub_id}"
                )
        except BaseException as exc:
            conn.subscriptions.pop(sub_id, None)
            if self._sub_id == sub_id:
                self._conn = self._sub_id = None
            if not isinstance(exc, FelixError) or isinstance(exc, FelixTimeoutError):
                # Cancelled or timed out: the broker may have subscribed anyway.
                conn.send_nowait(lambda rid: wire.encode_unsubscribe(rid, sub_id))
            raise
        before = self._flow.next_offset
        self._report_gap(
            before, subscribed.start_offset, self._flow.on_subscribed(subscribed.start_offset)
        )

    def _on_disconnected(self) -> None:
        self._conn = self._sub_id = None
        if self._resume_task is not None:
            self._resume_task.cancel()
            self._resume_task = None

    def _resume(self, conn: Connection) -> None:
        """Subscribe again on ``conn`` (after a reconnect), in the background."""
        if self._state is _State.ACTIVE:
            self._resume_task = asyncio.create_task(self._resume_on(conn))

    async def _resume_on(self, conn: Connection) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        start: WireStart = self._start if self._flow.next_offset is None else self._flow.next_offset
        while self._state is _State.ACTIVE and conn.alive:
            try:
                async with asyncio.timeout(self._client.request_timeout):
                    await self._subscribe_on(conn, start)
                return
            except Redirected as exc:
                # A cluster's node that no longer owns the stream: go where the map says.
                self._client._learn(exc.redirect)
                self._client._forget_subscription(self)
                await self._reroute_loop()
                return
            except CursorError as exc:
                if exc.reason == "too_old" and isinstance(start, int) and exc.available > start:
                    start = exc.available  # the gap is counted when SUBSCRIBED arrives
                    continue
                self._on_end(exc)  # the stream went backwards: resuming would lie
                return
            except ConnectionLost:
                return  # the next reconnect resumes again
            except TimeoutError:
                conn.fail(FelixTimeoutError(f"re-subscribing to {self.stream!r} timed out"))
                return
            except FelixError as exc:
                if not exc.retryable:
                    self._on_end(exc)
                    return
                log.info("felix client: re-subscribing to %r: %s; retrying", self.stream, exc)
            await asyncio.sleep(backoff.next_delay())

    def _reroute(self) -> None:
        """Subscribe again through the client's shard map, in the background."""
        if self._state is _State.ACTIVE:
            if self._resume_task is not None:
                self._resume_task.cancel()
            self._resume_task = asyncio.create_task(self._reroute_loop())

    async def _reroute_loop(self) -> None:
        # As _resume_on, but each attempt picks its connection by the map (and follows
        # REDIRECTs), until it succeeds or the subscription ends.
        backoff = Backoff(base=0.05, cap=2.0)
        start: WireStart = self._start if self._flow.next_offset is None else self._flow.next_offset
        while self._state is _State.ACTIVE:
            await asyncio.sleep(backoff.next_delay())
            try:
                async with asyncio.timeout(self._client.request_timeout):
                    await self._client._resubscribe(self, start)
                return
            except CursorError as exc:
                if exc.reason == "too_old" and isinstance(start, int) and exc.available > start:
                    start = exc.available  # the gap is counted when SUBSCRIBED arrives
                    continue
                if exc.reason == "in_future" and isinstance(start, int):
                    # An in-memory stream whose shard moved starts empty on its new owner
                    # (docs/architecture.md, "Failover and durable data"): go on from its
                    # latest record; its offsets begin again there.
                    log.info(
                        "felix client: %r starts again at offset %d on its new node",
                        self.stream,
                        exc.available,
                    )
                    self._flow.restart()
                    start = "latest"
                    continue
                self._on_end(exc)
                return
            except TimeoutError:
                log.info("felix client: re-subscribing to %r timed out; retrying", self.stream)
            except FelixError as exc:
                if not exc.retryable:
                    self._on_end(exc)
                    return
                log.info("felix client: re-subscribing to %r: %s; retrying", self.stream, exc)

    def _on_client_closed(self) -> None:
        if self._state is not _State.CLOSED:
            self._state = _State.CLOSED
            self._flow.queue.clear()
            self._detach(unsubscribe=False)
            self._wakeup.set()

    def _detach(self, *, unsubscribe: bool) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
            self._resume_task = None
        conn, sub_id = self._conn, self._sub_id
        self._conn = self._sub_id = None
        if conn is not None and sub_id is not None:
            conn.subscriptions.pop(sub_id, None)
            if unsubscribe:
                conn.send_nowait(lambda rid: wire.encode_unsubscribe(rid, sub_id))
