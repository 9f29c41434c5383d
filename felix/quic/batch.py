"""DatagramBatch: a server socket's outgoing datagrams of one loop tick, sent together.

Why: every connection of a gateway shares its one UDP socket, and a record fanned
out to N subscribers makes N connections transmit in the same loop tick. Sent one
``sendto`` each, that is N system calls (and N trips through the loop's
transport); collected here and sent with sendmmsg(2) (felix/_udpbatch.pyx), it is
one call per 16 datagrams (``DEFAULT_MAX_PENDING``).

How it works: a connection's transmit hands each datagram to :meth:`sendto`,
which appends it to the tick's list; the first datagram of a tick schedules one
:meth:`flush` with ``call_soon``, and every ``max_pending`` datagrams flush at once
(so the first subscribers' packets leave while later ones are still being built,
and the list stays bounded). Connections transmit from ``call_soon``
callbacks and timers, so by the time the flush runs (the next loop iteration)
every transmit of the tick has added its datagrams. Each connection's datagrams
stay in the order its engine produced them. The engine already counts them as
sent when it hands them over (the handler's ``transmitted()`` follows at once, as
before); a tick's latency grows by one loop iteration at most.

Bounds and the full-buffer policy:

* at most ``max_pending`` datagrams wait for a flush;
* when the kernel's send buffer is full (EAGAIN), the rest go to the loop's own
  datagram transport, which queues them and sends when the socket is writable
  (what every datagram got before batching; the loop owns the socket's writer,
  so this class cannot register one). That queue is capped at ``queue_limit``
  bytes: beyond it, datagrams are dropped and counted in ``dropped``, as the
  network drops them; QUIC detects the loss and retransmits, and its congestion
  control slows down. While that queue is not empty, batches go through it too,
  so datagrams are never reordered behind it;
* with ``gso`` (the default where the kernel has UDP_SEGMENT; ``FELIX_UDP_GSO=0``
  turns it off), a run of datagrams to one address (a connection's burst) goes
  as one message the kernel splits into the same datagrams: one trip through the
  UDP/IP stack instead of one each. A closed-loop fanout sends one datagram per
  address per flush, so it gains nothing there; bursts to a subscriber (max
  rate: 0.63-0.75x server CPU per delivery, perf/README.md) gain;
* a datagram the kernel refuses outright (an unreachable or invalid address) is
  skipped and counted in ``failed``, as a lone ``sendto`` would fail alone.

Errors never reach the connections: a failing flush is logged and falls back to
the transport.

The switch: ``FELIX_UDP_BATCH=0`` (or ``off``/``false``/``no``) turns batching off
for the servers of the process (each datagram goes straight to the transport's
``sendto``, as before), so the benchmark can compare both; a number N > 1 flushes
every N datagrams; ``serve_on_socket(..., batch=...)`` overrides it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "BATCH_ENV",
    "DEFAULT_MAX_PENDING",
    "GSO_ENV",
    "DatagramBatch",
    "batch_limit",
    "gso_wanted",
]

log = logging.getLogger(__name__)

#: The environment variable that turns batching off ("0", "off", "false", "no").
BATCH_ENV = "FELIX_UDP_BATCH"
#: Datagrams collected before a flush, even mid-tick. Measured (perf/README.md,
#: "Fanout: batched sends"): flushing only at the end of a tick (1024 here) made a
#: 16-subscriber closed loop cost ~1.5x the server CPU per delivery and made the
#: client wait for all of a tick's packets to be built; every 16 was neutral or
#: better on CPU and latency and still cuts the gateway's send calls ~10x.
DEFAULT_MAX_PENDING = 16
#: The environment variable that turns UDP GSO off ("0", "off", "false", "no").
GSO_ENV = "FELIX_UDP_GSO"
#: Bytes the loop transport may queue after EAGAIN before datagrams are dropped.
DEFAULT_QUEUE_LIMIT = 1024 * 1024


def batch_limit(requested: bool | int | None = None) -> int:
    """Datagrams a server batch holds before it flushes; 0: batching off.

    ``requested``: False/0 off, True the default, an int > 1 that many; None reads
    ``FELIX_UDP_BATCH`` ("0"/"off"/"false"/"no": off; a number > 1: that many;
    anything else or unset: the default). Off where sendmmsg is missing (not
    Linux, or the extension was not built).
    """
    if requested is None:
        value = os.environ.get(BATCH_ENV, "").strip().lower()
        if value in ("0", "off", "false", "no"):
            requested = False
        elif value.isdigit() and int(value) > 1:
            requested = int(value)
        else:
            requested = True
    if requested is True:
        limit = DEFAULT_MAX_PENDING
    elif requested is False:
        limit = 0
    else:
        limit = max(int(requested), 0)
    if not limit or not sys.platform.startswith("linux"):
        return 0
    try:
        import felix._udpbatch  # noqa: F401
    except ImportError:
        return 0
    return limit


def gso_wanted(requested: bool | None = None) -> bool:
    """Whether batches merge same-address runs with UDP GSO: ``requested``, else
    ``FELIX_UDP_GSO`` (default on). Used only where the kernel has it."""
    if requested is not None:
        return requested
    return os.environ.get(GSO_ENV, "").strip().lower() not in ("0", "off", "false", "no")


class DatagramBatch:
    """Collects ``transport``'s outgoing datagrams per loop tick (see the module doc)."""

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        gso: bool = False,
    ) -> None:
        from felix._udpbatch import UdpSender, gso_supported

        sock = transport.get_extra_info("socket")
        if sock is None:
            raise ValueError("the transport has no socket")
        self._transport = transport
        # Both asyncio's and uvloop's datagram transports have it (typeshed's class does not).
        queued: Callable[[], int] | None = getattr(transport, "get_write_buffer_size", None)
        self._transport_queued: Callable[[], int] = queued or (lambda: 0)
        self._fd: int = sock.fileno()
        # GSO: probed once per socket; a kernel that refuses a GSO send later turns it
        # off in the sender, which then resends those datagrams one by one.
        self._sender = UdpSender(gso=gso and gso_supported(self._fd))
        self._pending: list[tuple[bytes, Any]] = []
        self._scheduled = False
        self._closed = False
        self._failed_seen = 0
        self._call_soon = asyncio.get_running_loop().call_soon
        self._max_pending = max_pending
        self._queue_limit = queue_limit
        #: Datagrams dropped because the transport's queue was over ``queue_limit``.
        self.dropped = 0
        #: Datagrams handed to the transport's queue after EAGAIN (or behind its queue).
        self.queued = 0
        #: Flushes that sent something.
        self.flushes = 0

    @property
    def syscalls(self) -> int:
        """sendmmsg calls made."""
        return self._sender.syscalls

    @property
    def sent(self) -> int:
        """Datagrams the kernel took through sendmmsg."""
        return self._sender.datagrams

    @property
    def gso(self) -> bool:
        """Whether runs of datagrams to one address go as one GSO message (now)."""
        return self._sender.gso

    @property
    def gso_sent(self) -> int:
        """Datagrams the kernel took as segments of GSO messages."""
        return self._sender.gso_datagrams

    @property
    def failed(self) -> int:
        """Datagrams the kernel refused (not EAGAIN), skipped."""
        return self._sender.failed

    def sendto(self, data: bytes, addr: Any) -> None:
        """Send ``data`` to ``addr`` with this tick's batch."""
        pending = self._pending
        pending.append((data, addr))
        if len(pending) >= self._max_pending:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Send what this tick collected now (also before the socket closes)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self._closed or self._transport.is_closing():
            # The descriptor may already be closed and its number reused: never write to it.
            return
        self.flushes += 1
        try:
            # While the loop's queue drains, stay behind it (done = 0).
            done = 0 if self._transport_queued() else self._sender.send(self._fd, pending)
        except Exception:
            log.exception("sending a batch of datagrams failed; using the transport")
            done = 0
        if done < len(pending):
            self._via_transport(pending, done)
        failed = self._sender.failed
        if failed != self._failed_seen:
            self._failed_seen = failed
            log.debug(
                "datagrams refused by the kernel so far: %d (last errno %d)",
                failed,
                self._sender.last_error,
            )

    def _via_transport(self, pending: list[tuple[bytes, Any]], start: int) -> None:
        transport = self._transport
        limit = self._queue_limit
        for i in range(start, len(pending)):
            if self._transport_queued() >= limit:
                self.dropped += len(pending) - i
                return
            data, addr = pending[i]
            try:
                transport.sendto(data, addr)
            except Exception as exc:  # a bad address: that datagram alone fails
                log.debug("sending a datagram to %s failed: %s", addr, exc)
            self.queued += 1

    def close(self) -> None:
        """Flush what is pending, then send nothing more (call before closing the socket)."""
        self.flush()
        self._closed = True
