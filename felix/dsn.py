"""Showing a database DSN without its password (``--cluster``, ``--control-store``).

:func:`redact_dsn` is the one place a DSN is made fit for a log line, ``felix config
show`` or a child process's copy of the config. It masks every password a libpq
connection string can carry:

- the URL's userinfo: ``postgresql://user:secret@host/db`` -> ``user:***@host``;
- query parameters named ``password`` (or ``sslpassword``, any name ending in
  ``password``): ``postgresql://host/db?password=secret``;
- libpq key=value strings: ``host=db password=secret`` and ``password='a b'``.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact_dsn"]

#: What a password is shown as.
MASK = "***"

# key = value, the value bare or single-quoted with backslash escapes (libpq's syntax).
_KEY_VALUE = re.compile(r"(?i)(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&;]*)")


def redact_dsn(dsn: str) -> str:
    """``dsn`` with every password in it shown as ``***`` (any other text unchanged).

    Errs on the side of masking: in a URL, everything between the ``:`` after the user
    name and the last ``@`` before the query counts as the password (an unencoded
    ``@`` or ``/`` in it included)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return _KEY_VALUE.sub(_mask, dsn)
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at < 0 and "/" not in rest[: rest.find("@")]:
        at = rest.find("@")  # a "?" or "#" in the password itself (unencoded)
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:{MASK}{rest[at:]}"
    return scheme + sep + _KEY_VALUE.sub(_mask, rest)


def _mask(match: re.Match[str]) -> str:
    return match.group(1) + MASK
