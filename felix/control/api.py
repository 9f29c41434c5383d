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

- Create: POST to the collection with ``name`` and settings in the body; 201
  with ``Location`` and ``ETag``. Update: PATCH with the settings to change.
- Every resource has a version, sent as its ``ETag`` (``"3"``). PATCH and
  DELETE take ``If-Match`` (``"3"``, ``3`` or ``*``) and answer 412 when the
  stored version differs.
- Deleting a tenant or namespace with resources under it is refused (409)
  unless ``?cascade=true``.
- ``GET /v1/snapshot`` is the full state and the feed position it reflects;
  ``GET /v1/changes?since=N&limit=L&wait=S`` pages the changes after N, waiting
  up to S seconds for one when there are none yet (long-polling). A position
  the feed cannot continue from answers 410 (re-snapshot).
- ``/v1/system/info``, ``/v1/system/health``, ``/v1/regions``.
- ``POST /v1/tenants/{tenant}/token/exchange`` trades an identity provider's JWT
  (``Authorization: Bearer ...``) for a short-lived Felix token holding what the
  tenant's bindings grant that identity (optionally narrowed by a body
  ``{"permissions": [...]}``, never widened); ``GET
  /v1/tenants/{tenant}/.well-known/jwks.json`` publishes the keys that verify it.
  Both answer 503 when the app has no key directory (``keys_dir``).

Errors are RFC 9457 problems (``application/problem+json``), mapped from felix
errors in one table (:data:`felix.control.schemas.PROBLEM_TYPES`): 400
BadRequest (names, settings, headers), 422 a request that does not match the
OpenAPI schema, 404 NotFound, 409 AlreadyExists / HasChildren, 412
VersionConflict, 410 CursorTooOld, 503 Overloaded / Unavailable.

Authentication (``create_app(require_auth=True)``): every route but the OpenAPI
document, ``/docs``, ``/v1/system/health``, the token exchange and the JWKS route
needs ``Authorization: Bearer TOKEN``, either the bootstrap admin token (may do
everything) or a Felix token of the route's tenant holding the permission the
route needs (:data:`ROUTE_ACCESS`). 401 (with ``WWW-Authenticate: Bearer``): no or
an invalid token; 403: a valid token that does not allow it. Without
``require_auth`` (loopback dev mode) everything is allowed without credentials.
The OpenAPI document declares the ``bearer`` scheme and the 401/403 answers on
every route that is not public.

Audit (:mod:`felix.audit`): every create, update and delete (refused ones too),
every token exchange and every 401/403 is one line on the ``felix.audit`` logger
(who, tenant, action, object, result; never a token or a body).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any, TypeVar

import httpx
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException

import felix
from felix import audit
from felix.auth.files import AUDIENCE, ISSUER, JwksDirectory, load_ring
from felix.auth.oidc import JwksCache, verify_idp_token
from felix.auth.perms import narrow
from felix.auth.rbac import Policy, grant
from felix.auth.tokens import Claims, read_unverified_claims, verify_felix_token
from felix.control.model import BindingSpec, IssuerSpec, Kind, Path, Resource, check_path
from felix.control.quotas import NodeQuotas, check_write
from felix.control.schemas import (
    IF_MATCH_MAX_CHARS,
    IF_MATCH_PATTERN,
    NAME_DESCRIPTION,
    NAME_SCHEMA,
    PROBLEM_TYPES,
    BindingCreate,
    BindingOut,
    BindingPatch,
    CacheCreate,
    CacheOut,
    CachePatch,
    ChangeOut,
    ChangePage,
    Deleted,
    Health,
    IssuerCreate,
    IssuerOut,
    IssuerPatch,
    Jwks,
    NamespaceCreate,
    NamespaceOut,
    NamespacePatch,
    PolicyCreate,
    PolicyOut,
    PolicyPatch,
    Problem,
    ProblemType,
    ProblemTypeDoc,
    Region,
    RegionList,
    ResourceList,
    ResourceRef,
    Snapshot,
    StoreHealth,
    StreamCreate,
    StreamOut,
    StreamPatch,
    SystemInfo,
    TenantCreate,
    TenantOut,
    TenantPatch,
    TokenExchange,
    TokenOut,
    etag,
    parse_if_match,
    resource_out,
    resource_url,
)
from felix.control.store import CursorTooOld, Store, VersionConflict
from felix.errors import (
    BadRequest,
    FelixError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "IDP_LEEWAY",
    "JWKS_MAX_AGE",
    "MAX_JWKS_BYTES",
    "MAX_LIMIT",
    "MAX_WAIT",
    "PROBLEM_MEDIA_TYPE",
    "ROUTE_ACCESS",
    "TOKEN_LEEWAY",
    "Access",
    "authenticate",
    "create_app",
    "default_fetch_jwks",
    "parse_if_match",
]

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Longest long-poll of ``GET /v1/changes``, in seconds.
MAX_WAIT = 30.0
#: Largest page of ``GET /v1/changes``.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: How long ``GET /v1/system/health`` waits for the store, in seconds.
HEALTH_TIMEOUT = 5.0
#: Clock leeway, in seconds, for the exp/nbf/iat of identity-provider tokens.
IDP_LEEWAY = 30.0
#: Clock leeway, in seconds, for the iat/exp of Felix tokens sent to this API.
TOKEN_LEEWAY = 30.0
#: Seconds clients may cache ``/.well-known/jwks.json`` (rotation publishes ahead far longer).
JWKS_MAX_AGE = 60
#: Largest JWK set :func:`fetch_jwks` accepts, and how long it may take, in seconds.
MAX_JWKS_BYTES = 256 * 1024
JWKS_FETCH_TIMEOUT = 10.0

_Out = TypeVar("_Out", bound=BaseModel)


# -- wiring --------------------------------------------------------------------------------


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


NodeInfo = dict[str, Any] | Callable[[], dict[str, Any]]
FetchJwks = Callable[[str], Awaitable[Mapping[str, Any]]]


