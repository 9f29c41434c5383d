"""Tests for felix.auth.tokens: minting and verifying Felix tokens, and every rejection."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.auth.perms import PermissionSet
from felix.auth.tokens import (
    MAX_TOKEN_CHARS,
    Claims,
    TokenSigner,
    verify_felix_token,
)
from felix.errors import BadRequest, ConfigError, Unauthenticated

NOW = 1_700_000_000
ISS = "https://felix.example/tenants/acme"
AUD = "felix-gateway"
LEEWAY = 30
TTL = 600

PRIVATE = ed25519.Ed25519PrivateKey.generate()
SIGNER = TokenSigner("k1", PRIVATE)
JWKS = {"keys": [SIGNER.public_jwk()]}
PERMS = PermissionSet("acme", ["stream.publish:namespace:acme/orders", "cache.read:tenant:acme"])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid Felix claims with ``changes`` applied (a value of ... removes the claim)."""
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "tid": "acme",
        "iat": NOW,
        "exp": NOW + TTL,
        "perms": PERMS.to_strings(),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def sign(
    payload: dict[str, Any],
    *,
    key: Any = PRIVATE,
    headers: dict[str, Any] | None = None,
    alg: str = "EdDSA",
) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": "k1", **(headers or {})})


def raw_token(header: dict[str, Any], payload: dict[str, Any] | bytes, signature: bytes) -> str:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return ".".join([b64(json.dumps(header).encode()), b64(body), b64(signature)])


def verify(token: str, *, now: float = NOW, leeway: float = LEEWAY, jwks: Any = JWKS) -> Claims:
    return verify_felix_token(token, jwks, issuer=ISS, audience=AUD, now=now, leeway=leeway)


def reject(token: str, why: str, **kwargs: Any) -> None:
    with pytest.raises(Unauthenticated) as info:
        verify(token, **kwargs)
    message = str(info.value)
    assert why in message, message
    # The message must never carry the token or its signature.
    if len(token) > 8:
        assert token not in message
    if token.count(".") == 2 and len(token.split(".")[2]) > 8:
        assert token.split(".")[2] not in message


# -- the happy path --------------------------------------------------------------------


def test_round_trip() -> None:
    token = SIGNER.mint(issuer=ISS, audience=AUD, sub="alice", perms=PERMS, now=NOW + 0.9, ttl=TTL)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": "k1", "typ": "JWT"}
    got = verify(token)
    assert got == Claims(sub="alice", tid="acme", perms=PERMS, iat=NOW, exp=NOW + TTL, kid="k1")
    assert got.perms.allows("stream.publish", "stream:acme/orders/eu")
    assert got.deadline(LEEWAY) == NOW + TTL + LEEWAY
    body = jwt.decode(token, options={"verify_signature": False})
    assert set(body) == {"iss", "aud", "sub", "tid", "iat", "exp", "perms"}


def test_audience_may_be_a_list_containing_ours() -> None:
    verify(sign(claims(aud=["other", AUD])))
    reject(sign(claims(aud=["other"])), "audience")


def test_nbf_is_honoured_when_present() -> None:
    verify(sign(claims(nbf=NOW + LEEWAY)))
    reject(sign(claims(nbf=NOW + LEEWAY + 1)), "not valid yet")


def test_jwks_with_several_keys_picks_by_kid() -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    jwks = {"keys": [TokenSigner("k0", other).public_jwk(), SIGNER.public_jwk()]}
    token = SIGNER.mint(issuer=ISS, audience=AUD, sub="alice", perms=PERMS, now=NOW, ttl=TTL)
    assert verify(token, jwks=jwks).kid == "k1"
    # Same kid, wrong key: the signature fails.
    wrong = {"keys": [{**TokenSigner("k1", other).public_jwk()}]}
    reject(token, "signature verification failed", jwks=wrong)


# -- leeway boundaries -----------------------------------------------------------------


