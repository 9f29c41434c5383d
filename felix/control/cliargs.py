"""Command-line options of the control plane: the connection options shared by every CLI
command that calls the API, and the HTTP limits of a server that serves it.

``felix tenant|ns|stream|cache|issuer|policy|binding|rbac ...`` and ``felix token
exchange`` take the same ``--url --timeout --ca --cert --key`` (and, except the
exchange, whose credential is the identity-provider token, ``--token``).
"""

from __future__ import annotations

import argparse
import os

from felix.context import pick, report, resolve
from felix.control.client import DEFAULT_URL, ControlClient
from felix.control.limits import HttpLimits
from felix.errors import ConfigError


def add_connection_arguments(group: argparse._ActionsContainer, *, token: bool = True) -> None:
    """Add the connection options to ``group`` (``token``: also ``--token``)."""
    group.add_argument(
        "--url", help=f"control-plane URL (default: $FELIX_CONTROL_URL or {DEFAULT_URL})"
    )
    if token:
        group.add_argument(
            "--token",
            help="bearer token: a Felix token or the admin token (default: $FELIX_CONTROL_TOKEN)",
        )
    group.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per request (10)"
    )
    group.add_argument(
        "--ca",
        metavar="FILE",
        help="CA (PEM) verifying an https URL (default: $FELIX_CONTROL_CA, else the system store)",
    )
    group.add_argument(
        "--cert",
        metavar="FILE",
        help="client certificate (PEM) for a control plane that requires one (mTLS; "
        "default: $FELIX_CONTROL_CERT)",
    )
    group.add_argument(
        "--key", metavar="FILE", help="its private key (default: $FELIX_CONTROL_KEY)"
    )


def open_client(args: argparse.Namespace, *, token: str | None = None) -> ControlClient:
    """A ControlClient from the parsed connection options (``token``: overrides ``--token``).

    What the flags leave open comes from the environment, then the context or a
    local node's node.json and admin token (felix/context.py).
    """
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together")
    cert = (args.cert, args.key) if args.cert is not None else None
    found = resolve(getattr(args, "context", None))
    url = pick(
        (args.url, "--url"),
        (os.environ.get("FELIX_CONTROL_URL"), "$FELIX_CONTROL_URL"),
        (found.control_url, found.source),
        (DEFAULT_URL, "the default"),
    )
    settings = {"url": url}
    if token is None:
        settings["token"] = pick(
            (getattr(args, "token", None), "--token"),
            # Only to a control plane the user pointed at (a flag, the environment,
            # the default loopback URL), never to one a ./data/node.json or a context
            # names: that one gets its own credential below.
            (
                os.environ.get("FELIX_CONTROL_TOKEN")
                if url[1] in ("--url", "$FELIX_CONTROL_URL", "the default")
                else None,
                "$FELIX_CONTROL_TOKEN",
            ),
            # The credential of the node the URL came from, never sent elsewhere.
            (found.control_token if url[1] == found.source else None, found.source),
        )
        token = settings["token"][0]
    settings["ca"] = pick(
        (args.ca, "--ca"),
        (os.environ.get("FELIX_CONTROL_CA"), "$FELIX_CONTROL_CA"),
        (found.ca if url[1] == found.source else None, found.source),
    )
    report(found, getattr(args, "verbose", False), settings)
    return ControlClient(
        url[0], timeout=args.timeout, token=token, ca=settings["ca"][0], cert=cert, env_token=False
    )


def add_http_limit_arguments(group: argparse._ActionsContainer) -> None:
    """Add the control plane's HTTP limits (see :class:`HttpLimits`) to ``group``."""
    d = HttpLimits()
    group.add_argument(
        "--http-max-body",
        type=int,
        default=d.max_body_bytes,
        metavar="BYTES",
        help=f"largest request body; larger: 413 ({d.max_body_bytes})",
    )
    group.add_argument(
        "--http-max-connections",
        type=int,
        default=d.max_connections,
        metavar="N",
        help="open connections at most; at the bound the oldest idle one is closed "
        f"({d.max_connections})",
    )
    group.add_argument(
        "--http-header-timeout",
        type=float,
        default=d.header_timeout,
        metavar="SECONDS",
        help="a connection with no request being served is closed after this "
        f"({d.header_timeout:g})",
    )
    group.add_argument(
        "--http-body-timeout",
        type=float,
        default=d.body_timeout,
        metavar="SECONDS",
        help=f"a request body must arrive within this; later: 400 ({d.body_timeout:g})",
    )


def http_limits(args: argparse.Namespace) -> HttpLimits:
    """The HttpLimits of the parsed options (ConfigError when one is out of range)."""
    return HttpLimits(
        max_body_bytes=args.http_max_body,
        max_connections=args.http_max_connections,
        header_timeout=args.http_header_timeout,
        body_timeout=args.http_body_timeout,
    )
