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
  each atomically (:func:`~felix.auth.files.save_ring`). The versions mirrored are
  kept in ``DATA_DIR/auth/.cluster-rings.json``, so a restart rewrites nothing that
  did not change.
- A ring sealed with a region key this node does not have: only its public set is
  written (tokens verify here; this node cannot mint for the tenant), with a warning.
- A tenant whose ring left the database: its files are removed (it is denied here).
- A ring file the mirror did not write (made before the node joined the cluster, or
  by ``felix token keygen --dir`` on the node) is never overwritten or deleted: it is
  renamed ``.T.ring.json.replaced-UNIXTIME`` (ignored by everything) with a warning.
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
from pathlib import Path

from felix.auth.files import (
    jwks_path,
    jwks_tenants,
    remove_jwks,
    ring_path,
    ring_tenants,
    save_jwks,
    save_ring,
)
from felix.auth.pgrings import PostgresRingStore, StoredRing
from felix.errors import BadRequest, FelixError
from felix.keys.kek import write_atomic

__all__ = ["STATE_FILE", "RingMirror"]

log = logging.getLogger("felix.node.ring_mirror")

#: The versions mirrored last, in the key directory (a dot file: not a tenant's).
STATE_FILE = ".cluster-rings.json"
#: First retry delay after a failed pass, in seconds (doubles up to the period).
RETRY_MIN = 1.0


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
        self._state: dict[str, int] | None = None  # loaded on the first pass
        self._warned: set[tuple[str, int]] = set()
        self.writes = 0
        self.removals = 0
        self.failures = 0

    async def run(self) -> None:
        """Mirror every ``period`` seconds until cancelled."""
        failures = 0
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a bad pass end the mirror
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
        """One pass: write the rings that changed, remove the ones gone."""
        if self._state is None:
            self._state = await asyncio.to_thread(self._load_state)
        state = self._state
        versions = await self.store.versions()
        changed: list[StoredRing] = []
        for tenant, version in list(versions.items()):
            try:
                if state.get(tenant) == version and jwks_path(self.directory, tenant).exists():
                    continue
            except BadRequest:  # not a tenant's name (written by hand): not ours
                del versions[tenant]
                continue
            stored = await self.store.fetch(tenant)
            if stored is not None:
                changed.append(stored)
        await asyncio.to_thread(self._apply, changed, set(versions))

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
                else:
                    save_jwks(self.directory, tenant, stored.jwks)
                    self._drop_ring_file(tenant)
                    if (tenant, stored.version) not in self._warned:
                        self._warned.add((tenant, stored.version))
                        log.warning(
                            "tenant %r: only the public keys of its ring are mirrored here "
                            "(tokens verify; this node cannot mint for it): %s",
                            tenant,
                            stored.problem,
                        )
            except FelixError as exc:
                log.warning("cannot mirror the key ring of tenant %r: %s", tenant, exc)
                continue
            state[tenant] = stored.version
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

    def _load_state(self) -> dict[str, int]:
        try:
            value = json.loads((self.directory / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.directory / STATE_FILE, exc)
            return {}
        if not isinstance(value, dict):
            return {}
        return {t: v for t, v in value.items() if isinstance(t, str) and isinstance(v, int)}

    def _save_state(self, state: dict[str, int]) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            data = json.dumps(state, sort_keys=True).encode("utf-8")
            write_atomic(self.directory / STATE_FILE, data, 0o600)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.directory / STATE_FILE, exc)
