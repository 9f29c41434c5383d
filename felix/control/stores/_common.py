"""Rules every store backend shares, so memory, SQLite and PostgreSQL cannot drift apart.

The backends only decide *where* resources and changes live; what is valid
(names, specs, parents), how a patch merges, which order a cascade deletes in
and when a feed cursor is too old are decided here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from felix.auth.perms import PermissionSet
from felix.control.model import (
    PARENT,
    Path,
    Resource,
    ResourceKind,
    ancestors,
    check_path,
    validate_spec,
)
from felix.control.store import CursorTooOld
from felix.errors import (
    BadRequest,
    ConfigError,
    HasChildren,
    NotFound,
    Overloaded,
    SettingConflict,
    VersionConflict,
    WrongRegion,
)
from felix.shard.queue.settings import MAX_GROUPS_PER_STREAM, GroupSettings

__all__ = [
    "DEFAULT_FEED_RETENTION",
    "DEFAULT_MAX_CHILDREN",
    "MAX_PAGE",
    "Key",
    "cascade_order",
    "check_children",
    "check_create",
    "check_feed_retention",
    "check_groups_kept",
    "check_list_parent",
    "check_page",
    "check_parent",
    "check_scope",
    "check_version",
    "feed_limit",
    "loses_durability",
    "merge_spec",
    "missing",
    "parent_of",
    "utcnow",
]

#: Changes kept in the feed before the oldest are trimmed.
DEFAULT_FEED_RETENTION = 100_000
#: Resources allowed directly under one parent (tenants under the root count too).
DEFAULT_MAX_CHILDREN = 10_000
#: Largest page ``changes`` returns, whatever ``limit`` asks for ("at most limit" still holds).
MAX_PAGE = 10_000

#: How a resource is identified inside a store: a stream and a cache may share a path.
Key = tuple[ResourceKind, Path]


#: The columns of a resource row, in the order both SQL backends read and write them.
RESOURCE_COLUMNS = "kind, path, spec, version, created_at, updated_at"


def utcnow() -> datetime:
    """The default clock: timezone-aware UTC."""
    return datetime.now(UTC)


def missing(kind: ResourceKind, path: Path) -> NotFound:
    return NotFound(f"{kind} {'/'.join(path)} does not exist")


def parent_of(kind: ResourceKind, path: Path) -> Key | None:
    """The key of the resource ``path`` lives under (None for a tenant)."""
    parent_kind = PARENT[kind]
    return None if parent_kind is None else (parent_kind, path[:-1])


def check_create(
    kind: ResourceKind, path: Path, spec: dict[str, Any] | None
) -> tuple[Path, dict[str, Any]]:
    """Validated ``path`` and the full spec (defaults filled in); raises BadRequest."""
    path = check_path(kind, tuple(path))
    return path, check_scope(kind, path, validate_spec(kind, spec))


def check_scope(kind: ResourceKind, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Return ``spec`` if what it names stays in ``path``'s tenant; raises BadRequest.

    A policy's permissions must all name the policy's tenant (a validated spec only
    has their syntax checked: the spec alone does not know its tenant). A group's
    dead-letter stream must not be its own stream, and the default one
    (``<stream>.dlq``) must be a valid name.
    """
    if kind is ResourceKind.POLICY:
        PermissionSet(path[0], spec["permissions"])
    elif kind is ResourceKind.GROUP:
        GroupSettings.from_spec(spec).dead_letter_for(path[2])
    return spec


def check_parent(kind: ResourceKind, path: Path, parent: Resource | None) -> None:
    """Refuse creating ``path`` under ``parent`` (the stored parent, None: missing).

    Raises NotFound for a missing parent, SettingConflict for a group whose stream
    is not durable (a group runs over a durable stream: docs/queues.md).
    """
    parent_key = parent_of(kind, path)
    if parent_key is None:
        return
    if parent is None:
        raise missing(*parent_key)
    if kind is ResourceKind.GROUP and not parent.spec.get("durable"):
        raise SettingConflict(
            f"group {'/'.join(path)} needs a durable stream, and stream "
            f"{'/'.join(parent.path)} is not durable: set durable=true on it first"
        )


def loses_durability(old: Resource | None, new: Resource) -> bool:
    """``new`` is a stream that was durable as ``old`` and is not any more (an update
    the store must check against the stream's groups, :func:`check_groups_kept`)."""
    return (
        new.kind is ResourceKind.STREAM
        and old is not None
        and bool(old.spec.get("durable"))
        and not new.spec.get("durable")
    )


def check_groups_kept(path: Path, groups: int) -> None:
    """Refuse making stream ``path`` not durable while it has ``groups`` groups."""
    if groups:
        raise SettingConflict(
            f"stream {'/'.join(path)} has {groups} queue group(s), which need a durable "
            "stream: delete them before setting durable=false"
        )


def check_list_parent(kind: ResourceKind, parent: Path) -> Key | None:
    """Validate the ``parent`` a listing of ``kind`` names; its key (None: the root)."""
    parent = tuple(parent)
    parent_kind = PARENT[kind]
    if parent_kind is None:
        if parent != ():
            raise BadRequest(f"a {kind} has no parent, got {'/'.join(parent)!r}")
        return None
    return parent_kind, check_path(parent_kind, parent)


def check_children(kind: ResourceKind, parent: Path, count: int, max_children: int) -> None:
    """Refuse a create of a ``kind`` that would put more than ``max_children`` under
    ``parent`` (a stream holds at most the groups a shard keeps for one stream)."""
    if kind is ResourceKind.GROUP and count >= MAX_GROUPS_PER_STREAM:
        raise Overloaded(
            f"stream {'/'.join(parent)} already holds {count} queue groups "
            f"(limit {MAX_GROUPS_PER_STREAM})"
        )
    if count >= max_children:
        where = "/".join(parent) or "the root"
        raise Overloaded(f"{where} already holds {count} resources (limit {max_children})")


