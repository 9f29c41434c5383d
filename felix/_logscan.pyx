# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The durable log's record framing and scanner, compiled (felix/shard/log_format.py
and felix/shard/log_segment.py use them).

Recovery scans every record of a log's active segment and replay reads every record
it returns; in Python the per-record loop (unpack, two CRCs, checks) cost about
1.4 us, which made opening a 256 MiB segment of small records take seconds. Here it
is a C loop: both CRCs with zlib's own ``crc32`` (the C function behind Python's
``zlib.crc32``; the build links libz), straight on the buffer, so a scan that wants
no payload objects (recovery) creates no Python object per record.

The record format is docs/log-format.md: a 28-byte big-endian header ``u32 length |
u64 offset | u64 timestamp_us | u32 payload_crc | u32 header_crc`` then the payload.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from felix.errors import TooLarge


cdef extern from "zlib.h":
    # zlib's crc32 (the one zlib.crc32 wraps): SIMD-accelerated where the CPU has it.
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int len) nogil

cdef object _tuple_new = tuple.__new__

cdef enum:
    RECORD_HEADER = 28

cdef inline uint32_t _crc_small(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    return <uint32_t>crc32(0, p, <unsigned int>n)


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef inline void _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void _put64(unsigned char* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    _put32(p + 4, <uint32_t>(v & 0xFFFFFFFFUL))


DEF_MAX_U63 = 2**63 - 1


def encode_batch(
    records,
    long long next_offset,
    Py_ssize_t start_pos,
    Py_ssize_t index_mark,
    Py_ssize_t index_interval,
    long long max_ts,
    Py_ssize_t max_payload,
):
    """Frame ``records`` (offset, timestamp_us, payload) into one bytes object: see
    felix.shard.log_format.encode_batch (this is it; the checks run over the whole
    batch before anything is framed)."""
    cdef Py_ssize_t total = 0, pos, n
    cdef long long expect = next_offset, offset, ts
    cdef object payload
    for rec in records:
        o, t, payload = rec
        n = len(payload)
        if n > max_payload:
            raise TooLarge(f"record of {n} bytes exceeds the log's limit of {max_payload}")
        if not (0 <= t <= DEF_MAX_U63):
            raise ValueError(f"timestamp {t} out of range")
        if o > DEF_MAX_U63:
            raise ValueError(f"offset {o} out of range")
        if o < expect:
            raise ValueError(f"offset {o} is below the log's next offset {expect}")
        expect = <long long>o + 1
        total += RECORD_HEADER + n
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* base = <unsigned char*>PyBytes_AS_STRING(out)
    cdef unsigned char* p = base
    cdef Py_buffer view
    cdef list entries = []
    pos = start_pos
    for rec in records:
        o, t, payload = rec
        offset = o
        ts = t
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n and p + RECORD_HEADER + n > base + total:
                raise ValueError("a payload changed size while being framed")
            memcpy(p + RECORD_HEADER, view.buf, n)
        finally:
            PyBuffer_Release(&view)
        if pos >= index_mark:
            entries.append((offset, pos, max_ts))
            index_mark = pos + index_interval
        if ts > max_ts:
            max_ts = ts
        _put32(p, <uint32_t>n)
        _put64(p + 4, <uint64_t>offset)
        _put64(p + 12, <uint64_t>ts)
        _put32(p + 20, <uint32_t>crc32(0, p + RECORD_HEADER, <unsigned int>n))
        _put32(p + 24, <uint32_t>crc32(0, p, 24))
        p += RECORD_HEADER + n
        pos += RECORD_HEADER + n
    if p != base + total:
        raise ValueError("a payload changed size while being framed")
    return out, entries, index_mark, max_ts


def header_crc(bytes data not None, Py_ssize_t rel=0):
    """CRC-32 of the 24 bytes at ``data[rel:]`` (for tests: must equal zlib.crc32)."""
    if rel < 0 or rel + 24 > PyBytes_GET_SIZE(data):
        raise ValueError("need 24 bytes")
    return _crc_small(<const unsigned char*>PyBytes_AS_STRING(data) + rel, 24)


def scan(
    bytes buf not None,
    Py_ssize_t rel,
    long long last_offset,
    Py_ssize_t max_payload,
    long long min_offset,
    Py_ssize_t max_records,
    Py_ssize_t max_bytes,
    bint have_some,
    object factory,
    list out,
    list entries,
    Py_ssize_t index_mark,
    Py_ssize_t index_interval,
    Py_ssize_t buf_pos,
    long long max_ts,
):
    """Check and collect the whole records in ``buf[rel:]``.

    ``out`` (when not None) gets a ``factory`` tuple (a NamedTuple class: built with
    ``tuple.__new__``, skipping its Python-level ``__new__``) ``(offset, timestamp_us,
    payload)`` for each
    record with an offset >= ``min_offset``, while fewer than ``max_records`` were
    collected and their payloads stay within ``max_bytes`` (the first record is taken
    whatever its size unless ``have_some``). ``entries`` (when not None) gets the
    sparse index entries ``(offset, file_position, max_ts_before)`` due at or after
    ``index_mark`` (file positions are ``buf_pos + rel``). Offsets must exceed
    ``last_offset``.

    Returns ``(rel, last_offset, max_ts, scanned, collected, nbytes, index_mark, need,
    error)``: ``rel`` is just after the last good record; ``error`` is why the record
    at ``rel`` is bad (else None); ``need`` > 0 means the next record is not whole in
    ``buf`` and needs ``need`` bytes from ``rel``; ``need == 0`` with no error means a
    collection limit stopped the scan.
    """
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    cdef const unsigned char* p
    cdef uint32_t length, pcrc
    cdef long long offset, ts
    cdef Py_ssize_t scanned = 0, collected = 0, nbytes = 0, stop
    cdef object payload
    cdef bint want
    while True:
        if rel + RECORD_HEADER > n:
            return (rel, last_offset, max_ts, scanned, collected, nbytes, index_mark,
                    RECORD_HEADER, None)
        p = base + rel
        if _be32(p + 24) != _crc_small(p, 24):
            return (rel, last_offset, max_ts, scanned, collected, nbytes, index_mark, 0,
                    "record header CRC mismatch")
        length = _be32(p)
        if length > <uint64_t>max_payload:
            return (rel, last_offset, max_ts, scanned, collected, nbytes, index_mark, 0,
                    f"record length {length} exceeds the limit {max_payload}")
        stop = rel + RECORD_HEADER + length
        if stop > n:
            return (rel, last_offset, max_ts, scanned, collected, nbytes, index_mark,
                    RECORD_HEADER + length, None)
        offset = <long long>_be64(p + 4)
        ts = <long long>_be64(p + 12)
        pcrc = _be32(p + 20)
        want = out is not None and offset >= min_offset
        if want and (collected >= max_records or (
            (collected or have_some) and nbytes + length > max_bytes
        )):
            return (rel, last_offset, max_ts, scanned, collected, nbytes, index_mark, 0, None)
        if <uint32_t>crc32(0, p + RECORD_HEADER, length) != pcrc:
            return (rel, last_offset, max_ts, scanned, collected, nbytes, index_mark, 0,
                    "payload CRC mismatch")
        if offset <= last_offset or offset < 0 or ts < 0:
            return (rel, last_offset, max_ts, scanned, collected, nbytes, index_mark, 0,
                    f"offset {<uint64_t>offset} does not increase (previous {last_offset})"
                    if offset >= 0 and ts >= 0 else "record offset or timestamp out of range")
        if entries is not None and buf_pos + rel >= index_mark:
            entries.append((offset, buf_pos + rel, max_ts))
            index_mark = buf_pos + rel + index_interval
        if want:
            payload = PyBytes_FromStringAndSize(<const char*>(p + RECORD_HEADER), length)
            out.append(_tuple_new(factory, (offset, ts, payload)))
            collected += 1
            nbytes += length
        last_offset = offset
        if ts > max_ts:
            max_ts = ts
        scanned += 1
        rel = stop


def find_record(bytes buf not None, Py_ssize_t rel, long long after_offset, Py_ssize_t max_payload):
    """The first position > ``rel`` in ``buf`` where a whole valid record starts (both
    CRCs match, the payload lies inside ``buf``, the offset exceeds ``after_offset``),
    or -1. Recovery uses it to tell a torn tail (nothing valid after the bad spot)
    from damage in the middle of the active segment; every byte position is tried."""
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t i, found = -1
    cdef uint32_t length
    cdef const unsigned char* p
    with nogil:
        for i in range(rel + 1, n - RECORD_HEADER + 1):
            p = base + i
            length = _be32(p)
            if length > <uint64_t>max_payload or i + RECORD_HEADER + <Py_ssize_t>length > n:
                continue
            if _be32(p + 24) != _crc_small(p, 24):
                continue
            if <long long>_be64(p + 4) <= after_offset or <long long>_be64(p + 4) < 0:
                continue
            if <uint32_t>crc32(0, p + RECORD_HEADER, length) != _be32(p + 20):
                continue
            found = i
            break
    return found
