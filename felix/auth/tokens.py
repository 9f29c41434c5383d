"""Felix access tokens: minting and verifying short-lived EdDSA JWTs.

A Felix token is a JWT signed with the tenant's current Ed25519 key (see
:mod:`felix.auth.keys`), with the key's ``kid`` in the header and the claims ``iss``,
``aud``, ``sub``, ``tid`` (the tenant), ``iat``, ``exp`` (whole seconds) and ``perms``
(a list of permission strings, see :mod:`felix.auth.perms`).

This module also holds the JWT checks shared with :mod:`felix.auth.oidc`: reading the
header without trusting it, choosing a key by ``kid``, checking that the key fits the
pinned algorithm, verifying the signature with PyJWT, and checking ``iss``, ``aud``,
``exp``, ``nbf`` and ``iat`` against a ``now`` the caller passes in. PyJWT's own claim
checks are not used because they read the clock.

Every rejection raises :class:`~felix.errors.Unauthenticated` with a message that says
why and never contains the token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.api_jws import PyJWS

from felix.auth.perms import MAX_PERMISSIONS, PermissionSet
from felix.auth.rbac import MAX_SUBJECT_CHARS, check_principal
from felix.errors import BadRequest, ConfigError, FelixError, Unauthenticated
from felix.names import validate_name
from felix.unverified_jwt import MAX_TOKEN_CHARS, read_header, read_unverified_claims

__all__ = [
    "FELIX_ALGORITHM",
    "MAX_JWKS_KEYS",
    "MAX_LEEWAY",
    "MAX_TOKEN_CHARS",
    "Claims",
    "TokenSigner",
    "check_issuer_audience",
    "check_leeway",
    "check_time_claims",
    "ed25519_jwk",
    "key_fits_algorithm",
    "public_keys_by_kid",
    "read_header",
    "read_kid",
    "read_unverified_claims",
    "verify_felix_token",
    "verify_signature",
]

#: The only algorithm Felix tokens are signed or verified with.
FELIX_ALGORITHM = "EdDSA"

#: Most keys read from one JWK set; more make the set unusable.
MAX_JWKS_KEYS = 100

#: Largest clock leeway a verifier may be configured with, in seconds.
MAX_LEEWAY = 300.0

# The key type (and curve) each allowed public-key algorithm needs. HS* and "none"
# are absent on purpose: an algorithm not listed here never verifies anything.
_KEY_FOR_ALG: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", "Ed25519"),
}

_JWS = PyJWS()

# Members of a JWK that only a private (or symmetric) key has.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def check_leeway(leeway: float) -> float:
    """Return ``leeway`` if it is a finite number of seconds in [0, :data:`MAX_LEEWAY`].

    Raises:
        ConfigError: it is not.
    """
    if not isinstance(leeway, int | float) or not 0 <= leeway <= MAX_LEEWAY:
        raise ConfigError(f"leeway must be between 0 and {MAX_LEEWAY} seconds, got {leeway!r}")
    return leeway


def key_fits_algorithm(jwk: Mapping[str, Any], alg: str) -> bool:
    """True if the public JWK ``jwk`` can verify signatures made with ``alg``.

    The key type (and curve) must be the one ``alg`` needs, a key that declares its own
    ``alg`` must declare this one, and a key that declares ``use`` must say ``sig``.
    Always false for algorithms outside the public-key list (HS*, none).
    """
    need = _KEY_FOR_ALG.get(alg)
    if need is None:
        return False
    kty, crv = need
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
        return False
    if "alg" in jwk and jwk["alg"] != alg:
        return False
    return bool(jwk.get("use", "sig") == "sig")


def public_keys_by_kid(jwks: object, *, strict: bool) -> dict[str, dict[str, Any]]:
    """Index the public signing keys of a JWK set (``{"keys": [...]}``) by ``kid``.

    A usable key is a JSON object with a non-empty string ``kid``, a ``kty`` of RSA, EC
    or OKP, no private or symmetric key material, and ``use`` absent or ``sig``.
    With ``strict`` (configuration a tenant wrote) any other key, a duplicate ``kid``
    or more than :data:`MAX_JWKS_KEYS` keys raise :class:`BadRequest`. Without it (a
    set fetched from an identity provider) unusable keys are skipped, and a ``kid``
    that appears twice is dropped: which key it means would be a guess.

    Raises:
        BadRequest: ``jwks`` is not a JWK set, or (``strict``) has an unusable key.
    """
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise BadRequest('a JWK set must be a JSON object with a "keys" list')
    keys: list[object] = jwks["keys"]
    if len(keys) > MAX_JWKS_KEYS:
        raise BadRequest(f"a JWK set may hold at most {MAX_JWKS_KEYS} keys, got {len(keys)}")
    out: dict[str, dict[str, Any]] = {}
    duplicates: set[str] = set()
    for i, key in enumerate(keys):
        problem = _jwk_problem(key)
        if problem is not None:
            if strict:
                raise BadRequest(f"JWK set key {i}: {problem}")
            continue
        assert isinstance(key, dict)  # _jwk_problem checked it
        kid = key["kid"]
        if kid in out or kid in duplicates:
            if strict:
                raise BadRequest(f"JWK set key {i}: duplicate kid {_preview(kid)}")
            out.pop(kid, None)
            duplicates.add(kid)
            continue
        out[kid] = key
    return out


def _jwk_problem(key: object) -> str | None:
    if not isinstance(key, dict):
        return "not a JSON object"
    kid = key.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_SUBJECT_CHARS:
        return "needs a kid of 1 to 256 characters"
    if key.get("kty") not in ("RSA", "EC", "OKP"):
        return f"key type {_preview(key.get('kty'))} is not a public-key type (RSA, EC, OKP)"
    if key.keys() & _PRIVATE_MEMBERS:
        return "contains private key material"
    if key.get("use", "sig") != "sig":
        return "is not a signing key (use must be sig)"
    return None


def read_kid(header: Mapping[str, Any]) -> str:
    """The header's ``kid``.

    Raises:
        Unauthenticated: it is missing or not a non-empty string of at most 256 characters.
    """
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_SUBJECT_CHARS:
        raise Unauthenticated("token header has no usable kid")
    return kid


def verify_signature(token: str, jwk: Mapping[str, Any], alg: str) -> dict[str, Any]:
    """Verify ``token``'s signature with public key ``jwk`` and return its claims.

    ``alg`` is the algorithm the caller pinned (and checked against the header). The
    key must fit it (:func:`key_fits_algorithm`); RSA keys must have at least 2048 bits.
    The payload must be a JSON object.

    Raises:
        Unauthenticated: the key does not fit, the signature is wrong, or the payload
            is not a JSON object.
    """
    if not key_fits_algorithm(jwk, alg):
        raise Unauthenticated(f"key {_preview(jwk.get('kid'))} cannot verify {alg}")
    try:
        # The PyJWK is bound to the pinned algorithm, and PyJWT refuses a header alg
        # that differs from it, so the token cannot choose how it is verified.
        key = jwt.PyJWK(dict(jwk), algorithm=alg)
        decoded = _JWS.decode_complete(
            token, key=key, algorithms=[alg], options={"enforce_minimum_key_length": True}
        )
    except jwt.InvalidSignatureError:
        raise Unauthenticated("token signature verification failed") from None
    except jwt.InvalidKeyError:
        raise Unauthenticated(f"key {_preview(jwk.get('kid'))} is unusable for {alg}") from None
    except jwt.PyJWTError:
        raise Unauthenticated("malformed token") from None
    try:
        payload = json.loads(decoded["payload"])
    except (ValueError, RecursionError):
        raise Unauthenticated("token payload is not JSON") from None
    if not isinstance(payload, dict):
        raise Unauthenticated("token payload is not a JSON object")
    return payload


def _numeric_date(claims: Mapping[str, Any], name: str, *, integer: bool = False) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not math.isfinite(value):
        raise Unauthenticated(f"token claim {name} is not a number of seconds")
    return float(value)


def check_time_claims(
    claims: Mapping[str, Any], *, now: float, leeway: float, require_iat: bool, integer: bool
) -> tuple[float | None, float]:
    """Check ``exp``, ``nbf`` and ``iat`` at time ``now`` (Unix seconds) with ``leeway``.

    The token is valid while ``now < exp + leeway``, once ``nbf <= now + leeway``
    (if ``nbf`` is present), and if ``iat <= now + leeway`` (if present; required when
    ``require_iat``). With ``integer`` the dates must be whole seconds. Returns
    ``(iat, exp)``.

    Raises:
        Unauthenticated: a claim is missing, not a number, or fails its check.
        ConfigError: ``leeway`` is out of range.
    """
    check_leeway(leeway)
    exp = _numeric_date(claims, "exp", integer=integer)
    if exp is None:
        raise Unauthenticated("token has no exp claim")
    if now >= exp + leeway:
        raise Unauthenticated("token expired")
    nbf = _numeric_date(claims, "nbf", integer=integer)
    if nbf is not None and nbf > now + leeway:
        raise Unauthenticated("token not valid yet (nbf is in the future)")
    iat = _numeric_date(claims, "iat", integer=integer)
    if iat is None and require_iat:
        raise Unauthenticated("token has no iat claim")
    if iat is not None and iat > now + leeway:
        raise Unauthenticated("token issued in the future (iat)")
    return iat, exp


def check_issuer_audience(claims: Mapping[str, Any], *, issuer: str, audience: str) -> None:
    """Check that ``iss`` equals ``issuer`` and ``aud`` is or contains ``audience``.

    Raises:
        Unauthenticated: either does not match (or is missing or malformed).
    """
    if claims.get("iss") != issuer:
        raise Unauthenticated(f"token issuer is not {issuer!r}")
    aud = claims.get("aud")
    if isinstance(aud, str):
        ok = aud == audience
    elif isinstance(aud, list):
        ok = audience in aud and all(isinstance(a, str) for a in aud)
    else:
        ok = False
    if not ok:
        raise Unauthenticated(f"token audience does not include {audience!r}")


def ed25519_jwk(public_key: Ed25519PublicKey, kid: str) -> dict[str, str]:
    """The public JWK (RFC 8037) for an Ed25519 key, marked for EdDSA signatures."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = jwt.utils.base64url_encode(raw).decode("ascii")
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": x,
        "kid": kid,
        "alg": FELIX_ALGORITHM,
        "use": "sig",
    }


