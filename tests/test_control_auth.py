"""The control plane's authentication slice, end to end through the REST API (httpx over ASGI).

Identity-provider keys (RSA and EC) are generated here and served by an in-process
``fetch_jwks`` (no network); the tenant's key ring is written with
:func:`felix.auth.files.save_ring` into ``tmp_path``. Issuers, policies and bindings
are created through the API, IdP tokens are exchanged for Felix tokens, and those
are verified against the tenant's ``.well-known/jwks.json``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from felix.auth.files import AUDIENCE, ISSUER, save_ring
from felix.auth.keys import TenantKeyRing
from felix.auth.tokens import verify_felix_token
from felix.control.api import create_app
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from tests.aio import run

pytestmark = pytest.mark.timeout(60)

IDP = "https://idp.example"
JWKS_URL = "https://idp.example/.well-known/jwks.json"
OTHER_IDP = "https://other.example"
T = "/v1/tenants/acme"
PUBLISH = "stream.publish:stream:acme/prod/*"
SUBSCRIBE = "stream.subscribe:stream:acme/prod/orders"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid}


class IdP:
    """The identity provider: its published keys, and a count of fetches (no network)."""

    def __init__(self) -> None:
        self.keys = [public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1")]
        self.fetches: list[str] = []

    async def fetch(self, url: str) -> Mapping[str, Any]:
        self.fetches.append(url)
        assert url == JWKS_URL
        return {"keys": list(self.keys)}


def idp_token(
    *,
    kid: str = "rsa-1",
    sub: str = "alice",
    groups: list[str] | None = None,
    iss: str = IDP,
    aud: str = "felix-api",
    exp_in: float = 300,
    **extra: Any,
) -> str:
    now = time.time()
    claims = {
        "iss": iss,
        "aud": aud,
        "sub": sub,
        "groups": ["eng"] if groups is None else groups,
        "iat": int(now),
        "exp": int(now + exp_in),
        **extra,
    }
    key: Any = RSA_KEY if kid.startswith("rsa") else EC_KEY
    alg = "RS256" if kid.startswith("rsa") else "ES256"
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def api(
    keys_dir: Path | None, idp: IdP, *, ring: bool = True, clock: Callable[[], float] = time.time
) -> AsyncIterator[httpx.AsyncClient]:
    """The API over a MemoryStore with tenant acme (and, if ``ring``, its key ring)."""
    if keys_dir is not None and ring:
        save_ring(keys_dir, TenantKeyRing.create("acme", time.time()), time.time())
    store = MemoryStore()
    await store.open()
    app = create_app(store, keys_dir=keys_dir, fetch_jwks=idp.fetch, clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        r = await http.post("/v1/tenants", json={"name": "acme"})
        assert r.status_code == 201, r.text
        yield http
    await store.close()


async def configure(http: httpx.AsyncClient) -> None:
    """Issuer okta (the IdP, RS256 and ES256), policy publishers, binding group:eng."""
    r = await http.post(
        f"{T}/issuers",
        json={
            "name": "okta",
            "issuer": IDP,
            "audience": "felix-api",
            "algorithms": ["RS256", "ES256"],
            "jwks_url": JWKS_URL,
        },
    )
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"{T}/issuers/okta"
    assert r.headers["ETag"] == '"1"'
    r = await http.post(
        f"{T}/policies", json={"name": "publishers", "permissions": [PUBLISH, SUBSCRIBE]}
    )
    assert r.status_code == 201, r.text
    r = await http.post(
        f"{T}/bindings", json={"name": "eng", "subject": "group:eng", "policies": ["publishers"]}
    )
    assert r.status_code == 201, r.text


async def exchange(
    http: httpx.AsyncClient, token: str, body: dict[str, Any] | None = None
) -> httpx.Response:
    return await http.post(f"{T}/token/exchange", headers=bearer(token), json=body)


async def verify(http: httpx.AsyncClient, answer: httpx.Response) -> list[str]:
    """Verify an exchange answer's token against the JWKS route; its perms."""
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert answer.headers["Cache-Control"] == "no-store"
    jwks = await http.get(f"{T}/.well-known/jwks.json")
    assert jwks.status_code == 200, jwks.text
    assert jwks.headers["Cache-Control"] == "public, max-age=60"
    claims = verify_felix_token(
        body["access_token"],
        jwks.json(),
        issuer=ISSUER,
        audience=AUDIENCE,
        now=time.time(),
        leeway=5,
    )
    assert claims.tid == "acme" and claims.sub == "alice"
    assert claims.region == "local"  # issued for this control plane's region
    assert claims.exp - claims.iat == 900
    return claims.perms.to_strings()