def merge_spec(
    kind: ResourceKind, path: Path, current: dict[str, Any], patch: dict[str, Any]
) -> dict[str, Any]:
    """The validated spec of resource ``path`` after applying ``patch`` to ``current``.

    Top-level keys replace; a nested object (such as ``queue``) merges one level,
    so ``{"queue": {"max_deliveries": 3}}`` keeps the other queue settings. A
    stream patch that sets ``durable`` without ``fsync`` derives ``fsync`` anew.
    Raises BadRequest if ``patch`` is not an object or the result is invalid.
    """
    if not isinstance(patch, dict):
        raise BadRequest(f"a {kind} patch must be an object, got {type(patch).__name__}")
    merged = dict(current)
    if kind is ResourceKind.STREAM and "durable" in patch and "fsync" not in patch:
        # fsync follows durable unless the patch says otherwise: turning durability on
        # gives "commit", off gives "none" (a stored "commit" would now conflict).
        merged.pop("fsync", None)
    for key, value in patch.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merged[key] = {**old, **value}
        else:
            merged[key] = value
    return check_scope(kind, path, validate_spec(kind, merged))


def check_version(resource: Resource, if_version: int | None) -> None:
    if if_version is not None and if_version != resource.version:
        raise VersionConflict(
            f"{resource.kind} {'/'.join(resource.path)} is at version {resource.version}, "
            f"not {if_version}"
        )


def updated(
    kind: ResourceKind,
    path: Path,
    old: Resource | None,
    patch: dict[str, Any],
    if_version: int | None,
    now: datetime,
) -> Resource:
    """What ``old`` (the stored resource, None: missing) becomes with ``patch`` merged
    in: the next version, updated ``now``. Raises NotFound, VersionConflict, BadRequest."""
    if old is None:
        raise missing(kind, path)
    check_version(old, if_version)
    spec = merge_spec(kind, path, old.spec, patch)
    if kind is ResourceKind.GROUP and spec["start"] != old.spec["start"]:
        raise SettingConflict(
            f"group {'/'.join(path)}: start cannot change after the group is created "
            f"(it is {json.dumps(old.spec['start'])}); delete the group and create it again"
        )
    home = old.spec.get("region")
    if home is not None and spec.get("region") != home:
        # The API refuses this first; the store holds the line for any other writer.
        raise WrongRegion(
            f"{kind} {'/'.join(path)} lives in region {home!r}: its region cannot change",
            region=spec.get("region"),
            expected=home,
        )
    return old.model_copy(update={"spec": spec, "version": old.version + 1, "updated_at": now})


def cascade_order(root: Resource, descendants: Iterable[Resource], cascade: bool) -> list[Resource]:
    """The resources a delete of ``root`` removes, in the order their DELETEs are recorded.

    ``descendants`` may hold more than the resources under ``root`` (a store may
    select them by path prefix): only those whose ancestors include ``root`` count,
    so deleting issuer ``acme/prod`` leaves namespace ``acme/prod``'s streams alone.
    Deepest first (streams and caches, then namespaces, then the root), so a
    follower applying the feed never holds a resource whose parent is gone.
    Raises HasChildren if there are descendants and ``cascade`` is false.
    """
    key = (root.kind, root.path)
    below = sorted(
        (r for r in descendants if key in ancestors(r.kind, r.path)),
        key=lambda r: (-len(r.path), r.path, r.kind.value),
    )
    if below and not cascade:
        raise HasChildren(
            f"{root.kind} {'/'.join(root.path)} has {len(below)} resources under it; "
            "delete them first or cascade"
        )
    return [*below, root]


def check_feed_retention(feed_retention: int) -> int:
    if feed_retention < 1:
        raise ValueError(f"feed_retention must be at least 1, got {feed_retention}")
    return feed_retention


def feed_limit(since: int, limit: int) -> int:
    """Validate a ``changes`` request; the page size to use (``limit`` capped at MAX_PAGE)."""
    if since < 0:
        raise BadRequest(f"feed position must be >= 0, got {since}")
    if limit < 1:
        raise BadRequest(f"feed page limit must be >= 1, got {limit}")
    return min(limit, MAX_PAGE)


def check_page(since: int, first_position: int | None) -> None:
    """Raise CursorTooOld if a page read after ``since`` does not start right after it.

    Positions have no gaps, and the newest change is always retained, so the
    only way the first change after ``since`` is not ``since + 1`` is that it was
    trimmed. Checking the page itself (rather than a separately read "oldest")
    is race-free: a trim between two queries cannot open a silent gap.
    """
    if first_position is not None and first_position != since + 1:
        raise CursorTooOld(since, first_position)


def migrations_to_apply(
    applied: set[int], migrations: Sequence[tuple[int, str, Sequence[str]]], store: str
) -> list[tuple[int, str, Sequence[str]]]:
    """The migrations not yet applied, in order; refuses a schema written by a newer felix."""
    unknown = applied - {version for version, _, _ in migrations}
    if unknown:
        raise newer_schema(store, sorted(unknown))
    return [m for m in migrations if m[0] not in applied]


def newer_schema(store: str, versions: list[int]) -> ConfigError:
    """The error of a ``store`` whose schema has ``versions`` this felix does not know."""
    return ConfigError(
        f"the {store} store has schema versions {versions} that this felix does "
        "not know: it was written by a newer felix"
    )
