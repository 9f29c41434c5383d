"""The wire shapes of the control-plane REST API: request and response bodies, URLs, problems.

The API (:mod:`felix.control.api`) declares its routes with these models, so they
are what the OpenAPI document at ``/v1/openapi.json`` shows; the client
(:mod:`felix.control.client`) builds its URLs and maps problems back to felix
errors with the same tables, so the two sides cannot drift apart.

Settings come from :mod:`felix.control.model`: a create body is a kind's spec
plus ``name``; a patch body is the same spec with every field optional (what
is sent replaces, except a nested object such as ``queue``, which merges one
level). Both are strict copies of the spec (no ``"3"`` or ``true`` for a
number); the store validates again with the spec itself. A response carries
the full spec with defaults filled in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from felix.control.model import (
    PATH_LENGTH,
    BindingSpec,
    BridgeSpec,
    CacheSpec,
    GroupSpec,
    IssuerSpec,
    NamespaceSpec,
    Op,
    Path,
    PolicySpec,
    Resource,
    ResourceKind,
    StreamSpec,
    TenantSpec,
    ancestors,
)
from felix.control.store import CursorTooOld
from felix.errors import (
    AlreadyExists,
    BadRequest,
    ErrorCode,
    FelixError,
    HasChildren,
    NotFound,
    Overloaded,
    PermissionDenied,
    ServerError,
    SettingConflict,
    TooLarge,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)
from felix.names import NAME_MAX_CHARS, NAME_RULE

__all__ = [
    "COLLECTIONS",
    "IF_MATCH_MAX_CHARS",
    "IF_MATCH_PATTERN",
    "NAME_DESCRIPTION",
    "NAME_PATTERN",
    "NAME_SCHEMA",
    "PROBLEM_BASE",
    "PROBLEM_TYPES",
    "BindingCreate",
    "BindingOut",
    "BindingPatch",
    "BridgeCreate",
    "BridgeOut",
    "BridgePatch",
    "CacheCreate",
    "CacheOut",
    "CachePatch",
    "ChangeOut",
    "ChangePage",
    "Deleted",
    "GroupCreate",
    "GroupOut",
    "GroupPatch",
    "Health",
    "IssuerCreate",
    "IssuerOut",
    "IssuerPatch",
    "Jwks",
    "NamespaceCreate",
    "NamespaceOut",
    "NamespacePatch",
    "PolicyCreate",
    "PolicyOut",
    "PolicyPatch",
    "Problem",
    "ProblemType",
    "ProblemTypeDoc",
    "Region",
    "RegionList",
    "ResourceList",
    "ResourceOut",
    "ResourceRef",
    "Snapshot",
    "StoreHealth",
    "StreamCreate",
    "StreamOut",
    "StreamPatch",
    "SystemInfo",
    "TenantCreate",
    "TenantOut",
    "TenantPatch",
    "TokenExchange",
    "TokenOut",
    "collection_url",
    "etag",
    "parse_if_match",
    "resource_out",
    "resource_url",
]

# -- names and URLs ------------------------------------------------------------------------

#: :data:`felix.names.NAME_RULE` as a JSON-schema pattern. Documentation only: the API
#: enforces names with :func:`felix.names.validate_name` (tests check the two agree).
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{NAME_MAX_CHARS - 1}}}$"
#: The JSON schema of a name, for bodies and path parameters.
NAME_SCHEMA: dict[str, Any] = {
    "pattern": NAME_PATTERN,
    "minLength": 1,
    "maxLength": NAME_MAX_CHARS,
}
NAME_DESCRIPTION = f"{NAME_RULE}."

Name = Annotated[str, Field(description=NAME_DESCRIPTION, json_schema_extra=NAME_SCHEMA)]

#: The URL segment of each kind's collection.
COLLECTIONS = {
    ResourceKind.TENANT: "tenants",
    ResourceKind.NAMESPACE: "namespaces",
    ResourceKind.STREAM: "streams",
    ResourceKind.CACHE: "caches",
    ResourceKind.ISSUER: "issuers",
    ResourceKind.POLICY: "policies",
    ResourceKind.BINDING: "bindings",
    ResourceKind.GROUP: "groups",
    ResourceKind.BRIDGE: "bridges",
}


def _kinds_along(kind: ResourceKind) -> list[ResourceKind]:
    """The kinds named by each element of a ``kind`` path: tenant, ..., then ``kind``."""
    return [k for k, _ in reversed(ancestors(kind, ("",) * PATH_LENGTH[kind]))] + [kind]


def resource_url(kind: ResourceKind, path: Path) -> str:
    """The URL path of one resource, e.g. ``/v1/tenants/acme/namespaces/prod``.

    ``path`` must hold valid names (see :func:`felix.control.model.check_path`):
    they are put in the URL as they are, without escaping.
    """
    parts = ["/v1"]
    for along, name in zip(_kinds_along(kind), path, strict=True):
        parts += [COLLECTIONS[along], name]
    return "/".join(parts)


def collection_url(kind: ResourceKind, parent: Path) -> str:
    """The URL path of a collection: ``kind`` resources directly under ``parent``."""
    if PATH_LENGTH[kind] != len(parent) + 1:
        raise BadRequest(f"a {kind} lives under {PATH_LENGTH[kind] - 1} names, got {len(parent)}")
    if not parent:
        return f"/v1/{COLLECTIONS[kind]}"
    parent_kind = _kinds_along(kind)[len(parent) - 1]
    return f"{resource_url(parent_kind, parent)}/{COLLECTIONS[kind]}"


def etag(version: int) -> str:
    """A resource version as a (strong) HTTP entity tag: ``"3"``."""
    return f'"{version}"'


#: One entity tag (RFC 9110): optional W/, then a quoted tag; or a bare version (lenient).
_TAG_RE = re.compile(r'(W/)?"([!#-~]*)"|([0-9]+)')
#: An If-Match value (without surrounding whitespace, which HTTP strips): *, or a
#: comma-separated list of tags; empty list elements are allowed (RFC 9110 5.6.1).
#: Whitespace may only follow a tag or a comma, so there is one way to match: no backtracking.
_ELEMENT = r'(?:(?:(?:W/)?"[!#-~]*"|[0-9]+)[ \t]*)?'
IF_MATCH_PATTERN = rf"^(?:\*|{_ELEMENT}(?:,[ \t]*{_ELEMENT})*)$"
_IF_MATCH_RE = re.compile(IF_MATCH_PATTERN)
#: Longest If-Match value accepted.
IF_MATCH_MAX_CHARS = 1024


def parse_if_match(value: str | None) -> set[int] | None:
    """The versions ``If-Match`` allows; None when any version will do (absent or ``*``).

    Entity tags are compared strongly (RFC 9110): a weak tag (``W/"3"``) or a
    tag that is not a version matches nothing. Raises BadRequest if malformed.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if len(value) > IF_MATCH_MAX_CHARS or _IF_MATCH_RE.fullmatch(value) is None:
        raise BadRequest(f'malformed If-Match {value[:80]!r}: want "3", 3, a list of them, or *')
    if value == "*":
        return None
    versions: set[int] = set()
    for match in _TAG_RE.finditer(value):
        weak, quoted, bare = match.groups()
        tag = bare if bare is not None else quoted
        if not weak and tag.isdigit() and len(tag) <= 18:  # ASCII digits that fit an int64
            versions.add(int(tag))
    return versions