def test_exchange_end_to_end(tmp_path: Path) -> None:
    async def main() -> None:
        idp = IdP()
        async with api(tmp_path, idp) as http:
            await configure(http)
            for kid in ("rsa-1", "ec-1"):
                assert await verify(http, await exchange(http, idp_token(kid=kid))) == sorted(
                    [PUBLISH, SUBSCRIBE]
                )
            # One fetch served both keys.
            assert idp.fetches == [JWKS_URL]
            # Narrowing keeps the asked-for subset (a narrower permission is implied too).
            narrowed = await exchange(
                http, idp_token(), {"permissions": ["stream.publish:stream:acme/prod/orders"]}
            )
            assert await verify(http, narrowed) == ["stream.publish:stream:acme/prod/orders"]
            # Asking for more than granted: what is not granted is dropped, never added.
            wider = await exchange(
                http,
                idp_token(),
                {
                    "permissions": [
                        SUBSCRIBE,
                        "stream.manage:stream:acme/prod/*",
                        "ns.manage:namespace:acme/prod",
                    ]
                },
            )
            assert await verify(http, wider) == [SUBSCRIBE]
            # Only ungranted ones: nothing left, 403.
            r = await exchange(http, idp_token(), {"permissions": ["tenant.manage:tenant:acme"]})
            assert_problem(r, 403, "permission-denied")
            # A malformed requested permission is a bad request.
            r = await exchange(http, idp_token(), {"permissions": ["fly:stream:acme/a/b"]})
            assert_problem(r, 400, "bad-request")
            # A user binding works too; an issuer-limited binding only for that issuer.
            r = await http.post(
                f"{T}/bindings",
                json={"name": "bob", "subject": "bob", "policies": ["publishers"], "issuer": IDP},
            )
            assert r.status_code == 201, r.text
            bob = await exchange(http, idp_token(sub="bob", groups=[]))
            assert bob.status_code == 200, bob.text

    run(main)


def assert_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["type"] == f"/v1/problems/{slug}"
    return body


def test_no_binding_is_forbidden(tmp_path: Path) -> None:
    async def main() -> None:
        async with api(tmp_path, IdP()) as http:
            await configure(http)
            # In no bound group: nothing granted.
            r = await exchange(http, idp_token(groups=["sales"]))
            assert_problem(r, 403, "permission-denied")
            # The binding gone: denied too.
            r = await http.delete(f"{T}/bindings/eng")
            assert r.status_code == 200, r.text
            assert_problem(await exchange(http, idp_token()), 403, "permission-denied")
            # A binding to a policy that does not exist grants nothing.
            r = await http.post(
                f"{T}/bindings", json={"name": "eng", "subject": "group:eng", "policies": ["nope"]}
            )
            assert r.status_code == 201, r.text
            assert_problem(await exchange(http, idp_token()), 403, "permission-denied")

    run(main)


