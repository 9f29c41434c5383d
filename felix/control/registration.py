"""Registering what a node created on first use: create-if-absent, never undoing a delete.

A node whose shards create a stream or cache on its first write (auto-create)
registers it here, so the control plane lists what the data plane holds
(felix/node/registrar.py sends them, batched). :func:`register` handles one batch,
for the REST route ``POST /v1/registrations`` (a remote control plane) and for the
embedded control process (over the supervisor's control socket) alike.

Each item names a stream or cache, the settings the node gave it, and ``since``:
the node's feed position when its shard reported it. The answer per item:

- ``created``: stored with ``auto_created: true``; so are its tenant and namespace
  if they were missing (each a change on the feed, like any create);
- ``exists``: already defined (by anyone, with any settings): left alone;
- ``deleted``: the resource, its namespace or its tenant was deleted after ``since``:
  the node created it before it learnt of that delete, so registering it would
  undo the delete. The node ends it instead (what the delete would have done);
- ``refused``: the settings or the control plane's quotas and limits refuse it (the
  same checks as ``POST``: budgets against the node and tenant, the region, the
  resources one parent may hold); not retried;
- ``stale``: ``since`` is older than the feed's retained history, so the delete
  check cannot be made: the node asks again with a newer position.

A stream's ``region`` is the node's; one that is not this control plane's region is
stored as none (rather than refusing what the data plane already holds).

Ordering: the delete check reads the feed after ``since`` (the store's own, in
commit order), then creates. The only race left is a resource created *and*
deleted by someone else between the two, within one batch: the registration then
re-creates it, marked auto-created, and the feed tells every node, so the planes
still agree.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Literal

from felix.control.model import (
    SPEC_TYPES,
    Op,
    Path,
    ResourceKind,
    ancestors,
    check_path,
    validate_spec,
)
from felix.control.quotas import NodeQuotas, check_write
from felix.control.store import AlreadyExists, CursorTooOld, Store
from felix.errors import BadRequest, FelixError

__all__ = ["KINDS", "MAX_ITEMS", "Outcome", "register"]

log = logging.getLogger("felix.control.registration")

#: What may be registered: the kinds a shard creates on first use.
KINDS = (ResourceKind.STREAM, ResourceKind.CACHE)
#: Items in one batch at most.
MAX_ITEMS = 500
#: Changes read per page of the delete check.
_PAGE = 1000

Outcome = Literal["created", "exists", "deleted", "refused", "stale"]


async def register(
    store: Store,
    quotas: NodeQuotas,
    region: str,
    items: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Register ``items`` (``{"kind", "path", "spec", "since"}``); one result each,
    ``{"kind", "path", "result", "detail"}``, in order. Never raises for one item."""
    if len(items) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} registrations at once, got {len(items)}")
    sinces = [int(item.get("since", 0)) for item in items]
    try:
        deleted = await _deleted_after(store, min(sinces, default=0))
    except CursorTooOld:
        deleted = None
    results = []
    for item, since in zip(items, sinces, strict=True):
        raw_kind, raw_path = item.get("kind"), item.get("path")
        outcome: Outcome
        try:
            kind = ResourceKind(str(raw_kind))
            path = tuple(str(name) for name in raw_path or ())
            outcome, detail = await _one(store, quotas, region, kind, path, item, since, deleted)
        except FelixError as exc:
            outcome, detail = "refused", str(exc)
        except (ValueError, TypeError) as exc:
            outcome, detail = "refused", f"not a stream or cache: {exc}"
        results.append(
            {
                "kind": str(raw_kind),
                "path": [str(name) for name in raw_path or ()],
                "result": outcome,
                "detail": detail,
            }
        )
    return results


async def _one(
    store: Store,
    quotas: NodeQuotas,
    region: str,
    kind: ResourceKind,
    path: Path,
    item: dict[str, Any],
    since: int,
    deleted: dict[tuple[ResourceKind, Path], int] | None,
) -> tuple[Outcome, str]:
    if kind not in KINDS:
        return "refused", f"a {kind} is not created on first use"
    path = check_path(kind, path)
    if await store.get(kind, path) is not None:
        return "exists", ""
    if deleted is None:
        return "stale", f"position {since} is older than the feed's retained history"
    chain = [(kind, path), *ancestors(kind, path)]
    for key in chain:
        at = deleted.get(key)
        if at is not None and at > since:
            return "deleted", f"{key[0]} {'/'.join(key[1])} was deleted at position {at}"
    # The resource's own checks first: a refused one leaves no parent behind.
    spec = await _checked(store, quotas, region, kind, path, dict(item.get("spec") or {}))
    # Parents (tenant, then namespace), each marked auto-created too.
    for parent_kind, parent_path in reversed(chain[1:]):
        if await store.get(parent_kind, parent_path) is None:
            # The node's region, where the parent's settings have one.
            parent_spec = {"region": spec.get("region")}
            parent_spec = await _checked(
                store, quotas, region, parent_kind, parent_path, parent_spec
            )
            with contextlib.suppress(AlreadyExists):  # someone else's, meanwhile: fine
                await store.create(parent_kind, parent_path, parent_spec)
    try:
        await store.create(kind, path, spec)
    except AlreadyExists:
        return "exists", ""
    return "created", ""


async def _checked(
    store: Store,
    quotas: NodeQuotas,
    region: str,
    kind: ResourceKind,
    path: Path,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """``spec`` marked auto-created, after the checks the API's POST makes (raises
    BadRequest, PermissionDenied: refused)."""
    spec = {**spec, "auto_created": True}
    if "region" in SPEC_TYPES[kind].model_fields:
        if spec.get("region") is None:
            spec.pop("region", None)
        elif spec["region"] != region:
            # A node of another region: refused, as any create for another region is
            # (a node refuses to follow a control plane of another region anyway).
            raise BadRequest(
                f"the node registering {'/'.join(path)} is region {spec['region']!r}; "
                f"this control plane is region {region!r}"
            )
    else:
        spec.pop("region", None)
    validate_spec(kind, spec)
    await check_write(store, quotas, kind, path, spec, admin=True)
    return spec


async def _deleted_after(store: Store, since: int) -> dict[tuple[ResourceKind, Path], int]:
    """Every (kind, path) deleted after ``since``, with the position of its newest
    DELETE (also when it was created again since: a resource that exists answers
    ``exists`` before this is read, and a parent created again is a new one)."""
    out: dict[tuple[ResourceKind, Path], int] = {}
    position = since
    while True:
        page, nxt = await store.changes(position, _PAGE)
        for change in page:
            key = (change.resource.kind, tuple(change.resource.path))
            if change.op is Op.DELETE:
                out[key] = change.position
        if not page or nxt <= position:
            return out
        position = nxt
