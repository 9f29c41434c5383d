"""List, create, get, update and delete for every resource kind, from one description each.

A :class:`ResourceRoutes` says what the five routes of a kind differ in (its path
parameter, body and answer models, tag, summaries and access rules); :func:`add_routes`
builds them, in the order of :data:`KINDS`. What every kind shares:

- Create: POST to the collection with ``name`` and settings in the body; 201 with
  ``Location`` and ``ETag``. Update: PATCH with the settings to change.
- Every resource has a version, sent as its ``ETag`` (``"3"``). PATCH and DELETE
  take ``If-Match`` (``"3"``, ``3`` or ``*``) and answer 412 when the stored
  version differs.
- Deleting a tenant, namespace or stream with resources under it (a stream's queue
  groups) is refused (409) unless ``?cascade=true``.
- Every change, refused ones too, is one line of the audit log.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi import Path as PathParam
from pydantic import BaseModel

from felix.control.api.access import Access, Permission, Rule, requires
from felix.control.api.auditing import audit_change, current_caller
from felix.control.api.bridges import check_bridge
from felix.control.api.context import ContextDep, ControlContext
from felix.control.api.guard import GuardedRoute
from felix.control.api.problems import errors
from felix.control.model import (
    PARENT,
    REGIONAL,
    Path,
    Resource,
    ResourceKind,
    check_path,
    with_region,
)
from felix.control.quotas import check_write
from felix.control.schemas import (
    COLLECTIONS,
    IF_MATCH_MAX_CHARS,
    IF_MATCH_PATTERN,
    NAME_DESCRIPTION,
    NAME_SCHEMA,
    BindingCreate,
    BindingOut,
    BindingPatch,
    BridgeCreate,
    BridgeOut,
    BridgePatch,
    CacheCreate,
    CacheOut,
    CachePatch,
    Deleted,
    GroupCreate,
    GroupOut,
    GroupPatch,
    IssuerCreate,
    IssuerOut,
    IssuerPatch,
    NamespaceCreate,
    NamespaceOut,
    NamespacePatch,
    PolicyCreate,
    PolicyOut,
    PolicyPatch,
    ResourceList,
    ResourceRef,
    StreamCreate,
    StreamOut,
    StreamPatch,
    TenantCreate,
    TenantOut,
    TenantPatch,
    etag,
    parse_if_match,
    resource_url,
)
from felix.control.store import VersionConflict
from felix.errors import FelixError, NotFound, WrongRegion

__all__ = ["KINDS", "ResourceRoutes", "TenantName", "add_routes", "router"]


_OutModel = (
    TenantOut
    | NamespaceOut
    | StreamOut
    | CacheOut
    | IssuerOut
    | PolicyOut
    | BindingOut
    | GroupOut
    | BridgeOut
)


@dataclass(frozen=True)
class ResourceRoutes:
    """Everything the five routes of one kind of resource differ in."""

    kind: ResourceKind
    #: The path parameter naming one, and a documented example of it.
    param: str
    example: str
    tag: str
    #: Summaries: "List {plural}", "Create {article} {noun}", "Get ...", ...
    noun: str
    plural: str
    create: type[BaseModel]
    patch: type[BaseModel]
    out: type[_OutModel]
    #: Who may list and create (the collection), and get, update and delete (one).
    collection_access: Rule
    item_access: Rule
    #: Has children (a delete may cascade to them, and answers 409 if it does not).
    parent: bool = False
    list_summary: str = ""
    create_summary: str = ""

    def summary(self, verb: str) -> str:
        article = "an" if self.noun[0] in "aeiou" else "a"
        return f"{verb} {article} {self.noun}"


_RBAC = Permission("rbac.manage", "tenant:{tenant}")
#: A stream's queue groups are managed (and read) with the stream's own permission.
_STREAM_OF_GROUP = Permission("stream.manage", "stream:{tenant}/{ns}/{stream}")

KINDS: tuple[ResourceRoutes, ...] = (
    ResourceRoutes(
        ResourceKind.TENANT, "tenant", "acme", "tenants", "tenant", "tenants",
        TenantCreate, TenantPatch, TenantOut,
        collection_access=Access.ADMIN,
        item_access=Permission("tenant.manage", "tenant:{tenant}"),
        parent=True,
    ),
    ResourceRoutes(
        ResourceKind.NAMESPACE, "ns", "prod", "namespaces", "namespace", "namespaces",
        NamespaceCreate, NamespacePatch, NamespaceOut,
        collection_access=Permission("ns.manage", "namespace:{tenant}/*"),
        item_access=Permission("ns.manage", "namespace:{tenant}/{ns}"),
        parent=True,
    ),
    ResourceRoutes(
        ResourceKind.STREAM, "stream", "orders", "streams", "stream", "streams",
        StreamCreate, StreamPatch, StreamOut,
        collection_access=Permission("stream.manage", "stream:{tenant}/{ns}/*"),
        item_access=Permission("stream.manage", "stream:{tenant}/{ns}/{stream}"),
        parent=True,
    ),
    ResourceRoutes(
        ResourceKind.CACHE, "cache", "sessions", "caches", "cache", "caches",
        CacheCreate, CachePatch, CacheOut,
        collection_access=Permission("cache.manage", "cache:{tenant}/{ns}/*"),
        item_access=Permission("cache.manage", "cache:{tenant}/{ns}/{cache}"),
    ),
    ResourceRoutes(
        ResourceKind.ISSUER, "issuer", "okta", "auth", "issuer", "issuers",
        IssuerCreate, IssuerPatch, IssuerOut,
        collection_access=_RBAC, item_access=_RBAC,
        list_summary="List trusted issuers", create_summary="Trust an OIDC issuer",
    ),
    ResourceRoutes(
        ResourceKind.POLICY, "policy", "publishers", "auth", "policy", "policies",
        PolicyCreate, PolicyPatch, PolicyOut,
        collection_access=_RBAC, item_access=_RBAC,
    ),
    ResourceRoutes(
        ResourceKind.BINDING, "binding", "eng", "auth", "role binding", "role bindings",
        BindingCreate, BindingPatch, BindingOut,
        collection_access=_RBAC, item_access=_RBAC,
    ),
    ResourceRoutes(
        ResourceKind.GROUP, "group", "workers", "groups", "queue group", "queue groups",
        GroupCreate, GroupPatch, GroupOut,
        collection_access=_STREAM_OF_GROUP, item_access=_STREAM_OF_GROUP,
    ),
    ResourceRoutes(
        ResourceKind.BRIDGE, "bridge", "to-us-1", "bridges", "bridge", "bridges",
        BridgeCreate, BridgePatch, BridgeOut,
        # Its own permission, implied by nothing else (not even tenant.manage).
        collection_access=Permission("bridge.manage", "bridge:{tenant}/*"),
        item_access=Permission("bridge.manage", "bridge:{tenant}/{bridge}"),
    ),
)  # fmt: skip
_BY_KIND = {rk.kind: rk for rk in KINDS}


# -- parameters ----------------------------------------------------------------------------


def _name_param(kind: ResourceKind) -> Any:
    return Annotated[
        str,
        PathParam(
            description=f"The {kind}'s name: {NAME_DESCRIPTION}",
            json_schema_extra=NAME_SCHEMA,
            examples=[_BY_KIND[kind].example],
        ),
    ]


TenantName = _name_param(ResourceKind.TENANT)


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


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


# -- what every kind shares ----------------------------------------------------------------


def missing(kind: ResourceKind, path: Path) -> NotFound:
    return NotFound(f"{kind} {'/'.join(path)} does not exist")


async def _if_version(
    ctx: ControlContext, kind: ResourceKind, path: Path, if_match: str | None
) -> int | None:
    """The version to pass the store for ``If-Match`` (None: unconditional)."""
    allowed = parse_if_match(if_match)
    if allowed is None:
        return None
    if len(allowed) == 1:
        return next(iter(allowed))
    # Several tags (or none that can match): compare with the stored version, then
    # pass that to the store, which refuses if it changed in between.
    current = await ctx.store.get(kind, path)
    if current is None:
        raise missing(kind, path)
    if current.version not in allowed:
        raise VersionConflict(
            f"{kind} {'/'.join(path)} is at version {current.version}, not one of "
            f"{sorted(allowed) or 'the tags in If-Match'}"
        )
    return current.version


def _home_region(ctx: ControlContext, kind: ResourceKind, path: Path, spec: dict[str, Any]) -> None:
    """Fill in a create's home region (this control plane's), or refuse another one."""
    region = spec.get("region")
    if region is None:  # left out (or null): this control plane's
        region = spec["region"] = ctx.region
    if region != ctx.region:
        raise WrongRegion(
            f"{kind} {'/'.join(path)} names region {region!r}: this control plane is region "
            f"{ctx.region!r} and holds only resources of its own region (see GET /v1/regions); "
            "create it through the control plane of that region",
            region=region,
            expected=ctx.region,
        )


async def _keep_region(
    ctx: ControlContext, kind: ResourceKind, path: Path, patch: dict[str, Any]
) -> None:
    """Refuse an update that changes or clears a resource's home region, or that
    touches a resource of another region than this control plane's."""
    current = await ctx.store.get(kind, path)
    if current is None:
        raise missing(kind, path)
    home = with_region(current, ctx.region).spec["region"]
    if "region" in patch and patch["region"] != home:
        raise WrongRegion(
            f"{kind} {'/'.join(path)} lives in region {home!r}: its region cannot change "
            f"(to {patch['region']!r}); a resource never moves between regions",
            region=patch["region"],
            expected=home,
        )
    if home != ctx.region:
        raise WrongRegion(
            f"{kind} {'/'.join(path)} lives in region {home!r}, not in this control "
            f"plane's region {ctx.region!r}: it is managed there",
            region=home,
            expected=ctx.region,
        )


