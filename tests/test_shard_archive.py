"""felix cluster export-shard / import-shard on real data dirs (felix/cluster/archive.py,
shard_export.py, shard_import.py): logs written by the real DiskLog, encrypted with the
real key store, group state by the real GroupLog; read back the way a node reads them.

- a shard's streams (and its ``.dlq``), with a queue group, move between data dirs of two
  region keys: every record at its offset with its body and headers, re-encrypted with
  the target's data key; plaintext stays plaintext; the group state is the same; the
  log continues at the source's next offset, segment bases and all;
- the matching-key path (one region key for both) needs no --source-region-key;
- refusals that write nothing: a damaged or truncated archive, a wrong or missing
  source region key, a stream with records at the target, a running node (lock or a
  live pid in node.json), an export of a shard with nothing;
- an interrupted import is finished by the next one, and ``felix up`` refuses to start
  meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from felix import ipc
from felix.cluster.archive import (
    IMPORTS_DIR,
    PENDING_FILE,
    RegionMismatch,
    check_no_pending_import,
    finish_pending,
    write_pending,
)
from felix.cluster.ownership import logical_shard
from felix.cluster.shard_export import export_shard, reserved_offsets
from felix.cluster.shard_import import import_shard
from felix.errors import ConfigError, KeyUnavailable, ShardArchiveError
from felix.keys.kek import REGION_KEY_ENV, FileKeyEncryptionKey, generate_key_file
from felix.keys.store import KEYS_DIR, KeyStore
from felix.node.datadir import DataDirLock
from felix.shard.disklog import DiskLog, DiskLogSettings
from felix.shard.log_format import decode_record, encode_envelope, encrypted_key_id, seal_batch
from felix.shard.offsets import OffsetReservations
from felix.shard.queue.group_log import (
    MAX_FILE_BYTES,
    MAX_SNAPSHOT_BYTES,
    GroupCipher,
    GroupLog,
    decode_file,
    encode_file,
)
from felix.shard.queue.journal import (
    Ack,
    Entry,
    EntryState,
    GroupSnapshot,
    JournalEntry,
    Lease,
    Start,
)
from felix.shard.queue.settings import MAX_SPAN
from tests import test_shard_durable as durable

L = 16
TENANT = "acme"
REGION = "eu-west"


def _stream_on_shard(shard: int, prefix: str = "orders") -> str:
    for i in range(10_000):
        key = f"{TENANT}/prod/{prefix}{i}"
        if logical_shard(key, L) == shard:
            return key
    raise AssertionError("no name")


def _node_dir(
    root: Path, name: str, key_file: Path | None = None, region: str = REGION
) -> tuple[Path, KeyStore]:
    """A data dir with a region key (its own dev key unless ``key_file``) and a node.json
    of a stopped cluster node."""
    data = root / name
    data.mkdir()
    if key_file is None:
        kek = generate_key_file(data / KEYS_DIR / "region.key")
    else:
        kek = FileKeyEncryptionKey.load(key_file)
    (data / "node.json").write_text(
        json.dumps(
            {
                "pid": 2**22 + 12345,
                "region": region,
                "cluster": {"node_id": name, "logical_shards": L},
            }
        )
    )
    return data, KeyStore(data / KEYS_DIR, kek)


def _write_log(
    data: Path,
    keys: KeyStore | None,
    key: str,
    count: int,
    *,
    start: int = 0,
    seg: int = 4096,
    word: str = "record",
) -> list[tuple[int, int, dict[str, str] | None, bytes]]:
    """``count`` records (every third with headers) in small segments; encrypted when
    ``keys``; what was written."""
    log = DiskLog.open(
        data / "streams" / key, DiskLogSettings(segment_bytes=seg), first_offset=start
    )
    written = []
    offset = start
    for i in range(0, count, 10):
        batch = []
        for j in range(i, min(i + 10, count)):
            headers = {"n": str(j), "kind": "h"} if j % 3 == 0 else None
            body = f"{word} {j} ".encode() * 5
            ts = 1_700_000_000_000_000 + j
            batch.append((offset, ts, encode_envelope(headers, body)))
            written.append((offset, ts, headers, body))
            offset += 1 if j % 7 else 3  # gaps, as reserved offsets leave them
        if keys is not None:
            key_id, aead = keys.current(TENANT)
            batch = seal_batch(batch, key, key_id, aead)
        log.append(batch)
    log.sync()
    log.close()
    return written


def _write_group(data: Path, keys: KeyStore | None, key: str, group: str, acked: list[int]) -> None:
    cipher = None if keys is None else GroupCipher(keys, f"{key}/{group}")
    glog, _state = GroupLog.open(data / "groups" / key / f"{group}.glog", cipher=cipher)
    entries: list[JournalEntry] = []
    for off in acked:
        entries += [Start(off), Lease(off, 1), Ack(off, 1)]
    glog.append(entries)
    glog.sync()
    glog.close()


def _read_log(
    data: Path, keys: KeyStore | None, key: str
) -> list[tuple[int, int, dict[str, str] | None, bytes, int | None]]:
    log = DiskLog.open(data / "streams" / key, DiskLogSettings(), first_offset=0)
    out = []
    try:
        for rec in log.read(0, 1 << 30, 1 << 40):
            headers, body = decode_record(rec.payload, key, rec.offset, rec.timestamp_us, keys)
            out.append((rec.offset, rec.timestamp_us, headers, body, encrypted_key_id(rec.payload)))
        assert log.next_offset >= 0
    finally:
        log.close()
    return out


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "felix.lock"
    }


@pytest.fixture
def moved(tmp_path: Path) -> dict[str, object]:
    """A source (n0) with a shard of two encrypted streams and a plaintext one, a group;
    a target (n1) with its own region key; the archive of the shard."""
    src, src_keys = _node_dir(tmp_path, "n0")
    dst, _dst_keys = _node_dir(tmp_path, "n1")
    key = _stream_on_shard(3)
    dlq = key + ".dlq"
    plain = _stream_on_shard(3, "plain")
    other = _stream_on_shard(4)
    written = {
        key: _write_log(src, src_keys, key, 300),
        dlq: _write_log(src, src_keys, dlq, 5, start=100),
        plain: _write_log(src, None, plain, 20, word="clear"),
        other: _write_log(src, src_keys, other, 5),
    }
    _write_group(src, src_keys, key, "g", [o for o, *_ in written[key][:100]])
    archive = tmp_path / "shard3.tar"
    report = export_shard(src, 3, archive)
    return {"src": src, "dst": dst, "key": key, "dlq": dlq, "plain": plain, "other": other,
            "written": written, "archive": archive, "report": report, "tmp": tmp_path}  # fmt: skip


def test_a_shard_moves_between_data_dirs_of_two_region_keys(moved: dict[str, object]) -> None:
    src, dst, archive = moved["src"], moved["dst"], moved["archive"]
    assert isinstance(src, Path) and isinstance(dst, Path) and isinstance(archive, Path)
    key, dlq, plain, other = (str(moved[k]) for k in ("key", "dlq", "plain", "other"))
    written = moved["written"]
    assert isinstance(written, dict)
    manifest = moved["report"].manifest  # type: ignore[attr-defined]
    assert [s.key for s in manifest.streams] == sorted([key, dlq, plain])
    assert manifest.tenants == {TENANT: KeyStore(src / KEYS_DIR, None).read_table(TENANT).kek}  # type: ignore[union-attr]
    src_before = _tree(src)

    # The archive holds nothing decrypted: no body of an encrypted record appears in it.
    blob = archive.read_bytes()
    assert b"record 12 " not in blob and b"clear 12 " in blob
    with pytest.raises(ShardArchiveError, match="--source-region-key"):
        import_shard(archive, dst)
    wrong = moved["tmp"] / "wrong.key"  # type: ignore[operator]
    generate_key_file(wrong)
    with pytest.raises(ShardArchiveError, match=r"is region key .*, but the archive's data keys"):
        import_shard(archive, dst, source_region_key=wrong)
    assert not (dst / "streams").exists()

    started = time.monotonic()
    done = import_shard(archive, dst, source_region_key=src / KEYS_DIR / "region.key")
    print(f"\nimported {done.records} records in {time.monotonic() - started:.3f}s")
    assert (done.streams, done.records, done.groups) == (3, 325, 1)
    assert done.reencrypted == 305
    assert _tree(src) == src_before  # the export only read the source

    dst_keys = KeyStore(dst / KEYS_DIR, FileKeyEncryptionKey.load(dst / KEYS_DIR / "region.key"))
    for stream in (key, dlq, plain):
        got = _read_log(dst, dst_keys, stream)
        assert [(o, t, h, b) for o, t, h, b, _k in got] == written[stream]
        kinds = {k for *_, k in got}
        assert kinds == ({None} if stream == plain else {1})  # the target's first data key
    assert not (dst / "streams" / other).exists()
    # Segment bases are the source's: the log continues exactly where it did.
    for stream in (key, dlq):
        assert sorted(p.name for p in (dst / "streams" / stream).glob("*.seg")) == sorted(
            p.name for p in (src / "streams" / stream).glob("*.seg")
        )
    last = written[key][-1][0]
    log = DiskLog.open(dst / "streams" / key, DiskLogSettings(), first_offset=0)
    assert log.next_offset == last + 1
    log.close()
    # The group's state is the same, decrypted with the target's keys now.
    state = decode_file(dst / "groups" / key / "g.glog", GroupCipher(dst_keys, f"{key}/g"))
    assert state.encrypted
    assert state.state().acked == 100
    assert state.state().floor == written[key][99][0] + 1
    src_keys = KeyStore(src / KEYS_DIR, FileKeyEncryptionKey.load(src / KEYS_DIR / "region.key"))
    with pytest.raises(KeyUnavailable, match="does not authenticate"):
        decode_file(dst / "groups" / key / "g.glog", GroupCipher(src_keys, f"{key}/g"))
    # Nothing staged is left behind.
    assert not list((dst / "streams").rglob(".import.*"))
    assert not list((dst / "groups").rglob("*.import"))
    assert not (dst / PENDING_FILE).exists()

    # A second import refuses: the streams hold records here now (each named).
    with pytest.raises(ShardArchiveError, match=rf"{key}.*already|already holds records of stream"):
        import_shard(archive, dst, source_region_key=src / KEYS_DIR / "region.key")


def test_one_region_key_for_both_needs_no_source_key(tmp_path: Path) -> None:
    shared = tmp_path / "region.key"
    generate_key_file(shared)
    src, src_keys = _node_dir(tmp_path, "n0", shared)
    dst, dst_keys = _node_dir(tmp_path, "n1", shared)
    key = _stream_on_shard(5)
    written = _write_log(src, src_keys, key, 40)
    export_shard(src, 5, tmp_path / "a.tar")
    # The target already wrote data of the tenant: its own data key 1 (another key than
    # the source's key 1) is the one the records are sealed with.
    _write_log(dst, dst_keys, _stream_on_shard(6), 3)
    done = import_shard(tmp_path / "a.tar", dst, region_key=shared)
    assert done.reencrypted == 40
    got = _read_log(dst, dst_keys, key)
    assert [(o, t, h, b) for o, t, h, b, _k in got] == written
    # The target's keys read them; the source's key 1 (same id, another key) does not.
    with pytest.raises(Exception, match="does not authenticate"):
        _read_log(dst, src_keys, key)


def test_an_empty_stream_and_its_fresh_group_at_the_target_are_replaced(tmp_path: Path) -> None:
    src, src_keys = _node_dir(tmp_path, "n0")
    dst, dst_keys = _node_dir(tmp_path, "n1")
    key = _stream_on_shard(7)
    _write_log(src, src_keys, key, 30)
    _write_group(src, src_keys, key, "g", [0, 1, 2])
    export_shard(src, 7, tmp_path / "a.tar")
    # The target had the stream defined (an empty log at its own start offset) and two
    # groups on it (empty state files).
    DiskLog.open(dst / "streams" / key, DiskLogSettings(), first_offset=1 << 20).close()
    _write_group(dst, dst_keys, key, "g", [])
    _write_group(dst, dst_keys, key, "h", [])
    import_shard(tmp_path / "a.tar", dst, source_region_key=src / KEYS_DIR / "region.key")
    assert len(_read_log(dst, dst_keys, key)) == 30
    assert sorted(p.name for p in (dst / "groups" / key).iterdir()) == ["g.glog"]
    state = decode_file(dst / "groups" / key / "g.glog", GroupCipher(dst_keys, f"{key}/g"))
    assert state.state().acked == 3
    assert not [p for p in (dst / "streams").rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_a_damaged_archive_is_refused_and_writes_nothing(
    moved: dict[str, object], damage: str
) -> None:
    src, dst, archive = moved["src"], moved["dst"], moved["archive"]
    assert isinstance(src, Path) and isinstance(dst, Path) and isinstance(archive, Path)
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        seg = next(m for m in tar.getmembers() if m.name.endswith(".seg") and m.size > 200)
    if damage == "flip":
        data[seg.offset_data + 150] ^= 0x01
        expected = "does not match its checksum"
    elif damage == "truncate":
        data = data[: seg.offset_data + 100]
        expected = "truncated|not a whole shard archive"
    else:
        at = data.index(b'"format": "felix-shard-archive"')
        data[at + 11 : at + 12] = b"F"
        expected = "not a felix-shard-archive"
    archive.write_bytes(bytes(data))
    before = _tree(dst)
    with pytest.raises(ShardArchiveError, match=expected):
        import_shard(archive, dst, source_region_key=src / KEYS_DIR / "region.key")
    assert _tree(dst) == before


def test_a_running_node_is_refused(moved: dict[str, object]) -> None:
    src, dst, archive = moved["src"], moved["dst"], moved["archive"]
    assert isinstance(src, Path) and isinstance(dst, Path) and isinstance(archive, Path)
    lock = DataDirLock.acquire(dst)
    try:
        with pytest.raises(ShardArchiveError, match="in use by another felix node"):
            import_shard(archive, dst, source_region_key=src / KEYS_DIR / "region.key")
    finally:
        lock.release()
    info = json.loads((src / "node.json").read_text())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (src / "node.json").write_text(json.dumps({**info, "pid": child.pid}))
        with pytest.raises(ShardArchiveError, match=rf"pid {child.pid}, which is alive"):
            export_shard(src, 3, archive.with_name("again.tar"))
    finally:
        child.kill()
        child.wait()
    assert not archive.with_name("again.tar").exists()
    with pytest.raises(ShardArchiveError, match="exists"):
        export_shard(src, 3, archive)
    with pytest.raises(ShardArchiveError, match="no durable records of logical shard 9"):
        export_shard(src, 9, archive.with_name("nine.tar"))


def test_an_interrupted_import_is_finished_and_blocks_felix_up(
    moved: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst, archive = moved["src"], moved["dst"], moved["archive"]
    assert isinstance(src, Path) and isinstance(dst, Path) and isinstance(archive, Path)
    key = str(moved["key"])
    # What a crash right after the pending record leaves: staged files and the record
    # (the second call of finish_pending is the one making the renames).
    import felix.cluster.shard_import as imp

    calls: list[Path] = []

    def crash_after_record(data_dir: Path) -> dict[str, object] | None:
        calls.append(data_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish_pending(data_dir)

    monkeypatch.setattr(imp, "finish_pending", crash_after_record)
    with pytest.raises(KeyboardInterrupt):
        import_shard(archive, dst, source_region_key=src / KEYS_DIR / "region.key")
    monkeypatch.undo()
    assert (dst / PENDING_FILE).exists()
    assert not (dst / "streams" / key).exists()
    with pytest.raises(ConfigError, match="interrupted"):
        check_no_pending_import(dst)
    up = subprocess.run(
        [sys.executable, "-m", "felix.cli", "up", "--data-dir", str(dst), "--listen",
         "127.0.0.1:0", "--http", "127.0.0.1:0", "--control", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert up.returncode == 2 and "import-shard again" in up.stderr, up.stderr
    # The next import of the same archive finishes it and is done.
    done = import_shard(archive, dst, source_region_key=src / KEYS_DIR / "region.key")
    assert done.finished is not None and done.already_done
    check_no_pending_import(dst)
    assert (dst / "streams" / key).is_dir() and (dst / "groups" / key / "g.glog").is_file()
    # A pending record survives a crash of its own: every step is redone or skipped.
    write_pending(dst, "x", 3, [["move", "nowhere/.import.a", "nowhere/a"]])
    assert finish_pending(dst) is not None and not (dst / PENDING_FILE).exists()


# -- the manifest checked against itself and the target -----------------------------------


def _rewrite(archive: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """The archive again with its manifest changed by ``edit`` (the other members as
    they were): what someone relabelling an archive would make."""
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    out = archive.with_name("rewritten.tar")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name == "manifest.json":
                doc = json.loads(data)
                edit(doc)
                data = json.dumps(doc).encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out.replace(archive)


def _src_key(moved: dict[str, object]) -> Path:
    src = moved["src"]
    assert isinstance(src, Path)
    return src / KEYS_DIR / "region.key"


def test_an_archive_relabelled_as_another_shard_is_refused(moved: dict[str, object]) -> None:
    dst, archive = moved["dst"], moved["archive"]
    assert isinstance(dst, Path) and isinstance(archive, Path)
    _rewrite(archive, lambda doc: doc.update(shard=4))
    before = _tree(dst)
    with pytest.raises(ShardArchiveError, match=r"is of logical shard 3 \(of 16\), not of shard 4"):
        import_shard(archive, dst, source_region_key=_src_key(moved))
    assert _tree(dst) == before


def test_a_stream_listed_twice_is_refused(moved: dict[str, object]) -> None:
    dst, archive = moved["dst"], moved["archive"]
    assert isinstance(dst, Path) and isinstance(archive, Path)
    _rewrite(archive, lambda doc: doc["streams"].append(doc["streams"][0]))
    with pytest.raises(ShardArchiveError, match="is listed twice"):
        import_shard(archive, dst, source_region_key=_src_key(moved))
    assert not (dst / "streams").exists()


def test_an_archive_of_another_region_is_refused_with_exit_2(tmp_path: Path) -> None:
    shared = tmp_path / "region.key"
    generate_key_file(shared)
    src, src_keys = _node_dir(tmp_path, "n0", shared, region="eu-west")
    other, _ = _node_dir(tmp_path, "n1", shared, region="us-east")
    dst, _ = _node_dir(tmp_path, "n2", shared, region="eu-west")
    key = _stream_on_shard(5)
    _write_log(src, src_keys, key, 40)
    archive = tmp_path / "a.tar"
    export_shard(src, 5, archive)
    with pytest.raises(RegionMismatch, match=r"region eu-west .*region us-east"):
        import_shard(archive, other, region_key=shared)
    assert not (other / "streams").exists()
    # A data dir whose node.json does not say: its region must be given.
    (dst / "node.json").write_text(json.dumps({"cluster": {"node_id": "n2"}}))
    with pytest.raises(ShardArchiveError, match="pass --region"):
        import_shard(archive, dst, region_key=shared)

    cli = [sys.executable, "-m", "felix.cli", "cluster", "import-shard", str(archive)]
    env = {**os.environ, REGION_KEY_ENV: str(shared)}
    refused = subprocess.run(
        [*cli, "--data-dir", str(other)], capture_output=True, text=True, env=env, timeout=60
    )
    assert refused.returncode == 2, refused.stderr
    assert "eu-west" in refused.stderr and "us-east" in refused.stderr
    done = subprocess.run(
        [*cli, "--data-dir", str(dst), "--region", "eu-west"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert f"archive sha256 {sha}" in done.stdout and "from node n0" in done.stdout, done.stdout


def test_an_import_records_where_the_data_came_from(moved: dict[str, object]) -> None:
    src, dst, archive = moved["src"], moved["dst"], moved["archive"]
    assert isinstance(src, Path) and isinstance(dst, Path) and isinstance(archive, Path)
    (src / "cluster-data-id").write_text("d-1234\n")  # as a cluster node writes it
    again = archive.with_name("again.tar")
    export_shard(src, 3, again)
    done = import_shard(again, dst, source_region_key=_src_key(moved))
    record = json.loads((dst / IMPORTS_DIR / "3.json").read_text())
    assert record == done.provenance
    with tarfile.open(again) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest["source"] == {
        "region": REGION, "node_id": "n0", "data_id": "d-1234",
        "region_key": FileKeyEncryptionKey.load(_src_key(moved)).key_id,
    }  # fmt: skip
    assert {k: record[k] for k in ("shard", "region", "source_node_id", "source_data_id")} == {
        "shard": 3, "region": REGION, "source_node_id": "n0", "source_data_id": "d-1234",
    }  # fmt: skip
    assert record["exported_us"] == manifest["created_us"]
    assert record["archive_sha256"] == hashlib.sha256(again.read_bytes()).hexdigest()
    assert not [p for p in (dst / IMPORTS_DIR).iterdir() if p.name.startswith(".")]


def test_other_streams_of_the_shard_at_the_target_need_force(moved: dict[str, object]) -> None:
    dst, archive = moved["dst"], moved["archive"]
    assert isinstance(dst, Path) and isinstance(archive, Path)
    stale = _stream_on_shard(3, "stale")
    _write_log(dst, None, stale, 3)
    _write_log(dst, None, _stream_on_shard(4, "fine"), 3)  # another shard: no matter
    with pytest.raises(ShardArchiveError, match=rf"other streams of logical shard 3.*{stale}"):
        import_shard(archive, dst, source_region_key=_src_key(moved))
    assert not (dst / "streams" / str(moved["key"])).exists()
    done = import_shard(archive, dst, source_region_key=_src_key(moved), force_extra_streams=True)
    assert done.streams == 3 and len(_read_log(dst, None, stale)) == 3


# -- where the log continues -----------------------------------------------------------


def test_the_log_continues_above_offsets_a_crash_lost(tmp_path: Path) -> None:
    """fsync interval: records written (acked, maybe delivered) but not synced are lost
    by a power cut. The source would continue above its reservation mark; so does the
    target after the move, and never issues those offsets again."""
    src, _ = _node_dir(tmp_path, "n0")
    dst, _ = _node_dir(tmp_path, "n1")
    info = json.loads((src / "node.json").read_text())
    (src / "node.json").write_text(json.dumps({**info, "topology": {"shards": 1}}))
    key = durable.KEY
    shard = logical_shard(key, L)
    c = durable.make(src, fsync="interval")
    durable.publish(c, [b"a", b"b"])
    store = durable.store_of(c)
    store.due(1.0)
    (stream,) = store.take_syncs()
    c.sync_done(stream, stream.log.sync(), 0.001)
    seg = next((src / "streams" / key).glob("*.seg"))
    synced = seg.stat().st_size
    lost = durable.publish(c, [b"lost1", b"lost2"], token=2)  # acked, never synced
    assert lost.base_offset == 2
    os.truncate(seg, synced)  # the power cut

    report = export_shard(src, shard, tmp_path / "a.tar")
    (s,) = report.manifest.streams
    assert (s.records, s.next_offset) == (2, durable.BLOCK)
    import_shard(tmp_path / "a.tar", dst)
    log = DiskLog.open(dst / "streams" / key, DiskLogSettings(), first_offset=0)
    assert log.next_offset == durable.BLOCK
    log.close()
    # A shard started on the target continues there: offsets 2 and 3 are never reused.
    c2 = durable.make(dst, fsync="interval")
    assert durable.publish(c2, [b"e"]).base_offset == durable.BLOCK
    offsets, payloads, _gaps = durable.consume(c2, 0)
    assert offsets == [0, 1, durable.BLOCK] and payloads == [b"a", b"b", b"e"]


def test_reserved_offsets_are_read_as_a_node_would(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    # a and c of node shard 0, b of node shard 1 (of 2)
    names = [f"t/n/s{i}" for i in range(100)]
    a, c = [k for k in names if ipc.shard_for(k, 2) == 0][:2]
    b = next(k for k in names if ipc.shard_for(k, 2) == 1)
    OffsetReservations(data / "shard-0.offsets", block=100).ensure(a, 150)
    r1 = OffsetReservations(data / "shard-1.offsets", block=100)
    r1.ensure(b, 50)
    r1.ensure(b, 120)
    for _ in range(3):  # restarts: the floor of shard 1 rises
        OffsetReservations(data / "shard-1.offsets", block=100)
    (data / "node.json").write_text(json.dumps({"topology": {"shards": 2}}))
    before = _tree(data)
    got = reserved_offsets(data, [a, b, c])
    assert _tree(data) == before  # only read
    # What a node opening these files starts each stream at (c: at its shard's floor).
    node = [OffsetReservations(data / f"shard-{i}.offsets") for i in (0, 1)]
    for key, shard in ((a, 0), (b, 1), (c, 0)):
        assert node[shard].start_offset(key) == got[key], key
    assert got[a] >= 150 and got[b] >= 120
    # Without the topology: the highest of every file. A damaged main file: its .bak
    # plus two blocks, as a node recovers it.
    (data / "node.json").unlink()
    floors = [OffsetReservations(data / f"shard-{i}.offsets").base for i in (0, 1)]
    assert reserved_offsets(data, [c])[c] == max(floors) + 1_048_576  # opened once more
    (data / "shard-1.offsets").write_bytes(b"garbage")
    got = reserved_offsets(data, [b])
    assert got[b] == OffsetReservations(data / "shard-1.offsets").start_offset(b) > 120


# -- bounds on what an archive makes the importer read ----------------------------------


def test_member_headers_are_bounded(
    moved: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    dst, archive = moved["dst"], moved["archive"]
    assert isinstance(dst, Path) and isinstance(archive, Path)
    import felix.cluster.shard_import as imp

    monkeypatch.setattr(imp, "MAX_FILES", 3)
    with pytest.raises(ShardArchiveError, match="more than 4 members"):
        import_shard(archive, dst, source_region_key=_src_key(moved))
    monkeypatch.undo()
    # A pax header larger than any felix writes is refused before tarfile reads it.
    huge = archive.with_name("huge.tar")
    info = tarfile.TarInfo("streams/x")
    info.pax_headers = {"comment": "x" * (128 << 10)}
    with tarfile.open(huge, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ShardArchiveError, match=r"extended tar header of .* bytes at byte 0"):
        import_shard(huge, dst)
    # A member name twice.
    twice = archive.with_name("twice.tar")
    with tarfile.open(twice, "w") as tar:
        for _ in range(2):
            tar.addfile(tarfile.TarInfo("manifest.json"), io.BytesIO(b""))
    with pytest.raises(ShardArchiveError, match="appears twice"):
        import_shard(twice, dst)
    assert not (dst / "streams").exists()


def test_a_manifest_beyond_16_mib_is_refused(tmp_path: Path) -> None:
    dst, _ = _node_dir(tmp_path, "n1")
    archive = tmp_path / "big.tar"
    body = json.dumps({"format": "felix-shard-archive", "pad": "x" * (16 << 20)}).encode()
    info = tarfile.TarInfo("manifest.json")
    info.size = len(body)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(body))
    with pytest.raises(ShardArchiveError, match=f"manifest.json is larger than {16 << 20}"):
        import_shard(archive, dst)


def test_group_files_are_bounded(moved: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    dst, archive = moved["dst"], moved["archive"]
    assert isinstance(dst, Path) and isinstance(archive, Path)
    import felix.cluster.shard_import as imp

    # The archive's group file is a few KiB: with a bound below that it is refused.
    monkeypatch.setattr(imp, "MAX_GROUP_FILE_BYTES", 1024)
    before = _tree(dst)
    with pytest.raises(ShardArchiveError, match=r"g\.glog is larger than 1024 bytes"):
        import_shard(archive, dst, source_region_key=_src_key(moved))
    # Nothing staged is left (only the tenant's data key, made as a first write would).
    after = {k: v for k, v in _tree(dst).items() if not k.startswith("keys/")}
    before = {k: v for k, v in before.items() if not k.startswith("keys/")}
    assert after == before


def test_the_group_file_bound_holds_the_widest_snapshot() -> None:
    """Per entry, what the bound allows is what the encoder writes at most (the widest
    reason and a detail at the engine's limit), so MAX_SPAN such entries fit."""
    span = 2000
    entries = {
        off: Entry(EntryState.DYING, 1000, 999, 2**62, "max_deliveries", "é" * 512)
        for off in range(span)
    }
    body = encode_file(GroupSnapshot(0, span, entries), None)
    per_entry = (len(body) - 16) / span
    assert per_entry * MAX_SPAN <= MAX_SNAPSHOT_BYTES
    assert 6 * MAX_SNAPSHOT_BYTES < MAX_FILE_BYTES < 8 << 30


def test_group_state_beyond_the_log_is_refused(tmp_path: Path) -> None:
    src, _ = _node_dir(tmp_path, "n0")
    dst, _ = _node_dir(tmp_path, "n1")
    key = _stream_on_shard(7)
    written = _write_log(src, None, key, 20)
    assert written[-1][0] < 100
    _write_group(src, None, key, "g", list(range(200)))  # acks up to 199
    export_shard(src, 7, tmp_path / "a.tar")
    with pytest.raises(ShardArchiveError, match=r"group g .* up to 199, but the stream continues"):
        import_shard(tmp_path / "a.tar", dst)
    assert not (dst / "streams").exists() or not list((dst / "streams").rglob("*.seg"))


# -- the export's own checks and its file ---------------------------------------------------


def test_an_export_refuses_a_data_dir_with_an_interrupted_import(
    moved: dict[str, object],
) -> None:
    src = moved["src"]
    assert isinstance(src, Path)
    write_pending(src, "x", 3, [])
    with pytest.raises(ShardArchiveError, match=rf"interrupted \({src / PENDING_FILE}\)"):
        export_shard(src, 3, src.parent / "b.tar")
    assert not (src.parent / "b.tar").exists()


def test_the_export_file_is_made_safely(
    moved: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = moved["src"]
    assert isinstance(src, Path)
    out = src.parent / "b.tar"
    # What an export in another container (the same pid) or a killed one left behind.
    leftover = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    leftover.write_bytes(b"partial")
    export_shard(src, 3, out)
    assert leftover.read_bytes() == b"partial"
    assert sorted(p.name for p in out.parent.glob(".b.tar.*")) == [leftover.name]

    # A file system without hard links: renamed after a check that nothing is there.
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    out2 = src.parent / "c.tar"
    report = export_shard(src, 3, out2)
    assert out2.stat().st_size == report.bytes
    assert [p.name for p in out.parent.glob(".c.tar.*")] == []
    with pytest.raises(ShardArchiveError, match="exists"):
        export_shard(src, 3, out2)
    # Other errors are reported as they are.
    with pytest.raises(FileNotFoundError):
        export_shard(src, 3, src.parent / "nowhere" / "d.tar")
