"""Queue-group frames (opcodes 0x20-0x27, 0xA0-0xA4) beyond the frozen vectors: every refusal."""

from __future__ import annotations

import re
import struct
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from felix import wire
from felix.errors import LocalProtocolError, RemoteProtocolError

U64 = 2**64 - 1
LONG = "x" * 65536


def ext(opcode: int, rid: int, body: bytes) -> bytes:
    payload = struct.pack(">BQ", opcode, rid) + body
    return struct.pack(">IHHI", wire.MAGIC, 1, 0x0040, len(payload)) + payload


def settle_body(ranges: list[tuple[int, int]], *, count: int | None = None) -> bytes:
    n = len(ranges) if count is None else count
    return (
        struct.pack(">QI", 7, 0)
        + struct.pack(">H", 0)
        + struct.pack(">H", n)
        + b"".join(struct.pack(">QI", f, c) for f, c in ranges)
    )


def decode(raw: bytes) -> wire.ExtMessage:
    return wire.decode_ext(wire.decode_frame(raw, extensions=True))


# --- encoders refuse what the wire cannot say ---------------------------------------------

REFUSED_CALLS: list[Callable[[], object]] = [
    # roles
    lambda: wire.encode_consuming(1, 7, 3),
    lambda: wire.encode_consuming(1, 7, -1),
    lambda: wire.encode_consuming(1, 7, True),
    lambda: wire.encode_consuming(1, 7, "active"),  # type: ignore[arg-type]
    lambda: wire.encode_consumer_role(7, 3),
    lambda: wire.encode_consumer_role(7, None),  # type: ignore[arg-type]
    # refusal reasons and counts
    lambda: wire.encode_settled(1, [(5, 0)]),
    lambda: wire.encode_settled(1, [(5, 4)]),
    lambda: wire.encode_settled(1, [(5, True)]),
    lambda: wire.encode_settled(1, [(-1, 1)]),
    lambda: wire.encode_settled(1, [(5,)]),  # type: ignore[list-item]
    lambda: wire.encode_settled(1, [(5, 1)] * 65536),
    lambda: wire.encode_settled(1, None),  # type: ignore[arg-type]
    # settle opcodes
    lambda: wire.encode_settle(0x21, 1, 7, [(1, 1)]),
    lambda: wire.encode_settle(0x27, 1, 7, [(1, 1)]),
    lambda: wire.encode_settle(True, 1, 7, [(1, 1)]),
    # range lists
    lambda: wire.encode_ack(1, 7, []),
    lambda: wire.encode_ack(1, 7, [(i, 1) for i in range(1025)]),
    lambda: wire.encode_ack(1, 7, [(5, 0)]),
    lambda: wire.encode_ack(1, 7, [(1, 1), (5, 0)]),
    lambda: wire.encode_ack(1, 7, [(U64, 1)]),
    lambda: wire.encode_ack(1, 7, [(U64 - 5, 2**32 - 1)]),
    lambda: wire.encode_ack(1, 7, [(1, 2**32)]),
    lambda: wire.encode_ack(1, 7, [(-1, 1)]),
    lambda: wire.encode_ack(1, 7, [(1, 1, 1)]),  # type: ignore[list-item]
    lambda: wire.encode_ack(1, 7, [5]),  # type: ignore[list-item]
    lambda: wire.encode_ack(1, 7, None),  # type: ignore[arg-type]
    lambda: wire.encode_ack(1, 7, b"\x00\x01"),  # type: ignore[arg-type]
    lambda: wire.encode_nak(1, 7, [(1, 1)], delay_ms=2**32),
    lambda: wire.encode_nak(1, 7, [(1, 1)], delay_ms=-1),
    # strings over 65535 UTF-8 bytes
    lambda: wire.encode_consume(1, LONG, "n", "s", "g", 7),
    lambda: wire.encode_consume(1, "t", LONG, "s", "g", 7),
    lambda: wire.encode_consume(1, "t", "n", LONG, "g", 7),
    lambda: wire.encode_consume(1, "t", "n", "s", LONG, 7),
    lambda: wire.encode_consume(1, "t", "n", "s", "\u00e9" * 32768, 7),
    lambda: wire.encode_nak(1, 7, [(1, 1)], detail=LONG),
    lambda: wire.encode_term(1, 7, [(1, 1)], detail=LONG),
    lambda: wire.encode_consumer_end(7, 6, LONG),
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 0, {LONG: "v"}, b"")]),
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 0, {"k": LONG}, b"")]),
    # other values
    lambda: wire.encode_consume(1, "t", "n", "s", b"g", 7),  # type: ignore[arg-type]
    lambda: wire.encode_consume(1, "t", "n", "s", "g", -1),
    lambda: wire.encode_consume(1, "t", "n", "s", "g", 7, credit_records=2**32),
    lambda: wire.encode_consume(1, "t", "n", "s", "g", 7, credit_bytes=-1),
    lambda: wire.encode_consumer_window(1, 7, 2**32, 0),
    lambda: wire.encode_stop_consume(1, U64 + 1),
    lambda: wire.encode_consumer_end(7, 70000, "x"),
    lambda: wire.encode_deliveries(-1, []),
    lambda: wire.encode_deliveries(7, None),  # type: ignore[arg-type]
    lambda: wire.encode_deliveries(7, [[1, 0, 1, 0, None, b""]]),  # type: ignore[list-item]
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 0, None)]),  # type: ignore[list-item]
    lambda: wire.encode_deliveries(7, [(-1, 0, 1, 0, None, b"")]),
    lambda: wire.encode_deliveries(7, [(1, U64 + 1, 1, 0, None, b"")]),
    lambda: wire.encode_deliveries(7, [(1, 0, 2**32, 0, None, b"")]),
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 1.5, None, b"")]),  # type: ignore[list-item]
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 0, [("k", "v")], b"")]),  # type: ignore[list-item]
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 0, {"k": 1}, b"")]),  # type: ignore[dict-item]
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 0, None, "text")]),  # type: ignore[list-item]
    lambda: wire.encode_deliveries(7, [(1, 0, 1, 0, {"\ud800": "v"}, b"")]),
]


