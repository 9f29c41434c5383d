"""Tests for felix.names: the one name rule and cache key checks."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix.errors import BadRequest, TooLarge
from felix.names import NAME_MAX_CHARS, validate_key, validate_name

ALLOWED = set(string.ascii_letters + string.digits + "_-.")


@pytest.mark.parametrize(
    "name",
    ["a", "A", "0", "orders", "Orders-2024", "a.b.c", "a..b", "x_y", "9lives", "a" * 64, "a-"],
)
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name("stream", name) is name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("a" * 65, "too long: 65 characters"),
        (".", "bad first character '.'"),
        ("..", "bad first character '.'"),
        ("-rf", "bad first character '-'"),
        ("_private", "bad first character '_'"),
        ("a b", "bad character ' '"),
        ("a/b", "bad character '/'"),
        ("a*", "bad character '*'"),
        ("tenant\n", "bad character '\\n'"),
        ("caf\u00e9", "bad character '\u00e9'"),
        ("\u0663", "bad first character"),  # Arabic-Indic digit three: isdigit() but not ASCII
        ("a\x00", "bad character '\\x00'"),
    ],
)
def test_invalid_names_raise_bad_request_naming_kind_and_rule(name: str, problem: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_name("namespace", name)
    message = str(info.value)
    assert message.startswith("invalid namespace name")
    assert problem in message
    assert "1 to 64 characters" in message and "starting with a letter or digit" in message


def test_non_string_name_is_bad_request() -> None:
    with pytest.raises(BadRequest, match="invalid cache name of type bytes"):
        validate_name("cache", b"abc")  # type: ignore[arg-type]


def test_error_message_is_bounded_for_huge_input() -> None:
    with pytest.raises(BadRequest) as info:
        validate_name("tenant", "x" * 1_000_000)
    assert len(str(info.value)) < 400
    assert "1000000 characters" in str(info.value)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_name_rule_matches_its_definition(name: str) -> None:
    expected = (
        1 <= len(name) <= NAME_MAX_CHARS
        and set(name) <= ALLOWED
        and name[0] in string.ascii_letters + string.digits
    )
    try:
        validate_name("stream", name)
    except BadRequest:
        assert not expected
    else:
        assert expected


@pytest.mark.parametrize(
    ("key", "size"),
    [("k", 1), ("user:42", 7), ("\u00e9", 2), ("\u20ac", 3), ("\U0001f600", 4), (" ", 1)],
)
def test_validate_key_returns_utf8_length(key: str, size: int) -> None:
    assert validate_key(key, 16) == size


def test_validate_key_limits_count_utf8_bytes_not_characters() -> None:
    assert validate_key("a" * 8, 8) == 8
    with pytest.raises(TooLarge, match="9 bytes exceeds the limit of 8"):
        validate_key("a" * 9, 8)
    # 3 characters, 9 bytes.
    with pytest.raises(TooLarge):
        validate_key("\u20ac" * 3, 8)


def test_validate_key_rejects_empty_non_string_and_unencodable() -> None:
    with pytest.raises(BadRequest, match="empty"):
        validate_key("", 8)
    with pytest.raises(BadRequest, match="type bytes"):
        validate_key(b"k", 8)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="UTF-8"):
        validate_key("a\ud800", 8)  # lone surrogate