async def default_fetch_jwks(url: str) -> dict[str, Any]:
    """GET the JWK set at ``url`` (the default ``fetch_jwks`` of :func:`create_app`).

    No redirects, at most :data:`MAX_JWKS_BYTES` of body and
    :data:`JWKS_FETCH_TIMEOUT` seconds in all.

    Raises:
        httpx.HTTPError, TimeoutError, ValueError: the fetch failed, or the answer
            is too large or not a JSON object (the JWKS cache turns any of these into
            Unavailable).
    """
    body = bytearray()
    async with asyncio.timeout(JWKS_FETCH_TIMEOUT):
        async with (
            httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", url, headers={"Accept": "application/json"}) as response,
        ):
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the JWK set at {url} is larger than {MAX_JWKS_BYTES} bytes")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError(f"the JWK set at {url} is not a JSON object")
    return data


@dataclass
class _Auth:
    """What the token exchange and the JWKS route need: keys on disk, fetched IdP keys."""

    keys_dir: FilePath
    cache: JwksCache
    published: JwksDirectory = field(init=False)

    def __post_init__(self) -> None:
        self.published = JwksDirectory(self.keys_dir)


@dataclass(frozen=True)
class _Context:
    store: Store
    region: str
    node_info: NodeInfo
    auth: _Auth | None = None
    clock: Callable[[], float] = time.time
    admin_token: str | None = None
    require_auth: bool = False
    quotas: NodeQuotas = field(default_factory=NodeQuotas)

    def node(self) -> dict[str, Any]:
        return self.node_info() if callable(self.node_info) else dict(self.node_info)

    def token_auth(self) -> _Auth:
        """The auth settings; Unavailable (503) when the app has none."""
        if self.auth is None:
            raise Unavailable(
                "authentication is not configured: this control plane has no key directory"
            )
        return self.auth