@pytest.mark.parametrize("call", REFUSED_CALLS)
def test_queue_encoders_refuse_with_local_protocol_error(call: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        call()


def test_encoders_accept_the_limits() -> None:
    top = "y" * 65535
    c = decode(wire.encode_consume(1, top, top, top, top, U64, credit_records=2**32 - 1))
    assert isinstance(c, wire.Consume)
    assert (c.group, c.consumer_id, c.credit_records) == (top, U64, 2**32 - 1)
    many = [(i * 2, 1) for i in range(1024)]
    s = decode(wire.encode_ack(1, 7, many))
    assert isinstance(s, wire.Settle) and s.ranges == many
    s = decode(wire.encode_term(1, 7, [(U64 - 2**32 + 1, 2**32 - 1)], detail=top))
    assert isinstance(s, wire.Settle)
    assert s.ranges == [(U64 - 2**32 + 1, 2**32 - 1)] and s.detail == top
    refused = [(i, 1 + i % 3) for i in range(65535)]
    r = decode(wire.encode_settled(1, refused))
    assert isinstance(r, wire.Settled) and r.refused == refused


def test_settle_conveniences_put_defaults_where_unused() -> None:
    rs = [(10, 2)]
    assert wire.encode_ack(1, 7, rs) == wire.encode_settle(wire.OP_ACK, 1, 7, rs)
    assert wire.encode_release(1, 7, rs) == wire.encode_settle(wire.OP_RELEASE, 1, 7, rs)
    assert wire.encode_in_progress(1, 7, rs) == wire.encode_settle(wire.OP_IN_PROGRESS, 1, 7, rs)
    assert wire.encode_term(1, 7, rs, detail="r") == wire.encode_settle(
        wire.OP_TERM, 1, 7, rs, detail="r"
    )
    nak = decode(wire.encode_nak(1, 7, rs))
    assert isinstance(nak, wire.Settle)
    assert (nak.opcode, nak.delay_ms, nak.detail) == (wire.OP_NAK, wire.NAK_BACKOFF, "")
    assert wire.NAK_BACKOFF == 2**32 - 1


def test_ranges_and_records_may_be_any_iterable() -> None:
    s = decode(wire.encode_ack(1, 7, ((f, 1) for f in (3, 5))))  # type: ignore[arg-type]
    assert isinstance(s, wire.Settle) and s.ranges == [(3, 1), (5, 1)]
    s = decode(wire.encode_ack(1, 7, [[3, 1]]))  # type: ignore[list-item]
    assert isinstance(s, wire.Settle) and s.ranges == [(3, 1)]
    Rec = namedtuple("Rec", "offset timestamp_us attempts failures headers payload")
    records = iter([Rec(1, 2, 3, 4, None, bytearray(b"ab")), (5, 0, 1, 0, {}, memoryview(b"c"))])
    d = decode(wire.encode_deliveries(9, records))  # type: ignore[arg-type]
    assert isinstance(d, wire.Deliveries) and d.request_id == 9
    assert [(r.offset, r.payload, r.headers) for r in d.records] == [
        (1, b"ab", None),
        (5, b"c", None),  # an empty dict is header count 0: decodes as None
    ]


def test_delivery_is_a_value() -> None:
    rec = (1, 2, 3, 4, {"k": "v"}, b"p")
    a, b = (decode(wire.encode_deliveries(7, [rec])) for _ in range(2))
    assert isinstance(a, wire.Deliveries) and isinstance(b, wire.Deliveries)
    assert a == b and a.records[0] == b.records[0]
    assert a.records[0] != decode(wire.encode_deliveries(7, [(1, 2, 3, 5, {"k": "v"}, b"p")]))
    assert repr(a.records[0]) == (
        "Delivery(offset=1, timestamp_us=2, attempts=3, failures=4, headers={'k': 'v'}, "
        "payload=b'p')"
    )
    with pytest.raises(TypeError):
        hash(a.records[0])


def test_deliveries_changed_while_encoding_are_refused_not_overrun() -> None:
    early: dict[str, str] = {}

    class Sneaky(bytes):
        def __bytes__(self) -> bytes:
            # Runs while the frame is being sized: grows a record already sized.
            early["grown"] = "x" * 1000
            return b"late"

    with pytest.raises(LocalProtocolError):
        wire.encode_deliveries(7, [(1, 0, 1, 0, early, b"a"), (2, 0, 1, 0, None, Sneaky(b"z"))])


# --- decoders refuse what breaks the layout -----------------------------------------------

REMOTE_REFUSALS: dict[str, bytes] = {
    "consuming role 3": ext(0xA0, 1, struct.pack(">QB", 7, 3)),
    "consumer role 3": ext(0xA4, 7, b"\x03"),
    "settled reason 0": ext(0xA2, 1, struct.pack(">HQB", 1, 5, 0)),
    "settled reason 4": ext(0xA2, 1, struct.pack(">HQB", 1, 5, 4)),
    "settled count beyond the body": ext(0xA2, 1, struct.pack(">HQB", 2, 5, 1)),
    "0 ranges": ext(0x22, 1, settle_body([])),
    "1025 ranges": ext(0x22, 1, settle_body([(i * 2, 1) for i in range(1025)])),
    "range count beyond the body": ext(0x22, 1, settle_body([(1, 1)], count=2)),
    "count 0": ext(0x24, 1, settle_body([(1, 1), (5, 0)])),
    "overflow": ext(0x25, 1, settle_body([(U64 - 1, 2)])),
    "deliveries count beyond the body": ext(0xA1, 7, struct.pack(">I", 1) + bytes(29)),
    "deliveries header count beyond the body": ext(
        0xA1, 7, struct.pack(">I", 1) + struct.pack(">QQIIH", 1, 0, 1, 0, 8) + bytes(4 + 27)
    ),
    "deliveries header not UTF-8": ext(
        0xA1,
        7,
        struct.pack(">I", 1)
        + struct.pack(">QQIIH", 1, 0, 1, 0, 1)
        + b"\x00\x01\xff\x00\x00"
        + bytes(4),
    ),
    "consume group not UTF-8": ext(0x20, 1, bytes(6) + b"\x00\x01\xc3" + bytes(16)),
}


@pytest.mark.parametrize("raw", REMOTE_REFUSALS.values(), ids=REMOTE_REFUSALS.keys())
def test_queue_decoders_refuse_with_remote_protocol_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(raw)


VALID: list[bytes] = [
    wire.encode_consume(1, "t", "n", "s", "g", 7, credit_records=1, credit_bytes=2),
    wire.encode_consumer_window(1, 7, 1, 2),
    *(wire.encode_settle(op, 1, 7, [(1, 2)], delay_ms=3, detail="d") for op in range(0x22, 0x27)),
    wire.encode_stop_consume(1, 7),
    wire.encode_consuming(1, 7, wire.ROLE_STANDBY),
    wire.encode_deliveries(7, [(1, 2, 3, 4, {"k": "v"}, b"p"), (2, 0, 1, 0, None, b"")]),
    wire.encode_settled(1, [(1, wire.REFUSED_STALE)]),
    wire.encode_consumer_end(7, 6, "m"),
    wire.encode_consumer_role(7, wire.ROLE_ACTIVE),
]


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: f"0x{raw[12]:02x}")
def test_trailing_bytes_are_refused(raw: bytes) -> None:
    decode(raw)
    grown = raw[:8] + struct.pack(">I", len(raw) - 12 + 1) + raw[12:] + b"\x00"
    with pytest.raises(RemoteProtocolError):
        decode(grown)


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: f"0x{raw[12]:02x}")
def test_every_shortened_body_is_refused(raw: bytes) -> None:
    for cut in range(12 + 9, len(raw)):
        body = raw[12:cut]
        with pytest.raises(RemoteProtocolError):
            decode(raw[:8] + struct.pack(">I", len(body)) + body)


