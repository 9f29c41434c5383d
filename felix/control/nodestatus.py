"""``felix stream info NAME --node URL``: what one node holds of a stream (and
``felix group info STREAM GROUP --node URL``: one queue group's entry in it).

How it works: the node's health endpoint (``felix up --http``) answers
``GET /streams/<tenant>/<namespace>/<stream>`` with the stream's status as one
JSON object (durable or not, fsync policy, first/next/synced offsets, bytes and
segments on disk, the recovery report of its last start, the in-memory hot tail;
docs/operations.md, "Durable streams"). This module fetches it, bounded in time
and size, maps the answer to felix errors, and lays it out as rows for the CLI.
The control plane is not involved: a stream the node auto-created has no
control-plane resource, and the node is the one that knows its disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from felix.errors import (
    BadRequest,
    ConfigError,
    FelixError,
    FelixTimeoutError,
    NotFound,
    PermissionDenied,
    ServerError,
    Unavailable,
)

__all__ = [
    "MAX_STATUS_BYTES",
    "fetch_stream_status",
    "group_status",
    "status_rates",
    "status_rows",
    "stream_status_url",
]

#: The largest status answer read; a bigger one is refused (a status is a few hundred bytes).
MAX_STATUS_BYTES = 1 << 20
#: Keys shown first, in this order; the rest follow as the node sent them.
_FIRST = ("stream", "durable", "fsync", "damaged")


def stream_status_url(node: str, path: tuple[str, str, str], kind: str = "stream") -> str:
    """The status URL of stream (or ``kind`` "cache": cache) ``path`` on the node whose
    health endpoint is ``node`` (``http://HOST:PORT``, or ``HOST:PORT``). Raises
    ConfigError for anything else."""
    base = node if "://" in node else f"http://{node}"
    try:
        parts = urlsplit(base)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--node {node!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ConfigError(f"--node wants the node's health address, http://HOST:PORT, not {node!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"--node {node!r}: only http://HOST:PORT, no path or credentials")
    names = "/".join(quote(name, safe="") for name in path)
    return f"{parts.scheme}://{parts.netloc}/{kind}s/{names}"


def fetch_stream_status(url: str, *, timeout: float, token: str | None = None) -> dict[str, Any]:
    """GET the status at ``url`` (with ``token``, the node's admin token, which a node
    with auth requires). Raises NotFound (the node does not hold the stream),
    BadRequest (the node refused the names), PermissionDenied (401: no or a wrong
    token), Unavailable (unreachable, or its shard did not answer), FelixTimeoutError,
    or ServerError for an answer that is not a status."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with (
            httpx.Client(timeout=timeout) as http,
            http.stream("GET", url, headers=headers) as response,
        ):
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_STATUS_BYTES:
                    raise ServerError(f"{url}: answer larger than {MAX_STATUS_BYTES} bytes")
    except httpx.TimeoutException as exc:
        raise FelixTimeoutError(f"GET {url} timed out after {timeout} s: {exc}") from None
    except httpx.HTTPError as exc:
        raise Unavailable(f"node at {url} unreachable: {exc}") from None
    text = bytes(body).decode("utf-8", "replace").strip()
    status = response.status_code
    if status != 200:
        error: type[FelixError] = {
            404: NotFound,
            400: BadRequest,
            401: PermissionDenied,
            503: Unavailable,
        }.get(status, ServerError)
        raise error(f"node answered {status}: {text[:500] or response.reason_phrase}")
    try:
        answer = json.loads(bytes(body))
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ServerError(f"{url}: the answer is not a JSON object: {text[:200]!r}")
    return answer


def status_rates(
    kind: str, before: Mapping[str, Any], after: Mapping[str, Any], seconds: float
) -> dict[str, float]:
    """Per-second rates between two status samples ``seconds`` apart: a stream's
    appended records; a cache's gets, hits, misses and sets, and its hit ratio over the
    interval (a counter that went down, a restarted shard's, counts from zero)."""

    def per_second(name: str, a: Any, b: Any) -> float:
        ai, bi = (a if isinstance(a, int) else 0), (b if isinstance(b, int) else 0)
        return round((bi - ai if bi >= ai else bi) / seconds, 1) if seconds > 0 else 0.0

    if kind == "stream":
        a_mem, b_mem = before.get("memory") or {}, after.get("memory") or {}
        return {
            "records": per_second("records", a_mem.get("next_offset"), b_mem.get("next_offset"))
        }
    rates = {
        name: per_second(name, before.get(name), after.get(name))
        for name in ("hits", "misses", "sets", "deletes", "evictions")
    }
    rates["gets"] = round(rates["hits"] + rates["misses"], 1)
    rates["hit_ratio"] = round(rates["hits"] / rates["gets"], 3) if rates["gets"] else 0.0
    return rates


def group_status(status: Mapping[str, Any], group: str, url: str) -> dict[str, Any]:
    """Queue group ``group``'s entry in a stream ``status`` (from ``url``): whatever the
    node reports of it (its settings; figures such as its floor, next offset and leases
    as the shard reports them). Raises NotFound if the node holds no such group."""
    groups = status.get("groups")
    if not isinstance(groups, Mapping):
        raise NotFound(f"{url}: the node reports no queue groups of this stream (not durable?)")
    entry = groups.get(group)
    if not isinstance(entry, Mapping):
        held = ", ".join(sorted(str(g) for g in groups)) or "none"
        raise NotFound(f"{url}: the node holds no queue group {group!r} (it holds: {held})")
    return dict(entry)


def status_rows(status: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, value)`` rows of a status: the main keys first, nested objects flattened
    as ``recovery.torn_bytes_cut``, null as ``-``."""
    ordered = [k for k in _FIRST if k in status] + [k for k in status if k not in _FIRST]
    rows: list[tuple[str, str]] = []
    for key in ordered:
        rows += _rows(key, status[key])
    return rows


def _rows(key: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, str]] = []
        for sub, v in value.items():
            out += _rows(f"{key}.{sub}", v)
        return out
    if value is None:
        return [(key, "-")]
    if isinstance(value, bool):
        return [(key, "yes" if value else "no")]
    return [(key, str(value))]
