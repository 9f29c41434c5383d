"""Who may use the control-plane API: the admin token, Felix tokens, and dev mode.

The API runs over a MemoryStore (httpx over ASGI) with ``require_auth=True``; tenant
keys are saved with :func:`felix.auth.files.save_ring` in ``tmp_path`` and Felix
tokens are minted from those rings, as ``felix token mint`` would.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter

from felix.auth.files import AUDIENCE, ISSUER, admin_token, save_ring
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.control.api import ROUTE_ACCESS, TOKEN_LEEWAY, Access, create_app
from felix.control.api.access import requires
from felix.control.api.guard import GuardedRoute
from felix.control.client import ControlClient
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.errors import ConfigError, PermissionDenied
from felix.node.config import NodeConfig
from tests.aio import run

pytestmark = pytest.mark.timeout(60)

ADMIN = "s3cret-admin-token"
ACME = "/v1/tenants/acme"
PROD = f"{ACME}/namespaces/prod"
DEV = f"{ACME}/namespaces/dev"
GLOBEX = "/v1/tenants/globex"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Keys:
    """The key rings of tenants acme and globex, saved in a key directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        now = time.time()
        self.rings = {t: TenantKeyRing.create(t, now) for t in ("acme", "globex")}
        for ring in self.rings.values():
            save_ring(directory, ring, now)

    def token(self, tenant: str, *perms: str, region: str | None = None) -> str:
        return self.rings[tenant].mint(
            time.time(),
            issuer=ISSUER,
            audience=AUDIENCE,
            sub="svc",
            perms=PermissionSet(tenant, perms),
            region=region,
        )


@asynccontextmanager
async def api(
    keys: Keys | None,
    *,
    require_auth: bool = True,
    clock: Callable[[], float] = time.time,
    region: str = "local",
) -> AsyncIterator[httpx.AsyncClient]:
    """The API with tenants acme (namespaces prod, dev) and globex (namespace prod)."""
    store = MemoryStore()
    await store.open()
    for kind, path in (
        (ResourceKind.TENANT, ("acme",)),
        (ResourceKind.NAMESPACE, ("acme", "prod")),
        (ResourceKind.NAMESPACE, ("acme", "dev")),
        (ResourceKind.TENANT, ("globex",)),
        (ResourceKind.NAMESPACE, ("globex", "prod")),
    ):
        await store.create(kind, path, {})
    app = create_app(
        store,
        keys_dir=keys.directory if keys else None,
        admin_token=ADMIN,
        require_auth=require_auth,
        clock=clock,
        region=region,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        yield http
    await store.close()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "auth")


