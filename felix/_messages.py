"""FLX1 JSON messages (flags 0): one table of message layouts, one encoder, one decoder.

docs/wire-protocol.md, "JSON messages (flags 0)": compact JSON, UTF-8 with non-ASCII characters
written raw, ``"type"`` first and the other keys in the table's order, optional
fields omitted when absent, byte fields as standard padded base64. Decoding
accepts keys in any order, ignores unknown keys, and rejects an unknown type, a
missing required field, a wrong JSON type and base64 that is not strictly valid.
JSON is never on the data plane's hot path (binary frames are), so this stays
in plain Python on top of the C ``json`` module.
"""

from __future__ import annotations

import binascii
import enum
import json
from collections.abc import Callable, Mapping
from typing import Any

from felix._codec import Frame, decode_frame, encode_frame
from felix.errors import LocalProtocolError, RemoteProtocolError

_U64_MAX = 2**64 - 1
_U16_MAX = 2**16 - 1


class FieldType(enum.Enum):
    """How one field is represented in JSON."""

    STR = "string"
    U64 = "non-negative integer (u64)"
    FLAGS = "non-negative integer (u16)"
    B64 = "base64 string"
    B64_LIST = "list of base64 strings"
    B64_OR_NULL = "base64 string or null"
    U64_OR_NULL = "non-negative integer or null"
    ACK = '"none", "per_message" or "per_batch"'
    START = '"latest", "earliest" or {"offset": n}'
    REASON = '"too_old" or "in_future"'


# A field is (name, kind, required). Fields that are required but nullable
# (cache_put.ttl_ms, cache_value.value) are always written, null when absent.
Field = tuple[str, FieldType, bool]

_S, _R, _O = FieldType.STR, True, False
MESSAGES: dict[str, tuple[Field, ...]] = {
    "auth": (("tenant_id", _S, _R), ("token", _S, _R), ("client_flags", FieldType.FLAGS, _O)),
    "auth_ok": (("server_flags", FieldType.FLAGS, _R),),
    "publish": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("stream", _S, _R),
        ("payload", FieldType.B64, _R),
        ("request_id", FieldType.U64, _O),
        ("ack", FieldType.ACK, _O),
    ),
    "publish_batch": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("stream", _S, _R),
        ("payloads", FieldType.B64_LIST, _R),
        ("request_id", FieldType.U64, _O),
        ("ack", FieldType.ACK, _O),
    ),
    "subscribe": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("stream", _S, _R),
        ("subscription_id", FieldType.U64, _O),
        ("start", FieldType.START, _O),
    ),
    "subscribed": (("subscription_id", FieldType.U64, _R),),
    "event_stream_hello": (("subscription_id", FieldType.U64, _R),),
    "event": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("stream", _S, _R),
        ("payload", FieldType.B64, _R),
        ("offset", FieldType.U64, _O),
    ),
    "event_batch": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("stream", _S, _R),
        ("payloads", FieldType.B64_LIST, _R),
        ("base_offset", FieldType.U64, _O),
    ),
    "cache_put": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("cache", _S, _R),
        ("key", _S, _R),
        ("value", FieldType.B64, _R),
        ("request_id", FieldType.U64, _O),
        ("ttl_ms", FieldType.U64_OR_NULL, _R),
    ),
    "cache_get": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("cache", _S, _R),
        ("key", _S, _R),
        ("request_id", FieldType.U64, _O),
    ),
    "cache_value": (
        ("tenant_id", _S, _R),
        ("namespace", _S, _R),
        ("cache", _S, _R),
        ("key", _S, _R),
        ("value", FieldType.B64_OR_NULL, _R),
        ("request_id", FieldType.U64, _O),
    ),
    "cache_ok": (("request_id", FieldType.U64, _R),),
    "publish_ok": (("request_id", FieldType.U64, _R),),
    "publish_error": (("request_id", FieldType.U64, _R), ("message", _S, _R)),
    "ok": (),
    "error": (("message", _S, _R),),
    "subscribe_cursor_error": (
        ("reason", FieldType.REASON, _R),
        ("requested", FieldType.U64, _R),
        ("available", FieldType.U64, _R),
    ),
}

_NULLABLE = frozenset({FieldType.B64_OR_NULL, FieldType.U64_OR_NULL})
_ACKS = frozenset({"none", "per_message", "per_batch"})
_REASONS = frozenset({"too_old", "in_future"})
_STARTS = frozenset({"latest", "earliest"})

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


