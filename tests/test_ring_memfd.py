"""Rings in sealed memfds (Ring.create_memfd / Ring.attach_fd), and a hostile peer.

The peer of a memfd ring may be another user's process on the same host: it can
write any byte of the mapping at any time. These tests play that peer through a
second mapping of the same fd and check that the ring answers with RingError,
never a crash or a read out of bounds.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from felix.errors import RingError
from felix.ring import Ring, make_doorbell

HEADER = 4096
OFF_CAPACITY = 16
OFF_HEAD = 128
OFF_TAIL = 256


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def peer_map(ring: Ring) -> mmap.mmap:
    """A second, writable mapping of the ring's memfd: what the other process sees."""
    return mmap.mmap(ring.fd, os.fstat(ring.fd).st_size, flags=mmap.MAP_SHARED)


def test_create_memfd_is_sealed_and_owns_its_fd() -> None:
    before = fd_count()
    ring = Ring.create_memfd(capacity=4096)
    assert ring.fd >= 0 and ring.capacity == 4096
    assert os.fstat(ring.fd).st_size == HEADER + 4096
    with pytest.raises(PermissionError):
        os.ftruncate(ring.fd, 100)  # shrinking would SIGBUS the other side
    with pytest.raises(PermissionError):
        os.ftruncate(ring.fd, 1 << 20)
    ring.close()
    ring.close()  # idempotent
    assert ring.fd == -1 and ring.closed
    assert fd_count() == before


def test_named_rings_have_no_fd() -> None:
    with Ring.create(capacity=4096) as ring:
        assert ring.fd == -1


def test_attach_fd_sees_the_records_and_owns_the_fd() -> None:
    start = fd_count()
    bell = make_doorbell()
    producer = Ring.create_memfd(capacity=4096, doorbell_fd=bell)
    consumer = Ring.attach_fd(os.dup(producer.fd), doorbell_fd=bell)
    try:
        assert consumer.capacity == 4096
        assert producer.write(b"hello") and producer.write(b"world")
        assert consumer.read() == b"hello"
        assert [bytes(v) for v in consumer.read_batch()] == [b"world"]
        consumer.commit()
        # The doorbell still works: the consumer sleeps, the producer rings.
        assert consumer.prepare_sleep()
        assert producer.write(b"again")
        assert consumer.drain_doorbell() == 1
    finally:
        consumer.close()  # closes the dup of the memfd it was given
        producer.close()
        os.close(bell)
    assert fd_count() == start


def test_attach_fd_refuses_what_is_not_a_sealed_ring(tmp_path: object) -> None:
    unsealed = os.memfd_create("x", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, HEADER + 4096)
    with pytest.raises(RingError, match="not sealed"):
        Ring.attach_fd(unsealed)
    os.close(unsealed)  # still the caller's after a failure
    read, write = os.pipe()
    with pytest.raises(RingError):
        Ring.attach_fd(read)
    os.close(read)
    os.close(write)
    # Sealed but never initialised (no magic), and sealed at a wrong size.
    blank = os.memfd_create("x", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(blank, HEADER + 4096)
    import fcntl

    fcntl.fcntl(blank, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    with pytest.raises(RingError, match="not a felix ring"):
        Ring.attach_fd(blank)
    os.close(blank)
    # A valid header whose capacity disagrees with the file's size.
    ring = Ring.create_memfd(capacity=4096)
    peer = peer_map(ring)
    struct.pack_into("<Q", peer, OFF_CAPACITY, 8192)
    with pytest.raises(RingError, match="inconsistent sizes"):
        Ring.attach_fd(ring.fd)
    peer.close()
    ring.close()


def test_scribbled_head_and_lengths_raise_ring_error() -> None:
    ring = Ring.create_memfd(capacity=4096)  # this side consumes
    peer = peer_map(ring)
    try:
        # A head beyond tail + capacity.
        struct.pack_into("<Q", peer, OFF_HEAD, 1 << 40)
        with pytest.raises(RingError, match="head"):
            ring.read_batch()
        # A misaligned head.
        ring2 = Ring.create_memfd(capacity=4096)
        peer2 = peer_map(ring2)
        struct.pack_into("<Q", peer2, OFF_HEAD, 13)
        with pytest.raises(RingError):
            ring2.read()
        peer2.close()
        ring2.close()
        # A record length running past head and past the data area.
        ring3 = Ring.create_memfd(capacity=4096)
        peer3 = peer_map(ring3)
        struct.pack_into("<I", peer3, HEADER, 4000)
        struct.pack_into("<Q", peer3, OFF_HEAD, 16)
        with pytest.raises(RingError, match="record length"):
            ring3.read_batch()
        struct.pack_into("<I", peer3, HEADER, 0xFFFFFFF0)
        with pytest.raises(RingError, match="record length"):
            ring3.read_batch()
        peer3.close()
        ring3.close()
    finally:
        peer.close()
        ring.close()


def test_a_scribbled_capacity_after_attach_changes_nothing() -> None:
    producer = Ring.create_memfd(capacity=4096)
    consumer = Ring.attach_fd(os.dup(producer.fd))
    peer = peer_map(producer)
    try:
        struct.pack_into("<Q", peer, OFF_CAPACITY, 1 << 30)  # both sides kept their copies
        assert producer.capacity == consumer.capacity == 4096
        for i in range(200):  # wraps the data area several times
            assert producer.write(bytes([i % 256]) * 100)
            assert consumer.read() == bytes([i % 256]) * 100
    finally:
        peer.close()
        consumer.close()
        producer.close()


def test_a_producer_refuses_a_scribbled_tail() -> None:
    ring = Ring.create_memfd(capacity=4096)  # this side produces
    peer = peer_map(ring)
    try:
        assert ring.write(b"x" * 1000)
        struct.pack_into("<Q", peer, OFF_TAIL, 1 << 50)  # "consumed" more than was written
        with pytest.raises(RingError, match="tail"):
            for _ in range(10):
                ring.write(b"y" * 1000)
    finally:
        peer.close()
        ring.close()


def test_closing_the_creator_frees_the_pages_a_peer_still_holds() -> None:
    """A client keeping its memfd descriptors after the connection ended must not keep the
    node's ring memory alive: the creator's close() punches the pages out."""
    ring = Ring.create_memfd(capacity=1 << 20)
    held = os.dup(ring.fd)  # what a client received by SCM_RIGHTS and kept
    try:
        for _ in range(200):
            assert ring.write(b"x" * 4000)
        assert os.fstat(held).st_blocks > 0  # pages in use
        ring.close()
        assert os.fstat(held).st_blocks == 0  # freed, though the peer still holds the fd
        assert os.fstat(held).st_size > 0  # the seals keep the size: a peer mapping stays valid
    finally:
        os.close(held)
