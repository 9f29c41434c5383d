"""What a create or update may ask of a node: budgets within quotas.

How it works: the API calls :func:`check_write` before it stores a tenant, stream
or cache (one call in its shared create and update paths). It refuses, with a
clear 400 (BadRequest):

* a stream whose replay ring (``replay_max_bytes``, capped by ``retention_bytes``)
  does not fit what one shard may hold for its tenant: the smaller of the node's
  memory budget and the tenant's memory quota, divided by the shards (a stream
  lives on one shard);
* a cache whose ``budget_bytes`` is above the node's budget or the tenant's quota
  (a cache is spread over every shard, with a share of its budget on each);
* a tenant quota above the node's budget, or below a budget of one of the
  tenant's streams or caches; a tenant ``max_resources_per_shard`` above what a
  shard holds at most (the smaller of ``--max-streams-per-shard`` and the
  shard-wide bound of 100000 streams, caches and watches).

A tenant's quotas (:data:`QUOTA_FIELDS`) are the operator's to set: only the
admin token (or dev mode without auth) may set or change them, at create or
update; anyone else gets 403 (PermissionDenied), even holding ``tenant.manage``
on the tenant (which its own RBAC admin may grant itself).

Budgets are caps, not reservations: the data plane charges memory as used, so
the budgets of a tenant's resources may add up to more than its quota; the quota
bounds what it holds. The data plane enforces the same bounds whatever the
control plane accepted (felix/shard/tenants.py), so a race between two updates
here, or a node with a smaller budget than the control plane assumed, costs no
one else's data.

Settings that contradict each other (``fsync`` other than ``"none"`` on a stream
that is not durable) are refused by the spec itself (felix/control/model.py) with
409 SettingConflict; the durable settings (``durable``, ``fsync``,
``fsync_interval_ms``, ``retention_age_s``) are honoured by the node's shards. A
durable stream's disk is bounded by the node (``--disk-budget``), not here: its
memory is still its replay ring (the hot tail), which is what is checked.

A node's embedded control plane knows its :class:`NodeQuotas`; ``felix control``
on its own checks against the defaults of ``felix up`` (or what it is told).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from felix.control.model import Path, Resource, ResourceKind, validate_spec
from felix.control.store import Store
from felix.errors import BadRequest, PermissionDenied
from felix.shard.resources import SHARD_MAX_RESOURCES

__all__ = [
    "QUOTA_FIELDS",
    "NodeQuotas",
    "check_resource",
    "check_tenant",
    "check_write",
]


@dataclass(frozen=True, slots=True)
class NodeQuotas:
    """The node's memory the control plane checks budgets against."""

    #: ``felix up --memory-budget`` (the whole node; each shard holds its share).
    memory_budget: int = 1024**3
    shards: int = 1
    #: ``--tenant-memory-quota``: a tenant's quota when its spec sets none (None: the budget).
    tenant_memory: int | None = None
    #: ``--max-streams-per-shard``.
    max_streams_per_shard: int = 65_536
    #: Streams, caches and watches one shard holds at most, whatever its tenants' quotas.
    shard_max_resources: int = SHARD_MAX_RESOURCES

    @property
    def max_resources_per_shard(self) -> int:
        """The most a tenant's ``max_resources_per_shard`` may be."""
        return min(self.max_streams_per_shard, self.shard_max_resources)

    def tenant_quota(self, tenant_spec: Mapping[str, Any]) -> int:
        """``tenant``'s memory quota on the node (node-wide)."""
        return int(
            tenant_spec.get("memory_quota_bytes") or self.tenant_memory or self.memory_budget
        )


#: A tenant's settings only the admin token may set (see the module's docstring).
QUOTA_FIELDS = ("memory_quota_bytes", "disk_quota_bytes", "max_resources_per_shard")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"


def _stream_bytes(spec: Mapping[str, Any]) -> int:
    replay = int(spec["replay_max_bytes"])
    retention = spec.get("retention_bytes")
    return min(replay, int(retention)) if retention else replay


