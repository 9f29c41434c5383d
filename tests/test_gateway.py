"""The gateway over real QUIC (in-process node): handshake, requests, fanout, hostile input."""

from __future__ import annotations

from pathlib import Path

import pytest

from felix import wire
from felix.gateway.gateway import GatewayLimits
from felix.node.local import LocalNode
from felix.shard.stream_log import StreamSettings
from tests.aio import run
from tests.rawquic import RawPeer, raw_connect

pytestmark = pytest.mark.timeout(60)
T, NS = "acme", "prod"


def ext(frame: wire.Frame) -> wire.ExtMessage:
    return wire.decode_ext(frame)


def test_handshake_negotiates_flags_and_plain_ok_without_them(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            sid = await peer.auth(flags=0xFFFF)
            assert wire.decode_message(peer.frames[sid][0]) == {
                "type": "auth_ok",
                "server_flags": wire.FLAGS_V1 | wire.FLAG_FELIX_EXT,
            }
            sid2 = await peer.auth(flags=None)
            assert wire.decode_message(peer.frames[sid2][0]) == {"type": "ok"}
            # Without the extension negotiated, an extension frame is an unknown flag.
            peer.send(sid2, wire.encode_ping(1))
            await peer.wait_for(lambda: sid2 in peer.ended and len(peer.frames[sid2]) == 2)
            assert wire.decode_message(peer.frames[sid2][1])["type"] == "error"
            peer.close()

    run(main)


def test_cache_and_publish_replies_are_matched_by_request_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            sid = await peer.auth()
            # Many requests at once to keys on both shards; replies may come in any order.
            for i in range(50):
                peer.send(sid, wire.encode_cache_set(1000 + i, T, NS, "c", f"k{i}", b"v%d" % i))
            await peer.frames_on(sid, 51)
            for i in range(50):
                peer.send(sid, wire.encode_cache_get(2000 + i, T, NS, "c", f"k{i}"))
            peer.send(sid, wire.encode_publish(3000, T, NS, "s", [b"a", b"b"]))
            frames = await peer.frames_on(sid, 102)
            replies = {m.request_id: m for m in map(ext, frames[51:])}
            for i in range(50):
                value = replies[2000 + i]
                assert isinstance(value, wire.CacheValue) and value.value == b"v%d" % i
            ack = replies[3000]
            assert isinstance(ack, wire.PublishOffsets) and (ack.base_offset, ack.count) == (0, 2)
            peer.close()

    run(main)


async def subscribe(peer: RawPeer, sid: int, rid: int, sub_id: int, **kw: object) -> int:
    """Subscribe and return the event stream id (after its hello)."""
    peer.send(sid, wire.encode_subscribe(rid, T, NS, "s", sub_id, **kw))  # type: ignore[arg-type]

    def hello() -> int | None:
        for stream_id, frames in peer.frames.items():
            if (
                stream_id % 4 == 3
                and frames
                and frames[0].flags == 0
                and wire.decode_message(frames[0]).get("subscription_id") == sub_id
            ):
                return stream_id
        return None

    await peer.wait_for(lambda: hello() is not None)
    stream = hello()
    assert stream is not None
    return stream


def events_on(peer: RawPeer, stream: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for f in peer.frames[stream][1:]:
        m = ext(f)
        if isinstance(m, wire.Events):
            out.extend((m.base_offset + i, p) for i, p in enumerate(m.payloads))
    return out


def test_fanout_in_order_with_replay_and_cursor_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            pub = await raw_connect(node.host, node.port, node.ca_file)
            psid = await pub.auth()
            pub.send(psid, wire.encode_publish(1, T, NS, "s", [b"old0", b"old1"]))
            await pub.frames_on(psid, 2)
            peers = [await raw_connect(node.host, node.port, node.ca_file) for _ in range(4)]
            streams = []
            for i, peer in enumerate(peers):
                sid = await peer.auth()
                start = "earliest" if i % 2 else "latest"
                streams.append(await subscribe(peer, sid, 7, 1, start=start, credit=5000))
            for i in range(0, 1000, 10):
                pub.send(
                    psid,
                    wire.encode_publish(
                        100 + i, T, NS, "s", [b"m%d" % j for j in range(i, i + 10)]
                    ),
                )
            for i, (peer, stream) in enumerate(zip(peers, streams, strict=True)):
                want = 1002 if i % 2 else 1000
                await peer.wait_for(lambda p=peer, s=stream, w=want: len(events_on(p, s)) >= w)
                got = events_on(peer, stream)
                offsets = [o for o, _ in got]
                assert offsets == list(range(1002 - want, 1002))
                assert got[-1] == (1001, b"m999")
            # Cursor errors: a start in the future.
            sid = await peers[0].auth()
            peers[0].send(sid, wire.encode_subscribe(9, T, NS, "s", 2, start=5000))
            (reply,) = [ext(f) for f in (await peers[0].frames_on(sid, 2))[1:]]
            assert isinstance(reply, wire.CursorErrorReply)
            assert (reply.reason, reply.requested, reply.available) == ("in_future", 5000, 1002)
            for p in [pub, *peers]:
                p.close()

    run(main)


def test_subscriber_without_credit_falls_behind_and_sees_the_gap(tmp_path: Path) -> None:
    async def main() -> None:
        settings = {"stream_defaults": StreamSettings(replay_max_records=200)}
        async with LocalNode.start(tmp_path, shard_settings=settings) as node:
            pub = await raw_connect(node.host, node.port, node.ca_file)
            psid = await pub.auth()
            slow = await raw_connect(node.host, node.port, node.ca_file)
            fast = await raw_connect(node.host, node.port, node.ca_file)
            ssid = await slow.auth()
            fsid = await fast.auth()
            slow_stream = await subscribe(slow, ssid, 1, 1, credit=10)
            fast_stream = await subscribe(fast, fsid, 1, 1, credit=60000)
            for i in range(50):  # 50 acked batches of 10, each awaited
                pub.send(psid, wire.encode_publish(i, T, NS, "s", [b"x%d" % j for j in range(10)]))
                await pub.frames_on(psid, 2 + i)
            await fast.wait_for(lambda: len(events_on(fast, fast_stream)) >= 500)
            assert [o for o, _ in events_on(fast, fast_stream)] == list(range(500))
            # The slow one got its credit (one batch), then stopped taking records.
            assert [o for o, _ in events_on(slow, slow_stream)] == list(range(10))
            slow.send(ssid, wire.encode_credit(2, 1, 1000))
            await slow.wait_for(lambda: events_on(slow, slow_stream)[-1][0] == 499)
            notices = [
                m
                for m in map(ext, slow.frames[slow_stream][1:])
                if isinstance(m, wire.SlowConsumerNotice)
            ]
            assert [(n.first_dropped, n.dropped) for n in notices] == [(10, 290)]
            assert [o for o, _ in events_on(slow, slow_stream)] == [*range(10), *range(300, 500)]
            assert node.gateway.slow_consumer_events == 1
            for p in (pub, slow, fast):
                p.close()

    run(main)


@pytest.mark.parametrize("engine", ["aioquic"])
def test_smoke_on_the_other_engine(tmp_path: Path, engine: str) -> None:
    """Connect, cache, pub/sub and hostile input with the gateway and peers on aioquic."""

    async def main() -> None:
        async with LocalNode.start(tmp_path, engine=engine) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file, engine=engine)
            sid = await peer.auth()
            peer.send(sid, wire.encode_cache_set(1, T, NS, "c", "k", b"v", ttl_ms=60_000))
            peer.send(sid, wire.encode_cache_get(2, T, NS, "c", "k"))
            replies = {m.request_id: m for m in map(ext, (await peer.frames_on(sid, 3))[1:])}
            assert replies[2].value == b"v"  # type: ignore[attr-defined]
            stream = await subscribe(peer, sid, 3, 9, credit=100)
            pub = await raw_connect(node.host, node.port, node.ca_file, engine=engine)
            psid = await pub.auth()
            pub.send(psid, wire.encode_publish(1, T, NS, "s", [b"a", b"b", b"c"]))
            await peer.wait_for(lambda: len(events_on(peer, stream)) == 3)
            assert events_on(peer, stream) == [(0, b"a"), (1, b"b"), (2, b"c")]
            bad = await raw_connect(node.host, node.port, node.ca_file, engine=engine)
            bsid = bad.new_stream()
            bad.send(bsid, b"\x00" * 64)
            await bad.wait_for(lambda: bsid in bad.ended)
            peer.send(sid, wire.encode_ping(4))
            assert ext((await peer.frames_on(sid, 5))[4]).opcode == wire.OP_OK
            for p in (peer, pub, bad):
                p.close()

    run(main)


def test_a_v1_only_peer_keeps_working(tmp_path: Path) -> None:
    """JSON and binary v1 requests, answered in v1 form; v1 event batches."""

    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            old = await raw_connect(node.host, node.port, node.ca_file)
            sid = await old.auth(flags=None)  # no client_flags: plain ok, v1 only
            scope = {"tenant_id": T, "namespace": NS}
            sub = old.new_stream()
            old.send(sub, wire.encode_message({"type": "auth", "tenant_id": T, "token": ""}))
            old.send(
                sub,
                wire.encode_message(
                    {"type": "subscribe", **scope, "stream": "s", "start": "earliest"}
                ),
            )
            await old.frames_on(sub, 2)
            assert wire.decode_message(old.frames[sub][1])["type"] == "subscribed"
            old.send(
                sid,
                wire.encode_message(
                    {"type": "publish", **scope, "stream": "s", "payload": b"one", "request_id": 1}
                ),
            )
            old.send(
                sid,
                wire.encode_publish_batch(
                    T, NS, "s", [b"two", b"three"], request_id=2, ack="per_batch"
                ),
            )
            old.send(sid, wire.encode_publish_batch(T, NS, "s", [b"four"]))  # no ack: no reply
            old.send(
                sid,
                wire.encode_message(
                    {
                        "type": "cache_put",
                        **scope,
                        "cache": "c",
                        "key": "k",
                        "value": b"v",
                        "request_id": 3,
                        "ttl_ms": 60000,
                    }
                ),
            )
            old.send(
                sid,
                wire.encode_message(
                    {"type": "cache_get", **scope, "cache": "c", "key": "k", "request_id": 4}
                ),
            )
            frames = await old.frames_on(sid, 5)
            assert wire.decode_message(frames[1]) == {"type": "publish_ok", "request_id": 1}
            ack = wire.decode_publish_ack(frames[2])
            assert (ack.request_id, ack.ok) == (2, True)
            assert wire.decode_message(frames[3]) == {"type": "cache_ok", "request_id": 3}
            assert wire.decode_message(frames[4]) == {
                "type": "cache_value",
                **scope,
                "cache": "c",
                "key": "k",
                "value": b"v",
                "request_id": 4,
            }

            # Events arrive as v1 shared batches on the broker-opened stream.
            def payloads() -> list[bytes]:
                out: list[bytes] = []
                for stream_id, fs in old.frames.items():
                    if stream_id % 4 == 3:
                        assert wire.decode_message(fs[0])["type"] == "event_stream_hello"
                        for f in fs[1:]:
                            assert f.flags == wire.FLAG_BINARY_EVENT_BATCH_SHARED
                            out += wire.decode_event_batch(f).payloads
                return out

            await old.wait_for(lambda: len(payloads()) == 4)
            assert payloads() == [b"one", b"two", b"three", b"four"]
            # A start the broker cannot serve gets the v1 cursor error.
            old.send(
                sub,
                wire.encode_message(
                    {"type": "subscribe", **scope, "stream": "s", "start": {"offset": 99}}
                ),
            )
            reply = wire.decode_message((await old.frames_on(sub, 3))[2])
            assert reply == {
                "type": "subscribe_cursor_error",
                "reason": "in_future",
                "requested": 99,
                "available": 4,
            }
            # Negotiated 0x0020: batches carry their base offset.
            new = await raw_connect(node.host, node.port, node.ca_file)
            nsid = await new.auth(flags=wire.FLAGS_V1)
            new.send(
                nsid,
                wire.encode_message(
                    {"type": "subscribe", **scope, "stream": "s", "start": {"offset": 2}}
                ),
            )
            await new.wait_for(
                lambda: any(sid % 4 == 3 and len(fs) > 1 for sid, fs in new.frames.items())
            )
            batch = next(
                wire.decode_event_batch(fs[1]) for sid, fs in new.frames.items() if sid % 4 == 3
            )
            assert (batch.base_offset, batch.payloads) == (2, [b"three", b"four"])
            old.close()
            new.close()

    run(main)


def test_connections_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path, limits=GatewayLimits(max_connections=2)) as node:
            peers = [await raw_connect(node.host, node.port, node.ca_file) for _ in range(2)]
            sids = [await p.auth() for p in peers]  # authenticated: never evicted
            extra = await raw_connect(node.host, node.port, node.ca_file)
            await extra.wait_for(lambda: extra.close_reason is not None)
            assert extra.close_reason is not None
            assert "connection limit" in extra.close_reason.reason_phrase
            assert node.gateway.refused_connections == 1
            peers[0].send(sids[0], wire.encode_ping(1))
            assert ext((await peers[0].frames_on(sids[0], 2))[1]).opcode == wire.OP_OK
            for p in peers:
                p.close()

    run(main)