@pytest.mark.parametrize("leeway", [0, 1, 30])
def test_expiry_boundary(leeway: int) -> None:
    token = sign(claims())
    exp = NOW + TTL
    verify(token, now=exp + leeway - 0.001, leeway=leeway)
    reject(token, "expired", now=exp + leeway, leeway=leeway)
    reject(token, "expired", now=exp + leeway + 1000, leeway=leeway)


@pytest.mark.parametrize("leeway", [0, 1, 30])
def test_issued_in_the_future_boundary(leeway: int) -> None:
    token = sign(claims())
    verify(token, now=NOW - leeway, leeway=leeway)
    reject(token, "issued in the future", now=NOW - leeway - 0.001, leeway=leeway)


@pytest.mark.parametrize("leeway", [0, 1, 30])
def test_not_before_boundary(leeway: int) -> None:
    token = sign(claims(nbf=NOW + 100))
    verify(token, now=NOW + 100 - leeway, leeway=leeway)
    reject(token, "not valid yet", now=NOW + 100 - leeway - 0.001, leeway=leeway)


@pytest.mark.parametrize("leeway", [-1, 301, float("nan"), float("inf"), "5"])
def test_leeway_out_of_range_is_a_config_error(leeway: Any) -> None:
    with pytest.raises(ConfigError):
        verify(sign(claims()), leeway=leeway)


# -- rejections ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"iss": "https://evil.example"}, "issuer"),
        ({"iss": ...}, "issuer"),
        ({"aud": "other"}, "audience"),
        ({"aud": ...}, "audience"),
        ({"aud": [AUD, 5]}, "audience"),
        ({"exp": ...}, "no exp"),
        ({"iat": ...}, "no iat"),
        ({"exp": NOW + 0.5}, "exp is not a number"),
        ({"exp": str(NOW + TTL)}, "exp is not a number"),
        ({"exp": True}, "exp is not a number"),
        ({"iat": float(NOW)}, "iat is not a number"),
        ({"nbf": "soon"}, "nbf is not a number"),
        ({"sub": ...}, "subject"),
        ({"sub": ""}, "subject"),
        ({"sub": 42}, "subject"),
        ({"sub": "ali\nce"}, "subject"),
        ({"sub": "a" * 257}, "subject"),
        ({"tid": ...}, "tid"),
        ({"tid": ""}, "tid"),
        ({"tid": "*"}, "tid"),
        ({"tid": "../zeta"}, "tid"),
        ({"tid": "acme/x"}, "tid"),
        ({"tid": ["acme"]}, "tid"),
        ({"perms": ...}, "perms"),
        ({"perms": "stream.publish:stream:acme/a/b"}, "perms"),
        ({"perms": [1]}, "perms"),
        ({"perms": ["stream.publish:stream:acme/*/b"]}, "perms are malformed"),
        ({"perms": ["stream.publish:stream:zeta/a/b"]}, "perms are malformed"),
        ({"perms": ["everything"]}, "perms are malformed"),
        ({"perms": ["x"] * 2000}, "perms"),
    ],
)
def test_bad_claims_are_rejected(changes: dict[str, Any], why: str) -> None:
    reject(sign(claims(**changes)), why)


def test_tid_decides_the_tenant_and_perms_must_match_it() -> None:
    # A token for zeta carrying acme permissions is malformed, not a way in.
    reject(sign(claims(tid="zeta")), "perms are malformed")
    got = verify(sign(claims(tid="zeta", perms=["cache.read:cache:zeta/a/b"])))
    assert got.tid == "zeta"
    assert not got.perms.allows("cache.read", "cache:acme/a/b")


def test_missing_unknown_and_malformed_kid() -> None:
    payload = claims()
    reject(jwt.encode(payload, PRIVATE, algorithm="EdDSA"), "no usable kid")
    reject(sign(payload, headers={"kid": ""}), "no usable kid")
    reject(sign(payload, headers={"kid": "k" * 300}), "no usable kid")
    reject(sign(payload, headers={"kid": "k2"}), "unknown key")
    bad_kid = raw_token({"alg": "EdDSA", "kid": 7}, payload, b"x" * 64)
    reject(bad_kid, "malformed token")


