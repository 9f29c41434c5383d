"""The client's cluster routing over real QUIC: two in-process nodes (felix.node.local).

The nodes' side of a cluster (the ownership filter, SHARD_MAP) is being built beside
this client; until it lands, :class:`Ownership` stands in for it: it wraps each
gateway session's request dispatch with the verdict docs/architecture.md describes
("Epochs, redirects and the client": serve a request for a logical shard this node
owns, else REDIRECT to the owner; answer SHARD_MAP with the map). Everything else
is real: the nodes, their QUIC connections, TLS verification against a CA both
nodes' certificates come from, and the client.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import felix
import felix.client._client
import felix.client._connection
from felix import wire
from felix.client import Client
from felix.errors import ConfigError, Overloaded, Unavailable
from felix.gateway.session import GatewaySession
from felix.gateway.targets import ext_target
from felix.node.local import LocalNode
from tests.aio import run

pytestmark = pytest.mark.timeout(60)

L = 8


class Ownership:
    """Stands in for the nodes' cluster ownership filter (see the module doc)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        #: gateway object -> the address its node advertises.
        self.address: dict[int, str] = {}
        self.owners: list[str] = []
        self.epochs = [1] * L
        self.version = 1
        self.map_requests = 0
        self.redirects = 0
        self.refused = 0
        #: What a node answers an ack=False publish for a shard it does not own:
        #: "refuse" (ERROR Unavailable "moved", request id 0), "refuse-id" (the same
        #: with the publish's request id) or "redirect" (REDIRECT with the publish's
        #: request id, as felix/gateway/gateway.py forward() does).
        self.quiet = "refuse"
        #: None: the verdict above; else called instead (a misbehaving cluster).
        self.override: Callable[[str, int], str | None] | None = None
        dispatch = GatewaySession._dispatch
        this = self

        def owned_dispatch(
            session: GatewaySession, stream: Any, msg: wire.ExtMessage, frame: Any, now: float
        ) -> None:
            here = this.address.get(id(session._gateway))
            if here is not None:
                if isinstance(msg, wire.ShardMapRequest):
                    this.map_requests += 1
                    nodes = sorted(set(this.owners))
                    session._send(
                        stream,
                        wire.encode_shard_map(
                            msg.request_id,
                            L,
                            this.version,
                            nodes,
                            [nodes.index(o) for o in this.owners],
                            this.epochs,
                        ),
                    )
                    return
                target = ext_target(msg)
                if target is not None:
                    shard = zlib.crc32(target.key.encode()) % L
                    owner: str | None = this.owners[shard]
                    if this.override is not None:
                        owner = this.override(here, shard)
                    if (
                        owner is not None
                        and owner != here
                        and isinstance(msg, wire.Publish)
                        and msg.ack == wire.ACK_NONE
                        and this.quiet != "redirect"
                    ):
                        # Nobody waits for the answer: refused, not redirected.
                        this.refused += 1
                        session._send(
                            stream,
                            wire.encode_error(
                                msg.request_id if this.quiet == "refuse-id" else 0,
                                Unavailable.code,
                                f"shard {shard} moved to the node at {owner}; retry there",
                            ),
                        )
                        return
                    if owner is not None and owner != here:
                        this.redirects += 1
                        session._send(
                            stream,
                            wire.encode_redirect(msg.request_id, shard, this.epochs[shard], owner),
                        )
                        return
            dispatch(session, stream, msg, frame, now)

        monkeypatch.setattr(GatewaySession, "_dispatch", owned_dispatch)

    def move(self, shard: int, to: str) -> None:
        self.owners[shard] = to
        self.epochs[shard] += 1
        self.version += 1


def shard_of(tenant: str, namespace: str, *names: str) -> int:
    return zlib.crc32("/".join((tenant, namespace, *names)).encode()) % L


def stream_on(shard: int) -> str:
    for i in range(10_000):
        if shard_of("default", "default", f"s{i}") == shard:
            return f"s{i}"
    raise AssertionError


