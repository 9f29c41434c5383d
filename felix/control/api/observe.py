"""What the web console (and any API client) reads beyond the resources: who the caller
is, and the live status of the node this control plane serves.

- ``GET /v1/whoami``: the caller as authenticated (the admin token, or a Felix token's
  tenant and subject), so a client can tell what it may list without decoding tokens.
- ``GET /v1/node/status``: the node's ``/status`` (felix/node/health.py): processes,
  restarts, readiness, budgets, rings and every child's counters. Admin token only, as
  the node details of ``/v1/system/info`` are: the counters are the whole node's.
- ``GET /v1/node/streams/{tenant}/{ns}/{stream}`` and ``.../caches/{tenant}/{ns}/{cache}``:
  what the node holds of one stream (offsets, retained records, queue groups with lag
  and dead letters) or cache (its counters, where the node reports them), with the
  permission that reads the resource.

The node is the one whose ``node.json`` the app's ``node_info`` returns (the embedded
control plane of ``felix up``): its ``http`` entry is the health port. These routes
fetch from it over plain HTTP (it is the supervisor's own port, usually on loopback),
bounded in time and size. A control plane that serves no node (``felix control``)
answers 503.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel

from felix.control.api.access import Access, Permission, requires
from felix.control.api.auditing import caller_of
from felix.control.api.context import ContextDep, ControlContext
from felix.control.api.guard import GuardedRoute
from felix.control.api.problems import errors
from felix.control.schemas import NAME_DESCRIPTION, NAME_SCHEMA
from felix.errors import BadRequest, FelixError, NotFound, Unavailable
from felix.names import validate_name

__all__ = ["MAX_NODE_BYTES", "NODE_TIMEOUT", "WhoAmI", "fetch_node", "health_address", "router"]

#: How long a node route waits for the node's health port, in seconds.
NODE_TIMEOUT = 3.0
#: The largest answer read from the health port (a /status is a few kilobytes).
MAX_NODE_BYTES = 4 << 20
#: Health-port hosts that mean "every address": reached on loopback.
_ANY = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}

router = APIRouter(prefix="/v1", route_class=GuardedRoute)


class WhoAmI(BaseModel):
    """The caller of this request."""

    admin: bool
    tenant: str | None = None
    subject: str
    #: Whether the API requires credentials at all (false: loopback dev mode).
    auth_required: bool


def _described(kind: str, example: str) -> Any:
    return Path(
        description=f"The {kind}'s name: {NAME_DESCRIPTION}",
        json_schema_extra=NAME_SCHEMA,
        examples=[example],
    )


Tenant = Annotated[str, _described("tenant", "acme")]
Namespace = Annotated[str, _described("namespace", "prod")]
Stream = Annotated[str, _described("stream", "orders")]
Cache = Annotated[str, _described("cache", "sessions")]
_NODE_ERRORS = errors(400, 404, 503)


@router.get("/whoami", tags=["system"], summary="Who the caller is")
@requires(Access.ANY)
async def whoami(ctx: ContextDep, request: Request) -> WhoAmI:
    caller = caller_of(request)
    return WhoAmI(
        admin=caller.admin,
        tenant=caller.tenant,
        subject=caller.who if ctx.require_auth else "anonymous",
        auth_required=ctx.require_auth,
    )


@router.get(
    "/node/status",
    tags=["node"],
    summary="The node's live status",
    description="The node's health-port /status: identity, readiness and its problems, "
    "processes with restarts, budgets, rings, and every child's counters with their "
    "totals (counters only: take two samples for rates). Admin token only.",
    responses=errors(503),
)
@requires(Access.ADMIN)
async def node_status(ctx: ContextDep) -> dict[str, Any]:
    return await fetch_node(ctx, "/status")


@router.get(
    "/node/streams/{tenant}/{ns}/{stream}",
    tags=["node"],
    summary="What the node holds of a stream",
    description="The node's status of one stream: durable or not, offsets, retained "
    "records and bytes, disk, and its queue groups (lag, pending, acked, dead-lettered, "
    "members). 404 when the node holds no such stream (yet: it is created on first use).",
    responses=_NODE_ERRORS,
)
@requires(Permission("stream.manage", "stream:{tenant}/{ns}/{stream}"))
async def node_stream(
    tenant: Tenant, ns: Namespace, stream: Stream, ctx: ContextDep
) -> dict[str, Any]:
    return await _resource(ctx, "stream", (tenant, ns, stream))


@router.get(
    "/node/caches/{tenant}/{ns}/{cache}",
    tags=["node"],
    summary="What the node holds of a cache",
    description="The node's counters of one cache (hits, misses, sets, entries...), "
    "summed over its partitions. 404 when the node holds no such cache or does not "
    "report caches.",
    responses=_NODE_ERRORS,
)
@requires(Permission("cache.manage", "cache:{tenant}/{ns}/{cache}"))
async def node_cache(
    tenant: Tenant, ns: Namespace, cache: Cache, ctx: ContextDep
) -> dict[str, Any]:
    return await _resource(ctx, "cache", (tenant, ns, cache))


async def _resource(ctx: ControlContext, kind: str, names: tuple[str, str, str]) -> dict[str, Any]:
    for what, name in zip(("tenant", "namespace", kind), names, strict=True):
        validate_name(what, name)  # BadRequest (400)
    path = "/".join(quote(name, safe="") for name in names)
    return await fetch_node(ctx, f"/{kind}s/{path}")


def health_address(ctx: ControlContext) -> tuple[str, int]:
    """The node's health port, from its node info; Unavailable when there is none."""
    address = ctx.node().get("http")
    if not isinstance(address, str) or ":" not in address:
        raise Unavailable("this control plane serves no node (no health address is known)")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        raise Unavailable(f"the node's health address {address[:100]!r} has no port")
    return _ANY.get(host, host), int(port)


