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
import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

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
    #: Copies one stream of the tenant to a stream of another region (docs/operations.md).
    BRIDGE = "bridge"


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
    ResourceKind.BRIDGE: 2,
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
    ResourceKind.BRIDGE: ResourceKind.TENANT,
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


#: The home region of a tenant, namespace, stream or cache (issue #15). The API fills in
#: its control plane's region when it is left out, refuses another one, and refuses any
#: change of it; a resource stored before regions (no value) is of its control plane's
#: region (:func:`with_region`).
#: Created by a node on first use and registered with the settings it got (felix/node/registrar.py).
AutoCreated = Annotated[
    bool,
    Field(
        description="created by a node on first use (a publish or cache set) and "
        "registered here with the settings it got, rather than defined through this API"
    ),
]
HomeRegion = Annotated[
    str | None,
    Field(
        max_length=64,
        description="the region the resource lives in: only the control plane's own "
        "(default); it cannot change",
    ),
]
#: The kinds that record a home region.
REGIONAL = frozenset(
    {ResourceKind.TENANT, ResourceKind.NAMESPACE, ResourceKind.STREAM, ResourceKind.CACHE}
)


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
    #: Durable stream bytes the tenant may keep on a node, split evenly over its shards.
    #: None: the node's --tenant-disk-quota (none by default).
    disk_quota_bytes: Annotated[
        int | None,
        Field(
            ge=1 << 20,
            le=1 << 60,
            description="bytes of durable streams the tenant may keep on a node, split "
            "over its shards (default: the node's --tenant-disk-quota)",
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
    region: HomeRegion = None
    auto_created: AutoCreated = False


class NamespaceSpec(_Spec):
    description: Annotated[str, Field(max_length=1024)] = ""
    region: HomeRegion = None
    auto_created: AutoCreated = False


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
    #: None (or left out): the node's default (felix up --dedup-window, 2 minutes).
    dedup_window_s: Annotated[
        float | None,
        Field(
            ge=0,
            le=7 * 86_400,
            description="how long the stream remembers the felix-msg-id of each record it "
            "stored, to drop a publish of the same id again (seconds, up to 7 days; 0: "
            "off; default: the node's, 120)",
        ),
    ] = None
    dedup_max_entries: Annotated[
        int | None,
        Field(
            ge=1,
            le=10_000_000,
            description="most message ids the stream remembers (the oldest are forgotten "
            "first; default: the node's, 100000)",
        ),
    ] = None
    queue: QueueDefaults = QueueDefaults()
    region: HomeRegion = None
    auto_created: AutoCreated = False

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
    region: HomeRegion = None
    auto_created: AutoCreated = False


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


# -- bridges ----------------------------------------------------------------------------

#: Bridges one tenant may define (each is a runner task, two connections, a checkpoint
#: file and a few metric series: bounded so a careless tenant cannot run away with them).
MAX_BRIDGES_PER_TENANT = 64
#: Longest file path or environment variable name a bridge refers to.
MAX_REF_CHARS = 1024
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: What a secret looks like, so one pasted into a reference field is refused, not stored:
#: a JWT (three base64url parts, the first starting like a JSON object), a PEM block, an
#: HTTP credential, or a long run of key-like characters with no path structure.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_KEYLIKE = re.compile(r"[A-Za-z0-9+/=_-]{40,}")


def looks_like_secret(value: str) -> bool:
    """True if ``value`` looks like a credential rather than a name or a path."""
    lowered = value.lower()
    return (
        _JWT.search(value) is not None
        or "-----begin" in lowered
        or lowered.startswith(("bearer ", "basic "))
        or any(_KEYLIKE.fullmatch(part) is not None for part in value.split("/"))
    )


def _no_secret(field: str, value: str) -> str:
    if looks_like_secret(value):
        raise ValueError(
            f"{field} looks like a secret (a token, key or certificate): a bridge holds "
            "only references to secrets, a file path or an environment variable name, "
            "never the secret itself"
        )
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        raise ValueError(f"{field} holds control characters")
    return value


def split_stream_ref(text: str) -> tuple[str, str]:
    """``ns/stream`` as (namespace, stream); raises BadRequest."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise BadRequest(f"a bridge's stream is NAMESPACE/STREAM, got {text!r}")
    namespace, stream = text.split("/")
    return validate_name("namespace", namespace), validate_name("stream", stream)


def check_felix_url(url: str) -> str:
    """A ``felix://host[:port]`` URL with nothing else in it; raises ValueError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid target_url {url!r}: {exc}") from None
    if parts.scheme != "felix" or not parts.hostname:
        raise ValueError(f"invalid target_url {url!r}: want felix://host[:port]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "target_url must not carry credentials: name the token with "
            "target_token_file or target_token_env"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or port == 0:
        raise ValueError(f"invalid target_url {url!r}: only felix://host[:port] is allowed")
    return url


class HeaderFilter(_Spec):
    """Forward only records whose header ``header`` is present (``equals`` null) or equals
    ``equals``. One condition, so a filter costs one dict lookup per record."""

    header: Annotated[str, Field(min_length=1, max_length=256)]
    equals: Annotated[str | None, Field(max_length=4096)] = None


Ref = Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]


class BridgeSpec(_Spec):
    """A bridge: copies ``source_stream`` of its tenant, in this region, to
    ``target_stream`` of ``target_tenant`` on the cluster at ``target_url`` (region
    ``target_region``). Credentials are named, never held: the CA and the token are
    files on the runner's host (or the token an environment variable of the runner).
    """

    description: Annotated[str, Field(max_length=1024)] = ""
    source_stream: Annotated[str, Field(description="NAMESPACE/STREAM of this tenant, here")]
    target_url: Annotated[
        str, Field(min_length=1, max_length=2048, description="felix://host[:port]")
    ]
    target_region: Annotated[
        str,
        Field(
            min_length=1,
            max_length=64,
            description="the target cluster's region: must differ from this one",
        ),
    ]
    target_stream: Annotated[str, Field(description="NAMESPACE/STREAM on the target")]
    target_tenant: Annotated[
        str | None, Field(description="the tenant on the target (null: the bridge's own)")
    ] = None
    target_ca: Annotated[
        Ref | None,
        Field(description="path of a CA file (PEM) on the runner's host (null: system store)"),
    ] = None
    target_token_file: Annotated[
        Ref | None, Field(description="path of a file holding the target token")
    ] = None
    target_token_env: Annotated[
        str | None,
        Field(
            max_length=128,
            description="name of the runner's environment variable holding the target token",
        ),
    ] = None
    filter: Annotated[
        HeaderFilter | None, Field(description="forward only records passing this (null: all)")
    ] = None
    state: Annotated[
        Literal["active", "paused"],
        Field(description="paused: nothing flows; resumes from the checkpoint"),
    ] = "active"
    start: Annotated[
        Literal["earliest", "latest"],
        Field(description="where a bridge without a checkpoint starts reading the source"),
    ] = "earliest"

    @field_validator("source_stream", "target_stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        try:
            split_stream_ref(value)
        except BadRequest as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("target_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_felix_url(_no_secret("target_url", value))

    @field_validator("target_region", "target_tenant")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                validate_name("region or tenant", value)
            except BadRequest as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("target_ca")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _no_secret("a bridge's file reference", value)
        if not value.startswith("/"):
            raise ValueError(f"file references must be absolute paths, got {value[:80]!r}")
        return value

    @field_validator("target_token_file")
    @classmethod
    def _token_file(cls, value: str | None) -> str | None:
        # A file in the runner's --secrets-dir/<tenant>/ (the runner refuses any other).
        if value is None:
            return None
        _no_secret("a bridge's file reference", value)
        if ".." in value.split("/") or not value.strip("/"):
            raise ValueError(
                "target_token_file names a file in the runner's secrets dir for this tenant "
                f"(no '..'), got {value[:80]!r}"
            )
        return value

    @field_validator("target_token_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and _ENV_NAME.fullmatch(value) is None:
            raise ValueError(
                "target_token_env is the NAME of an environment variable ([A-Za-z_]"
                "[A-Za-z0-9_]*, at most 128 characters), not its value"
            )
        if value is not None and not value.startswith("FELIX_BRIDGE_"):
            raise ValueError(
                "target_token_env must be FELIX_BRIDGE_<TENANT>_... (a bridge reads only its "
                f"own tenant's variables), got {value[:80]!r}"
            )
        return value

    @field_validator("description")
    @classmethod
    def _description(cls, value: str) -> str:
        if looks_like_secret(value):
            raise ValueError("description looks like it holds a secret")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> BridgeSpec:
        if self.target_token_file is not None and self.target_token_env is not None:
            raise ValueError("give target_token_file or target_token_env, not both")
        return self


SPEC_TYPES: dict[ResourceKind, type[_Spec]] = {
    ResourceKind.TENANT: TenantSpec,
    ResourceKind.NAMESPACE: NamespaceSpec,
    ResourceKind.STREAM: StreamSpec,
    ResourceKind.CACHE: CacheSpec,
    ResourceKind.ISSUER: IssuerSpec,
    ResourceKind.POLICY: PolicySpec,
    ResourceKind.BINDING: BindingSpec,
    ResourceKind.GROUP: GroupSpec,
    ResourceKind.BRIDGE: BridgeSpec,
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
        errors: Any = exc.errors(include_url=False)
        if kind is ResourceKind.BRIDGE:
            # Never echo what was sent: it may be the secret a check just refused.
            errors = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in errors]
        raise BadRequest(f"invalid {kind} settings: {errors}") from None
    return model.model_dump(mode="json")


def with_region(res: Resource, region: str) -> Resource:
    """``res`` as the API and the feed show it: a tenant, namespace, stream or cache
    stored without a home region (before regions were recorded) is of ``region``, the
    region of the control plane holding it."""
    if res.kind not in REGIONAL or res.spec.get("region") is not None:
        return res
    return res.model_copy(update={"spec": {**res.spec, "region": region}})
