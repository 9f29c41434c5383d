"""``felix status`` and ``felix check``: how a node is doing, from its health port's
``/status`` (felix/node/health.py).

Where the health port is, first found: ``--http URL``; ``$FELIX_HTTP_URL``; the
context's or local node's node.json (felix/context.py); else
``http://127.0.0.1:8080``.

``felix status`` samples ``/status`` twice, ``--interval`` apart, for rates;
``--json`` prints the second sample with a ``rates`` object; ``--watch`` redraws
every interval (a live view on a terminal, one block per interval otherwise).
Exit status: 0 the node answered, 1 it did not.

``felix check`` is a monitoring plugin (Nagios conventions): one line
``FELIX OK|WARNING|CRITICAL|UNKNOWN - ...`` with performance data, and exit
status 0 OK, 1 WARNING, 2 CRITICAL (not ready, damaged logs, unreachable, over a
critical threshold), 3 UNKNOWN (an answer that is not felix's /status).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from felix.context import Defaults, pick, report, resolve
from felix.errors import ConfigError

__all__ = ["add_commands", "fetch_status", "render", "verdict"]

DEFAULT_HTTP = "http://127.0.0.1:8080"
#: /status answers are small; anything bigger is not a felix node.
_MAX_BODY = 4 << 20
#: Counters turned into per-second rates (names as in /status totals).
RATE_COUNTERS = (
    "messages_published",
    "messages_delivered",
    "requests",
    "queue_delivered",
    "queue_acked",
    "slow_consumer_events",
    "auth_failures",
    "overloaded_replies",
)
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_VERDICT = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

Subparsers = argparse._SubParsersAction  # argparse has no public name for it


class Unreachable(Exception):
    """The health port did not answer with a /status document."""


def add_commands(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``status`` and ``check`` to the ``felix`` command's ``subparsers``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--http", metavar="URL", help=f"the node's health port ({DEFAULT_HTTP})")
    common.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per request (5)"
    )
    doc = (__doc__ or "").split("\n\n", 1)[1]
    status = subparsers.add_parser(
        "status",
        parents=[common],
        help="how the node is doing",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("--json", action="store_true", help="print the /status document")
    status.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="between samples (1)"
    )
    status.add_argument("--watch", action="store_true", help="redraw every interval")
    status.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N")
    status.set_defaults(func=_status)

    check = subparsers.add_parser(
        "check",
        parents=[common],
        help="monitoring plugin: OK / WARNING / CRITICAL with exit status 0 / 1 / 2",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for what, warn, crit in (("memory", 80, 95), ("disk", 80, 95)):
        check.add_argument(
            f"--warn-{what}", type=float, default=warn, metavar="PCT",
            help=f"{what} used, percent of its budget, that warns ({warn})",
        )  # fmt: skip
        check.add_argument(
            f"--crit-{what}", type=float, default=crit, metavar="PCT",
            help=f"... that is critical ({crit})",
        )  # fmt: skip
    check.set_defaults(func=_check)


def _http_url(args: argparse.Namespace) -> str:
    found = resolve(getattr(args, "context", None))
    settings = {
        "http": pick(
            (args.http, "--http"),
            (os.environ.get("FELIX_HTTP_URL"), "$FELIX_HTTP_URL"),
            (found.http, found.source),
            (DEFAULT_HTTP, "the default"),
        )
    }
    report(found if settings["http"][1] == found.source else Defaults(), args.verbose, settings)
    url = settings["http"][0] or DEFAULT_HTTP
    return url if "://" in url else f"http://{url}"


def fetch_status(url: str, timeout: float) -> dict[str, Any]:
    """GET ``url``/status; raises Unreachable when that is not a felix /status."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=timeout) as answer:
            body = answer.read(_MAX_BODY + 1)
    except (OSError, urllib.error.URLError) as exc:
        raise Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None
    if len(body) > _MAX_BODY:
        raise Unreachable(f"{url}/status: answer over {_MAX_BODY} bytes")
    try:
        status = json.loads(body)
    except ValueError:
        raise Unreachable(f"{url}/status: not JSON") from None
    if not isinstance(status, dict) or not isinstance(status.get("totals"), dict):
        raise Unreachable(f"{url}/status: not a felix node's status")
    return status


def rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, float]:
    """Per-second rates of :data:`RATE_COUNTERS` between two samples (a counter that
    went down, a restarted child's, counts from zero)."""
    out = {}
    for name in RATE_COUNTERS:
        b, a = before["totals"].get(name, 0), after["totals"].get(name, 0)
        delta = a - b if a >= b else a
        out[name] = round(delta / seconds, 1) if seconds > 0 else 0.0
    return out


def _size(n: int | None) -> str:
    if n is None:
        return "none"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    return "".join([*parts, f"{s}s"])


def _percent(used: int, budget: int | None) -> str:
    return f" ({100 * used / budget:.1f}%)" if budget else ""


def render(status: dict[str, Any], rate: dict[str, float] | None) -> str:
    """The human view of a /status sample (and rates, if sampled twice)."""
    t = status["totals"]
    budgets = status.get("budgets", {})
    state = "ready" if status.get("ready") else "NOT READY"
    topology = "embedded shards" if status.get("embedded_shards") else "split"
    lines = [
        f"felix {status.get('version')}  region {status.get('region')}  "
        f"pid {status.get('pid')}  up {_duration(status.get('uptime_s', 0))}  {state}",
        f"  gateways {status.get('gateways')}  shards {status.get('shards')} ({topology})  "
        f"durable streams {'on' if status.get('durable_streams') else 'off'}  "
        f"auth {'on' if status.get('auth') else 'off'}",
    ]
    cluster = status.get("cluster")
    if isinstance(cluster, dict):
        lines.append(
            f"  cluster: node {cluster.get('node_id')} at {cluster.get('address')}  "
            f"{'serving' if cluster.get('serving') else 'NOT SERVING'}  owns "
            f"{cluster.get('owned')} of {cluster.get('logical_shards')} logical shards  "
            f"map {cluster.get('map_version')}  nodes {cluster.get('live_nodes')} live of "
            f"{cluster.get('nodes')}{'  placer' if cluster.get('placer') else ''}"
        )
    for problem in status.get("problems", []):
        lines.append(f"  problem: {problem}")
    lines.append(f"  {'PROCESS':<12}{'PID':>8}{'RESTARTS':>10}  STATUS")
    for child in status.get("children", []):
        lines.append(
            f"  {child['name']:<12}{child['pid'] or '-':>8}{child['restarts']:>10}  "
            f"{child['status']}"
        )
    if rate is not None:
        lines.append(
            f"  per second: publishes {rate['messages_published']:,.1f}  "
            f"deliveries {rate['messages_delivered']:,.1f}  requests {rate['requests']:,.1f}  "
            f"queue deliveries {rate['queue_delivered']:,.1f}  acks {rate['queue_acked']:,.1f}"
        )
    memory = t.get("memory_used_bytes", 0)
    disk = t.get("node_disk_bytes", 0)
    rings = status.get("rings", {})
    lines += [
        f"  connections {t.get('connections', 0)} (shm {t.get('shm_connections', 0)})  "
        f"streams {t.get('streams', 0)} (durable {t.get('durable_streams', 0)})  "
        f"caches {t.get('caches', 0)}  queue groups {t.get('queue_groups', 0)} "
        f"(members {t.get('queue_members', 0)}, stalled {t.get('queue_stalled_groups', 0)})",
        f"  memory {_size(memory)} of {_size(budgets.get('memory_bytes'))}"
        f"{_percent(memory, budgets.get('memory_bytes'))}  "
        f"disk {_size(disk)} of {_size(budgets.get('disk_bytes'))}"
        f"{_percent(disk, budgets.get('disk_bytes'))}",
    ]
    if rings.get("count"):
        lines.append(
            f"  rings {rings['count']}: fullest {_size(rings.get('max_used_bytes', 0))} "
            f"of {_size(rings.get('capacity_bytes'))}  full events {t.get('ring_full_events', 0)}"
        )
    lines.append(
        f"  slow consumers: {t.get('slow_consumer_events', 0)} events, "
        f"{t.get('subscriber_dropped_records', 0)} records skipped  "
        f"trims: budget {t.get('budget_trims', 0)}, quota {t.get('quota_trims', 0)}  "
        f"damaged logs {t.get('log_damaged_streams', 0)}"
    )
    return "\n".join(lines)


