"""``felix token``: manage a tenant's signing keys and mint Felix tokens from them.

::

    felix token keygen --tenant acme                  # new key ring (--force replaces one)
    felix token mint --tenant acme --sub alice \\
        --perm stream.publish:namespace:acme/orders --ttl 600
    felix token rotate --tenant acme                  # publish the next key, drop old ones
    felix token jwks --tenant acme                    # print the published public keys
    felix token exchange --tenant acme --issuer-token @idp.jwt \\
        --permission stream.subscribe:stream:acme/prod/orders   # via the control plane

The key directory: ``--dir``, else ``$FELIX_AUTH_DIR``, else ./data/auth (the
auth directory of ``felix up``'s default data directory). It holds TENANT.ring.json
(private keys, mode 0600) and TENANT.jwks.json (public keys, read by the broker).
A cluster's rings live in its nodes' control store instead: ``--cluster DSN``, or
when neither --dir nor $FELIX_AUTH_DIR is given, $FELIX_CONTROL_STORE (a
postgresql:// one; another kind means the key directory) else $FELIX_CLUSTER, as
felix up picks its control store. A database that is not a cluster's and has no key
ring table is refused. Rings there are sealed with the region key (--region-key
FILE, else $FELIX_REGION_KEY_FILE), as the nodes' must be; without one keygen warns,
and refuses if the table holds sealed rings unless --unsealed is given. Every node
picks a change up within its --jwks-refresh.
A rotated key signs from publish_ahead (300 s) after the rotation on; keys stay
published until every token they signed has expired. Tokens carry iss and aud
"felix" and at most --max-ttl seconds (keygen; default 900) of lifetime, and a
region claim: mint's --region, else the region in the node.json beside the key
directory (the node's data dir), else none (only the loopback dev region "local"
takes a token without one).

exchange (added to this group by :mod:`felix.control.cli`: felix/auth knows nothing
of the control plane) asks the control plane (--url, else $FELIX_CONTROL_URL, else
http://127.0.0.1:8443) to trade an identity provider's token (TOKEN, @FILE, or
- for stdin) for a Felix token holding what the tenant's role bindings grant
(--permission asks for only those, never more); it prints the token, or with
--json the whole answer (access_token, token_type, expires_in).

Exit status: 0 done; 1 a felix error (no key ring, rotation already pending,
exchange refused or unreachable); 2 bad usage (invalid tenant, permission or ttl;
a key ring exists without --force).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from felix.auth.files import AUDIENCE, ISSUER
from felix.auth.keys import MAX_TOKEN_TTL, TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.auth.ringstore import FileRingStore, RingStore
from felix.errors import BadRequest, ConfigError, FelixError, NotFound
from felix.keys.kek import REGION_KEY_ENV, FileKeyEncryptionKey
from felix.names import validate_name

__all__ = [
    "CONTROL_STORE_ENV",
    "DEFAULT_AUTH_DIR",
    "add_commands",
    "auth_dir",
    "cluster_dsn",
    "guarded",
    "node_region",
    "read_secret",
    "ring_store",
    "tenant_arg",
]

#: The environment variable naming felix up's --control-store (the nodes' rings are there).
CONTROL_STORE_ENV = "FELIX_CONTROL_STORE"
#: The key directory when neither --dir nor $FELIX_AUTH_DIR is given.
DEFAULT_AUTH_DIR = Path("data") / "auth"

T = TypeVar("T")
Subparsers = argparse._SubParsersAction  # argparse has no public name for it
Command = Callable[[argparse.Namespace], int]
_RAW = argparse.RawDescriptionHelpFormatter
#: The module doc minus its first line: examples, the key directory and exit statuses.
_EPILOG = (__doc__ or "").split("\n\n", 1)[1].replace("``", "").replace("::", "")


def _now() -> float:
    """Wall-clock Unix seconds: tokens carry wall-clock iat/exp (tests replace this)."""
    return time.time()


def add_commands(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add the ``token`` group (keygen, rotate, mint, jwks) to the ``felix`` ``subparsers``.

    Each command sets ``func``: it takes the parsed namespace and returns the exit
    status, printing ``felix: MESSAGE`` to stderr on failure (2 for a ConfigError
    or an invalid argument, 1 for another felix error), as ``felix.cli.main`` would.
    """
    group = subparsers.add_parser(
        "token", help="tenant signing keys and Felix tokens", epilog=_EPILOG, formatter_class=_RAW
    )
    commands = group.add_subparsers(dest="token_command", required=True, metavar="COMMAND")

    keygen = _command(commands, "keygen", "create a tenant's key ring")
    keygen.add_argument(
        "--max-ttl",
        type=int,
        default=900,
        metavar="SECONDS",
        help=f"longest token lifetime (1..{MAX_TOKEN_TTL}; default 900)",
    )
    keygen.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key ring (tokens it signed stop verifying)",
    )
    keygen.add_argument(
        "--unsealed",
        action="store_true",
        help="with --cluster and no region key: store the ring unsealed even though the "
        "database holds sealed rings (refused otherwise)",
    )
    keygen.set_defaults(func=guarded(_keygen))

    rotate = _command(commands, "rotate", "publish the next key and drop expired ones")
    rotate.set_defaults(func=guarded(_rotate))

    mint = _command(commands, "mint", "print a Felix token")
    mint.add_argument("--sub", required=True, help="the token's subject")
    mint.add_argument(
        "--perm",
        dest="perms",
        action="append",
        required=True,
        metavar="PERM",
        help="a permission ACTION:KIND:PATH in the tenant (repeatable)",
    )
    mint.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="lifetime (default: the ring's --max-ttl)"
    )
    mint.add_argument(
        "--region",
        help="the region the token is issued for (its region claim): nodes and control "
        "planes of another region refuse it (default: the region in the node.json beside "
        "the key directory, i.e. the node's data dir; without one, no claim, which only "
        "the loopback dev region 'local' takes)",
    )
    mint.set_defaults(func=guarded(_mint))

    jwks = _command(commands, "jwks", "print the tenant's published JWK set")
    jwks.set_defaults(func=guarded(_jwks))


