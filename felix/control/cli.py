"""Control-plane commands of the ``felix`` CLI: ``tenant``, ``ns``, ``stream``, ``cache``,
``issuer``, ``policy``, ``binding``.

Each group has ``ls``, ``create NAME``, ``info NAME`` and ``rm NAME``::

    felix tenant create acme
    felix ns create prod --tenant acme
    felix stream create orders --tenant acme --namespace prod --set durable=true \\
        --set queue.max_deliveries=3
    felix stream ls --tenant acme --namespace prod --json
    felix ns rm prod --tenant acme --cascade --yes
    felix policy create publishers --tenant acme \\
        --set 'permissions=["stream.publish:stream:acme/prod/*"]'
    felix binding create eng --tenant acme --set subject=group:eng \\
        --set 'policies=["publishers"]'
    felix issuer create okta --tenant acme --set issuer=https://idp.example \\
        --set audience=felix --set 'algorithms=["RS256"]' --set jwks_url=https://idp.example/jwks

``--tenant`` and ``--namespace`` default to ``default`` (an issuer, policy or
binding belongs to a tenant, not a namespace); a stream or cache NAME may be
``ns/name`` to name another namespace of the tenant. ``--set KEY=VALUE`` gives a
setting on create (repeatable): VALUE is read as JSON when it parses (``true``,
``3``, ``null``, ``"7"``, ``["RS256"]``), else as text; ``a.b=VALUE`` sets a nested
setting such as ``queue.max_deliveries``. ``rm`` of a tenant or namespace needs
``--yes``, and ``--cascade`` when it still has resources.

Where the API is: ``--url``, else ``$FELIX_CONTROL_URL``, else
http://127.0.0.1:8443. A control plane that requires auth takes ``--token``
(else ``$FELIX_CONTROL_TOKEN``): a Felix token or its admin token. ``--json``
prints JSON, one object per line.

Exit status: 0 done; 1 a felix error (not found, exists, conflict, unreachable);
2 bad usage.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from felix.control.client import DEFAULT_URL, ControlClient
from felix.control.model import PARENT, Kind, Path, Resource
from felix.errors import ConfigError

__all__ = ["add_commands", "parse_settings"]

Subparsers = argparse._SubParsersAction  # argparse has no public name for it
Command = Callable[[argparse.Namespace], int]

#: Command group name, kind, and what the group's help says.
_GROUPS = (
    ("tenant", Kind.TENANT, "tenants (control plane)"),
    ("ns", Kind.NAMESPACE, "namespaces of a tenant (control plane)"),
    ("stream", Kind.STREAM, "streams of a namespace (control plane)"),
    ("cache", Kind.CACHE, "caches of a namespace (control plane)"),
    ("issuer", Kind.ISSUER, "OIDC identity providers a tenant trusts (control plane)"),
    ("policy", Kind.POLICY, "named lists of permissions of a tenant (control plane)"),
    ("binding", Kind.BINDING, "policies given to a tenant's users or groups (control plane)"),
)
_RAW = argparse.RawDescriptionHelpFormatter
#: The module doc minus its first line: the usage rules, shown under each command's help.
_EPILOG = (__doc__ or "").split("\n\n", 1)[1].replace("``", "").replace("::", ":")


def add_commands(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``tenant``, ``ns``, ``stream``, ``cache``, ``issuer``, ``policy`` and ``binding``
    to the ``felix`` command's ``subparsers``.

    A group that exists already (``cache``, which :mod:`felix.client.cli` adds
    with ``get|set|del``) gets these commands added to it, so call this after
    the client's ``add_commands``.
    """
    for group_name, kind, help_text in _GROUPS:
        commands = _group(subparsers, group_name, help_text)
        what = kind.value

        ls = _command(commands, "ls", f"list {what}s", kind)
        ls.set_defaults(func=_with_client(_ls, kind))

        create = _command(commands, "create", f"create a {what}", kind, named=True)
        create.add_argument(
            "--set",
            dest="settings",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a setting (repeatable; VALUE as JSON if it parses, a.b=V for nested)",
        )
        create.set_defaults(func=_with_client(_create, kind))

        info = _command(commands, "info", f"show a {what} and its settings", kind, named=True)
        info.set_defaults(func=_with_client(_info, kind))

        rm = _command(commands, "rm", f"delete a {what}", kind, named=True)
        if kind in (Kind.TENANT, Kind.NAMESPACE):
            rm.add_argument(
                "--cascade", action="store_true", help="also delete everything under it"
            )
            rm.add_argument("--yes", action="store_true", help="confirm the delete (required)")
        rm.set_defaults(func=_with_client(_rm, kind))


def _group(
    subparsers: Subparsers[argparse.ArgumentParser], name: str, help_text: str
) -> Subparsers[argparse.ArgumentParser]:
    """The sub-command action of group ``name``, created or (if it exists) reused."""
    existing = subparsers.choices.get(name) if isinstance(subparsers.choices, dict) else None
    if existing is None:
        parser = subparsers.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=_RAW)
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ConfigError(f"the {name!r} command exists and has no sub-commands to add to")