def cache_key_on(shard: int) -> str:
    for i in range(10_000):
        if shard_of("default", "default", "c", f"k{i}") == shard:
            return f"k{i}"
    raise AssertionError


@asynccontextmanager
async def two_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LocalNode, LocalNode, Ownership]]:
    a = await LocalNode.open(tmp_path / "a")
    try:
        # The second node's certificate comes from the first one's CA: one CA file
        # verifies every node the client is redirected to.
        (tmp_path / "b" / "tls").mkdir(parents=True)
        for name in ("ca-cert.pem", "ca-key.pem"):
            shutil.copy(tmp_path / "a" / "tls" / name, tmp_path / "b" / "tls" / name)
        b = await LocalNode.open(tmp_path / "b")
        try:
            own = Ownership(monkeypatch)
            addr_a, addr_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
            own.address = {id(a.gateway): addr_a, id(b.gateway): addr_b}
            # Even shards on a, odd ones on b.
            own.owners = [addr_a if s % 2 == 0 else addr_b for s in range(L)]
            yield a, b, own
        finally:
            await b.close()
    finally:
        await a.close()


def redirect_msg(shard: int, epoch: int, owner: str) -> wire.Redirect:
    frame = wire.encode_redirect(0, shard, epoch, owner)
    msg = wire.decode_ext(wire.decode_frame(frame, extensions=True))
    assert isinstance(msg, wire.Redirect)
    return msg


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def connect(node: LocalNode, **options: Any) -> Client:
    return await felix.connect(node.url, ca=node.ca_file, **{"request_timeout": 5.0, **options})


def test_a_single_node_client_never_asks_for_a_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, _b, own):
            own.owners = [own.address[id(a.gateway)]] * L  # a owns everything
            async with await connect(a) as client:
                for shard in range(L):
                    assert await client.publish(stream_on(shard), b"x") is not None
                    await client.cache("c").set(cache_key_on(shard), b"v")
                async with client.subscribe(stream_on(1), start="earliest") as sub:
                    assert (await sub.next(timeout=2)).data == b"x"
                assert client.redirects == 0 and client.shard_map is None
                assert own.map_requests == 0 and client.connected == 1

    run(main)


def test_requests_follow_redirects_then_go_straight_to_the_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, b, own):
            addr_b = own.address[id(b.gateway)]
            async with await connect(a) as client:
                on_b = stream_on(1)
                ack = await client.publish(on_b, b"first")  # redirected a -> b
                assert ack is not None and ack.offset == 0
                assert client.redirects == 1 and own.redirects == 1
                await wait_for(lambda: client.shard_map is not None)
                assert own.map_requests == 1
                shard_map = client.shard_map
                assert shard_map is not None and shard_map.owners == own.owners
                assert client.connected == 2  # a, and b

                # From now on straight to the owner: no more redirects.
                for shard in range(L):
                    assert await client.publish(stream_on(shard), b"direct") is not None
                    cache = client.cache("c")
                    key = cache_key_on(shard)
                    assert await cache.set(key, b"v%d" % shard)
                    assert await cache.get(key) == b"v%d" % shard
                    assert await cache.ttl(key) is not None
                    assert await cache.delete(key)
                acks = await client.publish_batch(on_b, [b"b1", b"b2"])
                assert [x.offset for x in acks] == [2, 3]
                for i in range(5):
                    await client.publish(on_b, b"nack%d" % i, ack=False)
                assert own.redirects == 1 and client.redirects == 1

                # The records are on b: a client of b alone reads them.
                async with (
                    await connect(b) as direct,
                    direct.subscribe(on_b, start="earliest") as sub,
                ):
                    got = [(await sub.next(timeout=2)).data for _ in range(9)]
                assert got == [b"first", b"direct", b"b1", b"b2"] + [
                    b"nack%d" % i for i in range(5)
                ]
                assert own.redirects == 1  # that client asked b about b's shard
                assert addr_b in shard_map.addresses

    run(main)


