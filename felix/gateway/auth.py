"""Who a session is: the `auth` frame's token checked, permissions for every request.

Two authenticators:

- :class:`DevAuthenticator` (no ``--auth``): the token is not checked and the
  frame's tenant is used (``default`` when it names none). The node refuses to
  listen beyond loopback in this mode unless ``--insecure``.
- :class:`TokenAuthenticator` (``--auth``): the token must be a Felix JWT
  (felix/auth/tokens.py) signed by a key in its tenant's JWK set; the tenant
  comes from the token (a frame naming another tenant is refused); requests are
  checked against the token's permissions; the session ends when the token
  expires (plus leeway) unless the client presents a fresh one (REAUTH).

:class:`FailureLimiter` counts failed authentications per source address and
per claimed tenant and makes a key that keeps failing wait longer before its
next attempt is checked (bounded table, oldest keys forgotten); it never
refuses an attempt outright.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from felix.auth.perms import PermissionSet
from felix.auth.tokens import read_unverified_claims, verify_felix_token
from felix.errors import FelixError, Unauthenticated
from felix.names import validate_name
from felix.regions import check_token_region

#: Seconds of clock skew and of grace after a token's expiry.
DEFAULT_LEEWAY = 5.0


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated session: its tenant, what it may do, and until when (wall clock)."""

    tenant: str
    subject: str
    perms: PermissionSet | None  # None: everything (dev mode)
    expires_at: float | None  # None: never (dev mode)

    def allows_stream(self, action: str, namespace: str, stream: str) -> bool:
        return self.perms is None or self.perms.allows_stream(
            action, self.tenant, namespace, stream
        )

    def allows_cache(self, action: str, namespace: str, cache: str) -> bool:
        return self.perms is None or self.perms.allows_cache(action, self.tenant, namespace, cache)


class Authenticator(Protocol):
    def authenticate(self, token: str, tenant: str) -> Identity:
        """The session's identity for ``token``; ``tenant`` is what the frame named.

        Raises Unauthenticated (or another FelixError) when it must be refused.
        """


class DevAuthenticator:
    """Loopback development mode: trust the frame's tenant."""

    def authenticate(self, token: str, tenant: str) -> Identity:
        tenant = tenant or "default"
        validate_name("tenant", tenant)
        return Identity(tenant, "anonymous", None, None)


class TokenAuthenticator:
    """Felix JWTs checked against each tenant's published JWK set.

    ``jwks(tenant, now)`` returns the tenant's public keys or None (unknown tenant:
    deny); it is called with the monotonic clock, token times use ``clock``.
    """

    def __init__(
        self,
        jwks: Callable[[str, float], dict[str, Any] | None],
        *,
        issuer: str,
        audience: str,
        leeway: float = DEFAULT_LEEWAY,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        region: str | None = None,
    ) -> None:
        self._jwks = jwks
        #: This node's region: a token issued for another region is refused, and one
        #: without a region claim unless this is the dev default (felix/regions.py).
        self._region = region
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._clock = clock
        self._monotonic = monotonic

    def authenticate(self, token: str, tenant: str) -> Identity:
        if not token:
            raise Unauthenticated("this node requires a token")
        # The tenant's keys are needed to verify; take the tenant named inside the token
        # only to find them: the signature check below is what makes it trustworthy.
        claimed = read_unverified_claims(token).get("tid")
        if not isinstance(claimed, str):
            raise Unauthenticated("token has no tenant")
        try:
            validate_name("tenant", claimed)
        except FelixError:
            raise Unauthenticated("token tenant is not a valid name") from None
        keys = self._jwks(claimed, self._monotonic())
        if keys is None:
            raise Unauthenticated("no signing keys for the token's tenant")
        claims = verify_felix_token(
            token,
            keys,
            issuer=self._issuer,
            audience=self._audience,
            now=self._clock(),
            leeway=self._leeway,
        )
        if tenant and tenant != claims.tid:
            raise Unauthenticated("the token belongs to another tenant than the frame names")
        if self._region is not None:
            # Another region's token, or (region set explicitly) one without the claim.
            check_token_region(claims.region, self._region, "this node")
        return Identity(claims.tid, claims.sub, claims.perms, claims.deadline(self._leeway))


class FailureLimiter:
    """Backs off failed authentications per key (a source address, a claimed tenant).

    The first ``free_failures`` failures of a key within ``window`` seconds cost
    nothing; each further one doubles the wait before that key's next attempt
    is checked, from ``base_delay`` up to ``max_delay`` seconds. An attempt is
    delayed, never refused: a valid token from a source that keeps failing is
    still accepted once the wait is over, so a burst of bad tokens from one
    address cannot lock out the good clients behind it (issue 11, item 10). The
    table holds at most ``max_keys`` keys (the oldest forgotten first).
    """

    def __init__(
        self,
        free_failures: int = 5,
        window: float = 60.0,
        base_delay: float = 0.05,
        max_delay: float = 1.0,
        max_keys: int = 10_000,
    ) -> None:
        self.free_failures = free_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_keys = max_keys
        # key -> (start of its window, failures in it, time of the latest failure)
        self._keys: OrderedDict[str, tuple[float, int, float]] = OrderedDict()

    def ready_at(self, keys: Iterable[str], now: float) -> float:
        """When the next attempt for ``keys`` may be checked (``<= now``: at once)."""
        ready = now
        for key in keys:
            entry = self._keys.get(key)
            if entry is None:
                continue
            start, count, last = entry
            if now - start >= self.window:
                del self._keys[key]
                continue
            over = count - self.free_failures
            if over > 0:
                delay = min(self.base_delay * 2 ** min(over - 1, 30), self.max_delay)
                ready = max(ready, last + delay)
        return ready

    def failed(self, keys: Iterable[str], now: float) -> None:
        for key in keys:
            start, count, _ = self._keys.pop(key, (now, 0, now))
            if now - start >= self.window:
                start, count = now, 0
            self._keys[key] = (start, count + 1, now)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)  # the bound: forget the oldest key
