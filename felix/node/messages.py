"""Messages between the supervisor and its child processes (one control socket per child).

Each message is one line of JSON: ``{"type": "<name>", ...fields}``. Commands go
from the supervisor to a child, events from a child to the supervisor. The line
format never leaves the node (both ends are always the same felix version), so
it is plain JSON rather than a versioned binary format like the ring records in
felix/ipc.py; what this module adds is one typed class per message, so both ends
agree on names and fields and mypy checks every use.

    line = encode(ShardDown(shard=1))        # b'{"type": "shard_down", "shard": 1}\\n'
    decode(line)                             # ShardDown(shard=1)

:func:`decode` raises :class:`~felix.errors.RemoteProtocolError` for a line that
is not a known message with the right fields; a line is at most
:data:`MAX_LINE_BYTES` long (the reader's limit).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from felix.errors import RemoteProtocolError

#: Longest message line either end reads: a snapshot part or a page of changes is the
#: largest message (:data:`SNAPSHOT_PART_BYTES` of resources, or one resource larger
#: than that). What bounds one resource: the control plane's request body (1 MiB,
#: HttpLimits.max_body_bytes of the embedded control plane, which is not configurable),
#: as JSON at most 3 times that (a 2-byte UTF-8 character becomes a 6-byte escape),
#: plus the few bounded settings a kind has besides its one unbounded list or object.
MAX_LINE_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class _Message:
    TYPE: ClassVar[str] = ""


# -- supervisor to child ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardDown(_Message):
    """To gateways: shard ``shard`` died; fail what is in flight to it (Unavailable)."""

    TYPE: ClassVar[str] = "shard_down"
    shard: int


@dataclass(frozen=True, slots=True)
class ShardUp(_Message):
    """To gateways: shard ``shard``'s replacement is ready."""

    TYPE: ClassVar[str] = "shard_up"
    shard: int


@dataclass(frozen=True, slots=True)
class Quiesce(_Message):
    """To gateways: stop taking requests, wait up to ``timeout`` s for replies in flight."""

    TYPE: ClassVar[str] = "quiesce"
    timeout: float


@dataclass(frozen=True, slots=True)
class Drain(_Message):
    """To gateways: deliver what subscribers are owed, then close, within ``grace`` s."""

    TYPE: ClassVar[str] = "drain"
    grace: float


@dataclass(frozen=True, slots=True)
class ApplyResource(_Message):
    """To the shard owning it (or the gateway hosting shard ``shard``): a control-plane
    tenant, stream, cache or queue group was defined (``op`` "define", with its
    ``spec``) or deleted."""

    TYPE: ClassVar[str] = "apply"
    op: Literal["define", "delete"]
    #: felix.control.model.ResourceKind value: "tenant" | "stream" | "cache" | "group"
    kind: str
    #: [tenant] for a tenant, [tenant, namespace, stream, group] for a group, else
    #: [tenant, namespace, name]
    path: list[str]
    shard: int
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ping(_Message):
    """The supervisor's heartbeat; the child answers :class:`Pong` with the same ``seq``."""

    TYPE: ClassVar[str] = "ping"
    seq: int


@dataclass(frozen=True, slots=True)
class SnapshotRequest(_Message):
    """To the control process: send the store's snapshot (as :class:`SnapshotPart` s)."""

    TYPE: ClassVar[str] = "snapshot"
    request: int


@dataclass(frozen=True, slots=True)
class ChangesRequest(_Message):
    """To the control process: the feed after ``since`` (waiting up to ``wait`` s for one)."""

    TYPE: ClassVar[str] = "changes"
    request: int
    since: int
    limit: int
    wait: float


@dataclass(frozen=True, slots=True)
class RegisterRequest(_Message):
    """To the control process: register resources created on first use (``resources``:
    ``{"kind", "path", "spec", "since"}`` each, felix/control/registration.py);
    answered by :class:`RegisterReply` (or :class:`FeedFailed`)."""

    TYPE: ClassVar[str] = "register"
    request: int
    resources: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StreamStatusRequest(_Message):
    """To the shard owning stream ``key``: answer :class:`StreamStatusReply` (status route).

    ``kind`` "cache": ``key`` is ``tenant/ns/cache``, asked of every shard (each holds a
    partition of the cache's keys)."""

    TYPE: ClassVar[str] = "stream_status"
    request: int
    key: str
    kind: str = "stream"


