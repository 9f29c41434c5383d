"""The control plane's resources (tenants, namespaces, streams, caches, the queue groups
of a stream, and the authentication settings of a tenant: issuers, policies, bindings)
and how they change.

Every resource has a ``kind``, a ``path`` that names it (``("acme",)`` for a
tenant, ``("acme", "prod")`` for a namespace, ``("acme", "prod", "orders")`` for
a stream or cache, ``("acme", "prod", "orders", "workers")`` for a queue group of
stream ``orders``, ``("acme", "okta")`` for an issuer, policy or binding), a
``spec`` of settings, and a ``version`` that starts at 1 and grows by one on
every update (sent as the HTTP ``ETag``). Every create, update and delete is
recorded as a :class:`Change` at a feed ``position``; one feed for all kinds, in
commit order, so a namespace's creation always precedes its streams'.

Names follow :func:`felix.names.validate_name` (the same rule the broker applies).

Two resources of different kinds may share a path (namespace ``acme/okta`` and issuer
``acme/okta``): a resource is identified by its kind *and* path, and its parent by
:data:`PARENT`, never by the path alone.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from felix.auth.oidc import IssuerConfig
from felix.auth.perms import MAX_PERMISSION_CHARS, MAX_PERMISSIONS, Permission
from felix.auth.rbac import MAX_SUBJECT_CHARS, RoleBinding
from felix.errors import BadRequest, SettingConflict
from felix.names import validate_name
from felix.shard.queue.settings import GroupSettings


class ResourceKind(enum.StrEnum):
    TENANT = "tenant"
    NAMESPACE = "namespace"
    STREAM = "stream"
    CACHE = "cache"
    #: A trusted OIDC identity provider of a tenant.
    ISSUER = "issuer"
    #: A named list of permissions in a tenant.
    POLICY = "policy"
    #: Gives a user or group of a tenant's identity providers some policies.
    BINDING = "binding"
    #: A queue group of a durable stream (docs/queues.md).
    GROUP = "group"


#: Names in a path: tenant (tenant), namespace (tenant, ns), stream or cache (tenant, ns,
#: name), issuer, policy or binding (tenant, name), group (tenant, ns, stream, name).
PATH_LENGTH = {
    ResourceKind.TENANT: 1,
    ResourceKind.NAMESPACE: 2,
    ResourceKind.STREAM: 3,
    ResourceKind.CACHE: 3,
    ResourceKind.ISSUER: 2,
    ResourceKind.POLICY: 2,
    ResourceKind.BINDING: 2,
    ResourceKind.GROUP: 4,
}
#: The kind a path of a kind's parent has (None: top level).
PARENT = {
    ResourceKind.TENANT: None,
    ResourceKind.NAMESPACE: ResourceKind.TENANT,
    ResourceKind.STREAM: ResourceKind.NAMESPACE,
    ResourceKind.CACHE: ResourceKind.NAMESPACE,
    ResourceKind.ISSUER: ResourceKind.TENANT,
    ResourceKind.POLICY: ResourceKind.TENANT,
    ResourceKind.BINDING: ResourceKind.TENANT,
    ResourceKind.GROUP: ResourceKind.STREAM,
}
#: The kinds other resources live under.
CONTAINERS = frozenset(k for k in PARENT.values() if k is not None)

Path = tuple[str, ...]


def ancestors(kind: ResourceKind, path: Path) -> list[tuple[ResourceKind, Path]]:
    """The (kind, path) of every resource ``path`` lives under, nearest first."""
    out: list[tuple[ResourceKind, Path]] = []
    parent = PARENT[kind]
    while parent is not None:
        path = path[:-1]
        out.append((parent, path))
        parent = PARENT[parent]
    return out


def check_path(kind: ResourceKind, path: Path) -> Path:
    """Validate ``path`` for ``kind`` (length and every name); raises BadRequest."""
    if len(path) != PATH_LENGTH[kind]:
        raise BadRequest(f"a {kind} is named by {PATH_LENGTH[kind]} names, got {len(path)}")
    labels = [k.value for k, _ in reversed(ancestors(kind, path))] + [kind.value]
    for label, name in zip(labels, path, strict=True):
        validate_name(label, name)
    return path


class _Spec(BaseModel):
    # Unknown settings are refused (a typo must not be silently ignored).
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantSpec(_Spec):
    description: Annotated[str, Field(max_length=1024)] = ""
    #: Memory the tenant may hold on a node (replay rings and cache entries, charged as
    #: used), split evenly over its shards. None: the node's --tenant-memory-quota.
    memory_quota_bytes: Annotated[
        int | None,
        Field(
            ge=4096,
            le=1 << 50,
            description="bytes the tenant may hold on a node, split over its shards "
            "(default: the node's --tenant-memory-quota)",
        ),
    ] = None
    #: Streams, caches and watches the tenant may hold per shard. None: the node's default.
    max_resources_per_shard: Annotated[
        int | None,
        Field(
            ge=1,
            le=10_000_000,
            description="streams, caches and watches of not yet created streams the tenant "
            "may hold on one shard (default: the node's --tenant-max-resources)",
        ),
    ] = None
    auto_created: Annotated[
        bool,
        Field(
            description="created by a node on first use (a publish or cache set) and "
            "registered here with the settings it got, rather than defined through this API"
        ),
    ] = False


class NamespaceSpec(_Spec):
    description: Annotated[str, Field(max_length=1024)] = ""
    auto_created: Annotated[
        bool,
        Field(
            description="created by a node on first use (a publish or cache set) and "
            "registered here with the settings it got, rather than defined through this API"
        ),
    ] = False


class QueueDefaults(_Spec):
    max_deliveries: Annotated[int, Field(ge=1, le=1000)] = 5
    ack_deadline_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    dead_letter: bool = True


#: The longest retention_age_s: 100 years (bounded, so time arithmetic stays finite).
MAX_RETENTION_AGE_S = 100 * 365 * 86_400
#: fsync values before durable streams, and what store migration 2 renamed them to.
FSYNC_RENAMED = {"batch": "interval", "always": "commit"}


class StreamSpec(_Spec):
    durable: Annotated[
        bool,
        Field(description="keep the stream's records in log files on the owning node's disk"),
    ] = False
    retention_age_s: Annotated[
        float | None,
        Field(
            gt=0,
            le=MAX_RETENTION_AGE_S,
            description="a durable stream drops whole log segments older than this "
            "(seconds, up to 100 years)",
        ),
    ] = None
    retention_bytes: Annotated[
        int | None,
        Field(
            ge=4096,
            le=1 << 40,
            description="caps the replay ring's bytes, and a durable stream's bytes on disk "
            "(whole sealed segments are dropped)",
        ),
    ] = None
    #: None (or left out): "commit" for a durable stream, "none" otherwise; the stored
    #: spec always holds the value that applies.
    fsync: Annotated[
        Literal["none", "interval", "commit"] | None,
        Field(
            description="when a durable stream's appends are fsynced: none (the kernel "
            "decides; acks say WRITTEN), interval (every fsync_interval_ms; acks say "
            "WRITTEN), commit (before each publish ack, grouped; acks say SYNCED). "
            "Default: commit for a durable stream, none otherwise; other than none needs "
            "durable=true"
        ),
    ] = None
    fsync_interval_ms: Annotated[
        int, Field(ge=1, le=60_000, description="period of fsync=interval, in milliseconds")
    ] = 100
    ack_default: Literal["none", "per_message", "per_batch"] = "per_message"
    replay_max_records: Annotated[int, Field(ge=1, le=100_000_000)] = 100_000
    replay_max_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 64 * 1024 * 1024
    slow_subscriber_policy: Literal["drop_old", "disconnect", "block"] = "drop_old"
    queue: QueueDefaults = QueueDefaults()
    region: Annotated[str | None, Field(max_length=64)] = None
    auto_created: Annotated[
        bool,
        Field(
            description="created by a node on first use (a publish or cache set) and "
            "registered here with the settings it got, rather than defined through this API"
        ),
    ] = False

    @field_validator("fsync", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, str) and value in FSYNC_RENAMED:
            raise ValueError(f"fsync {value!r} is now called {FSYNC_RENAMED[value]!r}")
        return value

    @model_validator(mode="after")
    def _fsync_follows_durable(self) -> StreamSpec:
        if self.fsync is None:
            return self.model_copy(update={"fsync": "commit" if self.durable else "none"})
        if self.fsync != "none" and not self.durable:
            # Raised as is (not a ValueError), so the API answers 409 setting-conflict.
            raise SettingConflict(
                f"fsync={self.fsync!r} needs durable=true: an in-memory stream writes "
                "nothing to disk; set durable=true or fsync='none'"
            )
        return self


class CacheSpec(_Spec):
    budget_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 64 * 1024 * 1024
    default_ttl_s: Annotated[float | None, Field(gt=0, le=365 * 86_400)] = None
    max_value_bytes: Annotated[int, Field(ge=0, le=64 * 1024 * 1024)] = 1024 * 1024
    auto_created: Annotated[
        bool,
        Field(
            description="created by a node on first use (a publish or cache set) and "
            "registered here with the settings it got, rather than defined through this API"
        ),
    ] = False


_GROUP_DEFAULTS = GroupSettings()


class GroupStart(_Spec):
    """A group that starts at a given offset of its stream."""

    offset: int


class GroupSpec(_Spec):
    """A queue group's settings (docs/queues.md, "Settings"): the shape of
    :meth:`GroupSettings.to_spec <felix.shard.queue.settings.GroupSettings.to_spec>`.

    The fields here only give the types (and the OpenAPI document); the rules (ranges,
    ``max_span >= max_ack_pending``, names) are :class:`GroupSettings`'s own, applied by
    :meth:`~felix.shard.queue.settings.GroupSettings.from_spec` after the types check:
    a value they refuse raises BadRequest (400), as the shard would.
    """

    start: Annotated[
        Literal["earliest", "latest"] | GroupStart,
        Field(
            description='where a new group starts: "earliest", "latest" or {"offset": n}; '
            "cannot change after the group is created"
        ),
    ] = "earliest"
    lease_ms: Annotated[
        int,
        Field(description="how long a delivery is leased before it counts a failure (ms)"),
    ] = _GROUP_DEFAULTS.lease_ms
    max_deliveries: Annotated[
        int, Field(description="failures after which a record is dead-lettered")
    ] = _GROUP_DEFAULTS.max_deliveries
    backoff_ms: Annotated[
        list[int],
        Field(
            description="delays before a nak'ed record is redelivered, by failure count "
            "(the last repeats; ms)"
        ),
    ] = list(_GROUP_DEFAULTS.backoff_ms)
    max_ack_pending: Annotated[int, Field(description="records leased at once over the group")] = (
        _GROUP_DEFAULTS.max_ack_pending
    )
    max_span: Annotated[
        int, Field(description="offsets between the group's floor and next (>= max_ack_pending)")
    ] = _GROUP_DEFAULTS.max_span
    dead_letter: Annotated[
        str | None,
        Field(description="the dead-letter stream, in the stream's namespace (null: <stream>.dlq)"),
    ] = _GROUP_DEFAULTS.dead_letter
    exclusive: Annotated[bool, Field(description="one active member, the others on standby")] = (
        _GROUP_DEFAULTS.exclusive
    )

    @model_validator(mode="after")
    def _check(self) -> GroupSpec:
        # Raised as is (BadRequest, not a ValueError): the API answers 400 with its text.
        self.settings()
        return self

    def settings(self) -> GroupSettings:
        """The shard's view of these settings. Raises BadRequest if they are invalid."""
        return GroupSettings.from_spec(self.model_dump(mode="json"))


Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
Principal = Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT_CHARS)]


