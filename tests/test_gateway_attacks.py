"""Issue 11's gateway attacks against real nodes over QUIC on loopback (bounded loops).

The same attacks, moved along by a hand-driven clock, are unit tests in
tests/test_gateway_hardening.py; here they run against a node's real QUIC stack
(in-process node, or `felix up` processes where rings matter).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from felix import wire
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.gateway.auth import TokenAuthenticator
from felix.gateway.gateway import (
    CLOSE_AUTH_FAILED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_FRAME_TIMEOUT,
    CLOSE_INPUT_LIMIT,
    CLOSE_OVERLOADED,
    GatewayLimits,
)
from felix.gateway.session import GatewaySession
from felix.node.local import LocalNode
from felix.quic import CLOSE_INTERNAL_ERROR
from tests.aio import run
from tests.nodeproc import NodeProcess
from tests.rawquic import RawPeer, raw_connect

pytestmark = pytest.mark.timeout(90)
T, NS = "acme", "prod"
RING = TenantKeyRing.create(T, time.time())


def token(ttl: int) -> str:
    perms = PermissionSet(T, ["stream.publish:stream:acme/prod/*"])
    return RING.mint(time.time(), issuer="felix", audience="felix", sub="a", perms=perms, ttl=ttl)


def authenticator() -> TokenAuthenticator:
    return TokenAuthenticator(
        lambda tenant, _: RING.jwks(time.time()) if tenant == T else None,
        issuer="felix",
        audience="felix",
        leeway=0.0,
    )


async def authed(peer: RawPeer, tok: str) -> int:
    sid = peer.new_stream()
    msg = {"type": "auth", "tenant_id": "", "token": tok, "client_flags": wire.FLAGS_ALL}
    peer.send(sid, wire.encode_message(msg))
    (first,) = await peer.frames_on(sid, 1)
    assert wire.decode_message(first)["type"] == "auth_ok"
    return sid


def test_idle_connections_neither_lock_out_clients_nor_live_past_the_deadline(
    tmp_path: Path,
) -> None:
    """Item 4: an attacker fills the connection table without ever opening a stream."""

    async def main() -> None:
        limits = GatewayLimits(max_connections=3, auth_timeout=1.0)
        async with LocalNode.start(tmp_path, limits=limits) as node:
            idle = [await raw_connect(node.host, node.port, node.ca_file) for _ in range(3)]
            client = await raw_connect(node.host, node.port, node.ca_file)
            sid = await client.auth()
            client.send(sid, wire.encode_ping(1))
            reply = wire.decode_ext((await client.frames_on(sid, 2))[1])
            assert reply.opcode == wire.OP_OK
            await idle[0].wait_for(lambda: idle[0].close_reason is not None)
            assert idle[0].close_reason is not None
            assert idle[0].close_reason.error_code == CLOSE_OVERLOADED
            # The others never authenticate: closed at the deadline from their handshake.
            for peer in idle[1:]:
                await peer.wait_for(lambda p=peer: p.close_reason is not None, timeout=10)
                assert p_code(peer) == CLOSE_AUTH_TIMEOUT
            assert client.close_reason is None
            for peer in (*idle, client):
                peer.close()

    run(main)


def p_code(peer: RawPeer) -> int:
    assert peer.close_reason is not None
    return int(peer.close_reason.error_code)


def test_a_stream_with_an_expired_token_loses_its_rights_beside_a_fresh_one(
    tmp_path: Path,
) -> None:
    """Item 7: two streams, two tokens, one connection."""

    async def main() -> None:
        async with LocalNode.start(tmp_path, authenticator=authenticator()) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            old = await authed(peer, token(ttl=2))
            fresh = await authed(peer, token(ttl=300))
            await peer.wait_for(lambda: len(peer.frames[old]) >= 2, timeout=10)
            error = wire.decode_message(peer.frames[old][-1])
            assert error["type"] == "error" and "token expired" in error["message"]
            peer.send(fresh, wire.encode_publish(1, T, NS, "s", [b"x"]))
            reply = wire.decode_ext((await peer.frames_on(fresh, 2))[1])
            assert isinstance(reply, wire.PublishOffsets)
            assert peer.close_reason is None
            peer.close()

    run(main)


def test_a_request_over_the_ring_record_limit_is_too_large_on_a_real_node(
    tmp_path: Path,
) -> None:
    """Item 9: between the ring's record limit and the frame limit, with real rings."""
    node = NodeProcess(tmp_path / "node", gateways=1, shards=1)
    try:

        async def main() -> None:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            sid = await peer.auth()
            peer.send(sid, wire.encode_publish(1, T, NS, "s", [b"x" * 3_000_000]))
            peer.send(sid, wire.encode_publish(2, T, NS, "s", [b"small"]))
            frames = await peer.frames_on(sid, 3, timeout=20)
            replies = {m.request_id: m for m in map(wire.decode_ext, frames[1:])}
            assert replies[1].code == 7  # type: ignore[attr-defined]
            assert isinstance(replies[2], wire.PublishOffsets)
            assert peer.close_reason is None
            peer.close()
            await asyncio.sleep(0)

        run(main)
    finally:
        node.stop()


