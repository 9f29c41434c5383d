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
from felix.cluster.store import ClusterStore
from felix.errors import (
    BadRequest,
    ConfigError,
    KeyUnavailable,
    NotFound,
    Unauthenticated,
    Unavailable,
)
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

        # Without a region key a ring is not written beside sealed ones (nor over one,
        # keygen --force)...
        plain = PostgresRingStore(dsn)
        with pytest.raises(ConfigError, match=f"sealed with region key {key.key_id}"):
            await plain.create(new_ring("plain"), T0)
        with pytest.raises(ConfigError, match="--unsealed"):
            await plain.create(new_ring("acme"), T0, replace=True)
        assert (await raw_row(dsn, "acme"))["kek_id"] == key.key_id
        assert await plain.versions() == {"acme": 1, "zeta": 1}
        await plain.close()
        # ... unless meant: then as the key directory holds it.
        plain = PostgresRingStore(dsn, allow_unsealed=True)
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


async def make_cluster(dsn: str, region: str = "eu1") -> None:
    """Make ``dsn`` a cluster's database, as its first node does."""
    store = await ClusterStore.open(dsn, logical_shards=16, region=region)
    await store.close()


async def tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


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
    monkeypatch.delenv("FELIX_CONTROL_STORE", raising=False)
    monkeypatch.setenv("FELIX_CLUSTER", dsn)
    monkeypatch.setenv("FELIX_REGION_KEY_FILE", str(key_file))
    monkeypatch.chdir(tmp_path)
    # Not a cluster's database (yet): refused, and nothing is created there.
    assert token_cli("keygen", "--tenant", "acme", "--max-ttl", "60") == 2
    assert "is not a felix cluster's database" in capsys.readouterr().err
    assert asyncio.run(tables(dsn)) == set()
    asyncio.run(make_cluster(dsn))
    assert token_cli("keygen", "--tenant", "acme", "--max-ttl", "60") == 0
    out = capsys.readouterr()
    assert "in the cluster's database" in out.out and "unsealed" not in out.err
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
    assert claims.sub == "svc" and claims.region == "eu1"  # the cluster's region
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
    capsys.readouterr()
    # Nor can it put an unsealed ring beside the sealed one, or over it, unless meant.
    for argv in (["--tenant", "zeta"], ["--tenant", "acme", "--force"]):
        assert token_cli("keygen", *argv) == 2
        assert "sealed with region key" in capsys.readouterr().err
    assert asyncio.run(raw_row(dsn, "acme"))["kek_id"] is not None
    assert token_cli("keygen", "--tenant", "zeta", "--unsealed") == 0
    assert "warning: the key ring of tenant 'zeta' is stored unsealed" in capsys.readouterr().err
    assert asyncio.run(raw_row(dsn, "zeta"))["kek_id"] is None


def test_felix_token_uses_the_nodes_control_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """$FELIX_CONTROL_STORE (felix up's --control-store) is where the nodes keep the
    rings, whatever $FELIX_CLUSTER says; a database that is neither a cluster's nor holds
    rings is refused; an unsealed ring is written with a warning."""
    with (
        pg.temporary_database("felix_rings_cluster") as cluster,
        pg.temporary_database("felix_rings_control") as control,
    ):
        asyncio.run(make_cluster(cluster))
        monkeypatch.delenv("FELIX_AUTH_DIR", raising=False)
        monkeypatch.delenv("FELIX_REGION_KEY_FILE", raising=False)
        monkeypatch.setenv("FELIX_CLUSTER", cluster)
        monkeypatch.setenv("FELIX_CONTROL_STORE", control)
        monkeypatch.chdir(tmp_path)
        # The control store no node has used with --auth yet: refused, untouched.
        assert token_cli("keygen", "--tenant", "acme") == 2
        assert "not a felix cluster's database" in capsys.readouterr().err
        assert asyncio.run(tables(control)) == set()

        # A node there with --auth (its mirror made the table): the rings go there.
        asyncio.run(PostgresRingStore(control).versions())
        assert token_cli("keygen", "--tenant", "acme") == 0
        out = capsys.readouterr()
        assert "created the key ring" in out.out
        assert "stored unsealed" in out.err  # no region key: said on stderr
        assert token_cli("rotate", "--tenant", "acme") == 0
        assert "stored unsealed" in capsys.readouterr().err

        async def versions(dsn: str) -> dict[str, object]:
            store = PostgresRingStore(dsn)
            try:
                return await store.versions()
            finally:
                await store.close()

        assert asyncio.run(versions(control)) == {"acme": 2}
        assert asyncio.run(versions(cluster)) == {}
        # --cluster still names a database outright; a control store that is not
        # PostgreSQL means the nodes keep their rings in DATA_DIR/auth.
        assert token_cli("jwks", "--tenant", "acme", "--cluster", cluster) == 1
        monkeypatch.setenv("FELIX_CONTROL_STORE", "sqlite:///data/control.db")
        assert token_cli("jwks", "--tenant", "acme") == 1
        assert "data/auth" in capsys.readouterr().err


