"""``felix keys status|rotate``: the data keys of a node's data dir.

* ``felix keys status [--data-dir D] [--region-key FILE] [--json]``: the region key
  this data dir's data keys are wrapped by, whether the given (or dev-mode) key is it,
  and each tenant's data keys (ids, the current one, usable or why not). Exit 1 when
  a problem is found.
* ``felix keys rotate --tenant T``: a new data key for tenant T becomes current (old
  keys stay for reading). Works while the node runs: its shards see the changed file
  within about a second (records written meanwhile use the previous key).
* ``felix keys rotate --new-region-key NEWFILE``: rewrap every tenant's data keys with
  the new region key; no segment is rewritten. Only with the node stopped (the data
  dir's lock), since a running node holds the old key. In dev mode (the current key
  is ``DATA_DIR/keys/region.key``) that file then holds the new key; otherwise start
  the node with ``--region-key NEWFILE``. Resumable after a crash: run it again.

``--region-key FILE`` is always the *current* region key, as for ``felix up``
(default ``$FELIX_REGION_KEY_FILE``, else ``DATA_DIR/keys/region.key``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from felix.errors import ConfigError
from felix.keys.kek import REGION_KEY_ENV, FileKeyEncryptionKey, write_atomic
from felix.keys.store import DEV_KEY_FILE, KEYS_DIR, KeyStore, resolve_region_key

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys",
        help="encryption at rest: status and rotation of a node's data keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="region key and each tenant's data keys")
    _common(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_run_status)
    rotate = commands.add_parser(
        "rotate", help="a new data key for a tenant, or rewrap with a new region key"
    )
    _common(rotate)
    what = rotate.add_mutually_exclusive_group(required=True)
    what.add_argument("--tenant", help="give this tenant a new current data key")
    what.add_argument(
        "--new-region-key",
        type=Path,
        metavar="NEWFILE",
        help="rewrap every data key with this region key (node stopped)",
    )
    rotate.set_defaults(func=_run_rotate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="node state (data)")
    p.add_argument(
        "--region-key",
        type=Path,
        metavar="FILE",
        help=f"the current region key (default ${REGION_KEY_ENV}, else DATA_DIR/keys/region.key)",
    )


def _store(args: argparse.Namespace) -> KeyStore:
    given = args.region_key
    if given is None and os.environ.get(REGION_KEY_ENV):
        given = Path(os.environ[REGION_KEY_ENV])
    kek, missing = resolve_region_key(args.data_dir, given, generate=False)
    return KeyStore(args.data_dir / KEYS_DIR, kek, missing=missing)


def _time(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="seconds")


def _run_status(args: argparse.Namespace) -> int:
    store = _store(args)
    info = store.status()
    bad = info["problem"] is not None or any(not t["usable"] for t in info["tenants"])
    if args.json:
        print(json.dumps(info, indent=1))
        return 1 if bad else 0
    out = sys.stdout
    print(f"keys: {info['keys_dir']}", file=out)
    region = info["region_key"]
    if region is None:
        print(f"region key: none ({info['missing']})", file=out)
    else:
        print(f"region key: {region['id']} ({region['source']})", file=out)
    wrapped: dict[str, Any] | None = info["wrapped_by"]
    if wrapped is None:
        print("data keys wrapped by: (no data keys yet)", file=out)
    elif "error" in wrapped:
        print(f"data keys wrapped by: ? ({wrapped['error']})", file=out)
    else:
        rotating = wrapped.get("rotating_to")
        extra = f" (rotation to {rotating} unfinished: run it again)" if rotating else ""
        print(f"data keys wrapped by: {wrapped.get('kek')}{extra}", file=out)
    if info["problem"]:
        print(f"PROBLEM: {info['problem']}", file=out)
    for t in info["tenants"]:
        ids = ", ".join(str(k["id"]) for k in t.get("keys", []))
        line = f"tenant {t['tenant']}: current key {t.get('current')} (keys {ids})"
        if t.get("keys"):
            line += f", newest created {_time(max(k['created_us'] for k in t['keys']))}"
        line += f", wrapped by {t.get('kek')}"
        line += ": usable" if t["usable"] else f": NOT USABLE: {t['error']}"
        print(line, file=out)
    print(f"{len(info['tenants'])} tenant(s)", file=out)
    return 1 if bad else 0


def _run_rotate(args: argparse.Namespace) -> int:
    store = _store(args)
    if store.kek is None:
        raise ConfigError(f"no current region key: {store.missing}")
    if args.tenant is not None:
        new_id = store.rotate_tenant(args.tenant)
        print(
            f"tenant {args.tenant}: data key {new_id} is current (older keys kept for reading; "
            "a running node uses it within about a second)"
        )
        return 0
    from felix.node.datadir import DataDirLock  # the node's own lock: it must be stopped

    new = FileKeyEncryptionKey.load(args.new_region_key)
    if new.key_id == store.kek.key_id:
        raise ConfigError(f"{args.new_region_key} is the current region key {new.key_id}")
    lock = DataDirLock.acquire(args.data_dir)
    try:
        old_source = store.kek.source
        done, already = store.rewrap(new)
        dev = args.data_dir / KEYS_DIR / DEV_KEY_FILE
        if Path(old_source).resolve() == dev.resolve():
            # Dev mode: the data dir's key file is the region key; it becomes the new one.
            write_atomic(dev, args.new_region_key.read_bytes(), 0o600)
            where = f"{dev} now holds it (dev mode)"
        else:
            where = f"start the node with --region-key {args.new_region_key}"
    finally:
        lock.release()
    print(
        f"region key {new.key_id}: rewrapped the data keys of {done} tenant(s) "
        f"({already} already were); no segment was rewritten; {where}"
    )
    return 0
