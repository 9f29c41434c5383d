"""The token exchange and each tenant's published keys.

``POST /v1/tenants/{tenant}/token/exchange`` trades an identity provider's JWT
(``Authorization: Bearer ...``) for a short-lived Felix token holding what the
tenant's bindings grant that identity (optionally narrowed by a body
``{"permissions": [...]}``, never widened); ``GET
/v1/tenants/{tenant}/.well-known/jwks.json`` publishes the keys that verify it. Both
answer 503 when the app has no key directory. The checking and minting is
:mod:`felix.auth` (:mod:`felix.auth.minting`); this module translates HTTP.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Body, Header, Request, Response

from felix.auth.minting import granted_permissions
from felix.auth.oidc import verify_idp_token
from felix.auth.rbac import Policy
from felix.auth.tokens import read_unverified_claims
from felix.control.api.access import Access, requires
from felix.control.api.auditing import audit_exchange, caller_of
from felix.control.api.context import ContextDep
from felix.control.api.guard import GuardedRoute
from felix.control.api.problems import errors
from felix.control.api.resources import TenantName
from felix.control.api.security import bearer
from felix.control.model import BindingSpec, IssuerSpec, ResourceKind, check_path
from felix.control.schemas import Jwks, TokenExchange, TokenOut
from felix.errors import FelixError, NotFound, Unavailable

__all__ = ["IDP_LEEWAY", "JWKS_MAX_AGE", "router"]

#: Clock leeway, in seconds, for the exp/nbf/iat of identity-provider tokens.
IDP_LEEWAY = 30.0
#: Seconds clients may cache ``/.well-known/jwks.json`` (rotation publishes ahead far longer).
JWKS_MAX_AGE = 60

router = APIRouter(prefix="/v1", route_class=GuardedRoute)

Authorization = Annotated[
    str | None,
    Header(description="Bearer TOKEN: the identity provider's JWT (an id or access token)."),
]


def _claimed_issuer(authorization: str | None) -> str:
    """The ``iss`` a bearer JWT claims (unverified; "" if none): for the audit log only."""
    try:
        iss = read_unverified_claims(bearer(authorization)).get("iss")
    except FelixError:
        return ""
    return iss if isinstance(iss, str) else ""


@router.post(
    "/tenants/{tenant}/token/exchange",
    tags=["auth"],
    summary="Trade an identity provider's token for a Felix token",
    responses=errors(400, 401, 403, 404, 422, 503),
)
@requires(Access.PUBLIC)  # it authenticates with the identity provider's token itself
async def exchange_token(
    tenant: TenantName,
    ctx: ContextDep,
    response: Response,
    authorization: Authorization = None,
    body: Annotated[TokenExchange | None, Body()] = None,
) -> TokenOut:
    """Verify the bearer token against the tenant's trusted issuers, and mint a Felix token.

    The token's ``iss`` must name one of the tenant's issuers; its signature, algorithm,
    ``aud``, ``exp`` and ``nbf`` are checked (30 s leeway). Its ``sub`` and groups are
    matched against the tenant's role bindings; the Felix token holds the permissions
    of the policies they name, or, if the body lists ``permissions``, those of them
    that are granted (never more). 401: the token is missing or invalid; 403: nothing
    is granted; 503: no key directory, or the tenant has no signing keys yet.
    """
    who, issuer = "anonymous", _claimed_issuer(authorization)
    try:
        auth = ctx.token_auth()
        check_path(ResourceKind.TENANT, (tenant,))
        token = bearer(authorization)
        store = ctx.store
        issuers = [
            IssuerSpec.model_validate(r.spec).config()
            for r in await store.list_resources(ResourceKind.ISSUER, (tenant,))
        ]
        now = ctx.clock()
        identity = await verify_idp_token(
            token, issuers, cache=auth.idp_keys, now=now, leeway=IDP_LEEWAY
        )
        who, issuer = identity.sub, identity.issuer
        policies = [
            Policy.create(tenant, r.name, r.spec["permissions"])
            for r in await store.list_resources(ResourceKind.POLICY, (tenant,))
        ]
        bindings = [
            BindingSpec.model_validate(r.spec).binding()
            for r in await store.list_resources(ResourceKind.BINDING, (tenant,))
        ]
        requested = None if body is None else body.permissions
        granted = granted_permissions(identity, tenant, policies, bindings, requested)
        minted = await auth.keys.mint(tenant, identity.sub, granted, now)
    except FelixError as exc:
        audit_exchange(tenant, who, issuer, exc)
        raise
    audit_exchange(tenant, who, issuer, None)
    response.headers["Cache-Control"] = "no-store"
    return TokenOut(access_token=minted.token, expires_in=minted.expires_in)


@router.get(
    "/tenants/{tenant}/.well-known/jwks.json",
    tags=["auth"],
    summary="The tenant's token signing keys",
    responses=errors(400, 404, 503),
)
@requires(Access.PUBLIC)  # brokers and clients fetch them
async def tenant_jwks(
    tenant: TenantName, ctx: ContextDep, request: Request, response: Response
) -> Jwks:
    """The public keys that verify the tenant's Felix tokens (cacheable for a minute).

    404: no such tenant, or it has no signing keys yet: one answer for both, so the
    public route does not tell which tenants exist. To the admin token (a node
    mirroring the sets) a tenant without keys yet is 503, which it retries. 503 also:
    no key directory.
    """
    auth = ctx.token_auth()
    check_path(ResourceKind.TENANT, (tenant,))
    jwks = auth.keys.jwks(tenant, time.monotonic())
    exists = await ctx.store.get(ResourceKind.TENANT, (tenant,)) is not None
    if jwks is None and exists and caller_of(request).admin:
        raise Unavailable(f"tenant {tenant} has no signing keys yet")
    if jwks is None or not exists:
        raise NotFound(f"tenant {tenant} publishes no signing keys")
    response.headers["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE}"
    return Jwks(keys=list(jwks["keys"]))
