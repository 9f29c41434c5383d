"""Tests for felix.auth.oidc: issuer config, the JWKS cache, IdP token checks, token exchange.

Identity-provider keys are generated here with cryptography; the JWKS "fetch" is an
injected coroutine that counts its calls, so nothing touches the network.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from felix.auth.keys import TenantKeyRing
from felix.auth.oidc import Identity, IssuerConfig, JwksCache, verify_idp_token
from felix.auth.perms import PermissionSet, narrow
from felix.auth.rbac import Policy, RoleBinding, grant
from felix.auth.tokens import verify_felix_token
from felix.errors import BadRequest, ConfigError, Unauthenticated, Unavailable
from tests.aio import run

NOW = 1_700_000_000.0
ISS = "https://idp.example"
AUD = "felix"
URL = "https://idp.example/.well-known/jwks.json"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC256_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid}


JWKS = {
    "keys": [
        public_jwk(RSA_KEY, "rsa1"),
        public_jwk(EC256_KEY, "ec256"),
        public_jwk(EC384_KEY, "ec384"),
        public_jwk(ED_KEY, "ed1"),
    ]
}
ALL_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
KEY_FOR = {"R": (RSA_KEY, "rsa1"), "P": (RSA_KEY, "rsa1"), "E": (ED_KEY, "ed1")}


def key_for(alg: str) -> tuple[Any, str]:
    if alg == "ES256":
        return EC256_KEY, "ec256"
    if alg == "ES384":
        return EC384_KEY, "ec384"
    return KEY_FOR[alg[0]]


def idp_claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 300,
        "groups": ["eng", "ops"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def idp_token(alg: str = "RS256", kid: str | None = None, key: Any = None, **changes: Any) -> str:
    default_key, default_kid = key_for(alg)
    headers = {"kid": kid or default_kid}
    return jwt.encode(idp_claims(**changes), key or default_key, algorithm=alg, headers=headers)


def inline_issuer(**changes: Any) -> IssuerConfig:
    args: dict[str, Any] = {"issuer": ISS, "audience": AUD, "algorithms": ALL_ALGS, "jwks": JWKS}
    args.update(changes)
    return IssuerConfig(**args)


class FakeIdp:
    """An injected fetch that serves ``jwks`` and counts calls."""

    def __init__(self, jwks: Mapping[str, Any], *, delay: float = 0.0) -> None:
        self.jwks = jwks
        self.calls: list[str] = []
        self.fail = False
        self.delay = delay

    async def fetch(self, url: str) -> Mapping[str, Any]:
        self.calls.append(url)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError("connection refused")
        return self.jwks


def url_issuer(**changes: Any) -> IssuerConfig:
    args: dict[str, Any] = {"issuer": ISS, "audience": AUD, "algorithms": ALL_ALGS, "jwks_url": URL}
    args.update(changes)
    return IssuerConfig(**args)


def verify(
    token: str,
    issuers: list[IssuerConfig] | None = None,
    *,
    cache: JwksCache | None = None,
    now: float = NOW,
    leeway: float = 30,
) -> Identity:
    async def main() -> Identity:
        return await verify_idp_token(
            token,
            [inline_issuer()] if issuers is None else issuers,
            cache=cache or JwksCache(FakeIdp({"keys": []}).fetch),
            now=now,
            leeway=leeway,
        )

    return run(main)


def reject(token: str, why: str, **kwargs: Any) -> None:
    with pytest.raises(Unauthenticated) as info:
        verify(token, **kwargs)
    assert why in str(info.value), str(info.value)
    assert token not in str(info.value)


# -- issuer config ---------------------------------------------------------------------


def test_config_round_trip() -> None:
    for config in (inline_issuer(groups_claim="roles"), url_issuer()):
        assert IssuerConfig.from_dict(config.to_dict()) == config
        assert IssuerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"algorithms": ("HS256",)}, "HMAC"),
        ({"algorithms": ("RS256", "HS512")}, "HMAC"),
        ({"algorithms": ("hs384",)}, "HMAC"),
        ({"algorithms": ("none",)}, "refused"),
        ({"algorithms": ("ES512",)}, "refused"),
        ({"algorithms": ("rs256",)}, "refused"),
        ({"algorithms": ()}, "non-empty"),
        ({"algorithms": "RS256"}, "non-empty list"),
        ({"issuer": ""}, "issuer"),
        ({"audience": ""}, "audience"),
        ({"groups_claim": ""}, "groups_claim"),
        ({"jwks_url": URL}, "exactly one"),
        ({"jwks": None}, "exactly one"),
        ({"jwks": {"keys": []}}, "no keys"),
        ({"jwks": {"nokeys": 1}}, "JWK set"),
        ({"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}}, "not a public-key"),
        ({"jwks": {"keys": [{**public_jwk(ED_KEY, "a"), "d": "AAAA"}]}}, "private"),
        ({"jwks": {"keys": [public_jwk(ED_KEY, "a"), public_jwk(ED_KEY, "a")]}}, "duplicate"),
        ({"jwks": {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}}, "kid"),
        ({"jwks": {"keys": [public_jwk(ED_KEY, "a")]}, "algorithms": ("RS256",)}, "no key"),
        ({"jwks": {"keys": [{**public_jwk(ED_KEY, "a"), "alg": "ES256"}]}}, "no key"),
        ({"jwks": {"keys": [{**public_jwk(ED_KEY, "a"), "use": "enc"}]}}, "signing key"),
    ],
)
def test_bad_inline_config_is_refused(changes: dict[str, Any], why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        inline_issuer(**changes)


@pytest.mark.parametrize(
    "url",
    ["http://idp.example/jwks", "ftp://idp.example/jwks", "https:///jwks", "jwks.json", "", 5],
)
def test_bad_jwks_url_is_refused(url: Any) -> None:
    with pytest.raises(BadRequest, match="jwks_url"):
        url_issuer(jwks_url=url)


def test_loopback_http_is_allowed_for_development() -> None:
    url_issuer(jwks_url="http://localhost:8080/jwks")
    url_issuer(jwks_url="http://127.0.0.1/jwks")


def test_from_dict_checks_fields() -> None:
    with pytest.raises(BadRequest, match="unknown field"):
        IssuerConfig.from_dict({**url_issuer().to_dict(), "secret": "x"})
    with pytest.raises(BadRequest, match="missing audience"):
        IssuerConfig.from_dict({"issuer": ISS, "algorithms": ["RS256"], "jwks_url": URL})
    with pytest.raises(BadRequest, match="must be a list"):
        IssuerConfig.from_dict({"issuer": ISS, "audience": AUD, "algorithms": "RS256"})


# -- verification ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_allowed_algorithm_verifies(alg: str) -> None:
    identity = verify(idp_token(alg))
    assert identity == Identity(sub="alice", groups=("eng", "ops"), issuer=ISS)


def test_kid_picks_the_key() -> None:
    two_rsa = {"keys": [public_jwk(RSA_KEY, "rsa1"), public_jwk(RSA_KEY_2, "rsa2")]}
    issuers = [inline_issuer(jwks=two_rsa, algorithms=("RS256",))]
    assert verify(idp_token(kid="rsa2", key=RSA_KEY_2), issuers).sub == "alice"
    # Header says rsa1 but the token was signed by rsa2's key.
    reject(idp_token(kid="rsa1", key=RSA_KEY_2), "signature verification failed", issuers=issuers)
    reject(idp_token(kid="rsa3"), "does not publish", issuers=issuers)
    reject(jwt.encode(idp_claims(), RSA_KEY, algorithm="RS256"), "no usable kid", issuers=issuers)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"iss": "https://other.example"}, "not trusted"),
        ({"iss": ...}, "not trusted"),
        ({"iss": ISS + "/"}, "not trusted"),
        ({"aud": "other"}, "audience"),
        ({"aud": ...}, "audience"),
        ({"exp": ...}, "no exp"),
        ({"exp": NOW - 30}, "expired"),
        ({"nbf": NOW + 31}, "not valid yet"),
        ({"iat": NOW + 31}, "issued in the future"),
        ({"exp": "later"}, "not a number"),
        ({"sub": ...}, "subject"),
        ({"sub": ""}, "subject"),
        ({"sub": "a\x1bb"}, "subject"),
        ({"groups": "eng"}, "groups"),
        ({"groups": ["eng", 5]}, "group"),
        ({"groups": [""]}, "group"),
        ({"groups": ["g"] * 257}, "groups"),
    ],
)
def test_bad_claims_are_rejected(changes: dict[str, Any], why: str) -> None:
    reject(idp_token(**changes), why)


def test_time_boundaries_with_leeway() -> None:
    token = idp_token(exp=NOW + 100, nbf=NOW + 50, iat=NOW + 50)
    verify(token, now=NOW + 50 - 30, leeway=30)
    reject(token, "not valid yet", now=NOW + 50 - 30.001, leeway=30)
    verify(token, now=NOW + 100 + 29.999, leeway=30)
    reject(token, "expired", now=NOW + 100 + 30, leeway=30)
    reject(token, "expired", now=NOW + 100, leeway=0)
    # Float dates are fine from identity providers (only Felix tokens need integers).
    verify(idp_token(exp=NOW + 100.5, iat=NOW - 0.25))


def test_optional_claims_and_audience_lists() -> None:
    assert verify(idp_token(iat=..., groups=...)).groups == ()
    verify(idp_token(aud=["x", AUD]))
    reject(idp_token(aud=["x"]), "audience")
    assert verify(idp_token(groups=["a", "b", "a"])).groups == ("a", "b")


def test_algorithms_are_pinned_per_issuer() -> None:
    rs256_only = [inline_issuer(algorithms=("RS256",))]
    verify(idp_token("RS256"), rs256_only)
    for alg in ("RS384", "RS512", "PS256", "ES256", "EdDSA"):
        reject(idp_token(alg), "not allowed", issuers=rs256_only)
    # Allowed algorithm, but the kid names a key of another type.
    reject(idp_token("ES256", kid="rsa1"), "cannot verify ES256")
    reject(idp_token("RS256", kid="ec256", key=RSA_KEY), "cannot verify RS256")
    # ES256 with a P-384 key is refused (curve pinned to the algorithm).
    reject(idp_token("ES256", kid="ec384", key=EC256_KEY), "cannot verify ES256")


def test_alg_none_and_hmac_confusion_are_rejected() -> None:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body = b64(json.dumps(idp_claims()).encode())
    for alg in ("none", "None"):
        head = b64(json.dumps({"alg": alg, "kid": "rsa1"}).encode())
        reject(f"{head}.{body}.", "not allowed")
    pem = RSA_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, json.dumps(public_jwk(RSA_KEY, "rsa1")).encode()):
        head = b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
        mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        reject(f"{head}.{body}.{b64(mac)}", "not allowed")


@pytest.mark.filterwarnings("ignore:The RSA key is 1024 bits")  # PyJWT warns when signing
def test_short_rsa_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    issuers = [inline_issuer(jwks={"keys": [public_jwk(weak, "weak")]}, algorithms=("RS256",))]
    reject(idp_token(kid="weak", key=weak), "unusable", issuers=issuers)


def test_no_issuers_means_deny() -> None:
    reject(idp_token(), "trusts no identity provider", issuers=[])


def test_duplicate_issuer_entries_are_ambiguous() -> None:
    reject(idp_token(), "not trusted", issuers=[inline_issuer(), inline_issuer()])


def test_groups_claim_is_configurable() -> None:
    issuers = [inline_issuer(groups_claim="https://example.com/roles")]
    claims: dict[str, Any] = {"https://example.com/roles": ["admins"]}
    token = idp_token(**claims)
    assert verify(token, issuers).groups == ("admins",)


@pytest.mark.parametrize("leeway", [-1, 1000])
def test_bad_leeway_is_a_config_error(leeway: float) -> None:
    with pytest.raises(ConfigError):
        verify(idp_token(), leeway=leeway)


# -- the JWKS cache --------------------------------------------------------------------


def test_fetches_once_and_serves_from_cache() -> None:
    idp = FakeIdp(JWKS)
    cache = JwksCache(idp.fetch, refetch_interval=60, max_age=3600)
    issuers = [url_issuer()]
    for i in range(5):
        verify(idp_token(), issuers, cache=cache, now=NOW + i)
    verify(idp_token("ES256"), issuers, cache=cache, now=NOW + 10)
    assert idp.calls == [URL]


def test_unknown_kid_refetches_at_most_once_per_interval() -> None:
    idp = FakeIdp({"keys": [public_jwk(RSA_KEY, "rsa1")]})
    cache = JwksCache(idp.fetch, refetch_interval=60, max_age=3600)
    issuers = [url_issuer()]
    verify(idp_token(), issuers, cache=cache, now=NOW)
    assert len(idp.calls) == 1
    # Within the interval after any fetch, an unknown kid fetches nothing.
    reject(idp_token(kid="bogus"), "does not publish", issuers=issuers, cache=cache, now=NOW + 59)
    assert len(idp.calls) == 1
    # A flood of tokens with made-up kids: one refetch, then nothing for 60 s.
    for i in range(20):
        reject(
            idp_token(kid=f"bogus{i}"),
            "does not publish",
            issuers=issuers,
            cache=cache,
            now=NOW + 60 + i,
        )
    assert len(idp.calls) == 2
    # The IdP rotates in a new key: within the interval it is not fetched yet...
    idp.jwks = {"keys": [public_jwk(RSA_KEY, "rsa1"), public_jwk(RSA_KEY_2, "rsa2")]}
    new = idp_token(kid="rsa2", key=RSA_KEY_2)
    reject(new, "does not publish", issuers=issuers, cache=cache, now=NOW + 119.9)
    assert len(idp.calls) == 2
    # ...and once the interval has passed, one refetch finds it.
    assert verify(new, issuers, cache=cache, now=NOW + 120).sub == "alice"
    assert len(idp.calls) == 3
    verify(new, issuers, cache=cache, now=NOW + 121)
    verify(idp_token(), issuers, cache=cache, now=NOW + 122)
    assert len(idp.calls) == 3


def test_keys_older_than_max_age_are_refetched() -> None:
    idp = FakeIdp(JWKS)
    cache = JwksCache(idp.fetch, refetch_interval=10, max_age=100)
    issuers = [url_issuer()]
    verify(idp_token(), issuers, cache=cache, now=NOW)
    verify(idp_token(), issuers, cache=cache, now=NOW + 99)
    assert len(idp.calls) == 1
    # The IdP withdrew rsa1; after max_age the cache notices.
    idp.jwks = {"keys": [public_jwk(ED_KEY, "ed1")]}
    reject(idp_token(), "does not publish", issuers=issuers, cache=cache, now=NOW + 100)
    assert len(idp.calls) == 2


def test_fetch_failures_are_unavailable_and_rate_limited() -> None:
    idp = FakeIdp(JWKS)
    idp.fail = True
    cache = JwksCache(idp.fetch, refetch_interval=30)
    issuers = [url_issuer()]
    with pytest.raises(Unavailable, match="could not fetch"):
        verify(idp_token(), issuers, cache=cache, now=NOW)
    # A failing IdP is not hammered: within the interval, no new fetch, and deny.
    reject(idp_token(), "does not publish", issuers=issuers, cache=cache, now=NOW + 5)
    assert len(idp.calls) == 1
    idp.fail = False
    verify(idp_token(), issuers, cache=cache, now=NOW + 30)
    assert len(idp.calls) == 2


@pytest.mark.parametrize("garbage", [{"keys": "x"}, {}, {"keys": [1] * 101}])
def test_garbage_jwks_is_unavailable(garbage: dict[str, Any]) -> None:
    cache = JwksCache(FakeIdp(garbage).fetch)
    with pytest.raises(Unavailable, match="unusable"):
        verify(idp_token(), [url_issuer()], cache=cache)


def test_fetched_sets_skip_unusable_and_ambiguous_keys() -> None:
    served = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "rsa1"},  # skipped: symmetric
            public_jwk(EC256_KEY, "ec256"),
            public_jwk(EC384_KEY, "ec256"),  # ambiguous kid: dropped altogether
            {**public_jwk(ED_KEY, "ed1"), "d": "AAAA"},  # skipped: private
            "junk",
        ]
    }
    cache = JwksCache(FakeIdp(served).fetch)
    issuers = [url_issuer()]
    reject(idp_token("RS256"), "does not publish", issuers=issuers, cache=cache)
    reject(idp_token("ES256"), "does not publish", issuers=issuers, cache=cache, now=NOW + 60)
    reject(idp_token("EdDSA"), "does not publish", issuers=issuers, cache=cache, now=NOW + 120)


def test_concurrent_unknown_kids_share_one_fetch() -> None:
    idp = FakeIdp(JWKS, delay=0.01)
    cache = JwksCache(idp.fetch, refetch_interval=60)
    issuers = [url_issuer()]

    async def main() -> list[Identity]:
        return await asyncio.gather(
            *(
                verify_idp_token(idp_token(), issuers, cache=cache, now=NOW, leeway=30)
                for _ in range(10)
            )
        )

    assert len(run(main)) == 10
    assert len(idp.calls) == 1


def test_cache_is_keyed_by_url_so_tenants_cannot_poison_each_other() -> None:
    """Tenant B names the same issuer with its own JWKS URL; A's keys are unaffected."""
    real = FakeIdp({"keys": [public_jwk(RSA_KEY, "rsa1")]})
    evil_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    evil = FakeIdp({"keys": [public_jwk(evil_key, "rsa1")]})
    urls = {URL: real, "https://evil.example/jwks": evil}

    async def fetch(url: str) -> Mapping[str, Any]:
        return await urls[url].fetch(url)

    cache = JwksCache(fetch)
    tenant_a = [url_issuer()]
    tenant_b = [url_issuer(jwks_url="https://evil.example/jwks")]
    forged = idp_token(key=evil_key, sub="admin")
    assert verify(forged, tenant_b, cache=cache).sub == "admin"  # B trusts it: B's choice
    reject(forged, "signature verification failed", issuers=tenant_a, cache=cache)
    assert verify(idp_token(), tenant_a, cache=cache).sub == "alice"


