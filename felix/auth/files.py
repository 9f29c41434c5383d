"""Per-tenant token key material on disk, and the broker's cached view of it.

A key directory (a node uses ``DATA_DIR/auth``) holds, for each tenant ``T``:

- ``T.ring.json``: the tenant's :class:`~felix.auth.keys.TenantKeyRing` with its
  private keys (mode 0600), read and written by the ``felix token`` commands;
- ``T.jwks.json``: the public JWK set published at the last save (mode 0644),
  read by the broker through :class:`JwksDirectory`. A node following a remote
  control plane holds only these, mirrored from it (:func:`save_jwks`,
  :mod:`felix.node.jwks_sync`).

The directory itself is created with mode 0700. Every file is replaced atomically
(temporary file in the same directory, fsync, rename, fsync of the directory), so a
reader sees the old or the new content, never a mix, and a crash leaves no partial
file. :func:`save_ring` writes the JWK set before the ring: a crash between the two
can publish a key the stored ring does not hold (harmless), but never leave the ring
holding a key that is not published.

Tokens minted from these rings carry ``iss`` :data:`ISSUER` and ``aud``
:data:`AUDIENCE`; the broker checks both.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from felix.auth.keys import TenantKeyRing
from felix.auth.tokens import public_keys_by_kid
from felix.errors import BadRequest, ConfigError, NotFound
from felix.names import validate_name

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "MAX_JWKS_FILE_BYTES",
    "MAX_TENANTS",
    "JwksDirectory",
    "admin_token",
    "jwks_path",
    "jwks_tenants",
    "load_ring",
    "locked",
    "remove_jwks",
    "ring_path",
    "ring_tenants",
    "save_jwks",
    "save_ring",
]

log = logging.getLogger(__name__)

#: ``iss`` of the Felix tokens minted by ``felix token mint`` and checked by the broker.
ISSUER = "felix"
#: ``aud`` of those tokens.
AUDIENCE = "felix"

#: Largest JWK set file :class:`JwksDirectory` reads (100 Ed25519 keys take ~20 kB).
MAX_JWKS_FILE_BYTES = 1 << 20
#: Largest key ring file :func:`load_ring` reads.
_MAX_RING_FILE_BYTES = 1 << 20
#: Most tenants one key directory serves: :class:`JwksDirectory` caches at most this
#: many, and the JWKS sync and the key rotation handle at most this many.
MAX_TENANTS = 10_000

_RING_MODE = 0o600
_JWKS_MODE = 0o644
_DIR_MODE = 0o700


def ring_path(directory: Path, tenant: str) -> Path:
    """``directory/<tenant>.ring.json`` (private keys).

    Raises:
        BadRequest: ``tenant`` breaks the name rule (checked before building the path).
    """
    return Path(directory) / f"{validate_name('tenant', tenant)}.ring.json"


def jwks_path(directory: Path, tenant: str) -> Path:
    """``directory/<tenant>.jwks.json`` (the public JWK set).

    Raises:
        BadRequest: ``tenant`` breaks the name rule (checked before building the path).
    """
    return Path(directory) / f"{validate_name('tenant', tenant)}.jwks.json"


def _ensure_directory(directory: Path) -> None:
    """Create ``directory`` (mode 0700) and its parents if missing; leave an existing one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, _DIR_MODE)
    except FileExistsError:
        if not directory.is_dir():
            raise ConfigError(f"{directory} exists and is not a directory") from None
        return
    os.chmod(directory, _DIR_MODE)  # mkdir's mode is masked by the umask


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary(path: Path, data: bytes, mode: int) -> Path:
    """A new temporary file beside ``path`` holding ``data`` (mode ``mode``), fsynced.

    Removed again if anything fails; the caller moves it into place and removes it.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``, whatever the umask) atomically.

    The data goes to a new temporary file in the same directory, is fsynced, renamed
    over ``path``, and the directory is fsynced. On any failure the temporary file is
    removed and ``path`` is untouched.
    """
    tmp = _write_temporary(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def save_ring(
    directory: Path, ring: TenantKeyRing, now: float, *, jwks: dict[str, Any] | None = None
) -> None:
    """Store ``ring`` and the JWK set it publishes at ``now`` (Unix seconds).

    Writes ``<tenant>.jwks.json`` (``jwks``, by default ``ring.jwks(now)``; mode 0644)
    and then
    ``<tenant>.ring.json`` (``ring.to_json()``, mode 0600), each atomically (see the
    module docstring); creates ``directory`` with mode 0700 if it is missing. The
    published set is a snapshot: save again after :meth:`~TenantKeyRing.rotate` and
    :meth:`~TenantKeyRing.prune`.

    Raises:
        ConfigError: ``directory`` exists but is not a directory, or a file cannot be
            written (the message names it).
    """
    directory = Path(directory)
    published = _jwks_text(ring.jwks(now) if jwks is None else jwks)
    stored = ring.to_json() + "\n"
    try:
        _ensure_directory(directory)
        _write_atomically(jwks_path(directory, ring.tenant), published, _JWKS_MODE)
        _write_atomically(ring_path(directory, ring.tenant), stored.encode("utf-8"), _RING_MODE)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the key ring of {ring.tenant!r} in {directory}: {exc}"
        ) from None


