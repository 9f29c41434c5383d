"""Control-plane commands of the ``felix`` CLI: ``tenant``, ``ns``, ``stream``, ``cache``,
``issuer``, ``policy``, ``binding``, ``group`` and ``rbac`` (below), and ``token exchange``
(documented with ``felix token``).

Each of the others has ``ls``, ``create NAME``, ``info NAME`` and ``rm NAME``
(``stream info NAME --node http://HOST:PORT``, or with ``$FELIX_NODE_URL`` set,
shows what that node holds of the stream instead: offsets, disk, recovery)::

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
``--yes``, and ``--cascade`` when it still has resources (``rm`` of a stream with queue
groups: ``--cascade``).

``felix group`` manages the queue groups of a durable stream (docs/queues.md); STREAM
may be ``ns/name`` as above, settings are options (left out: the defaults)::

    felix group create orders workers --namespace prod --lease-ms 60000 \\
        --max-deliveries 3 --backoff-ms 1000,5000 --dead-letter orders-failed --start latest
    felix group ls orders --namespace prod
    felix group info orders workers --namespace prod [--node http://HOST:PORT]
    felix group rm orders workers --namespace prod

``group info --node URL`` (or ``$FELIX_NODE_URL``) shows the group's entry in that
node's status of the stream (its settings, and whatever figures the node reports)
instead of the control plane's settings.

Where the API is: ``--url``, else ``$FELIX_CONTROL_URL``, else
http://127.0.0.1:8443. A control plane that requires auth takes ``--token``
(else ``$FELIX_CONTROL_TOKEN``): a Felix token or its admin token. For https,
``--ca`` (else ``$FELIX_CONTROL_CA``) is the CA to verify it with, and ``--cert``
with ``--key`` (else ``$FELIX_CONTROL_CERT``/``$FELIX_CONTROL_KEY``) the client
certificate for one that requires it (mTLS). ``--json``
prints JSON, one object per line.

``felix rbac`` is a friendlier view of policies and bindings::

    felix rbac ls --tenant acme                       # who has which policy, and what it allows
    felix rbac grant group:eng --policy publishers --tenant acme
    felix rbac revoke group:eng --policy publishers --tenant acme
    felix rbac check --token @alice.jwt --action stream.publish --object stream:acme/prod/orders

``grant`` adds policies to SUBJECT's binding (created, named after the subject,
if it has none; ``--issuer`` picks the binding limited to that issuer);
``revoke`` removes them from every binding of SUBJECT (``--issuer``: only that
issuer's) and deletes a binding left without policies. Both change what token
exchanges grant from now on: Felix tokens already issued keep their
permissions until they expire. ``check`` decides locally, from the token's
``perms`` (read without verifying its signature), whether it allows ACTION on
OBJECT; it exits 0 if so, 1 if not.

Exit status: 0 done; 1 a felix error (not found, exists, conflict, unreachable);
2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from felix.auth.cli import guarded, read_secret, tenant_arg
from felix.auth.perms import PermissionSet
from felix.context import resolve
from felix.control.cliargs import add_connection_arguments, open_client
from felix.control.client import ControlClient
from felix.control.model import PARENT, REGIONAL, SPEC_TYPES, Path, Resource, ResourceKind
from felix.control.nodestatus import (
    fetch_stream_status,
    group_status,
    status_rates,
    status_rows,
    stream_status_url,
)
from felix.errors import AlreadyExists, BadRequest, ConfigError, NotFound
from felix.names import NAME_MAX_CHARS
from felix.shard.queue.settings import DLQ_SUFFIX, GroupSettings, dead_letter_name
from felix.unverified_jwt import read_unverified_claims

__all__ = ["add_commands", "parse_settings"]

Subparsers = argparse._SubParsersAction  # argparse has no public name for it
Command = Callable[[argparse.Namespace], int]

#: Command group name, kind, and what the group's help says.
_GROUPS = (
    ("tenant", ResourceKind.TENANT, "tenants (control plane)"),
    ("ns", ResourceKind.NAMESPACE, "namespaces of a tenant (control plane)"),
    ("stream", ResourceKind.STREAM, "streams of a namespace (control plane)"),
    ("cache", ResourceKind.CACHE, "caches of a namespace (control plane)"),
    ("issuer", ResourceKind.ISSUER, "OIDC identity providers a tenant trusts (control plane)"),
    ("policy", ResourceKind.POLICY, "named lists of permissions of a tenant (control plane)"),
    (
        "binding",
        ResourceKind.BINDING,
        "policies given to a tenant's users or groups (control plane)",
    ),
)
_RAW = argparse.RawDescriptionHelpFormatter
#: The module doc minus its first line: the usage rules, shown under each command's help.
_EPILOG = (__doc__ or "").split("\n\n", 1)[1].replace("``", "").replace("::", ":")


def add_commands(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``tenant``, ``ns``, ``stream``, ``cache``, ``issuer``, ``policy``, ``binding``,
    ``group`` and ``rbac`` to the ``felix`` command's ``subparsers``.

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
        if kind in (ResourceKind.STREAM, ResourceKind.CACHE):
            held = (
                "offsets, disk, recovery, groups with lag, subscribed gateways, records/s"
                if kind is ResourceKind.STREAM
                else "entries, bytes against its budget, gets/s, hit ratio, evictions"
            )
            info.add_argument(
                "--node",
                metavar="URL",
                help=f"show what this node holds of the {what} instead ({held}), from its "
                "health endpoint http://HOST:PORT (default: $FELIX_NODE_URL; unset: the "
                "control plane's settings, followed by the local node's or context's "
                "view if there is one)",
            )
            info.add_argument(
                "--interval",
                type=float,
                default=1.0,
                metavar="SECONDS",
                help="sample the node twice this far apart for rates (1; 0: one sample, no rates)",
            )
            info.set_defaults(func=_live_info(kind))

        rm = _command(commands, "rm", f"delete a {what}", kind, named=True)
        if kind in (ResourceKind.TENANT, ResourceKind.NAMESPACE, ResourceKind.STREAM):
            rm.add_argument(
                "--cascade", action="store_true", help="also delete everything under it"
            )
        if kind in (ResourceKind.TENANT, ResourceKind.NAMESPACE):
            rm.add_argument("--yes", action="store_true", help="confirm the delete (required)")
        rm.set_defaults(func=_with_client(_rm, kind))
    _add_groups(subparsers)
    _add_rbac(subparsers)
    _add_exchange(subparsers)


def _add_exchange(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """``felix token exchange``: in the ``token`` group of :mod:`felix.auth.cli` (added
    first), but a control-plane call, so it lives here (felix/auth imports nothing of
    felix/control)."""
    commands = _group(subparsers, "token", "tenant signing keys and Felix tokens")
    exchange = commands.add_parser(
        "exchange",
        help="trade an identity provider's token for a Felix token (control plane)",
        epilog=_EPILOG,
        formatter_class=_RAW,
    )
    exchange.add_argument("--tenant", required=True, help="the tenant")
    exchange.add_argument(
        "--issuer-token",
        required=True,
        metavar="TOKEN|@FILE|-",
        help="the identity provider's JWT, @FILE to read it from a file, - from stdin",
    )
    exchange.add_argument(
        "--permission",
        dest="permissions",
        action="append",
        metavar="PERM",
        help="ask for only this permission (repeatable; never more than granted)",
    )
    add_connection_arguments(exchange.add_argument_group("connection"), token=False)
    exchange.add_argument(
        "--json", action="store_true", help="print the whole answer as JSON, not just the token"
    )
    exchange.set_defaults(func=guarded(_exchange))


def _exchange(args: argparse.Namespace) -> int:
    tenant = tenant_arg(args)
    issuer_token = read_secret(args.issuer_token, "--issuer-token")
    with open_client(args, token=issuer_token) as api:
        answer = api.exchange_token(tenant, args.permissions or None)
    print(json.dumps(answer) if args.json else answer["access_token"])
    return 0


def _add_rbac(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    commands = _group(subparsers, "rbac", "who may do what: policies and bindings (control plane)")

    ls = _command(
        commands, "ls", "list bindings with their policies' permissions", ResourceKind.BINDING
    )
    ls.set_defaults(func=_with_client(_rbac_ls, ResourceKind.BINDING))

    for name, help_text, func in (
        ("grant", "give SUBJECT policies (creates or extends its binding)", _rbac_grant),
        ("revoke", "take policies from SUBJECT (drops bindings left empty)", _rbac_revoke),
    ):
        cmd = _command(commands, name, help_text, ResourceKind.BINDING)
        cmd.add_argument("subject", metavar="SUBJECT", help="group:NAME, user:SUB or a bare SUB")
        cmd.add_argument(
            "--policy",
            dest="policies",
            action="append",
            required=True,
            metavar="NAME",
            help="a policy of the tenant (repeatable)",
        )
        cmd.add_argument("--issuer", help="only the binding limited to this issuer (its iss)")
        cmd.set_defaults(func=_with_client(func, ResourceKind.BINDING))

    check = commands.add_parser(
        "check",
        help="does a Felix token allow ACTION on OBJECT? (local; exit 0 yes, 1 no)",
        epilog=_EPILOG,
        formatter_class=_RAW,
    )
    check.add_argument(
        "--token", required=True, metavar="TOKEN|@FILE|-", help="the Felix token to check"
    )
    check.add_argument("--action", required=True, help="e.g. stream.publish")
    check.add_argument(
        "--object", required=True, metavar="OBJECT", help="KIND:PATH, e.g. stream:acme/prod/orders"
    )
    check.add_argument("--json", action="store_true", help="print the answer as JSON")
    check.set_defaults(func=_rbac_check)


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
    kind: ResourceKind,
    *,
    named: bool = False,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=_RAW)
    if named:
        hint = (
            " (ns/name for another namespace)"
            if kind in (ResourceKind.STREAM, ResourceKind.CACHE)
            else ""
        )
        parser.add_argument("name", metavar="NAME", help=f"the {kind.value}'s name{hint}")
    if kind is not ResourceKind.TENANT:
        parser.add_argument("--tenant", default="default", help="tenant (default: default)")
    if kind in (ResourceKind.STREAM, ResourceKind.CACHE):
        parser.add_argument("--namespace", default="default", help="namespace (default: default)")
    add_connection_arguments(parser.add_argument_group("connection"))
    parser.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    return parser


def _with_client(
    command: Callable[[ControlClient, argparse.Namespace, ResourceKind], int], kind: ResourceKind
) -> Command:
    def run(args: argparse.Namespace) -> int:
        with open_client(args) as client:
            return command(client, args, kind)

    return run


# -- arguments ---------------------------------------------------------------------------


def _parent(args: argparse.Namespace, kind: ResourceKind) -> Path:
    """The parent path a command works under, from --tenant and --namespace."""
    if kind is ResourceKind.TENANT:
        return ()
    if PARENT[kind] is ResourceKind.TENANT:
        return (args.tenant,)
    return (args.tenant, args.namespace)


def _path(args: argparse.Namespace, kind: ResourceKind) -> Path:
    """The path NAME names; a stream or cache NAME may be ``ns/name``; a group's is
    under its STREAM."""
    name: str = args.name
    if kind is ResourceKind.GROUP:
        return (*_stream_path(args), name)
    if kind in (ResourceKind.STREAM, ResourceKind.CACHE) and "/" in name:
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


def _label(kind: ResourceKind, path: Path) -> str:
    return f"{kind.value} {'/'.join(path)}"


# -- commands ----------------------------------------------------------------------------


def _ls(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    resources = client.list_resources(kind, _parent(args, kind))
    if args.json:
        for res in resources:
            _print_json(_resource_json(res))
    elif resources:
        header: tuple[str, ...] = ("NAME", "VERSION", "UPDATED")
        rows: list[tuple[str, ...]] = [
            (r.name, str(r.version), r.updated_at.isoformat(timespec="seconds")) for r in resources
        ]
        if kind in REGIONAL:
            # The home region of each (issue #15): the control plane's own.
            header = (header[0], "REGION", *header[1:])
            rows = [
                (row[0], _text(r.spec.get("region")), *row[1:])
                for row, r in zip(rows, resources, strict=True)
            ]
        if "auto_created" in SPEC_TYPES[kind].model_fields:
            # Created on first use by a node (auto) or through this API (defined).
            header += ("ORIGIN",)
            rows = [
                (*row, "auto" if r.spec.get("auto_created") else "defined")
                for row, r in zip(rows, resources, strict=True)
            ]
        _table([header, *rows])
    return 0


def _create(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    res = client.create(kind, _path(args, kind), parse_settings(args.settings))
    if args.json:
        _print_json(_resource_json(res))
    elif kind in REGIONAL:
        region = res.spec.get("region")
        print(f"created {_label(kind, res.path)} in region {region} (version {res.version})")
    else:
        print(f"created {_label(kind, res.path)} (version {res.version})")
    return 0


def _info(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
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


def _live_info(kind: ResourceKind) -> Command:
    """``stream info`` / ``cache info``: with ``--node`` (or $FELIX_NODE_URL) what that
    node holds; else the control plane's resource, then what the node of the context or
    the local node.json holds, if one is found."""

    def run(args: argparse.Namespace) -> int:
        if args.interval < 0:
            raise ConfigError(f"--interval must be 0 or more, got {args.interval}")
        if not args.timeout > 0:
            raise ConfigError(f"--timeout must be positive, got {args.timeout}")
        node = args.node or os.environ.get("FELIX_NODE_URL")
        path = _path(args, kind)
        if node:
            return _print_node_view(kind, node, path, args, heading=False)
        found = resolve(getattr(args, "context", None)).http
        try:
            with open_client(args) as client:
                code = _info(client, args, kind)
        except NotFound as exc:
            if found is None:
                raise
            print(
                f"{_label(kind, path)}: not defined in the control plane ({exc})", file=sys.stderr
            )
            code = 0
        if found is not None:
            code = max(code, _print_node_view(kind, found, path, args, heading=True))
        return code

    return run


def _print_node_view(
    kind: ResourceKind, node: str, path: Path, args: argparse.Namespace, *, heading: bool
) -> int:
    what = "stream" if kind is ResourceKind.STREAM else "cache"
    tenant, namespace, name = path
    url = stream_status_url(node, (tenant, namespace, name), what)
    # heading: the node was discovered (node.json, a context), not named by the user.
    token = _node_token(node, args, explicit=not heading)
    status = fetch_stream_status(url, timeout=args.timeout, token=token)
    if args.interval > 0:
        start = time.monotonic()
        time.sleep(args.interval)
        after = fetch_stream_status(url, timeout=args.timeout, token=token)
        status = {**after, "rates": status_rates(what, status, after, time.monotonic() - start)}
    if args.json:
        _print_json({"node": node, **status} if heading else status)
    else:
        if heading:
            print(f"on the node at {node}:")
        _table(status_rows(status))
    return 0


def _rm(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    path = _path(args, kind)
    if kind in (ResourceKind.TENANT, ResourceKind.NAMESPACE) and not args.yes:
        raise ConfigError(f"deleting {_label(kind, path)} needs --yes")
    deleted = client.delete(kind, path, cascade=getattr(args, "cascade", False))
    for done_kind, done_path in deleted:
        if args.json:
            _print_json({"kind": done_kind.value, "path": list(done_path), "deleted": True})
        else:
            print(f"deleted {_label(done_kind, done_path)}")
    return 0


# -- queue groups ------------------------------------------------------------------------


def _add_groups(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    commands = _group(subparsers, "group", "queue groups of a durable stream (control plane)")
    ls = _group_command(commands, "ls", "list a stream's queue groups")
    ls.set_defaults(func=_with_client(_group_ls, ResourceKind.GROUP))

    create = _group_command(commands, "create", "create a queue group", named=True)
    d = GroupSettings()
    settings = create.add_argument_group("settings (left out: the defaults, docs/queues.md)")
    settings.add_argument(
        "--start",
        type=_start,
        metavar="earliest|latest|OFFSET",
        help=f"where the group starts ({d.start}; cannot change later)",
    )
    for flag, help_text in (
        ("--lease-ms", f"how long a delivery is leased before it counts a failure ({d.lease_ms})"),
        ("--max-deliveries", f"failures before a record is dead-lettered ({d.max_deliveries})"),
        ("--max-ack-pending", f"records leased at once over the group ({d.max_ack_pending})"),
        ("--max-span", f"offsets between the group's floor and next ({d.max_span})"),
    ):
        settings.add_argument(flag, type=int, metavar="N", help=help_text)
    settings.add_argument(
        "--backoff-ms",
        type=_delays,
        metavar="MS,MS,...",
        help="delays before a nak'ed record is redelivered, by failure count, the last "
        f"repeating ({','.join(map(str, d.backoff_ms))})",
    )
    settings.add_argument(
        "--dead-letter",
        metavar="STREAM",
        help=f"the dead-letter stream, in the stream's namespace (STREAM{DLQ_SUFFIX})",
    )
    settings.add_argument(
        "--exclusive", action="store_true", help="one active member, the others on standby"
    )
    create.set_defaults(func=_with_client(_group_create, ResourceKind.GROUP))

    info = _group_command(commands, "info", "show a queue group and its settings", named=True)
    info.add_argument(
        "--node",
        metavar="URL",
        help="show the group as this node holds it instead (its entry in the node's "
        "stream status), from its health endpoint http://HOST:PORT (default: "
        "$FELIX_NODE_URL; unset: the control plane's settings)",
    )
    info.set_defaults(func=_group_info)

    rm = _group_command(commands, "rm", "delete a queue group", named=True)
    rm.set_defaults(func=_with_client(_rm, ResourceKind.GROUP))


def _group_command(
    commands: Subparsers[argparse.ArgumentParser],
    name: str,
    help_text: str,
    *,
    named: bool = False,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=_RAW)
    parser.add_argument(
        "stream", metavar="STREAM", help="the stream's name (ns/name for another namespace)"
    )
    if named:
        parser.add_argument("name", metavar="GROUP", help="the group's name")
    parser.add_argument("--tenant", default="default", help="tenant (default: default)")
    parser.add_argument("--namespace", default="default", help="namespace (default: default)")
    add_connection_arguments(parser.add_argument_group("connection"))
    parser.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    return parser


def _start(text: str) -> str | dict[str, int]:
    if text in ("earliest", "latest"):
        return text
    if text.isdigit():
        return {"offset": int(text)}
    raise argparse.ArgumentTypeError(f"want earliest, latest or an offset, got {text!r}")


def _delays(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"want delays in milliseconds separated by commas, got {text!r}"
        ) from None


def _stream_path(args: argparse.Namespace) -> Path:
    """The stream STREAM names (``ns/name``: another namespace of the tenant)."""
    stream: str = args.stream
    if "/" in stream:
        namespace, _, stream = stream.partition("/")
        return (args.tenant, namespace, stream)
    return (args.tenant, args.namespace, stream)


def _group_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as options (the API fills in the rest)."""
    spec: dict[str, Any] = {}
    for key in (
        "start",
        "lease_ms",
        "max_deliveries",
        "backoff_ms",
        "max_ack_pending",
        "max_span",
        "dead_letter",
    ):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    if args.exclusive:
        spec["exclusive"] = True
    return spec