class IssuerSpec(_Spec):
    """An OIDC identity provider the tenant trusts (see :class:`felix.auth.oidc.IssuerConfig`).

    Exactly one of ``jwks_url`` (https, or http on localhost) and ``jwks`` (an inline
    public JWK set). Everything :class:`~felix.auth.oidc.IssuerConfig` refuses (HMAC
    algorithms, private inline keys, ...) is refused here too.
    """

    issuer: Annotated[Principal, Field(description="the tokens' iss, exactly")]
    audience: Annotated[Principal, Field(description="must be, or be in, the tokens' aud")]
    algorithms: Annotated[list[Algorithm], Field(min_length=1, max_length=9)]
    jwks_url: Annotated[str | None, Field(min_length=1, max_length=2048)] = None
    jwks: dict[str, Any] | None = None
    groups_claim: Principal = "groups"

    @model_validator(mode="after")
    def _check(self) -> IssuerSpec:
        try:
            self.config()
        except BadRequest as exc:
            raise ValueError(str(exc)) from None
        return self

    def config(self) -> IssuerConfig:
        """The verifier's view of this issuer. Raises BadRequest if it is invalid."""
        return IssuerConfig(
            issuer=self.issuer,
            audience=self.audience,
            algorithms=tuple(self.algorithms),
            jwks_url=self.jwks_url,
            jwks=self.jwks,
            groups_claim=self.groups_claim,
        )


