# felix's extension family (flag 0x0040), included into _codec.pyx.
#
# Payload: u8 opcode, u64 request_id, then one layout per opcode
# (docs/wire-protocol.md, "The felix extension family"). Opcodes below 0x80 go
# client -> broker, 0x80 and above broker -> client. A peer only sends these
# after both sides advertised FLAG_FELIX_EXT in auth / auth_ok.

# Requests (client -> broker)
OP_CACHE_GET = 0x01
OP_CACHE_SET = 0x02
OP_CACHE_DELETE = 0x03
OP_CACHE_TTL = 0x04
OP_PUBLISH = 0x10
OP_SUBSCRIBE = 0x11
OP_CREDIT = 0x12
OP_UNSUBSCRIBE = 0x13
OP_CONSUME = 0x20
OP_CONSUMER_WINDOW = 0x21
OP_ACK = 0x22
OP_NAK = 0x23
OP_RELEASE = 0x24
OP_IN_PROGRESS = 0x25
OP_TERM = 0x26
OP_STOP_CONSUME = 0x27
OP_REAUTH = 0x30
OP_PING = 0x31
OP_SHARD_MAP = 0x32
# Replies and notices (broker -> client)
OP_OK = 0x80
OP_CACHE_VALUE = 0x81
OP_CACHE_STORED = 0x82
OP_CACHE_DELETED = 0x83
OP_CACHE_TTL_REPLY = 0x84
OP_SHARD_MAP_REPLY = 0x85
OP_PUBLISH_OFFSETS = 0x90
OP_SUBSCRIBED = 0x91
OP_EVENTS = 0x92
OP_SLOW_CONSUMER = 0x93
OP_SUBSCRIPTION_END = 0x94
OP_CONSUMING = 0xA0
OP_DELIVERIES = 0xA1
OP_SETTLED = 0xA2
OP_CONSUMER_END = 0xA3
OP_CONSUMER_ROLE = 0xA4
OP_ERROR = 0xE0
OP_CURSOR_ERROR = 0xE1
OP_REDIRECT = 0xE2

# Cache set conditions.
SET_ALWAYS = 0
SET_IF_ABSENT = 1   # nx
SET_IF_PRESENT = 2  # xx
# Publish ack modes (same numbering as v1's 0x0009 prefix).
ACK_NONE = 0
ACK_PER_MESSAGE = 1
ACK_PER_BATCH = 2
# Subscribe start kinds.
START_LATEST = 0
START_EARLIEST = 1
START_OFFSET = 2
START_TIME = 3
# PUBLISH_OFFSETS durability: what the ack promises about the acked records.
DURABILITY_MEMORY = 0   # held in memory only
DURABILITY_WRITTEN = 1  # handed to the kernel: survives kill -9 of felix, not power loss
DURABILITY_SYNCED = 2   # fsynced: survives power loss
# Cache TTL reply states.
TTL_MISSING = 0
TTL_PERSISTENT = 1
TTL_EXPIRING = 2
# NAK delay_ms meaning "use the group's backoff" (the u32 maximum).
NAK_BACKOFF = 0xFFFFFFFF
# A member's role in its group (CONSUMING, CONSUMER_ROLE).
ROLE_MEMBER = 0    # a shared group: records go round-robin over the members
ROLE_ACTIVE = 1    # an exclusive group: the one member records go to
ROLE_STANDBY = 2   # an exclusive group: waiting to take over
# Why SETTLED refuses an offset.
REFUSED_STALE = 1    # leased to another member since
REFUSED_DEAD = 2     # dead-lettered
REFUSED_UNKNOWN = 3  # never delivered to this group
# SHARD_MAP_REPLY: the owner index of a shard no node serves right now.
SHARD_NO_OWNER = 0xFFFF
# ... and its bounds (docs/architecture.md, "Logical shards").
cdef uint32_t _MAX_LOGICAL_SHARDS = 4096
cdef Py_ssize_t _MAX_MAP_NODES = 1024

cdef dict _CURSOR_REASONS = {1: "too_old", 2: "in_future"}
cdef dict _CURSOR_CODES = {"too_old": 1, "in_future": 2}

# Known opcodes -> layout decoder is the dispatch table at the bottom.


cdef class ExtMessage:
    """Base of decoded extension frames: ``opcode`` and ``request_id``.

    ``OP_OK`` and ``OP_PING`` decode to a bare ``ExtMessage``.
    """

    def __repr__(self):
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in type(self).__fields__
        )
        return f"{type(self).__name__}(opcode=0x{self.opcode:02x}, request_id={self.request_id}{', ' if fields else ''}{fields})"

    __fields__ = ()

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return (self.opcode, self.request_id) == (other.opcode, other.request_id) and all(
            getattr(self, n) == getattr(other, n) for n in type(self).__fields__
        )

    __hash__ = None


cdef class CacheRequest(ExtMessage):
    """OP_CACHE_GET / SET / DELETE / TTL: one key of one cache.

    ``value``, ``ttl_ms`` (0: no TTL) and ``mode`` (SET_*) are meaningful for SET only.
    """

    cdef readonly str tenant_id
    cdef readonly str namespace
    cdef readonly str cache
    cdef readonly str key
    cdef readonly object value
    cdef readonly object ttl_ms
    cdef readonly int mode
    __fields__ = ("tenant_id", "namespace", "cache", "key", "value", "ttl_ms", "mode")


cdef class Publish(ExtMessage):
    """OP_PUBLISH: records with optional headers, acked with their offsets."""

    cdef readonly str tenant_id
    cdef readonly str namespace
    cdef readonly str stream
    cdef readonly int ack
    cdef readonly list payloads
    cdef readonly object headers
    __fields__ = ("tenant_id", "namespace", "stream", "ack", "payloads", "headers")


cdef class StartAtTime:
    """A SUBSCRIBE start (kind 3): the first record with a timestamp at or after ``timestamp_us``.

    ``timestamp_us`` is microseconds since the Unix epoch (u64 on the wire).
    """

    cdef readonly object timestamp_us

    def __init__(self, timestamp_us):
        if isinstance(timestamp_us, bool) or not isinstance(timestamp_us, int):
            raise LocalProtocolError(
                f"timestamp_us must be an int, not {type(timestamp_us).__name__}")
        self.timestamp_us = _u64_arg(timestamp_us, "timestamp_us")

    def __repr__(self):
        return f"StartAtTime(timestamp_us={self.timestamp_us})"

    def __eq__(self, other):
        if type(other) is not StartAtTime:
            return NotImplemented
        return self.timestamp_us == (<StartAtTime>other).timestamp_us

    def __hash__(self):
        return hash((StartAtTime, self.timestamp_us))


cdef class Subscribe(ExtMessage):
    """OP_SUBSCRIBE: ``start`` is "latest", "earliest", an int offset or a ``StartAtTime``;
    ``credit`` in records."""

    cdef readonly str tenant_id
    cdef readonly str namespace
    cdef readonly str stream
    cdef readonly object subscription_id
    cdef readonly object start
    cdef readonly object credit
    __fields__ = ("tenant_id", "namespace", "stream", "subscription_id", "start", "credit")


cdef class SubscriptionOp(ExtMessage):
    """OP_CREDIT (``credit`` more records) and OP_UNSUBSCRIBE (``credit`` 0)."""

    cdef readonly object subscription_id
    cdef readonly object credit
    __fields__ = ("subscription_id", "credit")


cdef class Reauth(ExtMessage):
    """OP_REAUTH: a fresh token for a live connection."""

    cdef readonly str token
    __fields__ = ("token",)


cdef class CacheValue(ExtMessage):
    """OP_CACHE_VALUE: ``value`` is None on a miss."""

    cdef readonly object value
    __fields__ = ("value",)