class TokenSigner:
    """Signs Felix tokens with one Ed25519 key, named by ``kid`` in each token's header."""

    __slots__ = ("_key", "kid")

    def __init__(self, kid: str, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(kid, str) or not kid or len(kid) > MAX_SUBJECT_CHARS:
            raise ConfigError("a signing key needs a kid of 1 to 256 characters")
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError("Felix tokens are signed with Ed25519 keys only")
        self.kid = kid
        self._key = private_key

    def public_jwk(self) -> dict[str, str]:
        """The public half of the key as a JWK."""
        return ed25519_jwk(self._key.public_key(), self.kid)

    def mint(
        self,
        *,
        issuer: str,
        audience: str,
        sub: str,
        perms: PermissionSet,
        now: float,
        ttl: int,
        region: str | None = None,
    ) -> str:
        """A token for ``sub`` in ``perms.tenant`` holding ``perms``.

        ``iat`` is ``now`` rounded down to whole seconds and ``exp`` is ``iat + ttl``.

        Raises:
            BadRequest: ``sub`` is not a usable subject, or issuer or audience is empty.
            ConfigError: ``ttl`` is not a positive whole number of seconds.
        """
        check_principal("token subject", sub)
        check_principal("token issuer", issuer)
        check_principal("token audience", audience)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            raise ConfigError(f"token ttl must be a positive whole number of seconds, got {ttl!r}")
        iat = math.floor(now)
        claims = {
            "iss": issuer,
            "aud": audience,
            "sub": sub,
            "tid": perms.tenant,
            "iat": iat,
            "exp": iat + ttl,
            "perms": perms.to_strings(),
        }
        if region is not None:
            # The region the token was issued for: a node of another region refuses it.
            claims["region"] = validate_name("region", region)
        return jwt.encode(claims, self._key, algorithm=FELIX_ALGORITHM, headers={"kid": self.kid})


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified Felix token says.

    ``tid`` is the tenant every request of the session acts in; ``perms`` holds only
    permissions in that tenant. ``iat`` and ``exp`` are Unix seconds.
    """

    sub: str
    tid: str
    perms: PermissionSet
    iat: int
    exp: int
    kid: str
    #: The region the token was issued for (None: a token without the claim).
    region: str | None = None

    def deadline(self, leeway: float) -> float:
        """When a session holding this token must be closed: ``exp + leeway``."""
        return self.exp + leeway


def verify_felix_token(
    token: str,
    jwks: Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float,
) -> Claims:
    """Verify a Felix token against the tenant's JWK set and return its claims.

    The header must name ``alg`` EdDSA and a ``kid`` found in ``jwks`` (an Ed25519
    key); the signature must verify; ``iss`` must equal ``issuer`` and ``aud``
    ``audience``; ``iat`` and ``exp`` must be whole seconds with ``iat <= now + leeway``
    and ``now < exp + leeway`` (and ``nbf``, if present, ``<= now + leeway``); ``sub``
    must be a usable subject, ``tid`` a valid tenant name and ``perms`` a list of valid
    permissions, all in tenant ``tid``.

    Raises:
        Unauthenticated: any of these fails; the message says which, not the token.
        ConfigError: ``leeway`` is negative or larger than :data:`MAX_LEEWAY`.
    """
    check_leeway(leeway)
    header = read_header(token)
    alg = header.get("alg")
    if alg != FELIX_ALGORITHM:
        raise Unauthenticated(f"token algorithm {_preview(alg)} is not allowed (EdDSA only)")
    kid = read_kid(header)
    try:
        keys = public_keys_by_kid(jwks, strict=False)
    except BadRequest:
        raise Unauthenticated("no usable signing keys for this tenant") from None
    jwk = keys.get(kid)
    if jwk is None:
        raise Unauthenticated(f"token signed by unknown key {_preview(kid)}")
    claims = verify_signature(token, jwk, FELIX_ALGORITHM)
    check_issuer_audience(claims, issuer=issuer, audience=audience)
    iat, exp = check_time_claims(claims, now=now, leeway=leeway, require_iat=True, integer=True)
    assert iat is not None  # require_iat
    try:
        sub = check_principal("token subject", claims.get("sub"))
    except BadRequest as exc:
        raise Unauthenticated(str(exc)) from None
    tid = claims.get("tid")
    try:
        if not isinstance(tid, str):
            raise BadRequest("not a string")
        validate_name("tenant", tid)
    except BadRequest:
        raise Unauthenticated("token tid is not a valid tenant name") from None
    raw_perms = claims.get("perms")
    if (
        not isinstance(raw_perms, list)
        or len(raw_perms) > MAX_PERMISSIONS
        or not all(isinstance(p, str) for p in raw_perms)
    ):
        raise Unauthenticated("token perms must be a list of permission strings")
    try:
        perms = PermissionSet(tid, raw_perms)
    except BadRequest as exc:
        raise Unauthenticated(f"token perms are malformed: {exc}") from None
    region = claims.get("region")
    if region is not None:
        try:
            validate_name("region", region)
        except FelixError:
            raise Unauthenticated("token region is not a valid region name") from None
    return Claims(sub=sub, tid=tid, perms=perms, iat=int(iat), exp=int(exp), kid=kid, region=region)
