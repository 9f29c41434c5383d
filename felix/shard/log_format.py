"""Byte layout of a durable stream's log: segment header, record frame, payload envelope.

Everything here is pure (bytes in, bytes out) so the reader in ``felix log dump``, the
recovery scan and the writer share one definition. docs/log-format.md is the
specification; this module is its executable form. All integers are big-endian and
every CRC is CRC-32 (IEEE, ``zlib.crc32``).

Segment header (32 bytes)::

    magic b"FLSG" | u16 version=1 | u16 flags=0 | u64 base_offset | u64 created_us
    | u32 reserved=0 | u32 header_crc (of the 28 bytes before it)

Record (28-byte header, then the payload)::

    u32 length | u64 offset | u64 timestamp_us | u32 payload_crc | u32 header_crc
    (header_crc covers the 24 bytes before it)

Payload (felix's record envelope)::

    u8 kind (0 = data) | u16 header_count | per header: u16 key_len key u16 value_len
    value (UTF-8) | body

Encrypted payload (kind 1, encryption at rest; the plaintext is a kind-0 envelope)::

    u8 kind=1 | u32 key_id | 12-byte nonce | AES-256-GCM ciphertext | 16-byte tag
    associated data: b"FLXR" | u8 1 | u32 key_id | u64 offset | u64 timestamp_us
                     | stream key "tenant/namespace/stream" (UTF-8)
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple, Protocol

from cryptography.exceptions import InvalidTag

from felix import _logscan
from felix.errors import FelixError, KeyUnavailable, TooLarge

__all__ = [
    "ENVELOPE_DATA",
    "ENVELOPE_ENCRYPTED",
    "MAX_PAYLOAD_BYTES",
    "RECORD_HEADER_SIZE",
    "SEALED_OVERHEAD",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "Aead",
    "DataKeys",
    "EnvelopeError",
    "RecordHeader",
    "SegmentHeader",
    "check_record_header",
    "decode_envelope",
    "decode_record",
    "decode_record_header",
    "decode_segment_header",
    "encode_batch",
    "encode_envelope",
    "encode_segment_header",
    "open_payload",
    "record_aad",
    "seal_batch",
]

SEGMENT_MAGIC: Final = b"FLSG"
SEGMENT_VERSION: Final = 1
SEGMENT_HEADER_SIZE: Final = 32
RECORD_HEADER_SIZE: Final = 28
#: The largest payload the log accepts. The u32 length field could say 4 GiB, but a
#: reader allocates a record whole, so a bound keeps a flipped length bit (or a
#: careless publisher) from asking for gigabytes: a longer length is damage.
MAX_PAYLOAD_BYTES: Final = 64 * 2**20
#: The largest offset or timestamp: they are u64 on disk, and offsets must stay
#: representable as a signed 64-bit integer for the wire and the control plane.
MAX_U63: Final = 2**63 - 1

_SEG_BODY = struct.Struct(">4sHHQQI")  # the 28 bytes the header CRC covers
_U32 = struct.Struct(">I")
_REC = struct.Struct(">IQQII")
_crc32 = zlib.crc32


class SegmentHeader(NamedTuple):
    base_offset: int
    created_us: int


class RecordHeader(NamedTuple):
    length: int
    offset: int
    timestamp_us: int
    payload_crc: int


def encode_segment_header(base_offset: int, created_us: int) -> bytes:
    body = _SEG_BODY.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, base_offset, created_us, 0)
    return body + _U32.pack(_crc32(body))


def decode_segment_header(buf: bytes) -> SegmentHeader | str:
    """The header of a segment, or why ``buf`` (its first 32 bytes) is not one."""
    if len(buf) < SEGMENT_HEADER_SIZE:
        return f"segment header truncated ({len(buf)} of {SEGMENT_HEADER_SIZE} bytes)"
    magic, version, flags, base, created, reserved = _SEG_BODY.unpack_from(buf)
    (crc,) = _U32.unpack_from(buf, 28)
    if crc != _crc32(buf[:28]):
        return "segment header CRC mismatch"
    if magic != SEGMENT_MAGIC:
        return f"bad segment magic {magic!r}"
    if version != SEGMENT_VERSION:
        return f"unsupported segment version {version}"
    if flags != 0 or reserved != 0:
        return f"unknown segment flags {flags:#x} / reserved {reserved:#x}"
    return SegmentHeader(base, created)


def decode_record_header(buf: bytes | memoryview, pos: int = 0) -> RecordHeader | str:
    """The record header at ``buf[pos:pos + 28]``, or why it is not a valid one.

    Only the header is checked here (its CRC and the length bound); the payload CRC
    is for the caller, once it has the payload.
    """
    length, offset, ts, pcrc, hcrc = _REC.unpack_from(buf, pos)
    if hcrc != _crc32(buf[pos : pos + 24]):
        return "record header CRC mismatch"
    if length > MAX_PAYLOAD_BYTES:
        return f"record length {length} exceeds the limit {MAX_PAYLOAD_BYTES}"
    if offset > MAX_U63 or ts > MAX_U63:
        return "record offset or timestamp out of range"
    return RecordHeader(length, offset, ts, pcrc)


def check_record_header(buf: bytes | memoryview, pos: int) -> None:
    """Raise ``ValueError`` unless ``buf[pos:]`` starts with a valid record header
    (for tests and tools that want an exception rather than a reason)."""
    got = decode_record_header(buf, pos)
    if isinstance(got, str):
        raise ValueError(got)


def encode_batch(
    records: Sequence[tuple[int, int, bytes]],
    next_offset: int,
    start_pos: int,
    index_mark: int,
    index_interval: int,
    max_ts: int,
) -> tuple[bytes, list[tuple[int, int, int]], int, int]:
    """Frame ``records`` (offset, timestamp_us, payload) into one bytes object.

    ``next_offset`` is the lowest offset the first record may have (offsets must be
    strictly increasing); ``start_pos`` is where the batch lands in its segment and
    ``index_mark`` the segment position at or after which the next sparse-index entry
    is due (then the mark moves ``index_interval`` bytes on); ``max_ts`` is the
    highest timestamp already in the segment. Returns the bytes, the index entries due
    inside this batch (offset, position, highest timestamp before that position), the
    next index mark and the new highest timestamp. Raises ``TooLarge`` or
    ``ValueError`` before anything is framed when a record is invalid, so a bad batch
    writes nothing. Compiled (:mod:`felix._logscan`): the hot path of every durable
    publish.
    """
    return _logscan.encode_batch(
        records, next_offset, start_pos, index_mark, index_interval, max_ts, MAX_PAYLOAD_BYTES
    )


class EnvelopeError(FelixError, ValueError):
    """A payload is not a valid felix record envelope."""


ENVELOPE_DATA: Final = 0
_U8U16 = struct.Struct(">BH")
_U16 = struct.Struct(">H")


def encode_envelope(headers: Mapping[str, str] | None, body: bytes) -> bytes:
    """A felix record (headers + body) as a log payload."""
    if not headers:
        return _U8U16.pack(ENVELOPE_DATA, 0) + body
    if len(headers) > 0xFFFF:
        raise TooLarge(f"{len(headers)} headers: at most 65535 fit a log record")
    parts = [_U8U16.pack(ENVELOPE_DATA, len(headers))]
    for key, value in headers.items():
        for text in (key, value):
            raw = text.encode()
            if len(raw) > 0xFFFF:
                raise TooLarge(f"header of {len(raw)} bytes: at most 65535 fit a log record")
            parts.append(_U16.pack(len(raw)))
            parts.append(raw)
    parts.append(body)
    return b"".join(parts)


def decode_envelope(payload: bytes) -> tuple[dict[str, str] | None, bytes]:
    """The headers (``None`` when there are none) and body of a log payload."""
    if len(payload) < 3:
        raise EnvelopeError(f"envelope of {len(payload)} bytes is shorter than its 3-byte head")
    kind, count = _U8U16.unpack_from(payload)
    if kind != ENVELOPE_DATA:
        if kind == ENVELOPE_ENCRYPTED:
            raise EnvelopeError("record kind 1 is encrypted: decode_record opens it with its key")
        raise EnvelopeError(f"unknown record kind {kind}")
    pos = 3
    if count == 0:
        return None, payload[pos:]
    headers: dict[str, str] = {}
    view = memoryview(payload)
    try:
        for _ in range(count):
            texts = []
            for _ in range(2):
                if pos + 2 > len(payload):
                    raise EnvelopeError("envelope headers run past the payload")
                (n,) = _U16.unpack_from(payload, pos)
                pos += 2
                if pos + n > len(payload):
                    raise EnvelopeError("envelope headers run past the payload")
                texts.append(str(view[pos : pos + n], "utf-8"))
                pos += n
            headers[texts[0]] = texts[1]
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"envelope header is not UTF-8: {exc}") from None
    return headers, payload[pos:]


# -- encryption at rest (kind 1) ------------------------------------------------------

ENVELOPE_ENCRYPTED: Final = 1
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_SEALED_HEAD = struct.Struct(">BI")  # kind, key_id
#: Bytes an encrypted record adds to its kind-0 envelope: kind, key id, nonce, tag.
SEALED_OVERHEAD: Final = _SEALED_HEAD.size + NONCE_BYTES + TAG_BYTES
_RECORD_AAD = struct.Struct(">4sBIQQ")  # b"FLXR", kind, key_id, offset, timestamp_us
_AAD_MAGIC: Final = b"FLXR"


class Aead(Protocol):
    """An AEAD cipher with one key (``cryptography``'s AESGCM)."""

    def encrypt(
        self, nonce: bytes, data: bytes, associated_data: bytes | bytearray | None
    ) -> bytes: ...

    def decrypt(
        self,
        nonce: bytes | memoryview,
        data: bytes | memoryview,
        associated_data: bytes | bytearray | None,
    ) -> bytes: ...


class DataKeys(Protocol):
    """Where a reader finds a tenant's data key by id (felix/keys/store.py KeyStore)."""

    def aead(self, tenant: str, key_id: int) -> Aead: ...


def record_aad(key_id: int, offset: int, timestamp_us: int, stream: str) -> bytes:
    """The associated data of an encrypted record: the record cannot be moved to
    another stream, offset or time, nor claim another key, without failing its tag."""
    return (
        _RECORD_AAD.pack(_AAD_MAGIC, ENVELOPE_ENCRYPTED, key_id, offset, timestamp_us)
        + stream.encode()
    )


def seal_batch(
    batch: Sequence[tuple[int, int, bytes]], stream: str, key_id: int, aead: Aead
) -> list[tuple[int, int, bytes]]:
    """``batch`` (offset, timestamp_us, kind-0 envelope) as encrypted payloads.

    Each record gets a random 12-byte nonce (one ``getrandom`` for the batch), never
    one derived from its offset: a torn tail cut back gives an offset to a new record,
    and the same key must never see the same nonce twice.
    """
    nonces = os.urandom(NONCE_BYTES * len(batch))
    head = _SEALED_HEAD.pack(ENVELOPE_ENCRYPTED, key_id)
    # One associated-data buffer for the batch: the stream key stays, the head is
    # packed in place per record (no allocation per record for it).
    aad = bytearray(_RECORD_AAD.size) + stream.encode()
    pack_into = _RECORD_AAD.pack_into
    encrypt = aead.encrypt
    join = b"".join
    out = []
    pos = 0
    for offset, ts, envelope in batch:
        nonce = nonces[pos : pos + NONCE_BYTES]
        pos += NONCE_BYTES
        pack_into(aad, 0, _AAD_MAGIC, ENVELOPE_ENCRYPTED, key_id, offset, ts)
        out.append((offset, ts, join((head, nonce, encrypt(nonce, envelope, aad)))))
    return out


def encrypted_key_id(payload: bytes) -> int | None:
    """The data key id of an encrypted payload (None: not encrypted)."""
    if len(payload) < _SEALED_HEAD.size or payload[0] != ENVELOPE_ENCRYPTED:
        return None
    return int(_SEALED_HEAD.unpack_from(payload)[1])


def open_payload(
    payload: bytes, stream: str, offset: int, timestamp_us: int, keys: DataKeys | None
) -> bytes:
    """The kind-0 envelope of a log payload: itself, or an encrypted one opened.

    Raises:
        KeyUnavailable: no keys, an unknown key id, or the tag does not verify (the
            record was altered, or moved from another stream or offset).
        EnvelopeError: an encrypted payload too short, or not holding a kind-0 envelope.
    """
    if not payload or payload[0] != ENVELOPE_ENCRYPTED:
        return payload
    if len(payload) < SEALED_OVERHEAD:
        raise EnvelopeError(f"encrypted record of {len(payload)} bytes is too short")
    key_id = _SEALED_HEAD.unpack_from(payload)[1]
    tenant = stream.split("/", 1)[0]
    if keys is None:
        raise KeyUnavailable(
            f"record {offset} of stream {stream} is encrypted (data key {key_id} of tenant "
            f"{tenant}) and no keys were given to read it"
        )
    aead = keys.aead(tenant, key_id)
    view = memoryview(payload)  # no copy of the ciphertext
    try:
        inner = aead.decrypt(
            view[_SEALED_HEAD.size : _SEALED_HEAD.size + NONCE_BYTES],
            view[_SEALED_HEAD.size + NONCE_BYTES :],
            record_aad(key_id, offset, timestamp_us, stream),
        )
    except InvalidTag:
        raise KeyUnavailable(
            f"record {offset} of stream {stream} does not authenticate with data key "
            f"{key_id} of tenant {tenant}: it was altered or moved on disk, or the key file "
            "is not the one it was written with"
        ) from None
    if not inner or inner[0] != ENVELOPE_DATA:
        raise EnvelopeError(f"record {offset} of stream {stream}: encrypted envelope is not kind 0")
    return inner


def decode_record(
    payload: bytes, stream: str, offset: int, timestamp_us: int, keys: DataKeys | None
) -> tuple[dict[str, str] | None, bytes]:
    """The headers and body of a record read from the log, plain (kind 0) or encrypted
    (kind 1, opened with ``keys``): the one decoder for every reader of the log.

    Raises KeyUnavailable (see :func:`open_payload`) or EnvelopeError.
    """
    if payload and payload[0] == ENVELOPE_ENCRYPTED:
        payload = open_payload(payload, stream, offset, timestamp_us, keys)
    return decode_envelope(payload)