cdef class CacheResult(ExtMessage):
    """OP_CACHE_STORED (``result``: stored) / OP_CACHE_DELETED (``result``: existed)."""

    cdef readonly bint result
    __fields__ = ("result",)


cdef class CacheTtlReply(ExtMessage):
    """OP_CACHE_TTL_REPLY: ``state`` TTL_MISSING / TTL_PERSISTENT / TTL_EXPIRING; ``ttl_ms`` left."""

    cdef readonly int state
    cdef readonly object ttl_ms
    __fields__ = ("state", "ttl_ms")


cdef class PublishOffsets(ExtMessage):
    """OP_PUBLISH_OFFSETS: the batch got offsets ``base_offset`` .. ``base_offset + count - 1``.

    ``durability`` (DURABILITY_*) says what the ack promises: MEMORY when the body has
    no durability byte (the 12-byte body of older brokers).
    """

    cdef readonly object base_offset
    cdef readonly object count
    cdef readonly int durability
    __fields__ = ("base_offset", "count", "durability")


cdef class Subscribed(ExtMessage):
    """OP_SUBSCRIBED: delivery starts at ``start_offset``."""

    cdef readonly object subscription_id
    cdef readonly object start_offset
    __fields__ = ("subscription_id", "start_offset")


cdef class Events(ExtMessage):
    """OP_EVENTS: records from ``base_offset`` on, shared by every subscriber (request_id 0)."""

    cdef readonly object base_offset
    cdef readonly list payloads
    cdef readonly object headers
    __fields__ = ("base_offset", "payloads", "headers")


cdef class SlowConsumerNotice(ExtMessage):
    """OP_SLOW_CONSUMER: ``dropped`` records from ``first_dropped`` on were lost (request_id: subscription)."""

    cdef readonly object first_dropped
    cdef readonly object dropped
    __fields__ = ("first_dropped", "dropped")


cdef class ErrorReply(ExtMessage):
    """OP_ERROR (reply to request_id), OP_SUBSCRIPTION_END (request_id: subscription) and
    OP_CONSUMER_END (request_id: consumer)."""

    cdef readonly int code
    cdef readonly str message
    __fields__ = ("code", "message")


cdef class CursorErrorReply(ExtMessage):
    """OP_CURSOR_ERROR: ``reason`` "too_old" / "in_future", with ``requested`` and ``available``."""

    cdef readonly str reason
    cdef readonly object requested
    cdef readonly object available
    __fields__ = ("reason", "requested", "available")


cdef class Redirect(ExtMessage):
    """OP_REDIRECT: the shard is owned by ``owner`` (host:port) at ``epoch``."""

    cdef readonly object shard
    cdef readonly object epoch
    cdef readonly str owner
    __fields__ = ("shard", "epoch", "owner")


cdef class ShardMapRequest(ExtMessage):
    """OP_SHARD_MAP: ask for the cluster's shard map (empty body)."""


cdef class ShardMap(ExtMessage):
    """OP_SHARD_MAP_REPLY: ``logical_shards`` (0: the node is not in a cluster), the map's
    ``version``, the nodes' ``addresses`` (host:port) and per logical shard its ``owners``
    entry (an index into ``addresses``, SHARD_NO_OWNER: none serving now) and ``epochs``."""

    cdef readonly object logical_shards
    cdef readonly object version
    cdef readonly list addresses
    cdef readonly list owners
    cdef readonly list epochs
    __fields__ = ("logical_shards", "version", "addresses", "owners", "epochs")


cdef class Consume(ExtMessage):
    """OP_CONSUME: join ``group`` on a stream as ``consumer_id``, with a window of
    ``credit_records`` records and ``credit_bytes`` payload bytes (0: the broker's default)."""

    cdef readonly str tenant_id
    cdef readonly str namespace
    cdef readonly str stream
    cdef readonly str group
    cdef readonly object consumer_id
    cdef readonly object credit_records
    cdef readonly object credit_bytes
    __fields__ = ("tenant_id", "namespace", "stream", "group", "consumer_id",
                  "credit_records", "credit_bytes")


cdef class ConsumerWindow(ExtMessage):
    """OP_CONSUMER_WINDOW: the consumer's new window (it replaces the old one)."""

    cdef readonly object consumer_id
    cdef readonly object credit_records
    cdef readonly object credit_bytes
    __fields__ = ("consumer_id", "credit_records", "credit_bytes")


cdef class Settle(ExtMessage):
    """OP_ACK / NAK / RELEASE / IN_PROGRESS / TERM of ``ranges`` ((first, count) pairs).

    ``delay_ms`` is meaningful for NAK only (NAK_BACKOFF: the group's backoff),
    ``detail`` for NAK (error text) and TERM (reason).
    """

    cdef readonly object consumer_id
    cdef readonly object delay_ms
    cdef readonly str detail
    cdef readonly list ranges
    __fields__ = ("consumer_id", "delay_ms", "detail", "ranges")


cdef class ConsumerOp(ExtMessage):
    """OP_STOP_CONSUME: a graceful stop of the consumer (its leases are released)."""

    cdef readonly object consumer_id
    __fields__ = ("consumer_id",)


cdef class Consuming(ExtMessage):
    """OP_CONSUMING: the consumer joined with ``role`` (ROLE_MEMBER / ACTIVE / STANDBY)."""

    cdef readonly object consumer_id
    cdef readonly int role
    __fields__ = ("consumer_id", "role")


# Decoding DELIVERIES makes one per record: reuse freed ones.
@cython.freelist(256)
cdef class Delivery:
    """One record of a DELIVERIES frame, leased to the consumer.

    ``timestamp_us`` 0 is unknown; ``attempts`` counts this hand-out; ``headers``
    is None when the record has none.
    """

    cdef readonly object offset
    cdef readonly object timestamp_us
    cdef readonly object attempts
    cdef readonly object failures
    cdef readonly object headers
    cdef readonly bytes payload

    def __repr__(self):
        return (
            f"Delivery(offset={self.offset}, timestamp_us={self.timestamp_us}, "
            f"attempts={self.attempts}, failures={self.failures}, headers={self.headers!r}, "
            f"payload={self.payload!r})"
        )

    def __eq__(self, other):
        if type(other) is not Delivery:
            return NotImplemented
        cdef Delivery o = <Delivery>other
        return (
            self.offset == o.offset and self.timestamp_us == o.timestamp_us
            and self.attempts == o.attempts and self.failures == o.failures
            and self.headers == o.headers and self.payload == o.payload
        )

    __hash__ = None


cdef class Deliveries(ExtMessage):
    """OP_DELIVERIES: ``records`` (``Delivery``) for one consumer (request_id: consumer id)."""

    cdef readonly list records
    __fields__ = ("records",)


cdef class Settled(ExtMessage):
    """OP_SETTLED: the settle was applied except for ``refused`` ((offset, REFUSED_*) pairs)."""

    cdef readonly list refused
    __fields__ = ("refused",)


cdef class ConsumerRole(ExtMessage):
    """OP_CONSUMER_ROLE: the consumer's role changed (request_id: consumer id)."""

    cdef readonly int role
    __fields__ = ("role",)

# --- encoding -----------------------------------------------------------------------------

cdef inline unsigned char* _ext_start(bytes out, Py_ssize_t body, int opcode, uint64_t rid) noexcept:
    cdef unsigned char* p = _put_header(<unsigned char*>PyBytes_AS_STRING(out), 0x0040, 9 + body)
    p[0] = <unsigned char>opcode
    _put_u64(p + 1, rid)
    return p + 9


