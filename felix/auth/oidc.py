"""Verifying identity-provider (OIDC) tokens against a tenant's trusted issuers.

Each tenant lists the issuers it trusts (:class:`IssuerConfig`): the issuer URL, the
audience its tokens must carry, the public-key algorithms they may use, and where
their keys are (a JWKS URL, or a JWK set written into the config). A token is only
accepted if its ``iss`` names one of them, its ``alg`` is one that issuer allows,
its ``kid`` names a key of that issuer that fits the algorithm, the signature
verifies, and ``aud``, ``exp``, ``nbf`` and ``iat`` pass at the ``now`` passed in.

:class:`JwksCache` holds fetched key sets. It does no I/O itself: the caller injects
an async ``fetch(url)`` returning the parsed JWK set (and bounding its size and
time). A token with a ``kid`` the cache does not know triggers a refetch, at most
once per ``refetch_interval`` per key set, so a flood of tokens with made-up kids
costs the identity provider one request per interval.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from felix.auth.rbac import check_principal
from felix.auth.tokens import (
    check_issuer_audience,
    check_leeway,
    check_time_claims,
    key_fits_algorithm,
    public_keys_by_kid,
    read_header,
    read_kid,
    read_unverified_claims,
    verify_signature,
)
from felix.errors import BadRequest, ConfigError, Unauthenticated, Unavailable

__all__ = [
    "ALLOWED_ALGORITHMS",
    "MAX_GROUPS",
    "Fetch",
    "Identity",
    "IssuerConfig",
    "JwksCache",
    "verify_idp_token",
]

#: The algorithms an issuer may be configured with: public-key signatures only.
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)

#: Most groups read from one token; more make the token unusable (fail closed).
MAX_GROUPS = 256

_MAX_URL_CHARS = 2048
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

#: ``fetch(jwks_url)``: the injected HTTP GET, returning the JWK set as parsed JSON.
Fetch = Callable[[str], Awaitable[Mapping[str, Any]]]


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url or len(url) > _MAX_URL_CHARS:
        raise BadRequest(f"jwks_url must be a URL of at most {_MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise BadRequest("jwks_url is not a valid URL") from None
    # Keys fetched over plain HTTP could be swapped in transit; only a local
    # development identity provider may use it.
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host in _LOOPBACK_HOSTS:
        return url
    raise BadRequest("jwks_url must be https:// (http:// only for localhost)")


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One identity provider a tenant trusts.

    Args:
        issuer: must equal the tokens' ``iss`` exactly.
        audience: must be, or be in, the tokens' ``aud``.
        algorithms: the algorithms its tokens may use, from :data:`ALLOWED_ALGORITHMS`.
        jwks_url: where its JWK set is fetched (https, or http on localhost), or
        jwks: its JWK set, written into the config; exactly one of the two.
        groups_claim: the claim that lists the user's groups (a list of strings).

    Raises:
        BadRequest: any field is invalid; in particular an HMAC (``HS*``) or ``none``
            algorithm, both or neither of ``jwks_url`` and ``jwks``, an inline key that
            is private or symmetric, or inline keys none of which fits ``algorithms``.
    """

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    jwks: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    groups_claim: str = "groups"
    _inline_keys: dict[str, dict[str, Any]] = field(
        init=False, repr=False, hash=False, compare=False
    )

    def __post_init__(self) -> None:
        check_principal("issuer", self.issuer)
        check_principal("audience", self.audience)
        check_principal("groups_claim", self.groups_claim)
        if isinstance(self.algorithms, str) or not self.algorithms:
            raise BadRequest("issuer algorithms must be a non-empty list")
        algorithms = tuple(self.algorithms)
        for alg in algorithms:
            if isinstance(alg, str) and alg.upper().startswith("HS"):
                # A shared-secret algorithm would let anyone holding the issuer's
                # *public* key forge tokens (the classic algorithm-confusion attack).
                raise BadRequest(f"issuer algorithm {alg!r} refused: HMAC is not allowed")
            if alg not in ALLOWED_ALGORITHMS:
                raise BadRequest(
                    f"issuer algorithm {alg!r} refused: allowed are "
                    f"{', '.join(sorted(ALLOWED_ALGORITHMS))}"
                )
        object.__setattr__(self, "algorithms", algorithms)
        if (self.jwks_url is None) == (self.jwks is None):
            raise BadRequest("an issuer needs exactly one of jwks_url and jwks")
        inline: dict[str, dict[str, Any]] = {}
        if self.jwks is None:
            _check_url(self.jwks_url)
        else:
            public_keys_by_kid(self.jwks, strict=True)  # first: it may not even be a mapping
            # Keep a private copy, so later changes to the caller's dict change nothing.
            object.__setattr__(self, "jwks", copy.deepcopy(dict(self.jwks)))
            inline = public_keys_by_kid(self.jwks, strict=True)
            if not inline:
                raise BadRequest("the issuer's inline JWK set has no keys")
            # Keys of other types may sit in a pasted set; but if none can verify any
            # allowed algorithm, no token could ever pass: surely a mistake.
            if not any(key_fits_algorithm(k, a) for k in inline.values() for a in algorithms):
                raise BadRequest("no key of the issuer's inline JWK set fits its algorithms")
        object.__setattr__(self, "_inline_keys", inline)

    def inline_key(self, kid: str) -> dict[str, Any] | None:
        """The inline key named ``kid``, or None (also when keys come from ``jwks_url``)."""
        return self._inline_keys.get(kid)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``jwks_url`` or ``jwks``, whichever is set)."""
        out: dict[str, Any] = {
            "issuer": self.issuer,
            "audience": self.audience,
            "algorithms": list(self.algorithms),
            "groups_claim": self.groups_claim,
        }
        if self.jwks_url is not None:
            out["jwks_url"] = self.jwks_url
        else:
            out["jwks"] = self.jwks
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IssuerConfig:
        """Build a config from :meth:`to_dict`'s form (``groups_claim`` optional).

        Raises:
            BadRequest: a field is missing, unknown, of the wrong type, or invalid.
        """
        if not isinstance(data, Mapping):
            raise BadRequest("an issuer config must be a JSON object")
        known = {"issuer", "audience", "algorithms", "jwks_url", "jwks", "groups_claim"}
        unknown = data.keys() - known
        if unknown:
            raise BadRequest(f"issuer config has unknown field(s) {', '.join(sorted(unknown))}")
        missing = {"issuer", "audience", "algorithms"} - data.keys()
        if missing:
            raise BadRequest(f"issuer config is missing {', '.join(sorted(missing))}")
        algorithms = data["algorithms"]
        if not isinstance(algorithms, list):
            raise BadRequest("issuer algorithms must be a list")
        return cls(
            issuer=data["issuer"],
            audience=data["audience"],
            algorithms=tuple(algorithms),
            jwks_url=data.get("jwks_url"),
            jwks=data.get("jwks"),
            groups_claim=data.get("groups_claim", "groups"),
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an identity-provider token says the caller is."""

    sub: str
    groups: tuple[str, ...]
    issuer: str


