"""The gateway's session core, through an in-memory client <-> gateway pair (no sockets, no sleeps).

Handshake, deadlines, hostile input, admission and expiry; the clock is moved by
hand (tests/gateway_pair.py). End-to-end cases over real QUIC stay in
tests/test_gateway.py and tests/test_gateway_auth.py.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from felix import wire
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.client._session import Authenticated, Reply, StreamClosed
from felix.errors import Unauthenticated
from felix.gateway.auth import TokenAuthenticator
from felix.gateway.gateway import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOKEN_EXPIRED,
    GatewayLimits,
)
from felix.gateway.session import StreamState
from tests.gateway_pair import START, Pair

T, NS = "acme", "prod"
ISS = AUD = "felix"
RING = TenantKeyRing.create(T, START - 60)
PERMS = ["stream.publish:stream:acme/prod/*", "cache.read:cache:acme/prod/c"]


def auth_frame(token: str = "", tenant: str = T, flags: int | None = wire.FLAGS_ALL) -> bytes:
    msg: dict[str, Any] = {"type": "auth", "tenant_id": tenant, "token": token}
    if flags is not None:
        msg["client_flags"] = flags
    return wire.encode_message(msg)


def replies(pair: Pair, sid: int) -> dict[int, wire.ExtMessage]:
    return {m.request_id: m for m in pair.messages(sid) if isinstance(m, wire.ExtMessage)}


def token_pair(now: float = START, leeway: float = 0.0) -> Pair:
    """A pair whose gateway checks real Felix tokens against the pair's clock."""
    pair = Pair(authenticator=None)
    pair.gateway.authenticator = TokenAuthenticator(
        lambda tenant, _: RING.jwks(pair.clock.now) if tenant == T else None,
        issuer=ISS,
        audience=AUD,
        leeway=leeway,
        clock=pair.clock,
        monotonic=pair.clock,
    )
    pair.clock.now = now
    return pair


def mint(pair: Pair, ttl: int = 300, perms: list[str] = PERMS, sub: str = "alice") -> str:
    return RING.mint(
        pair.clock.now,
        issuer=ISS,
        audience=AUD,
        sub=sub,
        perms=PermissionSet(T, perms),
        ttl=ttl,
    )


# --- handshake -------------------------------------------------------------------------


def test_the_client_session_authenticates_and_gets_replies_by_request_id() -> None:
    pair = Pair()
    sid = pair.open_control(T, "")
    pair.send(sid, wire.encode_cache_set(1, T, NS, "c", "k", b"v", ttl_ms=60_000))
    pair.send(sid, wire.encode_cache_get(2, T, NS, "c", "k"))
    pair.send(sid, wire.encode_publish(3, T, NS, "s", [b"a", b"b"]))
    pair.pump()
    first, *rest = pair.events[sid]
    assert first == Authenticated(wire.FLAGS_V1 | wire.FLAG_FELIX_EXT)
    got = {e.message.request_id: e.message for e in rest if isinstance(e, Reply)}
    assert isinstance(got[2], wire.CacheValue) and got[2].value == b"v"
    assert isinstance(got[3], wire.PublishOffsets) and (got[3].base_offset, got[3].count) == (0, 2)


def test_handshake_negotiates_flags_and_plain_ok_without_them() -> None:
    pair = Pair()
    sid = pair.new_stream()
    pair.send(sid, auth_frame(flags=0xFFFF))
    sid2 = pair.new_stream()
    pair.send(sid2, auth_frame(flags=None))
    assert pair.messages(sid) == [
        {"type": "auth_ok", "server_flags": wire.FLAGS_V1 | wire.FLAG_FELIX_EXT}
    ]
    assert pair.messages(sid2) == [{"type": "ok"}]
    # Without the extension negotiated, an extension frame is an unknown flag.
    pair.send(sid2, wire.encode_ping(1))
    assert pair.messages(sid2)[1]["type"] == "error"
    assert sid2 in pair.transport.fin and pair.transport.stopped[sid2] == CLOSE_PROTOCOL_ERROR