def verdict(status: dict[str, Any], thresholds: dict[str, float]) -> tuple[int, str]:
    """(exit status, one line) of ``felix check`` for a /status sample."""
    t = status["totals"]
    budgets = status.get("budgets", {})
    code, reasons = OK, []

    def worse(level: int, reason: str) -> None:
        nonlocal code
        code = max(code, level)
        reasons.append(reason)

    if not status.get("ready"):
        worse(CRITICAL, "not ready: " + "; ".join(status.get("problems", [])))
    if t.get("log_damaged_streams", 0):
        worse(CRITICAL, f"{t['log_damaged_streams']} damaged durable stream(s)")
    if t.get("queue_stalled_groups", 0):
        worse(WARNING, f"{t['queue_stalled_groups']} stalled queue group(s)")
    perf = []
    for what, used, budget in (
        ("memory", t.get("memory_used_bytes", 0), budgets.get("memory_bytes")),
        ("disk", t.get("node_disk_bytes", 0), budgets.get("disk_bytes")),
    ):
        if budget:
            pct = 100 * used / budget
            warn, crit = thresholds[f"warn_{what}"], thresholds[f"crit_{what}"]
            if pct >= crit:
                worse(CRITICAL, f"{what} {pct:.1f}% of its budget")
            elif pct >= warn:
                worse(WARNING, f"{what} {pct:.1f}% of its budget")
            w, c = int(budget * warn / 100), int(budget * crit / 100)
            perf.append(f"{what}={used}B;{w};{c};0;{budget}")
        else:
            perf.append(f"{what}={used}B")
    perf.append(f"connections={t.get('connections', 0)}")
    perf.append(f"restarts={sum(c.get('restarts', 0) for c in status.get('children', []))}")
    summary = "; ".join(reasons) or (
        f"ready, {status.get('shards')} shard(s), {t.get('connections', 0)} connection(s)"
    )
    return code, f"FELIX {_VERDICT[code]} - {summary} | {' '.join(perf)}"


def _status(args: argparse.Namespace) -> int:
    url = _http_url(args)
    if not args.interval > 0:
        raise ConfigError(f"--interval must be positive, got {args.interval}")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    try:
        if args.watch:
            return _watch(url, args)
        before = fetch_status(url, args.timeout)
        start = time.monotonic()
        time.sleep(args.interval)
        after = fetch_status(url, args.timeout)
    except Unreachable as exc:
        print(f"felix: the node's health port did not answer: {exc}", file=sys.stderr)
        return 1
    rate = rates(before, after, time.monotonic() - start)
    if args.json:
        print(json.dumps({**after, "rates": rate}, sort_keys=True))
    else:
        print(render(after, rate))
    return 0


def _watch(url: str, args: argparse.Namespace) -> int:
    """Redraw every interval: a live view on a terminal (rich), else plain blocks."""
    before = fetch_status(url, args.timeout)
    start = time.monotonic()
    shown = 0

    def frames(show: Callable[[str], None]) -> None:
        nonlocal before, start, shown
        while args.count is None or shown < args.count:
            time.sleep(args.interval)
            after = fetch_status(url, args.timeout)
            now = time.monotonic()
            text = render(after, rates(before, after, now - start))
            before, start = after, now
            show(json.dumps(after, sort_keys=True) if args.json else text)
            shown += 1

    if sys.stdout.isatty() and not args.json:
        from rich.live import Live
        from rich.text import Text

        with Live(Text("..."), auto_refresh=False) as live:
            frames(lambda text: live.update(Text(text), refresh=True))
    else:
        frames(lambda text: print(text + ("" if args.json else "\n"), flush=True))
    return 0


def _check(args: argparse.Namespace) -> int:
    thresholds = {
        k: getattr(args, k) for k in ("warn_memory", "crit_memory", "warn_disk", "crit_disk")
    }
    try:
        status = fetch_status(_http_url(args), args.timeout)
    except Unreachable as exc:
        print(f"FELIX CRITICAL - unreachable: {exc}")
        return CRITICAL
    try:
        code, line = verdict(status, thresholds)
    except (KeyError, TypeError, ValueError) as exc:
        print(f"FELIX UNKNOWN - unexpected /status document: {exc!r}")
        return UNKNOWN
    print(line)
    return code