def test_unknown_kid_with_an_empty_or_broken_jwks() -> None:
    token = sign(claims())
    reject(token, "no usable signing keys", jwks={})
    reject(token, "no usable signing keys", jwks={"keys": "nope"})
    reject(token, "unknown key", jwks={"keys": []})
    # A private JWK in the set is skipped, never used.
    private_jwk = {**SIGNER.public_jwk(), "d": b64(b"\0" * 32)}
    reject(token, "unknown key", jwks={"keys": [private_jwk]})


def test_tampered_signature_is_rejected() -> None:
    token = sign(claims())
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[0] ^= 1
    reject(f"{head}.{body}.{b64(bytes(raw))}", "signature verification failed")
    reject(f"{head}.{body}.", "signature verification failed")


def test_tampered_payload_is_rejected() -> None:
    token = sign(claims())
    head, _, sig = token.split(".")
    widened = claims(perms=["tenant.manage:tenant:acme"])
    forged = f"{head}.{b64(json.dumps(widened).encode())}.{sig}"
    reject(forged, "signature verification failed")


def test_alg_none_is_rejected() -> None:
    for alg in ("none", "None", "NONE", ""):
        reject(raw_token({"alg": alg, "kid": "k1", "typ": "JWT"}, claims(), b""), "not allowed")
    reject(raw_token({"kid": "k1"}, claims(), b""), "not allowed")


def test_hs256_with_the_public_key_as_secret_is_rejected() -> None:
    """The classic algorithm-confusion forgery: HMAC keyed with the published key."""
    public = PRIVATE.public_key()
    secrets = [
        public.public_bytes(Encoding.Raw, PublicFormat.Raw),
        public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        SIGNER.public_jwk()["x"].encode(),
        json.dumps(SIGNER.public_jwk()).encode(),
    ]
    for secret in secrets:
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            header = {"alg": alg, "kid": "k1", "typ": "JWT"}
            head = b64(json.dumps(header).encode())
            body = b64(json.dumps(claims()).encode())
            mac = hmac.new(secret, f"{head}.{body}".encode(), digest).digest()
            reject(f"{head}.{body}.{b64(mac)}", "not allowed")


def test_other_public_key_algorithms_are_rejected() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    jwks = {"keys": [{**jwk, "kid": "k1"}]}
    reject(sign(claims(), key=ec_key, alg="ES256"), "EdDSA only", jwks=jwks)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    reject(sign(claims(), key=rsa_key, alg="RS256"), "EdDSA only")


def test_eddsa_header_with_a_non_ed25519_key_in_the_jwks_is_rejected() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    reject(sign(claims()), "cannot verify EdDSA", jwks={"keys": [{**jwk, "kid": "k1"}]})
    # A JWK that declares another alg is not used for EdDSA either.
    declared = {**SIGNER.public_jwk(), "alg": "ES256"}
    reject(sign(claims()), "cannot verify EdDSA", jwks={"keys": [declared]})
    enc = {**SIGNER.public_jwk(), "use": "enc"}
    reject(sign(claims()), "unknown key", jwks={"keys": [enc]})


def test_tokens_of_another_tenants_ring_do_not_verify() -> None:
    zeta = TokenSigner("k1", ed25519.Ed25519PrivateKey.generate())  # same kid, other key
    token = zeta.mint(
        issuer=ISS, audience=AUD, sub="mallory", perms=PermissionSet("acme"), now=NOW, ttl=TTL
    )
    reject(token, "signature verification failed")


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("", "missing token"),
        ("abc", "malformed"),
        ("a.b", "malformed"),
        ("a.b.c", "malformed"),
        ("!!!.###.$$$", "malformed"),
        ("x" * (MAX_TOKEN_CHARS + 1), "longer than"),
    ],
)
def test_garbage_is_rejected(token: str, why: str) -> None:
    reject(token, why)


