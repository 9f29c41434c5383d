"""A plain-Python (struct + json) implementation of the frames the benchmark measures.

Written independently of felix/_codec.pyx, straight from the wire spec, for two
uses: the baseline that perf/bench_codec.py compares the compiled codec against,
and a second implementation the differential tests check the codec with
(tests/test_wire_differential.py). It validates what a real decoder must
(lengths, counts, trailing bytes) so the comparison is fair.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

HEADER = struct.Struct(">IHHI")
MAGIC = 0x464C5831
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXT_PREFIX = struct.Struct(">BQ")
ACK_PREFIX = struct.Struct(">QB")
ACK_BODY = struct.Struct(">BQH")


class BaselineError(Exception):
    pass


def frame(flags: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, 1, flags, len(payload)) + payload


def unframe(buf: bytes) -> tuple[int, bytes]:
    if len(buf) < 12:
        raise BaselineError("short header")
    magic, version, flags, length = HEADER.unpack_from(buf)
    if magic != MAGIC or version != 1 or length != len(buf) - 12:
        raise BaselineError("bad header")
    return flags, buf[12:]


def _str(s: str) -> bytes:
    b = s.encode()
    return U16.pack(len(b)) + b


def _payloads(items: list[bytes]) -> bytes:
    return U32.pack(len(items)) + b"".join(U32.pack(len(p)) + p for p in items)


class Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise BaselineError("truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(U64.unpack(self.take(8))[0])

    def str(self) -> str:
        return self.take(self.u16()).decode()

    def blob(self) -> bytes:
        return self.take(self.u32())

    def payloads(self) -> list[bytes]:
        n = self.u32()
        if n * 4 > len(self.buf) - self.pos:
            raise BaselineError("count too large")
        return [self.blob() for _ in range(n)]

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise BaselineError("trailing bytes")


# --- v1 binary -----------------------------------------------------------------------


@dataclass
class PublishBatch:
    tenant_id: str
    namespace: str
    stream: str
    payloads: list[bytes]
    request_id: int | None = None
    ack: str | None = None


_ACKS = {"per_message": 1, "per_batch": 2}


def encode_publish_batch(
    tenant_id: str,
    namespace: str,
    stream: str,
    payloads: list[bytes],
    *,
    request_id: int | None = None,
    ack: str | None = None,
) -> bytes:
    body = _str(tenant_id) + _str(namespace) + _str(stream) + _payloads(payloads)
    if ack in _ACKS and request_id is not None:
        return frame(0x0009, ACK_PREFIX.pack(request_id, _ACKS[ack]) + body)
    return frame(0x0001, body)


def decode_publish_batch(buf: bytes) -> PublishBatch:
    flags, payload = unframe(buf)
    r = Reader(payload)
    rid: int | None = None
    ack: str | None = None
    if flags == 0x0009:
        rid = r.u64()
        ack = {1: "per_message", 2: "per_batch"}[r.u8()]
    elif flags != 0x0001:
        raise BaselineError("flags")
    out = PublishBatch(r.str(), r.str(), r.str(), r.payloads(), rid, ack)
    r.end()
    return out


def encode_publish_ack(request_id: int, error: str | None = None) -> bytes:
    msg = b"" if error is None else error.encode()
    return frame(0x0010, ACK_BODY.pack(0 if error is None else 1, request_id, len(msg)) + msg)


def encode_event_batch(
    payloads: list[bytes], *, subscription_id: int | None = None, base_offset: int | None = None
) -> bytes:
    flags = 0x0004 if subscription_id is None else 0x0002
    head = b"" if subscription_id is None else U64.pack(subscription_id)
    if base_offset is not None:
        flags |= 0x0020
        head += U64.pack(base_offset)
    return frame(flags, head + _payloads(payloads))


# --- felix extension frames (the cache path the benchmark measures) --------------------


@dataclass
class CacheRequest:
    opcode: int
    request_id: int
    tenant_id: str
    namespace: str
    cache: str
    key: str
    value: bytes | None = None
    ttl_ms: int = 0
    mode: int = 0


def encode_cache_get(
    request_id: int, tenant_id: str, namespace: str, cache: str, key: str
) -> bytes:
    body = _str(tenant_id) + _str(namespace) + _str(cache) + _str(key)
    return frame(0x0040, EXT_PREFIX.pack(0x01, request_id) + body)


def encode_cache_set(
    request_id: int,
    tenant_id: str,
    namespace: str,
    cache: str,
    key: str,
    value: bytes,
    *,
    ttl_ms: int = 0,
    mode: int = 0,
) -> bytes:
    body = _str(tenant_id) + _str(namespace) + _str(cache) + _str(key)
    body += bytes([mode]) + U64.pack(ttl_ms) + U32.pack(len(value)) + value
    return frame(0x0040, EXT_PREFIX.pack(0x02, request_id) + body)


def decode_cache_request(buf: bytes) -> CacheRequest:
    flags, payload = unframe(buf)
    if flags != 0x0040:
        raise BaselineError("flags")
    r = Reader(payload)
    op, rid = r.u8(), r.u64()
    if op not in (1, 2, 3, 4):
        raise BaselineError("opcode")
    req = CacheRequest(op, rid, r.str(), r.str(), r.str(), r.str())
    if op == 2:
        req.mode, req.ttl_ms, req.value = r.u8(), r.u64(), r.blob()
    r.end()
    return req


def encode_cache_value(request_id: int, value: bytes | None) -> bytes:
    body = b"\x00" if value is None else b"\x01" + U32.pack(len(value)) + value
    return frame(0x0040, EXT_PREFIX.pack(0x81, request_id) + body)


def decode_cache_value(buf: bytes) -> tuple[int, bytes | None]:
    flags, payload = unframe(buf)
    r = Reader(payload)
    if flags != 0x0040 or r.u8() != 0x81:
        raise BaselineError("not a cache value")
    rid = r.u64()
    value = r.blob() if r.u8() else None
    r.end()
    return rid, value


# --- queue deliveries (the shard's hot path: one frame per member per batch) -----------

DELIVERY_HEAD = struct.Struct(">QQIIH")


@dataclass
class Delivery:
    offset: int
    timestamp_us: int
    attempts: int
    failures: int
    headers: dict[str, str] | None
    payload: bytes


DeliveryRecord = tuple[int, int, int, int, dict[str, str] | None, bytes]


def encode_deliveries(consumer_id: int, records: Sequence[DeliveryRecord]) -> bytes:
    parts = [EXT_PREFIX.pack(0xA1, consumer_id), U32.pack(len(records))]
    for offset, ts, attempts, failures, headers, payload in records:
        parts.append(DELIVERY_HEAD.pack(offset, ts, attempts, failures, len(headers or ())))
        for k, v in (headers or {}).items():
            parts.append(_str(k) + _str(v))
        parts.append(U32.pack(len(payload)) + payload)
    return frame(0x0040, b"".join(parts))


def decode_deliveries(buf: bytes) -> tuple[int, list[Delivery]]:
    flags, payload = unframe(buf)
    r = Reader(payload)
    if flags != 0x0040 or r.u8() != 0xA1:
        raise BaselineError("not deliveries")
    cid = r.u64()
    n = r.u32()
    if n * 30 > len(payload) - r.pos:
        raise BaselineError("count too large")
    out = []
    for _ in range(n):
        offset, ts, attempts, failures, nh = DELIVERY_HEAD.unpack(r.take(DELIVERY_HEAD.size))
        if nh * 4 > len(payload) - r.pos:
            raise BaselineError("header count too large")
        headers = {r.str(): r.str() for _ in range(nh)} if nh else None
        out.append(Delivery(offset, ts, attempts, failures, headers, r.blob()))
    r.end()
    return cid, out


# --- JSON (what a naive implementation of the same frames would do) ------------------


def encode_json(msg: dict[str, object]) -> bytes:
    return frame(0, json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode())


def decode_json(buf: bytes) -> dict[str, object]:
    flags, payload = unframe(buf)
    if flags != 0:
        raise BaselineError("flags")
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise BaselineError("not an object")
    return obj
