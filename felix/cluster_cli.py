"""``felix cluster status``: the nodes of a cluster, their leases and the shard map, from a
node's health port (``/cluster``, felix/node/health.py); and the operator's actions on
the cluster's tables (``forget``, ``unpin``) and on a durable shard's data
(``export-shard``, ``import-shard``, ``move``: felix/cluster/shard_export.py,
shard_import.py, store.py ``move_shard``).

The node is found as ``felix status`` finds it: ``--http URL``; ``$FELIX_HTTP_URL``; the
context's or local node's node.json; else ``http://127.0.0.1:8080``. Every other node's
``/cluster`` is asked too (at the health URL it registered), for its own lease and
whether it is the placer; a node that does not answer is shown as such.

Exit status: 0 the node answered, 1 it did not (or is not part of a cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from felix.errors import ClusterError
from felix.keys.kek import REGION_KEY_ENV
from felix.status_cli import DEFAULT_HTTP, Subparsers, _http_url

__all__ = ["add_commands", "fetch_cluster", "render"]

#: /cluster answers hold at most 4096 shards of a few dozen bytes each.
_MAX_BODY = 8 << 20


class Unreachable(Exception):
    """The health port did not answer with a /cluster document."""


def add_commands(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``cluster status`` to the ``felix`` command's ``subparsers``."""
    cluster = subparsers.add_parser(
        "cluster", help="the cluster this node belongs to (felix up --cluster)"
    )
    commands = cluster.add_subparsers(dest="cluster_command", required=True)
    doc = (__doc__ or "").split("\n\n", 1)[1]
    status = commands.add_parser(
        "status",
        help="nodes, leases, placer, balance and handoffs (--shards: the shard map)",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("--http", metavar="URL", help=f"a node's health port ({DEFAULT_HTTP})")
    status.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per request (5)"
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument("--shards", action="store_true", help="the owner and epoch of each shard")
    status.set_defaults(func=_status)

    for name, help_text, target in (
        (
            "forget",
            "remove a node that is gone for good; the shards pinned to its durable data "
            "are unpinned and placed on live nodes, empty (its records stay on its disk)",
            ("node", "NODE_ID", "the node id"),
        ),
        (
            "unpin",
            "unpin shards from a durable node that is down (after copying or giving up its "
            "data): the placer gives them to live nodes, empty",
            ("shards", "SHARD", "logical shard numbers"),
        ),
    ):
        cmd = commands.add_parser(name, help=help_text, description=help_text)
        dest, metavar, what = target
        if dest == "shards":
            cmd.add_argument(dest, metavar=metavar, type=int, nargs="+", help=what)
        else:
            cmd.add_argument(dest, metavar=metavar, help=what)
        cmd.add_argument(
            "--cluster",
            metavar="DSN",
            default=os.environ.get("FELIX_CLUSTER"),
            help="the cluster's PostgreSQL database (default $FELIX_CLUSTER)",
        )
        cmd.add_argument(
            "--yes", action="store_true", help="confirm: the durable records stay behind"
        )
        cmd.set_defaults(func=_forget if name == "forget" else _unpin)
    _add_move_commands(commands)


def _add_move_commands(commands: Subparsers[argparse.ArgumentParser]) -> None:
    """``export-shard``, ``import-shard`` and ``move``: a durable shard moved with its data
    (docs/operations.md, "Moving a durable shard")."""
    export = commands.add_parser(
        "export-shard",
        help="write one logical shard's durable streams of a stopped node's data dir to an "
        "archive file (segments, queue group state, wrapped data keys; nothing decrypted)",
    )
    export.add_argument("shard", metavar="SHARD", type=int, help="the logical shard")
    export.add_argument("--data-dir", type=Path, required=True, help="the stopped node's data dir")
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="the archive")
    export.add_argument(
        "--logical-shards",
        type=int,
        metavar="N",
        help="the cluster's number of logical shards (default: from DATA_DIR/node.json)",
    )
    export.add_argument(
        "--region",
        metavar="ID",
        help="the node's region (default: from DATA_DIR/node.json; recorded in the archive)",
    )
    export.set_defaults(func=_export)

    imp = commands.add_parser(
        "import-shard",
        help="put an archive of export-shard into a stopped node's data dir, re-encrypted "
        "with its keys (refuses streams that hold records there)",
    )
    imp.add_argument("archive", metavar="FILE", type=Path, help="the archive")
    imp.add_argument("--data-dir", type=Path, required=True, help="the stopped node's data dir")
    imp.add_argument(
        "--region-key",
        type=Path,
        metavar="FILE",
        help=f"this node's region key (default ${REGION_KEY_ENV}, else DATA_DIR/keys/region.key)",
    )
    imp.add_argument(
        "--source-region-key",
        type=Path,
        metavar="FILE",
        help="the source node's region key, when it is not this node's",
    )
    imp.add_argument(
        "--region",
        metavar="ID",
        help="the node's region (default: from DATA_DIR/node.json); an archive of another "
        "region is refused (exit 2)",
    )
    imp.add_argument(
        "--force-extra-streams",
        action="store_true",
        help="import although DATA_DIR holds records of other streams of the shard (they "
        "are served beside the imported ones once the shard is moved there)",
    )
    imp.set_defaults(func=_import)

    move = commands.add_parser(
        "move",
        help="give a durable shard to the node it was imported into: its pinned node must "
        "be down, the target live and holding its records",
    )
    move.add_argument("shard", metavar="SHARD", type=int, help="the logical shard")
    move.add_argument("--to", required=True, metavar="NODE_ID", help="the node it moves to")
    move.add_argument(
        "--cluster",
        metavar="DSN",
        default=os.environ.get("FELIX_CLUSTER"),
        help="the cluster's PostgreSQL database (default $FELIX_CLUSTER)",
    )
    move.add_argument(
        "--yes",
        action="store_true",
        help="confirm: the old node's copy is stale from now on and is not served again",
    )
    move.add_argument(
        "--unverified-source",
        action="store_true",
        help="move although the target's copy was not imported from the data dir of the "
        "node the shard is pinned to (restored from elsewhere): only if you know it is "
        "that node's latest data",
    )
    move.set_defaults(func=_move)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A health port never redirects: a redirect is an answer, not a place to go."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