def test_non_string_token_is_rejected() -> None:
    with pytest.raises(Unauthenticated, match="missing token"):
        verify(None)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="missing token"):
        verify(b"a.b.c")  # type: ignore[arg-type]


def test_payload_must_be_a_json_object() -> None:
    for body in (b"[1, 2]", b"not json", b'"text"'):
        header = {"alg": "EdDSA", "kid": "k1"}
        head = b64(json.dumps(header).encode())
        signing_input = f"{head}.{b64(body)}".encode()
        token = f"{head}.{b64(body)}.{b64(PRIVATE.sign(signing_input))}"
        reject(token, "payload")


def test_unsupported_critical_header_is_rejected() -> None:
    reject(sign(claims(), headers={"crit": ["exp"], "exp": 1}), "malformed")


# -- minting ---------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -5, 1.5, True, None])
def test_mint_refuses_bad_ttl(ttl: Any) -> None:
    with pytest.raises(ConfigError):
        SIGNER.mint(issuer=ISS, audience=AUD, sub="alice", perms=PERMS, now=NOW, ttl=ttl)


@pytest.mark.parametrize(
    ("field", "value"), [("sub", ""), ("sub", "a\x00"), ("issuer", ""), ("audience", "")]
)
def test_mint_refuses_bad_claims(field: str, value: str) -> None:
    args: dict[str, Any] = {"issuer": ISS, "audience": AUD, "sub": "alice"}
    args[field] = value
    with pytest.raises(BadRequest):
        SIGNER.mint(**args, perms=PERMS, now=NOW, ttl=TTL)


def test_signer_accepts_only_ed25519() -> None:
    with pytest.raises(ConfigError):
        TokenSigner("k1", ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TokenSigner("", PRIVATE)
    assert "d" not in SIGNER.public_jwk()
    assert SIGNER.public_jwk()["kid"] == "k1"


# -- fuzzing: hostile input gets Unauthenticated, nothing else -------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzz_token_text(text: str) -> None:
    with contextlib.suppress(Unauthenticated):
        verify(text)


@st.composite
def corrupted(draw: st.DrawFn, valid: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """``valid`` with up to two entries removed or replaced (or an ``extra`` one added)."""
    out = dict(valid)
    for name in draw(st.sets(st.sampled_from(sorted(valid) + extra), max_size=2)):
        value = draw(st.none() | json_values)  # None here means "remove the entry"
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


FUZZ_HEADER = corrupted({"alg": "EdDSA", "kid": "k1"}, ["typ", "crit", "b64"])
FUZZ_PAYLOAD = corrupted(claims(), ["nbf"])


@settings(max_examples=400, deadline=None)
@given(
    header=FUZZ_HEADER,
    payload=FUZZ_PAYLOAD,
    jwk=st.dictionaries(
        st.sampled_from(["kty", "crv", "x", "kid", "alg", "use", "d"]), json_values
    ),
)
def test_fuzz_structured_tokens_and_keys(
    header: dict[str, Any], payload: dict[str, Any], jwk: dict[str, Any]
) -> None:
    # Signed for real with the trusted key, so the claim checks are reached too.
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(payload).encode())
    token = f"{head}.{body}.{b64(PRIVATE.sign(f'{head}.{body}'.encode()))}"
    for jwks in (JWKS, {"keys": [jwk]}, {"keys": [{**SIGNER.public_jwk(), **jwk}]}):
        try:
            got = verify(token, jwks=jwks)
        except Unauthenticated:
            continue
        # Accepted: then it really was a complete, valid token.
        assert set(payload) >= {"iss", "aud", "sub", "tid", "iat", "exp", "perms"}
        assert got.tid == payload["tid"] and got.perms.to_strings() == sorted(payload["perms"])