def create_app(
    store: Store,
    *,
    region: str = "local",
    node_info: NodeInfo | None = None,
    keys_dir: FilePath | None = None,
    fetch_jwks: FetchJwks | None = None,
    clock: Callable[[], float] = time.time,
    admin_token: str | None = None,
    require_auth: bool = False,
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
    fetches an identity provider's JWK set
    (default :func:`default_fetch_jwks`); the app keeps one
    :class:`~felix.auth.oidc.JwksCache` over it. ``clock`` is Unix
    time in seconds, used to check and mint tokens.

    ``require_auth`` makes every route but the public ones need a bearer token (see
    :func:`authenticate`): ``admin_token`` (the bootstrap credential, allowed
    everything) or a Felix token verified with the tenant's keys in ``keys_dir``.
    Without it (the default: loopback dev mode) every request is allowed.

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
        auth = _Auth(FilePath(keys_dir), JwksCache(fetch_jwks or default_fetch_jwks))
    app.state.control = _Context(
        store,
        region,
        node_info or {},
        auth,
        clock,
        admin_token,
        require_auth,
        quotas or NodeQuotas(),
    )
    app.include_router(_router, dependencies=[Depends(authenticate)])
    app.add_exception_handler(FelixError, _on_felix_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    return app


class Access:
    """What a route needs (the values of :data:`ROUTE_ACCESS`)."""

    #: Anyone, without credentials.
    PUBLIC = "public"
    #: Any valid credential (the admin token, or a Felix token of any tenant).
    ANY = "any"
    #: Only the bootstrap admin token.
    ADMIN = "admin"


#: (action, object) a Felix token must allow: ``{tenant}``, ``{ns}`` and the route's
#: other path parameters are filled in from the request.
_Permission = tuple[str, str]
_Rule = str | _Permission

_NS_ALL = "namespace:{tenant}/*"
_STREAMS = "stream:{tenant}/{ns}"
_CACHES = "cache:{tenant}/{ns}"
_RBAC: _Permission = ("rbac.manage", "tenant:{tenant}")

#: What each /v1 route (by path, every method alike) needs when authentication is
#: required. A route missing here is admin-only (fail closed).
ROUTE_ACCESS: dict[str, _Rule] = {
    "/v1/tenants": Access.ADMIN,
    "/v1/tenants/{tenant}": ("tenant.manage", "tenant:{tenant}"),
    "/v1/tenants/{tenant}/namespaces": ("ns.manage", _NS_ALL),
    "/v1/tenants/{tenant}/namespaces/{ns}": ("ns.manage", "namespace:{tenant}/{ns}"),
    "/v1/tenants/{tenant}/namespaces/{ns}/streams": ("stream.manage", f"{_STREAMS}/*"),
    "/v1/tenants/{tenant}/namespaces/{ns}/streams/{stream}": (
        "stream.manage",
        f"{_STREAMS}/{{stream}}",
    ),
    "/v1/tenants/{tenant}/namespaces/{ns}/caches": ("cache.manage", f"{_CACHES}/*"),
    "/v1/tenants/{tenant}/namespaces/{ns}/caches/{cache}": (
        "cache.manage",
        f"{_CACHES}/{{cache}}",
    ),
    "/v1/tenants/{tenant}/issuers": _RBAC,
    "/v1/tenants/{tenant}/issuers/{issuer}": _RBAC,
    "/v1/tenants/{tenant}/policies": _RBAC,
    "/v1/tenants/{tenant}/policies/{policy}": _RBAC,
    "/v1/tenants/{tenant}/bindings": _RBAC,
    "/v1/tenants/{tenant}/bindings/{binding}": _RBAC,
    # It authenticates with the identity provider's token itself.
    "/v1/tenants/{tenant}/token/exchange": Access.PUBLIC,
    "/v1/tenants/{tenant}/.well-known/jwks.json": Access.PUBLIC,
    # The whole feed, every tenant's resources.
    "/v1/snapshot": Access.ADMIN,
    "/v1/changes": Access.ADMIN,
    "/v1/system/info": Access.ANY,
    "/v1/system/health": Access.PUBLIC,
    "/v1/regions": Access.ANY,
    "/v1/problems/{slug}": Access.ANY,
}


async def authenticate(request: Request) -> None:
    """Every /v1 route depends on this: check the caller may do what the route does.

    Without ``require_auth`` it allows everything. Otherwise the route's rule in
    :data:`ROUTE_ACCESS` decides: the admin token may do everything; a Felix token
    must verify against its tenant's keys, be of the route's tenant and hold the
    rule's permission.

    Raises:
        Unauthenticated: (401) no bearer token, or one that does not verify.
        PermissionDenied: (403) a valid token that does not allow the request.
    """
    ctx = _context(request)
    caller = _Caller(source=request.client.host if request.client else None)
    request.state.audit_caller = caller
    _caller.set(caller)
    if not ctx.require_auth:
        return
    route = request.scope.get("route")
    rule = ROUTE_ACCESS.get(getattr(route, "path", ""), Access.ADMIN)
    if rule == Access.PUBLIC:
        return
    token = _bearer(request.headers.get("authorization"), "a Felix token or the admin token")
    if ctx.admin_token is not None and hmac.compare_digest(
        token.encode("utf-8"), ctx.admin_token.encode("utf-8")
    ):
        caller.who = "admin"
        return
    claims = _verify(ctx, token)
    caller.who, caller.tenant = claims.sub, claims.tid
    if isinstance(rule, str):
        if rule == Access.ANY:
            return
        raise PermissionDenied("only the admin token may do this")
    params = request.path_params
    tenant = params.get("tenant")
    if tenant != claims.tid:
        raise PermissionDenied(f"the token is for tenant {claims.tid}, not {tenant}")
    action, template = rule
    obj = template.format(**params)
    if not claims.perms.allows(action, obj):
        raise PermissionDenied(f"the token does not allow {action} on {obj}")


def _verify(ctx: _Context, token: str) -> Claims:
    """The claims of a Felix token, verified with its tenant's published keys."""
    if ctx.auth is None:
        raise Unauthenticated("this control plane accepts only the admin token (no key directory)")
    tid = read_unverified_claims(token).get("tid")
    jwks = ctx.auth.published.jwks(tid, time.monotonic()) if isinstance(tid, str) else None
    if jwks is None:
        raise Unauthenticated("the token names no tenant with signing keys")
    return verify_felix_token(
        token, jwks, issuer=ISSUER, audience=AUDIENCE, now=ctx.clock(), leeway=TOKEN_LEEWAY
    )


def _context(request: Request) -> _Context:
    context: _Context = request.app.state.control
    return context


def _store(request: Request) -> Store:
    return _context(request).store


StoreDep = Annotated[Store, Depends(_store)]
ContextDep = Annotated[_Context, Depends(_context)]

# -- audit log (felix/audit.py) ------------------------------------------------------------


@dataclass
class _Caller:
    """Who sent the request being served, for the audit log (set by :func:`authenticate`)."""

    who: str = "anonymous"  # a token's subject, "admin", or "anonymous"
    tenant: str | None = None  # the Felix token's tenant
    source: str | None = None
    audited: bool = False  # a line was written for this request's outcome


_caller: contextvars.ContextVar[_Caller | None] = contextvars.ContextVar(
    "felix_control_caller", default=None
)
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _current_caller() -> _Caller:
    caller = _caller.get()
    if caller is None:
        caller = _Caller()
        _caller.set(caller)
    return caller


def _reason(exc: BaseException) -> str:
    return _problem_type(exc).slug


def _audit_change(
    op: str, kind: Kind, path: Path, exc: BaseException | None, detail: str | None = None
) -> None:
    """A management change through the API (``op``: create, update or delete)."""
    caller = _current_caller()
    caller.audited = True
    audit.emit(
        "management",
        who=caller.who,
        who_tenant=caller.tenant,
        source=caller.source,
        tenant=path[0] if path else None,
        action=f"{kind}.{op}",
        object=f"{kind}:{'/'.join(path)}",
        result="ok" if exc is None else "failed",
        reason=None if exc is None else _reason(exc),
        detail=detail if exc is None else str(exc),
    )


def _audit_refused(request: Request, exc: BaseException, reason: str) -> None:
    """A request answered with an error: 401/403 always, other errors of changes.

    Nothing is logged twice (the route's own line wins) and never a header or body.
    """
    caller: _Caller | None = getattr(request.state, "audit_caller", None)
    if caller is None:
        caller = _Caller(source=request.client.host if request.client else None)
    if caller.audited:
        return
    route_path: str | None = getattr(request.scope.get("route"), "path", None)
    if route_path is None:
        return  # no such route: not an operation on anything
    if isinstance(exc, Unauthenticated | PermissionDenied):
        event: audit.Event = "auth" if isinstance(exc, Unauthenticated) else "permission"
        result: audit.Result = "denied"
    elif request.method in _MUTATING:
        event = "auth" if route_path.endswith("/token/exchange") else "management"
        result = "failed"
    else:
        return
    caller.audited = True
    params = request.path_params
    obj = request.url.path
    rule = ROUTE_ACCESS.get(route_path)
    if isinstance(rule, tuple):
        with contextlib.suppress(KeyError, IndexError, ValueError):
            obj = rule[1].format(**params)
    audit.emit(
        event,
        who="anonymous" if isinstance(exc, Unauthenticated) else caller.who,
        who_tenant=None if isinstance(exc, Unauthenticated) else caller.tenant,
        source=caller.source,
        tenant=params.get("tenant"),
        action=f"{request.method} {route_path}",
        object=obj,
        result=result,
        reason=reason,
        # An unexpected error's message may hold anything: its type only.
        detail=str(exc) if isinstance(exc, FelixError) else type(exc).__name__,
    )


def _audit_exchange(tenant: str, who: str, issuer: str, exc: BaseException | None) -> None:
    caller = _current_caller()
    caller.audited = True
    audit.emit(
        "auth",
        who=who,
        source=caller.source,
        tenant=tenant,
        action="token.exchange",
        object=f"issuer:{issuer}" if issuer else "issuer:?",
        result="ok" if exc is None else "denied" if isinstance(exc, _DENIALS) else "failed",
        reason=None if exc is None else _reason(exc),
        detail=None if exc is None else str(exc),
    )


_DENIALS = (Unauthenticated, PermissionDenied)

# -- problems ------------------------------------------------------------------------------

#: The problem type for each felix error class (the nearest class in the MRO wins).
_PROBLEM_FOR = {p.error: p for p in PROBLEM_TYPES.values() if p.slug != "validation-error"}


def _problem_response(
    status: int, type_: str, title: str, detail: str, **extensions: Any
) -> JSONResponse:
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extensions}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def _problem_type(exc: BaseException) -> ProblemType:
    for cls in type(exc).__mro__:
        if cls in _PROBLEM_FOR:
            return _PROBLEM_FOR[cls]
    return PROBLEM_TYPES["internal-error"]


async def _on_felix_error(request: Request, exc: Exception) -> Response:
    problem = _problem_type(exc)
    if problem.status >= 500 and problem.slug not in ("overloaded", "unavailable"):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    extensions: dict[str, Any] = {}
    if isinstance(exc, CursorTooOld):
        extensions = {"since": exc.since, "oldest": exc.oldest}
    _audit_refused(request, exc, problem.slug)
    response = _problem_response(problem.status, problem.uri, problem.title, str(exc), **extensions)
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Without "input" and "ctx": the caller knows what it sent, and a large body
    # should not come back in the error.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
    if len(errors) > 5:
        detail += f"; and {len(errors) - 5} more"
    problem = PROBLEM_TYPES["validation-error"]
    _audit_refused(request, BadRequest(detail), problem.slug)
    return _problem_response(
        problem.status, problem.uri, problem.title, detail, errors=jsonable_encoder(errors)
    )


async def _on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, method not allowed) as problems too."""
    assert isinstance(exc, HTTPException)
    try:
        title = HTTPStatus(exc.status_code).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if exc.detail != title else f"{request.method} {request.url.path}: {title}"
    response = _problem_response(exc.status_code, "about:blank", title, detail)
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the first route's methods; a path has one route per method.
        allowed = {
            method
            for route in _router.routes
            if isinstance(route, APIRoute) and route.path_regex.match(request.url.path)
            for method in route.methods or ()
        }
        if allowed:
            response.headers["Allow"] = ", ".join(sorted(allowed))
    return response


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette still re-raises exc after this answer, so the server logs the traceback.
    problem = PROBLEM_TYPES["internal-error"]
    _audit_refused(request, exc, problem.slug)
    return _problem_response(problem.status, problem.uri, problem.title, "internal error")


class _App(FastAPI):
    """FastAPI, with the Problem schema among the OpenAPI components (see :func:`_errors`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = Problem.model_json_schema()
            _declare_security(schema)
        return self.openapi_schema or {}


#: The name of the bearer scheme in the OpenAPI document.
BEARER_SCHEME = "bearer"


def _declare_security(schema: dict[str, Any]) -> None:
    """The bearer scheme, and on every protected operation (:data:`ROUTE_ACCESS`) its
    requirement and the 401 / 403 problems it can answer (403 not for ``any`` routes).

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
        rule = ROUTE_ACCESS.get(path, Access.ADMIN)
        if rule == Access.PUBLIC:
            continue
        statuses = (401,) if rule == Access.ANY else (401, 403)
        for operation in operations.values():
            operation["security"] = [{BEARER_SCHEME: []}]
            responses = operation.setdefault("responses", {})
            for status, response in _errors(*statuses).items():
                if status == 401:
                    response["headers"] = {
                        "WWW-Authenticate": {
                            "description": "Bearer",
                            "schema": {"type": "string"},
                        }
                    }
                responses.setdefault(str(status), response)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the problem statuses a route can answer."""
    schema = {"$ref": "#/components/schemas/Problem"}
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        titles = sorted({p.title for p in PROBLEM_TYPES.values() if p.status == status})
        responses[status] = {
            "description": " / ".join(titles),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
    return responses


# -- parameters ----------------------------------------------------------------------------


def _name_param(what: str, example: str) -> Any:
    return PathParam(
        description=f"The {what}'s name: {NAME_DESCRIPTION}",
        json_schema_extra=NAME_SCHEMA,
        examples=[example],
    )


TenantName = Annotated[str, _name_param("tenant", "acme")]
NamespaceName = Annotated[str, _name_param("namespace", "prod")]
StreamName = Annotated[str, _name_param("stream", "orders")]
CacheName = Annotated[str, _name_param("cache", "sessions")]
IssuerName = Annotated[str, _name_param("issuer", "okta")]
PolicyName = Annotated[str, _name_param("policy", "publishers")]
BindingName = Annotated[str, _name_param("binding", "eng")]


def _if_match_schema(schema: dict[str, Any]) -> None:
    # A header is text or absent: document a string with the pattern, not "string or null".
    schema.pop("anyOf", None)
    schema.update(type="string", pattern=IF_MATCH_PATTERN, maxLength=IF_MATCH_MAX_CHARS)


IfMatch = Annotated[
    str | None,
    Header(
        description='Only act if the stored version is this one: "3" (as sent in ETag), 3, '
        "a list of them, or * for any version.",
        json_schema_extra=_if_match_schema,
    ),
]
Cascade = Annotated[
    bool, Query(description="Also delete every resource under this one (children first).")
]


# -- resource operations, shared by every kind ---------------------------------------------


def missing(kind: Kind, path: Path) -> NotFound:
    return NotFound(f"{kind} {'/'.join(path)} does not exist")


def _set_etag(response: Response, res: Resource) -> None:
    response.headers["ETag"] = etag(res.version)


async def _create(
    ctx: _Context, response: Response, kind: Kind, path: Path, body: BaseModel
) -> Resource:
    try:
        path = check_path(kind, path)
        spec = body.model_dump(mode="json", exclude={"name"}, exclude_unset=True)
        if kind is Kind.STREAM:
            _check_region(ctx, spec)
        await check_write(ctx.store, ctx.quotas, kind, path, spec)
        res = await ctx.store.create(kind, path, spec)
    except FelixError as exc:
        _audit_change("create", kind, path, exc)
        raise
    _audit_change("create", kind, path, None)
    response.headers["Location"] = resource_url(kind, res.path)
    _set_etag(response, res)
    return res


async def _get(store: Store, response: Response, kind: Kind, path: Path) -> Resource:
    res = await store.get(kind, check_path(kind, path))
    if res is None:
        raise missing(kind, path)
    _set_etag(response, res)
    return res


async def _if_version(store: Store, kind: Kind, path: Path, if_match: str | None) -> int | None:
    """The version to pass the store for ``If-Match`` (None: unconditional)."""
    allowed = parse_if_match(if_match)
    if allowed is None:
        return None
    if len(allowed) == 1:
        return next(iter(allowed))
    # Several tags (or none that can match): compare with the stored version, then
    # pass that to the store, which refuses if it changed in between.
    current = await store.get(kind, path)
    if current is None:
        raise missing(kind, path)
    if current.version not in allowed:
        raise VersionConflict(
            f"{kind} {'/'.join(path)} is at version {current.version}, not one of "
            f"{sorted(allowed) or 'the tags in If-Match'}"
        )
    return current.version


async def _update(
    ctx: _Context,
    response: Response,
    kind: Kind,
    path: Path,
    body: BaseModel,
    if_match: str | None,
) -> Resource:
    try:
        path = check_path(kind, path)
        patch = body.model_dump(mode="json", exclude_unset=True)
        if kind is Kind.STREAM:
            _check_region(ctx, patch)
        if_version = await _if_version(ctx.store, kind, path, if_match)
        await check_write(ctx.store, ctx.quotas, kind, path, patch, update=True)
        res = await ctx.store.update(kind, path, patch, if_version=if_version)
    except FelixError as exc:
        _audit_change("update", kind, path, exc)
        raise
    _audit_change("update", kind, path, None)
    _set_etag(response, res)
    return res


async def _delete(
    store: Store, kind: Kind, path: Path, if_match: str | None, cascade: bool = False
) -> Deleted:
    try:
        path = check_path(kind, path)
        if_version = await _if_version(store, kind, path, if_match)
        changes = await store.delete(kind, path, cascade=cascade, if_version=if_version)
    except FelixError as exc:
        _audit_change("delete", kind, path, exc)
        raise
    _audit_change(
        "delete", kind, path, None, f"{len(changes)} resources deleted" if cascade else None
    )
    return Deleted(
        deleted=[ResourceRef(kind=ch.resource.kind, path=list(ch.resource.path)) for ch in changes]
    )


async def _list(
    store: Store, kind: Kind, parent: Path, out: Callable[[Resource], _Out]
) -> ResourceList[_Out]:
    items = await store.list_resources(kind, parent)
    return ResourceList[_Out](items=[out(r) for r in items])


def _check_region(ctx: _Context, spec: dict[str, Any]) -> None:
    region = spec.get("region")
    if region is not None and region != ctx.region:
        raise BadRequest(
            f"unknown region {region!r}: this cluster is region {ctx.region!r} "
            "(see GET /v1/regions)"
        )


# -- routes --------------------------------------------------------------------------------

_router = APIRouter(prefix="/v1")
_READ = _errors(400, 404)
_LIST = _errors(400, 404)
_CREATE = _errors(400, 404, 409, 422, 503)
_UPDATE = _errors(400, 404, 412, 422)
_DELETE = _errors(400, 404, 409, 412, 422)
_LEAF_DELETE = _errors(400, 404, 412)

_T = "tenants/{tenant}"
_NS = f"{_T}/namespaces/{{ns}}"


@_router.get("/tenants", tags=["tenants"], summary="List tenants", responses=_LIST)
async def list_tenants(store: StoreDep) -> ResourceList[TenantOut]:
    return await _list(store, Kind.TENANT, (), TenantOut.of)


@_router.post(
    "/tenants", tags=["tenants"], summary="Create a tenant", status_code=201, responses=_CREATE
)
async def create_tenant(body: TenantCreate, ctx: ContextDep, response: Response) -> TenantOut:
    return TenantOut.of(await _create(ctx, response, Kind.TENANT, (body.name,), body))


@_router.get(f"/{_T}", tags=["tenants"], summary="Get a tenant", responses=_READ)
async def get_tenant(tenant: TenantName, store: StoreDep, response: Response) -> TenantOut:
    return TenantOut.of(await _get(store, response, Kind.TENANT, (tenant,)))


@_router.patch(f"/{_T}", tags=["tenants"], summary="Update a tenant", responses=_UPDATE)
async def update_tenant(
    tenant: TenantName,
    body: TenantPatch,
    ctx: ContextDep,
    response: Response,
    if_match: IfMatch = None,
) -> TenantOut:
    return TenantOut.of(await _update(ctx, response, Kind.TENANT, (tenant,), body, if_match))


@_router.delete(f"/{_T}", tags=["tenants"], summary="Delete a tenant", responses=_DELETE)
async def delete_tenant(
    tenant: TenantName, store: StoreDep, if_match: IfMatch = None, cascade: Cascade = False
) -> Deleted:
    return await _delete(store, Kind.TENANT, (tenant,), if_match, cascade)


@_router.get(f"/{_T}/namespaces", tags=["namespaces"], summary="List namespaces", responses=_LIST)
async def list_namespaces(tenant: TenantName, store: StoreDep) -> ResourceList[NamespaceOut]:
    return await _list(store, Kind.NAMESPACE, (tenant,), NamespaceOut.of)


@_router.post(
    f"/{_T}/namespaces",
    tags=["namespaces"],
    summary="Create a namespace",
    status_code=201,
    responses=_CREATE,
)
async def create_namespace(
    tenant: TenantName, body: NamespaceCreate, ctx: ContextDep, response: Response
) -> NamespaceOut:
    return NamespaceOut.of(await _create(ctx, response, Kind.NAMESPACE, (tenant, body.name), body))


@_router.get(f"/{_NS}", tags=["namespaces"], summary="Get a namespace", responses=_READ)
async def get_namespace(
    tenant: TenantName, ns: NamespaceName, store: StoreDep, response: Response
) -> NamespaceOut:
    return NamespaceOut.of(await _get(store, response, Kind.NAMESPACE, (tenant, ns)))


@_router.patch(f"/{_NS}", tags=["namespaces"], summary="Update a namespace", responses=_UPDATE)
async def update_namespace(
    tenant: TenantName,
    ns: NamespaceName,
    body: NamespacePatch,
    ctx: ContextDep,
    response: Response,
    if_match: IfMatch = None,
) -> NamespaceOut:
    res = await _update(ctx, response, Kind.NAMESPACE, (tenant, ns), body, if_match)
    return NamespaceOut.of(res)


@_router.delete(f"/{_NS}", tags=["namespaces"], summary="Delete a namespace", responses=_DELETE)
async def delete_namespace(
    tenant: TenantName,
    ns: NamespaceName,
    store: StoreDep,
    if_match: IfMatch = None,
    cascade: Cascade = False,
) -> Deleted:
    return await _delete(store, Kind.NAMESPACE, (tenant, ns), if_match, cascade)


@_router.get(f"/{_NS}/streams", tags=["streams"], summary="List streams", responses=_LIST)
async def list_streams(
    tenant: TenantName, ns: NamespaceName, store: StoreDep
) -> ResourceList[StreamOut]:
    return await _list(store, Kind.STREAM, (tenant, ns), StreamOut.of)


@_router.post(
    f"/{_NS}/streams",
    tags=["streams"],
    summary="Create a stream",
    status_code=201,
    responses=_CREATE,
)
async def create_stream(
    tenant: TenantName, ns: NamespaceName, body: StreamCreate, ctx: ContextDep, response: Response
) -> StreamOut:
    return StreamOut.of(await _create(ctx, response, Kind.STREAM, (tenant, ns, body.name), body))


@_router.get(
    f"/{_NS}/streams/{{stream}}", tags=["streams"], summary="Get a stream", responses=_READ
)
async def get_stream(
    tenant: TenantName, ns: NamespaceName, stream: StreamName, store: StoreDep, response: Response
) -> StreamOut:
    return StreamOut.of(await _get(store, response, Kind.STREAM, (tenant, ns, stream)))


@_router.patch(
    f"/{_NS}/streams/{{stream}}", tags=["streams"], summary="Update a stream", responses=_UPDATE
)
async def update_stream(
    tenant: TenantName,
    ns: NamespaceName,
    stream: StreamName,
    body: StreamPatch,
    ctx: ContextDep,
    response: Response,
    if_match: IfMatch = None,
) -> StreamOut:
    res = await _update(ctx, response, Kind.STREAM, (tenant, ns, stream), body, if_match)
    return StreamOut.of(res)


@_router.delete(
    f"/{_NS}/streams/{{stream}}",
    tags=["streams"],
    summary="Delete a stream",
    responses=_LEAF_DELETE,
)
async def delete_stream(
    tenant: TenantName,
    ns: NamespaceName,
    stream: StreamName,
    store: StoreDep,
    if_match: IfMatch = None,
) -> Deleted:
    return await _delete(store, Kind.STREAM, (tenant, ns, stream), if_match)


@_router.get(f"/{_NS}/caches", tags=["caches"], summary="List caches", responses=_LIST)
async def list_caches(
    tenant: TenantName, ns: NamespaceName, store: StoreDep
) -> ResourceList[CacheOut]:
    return await _list(store, Kind.CACHE, (tenant, ns), CacheOut.of)


@_router.post(
    f"/{_NS}/caches", tags=["caches"], summary="Create a cache", status_code=201, responses=_CREATE
)
async def create_cache(
    tenant: TenantName, ns: NamespaceName, body: CacheCreate, ctx: ContextDep, response: Response
) -> CacheOut:
    return CacheOut.of(await _create(ctx, response, Kind.CACHE, (tenant, ns, body.name), body))


@_router.get(f"/{_NS}/caches/{{cache}}", tags=["caches"], summary="Get a cache", responses=_READ)
async def get_cache(
    tenant: TenantName, ns: NamespaceName, cache: CacheName, store: StoreDep, response: Response
) -> CacheOut:
    return CacheOut.of(await _get(store, response, Kind.CACHE, (tenant, ns, cache)))


@_router.patch(
    f"/{_NS}/caches/{{cache}}", tags=["caches"], summary="Update a cache", responses=_UPDATE
)
async def update_cache(
    tenant: TenantName,
    ns: NamespaceName,
    cache: CacheName,
    body: CachePatch,
    ctx: ContextDep,
    response: Response,
    if_match: IfMatch = None,
) -> CacheOut:
    res = await _update(ctx, response, Kind.CACHE, (tenant, ns, cache), body, if_match)
    return CacheOut.of(res)


@_router.delete(
    f"/{_NS}/caches/{{cache}}", tags=["caches"], summary="Delete a cache", responses=_LEAF_DELETE
)
async def delete_cache(
    tenant: TenantName,
    ns: NamespaceName,
    cache: CacheName,
    store: StoreDep,
    if_match: IfMatch = None,
) -> Deleted:
    return await _delete(store, Kind.CACHE, (tenant, ns, cache), if_match)


# -- authentication settings: issuers, policies, bindings --------------------------------


@_router.get(f"/{_T}/issuers", tags=["auth"], summary="List trusted issuers", responses=_LIST)
async def list_issuers(tenant: TenantName, store: StoreDep) -> ResourceList[IssuerOut]:
    return await _list(store, Kind.ISSUER, (tenant,), IssuerOut.of)


@_router.post(
    f"/{_T}/issuers",
    tags=["auth"],
    summary="Trust an OIDC issuer",
    status_code=201,
    responses=_CREATE,
)
async def create_issuer(
    tenant: TenantName, body: IssuerCreate, ctx: ContextDep, response: Response
) -> IssuerOut:
    return IssuerOut.of(await _create(ctx, response, Kind.ISSUER, (tenant, body.name), body))


@_router.get(f"/{_T}/issuers/{{issuer}}", tags=["auth"], summary="Get an issuer", responses=_READ)
async def get_issuer(
    tenant: TenantName, issuer: IssuerName, store: StoreDep, response: Response
) -> IssuerOut:
    return IssuerOut.of(await _get(store, response, Kind.ISSUER, (tenant, issuer)))


@_router.patch(
    f"/{_T}/issuers/{{issuer}}", tags=["auth"], summary="Update an issuer", responses=_UPDATE
)
async def update_issuer(
    tenant: TenantName,
    issuer: IssuerName,
    body: IssuerPatch,
    ctx: ContextDep,
    response: Response,
    if_match: IfMatch = None,
) -> IssuerOut:
    res = await _update(ctx, response, Kind.ISSUER, (tenant, issuer), body, if_match)
    return IssuerOut.of(res)


@_router.delete(
    f"/{_T}/issuers/{{issuer}}", tags=["auth"], summary="Delete an issuer", responses=_LEAF_DELETE
)
async def delete_issuer(
    tenant: TenantName, issuer: IssuerName, store: StoreDep, if_match: IfMatch = None
) -> Deleted:
    return await _delete(store, Kind.ISSUER, (tenant, issuer), if_match)


@_router.get(f"/{_T}/policies", tags=["auth"], summary="List policies", responses=_LIST)
async def list_policies(tenant: TenantName, store: StoreDep) -> ResourceList[PolicyOut]:
    return await _list(store, Kind.POLICY, (tenant,), PolicyOut.of)


@_router.post(
    f"/{_T}/policies", tags=["auth"], summary="Create a policy", status_code=201, responses=_CREATE
)
async def create_policy(
    tenant: TenantName, body: PolicyCreate, ctx: ContextDep, response: Response
) -> PolicyOut:
    return PolicyOut.of(await _create(ctx, response, Kind.POLICY, (tenant, body.name), body))


@_router.get(f"/{_T}/policies/{{policy}}", tags=["auth"], summary="Get a policy", responses=_READ)
async def get_policy(
    tenant: TenantName, policy: PolicyName, store: StoreDep, response: Response
) -> PolicyOut:
    return PolicyOut.of(await _get(store, response, Kind.POLICY, (tenant, policy)))


@_router.patch(
    f"/{_T}/policies/{{policy}}", tags=["auth"], summary="Update a policy", responses=_UPDATE
)
async def update_policy(
    tenant: TenantName,
    policy: PolicyName,
    body: PolicyPatch,
    ctx: ContextDep,
    response: Response,
    if_match: IfMatch = None,
) -> PolicyOut:
    res = await _update(ctx, response, Kind.POLICY, (tenant, policy), body, if_match)
    return PolicyOut.of(res)


@_router.delete(
    f"/{_T}/policies/{{policy}}", tags=["auth"], summary="Delete a policy", responses=_LEAF_DELETE
)
async def delete_policy(
    tenant: TenantName, policy: PolicyName, store: StoreDep, if_match: IfMatch = None
) -> Deleted:
    return await _delete(store, Kind.POLICY, (tenant, policy), if_match)


@_router.get(f"/{_T}/bindings", tags=["auth"], summary="List role bindings", responses=_LIST)
async def list_bindings(tenant: TenantName, store: StoreDep) -> ResourceList[BindingOut]:
    return await _list(store, Kind.BINDING, (tenant,), BindingOut.of)


@_router.post(
    f"/{_T}/bindings",
    tags=["auth"],
    summary="Create a role binding",
    status_code=201,
    responses=_CREATE,
)
async def create_binding(
    tenant: TenantName, body: BindingCreate, ctx: ContextDep, response: Response
) -> BindingOut:
    return BindingOut.of(await _create(ctx, response, Kind.BINDING, (tenant, body.name), body))


@_router.get(
    f"/{_T}/bindings/{{binding}}", tags=["auth"], summary="Get a role binding", responses=_READ
)
async def get_binding(
    tenant: TenantName, binding: BindingName, store: StoreDep, response: Response
) -> BindingOut:
    return BindingOut.of(await _get(store, response, Kind.BINDING, (tenant, binding)))


@_router.patch(
    f"/{_T}/bindings/{{binding}}",
    tags=["auth"],
    summary="Update a role binding",
    responses=_UPDATE,
)
async def update_binding(
    tenant: TenantName,
    binding: BindingName,
    body: BindingPatch,
    ctx: ContextDep,
    response: Response,
    if_match: IfMatch = None,
) -> BindingOut:
    res = await _update(ctx, response, Kind.BINDING, (tenant, binding), body, if_match)
    return BindingOut.of(res)


@_router.delete(
    f"/{_T}/bindings/{{binding}}",
    tags=["auth"],
    summary="Delete a role binding",
    responses=_LEAF_DELETE,
)
async def delete_binding(
    tenant: TenantName, binding: BindingName, store: StoreDep, if_match: IfMatch = None
) -> Deleted:
    return await _delete(store, Kind.BINDING, (tenant, binding), if_match)


# -- token exchange and published keys ---------------------------------------------------

Authorization = Annotated[
    str | None,
    Header(description="Bearer TOKEN: the identity provider's JWT (an id or access token)."),
]


def _bearer(authorization: str | None, what: str = "the identity provider's token") -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header; Unauthenticated otherwise."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(f"send {what} as Authorization: Bearer ...")
    return token


def _claimed_issuer(authorization: str | None) -> str:
    """The ``iss`` a bearer JWT claims (unverified; "" if none): for the audit log only."""
    try:
        iss = read_unverified_claims(_bearer(authorization)).get("iss")
    except FelixError:
        return ""
    return iss if isinstance(iss, str) else ""


@_router.post(
    f"/{_T}/token/exchange",
    tags=["auth"],
    summary="Trade an identity provider's token for a Felix token",
    responses=_errors(400, 401, 403, 404, 422, 503),
)
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
        check_path(Kind.TENANT, (tenant,))
        token = _bearer(authorization)
        store = ctx.store
        issuers = [
            IssuerSpec.model_validate(r.spec).config()
            for r in await store.list_resources(Kind.ISSUER, (tenant,))
        ]
        now = ctx.clock()
        identity = await verify_idp_token(
            token, issuers, cache=auth.cache, now=now, leeway=IDP_LEEWAY
        )
        who, issuer = identity.sub, identity.issuer
        policies = [
            Policy.create(tenant, r.name, r.spec["permissions"])
            for r in await store.list_resources(Kind.POLICY, (tenant,))
        ]
        bindings = [
            BindingSpec.model_validate(r.spec).binding()
            for r in await store.list_resources(Kind.BINDING, (tenant,))
        ]
        granted = grant(
            bindings, policies, identity.sub, identity.groups, tenant, issuer=identity.issuer
        )
        if body is not None and body.permissions is not None:
            granted = narrow(body.permissions, granted)
        if not granted:
            raise PermissionDenied(f"{identity.sub} is granted no permissions in tenant {tenant}")
        try:
            ring = await asyncio.to_thread(load_ring, auth.keys_dir, tenant)
        except NotFound:
            raise Unavailable(
                f"tenant {tenant} has no signing keys: run "
                f"`felix token keygen --tenant {tenant} --dir {auth.keys_dir}`"
            ) from None
        minted = ring.mint(now, issuer=ISSUER, audience=AUDIENCE, sub=identity.sub, perms=granted)
    except FelixError as exc:
        _audit_exchange(tenant, who, issuer, exc)
        raise
    _audit_exchange(tenant, who, issuer, None)
    response.headers["Cache-Control"] = "no-store"
    return TokenOut(access_token=minted, expires_in=ring.max_token_ttl)


@_router.get(
    f"/{_T}/.well-known/jwks.json",
    tags=["auth"],
    summary="The tenant's token signing keys",
    responses=_errors(400, 404, 503),
)
async def tenant_jwks(tenant: TenantName, ctx: ContextDep, response: Response) -> Jwks:
    """The public keys that verify the tenant's Felix tokens (cacheable for a minute).

    404: no such tenant; 503: no key directory, or the tenant has no signing keys yet.
    """
    auth = ctx.token_auth()
    if await ctx.store.get(Kind.TENANT, check_path(Kind.TENANT, (tenant,))) is None:
        raise missing(Kind.TENANT, (tenant,))
    jwks = auth.published.jwks(tenant, time.monotonic())
    if jwks is None:
        raise Unavailable(
            f"tenant {tenant} has no signing keys: run "
            f"`felix token keygen --tenant {tenant} --dir {auth.keys_dir}`"
        )
    response.headers["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE}"
    return Jwks(keys=list(jwks["keys"]))


# -- snapshot and change feed --------------------------------------------------------------


@_router.get("/snapshot", tags=["feed"], summary="Every resource and its feed position")
async def snapshot(store: StoreDep) -> Snapshot:
    position, resources = await store.snapshot()
    return Snapshot(position=position, resources=[resource_out(r) for r in resources])


@_router.get(
    "/changes",
    tags=["feed"],
    summary="Changes after a feed position (long-poll)",
    responses=_errors(400, 410, 422),
)
async def changes(
    store: StoreDep,
    since: Annotated[int, Query(ge=0, description="Feed position to continue from.")] = 0,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="Most changes to return.")
    ] = DEFAULT_LIMIT,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT,
            description="Seconds to wait for a change when there is none after since yet; "
            "the answer comes as soon as one is committed.",
        ),
    ] = 0.0,
) -> ChangePage:
    """Changes after ``since`` in commit order, at most ``limit``, and where to continue.

    410 (cursor-too-old) when the feed cannot continue from ``since``: it is
    older than the retained history, or past the newest position (the store
    was reset or replaced). Either way: re-read ``GET /v1/snapshot``.
    """
    newest = await store.position()
    if since > newest:
        err = CursorTooOld(since, await _oldest(store))
        err.args = (
            f"position {since} is past the newest position {newest} "
            "(the store was reset or replaced): re-snapshot",
        )
        raise err
    page, next_ = await store.changes(since, limit)
    if not page and wait > 0:
        await store.wait(since, wait)
        page, next_ = await store.changes(since, limit)
    return ChangePage(
        changes=[
            ChangeOut(position=ch.position, op=ch.op, resource=resource_out(ch.resource))
            for ch in page
        ],
        next=next_,
        position=max(next_, await store.position()),
    )


