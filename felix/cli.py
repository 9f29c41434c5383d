"""The `felix` command line: `felix up` runs a node; client commands talk to one.

`felix up` and `felix control` need the server extra (pip install 'felix[server]');
every other command works with the base install.

felix up --shards 2 --gateways 2 --data-dir ./data
felix pub orders '{"id": 1}'      felix sub orders
felix cache set sessions k v      felix cache get sessions k
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from felix.dsn import redact_dsn
from felix.errors import ConfigError, FelixError
from felix.extras import require_extra
from felix.node.config import (
    TOPOLOGIES,
    NodeConfig,
    default_node_id,
    parse_address,
    parse_duration,
    parse_size,
    resolve_topology,
    usable_cpus,
)
from felix.regions import DEV_REGION
from felix.shard.cache import CacheSettings
from felix.shard.stream_log import StreamSettings

if TYPE_CHECKING:
    from felix.auth.rotation import KeyRotator

_STREAM = StreamSettings()
_CACHE = CacheSettings()


def _add_rotation_flags(parser: argparse.ArgumentParser, where: str) -> None:
    """``--key-rotation-interval`` and ``--key-publish-lead`` (the rings' owner rotates)."""
    parser.add_argument(
        "--key-rotation-interval",
        default="24h",
        metavar="DURATION",
        help=f"with --auth: rotate every tenant's signing keys in {where} this often "
        "(e.g. 24h, 90m, 3600; 0 disables; default 24h)",
    )
    parser.add_argument(
        "--key-publish-lead",
        default="5m",
        metavar="DURATION",
        help="a scheduled key is published this long before it signs; keep it above "
        "twice the nodes' --jwks-refresh (default 5m)",
    )


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cores = usable_cpus()
    up = sub.add_parser(
        "up",
        help="run a felix node in the foreground",
        description="Run a node: QUIC gateways, shard workers and the "
        "health/metrics endpoint. Ctrl-C or SIGTERM drains and exits.",
    )
    up.add_argument(
        "--config",
        type=Path,
        help="TOML file of defaults for these flags (keys are the flag names, e.g. "
        'shards = 4, replay-bytes = "128MiB"); flags given here win',
    )
    up.add_argument(
        "--listen",
        default="127.0.0.1:5000",
        help="QUIC address HOST:PORT (port 0 picks a free one)",
    )
    up.add_argument(
        "--http",
        default="127.0.0.1:8080",
        help="metrics and health HOST:PORT (/metrics, /livez, /startupz, /readyz)",
    )
    up.add_argument(
        "--control",
        default="127.0.0.1:8443",
        help="REST API HOST:PORT of the embedded control plane (port 0 picks a free one)",
    )
    up.add_argument(
        "--control-store",
        metavar="URL",
        default=os.environ.get("FELIX_CONTROL_STORE") or None,
        help="store of the embedded control plane: sqlite:///PATH (default "
        "$FELIX_CONTROL_STORE, else DATA_DIR/control.db, or the --cluster database in a "
        "cluster), postgresql://..., memory://",
    )
    up.add_argument(
        "--control-url",
        metavar="URL",
        help="follow this control plane (felix control) instead of embedding one",
    )
    up.add_argument(
        "--control-token",
        metavar="TOKEN",
        default=os.environ.get("FELIX_CONTROL_TOKEN") or None,
        help="bearer token for --control-url when it requires auth (its admin token); "
        "default $FELIX_CONTROL_TOKEN",
    )
    up.add_argument(
        "--control-ca",
        type=Path,
        metavar="FILE",
        help="CA (PEM) verifying an https --control-url (default $FELIX_CONTROL_CA, "
        "else the system store)",
    )
    up.add_argument(
        "--control-client-cert",
        type=Path,
        metavar="FILE",
        help="client certificate (PEM) for a --control-url that requires one (mTLS; "
        "default $FELIX_CONTROL_CERT)",
    )
    up.add_argument(
        "--control-client-key",
        type=Path,
        metavar="FILE",
        help="its private key (default $FELIX_CONTROL_KEY)",
    )
    cluster = up.add_argument_group(
        "cluster", "several nodes that agree through PostgreSQL (docs/operations.md, Cluster)"
    )
    cluster.add_argument(
        "--cluster",
        metavar="DSN",
        default=os.environ.get("FELIX_CLUSTER") or None,
        help="join the cluster of nodes agreeing through this PostgreSQL database "
        "(postgresql://...; default $FELIX_CLUSTER); the embedded control plane then uses "
        "it as its store unless --control-store says otherwise",
    )
    cluster.add_argument(
        "--node-id",
        metavar="ID",
        help="this node's id in the cluster, stable across restarts (default $HOSTNAME, "
        "else the host name: the StatefulSet pod name)",
    )
    cluster.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the QUIC address other nodes redirect clients to (default the --listen "
        "address; required when that is a wildcard address)",
    )
    cluster.add_argument(
        "--logical-shards",
        type=int,
        default=256,
        metavar="N",
        help="logical shards of the cluster, fixed when it is created (256; 1..4096)",
    )
    cluster.add_argument(
        "--cluster-lease",
        default="10s",
        metavar="DURATION",
        help="the node's lease: renewed every third of it; a node that cannot renew stops "
        "serving before it runs out, and its shards move once it has (10s); every node "
        "of a cluster uses the same lease",
    )
    cluster.add_argument(
        "--cluster-settle",
        default="2s",
        metavar="DURATION",
        help="a new cluster's first placement waits until no node has joined for this "
        "long (at most five times as long), so nodes started together each get their "
        "shards at once; 0: place at once (2s)",
    )
    cluster.add_argument(
        "--cluster-node-expiry",
        default="24h",
        metavar="DURATION",
        help="remove a node from the cluster this long after its lease ended, unless shards "
        "are pinned to its durable data; 0: never (24h)",
    )
    up.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="auto",
        help="split: gateway and shard processes joined by rings; embedded: one gateway "
        "process hosting the shards (no ring hop); auto (default): embedded on machines "
        f"with at most 2 usable CPUs, else split (this one has {cores})",
    )
    up.add_argument("--gateways", type=int, help=f"gateway processes (split: one per CPU, {cores})")
    up.add_argument("--shards", type=int, help=f"shards (one per CPU, {cores})")
    up.add_argument("--data-dir", type=Path, default=Path("data"), help="state directory")
    up.add_argument("--memory-budget", default="1GiB", help="memory for all shards (1GiB)")
    up.add_argument(
        "--tenant-memory-quota",
        help="a tenant's memory on this node unless its control-plane quota says (the budget)",
    )
    up.add_argument(
        "--tenant-max-resources",
        type=int,
        default=10_000,
        help="streams, caches and watches a tenant may hold per shard (10000)",
    )
    up.add_argument(
        "--max-streams-per-shard", type=int, default=65_536, help="streams per shard (65536)"
    )
    _add_durable_options(up)
    up.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback listen address without authentication",
    )
    up.add_argument(
        "--no-auto-create",
        action="store_true",
        help="refuse requests for streams and caches that do not exist yet",
    )
    up.add_argument(
        "--embedded-shards",
        action="store_true",
        help="the same as --topology embedded",
    )
    up.add_argument(
        "--region",
        default=os.environ.get("FELIX_REGION") or None,
        metavar="ID",
        help="the region this node and its embedded control plane belong to: tokens, "
        "resources and a followed control plane must be of this region; required beyond "
        "loopback (default: $FELIX_REGION, else 'local' on loopback)",
    )
    up.add_argument(
        "--bridges",
        action="store_true",
        help="run every active bridge of this node's control plane in a child process "
        "(bridges-0; checkpoints in DATA_DIR/bridges)",
    )
    up.add_argument(
        "--bridges-http",
        metavar="HOST:PORT",
        help="where the bridges child serves /metrics and /bridges (default: nowhere)",
    )
    up.add_argument(
        "--spin-us",
        type=int,
        default=0,
        metavar="US",
        help="keep polling for this long after traffic before sleeping (gateways: their UDP "
        "socket; shards: their rings): lower latency for CPU (0: off; see docs/operations.md)",
    )
    up.add_argument(
        "--auth",
        nargs="?",
        const="jwt",
        choices=["jwt", "none"],
        help="jwt: require Felix tokens (tenant keys in DATA_DIR/auth: see felix token) on "
        "the QUIC port and the control API (or the admin token DATA_DIR/admin-token, "
        "created on first start); both may then listen beyond loopback. none: no tokens "
        "(beyond loopback only with --insecure or --tls-client-ca). Default: jwt when "
        "--listen or --control is not a loopback address, else none",
    )
    _add_rotation_flags(up, "DATA_DIR/auth (embedded control plane)")
    up.add_argument(
        "--jwks-refresh",
        default="30s",
        metavar="DURATION",
        help="with --auth and --control-url: fetch each tenant's public keys from the "
        "control plane this often into DATA_DIR/auth (default 30s)",
    )
    up.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    up.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    up.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="mTLS: QUIC clients must present a certificate chained to this CA (PEM; "
        "felix ca issue-client makes them from the node's CA); served by the aioquic engine",
    )
    up.add_argument(
        "--control-client-ca",
        type=Path,
        metavar="FILE",
        help="mTLS on the embedded control plane: serve HTTPS and require a client "
        "certificate chained to this CA (PEM); it may then listen beyond loopback",
    )
    up.add_argument(
        "--replay-records",
        type=int,
        default=_STREAM.replay_max_records,
        help="records kept per stream for replay",
    )
    up.add_argument("--replay-bytes", default="64MiB", help="bytes kept per stream for replay")
    up.add_argument(
        "--slow-subscriber",
        choices=["drop_old", "disconnect", "block"],
        default="drop_old",
        help="what a subscriber that falls behind the replay ring gets: drop_old (skip ahead, "
        "visible gap), disconnect, or block (publishers get Overloaded until it catches up)",
    )
    up.add_argument(
        "--dedup-window",
        default="2m",
        help="how long a stream remembers the felix-msg-id of each record it stored, to "
        "drop a publish of the same id again (streams whose spec sets no dedup_window_s; "
        "0: off; up to 7d)",
    )
    up.add_argument(
        "--dedup-max-entries",
        type=int,
        default=_STREAM.dedup_max_entries,
        help="most message ids a stream remembers (oldest forgotten first)",
    )
    up.add_argument("--cache-budget", default="64MiB", help="bytes per cache (all shards)")
    up.add_argument(
        "--cache-max-ttl", type=float, default=_CACHE.max_ttl, help="longest TTL in seconds"
    )
    up.add_argument("--ring-bytes", default="4MiB", help="size of each gateway<->shard ring")
    up.add_argument(
        "--shm-socket",
        default=None,
        metavar="PATH|off",
        help="Unix socket for same-host clients over shared memory (felix+shm://PATH; "
        "default DATA_DIR/felix.sock; off: none)",
    )
    up.add_argument(
        "--shm-socket-mode",
        default="0600",
        help="file mode of the shm socket (0600: this user only; 0660 lets its group in)",
    )
    up.add_argument(
        "--shm-max-connections",
        type=int,
        default=64,
        help="shared-memory connections per node (64; each holds two 1 MiB rings by default)",
    )
    up.add_argument("--drain-grace", type=float, default=10.0, help="seconds to drain on stop")
    up.add_argument(
        "--heartbeat-timeout",
        default="10s",
        help="kill and restart a child that has not answered the heartbeat this long",
    )
    up.add_argument(
        "--engine",
        choices=["qh3", "aioquic"],
        default=os.environ.get("FELIX_QUIC_ENGINE") or None,
        help="QUIC engine (default qh3; aioquic with --tls-client-ca: qh3 cannot "
        "require client certificates)",
    )
    up.add_argument(
        "--audit-log",
        metavar="FILE",
        help="write the audit log's JSON lines to FILE ('-': stderr) instead of the "
        "general log (sets FELIX_AUDIT_LOG for every process)",
    )
    _add_log_flags(up)
    up.set_defaults(func=_run_up, parser=up)
    config = sub.add_parser("config", help="the configuration felix up would run with")
    commands = config.add_subparsers(dest="config_command", required=True)
    # The same flags as `felix up` (and --config FILE): what they make, and from where.
    show = commands.add_parser(
        "show",
        parents=[up],
        conflict_handler="resolve",
        help="print the effective configuration of `felix up` with these flags, and where "
        "each value came from (default, file, environment, flag)",
        description="Takes every flag of `felix up`. Prints the settings the node would "
        "run with, each with its source; starts nothing.",
    )
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=_config_show, parser=show)