cdef list _header_list(object headers, Py_ssize_t count, Py_ssize_t* total):
    """Validate per-record headers (None, or one dict-or-None per record) and size them."""
    cdef Py_ssize_t size = 0, nk, nv
    cdef list out
    if headers is None:
        total[0] = 0
        return None
    if not isinstance(headers, (list, tuple)) or len(headers) != count:
        raise LocalProtocolError("headers must be a list with one dict (or None) per payload")
    out = list(headers)
    for h in out:
        if h is None:
            continue
        if not isinstance(h, dict):
            raise LocalProtocolError(f"headers entries must be dicts, not {type(h).__name__}")
        if len(<dict>h) > _U16_MAX:
            raise LocalProtocolError("too many headers on one record")
        for k, v in (<dict>h).items():
            _short_str(k, &nk, "header name")
            _short_str(v, &nv, "header value")
            size += 4 + nk + nv
    total[0] = size
    return out


cdef unsigned char* _write_records(unsigned char* p, list payloads, list headers) noexcept:
    cdef Py_ssize_t i, nk, nv
    cdef const char* k
    cdef const char* v
    cdef object h
    _put_u32(p, <uint32_t>len(payloads))
    p += 4
    for i in range(len(payloads)):
        h = None if headers is None else headers[i]
        if h is None:
            _put_u16(p, 0)
            p += 2
        else:
            _put_u16(p, <uint16_t>len(<dict>h))
            p += 2
            for hk, hv in (<dict>h).items():
                # Already validated by _header_list, so these cannot fail.
                k = PyUnicode_AsUTF8AndSize(hk, &nk)
                v = PyUnicode_AsUTF8AndSize(hv, &nv)
                p = _write_str(p, k, nk)
                p = _write_str(p, v, nv)
        p = _write_blob(p, <bytes>payloads[i])
    return p


cdef bytes _encode_cache(int opcode, object request_id, object tenant_id, object namespace,
                         object cache, object key, object value, uint64_t ttl_ms, int mode):
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef Py_ssize_t nt, nn, nc, nk
    cdef const char* t = _short_str(tenant_id, &nt, "tenant_id")
    cdef const char* n = _short_str(namespace, &nn, "namespace")
    cdef const char* c = _short_str(cache, &nc, "cache")
    cdef const char* k = _short_str(key, &nk, "key")
    cdef bytes val = None
    cdef Py_ssize_t body = 8 + nt + nn + nc + nk
    if opcode == 0x02:
        val = _as_bytes(value, "value")
        if PyBytes_GET_SIZE(val) > _U32_MAX:
            raise LocalProtocolError("value exceeds the u32 length field")
        body += 1 + 8 + 4 + PyBytes_GET_SIZE(val)
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, opcode, rid)
    p = _write_str(p, t, nt)
    p = _write_str(p, n, nn)
    p = _write_str(p, c, nc)
    p = _write_str(p, k, nk)
    if opcode == 0x02:
        p[0] = <unsigned char>mode
        _put_u64(p + 1, ttl_ms)
        _write_blob(p + 9, val)
    return out


def encode_cache_get(request_id, tenant_id, namespace, cache, key):
    """OP_CACHE_GET request frame."""
    return _encode_cache(0x01, request_id, tenant_id, namespace, cache, key, None, 0, 0)


def encode_cache_delete(request_id, tenant_id, namespace, cache, key):
    """OP_CACHE_DELETE request frame."""
    return _encode_cache(0x03, request_id, tenant_id, namespace, cache, key, None, 0, 0)


def encode_cache_ttl(request_id, tenant_id, namespace, cache, key):
    """OP_CACHE_TTL request frame."""
    return _encode_cache(0x04, request_id, tenant_id, namespace, cache, key, None, 0, 0)


def encode_cache_set(request_id, tenant_id, namespace, cache, key, value, *, ttl_ms=0, mode=SET_ALWAYS):
    """OP_CACHE_SET request frame; ``ttl_ms`` 0 means no TTL, ``mode`` one of SET_*."""
    if mode not in (0, 1, 2):
        raise LocalProtocolError(f"unknown cache set mode {mode!r}")
    return _encode_cache(0x02, request_id, tenant_id, namespace, cache, key, value,
                         _u64_arg(ttl_ms, "ttl_ms"), mode)


def encode_publish(request_id, tenant_id, namespace, stream, payloads, *, ack=ACK_PER_BATCH, headers=None):
    """OP_PUBLISH request frame; ``headers`` is None or one dict[str, str] (or None) per payload."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    if ack not in (0, 1, 2):
        raise LocalProtocolError(f"unknown ack mode {ack!r}")
    cdef Py_ssize_t nt, nn, ns, plen, hlen
    cdef const char* t = _short_str(tenant_id, &nt, "tenant_id")
    cdef const char* n = _short_str(namespace, &nn, "namespace")
    cdef const char* s = _short_str(stream, &ns, "stream")
    cdef list items = _payload_list(payloads, &plen)
    cdef list hdrs = _header_list(headers, len(items), &hlen)
    # _payload_list counted 4 + (4 + len) per payload; records add a u16 header count each.
    cdef Py_ssize_t body = 6 + nt + nn + ns + 1 + plen + 2 * len(items) + hlen
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, 0x10, rid)
    p = _write_str(p, t, nt)
    p = _write_str(p, n, nn)
    p = _write_str(p, s, ns)
    p[0] = <unsigned char>ack
    _write_records(p + 1, items, hdrs)
    return out


def encode_subscribe(request_id, tenant_id, namespace, stream, subscription_id, *, start="latest", credit=0):
    """OP_SUBSCRIBE request frame; ``credit`` 0 asks for the broker's default window."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t sid = _u64_arg(subscription_id, "subscription_id")
    cdef uint32_t cr = _u32_arg(credit, "credit")
    cdef int kind
    cdef uint64_t off = 0
    if start == "latest" and isinstance(start, str):
        kind = 0
    elif start == "earliest" and isinstance(start, str):
        kind = 1
    elif isinstance(start, int) and not isinstance(start, bool):
        kind = 2
        off = _u64_arg(start, "start offset")
    elif type(start) is StartAtTime:
        kind = 3
        off = (<StartAtTime>start).timestamp_us
    else:
        raise LocalProtocolError(
            f"start must be 'latest', 'earliest', an int offset or a StartAtTime, not {start!r}")
    cdef Py_ssize_t nt, nn, ns
    cdef const char* t = _short_str(tenant_id, &nt, "tenant_id")
    cdef const char* n = _short_str(namespace, &nn, "namespace")
    cdef const char* s = _short_str(stream, &ns, "stream")
    cdef Py_ssize_t body = 6 + nt + nn + ns + 8 + 1 + 8 + 4
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, 0x11, rid)
    p = _write_str(p, t, nt)
    p = _write_str(p, n, nn)
    p = _write_str(p, s, ns)
    _put_u64(p, sid)
    p[8] = <unsigned char>kind
    _put_u64(p + 9, off)
    _put_u32(p + 17, cr)
    return out


cdef bytes _encode_sub_op(int opcode, object request_id, object subscription_id, object credit):
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t sid = _u64_arg(subscription_id, "subscription_id")
    cdef uint32_t cr = _u32_arg(credit, "credit")
    cdef Py_ssize_t body = 8 + (4 if opcode == 0x12 else 0)
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, opcode, rid)
    _put_u64(p, sid)
    if opcode == 0x12:
        _put_u32(p + 8, cr)
    return out


def encode_credit(request_id, subscription_id, credit):
    """OP_CREDIT: allow ``credit`` more records on the subscription."""
    return _encode_sub_op(0x12, request_id, subscription_id, credit)


def encode_unsubscribe(request_id, subscription_id):
    """OP_UNSUBSCRIBE."""
    return _encode_sub_op(0x13, request_id, subscription_id, 0)


cdef bytes _encode_str_body(int opcode, object request_id, object text, str what):
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef Py_ssize_t n
    cdef const char* s = _short_str(text, &n, what)
    cdef bytes out = _alloc_frame(9 + 2 + n)
    _write_str(_ext_start(out, 2 + n, opcode, rid), s, n)
    return out