#: http(s) only, no redirects: the health URLs of other nodes come from the cluster's
#: database, and nothing read from there may make this command open files or follow hosts.
_OPENER = urllib.request.build_opener(_NoRedirects)


def fetch_cluster(url: str, timeout: float) -> dict[str, Any]:
    """GET ``url``/cluster; raises Unreachable unless it is a cluster node's answer."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise Unreachable(f"{url[:200]!r}: not an http(s) URL")
    try:
        with _OPENER.open(f"{url.rstrip('/')}/cluster", timeout=timeout) as answer:
            body = answer.read(_MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise Unreachable(f"{url}: this node is not part of a cluster") from None
        raise Unreachable(f"{url}/cluster: HTTP {exc.code}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None
    if len(body) > _MAX_BODY:
        raise Unreachable(f"{url}/cluster: answer over {_MAX_BODY} bytes")
    try:
        doc = json.loads(body)
    except ValueError:
        raise Unreachable(f"{url}/cluster: not JSON") from None
    if not isinstance(doc, dict):
        raise Unreachable(f"{url}/cluster: not a cluster node's answer")
    return doc


def gather(doc: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The cluster as one document: ``doc`` (one node's /cluster) with, per node, its
    own answer's lease and placer flag (``peers``)."""
    nodes = [_node_row(row) for row in doc.get("nodes") or []]
    me = doc.get("node_id")

    def ask(node: dict[str, Any]) -> tuple[str, dict[str, Any] | str]:
        if node["node_id"] == me:
            return node["node_id"], doc
        url = node.get("health_url")
        if not url:
            return node["node_id"], "no health URL"
        try:
            return node["node_id"], fetch_cluster(url, timeout)
        except Unreachable as exc:
            return node["node_id"], str(exc)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(nodes)))) as pool:
        answers = dict(pool.map(ask, nodes))
    shards = [_shard_row(row) for row in doc.get("shards") or []]
    owned: dict[str, int] = {}
    for shard in shards:
        if shard["owner"] is not None:
            owned[shard["owner"]] = owned.get(shard["owner"], 0) + 1
    for node in nodes:
        node["owned"] = owned.get(node["node_id"], 0)
        answer = answers.get(node["node_id"])
        if isinstance(answer, dict):
            node["answered"] = True
            node["placer"] = bool(answer.get("placer"))
            node["serving"] = bool(answer.get("serving"))
            node["lease_seconds_left"] = answer.get("lease_seconds_left")
            node["map_version"] = answer.get("version")
        else:
            node["answered"] = False
            node["problem"] = answer
    rows = doc.get("rows")
    if not isinstance(rows, dict):
        rows = {}
    for node in nodes:
        row = rows.get(node["node_id"])
        if isinstance(row, dict):
            node["row"] = row
    placers = [n["node_id"] for n in nodes if n.get("placer")]
    return {
        "node_id": me,
        "logical_shards": doc.get("logical_shards"),
        "version": doc.get("version"),
        "placer": placers[0] if len(placers) == 1 else (placers or None),
        "balance": doc.get("balance"),
        "handoffs": doc.get("handoffs") or [],
        "node_expiry": doc.get("node_expiry"),
        "nodes": nodes,
        "shards": shards,
        "stale": _stale(doc.get("stale")),
    }