def apply_config_file(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> set[str]:
    """Fill every flag not given in ``argv`` from ``args.config`` (TOML); the
    settings (argparse dests) the file set."""
    import tomllib

    try:
        table = tomllib.loads(args.config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read --config {args.config}: {exc}") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    applied: set[str] = set()
    for key, value in table.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise ConfigError(f"--config {args.config}: unknown setting {key!r}")
        if any(a == opt or a.startswith(opt + "=") for a in argv for opt in action.option_strings):
            continue  # given on the command line: the flag wins
        if isinstance(value, str) and callable(action.type):
            value = action.type(value)
        if isinstance(value, bool) and dest in ("auth", "encryption"):
            pass  # `auth = true|false` as well as "jwt"|"none"; `encryption` likewise
        elif action.choices is not None and value not in action.choices:
            raise ConfigError(f"--config {args.config}: {key} must be one of {action.choices}")
        setattr(args, dest, value)
        applied.add(dest)
    return applied


def _auth_mode(mode: str | bool | None, *hosts: str) -> bool:
    """--auth: jwt (True) or none (False); unset: jwt as soon as one port leaves loopback."""
    from felix.node.config import is_loopback

    if isinstance(mode, bool):  # `auth = true` in a --config file
        return mode
    if mode is None:
        return not all(is_loopback(host) for host in hosts)
    return mode == "jwt"


def _add_durable_options(up: argparse.ArgumentParser) -> None:
    """Durable streams (docs/operations.md, "Durable streams")."""
    up.add_argument(
        "--durable-streams",
        action="store_true",
        help="streams created by their first publish are durable (written to DATA_DIR/streams)",
    )
    up.add_argument(
        "--fsync",
        choices=["none", "interval", "commit"],
        default="commit",
        help="fsync policy of those streams (commit: acks wait for an fsync)",
    )
    up.add_argument(
        "--fsync-interval-ms", type=int, default=100, help="with --fsync interval (100)"
    )
    up.add_argument("--segment-bytes", default="256MiB", help="segment file size (256MiB)")
    up.add_argument(
        "--disk-budget", help="disk for all durable streams of the node, split per shard (none)"
    )
    up.add_argument(
        "--tenant-disk-quota",
        help="durable stream bytes a tenant may keep on this node unless its control-plane "
        "disk_quota_bytes says, split per shard (none)",
    )
    up.add_argument(
        "--disk-reserve",
        default="256MiB",
        help="refuse new durable data when the data disk has less free space (256MiB)",
    )
    up.add_argument(
        "--max-durable-streams-per-shard",
        type=int,
        default=1024,
        help="durable streams per shard (1024; each holds open files)",
    )
    up.add_argument(
        "--region-key",
        type=Path,
        metavar="FILE",
        default=None,
        help="the region key (32 bytes, raw or 64 hex digits) wrapping the per-tenant data "
        "keys of encryption at rest (default $FELIX_REGION_KEY_FILE, else "
        "DATA_DIR/keys/region.key, generated on first start: dev mode)",
    )
    up.add_argument(
        "--encryption",
        choices=["on", "off"],
        default="on",
        help="encrypt durable records and queue group state at rest (on); off writes new "
        "data in plaintext (encrypted data stays readable with the key)",
    )


def _region_key(given: Path | None) -> Path | None:
    """``--region-key``, else ``$FELIX_REGION_KEY_FILE`` (absolute: children run elsewhere)."""
    from felix.keys.kek import REGION_KEY_ENV

    if given is None:
        env = os.environ.get(REGION_KEY_ENV)
        given = Path(env) if env else None
    return None if given is None else given.resolve()


def _on_off(value: str | bool, flag: str) -> bool:
    if isinstance(value, bool):  # `encryption = true` in a --config file
        return value
    if value not in ("on", "off"):
        raise ConfigError(f"{flag} must be on or off, not {value!r}")
    return value == "on"


def _shm_socket(value: str | None, data_dir: Path) -> Path | None:
    """``--shm-socket``: None (off), or the socket's absolute path (default in the data dir)."""
    if value is None:
        return data_dir / "felix.sock"
    if value.strip().lower() == "off":
        return None
    return Path(value).resolve()


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(
            f"--shm-socket-mode must be an octal mode like 0600, got {text!r}"
        ) from None
    return mode


def _node_config(args: argparse.Namespace) -> NodeConfig:

    replay_bytes = parse_size(args.replay_bytes)
    listen = parse_address(args.listen, 5000)
    control = parse_address(args.control, 8443)
    gateways, shards, embedded = resolve_topology(
        "embedded" if args.embedded_shards else args.topology,
        args.gateways,
        args.shards,
        usable_cpus(),
    )
    return NodeConfig(
        listen=listen,
        http=parse_address(args.http, 8080),
        control=control,
        gateways=gateways,
        shards=shards,
        data_dir=args.data_dir.resolve(),
        memory_budget=parse_size(args.memory_budget),
        tenant_memory_quota=(
            parse_size(args.tenant_memory_quota) if args.tenant_memory_quota else None
        ),
        tenant_max_resources=args.tenant_max_resources,
        max_streams_per_shard=args.max_streams_per_shard,
        durable_streams=args.durable_streams,
        fsync=args.fsync,
        fsync_interval_ms=args.fsync_interval_ms,
        segment_bytes=parse_size(str(args.segment_bytes)),
        disk_budget=parse_size(str(args.disk_budget)) if args.disk_budget else None,
        disk_reserve=parse_size(str(args.disk_reserve)),
        tenant_disk_quota=(
            parse_size(str(args.tenant_disk_quota)) if args.tenant_disk_quota else None
        ),
        max_durable_streams_per_shard=args.max_durable_streams_per_shard,
        region_key=_region_key(args.region_key),
        encryption=_on_off(args.encryption, "--encryption"),
        insecure=args.insecure,
        auto_create=not args.no_auto_create,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        control_client_ca=args.control_client_ca,
        control_ca=args.control_ca,
        control_client_cert=args.control_client_cert,
        control_client_key=args.control_client_key,
        ring_bytes=parse_size(args.ring_bytes),
        shm_socket=_shm_socket(args.shm_socket, args.data_dir.resolve()),
        shm_socket_mode=_file_mode(args.shm_socket_mode),
        shm_max_connections=args.shm_max_connections,
        drain_grace=args.drain_grace,
        bridges=args.bridges,
        bridges_http=args.bridges_http,
        heartbeat_timeout=parse_duration(args.heartbeat_timeout),
        engine=args.engine or ("aioquic" if args.tls_client_ca is not None else "qh3"),
        # A cluster's nodes share one control plane: the cluster's database.
        control_store=args.control_store or (args.cluster if not args.control_url else None),
        control_url=args.control_url,
        cluster=args.cluster,
        node_id=args.node_id or (default_node_id() if args.cluster else ""),
        advertise=parse_address(args.advertise, 5000) if args.advertise else None,
        logical_shards=args.logical_shards,
        cluster_lease=parse_duration(args.cluster_lease),
        cluster_settle=parse_duration(args.cluster_settle),
        cluster_node_expiry=parse_duration(args.cluster_node_expiry),
        control_token=args.control_token,
        embedded_shards=embedded,
        spin_us=args.spin_us,
        region=args.region or DEV_REGION,
        auth=_auth_mode(args.auth, listen[0], *([] if args.control_url else [control[0]])),
        key_rotation_interval=parse_duration(args.key_rotation_interval),
        key_publish_lead=parse_duration(args.key_publish_lead),
        jwks_refresh=parse_duration(args.jwks_refresh),
        stream_defaults=StreamSettings(
            replay_max_records=args.replay_records,
            replay_max_bytes=replay_bytes,
            max_record_bytes=min(_STREAM.max_record_bytes, replay_bytes // 2),
            slow_subscriber_policy=args.slow_subscriber,
            dedup_window_s=parse_duration(args.dedup_window),
            dedup_max_entries=args.dedup_max_entries,
        ),
        cache_defaults=CacheSettings(
            budget_bytes=parse_size(args.cache_budget), max_ttl=args.cache_max_ttl
        ),
    )


def _add_control(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    control = sub.add_parser(
        "control",
        help="run the control plane (REST API) alone",
        description="Serve the control plane's REST API on its own, e.g. with PostgreSQL "
        "behind several nodes (which follow it with felix up --control-url).",
    )
    control.add_argument(
        "--store",
        default="sqlite:///control.db",
        help="postgresql://..., sqlite:///PATH, memory://",
    )
    control.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT")
    control.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without authentication",
    )
    control.add_argument(
        "--region",
        default=os.environ.get("FELIX_REGION") or None,
        metavar="ID",
        help="the region this control plane belongs to: its tokens carry it, resources "
        "and tokens of another region are refused; required beyond loopback (default: "
        "$FELIX_REGION, else 'local' on loopback)",
    )
    control.add_argument(
        "--node-memory-budget",
        default="1GiB",
        help="the --memory-budget of the nodes (the smallest), to check budgets against (1GiB)",
    )
    control.add_argument(
        "--node-shards", type=int, default=1, help="the --shards of the nodes (the most) (1)"
    )
    control.add_argument(
        "--tenant-memory-quota",
        help="the nodes' --tenant-memory-quota (default: the node memory budget)",
    )
    control.add_argument(
        "--node-max-streams-per-shard",
        type=int,
        default=65_536,
        help="the --max-streams-per-shard of the nodes (the smallest), the most a tenant's "
        "max_resources_per_shard may be (65536)",
    )
    control.add_argument(
        "--keys-dir",
        type=Path,
        default=Path("data/auth"),
        help="tenants' key rings (felix token keygen --dir), for the token exchange "
        "and JWKS routes and checking Felix tokens",
    )
    control.add_argument(
        "--auth",
        nargs="?",
        const="jwt",
        choices=["jwt", "none"],
        help="jwt: require a Felix token or the admin token on the API; it may then listen "
        "beyond loopback. none: no tokens (beyond loopback only with --insecure or "
        "--tls-client-ca). Default: jwt when --listen is not a loopback address, else none",
    )
    control.add_argument(
        "--admin-token-file",
        type=Path,
        default=Path("data/admin-token"),
        metavar="PATH",
        help="the bootstrap admin token, with --auth (created, mode 0600, if missing; "
        "default data/admin-token)",
    )
    _add_rotation_flags(control, "--keys-dir")
    from felix.control.cliargs import add_http_limit_arguments

    add_http_limit_arguments(control.add_argument_group("HTTP limits"))
    tls = control.add_argument_group("TLS")
    tls.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM): serve https")
    tls.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    tls.add_argument(
        "--tls-dir",
        type=Path,
        default=Path("data/tls"),
        metavar="DIR",
        help="without --tls-cert, the CA and server certificate generated (and reused) "
        "here when serving https: beyond loopback or with --tls-client-ca (data/tls)",
    )
    tls.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP address clients reach this control plane by, for the "
        "generated certificate (repeatable)",
    )
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="mTLS: require a client certificate chained to this CA (PEM); it may then "
        "listen beyond loopback",
    )
    control.add_argument(
        "--audit-log",
        metavar="FILE",
        help="write the audit log's JSON lines to FILE ('-': stderr) instead of the "
        "general log (sets FELIX_AUDIT_LOG for every process)",
    )
    _add_log_flags(control)
    control.set_defaults(func=_run_control)


