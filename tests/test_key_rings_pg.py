"""Tenant key rings in a real PostgreSQL (felix/auth/pgrings.py, one fresh database per
test, tests/pg.py): round trips, one writer per ring across stores (rotators racing
rotate once), sealing with the region key, schema versions, `felix token --cluster`,
and the node's mirror of the database into a key directory (felix/node/ring_mirror.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from felix.auth.cli import add_commands as add_token_commands
from felix.auth.files import (
    AUDIENCE,
    ISSUER,
    jwks_tenants,
    load_ring,
    ring_path,
    ring_tenants,
    save_ring,
)
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.auth.pgrings import PostgresRingStore
from felix.auth.rotation import KeyRotator, RotationPolicy
from felix.auth.tokens import verify_felix_token
from felix.errors import BadRequest, ConfigError, KeyUnavailable, NotFound, Unavailable
from felix.keys.kek import FileKeyEncryptionKey
from felix.node.ring_mirror import STATE_FILE, RingMirror
from tests import pg
from tests.aio import run

T0 = 1_700_000_000.0
TTL = 600
POLICY = RotationPolicy(interval=3600.0, lead=300.0)
PERMS = PermissionSet("acme", ["stream.publish:stream:acme/prod/*"])


@pytest.fixture
def dsn() -> Iterator[str]:
    with pg.temporary_database("felix_rings") as dsn:
        yield dsn


def new_ring(tenant: str = "acme", now: float = T0) -> TenantKeyRing:
    return TenantKeyRing.create(tenant, now, max_token_ttl=TTL, publish_ahead=60)


def kek() -> FileKeyEncryptionKey:
    return FileKeyEncryptionKey(os.urandom(32), "test key")


def kids(jwks: dict[str, list[dict[str, str]]] | None) -> list[str]:
    assert jwks is not None
    return [k["kid"] for k in jwks["keys"]]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def raw_row(dsn: str, tenant: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM felix_key_rings WHERE tenant = $1", tenant)
        assert row is not None
        return row
    finally:
        await conn.close()


def test_create_load_update_round_trip(dsn: str) -> None:
    async def main() -> None:
        store = PostgresRingStore(dsn)
        assert await store.versions() == {}
        with pytest.raises(NotFound):
            await store.load("acme")
        assert await store.jwks("acme") is None
        ring = new_ring()
        assert await store.create(ring, T0)
        assert not await store.create(new_ring(), T0)  # keygen without --force
        assert await store.versions() == {"acme": 1}
        loaded = await store.load("acme")
        assert loaded.to_dict() == ring.to_dict()
        assert kids(await store.jwks("acme")) == kids(ring.jwks(T0))

        new_kid = ""

        def rotate(r: TenantKeyRing) -> float:
            nonlocal new_kid
            new_kid = r.rotate(T0 + 100)
            return T0 + 100

        after = await store.update("acme", rotate)
        assert after.schedule()[-1].kid == new_kid
        assert await store.versions() == {"acme": 2}
        assert kids(await store.jwks("acme")) == [ring.schedule()[0].kid, new_kid]
        # A change that stores nothing leaves the version; one that raises, the ring.
        await store.update("acme", lambda r: None)

        def rotate_then_fail(r: TenantKeyRing) -> float:
            r.rotate(T0 + 9999)
            raise ValueError("changed my mind")

        with pytest.raises(ValueError):
            await store.update("acme", rotate_then_fail)
        assert await store.versions() == {"acme": 2}
        assert len((await store.load("acme")).schedule()) == 2
        with pytest.raises(NotFound):
            await store.update("zeta", lambda r: None)
        # keygen --force replaces the ring and bumps the version.
        replacement = new_ring(now=T0 + 200)
        assert await store.create(replacement, T0 + 200, replace=True)
        assert await store.versions() == {"acme": 3}
        assert (await store.load("acme")).to_dict() == replacement.to_dict()
        await store.close()

    run(main)


class SlowClock(Clock):
    """A clock that takes 0.2 s to read: the rotator reads it inside the ring's lock, so
    rotators running at once overlap there unless the store serializes them."""

    def __call__(self) -> float:
        time.sleep(0.2)
        return self.now


def test_rotators_on_several_nodes_due_at_once_rotate_once(dsn: str) -> None:
    """Each rotator runs as a node's would: its own thread, event loop and connections.
    The row lock makes each see the ring as the one before left it, so exactly one key is
    added per ring and none is lost."""

    async def setup() -> None:
        store = PostgresRingStore(dsn)
        await store.create(new_ring(), T0)
        await store.create(new_ring("zeta"), T0)
        await store.close()

    run(setup)
    rotators = [
        KeyRotator(PostgresRingStore(dsn), POLICY, clock=SlowClock(T0 + 3300)) for _ in range(4)
    ]
    start = threading.Barrier(len(rotators))
    failures: list[BaseException] = []

    def node(rotator: KeyRotator) -> None:
        async def main() -> None:
            await rotator.store.versions()  # connected and set up before the race
            await asyncio.to_thread(start.wait, 10)
            await rotator.tick()
            await rotator.tick()  # the next pass sees the new version: nothing more
            await rotator.store.close()

        try:
            run(main)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=node, args=(r,)) for r in rotators]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    assert sum(r.rotations for r in rotators) == 2  # one per ring

    async def check() -> None:
        store = PostgresRingStore(dsn)
        for tenant in ("acme", "zeta"):
            ring = await store.load(tenant)
            assert len(ring.schedule()) == 2
            assert kids(await store.jwks(tenant)) == [k.kid for k in ring.schedule()]
        assert await store.versions() == {"acme": 2, "zeta": 2}
        await store.close()

    run(check)


def test_an_update_sees_the_ring_as_the_writer_before_left_it(dsn: str) -> None:
    """A felix token rotate on one node while another node rotates the same ring: the
    second waits for the first and finds its key pending (refused), never overwrites it."""

    async def setup() -> None:
        store = PostgresRingStore(dsn)
        await store.create(new_ring(), T0)
        await store.close()

    run(setup)
    inside = threading.Event()
    first_kid = ""
    failures: list[BaseException] = []

    def slow_rotate(r: TenantKeyRing) -> float:
        nonlocal first_kid
        inside.set()
        time.sleep(0.5)
        first_kid = r.rotate(T0 + 100)
        return T0 + 100

    def first() -> None:
        async def main() -> None:
            store = PostgresRingStore(dsn)
            await store.update("acme", slow_rotate)
            await store.close()

        try:
            run(main)
        except BaseException as exc:  # reported below
            failures.append(exc)

    writer = threading.Thread(target=first)
    writer.start()

    def rotate_too(r: TenantKeyRing) -> float:
        r.rotate(T0 + 100)
        return T0 + 100

    async def second() -> None:
        store = PostgresRingStore(dsn)
        await store.versions()
        assert await asyncio.to_thread(inside.wait, 10)
        with pytest.raises(BadRequest, match="already pending"):
            await store.update("acme", rotate_too)
        ring = await store.load("acme")
        assert ring.schedule()[-1].kid == first_kid
        assert await store.versions() == {"acme": 2}
        await store.close()

    run(second)
    writer.join(10)
    assert failures == []


def test_rings_are_sealed_with_the_region_key_and_bound_to_their_tenant(dsn: str) -> None:
    async def main() -> None:
        key = kek()
        sealed = PostgresRingStore(dsn, kek=key)
        ring = new_ring()
        await sealed.create(ring, T0)
        row = await raw_row(dsn, "acme")
        assert row["kek_id"] == key.key_id and row["wrapped_key"] is not None
        secret = ring.to_dict()["keys"][0]["private_key"].encode()
        assert secret not in bytes(row["ring"]) and b"private_key" not in bytes(row["ring"])
        assert (await sealed.load("acme")).to_dict() == ring.to_dict()

        # Without the region key, or with another one: no private keys, a clear reason;
        # the public set stays readable (tokens verify on every node).
        for other in (PostgresRingStore(dsn), PostgresRingStore(dsn, kek=kek())):
            with pytest.raises(KeyUnavailable, match=key.key_id):
                await other.load("acme")
            stored = await other.fetch("acme")
            assert stored is not None and stored.ring is None and key.key_id in str(stored.problem)
            assert kids(stored.jwks) == kids(ring.jwks(T0))
            await other.close()

        # A sealed ring copied to another tenant's row does not open there.
        conn = await asyncpg.connect(dsn)
        await conn.execute(
            "INSERT INTO felix_key_rings (tenant, version, ring, wrapped_key, kek_id, jwks,"
            " saved_at) SELECT 'zeta', 1, ring, wrapped_key, kek_id, jwks, saved_at"
            " FROM felix_key_rings WHERE tenant = 'acme'"
        )
        with pytest.raises(KeyUnavailable):
            await sealed.load("zeta")
        # Nor does an altered one.
        await conn.execute(
            "UPDATE felix_key_rings SET ring = overlay(ring placing '\\x00'::bytea from 20)"
            " WHERE tenant = 'acme'"
        )
        await conn.close()
        with pytest.raises(KeyUnavailable):
            await sealed.load("acme")

        # Without a region key rings are written as the key directory holds them.
        plain = PostgresRingStore(dsn)
        await plain.create(new_ring("plain"), T0)
        row = await raw_row(dsn, "plain")
        assert row["kek_id"] is None and row["wrapped_key"] is None
        assert json.loads(bytes(row["ring"]))["tenant"] == "plain"
        await plain.close()
        await sealed.close()

    run(main)


def test_schema_is_set_up_once_and_a_newer_one_is_refused(dsn: str) -> None:
    async def main() -> None:
        stores = [PostgresRingStore(dsn) for _ in range(4)]
        assert await asyncio.gather(*(s.versions() for s in stores)) == [{}] * 4  # racing
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT count(*) FROM felix_key_ring_migrations") == 1
        await conn.execute(
            "INSERT INTO felix_key_ring_migrations (version, description) VALUES (99, 'x')"
        )
        await conn.close()
        with pytest.raises(ConfigError, match=r"\[99\]"):
            await PostgresRingStore(dsn).versions()
        for store in stores:
            await store.close()
        with pytest.raises(Unavailable):
            await PostgresRingStore("postgresql://postgres@127.0.0.1:1/x", timeout=1).versions()

    run(main)


def token_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_token_commands(parser.add_subparsers())
    args = parser.parse_args(["token", *argv])
    status: int = args.func(args)
    return status


def test_felix_token_commands_on_the_cluster_database(
    dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_file = tmp_path / "region.key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    monkeypatch.delenv("FELIX_AUTH_DIR", raising=False)
    monkeypatch.setenv("FELIX_CLUSTER", dsn)
    monkeypatch.setenv("FELIX_REGION_KEY_FILE", str(key_file))
    monkeypatch.chdir(tmp_path)
    assert token_cli("keygen", "--tenant", "acme", "--max-ttl", "60") == 0
    assert "in the cluster's database" in capsys.readouterr().out
    assert token_cli("keygen", "--tenant", "acme") == 2  # exists, no --force
    assert not (tmp_path / "data").exists()  # nothing went to the default key directory
    assert token_cli("rotate", "--tenant", "acme") == 0
    assert "published key" in capsys.readouterr().out
    assert token_cli("rotate", "--tenant", "acme") == 1  # a rotation is pending
    capsys.readouterr()
    assert token_cli("jwks", "--tenant", "acme") == 0
    jwks = json.loads(capsys.readouterr().out)
    assert len(jwks["keys"]) == 2
    perm = "stream.publish:stream:acme/prod/*"
    assert token_cli("mint", "--tenant", "acme", "--sub", "svc", "--perm", perm) == 0
    token = capsys.readouterr().out.strip()
    claims = verify_felix_token(
        token, jwks, issuer=ISSUER, audience=AUDIENCE, now=time.time(), leeway=5
    )
    assert claims.sub == "svc"
    row = asyncio.run(raw_row(dsn, "acme"))
    assert row["kek_id"] == FileKeyEncryptionKey.load(key_file).key_id
    # --dir names a key directory: the environment's cluster is not used.
    assert token_cli("jwks", "--tenant", "acme", "--dir", str(tmp_path / "auth")) == 1
    assert token_cli("jwks", "--tenant", "acme", "--dir", "x", "--cluster", dsn) == 2
    # Without the region key the sealed ring cannot be read (the public set can).
    monkeypatch.delenv("FELIX_REGION_KEY_FILE")
    capsys.readouterr()
    assert token_cli("mint", "--tenant", "acme", "--sub", "svc", "--perm", perm) == 1
    assert "region key" in capsys.readouterr().err
    assert token_cli("jwks", "--tenant", "acme", "--cluster", dsn) == 0


def test_the_mirror_keeps_a_key_directory_equal_to_the_database(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "auth"
    # A ring from before the node joined the cluster, for a tenant the cluster also has,
    # and one the cluster does not know: both kept aside, never used.
    save_ring(keys, new_ring("acme"), T0)
    save_ring(keys, new_ring("old"), T0)

    async def main() -> None:
        key = kek()
        store = PostgresRingStore(dsn, kek=key)
        acme = new_ring("acme")
        await store.create(acme, T0)
        await store.create(new_ring("zeta"), T0)
        mirror = RingMirror(store, keys, period=1.0)
        await mirror.step()
        assert ring_tenants(keys) == ["acme", "zeta"] == jwks_tenants(keys)
        assert load_ring(keys, "acme").to_dict() == acme.to_dict()
        assert ring_path(keys, "acme").stat().st_mode & 0o777 == 0o600
        aside = sorted(p.name for p in keys.iterdir() if ".replaced-" in p.name)
        assert [n.split(".replaced-")[0] for n in aside] == [".acme.ring.json", ".old.ring.json"]
        assert "not used" in caplog.text
        assert mirror.writes == 2 and mirror.removals == 1

        # A rotation anywhere in the cluster: written at the next pass, nothing else is.
        zeta_inode = ring_path(keys, "zeta").stat().st_ino

        def rotate(r: TenantKeyRing) -> float:
            r.rotate(T0 + 10)
            return T0 + 10

        await store.update("acme", rotate)
        await mirror.step()
        assert len(load_ring(keys, "acme").schedule()) == 2
        assert ring_path(keys, "zeta").stat().st_ino == zeta_inode
        assert json.loads((keys / STATE_FILE).read_text()) == {"acme": 2, "zeta": 1}

        # A restarted node (a new mirror, its state from the file) rewrites nothing.
        acme_inode = ring_path(keys, "acme").stat().st_ino
        again = RingMirror(store, keys, period=1.0)
        await again.step()
        assert again.writes == 0
        assert ring_path(keys, "acme").stat().st_ino == acme_inode

        # A ring sealed with a region key this node lacks: its public set only.
        other = PostgresRingStore(dsn, kek=kek())
        await other.create(new_ring("foreign"), T0)
        await again.step()
        assert "foreign" in jwks_tenants(keys) and "foreign" not in ring_tenants(keys)
        assert "cannot mint" in caplog.text

        # A ring gone from the database: its files go too (the tenant is denied).
        conn = await asyncpg.connect(dsn)
        await conn.execute("DELETE FROM felix_key_rings WHERE tenant = 'zeta'")
        await conn.close()
        await again.step()
        assert "zeta" not in ring_tenants(keys) and "zeta" not in jwks_tenants(keys)
        assert not any(".zeta.ring.json.replaced" in p.name for p in keys.iterdir())
        await other.close()
        await store.close()

    run(main)
