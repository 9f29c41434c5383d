"""A tenant key directory as the control plane uses it: mint, publish and verify Felix tokens.

The control plane's token exchange and JWKS route, and its check of the Felix tokens
callers send, all go through one :class:`TenantKeys`, so its HTTP handlers only
translate requests and answers::

    keys = TenantKeys(keys_dir)
    identity = await verify_idp_token(idp_token, issuers, cache=..., now=now, leeway=30)
    perms = granted_permissions(identity, tenant, policies, bindings, requested)
    minted = await keys.mint(tenant, identity.sub, perms, now)   # minted.token, .expires_in
    jwks = keys.jwks(tenant, monotonic_now)                      # None: no signing keys
    claims = keys.verify(felix_token, now, leeway=30)

Times are passed in (Unix seconds; ``jwks`` takes monotonic seconds for its file
recheck timer). Key rings are read from disk on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from felix.auth.files import AUDIENCE, ISSUER, JwksDirectory, load_ring
from felix.auth.oidc import Identity
from felix.auth.perms import PermissionSet, narrow
from felix.auth.rbac import Policy, RoleBinding, grant
from felix.auth.tokens import Claims, read_unverified_claims, verify_felix_token
from felix.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable

__all__ = ["Minted", "TenantKeys", "granted_permissions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Minted:
    """A freshly minted Felix token and the longest it lives, in seconds."""

    token: str
    expires_in: int


def granted_permissions(
    identity: Identity,
    tenant: str,
    policies: Iterable[Policy],
    bindings: Iterable[RoleBinding],
    requested: Iterable[str] | None = None,
) -> PermissionSet:
    """What ``tenant``'s bindings grant ``identity``, narrowed to ``requested`` if given.

    Raises:
        PermissionDenied: nothing is granted (or nothing requested is).
        BadRequest: a requested permission is malformed, or the config is corrupt.
    """
    granted = grant(
        bindings, policies, identity.sub, identity.groups, tenant, issuer=identity.issuer
    )
    if requested is not None:
        granted = narrow(requested, granted)
    if not granted:
        raise PermissionDenied(f"{identity.sub} is granted no permissions in tenant {tenant}")
    return granted


class TenantKeys:
    """The tenants' key rings and published JWK sets in one key directory."""

    def __init__(self, directory: Path, *, region: str | None = None) -> None:
        self.directory = Path(directory)
        self.published = JwksDirectory(self.directory)
        #: The region minted tokens are issued for (their ``region`` claim), if any.
        self.region = region

    def jwks(self, tenant: str, monotonic_now: float) -> dict[str, Any] | None:
        """The tenant's public JWK set, or None when it has no signing keys (or no such name)."""
        return self.published.jwks(tenant, monotonic_now)

    def verify(self, token: str, now: float, monotonic_now: float, *, leeway: float) -> Claims:
        """The claims of a Felix token, verified with its own tenant's published keys.

        Raises:
            Unauthenticated: the token names no tenant with keys, or does not verify.
        """
        tid = read_unverified_claims(token).get("tid")
        jwks = self.jwks(tid, monotonic_now) if isinstance(tid, str) else None
        if jwks is None:
            raise Unauthenticated("the token names no tenant with signing keys")
        return verify_felix_token(
            token, jwks, issuer=ISSUER, audience=AUDIENCE, now=now, leeway=leeway
        )

    async def mint(self, tenant: str, sub: str, perms: PermissionSet, now: float) -> Minted:
        """A token for ``sub`` holding ``perms``, signed by the tenant's active key.

        Raises:
            Unavailable: the tenant has no key ring (or no key active at ``now``).
        """
        try:
            ring = await asyncio.to_thread(load_ring, self.directory, tenant)
        except NotFound:
            # The answer goes to a remote caller: the server's path is only logged.
            log.warning(
                "tenant %s has no key ring in %s: run `felix token keygen --tenant %s --dir %s`",
                tenant, self.directory, tenant, self.directory,
            )  # fmt: skip
            raise Unavailable(f"tenant {tenant} has no signing keys yet") from None
        token = ring.mint(
            now, issuer=ISSUER, audience=AUDIENCE, sub=sub, perms=perms, region=self.region
        )
        return Minted(token, ring.max_token_ttl)
