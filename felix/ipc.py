"""Records on the shared-memory rings between gateways and shards.

Every record is a fixed header (``u8 kind``, ``u64 token``, ``u64 aux``) and a
body. For requests and replies the body is the client's (or the shard's) FLX1
extension frame, byte for byte, so a gateway forwards requests and replies
without re-encoding them; the token maps a reply back to the connection, stream
and request it answers. See docs/architecture.md, "Ring records".

These records never leave the node; the client wire format is docs/wire-protocol.md.
"""

from __future__ import annotations

import enum
import struct
import zlib

from felix.errors import RemoteProtocolError

HEADER = struct.Struct(">BQQ")
HEADER_SIZE = HEADER.size
_READ = struct.Struct(">QII")
_KEY_LEN = struct.Struct(">H")


class SlowSubscriberPolicy(enum.IntEnum):
    """A stream's slow-subscriber policy, as a shard tells a gateway in the aux of a
    SUBSCRIBED reply (docs/operations.md, ``--slow-subscriber``)."""

    DROP_OLD = 0
    DISCONNECT = 1
    BLOCK = 2

    @property
    def setting(self) -> str:
        """The policy's name in settings and the control plane (``drop_old``...)."""
        return self.name.lower()

    @classmethod
    def of(cls, setting: str) -> SlowSubscriberPolicy:
        """The policy named ``setting``; unknown names are the default, drop_old."""
        try:
            return cls[setting.upper()]
        except KeyError:
            return cls.DROP_OLD


class RecordType(enum.IntEnum):
    """What a ring record carries. Direction: G = gateway to shard, S = shard to gateway."""

    #: G: a client request frame (cache, publish, subscribe ops); token identifies it.
    REQUEST = 1
    #: S: the reply frame to the REQUEST with this token.
    REPLY = 2
    #: S: new records of a stream the gateway watches: body = stream key + EVENTS frame.
    PUSH = 3
    #: G: read records for one subscription: body = stream key + from/max_records/max_bytes.
    READ = 4
    #: S: answer to READ (token = subscription token, aux = stream tail):
    #: an EVENTS frame (from a durable stream's disk it may start above the READ's
    #: offset: the offsets in between hold no record, a gap), a CURSOR_ERROR frame when
    #: the offset left the replay ring (or retention), or an ERROR frame when the stream
    #: cannot be read (a damaged log: the subscription ends with it).
    READ_REPLY = 5
    #: G: watch (aux = 1) or unwatch (aux = 0) a stream's live records: body = stream key.
    WATCH = 6
    #: G: a gateway (re)started and forgets all its watches (aux = gateway index).
    HELLO = 7
    #: S: the stream was deleted (aux 0), or its records were dropped because its
    #: logical shard moved to another node (aux END_MOVED, cluster mode): body = stream
    #: key; its subscriptions end.
    END = 8
    #: G: the lowest next offset of this gateway's subscribers on a ``block`` stream
    #: (aux; token 1 = none left): the shard refuses appends that would evict it.
    CURSOR = 9
    #: S: records leased to a queue-group member (token = member token): body = a
    #: DELIVERIES frame whose request id is the consumer id (docs/queues.md).
    DELIVER = 10
    #: G: a queue-group member is gone (token = member token): body = stream key + group
    #: name (two keys). aux 0: abruptly, its leases count a failure; aux 1: gracefully
    #: (the node drains), released.
    LEAVE = 11
    #: S: publish for the shard (token = relay id): body = stream key + a PUBLISH frame,
    #: for a stream that may live on another shard (dead-letter appends).
    RELAY = 12
    #: G: the answer to a RELAY (token = relay id): body = the reply frame.
    RELAY_REPLY = 13


#: A queue consumer's window in payload bytes when it asks for the default (0), and
#: the most it may ask for: the shard leases within it, the gateway holds at most
#: about this much (plus QUEUE_GATEWAY_SLACK) unsent for the consumer.
QUEUE_DEFAULT_CREDIT_BYTES = 4 << 20
QUEUE_MAX_CREDIT_BYTES = 64 << 20
#: Bytes of deliveries beyond its window a consumer's QUIC stream may have unsent
#: before the gateway ends the consumer as too slow (frame overshoot, notices).
QUEUE_GATEWAY_SLACK = 4 << 20


#: The aux of an END record whose stream's logical shard moved to another node.
END_MOVED = 1

#: The aux of a REQUEST that carries a relayed dead-letter append (a PUBLISH): the
#: stream is created durable if missing, and refused if it is held in memory only.
AUX_DEAD_LETTER = 1


def queue_credit_bytes(asked: int) -> int:
    """The byte window a consumer gets for ``asked`` (0: the default; capped)."""
    return QUEUE_DEFAULT_CREDIT_BYTES if asked == 0 else min(asked, QUEUE_MAX_CREDIT_BYTES)


def encode(kind: RecordType, token: int, aux: int, body: bytes) -> bytes:
    return HEADER.pack(kind, token, aux) + body


def decode_header(record: bytes | memoryview) -> tuple[int, int, int]:
    """``(kind, token, aux)`` of a record; the body starts at ``HEADER_SIZE``."""
    if len(record) < HEADER_SIZE:
        raise RemoteProtocolError(f"ring record of {len(record)} bytes is shorter than its header")
    kind, token, aux = HEADER.unpack_from(record)
    return int(kind), int(token), int(aux)


def encode_key(key: str) -> bytes:
    raw = key.encode()
    return _KEY_LEN.pack(len(raw)) + raw


def decode_key(body: bytes | memoryview, pos: int = 0) -> tuple[str, int]:
    """The stream key at ``pos`` and the position after it."""
    if len(body) < pos + 2:
        raise RemoteProtocolError("truncated stream key")
    (n,) = _KEY_LEN.unpack_from(body, pos)
    end = pos + 2 + n
    if len(body) < end:
        raise RemoteProtocolError("truncated stream key")
    return bytes(body[pos + 2 : end]).decode(), end


def encode_read(token: int, key: str, from_offset: int, max_records: int, max_bytes: int) -> bytes:
    return encode(
        RecordType.READ, token, 0, encode_key(key) + _READ.pack(from_offset, max_records, max_bytes)
    )


def decode_read(body: bytes | memoryview) -> tuple[str, int, int, int]:
    key, pos = decode_key(body)
    if len(body) != pos + _READ.size:
        raise RemoteProtocolError("malformed READ record")
    from_offset, max_records, max_bytes = _READ.unpack_from(body, pos)
    return key, int(from_offset), int(max_records), int(max_bytes)


def shard_for(key: str, shards: int) -> int:
    """The shard that owns ``key`` (crc32, not hash(): the same in every process)."""
    return zlib.crc32(key.encode()) % shards


def stream_key(tenant: str, namespace: str, stream: str) -> str:
    """The node-wide key of a stream. Names are validated (no ``/``), so it is unambiguous."""
    return f"{tenant}/{namespace}/{stream}"