@dataclass(slots=True)
class _Entry:
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetched_at: float | None = None
    last_attempt: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JwksCache:
    """Issuer keys by ``kid``, fetched through an injected function and cached.

    Entries are keyed by JWKS URL, not by issuer name, so a tenant that configures a
    well-known issuer with a JWKS URL of its own cannot change the keys another
    tenant verifies that issuer's tokens with.

    Args:
        fetch: ``await fetch(url)`` returns the JWK set; it should bound the response
            size and time. Any exception it raises becomes :class:`Unavailable`.
        refetch_interval: at most one fetch per URL per this many seconds, whatever
            triggers it (unknown kid, stale keys, earlier failure).
        max_age: keys fetched longer ago than this are not used until a refetch
            succeeds, so a key the issuer withdrew stops working within ``max_age``.

    Raises:
        ConfigError: ``refetch_interval`` is negative or ``max_age`` is below it.
    """

    def __init__(self, fetch: Fetch, *, refetch_interval: float = 30.0, max_age: float = 3600.0):
        if not 0 <= refetch_interval <= max_age:
            raise ConfigError("need 0 <= refetch_interval <= max_age")
        self._fetch = fetch
        self.refetch_interval = refetch_interval
        self.max_age = max_age
        self._entries: dict[str, _Entry] = {}

    async def key(self, issuer: IssuerConfig, kid: str, now: float) -> dict[str, Any] | None:
        """The key ``kid`` of ``issuer`` at time ``now``, or None if it has none usable.

        Inline keys are returned directly. For a JWKS URL, a cached key younger than
        ``max_age`` is returned without fetching; otherwise the set is refetched
        unless a fetch for that URL started less than ``refetch_interval`` ago, in
        which case the answer is None. Concurrent callers share one fetch.

        Raises:
            Unavailable: the fetch failed or returned something that is not a JWK set.
        """
        if issuer.jwks_url is None:
            return issuer.inline_key(kid)
        url = issuer.jwks_url
        entry = self._entries.get(url)
        if entry is None:
            entry = self._entries[url] = _Entry()
        jwk = self._fresh(entry, kid, now)
        if jwk is not None:
            return jwk
        async with entry.lock:
            # Whoever held the lock may just have fetched the key we need.
            jwk = self._fresh(entry, kid, now)
            if jwk is not None:
                return jwk
            last = entry.last_attempt
            # A clock that stepped back (now < last) does not block fetching forever.
            if last is not None and 0 <= now - last < self.refetch_interval:
                return None
            entry.last_attempt = now
            try:
                raw = await self._fetch(url)
            except Exception as exc:  # any failure of the injected I/O
                raise Unavailable(f"could not fetch the JWK set of {issuer.issuer}") from exc
            try:
                entry.keys = public_keys_by_kid(raw, strict=False)
            except BadRequest as exc:
                raise Unavailable(f"the JWK set of {issuer.issuer} is unusable: {exc}") from None
            entry.fetched_at = now
            return entry.keys.get(kid)

    def _fresh(self, entry: _Entry, kid: str, now: float) -> dict[str, Any] | None:
        if entry.fetched_at is None or not 0 <= now - entry.fetched_at < self.max_age:
            return None
        return entry.keys.get(kid)


