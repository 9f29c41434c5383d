"""The control-plane connection options shared by every CLI command that calls the API.

``felix tenant|ns|stream|cache|issuer|policy|binding|rbac ...`` and ``felix token
exchange`` take the same ``--url --timeout --ca --cert --key`` (and, except the
exchange, whose credential is the identity-provider token, ``--token``).
"""

from __future__ import annotations

import argparse

from felix.control.client import DEFAULT_URL, ControlClient
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
    """A ControlClient from the parsed connection options (``token``: overrides ``--token``)."""
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together")
    cert = (args.cert, args.key) if args.cert is not None else None
    if token is None:
        token = getattr(args, "token", None)
    return ControlClient(args.url, timeout=args.timeout, token=token, ca=args.ca, cert=cert)