# -- request bodies ------------------------------------------------------------------------


def _no_default(schema: dict[str, Any]) -> None:
    # A patch field's None default means "not sent", which is no value a client could send.
    schema.pop("default", None)


def _body(
    model: type[BaseModel], title: str, *, partial: bool, with_name: bool = False
) -> type[BaseModel]:
    """A request body with ``model``'s settings: strict (``false`` is no integer, ``"3"``
    no number), unknown keys refused, types and constraints kept.

    ``partial`` (a PATCH): every field optional and without a default, so
    ``model_dump(exclude_unset=True)`` is the patch; an explicit ``null`` is only
    accepted where the setting itself is nullable. Otherwise fields keep their
    defaults, which the OpenAPI document shows.
    """
    fields: dict[str, Any] = {"name": (Name, ...)} if with_name else {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested = annotation.__name__.removesuffix("Defaults")
            annotation = _body(
                annotation, nested + ("Patch" if partial else "Settings"), partial=partial
            )
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        if partial:
            field = Field(default=None, description=info.description, json_schema_extra=_no_default)
        else:
            field = Field(
                default=info.get_default(call_default_factory=True), description=info.description
            )
        fields[name] = (annotation, field)
    doc = (
        f"Settings to change: any of {model.__name__}'s."
        if partial
        else f"{'The name and settings' if with_name else 'Settings'} (defaults for any left out)."
    )
    return create_model(
        title, __config__=ConfigDict(extra="forbid", strict=True), __doc__=doc, **fields
    )


if TYPE_CHECKING:
    # The checker sees the spec classes (plus a name); at run time every body is a strict
    # copy made by _body. The API only reads .name and model_dump() from them.

    class TenantCreate(TenantSpec):
        name: str

    class NamespaceCreate(NamespaceSpec):
        name: str

    class StreamCreate(StreamSpec):
        name: str

    class CacheCreate(CacheSpec):
        name: str

    class IssuerCreate(IssuerSpec):
        name: str

    class PolicyCreate(PolicySpec):
        name: str

    class BindingCreate(BindingSpec):
        name: str

    class GroupCreate(GroupSpec):
        name: str

    class BridgeCreate(BridgeSpec):
        name: str

    TenantPatch = TenantSpec
    NamespacePatch = NamespaceSpec
    StreamPatch = StreamSpec
    CachePatch = CacheSpec
    IssuerPatch = IssuerSpec
    PolicyPatch = PolicySpec
    BindingPatch = BindingSpec
    GroupPatch = GroupSpec
    BridgePatch = BridgeSpec
else:
    TenantCreate = _body(TenantSpec, "TenantCreate", partial=False, with_name=True)
    NamespaceCreate = _body(NamespaceSpec, "NamespaceCreate", partial=False, with_name=True)
    StreamCreate = _body(StreamSpec, "StreamCreate", partial=False, with_name=True)
    CacheCreate = _body(CacheSpec, "CacheCreate", partial=False, with_name=True)
    TenantPatch = _body(TenantSpec, "TenantPatch", partial=True)
    NamespacePatch = _body(NamespaceSpec, "NamespacePatch", partial=True)
    StreamPatch = _body(StreamSpec, "StreamPatch", partial=True)
    CachePatch = _body(CacheSpec, "CachePatch", partial=True)
    IssuerCreate = _body(IssuerSpec, "IssuerCreate", partial=False, with_name=True)
    PolicyCreate = _body(PolicySpec, "PolicyCreate", partial=False, with_name=True)
    BindingCreate = _body(BindingSpec, "BindingCreate", partial=False, with_name=True)
    IssuerPatch = _body(IssuerSpec, "IssuerPatch", partial=True)
    PolicyPatch = _body(PolicySpec, "PolicyPatch", partial=True)
    BindingPatch = _body(BindingSpec, "BindingPatch", partial=True)
    GroupCreate = _body(GroupSpec, "GroupCreate", partial=False, with_name=True)
    GroupPatch = _body(GroupSpec, "GroupPatch", partial=True)
    BridgeCreate = _body(BridgeSpec, "BridgeCreate", partial=False, with_name=True)
    BridgePatch = _body(BridgeSpec, "BridgePatch", partial=True)


# -- resources -----------------------------------------------------------------------------


class _ResourceOut(BaseModel):
    kind: ResourceKind
    path: Annotated[
        list[str], Field(min_length=1, max_length=4, description="names from the tenant down")
    ]
    name: Annotated[str, Field(description="the last element of path")]
    version: Annotated[int, Field(ge=1, description="grows by one on every update; the ETag")]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, res: Resource) -> Self:
        """The response body for a stored resource (its kind must be this class's)."""
        return cls.model_validate({**res.model_dump(), "name": res.name})


