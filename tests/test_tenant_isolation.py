"""R14, tenant isolation: with a token of tenant A (acme), nothing of tenant B (globex).

- Data plane (real QUIC to an in-process node with token authentication): every
  publish, subscribe and cache get/set/delete/ttl, as extension frames, v1 JSON
  and v1 binary, naming B (or a name that tries to reach B: wildcards, path
  tricks, percent-encoding, unicode look-alikes, 10k-character strings) is
  refused with a clear error, the connection keeps serving, B's data is untouched
  and never shows up in what A receives. A connection, and every session on it,
  stays in the tenant of its first token.
- Management (the real FastAPI app over httpx's ASGI transport, with auth): every
  route under ``/v1/tenants/globex`` answers 401/403 to A's token, whatever the
  path tricks; lists show only A's resources; the feed is admin-only; a 403 about
  B never tells whether a B resource exists; A's identity-provider token buys no
  token of B.
- Metrics: the node's ``/metrics`` (a real ``felix up --auth``) carries only
  ``role`` and ``index`` labels: no tenant label, no tenant or resource name.
- The OpenAPI document declares the bearer scheme, and 401/403 problems on every
  protected operation.

B's resources have names containing ``gxsecret``; B's payloads and values contain
``GX-SECRET``. Neither may appear in anything A is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest

from felix import wire
from felix.auth.files import AUDIENCE, ISSUER, save_ring
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.auth.tokens import read_unverified_claims
from felix.control.api import ROUTE_ACCESS, Access, create_app
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.gateway.auth import FailureLimiter, TokenAuthenticator
from felix.node.health import HealthServer
from felix.node.local import LocalNode
from felix.quic.stream_ids import is_server_initiated, is_unidirectional
from tests.aio import run
from tests.nodeproc import NodeProcess
from tests.rawquic import RawPeer, raw_connect
from tests.test_control_auth import IDP, JWKS_URL, IdP, idp_token

pytestmark = pytest.mark.timeout(120)

A, B = "acme", "globex"
NOW = time.time()
RINGS = {t: TenantKeyRing.create(t, NOW) for t in (A, B)}
# B's names and data: none of them may ever reach A.
B_NS, B_STREAM, B_CACHE, B_KEY = "gxsecretns", "gxsecretstream", "gxsecretcache", "gxsecretkey"
B_PAYLOAD = b"GX-SECRET-payload"
B_VALUE = b"GX-SECRET-value"
SECRETS = ("gxsecret", "GX-SECRET")

#: Tenant fields that try to reach B (or any tenant but A) from A's session.
TENANT_TRICKS = [
    B,
    "*",
    "globex*",
    "../globex",
    "globex/..",
    "acme/../globex",
    "%2e%2e",
    "..",
    "",
    "GLOBEX",
    "ACME",
    "\uff47lobex",  # full-width g
    "\uff41cme",  # full-width a: looks like acme
    "globex\u200b",  # zero-width space
    "acme\u200b",
    "acme\x00globex",
    " acme",
    "acme\n",
    "g" * 10_000,
]
#: Tenants a forged token (signed with A's key) claims.
TID_TRICKS = [B, "../globex", "globex/..", "*", "\uff47lobex", "globex\u200b", "g" * 10_000]
#: Namespace / stream / cache names (with A's own tenant) that try the same.
NAME_TRICKS = [
    "*",
    "..",
    ".",
    "../globex",
    "globex/..",
    f"../../{B}/prod",
    "%2e%2e",
    "%2F",
    "\uff42",  # full-width b
    "prod\u200b",
    "prod/",
    "",
    "x" * 10_000,
]


def token(tenant: str, perms: list[str] | None = None, ttl: int = 300) -> str:
    """A Felix token of ``tenant`` allowing everything in it (by default)."""
    return RINGS[tenant].mint(
        time.time(),
        issuer=ISSUER,
        audience=AUDIENCE,
        sub=f"svc-{tenant}",
        perms=PermissionSet(tenant, perms or [f"tenant.manage:tenant:{tenant}"]),
        ttl=ttl,
    )


def forged_for_b(tid: str = B) -> str:
    """A token claiming tenant ``tid`` (B by default), signed with A's key (its kid is A's)."""
    claims = read_unverified_claims(token(A))
    claims["tid"] = tid
    claims["perms"] = [f"tenant.manage:tenant:{tid}"]
    signer = RINGS[A].signer(time.time())
    return jwt.encode(claims, signer._key, algorithm="EdDSA", headers={"kid": signer.kid})


def assert_no_secrets(text: str | bytes) -> None:
    data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    for secret in SECRETS:
        assert secret.encode() not in data, data[:300]


# -- data plane ------------------------------------------------------------------------------


def jwks(tenant: str, now: float) -> dict[str, Any] | None:
    ring = RINGS.get(tenant)
    return ring.jwks(time.time()) if ring is not None else None


def node(tmp_path: Path) -> Any:
    auth = TokenAuthenticator(jwks, issuer=ISSUER, audience=AUDIENCE)
    return LocalNode.start(tmp_path, authenticator=auth)


async def session(peer: RawPeer, tok: str, tenant: str = "") -> tuple[int, dict[str, Any]]:
    sid = peer.new_stream()
    peer.send(
        sid,
        wire.encode_message(
            {"type": "auth", "tenant_id": tenant, "token": tok, "client_flags": wire.FLAGS_ALL}
        ),
    )
    (first,) = await peer.frames_on(sid, 1)
    return sid, wire.decode_message(first)


def received(peer: RawPeer) -> bytes:
    """Every frame the peer was sent, on every stream."""
    return b"".join(f.to_bytes() for frames in peer.frames.values() for f in frames)


class Requests:
    """Extension requests on one session, answered by request id."""

    def __init__(self, peer: RawPeer, sid: int) -> None:
        self.peer = peer
        self.sid = sid
        self.next_id = 100
        self.sent = 0

    def send(self, encode: Any, *args: Any, **kwargs: Any) -> int:
        self.next_id += 1
        self.peer.send(self.sid, encode(self.next_id, *args, **kwargs))
        self.sent += 1
        return self.next_id

    async def replies(self) -> dict[int, wire.ExtMessage]:
        frames = await self.peer.frames_on(self.sid, 1 + self.sent, timeout=15)
        out: dict[int, wire.ExtMessage] = {}
        for frame in frames[1:]:
            if frame.flags == wire.FLAG_FELIX_EXT:
                msg = wire.decode_ext(frame)
                out[msg.request_id] = msg
        return out

    def every_op(self, tenant: str, ns: str, name: str) -> list[int]:
        """Publish, subscribe and the four cache calls on ``tenant/ns/name``."""
        return [
            self.send(wire.encode_publish, tenant, ns, name, [b"from-a"]),
            self.send(wire.encode_subscribe, tenant, ns, name, self.next_id + 1, credit=10),
            self.send(wire.encode_cache_get, tenant, ns, name, B_KEY),
            self.send(wire.encode_cache_set, tenant, ns, name, B_KEY, b"from-a"),
            self.send(wire.encode_cache_delete, tenant, ns, name, B_KEY),
            self.send(wire.encode_cache_ttl, tenant, ns, name, B_KEY),
        ]


async def v1_request(peer: RawPeer, sid: int, msg: dict[str, Any] | bytes) -> dict[str, Any]:
    """Send one v1 request (JSON, or a binary publish batch) and return its answer."""
    before = len(peer.frames[sid])
    peer.send(sid, msg if isinstance(msg, bytes) else wire.encode_message(msg))
    frames = await peer.frames_on(sid, before + 1)
    return wire.decode_message(frames[before])


async def b_writes(n: LocalNode) -> tuple[RawPeer, int]:
    """B publishes to its stream and sets a value in its cache."""
    peer = await raw_connect(n.host, n.port, n.ca_file)
    sid, reply = await session(peer, token(B))
    assert reply["type"] == "auth_ok"
    peer.send(sid, wire.encode_publish(1, B, B_NS, B_STREAM, [B_PAYLOAD]))
    peer.send(sid, wire.encode_cache_set(2, B, B_NS, B_CACHE, B_KEY, B_VALUE))
    frames = await peer.frames_on(sid, 3)
    published = wire.decode_ext(frames[1])
    assert isinstance(published, wire.PublishOffsets) and published.base_offset == 0
    return peer, sid


async def b_data_is_intact(peer: RawPeer, sid: int) -> None:
    """B's value is unchanged and its stream holds its one record (the next is offset 1)."""
    peer.send(sid, wire.encode_cache_get(3, B, B_NS, B_CACHE, B_KEY))
    peer.send(sid, wire.encode_publish(4, B, B_NS, B_STREAM, [B_PAYLOAD]))
    frames = await peer.frames_on(sid, 5)
    value, offsets = (wire.decode_ext(f) for f in frames[3:5])
    assert isinstance(value, wire.CacheValue) and value.value == B_VALUE
    assert isinstance(offsets, wire.PublishOffsets) and offsets.base_offset == 1