def encode_reauth(request_id, token):
    """OP_REAUTH: present a fresh token on a live connection."""
    return _encode_str_body(0x30, request_id, token, "token")


cdef bytes _encode_empty(int opcode, object request_id):
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef bytes out = _alloc_frame(9)
    _ext_start(out, 0, opcode, rid)
    return out


def encode_ping(request_id):
    """OP_PING: answered with OP_OK."""
    return _encode_empty(0x31, request_id)


def encode_ok(request_id):
    """OP_OK: generic success for requests without a payload in the answer."""
    return _encode_empty(0x80, request_id)


def encode_cache_value(request_id, value):
    """OP_CACHE_VALUE: ``value`` bytes, or None for a miss."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef bytes val = None if value is None else _as_bytes(value, "value")
    cdef Py_ssize_t body = 1 + (0 if val is None else 4 + PyBytes_GET_SIZE(val))
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, 0x81, rid)
    p[0] = 0 if val is None else 1
    if val is not None:
        _write_blob(p + 1, val)
    return out


cdef bytes _encode_flag(int opcode, object request_id, bint flag):
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef bytes out = _alloc_frame(10)
    cdef unsigned char* p = _ext_start(out, 1, opcode, rid)
    p[0] = 1 if flag else 0
    return out


def encode_cache_stored(request_id, bint stored):
    """OP_CACHE_STORED: whether a set stored its value."""
    return _encode_flag(0x82, request_id, stored)


def encode_cache_deleted(request_id, bint existed):
    """OP_CACHE_DELETED: whether the deleted key existed."""
    return _encode_flag(0x83, request_id, existed)


def encode_cache_ttl_reply(request_id, int state, ttl_ms=0):
    """OP_CACHE_TTL_REPLY: TTL_MISSING / TTL_PERSISTENT / TTL_EXPIRING with ``ttl_ms`` left."""
    if state not in (0, 1, 2):
        raise LocalProtocolError(f"unknown TTL state {state}")
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t ttl = _u64_arg(ttl_ms, "ttl_ms")
    cdef bytes out = _alloc_frame(9 + 9)
    cdef unsigned char* p = _ext_start(out, 9, 0x84, rid)
    p[0] = <unsigned char>state
    _put_u64(p + 1, ttl)
    return out


cdef bytes _encode_two_u64(int opcode, object request_id, object a, str wa, object b, str wb):
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t x = _u64_arg(a, wa)
    cdef uint64_t y = _u64_arg(b, wb)
    cdef bytes out = _alloc_frame(9 + 16)
    cdef unsigned char* p = _ext_start(out, 16, opcode, rid)
    _put_u64(p, x)
    _put_u64(p + 8, y)
    return out


def encode_publish_offsets(request_id, base_offset, count, durability=DURABILITY_MEMORY):
    """OP_PUBLISH_OFFSETS: the acked batch holds offsets base_offset .. base_offset + count - 1,
    kept as ``durability`` promises (DURABILITY_MEMORY / WRITTEN / SYNCED)."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t base = _u64_arg(base_offset, "base_offset")
    cdef uint32_t n = _u32_arg(count, "count")
    if isinstance(durability, bool) or not isinstance(durability, int) or not 0 <= durability <= 2:
        raise LocalProtocolError(f"unknown durability {durability!r}")
    cdef bytes out = _alloc_frame(9 + 13)
    cdef unsigned char* p = _ext_start(out, 13, 0x90, rid)
    _put_u64(p, base)
    _put_u32(p + 8, n)
    p[12] = <unsigned char>durability
    return out


def encode_subscribed(request_id, subscription_id, start_offset):
    """OP_SUBSCRIBED: the subscription delivers from ``start_offset``."""
    return _encode_two_u64(0x91, request_id, subscription_id, "subscription_id",
                           start_offset, "start_offset")


def encode_events(base_offset, payloads, *, headers=None):
    """OP_EVENTS: one buffer for every subscriber of a stream (request_id is 0)."""
    cdef uint64_t base = _u64_arg(base_offset, "base_offset")
    cdef Py_ssize_t plen, hlen
    cdef list items = _payload_list(payloads, &plen)
    cdef list hdrs = _header_list(headers, len(items), &hlen)
    cdef Py_ssize_t body = 8 + plen + 2 * len(items) + hlen
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, 0x92, 0)
    _put_u64(p, base)
    _write_records(p + 8, items, hdrs)
    return out


def encode_slow_consumer(subscription_id, first_dropped, dropped):
    """OP_SLOW_CONSUMER: ``dropped`` records from ``first_dropped`` on were lost to the policy."""
    return _encode_two_u64(0x93, subscription_id, first_dropped, "first_dropped",
                           dropped, "dropped")


cdef bytes _encode_code_message(int opcode, object request_id, object code, object message):
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint16_t c = _u16_arg(code, "code")
    cdef Py_ssize_t n
    cdef const char* m = _short_str(message, &n, "message")
    cdef bytes out = _alloc_frame(9 + 4 + n)
    cdef unsigned char* p = _ext_start(out, 4 + n, opcode, rid)
    _put_u16(p, c)
    _write_str(p + 2, m, n)
    return out


def encode_error(request_id, code, message):
    """OP_ERROR: the request failed with wire error ``code`` (felix.errors) and ``message``."""
    return _encode_code_message(0xE0, request_id, code, message)


def encode_subscription_end(subscription_id, code, message):
    """OP_SUBSCRIPTION_END: the broker ended the subscription (stream deleted, too slow, ...)."""
    return _encode_code_message(0x94, subscription_id, code, message)


def encode_cursor_error(request_id, reason, requested, available):
    """OP_CURSOR_ERROR: a subscribe's start cannot be served."""
    if reason not in _CURSOR_CODES:
        raise LocalProtocolError(f"unknown cursor error reason {reason!r}")
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t req = _u64_arg(requested, "requested")
    cdef uint64_t av = _u64_arg(available, "available")
    cdef bytes out = _alloc_frame(9 + 17)
    cdef unsigned char* p = _ext_start(out, 17, 0xE1, rid)
    p[0] = <unsigned char>_CURSOR_CODES[reason]
    _put_u64(p + 1, req)
    _put_u64(p + 9, av)
    return out


def encode_redirect(request_id, shard, epoch, owner):
    """OP_REDIRECT: retry against ``owner`` (host:port), which holds ``shard`` at ``epoch``."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint32_t sh = _u32_arg(shard, "shard")
    cdef uint64_t ep = _u64_arg(epoch, "epoch")
    cdef Py_ssize_t n
    cdef const char* o = _short_str(owner, &n, "owner")
    cdef bytes out = _alloc_frame(9 + 14 + n)
    cdef unsigned char* p = _ext_start(out, 14 + n, 0xE2, rid)
    _put_u32(p, sh)
    _put_u64(p + 4, ep)
    _write_str(p + 12, o, n)
    return out


def encode_shard_map_request(request_id):
    """OP_SHARD_MAP: ask the node for the cluster's shard map (answered with SHARD_MAP_REPLY)."""
    return _encode_empty(0x32, request_id)


