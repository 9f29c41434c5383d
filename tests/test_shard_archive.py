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

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from felix.cluster.archive import (
    PENDING_FILE,
    check_no_pending_import,
    finish_pending,
    write_pending,
)
from felix.cluster.ownership import logical_shard
from felix.cluster.shard_export import export_shard
from felix.cluster.shard_import import import_shard
from felix.errors import ConfigError, KeyUnavailable, ShardArchiveError
from felix.keys.kek import FileKeyEncryptionKey, generate_key_file
from felix.keys.store import KEYS_DIR, KeyStore
from felix.node.datadir import DataDirLock
from felix.shard.disklog import DiskLog, DiskLogSettings
from felix.shard.log_format import decode_record, encode_envelope, encrypted_key_id, seal_batch
from felix.shard.queue.group_log import GroupCipher, GroupLog, decode_file
from felix.shard.queue.journal import Ack, JournalEntry, Lease, Start

L = 16
TENANT = "acme"


def _stream_on_shard(shard: int, prefix: str = "orders") -> str:
    for i in range(10_000):
        key = f"{TENANT}/prod/{prefix}{i}"
        if logical_shard(key, L) == shard:
            return key
    raise AssertionError("no name")


def _node_dir(root: Path, name: str, key_file: Path | None = None) -> tuple[Path, KeyStore]:
    """A data dir with a region key (its own dev key unless ``key_file``) and a node.json
    of a stopped cluster node."""
    data = root / name
    data.mkdir()
    if key_file is None:
        kek = generate_key_file(data / KEYS_DIR / "region.key")
    else:
        kek = FileKeyEncryptionKey.load(key_file)
    (data / "node.json").write_text(
        json.dumps({"pid": 2**22 + 12345, "cluster": {"node_id": name, "logical_shards": L}})
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
