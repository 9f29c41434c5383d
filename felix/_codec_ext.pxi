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
OP_REAUTH = 0x30
OP_PING = 0x31
# Replies and notices (broker -> client)
OP_OK = 0x80
OP_CACHE_VALUE = 0x81
OP_CACHE_STORED = 0x82
OP_CACHE_DELETED = 0x83
OP_CACHE_TTL_REPLY = 0x84
OP_PUBLISH_OFFSETS = 0x90
OP_SUBSCRIBED = 0x91
OP_EVENTS = 0x92
OP_SLOW_CONSUMER = 0x93
OP_SUBSCRIPTION_END = 0x94
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
    """OP_ERROR (reply to request_id) and OP_SUBSCRIPTION_END (request_id: subscription)."""

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
    elif opcode == 0x30:
        ra = Reauth.__new__(Reauth)
        ra.token = _read_str(c, "token")
        m = ra
    elif opcode == 0x31 or opcode == 0x80:
        m = ExtMessage.__new__(ExtMessage)
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
    elif opcode == 0xE0 or opcode == 0x94:
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
