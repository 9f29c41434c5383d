"""Queue group scenarios of issue #13 in real `felix up` process trees (docs/queues.md):
stale acks after a lease expiry and in_progress keeping a lease, exclusive groups'
active/standby hand-over, a slow member bounded by its credit, the window bound and
its stall, a record that crashes the shard reaching the dead-letter stream after
max_deliveries restarts, a kill -9 right after a term, a graceful rolling restart,
competing consumers across two gateways, and the permission checks of consume and ack.

Groups are defined through the node's control plane where their settings matter; each
test checks the group's status (the health port's stream route) afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import felix
from felix.client import QueueMessage, Role
from felix.errors import LeaseLost
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(240)

ARGS = ("--durable-streams", "--fsync", "commit")
T, NS = "acme", "prod"


def url(node: NodeProcess) -> str:
    return f"felix://{node.host}:{node.port}"


def connect(node: NodeProcess, **kw: Any) -> Any:
    return felix.connect(url(node), ca=node.ca_file, tenant=T, namespace=NS, **kw)


def wait_for(check: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.05)


def group_status(node: NodeProcess, stream: str, group: str) -> dict[str, Any]:
    status, body = node.http(f"/streams/{T}/{NS}/{stream}")
    assert status == 200, body
    found: dict[str, Any] = json.loads(body)["groups"][group]
    return found


def define(node: NodeProcess, stream: str, group: str, **settings: Any) -> None:
    """Tenant, namespace, durable stream and group through the node's control plane;
    returns once the stream's shard holds the group's definition."""
    base = f"{node.info['control']}/v1/tenants"
    with httpx.Client(timeout=10) as http:
        for path, body in (
            (base, {"name": T}),
            (f"{base}/{T}/namespaces", {"name": NS}),
            (f"{base}/{T}/namespaces/{NS}/streams", {"name": stream, "durable": True}),
        ):
            r = http.post(path, json=body)
            assert r.status_code in (201, 409), r.text
        r = http.post(
            f"{base}/{T}/namespaces/{NS}/streams/{stream}/groups", json={"name": group, **settings}
        )
        assert r.status_code == 201, r.text

    def defined() -> bool:
        status, body = node.http(f"/streams/{T}/{NS}/{stream}")
        return status == 200 and group in json.loads(body).get("groups", {})

    wait_for(defined, what=f"group {group} on its shard")


async def publish(client: felix.Client, stream: str, n: int, prefix: str = "m") -> list[int]:
    offsets = []
    for i in range(n):  # one by one: offsets in publish order
        ack = await client.publish(stream, f"{prefix}{i}".encode(), headers={"i": str(i)})
        assert ack is not None
        offsets.append(ack.offset)
    return offsets


async def until(check: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.05)


async def dead_letters(client: felix.Client, stream: str, at_least: int) -> list[Any]:
    """Every record of ``stream``'s dead-letter stream (at least ``at_least``)."""
    out: list[Any] = []
    async with client.subscribe(f"{stream}.dlq", start="earliest") as dlq:
        while True:
            try:
                out.append(await dlq.next(timeout=10 if len(out) < at_least else 1.0))
            except felix.FelixTimeoutError:
                return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the scenarios that do not kill or restart it (a stream each)."""
    proc = NodeProcess(tmp_path_factory.mktemp("q") / "node", *ARGS, gateways=2, shards=2)
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


# --- 1. leases: stale acks, in_progress -------------------------------------------------


def test_an_ack_after_the_lease_expired_and_went_to_another_member_is_stale(
    node: NodeProcess,
) -> None:
    define(node, "stale", "g", lease_ms=1000)

    async def main() -> None:
        async with connect(node) as ca, connect(node) as cb:
            (offset,) = await publish(ca, "stale", 1)
            async with ca.consume("stale", "g", prefetch=1) as a:
                (held,) = await a.fetch(1, timeout=10)
                assert (held.offset, held.attempts, held.failures) == (offset, 1, 0)
                async with cb.consume("stale", "g", prefetch=1) as b:
                    # The lease expires after ~1 s: the record goes to B with one failure.
                    (again,) = await b.fetch(1, timeout=15)
                    assert (again.offset, again.attempts, again.failures) == (offset, 2, 1)
                    with pytest.raises(LeaseLost) as lost:
                        await held.ack()
                    assert lost.value.reason == "stale"
                    await again.ack()
        st = group_status(node, "stale", "g")
        assert (st["acked"], st["leased"], st["available"], st["dead"]) == (1, 0, 0, 0), st

    run(main, timeout=60)


def test_in_progress_keeps_the_lease_past_lease_ms(node: NodeProcess) -> None:
    define(node, "busy", "g", lease_ms=1000)

    async def main() -> None:
        async with connect(node) as ca, connect(node) as cb:
            (offset,) = await publish(ca, "busy", 1)
            async with ca.consume("busy", "g", prefetch=1) as a:
                (held,) = await a.fetch(1, timeout=10)
                async with cb.consume("busy", "g", prefetch=1) as b:
                    # 3 lease times, extended every 0.4 s: B never gets it.
                    for _ in range(8):
                        await held.in_progress()
                        assert not await b.fetch(1, timeout=0.4)
                    await held.ack()  # still A's: accepted
                    assert not await b.fetch(1, timeout=1.5)
        st = group_status(node, "busy", "g")
        assert (st["acked"], st["leased"], st["available"]) == (1, 0, 0), st
        assert st["floor"] == offset + 1, st

    run(main, timeout=60)


# --- 2. exclusive groups ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["graceful", "abrupt"])
def test_exclusive_group_hands_over_to_the_standby_in_offset_order(
    node: NodeProcess, how: str
) -> None:
    stream = f"excl-{how}"
    define(node, stream, "g", exclusive=True)

    async def main() -> None:
        async with connect(node) as cb:
            ca = await connect(node)
            try:
                offsets = await publish(cb, stream, 10)
                a = ca.consume(stream, "g", prefetch=2)
                await a.start()
                assert a.role is Role.ACTIVE
                async with cb.consume(stream, "g", prefetch=4) as b:
                    assert b.role is Role.STANDBY
                    first = await a.fetch(2, timeout=10)
                    assert [m.offset for m in first] == offsets[:2]
                    await first[0].ack()
                    more = await a.fetch(1, timeout=10)  # its credit freed: the next one
                    assert [m.offset for m in more] == offsets[2:3]
                    await more[0].ack()
                    assert not await b.fetch(1, timeout=1.0)  # standby: nothing
                    # A holds offsets[1] unacked when it goes.
                    if how == "graceful":
                        await a.close()
                    else:
                        await ca.close()  # no STOP: the connection just goes
                    await until(lambda: b.role is Role.ACTIVE, what="the standby's promotion")
                    got: list[QueueMessage] = []
                    while len(got) < 8:
                        batch = await b.fetch(4, timeout=10)
                        assert batch, [m.offset for m in got]
                        for m in batch:
                            got.append(m)
                            await m.ack()
                    assert [m.offset for m in got] == [offsets[1], *offsets[3:]]
                    back = got[0]
                    assert back.attempts == 2
                    assert back.failures == (0 if how == "graceful" else 1)
                    assert not await b.fetch(1, timeout=0.5)
            finally:
                await ca.close()
        st = group_status(node, stream, "g")
        assert (st["acked"], st["leased"], st["dead"], st["members"]) == (10, 0, 0, 0), st

    run(main, timeout=60)


# --- 3. a slow member is bounded by its credit ------------------------------------------


def test_a_slow_member_holds_at_most_its_prefetch_while_a_fast_one_takes_the_rest(
    node: NodeProcess,
) -> None:
    async def main() -> None:
        async with connect(node) as cs, connect(node) as cf:
            await cs.publish("slowfast", b"first")  # the stream exists (durable, auto)
            async with cs.consume("slowfast", "g", prefetch=2) as slow:
                offsets = [0, *await publish(cs, "slowfast", 39)]
                held = await slow.fetch(2, timeout=10)
                await until(lambda: slow.pending + len(held) >= 2)
                acked: list[int] = []
                async with cf.consume("slowfast", "g", prefetch=16) as fast:
                    while len(acked) < len(offsets) - 2:
                        batch = await fast.fetch(16, timeout=10)
                        assert batch, acked
                        for m in batch:
                            acked.append(m.offset)
                            await m.ack()
                    assert not await fast.fetch(1, timeout=0.5)
                    st = group_status(node, "slowfast", "g")
                    assert st["leased"] == 2 and st["acked"] == 38 and st["members"] == 2, st
                    # The slow one never got more than its two.
                    assert slow.pending == 0 and len(held) == 2
                    assert sorted(acked + [m.offset for m in held]) == offsets
                    for m in held:
                        await m.ack()
        st = group_status(node, "slowfast", "g")
        assert (st["acked"], st["leased"]) == (40, 0), st

    run(main, timeout=60)


# --- 4. window bound and stall ----------------------------------------------------------


def test_a_held_record_stalls_the_window_once_and_its_ack_resumes_delivery(
    node: NodeProcess,
) -> None:
    define(node, "stall", "g", max_ack_pending=4, max_span=4)
    stall_line = "group g of acme/prod/stall is stalled"

    async def main() -> None:
        async with connect(node) as client:
            offsets = await publish(client, "stall", 12)
            async with client.consume("stall", "g", prefetch=16) as jobs:
                window = await jobs.fetch(16, timeout=10)
                window += await jobs.fetch(16, timeout=0.5)
                assert [m.offset for m in window] == offsets[:4]  # max_ack_pending
                held, rest = window[0], window[1:]
                for m in rest:
                    await m.ack()
                # The oldest record holds the span full: nothing newer comes.
                assert not await jobs.fetch(1, timeout=1.0)
                await until(lambda: group_status(node, "stall", "g")["stalled"], what="stalled")
                st = group_status(node, "stall", "g")
                assert (st["floor"], st["next"], st["leased"]) == (offsets[0], offsets[4], 1), st
                assert node.log().count(stall_line) == 1
                await held.ack()
                got: list[int] = []
                while len(got) < 8:
                    batch = await jobs.fetch(4, timeout=10)
                    assert batch, got
                    for m in batch:
                        got.append(m.offset)
                        await m.ack()
                assert got == offsets[4:]
        st = group_status(node, "stall", "g")
        assert not st["stalled"] and st["acked"] == 12 and st["floor"] == offsets[-1] + 1, st
        # One stall, logged once while it lasts. (With max_span == max_ack_pending the
        # engine also counts a span full of leases in flight as stalled, when more
        # records wait: tests/test_queue_group.py fixes that; 12 records avoid it here.)
        assert node.log().count(stall_line) == 1, node.log()
        # Counted (docs/queues.md: felix_queue_stalls_total; the shard's stats lag a bit).
        stalls = await asyncio.to_thread(
            wait_for, lambda: node.metric("felix_queue_stalls_total"), 15, "the stall metric"
        )
        assert stalls >= 1

    run(main, timeout=60)


# --- 5. a record that crashes the shard -------------------------------------------------


@pytest.mark.split_topology
def test_a_record_that_crashes_the_shard_is_dead_lettered_after_max_deliveries(
    tmp_path: Path,
) -> None:
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=1)
    try:
        define(node, "jobs", "g", max_deliveries=3)

        async def main() -> None:
            async with connect(node) as client:
                offsets = await publish(client, "jobs", 6)
                poison = offsets[2]
                crashes: list[tuple[int, int]] = []  # (attempts, failures) of each crash
                acked: list[int] = []
                async with client.consume("jobs", "g", prefetch=1) as jobs:
                    deadline = time.monotonic() + 90
                    while len(acked) < len(offsets) - 1:
                        assert time.monotonic() < deadline, (crashes, acked)
                        for job in await jobs.fetch(1, timeout=0.5):
                            if job.offset == poison:
                                # "Processing" it kills the shard (kill -9), every time.
                                crashes.append((job.attempts, job.failures))
                                old = node.kill_child("shard-0")
                                await asyncio.to_thread(node.wait_restarted, "shard-0", old)
                            else:
                                await job.ack()
                                acked.append(job.offset)
                    assert not await jobs.fetch(1, timeout=1.5)  # never again
                assert crashes == [(1, 0), (2, 1), (3, 2)]  # exactly max_deliveries
                assert sorted(acked) == sorted(set(offsets) - {poison})
                (letter,) = await dead_letters(client, "jobs", 1)
                h = letter.headers
                assert letter.data == b"m2"
                assert h["felix-dlq-id"] == f"g:{poison}"
                assert h["felix-dlq-reason"] == "max_deliveries"
                assert h["felix-dlq-detail"] == "shard restarted"
                assert (h["felix-dlq-failures"], h["felix-dlq-attempts"]) == ("3", "3")

        run(main, timeout=150)
        st = group_status(node, "jobs", "g")
        assert (st["acked"], st["dead"], st["dying"], st["leased"]) == (5, 1, 0, 0), st
    finally:
        assert node.stop() == 0, node.log()


# --- 6. kill -9 between the dead-letter append and the state write ----------------------


@pytest.mark.split_topology
def test_a_term_cut_short_by_kill_9_is_dead_lettered_and_never_redelivered(
    tmp_path: Path,
) -> None:
    """term() is answered once ``dying`` is fsynced; the shard dies right after, before
    or after its dead-letter append: after the restart the record is in the dead-letter
    stream (maybe twice, one felix-dlq-id) and never handed out again."""
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=1)
    rounds = 3
    try:

        async def main() -> list[int]:
            async with connect(node) as client:
                offsets = await publish(client, "jobs", rounds)
                async with client.consume("jobs", "g", prefetch=1) as jobs:
                    for i in range(rounds):
                        deadline = time.monotonic() + 30
                        while True:
                            assert time.monotonic() < deadline, i
                            got = await jobs.fetch(1, timeout=0.5)
                            if got:
                                break
                        (job,) = got
                        # (The next one was leased when the shard died: one failure each.)
                        assert job.offset == offsets[i], job
                        await job.term(f"bad {i}")
                        old = node.kill_child("shard-0")  # at once: the append may be in flight
                        await asyncio.to_thread(node.wait_restarted, "shard-0", old)
                return offsets

        offsets = run(main, timeout=120)

        # No consumer needed: the restarted shard appends its dying entries by itself.
        def finished() -> bool:
            st = group_status(node, "jobs", "g")
            return bool(st["dead"] == rounds and st["dying"] == 0)

        wait_for(finished, timeout=30, what=f"{rounds} dead: {group_status(node, 'jobs', 'g')}")

        async def check() -> None:
            async with connect(node) as client:
                letters = await dead_letters(client, "jobs", rounds)
                ids = [m.headers["felix-dlq-id"] for m in letters]
                assert set(ids) == {f"g:{o}" for o in offsets}, ids
                assert len(ids) <= 2 * rounds
                assert {m.headers["felix-dlq-reason"] for m in letters} == {"term"}
                async with client.consume("jobs", "g") as jobs:
                    assert not await jobs.fetch(1, timeout=2)  # none redelivered

        run(check, timeout=60)
        st = group_status(node, "jobs", "g")
        assert (st["dead"], st["acked"], st["leased"], st["available"]) == (rounds, 0, 0, 0), st
    finally:
        assert node.stop() == 0, node.log()


# --- 7. graceful rolling restart --------------------------------------------------------


def test_a_graceful_restart_releases_leases_without_failures(tmp_path: Path) -> None:
    data = tmp_path / "node"
    node = NodeProcess(data, *ARGS, gateways=1, shards=1)
    held: list[int] = []
    try:

        async def first() -> None:
            client = await felix.connect(url(node), ca=node.ca_file)
            try:
                await publish(client, "jobs", 6)
                jobs = client.consume("jobs", "g", prefetch=4)
                await jobs.start()
                got = await jobs.fetch(4, timeout=10)
                got += await jobs.fetch(4 - len(got), timeout=2) if len(got) < 4 else []
                assert [m.offset for m in got] == [0, 1, 2, 3]
                await got[0].ack()
                held.extend(m.offset for m in got[1:])
                # SIGTERM with the records leased and the consumer connected.
                assert await asyncio.to_thread(node.stop) == 0
            finally:
                await client.close()

        run(first, timeout=60)
    finally:
        node.stop()
    node = NodeProcess(data, *ARGS, gateways=1, shards=1)
    try:

        async def second() -> None:
            async with (
                felix.connect(url(node), ca=node.ca_file) as client,
                client.consume("jobs", "g", prefetch=8) as jobs,
            ):
                got: list[QueueMessage] = []
                while len(got) < 5:
                    batch = await jobs.fetch(8, timeout=10)
                    assert batch, got
                    got += batch
                assert [m.offset for m in got] == [1, 2, 3, 4, 5]
                for m in got:
                    assert m.failures == 0, (m, "the graceful stop counted a failure")
                    # (What it held, and what its freed credit buffered, was handed out.)
                    assert m.attempts == 2 if m.offset in held else m.attempts in (1, 2)
                    await m.ack()

        run(second, timeout=60)
        status, body = node.http("/streams/default/default/jobs")
        assert status == 200, body
        st = json.loads(body)["groups"]["g"]
        assert (st["acked"], st["dead"], st["dying"]) == (6, 0, 0), st
    finally:
        assert node.stop() == 0, node.log()


# --- 8. competing consumers across two gateways -----------------------------------------


def gateway_connections(node: NodeProcess) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in node.http("/metrics")[1].splitlines():
        if line.startswith("felix_connections{") and 'role="gateway"' in line:
            index = line.split('index="', 1)[1].split('"', 1)[0]
            out[index] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.split_topology
def test_competing_consumers_on_both_gateways_never_share_or_skip_a_record(
    node: NodeProcess,
) -> None:
    async def main() -> None:
        clients: list[felix.Client] = []
        try:
            # One connection per client (pool_size=1), until both gateways hold some
            # (the kernel spreads them); every client then consumes on its connection.
            def both() -> bool:
                return len([v for v in gateway_connections(node).values() if v > 0]) == 2

            while len(clients) < 4 or not both():
                assert len(clients) < 24, gateway_connections(node)
                clients.append(await connect(node, pool_size=1))
                if len(clients) >= 4:
                    with contextlib.suppress(AssertionError):
                        await until(both, timeout=3)  # the gauges lag a little
            offsets = await publish(clients[0], "spread", 300)
            holders: dict[int, int] = {}  # offset -> consumer holding it now
            seen: dict[int, list[int]] = {}
            done = asyncio.Event()

            async def worker(index: int, client: felix.Client) -> None:
                async with client.consume("spread", "g", prefetch=4) as jobs:
                    while not done.is_set():
                        for job in await jobs.fetch(4, timeout=0.2):
                            assert job.offset not in holders, "leased to two members at once"
                            holders[job.offset] = index
                            seen.setdefault(job.offset, []).append(index)
                            await asyncio.sleep(0.001)
                            del holders[job.offset]
                            await job.ack()
                        if len(seen) == len(offsets):
                            done.set()

            await asyncio.wait_for(
                asyncio.gather(*(worker(i, c) for i, c in enumerate(clients))), 90
            )
            assert sorted(seen) == offsets  # none skipped
            assert all(len(who) == 1 for who in seen.values()), seen  # none twice
            assert len({w for who in seen.values() for w in who}) >= 2
        finally:
            for client in clients:
                await client.close()

    run(main, timeout=120)
    st = group_status(node, "spread", "g")
    assert (st["acked"], st["leased"], st["available"], st["dead"]) == (300, 0, 0, 0), st


# --- 9. permissions ---------------------------------------------------------------------


def test_consume_needs_stream_consume_and_so_does_every_ack(tmp_path: Path) -> None:
    auth_dir = tmp_path / "node" / "auth"

    def felix_cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def mint(*perms: str) -> str:
        flags = [x for p in perms for x in ("--perm", f"{p}:stream:acme/default/*")]
        return felix_cli(
            "token", "mint", "--tenant", "acme", "--sub", "svc", "--dir", str(auth_dir), *flags
        )

    felix_cli("token", "keygen", "--tenant", "acme", "--dir", str(auth_dir))
    worker = mint("stream.publish", "stream.consume")
    reader = mint("stream.publish", "stream.subscribe")
    node = NodeProcess(tmp_path / "node", "--auth", *ARGS, gateways=1, shards=1)
    try:

        async def main() -> None:
            async with felix.connect(url(node), ca=node.ca_file, tenant="acme", token=reader) as c:
                await publish(c, "jobs", 2)
                with pytest.raises(felix.PermissionDenied):
                    async with c.consume("jobs", "g") as jobs:
                        await jobs.fetch(1, timeout=1)
            async with (
                felix.connect(url(node), ca=node.ca_file, tenant="acme", token=worker) as c,
                c.consume("jobs", "g", prefetch=2) as jobs,
            ):
                first, second = await jobs.fetch(2, timeout=10) + await jobs.fetch(1, timeout=1)
                await first.ack()
                # The connection presents a token with stream.subscribe only: each ack is
                # checked against its stream's token, so the next one is refused.
                conn = jobs._conn
                assert conn is not None
                await conn.reauth(reader)
                with pytest.raises(felix.PermissionDenied):
                    await second.ack()
                await conn.reauth(worker)  # the refused ack settled nothing: again
                await second.ack()

        run(main, timeout=60)
        status, body = node.http("/streams/acme/default/jobs")
        assert status == 200, body
        st = json.loads(body)["groups"]["g"]
        assert (st["acked"], st["leased"]) == (2, 0), st
    finally:
        assert node.stop() == 0, node.log()