async def fetch_node(ctx: ControlContext, path: str) -> dict[str, Any]:
    """GET ``path`` from the node's health port: its JSON object.

    Raises:
        NotFound: (404) the node answered 404 (it holds no such resource).
        BadRequest: (400) the node refused the names.
        Unavailable: (503) no node, unreachable, too slow, or not a JSON object.
    """
    host, port = health_address(ctx)
    try:
        async with asyncio.timeout(NODE_TIMEOUT):
            status, body = await _get(host, port, path, ctx.admin_token)
    except TimeoutError:
        raise Unavailable(
            f"the node's health port did not answer within {NODE_TIMEOUT:g} s"
        ) from None
    except (OSError, ValueError) as exc:
        raise Unavailable(f"the node's health port is unreachable: {exc}") from None
    text = body.decode("utf-8", "replace").strip()
    if status != 200:
        error: type[FelixError] = {404: NotFound, 400: BadRequest}.get(status, Unavailable)
        raise error(f"the node answered {status}: {text[:300]}")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise Unavailable("the node's answer is not a JSON object")
    return answer


async def _get(host: str, port: int, path: str, token: str | None) -> tuple[int, bytes]:
    """One HTTP/1.1 GET to the health port (it answers with Content-Length, then closes);
    ``token``: the node's admin token, which its per-tenant routes need on a node with
    auth (this control plane is that node's own: the caller's permission was checked)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        hostname = f"[{host}]" if ":" in host else host
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {hostname}:{port}\r\nAccept: application/json\r\n"
            f"{auth}Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await reader.read(MAX_NODE_BYTES + 1)
        while data and len(data) <= MAX_NODE_BYTES:
            more = await reader.read(MAX_NODE_BYTES + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        writer.close()
    if len(data) > MAX_NODE_BYTES:
        raise ValueError(f"answer larger than {MAX_NODE_BYTES} bytes")
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(parts[1]), body