class _Operations:
    """The five operations on one kind; ``names`` are the path parameters' values."""

    def __init__(self, rk: ResourceRoutes, params: tuple[str, ...]) -> None:
        self.rk = rk
        self.kind = rk.kind
        self.params = params  # from the tenant down to this kind

    def path(self, names: dict[str, Any], name: str | None = None) -> Path:
        found = tuple(names[p] for p in self.params if p in names)
        return found if name is None else (*found, name)

    async def list(self, ctx: ControlContext, **names: Any) -> BaseModel:
        items = await ctx.store.list_resources(self.kind, self.path(names))
        return ResourceList[self.rk.out](items=[self._out(r, ctx.region) for r in items])  # type: ignore[name-defined]

    async def create(
        self, ctx: ControlContext, response: Response, body: BaseModel, **names: Any
    ) -> BaseModel:
        # Every Create model has a name; FastAPI hands it over typed as its model.
        path = self.path(names, getattr(body, "name"))  # noqa: B009
        try:
            path = check_path(self.kind, path)
            spec = body.model_dump(mode="json", exclude={"name"}, exclude_unset=True)
            if self.kind in REGIONAL:
                _home_region(ctx, self.kind, path, spec)
            await check_write(
                ctx.store, ctx.quotas, self.kind, path, spec, admin=current_caller().admin
            )
            if self.kind is ResourceKind.BRIDGE:
                await check_bridge(ctx, path, spec, update=False)
            res = await ctx.store.create(self.kind, path, spec)
        except FelixError as exc:
            audit_change("create", self.kind, path, exc)
            raise
        audit_change("create", self.kind, path, None)
        response.headers["Location"] = resource_url(self.kind, res.path)
        response.headers["ETag"] = etag(res.version)
        return self._out(res, ctx.region)

    async def get(self, ctx: ControlContext, response: Response, **names: Any) -> BaseModel:
        path = self.path(names)
        res = await ctx.store.get(self.kind, check_path(self.kind, path))
        if res is None:
            raise missing(self.kind, path)
        response.headers["ETag"] = etag(res.version)
        return self._out(res, ctx.region)

    async def update(
        self,
        ctx: ControlContext,
        response: Response,
        body: BaseModel,
        if_match: str | None,
        **names: Any,
    ) -> BaseModel:
        path = self.path(names)
        try:
            path = check_path(self.kind, path)
            patch = body.model_dump(mode="json", exclude_unset=True)
            if self.kind in REGIONAL:
                await _keep_region(ctx, self.kind, path, patch)
            if_version = await _if_version(ctx, self.kind, path, if_match)
            await check_write(
                ctx.store,
                ctx.quotas,
                self.kind,
                path,
                patch,
                admin=current_caller().admin,
                update=True,
            )
            if self.kind is ResourceKind.BRIDGE:
                await check_bridge(ctx, path, patch, update=True)
            res = await ctx.store.update(self.kind, path, patch, if_version=if_version)
        except FelixError as exc:
            audit_change("update", self.kind, path, exc)
            raise
        audit_change("update", self.kind, path, None)
        response.headers["ETag"] = etag(res.version)
        return self._out(res, ctx.region)

    async def delete(
        self, ctx: ControlContext, if_match: str | None, cascade: bool = False, **names: Any
    ) -> Deleted:
        path = self.path(names)
        try:
            path = check_path(self.kind, path)
            if_version = await _if_version(ctx, self.kind, path, if_match)
            changes = await ctx.store.delete(
                self.kind, path, cascade=cascade, if_version=if_version
            )
        except FelixError as exc:
            audit_change("delete", self.kind, path, exc)
            raise
        detail = f"{len(changes)} resources deleted" if cascade else None
        audit_change("delete", self.kind, path, None, detail)
        refs = [ResourceRef(kind=ch.resource.kind, path=list(ch.resource.path)) for ch in changes]
        return Deleted(deleted=refs)

    def _out(self, res: Resource, region: str) -> BaseModel:
        return self.rk.out.of(with_region(res, region))