def _stale(raw: Any) -> dict[int, list[str]]:
    """``/cluster``'s stale copies: logical shard -> nodes holding one."""
    if not isinstance(raw, dict):
        return {}
    out: dict[int, list[str]] = {}
    for shard, nodes in raw.items():
        if str(shard).isdigit() and isinstance(nodes, list):
            out[int(shard)] = [str(n) for n in nodes]
    return out


def _node_row(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return dict(row)
    node_id, address, health_url, live, incarnation, lease_until = row
    return {
        "node_id": node_id,
        "address": address,
        "health_url": health_url,
        "live": live,
        "incarnation": incarnation,
        "lease_until": lease_until,
    }


def _shard_row(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return dict(row)
    owner, epoch, handoff_to, durable_node = row
    return {"owner": owner, "epoch": epoch, "handoff_to": handoff_to, "durable_node": durable_node}


def render(cluster: dict[str, Any], shards: bool) -> str:
    """The human view of :func:`gather`'s document."""
    nodes = cluster["nodes"]
    placer = cluster.get("placer")
    lines = [
        f"cluster of {len(nodes)} node(s), {sum(1 for n in nodes if n.get('live'))} live  "
        f"logical shards {cluster.get('logical_shards')}  map version "
        f"{cluster.get('version')} (as node {cluster.get('node_id')} sees it)  "
        f"placer {placer if isinstance(placer, str) else placer or 'none'}",
        f"  {'NODE':<20}{'ADDRESS':<24}{'LIVE':<6}{'LEASE':>8}{'INC':>6}{'OWNED':>7}  STATE",
    ]
    for node in nodes:
        left = node.get("lease_seconds_left")
        lease = f"{left:.1f}s" if isinstance(left, int | float) else "-"
        if not node.get("answered"):
            state = f"did not answer ({node.get('problem')})"
        else:
            state = "serving" if node.get("serving") else "not serving"
            if node.get("placer"):
                state += ", placer"
        row = node.get("row")
        if isinstance(row, dict):
            state += f"; {_row_fate(row)}"
        lines.append(
            f"  {node['node_id']:<20}{node['address']:<24}"
            f"{'yes' if node.get('live') else 'NO':<6}{lease:>8}{node.get('incarnation', '-'):>6}"
            f"{node.get('owned', 0):>7}  {state}"
        )
    balance = cluster.get("balance")
    if isinstance(balance, dict):
        lines.append(
            f"  balance: {balance.get('min')}-{balance.get('max')} shards per live node "
            f"(spread {balance.get('spread')}), {balance.get('unowned', 0)} without a live owner"
        )
    stale = cluster.get("stale") or {}
    if stale:
        holders = sorted({n for nodes in stale.values() for n in nodes})
        lines.append(
            f"  stale copies: {len(stale)} shard(s) on {', '.join(holders)} (never given "
            "those shards until the copies are removed; --shards shows which)"
        )
    handoffs = cluster.get("handoffs") or []
    lines.append(f"  handoffs in flight: {len(handoffs)}")
    for h in handoffs:
        lines.append(f"    shard {h.get('shard')}: {h.get('from')} -> {h.get('to')} "
                     f"(epoch {h.get('epoch')})")  # fmt: skip
    if shards:
        lines.append(f"  {'SHARD':>6}  {'OWNER':<20}{'EPOCH':>7}  HANDOFF TO / DURABLE ON")
        for i, s in enumerate(cluster["shards"]):
            extra = []
            if s.get("handoff_to"):
                extra.append(f"-> {s['handoff_to']}")
            if s.get("durable_node"):
                extra.append(f"durable on {s['durable_node']}")
            if stale.get(i):
                extra.append(f"stale copy on {', '.join(stale[i])}")
            lines.append(
                f"  {i:>6}  {s.get('owner') or '-':<20}{s.get('epoch', 0):>7}  {' '.join(extra)}"
            )
    return "\n".join(lines)


def _row_fate(row: dict[str, Any]) -> str:
    """What becomes of a down node's row (agent.py ``_rows``)."""
    pinned = row.get("pinned")
    if isinstance(pinned, int) and pinned > 0:
        return f"kept: {pinned} shard(s) pinned to its data (felix cluster forget)"
    expires = row.get("expires_in")
    if isinstance(expires, int | float):
        return f"removed in {_duration(expires)}" if expires > 0 else "removed soon"
    return "kept (--cluster-node-expiry 0)"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{math.ceil(seconds)}s"


def _status(args: argparse.Namespace) -> int:
    url = _http_url(args)
    try:
        doc = fetch_cluster(url, args.timeout)
    except Unreachable as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 1
    cluster = gather(doc, args.timeout)
    if args.json:
        if not args.shards:
            cluster = {k: v for k, v in cluster.items() if k != "shards"}
        print(json.dumps(cluster, sort_keys=True))
    else:
        print(render(cluster, args.shards))
    return 0


def _admin_args(args: argparse.Namespace) -> str | None:
    if not args.cluster:
        print(
            "felix: name the cluster's database: --cluster DSN or $FELIX_CLUSTER", file=sys.stderr
        )
        return None
    if not args.yes:
        print(
            "felix: the shards' durable records stay on the old node's disk and are not "
            "served again; add --yes to go on",
            file=sys.stderr,
        )
        return None
    return str(args.cluster)


def _forget(args: argparse.Namespace) -> int:
    from felix.cluster.store import forget_node

    dsn = _admin_args(args)
    if dsn is None:
        return 2
    try:
        shards = asyncio.run(forget_node(dsn, args.node))
    except ClusterError as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 1
    print(f"forgot node {args.node}; unpinned shards: {_shard_list(shards)}")
    return 0


def _unpin(args: argparse.Namespace) -> int:
    from felix.cluster.store import unpin_shards

    dsn = _admin_args(args)
    if dsn is None:
        return 2
    try:
        shards = asyncio.run(unpin_shards(dsn, sorted(set(args.shards))))
    except ClusterError as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 1
    left = sorted(set(args.shards) - set(shards))
    print(f"unpinned shards: {_shard_list(shards)}")
    if left:
        print(f"left pinned (their node is alive, or they were not pinned): {_shard_list(left)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from felix.cluster.shard_export import export_shard

    try:
        done = export_shard(
            args.data_dir,
            args.shard,
            args.out,
            logical_shards=args.logical_shards,
            region=args.region,
        )
    except ClusterError as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unreadable data dir, no room for the archive: say which
        print(f"felix: export failed: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    m = done.manifest
    records = sum(s.records for s in m.streams)
    print(
        f"exported logical shard {m.shard} of {m.logical_shards} (region {m.region}) from "
        f"{args.data_dir} to "
        f"{done.out}: {len(m.streams)} stream(s), {records} records, "
        f"{sum(len(s.groups) for s in m.streams)} group file(s), {done.bytes} bytes in "
        f"{done.seconds:.2f}s"
    )
    for s in m.streams:
        print(f"  {s.key}: offsets {s.first_offset}..{s.next_offset - 1}, {s.records} records")
    return 0


def _import(args: argparse.Namespace) -> int:
    from felix.cluster.archive import IMPORTS_DIR, RegionMismatch
    from felix.cluster.shard_import import import_shard

    try:
        done = import_shard(
            args.archive,
            args.data_dir,
            region_key=args.region_key,
            source_region_key=args.source_region_key,
            region=args.region,
            force_extra_streams=args.force_extra_streams,
        )
    except RegionMismatch as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 2
    except ClusterError as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # what was staged is removed; the data dir is as it was
        print(f"felix: import failed: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    if done.finished is not None:
        print(f"finished an interrupted import of shard {done.finished.get('shard')}")
    if done.already_done:
        return 0
    m = done.manifest
    assert m is not None
    rate = done.records / done.seconds if done.seconds > 0 else 0.0
    print(
        f"imported logical shard {m.shard} into {args.data_dir}: {done.streams} stream(s), "
        f"{done.records} records ({done.reencrypted} re-encrypted with this node's keys), "
        f"{done.groups} group file(s) in {done.seconds:.2f}s ({rate:.0f} records/s); start "
        f"the node, then: felix cluster move {m.shard} --to NODE_ID --yes"
    )
    p = done.provenance or {}
    exported = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created_us / 1e6))
    print(
        f"recorded in {args.data_dir / IMPORTS_DIR / f'{m.shard}.json'}: from node "
        f"{m.node_id or '(unknown)'} (data id {m.data_id or '(unknown)'}) of region {m.region}, "
        f"exported {exported}, archive sha256 {p.get('archive_sha256')}"
    )
    return 0


def _move(args: argparse.Namespace) -> int:
    from felix.cluster.store import move_shard

    if not args.cluster:
        print(
            "felix: name the cluster's database: --cluster DSN or $FELIX_CLUSTER", file=sys.stderr
        )
        return 2
    if not args.yes:
        print(
            "felix: the shard is then served from the target's copy only (the old node's "
            "copy is stale); add --yes to go on",
            file=sys.stderr,
        )
        return 2
    try:
        epoch = asyncio.run(
            move_shard(args.cluster, args.shard, args.to, verify_source=not args.unverified_source)
        )
    except ClusterError as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 1
    print(f"shard {args.shard} is owned by and pinned to {args.to} (epoch {epoch})")
    return 0


def _shard_list(shards: list[int]) -> str:
    return ", ".join(map(str, shards)) if shards else "none"