def _command(
    commands: Subparsers[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=_RAW)
    parser.add_argument("--tenant", required=True, help="the tenant")
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help=f"key directory (default: $FELIX_AUTH_DIR or {DEFAULT_AUTH_DIR})",
    )
    parser.add_argument(
        "--cluster",
        metavar="DSN",
        help="the cluster's PostgreSQL database (its nodes' control store), where a "
        "cluster's key rings live (default when neither --dir nor $FELIX_AUTH_DIR is "
        "given: $FELIX_CONTROL_STORE if set, else $FELIX_CLUSTER)",
    )
    parser.add_argument(
        "--region-key",
        type=Path,
        metavar="FILE",
        help="with --cluster: the region key that seals the rings in the database, the "
        f"nodes' (default ${REGION_KEY_ENV}; none: rings written unsealed)",
    )
    return parser


def auth_dir(args: argparse.Namespace) -> Path:
    """The key directory: ``--dir``, else ``$FELIX_AUTH_DIR``, else :data:`DEFAULT_AUTH_DIR`."""
    given: Path | None = args.dir
    if given is not None:
        return given
    env = os.environ.get("FELIX_AUTH_DIR")
    return Path(env) if env else DEFAULT_AUTH_DIR


def cluster_dsn(args: argparse.Namespace) -> str | None:
    """The database holding the rings (None: a key directory): ``--cluster``; else,
    unless ``--dir`` or ``$FELIX_AUTH_DIR`` names a directory, where a node of the
    environment keeps them: ``$FELIX_CONTROL_STORE`` when set (None unless it is a
    PostgreSQL one: the nodes then keep their rings in DATA_DIR/auth), else
    ``$FELIX_CLUSTER``."""
    given: str | None = getattr(args, "cluster", None)
    if given is not None and getattr(args, "dir", None) is not None:
        raise ConfigError("give --dir or --cluster, not both")
    if given:
        return given
    if getattr(args, "dir", None) is not None or os.environ.get("FELIX_AUTH_DIR"):
        return None
    control_store = os.environ.get(CONTROL_STORE_ENV)
    if control_store:
        scheme = control_store.partition("://")[0].lower()
        return control_store if scheme in ("postgresql", "postgres") else None
    return os.environ.get("FELIX_CLUSTER") or None


def ring_store(args: argparse.Namespace) -> RingStore:
    """Where the commands find the rings: the cluster's database or the key directory."""
    dsn = cluster_dsn(args)
    if dsn is None:
        return FileRingStore(auth_dir(args))
    from felix.auth.pgrings import PostgresRingStore

    key_file: Path | None = getattr(args, "region_key", None)
    if key_file is None and os.environ.get(REGION_KEY_ENV):
        key_file = Path(os.environ[REGION_KEY_ENV])
    kek = FileKeyEncryptionKey.load(key_file) if key_file is not None else None
    return PostgresRingStore(
        dsn, kek=kek, allow_unsealed=getattr(args, "unsealed", False), existing_only=True
    )


def _warn_if_unsealed(store: RingStore, tenant: str) -> None:
    """Say on stderr that a ring was just stored in a database unsealed."""
    from felix.auth.pgrings import PostgresRingStore

    if isinstance(store, PostgresRingStore) and store.kek is None:
        print(
            f"felix: warning: the key ring of tenant {tenant!r} is stored unsealed in "
            f"{store.where}: whoever can read the database or its backups can sign tokens "
            f"(give the nodes' region key: --region-key FILE or ${REGION_KEY_ENV})",
            file=sys.stderr,
        )