def assert_problem(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_every_route_has_an_access_rule() -> None:
    app = create_app(MemoryStore(), require_auth=True)
    assert set(app.openapi()["paths"]) == set(ROUTE_ACCESS)


def test_a_route_without_an_access_rule_cannot_be_built() -> None:
    router = APIRouter(route_class=GuardedRoute)

    async def forgotten() -> None:
        return None

    with pytest.raises(TypeError, match="declares no access rule"):
        router.add_api_route("/v1/forgotten", forgotten)
    router.add_api_route("/v1/declared", requires(Access.ADMIN)(forgotten))


def test_without_credentials_only_public_routes_answer(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys) as http:
            for method, url in [
                ("GET", "/v1/tenants"),
                ("POST", "/v1/tenants"),
                ("GET", ACME),
                ("DELETE", ACME),
                ("GET", f"{PROD}/streams"),
                ("GET", f"{ACME}/policies"),
                ("GET", "/v1/snapshot"),
                ("GET", "/v1/changes"),
                ("GET", "/v1/system/info"),
                ("GET", "/v1/regions"),
            ]:
                r = await http.request(method, url, json={"name": "x"})
                assert_problem(r, 401)
            # A wrong scheme, an empty token or a wrong admin token: 401 too.
            for headers in (
                {"Authorization": f"Basic {ADMIN}"},
                {"Authorization": "Bearer "},
                bearer(ADMIN + "x"),
                bearer("not-a-jwt"),
            ):
                assert_problem(await http.get("/v1/tenants", headers=headers), 401)
            # Public: health, the OpenAPI document, docs, JWKS, the token exchange.
            assert (await http.get("/v1/system/health")).status_code == 200
            assert (await http.get("/v1/openapi.json")).status_code == 200
            assert (await http.get("/docs")).status_code == 200
            assert (await http.get(f"{ACME}/.well-known/jwks.json")).status_code == 200
            r = await http.post(f"{ACME}/token/exchange")
            assert_problem(r, 401)  # the exchange's own check: no identity-provider token
            assert "identity provider" in r.json()["detail"]

    run(main)


def test_the_admin_token_may_do_everything(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys) as http:
            admin = bearer(ADMIN)
            r = await http.post("/v1/tenants", json={"name": "initech"}, headers=admin)
            assert r.status_code == 201, r.text
            r = await http.post(f"{PROD}/streams", json={"name": "orders"}, headers=admin)
            assert r.status_code == 201, r.text
            r = await http.post(f"{PROD}/caches", json={"name": "sessions"}, headers=admin)
            assert r.status_code == 201, r.text
            r = await http.post(
                f"{GLOBEX}/policies", json={"name": "p", "permissions": []}, headers=admin
            )
            assert r.status_code == 201, r.text
            for url in ("/v1/tenants", "/v1/snapshot", "/v1/changes", "/v1/system/info"):
                assert (await http.get(url, headers=admin)).status_code == 200, url
            r = await http.delete("/v1/tenants/initech", headers=admin)
            assert r.status_code == 200, r.text

    run(main)


def test_a_namespace_manager_is_limited_to_its_namespace(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys) as http:
            tok = bearer(keys.token("acme", "ns.manage:namespace:acme/prod"))
            r = await http.post(f"{PROD}/streams", json={"name": "orders"}, headers=tok)
            assert r.status_code == 201, r.text
            r = await http.post(f"{PROD}/caches", json={"name": "sessions"}, headers=tok)
            assert r.status_code == 201, r.text
            assert (await http.get(f"{PROD}/streams", headers=tok)).status_code == 200
            assert (await http.get(f"{PROD}/streams/orders", headers=tok)).status_code == 200
            r = await http.patch(
                f"{PROD}/streams/orders", json={"replay_max_records": 5}, headers=tok
            )
            assert r.status_code == 200, r.text
            assert (await http.get(PROD, headers=tok)).status_code == 200
            # Another namespace of the tenant, the tenant itself, the namespace list.
            r = await http.post(f"{DEV}/streams", json={"name": "orders"}, headers=tok)
            assert_problem(r, 403)
            assert_problem(await http.get(DEV, headers=tok), 403)
            assert_problem(await http.get(ACME, headers=tok), 403)
            r = await http.post(f"{ACME}/namespaces", json={"name": "qa"}, headers=tok)
            assert_problem(r, 403)
            # Another tenant, the tenants collection, the feed.
            r = await http.post(
                f"{GLOBEX}/namespaces/prod/streams", json={"name": "orders"}, headers=tok
            )
            assert_problem(r, 403)
            assert_problem(await http.get("/v1/tenants", headers=tok), 403)
            assert_problem(await http.get("/v1/snapshot", headers=tok), 403)
            assert_problem(await http.get("/v1/changes", headers=tok), 403)
            # RBAC needs rbac.manage, which ns.manage does not imply.
            assert_problem(await http.get(f"{ACME}/policies", headers=tok), 403)
            # Any valid token may read the system info and regions.
            assert (await http.get("/v1/system/info", headers=tok)).status_code == 200
            assert (await http.get("/v1/regions", headers=tok)).status_code == 200

    run(main)


def test_rbac_and_tenant_permissions(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys) as http:
            rbac = bearer(keys.token("acme", "rbac.manage:tenant:acme"))
            body = {"name": "pubs", "permissions": ["stream.publish:stream:acme/prod/*"]}
            r = await http.post(f"{ACME}/policies", json=body, headers=rbac)
            assert r.status_code == 201, r.text
            assert (await http.get(f"{ACME}/bindings", headers=rbac)).status_code == 200
            assert_problem(await http.get(f"{PROD}/streams", headers=rbac), 403)
            # tenant.manage: the tenant and everything in it, but not its RBAC settings.
            admin_of_acme = bearer(keys.token("acme", "tenant.manage:tenant:acme"))
            assert (await http.get(ACME, headers=admin_of_acme)).status_code == 200
            r = await http.post(f"{ACME}/namespaces", json={"name": "qa"}, headers=admin_of_acme)
            assert r.status_code == 201, r.text
            r = await http.post(f"{DEV}/caches", json={"name": "c"}, headers=admin_of_acme)
            assert r.status_code == 201, r.text
            assert_problem(await http.get(f"{ACME}/policies", headers=admin_of_acme), 403)
            r = await http.post("/v1/tenants", json={"name": "x"}, headers=admin_of_acme)
            assert_problem(r, 403)
            # ns.manage on every namespace may list and create namespaces.
            all_ns = bearer(keys.token("acme", "ns.manage:namespace:acme/*"))
            assert (await http.get(f"{ACME}/namespaces", headers=all_ns)).status_code == 200
            # stream.manage on a namespace's streams: streams only, not caches.
            streams = bearer(keys.token("acme", "stream.manage:stream:acme/prod/*"))
            r = await http.post(f"{PROD}/streams", json={"name": "s"}, headers=streams)
            assert r.status_code == 201, r.text
            assert_problem(await http.get(f"{PROD}/caches", headers=streams), 403)

    run(main)


def test_queue_groups_need_stream_manage_on_their_stream(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys) as http:
            admin = bearer(ADMIN)
            for name in ("orders", "audit"):
                r = await http.post(
                    f"{PROD}/streams", json={"name": name, "durable": True}, headers=admin
                )
                assert r.status_code == 201, r.text
            orders = f"{PROD}/streams/orders/groups"
            tok = bearer(keys.token("acme", "stream.manage:stream:acme/prod/orders"))
            r = await http.post(orders, json={"name": "w"}, headers=tok)
            assert r.status_code == 201, r.text
            assert (await http.get(orders, headers=tok)).status_code == 200
            assert (await http.get(f"{orders}/w", headers=tok)).status_code == 200
            r = await http.patch(f"{orders}/w", json={"lease_ms": 2000}, headers=tok)
            assert r.status_code == 200, r.text
            # Another stream's groups, and a permission that is not stream.manage.
            r = await http.post(f"{PROD}/streams/audit/groups", json={"name": "w"}, headers=tok)
            assert_problem(r, 403)
            consume = bearer(keys.token("acme", "stream.consume:stream:acme/prod/orders"))
            assert_problem(await http.get(orders, headers=consume), 403)
            assert_problem(await http.delete(f"{orders}/w", headers=consume), 403)
            assert_problem(await http.get(orders), 401)
            # ns.manage covers its streams' groups; another tenant's token does not.
            ns = bearer(keys.token("acme", "ns.manage:namespace:acme/prod"))
            assert (await http.get(f"{orders}/w", headers=ns)).status_code == 200
            globex = bearer(keys.token("globex", "tenant.manage:tenant:globex"))
            assert_problem(await http.get(orders, headers=globex), 403)
            assert (await http.delete(f"{orders}/w", headers=tok)).status_code == 200

    run(main)


def test_a_token_of_one_tenant_cannot_touch_another(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys) as http:
            acme = bearer(keys.token("acme", "tenant.manage:tenant:acme"))
            assert_problem(await http.get(GLOBEX, headers=acme), 403)
            assert_problem(await http.get(f"{GLOBEX}/namespaces", headers=acme), 403)
            assert (await http.get(ACME, headers=acme)).status_code == 200

    run(main)


def test_invalid_felix_tokens_are_unauthenticated(keys: Keys) -> None:
    async def main() -> None:
        perm = "tenant.manage:tenant:acme"
        tok = bearer(keys.token("acme", perm))
        ttl = keys.rings["acme"].max_token_ttl
        later = time.time() + ttl + TOKEN_LEEWAY + 60
        async with api(keys, clock=lambda: later) as http:
            assert_problem(await http.get(ACME, headers=tok), 401)  # expired by then
        async with api(keys) as http:
            assert (await http.get(ACME, headers=tok)).status_code == 200
            # Signed by a key the tenant does not publish.
            stranger = TenantKeyRing.create("acme", time.time())
            forged = stranger.mint(
                time.time(),
                issuer=ISSUER,
                audience=AUDIENCE,
                sub="svc",
                perms=PermissionSet("acme", [perm]),
            )
            assert_problem(await http.get(ACME, headers=bearer(forged)), 401)
            # A tenant with no keys at all.
            other = TenantKeyRing.create("initech", time.time())
            unknown = other.mint(
                time.time(),
                issuer=ISSUER,
                audience=AUDIENCE,
                sub="svc",
                perms=PermissionSet("initech", []),
            )
            assert_problem(await http.get("/v1/system/info", headers=bearer(unknown)), 401)

    run(main)


def test_without_a_key_directory_only_the_admin_token_works(keys: Keys) -> None:
    async def main() -> None:
        async with api(None) as http:
            tok = bearer(keys.token("acme", "tenant.manage:tenant:acme"))
            assert_problem(await http.get(ACME, headers=tok), 401)
            assert (await http.get(ACME, headers=bearer(ADMIN))).status_code == 200

    run(main)


def test_dev_mode_allows_everything_without_credentials(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys, require_auth=False) as http:
            r = await http.post("/v1/tenants", json={"name": "initech"})
            assert r.status_code == 201, r.text
            assert (await http.get("/v1/snapshot")).status_code == 200
            assert (await http.get(f"{GLOBEX}/policies")).status_code == 200

    run(main)


def test_the_client_sends_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.method == "DELETE":
            problem = {"type": "about:blank", "title": "Forbidden", "status": 403}
            return httpx.Response(403, json=problem)
        return httpx.Response(200, json={"items": []})

    transport = httpx.MockTransport(record)
    monkeypatch.delenv("FELIX_CONTROL_TOKEN", raising=False)
    with ControlClient("http://control", token="tok", transport=transport) as client:
        assert client.list_resources(ResourceKind.TENANT) == []
        with pytest.raises(PermissionDenied):
            client.delete(ResourceKind.TENANT, ("acme",))
    with ControlClient("http://control", transport=transport) as client:
        client.list_resources(ResourceKind.TENANT)
    monkeypatch.setenv("FELIX_CONTROL_TOKEN", "from-env")
    with ControlClient("http://control", transport=transport) as client:
        client.list_resources(ResourceKind.TENANT)
    assert seen == ["Bearer tok", "Bearer tok", None, "Bearer from-env"]


def test_admin_token_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "admin-token"
    token = admin_token(path)
    assert len(token) >= 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert admin_token(path) == token  # reused
    path.chmod(0o644)
    with pytest.raises(ConfigError):
        admin_token(path)


def test_node_config_control_address_and_token() -> None:
    # authenticated: may listen anywhere (beyond loopback it names its region)
    NodeConfig(control=("0.0.0.0", 8443), auth=True, region="eu-1")
    with pytest.raises(ConfigError, match="--control"):
        NodeConfig(control=("0.0.0.0", 8443), region="eu-1")
    with pytest.raises(ConfigError, match="--http"):
        NodeConfig(http=("0.0.0.0", 8080), auth=True)  # metrics stay loopback-only
    config = NodeConfig(control_url="http://control:8443", control_token="secret")
    assert "secret" not in config.to_json()  # the child processes never see it
    assert "secret" not in repr(config)
    assert NodeConfig.from_json(config.to_json()).control_token is None


def test_a_token_of_another_region_manages_nothing_here(keys: Keys) -> None:
    """Issue #15: a control plane refuses management calls with a token issued for
    another region, and (its region being set) one without the claim."""

    async def main() -> None:
        perm = "tenant.manage:tenant:acme"
        async with api(keys, region="eu-1") as http:
            r = await http.get(ACME, headers=bearer(keys.token("acme", perm, region="us-1")))
            assert_problem(r, 401)
            assert "issued for region 'us-1'" in r.text and "'eu-1'" in r.text
            ok = await http.get(ACME, headers=bearer(keys.token("acme", perm, region="eu-1")))
            assert ok.status_code == 200
            no_claim = await http.get(ACME, headers=bearer(keys.token("acme", perm)))
            assert_problem(no_claim, 401)
            assert "no region claim" in no_claim.text and "'eu-1'" in no_claim.text
        # The loopback dev region takes claimless tokens (existing dev flows), not others.
        async with api(keys) as http:
            ok = await http.get(ACME, headers=bearer(keys.token("acme", perm)))
            assert ok.status_code == 200
            r = await http.get(ACME, headers=bearer(keys.token("acme", perm, region="us-1")))
            assert_problem(r, 401)

    run(main)
