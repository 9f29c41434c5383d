"""``felix cluster export-shard``: one logical shard's durable data of a stopped node
as one archive file (format: felix/cluster/archive.py, docs/log-format.md).

It only reads the data dir (holding its lock, so no node starts meanwhile): segments
are copied as stored, after a scan that verifies every record's CRCs. A torn tail of
an active segment (a write a killed node never finished) is left out, as opening the
log would cut it; any other damage refuses the export. Each stream's ``next_offset``
is where the source node would continue it: above its log and above its offset
reservation (``shard-N.offsets``), since a crash with ``--fsync interval`` or ``none``
may have lost records that were acknowledged or delivered, whose offsets must never
be issued again. The archive is written to a temporary file beside ``out`` (a name of
its own, created exclusively), fsynced and renamed: it exists whole or not at all.
Memory stays bounded: files are streamed in chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from felix.cluster.archive import (
    MANIFEST,
    ArchiveStream,
    Manifest,
    check_no_pending_import,
    guard_stopped,
    node_json,
)
from felix.cluster.ownership import logical_shard
from felix.errors import ConfigError, FelixError, KeyUnavailable, ShardArchiveError
from felix.ipc import shard_for
from felix.keys.store import KEYS_DIR, TENANTS_DIR, KeyStore, KeyTable
from felix.names import validate_name
from felix.node.cluster import DATA_ID_FILE, durable_stream_keys
from felix.shard.log_format import SEGMENT_HEADER_SIZE, decode_segment_header
from felix.shard.log_recovery import TORN_SEARCH_LIMIT, list_segments
from felix.shard.log_segment import Scanner, valid_record_after
from felix.shard.offsets import start_offsets
from felix.shard.queue.group_log import discover

__all__ = ["ExportReport", "export_shard", "logical_shards_of", "region_of", "reserved_offsets"]

#: Bytes tarfile copies per read (its default, 16 KiB, costs a call per 16 KiB).
_COPY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ExportReport:
    manifest: Manifest
    out: Path
    bytes: int
    seconds: float


def logical_shards_of(data_dir: Path, given: int | None) -> int:
    """The cluster's number of logical shards: what the data dir's node.json recorded
    (``cluster.logical_shards``), else ``given``; ShardArchiveError when neither says,
    or they disagree."""
    cluster = node_json(data_dir).get("cluster")
    recorded = cluster.get("logical_shards") if isinstance(cluster, dict) else None
    if type(recorded) is int:
        if given is not None and given != recorded:
            raise ShardArchiveError(
                f"--logical-shards {given}, but the node of {data_dir} ran in a cluster of "
                f"{recorded} logical shards (its node.json)"
            )
        return recorded
    if given is None:
        raise ShardArchiveError(
            f"{data_dir}/node.json does not say how many logical shards the cluster has: "
            "pass --logical-shards N"
        )
    return given


def region_of(data_dir: Path, given: str | None) -> str:
    """The region of the node of ``data_dir``: what its node.json recorded, else
    ``given``; ShardArchiveError when neither says, or they disagree."""
    recorded = node_json(data_dir).get("region")
    try:
        if isinstance(recorded, str):
            validate_name("region", recorded)
        if given is not None:
            validate_name("region", given)
    except FelixError as exc:
        raise ShardArchiveError(f"{data_dir}: {exc}") from None
    if isinstance(recorded, str):
        if given is not None and given != recorded:
            raise ShardArchiveError(
                f"--region {given}, but the node of {data_dir} ran in region {recorded} "
                "(its node.json)"
            )
        return recorded
    if given is None:
        raise ShardArchiveError(
            f"{data_dir}/node.json does not say which region the node belongs to: pass "
            "--region ID (its felix up --region)"
        )
    return given


_OFFSETS_FILE = re.compile(r"\Ashard-([0-9]{1,9})\.offsets(?:\.bak)?\Z")


def reserved_offsets(data_dir: Path, keys: list[str]) -> dict[str, int]:
    """Per stream key, the offset the node of ``data_dir`` would start it at from its
    offset reservations (``shard-N.offsets``, read only, recovered as a node would):
    the mark of the key in the file of the shard that owns it, else that file's floor.
    When node.json does not say how many shards the node had, or the key has entries
    in the files of other shards (an older layout), the highest of them all counts:
    never lower than the node would go."""
    files: dict[int, tuple[int, dict[str, int]]] = {}
    with os.scandir(data_dir) as entries:
        indexes = {int(m.group(1)) for e in entries if (m := _OFFSETS_FILE.match(e.name))}
    for index in sorted(indexes):
        path = data_dir / f"shard-{index}.offsets"
        try:
            files[index] = start_offsets(path)
        except FelixError as exc:
            raise ShardArchiveError(f"cannot export: {exc}") from None
    topology = node_json(data_dir).get("topology")
    shards = topology.get("shards") if isinstance(topology, dict) else None
    out = {}
    for key in keys:
        marks = [m[key] for _floor, m in files.values() if key in m]
        owner = files.get(shard_for(key, shards)) if type(shards) is int and shards > 0 else None
        if owner is not None:
            floor, owned = owner
            marks.append(owned.get(key, floor))
        elif not marks:
            marks = [floor for floor, _m in files.values()]
        out[key] = max(marks, default=0)
    return out


def export_shard(
    data_dir: Path,
    shard: int,
    out: Path,
    *,
    logical_shards: int | None = None,
    region: str | None = None,
) -> ExportReport:
    """Write logical shard ``shard``'s durable streams in ``data_dir`` (segments, queue
    group state files, the tenants' wrapped key files) to the archive ``out``.

    ``logical_shards`` and ``region``: the cluster's, when ``data_dir``'s node.json does
    not say. Raises ShardArchiveError (the node runs, an import into it was
    interrupted, ``out`` exists, nothing of the shard is there, a segment is damaged).
    """
    started = time.monotonic()
    lock = guard_stopped(data_dir, "export")
    try:
        try:
            check_no_pending_import(data_dir)
        except ConfigError as exc:
            raise ShardArchiveError(f"cannot export: {exc}") from None
        shards = logical_shards_of(data_dir, logical_shards)
        source_region = region_of(data_dir, region)
        if not 0 <= shard < shards:
            raise ShardArchiveError(f"logical shard {shard} is not in 0..{shards - 1}")
        if out.exists():
            raise ShardArchiveError(f"{out} exists: felix never replaces an archive")
        keys = sorted(
            k
            for k in durable_stream_keys(data_dir / "streams")
            if logical_shard(k, shards) == shard
        )
        if not keys:
            raise ShardArchiveError(
                f"{data_dir} holds no durable records of logical shard {shard} (of {shards})"
            )
        manifest, size = _write(data_dir, shard, shards, source_region, keys, out)
    finally:
        lock.release()
    return ExportReport(manifest, out, size, time.monotonic() - started)


def _write(
    data_dir: Path, shard: int, shards: int, region: str, keys: list[str], out: Path
) -> tuple[Manifest, int]:
    groups: dict[str, list[str]] = {}
    for key, group in discover(data_dir / "groups"):
        groups.setdefault(key, []).append(group)
    keys_root = data_dir / KEYS_DIR
    store = KeyStore(keys_root, None)
    tenants: dict[str, str] = {}
    for tenant in sorted({k.split("/", 1)[0] for k in keys}):
        try:
            table = store.read_table(tenant)
        except KeyUnavailable as exc:
            raise ShardArchiveError(str(exc)) from None
        if table is not None:
            tenants[tenant] = table.kek
    try:
        region_record = store.region_record()
    except KeyUnavailable as exc:
        raise ShardArchiveError(str(exc)) from None
    cluster = node_json(data_dir).get("cluster")
    node_id = cluster.get("node_id") if isinstance(cluster, dict) else None
    try:
        data_id: str | None = (data_dir / DATA_ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        data_id = None

    reserved = reserved_offsets(data_dir, keys)
    files: dict[str, tuple[int, str]] = {}
    streams: list[ArchiveStream] = []
    tmp = _temporary(out)
    try:
        with open(tmp, "wb") as raw:
            with tarfile.TarFile(
                fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BYTES
            ) as tar:
                for key in keys:
                    stream = _add_stream(tar, data_dir, key, groups.get(key, []), files)
                    if reserved[key] > stream.next_offset:
                        stream = dataclasses.replace(stream, next_offset=reserved[key])
                    streams.append(stream)
                for tenant in tenants:
                    path = keys_root / TENANTS_DIR / f"{tenant}.json"
                    KeyTable.from_bytes(path.read_bytes(), tenant, str(path))  # checked
                    _add_file(tar, f"keys/tenants/{tenant}.json", path, None, files)
                manifest = Manifest(
                    shard=shard,
                    logical_shards=shards,
                    region=region,
                    node_id=node_id if isinstance(node_id, str) and node_id else None,
                    data_id=data_id,
                    region_key=(region_record or {}).get("kek") or None,
                    created_us=time.time_ns() // 1000,
                    streams=tuple(streams),
                    tenants=tenants,
                    files=files,
                )
                body = manifest.to_bytes()
                info = tarfile.TarInfo(MANIFEST)
                info.size = len(body)
                info.mode = 0o600
                info.mtime = int(time.time())
                tar.addfile(info, _Reader(_BytesSource(body), len(body)))
            raw.flush()
            os.fsync(raw.fileno())
            size = raw.tell()
        _publish(tmp, out)
    except KeyUnavailable as exc:
        raise ShardArchiveError(str(exc)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return manifest, size


#: What ``link`` fails with where a file system has no hard links.
_NO_LINKS: Final = frozenset(
    {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}
)


def _temporary(out: Path) -> Path:
    """A new empty file beside ``out`` with a name of its own (a random suffix, created
    exclusively: no other export, even of the same pid in another container, uses it)."""
    for _ in range(16):
        tmp = out.with_name(f".{out.name}.{os.urandom(6).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return tmp
    raise ShardArchiveError(f"cannot create a temporary file beside {out}")


def _publish(tmp: Path, out: Path) -> None:
    """Give the finished archive ``tmp`` the name ``out``, never replacing a file made
    meanwhile: a hard link where the file system has them, else a rename after an
    existence check (a file made between the two would be replaced: no hard links, no
    atomic way to refuse)."""
    try:
        os.link(tmp, out)
        return
    except FileExistsError:
        raise ShardArchiveError(f"{out} exists: felix never replaces an archive") from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    if os.path.lexists(out):
        raise ShardArchiveError(f"{out} exists: felix never replaces an archive")
    os.rename(tmp, out)


def _add_stream(
    tar: tarfile.TarFile,
    data_dir: Path,
    key: str,
    groups: list[str],
    files: dict[str, tuple[int, str]],
) -> ArchiveStream:
    directory = data_dir / "streams" / key
    segments = list_segments(directory)
    bases: list[int] = []
    first = next_offset = -1
    records = 0
    last = -1
    for i, (base, path) in enumerate(segments):
        active = i + 1 == len(segments)
        length, seg_last, count = _checked_length(path, base, last, active)
        _add_file(tar, f"streams/{key}/{path.name}", path, length, files)
        bases.append(base)
        if count:
            if first < 0:
                first = _first_offset(path, base)
            last = seg_last
            records += count
        next_offset = max(last + 1, base)
    for group in groups:
        path = data_dir / "groups" / key / f"{group}.glog"
        _add_file(tar, f"groups/{key}/{group}.glog", path, None, files)
    return ArchiveStream(
        key=key,
        next_offset=next_offset,
        first_offset=first if first >= 0 else next_offset,
        records=records,
        segments=tuple(bases),
        groups=tuple(groups),
    )


def _first_offset(path: Path, base: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for _pos, offset, _ts, _payload in Scanner(fd, SEGMENT_HEADER_SIZE, size, base - 1):
            return offset
    finally:
        os.close(fd)
    return base


def _checked_length(path: Path, base: int, prev_last: int, active: bool) -> tuple[int, int, int]:
    """Verify every record of a segment; (bytes to copy, its last offset, records).
    The bytes stop before a torn tail of the active segment; other damage raises."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        header = decode_segment_header(os.pread(fd, SEGMENT_HEADER_SIZE, 0))
        if isinstance(header, str):
            raise ShardArchiveError(f"{path} is damaged at byte 0: {header}")
        if header.base_offset != base:
            raise ShardArchiveError(
                f"{path} is damaged: its header names base {header.base_offset}"
            )
        if base <= prev_last:
            raise ShardArchiveError(f"{path}: base {base} <= the previous segment's last offset")
        scanner = Scanner(fd, SEGMENT_HEADER_SIZE, size, base - 1)
        scanner.run()
        if scanner.error is not None:
            at = scanner.stopped_at
            torn = (
                active
                and size - at <= TORN_SEARCH_LIMIT
                and valid_record_after(fd, at, size, scanner.last_offset, TORN_SEARCH_LIMIT) is None
            )
            if not torn:
                raise ShardArchiveError(f"{path} is damaged at byte {at}: {scanner.error}")
        last = scanner.last_offset if scanner.records else prev_last
        return scanner.stopped_at, last, scanner.records
    finally:
        os.close(fd)


class _BytesSource:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, n: int = -1) -> bytes:
        chunk = self._data[: len(self._data) if n < 0 else n]
        self._data = self._data[len(chunk) :]
        return bytes(chunk)


class _Reader:
    """Reads at most ``length`` bytes of ``source``, hashing what it hands out (tarfile
    copies a member's data through ``read``)."""

    def __init__(self, source: IO[bytes] | _BytesSource, length: int) -> None:
        self._source = source
        self._left = length
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._source.read(n)
        self._left -= len(data)
        self.sha256.update(data)
        return data


def _add_file(
    tar: tarfile.TarFile,
    name: str,
    path: Path,
    length: int | None,
    files: dict[str, tuple[int, str]],
) -> None:
    """Add ``path`` (its first ``length`` bytes; None: all) as member ``name``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size if length is None else length
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o600
        info.mtime = int(time.time())
        reader = _Reader(f, size)
        tar.addfile(info, reader)
    files[name] = (size, reader.sha256.hexdigest())
