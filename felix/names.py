"""Validation of resource names and cache keys.

Every tenant, namespace, stream and cache name goes through :func:`validate_name`, in
the control plane, the gateway and the shard alike, so one rule decides what a name
may contain. The rule is deliberately strict: names end up in routing keys, file
names and metric labels, and tenants must never be able to name each other's
resources through separators, wildcards, ``..`` or look-alike characters.
"""

from __future__ import annotations

import re

from felix.errors import BadRequest, TooLarge

__all__ = [
    "DLQ_SUFFIX",
    "NAME_MAX_CHARS",
    "NAME_RULE",
    "dead_letter_name",
    "validate_key",
    "validate_name",
]

#: Longest name accepted by :func:`validate_name`, in characters (all ASCII, so bytes too).
NAME_MAX_CHARS = 64

#: The rule as it appears in error messages.
NAME_RULE = (
    f"1 to {NAME_MAX_CHARS} characters from ASCII letters, digits, '_', '-' and '.', "
    "starting with a letter or digit"
)

# Spelled out instead of \w, which would also accept non-ASCII letters and digits.
_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{NAME_MAX_CHARS - 1}}}")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")

# Error messages quote at most this much of the offending input, so a hostile 1 MB
# name does not become a 1 MB error frame or log line.
_PREVIEW_CHARS = 80


def _preview(text: str) -> str:
    if len(text) <= _PREVIEW_CHARS:
        return repr(text)
    return repr(text[:_PREVIEW_CHARS]) + f"... ({len(text)} characters)"


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` unchanged if it is a valid ``kind`` name, else raise.

    A valid name has 1 to 64 characters, each an ASCII letter, an ASCII digit, ``_``,
    ``-`` or ``.``, and starts with a letter or digit (so ``.``, ``..`` and names that
    look like options or hidden files are refused). Names are case-sensitive.

    ``kind`` (``"tenant"``, ``"namespace"``, ``"stream"``, ``"cache"``, ...) only
    appears in the error message.

    Raises:
        BadRequest: ``name`` is not a ``str`` or breaks the rule; the message names
            the kind, the specific problem and the rule.
    """
    if isinstance(name, str) and _NAME_RE.fullmatch(name) is not None:
        return name
    raise BadRequest(f"invalid {kind} name {_name_problem(name)}: must be {NAME_RULE}")


def _name_problem(name: object) -> str:
    """Describe why ``name`` failed :func:`validate_name` (only called on failure)."""
    if not isinstance(name, str):
        return f"of type {type(name).__name__}"
    if not name:
        return "'' (empty)"
    if len(name) > NAME_MAX_CHARS:
        return f"{_preview(name)} (too long: {len(name)} characters)"
    if name[0] not in _NAME_CHARS or not name[0].isalnum():
        return f"{_preview(name)} (bad first character {name[0]!r})"
    bad = next(c for c in name if c not in _NAME_CHARS)
    return f"{_preview(name)} (bad character {bad!r})"


def validate_key(key: str, max_bytes: int) -> int:
    """Check a cache key and return its length in UTF-8 bytes.

    A valid key is a non-empty ``str`` whose UTF-8 encoding is at most ``max_bytes``
    long. Any Unicode text is allowed except lone surrogates, which have no UTF-8
    encoding. The returned length is what byte budgets account for the key.

    Raises:
        BadRequest: ``key`` is not a ``str``, is empty, or is not encodable as UTF-8.
        TooLarge: the key is longer than ``max_bytes`` in UTF-8.
    """
    if not isinstance(key, str):
        raise BadRequest(f"invalid cache key of type {type(key).__name__}: must be a string")
    # isascii() is O(1) in CPython (a flag on the string), and for ASCII text the
    # character count is the byte count, so the common case does not encode.
    if key.isascii():
        size = len(key)
    else:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadRequest(f"invalid cache key {_preview(key)}: not encodable as UTF-8") from None
    if size == 0:
        raise BadRequest("invalid cache key '': must not be empty")
    if size > max_bytes:
        raise TooLarge(f"cache key of {size} bytes exceeds the limit of {max_bytes} bytes")
    return size


#: The dead-letter stream of a queue group that names none: ``<stream>.dlq``.
DLQ_SUFFIX = ".dlq"


def dead_letter_name(stream: str) -> str:
    """The default dead-letter stream of queue groups on ``stream`` (docs/queues.md)."""
    name = stream + DLQ_SUFFIX
    if len(name) > NAME_MAX_CHARS:
        raise BadRequest(
            f"stream name {stream!r} is too long for its default dead-letter stream "
            f"{name!r} (at most {NAME_MAX_CHARS} characters): name a dead_letter stream"
        )
    return name