def test_a_half_sent_frame_is_cut_off_at_its_deadline(tmp_path: Path) -> None:
    """Item 3: a frame's header and a little payload, then nothing."""

    async def main() -> None:
        limits = GatewayLimits(frame_timeout=1.0, max_buffered_input_per_connection=1_000_000)
        async with LocalNode.start(tmp_path, limits=limits) as node:
            slow = await raw_connect(node.host, node.port, node.ca_file)
            sid = await slow.auth()
            frame = wire.encode_publish(1, T, NS, "s", [b"x" * 3_000_000])
            slow.send(sid, frame[:100_000])
            await slow.wait_for(lambda: slow.close_reason is not None, timeout=10)
            assert p_code(slow) == CLOSE_FRAME_TIMEOUT
            hog = await raw_connect(node.host, node.port, node.ca_file)
            sids = [await hog.auth() for _ in range(3)]
            for s in sids:  # three half frames: over the connection's budget
                hog.send(s, frame[:400_000])
            await hog.wait_for(lambda: hog.close_reason is not None, timeout=10)
            assert p_code(hog) == CLOSE_INPUT_LIMIT
            assert node.gateway.buffered_input == 0
            assert node.gateway.input_limit_closes == 2

    run(main)


def test_a_burst_of_bad_tokens_from_an_address_does_not_lock_out_a_valid_token(
    tmp_path: Path,
) -> None:
    """Item 10: same address, many failures, then a good token: accepted (maybe delayed)."""

    async def main() -> None:
        async with LocalNode.start(tmp_path, authenticator=authenticator()) as node:
            for _ in range(4):  # 32 failures over four connections
                bad = await raw_connect(node.host, node.port, node.ca_file)
                for _ in range(8):
                    sid = bad.new_stream()
                    attempt = {"type": "auth", "tenant_id": "", "token": "garbage"}
                    bad.send(sid, wire.encode_message(attempt))
                await bad.wait_for(lambda b=bad: b.close_reason is not None, timeout=20)
                assert p_code(bad) == CLOSE_AUTH_FAILED
            good = await raw_connect(node.host, node.port, node.ca_file)
            await authed(good, token(ttl=300))
            assert good.close_reason is None
            assert node.gateway.auth_failures == 32 and node.gateway.auth_throttled >= 1
            good.close()

    run(main)


def test_auth_pipelined_with_a_large_request_in_one_write(tmp_path: Path) -> None:
    """Low: the request after `auth` is judged by post-auth rules (over the pre-auth cap)."""

    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            auth = {"type": "auth", "tenant_id": T, "token": "", "client_flags": wire.FLAGS_ALL}
            big = wire.encode_publish(1, T, NS, "s", [b"x" * 100_000])
            peer.send(0, wire.encode_message(auth) + big)
            frames = await peer.frames_on(0, 2)
            assert isinstance(wire.decode_ext(frames[1]), wire.PublishOffsets)
            assert node.gateway.protocol_errors == 0
            peer.close()

    run(main)


