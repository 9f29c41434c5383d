"""What the API checks of a bridge beyond its spec: it leaves this region, and a tenant
holds a bounded number of them (docs/operations.md, "Bridges")."""

from __future__ import annotations

from typing import Any

from felix.control.api.context import ControlContext
from felix.control.model import MAX_BRIDGES_PER_TENANT, Path, ResourceKind
from felix.errors import BadRequest, Overloaded

__all__ = ["check_bridge"]


async def check_bridge(
    ctx: ControlContext, path: Path, spec: dict[str, Any], *, update: bool
) -> None:
    """Refuse a bridge (``spec`` as sent: a create body or a patch) whose target region is
    this cluster's, and a create beyond :data:`MAX_BRIDGES_PER_TENANT`.

    A bridge inside one region is refused: streams of one region are read where they are
    (a subscription), and a bridge's provenance and dedup ids name the region a record
    left, which would then be the region it arrived in.
    """
    target = spec.get("target_region")
    if target is not None and target == ctx.region:
        raise BadRequest(
            f"bridge {'/'.join(path)}: target_region {target!r} is this cluster's own region; "
            "a bridge carries records to another region (read the stream here instead)"
        )
    if not update:
        # Counted before the create (two racing creates may both pass: the runner's own
        # bound, MAX_BRIDGES_PER_RUNNER, holds whatever the store accepted).
        existing = await ctx.store.list_resources(ResourceKind.BRIDGE, path[:1])
        if len(existing) >= MAX_BRIDGES_PER_TENANT:
            raise Overloaded(
                f"tenant {path[0]} already has {len(existing)} bridges "
                f"(limit {MAX_BRIDGES_PER_TENANT})"
            )