def test_extension_requests_naming_another_tenant_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with node(tmp_path) as n:
            b_peer, b_sid = await b_writes(n)
            peer = await raw_connect(n.host, n.port, n.ca_file)
            sid, reply = await session(peer, token(A))
            assert reply["type"] == "auth_ok"
            req = Requests(peer, sid)
            other_tenant: list[int] = []
            bad_names: list[int] = []
            for tenant in TENANT_TRICKS:
                other_tenant += req.every_op(tenant, B_NS, B_STREAM)
                other_tenant += req.every_op(tenant, "prod", "orders")
            for name in NAME_TRICKS:
                bad_names += req.every_op(A, name, "orders")
                bad_names += req.every_op(A, "prod", name)
            # Cache keys are free-form: a key that looks like B's path is a key of A's.
            key_get = req.send(wire.encode_cache_get, A, "prod", "c", f"../../{B}/{B_NS}/x")
            ping = req.send(wire.encode_ping)
            own = req.send(wire.encode_publish, A, "prod", "orders", [b"mine"])
            replies = await req.replies()
            for rid in other_tenant:
                denied = replies[rid]
                assert isinstance(denied, wire.ErrorReply), rid
                # The same answer whether or not the target exists: no oracle.
                assert (denied.code, denied.message) == (3, "this session belongs to tenant 'acme'")
            for rid in bad_names:
                refused = replies[rid]
                assert isinstance(refused, wire.ErrorReply) and refused.code == 1, rid
                assert "invalid" in refused.message and len(refused.message) < 400
            miss = replies[key_get]
            assert isinstance(miss, wire.CacheValue) and miss.value is None
            assert replies[ping].opcode == wire.OP_OK
            assert isinstance(replies[own], wire.PublishOffsets)
            assert peer.close_reason is None and sid not in peer.ended
            # No subscription was made, no event stream opened.
            assert set(peer.frames) == {sid}
            assert_no_secrets(received(peer))
            await b_data_is_intact(b_peer, b_sid)
            peer.close()
            b_peer.close()

    run(main)


