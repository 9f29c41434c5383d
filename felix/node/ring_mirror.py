"""A cluster's node mirrors the tenants' key rings of the cluster's database into DATA_DIR/auth.

How it works
------------
With ``--auth``, in a cluster whose nodes embed the control plane on PostgreSQL (the
cluster's database, unless ``--control-store`` names another), the tenants' key rings
live in that database (:mod:`felix.auth.pgrings`), so every node signs and verifies
with the same keys. Whatever reads ``DATA_DIR/auth`` keeps reading it: the gateways
(:class:`~felix.auth.files.JwksDirectory`, the public sets), the control process
(token exchange, JWKS route, Felix tokens on its API) and the bridges' own tokens. The
supervisor, the only process holding the DSN, runs :class:`RingMirror`:

- Every ``period`` seconds (``--jwks-refresh``) one query lists the rings and their
  versions; each ring whose version is not the one mirrored last is read and written:
  ``T.jwks.json`` (the set stored with the ring) and then ``T.ring.json`` (mode 0600),
  each atomically (:func:`~felix.auth.files.save_ring`). The versions mirrored, and
  whether the private ring was written (else the region key this node had), are kept
  in ``DATA_DIR/auth/.cluster-rings.json``, so a restart rewrites nothing that did not
  change, and a node restarted with the region key it lacked writes the rings it
  could not open before.
- A ring sealed with a region key this node does not have: only its public set is
  written (tokens verify here; this node cannot mint for the tenant), with a warning
  (once per tenant and sealing key).
- A row that cannot be used at all (its public set does not parse): that tenant's
  files are kept as they are, with a warning (once per tenant and version); the other
  tenants are mirrored.
- A tenant whose ring left the database: its files are removed (it is denied here).
- A ring file the mirror did not write (made before the node joined the cluster, or
  before the cluster kept its rings in the database, or by ``felix token keygen
  --dir`` on the node), for a tenant the database has no ring for: it is imported
  into the database (inserted only if still absent, so of several nodes holding one
  the first wins; sealed with the region key when the node has one, and refused
  while the table holds sealed rings and the node has no region key).
- A ring file the mirror did not write, for a tenant the database has a ring for (the
  import of another node won, or the ring was made there): it is never overwritten or
  deleted: it is renamed ``.T.ring.json.replaced-UNIXTIME`` (ignored by everything)
  with a warning, and the database's ring is mirrored; tokens its keys signed stop
  verifying here unless the database's ring holds the same keys.
- A failed pass (database unreachable) keeps the files as they are, so tokens keep
  verifying, and is retried after 1 s, doubling up to ``period``.

Staleness: a ring stored at time t is in every live node's ``DATA_DIR/auth`` by
``t + period`` (plus up to another ``period`` after a failed pass), and the gateways'
file recheck adds 2 s. Rotation publishes a key ``--key-publish-lead`` before it signs
(:mod:`felix.auth.rotation`), so with the lead above twice the period plus a few
seconds (:meth:`~felix.auth.rotation.RotationPolicy.covers`; the node warns when it is
not), every node knows a key before the first token signed with it exists, whichever
node minted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from felix.auth.files import (
    jwks_path,
    jwks_tenants,
    load_ring,
    remove_jwks,
    ring_path,
    ring_tenants,
    save_jwks,
    save_ring,
)
from felix.auth.keys import TenantKeyRing
from felix.auth.pgrings import PostgresRingStore, StoredRing
from felix.cancel import raise_if_cancelled
from felix.errors import BadRequest, FelixError, KeyUnavailable, Unavailable
from felix.keys.kek import write_atomic

__all__ = ["STATE_FILE", "Mirrored", "RingMirror"]

log = logging.getLogger("felix.node.ring_mirror")

#: The versions mirrored last, in the key directory (a dot file: not a tenant's).
STATE_FILE = ".cluster-rings.json"
#: First retry delay after a failed pass, in seconds (doubles up to the period).
RETRY_MIN = 1.0


@dataclass(frozen=True, slots=True)
class Mirrored:
    """What the mirror wrote of a tenant's ring: its ``version``, whether the private
    ``ring`` was written, and if not the region key this node had then (``kek``)."""

    version: int
    ring: bool
    kek: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "ring": self.ring, "kek": self.kek}

    @classmethod
    def from_json(cls, value: object) -> Mirrored | None:
        if isinstance(value, int) and not isinstance(value, bool):
            # Written by an older felix: a version only. Taken as a written ring, which
            # is rewritten if its file is missing.
            return cls(value, True)
        if not isinstance(value, dict):
            return None
        version, ring, kek = value.get("version"), value.get("ring"), value.get("kek")
        if not isinstance(version, int) or isinstance(version, bool):
            return None
        if not isinstance(ring, bool) or not (kek is None or isinstance(kek, str)):
            return None
        return cls(version, ring, kek)


def _unreachable(exc: FelixError) -> bool:
    """Whether ``exc`` says the database is unreachable (the pass fails), not that one
    ring is unusable here (a region key missing is an Unavailable too)."""
    return isinstance(exc, Unavailable) and not isinstance(exc, KeyUnavailable)


class RingMirror:
    """Keeps ``directory``'s rings and JWK sets equal to ``store``'s (module docstring).

    :meth:`run` mirrors until cancelled; ``synced`` is set after the first pass that
    reached the database (the supervisor waits for it, bounded, before the gateways
    start).
    """

    def __init__(self, store: PostgresRingStore, directory: Path, *, period: float) -> None:
        self.store = store
        self.directory = Path(directory)
        self.period = period
        self.synced = asyncio.Event()
        self._state: dict[str, Mirrored] | None = None  # loaded on the first pass
        # Per tenant present in the database, what it was last warned about.
        self._warned: dict[str, Hashable] = {}
        self.writes = 0
        self.removals = 0
        self.imports = 0
        self.failures = 0

    @property
    def _kek_id(self) -> str | None:
        return None if self.store.kek is None else self.store.kek.key_id

    def _warn_once(self, tenant: str, about: Hashable, message: str, *args: object) -> None:
        """Log a warning about ``tenant`` unless its last one was ``about`` the same."""
        if self._warned.get(tenant) != about:
            self._warned[tenant] = about
            log.warning(message, *args)

    async def run(self) -> None:
        """Mirror every ``period`` seconds until cancelled."""
        failures = 0
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a bad pass end the mirror
                raise_if_cancelled()
                failures += 1
                self.failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "cannot mirror the cluster's key rings (keeping the files): %s", exc)
                await asyncio.sleep(min(RETRY_MIN * 2 ** (failures - 1), self.period))
                continue
            failures = 0
            self.synced.set()
            await asyncio.sleep(self.period)

    async def step(self) -> None:
        """One pass: import the local rings the database lacks, write the rings that
        changed, remove the ones gone."""
        if self._state is None:
            self._state = await asyncio.to_thread(self._load_state)
        versions = await self.store.versions()
        if await self._import_local(versions):
            versions = await self.store.versions()
        changed: list[StoredRing] = []
        for tenant, version in list(versions.items()):
            try:
                if await asyncio.to_thread(self._current, tenant, version):
                    continue
            except BadRequest:  # not a tenant's name (written by hand): not ours
                del versions[tenant]
                continue
            try:
                stored = await self.store.fetch(tenant)
            except FelixError as exc:  # this row only: keep its files, mirror the others
                if _unreachable(exc):
                    raise
                self._warn_once(
                    tenant,
                    ("unusable", version),
                    "tenant %r: cannot mirror version %s of its key ring (keeping its "
                    "files as they are): %s",
                    tenant,
                    version,
                    exc,
                )
                continue
            if stored is not None:
                changed.append(stored)
        await asyncio.to_thread(self._apply, changed, set(versions))

    def _current(self, tenant: str, version: Hashable) -> bool:
        """Whether the files of ``tenant`` hold ``version`` as well as this node can."""
        entry = self._state.get(tenant) if self._state is not None else None
        if entry is None or entry.version != version:
            return False
        if not jwks_path(self.directory, tenant).exists():
            return False
        if entry.ring:
            return ring_path(self.directory, tenant).exists()
        return entry.kek == self._kek_id  # another region key since: try to open it again

    async def _import_local(self, versions: dict[str, Any]) -> list[str]:
        """Insert into the database the local rings it has no ring for and that this
        mirror did not write (module docstring); the tenants imported."""
        state = self._state
        assert state is not None
        local = await asyncio.to_thread(ring_tenants, self.directory)
        imported: list[str] = []
        for tenant in local:
            if tenant in versions or tenant in state:
                continue
            try:
                ring: TenantKeyRing = await asyncio.to_thread(load_ring, self.directory, tenant)
                created = await self.store.create(ring, time.time())
            except FelixError as exc:
                if _unreachable(exc):
                    raise
                log.warning(
                    "tenant %r: cannot import %s into the cluster's database: %s",
                    tenant,
                    ring_path(self.directory, tenant),
                    exc,
                )
                continue
            if created:
                # Ours now: the ring mirrored back (the same keys) replaces the file.
                state[tenant] = Mirrored(0, True)
                imported.append(tenant)
                self.imports += 1
                log.warning(
                    "tenant %r: imported %s into the cluster's database (%s); every node "
                    "now uses this ring",
                    tenant,
                    ring_path(self.directory, tenant),
                    "sealed with region key " + self.store.kek.key_id
                    if self.store.kek is not None
                    else "not sealed",
                )
        return imported

    def _apply(self, changed: list[StoredRing], present: set[str]) -> None:
        """Write ``changed``; remove the files of tenants not ``present`` (blocking)."""
        state = self._state
        assert state is not None
        before = dict(state)
        for stored in changed:
            tenant = stored.tenant
            try:
                if stored.ring is not None:
                    self._set_aside_foreign(tenant)
                    save_ring(self.directory, stored.ring, stored.saved_at, jwks=stored.jwks)
                    self._warned.pop(tenant, None)
                    entry = Mirrored(stored.version, True)
                else:
                    save_jwks(self.directory, tenant, stored.jwks)
                    self._drop_ring_file(tenant)
                    self._warn_once(
                        tenant,
                        ("public only", stored.kek_id, stored.problem),
                        "tenant %r: only the public keys of its ring are mirrored here "
                        "(tokens verify; this node cannot mint for it): %s",
                        tenant,
                        stored.problem,
                    )
                    entry = Mirrored(stored.version, False, self._kek_id)
            except FelixError as exc:
                log.warning("cannot mirror the key ring of tenant %r: %s", tenant, exc)
                continue
            state[tenant] = entry
            self.writes += 1
            kids = ", ".join(str(k.get("kid")) for k in stored.jwks.get("keys", []))
            log.info("tenant %r: key ring version %d mirrored [%s]", tenant, stored.version, kids)
        local = set(ring_tenants(self.directory)) | set(jwks_tenants(self.directory))
        for tenant in sorted(local - present):
            try:
                self._set_aside_foreign(tenant)
                self._drop_ring_file(tenant)
                remove_jwks(self.directory, tenant)
            except FelixError as exc:
                log.warning("cannot remove the keys of tenant %r: %s", tenant, exc)
                continue
            self.removals += 1
            log.info("tenant %r: no key ring in the cluster's database; its keys removed", tenant)
        for tenant in list(state):
            if tenant not in present:
                del state[tenant]
        for tenant in list(self._warned):
            if tenant not in present:
                del self._warned[tenant]
        if state != before:
            self._save_state(state)

    def _set_aside_foreign(self, tenant: str) -> None:
        """Rename a ring file the mirror did not write (kept, never used again)."""
        path = ring_path(self.directory, tenant)
        if self._state is None or tenant in self._state or not path.exists():
            return
        aside = path.with_name(f".{path.name}.replaced-{int(time.time())}")
        os.replace(path, aside)
        log.warning(
            "tenant %r: %s was not written from the cluster's database, whose key rings this "
            "node uses; kept as %s (not used)",
            tenant,
            path,
            aside.name,
        )

    def _drop_ring_file(self, tenant: str) -> None:
        """Remove the mirrored ring file of ``tenant`` (a foreign one is set aside first)."""
        self._set_aside_foreign(tenant)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ring_path(self.directory, tenant))

    def _load_state(self) -> dict[str, Mirrored]:
        try:
            value = json.loads((self.directory / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.directory / STATE_FILE, exc)
            return {}
        if not isinstance(value, dict):
            return {}
        state: dict[str, Mirrored] = {}
        for tenant, entry in value.items():
            mirrored = Mirrored.from_json(entry)
            if isinstance(tenant, str) and mirrored is not None:
                state[tenant] = mirrored
        return state

    def _save_state(self, state: dict[str, Mirrored]) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            plain = {tenant: entry.to_json() for tenant, entry in state.items()}
            data = json.dumps(plain, sort_keys=True).encode("utf-8")
            write_atomic(self.directory / STATE_FILE, data, 0o600)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.directory / STATE_FILE, exc)