class TenantOut(_ResourceOut):
    """A tenant."""

    kind: Literal[ResourceKind.TENANT]
    spec: TenantSpec


class NamespaceOut(_ResourceOut):
    """A namespace."""

    kind: Literal[ResourceKind.NAMESPACE]
    spec: NamespaceSpec


class StreamOut(_ResourceOut):
    """A stream."""

    kind: Literal[ResourceKind.STREAM]
    spec: StreamSpec


class CacheOut(_ResourceOut):
    """A cache."""

    kind: Literal[ResourceKind.CACHE]
    spec: CacheSpec


class IssuerOut(_ResourceOut):
    """An OIDC identity provider the tenant trusts."""

    kind: Literal[ResourceKind.ISSUER]
    spec: IssuerSpec


class PolicyOut(_ResourceOut):
    """A named list of permissions."""

    kind: Literal[ResourceKind.POLICY]
    spec: PolicySpec


class BindingOut(_ResourceOut):
    """A role binding: a user or group and the policies it is given."""

    kind: Literal[ResourceKind.BINDING]
    spec: BindingSpec


class GroupOut(_ResourceOut):
    """A queue group of a durable stream."""

    kind: Literal[ResourceKind.GROUP]
    spec: GroupSpec


class BridgeOut(_ResourceOut):
    """A bridge: one stream of the tenant copied to a stream of another region."""

    kind: Literal[ResourceKind.BRIDGE]
    spec: BridgeSpec