def test_fin_is_answered_after_the_replies_in_flight() -> None:
    pair = Pair()
    sid = pair.open_control()
    pair.pump()
    pair.send(sid, wire.encode_cache_get(1, T, NS, "c", "k"), end_stream=True)
    assert sid not in pair.transport.fin  # the answer is still owed
    assert pair.shell.session.streams[sid].state is StreamState.ENDING
    pair.pump()
    assert sid in pair.transport.fin and 1 in replies(pair, sid)
    assert sid not in pair.shell.session.streams


# --- deadlines -------------------------------------------------------------------------


def test_auth_deadline_closes_a_silent_stream_and_only_then() -> None:
    pair = Pair(GatewayLimits(auth_timeout=5.0))
    ok = pair.open_control()
    pair.advance(1)
    sid = pair.new_stream()
    pair.send(sid, auth_frame()[:5])
    assert pair.timer_at == START + 6.0
    pair.advance(4.9)
    assert sid not in pair.transport.stopped
    pair.advance(0.2)
    assert pair.transport.stopped[sid] == CLOSE_AUTH_TIMEOUT
    assert pair.messages(sid) == [{"type": "error", "message": "no auth frame within the deadline"}]
    # An authenticated stream has no auth deadline.
    pair.advance(60)
    assert ok not in pair.transport.stopped and pair.transport.closed is None


def test_a_connection_without_an_authenticated_stream_is_closed_at_the_deadline() -> None:
    """Issue 11, item 4: the deadline runs from the handshake, streams or not."""
    idle = Pair(GatewayLimits(auth_timeout=5.0))
    assert idle.timer_at == START + 5.0  # no stream was ever opened
    idle.advance(4.9)
    assert idle.transport.closed is None
    idle.advance(0.2)
    assert idle.transport.closed == (
        CLOSE_AUTH_TIMEOUT,
        "no authenticated stream within the auth deadline",
    )
    # Streams that never authenticate do not extend it.
    chatty = Pair(GatewayLimits(auth_timeout=5.0))
    for _ in range(4):
        chatty.send(chatty.new_stream(), auth_frame()[:3])
        chatty.advance(1.5)
    assert chatty.transport.closed is not None and chatty.transport.closed[0] == CLOSE_AUTH_TIMEOUT


# --- hostile input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 64,  # garbage
        b"GET / HTTP/1.1\r\n\r\n",  # not felix
        wire.encode_message({"type": "ok"}),  # not auth
        wire.encode_ping(1),  # an extension frame before auth
        struct.pack(">IHHI", wire.MAGIC, 1, 0, 70000) + b"x" * 10,  # over the pre-auth cap
    ],
)
def test_hostile_input_closes_the_stream_and_the_connection_keeps_serving(
    payload: bytes,
) -> None:
    pair = Pair()
    bad = pair.new_stream()
    pair.send(bad, payload)
    assert pair.transport.stopped[bad] == CLOSE_PROTOCOL_ERROR
    assert pair.gateway.protocol_errors == 1
    pair.send(bad, auth_frame())  # ignored: the stream is closed
    good = pair.open_control()
    pair.send(good, wire.encode_cache_get(5, T, NS, "c", "k"))
    pair.pump()
    (reply,) = [e.message for e in pair.events[good] if isinstance(e, Reply)]
    assert isinstance(reply, wire.CacheValue) and reply.value is None
    assert pair.transport.closed is None


def test_bad_request_errors_carry_ids_and_codes() -> None:
    pair = Pair()
    sid = pair.open_control(T)
    pair.send(sid, wire.encode_cache_get(1, "other", NS, "c", "k"))
    pair.send(sid, wire.encode_cache_get(2, T, NS, "bad/name", "k"))
    pair.send(sid, wire.encode_credit(3, 999, 10))
    got = replies(pair, sid)
    assert [got[i].code for i in (1, 2, 3)] == [3, 1, 1]  # type: ignore[attr-defined]


def test_draining_refuses_requests_and_new_streams() -> None:
    pair = Pair()
    sid = pair.open_control()
    pair.gateway.draining = True
    pair.send(sid, wire.encode_cache_get(1, T, NS, "c", "k"))
    v1_get = {"type": "cache_get", "tenant_id": T, "namespace": NS, "cache": "c", "key": "k"}
    pair.send(sid, wire.encode_message(v1_get))
    assert replies(pair, sid)[1].code == 6  # type: ignore[attr-defined]
    assert "draining" in pair.messages(sid)[-1]["message"]
    late = pair.new_stream()
    pair.send(late, auth_frame())
    assert pair.transport.stopped[late] == CLOSE_PROTOCOL_ERROR