def encode_shard_map(request_id, logical_shards, version, addresses, owners, epochs):
    """OP_SHARD_MAP_REPLY: ``addresses`` (host:port) of the nodes, and per logical shard its
    owner (an index into ``addresses``, or SHARD_NO_OWNER) and epoch. A node that is
    not in a cluster answers ``logical_shards`` 0, ``version`` 0 and no nodes or shards."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint32_t nshards = _u32_arg(logical_shards, "logical_shards")
    cdef uint64_t ver = _u64_arg(version, "version")
    cdef list addrs = _as_list(addresses, "addresses")
    cdef list owns = _as_list(owners, "owners")
    cdef list eps = _as_list(epochs, "epochs")
    cdef Py_ssize_t nn = len(addrs), i, na
    cdef const char* a
    cdef uint16_t o
    if nshards > _MAX_LOGICAL_SHARDS:
        raise LocalProtocolError(
            f"{nshards} logical shards exceed the limit of {_MAX_LOGICAL_SHARDS}")
    if nn > _MAX_MAP_NODES:
        raise LocalProtocolError(f"{nn} nodes exceed the limit of {_MAX_MAP_NODES}")
    if len(owns) != nshards or len(eps) != nshards:
        raise LocalProtocolError(
            f"owners ({len(owns)}) and epochs ({len(eps)}) must list all {nshards} logical shards")
    cdef Py_ssize_t body = 4 + 8 + 2 + 4 + 10 * <Py_ssize_t>nshards
    for i in range(nn):
        _short_str(addrs[i], &na, "address")
        body += 2 + na
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, 0x85, rid)
    cdef unsigned char* end = p + body
    _put_u32(p, nshards)
    _put_u64(p + 4, ver)
    _put_u16(p + 12, <uint16_t>nn)
    p += 14
    for i in range(nn):
        a = _short_str(addrs[i], &na, "address")
        p = _write_str(_room(p, end, 2 + na), a, na)
    _put_u32(_room(p, end, 4), nshards)
    p += 4
    for i in range(nshards):
        o = _u16_arg(owns[i], "owner")
        if o >= nn and o != 0xFFFF:
            raise LocalProtocolError(
                f"shard {i}'s owner {o} is not an index into the {nn} addresses")
        _put_u16(_room(p, end, 10), o)
        _put_u64(p + 2, _u64_arg(eps[i], "epoch"))
        p += 10
    if p != end:
        raise LocalProtocolError("shard map changed while being encoded")
    return out


# --- queue groups (docs/wire-protocol.md, "Queue groups") ----------------------------------

# A settle names at most this many ranges: a bound on what one frame makes the shard do.
cdef Py_ssize_t _MAX_RANGES = 1024
# A DELIVERIES record is at least offset, timestamp, attempts, failures, a header
# count and a payload length.
cdef Py_ssize_t _MIN_DELIVERY = 8 + 8 + 4 + 4 + 2 + 4


cdef inline int _role_arg(object role) except -1:
    if isinstance(role, bool) or not isinstance(role, int) or not 0 <= role <= 2:
        raise LocalProtocolError(f"unknown consumer role {role!r}")
    return <int>role


cdef inline list _as_list(object items, str what):
    if type(items) is list:
        return <list>items
    if isinstance(items, (str, bytes, bytearray, memoryview)) or items is None:
        raise LocalProtocolError(f"{what} must be a sequence, not {type(items).__name__}")
    try:
        return list(items)
    except TypeError:
        raise LocalProtocolError(f"{what} must be a sequence, not {type(items).__name__}") from None


cdef inline tuple _pair(object item, str what):
    if type(item) is not tuple:
        if not isinstance(item, (tuple, list)):
            raise LocalProtocolError(f"each of {what} must be a pair, not {item!r}")
        item = tuple(item)
    if len(<tuple>item) != 2:
        raise LocalProtocolError(f"each of {what} must be a pair, not {item!r}")
    return <tuple>item


def encode_consume(request_id, tenant_id, namespace, stream, group, consumer_id, *,
                   credit_records=0, credit_bytes=0):
    """OP_CONSUME request frame; a credit of 0 asks for the broker's default."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t cid = _u64_arg(consumer_id, "consumer_id")
    cdef uint32_t cr = _u32_arg(credit_records, "credit_records")
    cdef uint32_t cb = _u32_arg(credit_bytes, "credit_bytes")
    cdef Py_ssize_t nt, nn, ns, ng
    cdef const char* t = _short_str(tenant_id, &nt, "tenant_id")
    cdef const char* n = _short_str(namespace, &nn, "namespace")
    cdef const char* s = _short_str(stream, &ns, "stream")
    cdef const char* g = _short_str(group, &ng, "group")
    cdef Py_ssize_t body = 8 + nt + nn + ns + ng + 8 + 4 + 4
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, 0x20, rid)
    p = _write_str(p, t, nt)
    p = _write_str(p, n, nn)
    p = _write_str(p, s, ns)
    p = _write_str(p, g, ng)
    _put_u64(p, cid)
    _put_u32(p + 8, cr)
    _put_u32(p + 12, cb)
    return out


