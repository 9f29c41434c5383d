"""The control plane's REST API (FastAPI): tenants, namespaces, streams, caches, change feed.

``create_app(store)`` returns the ASGI app; serve it with uvicorn. The OpenAPI
document is at ``/v1/openapi.json`` and interactive docs at ``/docs``.

Resources, each with list / create / get / update / delete::

    /v1/tenants[/{tenant}]
    /v1/tenants/{tenant}/namespaces[/{ns}]
    /v1/tenants/{tenant}/namespaces/{ns}/streams[/{stream}]
    /v1/tenants/{tenant}/namespaces/{ns}/caches[/{cache}]
    /v1/tenants/{tenant}/issuers[/{issuer}]      trusted OIDC identity providers
    /v1/tenants/{tenant}/policies[/{policy}]     named lists of permissions
    /v1/tenants/{tenant}/bindings[/{binding}]    a user or group -> policies

The package, one module per concern:

- :mod:`.app`: :func:`create_app`, the wiring;
- :mod:`.access`: each route's access rule, declared at the route (``@requires``);
- :mod:`.security`: authentication by those rules, and their OpenAPI declaration;
- :mod:`.problems`: error answers as RFC 9457 problems;
- :mod:`.auditing`: the audit-log lines of changes, exchanges and refusals;
- :mod:`.resources`: the CRUD routes, generated from one description per kind;
- :mod:`.tokens`: the token exchange and the published JWK sets;
- :mod:`.feed`: snapshot and change feed; :mod:`.system`: info, health, regions.
- :mod:`.observe`: who the caller is, and the node's live status (its health port);
- :mod:`.console`: the web console's static files at ``/ui/``.

Errors are problems (``application/problem+json``), mapped from felix errors in one
table (:data:`felix.control.schemas.PROBLEM_TYPES`): 400 BadRequest (names, settings,
headers), 422 a request that does not match the OpenAPI schema, 404 NotFound, 409
AlreadyExists / HasChildren, 412 VersionConflict, 410 CursorTooOld, 503 Overloaded /
Unavailable.
"""

from __future__ import annotations

from felix.control.api.access import Access, Permission, Rule
from felix.control.api.app import ROUTES, create_app
from felix.control.api.feed import MAX_LIMIT, MAX_WAIT
from felix.control.api.problems import PROBLEM_MEDIA_TYPE
from felix.control.api.security import TOKEN_LEEWAY, authenticate, route_access
from felix.control.api.tokens import IDP_LEEWAY, JWKS_MAX_AGE

__all__ = [
    "IDP_LEEWAY",
    "JWKS_MAX_AGE",
    "MAX_LIMIT",
    "MAX_WAIT",
    "PROBLEM_MEDIA_TYPE",
    "ROUTE_ACCESS",
    "TOKEN_LEEWAY",
    "Access",
    "Permission",
    "Rule",
    "authenticate",
    "create_app",
]

#: What each /v1 route needs, by path (read from the routes' own declarations: every
#: method of a path has the same rule).
ROUTE_ACCESS: dict[str, Rule] = {path: rule for (path, _), rule in route_access(ROUTES).items()}