def _group_ls(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    resources = client.list_resources(kind, _stream_path(args))
    if args.json:
        for res in resources:
            _print_json(_resource_json(res))
    elif resources:
        header = ("NAME", "VERSION", "START", "LEASE_MS", "MAX_DELIVERIES", "DEAD_LETTER")
        rows = [
            (
                r.name,
                str(r.version),
                _text(r.spec["start"]),
                str(r.spec["lease_ms"]),
                str(r.spec["max_deliveries"]),
                r.spec["dead_letter"] or dead_letter_name(r.path[2]),
            )
            for r in resources
        ]
        _table([header, *rows])
    return 0


def _group_create(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    res = client.create(kind, (*_stream_path(args), args.name), _group_settings(args))
    if args.json:
        _print_json(_resource_json(res))
    else:
        print(f"created {_label(kind, res.path)} (version {res.version})")
    return 0


def _node_token(node: str, args: argparse.Namespace, *, explicit: bool) -> str | None:
    """The admin token for the health port ``node`` (a node with auth wants it for its
    per-tenant routes). ``$FELIX_NODE_TOKEN`` goes only to a node the user named
    (``explicit``: ``--node`` or ``$FELIX_NODE_URL``), never to one found in a
    node.json of the working directory; a discovered node gets the admin token of its
    own data dir, and no node gets another's."""
    token = os.environ.get("FELIX_NODE_TOKEN")
    if explicit and token:
        return token
    found = resolve(getattr(args, "context", None))
    return found.http_token if found.http == node else None


def _group_info(args: argparse.Namespace) -> int:
    """``group info``: the group's entry in the node's stream status with ``--node`` (or
    $FELIX_NODE_URL), else the control plane's resource."""
    node = args.node or os.environ.get("FELIX_NODE_URL")
    if not node:
        return _with_client(_info, ResourceKind.GROUP)(args)
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    tenant, namespace, stream = _stream_path(args)
    url = stream_status_url(node, (tenant, namespace, stream))
    token = _node_token(node, args, explicit=True)
    status = fetch_stream_status(url, timeout=args.timeout, token=token)
    entry = group_status(status, args.name, url)
    if args.json:
        _print_json(entry)
    else:
        print(_label(ResourceKind.GROUP, (tenant, namespace, stream, args.name)))
        for key, value in status_rows(entry):
            print(f"{key}: {value}")
    return 0


# -- rbac --------------------------------------------------------------------------------


def _bindings(client: ControlClient, tenant: str) -> list[Resource]:
    return client.list_resources(ResourceKind.BINDING, (tenant,))


def _rbac_ls(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    tenant = args.tenant
    policies = {
        p.name: p.spec["permissions"] for p in client.list_resources(ResourceKind.POLICY, (tenant,))
    }
    rows: list[tuple[str, str, str, str, str]] = []
    for binding in _bindings(client, tenant):
        spec = binding.spec
        granted = {name: policies.get(name) for name in spec["policies"]}
        if args.json:
            _print_json(
                {
                    "binding": binding.name,
                    "subject": spec["subject"],
                    "issuer": spec.get("issuer"),
                    "policies": granted,
                }
            )
            continue
        for name, perms in granted.items():
            shown = "(no such policy)" if perms is None else ", ".join(perms) or "(none)"
            issuer = spec.get("issuer") or "-"
            rows.append((spec["subject"], issuer, binding.name, name, shown))
    if rows:
        _table([("SUBJECT", "ISSUER", "BINDING", "POLICY", "PERMISSIONS"), *rows])
    return 0


def _matching(
    bindings: list[Resource], subject: str, issuer: str | None, *, any_issuer: bool
) -> list[Resource]:
    return [
        b
        for b in bindings
        if b.spec["subject"] == subject and (any_issuer or b.spec.get("issuer") == issuer)
    ]


def _binding_name(subject: str, taken: set[str]) -> str:
    """A free binding name made from ``subject`` (``group:eng`` -> ``group-eng``)."""
    prefix, sep, rest = subject.partition(":")
    if not (sep and prefix in ("user", "group")):
        prefix, rest = "user", subject
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{prefix}-{rest}").strip("-.") or "binding"
    base = base[: NAME_MAX_CHARS - 4]
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _rbac_grant(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    tenant, subject, issuer = args.tenant, args.subject, args.issuer
    wanted = list(dict.fromkeys(args.policies))
    for policy in wanted:
        try:
            client.get(ResourceKind.POLICY, (tenant, policy))
        except NotFound:
            raise NotFound(
                f"tenant {tenant!r} has no policy {policy!r} "
                f"(create it with: felix policy create {policy} --tenant {tenant} "
                "--set 'permissions=[...]')"
            ) from None
    bindings = _bindings(client, tenant)
    matching = _matching(bindings, subject, issuer, any_issuer=False)
    existing = matching[0] if matching else None
    if existing is None:
        spec: dict[str, Any] = {"subject": subject, "policies": wanted}
        if issuer is not None:
            spec["issuer"] = issuer
        taken = {b.name for b in bindings}
        for attempt in range(1, 6):
            name = _binding_name(subject, taken)
            try:
                res = client.create(ResourceKind.BINDING, (tenant, name), spec)
                break
            except AlreadyExists:  # created meanwhile by someone else: another name
                taken.add(name)
                if attempt == 5:
                    raise
        added = wanted
    else:
        have = list(existing.spec["policies"])
        added = [p for p in wanted if p not in have]
        res = existing
        if added:
            res = client.update(
                ResourceKind.BINDING,
                existing.path,
                {"policies": have + added},
                if_version=existing.version,
            )
    if args.json:
        _print_json({**_resource_json(res), "added": added})
    elif added:
        print(f"granted {', '.join(added)} to {subject} (binding {res.name})")
    else:
        print(f"{subject} already has {', '.join(wanted)} (binding {res.name})")
    return 0


def _rbac_revoke(client: ControlClient, args: argparse.Namespace, kind: ResourceKind) -> int:
    tenant, subject = args.tenant, args.subject
    unwanted = set(args.policies)
    matching = _matching(
        _bindings(client, tenant), subject, args.issuer, any_issuer=args.issuer is None
    )
    touched = [b for b in matching if unwanted & set(b.spec["policies"])]
    if not touched:
        raise NotFound(f"{subject} has no binding with {', '.join(sorted(unwanted))}")
    for binding in touched:
        removed = [p for p in binding.spec["policies"] if p in unwanted]
        left = [p for p in binding.spec["policies"] if p not in unwanted]
        if left:
            client.update(
                ResourceKind.BINDING, binding.path, {"policies": left}, if_version=binding.version
            )
        else:
            client.delete(ResourceKind.BINDING, binding.path, if_version=binding.version)
        if args.json:
            _print_json(
                {"binding": binding.name, "removed": removed, "left": left, "deleted": not left}
            )
        else:
            gone = "; binding deleted" if not left else ""
            print(f"revoked {', '.join(removed)} from {subject} (binding {binding.name}{gone})")
    return 0


def _rbac_check(args: argparse.Namespace) -> int:
    token = read_secret(args.token, "--token")
    claims = read_unverified_claims(token)
    tenant, perms = claims.get("tid"), claims.get("perms")
    if not isinstance(tenant, str) or not isinstance(perms, list):
        raise ConfigError("--token: not a Felix token (it needs tid and perms claims)")
    try:
        allowed = PermissionSet(tenant, perms).allows(args.action, args.object)
    except BadRequest as exc:
        raise ConfigError(str(exc)) from None
    exp = claims.get("exp")
    expired = isinstance(exp, int | float) and exp <= time.time()
    if args.json:
        _print_json(
            {
                "allowed": allowed,
                "action": args.action,
                "object": args.object,
                "tenant": tenant,
                "sub": claims.get("sub"),
                "expired": expired,
                "verified": False,
            }
        )
    else:
        verdict = "allowed" if allowed else "denied"
        note = "; the token has expired" if expired else ""
        print(
            f"{verdict}: {args.action} on {args.object} for {claims.get('sub')!r} "
            f"in tenant {tenant!r} (signature not verified{note})"
        )
    return 0 if allowed else 1
