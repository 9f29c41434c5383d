"""Where the tenants' key rings are kept: a key directory, or a cluster's database.

A :class:`RingStore` is what the scheduled rotation (:mod:`felix.auth.rotation`) and
the ``felix token`` commands need of one: the tenants that have a ring (with a marker
that changes whenever the ring does), a ring, its published JWK set, creating a ring,
and a read-modify-write of one ring that no other writer can interleave with.

- :class:`FileRingStore`: a key directory (``DATA_DIR/auth``, ``--keys-dir``), the
  files of :mod:`felix.auth.files`, each change under the directory's ``flock``. What
  a standalone node and ``felix control`` use.
- :class:`~felix.auth.pgrings.PostgresRingStore`: the ``felix_key_rings`` table of a
  cluster's PostgreSQL database, each change under the ring's row lock, so every node
  of the cluster (and ``felix token --cluster``) works on one ring per tenant.

Every method runs its blocking work off the event loop; an update's change function is
called exactly once, with the ring as stored, while the store holds the ring's lock.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Protocol

from felix.auth.files import (
    MAX_JWKS_FILE_BYTES,
    jwks_path,
    load_ring,
    locked,
    ring_path,
    ring_tenants,
    save_ring,
)
from felix.auth.keys import TenantKeyRing
from felix.errors import ConfigError, NotFound

__all__ = ["Change", "FileRingStore", "RingStore"]

#: An update's change: mutate the ring, return when to store it (Unix seconds: its
#: published set is the ring's at that time), or None to leave it unchanged.
Change = Callable[[TenantKeyRing], float | None]


class RingStore(Protocol):
    """Tenant key rings, wherever they are kept (module docstring)."""

    @property
    def where(self) -> str:
        """Where the rings are, for messages ("the key directory data/auth")."""
        ...

    async def versions(self) -> dict[str, Hashable]:
        """Every tenant with a ring, with a marker that changes whenever its ring does.

        Raises:
            FelixError: the store cannot be read.
        """
        ...

    async def load(self, tenant: str) -> TenantKeyRing:
        """The tenant's ring.

        Raises:
            NotFound: the tenant has no ring.
            FelixError: it cannot be read (ConfigError: malformed; KeyUnavailable: it
                is wrapped by a region key this process does not have).
        """
        ...

    async def jwks(self, tenant: str) -> dict[str, Any] | None:
        """The JWK set published at the ring's last save (None: the tenant has no ring)."""
        ...

    async def create(self, ring: TenantKeyRing, now: float, *, replace: bool = False) -> bool:
        """Store a new ring, published as at ``now``; False (nothing stored) when the
        tenant has a ring already and ``replace`` is not set."""
        ...

    async def update(self, tenant: str, change: Change) -> TenantKeyRing:
        """Apply ``change`` to the tenant's ring under its lock and store the result if
        ``change`` asks to; the ring as it is afterwards. Whatever ``change`` raises is
        raised, and nothing is stored.

        Raises:
            NotFound: the tenant has no ring.
        """
        ...

    async def close(self) -> None:
        """Release what the store holds (connections); it may not be used afterwards."""
        ...


class FileRingStore:
    """The rings of a key directory (:mod:`felix.auth.files`); markers are the ring
    files' (device, inode, mtime, size), which an atomic replace always changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def where(self) -> str:
        return f"the key directory {self.directory}"

    async def versions(self) -> dict[str, Hashable]:
        return await asyncio.to_thread(self._versions)

    def _versions(self) -> dict[str, Hashable]:
        out: dict[str, Hashable] = {}
        for tenant in ring_tenants(self.directory):
            try:
                st = os.stat(ring_path(self.directory, tenant))
            except FileNotFoundError:  # removed since the listing
                continue
            except OSError as exc:
                raise ConfigError(f"cannot stat the key ring of {tenant!r}: {exc}") from None
            out[tenant] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        return out

    async def load(self, tenant: str) -> TenantKeyRing:
        return await asyncio.to_thread(load_ring, self.directory, tenant)

    async def jwks(self, tenant: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._jwks, tenant)

    def _jwks(self, tenant: str) -> dict[str, Any] | None:
        path = jwks_path(self.directory, tenant)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_JWKS_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            raise ConfigError(f"{path} is not valid JSON") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{path} is not a JWK set")
        return value

    async def create(self, ring: TenantKeyRing, now: float, *, replace: bool = False) -> bool:
        return await asyncio.to_thread(self._create, ring, now, replace)

    def _create(self, ring: TenantKeyRing, now: float, replace: bool) -> bool:
        with locked(self.directory, create=True):
            if not replace and ring_path(self.directory, ring.tenant).exists():
                return False
            save_ring(self.directory, ring, now)
        return True

    async def update(self, tenant: str, change: Change) -> TenantKeyRing:
        # One thread call for the whole cycle: a cancelled caller never leaves the
        # directory's lock taken (the thread finishes and releases it).
        return await asyncio.to_thread(self._update, tenant, change)

    def _update(self, tenant: str, change: Change) -> TenantKeyRing:
        if not self.directory.is_dir():
            raise NotFound(f"no key ring for tenant {tenant!r} in {self.directory}")
        with locked(self.directory):
            ring = load_ring(self.directory, tenant)
            at = change(ring)
            if at is not None:
                save_ring(self.directory, ring, at)
        return ring

    async def close(self) -> None:
        return None