def test_v1_frames_naming_another_tenant_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with node(tmp_path) as n:
            b_peer, b_sid = await b_writes(n)
            peer = await raw_connect(n.host, n.port, n.ca_file)
            sid, reply = await session(peer, token(A))
            assert reply["type"] == "auth_ok"
            where = {"namespace": B_NS}
            for tenant in TENANT_TRICKS:
                names = {"tenant_id": tenant, **where}
                for msg in (
                    {"type": "publish", **names, "stream": B_STREAM, "payload": b"x"},
                    {"type": "publish_batch", **names, "stream": B_STREAM, "payloads": [b"x"]},
                    {"type": "subscribe", **names, "stream": B_STREAM},
                    {"type": "cache_get", **names, "cache": B_CACHE, "key": B_KEY},
                    {
                        "type": "cache_put",
                        **names,
                        "cache": B_CACHE,
                        "key": B_KEY,
                        "value": b"from-a",
                        "ttl_ms": None,
                    },
                    wire.encode_publish_batch(
                        tenant, B_NS, B_STREAM, [b"x"], request_id=9, ack="per_batch"
                    ),
                ):
                    answer = await v1_request(peer, sid, msg)
                    assert answer == {
                        "type": "error",
                        "message": "this session belongs to tenant 'acme'",
                    }, (tenant[:20], msg if isinstance(msg, dict) else "binary")
            for name in NAME_TRICKS:
                for names in (
                    {"tenant_id": A, "namespace": name, "stream": "orders"},
                    {"tenant_id": A, "namespace": "prod", "stream": name},
                ):
                    answer = await v1_request(peer, sid, {"type": "subscribe", **names})
                    assert answer["type"] == "error" and "invalid" in answer["message"]
            answer = await v1_request(
                peer, sid, {"type": "publish", "tenant_id": A, "namespace": "prod",
                            "stream": "orders", "payload": b"mine", "request_id": 1}
            )  # fmt: skip
            assert answer == {"type": "publish_ok", "request_id": 1}
            assert peer.close_reason is None
            assert set(peer.frames) == {sid}  # no event stream for any refused subscribe
            assert_no_secrets(received(peer))
            await b_data_is_intact(b_peer, b_sid)
            peer.close()
            b_peer.close()

    run(main)


