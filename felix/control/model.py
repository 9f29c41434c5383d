"""The control plane's resources (tenants, namespaces, streams, caches) and how they change.

Every resource has a ``kind``, a ``path`` that names it (``("acme",)`` for a
tenant, ``("acme", "prod")`` for a namespace, ``("acme", "prod", "orders")`` for
a stream or cache), a ``spec`` of settings, and a ``version`` that starts at 1
and grows by one on every update (sent as the HTTP ``ETag``). Every create,
update and delete is recorded as a :class:`Change` at a feed ``position``; one
feed for all kinds, in commit order, so a namespace's creation always precedes
its streams'.

Names follow :func:`felix.names.validate_name` (the same rule the broker applies).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from felix.errors import BadRequest
from felix.names import validate_name


class Kind(enum.StrEnum):
    TENANT = "tenant"
    NAMESPACE = "namespace"
    STREAM = "stream"
    CACHE = "cache"


#: Names in a path: tenant (tenant), namespace (tenant, ns), stream or cache (tenant, ns, name).
PATH_LENGTH = {Kind.TENANT: 1, Kind.NAMESPACE: 2, Kind.STREAM: 3, Kind.CACHE: 3}
#: The kind a path of a kind's parent has (None: top level).
PARENT = {
    Kind.TENANT: None,
    Kind.NAMESPACE: Kind.TENANT,
    Kind.STREAM: Kind.NAMESPACE,
    Kind.CACHE: Kind.NAMESPACE,
}

Path = tuple[str, ...]

_NAME_KINDS = ("tenant", "namespace", "name")


def check_path(kind: Kind, path: Path) -> Path:
    """Validate ``path`` for ``kind`` (length and every name); raises BadRequest."""
    if len(path) != PATH_LENGTH[kind]:
        raise BadRequest(f"a {kind} is named by {PATH_LENGTH[kind]} names, got {len(path)}")
    for label, name in zip(_NAME_KINDS, path, strict=False):
        validate_name(kind.value if label == "name" else label, name)
    return path


class _Spec(BaseModel):
    # Unknown settings are refused (a typo must not be silently ignored).
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantSpec(_Spec):
    description: Annotated[str, Field(max_length=1024)] = ""


class NamespaceSpec(_Spec):
    description: Annotated[str, Field(max_length=1024)] = ""


class QueueDefaults(_Spec):
    max_deliveries: Annotated[int, Field(ge=1, le=1000)] = 5
    ack_deadline_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    dead_letter: bool = True


class StreamSpec(_Spec):
    durable: bool = False
    retention_age_s: Annotated[float | None, Field(gt=0)] = None
    retention_bytes: Annotated[int | None, Field(gt=0)] = None
    fsync: Literal["none", "batch", "always"] = "batch"
    ack_default: Literal["none", "per_message", "per_batch"] = "per_message"
    replay_max_records: Annotated[int, Field(ge=1, le=100_000_000)] = 100_000
    replay_max_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 64 * 1024 * 1024
    slow_subscriber_policy: Literal["drop_old", "disconnect"] = "drop_old"
    queue: QueueDefaults = QueueDefaults()
    region: Annotated[str | None, Field(max_length=64)] = None


class CacheSpec(_Spec):
    budget_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 64 * 1024 * 1024
    default_ttl_s: Annotated[float | None, Field(gt=0, le=365 * 86_400)] = None
    max_value_bytes: Annotated[int, Field(ge=0, le=64 * 1024 * 1024)] = 1024 * 1024


SPEC_TYPES: dict[Kind, type[_Spec]] = {
    Kind.TENANT: TenantSpec,
    Kind.NAMESPACE: NamespaceSpec,
    Kind.STREAM: StreamSpec,
    Kind.CACHE: CacheSpec,
}


class Resource(BaseModel):
    """One stored resource."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
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


def validate_spec(kind: Kind, spec: dict[str, Any] | None) -> dict[str, Any]:
    """The full spec (defaults filled in) of ``kind`` from user input; raises BadRequest."""
    from pydantic import ValidationError

    try:
        model = SPEC_TYPES[kind].model_validate(spec or {})
    except ValidationError as exc:
        raise BadRequest(f"invalid {kind} settings: {exc.errors(include_url=False)}") from None
    return model.model_dump(mode="json")
