# cython: freethreading_compatible=False
"""FLX1 binary codec: frame header, v1 binary layouts and felix's extension family.

Every decoder here reads through a bounds-checked cursor: each declared length
or count is checked against the bytes actually left *before* anything is
allocated (docs/wire-protocol.md, "Frames" and "Binary layouts (v1)"), and every failure raises
``felix.errors.RemoteProtocolError``. Encoders raise
``felix.errors.LocalProtocolError`` for values the wire cannot carry.

Encoders compute the exact frame size first, allocate one ``bytes`` object and
fill it in place: one allocation per frame, no joins.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next, PyDict_Size
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from felix.errors import LocalProtocolError, RemoteProtocolError

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

# --- constants (docs/wire-protocol.md, "Frames") -------------------------------------

MAGIC = 0x464C5831
VERSION = 1
HEADER_SIZE = 12

FLAG_JSON = 0x0000
FLAG_BINARY_PUBLISH_BATCH = 0x0001
FLAG_BINARY_EVENT_BATCH = 0x0002
FLAG_BINARY_EVENT_BATCH_SHARED = 0x0004
FLAG_BINARY_PUBLISH_ACKED = 0x0008
FLAG_BINARY_PUBLISH_ACK = 0x0010
FLAG_EVENT_BATCH_OFFSETS = 0x0020
#: felix's extension family (docs/wire-protocol.md): opcode byte + u64 request id.
FLAG_FELIX_EXT = 0x0040

#: Bits a peer may assume without negotiation.
FLAGS_BASE = 0x0007
#: Every bit v1 defines.
FLAGS_V1 = 0x003F
#: Every bit this codec understands (v1 plus the felix extension bit).
FLAGS_ALL = FLAGS_V1 | FLAG_FELIX_EXT

cdef extern from *:
    """
    #define FELIX_MAGIC 0x464C5831u
    #define FELIX_HDR 12
    #define FELIX_U32_MAX 0xFFFFFFFFll
    #define FELIX_U16_MAX 0xFFFF
    """
    const uint32_t _MAGIC "FELIX_MAGIC"
    const Py_ssize_t _HDR "FELIX_HDR"
    const long long _U32_MAX "FELIX_U32_MAX"
    const int _U16_MAX "FELIX_U16_MAX"

# Default upper bound FrameReader applies when the caller gives none (4 MiB, the
# post-auth default of the broker).
DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024

cdef inline bint _valid_combination(int flags) noexcept:
    # The only layouts v1 defines, plus the felix extension frame.
    return (
        flags == 0x0000
        or flags == 0x0001
        or flags == 0x0009
        or flags == 0x0002
        or flags == 0x0022
        or flags == 0x0004
        or flags == 0x0024
        or flags == 0x0010
        or flags == 0x0040
    )


cdef object _check_flags(int flags, int accept):
    if flags & ~accept:
        raise RemoteProtocolError(f"unknown flag bits 0x{flags & ~accept:04x} in flags 0x{flags:04x}")
    if not _valid_combination(flags):
        raise RemoteProtocolError(f"undefined flag combination 0x{flags:04x}")
    return None


# --- byte helpers -------------------------------------------------------------------

cdef inline void _put_u16(unsigned char* p, uint16_t v) noexcept:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v

cdef inline void _put_u32(unsigned char* p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v

cdef inline void _put_u64(unsigned char* p, uint64_t v) noexcept:
    _put_u32(p, <uint32_t>(v >> 32))
    _put_u32(p + 4, <uint32_t>v)

cdef inline uint16_t _get_u16(const unsigned char* p) noexcept:
    return (<uint16_t>p[0] << 8) | p[1]

cdef inline uint32_t _get_u32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline uint64_t _get_u64(const unsigned char* p) noexcept:
    return (<uint64_t>_get_u32(p) << 32) | _get_u32(p + 4)


cdef inline unsigned char* _put_header(unsigned char* p, int flags, Py_ssize_t length) noexcept:
    _put_u32(p, _MAGIC)
    _put_u16(p + 4, 1)
    _put_u16(p + 6, <uint16_t>flags)
    _put_u32(p + 8, <uint32_t>length)
    return p + _HDR


cdef inline bytes _alloc_frame(Py_ssize_t payload_len):
    if payload_len > _U32_MAX:
        raise LocalProtocolError(f"frame payload of {payload_len} bytes exceeds the u32 length field")
    return PyBytes_FromStringAndSize(NULL, _HDR + payload_len)


# Caller-side value checks (LocalProtocolError) -------------------------------------

cdef inline uint64_t _u64_arg(object v, str what) except? 0:
    if type(v) is not int and (not isinstance(v, int) or isinstance(v, bool)):
        raise LocalProtocolError(f"{what} must be an int, not {type(v).__name__}")
    if v < 0 or v > 0xFFFFFFFFFFFFFFFF:
        raise LocalProtocolError(f"{what} {v} is outside the u64 range")
    return <uint64_t>v

cdef inline uint32_t _u32_arg(object v, str what) except? 0:
    if type(v) is not int and (not isinstance(v, int) or isinstance(v, bool)):
        raise LocalProtocolError(f"{what} must be an int, not {type(v).__name__}")
    if v < 0 or v > _U32_MAX:
        raise LocalProtocolError(f"{what} {v} is outside the u32 range")
    return <uint32_t>v

cdef inline uint16_t _u16_arg(object v, str what) except? 0:
    if type(v) is not int and (not isinstance(v, int) or isinstance(v, bool)):
        raise LocalProtocolError(f"{what} must be an int, not {type(v).__name__}")
    if v < 0 or v > _U16_MAX:
        raise LocalProtocolError(f"{what} {v} is outside the u16 range")
    return <uint16_t>v


cdef inline const char* _utf8(object s, Py_ssize_t* n, str what) except NULL:
    # PyUnicode_AsUTF8AndSize caches the UTF-8 form on the str: no new object.
    if type(s) is not str:
        if not isinstance(s, str):
            raise LocalProtocolError(f"{what} must be a str, not {type(s).__name__}")
    try:
        return PyUnicode_AsUTF8AndSize(s, n)
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} is not encodable as UTF-8: {exc}") from None


cdef inline const char* _short_str(object s, Py_ssize_t* n, str what) except NULL:
    cdef const char* p = _utf8(s, n, what)
    if n[0] > _U16_MAX:
        raise LocalProtocolError(f"{what} is {n[0]} bytes; strings are limited to 65535")
    return p


cdef inline bytes _as_bytes(object b, str what):
    if type(b) is bytes:
        return <bytes>b
    if isinstance(b, (bytearray, memoryview)):
        return bytes(b)
    if isinstance(b, bytes):
        return bytes(b)
    raise LocalProtocolError(f"{what} must be bytes-like, not {type(b).__name__}")


cdef list _payload_list(object payloads, Py_ssize_t* total):
    """Normalise payloads to a list of bytes and sum their wire size (u32 len + data each)."""
    cdef list out
    cdef Py_ssize_t size = 4
    cdef Py_ssize_t n
    cdef object p
    if type(payloads) is list:
        out = <list>payloads
        for p in out:
            if type(p) is not bytes:
                out = [_as_bytes(q, "payload") for q in payloads]
                break
    elif isinstance(payloads, (list, tuple)):
        out = [_as_bytes(q, "payload") for q in payloads]
    elif isinstance(payloads, (bytes, bytearray, memoryview, str)):
        raise LocalProtocolError("payloads must be a list of bytes, not a single value")
    else:
        try:
            out = [_as_bytes(q, "payload") for q in payloads]
        except TypeError:
            raise LocalProtocolError(
                f"payloads must be a list of bytes, not {type(payloads).__name__}"
            ) from None
    if len(out) > _U32_MAX:
        raise LocalProtocolError("too many payloads for the u32 count")
    for p in out:
        n = PyBytes_GET_SIZE(<bytes>p)
        if n > _U32_MAX:
            raise LocalProtocolError(f"payload of {n} bytes exceeds the u32 length field")
        size += 4 + n
    total[0] = size
    return out


cdef inline unsigned char* _write_str(unsigned char* p, const char* s, Py_ssize_t n) noexcept:
    _put_u16(p, <uint16_t>n)
    memcpy(p + 2, s, n)
    return p + 2 + n


cdef inline unsigned char* _write_blob(unsigned char* p, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    _put_u32(p, <uint32_t>n)
    memcpy(p + 4, PyBytes_AS_STRING(b), n)
    return p + 4 + n


cdef unsigned char* _write_payloads(unsigned char* p, list payloads) noexcept:
    cdef object b
    _put_u32(p, <uint32_t>len(payloads))
    p += 4
    for b in payloads:
        p = _write_blob(p, <bytes>b)
    return p


# --- the cursor every decoder reads through -----------------------------------------

cdef struct Cursor:
    const unsigned char* p
    Py_ssize_t pos
    Py_ssize_t end


cdef inline int _need(Cursor* c, Py_ssize_t n, const char* what) except -1:
    if n > c.end - c.pos:
        raise RemoteProtocolError(
            f"truncated {what.decode()}: need {n} bytes, {c.end - c.pos} left"
        )
    return 0


cdef inline uint8_t _read_u8(Cursor* c, const char* what) except? 0xFF:
    _need(c, 1, what)
    c.pos += 1
    return c.p[c.pos - 1]


cdef inline uint16_t _read_u16(Cursor* c, const char* what) except? 0xFFFF:
    _need(c, 2, what)
    c.pos += 2
    return _get_u16(c.p + c.pos - 2)


cdef inline uint32_t _read_u32(Cursor* c, const char* what) except? 0xFFFFFFFF:
    _need(c, 4, what)
    c.pos += 4
    return _get_u32(c.p + c.pos - 4)


cdef inline uint64_t _read_u64(Cursor* c, const char* what) except? 0xFFFFFFFFFFFFFFFF:
    _need(c, 8, what)
    c.pos += 8
    return _get_u64(c.p + c.pos - 8)


cdef str _read_str(Cursor* c, const char* what):
    cdef uint16_t n = _read_u16(c, what)
    _need(c, n, what)
    try:
        s = PyUnicode_DecodeUTF8(<const char*>(c.p + c.pos), n, "strict")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what.decode()} is not valid UTF-8") from None
    c.pos += n
    return s


cdef bytes _read_blob(Cursor* c, const char* what):
    cdef uint32_t n = _read_u32(c, what)
    _need(c, n, what)
    b = PyBytes_FromStringAndSize(<const char*>(c.p + c.pos), n)
    c.pos += n
    return b


cdef list _read_payloads(Cursor* c):
    cdef uint32_t count = _read_u32(c, "payload count")
    cdef uint32_t i
    # Every payload needs at least its 4-byte length: refuse an impossible count
    # before allocating a list for it.
    if <uint64_t>count * 4 > <uint64_t>(c.end - c.pos):
        raise RemoteProtocolError(
            f"payload count {count} cannot fit in the {c.end - c.pos} bytes left"
        )
    cdef list out = []
    for i in range(count):
        out.append(_read_blob(c, "payload"))
    return out


cdef inline int _expect_end(Cursor* c, const char* what) except -1:
    if c.pos != c.end:
        raise RemoteProtocolError(f"{c.end - c.pos} trailing bytes after {what.decode()}")
    return 0


cdef inline void _cursor_init(Cursor* c, bytes payload) noexcept:
    c.p = <const unsigned char*>PyBytes_AS_STRING(payload)
    c.pos = 0
    c.end = PyBytes_GET_SIZE(payload)


# --- frame ------------------------------------------------------------------------------

cdef class Frame:
    """One FLX1 frame: ``version``, ``flags`` and the raw ``payload`` bytes."""

    def __init__(self, int version, int flags, bytes payload):
        self.version = version
        self.flags = flags
        self.payload = payload

    def __repr__(self):
        return f"Frame(version={self.version}, flags=0x{self.flags:04x}, payload={self.payload!r})"

    def __eq__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        cdef Frame o = <Frame>other
        return self.version == o.version and self.flags == o.flags and self.payload == o.payload

    def __hash__(self):
        return hash((self.version, self.flags, self.payload))

    def to_bytes(self):
        """The frame's wire encoding (header + payload)."""
        return encode_frame(self.flags, self.payload)


