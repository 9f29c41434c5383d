"""Per-tenant data keys, wrapped by the region key, beside the data they protect.

Layout (docs/log-format.md, "Keys"), under ``DATA_DIR/keys/`` (mode 0700)::

    region.key            the dev-mode region key (only when none was given; 0600)
    region.json           which region key wrapped the data keys (its fingerprint)
    tenants/<tenant>.json one tenant's data keys, each wrapped by the region key (0600)
    .lock                 flock held while a key file is created or rewritten

A tenant file (JSON)::

    {"format": "felix-data-keys", "version": 1, "tenant": "acme",
     "kek": "<fingerprint of the region key that wrapped these>", "current": 2,
     "keys": [{"id": 1, "created_us": 1733300000000000, "wrapped": "<base64>"}, ...]}

``wrapped`` is the region key's wrap of the 32-byte AES-256-GCM data key, bound to
``"felix data key v1" 0x00 tenant 0x00 u32 id`` (associated data), so a wrapped key
copied to another tenant or id does not unwrap. ``current`` is the key new records
and group frames are encrypted with; older keys stay for reading. Every file is
written atomically (temporary file, fsync, rename, directory fsync) under the lock,
so several shard processes and ``felix keys`` never create two different first keys
for one tenant, and a crash never leaves half a key file.

How a running node sees changes: each shard's store re-reads a tenant file when the
``tenants`` directory changed (checked by :meth:`KeyStore.refresh`, once a second
from the shard's housekeeping), and when a record names a key id it does not know
(at most once a second per tenant). So ``felix keys rotate --tenant`` takes effect
within about a second; records written meanwhile use the previous key, which stays.

Bounds: at most :data:`MAX_TENANTS` tenant files (a new tenant's first durable write
beyond it is refused with Overloaded) and :data:`MAX_KEYS_PER_TENANT` keys per tenant
(a rotation beyond it is refused). Tenants cannot rotate keys; only the operator's
``felix keys rotate`` adds keys. A key file is at most :data:`MAX_FILE_BYTES`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from felix.errors import BadRequest, ConfigError, KeyUnavailable, Overloaded
from felix.keys.kek import (
    KEY_BYTES,
    REGION_KEY_ENV,
    FileKeyEncryptionKey,
    KeyEncryptionKey,
    generate_key_file,
    write_atomic,
)
from felix.names import validate_name

__all__ = [
    "DEV_KEY_FILE",
    "KEYS_DIR",
    "MAX_KEYS_PER_TENANT",
    "MAX_TENANTS",
    "KeyStore",
    "KeyTable",
    "TenantKeys",
    "WrappedKey",
    "data_key_context",
    "resolve_region_key",
    "unwrap_table",
]

log = logging.getLogger("felix.keys")

KEYS_DIR: Final = "keys"
DEV_KEY_FILE: Final = "region.key"
REGION_FILE: Final = "region.json"
TENANTS_DIR: Final = "tenants"
LOCK_FILE: Final = ".lock"
FORMAT: Final = "felix-data-keys"
REGION_FORMAT: Final = "felix-region-key"
VERSION: Final = 1
#: Tenants with data keys on one node (files in ``keys/tenants``).
MAX_TENANTS: Final = 65_536
#: Data keys one tenant may have (each rotation adds one; old ones stay for reading).
MAX_KEYS_PER_TENANT: Final = 1024
#: The largest tenant key file read (1024 keys take about 130 KiB).
MAX_FILE_BYTES: Final = 1 << 20
#: An unknown key id re-reads the tenant's file at most this often (seconds).
RELOAD_INTERVAL: Final = 1.0
_WRAPPED_BYTES: Final = 12 + KEY_BYTES + 16
_U32: Final = struct.Struct(">I")


def data_key_context(tenant: str, key_id: int) -> bytes:
    """Associated data binding a wrapped data key to its tenant and id."""
    return b"felix data key v1\x00" + tenant.encode() + b"\x00" + _U32.pack(key_id)


@dataclass(frozen=True, slots=True)
class WrappedKey:
    id: int
    created_us: int
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class KeyTable:
    """One tenant's key file as stored (nothing unwrapped)."""

    tenant: str
    kek: str
    current: int
    keys: tuple[WrappedKey, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "tenant": self.tenant,
            "kek": self.kek,
            "current": self.current,
            "keys": [
                {
                    "id": k.id,
                    "created_us": k.created_us,
                    "wrapped": base64.b64encode(k.wrapped).decode(),
                }
                for k in self.keys
            ],
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, tenant: str, where: str) -> KeyTable:
        """Parse and check a tenant file (KeyUnavailable naming ``where`` if damaged)."""

        def bad(why: str) -> KeyUnavailable:
            return KeyUnavailable(f"data key file {where} is damaged: {why}")

        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} file")
        if doc.get("version") != VERSION:
            raise bad(f"unsupported version {doc.get('version')!r}")
        if doc.get("tenant") != tenant:
            raise bad(f"it names tenant {doc.get('tenant')!r}, not {tenant!r}")
        kek, current, raw_keys = doc.get("kek"), doc.get("current"), doc.get("keys")
        if not isinstance(kek, str) or not kek:
            raise bad("no region key fingerprint")
        if not isinstance(raw_keys, list) or not 1 <= len(raw_keys) <= MAX_KEYS_PER_TENANT:
            raise bad(f"it must hold 1 to {MAX_KEYS_PER_TENANT} keys")
        keys: list[WrappedKey] = []
        for item in raw_keys:
            if not isinstance(item, dict):
                raise bad("a key entry is not an object")
            kid, created, wrapped = item.get("id"), item.get("created_us"), item.get("wrapped")
            if type(kid) is not int or not 1 <= kid <= 0xFFFFFFFF:
                raise bad(f"key id {kid!r} is not in 1..4294967295")
            if type(created) is not int or created < 0:
                raise bad(f"key {kid}: bad created_us")
            try:
                blob = base64.b64decode(str(wrapped), validate=True)
            except (binascii.Error, ValueError):
                raise bad(f"key {kid}: wrapped is not base64") from None
            if not blob:
                raise bad(f"key {kid}: empty wrapped key")
            keys.append(WrappedKey(kid, created, blob))
        ids = [k.id for k in keys]
        if len(set(ids)) != len(ids):
            raise bad("a key id appears twice")
        if current not in ids:
            raise bad(f"current key {current!r} is not one of its keys")
        assert isinstance(current, int)
        return cls(tenant, kek, current, tuple(keys))


