"""The change feed brokers follow: ``GET /v1/snapshot``, then ``GET /v1/changes`` long-polls.

``/v1/changes?since=N&limit=L&wait=S`` pages the changes after N, waiting up to S
seconds for one when there are none yet. A position the feed cannot continue from
answers 410 (re-snapshot). Both routes show every tenant's resources: admin only.
A tenant, namespace, stream or cache stored without a home region shows this control
plane's (:func:`~felix.control.model.with_region`), so a follower can check each one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from felix.control.api.access import Access, requires
from felix.control.api.context import ContextDep, StoreDep
from felix.control.api.guard import GuardedRoute
from felix.control.api.problems import errors
from felix.control.model import with_region
from felix.control.schemas import ChangeOut, ChangePage, Snapshot, resource_out
from felix.control.store import CursorTooOld, Store

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MAX_WAIT", "router"]

#: Longest long-poll of ``GET /v1/changes``, in seconds.
MAX_WAIT = 30.0
#: Largest page of ``GET /v1/changes``.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

router = APIRouter(prefix="/v1", route_class=GuardedRoute)


@router.get("/snapshot", tags=["feed"], summary="Every resource and its feed position")
@requires(Access.ADMIN)
async def snapshot(store: StoreDep, ctx: ContextDep) -> Snapshot:
    position, resources = await store.snapshot()
    return Snapshot(
        position=position, resources=[resource_out(with_region(r, ctx.region)) for r in resources]
    )


@router.get(
    "/changes",
    tags=["feed"],
    summary="Changes after a feed position (long-poll)",
    responses=errors(400, 410, 422),
)
@requires(Access.ADMIN)
async def changes(
    store: StoreDep,
    ctx: ContextDep,
    since: Annotated[int, Query(ge=0, description="Feed position to continue from.")] = 0,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="Most changes to return.")
    ] = DEFAULT_LIMIT,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT,
            description="Seconds to wait for a change when there is none after since yet; "
            "the answer comes as soon as one is committed.",
        ),
    ] = 0.0,
) -> ChangePage:
    """Changes after ``since`` in commit order, at most ``limit``, and where to continue.

    410 (cursor-too-old) when the feed cannot continue from ``since``: it is
    older than the retained history, or past the newest position (the store
    was reset or replaced). Either way: re-read ``GET /v1/snapshot``.
    """
    newest = await store.position()
    if since > newest:
        err = CursorTooOld(since, await _oldest(store))
        err.args = (
            f"position {since} is past the newest position {newest} "
            "(the store was reset or replaced): re-snapshot",
        )
        raise err
    page, next_ = await store.changes(since, limit)
    if not page and wait > 0:
        await store.wait(since, wait)
        page, next_ = await store.changes(since, limit)
    return ChangePage(
        changes=[
            ChangeOut(
                position=ch.position,
                op=ch.op,
                resource=resource_out(with_region(ch.resource, ctx.region)),
            )
            for ch in page
        ],
        next=next_,
        position=max(next_, await store.position()),
    )


async def _oldest(store: Store) -> int:
    """The position of the oldest change the feed still holds (the next one if none)."""
    try:
        page, _ = await store.changes(0, 1)
    except CursorTooOld as exc:
        return exc.oldest
    return page[0].position if page else await store.position() + 1
