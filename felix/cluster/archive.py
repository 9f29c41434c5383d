"""A logical shard's durable data as one file: the manifest, the data dir guard, the
finishing of an import (``felix cluster export-shard`` / ``import-shard``).

Nothing is replicated between nodes, so a durable logical shard moves only with its
files (docs/operations.md, "Moving a durable shard"). The archive is an uncompressed
POSIX tar (docs/log-format.md, "Shard archives")::

    streams/<tenant>/<namespace>/<stream>/<base:020d>.seg   the stream's segments as stored
    groups/<tenant>/<namespace>/<stream>/<group>.glog       its queue groups' state files
    keys/tenants/<tenant>.json                              the tenants' wrapped data keys
    manifest.json                                           last: what the archive holds

Nothing in it is plaintext that was not plaintext on disk: records and group frames
stay as the source stored them (encrypted with the source's data keys), and the data
keys stay wrapped by the source's region key, named in the manifest by fingerprint.

The manifest lists every other member with its size and SHA-256, so an import checks
the whole archive before it writes anything (segments also carry their CRCs, and
encrypted records their tags, which the import verifies as it rewrites them).

The manifest names the source (region, node id, data id): an import into a data dir of
another region is refused, and the import leaves a record of where the data came from
in ``DATA_DIR/cluster-imports/<shard>.json``.

An import stages everything beside its final place (names starting with ``.``, which
nodes ignore), then writes :data:`PENDING_FILE` listing the renames that put it in
place, makes them and removes the file. ``felix up`` refuses to start while that file
exists (:func:`check_no_pending_import`), and the next import finishes it first
(:func:`finish_pending`): a crash at any point leaves either nothing a node would
serve, or a list of renames that completes the import.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from felix.cluster.ownership import logical_shard
from felix.errors import BadRequest, ConfigError, ShardArchiveError
from felix.names import validate_name
from felix.node.datadir import DataDirInUse, DataDirLock
from felix.shard.queue.settings import MAX_GROUPS_PER_STREAM

__all__ = [
    "FORMAT",
    "IMPORTS_DIR",
    "MANIFEST",
    "MAX_FILES",
    "PENDING_FILE",
    "VERSION",
    "ArchiveStream",
    "Manifest",
    "RegionMismatch",
    "check_no_pending_import",
    "finish_pending",
    "guard_stopped",
    "node_json",
    "write_pending",
]

FORMAT: Final = "felix-shard-archive"
#: 2: the source's region in the manifest, stream keys checked against the shard.
VERSION: Final = 2
MANIFEST: Final = "manifest.json"
#: In the target data dir while an import's renames are being made.
PENDING_FILE: Final = "shard-import.pending"
#: Prefix of a stream directory being imported (nodes skip names starting with a dot).
STAGED_PREFIX: Final = ".import."
#: Suffix of a group file being imported (nodes read only ``*.glog``).
STAGED_GROUP_SUFFIX: Final = ".import"
#: Prefix of a directory being removed; a shard finishes such a removal at start
#: (felix/shard/durable.py ``_TRASH``).
TRASH_PREFIX: Final = ".deleted."
#: The largest manifest read: about 550 bytes per stream with a segment and a group,
#: so some 30,000 such streams (a logical shard is a slice of a node's streams).
MAX_MANIFEST_BYTES: Final = 16 << 20
#: Most streams, and most members, an archive may hold (an importer reads no more
#: member headers than that before it refuses the archive).
MAX_STREAMS: Final = 50_000
MAX_FILES: Final = 100_000
#: Most segments of one stream (a stream of 1 TiB in 64 MiB segments).
MAX_SEGMENTS: Final = 16_384
#: Where an import records what it put into a data dir (``<shard>.json``).
IMPORTS_DIR: Final = "cluster-imports"
_SEGMENT = re.compile(r"\A[0-9]{20}\.seg\Z")
_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")


class RegionMismatch(ShardArchiveError):
    """The archive is of another region than the data dir it was to be imported into
    (data leaves a region only through a bridge)."""


@dataclass(frozen=True, slots=True)
class ArchiveStream:
    """One durable stream in an archive."""

    key: str
    #: The offset its log continues at on the source: the target continues at >= it.
    next_offset: int
    first_offset: int
    records: int
    #: Base offsets of its segments, in order.
    segments: tuple[int, ...]
    #: Its queue groups with a state file.
    groups: tuple[str, ...]

    def segment_member(self, base: int) -> str:
        return f"streams/{self.key}/{base:020d}.seg"

    def group_member(self, group: str) -> str:
        return f"groups/{self.key}/{group}.glog"


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an archive holds (``manifest.json``)."""

    shard: int
    logical_shards: int
    #: The source node's region: an import into a data dir of another region is
    #: refused (data leaves a region only through a bridge).
    region: str
    node_id: str | None
    data_id: str | None
    #: Fingerprint of the source's region key (``keys/region.json``; None: none there).
    region_key: str | None
    created_us: int
    streams: tuple[ArchiveStream, ...]
    #: Tenant -> fingerprint of the region key its key file is wrapped by.
    tenants: dict[str, str]
    #: Member name -> (size, SHA-256 hex) of every member but the manifest.
    files: dict[str, tuple[int, str]]

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "shard": self.shard,
            "logical_shards": self.logical_shards,
            "source": {
                "region": self.region,
                "node_id": self.node_id,
                "data_id": self.data_id,
                "region_key": self.region_key,
            },
            "created_us": self.created_us,
            "streams": [
                {
                    "key": s.key,
                    "next_offset": s.next_offset,
                    "first_offset": s.first_offset,
                    "records": s.records,
                    "segments": list(s.segments),
                    "groups": list(s.groups),
                }
                for s in self.streams
            ],
            "tenants": self.tenants,
            "files": {name: {"size": n, "sha256": h} for name, (n, h) in self.files.items()},
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest (ShardArchiveError naming ``where`` and why)."""

        def bad(why: str) -> ShardArchiveError:
            return ShardArchiveError(f"{where}: not a usable shard archive: {why}")

        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"its manifest is not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"the manifest is not a {FORMAT} document")
        if doc.get("version") != VERSION:
            raise bad(f"unsupported version {doc.get('version')!r} (this felix reads {VERSION})")
        try:
            shards = _int(doc["logical_shards"], 1, 4096)
            shard = _int(doc["shard"], 0, shards - 1)
            source = doc["source"]
            region = validate_name("region", _text(source["region"]))
            tenants = {str(t): _text(fp) for t, fp in dict(doc["tenants"]).items()}
            for tenant in tenants:
                validate_name("tenant", tenant)
            if len(doc["files"]) > MAX_FILES or len(doc["streams"]) > MAX_STREAMS:
                raise ValueError(
                    f"more than {MAX_STREAMS} streams or {MAX_FILES} files (this felix "
                    "reads no more)"
                )
            files = {}
            for name, info in dict(doc["files"]).items():
                digest = _text(info["sha256"])
                if not _SHA256.match(digest):
                    raise ValueError(f"bad checksum of {name}")
                files[str(name)] = (_int(info["size"], 0, 1 << 62), digest)
            streams = tuple(_stream(s) for s in doc["streams"])
            manifest = cls(
                shard=shard,
                logical_shards=shards,
                region=region,
                node_id=_opt_text(source.get("node_id")),
                data_id=_opt_text(source.get("data_id")),
                region_key=_opt_text(source.get("region_key")),
                created_us=_int(doc["created_us"], 0, 1 << 63),
                streams=streams,
                tenants=tenants,
                files=files,
            )
        except (KeyError, TypeError, ValueError, AttributeError, BadRequest) as exc:
            raise bad(f"bad manifest ({exc!r})") from None
        # Checked against itself: every stream is of the shard it names, once; the
        # files are exactly the streams' segments and groups and the tenants' keys.
        seen: set[str] = set()
        wanted: set[str] = {f"keys/tenants/{t}.json" for t in tenants}
        for s in streams:
            if s.key in seen:
                raise bad(f"stream {s.key} is listed twice")
            seen.add(s.key)
            owner = logical_shard(s.key, shards)
            if owner != manifest.shard:
                raise bad(
                    f"stream {s.key} is of logical shard {owner} (of {shards}), not of "
                    f"shard {manifest.shard} the archive is of"
                )
            wanted.update(s.segment_member(b) for b in s.segments)
            wanted.update(s.group_member(g) for g in s.groups)
        missing = sorted(wanted - set(files))
        if missing:
            raise bad(f"the manifest lists no checksum for {missing[0]}")
        stray = sorted(set(files) - wanted)
        if stray:
            raise bad(f"the manifest lists {stray[0]}, which is of no stream or tenant of it")
        return manifest


def _int(value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{value!r} is not an integer in {low}..{high}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def _opt_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _stream(doc: Any) -> ArchiveStream:
    key = _text(doc["key"])
    parts = key.split("/")
    if len(parts) != 3:
        raise ValueError(f"stream key {key!r} is not tenant/namespace/stream")
    for kind, name in zip(("tenant", "namespace", "stream"), parts, strict=True):
        validate_name(kind, name)
    if len(doc["segments"]) > MAX_SEGMENTS or len(doc["groups"]) > MAX_GROUPS_PER_STREAM:
        raise ValueError(
            f"stream {key}: more than {MAX_SEGMENTS} segments or {MAX_GROUPS_PER_STREAM} groups"
        )
    segments = tuple(_int(b, 0, 2**63 - 1) for b in doc["segments"])
    if not segments or list(segments) != sorted(set(segments)):
        raise ValueError(f"stream {key}: segments must be increasing base offsets")
    groups = tuple(_text(g) for g in doc["groups"])
    for group in groups:
        validate_name("group", group)
    if len(set(groups)) != len(groups):
        raise ValueError(f"stream {key}: a group is listed twice")
    return ArchiveStream(
        key=key,
        next_offset=_int(doc["next_offset"], 0, 2**63 - 1),
        first_offset=_int(doc["first_offset"], 0, 2**63 - 1),
        records=_int(doc["records"], 0, 2**63 - 1),
        segments=segments,
        groups=groups,
    )


def is_segment_name(name: str) -> bool:
    return bool(_SEGMENT.match(name))


# -- the data dir of a stopped node ------------------------------------------------------


def node_json(data_dir: Path) -> dict[str, Any]:
    """The data dir's ``node.json`` (``{}``: none, or not readable as a report)."""
    try:
        doc = json.loads((data_dir / "node.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def guard_stopped(data_dir: Path, what: str) -> DataDirLock:
    """The data dir's lock, held while ``what`` (export, import) reads or writes it, as
    ``felix up`` holds it: no node can start on it meanwhile. ShardArchiveError when a
    node runs there (its lock is held, or the pid its node.json names is alive)."""
    if not data_dir.is_dir():
        raise ShardArchiveError(f"{data_dir}: no such data dir")
    pid = node_json(data_dir).get("pid")
    if type(pid) is int and pid > 0 and pid != os.getpid() and _pid_alive(pid):
        raise ShardArchiveError(
            f"cannot {what}: {data_dir}/node.json names pid {pid}, which is alive (the node "
            "may be running): stop the node first (remove node.json if that process is not "
            "felix)"
        )
    try:
        return DataDirLock.acquire(data_dir)
    except DataDirInUse as exc:
        raise ShardArchiveError(f"cannot {what}: {exc}") from None


# -- finishing an import ------------------------------------------------------------------


def write_pending(data_dir: Path, archive_id: str, shard: int, steps: list[list[str]]) -> None:
    """Record the renames (``["move", staged, final]``) and removals (``["remove",
    path]``) that complete an import, paths relative to ``data_dir`` (atomic, fsynced)."""
    from felix.keys.kek import write_atomic

    doc = {"archive": archive_id, "shard": shard, "steps": steps}
    write_atomic(data_dir / PENDING_FILE, (json.dumps(doc) + "\n").encode(), 0o644)


def _pending(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / PENDING_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ShardArchiveError(f"{path} is damaged ({exc}): an import was interrupted") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
        raise ShardArchiveError(f"{path} is damaged: an import was interrupted")
    return doc


def check_no_pending_import(data_dir: Path) -> None:
    """ConfigError when an import into ``data_dir`` was interrupted (``felix up``
    refuses to start rather than serve half of it)."""
    if (data_dir / PENDING_FILE).exists():
        raise ConfigError(
            f"an import into {data_dir} was interrupted ({data_dir / PENDING_FILE}): run "
            "felix cluster import-shard again with that archive to finish it"
        )


def _inside(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if ".." in Path(relative).parts or Path(relative).is_absolute():
        raise ShardArchiveError(f"{data_dir / PENDING_FILE}: bad path {relative!r}")
    return path


def finish_pending(data_dir: Path) -> dict[str, Any] | None:
    """Make the renames of an interrupted import (each step is done or redone: a step
    whose staged file is gone was made); the pending record (None: there was none)."""
    doc = _pending(data_dir)
    if doc is None:
        return None
    dirs: set[Path] = set()
    for step in doc["steps"]:
        if step[0] == "move":
            staged, final = _inside(data_dir, step[1]), _inside(data_dir, step[2])
            if not staged.exists():
                continue  # made already
            if staged.is_dir() and final.exists():
                # A directory cannot be renamed over a full one: the old one goes aside
                # under a name the node removes (and so does this function, below).
                trash = final.with_name(f"{TRASH_PREFIX}{os.urandom(8).hex()}.{final.name}")
                os.replace(final, trash)
            os.replace(staged, final)
            dirs.add(final.parent)
        elif step[0] == "remove":
            path = _inside(data_dir, step[1])
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            dirs.add(path.parent)
        else:
            raise ShardArchiveError(f"{data_dir / PENDING_FILE}: unknown step {step[0]!r}")
    for directory in dirs:
        _fsync_dir(directory)
        for entry in directory.iterdir():
            if entry.name.startswith(TRASH_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
    (data_dir / PENDING_FILE).unlink()
    _fsync_dir(data_dir)
    return doc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
