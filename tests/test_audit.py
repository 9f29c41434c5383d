"""The audit log (felix/audit.py): the lines the control API and the gateway write.

Lines are captured from the ``felix.audit`` logger with a bare ``%(message)s``
handler, as an operator's handler would see them, parsed as JSON and compared
whole (but for ``ts``). Every test also checks that no token and no payload it
sent appears anywhere in the captured output.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from felix import audit, wire
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.control.api import create_app
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.gateway.auth import TokenAuthenticator
from felix.node.local import LocalNode
from tests.aio import run
from tests.rawquic import raw_connect
from tests.test_control_api_auth import ADMIN, Keys, bearer
from tests.test_control_auth import IdP, configure, idp_token

pytestmark = pytest.mark.timeout(60)

PAYLOAD = b"PAYLOAD-d41d8cd98f00b204"


class Captured:
    """What the ``felix.audit`` logger wrote, as an operator's bare handler would."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.text.splitlines():
            line = json.loads(raw)
            assert isinstance(line.pop("ts"), str)
            out.append(line)
        return out

    def clear(self) -> None:
        self.stream.seek(0)
        self.stream.truncate()

    def assert_clean(self, *secrets: str | bytes) -> None:
        for secret in secrets:
            text = secret.decode() if isinstance(secret, bytes) else secret
            assert text not in self.text
            # Not even a large piece of it (a signature, a payload's middle).
            assert text[len(text) // 3 : len(text) // 3 + 24] not in self.text


@pytest.fixture
def captured() -> Iterator[Captured]:
    cap = Captured()
    handler = logging.StreamHandler(cap.stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(audit.LOGGER_NAME)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    audit._budget = audit._Budget(audit.MAX_LINES_PER_SECOND)
    try:
        yield cap
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@asynccontextmanager
async def api(keys: Keys, idp: IdP | None = None) -> AsyncIterator[httpx.AsyncClient]:
    store = MemoryStore()
    await store.open()
    for kind, path in (
        (ResourceKind.TENANT, ("acme",)),
        (ResourceKind.NAMESPACE, ("acme", "prod")),
        (ResourceKind.TENANT, ("globex",)),
    ):
        await store.create(kind, path, {})
    app = create_app(
        store,
        keys_dir=keys.directory,
        admin_token=ADMIN,
        require_auth=True,
        fetch_jwks=idp.fetch if idp else None,
    )
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4242))
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        yield http
    await store.close()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "auth")


def test_management_changes_are_logged_with_who_what_and_result(
    keys: Keys, captured: Captured
) -> None:
    async def main() -> None:
        async with api(keys) as http:
            admin = bearer(ADMIN)
            body = {"name": "orders", "retention_bytes": 1 << 20}
            r = await http.post(
                "/v1/tenants/acme/namespaces/prod/streams", json=body, headers=admin
            )
            assert r.status_code == 201, r.text
            r = await http.post(
                "/v1/tenants/acme/namespaces/prod/streams", json=body, headers=admin
            )
            assert r.status_code == 409
            tok = keys.token("acme", "rbac.manage:tenant:acme")
            policy = {"name": "pubs", "permissions": ["stream.publish:stream:acme/prod/*"]}
            r = await http.post("/v1/tenants/acme/policies", json=policy, headers=bearer(tok))
            assert r.status_code == 201, r.text
            r = await http.delete("/v1/tenants/acme/policies/pubs", headers=bearer(tok))
            assert r.status_code == 200, r.text
            r = await http.patch(
                "/v1/tenants/acme/namespaces/prod/streams/orders",
                json={"durable": "yes"},  # schema violation: 422, never reaches the store
                headers=admin,
            )
            assert r.status_code == 422
            # Reads are not management changes: nothing logged for them.
            r = await http.get("/v1/tenants/acme/namespaces/prod/streams", headers=admin)
            assert r.status_code == 200
            assert captured.lines() == [
                {
                    "event": "management",
                    "who": "admin",
                    "tenant": "acme",
                    "action": "stream.create",
                    "object": "stream:acme/prod/orders",
                    "result": "ok",
                    "source": "203.0.113.7",
                },
                {
                    "event": "management",
                    "who": "admin",
                    "tenant": "acme",
                    "action": "stream.create",
                    "object": "stream:acme/prod/orders",
                    "result": "failed",
                    "source": "203.0.113.7",
                    "reason": "already-exists",
                    "detail": "stream acme/prod/orders already exists",
                },
                {
                    "event": "management",
                    "who": "svc",
                    "tenant": "acme",
                    "action": "policy.create",
                    "object": "policy:acme/pubs",
                    "result": "ok",
                    "source": "203.0.113.7",
                },
                {
                    "event": "management",
                    "who": "svc",
                    "tenant": "acme",
                    "action": "policy.delete",
                    "object": "policy:acme/pubs",
                    "result": "ok",
                    "source": "203.0.113.7",
                },
                {
                    "event": "management",
                    "who": "admin",
                    "tenant": "acme",
                    "action": "PATCH /v1/tenants/{tenant}/namespaces/{ns}/streams/{stream}",
                    "object": "stream:acme/prod/orders",
                    "result": "failed",
                    "source": "203.0.113.7",
                    "reason": "validation-error",
                    "detail": "body.durable: Input should be a valid boolean",
                },
            ]
            captured.assert_clean(ADMIN, tok)

    run(main)