def test_the_mirror_keeps_a_key_directory_equal_to_the_database(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "auth"
    # A ring from before the node joined the cluster, for a tenant the cluster also has:
    # kept aside, never used; one for a tenant the cluster does not know: imported.
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
        assert ring_tenants(keys) == ["acme", "old", "zeta"] == jwks_tenants(keys)
        assert load_ring(keys, "acme").to_dict() == acme.to_dict()
        assert ring_path(keys, "acme").stat().st_mode & 0o777 == 0o600
        aside = sorted(p.name for p in keys.iterdir() if ".replaced-" in p.name)
        assert [n.split(".replaced-")[0] for n in aside] == [".acme.ring.json"]
        assert "not used" in caplog.text
        assert mirror.writes == 3 and mirror.removals == 0 and mirror.imports == 1
        assert await store.versions() == {"acme": 1, "old": 1, "zeta": 1}

        # A rotation anywhere in the cluster: written at the next pass, nothing else is.
        zeta_inode = ring_path(keys, "zeta").stat().st_ino

        def rotate(r: TenantKeyRing) -> float:
            r.rotate(T0 + 10)
            return T0 + 10

        await store.update("acme", rotate)
        await mirror.step()
        assert len(load_ring(keys, "acme").schedule()) == 2
        assert ring_path(keys, "zeta").stat().st_ino == zeta_inode
        assert json.loads((keys / STATE_FILE).read_text()) == {
            "acme": {"version": 2, "ring": True, "kek": None},
            "old": {"version": 1, "ring": True, "kek": None},
            "zeta": {"version": 1, "ring": True, "kek": None},
        }

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


def test_a_node_restarted_with_the_region_key_writes_the_rings_it_could_not_open(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "auth"

    async def main() -> None:
        key = kek()
        sealed = PostgresRingStore(dsn, kek=key)
        ring = new_ring()
        await sealed.create(ring, T0)
        # Started without the region key: the public set only, once, and no re-reads.
        keyless = PostgresRingStore(dsn)
        mirror = RingMirror(keyless, keys, period=1.0)
        await mirror.step()
        await mirror.step()
        assert jwks_tenants(keys) == ["acme"] and ring_tenants(keys) == []
        assert mirror.writes == 1 and caplog.text.count("cannot mint") == 1
        await keyless.close()
        # Restarted with it, the ring unchanged: the ring is written now.
        restarted = RingMirror(sealed, keys, period=1.0)
        await restarted.step()
        assert ring_tenants(keys) == ["acme"]
        assert load_ring(keys, "acme").to_dict() == ring.to_dict()
        assert restarted.writes == 1
        # ... once; and a mirrored ring file deleted by hand comes back.
        await RingMirror(sealed, keys, period=1.0).step()
        assert restarted.writes == 1
        ring_path(keys, "acme").unlink()
        again = RingMirror(sealed, keys, period=1.0)
        await again.step()
        assert again.writes == 1 and ring_tenants(keys) == ["acme"]
        await sealed.close()

    run(main)


def test_the_state_file_of_an_older_felix_is_read(dsn: str, tmp_path: Path) -> None:
    """Versions only: a ring file present is taken as mirrored; one missing is written."""
    keys = tmp_path / "auth"

    async def main() -> None:
        store = PostgresRingStore(dsn, allow_unsealed=True)
        for tenant in ("acme", "zeta"):
            await store.create(new_ring(tenant), T0)
        await RingMirror(store, keys, period=1.0).step()
        ring_path(keys, "zeta").unlink()  # as an old node that could not open it left it
        (keys / STATE_FILE).write_text(json.dumps({"acme": 1, "zeta": 1}))
        mirror = RingMirror(store, keys, period=1.0)
        await mirror.step()
        assert mirror.writes == 1 and ring_tenants(keys) == ["acme", "zeta"]
        assert json.loads((keys / STATE_FILE).read_text())["acme"] == 1  # not rewritten
        await store.close()

    run(main)


def test_an_unusable_row_stops_the_mirror_of_its_tenant_only(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "auth"

    async def main() -> None:
        store = PostgresRingStore(dsn, kek=kek())
        for tenant in ("acme", "beta", "zeta"):
            await store.create(new_ring(tenant), T0)
        mirror = RingMirror(store, keys, period=0.05)
        await mirror.step()
        beta_jwks = (keys / "beta.jwks.json").read_bytes()
        beta_ring = ring_path(keys, "beta").read_bytes()
        conn = await asyncpg.connect(dsn)
        await conn.execute(
            "UPDATE felix_key_rings SET jwks = '{\"keys\": 7}', version = version + 1"
            " WHERE tenant = 'beta'"
        )

        def rotate(r: TenantKeyRing) -> float:
            r.rotate(T0 + 10)
            return T0 + 10

        for tenant in ("acme", "zeta"):
            await store.update(tenant, rotate)
        # A fresh node (its first pass must succeed for it to start) and this one.
        fresh = RingMirror(store, tmp_path / "fresh", period=0.05)
        task = asyncio.create_task(fresh.run())
        await asyncio.wait_for(fresh.synced.wait(), 5)
        task.cancel()
        assert ring_tenants(tmp_path / "fresh") == ["acme", "zeta"]
        await mirror.step()
        await mirror.step()
        for tenant in ("acme", "zeta"):
            assert len(load_ring(keys, tenant).schedule()) == 2
        # beta's files are kept as they were (tokens keep verifying), warned about once.
        assert (keys / "beta.jwks.json").read_bytes() == beta_jwks
        assert ring_path(keys, "beta").read_bytes() == beta_ring
        assert caplog.text.count("cannot mirror version 2 of its key ring") == 2  # per node
        # A later version is warned about again; a tenant gone is forgotten.
        await conn.execute("UPDATE felix_key_rings SET version = 3 WHERE tenant = 'beta'")
        await mirror.step()
        await mirror.step()
        assert caplog.text.count("cannot mirror version 3 of its key ring") == 1
        assert "beta" in mirror._warned
        await conn.execute("DELETE FROM felix_key_rings WHERE tenant = 'beta'")
        await conn.close()
        await mirror.step()
        assert "beta" not in mirror._warned and "beta" not in jwks_tenants(keys)
        await store.close()

    run(main)


def test_an_upgraded_clusters_local_rings_are_imported_the_first_node_winning(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nodes that kept their rings in DATA_DIR/auth before the cluster kept them in
    its database (each its own acme ring, and one tenant only it has) start mirroring at
    once: every ring lands in the database, sealed, one acme ring wins; tokens its keys
    signed verify on both nodes; the loser's old acme ring is kept aside, unused."""
    dirs = [tmp_path / "a" / "auth", tmp_path / "b" / "auth"]
    old_acme = [new_ring("acme"), new_ring("acme")]
    for directory, acme, only in zip(dirs, old_acme, ("zeta", "omega"), strict=True):
        save_ring(directory, acme, T0)
        save_ring(directory, new_ring(only), T0)
    key = kek()
    perms = PermissionSet("acme", ["stream.publish:stream:acme/prod/*"])
    now = time.time()
    old_tokens = [
        ring.mint(now, issuer=ISSUER, audience=AUDIENCE, sub="old", perms=perms, ttl=TTL)
        for ring in old_acme
    ]

    async def main() -> None:
        stores = [PostgresRingStore(dsn, kek=key) for _ in dirs]
        await stores[0].versions()  # the table exists (the nodes start together)
        mirrors = [RingMirror(s, d, period=1.0) for s, d in zip(stores, dirs, strict=True)]
        await asyncio.gather(*(m.step() for m in mirrors))
        await asyncio.gather(*(m.step() for m in mirrors))
        assert await stores[0].versions() == {"acme": 1, "omega": 1, "zeta": 1}
        conn = await asyncpg.connect(dsn)
        kek_ids = await conn.fetch("SELECT DISTINCT kek_id FROM felix_key_rings")
        await conn.close()
        assert [r["kek_id"] for r in kek_ids] == [key.key_id]
        winner = await stores[0].load("acme")
        won = [i for i, r in enumerate(old_acme) if r.to_dict() == winner.to_dict()]
        assert len(won) == 1
        lost = 1 - won[0]
        assert sum(m.imports for m in mirrors) == 3
        for directory in dirs:
            assert ring_tenants(directory) == ["acme", "omega", "zeta"]
            assert load_ring(directory, "acme").to_dict() == winner.to_dict()
            jwks = json.loads((directory / "acme.jwks.json").read_text())
            claims = verify_felix_token(
                old_tokens[won[0]], jwks, issuer=ISSUER, audience=AUDIENCE, now=now, leeway=5
            )
            assert claims.sub == "old"
            # The other node's old ring's tokens: not verified any more (docs say so).
            with pytest.raises(Unauthenticated, match="unknown key"):
                verify_felix_token(
                    old_tokens[lost], jwks, issuer=ISSUER, audience=AUDIENCE, now=now, leeway=5
                )
        aside = [p.name for p in dirs[lost].iterdir() if ".replaced-" in p.name]
        assert [n.split(".replaced-")[0] for n in aside] == [".acme.ring.json"]
        assert not any(".replaced-" in p.name for p in dirs[won[0]].iterdir())

        # A node without the region key does not put its ring unsealed beside sealed ones.
        lone = tmp_path / "c" / "auth"
        save_ring(lone, new_ring("solo"), T0)
        keyless = PostgresRingStore(dsn)
        await RingMirror(keyless, lone, period=1.0).step()
        assert "solo" not in await keyless.versions()
        assert "cannot import" in caplog.text and "sealed with region key" in caplog.text
        for store in (*stores, keyless):
            await store.close()

    run(main)


def test_a_rotator_without_the_region_key_leaves_sealed_rings_alone(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        key = kek()
        sealed = PostgresRingStore(dsn, kek=key)
        await sealed.create(new_ring(), T0)
        clock = Clock(T0 + 3300)  # due
        keyless = PostgresRingStore(dsn)
        rotator = KeyRotator(keyless, POLICY, clock=clock, max_sleep=5)
        for _ in range(3):
            await rotator.tick()
            clock.now += 10
        assert rotator.rotations == 0
        assert caplog.text.count("key rotation of tenant 'acme'") == 1
        assert key.key_id in caplog.text
        # A node with the key rotates it: looked at again, still not openable, no new
        # warning; a tenant gone is forgotten.
        await KeyRotator(sealed, POLICY, clock=clock).tick()
        assert await sealed.versions() == {"acme": 2}
        await rotator.tick()
        assert caplog.text.count("key rotation of tenant 'acme'") == 1
        assert "acme" in rotator._warned
        conn = await asyncpg.connect(dsn)
        await conn.execute("DELETE FROM felix_key_rings")
        await conn.close()
        await rotator.tick()
        assert rotator._warned == {}
        await keyless.close()
        await sealed.close()

    run(main)


def test_one_store_makes_one_pool_when_used_at_once(dsn: str) -> None:
    """The node's mirror and rotator share a store and both start at once: a second pool
    would be left open (its connections too)."""

    async def connections() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
            return count
        finally:
            await conn.close()

    async def main() -> None:
        store = PostgresRingStore(dsn)
        await asyncio.gather(*(store.versions() for _ in range(4)))
        await store.close()
        deadline = time.monotonic() + 5
        while await connections() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await connections() == 0

    run(main)
