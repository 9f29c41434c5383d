"""Byte-exact vectors: FLX1 v1 (docs/wire-protocol.md's v1 tables) and felix's extension family."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from felix import wire
from felix.errors import RemoteProtocolError

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text("utf-8"))
    return data


def _bytes(obj: Any) -> Any:
    """Turn {"$bytes": hex} leaves back into bytes, {"$start_at_time": us} into StartAtTime,
    {"$tuple": [...]} into a tuple."""
    if isinstance(obj, dict):
        if set(obj) == {"$bytes"}:
            return bytes.fromhex(obj["$bytes"])
        if set(obj) == {"$start_at_time"}:
            return wire.StartAtTime(obj["$start_at_time"])
        if set(obj) == {"$tuple"}:
            return tuple(_bytes(obj["$tuple"]))
        return {k: _bytes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_bytes(v) for v in obj]
    return obj


_DELIVERY_FIELDS = ("offset", "timestamp_us", "attempts", "failures", "headers", "payload")


def _plain(value: Any) -> Any:
    """A decoded value as JSON can state it: pairs as lists, a Delivery as a dict of its fields."""
    if isinstance(value, wire.Delivery):
        return {name: getattr(value, name) for name in _DELIVERY_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


V1 = _load("flx1-v1.json")["vectors"]
EXT = _load("felix-ext.json")


def _ids(vs: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vs]


MESSAGES = [v for v in V1 if v["api"] == "message"]
DECODE_ONLY = [v for v in V1 if v["api"] == "decode_message"]
BINARY = [v for v in V1 if v["api"] in ("publish_batch", "publish_ack", "event_batch")]
ERRORS = [v for v in V1 if v["api"] == "error"]


@pytest.mark.parametrize("vec", MESSAGES, ids=_ids(MESSAGES))
def test_json_message_encodes_byte_exact_and_decodes(vec: dict[str, Any]) -> None:
    frame = bytes.fromhex(vec["frame"])
    message = _bytes(vec["message"])
    assert wire.encode_message(message) == frame
    assert wire.decode_message(wire.decode_frame(frame)) == message


@pytest.mark.parametrize("vec", DECODE_ONLY, ids=_ids(DECODE_ONLY))
def test_json_message_decodes_non_canonical_input(vec: dict[str, Any]) -> None:
    frame = wire.decode_frame(bytes.fromhex(vec["frame"]))
    assert wire.decode_message(frame) == _bytes(vec["message"])


_ENCODERS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "publish_batch": (wire.encode_publish_batch, wire.decode_publish_batch),
    "publish_ack": (wire.encode_publish_ack, wire.decode_publish_ack),
    "event_batch": (wire.encode_event_batch, wire.decode_event_batch),
}


@pytest.mark.parametrize("vec", BINARY, ids=_ids(BINARY))
def test_binary_layout_encodes_byte_exact_and_decodes(vec: dict[str, Any]) -> None:
    encode, decode = _ENCODERS[vec["api"]]
    args = _bytes(vec["args"])
    positional = {
        "publish_batch": ("tenant_id", "namespace", "stream", "payloads"),
        "publish_ack": ("request_id", "error"),
        "event_batch": ("payloads",),
    }[vec["api"]]
    pos = [args.pop(name) for name in positional if name in args]
    frame = bytes.fromhex(vec["frame"])
    assert encode(*pos, **args) == frame
    decoded = decode(wire.decode_frame(frame))
    for name, expected in _bytes(vec["decoded"]).items():
        assert getattr(decoded, name) == expected, name


_DECODERS = {
    "frame": lambda b: wire.decode_frame(b),
    "message": lambda b: wire.decode_message(wire.decode_frame(b)),
    "publish_batch": lambda b: wire.decode_publish_batch(wire.decode_frame(b)),
    "publish_ack": lambda b: wire.decode_publish_ack(wire.decode_frame(b)),
    "event_batch": lambda b: wire.decode_event_batch(wire.decode_frame(b)),
}


@pytest.mark.parametrize("vec", ERRORS, ids=_ids(ERRORS))
def test_malformed_input_raises_remote_protocol_error(vec: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        _DECODERS[vec["decoder"]](bytes.fromhex(vec["frame"]))


@pytest.mark.parametrize("vec", EXT["vectors"], ids=_ids(EXT["vectors"]))
def test_extension_frame_encodes_byte_exact_and_decodes(vec: dict[str, Any]) -> None:
    encode = getattr(wire, vec["encoder"])
    frame = bytes.fromhex(vec["frame"])
    assert encode(*_bytes(vec["args"]), **_bytes(vec.get("kwargs", {}))) == frame
    decoded = wire.decode_ext(wire.decode_frame(frame, extensions=True))
    expected = _bytes(vec["decoded"])
    assert type(decoded).__name__ == expected.pop("class")
    for name, value in expected.items():
        assert _plain(getattr(decoded, name)) == value, name
    assert wire.ext_request_id(wire.decode_frame(frame, extensions=True)) == (
        expected["opcode"],
        expected["request_id"],
    )


@pytest.mark.parametrize("vec", EXT["errors"], ids=_ids(EXT["errors"]))
def test_malformed_extension_frame_raises(vec: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode_ext(wire.decode_frame(bytes.fromhex(vec["frame"]), extensions=True))


@pytest.mark.parametrize("vec", EXT["decode_only"], ids=_ids(EXT["decode_only"]))
def test_extension_frame_decodes_older_layout(vec: dict[str, Any]) -> None:
    decoded = wire.decode_ext(wire.decode_frame(bytes.fromhex(vec["frame"]), extensions=True))
    expected = _bytes(vec["decoded"])
    assert type(decoded).__name__ == expected.pop("class")
    for name, value in expected.items():
        assert _plain(getattr(decoded, name)) == value, name


def test_every_extension_opcode_has_a_vector() -> None:
    ops = {getattr(wire, n) for n in wire.__all__ if n.startswith("OP_")}
    covered = {v["decoded"]["opcode"] for v in EXT["vectors"]}
    assert sorted(ops - covered) == []
