"""An in-memory store: the reference implementation of the contract, for tests and dev.

Every method runs without awaiting between its reads and writes, so on one
event loop each call is atomic: positions are assigned in call order and a
reader never sees half a cascade. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

from felix.control.model import CONTAINERS, Change, Op, Path, Resource, ResourceKind
from felix.control.stores import _common as c
from felix.errors import AlreadyExists

__all__ = ["MemoryStore"]


class MemoryStore:
    """Resources in dicts, the feed in a list trimmed to ``feed_retention`` changes.

    Returned resources are copies: callers may not change the store through them.
    """

    def __init__(
        self,
        *,
        feed_retention: int = c.DEFAULT_FEED_RETENTION,
        max_children: int = c.DEFAULT_MAX_CHILDREN,
        clock: Callable[[], datetime] = c.utcnow,
    ) -> None:
        self.feed_retention = c.check_feed_retention(feed_retention)
        self.max_children = max_children
        self._clock = clock
        self._resources: dict[c.Key, Resource] = {}
        # Keys directly under each parent path (tenants under ()). Only tenants,
        # namespaces and streams hold children, and their paths differ in length, so
        # the parent path alone names the parent (an issuer may share a namespace's
        # path, a cache a stream's, but they hold nothing).
        self._children: dict[Path, set[c.Key]] = {}
        self._feed: list[Change] = []
        self._position = 0
        # Replaced on every write: waiters hold the old one, which is set once.
        self._changed: asyncio.Event | None = None

    async def open(self) -> None:
        """Nothing to connect to; present for the Store protocol."""

    async def close(self) -> None:
        """Wake any waiter; the data stays readable until the object is dropped."""
        self._notify()

    async def get(self, kind: ResourceKind, path: Path) -> Resource | None:
        res = self._resources.get((kind, tuple(path)))
        return None if res is None else res.model_copy(deep=True)

    async def list_resources(self, kind: ResourceKind, parent: Path) -> list[Resource]:
        """Resources of ``kind`` directly under ``parent``, by name; NotFound if it is missing."""
        parent_key = c.check_list_parent(kind, parent)
        if parent_key is not None and parent_key not in self._resources:
            raise c.missing(*parent_key)
        keys = sorted(k for k in self._children.get(tuple(parent), ()) if k[0] == kind)
        return [self._resources[k].model_copy(deep=True) for k in keys]

    async def create(self, kind: ResourceKind, path: Path, spec: dict[str, Any]) -> Resource:
        path, full_spec = c.check_create(kind, path, spec)
        parent = c.parent_of(kind, path)
        c.check_parent(kind, path, None if parent is None else self._resources.get(parent))
        if (kind, path) in self._resources:
            raise AlreadyExists(f"{kind} {'/'.join(path)} already exists")
        siblings = self._children.setdefault(path[:-1], set())
        c.check_children(kind, path[:-1], len(siblings), self.max_children)
        now = self._clock()
        res = Resource(
            kind=kind, path=path, spec=full_spec, version=1, created_at=now, updated_at=now
        )
        self._resources[(kind, path)] = res
        siblings.add((kind, path))
        self._record([(Op.CREATE, res)])
        return res.model_copy(deep=True)

    async def update(
        self, kind: ResourceKind, path: Path, patch: dict[str, Any], if_version: int | None = None
    ) -> Resource:
        path = tuple(path)
        old = self._resources.get((kind, path))
        res = c.updated(kind, path, old, patch, if_version, self._clock())
        if c.loses_durability(old, res):
            c.check_groups_kept(path, self._count(ResourceKind.GROUP, path))
        self._resources[(kind, path)] = res
        self._record([(Op.UPDATE, res)])
        return res.model_copy(deep=True)

    async def delete(
        self,
        kind: ResourceKind,
        path: Path,
        *,
        cascade: bool = False,
        if_version: int | None = None,
    ) -> list[Change]:
        path = tuple(path)
        root = self._resources.get((kind, path))
        if root is None:
            raise c.missing(kind, path)
        c.check_version(root, if_version)
        below = [
            r
            for k, r in self._resources.items()
            if len(k[1]) > len(path) and k[1][: len(path)] == path
        ]
        doomed = c.cascade_order(root, below, cascade)
        for res in doomed:
            del self._resources[(res.kind, res.path)]
            self._children[res.path[:-1]].discard((res.kind, res.path))
            if res.kind in CONTAINERS:
                self._children.pop(res.path, None)
        return [ch.model_copy(deep=True) for ch in self._record([(Op.DELETE, r) for r in doomed])]

    def _count(self, kind: ResourceKind, parent: Path) -> int:
        return sum(1 for k in self._children.get(parent, ()) if k[0] is kind)

    async def snapshot(self) -> tuple[int, list[Resource]]:
        """Every resource (ordered by path, then kind) and the position it reflects."""
        keys = sorted(self._resources, key=lambda k: (k[1], k[0].value))
        return self._position, [self._resources[k].model_copy(deep=True) for k in keys]

    async def changes(self, since: int, limit: int) -> tuple[list[Change], int]:
        limit = c.feed_limit(since, limit)
        if not self._feed:
            return [], since
        start = since - self._feed[0].position + 1
        page = self._feed[max(start, 0) : max(start, 0) + limit]
        c.check_page(since, page[0].position if page else None)
        return [ch.model_copy(deep=True) for ch in page], page[-1].position if page else since

    async def wait(self, since: int, timeout: float) -> None:
        """Return once the position is past ``since``, or after ``timeout`` seconds."""
        if self._position > since:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def position(self) -> int:
        return self._position

    def _record(self, entries: list[tuple[Op, Resource]]) -> list[Change]:
        """Append changes at the next positions, trim the feed, wake waiters."""
        recorded = []
        for op, res in entries:
            self._position += 1
            recorded.append(Change(position=self._position, op=op, resource=res))
        self._feed.extend(recorded)
        excess = len(self._feed) - self.feed_retention
        if excess > 0:
            del self._feed[:excess]
        self._notify()
        return recorded

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
