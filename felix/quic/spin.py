"""Busy-polling a server's UDP socket for a while after traffic (``felix up --spin-us``).

Why: on a VM a process that sleeps in epoll is woken by the kernel through an
inter-processor interrupt when a datagram arrives, and on this project's 2-vCPU
test machine that wake-up is a large part of a one-in-flight round trip
(perf/README.md, "Where the time goes"). A process that is still running when the
next request lands needs no wake-up. So after each datagram the server keeps
polling its socket for ``spin`` seconds instead of going to sleep, trading CPU for
latency; it is off by default (a knob, as the CPU it burns is a whole core's worth
while traffic trickles in).

How: :class:`SpinningProtocol` sits between the event loop and the QUIC server
(an ``asyncio.DatagramProtocol`` forwarding everything). A received datagram marks
activity and, if no spin is scheduled, schedules one. A spin is a *slice*: it
polls the socket with non-blocking ``recvfrom`` for at most ``SLICE`` seconds, hands
what arrives to the server, and then yields to the loop with ``call_soon`` (so the
server's transmit, timers and every other descriptor run: the loop polls them
without sleeping because a callback is ready). Slices continue until ``spin``
seconds passed without a datagram; then the loop sleeps as usual. A slice that
received something ends at once, so a burst is served at the loop's pace.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SLICE", "SpinningProtocol"]

#: Longest a slice holds the loop before yielding (seconds).
SLICE = 25e-6

#: Datagrams read per slice at most (a burst is left to the loop's own reads).
_MAX_READS = 16

_MAX_DATAGRAM = 65535


class SpinningProtocol(asyncio.DatagramProtocol):
    """Forward to ``inner`` and spin on ``sock`` for ``spin`` seconds after each datagram.

    ``clock`` is the spin's time source (monotonic seconds), passed in for tests.
    """

    def __init__(
        self,
        inner: asyncio.DatagramProtocol,
        sock: socket.socket,
        spin: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if spin <= 0:
            raise ValueError("spin must be > 0 seconds")
        self.inner = inner
        self._sock = sock
        self._spin = spin
        self._clock = clock
        self._last = 0.0
        self._scheduled = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Datagrams the spin read (the rest the loop delivered), slices run, and
        #: slices that found nothing (CPU spent waiting): for benchmarks and tests.
        self.spun_datagrams = 0
        self.slices = 0
        self.empty_slices = 0

    # -- asyncio.DatagramProtocol: forwarded ---------------------------------------------

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.inner.connection_lost(exc)

    def error_received(self, exc: Exception) -> None:
        self.inner.error_received(exc)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inner.datagram_received(data, addr)
        self._activity()

    # -- the spin ----------------------------------------------------------------------------

    def _activity(self) -> None:
        self._last = self._clock()
        if not self._scheduled and not self._closed and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._slice)

    def _slice(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        self.slices += 1
        clock = self._clock
        now = clock()
        end = min(now + SLICE, self._last + self._spin)
        recvfrom = self._sock.recvfrom
        got = 0
        while now < end and got == 0:
            for _ in range(_MAX_READS):
                try:
                    data, addr = recvfrom(_MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # e.g. a queued ICMP error: the loop's own read reports it
                    return
                got += 1
                self.inner.datagram_received(data, addr)
            now = clock()
        if got:
            self.spun_datagrams += got
            self._last = now
        else:
            self.empty_slices += 1
        if now < self._last + self._spin and not self._closed:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._slice)