def test_a_connection_stays_in_the_tenant_of_its_first_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with node(tmp_path) as n:
            # More failures than one connection may make, without back-off delays.
            n.gateway.auth_limiter = FailureLimiter(free_failures=1000)
            n.gateway.limits = dataclasses.replace(
                n.gateway.limits, max_auth_failures_per_connection=1000
            )
            peer = await raw_connect(n.host, n.port, n.ca_file)
            sid, reply = await session(peer, token(A))
            assert reply["type"] == "auth_ok"
            # Another session on the same connection with B's (valid) token.
            _, reply = await session(peer, token(B))
            assert reply["type"] == "error" and "belongs to tenant 'acme'" in reply["message"]
            # A's token naming another tenant in the auth frame.
            for tenant in TENANT_TRICKS:
                if tenant in ("", A):
                    continue
                _, reply = await session(peer, token(A), tenant)
                assert reply["type"] == "error" and "unauthenticated" in reply["message"]
            # A token claiming B (or a name that tries to reach it), signed with A's key.
            for tid in TID_TRICKS:
                _, reply = await session(peer, forged_for_b(tid))
                assert reply["type"] == "error" and "unauthenticated" in reply["message"]
            # REAUTH with B's token, or the forged one, on A's session.
            peer.send(sid, wire.encode_reauth(1, token(B)))
            peer.send(sid, wire.encode_reauth(2, forged_for_b()))
            peer.send(sid, wire.encode_ping(3))
            frames = await peer.frames_on(sid, 4)
            first, second, pong = (wire.decode_ext(f) for f in frames[1:])
            assert isinstance(first, wire.ErrorReply) and first.code == 4
            assert isinstance(second, wire.ErrorReply) and second.code == 4
            assert pong.opcode == wire.OP_OK
            # A second auth message on the authenticated session is no way in either.
            again = {"type": "auth", "tenant_id": B, "token": token(B)}
            answer = await v1_request(peer, sid, again)
            assert answer["type"] == "error" and "not a request" in answer["message"]
            # The session is still A's: B's resources stay out of reach.
            peer.send(sid, wire.encode_cache_get(4, B, B_NS, B_CACHE, B_KEY))
            denied = wire.decode_ext((await peer.frames_on(sid, 6))[5])
            assert isinstance(denied, wire.ErrorReply) and denied.code == 3
            assert peer.close_reason is None
            # A fresh connection with the forged token gets nothing either.
            other = await raw_connect(n.host, n.port, n.ca_file)
            _, reply = await session(other, forged_for_b(), B)
            assert reply["type"] == "error"
            peer.close()
            other.close()

    run(main)


def test_same_names_in_two_tenants_never_meet(tmp_path: Path) -> None:
    async def main() -> None:
        async with node(tmp_path) as n:
            a = await raw_connect(n.host, n.port, n.ca_file)
            a_sid, _ = await session(a, token(A))
            b = await raw_connect(n.host, n.port, n.ca_file)
            b_sid, _ = await session(b, token(B))
            a.send(a_sid, wire.encode_subscribe(1, A, "prod", "orders", 1, credit=100))
            await a.frames_on(a_sid, 2)
            b.send(b_sid, wire.encode_publish(1, B, "prod", "orders", [B_PAYLOAD]))
            b.send(b_sid, wire.encode_cache_set(2, B, "prod", "c", "k", B_VALUE))
            await b.frames_on(b_sid, 3)
            a.send(a_sid, wire.encode_cache_get(2, A, "prod", "c", "k"))
            a.send(a_sid, wire.encode_publish(3, A, "prod", "orders", [b"mine"]))
            frames = await a.frames_on(a_sid, 4)
            value = wire.decode_ext(frames[2])
            assert isinstance(value, wire.CacheValue) and value.value is None
            # A's subscriber gets A's record, and only it.
            (events_sid,) = [s for s in a.frames if s != a_sid]
            await a.wait_for(lambda: b"mine" in received(a))
            await asyncio.sleep(0.1)
            assert_no_secrets(received(a))
            assert is_server_initiated(events_sid) and is_unidirectional(events_sid)
            a.close()
            b.close()

    run(main)


