"""Client connections to a gateway: the shell around each connection's protocol core.

How it works: the protocol rules of a connection (auth handshake, flags,
admission, deadlines) are in :class:`~felix.gateway.session.GatewaySession`,
which does no I/O. This module carries out what it decides:

- :class:`ConnectionShell` feeds a session what arrives (client bytes, shard
  replies, the time), performs the actions it hands back (write on a stream,
  forward to a shard through the :class:`~felix.gateway.gateway.Gateway`,
  stop a stream, close the connection, write an audit line) and arms one timer
  at the session's next deadline. It is what the gateway and subscriptions see
  as a connection, and it writes through a :class:`StreamTransport`: the QUIC
  connection below, or an in-memory one in tests.
- :class:`GatewayConnection` is the QUIC side: the engine's hooks feed the
  shell, and it is the shell's transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from felix import audit, ipc, wire
from felix.errors import BadRequest, ConnectionLost, FelixError
from felix.gateway.actions import (
    Action,
    Audit,
    CloseConnection,
    ConnectionAuthenticated,
    ConnectionUnauthenticated,
    Consume,
    Credit,
    EndConsumers,
    Forward,
    QueueOp,
    Send,
    StopStream,
    Subscribe,
    Unsubscribe,
)
from felix.gateway.admission import admission_source
from felix.gateway.gateway import CLOSE_INPUT_LIMIT, CLOSE_OVERLOADED, Gateway, _Pending
from felix.gateway.queues import Consumer
from felix.gateway.session import GatewaySession
from felix.gateway.subscription import MAX_CREDIT, Subscription
from felix.ipc import RecordType
from felix.quic.transport import CLOSE_INTERNAL_ERROR, ConnectionHandler
from felix.quic.transport import StreamTransport as QuicStreamTransport

#: The actions that write to the client's connection (checked per action: a tuple,
#: not a union built on every call).
_WRITES = (Send, StopStream, CloseConnection)

#: Arms the shell's one timer: called with the absolute time (shell clock) or None.
ArmTimer = Callable[[float | None], None]


class StreamTransport(Protocol):
    """What a shell writes through (the part of felix.quic.transport.StreamTransport it uses)."""

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...

    def stop_stream(self, stream_id: int, error_code: int) -> None: ...

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None: ...

    def next_stream_id(self, unidirectional: bool = False) -> int: ...

    def send_buffer_size(self, stream_id: int | None = None) -> int: ...


class ConnectionShell:
    """One client connection as the gateway sees it: a session core and its I/O."""

    def __init__(
        self,
        gateway: Gateway,
        transport: StreamTransport,
        *,
        clock: Callable[[], float] = time.time,
        arm_timer: ArmTimer | None = None,
    ) -> None:
        self.gateway = gateway
        self.transport = transport
        self._clock = clock
        self._arm_timer = arm_timer
        self.subscriptions: dict[int, Subscription] = {}
        #: Queue consumers of this connection, by the client's consumer id.
        self.consumers: dict[int, Consumer] = {}
        #: Subscriptions behind only because their event stream is full: read again
        #: once the connection transmits (Gateway.transmitted).
        self.backlogged: set[Subscription] = set()
        self.session = GatewaySession(gateway, "?", self.subscriptions, self.consumers)

    @property
    def peer(self) -> str:
        return self.session.peer

    # -- input ------------------------------------------------------------------------

    def handshake_completed(self) -> None:
        """Admit the connection (felix/gateway/admission.py); its auth deadline starts.

        Refusals wait for the handshake: a close sent earlier may not be readable yet.
        """
        gateway = self.gateway
        admitted, evicted = gateway.admission.admit(self, admission_source(self.peer))
        for idle in evicted:
            gateway.evicted_connections += 1
            idle.close(
                CLOSE_OVERLOADED,
                "closed unauthenticated: the gateway needed the room for a new connection",
            )
        if not admitted:
            gateway.refused_connections += 1
            self.close(CLOSE_OVERLOADED, "gateway at its connection limit")
            return
        self.session.handshake_completed(self._clock())
        self._run()

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.session.receive(stream_id, data, end_stream, self._clock())
        self._run()
        gateway = self.gateway
        if gateway.buffered_input > gateway.limits.max_buffered_input:
            # The gateway's budget for incomplete frames is spent: the connection holding
            # the most pays (an attacker's, as a rule), not whoever happened to be last.
            worst = max(gateway.connections, key=lambda c: c.session.buffered, default=self)
            gateway.input_limit_closes += 1
            worst.close(CLOSE_INPUT_LIMIT, "over the gateway's budget for incomplete frames")

    def stream_reset(self, stream_id: int) -> None:
        self.session.stream_reset(stream_id, self._clock())
        self._run()

    def stop_sending(self, stream_id: int) -> None:
        self.session.stop_sending(stream_id, self._clock())
        self._run()

    def timer_fired(self) -> None:
        self.session.handle_timer(self._clock())
        self._run()

    def connection_terminated(self) -> None:
        self.session.connection_lost()
        self.gateway.connection_lost(self)
        self._run()

    # -- what the gateway calls ---------------------------------------------------------

    def reply(self, pending: _Pending, frame: bytes) -> None:
        self.session.reply(pending.stream_id, frame)
        self._run()

    def reply_error(self, pending: _Pending, exc: FelixError) -> None:
        self.session.reply_error(pending.stream_id, pending.request_id, exc)
        self._run()

    def settle(self, pending: _Pending) -> None:
        self.session.settle(pending.stream_id, self._clock())
        self._run()

    def close(self, error_code: int, reason: str) -> None:
        self.session.close(error_code, reason)
        self._run()

    def send_buffer_size(self) -> int:
        return self.transport.send_buffer_size()

    # -- performing the session's actions -----------------------------------------------

    def _run(self) -> None:
        try:
            actions = self.session.actions()
            while actions:
                for action in actions:
                    self._perform(action)
                actions = self.session.actions()
        finally:
            # Re-armed even after a bug: a lost timer would leave the connection's
            # deadlines (token expiry, auth and frame deadlines) unenforced for good.
            if self._arm_timer is not None:
                self._arm_timer(self.session.get_timer())

    def _perform(self, action: Action) -> None:
        transport = self.transport
        # The engines refuse writes on a stream the client stopped or reset (ValueError,
        # RuntimeError) and on a closing connection (ConnectionLost): one refused write
        # is counted and must not cost the actions after it.
        if not isinstance(action, _WRITES):
            self._apply(action)
            return
        try:
            if isinstance(action, Send):
                transport.send_stream_data(action.stream_id, action.data, action.end_stream)
            elif isinstance(action, StopStream):
                transport.stop_stream(action.stream_id, action.code)
            else:
                transport.close(action.code, action.reason)
        except (ValueError, RuntimeError, ConnectionLost):
            self.gateway.internal_error(f"{type(action).__name__} refused by the connection")

    def _apply(self, action: Action) -> None:
        """The actions that are not writes to the client."""
        if isinstance(action, Forward):
            self._forward(action)
        elif isinstance(action, Subscribe):
            self._subscribe(action)
        elif isinstance(action, Credit):
            sub = self.subscriptions.get(action.sub_id)
            if sub is not None:
                self.gateway.credit(sub, action.credit)
        elif isinstance(action, Unsubscribe):
            sub = self.subscriptions.get(action.sub_id)
            if sub is not None:
                self.gateway.unsubscribe(sub)
                self.end_subscription(sub, action.code, action.message)
        elif isinstance(action, Consume):
            self._consume(action)
        elif isinstance(action, QueueOp):
            self._queue_op(action)
        elif isinstance(action, EndConsumers):
            self.gateway.queues.stream_closed(self, action.stream_id)
        elif isinstance(action, ConnectionAuthenticated):
            self.gateway.admission.authenticated(self)
        elif isinstance(action, ConnectionUnauthenticated):
            self.gateway.admission.idle_again(self, admission_source(self.peer))
        elif isinstance(action, Audit):
            audit.emit(
                action.event,
                who=action.who,
                source=action.source,
                tenant=action.tenant,
                action=action.action,
                object=action.object,
                result="denied",
                reason=action.reason,
                detail=action.detail,
            )

    def _forward(self, action: Forward) -> None:
        gateway = self.gateway
        token = gateway.token()
        shard = gateway.shard_for(action.key)
        pending = _Pending(self, action.stream_id, action.request_id, shard, None, action.translate)
        pending.quiet = action.quiet
        if not gateway.forward(
            pending, token, ipc.encode(RecordType.REQUEST, token, 0, action.frame), action.key
        ):
            self.session.settle(action.stream_id, self._clock())

    def _subscribe(self, action: Subscribe) -> None:
        gateway = self.gateway
        key = action.key
        sub = Subscription(
            self,
            action.sub_id,
            key,
            gateway.shard_for(key),
            gateway.token(),
            action.credit,
            "drop_old",  # until the shard's SUBSCRIBED reply names the stream's policy
        )
        if action.v1_offsets is not None:
            # v1 has no credit: the QUIC send buffer bound alone paces the subscriber.
            sub.v1_offsets = action.v1_offsets
            sub.credit = MAX_CREDIT
        self.subscriptions[sub.sub_id] = sub
        gateway.add_subscription(sub)
        pending = _Pending(
            self, action.stream_id, action.request_id, sub.shard, sub, action.translate
        )
        record = ipc.encode(RecordType.REQUEST, sub.token, 0, action.frame)
        if not gateway.forward(pending, sub.token, record, key):
            gateway.unsubscribe(sub)  # could not be sent: forget it
            self.session.settle(action.stream_id, self._clock())

    def _consume(self, action: Consume) -> None:
        gateway = self.gateway
        consumer = Consumer(
            self,
            action.consumer_id,
            action.key,
            action.group,
            gateway.shard_for(action.key),
            gateway.token(),
            action.stream_id,
            ipc.queue_credit_bytes(action.credit_bytes),
        )
        self.consumers[consumer.consumer_id] = consumer
        gateway.queues.add(consumer)
        pending = _Pending(self, action.stream_id, action.request_id, consumer.shard)
        pending.consumer = consumer
        record = ipc.encode(RecordType.REQUEST, consumer.token, 0, action.frame)
        if not gateway.forward(pending, consumer.token, record, action.key):
            gateway.queues.drop(consumer, leave=False)  # could not be sent: forget it
            self.session.settle(action.stream_id, self._clock())

    def _queue_op(self, action: QueueOp) -> None:
        gateway = self.gateway
        consumer = self.consumers.get(action.consumer_id)
        pending = _Pending(
            self, action.stream_id, action.request_id, consumer.shard if consumer else 0
        )
        if consumer is None:
            # Ended meanwhile (its shard restarted, its group was removed).
            self.reply_error(pending, BadRequest(f"no consumer {action.consumer_id}"))
            self.session.settle(action.stream_id, self._clock())
            return
        token = gateway.token()
        record = ipc.encode(RecordType.REQUEST, token, consumer.token, action.frame)
        sent = gateway.forward(pending, token, record, consumer.key, redirect=False)
        if action.stop:
            # Sent: the STOP tells the shard (a graceful leave); not sent: a LEAVE does.
            gateway.queues.drop(consumer, leave=not sent)
        if not sent:
            self.session.settle(action.stream_id, self._clock())

    def stream_backlog(self, stream_id: int) -> int:
        """Bytes queued on ``stream_id`` and not yet sent (0 when it is gone)."""
        try:
            return self.transport.send_buffer_size(stream_id)
        except (ValueError, RuntimeError, KeyError):
            return 0

    def deliver(self, consumer: Consumer, frame: bytes) -> bool:
        """Write a queue delivery (or notice) on the consumer's stream; False: it is gone."""
        if not self.session.can_send(consumer.stream_id):
            return False
        try:
            self.transport.send_stream_data(consumer.stream_id, frame)
        except (ValueError, RuntimeError, ConnectionLost):
            self.gateway.internal_error("write to a queue consumer's stream")
            return False
        return True

    # -- subscriptions ------------------------------------------------------------------

    # A failure writing to one subscriber's event stream (the client reset it, the
    # engine refused it) drops that subscription only, after the delivery batch, and
    # is counted, not logged per event (Gateway.subscriber_failed, internal_error).

    def _write_event(self, sub: Subscription, stream_id: int, data: bytes, end: bool) -> bool:
        try:
            self.transport.send_stream_data(stream_id, data, end)
        except Exception:
            self.gateway.internal_error("write to a subscriber's event stream")
            self.gateway.subscriber_failed(sub)
            return False
        return True

    def open_event_stream(self, sub: Subscription) -> None:
        try:
            stream_id = self.transport.next_stream_id(unidirectional=True)
        except Exception:
            self.gateway.internal_error("new event stream")
            self.gateway.subscriber_failed(sub)
            return
        hello = wire.encode_message({"type": "event_stream_hello", "subscription_id": sub.sub_id})
        if self._write_event(sub, stream_id, hello, False):
            sub.event_stream = stream_id

    def event_stream_backlog(self, sub: Subscription) -> int:
        if sub.event_stream is None:
            return 0
        return self.transport.send_buffer_size(sub.event_stream)

    def send_events(self, sub: Subscription, frame: bytes, base: int, count: int) -> None:
        if sub.event_stream is None:
            self.gateway.subscriber_failed(sub)  # its event stream could not be opened
        elif self._write_event(sub, sub.event_stream, frame, False):
            sub.delivered(base, count)

    def send_slow_consumer(self, sub: Subscription, first_dropped: int, dropped: int) -> None:
        if sub.event_stream is not None:
            notice = wire.encode_slow_consumer(sub.sub_id, first_dropped, dropped)
            self._write_event(sub, sub.event_stream, notice, False)

    def end_subscription(self, sub: Subscription, code: int, message: str) -> None:
        if sub.event_stream is not None:
            stream_id, sub.event_stream = sub.event_stream, None
            end = wire.encode_subscription_end(sub.sub_id, code, message)
            self._write_event(sub, stream_id, end, True)