def unwrap_table(table: KeyTable, kek: KeyEncryptionKey, where: str) -> dict[int, AESGCM]:
    """Every data key of ``table`` (read from ``where``) unwrapped by ``kek``, as one
    cipher per key id; KeyUnavailable when one does not unwrap. The caller has checked
    that ``kek`` is the key the table names (``table.kek``)."""
    aeads: dict[int, AESGCM] = {}
    for k in table.keys:
        try:
            key = kek.unwrap(k.wrapped, data_key_context(table.tenant, k.id))
        except KeyUnavailable:
            raise KeyUnavailable(
                f"data key {k.id} of tenant {table.tenant} ({where}) does not unwrap with "
                f"region key {kek.key_id}: the file was altered or its keys were copied "
                "from another tenant"
            ) from None
        if len(key) != KEY_BYTES:
            raise KeyUnavailable(f"data key {k.id} of tenant {table.tenant} is not 32 bytes")
        aeads[k.id] = AESGCM(key)
    return aeads


class TenantKeys:
    """One tenant's unwrapped data keys: one AES-GCM object per key, made once."""

    __slots__ = ("aeads", "current", "loaded_at", "sig", "tenant")

    def __init__(
        self,
        tenant: str,
        current: int,
        aeads: dict[int, AESGCM],
        sig: tuple[int, int, int] | None,
        loaded_at: float,
    ) -> None:
        self.tenant = tenant
        self.current = current
        self.aeads = aeads
        self.sig = sig
        self.loaded_at = loaded_at


