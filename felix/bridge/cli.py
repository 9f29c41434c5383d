"""``felix bridge``: define, inspect, pause, resume, delete and run bridges.

::

    felix bridge create to-us --tenant acme --source prod/orders \\
        --target-url felix://us.example:5000 --target-region us-1 \\
        --target-stream prod/orders-eu --target-ca /etc/felix/us-ca.pem \\
        --target-token-file /run/secrets/us-1-bridge.token \\
        [--target-tenant acme] [--filter-header tier [--filter-equals gold]] \\
        [--start earliest|latest] [--paused]
    felix bridge ls --tenant acme [--runner http://HOST:PORT]
    felix bridge info to-us --tenant acme [--runner http://HOST:PORT]
    felix bridge pause to-us --tenant acme
    felix bridge resume to-us --tenant acme
    felix bridge rm to-us --tenant acme
    felix bridge run to-us --tenant acme --source-url felix://127.0.0.1:5000 \\
        --source-token-file /run/secrets/eu-1-reader.token --state-dir /var/lib/felix/bridges

The commands call the control plane like ``felix stream ...`` (``--url``, ``--token``,
``--ca``, ``--cert``, ``--key``, their environment variables) and need
``bridge.manage`` on the bridge (or the admin token). ``ls`` and ``info`` show the
runner's figures (state, checkpoint, lag, rate, errors) with ``--runner URL`` (or
``$FELIX_BRIDGE_RUNNER_URL``): the runner's ``--http`` endpoint.

``run`` copies one bridge (``NAME``) or, with ``--all``, every bridge of the control
plane (that needs the admin token): it reads the source stream from this region's
node at ``--source-url`` (``$FELIX_URL``) with ``--source-ca`` and the token in
``--source-token-file`` (or ``$FELIX_BRIDGE_SOURCE_TOKEN``; it needs
``stream.subscribe`` on the source stream), keeps one checkpoint per bridge in
``--state-dir``, and serves ``/metrics`` and ``/bridges`` on ``--http HOST:PORT``.
It stops on SIGTERM, and (for one bridge) when the bridge is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx

from felix.auth.cli import guarded
from felix.control.cliargs import add_connection_arguments, open_client
from felix.control.model import Resource, ResourceKind
from felix.errors import ConfigError, Unavailable
from felix.extras import require_extra

__all__ = ["add_commands"]

_RAW = argparse.RawDescriptionHelpFormatter
_EPILOG = (__doc__ or "").split("\n\n", 1)[1].replace("``", "").replace("::", ":")
BRIDGE = ResourceKind.BRIDGE


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "bridge",
        help="bridges: the only way records leave the region (control plane)",
        epilog=_EPILOG,
        formatter_class=_RAW,
    )
    commands = group.add_subparsers(dest="bridge_command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, named: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=_RAW)
        if named:
            parser.add_argument("name", metavar="NAME", help="the bridge's name")
        parser.add_argument("--tenant", default="default", help="tenant (default: default)")
        add_connection_arguments(parser.add_argument_group("connection"))
        parser.add_argument("--json", action="store_true", help="print JSON (one object per line)")
        return parser

    create = command("create", "create a bridge")
    create.add_argument("--source", required=True, metavar="NS/STREAM", help="the stream here")
    create.add_argument("--target-url", required=True, metavar="URL", help="felix://host:port")
    create.add_argument("--target-region", required=True, help="the target's region")
    create.add_argument(
        "--target-stream", required=True, metavar="NS/STREAM", help="the stream there"
    )
    create.add_argument("--target-tenant", help="the tenant there (default: this one)")
    create.add_argument("--target-ca", metavar="FILE", help="CA (PEM) of the target, a path")
    token = create.add_mutually_exclusive_group()
    token.add_argument(
        "--target-token-file", metavar="FILE", help="path of the file holding the target token"
    )
    token.add_argument(
        "--target-token-env", metavar="NAME", help="environment variable holding it (its name)"
    )
    create.add_argument("--filter-header", metavar="NAME", help="only records with this header")
    create.add_argument(
        "--filter-equals", metavar="VALUE", help="... whose value is VALUE (with --filter-header)"
    )
    create.add_argument("--start", choices=("earliest", "latest"), help="without a checkpoint")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.add_argument("--description", help="free text")
    create.set_defaults(func=guarded(_create))

    ls = command("ls", "list bridges", named=False)
    info = command("info", "show a bridge (and with --runner its figures)")
    for parser in (ls, info):
        parser.add_argument(
            "--runner",
            metavar="URL",
            help="the runner's status endpoint http://HOST:PORT (default: "
            "$FELIX_BRIDGE_RUNNER_URL; unset: settings only)",
        )
    ls.set_defaults(func=guarded(_ls))
    info.set_defaults(func=guarded(_info))

    for name, state in (("pause", "paused"), ("resume", "active")):
        cmd = command(name, f"set the bridge {state}")
        cmd.set_defaults(func=guarded(_set_state), state=state)

    rm = command("rm", "delete a bridge (its runner stops it and removes its checkpoint)")
    rm.set_defaults(func=guarded(_rm))

    run = command("run", "copy records of one bridge (or --all) until stopped", named=False)
    run.add_argument("name", metavar="NAME", nargs="?", help="the bridge (or --all)")
    run.add_argument("--all", action="store_true", help="every bridge of the control plane")
    run.add_argument(
        "--source-url", default=os.environ.get("FELIX_URL"), help="this region's node ($FELIX_URL)"
    )
    run.add_argument("--source-ca", type=Path, metavar="FILE", help="its CA (PEM)")
    run.add_argument(
        "--source-token-file",
        type=Path,
        metavar="FILE",
        help="token to read the source with (default: $FELIX_BRIDGE_SOURCE_TOKEN)",
    )
    run.add_argument(
        "--source-keys-dir",
        type=Path,
        metavar="DIR",
        help="mint source tokens from the tenants' key rings here (the node's DATA_DIR/auth)",
    )
    run.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR", help="checkpoints and status.json"
    )
    run.add_argument(
        "--secrets-dir",
        type=Path,
        metavar="DIR",
        help="target token files: a bridge of tenant T may name only files in DIR/T/ "
        "(without it, target_token_file is refused)",
    )
    run.add_argument("--http", metavar="HOST:PORT", help="serve /metrics and /bridges here")
    run.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    run.set_defaults(func=guarded(_run))


# -- settings commands ---------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {
        "source_stream": args.source,
        "target_url": args.target_url,
        "target_region": args.target_region,
        "target_stream": args.target_stream,
    }
    for key in ("target_tenant", "target_ca", "target_token_file", "target_token_env", "start"):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    if args.description is not None:
        spec["description"] = args.description
    if args.filter_equals is not None and args.filter_header is None:
        raise ConfigError("--filter-equals needs --filter-header")
    if args.filter_header is not None:
        spec["filter"] = {"header": args.filter_header, "equals": args.filter_equals}
    if args.paused:
        spec["state"] = "paused"
    with open_client(args) as client:
        res = client.create(BRIDGE, (args.tenant, args.name), spec)
    if args.json:
        _print_json(_resource_json(res))
    else:
        print(f"created bridge {'/'.join(res.path)} (version {res.version}, {res.spec['state']})")
    return 0


def _set_state(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        res = client.update(BRIDGE, (args.tenant, args.name), {"state": args.state})
    if args.json:
        _print_json(_resource_json(res))
    else:
        print(f"bridge {'/'.join(res.path)} {res.spec['state']} (version {res.version})")
    return 0


def _rm(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        client.delete(BRIDGE, (args.tenant, args.name))
    if args.json:
        _print_json({"kind": "bridge", "path": [args.tenant, args.name], "deleted": True})
    else:
        print(f"deleted bridge {args.tenant}/{args.name}")
    return 0


def _runner_status(args: argparse.Namespace) -> dict[tuple[str, ...], dict[str, Any]] | None:
    url = args.runner or os.environ.get("FELIX_BRIDGE_RUNNER_URL")
    if not url:
        return None
    try:
        response = httpx.get(url.rstrip("/") + "/bridges", timeout=args.timeout)
        response.raise_for_status()
        body = response.json()
        return {(b["tenant"], b["name"]): b for b in body["bridges"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"bridge runner at {url}: {exc}") from None


def _ls(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        bridges = client.list_resources(BRIDGE, (args.tenant,))
    status = _runner_status(args)
    if args.json:
        for res in bridges:
            out = _resource_json(res)
            if status is not None:
                out["status"] = status.get(res.path)
            _print_json(out)
        return 0
    if not bridges:
        return 0
    header = ["NAME", "STATE", "SOURCE", "TARGET"]
    if status is not None:
        header += ["RUNNER", "CHECKPOINT", "LAG", "RATE", "ERRORS"]
    rows = [header]
    for res in bridges:
        spec = res.spec
        row = [
            res.name,
            spec["state"],
            spec["source_stream"],
            f"{spec['target_region']}:{spec['target_stream']}",
        ]
        if status is not None:
            st = status.get(res.path) or {}
            row += [
                str(st.get("state", "-")),
                _cell(st.get("checkpoint")),
                _cell(st.get("lag")),
                _cell(st.get("rate")),
                _cell(st.get("errors")),
            ]
        rows.append(row)
    _table(rows)
    return 0


def _info(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        res = client.get(BRIDGE, (args.tenant, args.name))
    status = _runner_status(args)
    st = status.get(res.path) if status is not None else None
    if args.json:
        out = _resource_json(res)
        if status is not None:
            out["status"] = st
        _print_json(out)
        return 0
    print(f"bridge {'/'.join(res.path)}")
    rows = [
        ["version", str(res.version)],
        ["created", res.created_at.isoformat(timespec="seconds")],
        ["updated", res.updated_at.isoformat(timespec="seconds")],
    ]
    for key, value in res.spec.items():
        rows.append([key, value if isinstance(value, str) else json.dumps(value)])
    if status is not None:
        if st is None:
            rows.append(["runner", "not run by this runner"])
        else:
            skip = ("tenant", "name")
            rows += [[f"runner.{k}", _cell(v)] for k, v in st.items() if k not in skip]
    _table(rows)
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _resource_json(res: Resource) -> dict[str, Any]:
    return {**res.model_dump(mode="json"), "name": res.name}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


# -- run -------------------------------------------------------------------------------------


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _run(args: argparse.Namespace) -> int:
    require_extra("server", "felix bridge run")  # prometheus_client, for its /metrics
    from felix.bridge.runner import BridgeRunner, SourceAccess, minted_token, static_token

    if args.all == (args.name is not None):
        raise ConfigError("give a bridge NAME or --all")
    if not args.source_url:
        raise ConfigError("--source-url (or $FELIX_URL) is required: this region's node")
    http = _parse_address(args.http) if args.http else None
    client = open_client(args)
    # Read once: bridges may name environment variables (FELIX_BRIDGE_<TENANT>_*
    # only), and the control plane's credential must not be among what is left.
    os.environ.pop("FELIX_CONTROL_TOKEN", None)
    if args.source_keys_dir is not None:
        token = minted_token(args.source_keys_dir)
    else:
        token_file: Path | None = args.source_token_file

        def read() -> str | None:
            if token_file is not None:
                try:
                    return token_file.read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"--source-token-file {token_file}: {exc}") from None
            return os.environ.get("FELIX_BRIDGE_SOURCE_TOKEN") or None

        read()  # a missing file is a usage error, now
        token = static_token(read)
    runner = BridgeRunner(
        client,
        SourceAccess(args.source_url, token, args.source_ca),
        args.state_dir,
        only=None if args.all else (args.tenant, args.name),
        http=http,
        secrets_dir=args.secrets_dir,
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watch = loop.create_task(_watch_parent(args.parent_pid, stop)) if args.parent_pid else None
        try:
            return await runner.run(stop)
        finally:
            if watch is not None:
                watch.cancel()

    try:
        return asyncio.run(main())
    finally:
        client.close()


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    """Stop when the node that started this runner is gone (its child: --bridges)."""
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    stop.set()
