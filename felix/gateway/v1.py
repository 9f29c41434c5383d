"""Serving Felix v1 peers: their requests become extension frames, replies go back in v1 form.

A peer that speaks only FLX1 v1 (docs/wire-protocol.md; JSON requests, binary publish batches,
event batches) keeps working: the gateway translates each v1 request into the
felix extension request the shards understand, remembers how the peer expects
its answer, and turns the shard's reply back into the v1 message (or binary
publish ack). Events for v1 subscribers are re-encoded once per batch as a v1
shared event batch (0x0004, with 0x0020 offsets when the peer negotiated them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from felix import wire
from felix.errors import BadRequest

#: Turns the shard's extension reply into what the v1 peer expects (None: send nothing).
Translate = Callable[[wire.ExtMessage], bytes | None]

_ACKS = {
    "none": wire.ACK_NONE,
    "per_message": wire.ACK_PER_MESSAGE,
    "per_batch": wire.ACK_PER_BATCH,
}


class V1Request:
    """A v1 request translated: the extension frame to forward and how to answer."""

    __slots__ = ("frame", "kind", "names", "route_key", "start", "subscription_id", "translate")

    def __init__(
        self,
        kind: str,
        names: tuple[str, str, str],
        frame: bytes,
        translate: Translate,
        start: object = None,
        subscription_id: int | None = None,
        cache_key: str | None = None,
    ) -> None:
        self.kind = kind  # "publish" | "cache" | "subscribe"
        self.names = names  # (tenant, namespace, stream or cache)
        # What the owning shard is chosen by (as for extension requests).
        self.route_key = "/".join(names if cache_key is None else (*names, cache_key))
        self.frame = frame
        self.translate = translate
        self.start = start
        self.subscription_id = subscription_id


def _message(**fields: Any) -> bytes:
    return wire.encode_message(fields)


def _error_text(reply: wire.ExtMessage) -> str | None:
    if isinstance(reply, wire.ErrorReply):
        return reply.message
    if isinstance(reply, wire.CursorErrorReply):
        return f"cursor {reply.reason}"
    return None


def from_json(msg: dict[str, Any]) -> V1Request:
    """Translate a v1 JSON request (publish, publish_batch, cache_put, cache_get, subscribe)."""
    mtype = msg["type"]
    if mtype in ("publish", "publish_batch"):
        payloads = [msg["payload"]] if mtype == "publish" else msg["payloads"]
        rid = msg.get("request_id")
        ack = msg.get("ack", "per_message" if rid is not None else "none")
        names = (msg["tenant_id"], msg["namespace"], msg["stream"])
        frame = wire.encode_publish(0, *names, payloads, ack=_ACKS[ack])

        def publish_reply(reply: wire.ExtMessage) -> bytes | None:
            if rid is None or ack == "none":
                return None
            error = _error_text(reply)
            if error is not None:
                return _message(type="publish_error", request_id=rid, message=error)
            return _message(type="publish_ok", request_id=rid)

        return V1Request("publish", names, frame, publish_reply)
    if mtype in ("cache_put", "cache_get"):
        names = (msg["tenant_id"], msg["namespace"], msg["cache"])
        key = msg["key"]
        rid = msg.get("request_id")
        if mtype == "cache_put":
            ttl = msg["ttl_ms"]
            if ttl == 0:
                raise BadRequest("ttl_ms must be positive or null")
            frame = wire.encode_cache_set(0, *names, key, msg["value"], ttl_ms=ttl or 0)
        else:
            frame = wire.encode_cache_get(0, *names, key)

        def cache_reply(reply: wire.ExtMessage) -> bytes | None:
            error = _error_text(reply)
            if error is not None:
                return _message(type="error", message=error)
            if isinstance(reply, wire.CacheValue):
                out: dict[str, Any] = {
                    "type": "cache_value",
                    "tenant_id": names[0],
                    "namespace": names[1],
                    "cache": names[2],
                    "key": key,
                    "value": reply.value,
                }
                if rid is not None:
                    out["request_id"] = rid
                return wire.encode_message(out)
            return (
                _message(type="cache_ok", request_id=rid)
                if rid is not None
                else (_message(type="ok"))
            )

        return V1Request("cache", names, frame, cache_reply, cache_key=key)
    if mtype == "subscribe":
        names = (msg["tenant_id"], msg["namespace"], msg["stream"])
        start = msg.get("start", "latest")
        if isinstance(start, dict):
            start = start["offset"]
        sub_id = msg.get("subscription_id")

        def subscribe_reply(reply: wire.ExtMessage) -> bytes | None:
            if isinstance(reply, wire.Subscribed):
                return _message(type="subscribed", subscription_id=reply.subscription_id)
            if isinstance(reply, wire.CursorErrorReply):
                return _message(
                    type="subscribe_cursor_error",
                    reason=reply.reason,
                    requested=reply.requested,
                    available=reply.available,
                )
            return _message(type="error", message=_error_text(reply) or "subscribe failed")

        return V1Request("subscribe", names, b"", subscribe_reply, start, sub_id)
    raise BadRequest(f"{mtype} is not a request a broker serves")


def from_binary(batch: wire.PublishBatch) -> V1Request:
    """Translate a binary publish batch (0x0001, or 0x0009 answered with a 0x0010 ack)."""
    names = (batch.tenant_id, batch.namespace, batch.stream)
    ack = _ACKS[batch.ack or "none"]
    frame = wire.encode_publish(0, *names, batch.payloads, ack=ack)
    rid = batch.request_id

    def publish_ack(reply: wire.ExtMessage) -> bytes | None:
        if rid is None:
            return None
        return wire.encode_publish_ack(rid, _error_text(reply))

    return V1Request("publish", names, frame, publish_ack)


def event_batch(events_frame: bytes, with_offsets: bool) -> bytes:
    """Re-encode an EVENTS extension frame as a v1 shared event batch."""
    events = wire.decode_ext(wire.decode_frame(events_frame, extensions=True))
    assert isinstance(events, wire.Events)
    return wire.encode_event_batch(
        events.payloads, base_offset=events.base_offset if with_offsets else None
    )