_AnyOut = (
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
ResourceOut = Annotated[_AnyOut, Field(discriminator="kind")]
_OUT: dict[ResourceKind, type[_AnyOut]] = {
    ResourceKind.TENANT: TenantOut,
    ResourceKind.NAMESPACE: NamespaceOut,
    ResourceKind.STREAM: StreamOut,
    ResourceKind.CACHE: CacheOut,
    ResourceKind.ISSUER: IssuerOut,
    ResourceKind.POLICY: PolicyOut,
    ResourceKind.BINDING: BindingOut,
    ResourceKind.GROUP: GroupOut,
    ResourceKind.BRIDGE: BridgeOut,
}


T = TypeVar("T", bound=BaseModel)


def resource_out(res: Resource) -> _AnyOut:
    """The response body for a stored resource of any kind."""
    return _OUT[res.kind].of(res)


class ResourceList(BaseModel, Generic[T]):
    """Resources of one kind directly under one parent, ordered by name."""

    items: list[T]


class ResourceRef(BaseModel):
    kind: ResourceKind
    path: list[str]


class Deleted(BaseModel):
    """What a delete removed, in the order it was removed (children first)."""

    deleted: list[ResourceRef]


# -- token exchange ------------------------------------------------------------------------


class TokenExchange(BaseModel):
    """Optional body of a token exchange: the permissions to ask for (a subset of the grant).

    Requested permissions the identity is not granted are dropped, never added.
    """

    model_config = ConfigDict(extra="forbid")

    permissions: Annotated[
        list[Annotated[str, Field(max_length=256)]] | None, Field(max_length=1024)
    ] = None


class TokenOut(BaseModel):
    """A Felix token for the tenant (verify it with the tenant's ``.well-known/jwks.json``)."""

    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: Annotated[int, Field(ge=1, description="seconds the token is valid for")]


class Jwks(BaseModel):
    """A JWK set (RFC 7517): the tenant's public token signing keys."""

    keys: list[dict[str, Any]]


# -- snapshot and change feed --------------------------------------------------------------


class Snapshot(BaseModel):
    """Every resource, and the feed position this state reflects.

    A follower applies it, then reads ``GET /v1/changes?since=<position>``.
    """

    position: Annotated[int, Field(ge=0)]
    resources: list[ResourceOut]


class ChangeOut(BaseModel):
    """One change: ``resource`` is the state after it (for a delete, just before)."""

    position: Annotated[int, Field(ge=1)]
    op: Op
    resource: ResourceOut


class ChangePage(BaseModel):
    """Changes after ``since`` in commit order; ask for ``since=next`` to continue.

    ``position`` is the newest position of the feed: ``next < position`` means
    more changes are waiting.
    """

    changes: list[ChangeOut]
    next: Annotated[int, Field(ge=0)]
    position: Annotated[int, Field(ge=0)]


# -- system --------------------------------------------------------------------------------


class SystemInfo(BaseModel):
    service: Literal["felix-control"] = "felix-control"
    version: str
    api: Literal["v1"] = "v1"
    region: str
    node: dict[str, Any]


class StoreHealth(BaseModel):
    reachable: bool
    position: int | None = None
    error: str | None = None


class Health(BaseModel):
    """``ok`` when the store answers; ``unavailable`` (HTTP 503) when it does not."""

    status: Literal["ok", "unavailable"]
    store: StoreHealth


class Region(BaseModel):
    name: str
    local: bool


class RegionList(BaseModel):
    """The regions streams may be placed in: for now only the node's own."""

    regions: list[Region]


# -- problems (RFC 9457) -------------------------------------------------------------------

#: Problem ``type`` URIs are this plus the slug; each one is documented at its URL.
PROBLEM_BASE = "/v1/problems/"


@dataclass(frozen=True)
class ProblemType:
    """One kind of error answer: its status, title, and the felix error behind it."""

    slug: str
    status: int
    title: str
    #: What the API answers this for, and what the client raises when it gets it.
    error: type[FelixError]
    description: str

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.slug


PROBLEM_TYPES: dict[str, ProblemType] = {
    p.slug: p
    for p in (
        ProblemType(
            ErrorCode.BAD_REQUEST.slug,
            400,
            "Invalid request",
            BadRequest,
            "A name, setting or header was refused: detail says which and why.",
        ),
        ProblemType(
            "validation-error",
            422,
            "Request does not match the API schema",
            BadRequest,
            "The body, query or headers do not match the OpenAPI document; "
            "errors lists each problem (loc, msg, type).",
        ),
        ProblemType(
            ErrorCode.NOT_FOUND.slug,
            404,
            "Not found",
            NotFound,
            "The resource (or its parent) does not exist.",
        ),
        ProblemType(
            ErrorCode.ALREADY_EXISTS.slug,
            409,
            "Resource already exists",
            AlreadyExists,
            "A resource with this name exists: update it, or delete it first.",
        ),
        ProblemType(
            ErrorCode.HAS_CHILDREN.slug,
            409,
            "Resource has children",
            HasChildren,
            "Delete the resources under it first, or pass cascade=true.",
        ),
        ProblemType(
            ErrorCode.VERSION_CONFLICT.slug,
            412,
            "Version conflict",
            VersionConflict,
            "If-Match named another version than the stored one: read it again and retry.",
        ),
        ProblemType(
            ErrorCode.SETTING_CONFLICT.slug,
            409,
            "Settings conflict",
            SettingConflict,
            "Settings contradict each other or what they depend on (such as fsync other "
            "than none on a stream that is not durable, a queue group on a stream that is "
            "not durable, or a group's start changed after its creation): detail names "
            "them; change one of them.",
        ),
        ProblemType(
            "cursor-too-old",
            410,
            "Feed position not available",
            CursorTooOld,
            "The change feed cannot continue from since (older than the retained "
            "history, or past the newest position after a store reset): fetch "
            "GET /v1/snapshot and continue from its position. The body holds since "
            "and oldest (the oldest position the feed still holds).",
        ),
        ProblemType(
            ErrorCode.TOO_LARGE.slug,
            413,
            "Too large",
            TooLarge,
            "A value exceeds its limit.",
        ),
        ProblemType(
            ErrorCode.UNAUTHENTICATED.slug,
            401,
            "Unauthenticated",
            Unauthenticated,
            "No valid credentials.",
        ),
        ProblemType(
            ErrorCode.PERMISSION_DENIED.slug,
            403,
            "Permission denied",
            PermissionDenied,
            "The credentials do not grant this operation.",
        ),
        ProblemType(
            ErrorCode.OVERLOADED.slug,
            503,
            "Overloaded",
            Overloaded,
            "A limit was reached (such as the number of resources under one parent).",
        ),
        ProblemType(
            ErrorCode.UNAVAILABLE.slug,
            503,
            "Unavailable",
            Unavailable,
            "The store is unreachable or restarting; retry after a backoff.",
        ),
        ProblemType(
            "internal-error",
            500,
            "Internal error",
            ServerError,
            "A bug: the server logged it.",
        ),
    )
}


class Problem(BaseModel):
    """An error answer (RFC 9457, media type application/problem+json).

    Extension members: ``errors`` (validation-error), ``since`` and ``oldest``
    (cursor-too-old).
    """

    model_config = ConfigDict(extra="allow")

    type: Annotated[str, Field(description="URI of the problem type (dereferenceable)")]
    title: str
    status: int
    detail: str


class ProblemTypeDoc(BaseModel):
    """What one problem type means."""

    type: str
    title: str
    status: int
    description: str