async def _oldest(store: Store) -> int:
    """The position of the oldest change the feed still holds (the next one if none)."""
    try:
        page, _ = await store.changes(0, 1)
    except CursorTooOld as exc:
        return exc.oldest
    return page[0].position if page else await store.position() + 1


# -- system --------------------------------------------------------------------------------


@_router.get("/system/info", tags=["system"], summary="Version, region and node")
async def system_info(ctx: ContextDep) -> SystemInfo:
    return SystemInfo(version=felix.__version__, region=ctx.region, node=ctx.node())


@_router.get(
    "/system/health",
    tags=["system"],
    summary="Whether the API can reach its store",
    responses={503: {"model": Health, "description": "The store does not answer"}},
)
async def system_health(store: StoreDep, response: Response) -> Health:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            position = await store.position()
    except Exception as exc:  # any failure of the store means unhealthy, whatever its type
        if isinstance(exc, TimeoutError):
            error = f"the store did not answer within {HEALTH_TIMEOUT:g} s"
        else:
            error = str(exc) or repr(exc)
        log.warning("control store health check failed: %s", error)
        response.status_code = 503
        return Health(status="unavailable", store=StoreHealth(reachable=False, error=error))
    return Health(status="ok", store=StoreHealth(reachable=True, position=position))


@_router.get(
    "/regions",
    tags=["system"],
    summary="Regions streams can be placed in",
    description="One region for now: the node's own (a cluster is one region). "
    "A stream's region setting must name it, or be null.",
)
async def regions(ctx: ContextDep) -> RegionList:
    return RegionList(regions=[Region(name=ctx.region, local=True)])


@_router.get(
    "/problems/{slug}",
    tags=["system"],
    summary="What a problem type means",
    responses=_errors(404),
)
async def problem_type(slug: str) -> ProblemTypeDoc:
    """The documentation a problem's ``type`` URI points to."""
    problem = PROBLEM_TYPES.get(slug)
    if problem is None:
        raise NotFound(f"no problem type {slug[:80]!r}")
    return ProblemTypeDoc(
        type=problem.uri,
        title=problem.title,
        status=problem.status,
        description=problem.description,
    )