def test_block_policy_pushes_back_on_publishers_instead_of_dropping(tmp_path: Path) -> None:
    async def main() -> None:
        settings = {
            "stream_defaults": StreamSettings(replay_max_records=20, slow_subscriber_policy="block")
        }
        async with LocalNode.start(tmp_path, shard_settings=settings) as node:
            sub_peer = await raw_connect(node.host, node.port, node.ca_file)
            ssid = await sub_peer.auth()
            stream = await subscribe(sub_peer, ssid, 1, 1, start="earliest", credit=5)
            pub = await raw_connect(node.host, node.port, node.ca_file)
            psid = await pub.auth()
            results: list[wire.ExtMessage] = []
            for i in range(40):  # one at a time, each answered before the next
                pub.send(psid, wire.encode_publish(i, T, NS, "s", [b"%d" % i]))
                results.append(ext((await pub.frames_on(psid, 2 + i))[1 + i]))
            acked = [r.request_id for r in results if isinstance(r, wire.PublishOffsets)]
            refused = [r for r in results if isinstance(r, wire.ErrorReply)]
            # The subscriber holds offset 5 (its credit was 5): 20 records fit in the ring
            # from there, later publishes are refused with a retryable Overloaded.
            assert acked == list(range(len(acked))) and 20 <= len(acked) <= 26
            assert refused and all(r.code == 5 for r in refused)
            assert node.links.cores[0].blocked + node.links.cores[1].blocked == len(refused)
            # The subscriber catches up; publishing works again; nothing was dropped.
            sub_peer.send(ssid, wire.encode_credit(2, 1, 1000))
            await sub_peer.wait_for(lambda: len(events_on(sub_peer, stream)) == len(acked))
            pub.send(psid, wire.encode_publish(99, T, NS, "s", [b"again"]))
            again = ext((await pub.frames_on(psid, 42))[41])
            assert isinstance(again, wire.PublishOffsets) and again.base_offset == len(acked)
            await sub_peer.wait_for(lambda: len(events_on(sub_peer, stream)) == len(acked) + 1)
            assert [o for o, _ in events_on(sub_peer, stream)] == list(range(len(acked) + 1))
            assert not any(
                isinstance(ext(f), wire.SlowConsumerNotice) for f in sub_peer.frames[stream][1:]
            )
            for p in (pub, sub_peer):
                p.close()

    run(main)