def test_subscriptions_follow_their_shard_when_it_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, b, own):
            addr_a = own.address[id(a.gateway)]
            async with await connect(a) as client:
                stream = stream_on(3)
                async with client.subscribe(stream) as sub:  # SUBSCRIBE redirected to b
                    assert client.redirects == 1
                    await client.publish(stream, b"on b")
                    assert (await sub.next(timeout=2)).data == b"on b"

                    # Shard 3 moves to a; b ends its subscriptions as "moved".
                    own.move(3, addr_a)
                    key = f"default/default/{stream}"
                    for s in list(b.gateway._subs_by_key.get(key, ())):
                        s.conn.end_subscription(s, Unavailable.code, "shard 3 moved")
                        b.gateway._drop_subscription(s)
                    # The subscription comes back on a by itself (b redirects it there);
                    # the in-memory stream starts empty there, so it goes on from latest.
                    await wait_for(lambda: bool(a.gateway._subs_by_key.get(key)))
                    ack = await client.publish(stream, b"on a")  # b redirects: epoch 2
                    assert ack is not None
                    message = await sub.next(timeout=3)
                    assert message.data == b"on a" and message.offset == ack.offset
                    shard_map = client.shard_map
                    assert shard_map is not None and shard_map.owners[3] == addr_a
                    assert shard_map.epochs[3] == 2

    run(main)


def test_redirects_in_a_circle_end_with_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, b, own):
            addr_a, addr_b = own.address[id(a.gateway)], own.address[id(b.gateway)]
            # Each node believes the other owns everything.
            own.override = lambda here, shard: addr_b if here == addr_a else addr_a
            async with await connect(a) as client:
                with pytest.raises(Unavailable, match=r"shard 1 .*redirected 5 times"):
                    await client.publish(stream_on(1), b"x")
                assert own.redirects == 5 and client.redirects == 4
                with pytest.raises(Unavailable, match="shard 2"):
                    async with client.subscribe(stream_on(2)):
                        pass
                # The nodes agree again: calls work, and go straight to the owner.
                own.override = None
                await wait_for(lambda: client.shard_map is not None)
                before = own.redirects
                assert await client.publish(stream_on(1), b"y") is not None
                assert await client.cache("c").get(cache_key_on(2)) is None
                assert own.redirects - before <= 2  # the entries the circle left behind
                # The circle (a -> b -> a) has the client take a's map whole (at most one
                # fetch a second from a node: perhaps a second after the first one).
                await wait_for(lambda: client._router.resets >= 1)
                assert not client._router.reset_wanted
                assert own.map_requests <= 3

    run(main)


def test_an_unreachable_owner_fails_fast_and_the_stray_redirect_teaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, _b, own):
            # A node that went away: nothing answers on its port.
            gone = await LocalNode.open(tmp_path / "gone")
            addr_gone = f"127.0.0.1:{gone.port}"
            await gone.close()
            own.owners[5] = addr_gone
            async with await connect(a, connect_timeout=0.5) as client:
                # A publish with ack=False to a shard a does not own: not stored (refused
                # as "moved": nobody waits for a REDIRECT), but the client learns the
                # cluster from it.
                await client.publish(stream_on(1), b"lost", ack=False)
                await wait_for(lambda: client.shard_map is not None)
                assert client.redirects == 0 and own.refused == 1 and own.redirects == 0
                assert client.dropped_redirected == 0  # a refusal of request 0: not counted
                for i in range(3):  # now straight to b
                    await client.publish(stream_on(1), b"nack%d" % i, ack=False)
                assert await client.publish(stream_on(1), b"kept") is not None
                async with client.subscribe(stream_on(1), start="earliest") as sub:
                    got = {(await sub.next(timeout=2)).data for _ in range(4)}
                assert got == {b"nack0", b"nack1", b"nack2", b"kept"}  # all on b
                assert own.redirects == 0 and own.refused == 1

                with pytest.raises(felix.FelixError):
                    await client.publish(stream_on(5), b"x")  # cannot connect
                began = asyncio.get_running_loop().time()
                with pytest.raises(Unavailable, match=re.escape(addr_gone)):
                    await client.publish(stream_on(5), b"x")  # not tried again yet
                assert asyncio.get_running_loop().time() - began < 0.4
                # Other shards are not held up.
                assert await client.publish(stream_on(0), b"y") is not None
                assert await client.publish(stream_on(1), b"y") is not None

    run(main)


