"""The audit log: one JSON object per line for every management change, failed
authentication and permission denial.

Each line is a JSON object with these keys, in this order::

    {"ts": "2026-11-26T06:30:00.123Z", "event": "management", "who": "alice",
     "tenant": "acme", "action": "stream.create", "object": "stream:acme/prod/orders",
     "result": "ok"}

- ``event``: ``management`` (a create, update or delete through the control API),
  ``auth`` (an authentication: a token refused, an identity-provider token
  exchanged or refused, a session ended at its token's expiry, a node refusing to
  follow a control plane of another region) or ``permission``
  (a valid credential that does not allow the request).
- ``who``: the token's subject, ``admin`` for the bootstrap admin token, or
  ``anonymous`` (no credential, or one that did not verify). ``who_tenant``: the
  tenant of the caller's Felix token when it differs from ``tenant``. ``source``:
  the peer address, when known.
- ``tenant``: the tenant acted on (``null`` when none, e.g. the tenants collection).
- ``action`` / ``object``: what was attempted on what (``stream.publish`` on
  ``stream:acme/prod/orders``; ``PATCH /v1/tenants/{tenant}`` on ``tenant:globex``).
- ``result``: ``ok``, ``denied`` (authentication or authorization refused it) or
  ``failed`` (refused for another reason); ``reason`` a short code
  (``unauthenticated``, ``permission-denied``, ``not-found``, ``token-expired``...)
  and ``detail`` the error message, when not ``ok``.

What never appears: tokens (no Authorization header or token is ever passed in;
anything shaped like a JWT or a ``Bearer`` credential in a field is replaced by
``[redacted]`` as a second line of defence) and payloads (request bodies,
published records, cache values are never passed in). Every string field is cut
to :data:`MAX_FIELD_CHARS` characters and control characters are dropped, so a
hostile 1 MB name yields one short line; :func:`json.dumps` does the escaping.

Routing: lines go through the stdlib logger ``felix.audit`` at INFO, so operators
route them with ordinary logging configuration. By default the logger is at
INFO whatever the root logger's level, has no handler of its own and
propagates: ``felix up`` / ``felix control`` print them on stderr with the rest
of the log (a program that configures no handler at all prints none). With
``FELIX_AUDIT_LOG`` set (inherited by every process of a node) the first audit
line attaches a dedicated handler that writes the bare JSON lines to that file
(appending; ``-`` for stderr) and stops propagation; :func:`configure` does the same from code.

Cost: one ``json.dumps`` and one synchronous logging call per line, on the
caller's thread (the event loop): a short buffered write, paid only on
management changes and refusals, never per granted data-plane request. At most
:data:`MAX_LINES_PER_SECOND` lines a second are written per process; beyond
that lines are counted and dropped, and the next line written is preceded by one
``{"event": "audit", "action": "suppressed", "count": N}`` line. Where a
blocking write is a concern (a slow disk, a remote syslog), attach a
:class:`logging.handlers.QueueHandler` to ``felix.audit`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "LOGGER_NAME",
    "MAX_FIELD_CHARS",
    "MAX_LINES_PER_SECOND",
    "Event",
    "Result",
    "configure",
    "emit",
    "logger",
    "sanitize",
]

LOGGER_NAME = "felix.audit"
#: Longest string field, in characters (longer ones end with "...").
MAX_FIELD_CHARS = 256
#: Lines written per process per second at most; the rest are counted and dropped.
MAX_LINES_PER_SECOND = 2000
#: Environment variable naming a file for the audit lines ("-": stderr).
ENV_FILE = "FELIX_AUDIT_LOG"

Event = Literal["management", "auth", "permission"]
Result = Literal["ok", "denied", "failed"]

logger = logging.getLogger(LOGGER_NAME)
if logger.level == logging.NOTSET:
    # Audit lines are not debug output: lowering the root logger's level to WARNING
    # must not silence them (silence them explicitly with this logger's level).
    logger.setLevel(logging.INFO)

# A JWT (three base64url parts, the first a JSON header "eyJ...") or a bearer credential.
_SECRET = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*|(?i:bearer)\s+\S+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def sanitize(value: object, limit: int = MAX_FIELD_CHARS) -> str:
    """``value`` as a short, single-line string without anything shaped like a token."""
    text = str(value)
    if len(text) > 4 * limit:
        text = text[: 4 * limit]  # bound the regex work on hostile input
    text = _CONTROL.sub("", _SECRET.sub("[redacted]", text))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class _Budget:
    """At most ``rate`` lines per one-second window; counts what it drops."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.window = 0
        self.used = 0
        self.dropped = 0

    def take(self, now: float) -> tuple[bool, int]:
        """(whether a line may be written now, lines dropped before it to report)."""
        window = int(now)
        if window != self.window:
            self.window, self.used = window, 0
        if self.used >= self.rate:
            self.dropped += 1
            return False, 0
        self.used += 1
        dropped, self.dropped = self.dropped, 0
        return True, dropped


_budget = _Budget(MAX_LINES_PER_SECOND)
_env_checked = False


def configure(target: str | None = None) -> logging.Handler:
    """Write the audit lines, bare, to file ``target`` (appending; ``-`` or None: stderr).

    Replaces the handlers of the ``felix.audit`` logger and stops it propagating.
    """
    handler: logging.Handler
    if target in (None, "-"):
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def _check_env() -> None:
    global _env_checked
    _env_checked = True
    target = os.environ.get(ENV_FILE)
    if target and not logger.handlers:
        configure(target)


def emit(
    event: Event,
    *,
    who: str,
    tenant: str | None,
    action: str,
    object: str,
    result: Result,
    reason: str | None = None,
    detail: str | None = None,
    source: str | None = None,
    who_tenant: str | None = None,
) -> None:
    """Write one audit line (see the module documentation for the fields).

    Never pass a token, a header or a payload: names, codes and messages only.
    """
    if not _env_checked:
        _check_env()
    if not logger.isEnabledFor(logging.INFO):
        return
    now = time.time()
    ok, dropped = _budget.take(now)
    if not ok:
        return
    if dropped:
        logger.info(
            json.dumps(
                {
                    "ts": _timestamp(now),
                    "event": "audit",
                    "action": "suppressed",
                    "count": dropped,
                    "result": "failed",
                    "reason": "rate-limited",
                }
            )
        )
    line: dict[str, Any] = {
        "ts": _timestamp(now),
        "event": event,
        "who": sanitize(who or "anonymous"),
        "tenant": None if tenant is None else sanitize(tenant),
        "action": sanitize(action),
        "object": sanitize(object),
        "result": result,
    }
    if who_tenant is not None and who_tenant != tenant:
        line["who_tenant"] = sanitize(who_tenant)
    if source:
        line["source"] = sanitize(source, 64)
    if reason:
        line["reason"] = sanitize(reason, 64)
    if detail:
        line["detail"] = sanitize(detail)
    logger.info(json.dumps(line, ensure_ascii=True))


def _timestamp(now: float) -> str:
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
