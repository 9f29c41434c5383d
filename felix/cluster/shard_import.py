"""``felix cluster import-shard``: put an archive of a logical shard (felix/cluster/archive.py)
into the data dir of a stopped node, readable with that node's keys.

In order, holding the data dir's lock (no node starts meanwhile):

1. Finish an interrupted import, if one is pending.
2. Check the target and the whole archive before writing anything: the manifest
   (against itself: every stream of its shard, once; see :class:`Manifest`), that it
   is of the target's region (data leaves a region only through a bridge:
   :class:`RegionMismatch`) and cluster size, that no stream of it holds records
   here (each is named) and no other stream of the shard does (unless
   ``force_extra_streams``), every member's size and SHA-256 (and the whole file's,
   for the record), and that the source's data keys unwrap (with this node's region
   key when the fingerprints match, as with one region key from a Secret on every
   pod; else with ``--source-region-key``, which must be the key the archive names).
3. Stage each stream beside its place (``.import.<stream>``, which nodes ignore):
   segment by segment, every record's CRCs verified (the segment reader, bounded
   memory); an encrypted record opened with the source's data key (its tag verified,
   :func:`~felix.shard.log_format.open_payload`) and sealed again with this node's
   current data key of the tenant (created as a first durable write would create
   it), keeping offset, timestamp and headers; a plaintext record stays as it is.
   Segments keep their base offsets, and an empty last segment at the manifest's
   ``next_offset`` (when above the last record) makes the log continue where the
   source's would have. Queue group files (at most ``MAX_FILE_BYTES``, their state
   not beyond that point) are decoded with the source's keys and written whole with
   this node's (or plain, as they were). The record of the import
   (``cluster-imports/<shard>.json``) is staged too.
4. Record the renames in ``shard-import.pending``, make them, remove the record.

A failure in 1-3 removes what was staged: the data dir is as it was (except a data
key created for a tenant, which a first durable write would have created anyway).
A crash leaves staged files nodes ignore, or the pending record, which ``felix up``
refuses to start with and the next import finishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from felix.cluster.archive import (
    IMPORTS_DIR,
    MANIFEST,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    STAGED_GROUP_SUFFIX,
    STAGED_PREFIX,
    ArchiveStream,
    Manifest,
    RegionMismatch,
    finish_pending,
    guard_stopped,
    node_json,
    write_pending,
)
from felix.cluster.ownership import logical_shard
from felix.errors import ConfigError, FelixError, KeyUnavailable, ShardArchiveError
from felix.keys.kek import REGION_KEY_ENV, FileKeyEncryptionKey, KeyEncryptionKey
from felix.keys.store import KEYS_DIR, KeyStore, KeyTable, resolve_region_key, unwrap_table
from felix.node.cluster import durable_stream_keys
from felix.shard.disklog import DiskLog, DiskLogSettings, fsync_dir
from felix.shard.log_format import (
    ENVELOPE_ENCRYPTED,
    SEGMENT_HEADER_SIZE,
    decode_segment_header,
    encode_batch,
    encode_segment_header,
    open_payload,
    seal_batch,
)
from felix.shard.log_segment import Scanner, segment_name
from felix.shard.queue.group_log import (
    GLOG_SUFFIX,
    GroupCipher,
    decode_bytes,
    encode_file,
)
from felix.shard.queue.group_log import MAX_FILE_BYTES as MAX_GROUP_FILE_BYTES

__all__ = ["ImportReport", "import_shard"]

#: Records re-encrypted and written per batch (one ``write`` each), and their bytes.
_BATCH_RECORDS = 1024
_BATCH_BYTES = 4 << 20
#: Bytes hashed per read when checking the archive.
_HASH_CHUNK = 1 << 20


@dataclass(slots=True)
class ImportReport:
    manifest: Manifest | None = None
    streams: int = 0
    records: int = 0
    #: Records opened with the source's key and sealed with this node's.
    reencrypted: int = 0
    groups: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: The pending import that was finished first (None: there was none).
    finished: dict[str, Any] | None = None
    #: The archive was the pending import itself: nothing more to do.
    already_done: bool = False
    #: What the import recorded in ``DATA_DIR/cluster-imports/<shard>.json``.
    provenance: dict[str, Any] | None = None
    staged: list[Path] = field(default_factory=list)


def import_shard(
    archive: Path,
    data_dir: Path,
    *,
    region_key: Path | None = None,
    source_region_key: Path | None = None,
    region: str | None = None,
    force_extra_streams: bool = False,
) -> ImportReport:
    """Import ``archive`` into ``data_dir`` (see the module docstring).

    ``region_key``: this node's region key file (default ``$FELIX_REGION_KEY_FILE``,
    else ``DATA_DIR/keys/region.key``); ``source_region_key``: the source node's, when
    it differs. ``region``: the node's region when its node.json does not say.
    ``force_extra_streams``: import although ``data_dir`` holds other streams of the
    shard. Raises ShardArchiveError (RegionMismatch: the archive is of another
    region); nothing is changed then.
    """
    started = time.monotonic()
    report = ImportReport()
    lock = guard_stopped(data_dir, "import")
    try:
        report.finished = finish_pending(data_dir)
        with _Archive.open(archive) as arc:
            report.manifest = arc.manifest
            if report.finished is not None and report.finished.get("archive") == arc.archive_id:
                report.already_done = True
                return report
            _check_target(arc.manifest, data_dir, region, force_extra_streams)
            arc.verify()
            source, target = _keys(arc, data_dir, region_key, source_region_key)
            try:
                steps = _stage(arc, data_dir, source, target, report)
                report.provenance = _provenance(arc)
                steps.append(_stage_provenance(data_dir, report.provenance, report))
            except BaseException:
                for path in report.staged:
                    _remove(path)
                raise
            write_pending(data_dir, arc.archive_id, arc.manifest.shard, steps)
        finish_pending(data_dir)
    except KeyUnavailable as exc:
        raise ShardArchiveError(f"{archive}: {exc}") from None
    finally:
        lock.release()
    report.seconds = time.monotonic() - started
    return report


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


#: Largest extended header (pax, GNU long name) read: names are short.
_MAX_EXTENDED_HEADER = 64 << 10


def _check_extended(fd: int, pos: int, path: Path) -> None:
    """Refuse an extended header (pax, GNU long name) at ``pos`` larger than any felix
    writes: tarfile would read it whole."""
    header = os.pread(fd, tarfile.BLOCKSIZE, pos)
    if len(header) < tarfile.BLOCKSIZE or header[156:157] not in (b"x", b"g", b"L", b"K"):
        return
    size_field = header[124:136]
    try:
        size = -1 if size_field[0] & 0x80 else int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        size = -1
    if not 0 <= size <= _MAX_EXTENDED_HEADER:
        raise ShardArchiveError(
            f"{path}: an extended tar header of {size} bytes at byte {pos} (not an archive "
            "felix wrote)"
        )


def _members(path: Path) -> dict[str, tarfile.TarInfo]:
    """The archive's members by name, read one header at a time: refused past
    MAX_FILES + 1 (the manifest is last, so its count is not known yet; the exact
    count is checked against it next), on a name seen twice, or on an extended header
    larger than any felix writes."""
    members: dict[str, tarfile.TarInfo] = {}
    with open(path, "rb") as f:
        _check_extended(f.fileno(), 0, path)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                _check_extended(f.fileno(), tar.offset, path)
                info = tar.next()
                if info is None:
                    return members
                # tarfile keeps every header it read: they are counted here instead.
                cast(Any, tar).members.clear()
                if info.name in members:
                    raise ShardArchiveError(f"{path}: member {info.name} appears twice")
                if len(members) > MAX_FILES:
                    raise ShardArchiveError(
                        f"{path}: more than {MAX_FILES + 1} members (not an archive felix wrote)"
                    )
                members[info.name] = info


class _Archive:
    """An archive file open for reading: its members (by name) and manifest."""

    def __init__(self, path: Path, fd: int, members: dict[str, tarfile.TarInfo]) -> None:
        self.path = path
        self.fd = fd
        self.members = members
        #: SHA-256 of the whole file (set by :meth:`verify`).
        self.sha256 = ""
        body = self.read(MANIFEST, MAX_MANIFEST_BYTES)
        self.archive_id = hashlib.sha256(body).hexdigest()[:16]
        self.manifest = Manifest.from_bytes(body, str(path))

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: Path) -> Iterator[_Archive]:
        try:
            members = _members(path)
        except FileNotFoundError:
            raise ShardArchiveError(f"{path}: no such archive") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardArchiveError(
                f"{path} is not a whole shard archive (truncated or damaged: {exc})"
            ) from None
        fd = os.open(path, os.O_RDONLY)
        try:
            yield cls(path, fd, members)
        finally:
            os.close(fd)

    def member(self, name: str) -> tarfile.TarInfo:
        m = self.members.get(name)
        if m is None or not m.isreg():
            what = "its manifest" if name == MANIFEST else name
            raise ShardArchiveError(
                f"{self.path} is not a whole shard archive: {what} is missing (truncated?)"
            )
        return m

    def read(self, name: str, limit: int) -> bytes:
        m = self.member(name)
        if m.size > limit:
            raise ShardArchiveError(f"{self.path}: {name} is larger than {limit} bytes")
        data = os.pread(self.fd, m.size, m.offset_data)
        if len(data) != m.size:
            raise ShardArchiveError(f"{self.path} is truncated inside {name}")
        return data

    def verify(self) -> None:
        """Every member the manifest lists has its size and SHA-256; no other member (so,
        names being unique, no more members than it lists, plus itself)."""
        files = self.manifest.files
        extra = sorted(set(self.members) - set(files) - {MANIFEST})
        if extra:
            raise ShardArchiveError(f"{self.path}: member {extra[0]} is not in its manifest")
        spans = []
        for name, (size, _digest) in files.items():
            m = self.member(name)
            if m.size != size:
                raise ShardArchiveError(
                    f"{self.path}: {name} has {m.size} bytes, its manifest says {size}"
                )
            spans.append((m.offset_data, m.offset_data + m.size, name))
        # One pass over the whole file: its SHA-256 (``sha256sum``'s, for the record of
        # the import) and each member's.
        spans.sort()
        whole = hashlib.sha256()
        sums = {name: hashlib.sha256() for name in files}
        end = os.fstat(self.fd).st_size
        pos = i = 0
        while pos < end:
            chunk = os.pread(self.fd, min(_HASH_CHUNK, end - pos), pos)
            if not chunk:
                break
            whole.update(chunk)
            top = pos + len(chunk)
            while i < len(spans) and spans[i][0] < top:
                start, stop, name = spans[i]
                view = memoryview(chunk)[max(start, pos) - pos : min(stop, top) - pos]
                sums[name].update(view)
                if stop > top:
                    break
                i += 1
            pos = top
        for _start, stop, name in spans:
            if stop > pos:
                raise ShardArchiveError(f"{self.path} is truncated inside {name}")
            if sums[name].hexdigest() != files[name][1]:
                raise ShardArchiveError(
                    f"{self.path}: {name} does not match its checksum (the archive is damaged)"
                )
        self.sha256 = whole.hexdigest()


def _check_target(
    manifest: Manifest, data_dir: Path, region: str | None, force_extra_streams: bool
) -> None:
    info = node_json(data_dir)
    recorded = info.get("region")
    if isinstance(recorded, str):
        if region is not None and region != recorded:
            raise ShardArchiveError(
                f"--region {region}, but the node of {data_dir} runs in region {recorded} "
                "(its node.json)"
            )
        region = recorded
    if region is None:
        raise ShardArchiveError(
            f"{data_dir}/node.json does not say which region the node belongs to: pass "
            "--region ID (its felix up --region)"
        )
    if region != manifest.region:
        raise RegionMismatch(
            f"the archive is of region {manifest.region} (node {manifest.node_id}); the node "
            f"of {data_dir} is of region {region}: data leaves a region only through a "
            "bridge, never by moving a shard"
        )
    cluster = info.get("cluster")
    recorded = cluster.get("logical_shards") if isinstance(cluster, dict) else None
    if type(recorded) is int and recorded != manifest.logical_shards:
        raise ShardArchiveError(
            f"the archive is of a cluster of {manifest.logical_shards} logical shards; the "
            f"node of {data_dir} runs in one of {recorded}"
        )
    holding = set(durable_stream_keys(data_dir / "streams"))
    taken = [s.key for s in manifest.streams if s.key in holding]
    if taken:
        raise ShardArchiveError(
            f"{data_dir} already holds records of stream(s) {', '.join(taken)}: an import "
            "never merges logs (remove those streams' directories first if they are stale)"
        )
    ours = {s.key for s in manifest.streams}
    extra = sorted(
        k
        for k in holding
        if k not in ours and logical_shard(k, manifest.logical_shards) == manifest.shard
    )
    if extra and not force_extra_streams:
        raise ShardArchiveError(
            f"{data_dir} holds records of other streams of logical shard {manifest.shard}, "
            f"which the archive does not have: {', '.join(extra)}. Once the shard is moved "
            "there they would be served again beside the imported ones (a stale copy from "
            "an earlier time?): remove their directories (DATA_DIR/streams/... and "
            "DATA_DIR/groups/...), or pass --force-extra-streams to keep them"
        )


class _SourceKeys:
    """The source's data keys, unwrapped from the archive's key files (read only)."""

    def __init__(self, aeads: dict[str, dict[int, AESGCM]], archive: Path) -> None:
        self._aeads = aeads
        self._archive = archive

    def aead(self, tenant: str, key_id: int) -> AESGCM:
        aead = self._aeads.get(tenant, {}).get(key_id)
        if aead is None:
            raise KeyUnavailable(
                f"data key {key_id} of tenant {tenant} is not in the archive {self._archive}"
            )
        return aead

    def current(self, tenant: str) -> tuple[int, AESGCM]:
        raise KeyUnavailable("the archive's keys only read")  # never writes with them


def _keys(
    arc: _Archive, data_dir: Path, region_key: Path | None, source_region_key: Path | None
) -> tuple[_SourceKeys, KeyStore | None]:
    """The source's data keys and this node's key store (None when the archive holds
    no key file: every record is plaintext)."""
    manifest = arc.manifest
    if not manifest.tenants:
        return _SourceKeys({}, arc.path), None
    try:
        given = region_key
        if given is None and os.environ.get(REGION_KEY_ENV):
            given = Path(os.environ[REGION_KEY_ENV])
        kek, missing = resolve_region_key(data_dir, given, generate=False)
        if kek is None:
            raise ShardArchiveError(
                f"the archive holds encrypted data and {data_dir} has no region key to "
                f"encrypt it with: {missing}"
            )
        source: KeyEncryptionKey
        wrapped_by = sorted(set(manifest.tenants.values()))
        if source_region_key is not None:
            source = FileKeyEncryptionKey.load(source_region_key)
            if wrapped_by != [source.key_id]:
                raise ShardArchiveError(
                    f"--source-region-key {source_region_key} is region key {source.key_id}, "
                    f"but the archive's data keys are wrapped by {', '.join(wrapped_by)}: give "
                    "the region key of the node the archive was exported from"
                )
        elif wrapped_by == [kek.key_id]:
            source = kek  # one region key for the cluster (a Secret): the production case
        else:
            raise ShardArchiveError(
                f"the archive's data keys are wrapped by region key {', '.join(wrapped_by)} "
                f"(the source node's); {data_dir}'s region key is {kek.key_id}: pass "
                "--source-region-key FILE, the source node's region key"
            )
    except ConfigError as exc:
        raise ShardArchiveError(str(exc)) from None
    aeads = {}
    for tenant in manifest.tenants:
        name = f"keys/tenants/{tenant}.json"
        where = f"{arc.path}:{name}"
        table = KeyTable.from_bytes(arc.read(name, 1 << 20), tenant, where)
        aeads[tenant] = unwrap_table(table, source, where)
    return _SourceKeys(aeads, arc.path), KeyStore(data_dir / KEYS_DIR, kek)


def _stage(
    arc: _Archive,
    data_dir: Path,
    source: _SourceKeys,
    target: KeyStore | None,
    report: ImportReport,
) -> list[list[str]]:
    """Write every stream and group file beside its place; the steps that put them there."""
    steps: list[list[str]] = []
    for stream in arc.manifest.streams:
        tenant, ns, name = stream.key.split("/")
        final = data_dir / "streams" / tenant / ns / name
        staged = final.with_name(STAGED_PREFIX + name)
        _remove(staged)  # left by an import that crashed before its pending record
        final.parent.mkdir(parents=True, exist_ok=True)
        staged.mkdir()
        report.staged.append(staged)
        _stage_log(arc, stream, staged, source, target, report)
        groups_dir = data_dir / "groups" / tenant / ns / name
        groups_dir.mkdir(parents=True, exist_ok=True)
        for group in stream.groups:
            path = groups_dir / f"{group}{GLOG_SUFFIX}{STAGED_GROUP_SUFFIX}"
            report.staged.append(path)
            _stage_group(arc, stream, group, path, source, target)
            report.groups += 1
            steps.append(["move", _rel(data_dir, path), _rel(data_dir, path.with_suffix(""))])
        # A group file here for a stream without records (made when the group was
        # defined) would start where this node's empty stream did: the archive's state
        # wins, and a group it does not have starts afresh.
        for entry in sorted(groups_dir.iterdir()):
            group = entry.name.removesuffix(GLOG_SUFFIX)
            if entry.name.endswith(GLOG_SUFFIX) and group not in stream.groups:
                steps.append(["remove", _rel(data_dir, entry)])
        fsync_dir(groups_dir)
        steps.append(["move", _rel(data_dir, staged), _rel(data_dir, final)])
        report.streams += 1
    return steps


def _rel(data_dir: Path, path: Path) -> str:
    return str(path.relative_to(data_dir))


def _stage_log(
    arc: _Archive,
    stream: ArchiveStream,
    staged: Path,
    source: _SourceKeys,
    target: KeyStore | None,
    report: ImportReport,
) -> None:
    """The stream's segments, records re-encrypted, in ``staged``."""
    key = stream.key
    tenant = key.split("/", 1)[0]
    last = -1
    records = 0
    for base in stream.segments:
        name = stream.segment_member(base)
        m = arc.member(name)
        start, end = m.offset_data, m.offset_data + m.size
        header = decode_segment_header(os.pread(arc.fd, SEGMENT_HEADER_SIZE, start))
        if isinstance(header, str) or header.base_offset != base:
            why = header if isinstance(header, str) else f"names base {header.base_offset}"
            raise ShardArchiveError(f"{arc.path}: {name}: bad segment header ({why})")
        out = os.open(staged / segment_name(base), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(out, encode_segment_header(base, header.created_us))
            size = SEGMENT_HEADER_SIZE
            scanner = Scanner(arc.fd, start + SEGMENT_HEADER_SIZE, end, max(last, base - 1))
            batch: list[tuple[int, int, bytes]] = []
            nbytes = 0
            for _pos, offset, ts, payload in scanner:
                batch.append((offset, ts, payload))
                nbytes += len(payload)
                if len(batch) >= _BATCH_RECORDS or nbytes >= _BATCH_BYTES:
                    size += _write_batch(out, batch, key, tenant, source, target, size, report)
                    batch, nbytes = [], 0
            if batch:
                size += _write_batch(out, batch, key, tenant, source, target, size, report)
            if scanner.error is not None:
                raise ShardArchiveError(
                    f"{arc.path}: {name} is damaged at byte "
                    f"{scanner.stopped_at - start}: {scanner.error}"
                )
            os.fdatasync(out)
        finally:
            os.close(out)
        if scanner.records:
            last = scanner.last_offset
        records += scanner.records
        report.bytes += size
    end = max(last + 1, stream.segments[-1])
    if stream.next_offset < end:
        raise ShardArchiveError(
            f"{arc.path}: stream {key} ends at {end}, its manifest says it continues at "
            f"{stream.next_offset}"
        )
    if stream.next_offset > end:
        # Where the source would have continued (its offset reservation, above offsets
        # a crash lost): an empty last segment there makes this log continue there.
        path = staged / segment_name(stream.next_offset)
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(out, encode_segment_header(stream.next_offset, time.time_ns() // 1000))
            os.fdatasync(out)
        finally:
            os.close(out)
    if records != stream.records:
        raise ShardArchiveError(
            f"{arc.path}: stream {key} holds {records} records, its manifest says {stream.records}"
        )
    # Opening the log checks it as a node would, writes the sealed segments' indexes
    # and fsyncs the directories down to it.
    log = DiskLog.open(staged, DiskLogSettings(), first_offset=0)
    try:
        if log.next_offset != stream.next_offset:
            raise ShardArchiveError(
                f"{arc.path}: stream {key} continues at {log.next_offset}, its manifest says "
                f"{stream.next_offset}"
            )
    finally:
        log.close()
    report.records += records


def _write_batch(
    fd: int,
    batch: list[tuple[int, int, bytes]],
    key: str,
    tenant: str,
    source: _SourceKeys,
    target: KeyStore | None,
    position: int,
    report: ImportReport,
) -> int:
    """Re-encrypt the encrypted records of ``batch`` and append it; bytes written."""
    sealed_at = [i for i, (_o, _t, p) in enumerate(batch) if p[:1] == bytes((ENVELOPE_ENCRYPTED,))]
    if sealed_at:
        if target is None:
            raise ShardArchiveError(
                f"stream {key} holds encrypted records but the archive has no data keys of "
                f"tenant {tenant}"
            )
        opened = []
        for i in sealed_at:
            offset, ts, payload = batch[i]
            opened.append((offset, ts, open_payload(payload, key, offset, ts, source)))
        key_id, aead = target.current(tenant)
        for i, record in zip(sealed_at, seal_batch(opened, key, key_id, aead), strict=True):
            batch[i] = record
        report.reencrypted += len(sealed_at)
    # No index entries here (huge mark): opening the log writes the sealed indexes.
    data, _entries, _mark, _max_ts = encode_batch(batch, batch[0][0], position, 1 << 62, 4096, 0)
    _write_all(fd, data)
    return len(data)


def _stage_group(
    arc: _Archive,
    stream: ArchiveStream,
    group: str,
    path: Path,
    source: _SourceKeys,
    target: KeyStore | None,
) -> None:
    """The group's state, decoded with the source's keys, as a whole file of this node's."""
    name = stream.group_member(group)
    identity = f"{stream.key}/{group}"
    data = arc.read(name, MAX_GROUP_FILE_BYTES)
    try:
        state_file = decode_bytes(data, f"{arc.path}:{name}", GroupCipher(source, identity))
    except FelixError as exc:
        if isinstance(exc, KeyUnavailable):
            raise
        raise ShardArchiveError(str(exc)) from None
    state = state_file.state()
    if state.next > stream.next_offset:
        # Offsets up to state.next were handed out (or skipped) by the group: the log
        # must continue above them, or the records written there would never be
        # delivered to it.
        raise ShardArchiveError(
            f"{arc.path}: queue group {group} of stream {stream.key} has handled offsets "
            f"up to {state.next - 1}, but the stream continues at {stream.next_offset}: "
            "the archive does not match itself"
        )
    cipher = None
    if state_file.encrypted:
        if target is None:
            raise ShardArchiveError(f"{arc.path}: {name} is encrypted and it has no data keys")
        cipher = GroupCipher(target, identity)
    body = encode_file(state, cipher)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)


def _provenance(arc: _Archive) -> dict[str, Any]:
    m = arc.manifest
    return {
        "shard": m.shard,
        "logical_shards": m.logical_shards,
        "region": m.region,
        "source_node_id": m.node_id,
        "source_data_id": m.data_id,
        "exported_us": m.created_us,
        "imported_us": time.time_ns() // 1000,
        "archive": str(arc.path),
        "archive_sha256": arc.sha256,
        "streams": [s.key for s in m.streams],
    }


def _stage_provenance(data_dir: Path, record: dict[str, Any], report: ImportReport) -> list[str]:
    """Write the import's record beside its place; the step that puts it there (an
    earlier import of the shard's record is replaced)."""
    directory = data_dir / IMPORTS_DIR
    directory.mkdir(exist_ok=True)
    final = directory / f"{record['shard']}.json"
    staged = final.with_name(f".{final.name}{STAGED_GROUP_SUFFIX}")
    report.staged.append(staged)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, (json.dumps(record, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    return ["move", _rel(data_dir, staged), _rel(data_dir, final)]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