class GatewayConnection(ConnectionHandler):
    """One client's QUIC connection to a gateway: engine hooks in, shell actions out."""

    def __init__(self, gateway: Gateway, transport: QuicStreamTransport) -> None:
        super().__init__(transport)
        self.gateway = gateway
        self._session_timer: asyncio.TimerHandle | None = None
        self._session_timer_at: float | None = None
        self.shell = ConnectionShell(gateway, self, arm_timer=self._arm)
        # The source address (known from the client's first Initial packet): what failed
        # authentications and unauthenticated connections are counted by.
        self.shell.session.peer = transport.peer

    def _arm(self, when: float | None) -> None:
        """Keep one loop timer at ``when`` (wall clock, as the session's)."""
        if when == self._session_timer_at:
            return
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
        self._session_timer_at = when
        if when is not None:
            delay = max(when - time.time(), 0.0)
            self._session_timer = asyncio.get_running_loop().call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._session_timer = None
        self._session_timer_at = None
        try:
            self.shell.timer_fired()
        except Exception:
            self._internal_error("deadline")

    # -- QUIC hooks ------------------------------------------------------------------

    # A bug reached from client input closes that connection; the traceback is logged
    # once per place, later ones only counted (felix_internal_errors), never per event.

    def transmitted(self) -> None:
        if self.shell.backlogged:
            try:
                self.gateway.transmitted(self.shell)
            except Exception:
                self.gateway.internal_error("resuming subscribers after a transmit")

    def _on_handshake_completed(self, alpn_protocol: str | None) -> None:
        try:
            self.shell.handshake_completed()
        except Exception:
            self._internal_error("handshake")

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        try:
            self.shell.stream_data(stream_id, data, end_stream)
        except Exception:
            self._internal_error("client's stream data")

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        try:
            self.shell.stream_reset(stream_id)
        except Exception:
            self._internal_error("client's stream reset")

    def _on_stop_sending(self, stream_id: int, error_code: int) -> None:
        try:
            self.shell.stop_sending(stream_id)
        except Exception:
            self._internal_error("client's stop-sending")

    def _internal_error(self, where: str) -> None:
        self.gateway.internal_error(where)
        if self.close_reason is None:
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        self._arm(None)
        self.shell.connection_terminated()


def connection_factory(gateway: Gateway) -> Callable[[QuicStreamTransport], GatewayConnection]:
    """The create-handler of ``gateway``'s server: a GatewayConnection for each new transport."""
    return partial(GatewayConnection, gateway)
