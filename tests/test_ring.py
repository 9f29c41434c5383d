"""Unit and property tests of the shared-memory ring (felix._ring) and its asyncio reader.

Everything here runs in one process; tests/test_ring_stress.py crosses processes.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import hypothesis.strategies as st
import posix_ipc
import pytest
import uvloop
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from felix._ring import HEADER_SIZE, LAYOUT_VERSION, Ring, record_footprint
from felix.errors import RingError
from felix.ring import RingReader, make_doorbell
from tests.shm import SHM_PREFIX, no_stale_segments  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


@pytest.fixture
def doorbell() -> Iterator[int]:
    fd = make_doorbell()
    yield fd
    os.close(fd)


def seg_name(tag: str) -> str:
    return f"/{SHM_PREFIX}{tag}-{os.urandom(3).hex()}"


def footprint(n: int) -> int:
    return (4 + n + 7) & ~7


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def run_uvloop(coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
    """Run under uvloop with a timeout; fail on exceptions the loop swallowed."""
    swallowed: list[dict[str, Any]] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: swallowed.append(ctx))
        return await asyncio.wait_for(coro_fn(), timeout)

    result = uvloop.run(main())
    assert not swallowed, swallowed
    return result


# --------------------------------------------------------------------------- basics


def test_write_read_commit_roundtrip() -> None:
    with Ring.create(capacity=4096) as ring:
        assert ring.capacity == 4096
        assert ring.max_record_size == 2048 - 4
        assert ring.used_bytes == 0 and ring.free_bytes == 4096
        assert ring.write(b"hello")
        assert ring.write_batch([bytearray(b"world"), memoryview(b"--x--")[1:4], b""]) == 3
        assert ring.used_bytes == footprint(5) * 2 + footprint(3) + footprint(0)
        views = ring.read_batch()
        assert [bytes(v) for v in views] == [b"hello", b"world", b"-x-", b""]
        assert all(v.readonly for v in views)
        assert ring.read_batch() == []  # nothing new, even before commit
        assert ring.used_bytes == 48  # reading does not free space; commit does
        ring.commit()
        assert ring.used_bytes == 0
        assert ring.records_written == 4 and ring.records_read == 4


def test_views_stay_valid_until_commit() -> None:
    with Ring.create(capacity=256) as ring:
        assert ring.write_batch([bytes([i]) * 20 for i in range(4)]) == 4
        views = ring.read_batch()
        # The producer fills the rest; it may not touch the space of uncommitted views.
        written = 0
        while ring.write(b"\xee" * 20):
            written += 1
        assert written > 0 and ring.free_bytes < footprint(20)
        assert [bytes(v) for v in views] == [bytes([i]) * 20 for i in range(4)]
        ring.commit()
        assert ring.write(b"\xee" * 20)  # committed space is reusable


def test_read_copies_and_commits() -> None:
    with Ring.create(capacity=256) as ring:
        assert ring.read() is None
        ring.write_batch([b"a", b"bb"])
        first = ring.read()
        assert first == b"a" and isinstance(first, bytes)
        assert ring.used_bytes == footprint(2)
        assert ring.read() == b"bb"
        assert ring.read() is None
        assert ring.used_bytes == 0 and ring.records_read == 2


def test_zero_length_records() -> None:
    with Ring.create(capacity=64) as ring:
        # An empty record still takes 8 bytes (its length word, padded).
        assert record_footprint(0) == 8
        assert ring.write_batch([b""] * 10) == 8
        assert ring.used_bytes == 64
        assert not ring.write(b"")
        views = ring.read_batch()
        assert [bytes(v) for v in views] == [b""] * 8
        ring.commit()
        assert ring.write(b"")


def test_read_batch_limits() -> None:
    with Ring.create(capacity=4096) as ring:
        ring.write_batch([bytes([i]) * 100 for i in range(10)])
        assert len(ring.read_batch(max_records=3)) == 3
        # max_bytes stops before the record that would pass it...
        assert len(ring.read_batch(max_bytes=250)) == 2
        # ...but the first record is always returned.
        assert len(ring.read_batch(max_bytes=10)) == 1
        rest = ring.read_batch()
        assert [v[0] for v in rest] == [6, 7, 8, 9]
        with pytest.raises(ValueError):
            ring.read_batch(max_records=0)
        with pytest.raises(ValueError):
            ring.read_batch(max_bytes=-1)


def test_publish_false_hides_records_until_publish() -> None:
    with Ring.create(capacity=1024) as ring:
        assert ring.write(b"one", publish=False)
        assert ring.write_batch([b"two", b"three"], publish=False) == 2
        assert ring.read_batch() == []
        assert ring.used_bytes == 0 and ring.records_written == 0
        ring.publish()
        assert [bytes(v) for v in ring.read_batch()] == [b"one", b"two", b"three"]
        assert ring.records_written == 3


# --------------------------------------------------------------------------- wrap and full


def test_wrap_around_keeps_records_contiguous() -> None:
    with Ring.create(capacity=128) as ring:
        # 3 x 40-byte footprints = 120: the next 40-byte record cannot fit in the last
        # 8 bytes, so a wrap marker sends it to the start.
        assert ring.write_batch([b"a" * 36] * 3) == 3
        assert len(ring.read_batch(max_records=2)) == 2
        ring.commit()
        assert ring.write(b"b" * 36)
        assert ring.used_bytes == 40 + 8 + 40  # the wrap wastes the 8 bytes at the end
        views = ring.read_batch()
        assert [bytes(v) for v in views] == [b"a" * 36, b"b" * 36]
        ring.commit()
        assert ring.used_bytes == 0
        # Many laps with sizes that do not divide the capacity.
        expected: list[bytes] = []
        got: list[bytes] = []
        for i in range(2000):
            record = bytes([i % 251]) * (i * 7 % 53)
            if not ring.write(record):
                got.extend(bytes(v) for v in ring.read_batch())
                ring.commit()
                assert ring.write(record)
            expected.append(record)
        got.extend(bytes(v) for v in ring.read_batch())
        assert got == expected


def test_full_ring_is_an_answer_not_an_error() -> None:
    with Ring.create(capacity=256) as ring:
        records = [bytes([i]) * 28 for i in range(20)]  # 32-byte footprints
        assert ring.write_batch(records) == 8  # stops at the first that does not fit
        assert ring.full_events == 1
        assert not ring.write(b"x")
        assert ring.full_events == 2
        assert ring.free_bytes == 0
        assert ring.records_written == 8
        views = ring.read_batch(max_records=3)
        assert ring.write_batch(records[8:]) == 0  # read but not committed: still full
        ring.commit()
        del views
        assert ring.write_batch(records[8:]) == 3
        assert [bytes(v) for v in ring.read_batch()] == records[3:11]


def test_max_record_fits_an_empty_ring_at_every_position() -> None:
    with Ring.create(capacity=128) as ring:
        biggest = b"m" * ring.max_record_size  # footprint 64: half the ring
        pos = 0
        for offset in range(0, 128, 8):
            # Move the empty ring's position to `offset` with zero-length records.
            while pos % 128 != offset:
                assert ring.write(b"")
                assert ring.read() == b""
                pos += 8
            assert ring.used_bytes == 0
            assert ring.write(biggest), f"max record refused at offset {offset}"
            wasted = 0 if 128 - offset >= 64 else 128 - offset  # wrap marker and skipped end
            assert ring.used_bytes == wasted + 64
            pos += wasted + 64
            assert ring.read() == biggest


def test_record_too_large() -> None:
    with Ring.create(capacity=128) as ring:
        assert ring.max_record_size == 60
        with pytest.raises(ValueError, match="max_record_size"):
            ring.write(b"x" * 61)
        # A batch with an oversized record writes nothing of that batch.
        with pytest.raises(ValueError):
            ring.write_batch([b"ok", b"x" * 61, b"ok"])
        ring.publish()
        assert ring.read_batch() == []
        assert ring.records_written == 0 and ring.used_bytes == 0
        assert ring.write(b"y" * 60)
        assert ring.read() == b"y" * 60


# --------------------------------------------------------------------------- lifecycle


def test_create_argument_errors() -> None:
    for capacity in (0, 32, 100, 3 << 10, 1 << 33):
        with pytest.raises(ValueError):
            Ring.create(capacity=capacity)
    with (
        Ring.create(seg_name("dup"), capacity=64) as ring,
        pytest.raises(RingError, match="already exists"),
    ):
        Ring.create(ring.name, capacity=64)
    with pytest.raises(TypeError):
        Ring()


def test_bad_doorbell_fd_creates_nothing() -> None:
    with pytest.raises(ValueError, match="doorbell_fd"):
        Ring.create(capacity=64, doorbell_fd=-2)
    with Ring.create(capacity=64) as ring, pytest.raises(ValueError, match="doorbell_fd"):
        Ring.attach(ring.name, doorbell_fd=-5)


def test_attach_sees_the_same_ring() -> None:
    with Ring.create(capacity=1024) as producer, Ring.attach(producer.name) as consumer:
        assert consumer.capacity == 1024 and consumer.name == producer.name
        producer.write_batch([b"abc", b"def"])
        assert [bytes(v) for v in consumer.read_batch()] == [b"abc", b"def"]
        consumer.commit()
        assert producer.used_bytes == 0 and producer.records_read == 2


def test_attach_missing_name_is_a_clear_error() -> None:
    with pytest.raises(RingError, match="no shared-memory ring named"):
        Ring.attach(seg_name("missing"))


def _raw_segment(name: str, size: int, header: bytes) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
    with mmap.mmap(shm.fd, size) as mm:
        mm[: len(header)] = header
    shm.close_fd()


def _header(
    magic: bytes = b"FLXRING1",
    version: int = LAYOUT_VERSION,
    header_size: int = HEADER_SIZE,
    capacity: int = 1024,
    max_record: int = 508,
) -> bytes:
    return magic + struct.pack("=IIQQ", version, header_size, capacity, max_record)


@pytest.mark.parametrize(
    ("size", "header", "message"),
    [
        (HEADER_SIZE + 1024, b"", "not initialised yet"),
        (HEADER_SIZE + 1024, _header(magic=b"NOTARING"), "bad magic"),
        (HEADER_SIZE + 1024, _header(version=LAYOUT_VERSION + 1), "layout version"),
        (HEADER_SIZE + 1024, _header(header_size=8192), "header size"),
        (HEADER_SIZE + 1024, _header(capacity=1000), "inconsistent sizes"),
        (HEADER_SIZE + 1024, _header(capacity=2048, max_record=1020), "inconsistent sizes"),
        (HEADER_SIZE + 2048, _header(), "inconsistent sizes"),
        (HEADER_SIZE + 1024, _header(max_record=1020), "inconsistent sizes"),
        (100, b"", "too small"),
    ],
)
def test_attach_validates_the_header(size: int, header: bytes, message: str) -> None:
    name = seg_name("bad")
    _raw_segment(name, size, header)
    try:
        with pytest.raises(RingError, match=message):
            Ring.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_attach_refuses_impossible_positions() -> None:
    with Ring.create(capacity=1024) as ring:
        shm = posix_ipc.SharedMemory(ring.name)
        with mmap.mmap(shm.fd, shm.size) as mm:
            shm.close_fd()
            struct.pack_into("=Q", mm, 128, 4096)  # head more than capacity past tail
            with pytest.raises(RingError, match="corrupted"):
                Ring.attach(ring.name)


def test_lifecycle_leaves_no_segments() -> None:
    ring = Ring.create()
    path = "/dev/shm" + ring.name
    assert os.path.exists(path)
    other = Ring.attach(ring.name)
    other.close()
    other.close()  # idempotent
    assert other.closed and os.path.exists(path)
    with pytest.raises(RingError, match="closed"):
        other.write(b"x")
    with pytest.raises(RingError, match="closed"):
        other.read_batch()
    ring.close()
    ring.unlink()
    ring.unlink()  # idempotent
    assert not os.path.exists(path)
    with Ring.create() as ring2:
        path2 = "/dev/shm" + ring2.name
        assert os.path.exists(path2)
    assert ring2.closed and not os.path.exists(path2)
    # An attached ring's context manager detaches but does not unlink.
    with Ring.create() as ring3:
        with Ring.attach(ring3.name):
            pass
        assert os.path.exists("/dev/shm" + ring3.name)


def test_unlink_while_mapped_keeps_working() -> None:
    with Ring.create(capacity=1024) as producer, Ring.attach(producer.name) as consumer:
        producer.unlink()
        assert not os.path.exists("/dev/shm" + producer.name)
        producer.write(b"still here")
        assert consumer.read() == b"still here"


def test_close_with_live_views_keeps_the_mapping() -> None:
    ring = Ring.create(capacity=1024)
    ring.write_batch([b"alpha", b"beta"])
    views = ring.read_batch()
    ring.close()
    ring.unlink()
    # The segment is unmapped only when the last view goes away.
    assert [bytes(v) for v in views] == [b"alpha", b"beta"]
    del views


def test_ring_cannot_be_pickled() -> None:
    import pickle

    with Ring.create(capacity=64) as ring, pytest.raises(TypeError):
        pickle.dumps(ring)


# --------------------------------------------------------------------------- corruption


def _poke(ring: Ring, offset: int, fmt: str, value: int) -> None:
    shm = posix_ipc.SharedMemory(ring.name)
    with mmap.mmap(shm.fd, shm.size) as mm:
        struct.pack_into(fmt, mm, offset, value)
    shm.close_fd()


@pytest.mark.parametrize(
    ("offset", "fmt", "value"),
    [
        (HEADER_SIZE, "=I", 61),  # longer than max_record
        (HEADER_SIZE, "=I", 40),  # passes head
        (HEADER_SIZE, "=I", 0xFFFFFFFF),  # wrap marker that passes head
        (128, "=Q", 12),  # head not 8-aligned
        (128, "=Q", 1 << 20),  # head beyond tail + capacity
    ],
)
def test_consumer_rejects_corruption(offset: int, fmt: str, value: int) -> None:
    with Ring.create(capacity=128) as ring:
        ring.write(b"12345678")
        _poke(ring, offset, fmt, value)
        with pytest.raises(RingError, match="corrupted"):
            ring.read_batch()
        with pytest.raises(RingError, match="corrupted"):
            ring.read()


def test_producer_rejects_corrupt_tail() -> None:
    with Ring.create(capacity=128) as ring:
        ring.write_batch([b"x" * 20] * 4)
        _poke(ring, 256, "=Q", 4096)  # tail beyond head
        with pytest.raises(RingError, match="corrupted"):
            ring.write(b"y" * 60)


# --------------------------------------------------------------------------- doorbell


def test_doorbell_rings_only_for_a_sleeping_consumer(doorbell: int) -> None:
    with Ring.create(capacity=1024, doorbell_fd=doorbell) as ring:
        ring.write(b"busy consumer")
        assert ring.doorbells_rung == 0 and not readable(doorbell)
        assert not ring.prepare_sleep()  # data is waiting: do not sleep
        ring.read_batch()
        ring.commit()
        assert ring.prepare_sleep()
        assert ring.sleeps == 1
        ring.write(b"wake up")
        assert ring.doorbells_rung == 1 and readable(doorbell)
        ring.write_batch([b"more"] * 5)
        assert ring.doorbells_rung == 1  # one ring per sleep
        assert ring.drain_doorbell() == 1
        assert ring.drain_doorbell() == 0 and not readable(doorbell)
        assert len(ring.read_batch()) == 6


def test_prepare_sleep_withdraws_when_data_raced_in(doorbell: int) -> None:
    with Ring.create(capacity=1024) as ring, Ring.attach(ring.name) as producer:
        producer.doorbell_fd = doorbell
        # The record lands after the consumer's last read but before its re-check.
        assert ring.read_batch() == []
        producer.write(b"raced")
        assert not ring.prepare_sleep()
        # The withdrawn announcement must not make the producer ring later.
        assert ring.read() == b"raced"
        producer.write(b"x")
        assert producer.doorbells_rung == 0 and not readable(doorbell)


def test_prepare_sleep_spin_sees_data(doorbell: int) -> None:
    with Ring.create(capacity=1024, doorbell_fd=doorbell) as ring:
        started = time.monotonic()
        assert ring.prepare_sleep(spin_ns=20_000_000)  # nothing comes: spins ~20 ms
        assert time.monotonic() - started >= 0.015
        ring.write(b"ring")
        ring.drain_doorbell()
        ring.read()
        timer = threading.Timer(0.01, ring.write, args=(b"during spin",))
        timer.start()
        started = time.monotonic()
        assert not ring.prepare_sleep(spin_ns=5_000_000_000)
        assert time.monotonic() - started < 2
        timer.join()
        assert ring.read() == b"during spin"
        assert not readable(doorbell)


def test_next_batch_is_commit_read_and_sleep_in_one_call(doorbell: int) -> None:
    with Ring.create(capacity=256, doorbell_fd=doorbell) as ring:
        ring.write_batch([b"a", b"b", b"c"])
        assert [bytes(v) for v in ring.next_batch(max_records=2)] == [b"a", b"b"]
        assert ring.used_bytes == 24  # nothing committed yet
        assert [bytes(v) for v in ring.next_batch()] == [b"c"]
        assert ring.used_bytes == 8 and ring.records_read == 2  # the first batch is committed
        assert ring.sleeps == 0
        assert ring.next_batch() == []  # commits, finds nothing, announces sleep
        assert ring.used_bytes == 0 and ring.sleeps == 1
        ring.write(b"d")
        assert ring.doorbells_rung == 1 and readable(doorbell)
        assert ring.drain_doorbell() == 1
        assert [bytes(v) for v in ring.next_batch()] == [b"d"]


def test_no_doorbell_means_no_rings() -> None:
    with Ring.create(capacity=1024) as ring:
        assert ring.doorbell_fd == -1
        assert ring.prepare_sleep()
        ring.write(b"x")
        assert ring.doorbells_rung == 0
        with pytest.raises(RingError, match="no doorbell"):
            ring.drain_doorbell()
        with pytest.raises(ValueError):
            ring.doorbell_fd = -2


# --------------------------------------------------------------------------- RingReader


def test_ring_reader_drains_and_sleeps(doorbell: int) -> None:
    with Ring.create(capacity=4096, doorbell_fd=doorbell) as ring:
        ring.write(b"before start")  # no doorbell for this one: the reader must look anyway
        got: list[bytes] = []

        async def scenario() -> None:
            reader = RingReader(ring, lambda views: got.extend(bytes(v) for v in views))
            task = asyncio.create_task(reader.run())
            for i in range(50):
                await asyncio.sleep(0.001)
                ring.write_batch([b"%d" % i] * (i % 4 + 1))
            while len(got) < 1 + sum(i % 4 + 1 for i in range(50)):
                await asyncio.sleep(0.001)
            reader.stop()
            await task

        run_uvloop(scenario, timeout=20)
        assert got[0] == b"before start"
        assert got[1:] == [b"%d" % i for i in range(50) for _ in range(i % 4 + 1)]
        assert ring.sleeps > 0 and ring.doorbells_rung > 0
        assert ring.used_bytes == 0


def test_ring_reader_reports_handler_errors(doorbell: int) -> None:
    with Ring.create(capacity=4096, doorbell_fd=doorbell) as ring:

        def boom(views: list[memoryview]) -> None:
            raise KeyError("handler failed")

        async def scenario() -> None:
            ring.write(b"x")
            with pytest.raises(KeyError, match="handler failed"):
                await RingReader(ring, boom).run()

        run_uvloop(scenario, timeout=10)
        assert ring.used_bytes > 0  # the failed batch was not committed


def test_ring_reader_yields_to_the_loop_when_busy(doorbell: int) -> None:
    with Ring.create(capacity=1 << 14, doorbell_fd=doorbell) as ring:
        assert ring.write_batch([b"%d" % i for i in range(200)]) == 200
        ticks = 0
        seen_at: list[int] = []

        async def scenario() -> None:
            nonlocal ticks
            reader: RingReader

            def on_batch(views: list[memoryview]) -> None:
                seen_at.extend(ticks for _ in views)
                if len(seen_at) == 200:
                    reader.stop()

            reader = RingReader(ring, on_batch, max_records=5, max_batches_per_wake=4)
            task = asyncio.create_task(reader.run())
            while not task.done():
                ticks += 1
                await asyncio.sleep(0)
            await task

        run_uvloop(scenario, timeout=10)
        assert len(seen_at) == 200
        # 20 records per wake-up at most, other callbacks running in between.
        assert max(seen_at.count(t) for t in set(seen_at)) <= 20
        assert len(set(seen_at)) >= 10


def test_ring_reader_cancel_removes_the_reader(doorbell: int) -> None:
    with Ring.create(capacity=1024, doorbell_fd=doorbell) as ring:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            task = asyncio.create_task(RingReader(ring, lambda views: None).run())
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not loop.remove_reader(doorbell)  # already removed

        run_uvloop(scenario, timeout=10)


def test_ring_reader_needs_a_doorbell() -> None:
    with Ring.create(capacity=64) as ring, pytest.raises(ValueError):
        RingReader(ring, lambda views: None)


# --------------------------------------------------------------------------- model check


CAP = 128


class RingModel(RuleBasedStateMachine):
    """Any sequence of ring operations behaves like a deque bounded by bytes.

    The model tracks positions the way the layout defines them (8-byte aligned
    records, a wrap marker when a record does not fit before the end), so full
    answers, used bytes and counters must match exactly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ring = Ring.create(capacity=CAP)
        self.max_record = CAP // 2 - 4
        self.head = 0  # model write position, including unpublished records
        self.published = 0
        self.tail = 0
        self.read_pos = 0
        # (record, start, end): start is past any wrap marker in front of the record.
        self.unread: deque[tuple[bytes, int, int]] = deque()
        self.unpublished: list[tuple[bytes, int, int]] = []
        self.views: list[tuple[memoryview, bytes]] = []
        self.written = 0
        self.read_count = 0
        self.full_events = 0
        self.sleeps = 0

    def _model_write(self, record: bytes) -> bool:
        need = footprint(len(record))
        to_end = CAP - self.head % CAP
        total = need if need <= to_end else to_end + need
        if total > CAP - (self.head - self.tail):
            return False
        if need > to_end:
            self.head += to_end
        self.unpublished.append((record, self.head, self.head + need))
        self.head += need
        return True

    def _model_publish(self) -> None:
        self.unread.extend(self.unpublished)
        self.written += len(self.unpublished)
        self.unpublished.clear()
        self.published = self.head

    @rule(record=st.binary(max_size=CAP // 2 + 4), publish=st.booleans())
    def write(self, record: bytes, publish: bool) -> None:
        if len(record) > self.max_record:
            with pytest.raises(ValueError):
                self.ring.write(record, publish=publish)
            return
        expected = self._model_write(record)
        assert self.ring.write(record, publish=publish) == expected
        if not expected:
            self.full_events += 1
        elif publish:
            self._model_publish()

    @rule(records=st.lists(st.binary(max_size=40), max_size=6))
    def write_batch(self, records: list[bytes]) -> None:
        count = 0
        for record in records:
            if not self._model_write(record):
                self.full_events += 1
                break
            count += 1
        assert self.ring.write_batch(records) == count
        self._model_publish()

    @rule()
    def publish(self) -> None:
        self.ring.publish()
        self._model_publish()

    def _model_read(self, max_records: int, max_bytes: int) -> list[bytes]:
        expected: list[bytes] = []
        total = 0
        while self.unread and len(expected) < max_records:
            record, start, end = self.unread[0]
            if expected and total + len(record) > max_bytes:
                # The ring looked at this record: a wrap marker before it is consumed.
                self.read_pos = start
                break
            self.unread.popleft()
            expected.append(record)
            total += len(record)
            self.read_pos = end
        return expected

    def _model_commit(self) -> None:
        self.tail = self.read_pos
        self.read_count += len(self.views)
        self.views.clear()

    @rule(max_records=st.integers(1, 5), max_bytes=st.integers(0, 100))
    def read_batch(self, max_records: int, max_bytes: int) -> None:
        expected = self._model_read(max_records, max_bytes)
        views = self.ring.read_batch(max_records=max_records, max_bytes=max_bytes)
        assert [bytes(v) for v in views] == expected
        self.views.extend(zip(views, expected, strict=True))

    @rule()
    def commit(self) -> None:
        self.ring.commit()
        self._model_commit()

    @rule(max_records=st.integers(1, 5), max_bytes=st.integers(0, 100))
    def next_batch(self, max_records: int, max_bytes: int) -> None:
        self._model_commit()
        expected = self._model_read(max_records, max_bytes)
        if not expected:
            self.sleeps += 1
        views = self.ring.next_batch(max_records=max_records, max_bytes=max_bytes)
        assert [bytes(v) for v in views] == expected
        self.views.extend(zip(views, expected, strict=True))

    @precondition(lambda self: not self.views)
    @rule()
    def read(self) -> None:
        expected = None
        if self.unread:
            expected, _, self.read_pos = self.unread.popleft()
            self.tail = self.read_pos
            self.read_count += 1
        assert self.ring.read() == expected

    @invariant()
    def matches_model(self) -> None:
        assert self.ring.used_bytes == self.published - self.tail
        assert self.ring.free_bytes == CAP - (self.published - self.tail)
        assert self.ring.records_written == self.written
        assert self.ring.records_read == self.read_count
        assert self.ring.full_events == self.full_events
        assert self.ring.sleeps == self.sleeps
        # Views stay intact until commit, whatever the producer did meanwhile.
        for view, record in self.views:
            assert bytes(view) == record

    def teardown(self) -> None:
        self.views.clear()
        self.ring.close()
        self.ring.unlink()


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
