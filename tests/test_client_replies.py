"""expect_reply: a reply is returned typed by its class only with the expected opcode."""

from __future__ import annotations

import pytest

from felix import wire
from felix.client._connection import expect_reply
from felix.errors import AlreadyExists, NotFound, RemoteProtocolError


def reply(frame: bytes) -> wire.ExtMessage:
    return wire.decode_ext(frame)


def test_the_expected_reply_comes_back_typed() -> None:
    stored = expect_reply(
        reply(wire.encode_cache_stored(7, True)), wire.CacheResult, wire.OP_CACHE_STORED
    )
    assert stored.result is True and stored.request_id == 7


def test_same_class_other_opcode_is_a_protocol_error() -> None:
    # CacheResult carries both answers: a DELETED where STORED was asked is a broken broker.
    with pytest.raises(RemoteProtocolError, match="0x83 where 0x82"):
        expect_reply(
            reply(wire.encode_cache_deleted(7, True)), wire.CacheResult, wire.OP_CACHE_STORED
        )


def test_errors_become_their_classes() -> None:
    with pytest.raises(NotFound, match="no such cache"):
        expect_reply(
            reply(wire.encode_error(7, 2, "no such cache")), wire.CacheValue, wire.OP_CACHE_VALUE
        )
    with pytest.raises(AlreadyExists):
        expect_reply(reply(wire.encode_error(7, 9, "exists")), wire.ExtMessage, wire.OP_OK)
