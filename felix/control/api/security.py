"""Authentication of REST callers, by the rule each route declares (see :mod:`.access`).

With ``require_auth``, every route but the public ones needs ``Authorization: Bearer
TOKEN``: the bootstrap admin token (allowed everything) or a Felix token of the
route's tenant holding the permission the route's rule names. 401 (with
``WWW-Authenticate: Bearer``): no or an invalid token; 403: a valid token that does
not allow it. Without ``require_auth`` (loopback dev mode) everything is allowed.
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import Request
from starlette.routing import BaseRoute

from felix.auth.tokens import Claims
from felix.control.api.access import Access, Rule, endpoint_rule, route_rule
from felix.control.api.auditing import start_request
from felix.control.api.context import ControlContext, context
from felix.control.api.problems import errors
from felix.errors import PermissionDenied, Unauthenticated
from felix.regions import check_token_region

__all__ = [
    "BEARER_SCHEME",
    "TOKEN_LEEWAY",
    "authenticate",
    "bearer",
    "declare_security",
    "route_access",
]

#: Clock leeway, in seconds, for the iat/exp of Felix tokens sent to this API.
TOKEN_LEEWAY = 30.0
#: The name of the bearer scheme in the OpenAPI document.
BEARER_SCHEME = "bearer"


async def authenticate(request: Request) -> None:
    """Check the caller may do what the route it was routed to does.

    Without ``require_auth`` it allows everything. Otherwise the route's rule decides
    (a route without one is admin-only: fail closed): the admin token may do
    everything; a Felix token must verify against its tenant's keys, be of the route's
    tenant and hold the rule's permission.

    Raises:
        Unauthenticated: (401) no bearer token, or one that does not verify.
        PermissionDenied: (403) a valid token that does not allow the request.
    """
    ctx = context(request)
    caller = start_request(request)
    if not ctx.require_auth:
        caller.admin = True  # loopback dev mode: everything is allowed
        return
    rule = route_rule(request.scope) or Access.ADMIN
    authorization = request.headers.get("authorization")
    if rule is Access.PUBLIC:
        # Anyone may call it; the admin token, if sent, may be told more (such as the
        # JWKS route telling a node's follower a tenant without keys from a missing one).
        with contextlib.suppress(Unauthenticated):
            caller.admin = _is_admin(ctx, bearer(authorization))
        return
    token = bearer(authorization, "a Felix token or the admin token")
    if _is_admin(ctx, token):
        caller.who, caller.admin = "admin", True
        return
    claims = _verify(ctx, token)
    caller.who, caller.tenant = claims.sub, claims.tid
    if isinstance(rule, Access):
        if rule is Access.ANY:
            return
        raise PermissionDenied("only the admin token may do this")
    params = request.path_params
    tenant = params.get("tenant")
    if tenant != claims.tid:
        raise PermissionDenied(f"the token is for tenant {claims.tid}, not {tenant}")
    obj = rule.object_for(params)
    if not claims.perms.allows(rule.action, obj):
        raise PermissionDenied(f"the token does not allow {rule.action} on {obj}")


def _is_admin(ctx: ControlContext, token: str) -> bool:
    return ctx.admin_token is not None and hmac.compare_digest(
        token.encode("utf-8"), ctx.admin_token.encode("utf-8")
    )


def bearer(authorization: str | None, what: str = "the identity provider's token") -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header; Unauthenticated otherwise."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(f"send {what} as Authorization: Bearer ...")
    return token


def _verify(ctx: ControlContext, token: str) -> Claims:
    """The claims of a Felix token, verified with its tenant's published keys."""
    if ctx.auth is None:
        raise Unauthenticated("this control plane accepts only the admin token (no key directory)")
    claims = ctx.auth.keys.verify(token, ctx.clock(), time.monotonic(), leeway=TOKEN_LEEWAY)
    # A token issued in another region (or, the region being set, for none) manages
    # nothing here (issue #15); the 401 is audited like every other.
    check_token_region(claims.region, ctx.region, "this control plane")
    return claims


def route_access(routes: Iterable[BaseRoute]) -> dict[tuple[str, str], Rule]:
    """The rule of every guarded operation: ``(path, method)`` -> rule."""
    rules: dict[tuple[str, str], Rule] = {}
    for route in routes:
        rule = endpoint_rule(getattr(route, "endpoint", None))
        if rule is not None:
            for method in getattr(route, "methods", None) or ():
                rules[(getattr(route, "path", ""), method.lower())] = rule
    return rules


def declare_security(schema: dict[str, Any], rules: Mapping[tuple[str, str], Rule]) -> None:
    """The bearer scheme, and on every protected operation its requirement and the
    401 / 403 problems it can answer (403 not for ``any`` routes).

    Declared whether or not the app requires auth: a deployment beyond loopback does.
    """
    schema["components"].setdefault("securitySchemes", {})[BEARER_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A Felix token of the route's tenant holding the permission the route "
        "needs (from `felix token mint` or the token exchange), or the bootstrap admin "
        "token (an opaque secret, allowed everything). Required when the control plane "
        "runs with --auth.",
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            rule = rules.get((path, method), Access.ADMIN)
            if rule is Access.PUBLIC:
                continue
            statuses = (401,) if rule is Access.ANY else (401, 403)
            operation["security"] = [{BEARER_SCHEME: []}]
            responses = operation.setdefault("responses", {})
            for status, response in errors(*statuses).items():
                if status == 401:
                    response["headers"] = {
                        "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}
                    }
                responses.setdefault(str(status), response)