def _add_log_flags(parser: argparse.ArgumentParser) -> None:
    """--log-format, --log-level, --log-levels (felix/logs.py); children inherit them."""
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text or JSON objects (default: $FELIX_LOG_FORMAT, else text)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="debug, info, warning, error (default: $FELIX_LOG_LEVEL, else info; -v: debug)",
    )
    parser.add_argument(
        "--log-levels",
        metavar="COMPONENT=LEVEL,...",
        help="levels per component, e.g. felix.gateway=debug,felix.shard=warning "
        "(default: $FELIX_LOG_LEVELS)",
    )


def _configure_logs(args: argparse.Namespace, process: str = "felix") -> None:
    """``process`` other than ``felix``: a node or control plane, whose children inherit
    the choices."""
    from felix.logs import configure

    configure(
        process,
        export=process != "felix",
        log_format=getattr(args, "log_format", None),
        level=getattr(args, "log_level", None),
        levels=getattr(args, "log_levels", None),
        verbose=args.verbose,
    )


def _use_audit_log(path: str | None) -> None:
    """--audit-log: felix/audit.py reads FELIX_AUDIT_LOG; children inherit it."""
    if path:
        os.environ["FELIX_AUDIT_LOG"] = path


def _run_control(args: argparse.Namespace) -> int:
    require_extra("server", "felix control")
    _configure_logs(args, "control")
    _use_audit_log(args.audit_log)
    import uvicorn
    import uvloop

    from felix.auth.files import admin_token
    from felix.control.api import create_app
    from felix.control.api.serving import server_config
    from felix.control.cliargs import http_limits
    from felix.control.quotas import NodeQuotas
    from felix.control.stores import open_store
    from felix.node.config import is_loopback

    host, port = parse_address(args.listen, 8443)
    args.auth = _auth_mode(args.auth, host)
    if not is_loopback(host) and not (args.insecure or args.auth or args.tls_client_ca):
        raise ConfigError(
            f"--listen {host} is not loopback: refusing without --auth or --tls-client-ca "
            "(or --insecure, to serve it unauthenticated)"
        )
    region = _control_region(args.region, host)
    tls_options = _control_tls(args, host)
    limits = http_limits(args)
    admin = admin_token(args.admin_token_file) if args.auth else None
    rotator = _key_rotator(args.keys_dir, args) if args.auth else None
    store = open_store(args.store)
    tenant_quota = args.tenant_memory_quota
    quotas = NodeQuotas(
        parse_size(args.node_memory_budget),
        args.node_shards,
        parse_size(tenant_quota) if tenant_quota else None,
        max_streams_per_shard=args.node_max_streams_per_shard,
    )
    if quotas.shards < 1 or quotas.max_streams_per_shard < 1:
        raise ConfigError("--node-shards and --node-max-streams-per-shard must be at least 1")

    async def serve() -> None:
        await store.open()
        try:
            app = create_app(
                store,
                region=region,
                keys_dir=args.keys_dir,
                admin_token=admin,
                require_auth=args.auth,
                limits=limits,
                quotas=quotas,
            )
            config = server_config(
                app,
                host,
                port,
                limits=limits,
                lifespan="off",
                timeout_graceful_shutdown=2,
                **tls_options,
            )
            rotation = None if rotator is None else asyncio.create_task(rotator.run())
            try:
                await uvicorn.Server(config).serve()
            finally:
                if rotation is not None:
                    rotation.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await rotation
        finally:
            await store.close()

    uvloop.run(serve())
    return 0


