"""Encryption at rest, below the node: the region key (KMS interface, file provider),
the per-tenant data key store on real files (wrap/unwrap, tamper detection, atomic
writes, bounds, rotation, several processes), encrypted records and encrypted group
state files, each checked against tests/segfiles.py, the independent reader."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
from pathlib import Path

import pytest

from felix.errors import ConfigError, KeyUnavailable, LogDamaged, Overloaded
from felix.keys.kek import FileKeyEncryptionKey, KeyEncryptionKey, fingerprint, parse_key
from felix.keys.store import KeyStore, KeyTable, data_key_context, resolve_region_key
from felix.shard.disk_read import ReadJob
from felix.shard.durable import DiskSettings, DurableSettings, DurableStore
from felix.shard.log_format import (
    SEALED_OVERHEAD,
    decode_record,
    encode_envelope,
    open_payload,
    seal_batch,
)
from felix.shard.queue import group_log as gl
from felix.shard.queue.group_log import GroupCipher, GroupLog, decode_file
from felix.shard.queue.journal import Dying, Fail, Lease, Start
from tests import segfiles

STREAM = "acme/ns/orders"


def _key_file(path: Path, key: bytes | None = None, *, hexed: bool = True) -> bytes:
    key = key or os.urandom(32)
    path.write_bytes((key.hex() + "\n").encode() if hexed else key)
    path.chmod(0o600)
    return key


def _store(tmp_path: Path, **kw: object) -> KeyStore:
    kek = FileKeyEncryptionKey(b"\x01" * 32, "test")
    return KeyStore(tmp_path / "keys", kek, **kw)  # type: ignore[arg-type]


# -- the region key --------------------------------------------------------------------


def test_a_key_file_holds_32_bytes_raw_or_hex(tmp_path: Path) -> None:
    key = os.urandom(32)
    assert parse_key(key, "f") == key
    assert parse_key(b"  " + key.hex().encode() + b"\n", "f") == key
    for bad in (b"", b"x" * 31, b"zz" * 32, key.hex().encode()[:-1]):
        with pytest.raises(ConfigError, match="32 bytes"):
            parse_key(bad, "f")
    raw = tmp_path / "raw.key"
    _key_file(raw, key, hexed=False)
    loaded = FileKeyEncryptionKey.load(raw)
    assert isinstance(loaded, KeyEncryptionKey)  # the KMS interface
    assert loaded.key_id == fingerprint(key) and len(loaded.key_id) == 16
    assert key.hex() not in loaded.key_id
    with pytest.raises(ConfigError, match="cannot read the region key"):
        FileKeyEncryptionKey.load(tmp_path / "missing.key")


def test_wrap_is_bound_to_its_context_and_detects_tampering() -> None:
    kek = FileKeyEncryptionKey(os.urandom(32), "a")
    data_key = os.urandom(32)
    ctx = data_key_context("acme", 1)
    wrapped = kek.wrap(data_key, ctx)
    assert wrapped != kek.wrap(data_key, ctx)  # a random nonce each time
    assert data_key not in wrapped
    assert kek.unwrap(wrapped, ctx) == data_key
    for other in (data_key_context("evil", 1), data_key_context("acme", 2)):
        with pytest.raises(KeyUnavailable, match="wrapped by another key or altered"):
            kek.unwrap(wrapped, other)  # moved to another tenant or key id
    flipped = bytearray(wrapped)
    flipped[20] ^= 1
    with pytest.raises(KeyUnavailable):
        kek.unwrap(bytes(flipped), ctx)
    with pytest.raises(KeyUnavailable):
        FileKeyEncryptionKey(os.urandom(32), "b").unwrap(wrapped, ctx)


def test_dev_mode_generates_a_key_once_and_never_beside_foreign_data_keys(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    kek, missing = resolve_region_key(data, None, generate=False)
    assert kek is None and "no region key" in (missing or "")
    assert not (data / "keys" / "region.key").exists()
    kek, _ = resolve_region_key(data, None, generate=True)
    assert kek is not None
    path = data / "keys" / "region.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (data / "keys").stat().st_mode & 0o777 == 0o700
    again, _ = resolve_region_key(data, None, generate=True)
    assert again is not None and again.key_id == kek.key_id  # reused, not replaced
    KeyStore(data / "keys", kek).current("acme")
    path.unlink()  # the key is lost: data keys are there, wrapped by it
    kek, missing = resolve_region_key(data, None, generate=True)
    assert kek is None and "holds data keys" in (missing or "")
    assert not path.exists()  # never a new key beside data keys another one wrapped
    given = tmp_path / "given.key"
    _key_file(given)
    kek, _ = resolve_region_key(data, given, generate=True)
    assert kek is not None and kek.source == str(given)


# -- the data key store ------------------------------------------------------------------


def test_a_tenant_gets_one_data_key_written_atomically_and_wrapped(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.keys("acme") is None  # reading creates nothing
    key_id, aead = store.current("acme")
    assert key_id == 1 and store.current("acme")[1] is aead  # one cipher, cached
    path = tmp_path / "keys" / "tenants" / "acme.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["acme.json"]  # no temp left
    doc = json.loads(path.read_text())
    assert (doc["tenant"], doc["current"], doc["kek"]) == ("acme", 1, store.kek.key_id)  # type: ignore[union-attr]
    region = json.loads((tmp_path / "keys" / "region.json").read_text())
    assert region["kek"] == store.kek.key_id  # type: ignore[union-attr]
    # A second store (another shard process) reads the same key.
    other = _store(tmp_path)
    nonce = os.urandom(12)
    assert other.aead("acme", 1).decrypt(nonce, aead.encrypt(nonce, b"x", b""), b"") == b"x"
    # The independent reader unwraps it the same way.
    keys = segfiles.data_keys(tmp_path, b"\x01" * 32)
    assert set(keys) == {("acme", 1)}


def test_a_stale_temp_file_is_removed_and_never_read(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tenants = tmp_path / "keys" / "tenants"
    tenants.mkdir(parents=True)
    (tenants / ".acme.json.999.tmp").write_bytes(b"half a key file")  # a writer that died
    store.current("acme")
    assert sorted(p.name for p in tenants.iterdir()) == ["acme.json"]
    assert store.tenants() == ["acme"]


def test_tampered_or_misplaced_key_files_refuse_with_a_clear_error(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.current("acme")
    store.current("beta")
    tenants = tmp_path / "keys" / "tenants"
    acme = json.loads((tenants / "acme.json").read_text())
    beta = json.loads((tenants / "beta.json").read_text())
    # beta's wrapped key copied into acme's file: it does not unwrap for acme.
    acme["keys"][0]["wrapped"] = beta["keys"][0]["wrapped"]
    (tenants / "acme.json").write_text(json.dumps(acme))
    fresh = _store(tmp_path)
    with pytest.raises(KeyUnavailable, match="does not unwrap"):
        fresh.current("acme")
    assert "does not unwrap" in (fresh.problem("acme") or "")
    (tenants / "beta.json").write_text("{not json")
    with pytest.raises(KeyUnavailable, match="damaged"):
        _store(tmp_path).keys("beta")
    # Another region key: named, with the fix.
    other = KeyStore(tmp_path / "keys", FileKeyEncryptionKey(b"\x02" * 32, "other.key"))
    with pytest.raises(KeyUnavailable, match=r"region key is \w+ \(other.key\), but .* wrapped by"):
        other.current("gamma")  # no new data key under a second region key either
    assert "region key mismatch" in (other.check() or "")
    none = KeyStore(tmp_path / "keys", None, missing="no region key was given")
    with pytest.raises(KeyUnavailable, match="no region key was given"):
        none.keys("acme")


def test_rotating_a_tenant_key_keeps_old_keys_and_a_running_store_sees_it(
    tmp_path: Path,
) -> None:
    clock = [0.0]
    running = _store(tmp_path, clock=lambda: clock[0])
    assert running.current("acme")[0] == 1
    admin = _store(tmp_path)
    assert admin.rotate_tenant("acme") == 2
    assert running.current("acme")[0] == 1  # not yet seen
    running.refresh()  # the shard's once-a-second housekeeping
    assert running.current("acme")[0] == 2
    assert running.aead("acme", 1) is not None  # old records stay readable
    assert admin.rotate_tenant("acme") == 3
    clock[0] += 5
    assert running.aead("acme", 3) is not None  # an unknown id rereads the file
    with pytest.raises(KeyUnavailable, match="data key 9 of tenant acme is not in"):
        running.aead("acme", 9)


def test_bounds_on_tenants_and_keys_per_tenant(tmp_path: Path) -> None:
    store = _store(tmp_path, max_tenants=2, max_keys=3)
    store.current("a")
    store.current("b")
    with pytest.raises(Overloaded, match="maximum of 2 tenants"):
        store.current("c")
    with pytest.raises(Overloaded):  # refused without listing the directory again
        store.current("d")
    assert store.tenants() == ["a", "b"]
    assert store.rotate_tenant("a") == 2
    assert store.rotate_tenant("a") == 3
    with pytest.raises(ConfigError, match="maximum"):
        store.rotate_tenant("a")
    with pytest.raises(KeyUnavailable, match="invalid tenant"):
        store.current("../etc")


def test_region_key_rotation_rewraps_and_resumes_after_a_crash(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ciphers = {t: store.current(t)[1] for t in ("a", "b", "c")}
    nonce = os.urandom(12)
    sealed = {t: c.encrypt(nonce, t.encode(), b"") for t, c in ciphers.items()}
    new = FileKeyEncryptionKey(b"\x03" * 32, "new.key")
    # A crash halfway: "a" rewrapped, the record names the rotation.
    half = _store(tmp_path)
    table = half.read_table("a")
    assert table is not None
    keys = [
        k.__class__(
            k.id,
            k.created_us,
            new.wrap(
                half.kek.unwrap(k.wrapped, data_key_context("a", k.id)),  # type: ignore[union-attr]
                data_key_context("a", k.id),
            ),
        )
        for k in table.keys
    ]
    (tmp_path / "keys" / "tenants" / "a.json").write_bytes(
        KeyTable("a", new.key_id, table.current, tuple(keys)).to_bytes()
    )
    half._write_region(half.kek.key_id, new.key_id)  # type: ignore[union-attr]
    assert "rotation" not in (half.check() or "")  # the old key still serves b and c
    done, already = _store(tmp_path).rewrap(new)
    assert (done, already) == (2, 1)
    rotated = KeyStore(tmp_path / "keys", new)
    assert rotated.check() is None
    for t in ("a", "b", "c"):  # the same data keys: old data reads, nothing rewritten
        assert rotated.aead(t, 1).decrypt(nonce, sealed[t], b"") == t.encode()
    assert "region key mismatch" in (_store(tmp_path).check() or "")
    assert rotated.rewrap(new) == (0, 3)  # idempotent once done


def _create_in_child(root: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = KeyStore(Path(root), FileKeyEncryptionKey(b"\x01" * 32, "test"))
    _key_id, aead = store.current("acme")
    nonce = b"\x00" * 12
    out.put(aead.encrypt(nonce, b"probe", b""))


def test_shard_processes_creating_a_tenant_key_at_once_agree_on_one(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_create_in_child, args=(str(tmp_path / "keys"), out)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    results = {out.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(results) == 1  # every process encrypted with the same data key


# -- encrypted records ----------------------------------------------------------------------


def test_records_are_sealed_to_their_stream_offset_and_time(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key_id, aead = store.current("acme")
    env = encode_envelope({"secret-header": "SECRET-VALUE"}, b"SECRET BODY")
    sealed = seal_batch([(7, 1000, env), (8, 1001, env)], STREAM, key_id, aead)
    p7, p8 = sealed[0][2], sealed[1][2]
    assert p7 != p8 and len(p7) == len(env) + SEALED_OVERHEAD
    assert p7[0] == 1 and struct.unpack_from(">I", p7, 1)[0] == key_id
    for blob in (p7, p8):
        assert b"SECRET" not in blob
    assert decode_record(p7, STREAM, 7, 1000, store) == (
        {"secret-header": "SECRET-VALUE"},
        b"SECRET BODY",
    )
    # The independent reader opens it from the specification.
    keys = segfiles.data_keys(tmp_path, b"\x01" * 32)
    rec = segfiles.Rec(7, 1000, p7)
    assert segfiles.decode_record(rec, STREAM, keys) == (
        1,
        {"secret-header": "SECRET-VALUE"},
        b"SECRET BODY",
    )
    # Moved to another offset, time or stream, or altered: refused, never garbage.
    for stream, offset, ts in ((STREAM, 8, 1000), (STREAM, 7, 1001), ("acme/ns/other", 7, 1000)):
        with pytest.raises(KeyUnavailable, match="does not authenticate"):
            open_payload(p7, stream, offset, ts, store)
    flipped = bytearray(p7)
    flipped[-1] ^= 0x40
    with pytest.raises(KeyUnavailable):
        open_payload(bytes(flipped), STREAM, 7, 1000, store)
    with pytest.raises(KeyUnavailable, match="no keys"):
        decode_record(p7, STREAM, 7, 1000, None)
    # Plain records (written before encryption, or with it off) decode as always.
    assert decode_record(env, STREAM, 9, 0, None) == (
        {"secret-header": "SECRET-VALUE"},
        b"SECRET BODY",
    )


# -- encrypted group state ----------------------------------------------------------------


def _cipher(store: KeyStore, *, encrypt: bool = True, group: str = "workers") -> GroupCipher:
    return GroupCipher(store, f"{STREAM}/{group}", encrypt=encrypt)


def test_group_state_is_encrypted_and_switches_mode_on_open(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path = tmp_path / "groups" / "acme" / "ns" / "orders" / "workers.glog"
    secret = "SECRET FAILURE REASON from consumer-7"
    # Written plain first (encryption off, or before it existed).
    log, _ = GroupLog.open(path)
    log.append([Start(0), Lease(0, 1), Fail(0, 1, 0, secret)])
    log.close()
    assert secret.encode() in path.read_bytes()
    # Opened with encryption on: rewritten encrypted at once, the state kept.
    log, state = GroupLog.open(path, cipher=_cipher(store))
    assert state.entries[0].detail == secret
    log.append([Dying(0, "max_deliveries", secret)])
    log.close()
    raw = path.read_bytes()
    assert b"SECRET" not in raw and b"consumer-7" not in raw
    assert struct.unpack_from(">H", raw, 6)[0] == gl.FLAG_ENCRYPTED
    with pytest.raises(KeyUnavailable, match="encrypted and no data keys"):
        decode_file(path)
    decoded = decode_file(path, _cipher(store))
    assert decoded.encrypted and decoded.state().entries[0].reason == "max_deliveries"
    # Frames copied from another group's file do not decrypt there.
    with pytest.raises(KeyUnavailable, match="does not authenticate"):
        decode_file(path, _cipher(store, group="other"))
    # A flipped bit with its CRC fixed up (not a torn write): refused, file unchanged.
    data = bytearray(raw)
    pos = gl.FILE_HEADER_SIZE
    length = struct.unpack_from(">I", data, pos)[0]
    data[pos + 20] ^= 1
    struct.pack_into(
        ">I", data, pos + 4, __import__("zlib").crc32(bytes(data[pos + 8 : pos + 8 + length]))
    )
    path.write_bytes(bytes(data))
    with pytest.raises(KeyUnavailable):
        GroupLog.open(path, cipher=_cipher(store))
    assert path.read_bytes() == bytes(data)
    path.write_bytes(raw)
    # Encryption off again: the file is rewritten plain; the state is the same.
    log, state = GroupLog.open(path, cipher=_cipher(store, encrypt=False))
    log.close()
    assert state.entries[0].detail == secret and secret.encode() in path.read_bytes()


def test_an_encrypted_group_file_keeps_recovery_rules(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path = tmp_path / "g" / "acme" / "ns" / "orders" / "workers.glog"
    log, _ = GroupLog.open(path, cipher=_cipher(store))
    log.append([Start(0)])
    log.append([Lease(0, 1)])
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # a torn last frame: cut, the rest kept
    log, state = GroupLog.open(path, cipher=_cipher(store))
    log.close()
    assert log.torn_bytes > 0 and state.next == 0 and not state.entries
    # A tenant rotation: new frames use the new key, old frames still read.
    store.rotate_tenant("acme")
    store.refresh()
    log, _ = GroupLog.open(path, cipher=_cipher(store))
    log.append([Lease(0, 1)])
    log.close()
    assert decode_file(path, _cipher(store)).state().entries[0].attempts == 1
    # Damage before the end is still damage.
    data = bytearray(path.read_bytes())
    data[gl.FILE_HEADER_SIZE + 1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LogDamaged):
        GroupLog.open(path, cipher=_cipher(store))


# -- the shard's durable store ----------------------------------------------------------------


def _durable(root: Path, keys: KeyStore, *, encrypt: bool = True) -> DurableStore:
    return DurableStore(DiskSettings(root=root / "streams", encrypt=encrypt), keys=keys)


def test_the_store_encrypts_appends_and_refuses_what_its_keys_cannot_open(
    tmp_path: Path,
) -> None:
    keys = _store(tmp_path)
    store = _durable(tmp_path, keys)
    stream = store.open(STREAM, DurableSettings(fsync="none"), 0)
    store.check_room(stream, 10)
    store.append(stream, 0, [b"SECRET one", b"SECRET two"], [{"h": "SECRET"}, None], 5, 0.0)
    store.close()
    seg = next((tmp_path / "streams" / "acme" / "ns" / "orders").glob("*.seg"))
    assert b"SECRET" not in seg.read_bytes()
    # Read back through a disk READ job (what a subscriber below the hot tail gets).
    store = _durable(tmp_path, _store(tmp_path))
    stream = store.open(STREAM, DurableSettings(fsync="none"), 0)
    job = ReadJob(stream, 0, 1, 0, 10, 1 << 20)
    job.run()
    assert job.error is None and job.count == 2
    store.close()
    # Another key table with the same ids (a key file from elsewhere): the READ fails
    # with Unavailable naming the record, and the stream is not marked damaged.
    other = KeyStore(tmp_path / "other-keys", keys.kek)
    other.current("acme")
    store = _durable(tmp_path, other)
    stream = store.open(STREAM, DurableSettings(fsync="none"), 0)
    job = ReadJob(stream, 0, 1, 0, 10, 1 << 20)
    job.run()
    assert isinstance(job.error, KeyUnavailable)
    frame = job.reply(None, 0)  # type: ignore[arg-type]  # not used for a key problem
    assert b"does not authenticate" in frame and stream.damaged is None
    store.close()
    # A store without the right region key refuses the publish before writing.
    size = seg.stat().st_size
    wrong = KeyStore(tmp_path / "keys", FileKeyEncryptionKey(b"\x09" * 32, "wrong.key"))
    store = _durable(tmp_path, wrong)
    stream = store.open(STREAM, DurableSettings(fsync="none"), 2)
    with pytest.raises(KeyUnavailable, match=r"wrong\.key"):
        store.check_room(stream, 10)
    assert "wrong.key" in (stream.key_problem() or "")
    with pytest.raises(KeyUnavailable):  # encryption off: its encrypted data is still refused
        _durable(tmp_path, wrong, encrypt=False).check_room(stream, 10)
    store.close()
    assert seg.stat().st_size == size