@dataclass(frozen=True, slots=True)
class Ownership(_Message):
    """To gateways and shard processes (cluster mode): the node's newest shard map,
    :meth:`felix.cluster.ownership.OwnershipMap.to_dict`. Sent whenever the map or
    ``serve_until`` changes (every lease renewal) and to every gateway and shard process
    that starts; neither serves (stores) anything before its first one. Answered by
    :class:`OwnershipAck`."""

    TYPE: ClassVar[str] = "ownership"
    map: dict[str, Any]


# -- child to supervisor ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready(_Message):
    """The child serves (a shard reads its rings; a gateway answers on its socket)."""

    TYPE: ClassVar[str] = "ready"


@dataclass(frozen=True, slots=True)
class Starting(_Message):
    """Progress before :class:`Ready` (a shard recovering its durable streams): the
    supervisor's ready timeout counts from the last one, and /readyz shows ``detail``."""

    TYPE: ClassVar[str] = "starting"
    detail: str


@dataclass(frozen=True, slots=True)
class Quiesced(_Message):
    TYPE: ClassVar[str] = "quiesced"


@dataclass(frozen=True, slots=True)
class Drained(_Message):
    TYPE: ClassVar[str] = "drained"


@dataclass(frozen=True, slots=True)
class Stats(_Message):
    """The child's counters and gauges (names from felix/node/health.py's table)."""

    TYPE: ClassVar[str] = "stats"
    counters: dict[str, int]


@dataclass(frozen=True, slots=True)
class Pong(_Message):
    TYPE: ClassVar[str] = "pong"
    seq: int


#: Bytes of resource JSON per :class:`SnapshotPart` and :class:`ChangesReply` (at least one).
SNAPSHOT_PART_BYTES = 256 << 10


@dataclass(frozen=True, slots=True)
class SnapshotPart(_Message):
    """From the control process: part of a snapshot (``Resource`` JSON objects); the
    last part has ``done`` set. ``position``: the feed position the snapshot reflects."""

    TYPE: ClassVar[str] = "snapshot_part"
    request: int
    position: int
    resources: list[dict[str, Any]]
    done: bool


@dataclass(frozen=True, slots=True)
class ChangesReply(_Message):
    """From the control process: ``Change`` JSON objects and the position to ask from next."""

    TYPE: ClassVar[str] = "changes_reply"
    request: int
    changes: list[dict[str, Any]]
    next_position: int


@dataclass(frozen=True, slots=True)
class FeedFailed(_Message):
    """From the control process: a feed request failed (``cursor_too_old``: re-snapshot)."""

    TYPE: ClassVar[str] = "feed_failed"
    request: int
    error: str
    cursor_too_old: bool = False


@dataclass(frozen=True, slots=True)
class AutoCreated(_Message):
    """From a shard (or a gateway hosting shard cores): streams and caches created on
    first use, ``{"kind", "path", "spec"}`` each (at most :data:`AUTO_CREATED_PART` per
    message), for the node to register in the control plane."""

    TYPE: ClassVar[str] = "auto_created"
    resources: list[dict[str, Any]]


#: Resources per :class:`AutoCreated` message at most (one is a few hundred bytes).
AUTO_CREATED_PART = 1000


@dataclass(frozen=True, slots=True)
class RegisterReply(_Message):
    """From the control process: one result per resource of a :class:`RegisterRequest`."""

    TYPE: ClassVar[str] = "register_reply"
    request: int
    results: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StreamStatusReply(_Message):
    """From a shard: the JSON of the status route for the stream asked (None: not held)."""

    TYPE: ClassVar[str] = "stream_status_reply"
    request: int
    status: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class OwnershipAck(_Message):
    """From a gateway: it applied shard map ``version``, and it has no request in flight
    for a shard that map refuses here (never sent on a timeout); from a shard process:
    it applied the map (it stores nothing more for the shards the map does not serve
    here). What a handoff waits for before the shard's new owner takes it."""

    TYPE: ClassVar[str] = "ownership_ack"
    version: int


@dataclass(frozen=True, slots=True)
class PinWanted(_Message):
    """From a shard (or a gateway hosting shard cores), cluster mode: it wrote the first
    durable records of these logical shards, not pinned to this node yet, and holds
    their acks until they are (felix/shard/cluster.py ``PinWaits``): claim the pins now
    rather than at the next scan of the data dir."""

    TYPE: ClassVar[str] = "pin_wanted"
    shards: list[int]