def _control_region(region: str | None, host: str) -> str:
    """--region of `felix control`: required beyond loopback, a valid name, not 'local'."""
    from felix.node.config import is_loopback
    from felix.regions import check_region_name

    if region is None or region == DEV_REGION:
        if not is_loopback(host):
            raise ConfigError(
                f"--region is required beyond loopback dev mode (--listen {host} is not a "
                "loopback address): name the region this control plane belongs to with "
                f"--region ID (or $FELIX_REGION); {DEV_REGION!r} is the loopback default only"
            )
        return DEV_REGION
    try:
        return check_region_name(region)
    except FelixError as exc:
        raise ConfigError(f"--region: {exc}") from None


def _control_tls(args: argparse.Namespace, host: str) -> dict[str, Any]:
    """uvicorn's TLS options for `felix control` ({}: plain http, on loopback only).

    https with --tls-cert/--tls-key, else with a CA and server certificate generated in
    --tls-dir (felix.tls) when listening beyond loopback or requiring client
    certificates; --tls-client-ca makes a client certificate from that CA mandatory.
    """
    import ssl

    from felix.node.config import is_loopback
    from felix.tls import node_certificates

    given = args.tls_cert is not None or args.tls_key is not None
    if not given and is_loopback(host) and args.tls_client_ca is None:
        return {}
    names = [n for n in (host, *args.tls_name) if n and n not in ("0.0.0.0", "::")]
    try:
        certs = node_certificates(
            args.tls_dir, hostnames=names, cert=args.tls_cert, key=args.tls_key
        )
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    options: dict[str, Any] = {
        "ssl_certfile": str(certs.server_cert),
        "ssl_keyfile": str(certs.server_key),
    }
    if args.tls_client_ca is not None:
        if not args.tls_client_ca.is_file():
            raise ConfigError(f"--tls-client-ca {args.tls_client_ca}: no such file")
        options["ssl_ca_certs"] = str(args.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    if certs.ca_cert is not None:
        logging.getLogger("felix.control").info("clients verify https with %s", certs.ca_cert)
    return options


def _add_ca(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser(
        "ca",
        help="client certificates from the node's CA (mTLS)",
        description="Issue client certificates for nodes run with --tls-client-ca.",
    )
    commands = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    issue = commands.add_parser(
        "issue-client",
        help="sign a client certificate (NAME-cert.pem, NAME-key.pem) with the CA",
        description="Sign a client certificate (ECDSA P-256, clientAuth) with the CA in "
        "DATA_DIR/tls (the one felix up / felix control generated), or --ca-cert/--ca-key.",
    )
    issue.add_argument("name", metavar="NAME", help="the client's name (certificate CN)")
    issue.add_argument("--data-dir", type=Path, default=Path("data"), help="node state (data)")
    issue.add_argument("--ca-cert", type=Path, help="CA certificate (default DATA_DIR/tls)")
    issue.add_argument("--ca-key", type=Path, help="CA private key (default DATA_DIR/tls)")
    issue.add_argument("--out-dir", type=Path, default=Path("."), help="where to write (.)")
    issue.add_argument("--days", type=float, default=365.0, help="validity in days (365)")
    issue.set_defaults(func=_run_ca_issue_client)


def _run_ca_issue_client(args: argparse.Namespace) -> int:
    import datetime as dt

    from felix.tls import issue_client_certificate

    if args.days <= 0:
        raise ConfigError(f"--days must be positive, got {args.days}")
    ca_cert = args.ca_cert or args.data_dir / "tls" / "ca-cert.pem"
    ca_key = args.ca_key or args.data_dir / "tls" / "ca-key.pem"
    if not ca_cert.is_file():
        raise ConfigError(f"no CA certificate at {ca_cert} (start felix up once, or --ca-cert)")
    cert, key = args.out_dir / f"{args.name}-cert.pem", args.out_dir / f"{args.name}-key.pem"
    try:
        issue_client_certificate(
            ca_cert, ca_key, args.name, cert, key, validity=dt.timedelta(days=args.days)
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"certificate {cert}\nkey {key}")
    return 0


def _key_rotator(keys_dir: Path, args: argparse.Namespace) -> KeyRotator | None:
    """The scheduled rotation of ``keys_dir``'s rings (None: --key-rotation-interval 0)."""
    from felix.auth.rotation import KeyRotator, RotationPolicy
    from felix.node.jwks_sync import DEFAULT_REFRESH

    interval = parse_duration(args.key_rotation_interval)
    if interval == 0:
        return None
    policy = RotationPolicy(interval, parse_duration(args.key_publish_lead))
    if not policy.covers(DEFAULT_REFRESH):
        logging.getLogger("felix.auth.rotation").warning(
            "--key-publish-lead %g s is short: nodes refreshing keys every %g s (the default "
            "--jwks-refresh) may see a token before its key",
            policy.lead,
            DEFAULT_REFRESH,
        )
    return KeyRotator(keys_dir, policy)


def _run_up(args: argparse.Namespace) -> int:
    require_extra("server", "felix up")
    import uvloop

    from felix.node.supervisor import Supervisor

    if args.config is not None:
        apply_config_file(args.parser, args, args.argv)
    _configure_logs(args, "supervisor")  # again: the --config file may set them
    config = _node_config(args)
    _check_node_tls(config)
    _use_audit_log(args.audit_log)
    return uvloop.run(Supervisor(config).run())


#: `felix up` flags whose default comes from the environment.
_ENV_DEFAULTS = {
    "control_token": "FELIX_CONTROL_TOKEN",
    "control_ca": "FELIX_CONTROL_CA",
    "control_client_cert": "FELIX_CONTROL_CERT",
    "control_client_key": "FELIX_CONTROL_KEY",
    "engine": "FELIX_QUIC_ENGINE",
    "log_format": "FELIX_LOG_FORMAT",
    "log_level": "FELIX_LOG_LEVEL",
    "log_levels": "FELIX_LOG_LEVELS",
    "audit_log": "FELIX_AUDIT_LOG",
    "cluster": "FELIX_CLUSTER",
    "control_store": "FELIX_CONTROL_STORE",
}
#: Never printed.
_SECRETS = {"control_token"}
#: Printed without their password (a PostgreSQL DSN).
_DSNS = {"cluster", "control_store"}


def _config_show(args: argparse.Namespace) -> int:
    """`felix config show`: every `felix up` setting, its value and its source."""
    parser: argparse.ArgumentParser = args.parser
    argv = args.argv[2:]  # after "config show"
    from_file = apply_config_file(parser, args, argv) if args.config is not None else set()
    config = _node_config(args)  # validates, exactly as `felix up` would
    rows: dict[str, dict[str, Any]] = {}
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in ("help", "json", "config"):
            continue
        flag = max(action.option_strings, key=len)
        value = getattr(args, dest, None)
        if any(a == opt or a.startswith(opt + "=") for a in argv for opt in action.option_strings):
            source = "flag"
        elif dest in from_file:
            source = f"file {args.config}"
        elif dest in _ENV_DEFAULTS and os.environ.get(_ENV_DEFAULTS[dest]):
            source = f"environment ${_ENV_DEFAULTS[dest]}"
            value = value if value is not None else os.environ[_ENV_DEFAULTS[dest]]
        else:
            source = "default"
        if dest in _SECRETS and value is not None:
            value = "(set)"
        elif dest in _DSNS and isinstance(value, str):
            value = redact_dsn(value)
        rows[flag.lstrip("-")] = {"value": _plain(value), "source": source}
    # What the flags resolve to (topology, auth mode, ...), from the NodeConfig itself.
    derived = {
        "gateways": config.gateways,
        "shards": config.shards,
        "topology": "embedded" if config.embedded_shards else "split",
        "auth": "jwt" if config.auth else "none",
        "data-dir": str(config.data_dir.absolute()),
    }
    if config.clustered:
        derived["node-id"] = config.node_id
        derived["advertise"] = (
            f"{config.advertise[0]}:{config.advertise[1]}"
            if config.advertise is not None
            else "the --listen address"
        )
        if config.control_store and not args.control_store:
            derived["control-store"] = redact_dsn(config.control_store)
    for name, value in derived.items():
        row = rows.setdefault(name, {"value": value, "source": "derived"})
        if row["value"] != value:
            given = _shown(row["value"])
            row["value"], row["source"] = value, f"derived from {given} ({row['source']})"
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    width = max(len(name) for name in rows)
    for name, row in sorted(rows.items()):
        print(f"{name:<{width}}  {_shown(row['value'])}  ({row['source']})")
    return 0


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _shown(value: object) -> str:
    return "-" if value is None else json.dumps(value) if not isinstance(value, str) else value


def _check_node_tls(config: NodeConfig) -> None:
    """Fail at start on unusable mTLS files (the node would otherwise fail later, in a child)."""
    from felix.tls import ClientCertificateVerifier

    if config.tls_client_ca is not None:
        try:
            ClientCertificateVerifier(config.tls_client_ca)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--tls-client-ca {config.tls_client_ca}: {exc}") from None
    if config.control_client_ca is not None:
        try:
            ClientCertificateVerifier(config.control_client_ca)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--control-client-ca {config.control_client_ca}: {exc}") from None
    for path in (config.control_ca, config.control_client_cert, config.control_client_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: no such file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="felix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging; client commands say which node and settings they use",
    )
    parser.add_argument(
        "--context",
        metavar="NAME",
        help="the context to take defaults from (default: $FELIX_CONTEXT, else the one "
        "`felix ctx use` selected; see `felix ctx`)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    _add_control(sub)
    _add_ca(sub)
    from felix.auth.cli import add_commands as add_token_commands
    from felix.client.cli import add_commands as add_client_commands

    add_client_commands(sub)
    add_token_commands(sub)
    from felix.control.cli import add_commands as add_control_commands

    add_control_commands(sub)
    from felix.bridge.cli import add_commands as add_bridge_commands

    add_bridge_commands(sub)
    from felix.logdump import add_commands as add_log_commands

    add_log_commands(sub)
    from felix.context_cli import add_commands as add_context_commands
    from felix.keys.cli import add_commands as add_keys_commands
    from felix.status_cli import add_commands as add_status_commands

    add_context_commands(sub)
    add_status_commands(sub)
    from felix.cluster_cli import add_commands as add_cluster_commands

    add_cluster_commands(sub)
    add_keys_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        _configure_logs(args)
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 2
    except FelixError as exc:
        print(f"felix: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
