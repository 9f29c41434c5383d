"""What each tenant holds on one shard, and who pays when memory runs short.

How it works
------------
Every stream and cache on a shard belongs to one tenant (the first name of its
key). A :class:`TenantUsage` counts, per tenant, the accounted bytes it holds
(replay rings plus cache entries, charged as used: a stream's replay size and a
cache's budget are caps, never reservations) and how many streams, caches and
watches of streams that do not exist yet it has here. Its :class:`TenantQuota`
(from the control plane's tenant, else the node's defaults, both already split
per shard) bounds both.

Who pays (never another tenant):

* A tenant above its own memory quota trims its *own* streams and caches, the
  largest first (a stream loses its oldest records, a cache its least recently
  used entries).
* A shard above its budget (possible when the quotas of the tenants on it add up
  to more than the budget) trims by water-filling: the tenants using the most
  come down to one common level, and a tenant at or below that level loses
  nothing. So a tenant is only ever trimmed while it holds more than every
  tenant left untouched, never to make room for a bigger one.

Subscribers of a trimmed stream are told: the shard pushes the new tail, the
gateway's READ answers ``too_old``, and the subscriber gets SLOW_CONSUMER with
the dropped range (or its subscription ends, for the ``disconnect`` policy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["TenantQuota", "TenantUsage", "Trimmable", "water_level"]


@dataclass(frozen=True, slots=True)
class TenantQuota:
    """One tenant's bounds on one shard (its node-wide quota divided by the shards)."""

    memory_bytes: int
    max_resources: int
    #: Bytes of durable streams the tenant may keep on this shard (None: no bound but
    #: the node's --disk-budget and --disk-reserve).
    disk_bytes: int | None = None


class Trimmable(Protocol):
    """A stream or cache the shard can make smaller."""

    @property
    def held_bytes(self) -> int: ...

    def trim_bytes(self, nbytes: int) -> int:
        """Free about ``nbytes`` (oldest data first); return the bytes freed."""


@dataclass(slots=True)
class TenantUsage:
    """A tenant's memory and resources on one shard."""

    name: str
    quota: TenantQuota
    memory: int = 0
    resources: int = 0
    holdings: dict[object, Trimmable] = field(default_factory=dict)

    def trim(self, nbytes: int) -> int:
        """Free at least ``nbytes`` of this tenant's own data if it has them; the bytes freed."""
        freed = 0
        for item in sorted(self.holdings.values(), key=lambda h: -h.held_bytes):
            if freed >= nbytes:
                break
            freed += item.trim_bytes(nbytes - freed)
        return freed


def water_level(usages: Iterable[int], excess: int) -> int:
    """The level ``L`` such that trimming every usage above ``L`` down to it frees ``excess``.

    Max-min fair: the largest users come down first and together; a usage at or
    below ``L`` is untouched. Returns 0 when even that cannot free ``excess``.
    """
    ordered = sorted((u for u in usages if u > 0), reverse=True)
    total = 0
    for i, usage in enumerate(ordered):
        total += usage
        below = ordered[i + 1] if i + 1 < len(ordered) else 0
        # Bringing the i+1 largest down to `below` frees total - (i+1) * below.
        if total - (i + 1) * below >= excess:
            return max((total - excess) // (i + 1), below)
    return 0