def test_a_401_is_logged_without_the_credential(keys: Keys, captured: Captured) -> None:
    async def main() -> None:
        async with api(keys) as http:
            stranger = TenantKeyRing.create("acme", time.time())
            forged = stranger.mint(
                time.time(),
                issuer="felix",
                audience="felix",
                sub="mallory",
                perms=PermissionSet("acme", ["tenant.manage:tenant:acme"]),
            )
            r = await http.delete("/v1/tenants/acme", headers=bearer(forged))
            assert r.status_code == 401
            r = await http.get("/v1/tenants", headers=bearer(ADMIN + "-wrong"))
            assert r.status_code == 401
            first, second = captured.lines()
            assert first == {
                "event": "auth",
                "who": "anonymous",
                "tenant": "acme",
                "action": "DELETE /v1/tenants/{tenant}",
                "object": "tenant:acme",
                "result": "denied",
                "source": "203.0.113.7",
                "reason": "unauthenticated",
                "detail": first["detail"],
            }
            assert "unknown key" in first["detail"]
            assert second == {
                "event": "auth",
                "who": "anonymous",
                "tenant": None,
                "action": "GET /v1/tenants",
                "object": "/v1/tenants",
                "result": "denied",
                "source": "203.0.113.7",
                "reason": "unauthenticated",
                "detail": second["detail"],
            }
            captured.assert_clean(forged, ADMIN)

    run(main)


def test_a_403_is_logged_with_the_callers_tenant(keys: Keys, captured: Captured) -> None:
    async def main() -> None:
        async with api(keys) as http:
            tok = keys.token("acme", "tenant.manage:tenant:acme")
            r = await http.patch("/v1/tenants/globex", json={}, headers=bearer(tok))
            assert r.status_code == 403
            r = await http.get("/v1/snapshot", headers=bearer(tok))
            assert r.status_code == 403
            assert captured.lines() == [
                {
                    "event": "permission",
                    "who": "svc",
                    "tenant": "globex",
                    "action": "PATCH /v1/tenants/{tenant}",
                    "object": "tenant:globex",
                    "result": "denied",
                    "who_tenant": "acme",
                    "source": "203.0.113.7",
                    "reason": "permission-denied",
                    "detail": "the token is for tenant acme, not globex",
                },
                {
                    "event": "permission",
                    "who": "svc",
                    "tenant": None,
                    "action": "GET /v1/snapshot",
                    "object": "/v1/snapshot",
                    "result": "denied",
                    "who_tenant": "acme",
                    "source": "203.0.113.7",
                    "reason": "permission-denied",
                    "detail": "only the admin token may do this",
                },
            ]
            captured.assert_clean(tok)

    run(main)


def test_token_exchange_logs_issuer_and_subject_never_tokens(
    keys: Keys, captured: Captured
) -> None:
    async def main() -> None:
        idp = IdP()
        async with api(keys, idp) as http:
            # configure() creates issuer okta, policy publishers and binding eng in acme.
            configure_calls = httpx.AsyncClient(
                transport=http._transport, base_url="http://control", headers=bearer(ADMIN)
            )
            async with configure_calls:
                await configure(configure_calls)
            captured.clear()
            good = idp_token(sub="alice")
            r = await http.post("/v1/tenants/acme/token/exchange", headers=bearer(good))
            assert r.status_code == 200, r.text
            minted = r.json()["access_token"]
            expired = idp_token(sub="alice", exp_in=-3600)
            r = await http.post("/v1/tenants/acme/token/exchange", headers=bearer(expired))
            assert r.status_code == 401
            nobody = idp_token(sub="bob", groups=[])
            r = await http.post("/v1/tenants/acme/token/exchange", headers=bearer(nobody))
            assert r.status_code == 403
            ok, bad, empty = captured.lines()
            base = {
                "event": "auth",
                "tenant": "acme",
                "action": "token.exchange",
                "object": "issuer:https://idp.example",
                "source": "203.0.113.7",
            }
            assert ok == {**base, "who": "alice", "result": "ok"}
            assert bad == {
                **base,
                "who": "anonymous",
                "result": "denied",
                "reason": "unauthenticated",
                "detail": bad["detail"],
            }
            assert "expired" in bad["detail"]
            assert empty == {
                **base,
                "who": "bob",
                "result": "denied",
                "reason": "permission-denied",
                "detail": "bob is granted no permissions in tenant acme",
            }
            captured.assert_clean(good, expired, nobody, minted, ADMIN)

    run(main)