class PolicySpec(_Spec):
    """Permissions (``ACTION:KIND:PATH``, see :mod:`felix.auth.perms`) under one name.

    Only the syntax is checked here: that every permission names the policy's own
    tenant is checked by the stores, which know the path.
    """

    permissions: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_PERMISSION_CHARS)]],
        Field(max_length=MAX_PERMISSIONS),
    ]
    description: Annotated[str, Field(max_length=1024)] = ""

    @field_validator("permissions")
    @classmethod
    def _parse(cls, value: list[str]) -> list[str]:
        try:
            return [str(Permission.parse(p)) for p in value]
        except BadRequest as exc:
            raise ValueError(str(exc)) from None


class BindingSpec(_Spec):
    """Gives ``subject`` the tenant's ``policies`` (see :class:`felix.auth.rbac.RoleBinding`).

    ``subject`` is ``group:NAME``, ``user:SUB`` or a bare ``SUB``; ``issuer``, if set,
    limits the binding to identities from that issuer (an issuer's ``issuer`` URL).
    """

    subject: Principal
    policies: Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=64)
    ]
    issuer: Principal | None = None

    @model_validator(mode="after")
    def _check(self) -> BindingSpec:
        try:
            self.binding()
        except BadRequest as exc:
            raise ValueError(str(exc)) from None
        return self

    def binding(self) -> RoleBinding:
        """The RBAC view of this binding. Raises BadRequest if it is invalid."""
        return RoleBinding(self.subject, tuple(self.policies), self.issuer)