def test_decoded_classes_and_fields() -> None:
    expected: dict[int, tuple[type, dict[str, Any]]] = {
        0x20: (
            wire.Consume,
            {"group": "g", "consumer_id": 7, "credit_records": 1, "credit_bytes": 2},
        ),
        0x21: (wire.ConsumerWindow, {"consumer_id": 7, "credit_records": 1, "credit_bytes": 2}),
        0x22: (wire.Settle, {"consumer_id": 7, "delay_ms": 3, "detail": "d", "ranges": [(1, 2)]}),
        0x27: (wire.ConsumerOp, {"consumer_id": 7}),
        0xA0: (wire.Consuming, {"consumer_id": 7, "role": wire.ROLE_STANDBY}),
        0xA2: (wire.Settled, {"refused": [(1, wire.REFUSED_STALE)]}),
        0xA3: (wire.ErrorReply, {"code": 6, "message": "m"}),
        0xA4: (wire.ConsumerRole, {"role": wire.ROLE_ACTIVE}),
    }
    for raw in VALID:
        msg = decode(raw)
        assert wire.ext_request_id(wire.decode_frame(raw, extensions=True)) == (
            msg.opcode,
            msg.request_id,
        )
        if msg.opcode in expected:
            cls, fields = expected[msg.opcode]
            assert type(msg) is cls
            assert {k: getattr(msg, k) for k in fields} == fields
    d = decode(next(raw for raw in VALID if raw[12] == wire.OP_DELIVERIES))
    assert isinstance(d, wire.Deliveries)
    assert [
        (r.offset, r.timestamp_us, r.attempts, r.failures, r.headers, r.payload) for r in d.records
    ] == [
        (1, 2, 3, 4, {"k": "v"}, b"p"),
        (2, 0, 1, 0, None, b""),
    ]
    assert (wire.ROLE_MEMBER, wire.ROLE_ACTIVE, wire.ROLE_STANDBY) == (0, 1, 2)
    assert (wire.REFUSED_STALE, wire.REFUSED_DEAD, wire.REFUSED_UNKNOWN) == (1, 2, 3)


def test_worked_examples_in_the_wire_doc_are_byte_exact() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "wire-protocol.md").read_text()
    examples = re.findall(r"`(encode_\w+\(.*?\))`[^`\n]*:\n\n```\n(.*?)```", doc, re.S)
    assert len(examples) >= 3  # CACHE_GET, DELIVERIES, ACK
    for call, block in examples:
        # Each line: hex groups, then two or more spaces, then the comment.
        hexed = "".join(line.split("  ")[0].replace(" ", "") for line in block.splitlines())
        assert eval(call, {"__builtins__": {}}, vars(wire)).hex() == hexed, call


def test_records_swapped_while_encoding_do_not_reach_the_frame() -> None:
    records: list[Any] = []

    class Swapper(bytes):
        def __bytes__(self) -> bytes:
            records[0] = "not a record"
            return b"late"

    records += [(1, 0, 1, 0, None, b"a"), (2, 0, 1, 0, None, Swapper(b"z"))]
    d = decode(wire.encode_deliveries(7, records))
    assert isinstance(d, wire.Deliveries)
    assert [(r.offset, r.payload) for r in d.records] == [(1, b"a"), (2, b"late")]
