"""Wiring: :func:`create_app` puts the routers, the error answers and the settings together."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Any

from fastapi import FastAPI

import felix
from felix.auth.fetch import fetch_jwks as default_fetch_jwks
from felix.auth.minting import TenantKeys
from felix.auth.oidc import Fetch, JwksCache
from felix.control.api import console, feed, observe, registrations, resources, system, tokens
from felix.control.api.auditing import audit_refused
from felix.control.api.context import ControlContext, NodeInfo, TokenAuth
from felix.control.api.problems import install
from felix.control.api.security import declare_security, route_access
from felix.control.limits import HttpLimits
from felix.control.quotas import NodeQuotas
from felix.control.schemas import NAME_DESCRIPTION, Problem
from felix.control.store import Store

__all__ = ["ROUTERS", "ROUTES", "create_app"]

#: Every router of the API, in the order of the OpenAPI document.
ROUTERS = (
    resources.router,
    tokens.router,
    feed.router,
    registrations.router,
    system.router,
    observe.router,
)
#: Their routes (``app.routes`` may hold the routers, not the routes, once included).
ROUTES = tuple(route for router in ROUTERS for route in router.routes)

_DESCRIPTION = """\
Tenants, namespaces, streams and caches of a felix cluster, and the change feed
brokers follow.

- **Create**: POST to a collection with `name` and settings; 201 with `Location`
  and `ETag`. **Update**: PATCH with the settings to change (a nested object such
  as `queue` merges one level).
- **Versions**: every resource has one, sent as its `ETag`; PATCH and DELETE take
  `If-Match` and answer 412 when the stored version differs.
- **Deletes** of a tenant or namespace with resources under it are refused (409)
  unless `cascade=true`.
- **Feed**: `GET /v1/snapshot`, then `GET /v1/changes?since=<position>&wait=30`
  in a loop; 410 means re-snapshot.
- **Errors** are `application/problem+json` (RFC 9457); each `type` URI is
  documented at its URL.
- **Names**: NAME_RULE.
""".replace("NAME_RULE", NAME_DESCRIPTION)


class _App(FastAPI):
    """FastAPI, with the Problem schema and the bearer scheme in the OpenAPI document."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = Problem.model_json_schema()
            declare_security(schema, route_access(ROUTES))
        return self.openapi_schema or {}


def create_app(
    store: Store,
    *,
    region: str = "local",
    node_info: NodeInfo | None = None,
    keys_dir: FilePath | None = None,
    fetch_jwks: Fetch | None = None,
    clock: Callable[[], float] = time.time,
    admin_token: str | None = None,
    require_auth: bool = False,
    limits: HttpLimits | None = None,
    quotas: NodeQuotas | None = None,
) -> FastAPI:
    """The control-plane API over ``store``.

    The app does not open or close ``store``: the caller owns its lifecycle
    (``await store.open()`` before serving, ``await store.close()`` after),
    because the node shares one store between this API and other users of it.
    Closing the store also ends long-polls that are waiting on it.

    ``region`` is the node's region (the only one streams may name for now);
    ``node_info`` is shown as ``node`` by ``GET /v1/system/info``: a dict, or a
    function returning one (called per request, so it can stay current).

    ``keys_dir`` is the tenants' key directory (as written by ``felix token keygen``):
    without it the token exchange and JWKS routes answer 503. ``fetch_jwks(url)``
    fetches an identity provider's JWK set (default :func:`felix.auth.fetch.fetch_jwks`);
    the app keeps one :class:`~felix.auth.oidc.JwksCache` over it. ``clock`` is Unix
    time in seconds, used to check and mint tokens.

    ``require_auth`` makes every route but the public ones need a bearer token (see
    :func:`~felix.control.api.security.authenticate`): ``admin_token`` (the bootstrap
    credential, allowed everything) or a Felix token verified with the tenant's keys
    in ``keys_dir``. Without it (the default: loopback dev mode) every request is allowed.
    Authentication runs before any of the body is read (see :mod:`.guard`).

    ``limits``: the body's size and time limits (default :class:`HttpLimits`); serve
    the app with :func:`felix.control.api.serving.server_config` and the same limits
    for the connection limits.

    ``quotas``: the node memory that budgets and tenant quotas are checked against
    (felix/control/quotas.py; default: the defaults of ``felix up``).
    """
    if admin_token is not None and not admin_token:
        raise ValueError("admin_token must not be empty")
    app = _App(
        title="felix control plane",
        version=felix.__version__,
        description=_DESCRIPTION,
        openapi_url="/v1/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    auth = None
    if keys_dir is not None:
        auth = TokenAuth(
            # Tokens minted here carry this cluster's region.
            TenantKeys(FilePath(keys_dir), region=region),
            JwksCache(fetch_jwks or default_fetch_jwks),
        )
    app.state.control = ControlContext(
        store,
        region,
        node_info or {},
        auth,
        clock,
        admin_token,
        require_auth,
        limits or HttpLimits(),
        quotas or NodeQuotas(),
    )
    for router in ROUTERS:
        app.include_router(router)
    # The web console: static files, no data (felix/control/api/console.py).
    app.include_router(console.router)
    install(app, ROUTES, on_refused=audit_refused)
    return app
