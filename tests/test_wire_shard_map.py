"""SHARD_MAP (0x32) and SHARD_MAP_REPLY (0x85) beyond the frozen vectors: limits and refusals."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from felix import wire
from felix.errors import LocalProtocolError, RemoteProtocolError

U64 = 2**64 - 1
NO = wire.SHARD_NO_OWNER
ADDRS = ["10.0.0.1:5000", "10.0.0.2:5000"]


def ext(opcode: int, rid: int, body: bytes) -> bytes:
    payload = struct.pack(">BQ", opcode, rid) + body
    return struct.pack(">IHHI", wire.MAGIC, 1, 0x0040, len(payload)) + payload


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def map_body(
    logical: int,
    version: int,
    addresses: list[str],
    shards: list[tuple[int, int]],
    *,
    node_count: int | None = None,
    shard_count: int | None = None,
) -> bytes:
    nodes = len(addresses) if node_count is None else node_count
    count = len(shards) if shard_count is None else shard_count
    return (
        struct.pack(">IQH", logical, version, nodes)
        + b"".join(_str(a) for a in addresses)
        + struct.pack(">I", count)
        + b"".join(struct.pack(">HQ", o, e) for o, e in shards)
    )


def decode(raw: bytes) -> wire.ExtMessage:
    return wire.decode_ext(wire.decode_frame(raw, extensions=True))


def test_constants() -> None:
    assert (wire.OP_SHARD_MAP, wire.OP_SHARD_MAP_REPLY, wire.SHARD_NO_OWNER) == (0x32, 0x85, 0xFFFF)


def test_request_round_trip() -> None:
    raw = wire.encode_shard_map_request(U64)
    m = decode(raw)
    assert isinstance(m, wire.ShardMapRequest)
    assert (m.opcode, m.request_id) == (wire.OP_SHARD_MAP, U64)
    assert raw == ext(0x32, U64, b"")
    assert m == decode(raw)
    assert repr(m) == f"ShardMapRequest(opcode=0x32, request_id={U64})"


def test_reply_round_trip_and_layout() -> None:
    raw = wire.encode_shard_map(5, 4, 9, ADDRS, [1, NO, 0, 1], [3, 0, U64, 1])
    assert raw == ext(0x85, 5, map_body(4, 9, ADDRS, [(1, 3), (NO, 0), (0, U64), (1, 1)]))
    m = decode(raw)
    assert isinstance(m, wire.ShardMap)
    assert (m.opcode, m.request_id, m.logical_shards, m.version) == (0x85, 5, 4, 9)
    assert (m.addresses, m.owners, m.epochs) == (ADDRS, [1, NO, 0, 1], [3, 0, U64, 1])
    assert m == decode(raw)
    assert "addresses=['10.0.0.1:5000', '10.0.0.2:5000']" in repr(m)


def test_reply_of_a_node_not_in_a_cluster() -> None:
    m = decode(wire.encode_shard_map(1, 0, 0, [], [], []))
    assert isinstance(m, wire.ShardMap)
    assert (m.logical_shards, m.version, m.addresses, m.owners, m.epochs) == (0, 0, [], [], [])


def test_encoder_accepts_the_limits_and_any_sequence() -> None:
    addrs = [f"node-{i}.felix:{5000 + i}" for i in range(1024)]
    owners = [i % 1024 if i % 7 else NO for i in range(4096)]
    epochs = list(range(4096))
    m = decode(wire.encode_shard_map(1, 4096, U64, tuple(addrs), iter(owners), epochs))  # type: ignore[arg-type]
    assert isinstance(m, wire.ShardMap)
    assert (m.addresses, m.owners, m.epochs, m.version) == (addrs, owners, epochs, U64)
    # Shards all without an owner, and nodes that own nothing, are fine.
    m = decode(wire.encode_shard_map(1, 2, 1, ADDRS, [NO, NO], [0, 0]))
    assert isinstance(m, wire.ShardMap) and m.owners == [NO, NO]
    top = "h" * 65535
    m = decode(wire.encode_shard_map(1, 1, 1, [top], [0], [1]))
    assert isinstance(m, wire.ShardMap) and m.addresses == [top]


REFUSED_CALLS: list[Callable[[], object]] = [
    lambda: wire.encode_shard_map(1, 4097, 1, ["a:1"], [0] * 4097, [0] * 4097),
    lambda: wire.encode_shard_map(1, -1, 1, [], [], []),
    lambda: wire.encode_shard_map(1, 1, -1, ["a:1"], [0], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"] * 1025, [0], [0]),
    lambda: wire.encode_shard_map(1, 2, 1, ["a:1"], [0], [0, 0]),
    lambda: wire.encode_shard_map(1, 2, 1, ["a:1"], [0, 0], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [1], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, [], [0], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [0xFFFE], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [0x10000], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [-1], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [True], [0]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [0], [U64 + 1]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [0], [-1]),
    lambda: wire.encode_shard_map(1, 1, 1, ["a:1"], [0], [1.0]),  # type: ignore[list-item]
    lambda: wire.encode_shard_map(1, 1, 1, [b"a:1"], [0], [1]),  # type: ignore[list-item]
    lambda: wire.encode_shard_map(1, 1, 1, ["x" * 65536], [0], [1]),
    lambda: wire.encode_shard_map(1, 1, 1, ["\ud800"], [0], [1]),
    lambda: wire.encode_shard_map(1, 1, 1, "a:1", [0], [1]),
    lambda: wire.encode_shard_map(1, 0, 0, None, [], []),  # type: ignore[arg-type]
    lambda: wire.encode_shard_map(-1, 0, 0, [], [], []),
    lambda: wire.encode_shard_map_request(-1),
]


@pytest.mark.parametrize("call", REFUSED_CALLS)
def test_encoders_refuse_with_local_protocol_error(call: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        call()


REMOTE_REFUSALS: dict[str, bytes] = {
    "request with a body": ext(0x32, 1, b"\x00"),
    "4097 logical shards": ext(0x85, 1, map_body(4097, 1, [], [(NO, 0)] * 4097)),
    "1025 nodes": ext(0x85, 1, map_body(1, 1, ["a:1"] * 1025, [(0, 0)])),
    "node count beyond the body": ext(0x85, 1, map_body(0, 0, [], [], node_count=2)),
    "shard count below logical shards": ext(
        0x85, 1, map_body(2, 1, ["a:1"], [(0, 1)], shard_count=1)
    ),
    "shard count above logical shards": ext(
        0x85, 1, map_body(1, 1, ["a:1"], [(0, 1), (0, 1)], shard_count=2)
    ),
    "shard count beyond the body": ext(0x85, 1, map_body(3, 1, ["a:1"], [(0, 1)] * 2)),
    "owner equal to the node count": ext(0x85, 1, map_body(1, 1, ADDRS, [(2, 1)])),
    "owner 0xfffe": ext(0x85, 1, map_body(1, 1, ADDRS, [(0xFFFE, 1)])),
    "owner with no nodes": ext(0x85, 1, map_body(1, 1, [], [(0, 1)])),
    "address not UTF-8": ext(
        0x85, 1, struct.pack(">IQH", 1, 1, 1) + b"\x00\x01\xff" + struct.pack(">IHQ", 1, 0, 1)
    ),
}


@pytest.mark.parametrize("raw", REMOTE_REFUSALS.values(), ids=REMOTE_REFUSALS.keys())
def test_decoder_refuses_with_remote_protocol_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(raw)


VALID = [
    wire.encode_shard_map_request(3),
    wire.encode_shard_map(3, 0, 0, [], [], []),
    wire.encode_shard_map(3, 3, 7, ADDRS, [0, 1, NO], [4, 1, 2]),
]


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: f"{raw[12]:02x}-{len(raw)}")
def test_trailing_bytes_are_refused(raw: bytes) -> None:
    decode(raw)
    grown = raw[:8] + struct.pack(">I", len(raw) - 12 + 1) + raw[12:] + b"\x00"
    with pytest.raises(RemoteProtocolError):
        decode(grown)


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: f"{raw[12]:02x}-{len(raw)}")
def test_every_shortened_body_is_refused(raw: bytes) -> None:
    for cut in range(12 + 9, len(raw)):
        body = raw[12:cut]
        with pytest.raises(RemoteProtocolError):
            decode(raw[:8] + struct.pack(">I", len(body)) + body)


def test_request_id_of_a_malformed_reply_is_readable() -> None:
    raw = ext(0x85, 42, map_body(1, 1, [], [(0, 1)]))
    with pytest.raises(RemoteProtocolError):
        decode(raw)
    assert wire.ext_request_id(wire.decode_frame(raw, extensions=True)) == (0x85, 42)
