"""Pure conversions between the Python API and the wire: names, TTLs, URLs, starts.

Nothing here does I/O; every function is total over its documented inputs and
raises a felix error (``BadRequest`` for names, ``ConfigError`` for settings)
otherwise, so the client rejects a bad argument before anything is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, Literal, TypedDict
from urllib.parse import unquote, urlsplit

from felix import wire
from felix.errors import BadRequest, ConfigError, RemoteProtocolError
from felix.names import validate_name

__all__ = [
    "DEFAULT_PORT",
    "U32_MAX",
    "U64_MAX",
    "Endpoint",
    "ShmEndpoint",
    "StartSpec",
    "TimeStart",
    "WireStart",
    "parse_url",
    "resolve_name",
    "start_spec",
    "time_start",
    "ttl_from_wire",
    "ttl_to_ms",
]

DEFAULT_PORT: Final = 5000
U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1


class TimeStart(TypedDict):
    """``subscribe(start={"time": t})``: from the first record stamped at or after ``t``,
    a timezone-aware ``datetime`` or Unix seconds (int or float)."""

    time: datetime | float


#: What ``subscribe(start=...)`` accepts.
StartSpec = Literal["latest", "earliest"] | int | TimeStart
#: What a SUBSCRIBE carries: ``"latest"``, ``"earliest"``, an offset or a time.
WireStart = str | int | wire.StartAtTime

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


def resolve_name(kind: str, name: str, namespace: str) -> tuple[str, str]:
    """``(namespace, name)`` for a stream or cache ``name`` given relative to ``namespace``.

    ``"orders"`` names ``orders`` in the client's namespace; ``"billing/orders"``
    names ``orders`` in namespace ``billing`` of the same tenant (the tenant is
    never part of a name: it comes from the connection's credentials). Both
    parts must pass :func:`felix.names.validate_name`, so at most one ``/`` is
    allowed. Raises BadRequest (naming ``kind``) otherwise.
    """
    if not isinstance(name, str):
        raise BadRequest(f"invalid {kind} name of type {type(name).__name__}: must be a string")
    ns, sep, local = name.partition("/")
    if not sep:
        return namespace, validate_name(kind, name)
    return validate_name("namespace", ns), validate_name(kind, local)


def ttl_to_ms(ttl: float | None) -> int:
    """The wire ``ttl_ms`` for a TTL of ``ttl`` seconds: 0 (no expiry) for None or ``math.inf``.

    Rounded UP to whole milliseconds, so a key never expires earlier than
    asked. "Asked" is the decimal number the float prints as (its shortest
    round-tripping repr, i.e. what was written): ``0.001`` is 1 ms and ``0.29``
    is 290 ms, where binary arithmetic (``math.ceil(0.29 * 1000)``) gives 291
    and the float's exact binary value of ``0.001`` (a hair above) gives 2;
    ``1e-9`` is 1 ms, never 0 (which would mean no expiry). Raises
    ConfigError for a TTL that is not a positive number (0, negative, NaN,
    bool) or exceeds what the wire carries.
    """
    if ttl is None:
        return 0
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ConfigError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if ttl == math.inf:
        return 0
    if not ttl > 0:  # also catches NaN
        raise ConfigError(f"ttl must be positive (seconds), got {ttl!r}")
    ms = math.ceil(Decimal(repr(float(ttl))) * 1000)
    if ms > U64_MAX:
        raise ConfigError(f"ttl of {ttl!r} seconds is too large")
    return ms


def ttl_from_wire(state: int, ttl_ms: int) -> float | None:
    """``Cache.ttl()``'s result for a CACHE_TTL_REPLY: None, ``math.inf`` or seconds left."""
    if state == wire.TTL_MISSING:
        return None
    if state == wire.TTL_PERSISTENT:
        return math.inf
    if state == wire.TTL_EXPIRING:
        return ttl_ms / 1000
    raise RemoteProtocolError(f"unknown TTL state {state}")


def start_spec(start: StartSpec) -> WireStart:
    """Check ``subscribe(start=...)``: ``"latest"``, ``"earliest"``, an offset (int >= 0)
    or ``{"time": t}`` (see :func:`time_start`)."""
    if isinstance(start, bool):
        raise ConfigError("start must be 'latest', 'earliest' or an int offset, not a bool")
    if isinstance(start, int):
        if not 0 <= start <= U64_MAX:
            raise ConfigError(f"start offset must be within 0..2**64-1, got {start}")
        return start
    if isinstance(start, dict):
        if set(start) != {"time"}:
            raise ConfigError(f"a start by time is {{'time': datetime or seconds}}, got {start!r}")
        return time_start(start["time"])
    if start in ("latest", "earliest"):
        return start
    raise ConfigError(
        f"start must be 'latest', 'earliest', an int offset or {{'time': t}}, got {start!r}"
    )


def time_start(when: datetime | float) -> wire.StartAtTime:
    """The wire start for records stamped at or after ``when``.

    ``when`` is a timezone-aware ``datetime`` (a naive one is refused: its zone would be
    a guess) or Unix seconds. Seconds are taken as the decimal they print as and
    rounded DOWN to whole microseconds, so a record stamped exactly ``when`` is
    included. Raises ConfigError for anything before 1970, NaN, infinite or a bool.
    """
    if isinstance(when, datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise ConfigError(
                f"start time {when.isoformat()} has no timezone: give an aware datetime "
                "(such as datetime.now(UTC)) or Unix seconds"
            )
        us = (when - _EPOCH) // _US
    elif isinstance(when, int | float) and not isinstance(when, bool):
        if not math.isfinite(when):
            raise ConfigError(f"start time must be a finite number of seconds, got {when!r}")
        us = math.floor(Decimal(repr(when)) * 1_000_000)
    else:
        raise ConfigError(
            f"start time must be a datetime or Unix seconds, not {type(when).__name__}"
        )
    if not 0 <= us <= U64_MAX:
        raise ConfigError(f"start time {when!r} is outside what the wire carries (1970 on)")
    return wire.StartAtTime(us)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a client connects: ``host`` (a name or an IP literal, no brackets) and ``port``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"felix://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ShmEndpoint:
    """A node on this host, reached over shared memory through its Unix socket ``path``."""

    path: str

    def __str__(self) -> str:
        return f"felix+shm://{self.path}"


def parse_url(url: str) -> Endpoint | ShmEndpoint:
    """Parse ``felix://host[:port]`` (port 5000 by default; IPv6 as ``[::1]``), or
    ``felix+shm:///absolute/path/to/felix.sock`` (a node on this host, over shared
    memory: ``felix up --shm-socket``).

    Nothing else may be in the URL (no path, query, fragment or credentials: the
    token is a separate argument, so it never ends up in logs with the URL).
    Raises ConfigError.
    """
    if not isinstance(url, str):
        raise ConfigError(f"url must be a string like 'felix://host:5000', not {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid felix url {url!r}: {exc}") from None
    if parts.scheme == "felix+shm":
        if parts.netloc:
            raise ConfigError(
                f"invalid felix url {url!r}: felix+shm names a local socket, no host "
                "(felix+shm:///path/to/felix.sock)"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ConfigError(f"invalid felix url {url!r}: the socket path must be absolute")
        if parts.query or parts.fragment:
            raise ConfigError(f"invalid felix url {url!r}: only felix+shm:///path is allowed")
        return ShmEndpoint(path)
    if parts.scheme != "felix":
        raise ConfigError(f"invalid felix url {url!r}: the scheme must be felix:// or felix+shm://")
    if not parts.hostname:
        raise ConfigError(f"invalid felix url {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"invalid felix url {url!r}: pass the token as token=, not in the url")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"invalid felix url {url!r}: only felix://host:port is allowed")
    if port == 0:
        raise ConfigError(f"invalid felix url {url!r}: port 0")
    return Endpoint(parts.hostname, DEFAULT_PORT if port is None else port)