cdef inline Frame _new_frame(int flags, bytes payload):
    cdef Frame f = Frame.__new__(Frame)
    f.version = 1
    f.flags = flags
    f.payload = payload
    return f


def encode_frame(int flags, payload):
    """Wrap ``payload`` in an FLX1 header with ``flags`` (no layout checks on the payload)."""
    if flags < 0 or flags > _U16_MAX:
        raise LocalProtocolError(f"flags 0x{flags:x} do not fit in u16")
    cdef bytes body = _as_bytes(payload, "payload")
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef bytes out = _alloc_frame(n)
    cdef unsigned char* p = _put_header(<unsigned char*>PyBytes_AS_STRING(out), flags, n)
    memcpy(p, PyBytes_AS_STRING(body), n)
    return out


cdef Frame _parse_header_and_body(const unsigned char* p, Py_ssize_t n, int accept):
    if n < _HDR:
        raise RemoteProtocolError(f"truncated frame header: {n} of 12 bytes")
    if _get_u32(p) != _MAGIC:
        raise RemoteProtocolError(f"bad magic 0x{_get_u32(p):08x}")
    cdef int version = _get_u16(p + 4)
    if version != 1:
        raise RemoteProtocolError(f"unsupported version {version}")
    cdef int flags = _get_u16(p + 6)
    _check_flags(flags, accept)
    cdef uint32_t length = _get_u32(p + 8)
    if <Py_ssize_t>length != n - _HDR:
        raise RemoteProtocolError(
            f"frame declares {length} payload bytes but {n - _HDR} follow the header"
        )
    return _new_frame(flags, PyBytes_FromStringAndSize(<const char*>(p + _HDR), length))