def test_the_number_of_nodes_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, _b, _own):
            monkeypatch.setattr(felix.client._client, "MAX_NODES", 0)
            async with await connect(a) as client:
                with pytest.raises(Overloaded, match="already connects to 0 nodes"):
                    await client.publish(stream_on(1), b"x")
                assert await client.publish(stream_on(0), b"x") is not None  # a's own
                assert client.connected == 1

    run(main)


def test_a_silent_node_is_given_up_after_a_timed_out_call_not_the_keepalive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node gone without closing its connections (kill -9, a partition) answers nothing:
    a call that times out with nothing received since it was sent makes the client PING
    that connection at once, and give it up unanswered, rather than wait for the keepalive
    (``keepalive`` seconds of silence); the owner's shards are then asked of another node."""

    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, b, own):
            addr_a = own.address[id(a.gateway)]
            dispatch = GatewaySession._dispatch  # the Ownership stand-in's
            seen: set[int] = set()  # b's sessions so far
            silent = False  # then those answer nothing more (later ones do)

            def silent_dispatch(session: GatewaySession, *args: Any) -> None:
                if session._gateway is b.gateway:
                    if silent and id(session) in seen:
                        return
                    if not silent:
                        seen.add(id(session))
                dispatch(session, *args)

            monkeypatch.setattr(GatewaySession, "_dispatch", silent_dispatch)
            async with await connect(a, request_timeout=0.5, keepalive=60.0) as client:
                stream = stream_on(1)  # b's
                assert await client.publish(stream, b"x") is not None
                await wait_for(lambda: client.shard_map is not None)
                lost: list[object] = []
                client.add_listener(
                    lambda e: lost.append(e) if isinstance(e, felix.Disconnected) else None
                )
                # b's sessions go silent; its shard moves to a meanwhile.
                silent = True
                own.move(1, addr_a)
                began = asyncio.get_running_loop().time()
                with pytest.raises(felix.FelixTimeoutError):
                    await client.publish(stream, b"y")
                await wait_for(lambda: bool(lost), timeout=3.0)
                assert asyncio.get_running_loop().time() - began < 2.0  # not 60 s
                # The next call goes through another node, which serves it (or redirects).
                async with asyncio.timeout(5):
                    while True:
                        try:
                            assert await client.publish(stream, b"z") is not None
                            break
                        except (felix.Unavailable, felix.FelixTimeoutError):
                            await asyncio.sleep(0.1)

    run(main)


def test_redirects_and_map_entries_to_hosts_the_client_does_not_allow_are_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, b, own):
            # b's node advertises a name; the client was given a's IP (and pins the CA):
            # by default only IP literals are followed, so it never connects to b.
            named_b = f"localhost:{b.port}"
            own.owners = [own.owners[0] if s % 2 == 0 else named_b for s in range(L)]
            own.address[id(b.gateway)] = named_b
            async with await connect(a) as client:
                with pytest.raises(ConfigError, match=rf"{named_b}.*cluster_hosts"):
                    await client.publish(stream_on(1), b"x")
                await wait_for(lambda: client.shard_map is not None)
                shard_map = client.shard_map
                assert shard_map is not None
                assert shard_map.owners[1] is None and named_b not in shard_map.addresses
                assert shard_map.owners[0] == own.owners[0]
                with pytest.raises(ConfigError, match="cluster_hosts"):
                    await client.publish(stream_on(3), b"x")  # a redirects it again
                assert await client.publish(stream_on(0), b"x") is not None
                assert client.connected == 1 and client.redirects == 0

            # Allowed explicitly: followed.
            async with await connect(a, cluster_hosts=["localhost"]) as client:
                assert await client.publish(stream_on(1), b"y") is not None
                assert client.redirects == 1 and client.connected == 2

    run(main)


