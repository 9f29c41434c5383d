"""``/v1/system/info``, ``/v1/system/health``, ``/v1/regions`` and the problem type pages."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response

import felix
from felix.control.api.access import Access, requires
from felix.control.api.auditing import caller_of
from felix.control.api.context import ContextDep, StoreDep
from felix.control.api.guard import GuardedRoute
from felix.control.api.problems import errors
from felix.control.schemas import (
    PROBLEM_TYPES,
    Health,
    ProblemTypeDoc,
    Region,
    RegionList,
    StoreHealth,
    SystemInfo,
)
from felix.errors import NotFound

__all__ = ["HEALTH_TIMEOUT", "router"]

log = logging.getLogger("felix.control.api")

#: How long ``GET /v1/system/health`` waits for the store, in seconds.
HEALTH_TIMEOUT = 5.0

router = APIRouter(prefix="/v1", route_class=GuardedRoute)


@router.get("/system/info", tags=["system"], summary="Version, region and node")
@requires(Access.ANY)
async def system_info(ctx: ContextDep, request: Request) -> SystemInfo:
    """The node's details (addresses, process ids, restarts, file paths) are shown to
    the admin token only: ``node`` is empty for a tenant's token."""
    node = ctx.node() if caller_of(request).admin else {}
    return SystemInfo(version=felix.__version__, region=ctx.region, node=node)


@router.get(
    "/system/health",
    tags=["system"],
    summary="Whether the API can reach its store",
    responses={503: {"model": Health, "description": "The store does not answer"}},
)
@requires(Access.PUBLIC)
async def system_health(store: StoreDep, response: Response) -> Health:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            position = await store.position()
    except Exception as exc:  # any failure of the store means unhealthy, whatever its type
        if isinstance(exc, TimeoutError):
            error = f"the store did not answer within {HEALTH_TIMEOUT:g} s"
        else:
            error = str(exc) or repr(exc)
        log.warning("control store health check failed: %s", error)
        response.status_code = 503
        return Health(status="unavailable", store=StoreHealth(reachable=False, error=error))
    return Health(status="ok", store=StoreHealth(reachable=True, position=position))


@router.get(
    "/regions",
    tags=["system"],
    summary="Regions streams can be placed in",
    description="One region for now: the node's own (a cluster is one region). "
    "A stream's region setting must name it, or be null.",
)
@requires(Access.ANY)
async def regions(ctx: ContextDep) -> RegionList:
    return RegionList(regions=[Region(name=ctx.region, local=True)])


@router.get(
    "/problems/{slug}",
    tags=["system"],
    summary="What a problem type means",
    responses=errors(404),
)
@requires(Access.ANY)
async def problem_type(slug: str) -> ProblemTypeDoc:
    """The documentation a problem's ``type`` URI points to."""
    problem = PROBLEM_TYPES.get(slug)
    if problem is None:
        raise NotFound(f"no problem type {slug[:80]!r}")
    return ProblemTypeDoc(
        type=problem.uri,
        title=problem.title,
        status=problem.status,
        description=problem.description,
    )
