"""Broker-side authentication: Felix tokens, tenant from the token, permissions, expiry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from felix import wire
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.gateway.auth import FailureLimiter, TokenAuthenticator
from felix.node.local import LocalNode
from tests.aio import run
from tests.rawquic import RawPeer, raw_connect

pytestmark = pytest.mark.timeout(60)
ISS = AUD = "felix"
RING = TenantKeyRing.create("acme", time.time())
PERMS = ["stream.publish:stream:acme/prod/*", "cache.read:cache:acme/prod/c"]


def token(perms: list[str] = PERMS, ttl: int = 300, tenant_ring: TenantKeyRing = RING) -> str:
    return tenant_ring.mint(
        time.time(),
        issuer=ISS,
        audience=AUD,
        sub="alice",
        perms=PermissionSet(tenant_ring.tenant, perms),
        ttl=ttl,
    )


def jwks(tenant: str, now: float) -> dict[str, Any] | None:
    return RING.jwks(time.time()) if tenant == "acme" else None


def node(tmp_path: Path, leeway: float = 5.0) -> Any:
    auth = TokenAuthenticator(jwks, issuer=ISS, audience=AUD, leeway=leeway)
    return LocalNode.start(tmp_path, authenticator=auth)


async def authed(peer: RawPeer, tok: str, tenant: str = "") -> tuple[int, dict[str, Any]]:
    sid = peer.new_stream()
    peer.send(
        sid,
        wire.encode_message(
            {"type": "auth", "tenant_id": tenant, "token": tok, "client_flags": wire.FLAGS_ALL}
        ),
    )
    (first,) = await peer.frames_on(sid, 1)
    return sid, wire.decode_message(first)


def ext(frame: wire.Frame) -> wire.ExtMessage:
    return wire.decode_ext(frame)


def test_every_request_is_checked_against_the_token_permissions(tmp_path: Path) -> None:
    async def main() -> None:
        async with node(tmp_path) as n:
            peer = await raw_connect(n.host, n.port, n.ca_file)
            sid, reply = await authed(peer, token())
            assert reply == {"type": "auth_ok", "server_flags": wire.FLAGS_ALL}
            peer.send(sid, wire.encode_publish(1, "acme", "prod", "orders", [b"x"]))  # granted
            peer.send(sid, wire.encode_publish(2, "acme", "dev", "orders", [b"x"]))  # other ns
            peer.send(sid, wire.encode_cache_get(3, "acme", "prod", "c", "k"))  # granted
            peer.send(sid, wire.encode_cache_set(4, "acme", "prod", "c", "k", b"v"))  # read only
            peer.send(sid, wire.encode_subscribe(5, "acme", "prod", "orders", 1))  # not granted
            peer.send(sid, wire.encode_publish(6, "globex", "prod", "orders", [b"x"]))  # tenant
            peer.send(
                sid,
                wire.encode_message(
                    {
                        "type": "cache_put",
                        "tenant_id": "acme",
                        "namespace": "prod",
                        "cache": "c",
                        "key": "k",
                        "value": b"v",
                        "ttl_ms": None,
                    }
                ),
            )  # v1, denied
            frames = await peer.frames_on(sid, 8)
            replies = {m.request_id: m for m in map(ext, (f for f in frames[1:] if f.flags))}
            (v1_error,) = [wire.decode_message(f) for f in frames[1:] if not f.flags]
            assert isinstance(replies[1], wire.PublishOffsets)
            assert isinstance(replies[3], wire.CacheValue)
            for rid in (2, 4, 5, 6):
                denied = replies[rid]
                assert isinstance(denied, wire.ErrorReply) and denied.code == 3, rid
            assert v1_error["type"] == "error" and "not granted" in v1_error["message"]
            peer.close()

    run(main)


def test_an_expired_token_closes_the_connection_unless_refreshed(tmp_path: Path) -> None:
    async def main() -> None:
        async with node(tmp_path, leeway=0.0) as n:
            short = await raw_connect(n.host, n.port, n.ca_file)
            # ttl=2: iat is rounded down to whole seconds, so ttl=1 may arrive expired.
            await authed(short, token(ttl=2))
            kept = await raw_connect(n.host, n.port, n.ca_file)
            sid, _ = await authed(kept, token(ttl=2))
            kept.send(sid, wire.encode_reauth(7, token(ttl=30)))  # fresh token, same tenant
            assert ext((await kept.frames_on(sid, 2))[1]).opcode == wire.OP_OK
            await short.wait_for(lambda: short.close_reason is not None, timeout=10)
            assert short.close_reason is not None
            assert "expired" in short.close_reason.reason_phrase
            kept.send(sid, wire.encode_ping(8))
            assert ext((await kept.frames_on(sid, 3))[2]).opcode == wire.OP_OK
            assert kept.close_reason is None
            assert n.gateway.expired_sessions == 1
            kept.close()

    run(main)


def test_failure_limiter_backs_off_and_forgets() -> None:
    lim = FailureLimiter(free_failures=2, window=10, base_delay=0.5, max_delay=2.0, max_keys=3)
    for t in (0, 1):
        lim.failed(["a"], t)
    assert lim.ready_at(["a"], 1) == 1  # free failures cost nothing
    lim.failed(["a"], 2)
    assert lim.ready_at(["a"], 2) == 2.5
    for t in (3, 4, 5):
        lim.failed(["a"], t)
    assert lim.ready_at(["a", "b"], 5) == 7.0  # capped at max_delay
    assert lim.ready_at(["a"], 10.5) == 10.5  # the window passed: forgotten
    for key in "bcde":
        lim.failed([key], 20)
    assert len(lim._keys) == 3  # oldest keys forgotten
