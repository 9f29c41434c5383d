"""The `felix` command line: `felix up` runs a node; client commands talk to one.

felix up --shards 2 --gateways 2 --data-dir ./data
felix pub orders '{"id": 1}'      felix sub orders
felix cache set sessions k v      felix cache get sessions k
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from felix.errors import ConfigError, FelixError
from felix.node.config import NodeConfig, parse_address, parse_size
from felix.shard.cache import CacheSettings
from felix.shard.stream_log import StreamSettings

_STREAM = StreamSettings()
_CACHE = CacheSettings()


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cores = os.cpu_count() or 1
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
        help="metrics and health HOST:PORT (/metrics, /livez, /readyz)",
    )
    up.add_argument(
        "--control",
        default="127.0.0.1:8443",
        help="REST API HOST:PORT of the embedded control plane (port 0 picks a free one)",
    )
    up.add_argument(
        "--control-store",
        metavar="URL",
        help="store of the embedded control plane: sqlite:///PATH (default "
        "DATA_DIR/control.db), postgresql://..., memory://",
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
    up.add_argument("--gateways", type=int, default=cores, help=f"gateway processes ({cores})")
    up.add_argument("--shards", type=int, default=cores, help=f"shard processes ({cores})")
    up.add_argument("--data-dir", type=Path, default=Path("data"), help="state directory")
    up.add_argument("--memory-budget", default="1GiB", help="memory for all shards (1GiB)")
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
        help="host the shards inside the gateway process (needs --gateways 1): no ring hop, "
        "for one-core machines and latency experiments",
    )
    up.add_argument(
        "--auth",
        action="store_true",
        help="require Felix tokens (tenant keys in DATA_DIR/auth: see felix token) on the "
        "QUIC port and the control API (or the admin token DATA_DIR/admin-token, created "
        "on first start); both may then listen beyond loopback",
    )
    up.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    up.add_argument("--tls-key", type=Path, help="server private key (PEM)")
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
    up.add_argument("--cache-budget", default="64MiB", help="bytes per cache (all shards)")
    up.add_argument(
        "--cache-max-ttl", type=float, default=_CACHE.max_ttl, help="longest TTL in seconds"
    )
    up.add_argument("--ring-bytes", default="4MiB", help="size of each gateway<->shard ring")
    up.add_argument("--drain-grace", type=float, default=10.0, help="seconds to drain on stop")
    up.add_argument(
        "--engine",
        choices=["qh3", "aioquic"],
        default=os.environ.get("FELIX_QUIC_ENGINE") or "qh3",
        help="QUIC engine",
    )
    up.set_defaults(func=_run_up, parser=up)


def apply_config_file(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> None:
    """Fill every flag not given in ``argv`` from ``args.config`` (TOML)."""
    import tomllib

    try:
        table = tomllib.loads(args.config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read --config {args.config}: {exc}") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    for key, value in table.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise ConfigError(f"--config {args.config}: unknown setting {key!r}")
        if any(a == opt or a.startswith(opt + "=") for a in argv for opt in action.option_strings):
            continue  # given on the command line: the flag wins
        if isinstance(value, str) and callable(action.type):
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"--config {args.config}: {key} must be one of {action.choices}")
        setattr(args, dest, value)


def _node_config(args: argparse.Namespace) -> NodeConfig:

    replay_bytes = parse_size(args.replay_bytes)
    return NodeConfig(
        listen=parse_address(args.listen, 5000),
        http=parse_address(args.http, 8080),
        control=parse_address(args.control, 8443),
        gateways=args.gateways,
        shards=args.shards,
        data_dir=args.data_dir.resolve(),
        memory_budget=parse_size(args.memory_budget),
        insecure=args.insecure,
        auto_create=not args.no_auto_create,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        ring_bytes=parse_size(args.ring_bytes),
        drain_grace=args.drain_grace,
        engine=args.engine,
        control_store=args.control_store,
        control_url=args.control_url,
        control_token=args.control_token,
        embedded_shards=args.embedded_shards,
        auth=args.auth,
        stream_defaults=StreamSettings(
            replay_max_records=args.replay_records,
            replay_max_bytes=replay_bytes,
            max_record_bytes=min(_STREAM.max_record_bytes, replay_bytes // 2),
            slow_subscriber_policy=args.slow_subscriber,
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
    control.add_argument("--region", default="local", help="the region this cluster is")
    control.add_argument(
        "--keys-dir",
        type=Path,
        default=Path("data/auth"),
        help="tenants' key rings (felix token keygen --dir), for the token exchange "
        "and JWKS routes and checking Felix tokens",
    )
    control.add_argument(
        "--auth",
        action="store_true",
        help="require a Felix token or the admin token on the API; it may then listen "
        "beyond loopback",
    )
    control.add_argument(
        "--admin-token-file",
        type=Path,
        default=Path("data/admin-token"),
        metavar="PATH",
        help="the bootstrap admin token, with --auth (created, mode 0600, if missing; "
        "default data/admin-token)",
    )
    control.set_defaults(func=_run_control)


def _run_control(args: argparse.Namespace) -> int:
    import uvicorn
    import uvloop

    from felix.auth.files import admin_token
    from felix.control.api import create_app
    from felix.control.stores import open_store
    from felix.node.config import is_loopback

    host, port = parse_address(args.listen, 8443)
    if not is_loopback(host) and not args.insecure and not args.auth:
        raise ConfigError(
            f"--listen {host} is not loopback: refusing without --auth (or --insecure, "
            "to serve it unauthenticated)"
        )
    admin = admin_token(args.admin_token_file) if args.auth else None
    store = open_store(args.store)

    async def serve() -> None:
        await store.open()
        try:
            app = create_app(
                store,
                region=args.region,
                keys_dir=args.keys_dir,
                admin_token=admin,
                require_auth=args.auth,
            )
            config = uvicorn.Config(
                app, host=host, port=port, lifespan="off", timeout_graceful_shutdown=2
            )
            await uvicorn.Server(config).serve()
        finally:
            await store.close()

    uvloop.run(serve())
    return 0


def _run_up(args: argparse.Namespace) -> int:
    import uvloop

    from felix.node.supervisor import Supervisor

    if args.config is not None:
        apply_config_file(args.parser, args, args.argv)
    config = _node_config(args)
    return uvloop.run(Supervisor(config).run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="felix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    _add_control(sub)
    from felix.auth.cli import add_commands as add_token_commands
    from felix.client.cli import add_commands as add_client_commands

    add_client_commands(sub)
    add_token_commands(sub)
    try:
        from felix.control.cli import add_commands as add_control_commands
    except ImportError:  # pragma: no cover - removed once the control CLI lands
        pass
    else:
        add_control_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("quic").setLevel(logging.ERROR)  # qh3 logs every normal close
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
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