def test_bad_idp_tokens_are_unauthenticated(tmp_path: Path) -> None:
    async def main() -> None:
        async with api(tmp_path, IdP()) as http:
            await configure(http)
            hs256 = jwt.encode(
                {"iss": IDP, "aud": "felix-api", "sub": "alice", "exp": int(time.time()) + 60},
                "secret-secret-secret-secret-secret!",
                algorithm="HS256",
                headers={"kid": "rsa-1"},
            )
            bad = {
                "wrong audience": idp_token(aud="someone-else"),
                "expired": idp_token(exp_in=-120),
                "not yet valid": idp_token(nbf=int(time.time()) + 600),
                "unknown issuer": idp_token(iss=OTHER_IDP),
                "HS256": hs256,
                "garbage": "not.a.token",
            }
            for why, token in bad.items():
                r = await exchange(http, token)
                body = assert_problem(r, 401, "unauthenticated")
                assert r.headers["WWW-Authenticate"] == "Bearer", why
                assert token not in body["detail"], why
            # No token at all, or another scheme.
            r = await http.post(f"{T}/token/exchange")
            assert_problem(r, 401, "unauthenticated")
            r = await http.post(f"{T}/token/exchange", headers={"Authorization": "Basic eDp5"})
            assert_problem(r, 401, "unauthenticated")
            # A tenant that does not exist.
            r = await http.post("/v1/tenants/nobody/token/exchange", headers=bearer(idp_token()))
            assert_problem(r, 404, "not-found")

    run(main)


def test_unknown_kid_refetches_at_most_once_per_window(tmp_path: Path) -> None:
    async def main() -> None:
        idp = IdP()
        now = [time.time() + 5]  # after the ring (made in api()) activates its key
        async with api(tmp_path, idp, clock=lambda: now[0]) as http:
            await configure(http)
            assert (await exchange(http, idp_token())).status_code == 200
            assert len(idp.fetches) == 1
            # Right after a fetch, an unknown kid does not fetch again (rate limit).
            r = await exchange(http, idp_token(kid="rsa-unknown"))
            assert_problem(r, 401, "unauthenticated")
            assert len(idp.fetches) == 1
            # Past the window: one refetch, then none however many unknown kids come.
            now[0] += 31
            for _ in range(5):
                r = await exchange(http, idp_token(kid="rsa-unknown"))
                assert_problem(r, 401, "unauthenticated")
            assert len(idp.fetches) == 2
            # Known kids still work from the cache meanwhile, without fetching.
            assert (await exchange(http, idp_token(kid="ec-1"))).status_code == 200
            # The IdP rotates: its new kid is refused until the window has passed, then
            # fetched once and accepted.
            idp.keys.append(public_jwk(RSA_KEY, "rsa-2"))
            r = await exchange(http, idp_token(kid="rsa-2"))
            assert_problem(r, 401, "unauthenticated")
            now[0] += 31
            assert (await exchange(http, idp_token(kid="rsa-2"))).status_code == 200
            assert (await exchange(http, idp_token(kid="rsa-2"))).status_code == 200
            assert len(idp.fetches) == 3

    run(main)


def test_missing_ring_and_missing_keys_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with api(tmp_path, IdP(), ring=False) as http:
            await configure(http)
            body = assert_problem(await exchange(http, idp_token()), 503, "unavailable")
            assert "no signing keys" in body["detail"] and str(tmp_path) not in body["detail"]
            # The operator's hint (with the key directory) goes to the server's log only.
            assert "felix token keygen --tenant acme" in caplog.text
            # Without auth required every caller is the admin: a tenant without keys yet
            # is 503 (a node's mirror retries it), one that does not exist 404.
            r = await http.get(f"{T}/.well-known/jwks.json")
            body = assert_problem(r, 503, "unavailable")
            assert "no signing keys" in body["detail"] and str(tmp_path) not in body["detail"]
            r = await http.get("/v1/tenants/nobody/.well-known/jwks.json")
            assert_problem(r, 404, "not-found")
        async with api(None, IdP()) as http:
            for r in (
                await exchange(http, idp_token()),
                await http.get(f"{T}/.well-known/jwks.json"),
            ):
                body = assert_problem(r, 503, "unavailable")
                assert "authentication is not configured" in body["detail"]

    run(main)


