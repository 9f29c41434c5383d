"""Binary layouts, the extension family and FrameReader beyond the frozen vectors."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from felix import wire
from felix.errors import LocalProtocolError, RemoteProtocolError


@pytest.mark.parametrize(
    "kwargs",
    [
        {"request_id": 1},  # request id without ack mode
        {"request_id": 1, "ack": "none"},
        {"ack": "per_message"},  # ack mode without request id
        {"ack": "sometimes", "request_id": 1},
        {"ack": "per_batch", "request_id": -1},
        {"ack": "per_batch", "request_id": 2**64},
        {"ack": "per_batch", "request_id": "1"},
    ],
)
def test_publish_batch_caller_mistakes(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_publish_batch("t", "n", "s", [b"x"], **kwargs)


@pytest.mark.parametrize(
    "args",
    [
        ("t" * 65536, "n", "s", [b"x"]),
        (b"t", "n", "s", [b"x"]),
        ("t", "n", "s", b"not a list"),
        ("t", "n", "s", ["text"]),
        ("t", "n", "s", 5),
        ("t\ud800", "n", "s", []),
    ],
)
def test_publish_batch_bad_values(args: tuple[Any, ...]) -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_publish_batch(*args)


def test_publish_batch_none_ack_is_plain_form() -> None:
    assert wire.encode_publish_batch("t", "n", "s", [b"x"], ack="none") == (
        wire.encode_publish_batch("t", "n", "s", [b"x"])
    )
    batch = wire.decode_publish_batch(wire.encode_publish_batch("t", "n", "s", (b"x",)))
    assert batch.request_id is None and batch.ack is None


def test_publish_batch_accepts_any_iterable_of_bytes_like() -> None:
    frame = wire.encode_publish_batch("t", "n", "s", (p for p in [bytearray(b"a"), b"b"]))  # type: ignore[arg-type]
    assert wire.decode_publish_batch(frame).payloads == [b"a", b"b"]


def test_max_string_length_is_accepted() -> None:
    name = "x" * 65535
    assert (
        wire.decode_publish_batch(wire.encode_publish_batch(name, "n", "s", [])).tenant_id == name
    )


def test_publish_ack_empty_error_is_still_an_error() -> None:
    ack = wire.decode_publish_ack(wire.encode_publish_ack(1, ""))
    assert ack.ok is False and ack.message == ""


def test_decoders_check_the_frame_kind() -> None:
    ack = wire.decode_frame(wire.encode_publish_ack(1))
    with pytest.raises(RemoteProtocolError):
        wire.decode_publish_batch(ack)
    with pytest.raises(RemoteProtocolError):
        wire.decode_event_batch(ack)
    with pytest.raises(RemoteProtocolError):
        wire.decode_publish_ack(wire.decode_frame(wire.encode_event_batch([])))
    with pytest.raises(RemoteProtocolError):
        wire.decode_ext(ack)


def test_hand_made_frame_with_bad_flags_is_rejected_by_decoders() -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode_publish_batch(wire.Frame(1, 0x0003, b""))
    with pytest.raises(RemoteProtocolError):
        wire.decode_event_batch(wire.Frame(2, 0x0004, b"\x00\x00\x00\x00"))


def test_decode_frame_accepts_bytes_like() -> None:
    raw = wire.encode_event_batch([b"abc"], base_offset=1)
    assert wire.decode_frame(bytearray(raw)) == wire.decode_frame(memoryview(raw))
    with pytest.raises(RemoteProtocolError):
        wire.decode_frame(b"")
    with pytest.raises(LocalProtocolError):
        wire.decode_frame("text")  # type: ignore[arg-type]


def test_extension_bit_only_after_negotiation() -> None:
    raw = wire.encode_ping(1)
    with pytest.raises(RemoteProtocolError):
        wire.decode_frame(raw)
    assert wire.decode_frame(raw, extensions=True).flags == wire.FLAG_FELIX_EXT
    with pytest.raises(RemoteProtocolError):
        wire.decode_frame(struct.pack(">IHHI", wire.MAGIC, 1, 0x0041, 0), extensions=True)


def test_ext_request_id_survives_a_malformed_body() -> None:
    raw = wire.encode_cache_get(99, "t", "n", "c", "k")[:-1]
    raw = raw[:8] + struct.pack(">I", len(raw) - 12) + raw[12:]
    frame = wire.decode_frame(raw, extensions=True)
    with pytest.raises(RemoteProtocolError):
        wire.decode_ext(frame)
    assert wire.ext_request_id(frame) == (wire.OP_CACHE_GET, 99)
    assert wire.ext_request_id(wire.decode_frame(wire.encode_publish_ack(1))) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: wire.encode_cache_set(1, "t", "n", "c", "k", b"v", mode=3),
        lambda: wire.encode_cache_set(1, "t", "n", "c", "k", "str"),  # type: ignore[arg-type]
        lambda: wire.encode_cache_set(1, "t", "n", "c", "k", b"v", ttl_ms=-5),
        lambda: wire.encode_subscribe(1, "t", "n", "s", 1, start="middle"),
        lambda: wire.encode_subscribe(1, "t", "n", "s", 1, start=True),
        lambda: wire.encode_subscribe(1, "t", "n", "s", 1, credit=2**32),
        lambda: wire.encode_subscribe(1, "t", "n", "s", 1, start=wire.StartAtTime(2**64)),
        lambda: wire.encode_subscribe(1, "t", "n", "s", 1, start=wire.StartAtTime(-1)),
        lambda: wire.encode_subscribe(1, "t", "n", "s", 1, start=wire.StartAtTime(1.5)),  # type: ignore[arg-type]
        lambda: wire.encode_publish_offsets(1, 0, 1, 3),
        lambda: wire.encode_publish_offsets(1, 0, 1, -1),
        lambda: wire.encode_publish_offsets(1, 0, 1, True),
        lambda: wire.encode_publish_offsets(1, 0, 1, "synced"),  # type: ignore[arg-type]
        lambda: wire.encode_publish(1, "t", "n", "s", [b"a"], headers=[{"k": "v"}, None]),
        lambda: wire.encode_publish(1, "t", "n", "s", [b"a"], headers=[{"k": 1}]),  # type: ignore[dict-item]
        lambda: wire.encode_publish(1, "t", "n", "s", [b"a"], ack=7),
        lambda: wire.encode_error(1, 70000, "x"),
        lambda: wire.encode_cursor_error(1, "later", 1, 2),
        lambda: wire.encode_cache_ttl_reply(1, 5),
    ],
)
def test_extension_caller_mistakes(call: Any) -> None:
    with pytest.raises(LocalProtocolError):
        call()


# --- FrameReader -----------------------------------------------------------------------

FRAMES = [
    wire.encode_message({"type": "ok"}),
    wire.encode_publish_batch("t", "n", "s", [b"x" * 100, b""]),
    wire.encode_event_batch([b"e"] * 5, base_offset=10),
    wire.encode_publish_ack(3, "nope"),
]


def test_reader_whole_and_byte_by_byte() -> None:
    stream = b"".join(FRAMES)
    whole = wire.FrameReader(1024)
    whole.feed(stream)
    expected = [wire.decode_frame(f) for f in FRAMES]
    assert list(whole) == expected
    trickle = wire.FrameReader(1024)
    got: list[wire.Frame] = []
    for i in range(len(stream)):
        trickle.feed(stream[i : i + 1])
        got.extend(trickle)
    assert got == expected
    assert trickle.buffered == 0


def test_reader_refuses_oversized_frame_from_its_header() -> None:
    reader = wire.FrameReader(max_frame_size=64)
    # Refused on the header alone, before the 65 bytes arrive.
    with pytest.raises(RemoteProtocolError):
        reader.feed(struct.pack(">IHHI", wire.MAGIC, 1, 0, 65))
    with pytest.raises(RemoteProtocolError):
        list(reader)
    # And it stays broken: the stream is out of sync.
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"x")


def test_reader_refuses_oversized_frame_after_a_good_one() -> None:
    reader = wire.FrameReader(max_frame_size=64)
    good = wire.encode_message({"type": "ok"})
    reader.feed(good + struct.pack(">IHHI", wire.MAGIC, 1, 0, 1 << 31))
    assert next(reader) == wire.decode_frame(good)
    with pytest.raises(RemoteProtocolError):
        next(reader)


def test_reader_trailing_garbage_raises() -> None:
    reader = wire.FrameReader(1024)
    reader.feed(FRAMES[0] + b"GARBAGE-GARBAGE")
    frames = []
    with pytest.raises(RemoteProtocolError):
        for f in reader:
            frames.append(f)
    assert frames == [wire.decode_frame(FRAMES[0])]


def test_reader_flag_policy_follows_negotiation() -> None:
    ping = wire.encode_ping(1)
    v1_only = wire.FrameReader(1024)
    with pytest.raises(RemoteProtocolError):
        v1_only.feed(ping)
    negotiated = wire.FrameReader(1024, accept_flags=wire.FLAGS_ALL)
    negotiated.feed(ping)
    assert [f.flags for f in negotiated] == [wire.FLAG_FELIX_EXT]
    base = wire.FrameReader(1024, accept_flags=wire.FLAGS_BASE)
    with pytest.raises(RemoteProtocolError):
        base.feed(wire.encode_publish_ack(1))


def test_reader_limit_can_be_raised_after_auth() -> None:
    reader = wire.FrameReader(max_frame_size=16)
    big = wire.encode_event_batch([b"x" * 100])
    reader.max_frame_size = 1024
    reader.feed(big)
    assert len(list(reader)) == 1


def test_reader_keeps_only_incomplete_bytes() -> None:
    reader = wire.FrameReader(1024)
    for _ in range(1000):
        reader.feed(FRAMES[1] + FRAMES[1][:7])
        assert len(list(reader)) >= 1
        reader.feed(FRAMES[1][7:])
        assert len(list(reader)) == 1
    assert reader.buffered == 0


def test_start_at_time_is_a_value() -> None:
    a = wire.StartAtTime(1_767_225_600_000_000)
    assert a == wire.StartAtTime(1_767_225_600_000_000)
    assert a != wire.StartAtTime(1)
    assert a != 1_767_225_600_000_000
    assert len({a, wire.StartAtTime(1_767_225_600_000_000)}) == 1
    assert repr(a) == "StartAtTime(timestamp_us=1767225600000000)"


def test_publish_offsets_durability_round_trips() -> None:
    for level in (wire.DURABILITY_MEMORY, wire.DURABILITY_WRITTEN, wire.DURABILITY_SYNCED):
        raw = wire.encode_publish_offsets(4, 10, 2, level)
        decoded = wire.decode_ext(wire.decode_frame(raw, extensions=True))
        assert isinstance(decoded, wire.PublishOffsets)
        assert (decoded.base_offset, decoded.count, decoded.durability) == (10, 2, level)
    # The default is MEMORY, so existing callers keep their meaning.
    assert wire.encode_publish_offsets(4, 10, 2) == wire.encode_publish_offsets(4, 10, 2, 0)