# -- management ------------------------------------------------------------------------------

ADMIN = "isolation-admin-token"
B_RESOURCES: list[tuple[ResourceKind, tuple[str, ...], dict[str, Any]]] = [
    (ResourceKind.TENANT, (B,), {}),
    (ResourceKind.NAMESPACE, (B, B_NS), {}),
    (ResourceKind.STREAM, (B, B_NS, B_STREAM), {"durable": True}),
    (ResourceKind.GROUP, (B, B_NS, B_STREAM, "gxsecretgroup"), {}),
    (ResourceKind.CACHE, (B, B_NS, B_CACHE), {}),
    (
        ResourceKind.ISSUER,
        (B, "gxsecretidp"),
        {
            "issuer": "https://gxsecret-idp.example",
            "audience": "felix-api",
            "algorithms": ["RS256"],
            "jwks_url": "https://gxsecret-idp.example/keys",
        },
    ),
    (ResourceKind.POLICY, (B, "gxsecretpolicy"), {"permissions": [f"tenant.manage:tenant:{B}"]}),
    (
        ResourceKind.BINDING,
        (B, "gxsecretbinding"),
        {"subject": "group:eng", "policies": ["gxsecretpolicy"]},
    ),
    (
        ResourceKind.BRIDGE,
        (B, "gxsecretbridge"),
        {
            "source_stream": f"{B_NS}/{B_STREAM}",
            "target_url": "felix://gxsecret-target.example:5000",
            "target_region": "gxsecret-region",
            "target_stream": "gxsecretns/gxsecretcopy",
        },
    ),
]
A_RESOURCES: list[tuple[ResourceKind, tuple[str, ...], dict[str, Any]]] = [
    (ResourceKind.TENANT, (A,), {}),
    (ResourceKind.NAMESPACE, (A, "prod"), {}),
    (ResourceKind.STREAM, (A, "prod", "orders"), {}),
    (ResourceKind.CACHE, (A, "prod", "sessions"), {}),
    (
        ResourceKind.ISSUER,
        (A, "okta"),
        {"issuer": IDP, "audience": "felix-api", "algorithms": ["RS256"], "jwks_url": JWKS_URL},
    ),
    (ResourceKind.POLICY, (A, "pubs"), {"permissions": [f"stream.publish:stream:{A}/prod/*"]}),
    (ResourceKind.BINDING, (A, "eng"), {"subject": "group:eng", "policies": ["pubs"]}),
]
#: Path parameters naming B's resources.
B_PARAMS = {
    "tenant": B,
    "ns": B_NS,
    "stream": B_STREAM,
    "cache": B_CACHE,
    "issuer": "gxsecretidp",
    "policy": "gxsecretpolicy",
    "binding": "gxsecretbinding",
    "group": "gxsecretgroup",
    "bridge": "gxsecretbridge",
}
#: A token allowed everything in A (management and RBAC).
A_ALL = ["tenant.manage:tenant:acme", "rbac.manage:tenant:acme", "bridge.manage:bridge:acme/*"]