def decode_frame(buf, *, bint extensions=False):
    """Decode exactly one whole frame from ``buf``.

    Rejects short or long input, a bad magic, a version other than 1, flag bits it
    does not know and flag combinations v1 does not define. The felix extension
    bit is known only with ``extensions=True`` (after negotiation).
    """
    cdef const unsigned char[::1] view
    if type(buf) is bytes:
        return _parse_header_and_body(
            <const unsigned char*>PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf),
            FLAGS_ALL if extensions else FLAGS_V1,
        )
    try:
        view = buf
    except (TypeError, ValueError, BufferError):
        raise LocalProtocolError(f"decode_frame needs bytes-like input, not {type(buf).__name__}") from None
    if view.shape[0] == 0:
        raise RemoteProtocolError("truncated frame header: 0 of 12 bytes")
    return _parse_header_and_body(&view[0], view.shape[0], FLAGS_ALL if extensions else FLAGS_V1)


cdef inline Frame _as_frame(object frame, int expected_any, str what):
    cdef Frame f
    if isinstance(frame, Frame):
        f = <Frame>frame
        if f.version != 1:
            raise RemoteProtocolError(f"unsupported version {f.version}")
        _check_flags(f.flags, FLAGS_ALL)
    elif isinstance(frame, (bytes, bytearray, memoryview)):
        f = decode_frame(frame, extensions=True)
    else:
        raise LocalProtocolError(f"{what} needs a Frame, not {type(frame).__name__}")
    if f.payload is None:
        raise LocalProtocolError("frame has no payload")
    return f


