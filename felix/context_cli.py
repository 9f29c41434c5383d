"""``felix ctx add|use|ls|show|rm``: named sets of defaults for the other commands
(felix/context.py says where they live and how they rank against flags and the
environment)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from felix.context import (
    Context,
    current_name,
    list_contexts,
    load_context,
    remove_context,
    resolve,
    save_context,
    use_context,
)
from felix.errors import ConfigError

__all__ = ["add_commands"]

Subparsers = argparse._SubParsersAction  # argparse has no public name for it


def add_commands(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``ctx`` to the ``felix`` command's ``subparsers``."""
    ctx = subparsers.add_parser(
        "ctx",
        help="named connection defaults (like nats contexts)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = ctx.add_subparsers(dest="ctx_command", required=True)

    add = commands.add_parser("add", help="save a context (replacing one of the same name)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--url", help="data plane: felix://HOST:PORT or felix+shm:///PATH")
    add.add_argument("--control-url", help="the control plane's URL")
    add.add_argument("--ca", type=Path, help="CA (PEM) to trust")
    add.add_argument("--token-file", type=Path, help="file holding the data-plane token")
    add.add_argument("--control-token-file", type=Path, help="file holding the control-plane token")
    add.add_argument("--tenant")
    add.add_argument("--namespace")
    add.add_argument(
        "--data-dir", type=Path, help="a local node's data dir (its node.json fills the rest)"
    )
    add.add_argument("--http", help="the node's health port, http://HOST:PORT (felix status)")
    add.add_argument("--use", action="store_true", help="also make it the current context")
    add.set_defaults(func=_add)

    use = commands.add_parser("use", help="make a context the current one")
    use.add_argument("name", metavar="NAME", nargs="?")
    use.add_argument("--none", action="store_true", help="no current context")
    use.set_defaults(func=_use)

    ls = commands.add_parser("ls", help="list the contexts (* marks the current one)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)

    show = commands.add_parser(
        "show", help="a context's settings (default: what the commands would use now)"
    )
    show.add_argument("name", metavar="NAME", nargs="?")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    rm = commands.add_parser("rm", help="delete a context")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=_rm)


def _add(args: argparse.Namespace) -> int:
    for flag in ("ca", "token_file", "control_token_file"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ConfigError(f"--data-dir {args.data_dir}: no such directory")
    context = Context(
        name=args.name,
        url=args.url,
        control_url=args.control_url,
        ca=_str(args.ca),
        token_file=_str(args.token_file),
        control_token_file=_str(args.control_token_file),
        tenant=args.tenant,
        namespace=args.namespace,
        data_dir=_str(args.data_dir),
        http=args.http,
    )
    path = save_context(context)
    if args.use:
        use_context(args.name)
    print(f"context {args.name} saved in {path}" + (" (current)" if args.use else ""))
    return 0


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _use(args: argparse.Namespace) -> int:
    if args.none == (args.name is not None):
        raise ConfigError("give a context NAME or --none")
    use_context(None if args.none else args.name)
    print("no current context" if args.none else f"current context: {args.name}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    current = current_name()
    names = list_contexts()
    if args.json:
        print(json.dumps({"current": current, "contexts": names}))
        return 0
    for name in names:
        print(f"{'*' if name == current else ' '} {name}")
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.name is not None:
        data = {k: v for k, v in asdict(load_context(args.name)).items() if v is not None}
    else:
        found = resolve(getattr(args, "context", None))
        data = {k: v for k, v in asdict(found).items() if v is not None}
        for key in data:
            if "token" in key:  # token, control_token, http_token: never shown
                data[key] = "(set)"
    if args.json:
        print(json.dumps(data, sort_keys=True))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    remove_context(args.name)
    print(f"context {args.name} removed")
    return 0