@asynccontextmanager
async def control(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    keys_dir = tmp_path / "auth"
    for ring in RINGS.values():
        save_ring(keys_dir, ring, time.time())
    store = MemoryStore()
    await store.open()
    for kind, path, spec in A_RESOURCES + B_RESOURCES:
        await store.create(kind, path, spec)
    app = create_app(
        store, keys_dir=keys_dir, admin_token=ADMIN, require_auth=True, fetch_jwks=IdP().fetch
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        yield http, app
    await store.close()


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def operations(app: Any) -> Iterator[tuple[str, str]]:
    """(method, path template) of every /v1 operation, as the OpenAPI document lists them."""
    for path, ops in app.openapi()["paths"].items():
        for method in sorted(ops):
            yield method.upper(), path


def body_for(method: str, template: str) -> dict[str, Any] | None:
    if method == "POST" and not template.endswith("/token/exchange"):
        return {"name": "fromacme"}
    return {} if method in ("PATCH", "POST") else None


def test_every_management_operation_on_another_tenant_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path) as (http, app):
            headers = bearer(token(A, A_ALL))
            tried = 0
            for method, template in operations(app):
                if "{tenant}" not in template:
                    continue
                if template.endswith("/.well-known/jwks.json"):
                    continue  # public keys, public by design (brokers and clients fetch them)
                url = template.format(**B_PARAMS)
                r = await http.request(
                    method, url, json=body_for(method, template), headers=headers
                )
                expected = 401 if ROUTE_ACCESS[template] == Access.PUBLIC else 403
                assert r.status_code == expected, (method, url, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert_no_secrets(r.text)
                tried += 1
            # 8 collections x 2 + 8 items x 3, the tenant x 3, the exchange, and the node's
            # view of a stream and of a cache (GET /v1/node/streams|caches/...).
            assert tried == 46
            # B is exactly as it was: nothing created, changed or deleted.
            admin = bearer(ADMIN)
            snap = (await http.get("/v1/snapshot", headers=admin)).json()
            b_paths = sorted(tuple(res["path"]) for res in snap["resources"] if res["path"][0] == B)
            assert b_paths == sorted(path for _, path, _ in B_RESOURCES)
            assert all(res["version"] == 1 for res in snap["resources"])

    run(main)


def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def test_path_tricks_reach_nothing_of_another_tenant(tmp_path: Path) -> None:
    tricks = [t for t in TENANT_TRICKS if t not in ("", A)] + [
        "%2e%2e%2fglobex",
        "acme%2f..%2fglobex",
        "acme/../globex",
        "./globex",
    ]

    async def main() -> None:
        async with control(tmp_path) as (http, _app):
            headers = bearer(token(A, A_ALL))
            for trick in tricks:
                for raw in (quoted(trick), trick.replace("\x00", "%00").replace("\n", "%0A")):
                    for suffix in ("", "/namespaces", "/namespaces/prod/streams", "/policies"):
                        url = f"/v1/tenants/{raw}{suffix}"
                        for method in ("GET", "PATCH", "DELETE", "POST"):
                            body = {"name": "x"} if method == "POST" else {}
                            r = await http.request(method, url, json=body, headers=headers)
                            assert r.status_code in (400, 403, 404, 405), (method, url, r.text)
                            assert_no_secrets(r.text)
            # Tricks in A's own names stay inside A (and are refused as names).
            for trick in ("..", "*", "%2e%2e", "\uff42", "x" * 10_000):
                url = f"/v1/tenants/{A}/namespaces/{quoted(trick)}/streams"
                r = await http.post(url, json={"name": "s"}, headers=headers)
                assert r.status_code in (400, 403, 404), (url[:80], r.text)
                assert_no_secrets(r.text)
                r = await http.post(
                    f"/v1/tenants/{A}/namespaces", json={"name": trick}, headers=headers
                )
                assert r.status_code in (400, 422), r.text
            # Nothing was created anywhere.
            snap = (await http.get("/v1/snapshot", headers=bearer(ADMIN))).json()
            assert len(snap["resources"]) == len(A_RESOURCES) + len(B_RESOURCES)

    run(main)


def test_lists_and_shared_routes_show_only_the_callers_tenant(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path) as (http, _app):
            headers = bearer(token(A, A_ALL))
            for url, names in [
                (f"/v1/tenants/{A}/namespaces", ["prod"]),
                (f"/v1/tenants/{A}/namespaces/prod/streams", ["orders"]),
                (f"/v1/tenants/{A}/namespaces/prod/caches", ["sessions"]),
                (f"/v1/tenants/{A}/issuers", ["okta"]),
                (f"/v1/tenants/{A}/policies", ["pubs"]),
                (f"/v1/tenants/{A}/bindings", ["eng"]),
            ]:
                r = await http.get(url, headers=headers)
                assert r.status_code == 200, r.text
                assert [item["name"] for item in r.json()["items"]] == names
                assert B not in r.text
                assert_no_secrets(r.text)
            # Every-tenant views are the admin's alone.
            for url in ("/v1/tenants", "/v1/snapshot", "/v1/changes", "/v1/changes?since=0&wait=0"):
                r = await http.get(url, headers=headers)
                assert r.status_code == 403, r.text
                assert B not in r.text
                assert_no_secrets(r.text)
            # Routes any token may read name no tenant.
            for url in ("/v1/system/info", "/v1/regions", "/v1/problems/not-found"):
                r = await http.get(url, headers=headers)
                assert r.status_code == 200, r.text
                assert B not in r.text and A not in r.text

    run(main)


def test_a_refusal_never_tells_whether_the_resource_exists(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path) as (http, _app):
            headers = bearer(token(A, A_ALL))
            answers = set()
            for url in (
                f"/v1/tenants/{B}/namespaces/{B_NS}",  # exists
                f"/v1/tenants/{B}/namespaces/nothere",  # does not
                f"/v1/tenants/{B}",
                f"/v1/tenants/{B}/policies/gxsecretpolicy",
                f"/v1/tenants/{B}/policies/nothere",
            ):
                r = await http.get(url, headers=headers)
                answers.add((r.status_code, r.text))
            assert len(answers) == 1
            (status, text), *_ = answers
            assert status == 403
            # A tenant that does not exist at all answers the same way.
            r = await http.get("/v1/tenants/initech/namespaces/prod", headers=headers)
            assert (r.status_code, r.text.replace("initech", B)) == (status, text)

    run(main)


def test_tokens_of_one_tenant_buy_nothing_in_another(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path) as (http, _app):
            # A's identity-provider token, exchanged at A: fine.
            alice = idp_token(sub="alice", groups=["eng"])
            r = await http.post(f"/v1/tenants/{A}/token/exchange", headers=bearer(alice))
            assert r.status_code == 200, r.text
            assert read_unverified_claims(r.json()["access_token"])["tid"] == A
            # The same token at B (which trusts another issuer, and binds group:eng): 401.
            r = await http.post(f"/v1/tenants/{B}/token/exchange", headers=bearer(alice))
            assert r.status_code == 401, r.text
            assert_no_secrets(r.text)
            # A's Felix token, or one claiming B signed with A's key, as the IdP token: 401.
            for tok in (token(A, A_ALL), forged_for_b()):
                r = await http.post(f"/v1/tenants/{B}/token/exchange", headers=bearer(tok))
                assert r.status_code == 401, r.text
                assert_no_secrets(r.text)
            # Forged tokens on B's management routes: 401, not 403 (they do not verify).
            for tid in TID_TRICKS:
                forged = bearer(forged_for_b(tid))
                for url in (f"/v1/tenants/{B}", f"/v1/tenants/{B}/namespaces/{B_NS}/streams"):
                    r = await http.get(url, headers=forged)
                    assert r.status_code == 401, r.text
                    assert_no_secrets(r.text)

    run(main)


def test_a_policy_of_one_tenant_cannot_grant_another(tmp_path: Path) -> None:
    stolen = [
        f"stream.publish:stream:{B}/{B_NS}/*",
        f"tenant.manage:tenant:{B}",
        "stream.publish:stream:*/prod/*",
        "tenant.manage:tenant:*",
        f"cache.read:cache:{A}/../{B}/c",
        f"ns.manage:namespace:{A}%2F..%2F{B}/x",
        "stream.publish:stream:\uff47lobex/prod/*",
    ]

    async def main() -> None:
        async with control(tmp_path) as (http, _app):
            headers = bearer(token(A, A_ALL))
            for perm in stolen:
                body = {"name": "steal", "permissions": [perm]}
                r = await http.post(f"/v1/tenants/{A}/policies", json=body, headers=headers)
                assert r.status_code in (400, 422), (perm, r.text)
                patch = {"permissions": [perm]}
                r = await http.patch(f"/v1/tenants/{A}/policies/pubs", json=patch, headers=headers)
                assert r.status_code in (400, 422), (perm, r.text)
            r = await http.get(f"/v1/tenants/{A}/policies/pubs", headers=headers)
            assert r.json()["spec"]["permissions"] == [f"stream.publish:stream:{A}/prod/*"]
            assert (
                await http.get(f"/v1/tenants/{A}/policies/steal", headers=headers)
            ).status_code == 404
            # A binding naming B's policy grants nothing: policies are looked up in A.
            body = {"name": "b-policy", "subject": "group:eng", "policies": ["gxsecretpolicy"]}
            r = await http.post(f"/v1/tenants/{A}/bindings", json=body, headers=headers)
            if r.status_code == 201:
                alice = idp_token(sub="alice", groups=["eng"])
                r = await http.post(f"/v1/tenants/{A}/token/exchange", headers=bearer(alice))
                assert r.status_code == 200, r.text
                perms = read_unverified_claims(r.json()["access_token"])["perms"]
                assert perms == [f"stream.publish:stream:{A}/prod/*"]
            else:
                assert r.status_code in (400, 404, 422), r.text

    run(main)


# -- metrics ---------------------------------------------------------------------------------


def test_node_metrics_carry_no_tenant_labels_or_names(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    for ring in RINGS.values():
        save_ring(data_dir / "auth", ring, time.time())
    n = NodeProcess(data_dir, "--auth", gateways=1, shards=2)
    try:

        async def traffic() -> None:
            a = await raw_connect(n.host, n.port, n.ca_file)
            a_sid, reply = await session(a, token(A))
            assert reply["type"] == "auth_ok", reply
            b = await raw_connect(n.host, n.port, n.ca_file)
            b_sid, reply = await session(b, token(B))
            assert reply["type"] == "auth_ok", reply
            b.send(b_sid, wire.encode_publish(1, B, B_NS, B_STREAM, [B_PAYLOAD]))
            b.send(b_sid, wire.encode_cache_set(2, B, B_NS, B_CACHE, B_KEY, B_VALUE))
            a.send(a_sid, wire.encode_publish(1, B, B_NS, B_STREAM, [b"x"]))  # denied
            a.send(a_sid, wire.encode_publish(2, A, "prod", "orders", [b"mine"]))
            await b.frames_on(b_sid, 3)
            await a.frames_on(a_sid, 3)
            await session(a, forged_for_b())  # an auth failure
            a.close()
            b.close()

        run(traffic)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            n.metric("felix_auth_failures_total") < 1
            or n.metric("felix_messages_published_total") < 2
        ):
            time.sleep(0.2)  # each child reports every second, on its own schedule
        status, text = n.http("/metrics")
        assert status == 200
        assert n.metric("felix_auth_failures_total") >= 1
        assert n.metric("felix_permission_denials_total") >= 1  # A's publish to B
        assert n.metric("felix_messages_published_total") >= 2
        labels = set()
        for line in text.splitlines():
            if line.startswith("#") or "{" not in line:
                continue
            if line.startswith("felix_node_info{"):
                # The node's own region and version: nothing a tenant chooses.
                assert line.startswith('felix_node_info{region="local",version="'), line
                continue
            inside = line[line.index("{") + 1 : line.rindex("}")]
            labels |= {pair.split("=", 1)[0] for pair in inside.split(",") if pair}
        assert labels == {"role", "index"}
        for name in (A, B, B_NS, B_STREAM, B_CACHE, "tenant", "prod", "orders"):
            assert name not in text, name
        assert_no_secrets(text)
    finally:
        n.stop()


def test_metrics_export_only_known_stats_whatever_a_child_reports() -> None:
    """A child's stats become metrics only through a fixed table: no label comes from data."""
    child = SimpleNamespace(
        role="gateway",
        index=0,
        restarts=0,
        stats={"requests": 5, f"tenant:{B}": 3, f"{B}_requests": 4, "streams": 2},
    )
    node = SimpleNamespace(
        children=[child], readiness=lambda: (True, []), supervisor_counters=lambda: []
    )
    server = HealthServer(node)
    status, _, body = server._route("GET", "/metrics")
    text = body.decode()
    assert status == "200 OK"
    assert 'felix_requests_total{index="0",role="gateway"} 5.0' in text
    assert 'felix_streams{index="0",role="gateway"} 2.0' in text
    assert B not in text and "tenant" not in text


# -- the documented contract -----------------------------------------------------------------


def test_openapi_declares_bearer_auth_and_its_problems() -> None:
    schema = create_app(MemoryStore(), require_auth=True).openapi()
    scheme = schema["components"]["securitySchemes"]["bearer"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, ops in schema["paths"].items():
        rule = ROUTE_ACCESS[path]
        for method, op in ops.items():
            responses = op["responses"]
            if rule == Access.PUBLIC:
                assert "security" not in op, (method, path)
                continue
            assert op["security"] == [{"bearer": []}], (method, path)
            assert responses["401"]["content"]["application/problem+json"]["schema"] == problem
            assert "WWW-Authenticate" in responses["401"]["headers"]
            if rule == Access.ANY:
                assert "403" not in responses, (method, path)
            else:
                assert responses["403"]["content"]["application/problem+json"]["schema"] == problem
    json.dumps(schema)  # still plain JSON