def test_cache_parameters() -> None:
    with pytest.raises(ConfigError):
        JwksCache(FakeIdp(JWKS).fetch, refetch_interval=-1)
    with pytest.raises(ConfigError):
        JwksCache(FakeIdp(JWKS).fetch, refetch_interval=100, max_age=10)


# -- token exchange end to end ---------------------------------------------------------


def test_groups_map_to_permissions_end_to_end() -> None:
    tenant = "acme"
    policies = [
        Policy.create(
            tenant, "readers", ["stream.subscribe:namespace:acme/*", "cache.read:tenant:acme"]
        ),
        Policy.create(tenant, "orders", ["stream.manage:namespace:acme/orders"]),
        Policy.create(tenant, "admin", ["tenant.manage:tenant:acme"]),
    ]
    bindings = [
        RoleBinding("group:eng", ("readers",)),
        RoleBinding("group:ops", ("orders",), issuer=ISS),
        RoleBinding("group:ops", ("admin",), issuer="https://other-idp.example"),
    ]
    ring = TenantKeyRing.create(tenant, NOW)
    issuers = [inline_issuer()]

    def exchange(idp: str, requested: list[str] | None, now: float = NOW) -> PermissionSet:
        identity = verify(idp, issuers, now=now)
        granted = grant(
            bindings, policies, identity.sub, identity.groups, tenant, issuer=identity.issuer
        )
        perms = granted if requested is None else narrow(requested, granted)
        token = ring.mint(
            now, issuer="felix/acme", audience="gw", sub=identity.sub, perms=perms, ttl=300
        )
        claims = verify_felix_token(
            token, ring.jwks(now), issuer="felix/acme", audience="gw", now=now, leeway=30
        )
        assert (claims.sub, claims.tid) == (identity.sub, tenant)
        return claims.perms

    full = exchange(idp_token(), None)
    assert full.allows("stream.publish", "stream:acme/orders/eu")  # ops -> orders
    assert full.allows("stream.subscribe", "stream:acme/billing/x")  # eng -> readers
    assert not full.allows("stream.publish", "stream:acme/billing/x")
    assert not full.allows("tenant.manage", "tenant:acme")  # bound for another issuer only
    assert not full.allows("stream.subscribe", "stream:zeta/orders/eu")

    narrowed = exchange(
        idp_token(),
        [
            "stream.publish:stream:acme/orders/eu",  # kept
            "stream.publish:namespace:acme/*",  # wider than granted: dropped
            "tenant.manage:tenant:acme",  # not granted: dropped
            "cache.read:tenant:zeta",  # another tenant: dropped
        ],
    )
    assert narrowed.to_strings() == ["stream.publish:stream:acme/orders/eu"]

    only_eng = exchange(idp_token(groups=["eng"]), None)
    assert not only_eng.allows("stream.publish", "stream:acme/orders/eu")
    assert len(exchange(idp_token(groups=[], sub="nobody"), None)) == 0  # no bindings: deny
