"""Token expiry and refresh with the Python client, over real QUIC to a real node.

The node (felix.node.local.LocalNode: a gateway and real shards) checks Felix
tokens with a TokenAuthenticator whose leeway is cut to half a second, and the
tokens live a few seconds, so expiry periods pass quickly. Nothing here asserts
how fast anything is; deadlines only stop a broken run from hanging.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import felix
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.client import Client, ClientEvent, Disconnected, Subscription
from felix.client._pool import MIN_REFRESH_DELAY, REFRESH_ATTEMPTS, refresh_delay, token_times
from felix.errors import Unauthenticated
from felix.gateway.auth import TokenAuthenticator
from felix.node.local import LocalNode
from tests.aio import run

pytestmark = pytest.mark.timeout(90)

ISS = AUD = "felix"
RING = TenantKeyRing.create("acme", time.time())
#: The same tenant's keys, never published: tokens the node refuses.
UNPUBLISHED = TenantKeyRing.create("acme", time.time())
PERMS = ["stream.publish:stream:acme/prod/*", "stream.subscribe:stream:acme/prod/*"]
#: Seconds a session outlives its token's exp on the node (the default is 5).
LEEWAY = 0.5


def token(ttl: int, ring: TenantKeyRing = RING) -> str:
    return ring.mint(
        time.time(),
        issuer=ISS,
        audience=AUD,
        sub="alice",
        perms=PermissionSet("acme", PERMS),
        ttl=ttl,
    )


def jwks(tenant: str, now: float) -> dict[str, Any] | None:
    return RING.jwks(time.time()) if tenant == "acme" else None


def node(tmp_path: Path) -> Any:
    auth = TokenAuthenticator(jwks, issuer=ISS, audience=AUD, leeway=LEEWAY)
    return LocalNode.start(tmp_path, authenticator=auth)


def connect(n: LocalNode, events: list[ClientEvent], **options: Any) -> felix.Connect:
    return felix.connect(
        n.url,
        ca=n.ca_file,
        tenant="acme",
        namespace="prod",
        on_event=events.append,
        reconnect_backoff=(0.05, 0.5),
        **options,
    )


async def publish_until(client: Client, stop: asyncio.Event, sent: list[bytes]) -> None:
    """Publish a numbered record every 0.1 s until ``stop`` (or the session ends)."""
    while not stop.is_set():
        data = str(len(sent)).encode()
        try:
            await client.publish("orders", data)
        except Unauthenticated:
            return
        sent.append(data)
        await asyncio.sleep(0.1)


async def receive_until(sub: Subscription, stop: asyncio.Event, got: list[bytes]) -> None:
    while not stop.is_set():
        got.append((await sub.next(timeout=10)).data)


# -- unit: the schedule --------------------------------------------------------------------


def test_refresh_schedule() -> None:
    now = 1_000_000.0
    # An hour-long token: refreshed after 80% of its lifetime (minus up to 10% jitter).
    assert refresh_delay(now, now + 3600, now, 0.0) == pytest.approx(2880)
    assert 0.9 * 2880 <= refresh_delay(now, now + 3600, now, 0.99) < 2880
    # A minute: 30 s before it expires; a few seconds: at half of the lifetime.
    assert refresh_delay(now, now + 60, now, 0.0) == pytest.approx(30)
    assert refresh_delay(now, now + 4, now, 0.0) == pytest.approx(2)
    # Late or expired already: a short wait, never zero (no busy loop).
    assert refresh_delay(now - 3590, now + 10, now, 0.0) == MIN_REFRESH_DELAY
    assert refresh_delay(now - 100, now - 10, now, 0.5) == MIN_REFRESH_DELAY
    assert refresh_delay(None, now + 100, now, 0.0) == pytest.approx(70)  # no iat: from now

    tok = token(ttl=60)
    times = token_times(tok)
    assert times is not None
    iat, exp = times
    assert iat is not None and exp - iat == 60
    assert token_times("opaque") is None and token_times("") is None


# -- over QUIC -----------------------------------------------------------------------------


def test_a_static_token_that_expires_ends_the_subscription_with_a_clear_error(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        events: list[ClientEvent] = []
        async with (
            node(tmp_path) as n,
            connect(n, events, token=token(ttl=2)) as client,
            client.subscribe("orders") as sub,
        ):
            await client.publish("orders", b"before")
            assert (await sub.next(timeout=10)).data == b"before"
            with pytest.raises(Unauthenticated, match="token expired") as ended:
                async with asyncio.timeout(15):
                    async for _ in sub:
                        pass
            assert "0x106" in str(ended.value)
            assert n.gateway.expired_sessions == 1
            # Nothing is waiting for a reconnect that cannot succeed: calls fail at once.
            with pytest.raises(Unauthenticated, match="token expired"):
                await client.publish("orders", b"after")
            with pytest.raises(Unauthenticated):
                await client.subscribe("orders").start()
            assert client.connected == 0
            (lost,) = [e for e in events if isinstance(e, Disconnected)]
            assert isinstance(lost.error, Unauthenticated)

    run(main, timeout=60)


def test_a_token_provider_keeps_the_subscription_and_the_connection_across_expiries(
    tmp_path: Path,
) -> None:
    calls: list[float] = []

    async def provider() -> str:
        calls.append(time.time())
        await asyncio.sleep(0)  # an async provider, as one fetching over HTTP would be
        return token(ttl=3)

    async def main() -> None:
        events: list[ClientEvent] = []
        async with (
            node(tmp_path) as n,
            connect(n, events, token_provider=provider, control_streams=2) as client,
            client.subscribe("orders") as sub,
        ):
            (conn,) = client._pool.live()
            assert len(calls) == 1
            stop = asyncio.Event()
            sent: list[bytes] = []
            got: list[bytes] = []
            publisher = asyncio.create_task(publish_until(client, stop, sent))
            receiver = asyncio.create_task(receive_until(sub, stop, got))
            # Several lifetimes of a 3 s token (plus the node's leeway).
            deadline = time.time() + 4 * (3 + LEEWAY)
            while time.time() < deadline:
                assert not publisher.done() and not receiver.done(), "a task ended early"
                await asyncio.sleep(0.1)
            stop.set()
            await publisher
            while len(got) < len(sent):  # the last records are on their way
                got.append((await sub.next(timeout=10)).data)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)

            assert got[: len(sent)] == sent and len(sent) > 20
            # Fresh tokens, fetched before each expiry and presented on the live connection.
            assert len(calls) >= 5 and conn.reauths >= 4, (len(calls), conn.reauths)
            assert client._pool.live() == [conn] and conn.alive  # the same connection
            assert conn.refresh_error is None
            assert not [e for e in events if isinstance(e, Disconnected)]
            assert n.gateway.expired_sessions == 0
            assert len(n.gateway.connections) == 1

    run(main, timeout=80)


def test_a_refused_refresh_ends_the_subscription_with_the_reason(tmp_path: Path) -> None:
    calls: list[int] = []

    def provider() -> str:  # sync providers work too
        calls.append(1)
        # The first token is good; every later one is signed with keys nobody published.
        return token(ttl=3) if len(calls) == 1 else token(ttl=3, ring=UNPUBLISHED)

    async def main() -> None:
        events: list[ClientEvent] = []
        async with (
            node(tmp_path) as n,
            connect(n, events, token_provider=provider) as client,
            client.subscribe("orders") as sub,
        ):
            (conn,) = client._pool.live()
            with pytest.raises(Unauthenticated, match="could not be refreshed") as ended:
                async with asyncio.timeout(30):
                    async for _ in sub:
                        pass
            assert "token expired" in str(ended.value)
            assert conn.reauths == 0 and not conn.alive
            assert len(calls) >= 2
            assert n.gateway.expired_sessions == 1
            assert n.gateway.auth_failures >= 1  # the REAUTHs were refused
            (lost, *_) = [e for e in events if isinstance(e, Disconnected)]
            assert isinstance(lost.error, Unauthenticated)

    run(main, timeout=80)


def test_a_provider_without_fresher_tokens_is_retried_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    cached = token(ttl=3)
    calls: list[float] = []

    async def provider() -> str:  # a cache that never renews: no busy loop on it
        calls.append(time.time())
        return cached

    async def main() -> None:
        events: list[ClientEvent] = []
        async with (
            node(tmp_path) as n,
            # Jitter near its top: retries (and the reconnect after the close) wait.
            connect(n, events, token_provider=provider, random_source=lambda: 0.99) as client,
            client.subscribe("orders") as sub,
        ):
            with pytest.raises(Unauthenticated, match="no later than the current one"):
                async with asyncio.timeout(30):
                    async for _ in sub:
                        pass
            assert 2 <= len(calls) <= 1 + REFRESH_ATTEMPTS
            assert n.gateway.expired_sessions == 1

    run(main, timeout=60)