# --- streaming reader ---------------------------------------------------------------------

cdef class FrameReader:
    """Sans-IO incremental frame splitter for one byte stream.

    ``feed(data)`` appends bytes; iterating yields every complete ``Frame``. A
    header is validated as soon as its 12 bytes arrive, and a declared length
    over ``max_frame_size`` raises ``RemoteProtocolError`` before any payload is
    buffered: the reader never holds more than one incomplete frame of at most
    ``max_frame_size`` payload bytes beyond what the caller fed and has not yet
    iterated. After an error the reader stays broken (the stream is out of sync).
    """

    cdef bytearray _buf
    cdef Py_ssize_t _pos
    cdef public Py_ssize_t max_frame_size
    cdef public int accept_flags
    cdef object _error

    def __init__(self, Py_ssize_t max_frame_size=DEFAULT_MAX_FRAME_SIZE, *, int accept_flags=FLAGS_V1):
        if max_frame_size < 0 or max_frame_size > _U32_MAX:
            raise LocalProtocolError("max_frame_size must be within 0..2**32-1")
        self._buf = bytearray()
        self._pos = 0
        self.max_frame_size = max_frame_size
        self.accept_flags = accept_flags
        self._error = None

    @property
    def buffered(self):
        """Bytes held that do not yet form a complete frame (or are not yet iterated)."""
        return len(self._buf) - self._pos

    def feed(self, data):
        """Append ``data``; raises ``RemoteProtocolError`` if a pending header is bad."""
        if self._error is not None:
            raise self._error
        if self._pos and self._pos == len(self._buf):
            # Everything consumed: restart at offset 0 instead of growing.
            self._buf.clear()
            self._pos = 0
        self._buf += data
        self._check_pending_header()

    cdef int _check_pending_header(self) except -1:
        cdef Py_ssize_t avail = len(self._buf) - self._pos
        cdef const unsigned char* p
        cdef uint32_t length
        if avail < _HDR:
            return 0
        p = <const unsigned char*>self._buf + self._pos
        try:
            if _get_u32(p) != _MAGIC:
                raise RemoteProtocolError(f"bad magic 0x{_get_u32(p):08x}")
            if _get_u16(p + 4) != 1:
                raise RemoteProtocolError(f"unsupported version {_get_u16(p + 4)}")
            _check_flags(_get_u16(p + 6), self.accept_flags)
            length = _get_u32(p + 8)
            if length > self.max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds the {self.max_frame_size}-byte limit"
                )
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return 0

    def __iter__(self):
        return self

    def __next__(self):
        cdef Py_ssize_t avail
        cdef const unsigned char* p
        cdef uint32_t length
        cdef Frame f
        if self._error is not None:
            raise self._error
        avail = len(self._buf) - self._pos
        if avail < _HDR:
            self._compact()
            raise StopIteration
        self._check_pending_header()
        p = <const unsigned char*>self._buf + self._pos
        length = _get_u32(p + 8)
        if avail < _HDR + <Py_ssize_t>length:
            self._compact()
            raise StopIteration
        f = _new_frame(_get_u16(p + 6), PyBytes_FromStringAndSize(<const char*>(p + _HDR), length))
        self._pos += _HDR + length
        # Validate the next header now, so an oversized frame is refused before its
        # body is buffered; the error is kept and raised on the next call, after
        # this good frame has been handed out.
        try:
            self._check_pending_header()
        except RemoteProtocolError:
            pass
        return f

    cdef void _compact(self):
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0


