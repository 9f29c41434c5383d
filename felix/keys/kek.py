"""The region key-encryption key (KEK) behind a small KMS interface.

A felix region has one key-encryption key. It never encrypts data: it only wraps the
per-tenant data keys (felix/keys/store.py), so rotating it rewrites a few small key
files and never a segment. :class:`KeyEncryptionKey` is what felix needs of a KEK, the
shape every KMS offers (encrypt/decrypt of a small secret with associated data, and a
name for the key): :class:`FileKeyEncryptionKey` is the provider built in (a 32-byte
AES-256-GCM key read from a file); a cloud KMS would be another class with the same
three members.

Key file: 32 bytes, either raw or as 64 hexadecimal digits (whitespace around them is
ignored). ``felix up --region-key FILE`` or ``$FELIX_REGION_KEY_FILE`` names it; in
dev mode (neither given) the node generates one into ``DATA_DIR/keys/region.key``
(mode 0600, written atomically), as it generates its TLS CA.

Wrapped form (what :meth:`FileKeyEncryptionKey.wrap` returns): ``12-byte random nonce
| AES-256-GCM ciphertext of the data key | 16-byte tag``, the caller's context (tenant
and key id) as associated data, so a wrapped key moved to another tenant or id does
not unwrap.

The key's **fingerprint** (:attr:`KeyEncryptionKey.key_id`) is the first 8 bytes of
HMAC-SHA256(key, "felix region key id v1") in hex: it names the key in key files and
error messages ("wrapped by region key 3f2a..., this node has 9c1b...") without
revealing anything about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from felix.errors import ConfigError, KeyUnavailable

__all__ = [
    "KEY_BYTES",
    "REGION_KEY_ENV",
    "FileKeyEncryptionKey",
    "KeyEncryptionKey",
    "fingerprint",
    "generate_key_file",
    "parse_key",
    "write_atomic",
]

log = logging.getLogger("felix.keys")

#: Every key felix uses (region key, data keys) is AES-256: 32 bytes.
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
#: The environment variable naming the region key file (``--region-key`` wins).
REGION_KEY_ENV: Final = "FELIX_REGION_KEY_FILE"
#: The longest key file felix reads (a key is 32 bytes, or 64 hex digits + newline).
_MAX_KEY_FILE = 4096


@runtime_checkable
class KeyEncryptionKey(Protocol):
    """What felix needs of a region key: a name, wrap and unwrap of a data key."""

    @property
    def key_id(self) -> str:
        """A stable, non-secret name of the key (recorded beside what it wrapped)."""
        ...

    @property
    def source(self) -> str:
        """Where the key came from, for messages (a file name, a KMS key name)."""
        ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """``data_key`` encrypted and authenticated, bound to ``context``."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key; raises :class:`~felix.errors.KeyUnavailable` when ``wrapped``
        was not made by this key with this ``context`` (or was altered)."""
        ...


def fingerprint(key: bytes) -> str:
    """The non-secret name of a 32-byte key (16 hex digits)."""
    return hmac.new(key, b"felix region key id v1", hashlib.sha256).hexdigest()[:16]


def parse_key(raw: bytes, where: str) -> bytes:
    """A 32-byte key from a key file's bytes: raw, or 64 hex digits (ConfigError)."""
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(text.decode("ascii"))
    raise ConfigError(
        f"{where}: a key file must hold {KEY_BYTES} bytes, raw or as {2 * KEY_BYTES} "
        f"hexadecimal digits (this one has {len(raw)} bytes); make one with "
        "`python -c 'import os; print(os.urandom(32).hex())' > FILE`"
    )


class FileKeyEncryptionKey:
    """A region key read from a file: AES-256-GCM wrapping with a random nonce."""

    __slots__ = ("_aead", "_id", "_source")

    def __init__(self, key: bytes, source: str) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"{source}: a region key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self._id = fingerprint(key)
        self._source = source

    @classmethod
    def load(cls, path: Path) -> FileKeyEncryptionKey:
        """Read ``path`` (ConfigError naming it when it is missing or not a key)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"cannot read the region key {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"region key {path} is not a regular file")
            raw = os.read(fd, _MAX_KEY_FILE + 1)
        finally:
            os.close(fd)
        if st.st_mode & 0o077:
            log.warning(
                "region key %s is readable by others (mode %o): keep it 0600", path, st.st_mode
            )
        return cls(parse_key(raw, str(path)), str(path))

    @property
    def key_id(self) -> str:
        return self._id

    @property
    def source(self) -> str:
        return self._source

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        if len(wrapped) < NONCE_BYTES + TAG_BYTES:
            raise KeyUnavailable(f"a wrapped key of {len(wrapped)} bytes is too short")
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
        except InvalidTag:
            raise KeyUnavailable(
                f"a wrapped key does not unwrap with region key {self._id} ({self._source}): "
                "it was wrapped by another key or altered"
            ) from None


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` whole or not at all: a temporary file in the same directory
    (``mode``), fsync, rename over ``path``, fsync of the directory."""
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; this is not
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def generate_key_file(path: Path) -> FileKeyEncryptionKey:
    """Create a new random key at ``path`` (0600, 64 hex digits; the directory 0700).
    Refuses to replace an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        raise ConfigError(f"{path} exists: felix never replaces a key file")
    key = os.urandom(KEY_BYTES)
    write_atomic(path, (key.hex() + "\n").encode(), 0o600)
    return FileKeyEncryptionKey(key, str(path))
