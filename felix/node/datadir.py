"""What a node owns through its data dir: an exclusive lock, and its rings' names.

Two nodes on one data dir would reuse offsets (both reserve from the same
offset files), so `felix up` takes an exclusive ``flock`` on ``DATA_DIR/felix.lock``
first and holds it for its whole life; a second node on the same dir is refused
with :class:`DataDirInUse` (``felix up`` exits 2 with the holder's pid). The
kernel drops the lock when the holder dies, even by ``kill -9``.

The shared-memory rings are named after the data dir (``/felix-<id>-g0s1``, where
``<id>`` is a hash of its real path), so a node that was killed without cleaning
up leaves names the next node on the same data dir recognises: holding the lock,
it unlinks them before creating its own (:func:`reclaim_rings`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from felix.errors import ConfigError

LOCK_FILE = "felix.lock"
#: Where POSIX shared memory appears as files (Linux).
SHM_DIR = Path("/dev/shm")


class DataDirInUse(ConfigError):
    """Another live process holds the data dir's lock."""


class DataDirLock:
    """An exclusive, non-blocking flock on ``DATA_DIR/felix.lock``, held until released."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        # Close-on-exec (Python's default): children never hold it, so the lock goes
        # with the supervisor, and children die with it (felix/node/worker.py).
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"data dir {data_dir} is in use by another felix node (pid {holder}; "
                f"lock {path}): stop it first, or give this node its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def ring_prefix(data_dir: Path) -> str:
    """The shared-memory name prefix of the node on ``data_dir`` (no leading slash)."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return f"felix-{digest}-"


def reclaim_rings(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink every shared-memory segment named ``prefix*`` (left by a killed node on
    this data dir; call it holding the data dir's lock). Returns the names unlinked."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in shm_dir.iterdir():
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry.name)
    return sorted(removed)


__all__ = ["LOCK_FILE", "DataDirInUse", "DataDirLock", "reclaim_rings", "ring_prefix"]