# -- routes --------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", route_class=GuardedRoute)

_LIST = errors(400, 404)
_READ = errors(400, 404)
_CREATE = errors(400, 404, 409, 422, 503)
_UPDATE = errors(400, 404, 412, 422)
#: A stream's or group's settings can conflict (409 setting-conflict).
_STREAM_UPDATE = errors(400, 404, 409, 412, 422)
_CONFLICTING = (ResourceKind.STREAM, ResourceKind.GROUP)
_DELETE = errors(400, 404, 409, 412, 422)
_LEAF_DELETE = errors(400, 404, 412)


def _endpoint(
    name: str, rule: Rule, params: list[inspect.Parameter], run: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    """An endpoint called ``name`` taking ``params`` (what FastAPI reads) and calling ``run``."""

    async def endpoint(**values: Any) -> Any:
        return await run(**values)

    endpoint.__name__ = endpoint.__qualname__ = name
    # FastAPI reads the parameters from the signature.
    setattr(endpoint, "__signature__", inspect.Signature(params))  # noqa: B010
    return requires(rule)(endpoint)


def _chain(rk: ResourceRoutes) -> list[ResourceRoutes]:
    """The kinds along a path to ``rk``, from the tenant down."""
    parent = PARENT[rk.kind]
    return [rk] if parent is None else [*_chain(_BY_KIND[parent]), rk]


def add_routes(router: APIRouter, rk: ResourceRoutes) -> None:
    """The five routes of ``rk`` on ``router``: list, create, get, update, delete."""
    chain = _chain(rk)
    collection = "".join(f"/{COLLECTIONS[k.kind]}/{{{k.param}}}" for k in chain[:-1])
    collection += f"/{COLLECTIONS[rk.kind]}"
    item = f"{collection}/{{{rk.param}}}"
    parent_params = [_param(k.param, _name_param(k.kind)) for k in chain[:-1]]
    item_params = [*parent_params, _param(rk.param, _name_param(rk.kind))]
    ops = _Operations(rk, tuple(k.param for k in chain))
    ctx = _param("ctx", ContextDep)
    response = _param("response", Response)
    if_match = _param("if_match", IfMatch, None)
    singular, plural = rk.kind.value, COLLECTIONS[rk.kind]
    add = router.add_api_route
    tags: list[Any] = [rk.tag]

    add(
        collection,
        _endpoint(f"list_{plural}", rk.collection_access, [*parent_params, ctx], ops.list),
        methods=["GET"],
        response_model=ResourceList[rk.out],  # type: ignore[name-defined]
        tags=tags,
        summary=rk.list_summary or f"List {rk.plural}",
        responses=_LIST,
    )
    add(
        collection,
        _endpoint(
            f"create_{singular}",
            rk.collection_access,
            [*parent_params, _param("body", rk.create), ctx, response],
            ops.create,
        ),
        methods=["POST"],
        response_model=rk.out,
        status_code=201,
        tags=tags,
        summary=rk.create_summary or rk.summary("Create"),
        responses=_CREATE,
    )
    add(
        item,
        _endpoint(f"get_{singular}", rk.item_access, [*item_params, ctx, response], ops.get),
        methods=["GET"],
        response_model=rk.out,
        tags=tags,
        summary=rk.summary("Get"),
        responses=_READ,
    )
    add(
        item,
        _endpoint(
            f"update_{singular}",
            rk.item_access,
            [*item_params, _param("body", rk.patch), ctx, response, if_match],
            ops.update,
        ),
        methods=["PATCH"],
        response_model=rk.out,
        tags=tags,
        summary=rk.summary("Update"),
        responses=_STREAM_UPDATE if rk.kind in _CONFLICTING else _UPDATE,
    )
    delete_params = [*item_params, ctx, if_match]
    if rk.parent:
        delete_params.append(_param("cascade", Cascade, False))
    add(
        item,
        _endpoint(f"delete_{singular}", rk.item_access, delete_params, ops.delete),
        methods=["DELETE"],
        response_model=Deleted,
        tags=tags,
        summary=rk.summary("Delete"),
        responses=_DELETE if rk.parent else _LEAF_DELETE,
    )


for _rk in KINDS:
    add_routes(router, _rk)
