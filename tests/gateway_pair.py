"""An in-memory client <-> gateway pair: no sockets, no sleeps, the clock moved by hand.

Like aioquic's ``client_and_server()`` and h11's ``ConnectionPair``: the client
side is the client's sans-IO session (felix/client/_session.py), the gateway
side is the real :class:`~felix.gateway.connection.ConnectionShell` with its
:class:`~felix.gateway.session.GatewaySession` core and a real
:class:`~felix.gateway.gateway.Gateway`, whose shards are real
:class:`~felix.shard.core.ShardCore` objects answering in :meth:`Pair.pump`.
Only QUIC is replaced, by :class:`MemoryTransport`.

    pair = Pair()
    sid = pair.open_control("acme", token="")
    pair.pump()
    assert isinstance(pair.events[sid][0], Authenticated)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from felix import wire
from felix.client._session import ControlEvent, ControlStream, EventStream, EventStreamEvent
from felix.gateway.auth import Authenticator
from felix.gateway.connection import ConnectionShell
from felix.gateway.gateway import Gateway, GatewayLimits
from felix.gateway.links import Deliver
from felix.shard.core import ShardCore, ShardSettings

START = 1_000_000.0  # the pair's clock at the start (seconds; wall-clock-like)


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemoryShards:
    """ShardLinks over in-process shard cores; records are answered in :meth:`pump`."""

    def __init__(self, shards: int, clock: Clock) -> None:
        self.cores = [ShardCore(ShardSettings(index=i, shards=shards)) for i in range(shards)]
        self._clock = clock
        self._deliver: Deliver | None = None
        self._gateway = 0
        self.sent: list[bytes] = []
        self.accept = True  # False: every send fails as a full ring does
        self.max_record_size = 2 * 1024 * 1024  # as a ring of the node's default size

    @property
    def shards(self) -> int:
        return len(self.cores)

    def attach(self, gateway: int, deliver: Deliver) -> None:
        self._gateway, self._deliver = gateway, deliver

    def send(self, shard: int, record: bytes) -> bool:
        if not self.accept:
            return False
        self.sent.append(record)
        self.cores[shard].handle(self._gateway, record, self._clock())
        return True

    def close(self) -> None:
        pass

    def pump(self) -> bool:
        moved = False
        for index, core in enumerate(self.cores):
            records: Sequence[bytes] = core.flush().get(self._gateway, [])
            if records and self._deliver is not None:
                moved = True
                self._deliver(index, records)
        return moved


class MemoryTransport:
    """What the shell writes through, kept in memory (the shell's StreamTransport)."""

    def __init__(self) -> None:
        self.out: dict[int, bytearray] = {}
        self.fin: set[int] = set()
        self.stopped: dict[int, int] = {}
        self.client_stopped: set[int] = set()  # the client sent STOP_SENDING on these
        self.closed: tuple[int, str] | None = None
        self._next_uni = 3  # server-initiated unidirectional stream ids: 3, 7, 11, ...

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if stream_id in self.client_stopped:
            # As both engines do once the peer sent STOP_SENDING (they answer it with
            # RESET_STREAM): qh3 raises ValueError, aioquic RuntimeError.
            raise ValueError("cannot write after RESET_STREAM")
        self.out.setdefault(stream_id, bytearray()).extend(data)
        if end_stream:
            self.fin.add(stream_id)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        self.stopped[stream_id] = error_code

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        if self.closed is None:
            self.closed = (error_code, reason_phrase)

    def next_stream_id(self, unidirectional: bool = False) -> int:
        assert unidirectional
        sid, self._next_uni = self._next_uni, self._next_uni + 4
        return sid

    def send_buffer_size(self, stream_id: int | None = None) -> int:
        return 0  # everything written is delivered at once


class Pair:
    """One client connection to a gateway, in memory (see the module docstring)."""

    def __init__(
        self,
        limits: GatewayLimits | None = None,
        authenticator: Authenticator | None = None,
        *,
        shards: int = 2,
        peer: str = "192.0.2.1",
        sibling: Pair | None = None,
    ) -> None:
        if sibling is None:
            self.clock = Clock()
            self.links = MemoryShards(shards, self.clock)
            self.gateway = Gateway(0, self.links, limits, authenticator=authenticator)
        else:  # another connection to the same gateway
            self.clock, self.links, self.gateway = sibling.clock, sibling.links, sibling.gateway
        gateway = self.gateway
        self.transport = MemoryTransport()
        self.timer_at: float | None = None
        self.shell = ConnectionShell(gateway, self.transport, clock=self.clock, arm_timer=self._arm)
        self.shell.session.peer = peer
        self.shell.handshake_completed()
        self.terminated = False
        self._next_bidi = 0
        self._read: dict[int, int] = {}
        self.controls: dict[int, ControlStream] = {}
        self.event_streams: dict[int, EventStream] = {}
        self.events: dict[int, list[ControlEvent | EventStreamEvent]] = {}

    def connect(self, peer: str = "192.0.2.1") -> Pair:
        """Another client connection to the same gateway (same shards, same clock)."""
        return Pair(peer=peer, sibling=self)

    def _arm(self, when: float | None) -> None:
        self.timer_at = when

    # -- client side -------------------------------------------------------------------

    def new_stream(self) -> int:
        sid, self._next_bidi = self._next_bidi, self._next_bidi + 4
        return sid

    def open_control(self, tenant: str = "acme", token: str = "") -> int:
        """Open a control stream as the felix client does and send its auth frame."""
        sid = self.new_stream()
        self.controls[sid] = ControlStream(tenant, token)
        self.send(sid, self.controls[sid].auth_frame())
        return sid

    def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Bytes from the client on ``stream_id`` (delivered to the gateway at once)."""
        self.shell.stream_data(stream_id, data, end_stream)

    def reset(self, stream_id: int) -> None:
        self.shell.stream_reset(stream_id)

    def stop_sending(self, stream_id: int, *, tell_gateway: bool = True) -> None:
        """The client sends STOP_SENDING on ``stream_id``: writes on it raise from now on.

        ``tell_gateway`` False: the gateway has not seen the frame yet (a write races it).
        """
        self.transport.client_stopped.add(stream_id)
        if tell_gateway:
            self.shell.stop_sending(stream_id)

    # -- moving things along ---------------------------------------------------------

    def pump(self) -> None:
        """Let the shards answer and the client read, until nothing moves."""
        while self.links.pump():
            pass
        if self.transport.closed is not None and not self.terminated:
            self.terminated = True
            self.shell.connection_terminated()
        for sid, data in self.transport.out.items():
            start = self._read.get(sid, 0)
            new = bytes(data[start:])
            self._read[sid] = len(data)
            end = sid in self.transport.fin and start <= len(data)
            if not new and not end:
                continue
            if sid in self.controls:
                self.events.setdefault(sid, []).extend(self.controls[sid].receive(new, end))
            elif sid & 0x3 == 3:
                stream = self.event_streams.setdefault(sid, EventStream())
                self.events.setdefault(sid, []).extend(stream.receive(new, end))

    def advance(self, seconds: float, *others: Pair) -> None:
        """Move the clock; fire the gateway's timer (and ``others``') if due."""
        self.clock.now += seconds
        for pair in (self, *others):
            if pair.timer_at is not None and pair.clock.now >= pair.timer_at:
                pair.shell.timer_fired()
            pair.pump()

    # -- reading what the gateway wrote ---------------------------------------------------

    def frames(self, stream_id: int) -> list[wire.Frame]:
        """Every frame the gateway wrote on ``stream_id`` (raw, for non-client peers)."""
        reader = wire.FrameReader(wire.DEFAULT_MAX_FRAME_SIZE, accept_flags=wire.FLAGS_ALL)
        reader.feed(bytes(self.transport.out.get(stream_id, b"")))
        return list(reader)

    def messages(self, stream_id: int) -> list[Any]:
        """The frames on ``stream_id`` decoded: JSON messages as dicts, extension frames."""
        out: list[Any] = []
        for frame in self.frames(stream_id):
            if frame.flags == wire.FLAG_FELIX_EXT:
                out.append(wire.decode_ext(frame))
            else:
                out.append(wire.decode_message(frame))
        return out