# -- the gateway --------------------------------------------------------------------------

RING = TenantKeyRing.create("acme", time.time())


def felix_token(perms: list[str], ring: TenantKeyRing = RING, ttl: int = 300) -> str:
    return ring.mint(
        time.time(),
        issuer="felix",
        audience="felix",
        sub="alice",
        perms=PermissionSet(ring.tenant, perms),
        ttl=ttl,
    )


def gateway_node(tmp_path: Path) -> Any:
    def jwks(tenant: str, now: float) -> dict[str, Any] | None:
        return RING.jwks(time.time()) if tenant == "acme" else None

    auth = TokenAuthenticator(jwks, issuer="felix", audience="felix", leeway=0.0)
    return LocalNode.start(tmp_path, authenticator=auth)


def auth_frame(token: str, tenant: str = "") -> bytes:
    return wire.encode_message(
        {"type": "auth", "tenant_id": tenant, "token": token, "client_flags": wire.FLAGS_ALL}
    )


def test_gateway_auth_failures_and_permission_denials(tmp_path: Path, captured: Captured) -> None:
    forged = felix_token(["stream.publish:stream:acme/prod/*"], TenantKeyRing.create("acme", 0))
    good = felix_token(["stream.publish:stream:acme/prod/*"])

    async def main() -> None:
        async with gateway_node(tmp_path) as n:
            peer = await raw_connect(n.host, n.port, n.ca_file)
            sid = peer.new_stream()
            peer.send(sid, auth_frame(forged, "acme"))
            (reply,) = await peer.frames_on(sid, 1)
            assert wire.decode_message(reply)["type"] == "error"
            sid = peer.new_stream()
            peer.send(sid, auth_frame(good))
            await peer.frames_on(sid, 1)
            peer.send(sid, wire.encode_publish(1, "acme", "dev", "orders", [PAYLOAD]))
            peer.send(sid, wire.encode_publish(2, "globex", "prod", "orders", [PAYLOAD]))
            peer.send(sid, wire.encode_publish(3, "acme", "prod", "orders", [PAYLOAD]))  # ok
            frames = await peer.frames_on(sid, 4)
            codes = [wire.decode_ext(f) for f in frames[1:]]
            assert [getattr(c, "code", None) for c in codes] == [3, 3, None]
            peer.close()
        fail, denied, other = captured.lines()
        assert fail == {
            "event": "auth",
            "who": "anonymous",
            "tenant": "acme",
            "action": "session.auth",
            "object": "session",
            "result": "denied",
            "source": "127.0.0.1",
            "reason": "unauthenticated",
            "detail": fail["detail"],
        }
        assert "signature" in fail["detail"] or "key" in fail["detail"]
        assert denied == {
            "event": "permission",
            "who": "alice",
            "tenant": "acme",
            "action": "stream.publish",
            "object": "stream:acme/dev/orders",
            "result": "denied",
            "source": "127.0.0.1",
            "reason": "permission-denied",
            "detail": "not granted",
        }
        assert other == {
            **denied,
            "object": "stream:globex/prod/orders",
            "detail": "other tenant",
        }
        captured.assert_clean(forged, good, PAYLOAD)

    run(main)


def test_gateway_logs_sessions_ended_by_expiry(tmp_path: Path, captured: Captured) -> None:
    # iat is rounded down to whole seconds: ttl=2 leaves at least one second to be
    # accepted (a token already expired on arrival is an auth failure, not this line).
    short = felix_token(["stream.publish:stream:acme/prod/*"], ttl=2)

    async def main() -> None:
        async with gateway_node(tmp_path) as n:
            peer = await raw_connect(n.host, n.port, n.ca_file)
            sid = peer.new_stream()
            peer.send(sid, auth_frame(short))
            (reply,) = await peer.frames_on(sid, 1)
            assert wire.decode_message(reply)["type"] == "auth_ok"
            await peer.wait_for(lambda: peer.close_reason is not None, timeout=10)
        assert captured.lines() == [
            {
                "event": "auth",
                "who": "alice",
                "tenant": "acme",
                "action": "session.expire",
                "object": "session",
                "result": "denied",
                "source": "127.0.0.1",
                "reason": "token-expired",
            }
        ]
        captured.assert_clean(short)

    run(main)


