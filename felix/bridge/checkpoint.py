"""A bridge's checkpoint: the next source offset to copy, in one small file per bridge.

Written only after the target acknowledged every record before that offset, and
atomically (a temporary file, fsync, rename, fsync of the directory), so after any
crash the file holds either the previous checkpoint or the new one, never a torn one.
A checkpoint names the bridge incarnation (its ``created_at``) and the source stream
it counts in: a bridge deleted and created again, or pointed at another source,
starts afresh instead of skipping records of a stream it never read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from felix.errors import FelixError
from felix.names import validate_name

__all__ = ["Checkpoint", "CheckpointDir"]

log = logging.getLogger("felix.bridge")

#: Largest checkpoint file read (a real one is ~200 bytes; anything bigger is not ours).
_MAX_BYTES = 4096


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a tenant or bridge name (felix.names rules)."""
    try:
        validate_name("name", name)
    except FelixError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Checkpoint:
    #: The bridge's ``created_at`` (ISO 8601): which incarnation of the name wrote it.
    incarnation: str
    #: ``ns/stream`` of the source the offset counts in.
    source: str
    #: The next source offset to copy: every record below it is acked by the target
    #: (or was filtered out).
    next_offset: int


class CheckpointDir:
    """``DIR/<tenant>/<bridge>.json`` for every bridge a runner copies."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, tenant: str, name: str) -> Path:
        # Names are validated, so they cannot climb out of the directory.
        validate_name("tenant", tenant)
        validate_name("bridge", name)
        return self.directory / tenant / f"{name}.json"

    def load(self, tenant: str, name: str) -> Checkpoint | None:
        """The stored checkpoint, or None (none yet, or unreadable: logged, started afresh
        from the bridge's ``start``, which at worst copies records again: the target's
        dedup window drops them)."""
        path = self.path(tenant, name)
        try:
            with path.open("rb") as f:
                raw = f.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the checkpoint %s: %s", path, exc)
            return None
        try:
            if len(raw) > _MAX_BYTES:
                raise ValueError("too large")
            data = json.loads(raw)
            cp = Checkpoint(str(data["incarnation"]), str(data["source"]), int(data["next_offset"]))
            if cp.next_offset < 0:
                raise ValueError("negative offset")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the damaged checkpoint %s: %s", path, exc)
            return None
        return cp

    def save(self, tenant: str, name: str, checkpoint: Checkpoint) -> None:
        """Replace the checkpoint atomically and durably (raises OSError)."""
        path = self.path(tenant, name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".json.tmp")
        data = json.dumps(asdict(checkpoint)).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def remove(self, tenant: str, name: str) -> bool:
        """Delete the checkpoint (the bridge was deleted); True if there was one."""
        path = self.path(tenant, name)
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(".json.tmp").unlink()
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def stored(self) -> list[tuple[str, str]]:
        """(tenant, bridge) of every checkpoint in the directory."""
        out: list[tuple[str, str]] = []
        if not self.directory.is_dir():
            return out
        for tenant_dir in sorted(self.directory.iterdir()):
            if not tenant_dir.is_dir() or not is_valid_name(tenant_dir.name):
                continue  # not ours (a stray directory must not stop the runner)
            for file in sorted(tenant_dir.glob("*.json")):
                if is_valid_name(file.stem):
                    out.append((tenant_dir.name, file.stem))
        return out


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