SPEC_TYPES: dict[ResourceKind, type[_Spec]] = {
    ResourceKind.TENANT: TenantSpec,
    ResourceKind.NAMESPACE: NamespaceSpec,
    ResourceKind.STREAM: StreamSpec,
    ResourceKind.CACHE: CacheSpec,
    ResourceKind.ISSUER: IssuerSpec,
    ResourceKind.POLICY: PolicySpec,
    ResourceKind.BINDING: BindingSpec,
    ResourceKind.GROUP: GroupSpec,
}


class Resource(BaseModel):
    """One stored resource."""

    model_config = ConfigDict(frozen=True)

    kind: ResourceKind
    path: Path
    spec: dict[str, Any]
    version: Annotated[int, Field(ge=1)]
    created_at: datetime
    updated_at: datetime

    @field_validator("path", mode="before")
    @classmethod
    def _tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @property
    def name(self) -> str:
        return self.path[-1]


class Op(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


class Change(BaseModel):
    """One entry of the change feed: what happened to which resource, at which position.

    ``resource`` is the state after the change (for a delete: the state just before).
    """

    model_config = ConfigDict(frozen=True)

    position: Annotated[int, Field(ge=1)]
    op: Op
    resource: Resource


def validate_spec(kind: ResourceKind, spec: dict[str, Any] | None) -> dict[str, Any]:
    """The full spec (defaults filled in) of ``kind`` from user input; raises BadRequest."""
    from pydantic import ValidationError

    try:
        model = SPEC_TYPES[kind].model_validate(spec or {})
    except ValidationError as exc:
        raise BadRequest(f"invalid {kind} settings: {exc.errors(include_url=False)}") from None
    return model.model_dump(mode="json")