def check_resource(
    kind: ResourceKind,
    path: Path,
    spec: Mapping[str, Any],
    tenant_spec: Mapping[str, Any],
    node: NodeQuotas,
) -> None:
    """Refuse a stream or cache (full spec) whose budget its node or tenant cannot hold."""
    quota = node.tenant_quota(tenant_spec)
    name = "/".join(path)
    if kind is ResourceKind.STREAM:
        limit = min(node.memory_budget, quota) // node.shards
        wanted = _stream_bytes(spec)
        if wanted > limit:
            raise BadRequest(
                f"stream {name}: a replay ring of {_size(wanted)} does not fit what one shard "
                f"may hold for tenant {path[0]}: {_size(limit)} (the smaller of the node's "
                f"memory budget, {_size(node.memory_budget)}, and the tenant's quota, "
                f"{_size(quota)}, over {node.shards} shards)"
            )
    elif kind is ResourceKind.CACHE:
        limit = min(node.memory_budget, quota)
        wanted = int(spec["budget_bytes"])
        if wanted > limit:
            raise BadRequest(
                f"cache {name}: budget_bytes {_size(wanted)} is above what tenant {path[0]} "
                f"may hold: {_size(limit)} (the smaller of the node's memory budget and "
                "the tenant's quota)"
            )


def check_tenant(
    tenant: str, spec: Mapping[str, Any], node: NodeQuotas, holdings: Iterable[Resource]
) -> None:
    """Refuse tenant quotas above what the node holds, or a memory quota below one of
    its resources' budgets."""
    most = spec.get("max_resources_per_shard")
    if most is not None and most > node.max_resources_per_shard:
        raise BadRequest(
            f"tenant {tenant}: max_resources_per_shard {most} is above what a shard holds: "
            f"{node.max_resources_per_shard} (the smaller of the node's "
            f"--max-streams-per-shard, {node.max_streams_per_shard}, and the shard-wide "
            f"bound, {node.shard_max_resources})"
        )
    quota = spec.get("memory_quota_bytes")
    if quota is None:
        return
    if quota > node.memory_budget:
        raise BadRequest(
            f"tenant {tenant}: memory_quota_bytes {_size(quota)} is above the node's memory "
            f"budget ({_size(node.memory_budget)})"
        )
    for res in holdings:
        try:
            check_resource(res.kind, res.path, res.spec, spec, node)
        except BadRequest as exc:
            raise BadRequest(
                f"tenant {tenant}: memory_quota_bytes {_size(quota)} is below what one of its "
                f"resources may use; lower that first ({exc})"
            ) from None


def _refuse_quota_change(
    tenant: str, sent: Mapping[str, Any], stored: Mapping[str, Any], admin: bool
) -> None:
    """Only the admin may set a tenant's quotas; sending the stored value back is no change."""
    changed = [f for f in QUOTA_FIELDS if f in sent and sent[f] != stored.get(f)]
    if changed and not admin:
        raise PermissionDenied(
            f"tenant {tenant}: only the admin token may set {' and '.join(changed)} "
            "(quotas are the node operator's)"
        )


async def _holdings(store: Store, tenant: str) -> list[Resource]:
    out: list[Resource] = []
    for ns in await store.list_resources(ResourceKind.NAMESPACE, (tenant,)):
        for kind in (ResourceKind.STREAM, ResourceKind.CACHE):
            out.extend(await store.list_resources(kind, ns.path))
    return out


async def check_write(
    store: Store,
    node: NodeQuotas,
    kind: ResourceKind,
    path: Path,
    sent: dict[str, Any],
    *,
    admin: bool,
    update: bool = False,
) -> None:
    """The API's hook before it creates (``sent``: the body's settings) or updates
    (``sent``: the patch) a resource; ``admin``: the caller is the admin token (or the
    API requires no auth). Raises BadRequest or PermissionDenied; other kinds pass."""
    if kind not in (ResourceKind.TENANT, ResourceKind.STREAM, ResourceKind.CACHE):
        return
    spec: Mapping[str, Any]
    stored: Mapping[str, Any] = {}
    if update:
        current = await store.get(kind, path)
        if current is None:
            return  # the store answers 404
        stored = current.spec
        spec = {**stored, **sent}
    else:
        spec = validate_spec(kind, sent)
    if kind is ResourceKind.TENANT:
        _refuse_quota_change(path[0], sent, stored, admin)
        holdings = await _holdings(store, path[0]) if update else []
        check_tenant(path[0], spec, node, holdings)
        return
    tenant = await store.get(ResourceKind.TENANT, path[:1])
    check_resource(kind, path, spec, tenant.spec if tenant is not None else {}, node)