async def verify_idp_token(
    token: str,
    issuers: Sequence[IssuerConfig],
    *,
    cache: JwksCache,
    now: float,
    leeway: float,
) -> Identity:
    """Verify an identity provider's token for a tenant that trusts ``issuers``.

    The token's ``iss`` must name exactly one of ``issuers``; its header ``alg`` must
    be one that issuer allows and its ``kid`` a key of that issuer (from ``cache``)
    that fits the algorithm; the signature must verify; ``aud`` must be or contain the
    issuer's audience; ``exp`` is required (``now < exp + leeway``), ``nbf`` and
    ``iat`` are checked if present (``<= now + leeway``); ``sub`` must be a non-empty
    printable string; the groups claim, if present, a list of at most
    :data:`MAX_GROUPS` such strings.

    Raises:
        Unauthenticated: any check fails (no issuers configured included); the
            message says why and does not contain the token.
        Unavailable: the issuer's keys could not be fetched.
        ConfigError: ``leeway`` is out of range.
    """
    check_leeway(leeway)
    if not issuers:
        raise Unauthenticated("this tenant trusts no identity provider")
    header = read_header(token)
    # The unverified iss only chooses which issuer's keys to try; everything is checked
    # again after the signature verifies.
    iss = read_unverified_claims(token).get("iss")
    matches = [c for c in issuers if c.issuer == iss]
    if len(matches) != 1:
        raise Unauthenticated("token issuer is not trusted by this tenant")
    config = matches[0]
    alg = header.get("alg")
    if alg not in config.algorithms:
        raise Unauthenticated(
            f"token algorithm {str(alg)[:16]!r} is not allowed for issuer {config.issuer}"
        )
    kid = read_kid(header)
    jwk = await cache.key(config, kid, now)
    if jwk is None:
        raise Unauthenticated(f"token signed by a key issuer {config.issuer} does not publish")
    claims = verify_signature(token, jwk, alg)
    check_issuer_audience(claims, issuer=config.issuer, audience=config.audience)
    check_time_claims(claims, now=now, leeway=leeway, require_iat=False, integer=False)
    try:
        sub = check_principal("token subject", claims.get("sub"))
        groups = _groups(claims.get(config.groups_claim))
    except BadRequest as exc:
        raise Unauthenticated(str(exc)) from None
    return Identity(sub=sub, groups=groups, issuer=config.issuer)


def _groups(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_GROUPS:
        raise BadRequest(f"token groups claim must be a list of at most {MAX_GROUPS} groups")
    return tuple(dict.fromkeys(check_principal("token group", g) for g in value))