def encode_consumer_window(request_id, consumer_id, credit_records, credit_bytes):
    """OP_CONSUMER_WINDOW: replace the consumer's window (0: the broker's default)."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t cid = _u64_arg(consumer_id, "consumer_id")
    cdef uint32_t cr = _u32_arg(credit_records, "credit_records")
    cdef uint32_t cb = _u32_arg(credit_bytes, "credit_bytes")
    cdef bytes out = _alloc_frame(9 + 16)
    cdef unsigned char* p = _ext_start(out, 16, 0x21, rid)
    _put_u64(p, cid)
    _put_u32(p + 8, cr)
    _put_u32(p + 12, cb)
    return out


def encode_settle(opcode, request_id, consumer_id, ranges, *, delay_ms=0, detail=""):
    """OP_ACK / NAK / RELEASE / IN_PROGRESS / TERM of ``ranges``: 1..1024 (first, count) pairs,
    count >= 1. Senders put 0 / "" in ``delay_ms`` / ``detail`` where the opcode has no use for them."""
    if isinstance(opcode, bool) or not isinstance(opcode, int) or not 0x22 <= opcode <= 0x26:
        raise LocalProtocolError(f"not a settle opcode: {opcode!r}")
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t cid = _u64_arg(consumer_id, "consumer_id")
    cdef uint32_t delay = _u32_arg(delay_ms, "delay_ms")
    cdef Py_ssize_t nd
    cdef const char* d = _short_str(detail, &nd, "detail")
    cdef list items = _as_list(ranges, "ranges")
    cdef Py_ssize_t nr = len(items), i
    if nr < 1 or nr > _MAX_RANGES:
        raise LocalProtocolError(f"a settle names 1..{_MAX_RANGES} ranges, not {nr}")
    cdef Py_ssize_t body = 8 + 4 + 2 + nd + 2 + 12 * nr
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, <int>opcode, rid)
    cdef tuple r
    cdef uint64_t first
    cdef uint32_t count
    _put_u64(p, cid)
    _put_u32(p + 8, delay)
    p = _write_str(p + 12, d, nd)
    _put_u16(p, <uint16_t>nr)
    p += 2
    # The size is known from the count: validate each range as it is written (a
    # refused one discards the frame).
    for i in range(nr):
        r = _pair(items[i], "ranges")
        first = _u64_arg(r[0], "range first")
        count = _u32_arg(r[1], "range count")
        if count == 0:
            raise LocalProtocolError(f"range at {first} has count 0")
        if first > 0xFFFFFFFFFFFFFFFF - count:
            raise LocalProtocolError(f"range {first} + {count} overflows u64")
        _put_u64(p, first)
        _put_u32(p + 8, count)
        p += 12
    return out


def encode_ack(request_id, consumer_id, ranges):
    """OP_ACK: the records are done."""
    return encode_settle(0x22, request_id, consumer_id, ranges)


def encode_nak(request_id, consumer_id, ranges, *, delay_ms=NAK_BACKOFF, detail=""):
    """OP_NAK: retry after ``delay_ms`` (NAK_BACKOFF: the group's backoff); ``detail``: error text."""
    return encode_settle(0x23, request_id, consumer_id, ranges, delay_ms=delay_ms, detail=detail)


def encode_release(request_id, consumer_id, ranges):
    """OP_RELEASE: not processed; available again at once, no failure counted."""
    return encode_settle(0x24, request_id, consumer_id, ranges)


def encode_in_progress(request_id, consumer_id, ranges):
    """OP_IN_PROGRESS: extend the leases by the group's lease_ms from now."""
    return encode_settle(0x25, request_id, consumer_id, ranges)


def encode_term(request_id, consumer_id, ranges, *, detail=""):
    """OP_TERM: dead-letter the records now, ``detail`` as the reason."""
    return encode_settle(0x26, request_id, consumer_id, ranges, detail=detail)


def encode_stop_consume(request_id, consumer_id):
    """OP_STOP_CONSUME: stop the consumer gracefully."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t cid = _u64_arg(consumer_id, "consumer_id")
    cdef bytes out = _alloc_frame(9 + 8)
    _put_u64(_ext_start(out, 8, 0x27, rid), cid)
    return out


def encode_consuming(request_id, consumer_id, role):
    """OP_CONSUMING: the consumer joined its group with ``role`` (ROLE_*)."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef uint64_t cid = _u64_arg(consumer_id, "consumer_id")
    cdef int ro = _role_arg(role)
    cdef bytes out = _alloc_frame(9 + 9)
    cdef unsigned char* p = _ext_start(out, 9, 0xA0, rid)
    _put_u64(p, cid)
    p[8] = <unsigned char>ro
    return out


cdef inline uint64_t _u64_fast(object v, str what) except? 0:
    # The hot path's ints are exact ints in range: convert them in C, and leave every
    # other case (and the error message) to _u64_arg.
    if type(v) is int:
        try:
            return <uint64_t>v
        except OverflowError:
            pass
    return _u64_arg(v, what)


cdef inline uint32_t _u32_fast(object v, str what) except? 0:
    if type(v) is int:
        try:
            return <uint32_t>v
        except OverflowError:
            pass
    return _u32_arg(v, what)


cdef inline unsigned char* _room(unsigned char* p, unsigned char* end, Py_ssize_t n) except NULL:
    # Only reachable if a record was changed between sizing and filling (Python code
    # run by a payload's __bytes__, a dict subclass's __len__): never write past the end.
    if n > end - p:
        raise LocalProtocolError("deliveries changed while being encoded")
    return p


def encode_deliveries(consumer_id, records):
    """OP_DELIVERIES for one consumer: ``records`` are (offset, timestamp_us, attempts,
    failures, headers or None, payload) tuples."""
    cdef uint64_t cid = _u64_arg(consumer_id, "consumer_id")
    # A private list: Python code run while sizing (a payload's __bytes__) cannot swap
    # a record between the two passes.
    cdef list items = list(<list>records) if type(records) is list else _as_list(records, "records")
    cdef Py_ssize_t n = len(items), i, nk, nv, pos
    cdef Py_ssize_t body = 4 + _MIN_DELIVERY * n
    cdef list pays = None
    cdef object rec, h, pay
    cdef PyObject* pk
    cdef PyObject* pv
    cdef const char* k
    cdef const char* v
    if n > _U32_MAX:
        raise LocalProtocolError("too many records for the u32 count")
    # Pass 1: validate and size.
    for i in range(n):
        rec = items[i]
        if not isinstance(rec, tuple) or len(<tuple>rec) != 6:
            raise LocalProtocolError(
                "each delivery must be an (offset, timestamp_us, attempts, failures, "
                f"headers, payload) tuple, not {rec!r}")
        _u64_fast((<tuple>rec)[0], "offset")
        _u64_fast((<tuple>rec)[1], "timestamp_us")
        _u32_fast((<tuple>rec)[2], "attempts")
        _u32_fast((<tuple>rec)[3], "failures")
        h = (<tuple>rec)[4]
        if h is not None:
            if not isinstance(h, dict):
                raise LocalProtocolError(f"headers must be a dict or None, not {type(h).__name__}")
            if PyDict_Size(h) > _U16_MAX:
                raise LocalProtocolError("too many headers on one record")
            # PyDict_Next and PyDict_Size read the dict itself, so a subclass cannot
            # answer differently here and in pass 2.
            pos = 0
            while PyDict_Next(h, &pos, &pk, &pv):
                _short_str(<object>pk, &nk, "header name")
                _short_str(<object>pv, &nv, "header value")
                body += 4 + nk + nv
        pay = (<tuple>rec)[5]
        if type(pay) is not bytes:
            pay = _as_bytes(pay, "payload")
            if pays is None:
                pays = [(<tuple>items[j])[5] for j in range(i)]
        if pays is not None:
            pays.append(pay)
        if PyBytes_GET_SIZE(<bytes>pay) > _U32_MAX:
            raise LocalProtocolError("payload exceeds the u32 length field")
        body += PyBytes_GET_SIZE(<bytes>pay)
    # Pass 2: fill.
    cdef bytes out = _alloc_frame(9 + body)
    cdef unsigned char* p = _ext_start(out, body, 0xA1, cid)
    cdef unsigned char* end = p + body
    _put_u32(p, <uint32_t>n)
    p += 4
    for i in range(n):
        rec = items[i]
        _room(p, end, 26)
        _put_u64(p, <uint64_t>(<tuple>rec)[0])
        _put_u64(p + 8, <uint64_t>(<tuple>rec)[1])
        _put_u32(p + 16, <uint32_t>(<tuple>rec)[2])
        _put_u32(p + 20, <uint32_t>(<tuple>rec)[3])
        h = (<tuple>rec)[4]
        if h is None:
            _put_u16(p + 24, 0)
            p += 26
        else:
            _put_u16(p + 24, <uint16_t>PyDict_Size(h))
            p += 26
            pos = 0
            while PyDict_Next(h, &pos, &pk, &pv):
                k = _short_str(<object>pk, &nk, "header name")
                v = _short_str(<object>pv, &nv, "header value")
                p = _write_str(_room(p, end, 4 + nk + nv), k, nk)
                p = _write_str(p, v, nv)
        pay = (<tuple>rec)[5] if pays is None else pays[i]
        p = _write_blob(_room(p, end, 4 + PyBytes_GET_SIZE(<bytes>pay)), <bytes>pay)
    if p != end:
        raise LocalProtocolError("deliveries changed while being encoded")
    return out


def encode_settled(request_id, refused=()):
    """OP_SETTLED: the settle was applied, except for ``refused`` ((offset, REFUSED_*) pairs)."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef list items = _as_list(refused, "refused")
    cdef Py_ssize_t n = len(items), i
    if n > _U16_MAX:
        raise LocalProtocolError(f"{n} refused offsets exceed the u16 count")
    cdef bytes out = _alloc_frame(9 + 2 + 9 * n)
    cdef unsigned char* p = _ext_start(out, 2 + 9 * n, 0xA2, rid)
    cdef tuple r
    _put_u16(p, <uint16_t>n)
    p += 2
    for i in range(n):
        r = _pair(items[i], "refused")
        _put_u64(p, _u64_arg(r[0], "refused offset"))
        if isinstance(r[1], bool) or not isinstance(r[1], int) or not 1 <= r[1] <= 3:
            raise LocalProtocolError(f"unknown refusal reason {r[1]!r}")
        p[8] = <unsigned char>r[1]
        p += 9
    return out


def encode_consumer_end(consumer_id, code, message):
    """OP_CONSUMER_END: the broker ended the consumer (wire error ``code``, ``message``)."""
    return _encode_code_message(0xA3, consumer_id, code, message)


def encode_consumer_role(consumer_id, role):
    """OP_CONSUMER_ROLE: the consumer's role in its exclusive group changed (ROLE_*)."""
    cdef uint64_t cid = _u64_arg(consumer_id, "consumer_id")
    cdef int ro = _role_arg(role)
    cdef bytes out = _alloc_frame(9 + 1)
    _ext_start(out, 1, 0xA4, cid)[0] = <unsigned char>ro
    return out

# --- decoding -----------------------------------------------------------------------------

cdef object _read_records(Cursor* c, list payloads):
    """Read a record list into ``payloads``; returns the headers list, or None if none had any."""
    cdef uint32_t count = _read_u32(c, "record count")
    cdef uint32_t i
    cdef uint16_t nh, j
    cdef list headers = None
    cdef dict h
    # Each record is at least a u16 header count and a u32 payload length.
    if <uint64_t>count * 6 > <uint64_t>(c.end - c.pos):
        raise RemoteProtocolError(f"record count {count} cannot fit in the {c.end - c.pos} bytes left")
    for i in range(count):
        nh = _read_u16(c, "header count")
        if nh:
            if <uint64_t>nh * 4 > <uint64_t>(c.end - c.pos):
                raise RemoteProtocolError(f"header count {nh} cannot fit in the bytes left")
            h = {}
            for j in range(nh):
                k = _read_str(c, "header name")
                h[k] = _read_str(c, "header value")
            if headers is None:
                headers = [None] * i
            headers.append(h)
        elif headers is not None:
            headers.append(None)
        payloads.append(_read_blob(c, "payload"))
    return headers


cdef ExtMessage _decode_cache_request(Cursor* c, int opcode):
    cdef CacheRequest m = CacheRequest.__new__(CacheRequest)
    m.tenant_id = _read_str(c, "tenant_id")
    m.namespace = _read_str(c, "namespace")
    m.cache = _read_str(c, "cache")
    m.key = _read_str(c, "key")
    m.ttl_ms = 0
    m.mode = 0
    if opcode == 0x02:
        m.mode = _read_u8(c, "set mode")
        if m.mode > 2:
            raise RemoteProtocolError(f"unknown cache set mode {m.mode}")
        m.ttl_ms = _read_u64(c, "ttl_ms")
        m.value = _read_blob(c, "value")
    return m


cdef ExtMessage _decode_publish(Cursor* c):
    cdef Publish m = Publish.__new__(Publish)
    m.tenant_id = _read_str(c, "tenant_id")
    m.namespace = _read_str(c, "namespace")
    m.stream = _read_str(c, "stream")
    m.ack = _read_u8(c, "ack mode")
    if m.ack > 2:
        raise RemoteProtocolError(f"unknown ack mode {m.ack}")
    m.payloads = []
    m.headers = _read_records(c, m.payloads)
    return m


cdef ExtMessage _decode_subscribe(Cursor* c):
    cdef Subscribe m = Subscribe.__new__(Subscribe)
    m.tenant_id = _read_str(c, "tenant_id")
    m.namespace = _read_str(c, "namespace")
    m.stream = _read_str(c, "stream")
    m.subscription_id = _read_u64(c, "subscription id")
    cdef uint8_t kind = _read_u8(c, "start kind")
    cdef uint64_t off = _read_u64(c, "start offset")
    if kind == 0:
        m.start = "latest"
    elif kind == 1:
        m.start = "earliest"
    elif kind == 2:
        m.start = off
    elif kind == 3:
        m.start = StartAtTime.__new__(StartAtTime)
        (<StartAtTime>m.start).timestamp_us = off
    else:
        raise RemoteProtocolError(f"unknown start kind {kind}")
    m.credit = _read_u32(c, "credit")
    return m



cdef ExtMessage _decode_consume(Cursor* c):
    cdef Consume m = Consume.__new__(Consume)
    m.tenant_id = _read_str(c, "tenant_id")
    m.namespace = _read_str(c, "namespace")
    m.stream = _read_str(c, "stream")
    m.group = _read_str(c, "group")
    m.consumer_id = _read_u64(c, "consumer id")
    m.credit_records = _read_u32(c, "credit records")
    m.credit_bytes = _read_u32(c, "credit bytes")
    return m


cdef ExtMessage _decode_settle(Cursor* c):
    cdef Settle m = Settle.__new__(Settle)
    cdef uint16_t n, i
    cdef uint64_t first
    cdef uint32_t count
    m.consumer_id = _read_u64(c, "consumer id")
    m.delay_ms = _read_u32(c, "delay_ms")
    m.detail = _read_str(c, "detail")
    n = _read_u16(c, "range count")
    if n == 0 or n > _MAX_RANGES:
        raise RemoteProtocolError(f"a settle names 1..{_MAX_RANGES} ranges, not {n}")
    if <Py_ssize_t>n * 12 > c.end - c.pos:
        raise RemoteProtocolError(f"range count {n} cannot fit in the {c.end - c.pos} bytes left")
    m.ranges = []
    for i in range(n):
        first = _read_u64(c, "range first")
        count = _read_u32(c, "range count")
        if count == 0:
            raise RemoteProtocolError(f"range at {first} has count 0")
        if first > 0xFFFFFFFFFFFFFFFF - count:
            raise RemoteProtocolError(f"range {first} + {count} overflows u64")
        m.ranges.append((first, count))
    return m


cdef ExtMessage _decode_deliveries(Cursor* c):
    cdef Deliveries m = Deliveries.__new__(Deliveries)
    cdef uint32_t count = _read_u32(c, "delivery count")
    cdef uint32_t i
    cdef uint16_t nh, j
    cdef Delivery d
    cdef dict h
    if <uint64_t>count * _MIN_DELIVERY > <uint64_t>(c.end - c.pos):
        raise RemoteProtocolError(f"delivery count {count} cannot fit in the {c.end - c.pos} bytes left")
    m.records = []
    for i in range(count):
        d = Delivery.__new__(Delivery)
        d.offset = _read_u64(c, "offset")
        d.timestamp_us = _read_u64(c, "timestamp_us")
        d.attempts = _read_u32(c, "attempts")
        d.failures = _read_u32(c, "failures")
        nh = _read_u16(c, "header count")
        if nh:
            if <uint64_t>nh * 4 > <uint64_t>(c.end - c.pos):
                raise RemoteProtocolError(f"header count {nh} cannot fit in the bytes left")
            h = {}
            for j in range(nh):
                k = _read_str(c, "header name")
                h[k] = _read_str(c, "header value")
            d.headers = h
        d.payload = _read_blob(c, "payload")
        m.records.append(d)
    return m


cdef ExtMessage _decode_settled(Cursor* c):
    cdef Settled m = Settled.__new__(Settled)
    cdef uint16_t n = _read_u16(c, "refused count")
    cdef uint16_t i
    cdef uint64_t off
    cdef uint8_t reason
    if <Py_ssize_t>n * 9 > c.end - c.pos:
        raise RemoteProtocolError(f"refused count {n} cannot fit in the {c.end - c.pos} bytes left")
    m.refused = []
    for i in range(n):
        off = _read_u64(c, "refused offset")
        reason = _read_u8(c, "refusal reason")
        if reason < 1 or reason > 3:
            raise RemoteProtocolError(f"unknown refusal reason {reason}")
        m.refused.append((off, reason))
    return m


cdef ExtMessage _decode_shard_map(Cursor* c):
    cdef ShardMap m = ShardMap.__new__(ShardMap)
    cdef uint32_t nshards = _read_u32(c, "logical shards")
    cdef uint32_t count, i
    cdef uint16_t nn, j, o
    if nshards > _MAX_LOGICAL_SHARDS:
        raise RemoteProtocolError(
            f"{nshards} logical shards exceed the limit of {_MAX_LOGICAL_SHARDS}")
    m.logical_shards = nshards
    m.version = _read_u64(c, "shard map version")
    nn = _read_u16(c, "node count")
    if nn > _MAX_MAP_NODES:
        raise RemoteProtocolError(f"{nn} nodes exceed the limit of {_MAX_MAP_NODES}")
    # Each address is at least its u16 length.
    if <Py_ssize_t>nn * 2 > c.end - c.pos:
        raise RemoteProtocolError(f"node count {nn} cannot fit in the {c.end - c.pos} bytes left")
    m.addresses = []
    for j in range(nn):
        m.addresses.append(_read_str(c, "node address"))
    count = _read_u32(c, "shard count")
    if count != nshards:
        raise RemoteProtocolError(f"shard count {count} differs from logical shards {nshards}")
    if <Py_ssize_t>count * 10 > c.end - c.pos:
        raise RemoteProtocolError(f"shard count {count} cannot fit in the {c.end - c.pos} bytes left")
    m.owners = []
    m.epochs = []
    for i in range(count):
        o = _read_u16(c, "shard owner")
        if o >= nn and o != 0xFFFF:
            raise RemoteProtocolError(f"shard {i}'s owner {o} is not one of the {nn} nodes")
        m.owners.append(o)
        m.epochs.append(_read_u64(c, "shard epoch"))
    return m


cdef inline int _read_role(Cursor* c) except -1:
    cdef uint8_t role = _read_u8(c, "role")
    if role > 2:
        raise RemoteProtocolError(f"unknown consumer role {role}")
    return role

cdef ExtMessage _decode_ext_body(Cursor* c, int opcode, uint64_t rid):
    cdef ExtMessage m
    cdef SubscriptionOp so
    cdef Reauth ra
    cdef CacheValue cv
    cdef CacheResult cr
    cdef CacheTtlReply ct
    cdef PublishOffsets po
    cdef Subscribed sb
    cdef Events ev
    cdef SlowConsumerNotice sc
    cdef ErrorReply er
    cdef CursorErrorReply ce
    cdef Redirect rd
    cdef ConsumerWindow cw
    cdef ConsumerOp co
    cdef Consuming cg
    cdef ConsumerRole crl
    cdef uint8_t b
    if 0x01 <= opcode <= 0x04:
        m = _decode_cache_request(c, opcode)
    elif opcode == 0x10:
        m = _decode_publish(c)
    elif opcode == 0x11:
        m = _decode_subscribe(c)
    elif opcode == 0x12 or opcode == 0x13:
        so = SubscriptionOp.__new__(SubscriptionOp)
        so.subscription_id = _read_u64(c, "subscription id")
        so.credit = _read_u32(c, "credit") if opcode == 0x12 else 0
        m = so
    elif opcode == 0x20:
        m = _decode_consume(c)
    elif opcode == 0x21:
        cw = ConsumerWindow.__new__(ConsumerWindow)
        cw.consumer_id = _read_u64(c, "consumer id")
        cw.credit_records = _read_u32(c, "credit records")
        cw.credit_bytes = _read_u32(c, "credit bytes")
        m = cw
    elif 0x22 <= opcode <= 0x26:
        m = _decode_settle(c)
    elif opcode == 0x27:
        co = ConsumerOp.__new__(ConsumerOp)
        co.consumer_id = _read_u64(c, "consumer id")
        m = co
    elif opcode == 0x30:
        ra = Reauth.__new__(Reauth)
        ra.token = _read_str(c, "token")
        m = ra
    elif opcode == 0x31 or opcode == 0x80:
        m = ExtMessage.__new__(ExtMessage)
    elif opcode == 0x32:
        m = ShardMapRequest.__new__(ShardMapRequest)
    elif opcode == 0x81:
        cv = CacheValue.__new__(CacheValue)
        b = _read_u8(c, "found flag")
        if b > 1:
            raise RemoteProtocolError(f"bad found flag {b}")
        cv.value = _read_blob(c, "value") if b else None
        m = cv
    elif opcode == 0x82 or opcode == 0x83:
        cr = CacheResult.__new__(CacheResult)
        b = _read_u8(c, "result flag")
        if b > 1:
            raise RemoteProtocolError(f"bad result flag {b}")
        cr.result = b == 1
        m = cr
    elif opcode == 0x84:
        ct = CacheTtlReply.__new__(CacheTtlReply)
        ct.state = _read_u8(c, "ttl state")
        if ct.state > 2:
            raise RemoteProtocolError(f"unknown TTL state {ct.state}")
        ct.ttl_ms = _read_u64(c, "ttl_ms")
        m = ct
    elif opcode == 0x85:
        m = _decode_shard_map(c)
    elif opcode == 0x90:
        po = PublishOffsets.__new__(PublishOffsets)
        po.base_offset = _read_u64(c, "base offset")
        po.count = _read_u32(c, "count")
        # The durability byte came later: a 12-byte body (older broker) means MEMORY.
        po.durability = 0
        if c.pos < c.end:
            b = _read_u8(c, "durability")
            if b > 2:
                raise RemoteProtocolError(f"unknown durability {b}")
            po.durability = b
        m = po
    elif opcode == 0x91:
        sb = Subscribed.__new__(Subscribed)
        sb.subscription_id = _read_u64(c, "subscription id")
        sb.start_offset = _read_u64(c, "start offset")
        m = sb
    elif opcode == 0x92:
        ev = Events.__new__(Events)
        ev.base_offset = _read_u64(c, "base offset")
        ev.payloads = []
        ev.headers = _read_records(c, ev.payloads)
        m = ev
    elif opcode == 0x93:
        sc = SlowConsumerNotice.__new__(SlowConsumerNotice)
        sc.first_dropped = _read_u64(c, "first dropped")
        sc.dropped = _read_u64(c, "dropped")
        m = sc
    elif opcode == 0xA0:
        cg = Consuming.__new__(Consuming)
        cg.consumer_id = _read_u64(c, "consumer id")
        cg.role = _read_role(c)
        m = cg
    elif opcode == 0xA1:
        m = _decode_deliveries(c)
    elif opcode == 0xA2:
        m = _decode_settled(c)
    elif opcode == 0xA4:
        crl = ConsumerRole.__new__(ConsumerRole)
        crl.role = _read_role(c)
        m = crl
    elif opcode == 0xE0 or opcode == 0x94 or opcode == 0xA3:
        er = ErrorReply.__new__(ErrorReply)
        er.code = _read_u16(c, "error code")
        er.message = _read_str(c, "error message")
        m = er
    elif opcode == 0xE1:
        ce = CursorErrorReply.__new__(CursorErrorReply)
        b = _read_u8(c, "cursor reason")
        if b not in _CURSOR_REASONS:
            raise RemoteProtocolError(f"unknown cursor error reason {b}")
        ce.reason = _CURSOR_REASONS[b]
        ce.requested = _read_u64(c, "requested offset")
        ce.available = _read_u64(c, "available offset")
        m = ce
    elif opcode == 0xE2:
        rd = Redirect.__new__(Redirect)
        rd.shard = _read_u32(c, "shard")
        rd.epoch = _read_u64(c, "epoch")
        rd.owner = _read_str(c, "owner")
        m = rd
    else:
        raise RemoteProtocolError(f"unknown extension opcode 0x{opcode:02x}")
    m.opcode = opcode
    m.request_id = rid
    return m


def ext_request_id(frame):
    """The (opcode, request_id) prefix of an extension frame, or None if the frame is too short.

    Lets a broker answer even a malformed body with an error the client can correlate.
    """
    cdef Frame f = _as_frame(frame, 0, "ext_request_id")
    if f.flags != 0x0040 or PyBytes_GET_SIZE(f.payload) < 9:
        return None
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(f.payload)
    return (p[0], _get_u64(p + 1))


def decode_ext(frame):
    """Decode a 0x0040 frame into the ``ExtMessage`` subclass of its opcode."""
    cdef Frame f = _as_frame(frame, 0, "decode_ext")
    cdef Cursor c
    if f.flags != 0x0040:
        raise RemoteProtocolError(f"not a felix extension frame (flags 0x{f.flags:04x})")
    _cursor_init(&c, f.payload)
    cdef uint8_t opcode = _read_u8(&c, "opcode")
    cdef uint64_t rid = _read_u64(&c, "request id")
    cdef ExtMessage m = _decode_ext_body(&c, opcode, rid)
    _expect_end(&c, "extension frame")
    return m