# -- the module itself --------------------------------------------------------------------


def test_fields_are_capped_escaped_and_scrubbed(captured: Captured) -> None:
    huge = "\uff42\u200b\n\x00\"'" + "x" * 1_000_000
    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    audit.emit(
        "permission",
        who=huge,
        tenant=huge,
        action="stream.publish",
        object=f"stream:{huge}",
        result="denied",
        reason="permission-denied",
        detail=f"refused {jwt_like} and Bearer s3cr3t-admin",
    )
    (raw,) = captured.text.splitlines()
    assert len(raw) < 2000
    (line,) = captured.lines()
    assert len(line["who"]) == audit.MAX_FIELD_CHARS and line["who"].endswith("...")
    assert line["who"].startswith("\uff42\u200b\"'x")  # control characters dropped
    assert line["detail"] == "refused [redacted] and [redacted]"
    captured.assert_clean(jwt_like, "s3cr3t-admin")


def test_lines_beyond_the_rate_are_dropped_and_counted(captured: Captured) -> None:
    audit._budget = audit._Budget(3)
    for i in range(10):
        audit.emit("auth", who="x", tenant=None, action="a", object=str(i), result="denied")
    assert [line["object"] for line in captured.lines()] == ["0", "1", "2"]
    audit._budget.window -= 1  # a new second
    captured.clear()
    audit.emit("auth", who="x", tenant=None, action="a", object="later", result="denied")
    suppressed, later = captured.lines()
    assert suppressed["action"] == "suppressed" and suppressed["count"] == 7
    assert later["object"] == "later"


def test_configure_writes_bare_lines_to_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = logging.getLogger(audit.LOGGER_NAME)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    path = tmp_path / "audit.log"
    monkeypatch.setenv(audit.ENV_FILE, str(path))
    monkeypatch.setattr(audit, "_env_checked", False)
    for handler in saved[0]:
        logger.removeHandler(handler)
    try:
        audit.emit("management", who="admin", tenant="acme", action="a", object="o", result="ok")
        (raw,) = path.read_text().splitlines()
        assert json.loads(raw)["who"] == "admin"
        assert not logger.propagate
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.propagate, logger.level = saved[1], saved[2]


def test_felix_up_audit_log_flag_collects_every_process_lines(tmp_path: Path) -> None:
    """`felix up --auth --audit-log FILE`: the supervisor's control API and the gateway
    processes both write their lines to FILE (the flag reaches the children)."""
    import felix
    from felix.errors import Unauthenticated
    from tests.nodeproc import NodeProcess

    audit_file = tmp_path / "audit.log"
    data_dir = tmp_path / "node"
    node = NodeProcess(data_dir, "--auth", "--audit-log", str(audit_file), gateways=1, shards=1)
    try:
        admin = (data_dir / "admin-token").read_text().strip()
        r = httpx.post(
            f"{node.info['control']}/v1/tenants",
            json={"name": "acme"},
            headers=bearer(admin),
            timeout=10,
        )
        assert r.status_code == 201, r.text
        forged = "eyJhbGciOiJFZERTQSJ9.eyJ0aWQiOiJhY21lIn0.c2lnbmF0dXJl"

        async def refused() -> None:
            with pytest.raises(Unauthenticated):
                await felix.connect(
                    f"felix://{node.host}:{node.port}",
                    ca=node.ca_file,
                    tenant="acme",
                    token=forged,
                    connect_timeout=5,
                )

        run(refused)
        lines: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = audit_file.read_text() if audit_file.exists() else ""
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            if {line["event"] for line in lines} >= {"management", "auth"}:
                break
            time.sleep(0.2)
        created = [x for x in lines if x["event"] == "management"]
        assert created and created[0]["who"] == "admin" and created[0]["result"] == "ok"
        assert created[0]["object"] == "tenant:acme"
        failed = [x for x in lines if x["event"] == "auth"]
        assert failed and failed[0]["result"] == "denied" and failed[0]["tenant"] == "acme"
        text = audit_file.read_text()
        assert forged not in text and admin not in text
    finally:
        assert node.stop() == 0