def _with_store(args: argparse.Namespace, body: Callable[[RingStore], Awaitable[T]]) -> T:
    """``body(store)`` on the commands' ring store, closed afterwards."""
    store = ring_store(args)

    async def main() -> T:
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def guarded(command: Command) -> Command:
    """``command`` printing ``felix: MESSAGE`` and returning 2 (ConfigError) or 1 (FelixError)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ConfigError as exc:
            print(f"felix: {exc}", file=sys.stderr)
            return 2
        except FelixError as exc:
            print(f"felix: {exc}", file=sys.stderr)
            return 1

    return run


def tenant_arg(args: argparse.Namespace) -> str:
    """``--tenant``, validated (an invalid name is a usage error)."""
    try:
        return validate_name("tenant", args.tenant)
    except BadRequest as exc:
        raise ConfigError(f"--tenant: {exc}") from None


def _no_ring(where: str, tenant: str) -> NotFound:
    return NotFound(
        f"no key ring for tenant {tenant!r} in {where} "
        f"(create one with: felix token keygen --tenant {tenant})"
    )


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def _keygen(args: argparse.Namespace) -> int:
    tenant = tenant_arg(args)
    now = _now()
    ring = TenantKeyRing.create(tenant, now, max_token_ttl=args.max_ttl)

    async def create(store: RingStore) -> str:
        if not await store.create(ring, now, replace=args.force):
            raise ConfigError(
                f"tenant {tenant!r} already has a key ring in {store.where}; pass --force to "
                "replace it (tokens signed with its keys will stop verifying)"
            )
        _warn_if_unsealed(store, tenant)
        return store.where

    where = _with_store(args, create)
    (key,) = ring.schedule()
    print(f"created the key ring of tenant {tenant!r} in {where}: key {key.kid}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    tenant = tenant_arg(args)
    dropped: list[str] = []
    kid = ""

    def change(ring: TenantKeyRing) -> float:
        nonlocal kid, dropped
        now = _now()
        kid = ring.rotate(now)
        dropped = ring.prune(now)
        return now

    async def rotate(store: RingStore) -> TenantKeyRing:
        try:
            ring = await store.update(tenant, change)
        except NotFound:
            raise _no_ring(store.where, tenant) from None
        _warn_if_unsealed(store, tenant)
        return ring

    ring = _with_store(args, rotate)
    activate_at = ring.schedule()[-1].activate_at
    print(f"published key {kid} of tenant {tenant!r}; it signs from {_when(activate_at)}")
    for old in dropped:
        print(f"dropped expired key {old}")
    return 0


def _mint(args: argparse.Namespace) -> int:
    tenant = tenant_arg(args)
    try:
        perms = PermissionSet(tenant, args.perms)
    except BadRequest as exc:
        raise ConfigError(f"--perm: {exc}") from None

    async def load(store: RingStore) -> tuple[TenantKeyRing, str | None]:
        try:
            ring = await store.load(tenant)
        except NotFound:
            raise _no_ring(store.where, tenant) from None
        if args.region is not None:
            return ring, args.region
        if isinstance(store, FileRingStore):
            return ring, node_region(store.directory.parent)
        region = getattr(store, "region", None)  # a cluster's database: the cluster's
        return ring, (await region()) if region is not None else None

    ring, region = _with_store(args, load)
    try:
        token = ring.mint(
            _now(),
            issuer=ISSUER,
            audience=AUDIENCE,
            sub=args.sub,
            perms=perms,
            ttl=args.ttl,
            region=region,
        )
    except BadRequest as exc:  # an unusable --sub
        raise ConfigError(str(exc)) from None
    print(token)
    return 0


def node_region(data_dir: Path) -> str | None:
    """The region of the node whose data dir is ``data_dir``, from its node.json (None:
    no node.json there, or one without a usable region: it is a report, not state)."""
    try:
        info = json.loads((data_dir / "node.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    region = info.get("region") if isinstance(info, dict) else None
    try:
        return validate_name("region", region) if isinstance(region, str) else None
    except FelixError:
        return None


def _jwks(args: argparse.Namespace) -> int:
    tenant = tenant_arg(args)

    async def read(store: RingStore) -> dict[str, Any]:
        value = await store.jwks(tenant)
        if value is None:
            raise _no_ring(store.where, tenant)
        return value

    print(json.dumps(_with_store(args, read), indent=2, sort_keys=True))
    return 0


def read_secret(value: str, flag: str) -> str:
    """A token given on the command line as ``TOKEN``, ``@FILE`` or ``-`` (stdin), stripped.

    Raises ConfigError if the file cannot be read or the token is empty.
    """
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{flag}: cannot read {path}: {exc}") from None
    else:
        text = value
    token = text.strip()
    if not token:
        raise ConfigError(f"{flag}: the token is empty")
    return token