def test_a_bad_entry_with_a_high_epoch_is_undone_by_the_bootstrap_nodes_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, b, own):
            addr_a, addr_b = own.address[id(a.gateway)], own.address[id(b.gateway)]
            async with await connect(a) as client:
                assert await client.publish(stream_on(1), b"x") is not None  # a -> b
                await wait_for(lambda: client.shard_map is not None)
                # A REDIRECT of a hostile node: shard 2 (a's) on b, at a high epoch
                # (within the bound: one beyond it is refused outright).
                client._learn(redirect_msg(2, 10**5, addr_b))
                shard_map = client.shard_map
                assert shard_map is not None and shard_map.owners[2] == addr_b
                before = own.redirects
                # b sends it to a at epoch 1, older than the map's: followed, and the
                # map is fetched from a and taken whole.
                assert await client.publish(stream_on(2), b"y") is not None
                assert own.redirects == before + 1
                await wait_for(lambda: client._router.resets == 1)
                shard_map = client.shard_map
                assert shard_map is not None
                assert shard_map.owners[2] == addr_a and shard_map.epochs[2] == 1
                assert await client.publish(stream_on(2), b"z") is not None
                assert own.redirects == before + 1  # straight to a now

                # Beyond the bound: never learned at all.
                client._learn(redirect_msg(2, 2**64 - 1, addr_b))
                assert shard_map.owners[2] == addr_a and shard_map.refused_epochs == 1

    run(main)


def test_ack_false_batches_a_node_redirects_are_sent_to_the_owner_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, b, own):
            addr_a, addr_b = own.address[id(a.gateway)], own.address[id(b.gateway)]
            on_b = stream_on(1)
            own.quiet = "redirect"
            async with await connect(a) as client:
                for i in range(3):
                    await client.publish(on_b, b"r%d" % i, ack=False)
                await wait_for(lambda: client.resent_redirected == 3)
                assert client.dropped_redirected == 0
                async with (
                    await connect(b) as direct,
                    direct.subscribe(on_b, start="earliest") as sub,
                ):
                    got = sorted([(await sub.next(timeout=2)).data for _ in range(3)])
                assert got == [b"r0", b"r1", b"r2"]

            # Each node sends it to the other: a -> b (resent) -> a: sent again once,
            # then dropped and counted.
            own.override = lambda here, shard: addr_b if here == addr_a else addr_a
            async with await connect(a) as client:
                await client.publish(on_b, b"x", ack=False)
                await wait_for(lambda: client.dropped_redirected == 1)
                assert client.resent_redirected == 1  # the first resend, itself redirected

            # A REDIRECT to a host the client does not allow: nothing is sent there.
            own.override = lambda here, shard: f"localhost:{b.port}"
            async with await connect(a) as client:
                await client.publish(on_b, b"y", ack=False)
                await client.publish(on_b, b"z", ack=False)
                await wait_for(lambda: client.dropped_redirected == 2)
                assert client.resent_redirected == 0 and client.connected == 1

            # A node that refuses it as moved (naming the batch's request id): the client
            # learns the cluster, and counts the batch dropped (no owner to send it to).
            own.override = None
            own.quiet = "refuse-id"
            async with await connect(a) as client:
                await client.publish(on_b, b"w", ack=False)
                await wait_for(lambda: client.dropped_redirected == 1)
                await wait_for(lambda: client.shard_map is not None)
                assert client.resent_redirected == 0

    run(main)


def test_ack_false_batches_without_a_redirect_are_kept_within_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with two_nodes(tmp_path, monkeypatch) as (a, _b, own):
            own.owners = [own.address[id(a.gateway)]] * L  # a owns everything
            async with await connect(a) as client:
                for i in range(2000):
                    await client.publish(stream_on(i % L), b"p" * 4096, ack=False)
                await client.ping()
                (conn,) = client._pool.live()
                assert len(conn._quiet) <= felix.client._connection.QUIET_KEEP_BATCHES
                assert conn._quiet_bytes <= felix.client._connection.QUIET_KEEP_BYTES
                assert len(conn._quiet_gone) <= felix.client._connection.QUIET_KEEP_GONE
                assert client.dropped_redirected == client.resent_redirected == 0

    run(main)
