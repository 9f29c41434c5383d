"""The supervisor's view of one child process: its state, its messages, its health.

A :class:`Child` lives as long as the node; each start of its process is an
incarnation. The supervisor (felix/node/supervisor.py) starts and restarts it;
this module keeps what is known about it and speaks felix/node/messages.py to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from felix.errors import RemoteProtocolError
from felix.node import messages as msg
from felix.node.liveness import Health, Heartbeat, RestartBackoff
from felix.node.process import ChildProcess

log = logging.getLogger("felix.supervisor")


@dataclass
class Child:
    role: str  # "shard" | "gateway" | "control"
    index: int
    heartbeat: Heartbeat
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    incarnation: int = 0
    proc: ChildProcess | None = None
    writer: asyncio.StreamWriter | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    quiesced: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    #: The last start-up progress of this incarnation (msg.Starting): when, and what.
    progress_at: float = 0.0
    progress: str | None = None
    restarts: int = 0
    #: Replacements that could not be started or died (or hung) before they were ready.
    failed_starts: int = 0
    #: Why the child is not serving right now (None: it is, or it is starting normally).
    problem: str | None = None
    #: Why the supervisor killed it (reported when it exits).
    kill_reason: str | None = None
    #: Whether the heartbeat found it silent at the last check (logged once per silence).
    unresponsive: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    #: Cluster mode: the newest shard map version this incarnation acknowledged.
    ownership_acked: int = 0
    #: Status route requests waiting for this child's answer, by request number.
    status_waiters: dict[int, asyncio.Future[dict[str, Any] | None]] = field(default_factory=dict)
    #: Gets the control process's answers to feed requests (felix/node/control.py).
    on_feed_event: Callable[[msg.Event], None] | None = None
    #: Gets a shard's (or a gateway's shard cores') reports of resources created on first
    #: use (felix/node/registrar.py).
    on_auto_created: Callable[[list[dict[str, Any]]], None] | None = None
    #: Cluster mode: the logical shards whose pin a shard core wants claimed now.
    on_pin_wanted: Callable[[list[int]], None] | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def serves_data(self) -> bool:
        """Whether the data plane needs it (the control process: only for changes)."""
        return self.role != "control"

    def send(self, message: msg.Command) -> bool:
        """Queue ``message`` to the running incarnation; False if there is none."""
        if self.writer is None or self.writer.is_closing():
            return False
        self.writer.write(msg.encode(message))
        return True

    def status(self, now: float) -> str | None:
        """What /readyz says about this child (None: serving)."""
        if self.problem is not None:
            return self.problem
        if not self.ready.is_set():
            return "starting" if self.progress is None else f"starting ({self.progress})"
        if self.heartbeat.health(now) is not Health.OK:
            return (
                f"unresponsive: no heartbeat for {self.heartbeat.silent_for(now):.1f} s "
                f"(killed and restarted at {self.heartbeat.kill_after:g} s)"
            )
        return None

    def running(self) -> bool:
        """Whether an incarnation runs and talks to the supervisor."""
        return (
            self.proc is not None
            and self.proc.returncode is None
            and self.writer is not None
            and not self.writer.is_closing()
        )

    def stalled_for(self, now: float) -> float:
        """Seconds since this incarnation started or last reported start-up progress."""
        return now - max(self.started_at, self.progress_at)

    def is_serving(self, now: float) -> bool:
        return self.status(now) is None

    async def read_events(self, reader: asyncio.StreamReader) -> None:
        """Handle this incarnation's events until its socket closes."""
        with contextlib.suppress(ConnectionError):
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the limit: skip it (never from felix)
                    log.warning("%s sent an oversized control message", self.name)
                    continue
                if not line:
                    return
                try:
                    event = msg.decode(line)
                except RemoteProtocolError as exc:
                    log.warning("%s sent a bad control message: %s", self.name, exc)
                    continue
                self._on_event(event)

    def _on_event(self, event: msg.Message) -> None:
        if isinstance(event, msg.Ready):
            self.heartbeat.start(time.monotonic())
            self.progress = None
            self.ready.set()
        elif isinstance(event, msg.Starting):
            self.progress_at = time.monotonic()
            self.progress = event.detail[:200]
        elif isinstance(event, msg.Pong):
            self.heartbeat.pong(event.seq, time.monotonic())
        elif isinstance(event, msg.Quiesced):
            self.quiesced.set()
        elif isinstance(event, msg.Drained):
            self.drained.set()
        elif isinstance(event, msg.Stats):
            self.stats = {k: v for k, v in event.counters.items() if isinstance(v, int)}
        elif isinstance(event, msg.StreamStatusReply):
            waiter = self.status_waiters.pop(event.request, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event.status)
        elif isinstance(event, msg.OwnershipAck):
            self.ownership_acked = max(self.ownership_acked, event.version)
        elif isinstance(event, msg.AutoCreated):
            if self.on_auto_created is not None:
                self.on_auto_created(event.resources)
        elif isinstance(event, msg.PinWanted):
            if self.on_pin_wanted is not None:
                self.on_pin_wanted(event.shards)
        elif self.on_feed_event is not None and isinstance(event, msg.Event):
            self.on_feed_event(event)
