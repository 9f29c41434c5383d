"""JSON messages: v1 layout rules (docs/wire-protocol.md) beyond the vectors, and caller errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from felix import wire
from felix.errors import FelixError, LocalProtocolError, RemoteProtocolError


def _json(frame: bytes) -> str:
    return frame[12:].decode("utf-8")


def test_type_first_then_table_order_regardless_of_dict_order() -> None:
    msg = {
        "ack": "none",
        "payload": b"x",
        "stream": "s",
        "request_id": 1,
        "namespace": "n",
        "tenant_id": "t",
        "type": "publish",
    }
    assert _json(wire.encode_message(msg)) == (
        '{"type":"publish","tenant_id":"t","namespace":"n","stream":"s","payload":"eA==",'
        '"request_id":1,"ack":"none"}'
    )


def test_optional_none_is_omitted_and_nullable_fields_always_written() -> None:
    put = {
        "type": "cache_put",
        "tenant_id": "t",
        "namespace": "n",
        "cache": "c",
        "key": "k",
        "value": b"",
        "request_id": None,
    }
    assert _json(wire.encode_message(put)).endswith('"value":"","ttl_ms":null}')
    val = {"type": "cache_value", "tenant_id": "t", "namespace": "n", "cache": "c", "key": "k"}
    text = _json(wire.encode_message(val))
    assert text.endswith('"key":"k","value":null}')
    decoded = wire.decode_message(wire.encode_message(val))
    assert decoded["value"] is None and "request_id" not in decoded


def test_non_ascii_written_raw() -> None:
    frame = wire.encode_message({"type": "error", "message": "zürich ✓ 😀"})
    assert "zürich ✓ 😀".encode() in frame
    assert b"\\u" not in frame


def test_bytes_like_payloads_accepted() -> None:
    msg = {
        "type": "publish_batch",
        "tenant_id": "t",
        "namespace": "n",
        "stream": "s",
        "payloads": [bytearray(b"a"), memoryview(b"b")],
    }
    assert wire.decode_message(wire.encode_message(msg))["payloads"] == [b"a", b"b"]


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "nope"},
        {"no": "type"},
        {"type": "publish_ok"},  # missing required field
        {"type": "publish_ok", "request_id": -1},
        {"type": "publish_ok", "request_id": 2**64},
        {"type": "publish_ok", "request_id": True},
        {"type": "publish_ok", "request_id": "1"},
        {"type": "publish_ok", "request_id": 1, "extra": 2},
        {"type": "auth_ok", "server_flags": 0x10000},
        {"type": "error", "message": b"bytes"},
        {"type": "error", "message": "lone \ud800 surrogate"},
        {"type": "publish", "tenant_id": "t", "namespace": "n", "stream": "s", "payload": "str"},
        {
            "type": "publish",
            "tenant_id": "t",
            "namespace": "n",
            "stream": "s",
            "payload": b"",
            "ack": "always",
        },
        {
            "type": "publish_batch",
            "tenant_id": "t",
            "namespace": "n",
            "stream": "s",
            "payloads": b"not a list",
        },
        {"type": "subscribe", "tenant_id": "t", "namespace": "n", "stream": "s", "start": 5},
        {
            "type": "subscribe",
            "tenant_id": "t",
            "namespace": "n",
            "stream": "s",
            "start": {"offset": 1, "x": 2},
        },
        {"type": "subscribe_cursor_error", "reason": "gone", "requested": 1, "available": 2},
    ],
)
def test_caller_mistakes_raise_local_protocol_error(msg: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_message(msg)


def test_encode_message_rejects_non_dict() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_message(["type", "ok"])  # type: ignore[arg-type]


def _raw(obj: Any) -> bytes:
    return wire.encode_frame(0, json.dumps(obj).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"null",
        b'"ok"',
        b'{"type":"ok"} x',
        b'{"type":"ok","type":"error"}',
        b'{"type":"error","message":Infinity}',
        b"\xef\xbb\xbf" + b'{"type":"ok"}',  # UTF-8 BOM
        '{"type":"ok"}'.encode("utf-16"),
        b"[" * 50000 + b"]" * 50000,
        b'{"type":"publish_ok","request_id":' + b"9" * 5000 + b"}",
        b'{"type":"subscribe","tenant_id":"t","namespace":"n","stream":"s","start":{"o":1}}',
        b'{"type":"subscribe","tenant_id":"t","namespace":"n","stream":"s","start":"middle"}',
        b'{"type":"cache_value","tenant_id":"t","namespace":"n","cache":"c","key":"k"}',
        b'{"type":"publish_batch","tenant_id":"t","namespace":"n","stream":"s","payloads":[1]}',
        b'{"type":"auth","tenant_id":"t","token":null}',
        b'{"type":"auth","tenant_id":"t","token":"x","client_flags":70000}',
    ],
)
def test_malformed_json_raises_remote_protocol_error_only(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode_message(wire.decode_frame(wire.encode_frame(0, payload)))


def test_unknown_keys_ignored_and_not_returned() -> None:
    frame = _raw({"type": "subscribed", "future_field": [1, {"a": None}], "subscription_id": 3})
    assert wire.decode_message(wire.decode_frame(frame)) == {
        "type": "subscribed",
        "subscription_id": 3,
    }


def test_start_object_ignores_unknown_inner_keys() -> None:
    frame = _raw(
        {
            "type": "subscribe",
            "tenant_id": "t",
            "namespace": "n",
            "stream": "s",
            "start": {"offset": 9, "hint": True},
        }
    )
    assert wire.decode_message(wire.decode_frame(frame))["start"] == {"offset": 9}


def test_decode_message_refuses_binary_frames() -> None:
    frame = wire.decode_frame(wire.encode_event_batch([b"x"]))
    with pytest.raises(RemoteProtocolError):
        wire.decode_message(frame)


def test_errors_share_one_root() -> None:
    assert issubclass(RemoteProtocolError, FelixError)
    assert issubclass(LocalProtocolError, FelixError)
