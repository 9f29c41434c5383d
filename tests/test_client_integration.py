"""The Python client against a real in-process node (felix.node.local.LocalNode) over QUIC.

Faults are injected at the node's shard links: a :class:`Gate` holds request
records on their way to the shards and releases them later, in any order, so
replies come back out of order, late (after their call was cancelled), or
never, deterministically.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

import felix
from felix.client import Client, Disconnected, Reconnected, SlowConsumer
from felix.client._connection import Connection
from felix.errors import (
    BadRequest,
    ConfigError,
    ConnectionLost,
    CursorError,
    FelixTimeoutError,
    HandshakeFailed,
    LocalProtocolError,
    Overloaded,
    Unauthenticated,
)
from felix.node.local import LocalNode
from felix.shard.stream_log import StreamSettings
from felix.tls import ensure_node_certificates
from tests.aio import run

pytestmark = pytest.mark.timeout(60)


class Gate:
    """Holds request records on their way to the shards while closed."""

    def __init__(self, node: LocalNode, monkeypatch: pytest.MonkeyPatch) -> None:
        self._send = node.links.send
        self.held: list[tuple[int, bytes]] = []
        self.closed = False
        monkeypatch.setattr(node.links, "send", self._gate)

    def _gate(self, shard: int, record: bytes) -> bool:
        if self.closed:
            self.held.append((shard, record))
            return True
        return self._send(shard, record)

    def release(self, order: Callable[[list[tuple[int, bytes]]], None] | None = None) -> None:
        """Open the gate and send what was held (``order`` may shuffle it in place)."""
        self.closed = False
        held, self.held = self.held, []
        if order is not None:
            order(held)
        for shard, record in held:
            self._send(shard, record)

    async def wait_held(self, n: int) -> None:
        while len(self.held) < n:
            await asyncio.sleep(0.001)


def connections(client: Client) -> list[Connection]:
    return client._pool.live()


# -- cache --------------------------------------------------------------------------------


def test_cache_get_set_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            cache = client.cache("sessions")
            assert await cache.get("user:1") is None
            assert await cache.set("user:1", b"alice") is True
            assert await cache.get("user:1") == b"alice"
            assert await cache.set("user:1", bytearray(b"bob")) is True
            assert await cache.get("user:1") == b"bob"
            assert await cache.delete("user:1") is True
            assert await cache.delete("user:1") is False
            assert await cache.get("user:1") is None
            assert await cache.set("big", b"\x00" * 100_000) is True
            assert await cache.get("big") == b"\x00" * 100_000
            assert await cache.set("empty", b"") is True
            assert await cache.get("empty") == b""

    run(main)


def test_cache_nx_xx(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            cache = client.cache("locks")
            assert await cache.set("k", b"1", xx=True) is False  # absent: xx refuses
            assert await cache.get("k") is None
            assert await cache.set("k", b"1", nx=True) is True
            assert await cache.set("k", b"2", nx=True) is False  # present: nx refuses
            assert await cache.get("k") == b"1"
            assert await cache.set("k", b"3", xx=True) is True
            assert await cache.get("k") == b"3"
            with pytest.raises(ConfigError):
                await cache.set("k", b"4", nx=True, xx=True)

    run(main)


def test_cache_ttl_and_expiry(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            cache = client.cache("sessions")
            assert await cache.ttl("nope") is None
            await cache.set("forever", b"x")
            assert await cache.ttl("forever") == math.inf
            await cache.set("short", b"x", ttl=0.3)
            left = await cache.ttl("short")
            assert left is not None and 0.2 < left <= 0.3
            await asyncio.sleep(0.45)
            assert await cache.get("short") is None
            assert await cache.ttl("short") is None
            # A set replaces the TTL; ttl=math.inf is no expiry.
            await cache.set("k", b"x", ttl=0.2)
            await cache.set("k", b"y", ttl=math.inf)
            assert await cache.ttl("k") == math.inf
            with pytest.raises(ConfigError):
                await cache.set("k", b"x", ttl=0)

    run(main)


def test_names_resolve_in_the_client_namespace(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file, namespace="app") as app,
            felix.connect(node.url, ca=node.ca_file, namespace="billing") as billing,
        ):
            await app.cache("c").set("k", b"app")
            await billing.cache("c").set("k", b"billing")
            assert await app.cache("c").get("k") == b"app"
            assert await app.cache("billing/c").get("k") == b"billing"
            assert await billing.cache("app/c").get("k") == b"app"
            with pytest.raises(BadRequest):
                app.cache("a/b/c")

    run(main)


# -- publish and subscribe ----------------------------------------------------------------


def test_publish_acks_carry_offsets(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            first = await client.publish("orders", b"a")
            assert first is not None
            # An in-memory stream: the ack promises memory only (issue 12's durability).
            assert (
                first.durability is felix.Durability.MEMORY and first.durability.value == "memory"
            )
            second = await client.publish("orders", b"b", headers={"k": "v"})
            assert second is not None and second.offset == first.offset + 1
            acks = await client.publish_batch("orders", [b"c", b"d", b"e"])
            assert [a.offset for a in acks] == [first.offset + i for i in (2, 3, 4)]
            assert {a.durability for a in acks} == {felix.Durability.MEMORY}
            assert await client.publish_batch("orders", []) == []
            for ack in (True, False):
                with pytest.raises(LocalProtocolError):
                    await client.publish("orders", "text", ack=ack)  # type: ignore[arg-type]
            async with client.subscribe("orders", start="earliest") as sub:
                got = [await sub.next(timeout=2) for _ in range(5)]
            assert [m.data for m in got] == [b"a", b"b", b"c", b"d", b"e"]
            assert [m.offset for m in got] == list(range(first.offset, first.offset + 5))
            assert dict(got[1].headers) == {"k": "v"} and dict(got[0].headers) == {}
            assert {m.stream for m in got} == {"orders"}

    run(main)


def test_subscribe_latest_gets_only_new_records(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            await client.publish("s", b"old")
            async with client.subscribe("s") as sub:
                ack = await client.publish("s", b"new")
                message = await sub.next(timeout=2)
                assert (message.data, message.offset) == (b"new", ack and ack.offset)
                with pytest.raises(FelixTimeoutError):
                    await sub.next(timeout=0.1)
                [gateway_conn] = node.gateway.connections
                assert len(gateway_conn.subscriptions) == 1
            # Leaving the block sent UNSUBSCRIBE: the broker forgets the subscription.
            async with asyncio.timeout(2):
                while gateway_conn.subscriptions:
                    await asyncio.sleep(0.01)
            with pytest.raises(ConnectionLost):
                await sub.next(timeout=0.1)

    run(main)


def test_subscribe_from_offset_and_cursor_errors(tmp_path: Path) -> None:
    settings = {"stream_defaults": StreamSettings(replay_max_records=4)}

    async def main() -> None:
        async with (
            LocalNode.start(tmp_path, shard_settings=settings) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            acks = [await client.publish("s", b"%d" % i) for i in range(10)]
            assert acks[0] is not None
            base = acks[0].offset
            async with client.subscribe("s", start=base + 7) as sub:
                assert [(await sub.next(timeout=2)).data for _ in range(3)] == [b"7", b"8", b"9"]
            with pytest.raises(CursorError) as too_old:
                async with client.subscribe("s", start=base + 1):
                    pass
            assert too_old.value.reason == "too_old"
            assert (too_old.value.requested, too_old.value.available) == (base + 1, base + 6)
            with pytest.raises(CursorError) as in_future:
                async with client.subscribe("s", start=base + 50):
                    pass
            assert in_future.value.reason == "in_future"
            assert (in_future.value.requested, in_future.value.available) == (base + 50, base + 10)
            async with client.subscribe("s", start="earliest") as sub:
                assert (await sub.next(timeout=2)).offset == base + 6

    run(main)


def test_ack_false_publishes_arrive_in_order_after_drain(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            reader = await felix.connect(node.url, ca=node.ca_file)
            async with reader.subscribe("fire", credit=64) as sub:
                writer = await felix.connect(node.url, ca=node.ca_file)
                for i in range(2000):
                    assert await writer.publish("fire", b"%d" % i, ack=False) is None
                await writer.drain()
                assert writer.closed
                with pytest.raises(ConnectionLost):
                    await writer.publish("fire", b"late")
                got = [await sub.next(timeout=5) for _ in range(2000)]
                assert [m.data for m in got] == [b"%d" % i for i in range(2000)]
                assert sub.dropped == 0
                assert sub.pending == 0
            await reader.close()

    run(main)


def test_credit_bounds_the_local_queue(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
            client.subscribe("s", credit=10) as sub,
        ):
            for i in range(100):  # one by one: each its own EVENTS batch
                await client.publish("s", b"%d" % i)
            await asyncio.sleep(0.1)
            assert sub.pending == 10  # the broker stopped at the window
            got = [await sub.next(timeout=2) for _ in range(100)]  # top-ups keep it going
            assert [m.data for m in got] == [b"%d" % i for i in range(100)]
            assert sub.dropped == 0

    run(main)


def test_slow_consumer_drops_are_counted_and_reported(tmp_path: Path) -> None:
    settings = {"stream_defaults": StreamSettings(replay_max_records=8)}

    async def main() -> None:
        async with (
            LocalNode.start(tmp_path, shard_settings=settings) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            events = client.events()
            async with client.subscribe("s", credit=4) as sub:
                acks = [await client.publish("s", b"%d" % i) for i in range(40)]
                published = [ack.offset for ack in acks if ack is not None]
                got: list[felix.Message] = []
                while len(got) + sub.dropped < 40:
                    got.append(await sub.next(timeout=2))
                offsets = [m.offset for m in got]
                assert offsets == sorted(offsets)
                assert (offsets[0], offsets[-1]) == (published[0], published[-1])
                assert sub.dropped > 0
                # Each record was either delivered or counted as dropped, never both.
                assert len(got) + sub.dropped == len(published)
            await client.close()
            reported = [e async for e in events]  # ends: the client is closed
            assert reported and all(isinstance(e, SlowConsumer) for e in reported)
            assert sum(e.dropped for e in reported if isinstance(e, SlowConsumer)) == sub.dropped
            for event in reported:
                assert isinstance(event, SlowConsumer) and event.stream == "s"
                lost = range(event.first_dropped, event.first_dropped + event.dropped)
                assert not set(lost) & set(offsets)

    run(main)


def test_subscription_end_raises_the_mapped_error(tmp_path: Path) -> None:
    settings = {
        "stream_defaults": StreamSettings(replay_max_records=8, slow_subscriber_policy="disconnect")
    }

    async def main() -> None:
        async with (
            LocalNode.start(tmp_path, shard_settings=settings) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
            client.subscribe("s", credit=4) as sub,
        ):
            for i in range(40):
                await client.publish("s", b"%d" % i)
            received = 0
            with pytest.raises(Overloaded, match="too slow"):
                async for _ in sub:
                    received += 1
            assert received >= 4
            with pytest.raises(Overloaded):
                await sub.next(timeout=1)

    run(main)


# -- multiplexing, bounds and cancellation --------------------------------------------------


def test_out_of_order_replies_reach_their_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            cache = client.cache("c")
            await asyncio.gather(*(cache.set(f"k{i}", b"v%d" % i) for i in range(200)))
            gate = Gate(node, monkeypatch)
            gate.closed = True
            gets = [asyncio.create_task(cache.get(f"k{i}")) for i in range(200)]
            await gate.wait_held(200)
            gate.release(random.Random(1).shuffle)  # replies come back shuffled
            assert await asyncio.gather(*gets) == [b"v%d" % i for i in range(200)]

    run(main)


def test_concurrent_mixed_calls_over_a_pool(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file, pool_size=2, control_streams=3) as client,
        ):
            cache = client.cache("c")

            async def one(i: int) -> tuple[bool, bytes | None, bool]:
                stored = await cache.set(f"k{i}", b"v%d" % i)
                value = await cache.get(f"k{i}")
                existed = await cache.delete(f"k{i}") if i % 2 else True
                return stored, value, existed

            results = await asyncio.gather(*(one(i) for i in range(200)))
            assert results == [(True, b"v%d" % i, True) for i in range(200)]
            assert len(connections(client)) == 2

    run(main)


def test_in_flight_bound_makes_callers_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file, max_in_flight=8) as client,
        ):
            cache = client.cache("c")
            gate = Gate(node, monkeypatch)
            gate.closed = True
            gets = [asyncio.create_task(cache.get(f"k{i}")) for i in range(50)]
            await gate.wait_held(8)
            await asyncio.sleep(0.05)
            assert len(gate.held) == 8  # only 8 on the wire; the others wait, none failed
            assert not any(t.done() for t in gets)
            assert len(connections(client)[0].requests) == 8
            gate.release()
            assert await asyncio.gather(*gets) == [None] * 50

    run(main)


def test_cancellation_never_misdelivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/reliability.md R8: cancel half of many concurrent gets, start new gets while the
    cancelled calls' replies are still on their way, then let every reply arrive in a
    random order: each surviving or new get returns its own key's value."""

    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file, max_in_flight=1000) as client,
        ):
            cache = client.cache("c")
            n = 400
            values = {f"k{i}": b"value-%d" % i for i in range(2 * n)}
            await asyncio.gather(*(cache.set(k, v) for k, v in values.items()))
            rng = random.Random(42)
            for _round in range(3):
                gate = Gate(node, monkeypatch)
                gate.closed = True
                keys = [f"k{i}" for i in range(n)]
                tasks = [asyncio.create_task(cache.get(k)) for k in keys]
                await gate.wait_held(n)
                cancelled = set(rng.sample(range(n), n // 2))
                for i in cancelled:
                    tasks[i].cancel()
                await asyncio.sleep(0)
                # New calls while the cancelled ones' replies are still pending: with
                # reused ids, those late replies would land here.
                keys += [f"k{i}" for i in range(n, n + n // 2)]
                tasks += [asyncio.create_task(cache.get(k)) for k in keys[n:]]
                await gate.wait_held(n + n // 2)
                conn = connections(client)[0]
                late_before = conn.requests.late_replies
                gate.release(rng.shuffle)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for i, (key, result) in enumerate(zip(keys, results, strict=True)):
                    if i in cancelled:
                        assert isinstance(result, asyncio.CancelledError)
                    else:
                        assert result == values[key], (key, result)
                # Every cancelled call's reply did arrive, and was dropped.
                assert conn.requests.late_replies - late_before == n // 2
                assert len(conn.requests) == 0
                monkeypatch.undo()
            # The connection is still in step.
            assert await cache.get("k7") == b"value-7"

    run(main)


def test_random_cancellation_at_any_point(tmp_path: Path) -> None:
    """Cancel calls at random moments with no gate at all: still no reply goes astray."""

    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            cache = client.cache("c")
            await asyncio.gather(*(cache.set(f"k{i}", b"%d" % i) for i in range(100)))
            rng = random.Random(3)
            for _ in range(5):
                tasks = [asyncio.create_task(cache.get(f"k{i}")) for i in range(100)]
                for _ in range(rng.randrange(4)):
                    await asyncio.sleep(0)
                for i in rng.sample(range(100), 50):
                    tasks[i].cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for i, result in enumerate(results):
                    assert isinstance(result, asyncio.CancelledError) or result == b"%d" % i
            assert await cache.get("k1") == b"1"

    run(main)


def test_request_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file, request_timeout=0.2) as client,
        ):
            gate = Gate(node, monkeypatch)
            gate.closed = True
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(FelixTimeoutError) as exc:
                await client.cache("c").set("k", b"v")
            # Not early (within float rounding of loop.time() + 0.2); late by at most the
            # connection's deadline sweep (generous bound).
            assert 0.2 - 1e-6 <= loop.time() - began < 2.0
            assert isinstance(exc.value, TimeoutError)
            assert not connections(client)[0]._deadlines  # the timed-out call is forgotten
            gate.release()  # the reply to the timed-out call arrives and is dropped
            assert await client.cache("c").get("k") == b"v"

    run(main)


# -- connection lifecycle -------------------------------------------------------------------


def test_close_is_idempotent_and_ends_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            client = await felix.connect(node.url, ca=node.ca_file)
            sub = client.subscribe("s")
            await sub.start()
            gate = Gate(node, monkeypatch)
            gate.closed = True
            pending = asyncio.create_task(client.cache("c").get("k"))
            await gate.wait_held(1)
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.gather(client.close(), client.close())
            await client.close()
            assert loop.time() - began < 1.5
            with pytest.raises(ConnectionLost):
                await pending
            with pytest.raises(ConnectionLost):
                await client.cache("c").get("k")
            assert [m async for m in sub] == []  # iteration just ends

    run(main)


def test_connect_errors(tmp_path: Path) -> None:
    other_ca = ensure_node_certificates(tmp_path / "other", hostnames=[], ips=[]).ca_cert
    assert other_ca is not None

    async def main() -> None:
        with pytest.raises(ConfigError):
            felix.connect("http://127.0.0.1:5000")
        with pytest.raises(ConfigError, match="CA file not found"):
            felix.connect("felix://127.0.0.1:5000", ca=tmp_path / "missing.pem")
        with pytest.raises(ConfigError):
            felix.connect("felix://127.0.0.1:5000", token="a", token_provider=lambda: "b")
        async with LocalNode.start(tmp_path / "node") as node:
            with pytest.raises(HandshakeFailed):
                await felix.connect(node.url, ca=other_ca, connect_timeout=3)
            port = node.port
        with pytest.raises(FelixTimeoutError):
            await felix.connect(f"felix://127.0.0.1:{port}", ca=other_ca, connect_timeout=0.3)

    run(main)


def test_ca_from_environment_plus_system_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            monkeypatch.setenv("FELIX_CA_FILE", str(node.ca_file))
            async with felix.connect(node.url) as client:
                assert await client.ping() >= 0
            monkeypatch.delenv("FELIX_CA_FILE")
            with pytest.raises(HandshakeFailed):  # the system store does not know the node's CA
                await felix.connect(node.url, connect_timeout=3)

    run(main)


def test_token_provider_and_aioquic_engine(tmp_path: Path) -> None:
    calls: list[int] = []

    async def provider() -> str:
        calls.append(1)
        return "token"

    async def main() -> None:
        # Both sides on aioquic: a qh3 node with an aioquic client trips qh3's
        # "packet builder capacity exhausted" inside the node (reported upstream).
        async with (
            LocalNode.start(tmp_path, engine="aioquic") as node,
            felix.connect(
                node.url, ca=node.ca_file, token_provider=provider, pool_size=2, engine="aioquic"
            ) as client,
        ):
            assert await client.publish("s", b"x") is not None
            assert len(calls) == 2  # once per pooled connection

    run(main)


def test_reconnect_after_node_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        node = await LocalNode.open(tmp_path)
        port = node.port
        seen: list[object] = []
        client = await felix.connect(
            node.url,
            ca=node.ca_file,
            on_event=seen.append,
            reconnect_backoff=(0.02, 0.2),
            connect_timeout=3.0,
            request_timeout=5.0,
        )
        events = client.events()
        sub = client.subscribe("s", start="earliest")
        await sub.start()
        for i in range(3):
            await client.publish("s", b"before-%d" % i)
        before = [await sub.next(timeout=2) for _ in range(3)]

        # A set and a get in flight when the node goes away.
        gate = Gate(node, monkeypatch)
        gate.closed = True
        cache = client.cache("c")
        set_call = asyncio.create_task(cache.set("k", b"v"))
        get_call = asyncio.create_task(cache.get("k"))
        await gate.wait_held(2)
        await node.close()
        with pytest.raises(ConnectionLost):
            await set_call  # never resent: it may or may not have happened
        disconnected = await anext(events)
        assert isinstance(disconnected, Disconnected) and disconnected.connection == 0

        node = await LocalNode.open(tmp_path, port=port)  # same port, same data directory
        try:
            reconnected = await anext(events)
            assert isinstance(reconnected, Reconnected) and reconnected.attempts >= 1
            assert await get_call is None  # read-only: retried once on the new connection
            ack = await client.publish("s", b"after")
            assert ack is not None
            message = await sub.next(timeout=3)
            assert message.data == b"after"
            # The node stopped gracefully, so it settled its offset reservations: the
            # restarted in-memory stream continues right after its last offset, and the
            # subscription resumed with nothing dropped (after a crash the stream would
            # continue above its reservation: a jump the client counts as dropped).
            assert message.offset == before[-1].offset + 1
            assert sub.dropped == 0
            assert any(isinstance(e, Disconnected) for e in seen)
            assert any(isinstance(e, Reconnected) for e in seen)
            await client.close()
            assert [e async for e in events] == []  # no loss reported; the feed ended
        finally:
            await node.close()

    run(main)


def test_keepalive_and_a_network_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/reliability.md R5: a silent peer is detected by the keepalive PING, the client
    reconnects by itself once packets flow again, and the subscription resumes."""

    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            client = await felix.connect(
                node.url,
                ca=node.ca_file,
                keepalive=0.2,
                request_timeout=0.5,
                connect_timeout=0.5,
                reconnect_backoff=(0.02, 0.1),
            )
            events = client.events()
            sub = client.subscribe("s")
            await sub.start()
            requests = node.gateway.requests
            await asyncio.sleep(0.6)
            assert node.gateway.requests > requests  # keepalive PINGs went out...
            assert client.connected == 1  # ...and kept the idle connection

            # Drop every datagram the node receives: a network partition.
            server = node._server._server
            monkeypatch.setattr(server, "datagram_received", lambda data, addr: None)
            disconnected = await anext(events)
            assert isinstance(disconnected, Disconnected)
            assert isinstance(disconnected.error, FelixTimeoutError)
            with pytest.raises(FelixTimeoutError):
                await client.cache("c").get("k")  # waits for a connection, within its timeout
            monkeypatch.undo()  # the network heals
            reconnected = await anext(events)
            assert isinstance(reconnected, Reconnected)
            ack = await client.publish("s", b"after")
            message = await sub.next(timeout=2)
            assert ack is not None and (message.offset, message.data) == (ack.offset, b"after")
            await client.close()

    run(main)


def test_a_failed_connect_leaves_no_connection_behind(tmp_path: Path) -> None:
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second pooled connection cannot get a token
            await asyncio.sleep(0.2)  # by now the first one is up
            raise Unauthenticated("no token today")
        return ""

    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            with pytest.raises(Unauthenticated):
                await felix.connect(node.url, ca=node.ca_file, pool_size=2, token_provider=provider)
            async with asyncio.timeout(2):
                while node.gateway.connections:  # the first connection was closed
                    await asyncio.sleep(0.01)

    run(main)


def test_ack_false_publishes_wait_when_the_send_buffer_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import felix.client._connection as connection_module

    monkeypatch.setattr(connection_module, "SEND_HIGH_WATER", 64 * 1024)
    monkeypatch.setattr(connection_module, "SEND_LOW_WATER", 16 * 1024)
    payload = b"x" * 8192

    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as reader,
            reader.subscribe("big", credit=1000) as sub,
        ):
            writer = await felix.connect(node.url, ca=node.ca_file)
            conn = connections(writer)[0]
            stream_id = conn.control_stream_for(("default", "big"))
            peak = waits = 0
            original = conn.wait_writable

            async def counting_wait(key: object) -> None:
                nonlocal waits, peak
                peak = max(peak, conn.protocol.send_buffer_size(stream_id))
                if conn.protocol.send_buffer_size(stream_id) > 64 * 1024:
                    waits += 1
                await original(key)

            monkeypatch.setattr(conn, "wait_writable", counting_wait)
            for i in range(400):
                await writer.publish("big", payload + b"%d" % i, ack=False)
            await writer.drain()
            assert waits > 0  # the publisher was held back...
            # ...so at most the high-water mark plus one batch was ever queued.
            assert peak <= 64 * 1024 + connection_module.BATCH_MAX_BYTES + len(payload) + 16
            got = [await sub.next(timeout=5) for _ in range(400)]
            assert [m.data for m in got] == [payload + b"%d" % i for i in range(400)]

    run(main)


def test_a_replay_of_big_records_does_not_stall_when_the_event_stream_backs_up(
    tmp_path: Path,
) -> None:
    """256 records of 64 KiB from earliest: the subscriber's QUIC stream fills past the
    gateway's 4 MiB per-subscriber bound; reading resumes when it drains (it used to
    wait for a push or credit that never came, and stalled for good)."""

    async def main() -> None:
        async with (
            LocalNode.start(tmp_path) as node,
            felix.connect(node.url, ca=node.ca_file) as client,
        ):
            big = b"x" * 65_536
            for _ in range(8):
                await client.publish_batch("s", [big] * 32)
            async with client.subscribe("s", start="earliest", credit=4096) as sub:
                got = [await sub.next(timeout=10) for _ in range(256)]
            assert [m.offset for m in got] == list(range(256))
            assert sub.dropped == 0

    run(main, timeout=60)
