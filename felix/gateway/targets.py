"""What a client request touches: the names admission checks, the permission, the route.

A :class:`Target` is read off an extension request (:func:`ext_target`) or a
translated v1 request (:func:`v1_target`) by the session core
(felix/gateway/session.py), which admits the request against it and forwards
it to the shard owning its key.
"""

from __future__ import annotations

from dataclasses import dataclass

from felix import ipc, wire
from felix.gateway import v1

__all__ = ["Target", "consumer_target", "ext_target", "v1_target"]


@dataclass(frozen=True, slots=True)
class Target:
    """What a request touches, for admission and routing."""

    tenant: str
    namespace: str
    kind: str  # "cache" | "stream"
    name: str
    action: str  # the permission it needs
    key: str  # the routing key (stream key, or cache key with the entry key)


#: Per request: a tuple, not a union built on every call.
_STREAM_REQUESTS = (wire.Publish, wire.Subscribe)


def ext_target(msg: wire.ExtMessage) -> Target | None:
    """What an extension request touches (None: a control request or not a request)."""
    if isinstance(msg, wire.CacheRequest):
        key = f"{msg.tenant_id}/{msg.namespace}/{msg.cache}/{msg.key}"
        names = (msg.tenant_id, msg.namespace, "cache", msg.cache)
        return Target(*names, _cache_action(msg.opcode), key)
    if isinstance(msg, wire.Consume):
        key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
        return Target(msg.tenant_id, msg.namespace, "stream", msg.stream, "stream.consume", key)
    if isinstance(msg, _STREAM_REQUESTS):
        key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
        action = "stream.publish" if isinstance(msg, wire.Publish) else "stream.subscribe"
        return Target(msg.tenant_id, msg.namespace, "stream", msg.stream, action, key)
    return None


def consumer_target(key: str) -> Target:
    """What a consumer's later requests (ack, nak, ...) touch: its stream, to consume."""
    tenant, namespace, name = key.split("/")
    return Target(tenant, namespace, "stream", name, "stream.consume", key)


def v1_target(req: v1.V1Request) -> Target:
    """What a translated v1 request touches."""
    tenant, namespace, name = req.names
    if req.kind == "cache":
        action = _cache_action(req.frame[wire.HEADER_SIZE])
        return Target(tenant, namespace, "cache", name, action, req.route_key)
    action = "stream.subscribe" if req.kind == "subscribe" else "stream.publish"
    return Target(tenant, namespace, "stream", name, action, req.route_key)


def _cache_action(opcode: int) -> str:
    return "cache.read" if opcode in (wire.OP_CACHE_GET, wire.OP_CACHE_TTL) else "cache.write"
