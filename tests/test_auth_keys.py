"""Tests for felix.auth.keys: the rotation timeline, publishing, signing and storage."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from felix.auth.keys import KeyState, TenantKeyRing, ed25519_kid
from felix.auth.perms import PermissionSet
from felix.auth.tokens import verify_felix_token
from felix.errors import BadRequest, ConfigError, Unauthenticated, Unavailable

T0 = 1_700_000_000.0
TTL = 900
AHEAD = 300.0
LEEWAY = 30.0
RETAIN = TTL + LEEWAY
ISS = "https://felix.example/tenants/acme"
AUD = "felix-gateway"
PERMS = PermissionSet("acme", ["stream.subscribe:tenant:acme"])


def new_ring() -> TenantKeyRing:
    return TenantKeyRing.create("acme", T0, max_token_ttl=TTL, publish_ahead=AHEAD, leeway=LEEWAY)


def kids(ring: TenantKeyRing, now: float) -> list[str]:
    return [k["kid"] for k in ring.jwks(now)["keys"]]


def mint(ring: TenantKeyRing, now: float, ttl: int | None = None) -> str:
    return ring.mint(now, issuer=ISS, audience=AUD, sub="alice", perms=PERMS, ttl=ttl)


def verify(token: str, jwks: dict[str, Any], now: float) -> str:
    claims = verify_felix_token(token, jwks, issuer=ISS, audience=AUD, now=now, leeway=LEEWAY)
    return claims.kid


def test_new_ring_signs_at_once() -> None:
    ring = new_ring()
    (times,) = ring.schedule()
    assert times.state(T0) is KeyState.ACTIVE
    assert kids(ring, T0) == [times.kid]
    assert ring.signer(T0).kid == times.kid
    assert verify(mint(ring, T0), ring.jwks(T0), T0) == times.kid
    assert ring.next_change(T0) is None
    jwk = ring.jwks(T0)["keys"][0]
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": jwk["x"],
        "kid": times.kid,
        "alg": "EdDSA",
        "use": "sig",
    }


def test_rotation_timeline() -> None:
    ring = new_ring()
    k1 = ring.signer(T0).kid
    t1 = T0 + 10_000
    k2 = ring.rotate(t1)
    assert k2 != k1
    switch = t1 + AHEAD
    drop = switch + RETAIN

    # Published at once, not signing until publish_ahead has passed.
    assert ring.state(k2, t1) is KeyState.NEXT
    assert kids(ring, t1) == [k1, k2]
    assert ring.signer(switch - 0.001).kid == k1
    assert ring.state(k1, switch - 0.001) is KeyState.ACTIVE
    assert ring.next_change(t1) == switch

    # The switch: k2 signs, k1 is retired but still published.
    assert ring.signer(switch).kid == k2
    assert ring.state(k2, switch) is KeyState.ACTIVE
    assert ring.state(k1, switch) is KeyState.RETIRED
    assert kids(ring, switch) == [k1, k2]
    assert ring.next_change(switch) == drop

    # Kept until every token k1 signed has expired (plus leeway), then dropped.
    assert kids(ring, drop - 0.001) == [k1, k2]
    assert ring.state(k1, drop) is KeyState.DROPPED
    assert kids(ring, drop) == [k2]
    assert ring.next_change(drop) is None

    # prune() forgets only dropped keys, and only once they are dropped.
    assert ring.prune(drop - 0.001) == []
    assert ring.prune(drop) == [k1]
    assert [k.kid for k in ring.schedule()] == [k2]
    assert ring.state(k1, drop) is KeyState.DROPPED
    assert ring.signer(drop).kid == k2


def test_publish_before_sign_over_many_rotations() -> None:
    """Every token verifies against any copy of the JWK set up to publish_ahead old."""
    ring = new_ring()
    rotations = [T0 + AHEAD + 50, T0 + 2_000, T0 + 2_000 + AHEAD, T0 + 9_000]
    end = T0 + 12_000
    t = T0 + AHEAD  # from here on, a verifier may hold a copy fetched AHEAD ago
    seen: set[str] = set()
    while t < end:
        while rotations and rotations[0] <= t:
            ring.rotate(rotations.pop(0))
        kid = ring.signer(t).kid
        seen.add(kid)
        for age in (0.0, AHEAD / 2, AHEAD):
            assert kid in kids(ring, t - age), (t, age)
        token = mint(ring, t)
        assert verify(token, ring.jwks(t - AHEAD), t) == kid  # the stalest allowed copy
        t += 37.0
    assert len(seen) == 5


def test_tokens_signed_before_rotation_verify_until_they_expire() -> None:
    ring = new_ring()
    t1 = T0 + 5_000
    ring.rotate(t1)
    switch = t1 + AHEAD
    # The last token the old key signs, with the longest lifetime allowed.
    last = switch - 0.5
    token = mint(ring, last)
    old_kid = ring.signer(last).kid
    exp = int(last) + TTL
    for now in (last, switch, switch + 1, exp, exp + LEEWAY - 0.001):
        assert verify(token, ring.jwks(now), now) == old_kid, now
    with pytest.raises(Unauthenticated, match="expired"):
        verify(token, ring.jwks(exp + LEEWAY), exp + LEEWAY)
    # Once dropped, the key is gone from the set altogether.
    drop = switch + RETAIN
    assert exp + LEEWAY <= drop
    with pytest.raises(Unauthenticated, match="unknown key"):
        verify(token, ring.jwks(drop), drop - RETAIN)
    ring.prune(drop)
    with pytest.raises(Unauthenticated, match="unknown key"):
        verify(token, ring.jwks(drop), last)


def test_only_one_rotation_may_be_pending() -> None:
    ring = new_ring()
    t1 = T0 + 100
    ring.rotate(t1)
    with pytest.raises(BadRequest, match="already pending"):
        ring.rotate(t1 + AHEAD - 1)
    k3 = ring.rotate(t1 + AHEAD)  # once the previous key is active
    assert ring.state(k3, t1 + AHEAD) is KeyState.NEXT


def test_rotate_with_zero_publish_ahead_refuses_a_simultaneous_switch() -> None:
    ring = TenantKeyRing.create("acme", T0, publish_ahead=0)
    with pytest.raises(BadRequest, match="too soon"):
        ring.rotate(T0)
    k2 = ring.rotate(T0 + 1)
    assert ring.signer(T0 + 1).kid == k2


def test_no_signing_before_the_first_key_activates() -> None:
    ring = new_ring()
    with pytest.raises(Unavailable):
        ring.signer(T0 - 1)


def test_mint_limits() -> None:
    ring = new_ring()
    with pytest.raises(ConfigError):
        mint(ring, T0, ttl=TTL + 1)
    with pytest.raises(ConfigError):
        mint(ring, T0, ttl=0)
    with pytest.raises(BadRequest, match="tenant 'zeta'"):
        ring.mint(T0, issuer=ISS, audience=AUD, sub="a", perms=PermissionSet("zeta"))
    token = mint(ring, T0)
    assert (
        verify_felix_token(token, ring.jwks(T0), issuer=ISS, audience=AUD, now=T0, leeway=0).exp
        == int(T0) + TTL
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_token_ttl": 0},
        {"max_token_ttl": 24 * 3600 + 1},
        {"max_token_ttl": 1.5},
        {"publish_ahead": -1},
        {"publish_ahead": float("inf")},
        {"leeway": -1},
        {"leeway": 301},
    ],
)
def test_bad_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        TenantKeyRing.create("acme", T0, **kwargs)


def test_bad_tenant() -> None:
    with pytest.raises(BadRequest):
        TenantKeyRing.create("*", T0)


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 8037, appendix A.1 and A.3: the example Ed25519 key and its thumbprint.
    d = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
    key = Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(d + "="))
    assert ed25519_kid(key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


# -- storage ---------------------------------------------------------------------------


def test_json_round_trip_keeps_keys_and_timeline() -> None:
    ring = new_ring()
    ring.rotate(T0 + 1_000)
    text = ring.to_json()
    copy = TenantKeyRing.from_json(text)
    assert copy.schedule() == ring.schedule()
    assert copy.to_json() == text
    for now in (T0, T0 + 1_000 + AHEAD):
        assert copy.jwks(now) == ring.jwks(now)
        # A token from the stored copy verifies with the original's keys and back.
        assert verify(mint(copy, now), ring.jwks(now), now) == ring.signer(now).kid
        assert verify(mint(ring, now), copy.jwks(now), now) == copy.signer(now).kid


def test_published_set_holds_no_private_material() -> None:
    ring = new_ring()
    ring.rotate(T0 + 1)
    for jwk in ring.jwks(T0 + 1)["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    stored = ring.to_dict()["keys"][0]["private_key"]
    assert stored not in json.dumps(ring.jwks(T0 + 1))


def _stored() -> dict[str, Any]:
    ring = new_ring()
    ring.rotate(T0 + 1_000)
    data: dict[str, Any] = json.loads(ring.to_json())
    return data


def _other_key_dict() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(new_ring().to_json())["keys"][0]
    return data


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.pop("keys"), "no key list"),
        (lambda d: d.update(keys=[]), "at least one key"),
        (lambda d: d.pop("leeway"), "missing leeway"),
        (lambda d: d.update(max_token_ttl="900"), "max_token_ttl"),
        (lambda d: d["keys"][0].update(kid=d["keys"][1]["kid"]), "thumbprint"),
        (lambda d: d["keys"][0].update(private_key="short"), "private_key"),
        (lambda d: d["keys"][0].update(private_key=None), "private_key"),
        (lambda d: d["keys"][0].update(activate_at=None), "activate_at"),
        (lambda d: d["keys"][1].update(published_at=d["keys"][1]["activate_at"] + 1), "before"),
        (lambda d: d["keys"].reverse(), "increasing"),
        (lambda d: d["keys"][1].update(_other_key_dict() | {"activate_at": T0}), "increasing"),
        (lambda d: d["keys"].__setitem__(0, "x"), "not an object"),
    ],
)
def test_corrupt_storage_is_refused(mutate: Any, why: str) -> None:
    data = _stored()
    mutate(data)
    with pytest.raises(ConfigError, match=why):
        TenantKeyRing.from_json(json.dumps(data))


def test_non_json_storage_is_refused() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        TenantKeyRing.from_json("{")
    with pytest.raises(ConfigError):
        TenantKeyRing.from_json("[]")
