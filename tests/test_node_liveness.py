"""The supervisor's rules and plumbing, without a node: messages, backoff, heartbeats,
the data dir lock, ring reclaim, the descriptor reserve, the health port's cap and
the control process's feed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from felix.control.model import Change, Op, Resource, ResourceKind
from felix.control.store import CursorTooOld
from felix.errors import ConfigError, RemoteProtocolError
from felix.node import messages as msg
from felix.node.control import ChildFeed
from felix.node.datadir import DataDirInUse, DataDirLock, reclaim_rings, ring_prefix
from felix.node.fds import FdReserve
from felix.node.health import HealthServer
from felix.node.liveness import Health, Heartbeat, RestartBackoff
from tests.aio import run

# -- messages ---------------------------------------------------------------------------


def test_every_message_round_trips() -> None:
    examples: list[msg.Message] = [
        msg.ShardDown(1),
        msg.ShardUp(0),
        msg.Quiesce(2.5),
        msg.Drain(4),
        msg.ApplyResource("define", "stream", ["t", "ns", "s"], 3, {"replay_max_records": 9}),
        msg.ApplyResource("delete", "cache", ["t", "ns", "c"], 0),
        msg.ApplyResource("define", "group", ["t", "ns", "s", "g"], 1, {"lease_ms": 2000}),
        msg.Ping(7),
        msg.SnapshotRequest(1),
        msg.ChangesRequest(2, 10, 500, 10.0),
        msg.Ready(),
        msg.Quiesced(),
        msg.Drained(),
        msg.Stats({"requests": 3}),
        msg.Pong(7),
        msg.SnapshotPart(1, 12, [{"kind": "tenant"}], True),
        msg.ChangesReply(2, [], 11),
        msg.FeedFailed(2, "gone", cursor_too_old=True),
    ]
    for message in examples:
        line = msg.encode(message)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert msg.decode(line) == message


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"type": "nope"}\n',
        b'{"shard": 1}\n',
        b'{"type": "shard_down"}\n',
        b'{"type": "shard_down", "shard": "1"}\n',
        b'{"type": "shard_down", "shard": true}\n',
        b'{"type": "apply", "op": "drop", "kind": "stream", "path": ["a", "b", "c"], "shard": 0}\n',
        b'{"type": "apply", "op": "define", "kind": "stream", "path": ["a", "b"], "shard": 0}\n',
        b'{"type": "apply", "op": "define", "kind": "stream", "path": ["a", "b", 3], "shard": 0}\n',
        b'{"type": "apply", "op": "define", "kind": "group", "path": ["a", "b", "c"], '
        b'"shard": 0}\n',
        b'{"type": "apply", "op": "define", "kind": "stream", "path": ["a", "b", "c", "d"], '
        b'"shard": 0}\n',
        b'{"type": "snapshot_part", "request": 1, "position": 1, "resources": [], "done": 1}\n',
    ],
)
def test_bad_lines_are_refused_with_a_protocol_error(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        msg.decode(line)


# -- backoff and heartbeat (the clock is passed in) --------------------------------------------


def _upper(a: float, b: float) -> float:
    return b


def test_restart_backoff_doubles_to_its_bound_with_jitter_and_resets_when_healthy() -> None:
    backoff = RestartBackoff(0.1, 1.0, healthy_after=30, uniform=_upper)
    delays = [backoff.delay(started_at=100, now=101) for _ in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # bounded, never given up
    assert backoff.attempts == 6
    # A child that ran for healthy_after seconds starts over from the minimum.
    assert backoff.delay(started_at=100, now=131) == 0.1
    assert backoff.attempts == 1
    jittered = RestartBackoff(0.1, 1.0, uniform=lambda a, b: a)
    assert [jittered.delay(0, 1) for _ in range(3)] == [0.05, 0.1, 0.2]  # the lower half


def test_heartbeat_reports_silence_then_death_and_recovers_on_an_answer() -> None:
    beat = Heartbeat(unresponsive_after=3, kill_after=10)
    beat.start(now=100)
    assert beat.health(150) is Health.OK  # no ping sent yet: nothing is owed
    first = beat.ping(now=150)
    assert beat.health(152.9) is Health.OK
    beat.ping(now=151)
    assert beat.health(153) is Health.UNRESPONSIVE  # counted from the oldest unanswered
    beat.pong(first, now=153.5)  # an old answer: the later ping is still owed
    assert beat.silent_for(154) == 3
    beat.pong(first + 1, now=154)
    assert beat.health(200) is Health.OK
    beat.ping(now=200)
    beat.pong(first + 7, now=201)  # never sent: proves nothing
    assert beat.health(210) is Health.DEAD
    beat.start(now=211)  # a new incarnation owes nothing
    assert beat.health(230) is Health.OK
    with pytest.raises(ValueError):
        Heartbeat(unresponsive_after=5, kill_after=1)


# -- the data dir --------------------------------------------------------------------------


def test_the_data_dir_lock_is_exclusive_names_its_holder_and_is_released(tmp_path: Path) -> None:
    lock = DataDirLock.acquire(tmp_path / "data")
    with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}") as info:
        DataDirLock.acquire(tmp_path / "data")
    assert isinstance(info.value, ConfigError)  # `felix up` exits 2 with the message
    lock.release()
    DataDirLock.acquire(tmp_path / "data").release()


def test_rings_are_named_after_the_data_dir_and_leftovers_are_reclaimed(tmp_path: Path) -> None:
    prefix = ring_prefix(tmp_path / "a")
    assert prefix == ring_prefix(tmp_path / "x" / ".." / "a")  # the real path counts
    assert prefix != ring_prefix(tmp_path / "b")
    shm = tmp_path / "shm"
    shm.mkdir()
    for name in (f"{prefix}g0s0", f"{prefix}s0g0", f"{ring_prefix(tmp_path / 'b')}g0s0"):
        (shm / name).write_bytes(b"")
    assert reclaim_rings(prefix, shm) == [f"{prefix}g0s0", f"{prefix}s0g0"]
    assert [p.name for p in shm.iterdir()] == [f"{ring_prefix(tmp_path / 'b')}g0s0"]


@contextlib.contextmanager
def _descriptor_limit(extra: int) -> Iterator[None]:
    """The soft RLIMIT_NOFILE set to what is open now plus ``extra`` (then restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 1 + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_descriptor_reserve_frees_what_a_start_needs_when_none_is_left() -> None:
    hog: list[int] = []
    with _descriptor_limit(64):
        reserve = FdReserve(16)
        try:
            assert reserve.held == 16
            with contextlib.suppress(OSError):
                while True:  # a flood takes every other descriptor
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            with pytest.raises(OSError):
                socket.socketpair()
            with reserve.released():
                a, b = socket.socketpair()
                copy = os.dup(a.fileno())
            assert reserve.held == 13  # all but what the start still holds, taken back
            for fd in (copy, a.detach(), b.detach()):
                os.close(fd)
            reserve.refill()
            assert reserve.held == 16
        finally:
            reserve.release_all()
            for fd in hog:
                os.close(fd)


# -- the health port ---------------------------------------------------------------------------


class _Node:
    children: Sequence[object] = ()
    started = False

    def readiness(self) -> tuple[bool, list[str]]:
        return False, ["shard-0: restart failing (attempt 2): [Errno 24] Too many open files"]

    def supervisor_counters(self) -> list[tuple[str, str, int]]:
        return [("felix_child_restart_failures", "Failed starts", 2)]


def test_idle_connections_cannot_keep_a_probe_out_of_the_health_port() -> None:
    async def main() -> None:
        server = HealthServer(_Node(), max_connections=8)  # type: ignore[arg-type]
        await server.start("127.0.0.1", 0)
        host, port = server.address
        idle = [await asyncio.open_connection(host, port) for _ in range(20)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert answer.endswith(
            b"not ready\nshard-0: restart failing (attempt 2): [Errno 24] Too many open files\n"
        )
        assert server._open <= 8
        assert server.evicted >= 12
        writer.close()
        for _, w in idle:
            w.close()
        await server.stop()

    run(main)


def test_startupz_is_503_until_the_node_started_and_200_from_then_on() -> None:
    async def get(server: HealthServer, path: str) -> bytes:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    async def main() -> None:
        node = _Node()
        server = HealthServer(node)  # type: ignore[arg-type]
        await server.start("127.0.0.1", 0)
        starting = await get(server, "/startupz")
        assert starting.startswith(b"HTTP/1.1 503 ")
        assert starting.endswith(
            b"starting\nshard-0: restart failing (attempt 2): [Errno 24] Too many open files\n"
        )
        node.started = True  # the node is still not ready: started stays latched
        started = await get(server, "/startupz")
        assert started.startswith(b"HTTP/1.1 200 ") and started.endswith(b"\r\n\r\nstarted\n")
        assert (await get(server, "/readyz")).startswith(b"HTTP/1.1 503 ")
        await server.stop()

    run(main)


# -- the control process's feed ------------------------------------------------------------------


def test_child_feed_pairs_answers_with_requests_and_fails_fast_when_the_process_is_gone() -> None:
    async def main() -> None:
        sent: list[msg.Command] = []
        up = [True]

        def send(command: msg.Command) -> bool:
            sent.append(command)
            return up[0]

        feed = ChildFeed(send)
        now = datetime.now(UTC)
        tenant = Resource(
            kind=ResourceKind.TENANT,
            path=("acme",),
            spec={},
            version=1,
            created_at=now,
            updated_at=now,
        )
        snap = asyncio.ensure_future(feed.snapshot())
        await asyncio.sleep(0)
        request = sent[-1]
        assert isinstance(request, msg.SnapshotRequest)
        raw = tenant.model_dump(mode="json")
        feed.on_event(msg.SnapshotPart(request.request, 5, [raw], False))
        feed.on_event(msg.SnapshotPart(request.request + 1, 9, [], True))  # someone else's
        feed.on_event(msg.SnapshotPart(request.request, 5, [raw], True))
        assert await snap == (5, [tenant, tenant])
        changes = asyncio.ensure_future(feed.changes(5, 100, 0.0))
        await asyncio.sleep(0)
        request = sent[-1]
        assert isinstance(request, msg.ChangesRequest) and request.since == 5
        change = Change(position=6, op=Op.CREATE, resource=tenant)
        feed.on_event(msg.ChangesReply(request.request, [change.model_dump(mode="json")], 6))
        assert await changes == ([change], 6)
        too_old = asyncio.ensure_future(feed.changes(1, 100, 0.0))
        await asyncio.sleep(0)
        feed.on_event(msg.FeedFailed(sent[-1].request, "trimmed", cursor_too_old=True))  # type: ignore[union-attr]
        with pytest.raises(CursorTooOld):
            await too_old
        lost = asyncio.ensure_future(feed.changes(6, 100, 10.0))
        await asyncio.sleep(0)
        feed.lost()
        with pytest.raises(ConnectionError):
            await lost
        up[0] = False
        with pytest.raises(ConnectionError):
            await feed.snapshot()

    run(main)
