"""felix.errors: one ErrorCode per error class, one slug per code, the docs' table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from felix import errors
from felix.control.schemas import PROBLEM_TYPES
from felix.errors import ErrorCode, error_for_code, error_slug

DOCS = Path(__file__).resolve().parent.parent / "docs" / "wire-protocol.md"


def coded_classes() -> list[type[errors.ServerError]]:
    return [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ServerError) and cls.code
        if cls is not errors.ServerError and not is_refinement(cls)
    ]


def is_refinement(cls: type[errors.ServerError]) -> bool:
    """A subclass that keeps its parent's code (DiskFull is an Overloaded)."""
    parents = [b for b in cls.__mro__[1:] if b is not errors.ServerError]
    return any(issubclass(b, errors.ServerError) and b.code == cls.code for b in parents)


def test_every_code_has_exactly_one_class() -> None:
    by_code = {cls.code: cls for cls in coded_classes()}
    assert len(by_code) == len(coded_classes())
    assert set(by_code) == set(ErrorCode)
    for cls in coded_classes():
        assert isinstance(cls.code, ErrorCode)


@pytest.mark.parametrize("code", [c for c in ErrorCode if c is not ErrorCode.CURSOR_ERROR])
def test_error_for_code_raises_the_class_of_the_code(code: ErrorCode) -> None:
    err = error_for_code(int(code), "boom")
    assert err.code == code and type(err).code == code
    assert error_slug(err) == code.slug


def test_unknown_code_keeps_its_number() -> None:
    err = error_for_code(99, "from a newer broker")
    assert type(err) is errors.ServerError and err.code == 99
    assert error_slug(err) == "internal-error"


def test_slugs() -> None:
    assert ErrorCode.PERMISSION_DENIED.slug == "permission-denied"
    assert error_slug(errors.RemoteProtocolError("bad bytes")) == "bad-request"
    assert error_slug(ValueError("bug")) == "internal-error"
    assert error_slug(errors.CursorError("too_old", 1, 5)) == "cursor-error"


def test_problem_types_use_the_codes_slugs() -> None:
    """The control plane names the problem type of each coded error by the code's slug."""
    for cls in coded_classes():
        if cls not in (errors.CursorError, errors.DuplicatesInBatch):  # wire-only errors
            assert PROBLEM_TYPES[ErrorCode(cls.code).slug].error is cls


def test_docs_table_lists_every_code() -> None:
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| `([\w-]+)` \| `(\w+)`", DOCS.read_text(), re.M)
    documented = {int(code): (name, slug, cls) for code, name, slug, cls in rows}
    assert documented == {
        c.value: (c.name, c.slug, type(error_for_code(c.value, "")).__name__)
        for c in ErrorCode
        if c is not ErrorCode.CURSOR_ERROR
    } | {8: ("CURSOR_ERROR", "cursor-error", "CursorError")}