def test_requests_in_flight_are_bounded_per_connection() -> None:
    pair = Pair(GatewayLimits(max_in_flight_per_connection=2))
    sid = pair.open_control()
    for rid in (1, 2, 3):
        pair.send(sid, wire.encode_cache_get(rid, T, NS, "c", "k"))
    assert replies(pair, sid)[3].code == 5  # type: ignore[attr-defined]
    pair.pump()
    assert {1, 2} <= set(replies(pair, sid))
    pair.send(sid, wire.encode_cache_get(4, T, NS, "c", "k"))  # settled: room again
    pair.pump()
    assert isinstance(replies(pair, sid)[4], wire.CacheValue)


def test_a_full_shard_ring_answers_overloaded_and_settles() -> None:
    pair = Pair()
    sid = pair.open_control()
    pair.links.accept = False
    pair.send(sid, wire.encode_cache_get(1, T, NS, "c", "k"))
    assert replies(pair, sid)[1].code == 5  # type: ignore[attr-defined]
    assert pair.shell.session.in_flight == 0


# --- tokens ----------------------------------------------------------------------------


def test_tokens_are_required_and_checked() -> None:
    pair = token_pair()
    other = TenantKeyRing.create(T, START)  # same tenant, keys nobody published
    good = mint(pair)
    unpublished = other.mint(START, issuer=ISS, audience=AUD, sub="x", perms=PermissionSet(T, []))
    for bad in ["", "not-a-jwt", unpublished, good[:-3] + "AAA"]:
        sid = pair.open_control("", bad)
        pair.pump()
        (closed,) = pair.events[sid]
        assert isinstance(closed, StreamClosed) and isinstance(closed.error, Unauthenticated)
    sid = pair.open_control("globex", good)  # the frame may not name another tenant
    pair.pump()
    assert isinstance(pair.events[sid][0], StreamClosed)
    sid = pair.open_control(T, good)
    pair.pump()
    assert isinstance(pair.events[sid][0], Authenticated)
    assert pair.gateway.auth_failures == 5


def test_every_request_is_checked_against_the_token_permissions() -> None:
    pair = token_pair()
    sid = pair.open_control("", mint(pair))
    pair.send(sid, wire.encode_publish(1, T, NS, "orders", [b"x"]))  # granted
    pair.send(sid, wire.encode_publish(2, T, "dev", "orders", [b"x"]))  # other namespace
    pair.send(sid, wire.encode_cache_get(3, T, NS, "c", "k"))  # granted
    pair.send(sid, wire.encode_cache_set(4, T, NS, "c", "k", b"v"))  # read only
    pair.send(sid, wire.encode_subscribe(5, T, NS, "orders", 1))  # not granted
    pair.send(sid, wire.encode_publish(6, "globex", NS, "orders", [b"x"]))  # other tenant
    pair.pump()
    got = replies(pair, sid)
    assert isinstance(got[1], wire.PublishOffsets) and isinstance(got[3], wire.CacheValue)
    assert [got[i].code for i in (2, 4, 5, 6)] == [3, 3, 3, 3]  # type: ignore[attr-defined]
    assert pair.gateway.permission_denials == 4


def test_an_expired_token_closes_the_connection_unless_refreshed() -> None:
    short, kept = token_pair(), token_pair()
    short.open_control("", mint(short, ttl=10))
    sid = kept.open_control("", mint(kept, ttl=10))
    kept.advance(5)
    kept.send(sid, wire.encode_reauth(7, mint(kept, ttl=30)))
    assert replies(kept, sid)[7].opcode == wire.OP_OK
    short.advance(9.9)
    assert short.transport.closed is None
    short.advance(0.1)
    kept.advance(5)
    assert short.transport.closed == (
        CLOSE_TOKEN_EXPIRED,
        "token expired: reconnect with a fresh token",
    )
    assert short.gateway.expired_sessions == 1
    kept.send(sid, wire.encode_ping(8))
    assert replies(kept, sid)[8].opcode == wire.OP_OK and kept.transport.closed is None
