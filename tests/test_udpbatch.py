"""felix._udpbatch (sendmmsg) and felix.quic.batch.DatagramBatch on real sockets.

Loopback UDP never reports a full send buffer (the kernel hands each datagram to
the receiver at once), so the EAGAIN paths run on a Unix datagram socket pair
whose reader does not read: there the kernel refuses with EAGAIN once the
reader's queue is full, through the same sendmmsg call (address None: a
connected socket).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from felix._udpbatch import DEFAULT_CAPACITY, MAX_CAPACITY, UdpSender, gso_supported, send_batch
from felix.quic.batch import DEFAULT_MAX_PENDING, DatagramBatch, batch_limit, gso_wanted
from tests.aio import run


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"),
    pytest.param(
        socket.AF_INET6,
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback"),
    ),
]


def _udp(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    # Room for a whole test's burst (the kernel caps it at net.core.rmem_max).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((host, 0))
    sock.settimeout(5)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` now."""
    got: list[bytes] = []
    sock.setblocking(False)
    while True:
        try:
            got.append(sock.recv(70000))
        except BlockingIOError:
            return got


@pytest.fixture
def unix_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize(("family", "host"), FAMILIES)
def test_datagrams_arrive_intact_and_in_order(family: socket.AddressFamily, host: str) -> None:
    with _udp(family, host) as r1, _udp(family, host) as r2, _udp(family, host) as tx:
        a1, a2 = r1.getsockname(), r2.getsockname()
        # Sizes from 1 byte to a full QUIC datagram and a large one; two destinations interleaved.
        datagrams = [
            (bytes([i % 256]) * (1 + (i * 97) % 1400) + i.to_bytes(4, "big"), a1 if i % 3 else a2)
            for i in range(200)
        ]
        datagrams.append((b"L" * 60000, a1))
        sender = UdpSender()
        assert sender.send(tx.fileno(), datagrams) == len(datagrams)
        assert sender.datagrams == len(datagrams)
        assert sender.syscalls == -(-len(datagrams) // DEFAULT_CAPACITY)  # one per 64
        assert sender.failed == 0
        got1 = [r1.recv(70000) for _ in range(sum(1 for _, a in datagrams if a is a1))]
        got2 = [r2.recv(70000) for _ in range(sum(1 for _, a in datagrams if a is a2))]
        assert got1 == [d for d, a in datagrams if a is a1]
        assert got2 == [d for d, a in datagrams if a is a2]
        assert _drain(r1) == [] and _drain(r2) == []


def test_equal_addresses_need_not_be_the_same_object() -> None:
    with _udp(socket.AF_INET, "127.0.0.1") as rx, _udp(socket.AF_INET, "127.0.0.1") as tx:
        host, port = rx.getsockname()
        datagrams = [(b"%d" % i, (host, port)) for i in range(10)]  # a new tuple each
        assert send_batch(tx.fileno(), datagrams) == 10
        assert [rx.recv(100) for _ in range(10)] == [d for d, _ in datagrams]


def test_a_refused_datagram_is_skipped_alone() -> None:
    """The kernel refuses one in the middle: the others before and after still go."""
    with _udp(socket.AF_INET, "127.0.0.1") as rx, _udp(socket.AF_INET, "127.0.0.1") as tx:
        addr = rx.getsockname()
        datagrams: list[tuple[bytes, Any]] = [(b"a", addr), (b"b", addr)]
        datagrams.append((b"too big" * 10000, addr))  # > 65507 bytes: EMSGSIZE
        datagrams += [(b"c", addr), (b"port zero", ("127.0.0.1", 0)), (b"d", addr)]
        sender = UdpSender()
        assert sender.send(tx.fileno(), datagrams) == len(datagrams)
        assert sender.failed == 2
        assert sender.last_error in (errno.EINVAL, errno.EMSGSIZE)
        assert sender.datagrams == 4
        assert [rx.recv(100) for _ in range(4)] == [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize(
    "bad",
    [
        ("not an address", 1),
        ("127.0.0.1", 70000),
        ("127.0.0.1",),
        "127.0.0.1:1",
        ("::1", 1, "x", 0),
    ],
)
def test_an_unusable_address_fails_that_datagram_only(bad: Any) -> None:
    with _udp(socket.AF_INET, "127.0.0.1") as rx, _udp(socket.AF_INET, "127.0.0.1") as tx:
        addr = rx.getsockname()
        sender = UdpSender()
        assert sender.send(tx.fileno(), [(b"1", addr), (b"x", bad), (b"2", addr)]) == 3
        assert (sender.failed, sender.last_error) == (1, errno.EINVAL)
        assert [rx.recv(100) for _ in range(2)] == [b"1", b"2"]


def test_items_that_are_not_bytes_pairs_raise() -> None:
    with _udp(socket.AF_INET, "127.0.0.1") as tx:
        addr = tx.getsockname()
        with pytest.raises(TypeError):
            send_batch(tx.fileno(), [("text", addr)])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            send_batch(tx.fileno(), [(b"x",)])  # type: ignore[list-item]


def test_capacity_bounds() -> None:
    with pytest.raises(ValueError):
        UdpSender(0)
    with pytest.raises(ValueError):
        UdpSender(MAX_CAPACITY + 1)
    with _udp(socket.AF_INET, "127.0.0.1") as rx, _udp(socket.AF_INET, "127.0.0.1") as tx:
        sender = UdpSender(1)
        addr = rx.getsockname()
        assert sender.send(tx.fileno(), [(b"%d" % i, addr) for i in range(5)], 2) == 5
        assert sender.syscalls == 3
        assert [rx.recv(10) for _ in range(3)] == [b"2", b"3", b"4"]


def test_a_full_buffer_stops_at_the_first_unsent(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    """EAGAIN: the index of the first datagram not sent; resuming from it loses nothing."""
    tx, rx = unix_pair
    datagrams = [(b"%05d" % i, None) for i in range(20000)]
    sender = UdpSender()
    received: list[bytes] = []
    done = sender.send(tx.fileno(), datagrams)
    assert 0 < done < len(datagrams)  # the reader's queue filled up
    received += _drain(rx)
    assert received == [d for d, _ in datagrams[:done]]  # exactly those, in order
    while done < len(datagrams):
        done = sender.send(tx.fileno(), datagrams, done)
        received += _drain(rx)
    assert received == [d for d, _ in datagrams]
    assert sender.failed == 0


def test_a_closed_descriptor_fails_without_crashing() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = sock.detach()
    socket.close(fd)
    sender = UdpSender()
    assert sender.send(fd, [(b"x", ("127.0.0.1", 9))] * 3) == 3
    assert (sender.failed, sender.last_error) == (3, errno.EBADF)


# -- UDP GSO ----------------------------------------------------------------------------

SO_NO_CHECK = 11  # asm-generic/socket.h: UDP without checksums, which GSO refuses


def _gso_or_skip(sock: socket.socket) -> None:
    if not gso_supported(sock.fileno()):
        pytest.skip("the kernel has no UDP GSO")


@pytest.mark.parametrize(("family", "host"), FAMILIES)
def test_gso_runs_arrive_as_the_same_datagrams(family: socket.AddressFamily, host: str) -> None:
    with _udp(family, host) as r1, _udp(family, host) as r2, _udp(family, host) as tx:
        _gso_or_skip(tx)
        a1, a2 = r1.getsockname(), r2.getsockname()
        datagrams: list[tuple[bytes, Any]] = []
        # A run of 150 full datagrams (more than one message's 64 segments), a short
        # last one, a run with a short one in the middle, single ones, and equal
        # addresses that are distinct tuple objects.
        datagrams += [(bytes([i]) * 1200, a1) for i in range(150)]
        datagrams += [(b"short", a1), (b"x" * 1200, a1), (b"y" * 1200, a2)]
        datagrams += [(b"z" * 1200, tuple(a2)), (b"tiny", a2), (b"w" * 1200, a2), (b"v", a1)]
        sender = UdpSender(gso=True)
        assert sender.send(tx.fileno(), datagrams) == len(datagrams)
        assert sender.syscalls == 1 and sender.datagrams == len(datagrams)
        assert sender.gso and sender.gso_datagrams >= 150
        for rx, addr in ((r1, a1), (r2, a2)):
            expected = [d for d, a in datagrams if a == addr]
            assert [rx.recv(70000) for _ in expected] == expected
            assert _drain(rx) == []


def test_gso_refused_by_the_kernel_falls_back_to_one_per_message() -> None:
    with _udp(socket.AF_INET, "127.0.0.1") as rx, _udp(socket.AF_INET, "127.0.0.1") as tx:
        _gso_or_skip(tx)
        tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        addr = rx.getsockname()
        datagrams = [(bytes([i]) * 1000, addr) for i in range(10)]
        sender = UdpSender(gso=True)
        assert sender.send(tx.fileno(), datagrams) == 10
        assert not sender.gso  # turned off by the refusal
        assert sender.failed == 0 and sender.gso_datagrams == 0 and sender.datagrams == 10
        assert [rx.recv(2000) for _ in range(10)] == [d for d, _ in datagrams]


# -- DatagramBatch: one flush per loop tick -------------------------------------------------


def test_a_tick_of_datagrams_leaves_in_one_flush() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with _udp(socket.AF_INET, "127.0.0.1") as rx:
            addr = rx.getsockname()
            tx = _udp(socket.AF_INET, "127.0.0.1")
            tx.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=tx)
            batch = DatagramBatch(transport, max_pending=1024)
            for i in range(100):
                batch.sendto(b"%d" % i, addr)
            assert _drain(rx) == []  # nothing sent yet: the flush is at the end of the tick
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert (batch.flushes, batch.syscalls, batch.sent) == (1, 2, 100)  # 64 + 36
            assert _drain(rx) == [b"%d" % i for i in range(100)]
            # Closing flushes what is pending; after it nothing is sent.
            batch.sendto(b"last", addr)
            batch.close()
            batch.sendto(b"after close", addr)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert _drain(rx) == [b"last"]
            transport.close()

    run(main)


def test_max_pending_flushes_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with _udp(socket.AF_INET, "127.0.0.1") as rx:
            addr = rx.getsockname()
            tx = _udp(socket.AF_INET, "127.0.0.1")
            tx.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=tx)
            batch = DatagramBatch(transport, max_pending=10)
            for i in range(25):
                batch.sendto(b"%d" % i, addr)
            assert batch.sent == 20  # two flushes of 10 within the tick
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert _drain(rx) == [b"%d" % i for i in range(25)]
            transport.close()

    run(main)


def test_a_full_buffer_queues_in_the_transport_up_to_its_limit_then_drops(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    """EAGAIN policy: the rest waits in the loop transport's queue (bounded), the excess is
    dropped and counted; what is sent arrives once, in order, once the reader reads."""
    tx, rx = unix_pair
    total, size, limit = 6000, 200, 64 * 1024

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=tx)
        batch = DatagramBatch(transport, max_pending=total + 1, queue_limit=limit)
        datagrams = [b"%05d" % i + b"." * (size - 5) for i in range(total)]
        for d in datagrams:
            batch.sendto(d, None)
        batch.flush()
        assert 0 < batch.sent < total
        assert batch.queued > 0 and batch.dropped > 0
        assert batch.sent + batch.queued + batch.dropped == total
        assert batch.queued * size <= limit + size
        queued = getattr(transport, "get_write_buffer_size")  # noqa: B009 (not in typeshed)
        assert queued() > 0
        # While the transport's queue drains, a later tick's datagrams go behind it (here:
        # it is at its limit, so this one is dropped), never ahead of it.
        dropped = batch.dropped
        batch.sendto(b"later", None)
        batch.flush()
        assert batch.dropped == dropped + 1
        expected = datagrams[: batch.sent + batch.queued]
        received: list[bytes] = []
        for _ in range(500):
            received += _drain(rx)
            if len(received) >= len(expected) and not queued():
                break
            await asyncio.sleep(0.01)
        assert received == expected  # each once, in order
        # Drained: the next batch goes straight to the kernel again.
        sent = batch.sent
        batch.sendto(b"after", None)
        batch.flush()
        assert batch.sent == sent + 1
        assert _drain(rx) == [b"after"]
        transport.close()

    run(main)


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FELIX_UDP_BATCH", raising=False)
    assert batch_limit() == DEFAULT_MAX_PENDING
    for off in ("0", "off", "FALSE", "no"):
        monkeypatch.setenv("FELIX_UDP_BATCH", off)
        assert batch_limit() == 0
        assert batch_limit(True) == DEFAULT_MAX_PENDING
        assert batch_limit(16) == 16
    for on in ("1", "on", "yes"):
        monkeypatch.setenv("FELIX_UDP_BATCH", on)
        assert batch_limit() == DEFAULT_MAX_PENDING
        assert batch_limit(False) == 0
    monkeypatch.setenv("FELIX_UDP_BATCH", "16")
    assert batch_limit() == 16
    monkeypatch.delenv("FELIX_UDP_GSO", raising=False)
    assert gso_wanted() is True
    monkeypatch.setenv("FELIX_UDP_GSO", "off")
    assert gso_wanted() is False
    assert gso_wanted(True) is True


def test_a_destination_error_on_a_gso_run_skips_the_run_and_keeps_gso() -> None:
    """One peer's error (here EACCES: broadcast without SO_BROADCAST) must not turn GSO off
    for every other peer of the socket: that run is skipped, as its datagrams would be."""
    with _udp(socket.AF_INET, "127.0.0.1") as rx, _udp(socket.AF_INET, "0.0.0.0") as tx:
        _gso_or_skip(tx)
        addr = rx.getsockname()
        bad = ("255.255.255.255", 9)
        datagrams = [(b"b" * 1000, bad) for _ in range(5)] + [
            (bytes([i]) * 1000, addr) for i in range(5)
        ]
        sender = UdpSender(gso=True)
        assert sender.send(tx.fileno(), datagrams) == 10
        assert sender.gso  # still on
        assert sender.failed == 5 and sender.gso_datagrams == 5 and sender.datagrams == 5
        assert [rx.recv(2000) for _ in range(5)] == [d for d, a in datagrams if a == addr]