def _command(
    commands: Subparsers[argparse.ArgumentParser],
    name: str,
    help_text: str,
    kind: Kind,
    *,
    named: bool = False,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=_RAW)
    if named:
        hint = " (ns/name for another namespace)" if kind in (Kind.STREAM, Kind.CACHE) else ""
        parser.add_argument("name", metavar="NAME", help=f"the {kind.value}'s name{hint}")
    if kind is not Kind.TENANT:
        parser.add_argument("--tenant", default="default", help="tenant (default: default)")
    if kind in (Kind.STREAM, Kind.CACHE):
        parser.add_argument("--namespace", default="default", help="namespace (default: default)")
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url", help=f"control-plane URL (default: $FELIX_CONTROL_URL or {DEFAULT_URL})"
    )
    group.add_argument(
        "--token",
        help="bearer token: a Felix token or the admin token (default: $FELIX_CONTROL_TOKEN)",
    )
    group.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per request (10)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    return parser


def _with_client(
    command: Callable[[ControlClient, argparse.Namespace, Kind], int], kind: Kind
) -> Command:
    def run(args: argparse.Namespace) -> int:
        if args.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {args.timeout}")
        with ControlClient(args.url, timeout=args.timeout, token=args.token) as client:
            return command(client, args, kind)

    return run


# -- arguments ---------------------------------------------------------------------------


def _parent(args: argparse.Namespace, kind: Kind) -> Path:
    """The parent path a command works under, from --tenant and --namespace."""
    if kind is Kind.TENANT:
        return ()
    if PARENT[kind] is Kind.TENANT:
        return (args.tenant,)
    return (args.tenant, args.namespace)


def _path(args: argparse.Namespace, kind: Kind) -> Path:
    """The path NAME names; a stream or cache NAME may be ``ns/name``."""
    name: str = args.name
    if kind in (Kind.STREAM, Kind.CACHE) and "/" in name:
        namespace, _, name = name.partition("/")
        return (args.tenant, namespace, name)
    return (*_parent(args, kind), name)


def _no_constants(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """Settings from ``KEY=VALUE`` pairs: JSON values where they parse, dotted keys nest.

    Raises ConfigError for a pair without ``=`` or a key that is both a value
    and an object (``queue=1`` and ``queue.max_deliveries=3``).
    """
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"--set wants KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(text, parse_constant=_no_constants)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        target = settings
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {part} is a value, not a group of settings")
        if leaf in target and isinstance(target[leaf], dict) != isinstance(value, dict):
            raise ConfigError(f"--set {key}: conflicts with another --set")
        target[leaf] = value
    return settings


# -- output ------------------------------------------------------------------------------


def _resource_json(res: Resource) -> dict[str, Any]:
    """The API's shape of a resource."""
    return {**res.model_dump(mode="json"), "name": res.name}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def _flatten(spec: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in spec.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _label(kind: Kind, path: Path) -> str:
    return f"{kind.value} {'/'.join(path)}"


# -- commands ----------------------------------------------------------------------------


def _ls(client: ControlClient, args: argparse.Namespace, kind: Kind) -> int:
    resources = client.list_resources(kind, _parent(args, kind))
    if args.json:
        for res in resources:
            _print_json(_resource_json(res))
    elif resources:
        header = ("NAME", "VERSION", "UPDATED")
        rows = [
            (r.name, str(r.version), r.updated_at.isoformat(timespec="seconds")) for r in resources
        ]
        _table([header, *rows])
    return 0


def _create(client: ControlClient, args: argparse.Namespace, kind: Kind) -> int:
    res = client.create(kind, _path(args, kind), parse_settings(args.settings))
    if args.json:
        _print_json(_resource_json(res))
    else:
        print(f"created {_label(kind, res.path)} (version {res.version})")
    return 0


def _info(client: ControlClient, args: argparse.Namespace, kind: Kind) -> int:
    res = client.get(kind, _path(args, kind))
    if args.json:
        _print_json(_resource_json(res))
        return 0
    print(_label(kind, res.path))
    rows = [
        ("version", str(res.version)),
        ("created", res.created_at.isoformat(timespec="seconds")),
        ("updated", res.updated_at.isoformat(timespec="seconds")),
    ]
    _table(rows + [(key, _text(value)) for key, value in _flatten(res.spec)])
    return 0


def _rm(client: ControlClient, args: argparse.Namespace, kind: Kind) -> int:
    path = _path(args, kind)
    if kind in (Kind.TENANT, Kind.NAMESPACE) and not args.yes:
        raise ConfigError(f"deleting {_label(kind, path)} needs --yes")
    deleted = client.delete(kind, path, cascade=getattr(args, "cascade", False))
    for done_kind, done_path in deleted:
        if args.json:
            _print_json({"kind": done_kind.value, "path": list(done_path), "deleted": True})
        else:
            print(f"deleted {_label(done_kind, done_path)}")
    return 0
