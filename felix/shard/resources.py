"""Control-plane resource specs as the settings a shard applies.

The control plane stores specs as plain JSON (felix/control/model.py); a shard
turns them into :class:`StreamSettings` (the in-memory part of a stream),
:class:`DurableSettings` (a durable stream's fsync policy and retention) and
:class:`CacheSettings` here, against the node's defaults, and a tenant's quotas
into its :class:`TenantQuota` on one shard.
"""

from __future__ import annotations

from typing import Any

from felix.shard.cache import CacheSettings
from felix.shard.durable import DurableSettings
from felix.shard.stream_log import RECORD_OVERHEAD, StreamSettings
from felix.shard.tenants import TenantQuota

#: Streams, caches and watches of streams not created yet that one shard holds at most,
#: whatever its tenants' quotas (ShardSettings.max_resources; docs/operations.md, limits).
SHARD_MAX_RESOURCES = 100_000


def stream_settings(spec: dict[str, Any], defaults: StreamSettings) -> StreamSettings:
    """The in-memory part of a stream (for a durable stream: its hot tail)."""
    replay_bytes = int(spec.get("replay_max_bytes", defaults.replay_max_bytes))
    # retention_bytes caps the ring, and for a durable stream also its files (the hot
    # tail never holds more than the disk keeps; the control plane checks budgets so).
    if spec.get("retention_bytes"):
        replay_bytes = min(replay_bytes, int(spec["retention_bytes"]))
    return StreamSettings(
        replay_max_records=int(spec.get("replay_max_records", defaults.replay_max_records)),
        replay_max_bytes=replay_bytes,
        max_record_bytes=min(defaults.max_record_bytes, replay_bytes - RECORD_OVERHEAD),
        slow_subscriber_policy=spec.get("slow_subscriber_policy", defaults.slow_subscriber_policy),
        dedup_window_s=_or_default(spec.get("dedup_window_s"), defaults.dedup_window_s),
        dedup_max_entries=int(
            _or_default(spec.get("dedup_max_entries"), defaults.dedup_max_entries)
        ),
    )


def _or_default(value: Any, default: Any) -> Any:
    """A spec's value, or the node's default where the spec leaves it None."""
    return default if value is None else value


#: Stored fsync names from before they were reconciled (store migration v2 rewrites them;
#: a node following an older control plane may still be sent them).
_LEGACY_FSYNC = {"batch": "interval", "always": "commit"}


def durable_settings(spec: dict[str, Any]) -> DurableSettings | None:
    """The disk settings of a stream spec with ``durable`` true (None: in memory only).

    A spec without an fsync policy gets ``commit`` (the control plane stores that for
    ``durable=true`` without an explicit fsync); ``none`` as stored is honoured.
    """
    if not spec.get("durable"):
        return None
    stored = str(spec.get("fsync") or "commit")
    fsync: Any = _LEGACY_FSYNC.get(stored, stored)  # DurableSettings checks the name
    age = spec.get("retention_age_s")
    size = spec.get("retention_bytes")
    return DurableSettings(
        fsync=fsync,
        fsync_interval_ms=int(spec.get("fsync_interval_ms") or 100),
        retention_age_s=None if age is None else float(age),
        retention_bytes=None if size is None else int(size),
    )


def cache_settings(spec: dict[str, Any], defaults: CacheSettings, shards: int) -> CacheSettings:
    """One shard's partition of the cache: its share of the budget (keys spread by hash)."""
    budget = int(spec.get("budget_bytes", defaults.budget_bytes))
    max_value = int(spec.get("max_value_bytes", defaults.max_value_bytes))
    default_ttl = spec.get("default_ttl_s", defaults.default_ttl)
    share = max(budget // shards, defaults.max_key_bytes + max_value + 256)
    return CacheSettings(
        budget_bytes=share,
        max_key_bytes=defaults.max_key_bytes,
        max_value_bytes=max_value,
        default_ttl=None if default_ttl is None else min(float(default_ttl), defaults.max_ttl),
        max_ttl=defaults.max_ttl,
    )


def tenant_quota(spec: dict[str, Any], node: TenantQuota, shards: int) -> TenantQuota:
    """A tenant's quota on one shard: its node-wide memory and disk quotas split over
    the shards.

    ``node`` is the node's default (``--tenant-memory-quota`` and ``--tenant-disk-quota``,
    node-wide, and ``--tenant-max-resources``, per shard), used for what the tenant
    leaves unset.
    """
    memory = spec.get("memory_quota_bytes") or node.memory_bytes
    max_resources = spec.get("max_resources_per_shard") or node.max_resources
    disk = spec.get("disk_quota_bytes") or node.disk_bytes
    return TenantQuota(
        max(int(memory) // shards, 1),
        int(max_resources),
        None if disk is None else max(int(disk) // shards, 1),
    )


def auto_stream_spec(settings: StreamSettings, durable: DurableSettings | None) -> dict[str, Any]:
    """The control-plane spec of a stream created on first use with these settings: the
    inverse of :func:`stream_settings` and :func:`durable_settings` (defined with it,
    the stream keeps exactly what it has)."""
    spec: dict[str, Any] = {
        "replay_max_records": settings.replay_max_records,
        "replay_max_bytes": settings.replay_max_bytes,
        "slow_subscriber_policy": settings.slow_subscriber_policy,
        "durable": durable is not None,
    }
    if durable is not None:
        spec["fsync"] = durable.fsync
        spec["fsync_interval_ms"] = durable.fsync_interval_ms
        spec["retention_age_s"] = durable.retention_age_s
        # retention_bytes would also cap the replay ring (stream_settings): only a
        # value that caps nothing is carried over.
        if durable.retention_bytes is not None and (
            durable.retention_bytes >= settings.replay_max_bytes
        ):
            spec["retention_bytes"] = durable.retention_bytes
    return spec


def auto_cache_spec(defaults: CacheSettings) -> dict[str, Any]:
    """The control-plane spec of a cache created on first use (the node's defaults: the
    inverse of :func:`cache_settings`)."""
    return {
        "budget_bytes": defaults.budget_bytes,
        "max_value_bytes": defaults.max_value_bytes,
        "default_ttl_s": defaults.default_ttl,
    }