def test_issuer_policy_binding_routes(tmp_path: Path) -> None:
    async def main() -> None:
        async with api(tmp_path, IdP()) as http:
            await configure(http)
            for collection, name in (
                ("issuers", "okta"),
                ("policies", "publishers"),
                ("bindings", "eng"),
            ):
                r = await http.get(f"{T}/{collection}")
                assert r.status_code == 200
                assert [item["name"] for item in r.json()["items"]] == [name]
                r = await http.get(f"{T}/{collection}/{name}")
                assert r.status_code == 200 and r.headers["ETag"] == '"1"'
                assert r.json()["path"] == ["acme", name]
            r = await http.get(f"{T}/issuers/okta")
            assert (
                r.json()["kind"] == ResourceKind.ISSUER
                and r.json()["spec"]["groups_claim"] == "groups"
            )
            # PATCH with If-Match.
            r = await http.patch(
                f"{T}/policies/publishers",
                json={"permissions": [PUBLISH]},
                headers={"If-Match": '"1"'},
            )
            assert r.status_code == 200 and r.headers["ETag"] == '"2"'
            r = await http.patch(
                f"{T}/policies/publishers", json={"permissions": []}, headers={"If-Match": '"1"'}
            )
            assert_problem(r, 412, "version-conflict")
            # Validation: another tenant's permission, an HMAC issuer, a bad binding.
            r = await http.post(
                f"{T}/policies",
                json={"name": "x", "permissions": ["stream.publish:stream:other/a/b"]},
            )
            assert_problem(r, 400, "bad-request")
            r = await http.post(
                f"{T}/issuers",
                json={
                    "name": "x",
                    "issuer": IDP,
                    "audience": "a",
                    "algorithms": ["HS256"],
                    "jwks_url": JWKS_URL,
                },
            )
            assert r.status_code == 422, r.text
            r = await http.post(
                f"{T}/issuers",
                json={"name": "x", "issuer": IDP, "audience": "a", "algorithms": ["RS256"]},
            )
            assert_problem(r, 400, "bad-request")
            r = await http.post(
                f"{T}/bindings", json={"name": "x", "subject": "bob", "policies": []}
            )
            assert r.status_code == 422, r.text
            r = await http.post(f"{T}/issuers", json={"name": "okta", **_inline_issuer()})
            assert_problem(r, 409, "already-exists")
            # An issuer with inline keys needs no fetch.
            r = await http.post(f"{T}/issuers", json={"name": "inline", **_inline_issuer()})
            assert r.status_code == 201, r.text
            # The snapshot and feed show the new kinds.
            snap = (await http.get("/v1/snapshot")).json()
            kinds = {res["kind"] for res in snap["resources"]}
            assert {"issuer", "policy", "binding"} <= kinds
            # Delete, then 404; deleting the tenant needs cascade.
            r = await http.delete(f"{T}/issuers/inline")
            assert r.status_code == 200
            assert r.json() == {"deleted": [{"kind": "issuer", "path": ["acme", "inline"]}]}
            assert_problem(await http.get(f"{T}/issuers/inline"), 404, "not-found")
            assert_problem(await http.delete(T), 409, "has-children")
            r = await http.delete(T, params={"cascade": "true"})
            assert r.status_code == 200 and len(r.json()["deleted"]) == 4

    run(main)


def _inline_issuer() -> dict[str, Any]:
    return {
        "issuer": OTHER_IDP,
        "audience": "felix-api",
        "algorithms": ["ES256"],
        "jwks": {"keys": [public_jwk(EC_KEY, "ec-1")]},
    }


def test_inline_issuer_exchange(tmp_path: Path) -> None:
    async def main() -> None:
        idp = IdP()
        async with api(tmp_path, idp) as http:
            await configure(http)
            r = await http.post(f"{T}/issuers", json={"name": "other", **_inline_issuer()})
            assert r.status_code == 201, r.text
            r = await exchange(http, idp_token(kid="ec-1", iss=OTHER_IDP))
            assert await verify(http, r) == sorted([PUBLISH, SUBSCRIBE])
            assert idp.fetches == []
            # The issuer-limited binding of bob does not apply to the other issuer.
            r = await http.post(
                f"{T}/bindings",
                json={"name": "bob", "subject": "bob", "policies": ["publishers"], "issuer": IDP},
            )
            assert r.status_code == 201, r.text
            r = await exchange(http, idp_token(kid="ec-1", iss=OTHER_IDP, sub="bob", groups=[]))
            assert_problem(r, 403, "permission-denied")

    run(main)