def test_a_subscriber_that_stops_its_event_stream_costs_no_one_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 8: one subscriber's broken event stream; the others of the stream are served,
    and the failure is counted, not logged with a traceback per event."""

    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            peers = [await raw_connect(node.host, node.port, node.ca_file) for _ in range(3)]
            streams = []
            for peer in peers:
                sid = await peer.auth()
                peer.send(sid, wire.encode_subscribe(1, T, NS, "s", 1, credit=1000))
                await peer.wait_for(lambda p=peer: any(s & 0x3 == 3 for s in p.frames))
                streams.append(next(s for s in peer.frames if s & 0x3 == 3))
            peers[0].stop_stream(streams[0], 0)  # STOP_SENDING on its event stream
            pub = await raw_connect(node.host, node.port, node.ca_file)
            psid = await pub.auth()
            await asyncio.sleep(0.2)  # the STOP_SENDING has arrived
            for i in range(20):
                pub.send(psid, wire.encode_publish(10 + i, T, NS, "s", [b"%d" % i]))
            await pub.frames_on(psid, 21)
            for peer, stream in zip(peers[1:], streams[1:], strict=True):
                await peer.wait_for(lambda p=peer, s=stream: count_events(p, s) == 20)
            assert node.gateway.internal_errors <= 1
            tracebacks = [r for r in caplog.records if r.exc_info and r.name == "felix.gateway"]
            assert len(tracebacks) <= 1
            for peer in (*peers, pub):
                peer.close()

    run(main)


def count_events(peer: RawPeer, stream: int) -> int:
    frames = [wire.decode_ext(f) for f in peer.frames[stream][1:]]
    return sum(len(m.payloads) for m in frames if isinstance(m, wire.Events))


def test_connections_are_counted_by_their_source_address(tmp_path: Path) -> None:
    """The per-source bound needs the real address (whichever receive path the engine uses)."""

    async def main() -> None:
        limits = GatewayLimits(max_unauthenticated_per_source=2)
        async with LocalNode.start(tmp_path, limits=limits) as node:
            peers = [await raw_connect(node.host, node.port, node.ca_file) for _ in range(3)]
            await peers[2].wait_for(lambda: peers[2].close_reason is not None)
            assert p_code(peers[2]) == CLOSE_OVERLOADED
            assert {c.peer for c in node.gateway.connections} == {"127.0.0.1"}
            for peer in peers:
                peer.close()

    run(main)


def test_a_bug_reached_from_client_input_is_logged_once_and_costs_one_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 8: whatever fails while serving a client closes that client, and is counted."""

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            good = await raw_connect(node.host, node.port, node.ca_file)
            gsid = await good.auth()
            monkeypatch.setattr(GatewaySession, "receive", broken)
            victims = [await raw_connect(node.host, node.port, node.ca_file) for _ in range(3)]
            for peer in victims:
                peer.send(peer.new_stream(), b"anything")
                await peer.wait_for(lambda p=peer: p.close_reason is not None)
                assert p_code(peer) == CLOSE_INTERNAL_ERROR
            monkeypatch.undo()
            good.send(gsid, wire.encode_ping(1))
            assert wire.decode_ext((await good.frames_on(gsid, 2))[1]).opcode == wire.OP_OK
            assert node.gateway.internal_errors == 3
            assert len([r for r in caplog.records if r.exc_info]) == 1
            good.close()

    run(main)


def test_a_connection_that_ended_its_authenticated_stream_must_authenticate_again(
    tmp_path: Path,
) -> None:
    """Review finding 2: authenticate once, FIN the stream, keep the connection: it is
    closed at the auth deadline, not held (unevictable) for good."""

    async def main() -> None:
        limits = GatewayLimits(auth_timeout=0.5)
        async with LocalNode.start(tmp_path, limits=limits, authenticator=authenticator()) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            sid = await authed(peer, token(ttl=300))
            peer.send(sid, b"", end_stream=True)
            await peer.wait_for(lambda: peer.close_reason is not None, timeout=20)
            assert p_code(peer) == CLOSE_AUTH_TIMEOUT
            assert node.gateway.admission.unauthenticated == 0

    run(main)
