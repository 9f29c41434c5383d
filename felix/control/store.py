"""The metadata store interface every backend implements (memory, SQLite, PostgreSQL).

Contract (checked by one contract test suite against all backends):

- ``create`` stores a new resource at version 1 and records a CREATE change;
  its parent must exist (``NotFound``); an existing path raises ``AlreadyExists``.
- ``update`` merges ``patch`` into the spec (top-level keys replace; nested
  objects such as ``queue`` merge one level), validates the result, bumps the
  version by one and records an UPDATE. ``if_version`` given and different from
  the stored version raises ``VersionConflict``.
- ``delete`` removes a resource; if it has children it raises ``HasChildren``
  unless ``cascade``, which removes the whole subtree, children first, each
  with its own DELETE change (so a follower never sees an orphan).
- Positions are assigned in commit order, strictly increasing by one, never
  reused and never visible out of order to a reader: a follower that applies
  ``changes(since)`` pages in order ends with exactly the store's state.
- ``changes(since, limit)`` returns changes with position > since, in order, at
  most ``limit``, and the position to ask from next (the last one returned, or
  ``since`` if none). If ``since`` is older than the retained history it raises
  ``CursorTooOld`` (the caller must re-snapshot), never a silent gap.
- ``snapshot()`` returns every resource and the feed position it reflects.
- ``wait(since, timeout)`` returns once a change after ``since`` exists or the
  timeout passes (long-polling without busy loops).
"""

from __future__ import annotations

from typing import Any, Protocol

from felix.control.model import Change, Path, Resource, ResourceKind
from felix.errors import AlreadyExists, FelixError, HasChildren, NotFound, VersionConflict

__all__ = [
    "AlreadyExists",
    "CursorTooOld",
    "HasChildren",
    "NotFound",
    "Store",
    "VersionConflict",
]


class CursorTooOld(FelixError):
    """The feed no longer holds changes after this position: re-snapshot (HTTP 410)."""

    def __init__(self, since: int, oldest: int) -> None:
        super().__init__(f"position {since} is older than the retained feed (from {oldest})")
        self.since = since
        self.oldest = oldest


class Store(Protocol):
    """Where the control plane keeps resources and their change feed."""

    async def open(self) -> None:
        """Connect and apply schema migrations (idempotent)."""

    async def close(self) -> None: ...

    async def get(self, kind: ResourceKind, path: Path) -> Resource | None: ...

    async def list_resources(self, kind: ResourceKind, parent: Path) -> list[Resource]:
        """Resources of ``kind`` directly under ``parent`` (``()`` for tenants), by name."""

    async def create(self, kind: ResourceKind, path: Path, spec: dict[str, Any]) -> Resource: ...

    async def update(
        self, kind: ResourceKind, path: Path, patch: dict[str, Any], if_version: int | None = None
    ) -> Resource: ...

    async def delete(
        self,
        kind: ResourceKind,
        path: Path,
        *,
        cascade: bool = False,
        if_version: int | None = None,
    ) -> list[Change]: ...

    async def snapshot(self) -> tuple[int, list[Resource]]: ...

    async def changes(self, since: int, limit: int) -> tuple[list[Change], int]: ...

    async def wait(self, since: int, timeout: float) -> None: ...

    async def position(self) -> int:
        """The position of the newest change (0 before any)."""