# --- v1 binary layouts -----------------------------------------------------------------

cdef class PublishBatch:
    """A decoded binary publish batch (flags 0x0001 or 0x0009)."""

    def __repr__(self):
        return (
            f"PublishBatch(tenant_id={self.tenant_id!r}, namespace={self.namespace!r}, "
            f"stream={self.stream!r}, payloads={self.payloads!r}, "
            f"request_id={self.request_id!r}, ack={self.ack!r})"
        )


cdef class BinaryPublishAck:
    """A decoded binary publish acknowledgement (flags 0x0010)."""

    def __repr__(self):
        return f"BinaryPublishAck(request_id={self.request_id!r}, ok={self.ok!r}, message={self.message!r})"


cdef class EventBatch:
    """A decoded binary event batch (flags 0x0002/0x0004, optionally with 0x0020)."""

    def __repr__(self):
        return (
            f"EventBatch(subscription_id={self.subscription_id!r}, "
            f"base_offset={self.base_offset!r}, payloads={self.payloads!r})"
        )


_ACK_MODES = {"per_message": 1, "per_batch": 2}
_ACK_NAMES = {1: "per_message", 2: "per_batch"}


def encode_publish_batch(tenant_id, namespace, stream, payloads, *, request_id=None, ack=None):
    """A binary publish batch frame: plain 0x0001, or 0x0009 with a request id and ack mode."""
    cdef int mode = 0
    cdef uint64_t rid = 0
    if ack is None or ack == "none":
        if request_id is not None:
            raise LocalProtocolError("a request_id needs an ack mode ('per_message' or 'per_batch')")
    else:
        if ack not in _ACK_MODES:
            raise LocalProtocolError(f"unknown ack mode {ack!r}")
        if request_id is None:
            raise LocalProtocolError(f"ack mode {ack!r} needs a request_id")
        mode = _ACK_MODES[ack]
        rid = _u64_arg(request_id, "request_id")
    cdef Py_ssize_t nt, nn, ns, plen
    cdef const char* t = _short_str(tenant_id, &nt, "tenant_id")
    cdef const char* n = _short_str(namespace, &nn, "namespace")
    cdef const char* s = _short_str(stream, &ns, "stream")
    cdef list items = _payload_list(payloads, &plen)
    cdef Py_ssize_t size = 6 + nt + nn + ns + plen + (9 if mode else 0)
    cdef bytes out = _alloc_frame(size)
    cdef unsigned char* p = _put_header(
        <unsigned char*>PyBytes_AS_STRING(out), 0x0009 if mode else 0x0001, size
    )
    if mode:
        _put_u64(p, rid)
        p[8] = <unsigned char>mode
        p += 9
    p = _write_str(p, t, nt)
    p = _write_str(p, n, nn)
    p = _write_str(p, s, ns)
    _write_payloads(p, items)
    return out


