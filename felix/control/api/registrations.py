"""``POST /v1/registrations``: nodes register the streams and caches they created on first use.

A node following this control plane (``felix up --control-url``) sends batches of
what its shards created on their first write, with the settings they got; each
is created if absent (marked ``auto_created``, its tenant and namespace too),
left alone if defined, and never re-created after a delete the node had not seen
(felix/control/registration.py). Admin only, like the feed the node follows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from felix.control.api.access import Access, requires
from felix.control.api.auditing import audit_change
from felix.control.api.context import ContextDep
from felix.control.api.guard import GuardedRoute
from felix.control.api.problems import errors
from felix.control.model import ResourceKind
from felix.control.registration import MAX_ITEMS, register
from felix.control.schemas import Name

__all__ = ["Registration", "RegistrationResult", "router"]

router = APIRouter(prefix="/v1", route_class=GuardedRoute)


class Registration(BaseModel):
    """A stream or cache a node created on first use, and the settings it got."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["stream", "cache"]
    path: Annotated[
        list[Name], Field(min_length=3, max_length=3, description="tenant, namespace, name")
    ]
    spec: Annotated[
        dict[str, Any],
        Field(description="the settings it got (a stream's or cache's settings)"),
    ] = {}
    since: Annotated[
        int,
        Field(
            ge=0,
            le=(1 << 63) - 1,
            description="the node's feed position when its shard reported it: a delete of "
            "it (or its namespace or tenant) after this position is not undone",
        ),
    ] = 0


class Registrations(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    resources: Annotated[list[Registration], Field(max_length=MAX_ITEMS)]


class RegistrationResult(BaseModel):
    kind: Literal["stream", "cache"]
    path: list[str]
    result: Annotated[
        Literal["created", "exists", "deleted", "refused", "stale"],
        Field(
            description="created (marked auto_created); exists (left alone); deleted (it "
            "or a parent was deleted after since: not created); refused (settings, quotas "
            "or limits; the detail says which); stale (since is older than the retained "
            "feed: ask again with a newer position)"
        ),
    ]
    detail: str = ""


class RegistrationResults(BaseModel):
    results: list[RegistrationResult]


@router.post(
    "/registrations",
    tags=["feed"],
    summary="Register streams and caches a node created on first use",
    responses=errors(400, 422),
)
@requires(Access.ADMIN)
async def registrations(body: Registrations, ctx: ContextDep) -> RegistrationResults:
    """Create each resource unless it exists, marked ``auto_created``, with its tenant
    and namespace if missing; one result each, in order."""
    items = [r.model_dump() for r in body.resources]
    results = await register(ctx.store, ctx.quotas, ctx.region, items)
    for result in results:
        kind, path = ResourceKind(result["kind"]), tuple(result["path"])
        if result["result"] == "created":
            audit_change("register", kind, path, None)
        elif result["result"] == "refused":
            audit_change("register", kind, path, None, f"refused: {result['detail']}")
    return RegistrationResults.model_validate({"results": results})
