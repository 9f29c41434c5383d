"""``felix log dump PATH [--check] [--limit N] [--decrypt]``: print and verify a durable log.

Read-only on purpose (unlike ``DiskLog.open``, which cuts a torn tail and rebuilds
indexes): an operator looking at a damaged log must not change it by looking. The
format is docs/log-format.md.

Encrypted records (kind 1) are shown as ``encrypted (data key N)`` with their size;
their CRCs are verified all the same (they cover the stored bytes). ``--decrypt``
opens them with the node's keys (``DATA_DIR/keys``, the region key from
``--region-key``, ``$FELIX_REGION_KEY_FILE`` or ``DATA_DIR/keys/region.key``); with
``--check`` every record must then authenticate, or it counts as a problem.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import TextIO

from felix.errors import ConfigError, KeyUnavailable
from felix.keys.kek import REGION_KEY_ENV
from felix.keys.store import KEYS_DIR, KeyStore, resolve_region_key
from felix.shard.log_format import (
    SEGMENT_HEADER_SIZE,
    DataKeys,
    EnvelopeError,
    decode_record,
    decode_segment_header,
    encrypted_key_id,
)
from felix.shard.log_index import IndexInfo, decode_index
from felix.shard.log_recovery import TORN_SEARCH_LIMIT, list_segments
from felix.shard.log_segment import Scanner, index_path, valid_record_after

__all__ = ["add_commands", "dump"]

#: Body bytes shown per record.
_BODY_PREVIEW = 48


def _time(us: int) -> str:
    try:
        return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="microseconds")
    except (OverflowError, ValueError, OSError):
        return f"{us}us"


class _Decrypt:
    """The keys and stream key ``--decrypt`` reads with."""

    def __init__(self, keys: DataKeys, stream: str) -> None:
        self.keys = keys
        self.stream = stream


def _describe(payload: bytes, offset: int, ts: int, dec: _Decrypt | None) -> tuple[str, bool]:
    """A record's text, and whether it is a problem (an encrypted record that does not
    open with the keys given)."""
    key_id = encrypted_key_id(payload)
    if key_id is not None and dec is None:
        return f"encrypted (data key {key_id}, {len(payload)} bytes)", False
    try:
        headers, body = decode_record(
            payload,
            "" if dec is None else dec.stream,
            offset,
            ts,
            None if dec is None else dec.keys,
        )
    except KeyUnavailable as exc:
        return f"NOT DECRYPTED: {exc}", True
    except EnvelopeError as exc:
        return f"(not an envelope: {exc}) raw={payload[:_BODY_PREVIEW]!r}", False
    more = "..." if len(body) > _BODY_PREVIEW else ""
    head = f" headers={headers}" if headers else ""
    kind = "" if key_id is None else f"decrypted (data key {key_id}) "
    return f"{kind}body={body[:_BODY_PREVIEW]!r}{more}{head}", False


def dump(
    path: Path, *, check: bool, limit: int, out: TextIO, decrypt: _Decrypt | None = None
) -> int:
    """Print the log at ``path`` (a directory or one ``.seg`` file); 1 on damage (or,
    with ``decrypt``, a record that does not decrypt)."""
    if path.is_dir():
        found = list_segments(path)
        if not found:
            print(f"{path}: no segment files", file=out)
            return 1
    elif path.is_file():
        try:
            found = [(int(path.stem), path)]
        except ValueError:
            print(f"{path}: not a <base:020d>.seg file name", file=out)
            return 1
    else:
        print(f"{path}: no such file or directory", file=out)
        return 1
    problems = 0
    prev_last = -1
    for i, (base, seg) in enumerate(found):
        last = i + 1 == len(found)
        bad, prev_last = _dump_segment(seg, base, prev_last, last, check, limit, out, decrypt)
        problems += bad
    if check:
        print("check: " + ("OK" if not problems else f"{problems} problem(s)"), file=out)
    return 1 if problems else 0


def _dump_segment(
    path: Path,
    base: int,
    prev_last: int,
    last: bool,
    check: bool,
    limit: int,
    out: TextIO,
    dec: _Decrypt | None,
) -> tuple[int, int]:
    """Print one segment; returns (problems found, its last offset or ``prev_last``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        header = decode_segment_header(os.pread(fd, SEGMENT_HEADER_SIZE, 0))
        if isinstance(header, str):
            print(f"{path}: DAMAGED at byte 0: {header}", file=out)
            return 1, prev_last
        if header.base_offset != base:
            print(f"{path}: DAMAGED at byte 8: header base {header.base_offset}", file=out)
            return 1, prev_last
        kind = "active" if last else "sealed"
        print(
            f"segment {path.name} ({kind}) base={base} created={_time(header.created_us)} "
            f"size={size}",
            file=out,
        )
        if prev_last >= base:
            print(f"{path}: DAMAGED: base {base} <= previous last offset {prev_last}", file=out)
            return 1, prev_last
        scanner = Scanner(fd, SEGMENT_HEADER_SIZE, size, base - 1)
        shown = 0
        entries: list[tuple[int, int, int]] = []
        max_ts = 0
        problems = 0
        for pos, offset, ts, payload in scanner:
            entries.append((offset, pos, max_ts))
            max_ts = max(max_ts, ts)
            if shown < limit or (check and dec is not None):
                text, bad = _describe(payload, offset, ts, dec)
                if bad:
                    problems += 1
                if shown < limit or bad:
                    print(f"  {offset} {_time(ts)} len={len(payload)} {text}", file=out)
                    shown += 1
            elif not check:
                break
        if scanner.error is not None:
            at = scanner.stopped_at
            after = valid_record_after(fd, at, size, scanner.last_offset, TORN_SEARCH_LIMIT)
            if last and after is None and size - at <= TORN_SEARCH_LIMIT:
                print(
                    f"{path}: torn tail: {size - at} bytes at byte {at} ({scanner.error}); "
                    "opening the log cuts them",
                    file=out,
                )
            else:
                print(f"{path}: DAMAGED at byte {at}: {scanner.error}", file=out)
                problems += 1
        records = scanner.records
        if check:
            print(f"  {records} record(s) verified", file=out)
        elif records > shown:
            print(f"  ... (--limit {limit} reached)", file=out)
        if check and not last:
            _check_index(path, base, size, scanner, entries, out)
        return problems, scanner.last_offset if records else prev_last
    finally:
        os.close(fd)


def _check_index(
    path: Path,
    base: int,
    size: int,
    scanner: Scanner,
    entries: list[tuple[int, int, int]],
    out: TextIO,
) -> None:
    """Report (not fail on) an index that open() would rebuild."""
    ipath = index_path(path)
    try:
        info = decode_index(ipath.read_bytes(), base, size)
    except FileNotFoundError:
        info = "missing"
    if isinstance(info, IndexInfo):
        indexed = {pos: (off, before) for off, pos, before in entries}
        wrong = [e for e in info.index if indexed.get(e[1]) != (e[0], e[2])]
        if (
            not wrong
            and info.records == scanner.records
            and (not info.records or info.last_offset == scanner.last_offset)
        ):
            return
        info = "entries do not match the segment"
    print(f"{ipath}: index {info}; opening the log rebuilds it", file=out)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    log = sub.add_parser("log", help="inspect durable stream logs on disk")
    commands = log.add_subparsers(dest="log_command", required=True, metavar="COMMAND")
    d = commands.add_parser(
        "dump",
        help="print segments and records, verify checksums (read-only)",
        description="Print a durable log (a stream's log directory or one .seg file): its "
        "segments and records. --check verifies every checksum and invariant of "
        "docs/log-format.md; the exit status is 1 on damage.",
    )
    d.add_argument("path", type=Path, metavar="PATH", help="log directory or .seg file")
    d.add_argument("--check", action="store_true", help="verify every record and index")
    d.add_argument("--limit", type=int, default=10, help="records printed per segment (10)")
    d.add_argument(
        "--decrypt",
        action="store_true",
        help="open encrypted records with the node's keys (DATA_DIR/keys; PATH must be "
        "DATA_DIR/streams/<tenant>/<namespace>/<stream> or a segment in it)",
    )
    d.add_argument("--data-dir", type=Path, help="the node's data dir (default: found from PATH)")
    d.add_argument(
        "--region-key",
        type=Path,
        metavar="FILE",
        help=f"with --decrypt: the region key (default ${REGION_KEY_ENV}, else "
        "DATA_DIR/keys/region.key)",
    )
    d.set_defaults(func=_run_dump)


def _decrypt_context(args: argparse.Namespace) -> _Decrypt:
    """Keys and stream key for ``--decrypt`` (ConfigError when PATH is not in a data dir)."""
    import os as _os

    directory = args.path.resolve()
    if directory.suffix == ".seg":
        directory = directory.parent
    parts = directory.parts
    if len(parts) < 5 or parts[-4] != "streams":
        raise ConfigError(
            "--decrypt needs PATH inside DATA_DIR/streams/<tenant>/<namespace>/<stream>: "
            f"{args.path}"
        )
    data_dir = args.data_dir or Path(*parts[:-4])
    given = args.region_key
    if given is None and _os.environ.get(REGION_KEY_ENV):
        given = Path(_os.environ[REGION_KEY_ENV])
    kek, missing = resolve_region_key(data_dir, given, generate=False)
    return _Decrypt(KeyStore(data_dir / KEYS_DIR, kek, missing=missing), "/".join(parts[-3:]))


def _run_dump(args: argparse.Namespace) -> int:
    if args.limit < 0:
        print("felix: --limit must not be negative", file=sys.stderr)
        return 2
    try:
        dec = _decrypt_context(args) if args.decrypt else None
        return dump(args.path, check=args.check, limit=args.limit, out=sys.stdout, decrypt=dec)
    except OSError as exc:  # unreadable file or directory: say which, no traceback
        print(f"felix: cannot read {exc.filename or args.path}: {exc.strerror}", file=sys.stderr)
        return 1