Command = (
    ShardDown
    | ShardUp
    | Quiesce
    | Drain
    | ApplyResource
    | Ping
    | SnapshotRequest
    | ChangesRequest
    | RegisterRequest
    | StreamStatusRequest
    | Ownership
)
Event = (
    Ready
    | Starting
    | Quiesced
    | Drained
    | Stats
    | Pong
    | SnapshotPart
    | ChangesReply
    | FeedFailed
    | StreamStatusReply
    | AutoCreated
    | RegisterReply
    | OwnershipAck
    | PinWanted
)
Message = Command | Event

_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        ShardDown,
        ShardUp,
        Quiesce,
        Drain,
        ApplyResource,
        Ping,
        SnapshotRequest,
        ChangesRequest,
        Ready,
        Starting,
        Quiesced,
        Drained,
        Stats,
        Pong,
        SnapshotPart,
        ChangesReply,
        FeedFailed,
        StreamStatusRequest,
        StreamStatusReply,
        RegisterRequest,
        RegisterReply,
        AutoCreated,
        Ownership,
        OwnershipAck,
        PinWanted,
    )
}
#: Field name -> the JSON types its value may have (ints are accepted as floats).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "shard": (int,),
    "seq": (int,),
    "timeout": (int, float),
    "grace": (int, float),
    "op": (str,),
    "kind": (str,),
    "path": (list,),
    "spec": (dict,),
    "counters": (dict,),
    "request": (int,),
    "since": (int,),
    "limit": (int,),
    "wait": (int, float),
    "position": (int,),
    "resources": (list,),
    "changes": (list,),
    "next_position": (int,),
    "done": (bool,),
    "error": (str,),
    "cursor_too_old": (bool,),
    "key": (str,),
    "detail": (str,),
    "status": (dict, type(None)),
    "results": (list,),
    "map": (dict,),
    "version": (int,),
    "shards": (list,),
}


def encode(message: Message) -> bytes:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return json.dumps({"type": message.TYPE, **fields}).encode() + b"\n"


#: Names in an ApplyResource path by kind (3 for the others: streams and caches).
_APPLY_PATH_LENGTH = {"tenant": 1, "group": 4}


def decode(line: bytes) -> Message:
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise RemoteProtocolError(f"control message is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise RemoteProtocolError("control message is not a JSON object")
    cls = _TYPES.get(raw.pop("type", None))
    if cls is None:
        raise RemoteProtocolError("unknown control message type")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RemoteProtocolError(f"{cls.TYPE} message without {f.name!r}")
            continue
        value = raw[f.name]
        types = _JSON_TYPES[f.name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise RemoteProtocolError(f"{cls.TYPE} message: bad {f.name!r}")
        values[f.name] = value
    if cls is ApplyResource:
        if values["op"] not in ("define", "delete"):
            raise RemoteProtocolError("apply message: op must be define or delete")
        path = values["path"]
        size = _APPLY_PATH_LENGTH.get(values["kind"], 3)
        if len(path) != size or not all(isinstance(part, str) for part in path):
            raise RemoteProtocolError(
                "apply message: path must be [tenant], [tenant, namespace, name] or "
                "[tenant, namespace, stream, group]"
            )
    if cls is PinWanted and not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 65536 for s in values["shards"]
    ):
        raise RemoteProtocolError("pin_wanted message: shards must be logical shard numbers")
    message: Message = cls(**values)
    return message


__all__ = [
    "MAX_LINE_BYTES",
    "SNAPSHOT_PART_BYTES",
    "ApplyResource",
    "AutoCreated",
    "ChangesReply",
    "ChangesRequest",
    "Command",
    "Drain",
    "Drained",
    "Event",
    "FeedFailed",
    "Message",
    "Ownership",
    "OwnershipAck",
    "PinWanted",
    "Ping",
    "Pong",
    "Quiesce",
    "Quiesced",
    "Ready",
    "RegisterReply",
    "RegisterRequest",
    "ShardDown",
    "ShardUp",
    "SnapshotPart",
    "SnapshotRequest",
    "Starting",
    "Stats",
    "StreamStatusReply",
    "StreamStatusRequest",
    "decode",
    "encode",
]
