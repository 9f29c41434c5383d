"""A client that sends STOP_SENDING never makes the gateway raise, leak or lose its deadlines.

Both QUIC engines refuse a write on a stream whose peer sent STOP_SENDING (they
answer it with RESET_STREAM); the in-memory pair's transport raises the same way
(tests/gateway_pair.py). Each attack is first run on the pair with the clock
moved by hand, then once against a real node over QUIC.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from felix import wire
from felix.errors import Unavailable
from felix.gateway.gateway import CLOSE_AUTH_TIMEOUT, CLOSE_TOKEN_EXPIRED, GatewayLimits
from felix.node.local import LocalNode
from tests.aio import run
from tests.gateway_pair import Pair
from tests.rawquic import raw_connect
from tests.test_gateway_attacks import authed, authenticator, token
from tests.test_gateway_session import NS, T, auth_frame, mint, replies, token_pair

SUB_PERMS = ["stream.publish:stream:acme/prod/*", "stream.subscribe:stream:acme/prod/*"]


def subscribed_pair(ttl: int) -> tuple[Pair, int]:
    """A connection with one authenticated stream (token of ``ttl`` s) and a subscription."""
    pair = token_pair()
    sid = pair.open_control("", mint(pair, ttl=ttl, perms=SUB_PERMS))
    pair.send(sid, wire.encode_subscribe(1, T, NS, "s", 7, credit=10))
    pair.pump()
    assert pair.shell.subscriptions
    return pair, sid


@pytest.mark.parametrize("gateway_told", [True, False])
def test_a_stopped_unauthenticated_stream_leaves_the_connection_deadlines_alive(
    gateway_told: bool,
) -> None:
    """At the stopped stream's auth deadline nothing raises; the token expiry still fires."""
    pair, _ = subscribed_pair(ttl=10)
    stopped = pair.new_stream()
    pair.send(stopped, b"")  # opened, never authenticated
    pair.stop_sending(stopped, tell_gateway=gateway_told)
    pair.advance(5)  # its auth deadline
    assert stopped not in pair.transport.out
    assert pair.transport.stopped[stopped] == CLOSE_AUTH_TIMEOUT
    # Told first, the session writes nothing there; not yet told, the refused write is
    # counted and the actions after it still run.
    assert pair.gateway.internal_errors == (0 if gateway_told else 1)
    assert pair.timer_at is not None
    pair.advance(5)  # the subscription's token expires
    assert pair.transport.closed is not None and pair.transport.closed[0] == CLOSE_TOKEN_EXPIRED
    assert not pair.shell.subscriptions


def test_a_stream_stopped_before_its_first_bytes_is_never_written_to() -> None:
    """The engine may report STOP_SENDING before the stream's data."""
    pair = Pair()
    stopped = pair.new_stream()
    pair.stop_sending(stopped)
    pair.send(stopped, auth_frame())
    pair.send(stopped, wire.encode_ping(1))
    pair.pump()
    assert stopped not in pair.transport.out and pair.gateway.internal_errors == 0
    assert pair.transport.closed is None and pair.shell.session.authenticated


@pytest.mark.parametrize("gateway_told", [True, False])
def test_an_answer_for_a_stopped_stream_is_dropped_and_the_request_settled(
    gateway_told: bool,
) -> None:
    pair = Pair()
    sid = pair.open_control()
    pair.send(sid, wire.encode_cache_get(1, T, NS, "c", "k"))
    pair.stop_sending(sid, tell_gateway=gateway_told)
    pair.pump()
    assert pair.shell.session.in_flight == 0
    assert pair.gateway.internal_errors == (0 if gateway_told else 1)
    other = pair.open_control()
    pair.send(other, wire.encode_ping(2))
    assert replies(pair, other)[2].opcode == wire.OP_OK


def test_a_shard_down_answers_every_connection_even_if_one_stopped_its_stream() -> None:
    stopped = Pair(shards=1)
    waiting = stopped.connect("192.0.2.2")
    for pair in (stopped, waiting):
        sid = pair.open_control()
        pair.send(sid, wire.encode_cache_get(1, T, NS, "c", "k"))  # not pumped: in flight
    stopped.stop_sending(0, tell_gateway=False)
    stopped.gateway.shard_down(0)
    assert stopped.shell.session.in_flight == 0 and waiting.shell.session.in_flight == 0
    waiting.pump()
    assert replies(waiting, 0)[1].code == Unavailable.code  # type: ignore[attr-defined]


def test_stop_sending_then_the_auth_deadline_over_quic_keeps_the_token_expiry(
    tmp_path: Path,
) -> None:
    """Over a real node: a stream stopped by the client, its auth deadline passes, and
    the connection is still closed when its token expires."""

    async def main() -> None:
        limits = GatewayLimits(auth_timeout=0.5)
        async with LocalNode.start(tmp_path, limits=limits, authenticator=authenticator()) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            await authed(peer, token(ttl=3))
            stopped = peer.new_stream()
            peer.send(stopped, auth_frame()[:4])  # opened, never authenticated
            peer.stop_stream(stopped, 0)
            await peer.wait_for(lambda: peer.close_reason is not None, timeout=30.0)
            assert peer.close_reason is not None
            assert peer.close_reason.error_code == CLOSE_TOKEN_EXPIRED
            assert node.gateway.internal_errors == 0

    run(main)