def decode_publish_batch(frame):
    """Decode a 0x0001 / 0x0009 frame into a ``PublishBatch``."""
    cdef Frame f = _as_frame(frame, 0, "decode_publish_batch")
    cdef Cursor c
    cdef PublishBatch b = PublishBatch.__new__(PublishBatch)
    cdef uint8_t mode
    if f.flags != 0x0001 and f.flags != 0x0009:
        raise RemoteProtocolError(f"not a publish batch frame (flags 0x{f.flags:04x})")
    _cursor_init(&c, f.payload)
    if f.flags == 0x0009:
        b.request_id = _read_u64(&c, "request id")
        mode = _read_u8(&c, "ack mode")
        if mode != 1 and mode != 2:
            raise RemoteProtocolError(f"unknown ack mode {mode}")
        b.ack = _ACK_NAMES[mode]
    b.tenant_id = _read_str(&c, "tenant_id")
    b.namespace = _read_str(&c, "namespace")
    b.stream = _read_str(&c, "stream")
    b.payloads = _read_payloads(&c)
    _expect_end(&c, "publish batch")
    return b


def encode_publish_ack(request_id, error=None):
    """A binary publish ack (0x0010): ok when ``error`` is None, else status 1 with the message."""
    cdef uint64_t rid = _u64_arg(request_id, "request_id")
    cdef Py_ssize_t nm = 0
    cdef const char* m = NULL
    if error is not None:
        m = _short_str(error, &nm, "error")
    cdef Py_ssize_t size = 1 + 8 + 2 + nm
    cdef bytes out = _alloc_frame(size)
    cdef unsigned char* p = _put_header(<unsigned char*>PyBytes_AS_STRING(out), 0x0010, size)
    p[0] = 0 if error is None else 1
    _put_u64(p + 1, rid)
    _put_u16(p + 9, <uint16_t>nm)
    if nm:
        memcpy(p + 11, m, nm)
    return out


def decode_publish_ack(frame):
    """Decode a 0x0010 frame into a ``BinaryPublishAck``."""
    cdef Frame f = _as_frame(frame, 0, "decode_publish_ack")
    cdef Cursor c
    cdef BinaryPublishAck a = BinaryPublishAck.__new__(BinaryPublishAck)
    if f.flags != 0x0010:
        raise RemoteProtocolError(f"not a publish ack frame (flags 0x{f.flags:04x})")
    _cursor_init(&c, f.payload)
    cdef uint8_t status = _read_u8(&c, "ack status")
    if status > 1:
        raise RemoteProtocolError(f"unknown publish ack status {status}")
    a.request_id = _read_u64(&c, "request id")
    message = _read_str(&c, "ack message")
    _expect_end(&c, "publish ack")
    a.ok = status == 0
    a.message = None if status == 0 else message
    return a


def encode_event_batch(payloads, *, subscription_id=None, base_offset=None):
    """An event batch: shared 0x0004 when ``subscription_id`` is None, else 0x0002; 0x0020 adds offsets."""
    cdef Py_ssize_t plen
    cdef list items = _payload_list(payloads, &plen)
    cdef int flags = 0x0004 if subscription_id is None else 0x0002
    cdef uint64_t sid = 0, base = 0
    if subscription_id is not None:
        sid = _u64_arg(subscription_id, "subscription_id")
    if base_offset is not None:
        base = _u64_arg(base_offset, "base_offset")
        flags |= 0x0020
    cdef Py_ssize_t size = plen + (8 if subscription_id is not None else 0) + (8 if base_offset is not None else 0)
    cdef bytes out = _alloc_frame(size)
    cdef unsigned char* p = _put_header(<unsigned char*>PyBytes_AS_STRING(out), flags, size)
    if subscription_id is not None:
        _put_u64(p, sid)
        p += 8
    if base_offset is not None:
        _put_u64(p, base)
        p += 8
    _write_payloads(p, items)
    return out


def decode_event_batch(frame):
    """Decode a 0x0002 / 0x0004 frame (with or without 0x0020) into an ``EventBatch``."""
    cdef Frame f = _as_frame(frame, 0, "decode_event_batch")
    cdef Cursor c
    cdef EventBatch e = EventBatch.__new__(EventBatch)
    cdef int kind = f.flags & ~0x0020
    if kind != 0x0002 and kind != 0x0004:
        raise RemoteProtocolError(f"not an event batch frame (flags 0x{f.flags:04x})")
    _cursor_init(&c, f.payload)
    if kind == 0x0002:
        e.subscription_id = _read_u64(&c, "subscription id")
    if f.flags & 0x0020:
        e.base_offset = _read_u64(&c, "base offset")
    e.payloads = _read_payloads(&c)
    _expect_end(&c, "event batch")
    return e


include "_codec_ext.pxi"