def _jwks_text(jwks: dict[str, Any]) -> bytes:
    return (json.dumps(jwks, sort_keys=True, indent=2) + "\n").encode("utf-8")


def save_jwks(directory: Path, tenant: str, jwks: dict[str, Any]) -> bool:
    """Publish ``jwks`` as ``<tenant>.jwks.json`` (mode 0644, atomically), if it changed.

    For a node that mirrors a control plane's JWK sets (it holds no ring for
    ``tenant``). The set must be what :class:`JwksDirectory` accepts: a JWK set of
    usable public keys, at most :data:`MAX_JWKS_FILE_BYTES` once written. Returns
    whether the file was written (False: it already held this set, left untouched so
    readers need not re-read it). Creates ``directory`` (mode 0700) if missing.

    Raises:
        BadRequest: ``tenant`` breaks the name rule, or ``jwks`` is not such a set.
        ConfigError: the file cannot be written.
    """
    path = jwks_path(directory, tenant)
    public_keys_by_kid(jwks, strict=True)
    data = _jwks_text(jwks)
    if len(data) > MAX_JWKS_FILE_BYTES:
        raise BadRequest(f"the JWK set of {tenant!r} is larger than {MAX_JWKS_FILE_BYTES} bytes")
    try:
        with contextlib.suppress(FileNotFoundError):
            if _read_limited(path, MAX_JWKS_FILE_BYTES)[0] == data:
                return False
        _ensure_directory(Path(directory))
        _write_atomically(path, data, _JWKS_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from None
    return True


def remove_jwks(directory: Path, tenant: str) -> bool:
    """Remove ``<tenant>.jwks.json`` (the broker then denies the tenant); False if absent.

    Raises:
        BadRequest: ``tenant`` breaks the name rule.
        ConfigError: the file cannot be removed.
    """
    path = jwks_path(directory, tenant)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot remove {path}: {exc}") from None
    with contextlib.suppress(OSError):
        _fsync_directory(path.parent)
    return True


def _tenants_with(directory: Path, suffix: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot list {directory}: {exc}") from None
    out = []
    for name in names:
        tenant = name.removesuffix(suffix)
        if tenant == name or name.startswith("."):
            continue
        try:
            out.append(validate_name("tenant", tenant))
        except BadRequest:
            continue  # not ours
    return sorted(out)


def ring_tenants(directory: Path) -> list[str]:
    """The tenants with a key ring (``<tenant>.ring.json``) in ``directory``, sorted.

    Raises:
        ConfigError: the directory exists but cannot be listed.
    """
    return _tenants_with(directory, ".ring.json")


def jwks_tenants(directory: Path) -> list[str]:
    """The tenants with a published JWK set (``<tenant>.jwks.json``) in ``directory``, sorted.

    Raises:
        ConfigError: the directory exists but cannot be listed.
    """
    return _tenants_with(directory, ".jwks.json")


def _new_admin_token() -> str:
    """``secrets.token_urlsafe(32)`` that does not start with ``-``: passed as a
    separate command-line argument (``--control-token TOKEN``) it would read as an
    option otherwise."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def admin_token(path: Path) -> str:
    """The bootstrap admin token stored at ``path``, created on first use.

    A new token is ``secrets.token_urlsafe(32)`` (never starting with ``-``), written to
    a temporary file (mode 0600, fsynced) and linked into place, so a concurrent
    creator never overwrites it: whoever links first wins and both return that token.
    An existing file must be readable by its owner only and hold one non-empty line.

    Raises:
        ConfigError: the file cannot be read or written, is open to group or others,
            or is empty.
    """
    path = Path(path)
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = (_new_admin_token() + "\n").encode("ascii")
            tmp = _write_temporary(path, fresh, _RING_MODE)
            try:
                with contextlib.suppress(FileExistsError):  # someone else made it first
                    os.link(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            _fsync_directory(path.parent)
        data, st = _read_limited(path, 4096)
    except OSError as exc:
        raise ConfigError(f"cannot read or create the admin token file {path}: {exc}") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"the admin token file {path} is readable by group or others: chmod 600 {path}"
        )
    token = data.decode("utf-8", "replace").strip()
    if not token:
        raise ConfigError(f"the admin token file {path} is empty")
    return token


def _read_limited(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """The content of ``path`` (at most ``limit`` bytes) and the stat of the opened file.

    Raises:
        FileNotFoundError: there is no such file.
        OSError: it cannot be read, or (EFBIG) is larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, min(65536, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def load_ring(directory: Path, tenant: str) -> TenantKeyRing:
    """The key ring of ``tenant`` stored in ``directory`` by :func:`save_ring`.

    Raises:
        BadRequest: ``tenant`` breaks the name rule (no path is built then).
        NotFound: ``directory`` holds no key ring for ``tenant``.
        ConfigError: the file cannot be read, is malformed, or holds another tenant's ring.
    """
    path = ring_path(directory, tenant)
    try:
        data, _ = _read_limited(path, _MAX_RING_FILE_BYTES)
    except FileNotFoundError:
        raise NotFound(f"no key ring for tenant {tenant!r} in {directory}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        ring = TenantKeyRing.from_json(text)
    except (ConfigError, BadRequest) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if ring.tenant != tenant:
        raise ConfigError(f"{path} holds the key ring of tenant {ring.tenant!r}, not {tenant!r}")
    return ring


@contextlib.contextmanager
def locked(directory: Path, *, create: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` for the block.

    Serialises read-modify-write cycles of the ``felix token`` commands (keygen,
    rotate) between processes on this host; readers never need it. With ``create``
    a missing directory is created first (mode 0700, as :func:`save_ring` would).

    Raises:
        ConfigError: the directory cannot be created or opened.
    """
    try:
        if create:
            _ensure_directory(Path(directory))
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {directory}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_StatKey = tuple[int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    # The inode changes on every atomic replace, so a rewrite is seen even when the
    # size and the (coarse) mtime are unchanged.
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(slots=True)
class _Entry:
    checked_at: float  # monotonic time of the last stat
    stat: _StatKey | None  # the file seen then; None: it was missing
    value: dict[str, Any] | None  # the last good JWK set; None: deny


class JwksDirectory:
    """The public JWK sets of the tenants in a key directory, cached for the broker.

    ``jwks(tenant, now)`` is the callable a token authenticator wants. Per tenant it
    stats ``<tenant>.jwks.json`` at most once every ``recheck`` seconds and re-reads
    it only when the file changed (device, inode, mtime or size), so a rotation is
    seen within ``recheck`` seconds: keep ``recheck`` well below the rings'
    ``publish_ahead``. At most ``max_tenants`` tenants are cached (least recently
    used evicted). Not thread-safe; the file I/O is blocking but small and rare.

    Args:
        directory: the key directory.
        recheck: seconds between checks of one tenant's file (>= 0).
        max_tenants: bound on the cache (>= 1).

    Raises:
        ConfigError: ``recheck`` or ``max_tenants`` is out of range.
    """

    def __init__(
        self, directory: Path, *, recheck: float = 2.0, max_tenants: int = MAX_TENANTS
    ) -> None:
        if not isinstance(recheck, int | float) or not 0 <= recheck < float("inf"):
            raise ConfigError(f"recheck must be a non-negative number of seconds, got {recheck!r}")
        if not isinstance(max_tenants, int) or max_tenants < 1:
            raise ConfigError(f"max_tenants must be a positive integer, got {max_tenants!r}")
        self.directory = Path(directory)
        self.recheck = float(recheck)
        self.max_tenants = max_tenants
        self._cache: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        """How many tenants are cached."""
        return len(self._cache)

    def jwks(self, tenant: str, now: float) -> dict[str, Any] | None:
        """The public JWK set of ``tenant``, or None to deny.

        ``now`` is monotonic seconds (only the recheck timer uses it). None when
        ``tenant`` is not a valid name (the filesystem is not touched), when its file
        is missing, or when its file is corrupt and no good version was ever read. A
        corrupt or unreadable file keeps the last good set and logs a warning (once
        per change of the file). The returned dict is shared: do not modify it.
        """
        try:
            validate_name("tenant", tenant)
        except BadRequest:
            return None
        entry = self._cache.get(tenant)
        if entry is not None:
            self._cache.move_to_end(tenant)
            if now - entry.checked_at < self.recheck:
                return entry.value
        path = jwks_path(self.directory, tenant)
        try:
            current: _StatKey | None = _stat_key(os.stat(path))
        except FileNotFoundError:
            current = None
        except OSError as exc:
            return self._keep(tenant, entry, now, None, f"cannot stat {path}: {exc}")
        if current is None:
            if entry is not None and entry.value is not None:
                log.warning("%s is gone: denying tenant %r", path, tenant)
            return self._store(tenant, _Entry(now, None, None))
        if entry is not None and current == entry.stat:
            entry.checked_at = now
            return entry.value
        return self._read(tenant, path, entry, now, current)

    def _read(
        self, tenant: str, path: Path, entry: _Entry | None, now: float, current: _StatKey
    ) -> dict[str, Any] | None:
        try:
            data, st = _read_limited(path, MAX_JWKS_FILE_BYTES)
        except FileNotFoundError:  # removed since the stat
            return self._store(tenant, _Entry(now, None, None))
        except OSError as exc:  # not retried until the file changes
            return self._keep(tenant, entry, now, current, f"cannot read {path}: {exc}")
        stat = _stat_key(st)
        try:
            value = json.loads(data)
            public_keys_by_kid(value, strict=True)  # a JWK set of usable public keys
        except (ValueError, RecursionError, BadRequest) as exc:
            return self._keep(tenant, entry, now, stat, f"{path} is not a valid JWK set: {exc}")
        assert isinstance(value, dict)  # public_keys_by_kid checked it
        return self._store(tenant, _Entry(now, stat, value))

    def _keep(
        self, tenant: str, entry: _Entry | None, now: float, stat: _StatKey | None, problem: str
    ) -> dict[str, Any] | None:
        """Record a bad file (``stat`` None: retry at the next check); keep the last value."""
        value = entry.value if entry is not None else None
        if value is not None:
            log.warning("%s; keeping the last good JWK set of tenant %r", problem, tenant)
        else:
            log.warning("%s; denying tenant %r", problem, tenant)
        return self._store(tenant, _Entry(now, stat, value))

    def _store(self, tenant: str, entry: _Entry) -> dict[str, Any] | None:
        self._cache[tenant] = entry
        self._cache.move_to_end(tenant)
        while len(self._cache) > self.max_tenants:
            self._cache.popitem(last=False)
        return entry.value
