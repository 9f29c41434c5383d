"""felix.client._convert: names, TTL rounding, URLs and subscription starts."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix import wire
from felix.client._convert import (
    Endpoint,
    parse_url,
    resolve_name,
    start_spec,
    time_start,
    ttl_from_wire,
    ttl_to_ms,
)
from felix.errors import BadRequest, ConfigError, RemoteProtocolError

# -- names -----------------------------------------------------------------------------


def test_relative_name_uses_the_client_namespace() -> None:
    assert resolve_name("stream", "orders", "prod") == ("prod", "orders")


def test_slash_names_another_namespace() -> None:
    assert resolve_name("cache", "billing/sessions", "prod") == ("billing", "sessions")


@pytest.mark.parametrize(
    "name",
    ["", "/x", "x/", "a/b/c", "../x", "a b", "x" * 65, "ns/" + "x" * 65, "orders*", "é"],
)
def test_bad_names_are_refused_before_sending(name: str) -> None:
    with pytest.raises(BadRequest):
        resolve_name("stream", name, "prod")


def test_non_string_name() -> None:
    with pytest.raises(BadRequest, match="string"):
        resolve_name("stream", b"orders", "prod")  # type: ignore[arg-type]


# -- TTLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [
        (1, 1000),
        (1.5, 1500),
        (0.29, 290),  # math.ceil(0.29 * 1000) would say 291
        (0.001, 1),
        (1e-9, 1),  # never 0: that would mean "no expiry"
        (0.1 + 0.2, 301),  # 0.30000000000000004: a hair over 300 ms
        (2.0000001, 2001),
        (0.0015, 2),
        (30.0, 30000),
        (86400 * 365, 31_536_000_000),
    ],
)
def test_ttl_rounds_up_to_whole_milliseconds(seconds: float, ms: int) -> None:
    assert ttl_to_ms(seconds) == ms


@given(st.floats(min_value=1e-12, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_ttl_is_never_shorter_and_less_than_a_millisecond_longer(seconds: float) -> None:
    ms = ttl_to_ms(seconds)
    exact = Decimal(repr(seconds)) * 1000
    assert ms >= exact
    assert ms - exact < 1
    assert ms >= 1


def test_no_ttl() -> None:
    assert ttl_to_ms(None) == 0
    assert ttl_to_ms(math.inf) == 0


@pytest.mark.parametrize("bad", [0, 0.0, -1, -math.inf, math.nan, True, "5"])
def test_bad_ttls(bad: object) -> None:
    with pytest.raises(ConfigError):
        ttl_to_ms(bad)  # type: ignore[arg-type]


def test_ttl_too_large_for_the_wire() -> None:
    with pytest.raises(ConfigError, match="too large"):
        ttl_to_ms(2.0**64)


def test_ttl_reply() -> None:
    assert ttl_from_wire(wire.TTL_MISSING, 0) is None
    assert ttl_from_wire(wire.TTL_PERSISTENT, 0) == math.inf
    assert ttl_from_wire(wire.TTL_EXPIRING, 1500) == 1.5
    with pytest.raises(RemoteProtocolError):
        ttl_from_wire(7, 0)


# -- URLs and starts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("felix://127.0.0.1:5000", "127.0.0.1", 5000),
        ("felix://localhost", "localhost", 5000),
        ("felix://node.example:7000/", "node.example", 7000),
        ("felix://[::1]:5001", "::1", 5001),
    ],
)
def test_parse_url(url: str, host: str, port: int) -> None:
    assert parse_url(url) == Endpoint(host, port)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5000",
        "127.0.0.1:5000",
        "felix://",
        "felix://host:notaport",
        "felix://host:70000",
        "felix://host:0",
        "felix://user:secret@host:5000",
        "felix://host:5000/path",
        "felix://host:5000?x=1",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)


def test_endpoint_str_round_trips() -> None:
    for url in ("felix://127.0.0.1:5000", "felix://[::1]:5001"):
        assert str(parse_url(url)) == url


def test_start_spec() -> None:
    assert start_spec("latest") == "latest"
    assert start_spec("earliest") == "earliest"
    assert start_spec(0) == 0
    assert start_spec(2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64, True, "first", 1.5):
        with pytest.raises(ConfigError):
            start_spec(bad)  # type: ignore[arg-type]


def test_start_by_time() -> None:
    t = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    us = 1_767_225_600_123_456
    assert start_spec({"time": t}) == wire.StartAtTime(us)
    # The same instant in another zone is the same start.
    east = t.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert time_start(east) == wire.StartAtTime(us)
    # Seconds as written, rounded down to microseconds (a record stamped then is included).
    assert time_start(1767225600.123456) == wire.StartAtTime(us)
    assert time_start(1.0000009) == wire.StartAtTime(1_000_000)
    assert time_start(1767225600) == wire.StartAtTime(1_767_225_600_000_000)
    assert time_start(0) == wire.StartAtTime(0)
    assert time_start(datetime(1970, 1, 1, tzinfo=UTC)) == wire.StartAtTime(0)


@pytest.mark.parametrize(
    "bad",
    [
        datetime(2026, 1, 1),  # naive: its zone would be a guess
        -1,
        -0.5,
        datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
        math.nan,
        math.inf,
        True,
        "2026-01-01T00:00:00Z",
        2.0**64 / 1e6 + 1e9,
        None,
    ],
)
def test_start_by_time_refuses(bad: object) -> None:
    with pytest.raises(ConfigError):
        start_spec({"time": bad})  # type: ignore[arg-type]


def test_start_by_time_needs_exactly_the_time_key() -> None:
    for bad in ({}, {"time": 1, "offset": 2}, {"at": 1}):
        with pytest.raises(ConfigError, match="time"):
            start_spec(bad)  # type: ignore[arg-type]