def _sig(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (inode, mtime, size); None: missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class KeyStore:
    """A node's data keys under ``DATA_DIR/keys`` (see the module docstring).

    ``kek`` is the region key (None: none was given and none is in the data dir; then
    nothing encrypted can be read and no data key created, each refusal naming the
    problem). Thread-safe: shard reader threads decrypt while the loop encrypts.
    """

    def __init__(
        self,
        root: Path,
        kek: KeyEncryptionKey | None,
        *,
        missing: str | None = None,
        max_tenants: int = MAX_TENANTS,
        max_keys: int = MAX_KEYS_PER_TENANT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.kek = kek
        #: Why there is no region key (None when there is one).
        self.missing = missing if kek is None else None
        self.max_tenants = max_tenants
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.RLock()
        self._loaded: dict[str, TenantKeys] = {}
        # Tenants whose keys could not be used: (the file's sig then, why). Kept until
        # refresh() sees the file change, so a refused tenant costs no file read.
        self._failed: dict[str, tuple[tuple[int, int, int] | None, str]] = {}
        # Tenants known to have no key file (no file read per publish with encryption
        # off); forgotten when the directory changes, and wholesale at MAX_TENANTS.
        self._absent: set[str] = set()
        self._dir_sig: tuple[int, int, int] | None = None
        self._full_until = 0.0  # creation refused (tenant bound) until this time
        #: Data keys created and tenant files (re)loaded by this store (metrics, tests).
        self.created = 0
        self.loads = 0

    # -- paths -----------------------------------------------------------------------

    @property
    def tenants_dir(self) -> Path:
        return self.root / TENANTS_DIR

    def tenant_path(self, tenant: str) -> Path:
        try:
            validate_name("tenant", tenant)
        except BadRequest as exc:
            raise KeyUnavailable(f"no data keys for an invalid tenant name: {exc}") from None
        return self.tenants_dir / f"{tenant}.json"

    def tenants(self) -> list[str]:
        """Tenants with a key file, sorted."""
        try:
            names = os.listdir(self.tenants_dir)
        except FileNotFoundError:
            return []
        return sorted(
            n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the keys directory's flock (creation and rewrites, across processes)."""
        self.tenants_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            os.chmod(self.root, 0o700)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Temporary files of a writer that died: nobody else writes while we hold it.
            for name in os.listdir(self.tenants_dir):
                if name.startswith(".") and name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(self.tenants_dir / name)
            yield
        finally:
            os.close(fd)  # drops the flock

    # -- reading the files -----------------------------------------------------------

    def read_table(self, tenant: str) -> KeyTable | None:
        """The tenant's key file as stored (None: none), without unwrapping."""
        path = self.tenant_path(tenant)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyUnavailable(f"cannot read data key file {path}: {exc.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            raise KeyUnavailable(f"data key file {path} is larger than {MAX_FILE_BYTES} bytes")
        return KeyTable.from_bytes(data, tenant, str(path))

    def _unwrap_table(self, table: KeyTable, path: Path) -> dict[int, AESGCM]:
        kek = self.kek
        if kek is None:
            raise KeyUnavailable(
                f"the data keys of tenant {table.tenant} ({path}) are wrapped by region key "
                f"{table.kek}, and {self.missing or 'this node has no region key'}"
            )
        if table.kek != kek.key_id:
            raise KeyUnavailable(
                f"the data keys of tenant {table.tenant} ({path}) are wrapped by region key "
                f"{table.kek}, but this node's region key is {kek.key_id} ({kek.source}): "
                f"give it the region key that wrapped them (--region-key FILE or "
                f"${REGION_KEY_ENV}), or finish a region key rotation (felix keys rotate)"
            )
        return unwrap_table(table, kek, str(path))

    def _load(self, tenant: str) -> TenantKeys | None:
        """Read and unwrap the tenant's keys (under the lock); None: no file."""
        path = self.tenant_path(tenant)
        sig = _sig(path)
        try:
            table = self.read_table(tenant)
            if table is None:
                self._loaded.pop(tenant, None)
                self._failed.pop(tenant, None)
                if len(self._absent) >= self.max_tenants:
                    self._absent.clear()
                self._absent.add(tenant)
                return None
            keys = TenantKeys(
                tenant, table.current, self._unwrap_table(table, path), sig, self._clock()
            )
        except KeyUnavailable as exc:
            self._loaded.pop(tenant, None)
            if self._failed.get(tenant, (None, ""))[1] != str(exc):
                log.error("tenant %s: %s; its durable data is refused", tenant, exc)
            self._failed[tenant] = (sig, str(exc))
            raise
        self.loads += 1
        self._failed.pop(tenant, None)
        self._absent.discard(tenant)
        self._loaded[tenant] = keys
        return keys

    def keys(self, tenant: str) -> TenantKeys | None:
        """The tenant's keys (None: it has no key file); KeyUnavailable when they
        cannot be used (the reason is remembered until the file changes)."""
        keys = self._loaded.get(tenant)
        if keys is not None:
            return keys
        failed = self._failed.get(tenant)
        if failed is not None:
            raise KeyUnavailable(failed[1])
        if tenant in self._absent:
            return None
        with self._lock:
            keys = self._loaded.get(tenant)
            if keys is not None:
                return keys
            return self._load(tenant)

    def problem(self, tenant: str) -> str | None:
        """Why the tenant's data cannot be read now (None: it can, or it has no keys)."""
        try:
            self.keys(tenant)
        except KeyUnavailable as exc:
            return str(exc)
        return None

    def aead(self, tenant: str, key_id: int) -> AESGCM:
        """The cipher of data key ``key_id`` of ``tenant`` (for reading records and
        group frames). An id the loaded keys lack re-reads the file (a rotation by
        another process), at most once a second per tenant."""
        keys = self.keys(tenant)
        if keys is not None:
            aead = keys.aeads.get(key_id)
            if aead is not None:
                return aead
            if self._clock() - keys.loaded_at >= RELOAD_INTERVAL:
                with self._lock:
                    keys = self._load(tenant)
                if keys is not None and key_id in keys.aeads:
                    return keys.aeads[key_id]
        where = self.tenant_path(tenant)
        raise KeyUnavailable(
            f"data key {key_id} of tenant {tenant} is not in {where}"
            + ("" if keys is not None else " (the file is missing)")
            + ": restore the key file this data was written with"
        )

    # -- writing -----------------------------------------------------------------------

    def current(self, tenant: str) -> tuple[int, AESGCM]:
        """The key new data of ``tenant`` is encrypted with (id, cipher): its file's
        current key, the first one created when the tenant has none."""
        keys = self._loaded.get(tenant)
        if keys is None:
            keys = self.keys(tenant) or self._create(tenant)
        return keys.current, keys.aeads[keys.current]

    def _create(self, tenant: str) -> TenantKeys:
        kek = self.kek
        if kek is None:
            raise KeyUnavailable(
                f"cannot create a data key for tenant {tenant}: "
                f"{self.missing or 'this node has no region key'}"
            )
        if self._clock() < self._full_until:
            raise self._full()
        with self._lock, self.locked():
            # Another shard process may have created it while we waited for the lock.
            keys = self._load(tenant)
            if keys is not None:
                return keys
            self._check_region(kek)
            if len(self.tenants()) >= self.max_tenants:
                self._full_until = self._clock() + RELOAD_INTERVAL
                raise self._full()
            self._create_locked(tenant, kek)
            self.created += 1
            log.info("tenant %s: created data key 1 (%s)", tenant, self.tenant_path(tenant))
            keys = self._load(tenant)
            assert keys is not None
            return keys

    def _full(self) -> Overloaded:
        return Overloaded(
            f"this node holds data keys for its maximum of {self.max_tenants} tenants "
            f"({self.tenants_dir}): no new tenant can write durable data"
        )

    def region_record(self) -> dict[str, Any] | None:
        """``region.json``: which region key wrapped the data keys (None: not written)."""
        try:
            doc = json.loads((self.root / REGION_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise KeyUnavailable(f"{self.root / REGION_FILE} is damaged: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != REGION_FORMAT:
            raise KeyUnavailable(f"{self.root / REGION_FILE} is not a {REGION_FORMAT} file")
        return doc

    def _write_region(self, kek: str, rotating_to: str | None = None) -> None:
        doc = {"format": REGION_FORMAT, "version": VERSION, "kek": kek, "rotating_to": rotating_to}
        write_atomic(self.root / REGION_FILE, (json.dumps(doc) + "\n").encode())

    def _check_region(self, kek: KeyEncryptionKey) -> None:
        """New data keys are wrapped only by the region key that wrapped the others
        (never a second, wrong one); the first data key records it (under the lock)."""
        record = self.region_record()
        if record is None:
            self._write_region(kek.key_id)
            return
        if record.get("kek") != kek.key_id:
            raise KeyUnavailable(
                f"this node's region key is {kek.key_id} ({kek.source}), but the data keys in "
                f"{self.root} are wrapped by region key {record.get('kek')}: start it with "
                f"that key (--region-key FILE or ${REGION_KEY_ENV})"
                + (
                    f", or finish the rotation to {record['rotating_to']} (felix keys rotate)"
                    if record.get("rotating_to")
                    else ""
                )
            )

    def check(self) -> str | None:
        """Why this node's region key cannot serve the data keys here (None: it can,
        or there are none yet): for a loud line at start."""
        try:
            record = self.region_record()
        except KeyUnavailable as exc:
            return str(exc)
        if record is None:
            return None if self.kek is not None or not self.tenants() else self.missing
        if self.kek is None:
            return (
                f"the data keys in {self.root} are wrapped by region key {record.get('kek')}, "
                f"and {self.missing or 'this node has no region key'}: durable data of every "
                "tenant with data keys is refused"
            )
        if record.get("kek") != self.kek.key_id:
            return (
                f"region key mismatch: the data keys in {self.root} are wrapped by region key "
                f"{record.get('kek')}, this node was given {self.kek.key_id} "
                f"({self.kek.source}): durable data of every tenant with data keys is refused"
            )
        return None

    def refresh(self) -> None:
        """Forget the tenants whose key file changed since it was read (a rotation by
        ``felix keys``, a restored file): their next use reads it again. Cheap when
        nothing changed: one stat of the tenants directory."""
        sig = _sig(self.tenants_dir)
        if sig == self._dir_sig:
            return
        self._dir_sig = sig
        with self._lock:
            self._absent.clear()
            for tenant, keys in list(self._loaded.items()):
                if _sig(self.tenant_path(tenant)) != keys.sig:
                    del self._loaded[tenant]
            for tenant, (old, _why) in list(self._failed.items()):
                if _sig(self.tenant_path(tenant)) != old:
                    del self._failed[tenant]
            self._full_until = 0.0

    # -- administration (felix keys) ------------------------------------------------------

    def rotate_tenant(self, tenant: str) -> int:
        """Add a new data key for ``tenant`` and make it current; returns its id. Old
        keys stay (records written with them keep reading). A tenant without keys gets
        its first one."""
        kek = self.kek
        if kek is None:
            raise ConfigError(f"no region key: {self.missing}")
        with self._lock, self.locked():
            path = self.tenant_path(tenant)
            table = self.read_table(tenant)
            if table is None:
                self._check_region(kek)
                self._loaded.pop(tenant, None)
                self._failed.pop(tenant, None)
                return self._create_locked(tenant, kek)
            self._unwrap_table(table, path)  # the file must be ours before we add to it
            if len(table.keys) >= self.max_keys:
                raise ConfigError(
                    f"tenant {tenant} has {len(table.keys)} data keys, the maximum "
                    f"({self.max_keys}): no further rotation"
                )
            new_id = max(k.id for k in table.keys) + 1
            if new_id > 0xFFFFFFFF:
                raise ConfigError(f"tenant {tenant}: no key id left")
            key = os.urandom(KEY_BYTES)
            wrapped = kek.wrap(key, data_key_context(tenant, new_id))
            table = KeyTable(
                tenant,
                table.kek,
                new_id,
                (*table.keys, WrappedKey(new_id, time.time_ns() // 1000, wrapped)),
            )
            write_atomic(path, table.to_bytes())
            self._loaded.pop(tenant, None)
            self._failed.pop(tenant, None)
            return new_id

    def _create_locked(self, tenant: str, kek: KeyEncryptionKey) -> int:
        key = os.urandom(KEY_BYTES)
        table = KeyTable(
            tenant,
            kek.key_id,
            1,
            (WrappedKey(1, time.time_ns() // 1000, kek.wrap(key, data_key_context(tenant, 1))),),
        )
        write_atomic(self.tenant_path(tenant), table.to_bytes())
        return 1

    def rewrap(self, new: KeyEncryptionKey) -> tuple[int, int]:
        """Rewrap every tenant's data keys with the region key ``new`` (no segment is
        touched); returns (files rewrapped, files already wrapped by ``new``).

        Resumable: ``region.json`` names the rotation first; a file already wrapped by
        ``new`` is skipped; the record switches to ``new`` only after every file was
        rewrapped. So after a crash, running it again with the same keys finishes.
        """
        old = self.kek
        if old is None:
            raise ConfigError(f"no current region key: {self.missing}")
        with self._lock, self.locked():
            record = self.region_record()
            recorded = None if record is None else record.get("kek")
            if recorded not in (None, old.key_id, new.key_id):
                raise ConfigError(
                    f"the data keys in {self.root} are wrapped by region key {recorded}, which "
                    f"is neither the current key given ({old.key_id}) nor the new one "
                    f"({new.key_id})"
                )
            if recorded == new.key_id and not (record or {}).get("rotating_to"):
                return 0, len(self.tenants())  # done already
            self._write_region(old.key_id, new.key_id)
            done = skipped = 0
            for tenant in self.tenants():
                table = self.read_table(tenant)
                if table is None:
                    continue
                if table.kek == new.key_id:
                    skipped += 1
                    continue
                if table.kek != old.key_id:
                    raise ConfigError(
                        f"tenant {tenant}'s data keys are wrapped by region key {table.kek}, "
                        f"neither {old.key_id} nor {new.key_id}: not rotated"
                    )
                keys = []
                for k in table.keys:
                    ctx = data_key_context(tenant, k.id)
                    try:
                        raw = old.unwrap(k.wrapped, ctx)
                    except KeyUnavailable:
                        raise ConfigError(
                            f"data key {k.id} of tenant {tenant} does not unwrap with region "
                            f"key {old.key_id}: the file was altered; nothing more rotated"
                        ) from None
                    keys.append(WrappedKey(k.id, k.created_us, new.wrap(raw, ctx)))
                rewrapped = KeyTable(tenant, new.key_id, table.current, tuple(keys))
                write_atomic(self.tenant_path(tenant), rewrapped.to_bytes())
                done += 1
            self._write_region(new.key_id)
            self.kek = new
            self._loaded.clear()
            self._failed.clear()
            return done, skipped

    def status(self) -> dict[str, Any]:
        """What ``felix keys status`` prints: the region key, each tenant's keys."""
        kek = self.kek
        try:
            record = self.region_record()
        except KeyUnavailable as exc:
            record = {"error": str(exc)}
        tenants = []
        for tenant in self.tenants()[: self.max_tenants]:
            entry: dict[str, Any] = {"tenant": tenant}
            try:
                table = self.read_table(tenant)
                if table is None:
                    continue
                entry.update(
                    kek=table.kek,
                    current=table.current,
                    keys=[{"id": k.id, "created_us": k.created_us} for k in table.keys],
                )
                self._unwrap_table(table, self.tenant_path(tenant))
                entry["usable"] = True
            except KeyUnavailable as exc:
                entry.update(usable=False, error=str(exc))
            tenants.append(entry)
        return {
            "keys_dir": str(self.root),
            "region_key": None if kek is None else {"id": kek.key_id, "source": kek.source},
            "missing": self.missing,
            "wrapped_by": record,
            "problem": self.check(),
            "tenants": tenants,
        }


def resolve_region_key(
    data_dir: Path, given: Path | None, *, generate: bool
) -> tuple[KeyEncryptionKey | None, str | None]:
    """The region key of the node on ``data_dir``: (key, why there is none).

    ``given`` (``--region-key`` or ``$FELIX_REGION_KEY_FILE``, resolved by the caller)
    wins; else dev mode: ``DATA_DIR/keys/region.key``, generated when ``generate`` and
    the data dir holds no data keys yet (never beside data keys another key wrapped).
    Raises ConfigError for a given key file that cannot be read.
    """
    if given is not None:
        return FileKeyEncryptionKey.load(given), None
    root = data_dir / KEYS_DIR
    dev = root / DEV_KEY_FILE
    if dev.exists():
        return FileKeyEncryptionKey.load(dev), None
    store = KeyStore(root, None)
    if store.tenants() or store.region_record() is not None:
        return None, (
            f"no region key was given (--region-key FILE or ${REGION_KEY_ENV}) and {dev} "
            "does not exist, but the data dir holds data keys"
        )
    if not generate:
        return None, f"no region key was given (--region-key FILE or ${REGION_KEY_ENV})"
    kek = generate_key_file(dev)
    log.warning(
        "generated a region key in %s (dev mode: data at rest is encrypted with keys kept "
        "beside it; in production give --region-key FILE or $%s from a secret)",
        dev,
        REGION_KEY_ENV,
    )
    return kek, None