# --- shared value checks --------------------------------------------------------------


def _check_int(v: object, top: int) -> int | None:
    """``v`` as an int if it is a JSON integer in 0..top (bools are not integers), else None."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top:
        return int(v)
    return None


def _b64_decode(v: object) -> bytes | None:
    """Strict base64: standard alphabet, correct padding, canonical (zero) trailing bits."""
    if not isinstance(v, str):
        return None
    try:
        raw = v.encode("ascii")
        data = binascii.a2b_base64(raw, strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    # a2b_base64 accepts non-zero padding bits ("QR==" for b"A"); re-encoding rejects them.
    if binascii.b2a_base64(data, newline=False) != raw:
        return None
    return data


def _b64_encode(v: object, where: str) -> str:
    if not isinstance(v, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"{where} must be bytes-like, not {type(v).__name__}")
    return binascii.b2a_base64(v, newline=False).decode("ascii")


# --- encode --------------------------------------------------------------------------


def _enc_str(v: Any, where: str) -> object:
    if type(v) is not str and not isinstance(v, str):
        raise LocalProtocolError(f"{where} must be a str, not {type(v).__name__}")
    return v


def _enc_int(top: int, kind: FieldType) -> Callable[[Any, str], object]:
    def enc(v: Any, where: str) -> object:
        n = _check_int(v, top)
        if n is None:
            raise LocalProtocolError(f"{where} must be a {kind.value}, not {v!r}")
        return n

    return enc


def _enc_b64_list(v: Any, where: str) -> object:
    if isinstance(v, (str, bytes, bytearray, memoryview)) or not isinstance(v, (list, tuple)):
        raise LocalProtocolError(f"{where} must be a list of bytes")
    return [_b64_encode(p, f"{where}[{i}]") for i, p in enumerate(v)]


def _enc_choice(allowed: frozenset[str], kind: FieldType) -> Callable[[Any, str], object]:
    def enc(v: Any, where: str) -> object:
        if not isinstance(v, str) or v not in allowed:
            raise LocalProtocolError(f"{where} must be {kind.value}, not {v!r}")
        return v

    return enc


def _enc_start(v: Any, where: str) -> object:
    if isinstance(v, str) and v in _STARTS:
        return v
    if isinstance(v, Mapping) and set(v) == {"offset"}:
        return {"offset": _enc_u64(v["offset"], f"{where}.offset")}
    raise LocalProtocolError(f"{where} must be {FieldType.START.value}, not {v!r}")


_enc_u64 = _enc_int(_U64_MAX, FieldType.U64)

# Nullable kinds never reach these: encode_message writes None as null first.
_ENCODE: dict[FieldType, Callable[[Any, str], object]] = {
    FieldType.STR: _enc_str,
    FieldType.U64: _enc_u64,
    FieldType.FLAGS: _enc_int(_U16_MAX, FieldType.FLAGS),
    FieldType.U64_OR_NULL: _enc_u64,
    FieldType.B64: _b64_encode,
    FieldType.B64_OR_NULL: _b64_encode,
    FieldType.B64_LIST: _enc_b64_list,
    FieldType.ACK: _enc_choice(_ACKS, FieldType.ACK),
    FieldType.REASON: _enc_choice(_REASONS, FieldType.REASON),
    FieldType.START: _enc_start,
}

# Per message type: the allowed keys and (name, encoder, required, nullable) in wire order.
_ENCODE_PLAN = {
    mtype: (
        frozenset(name for name, _, _ in fields) | {"type"},
        tuple(
            (name, _ENCODE[kind], required, kind in _NULLABLE) for name, kind, required in fields
        ),
    )
    for mtype, fields in MESSAGES.items()
}


def encode_message(msg: Mapping[str, Any]) -> bytes:
    """Encode a JSON message (a dict with ``"type"``) as a whole flags-0 frame.

    Optional fields that are absent (or None) are omitted; ``cache_put.ttl_ms``
    and ``cache_value.value`` are always written, ``null`` when absent or None.
    Raises ``LocalProtocolError`` for an unknown type, a missing required field,
    an unknown key or a value of the wrong type.
    """
    if not isinstance(msg, dict) and not isinstance(msg, Mapping):
        raise LocalProtocolError(f"a message must be a dict, not {type(msg).__name__}")
    mtype = msg.get("type")
    plan = _ENCODE_PLAN.get(mtype) if isinstance(mtype, str) else None
    if plan is None:
        raise LocalProtocolError(f"unknown message type {mtype!r}")
    allowed, fields = plan
    if not allowed.issuperset(msg):
        raise LocalProtocolError(f"{mtype}: unknown fields {sorted(set(msg) - allowed)}")
    out: dict[str, object] = {"type": mtype}
    for name, encode, required, nullable in fields:
        v = msg.get(name)
        if v is None:
            if nullable:
                out[name] = None
            elif required:
                raise LocalProtocolError(f"{mtype}: missing required field {name!r}")
            continue
        out[name] = encode(v, f"{mtype}.{name}")
    try:
        body = _dumps(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{mtype}: a string is not encodable as UTF-8: {exc}") from None
    result: bytes = encode_frame(0, body)
    return result


# --- decode --------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise RemoteProtocolError(f"invalid JSON number {name}")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise RemoteProtocolError("duplicate key in JSON object")
    return obj


_loads: Callable[[str], object] = json.JSONDecoder(
    parse_constant=_reject_constant, object_pairs_hook=_unique_keys
).decode


def _dec_b64_list(v: object) -> object:
    if not isinstance(v, list):
        return None
    items = [_b64_decode(p) for p in v]
    return items if None not in items else None


def _dec_start(v: object) -> object:
    if isinstance(v, str):
        return v if v in _STARTS else None
    if isinstance(v, dict) and "offset" in v:
        off = _check_int(v["offset"], _U64_MAX)
        return None if off is None else {"offset": off}
    return None


# Each returns the decoded value, or None when the JSON value is not of the kind.
_DECODE: dict[FieldType, Callable[[object], object]] = {
    FieldType.STR: lambda v: v if isinstance(v, str) else None,
    FieldType.U64: lambda v: _check_int(v, _U64_MAX),
    FieldType.FLAGS: lambda v: _check_int(v, _U16_MAX),
    FieldType.U64_OR_NULL: lambda v: _check_int(v, _U64_MAX),
    FieldType.B64: _b64_decode,
    FieldType.B64_OR_NULL: _b64_decode,
    FieldType.B64_LIST: _dec_b64_list,
    FieldType.ACK: lambda v: v if isinstance(v, str) and v in _ACKS else None,
    FieldType.REASON: lambda v: v if isinstance(v, str) and v in _REASONS else None,
    FieldType.START: _dec_start,
}

_DECODE_PLAN = {
    mtype: tuple(
        (name, kind, _DECODE[kind], required, kind in _NULLABLE) for name, kind, required in fields
    )
    for mtype, fields in MESSAGES.items()
}


def decode_message(frame: Frame | bytes) -> dict[str, Any]:
    """Decode a flags-0 frame into a dict: the inverse of :func:`encode_message`.

    The dict holds only keys present on the wire (absent optional fields stay
    absent); ``cache_put.ttl_ms`` and ``cache_value.value`` are always present.
    Byte fields come back as ``bytes``. Errors raise ``RemoteProtocolError``.
    """
    if not isinstance(frame, Frame):
        if isinstance(frame, (bytes, bytearray, memoryview)):
            frame = decode_frame(frame)
        else:
            raise LocalProtocolError(f"decode_message needs a Frame, not {type(frame).__name__}")
    if frame.flags != 0:
        raise RemoteProtocolError(f"not a JSON frame (flags 0x{frame.flags:04x})")
    try:
        obj = _loads(frame.payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise RemoteProtocolError("JSON message is not valid UTF-8") from None
    except RecursionError:
        raise RemoteProtocolError("JSON message nests too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, int digit limits
        raise RemoteProtocolError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("a JSON message must be an object")
    mtype = obj.get("type")
    plan = _DECODE_PLAN.get(mtype) if isinstance(mtype, str) else None
    if plan is None:
        raise RemoteProtocolError(f"unknown message type {mtype!r}")
    out: dict[str, Any] = {"type": mtype}
    for name, kind, decode, required, nullable in plan:
        if name not in obj:
            if required:
                raise RemoteProtocolError(f"{mtype}: missing required field {name!r}")
            continue
        v = obj[name]
        if v is None and nullable:
            out[name] = None
            continue
        value = decode(v)
        if value is None:
            raise RemoteProtocolError(f"{mtype}.{name} must be a {kind.value}")
        out[name] = value
    return out
