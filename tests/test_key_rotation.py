"""Scheduled key rotation: the pure decision (clock passed in), the rotator over files,
and `felix up --auth` rotating its own rings."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import felix
from felix.auth.files import AUDIENCE, ISSUER, load_ring, locked, ring_path, save_ring
from felix.auth.keys import KeyState, TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.auth.rotation import (
    KeyRotator,
    RotationPolicy,
    apply,
    next_check,
    plan,
    rotate_at,
)
from felix.auth.tokens import MAX_JWKS_KEYS, verify_felix_token
from felix.errors import ConfigError
from felix.node.config import NodeConfig, parse_duration
from tests.aio import run
from tests.nodeproc import NodeProcess

T0 = 1_700_000_000.0
TTL = 600  # the ring's max_token_ttl
LEEWAY = 30.0
POLICY = RotationPolicy(interval=3600.0, lead=300.0)
PERMS = PermissionSet("acme", ["stream.publish:stream:acme/prod/*"])


def new_ring(now: float = T0) -> TenantKeyRing:
    return TenantKeyRing.create("acme", now, max_token_ttl=TTL, publish_ahead=60, leeway=LEEWAY)


def kids(jwks: dict[str, list[dict[str, str]]]) -> list[str]:
    return [k["kid"] for k in jwks["keys"]]


def mint(ring: TenantKeyRing, now: float) -> str:
    return ring.mint(now, issuer=ISSUER, audience=AUDIENCE, sub="svc", perms=PERMS)


def test_policy_validation() -> None:
    with pytest.raises(ConfigError):
        RotationPolicy(interval=60, lead=0)
    with pytest.raises(ConfigError):
        RotationPolicy(interval=60, lead=120)  # shorter than the lead
    with pytest.raises(ConfigError):
        RotationPolicy(interval=float("inf"), lead=1)
    assert RotationPolicy(interval=60, lead=60).interval == 60
    # The lead must outlast a follower's staleness: twice its refresh plus the rechecks.
    assert RotationPolicy().covers(30)
    assert not RotationPolicy(interval=60, lead=40).covers(30)


def test_nothing_due_until_interval_minus_lead_after_activation() -> None:
    ring = new_ring()
    assert rotate_at(ring, POLICY) == T0 + 3600 - 300
    for now in (T0, T0 + 1000, T0 + 3299.9):
        todo = plan(ring, now, POLICY)
        assert not todo.rotate and not todo.prune and not todo.changes
    assert next_check(ring, T0, POLICY) == T0 + 3300
    assert plan(ring, T0 + 3300, POLICY).rotate


def test_next_key_is_published_before_it_signs_and_old_key_kept_until_its_tokens_expire() -> None:
    ring = new_ring()
    (first,) = ring.schedule()
    old_token = mint(ring, T0 + 3299)  # signed by the first key, valid until T0 + 3899

    t_pub = T0 + 3300
    done = apply(ring, t_pub, POLICY)
    assert done.rotated is not None and done.dropped == [] and done.changed
    new = done.rotated
    # Published now (in the set), but not signing: the first key still signs.
    assert ring.state(new, t_pub) is KeyState.NEXT
    assert kids(ring.jwks(t_pub)) == [first.kid, new]
    assert ring.signer(t_pub).kid == first.kid
    # It signs `lead` seconds later (the scheduled lead, not the ring's publish_ahead 60).
    t_act = t_pub + POLICY.lead
    assert ring.schedule()[-1].activate_at == t_act == T0 + 3600
    assert ring.signer(t_act - 0.001).kid == first.kid
    assert ring.signer(t_act).kid == new
    # Nothing to do in between; the next look is the next rotation or the first key's drop.
    assert not plan(ring, t_act, POLICY).changes
    drop = t_act + TTL + LEEWAY
    assert next_check(ring, t_pub, POLICY) == min(drop, t_act + 3300)
    # The retired key stays published while tokens it signed can be alive.
    assert ring.state(first.kid, t_act + 1) is KeyState.RETIRED
    assert first.kid in kids(ring.jwks(drop - 0.001))
    claims = verify_felix_token(
        old_token, ring.jwks(T0 + 3898), issuer=ISSUER, audience=AUDIENCE, now=T0 + 3898, leeway=0
    )
    assert claims.tid == "acme"
    assert not plan(ring, drop - 0.001, POLICY).prune
    # Then it is dropped: pruned from the ring and gone from the set.
    todo = plan(ring, drop, POLICY)
    assert todo.prune and not todo.rotate
    done = apply(ring, drop, POLICY)
    assert done.dropped == [first.kid] and done.rotated is None
    assert kids(ring.jwks(drop)) == [new]
    # The next rotation: interval after the previous activation, lead ahead.
    assert next_check(ring, drop, POLICY) == t_act + 3300
    done = apply(ring, t_act + 3300, POLICY)
    assert done.rotated is not None
    assert ring.schedule()[-1].activate_at == t_act + 3600


def test_a_pending_manual_rotation_moves_the_schedule() -> None:
    ring = new_ring()
    manual = ring.rotate(T0 + 100)  # felix token rotate: activates at T0 + 160
    assert not plan(ring, T0 + 150, POLICY).rotate  # pending: never two NEXT keys
    assert rotate_at(ring, POLICY) == T0 + 160 + 3300
    assert not plan(ring, T0 + 3300, POLICY).rotate  # the old schedule no longer applies
    assert plan(ring, T0 + 3460, POLICY).rotate
    assert ring.signer(T0 + 3460).kid == manual


def test_an_overdue_rotation_happens_at_once_with_the_full_lead() -> None:
    ring = new_ring()
    late = T0 + 10 * 3600  # the owner was down for hours
    done = apply(ring, late, POLICY)
    assert done.rotated is not None
    assert ring.schedule()[-1].activate_at == late + POLICY.lead
    assert ring.state(done.rotated, late) is KeyState.NEXT


def test_a_full_ring_waits_for_a_drop() -> None:
    policy = RotationPolicy(interval=1.0, lead=0.5)
    ring = new_ring()
    now = T0
    while len(ring.schedule()) < MAX_JWKS_KEYS:
        now = rotate_at(ring, policy)
        assert apply(ring, now, policy).rotated is not None
    now = rotate_at(ring, policy)
    todo = plan(ring, now, policy)
    assert todo.full and not todo.rotate
    done = apply(ring, now, policy)
    assert done.full and not done.changed
    assert len(ring.jwks(now)["keys"]) == MAX_JWKS_KEYS
    # The next look is the first drop; then a rotation is possible again.
    first_drop = ring.schedule()[0].drop_at
    assert first_drop is not None and next_check(ring, now, policy) == first_drop
    done = apply(ring, first_drop, policy)
    assert done.dropped and done.rotated is not None
    assert len(ring.schedule()) <= MAX_JWKS_KEYS


def test_rotate_takes_an_explicit_lead() -> None:
    ring = new_ring()
    ring.rotate(T0 + 10, publish_ahead=1234)
    assert ring.schedule()[-1].activate_at == T0 + 1244
    with pytest.raises(ConfigError):
        ring.rotate(T0 + 2000, publish_ahead=-1)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tick(rotator: KeyRotator) -> float:
    """One pass of ``rotator`` (its own event loop: callers may be threads)."""
    return asyncio.run(rotator.tick())


def published(directory: Path, tenant: str = "acme") -> list[str]:
    data = json.loads((directory / f"{tenant}.jwks.json").read_text())
    return [k["kid"] for k in data["keys"]]


def test_rotator_rotates_and_prunes_the_rings_on_disk(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    clock = Clock(T0)
    save_ring(keys, new_ring(), T0)
    other = TenantKeyRing.create("other", T0 + 1000, max_token_ttl=TTL, leeway=LEEWAY)
    save_ring(keys, other, T0 + 1000)
    (first,) = load_ring(keys, "acme").schedule()
    rotator = KeyRotator(keys, POLICY, clock=clock, max_sleep=60)

    # Nothing due: the next pass is the earliest rotation (capped at max_sleep).
    assert tick(rotator) == T0 + 60
    rotator.max_sleep = 1e9
    assert tick(rotator) == T0 + 3300
    assert rotator.rotations == 0

    clock.now = T0 + 3300
    wake = tick(rotator)
    assert rotator.rotations == 1  # acme only; other is due at T0 + 4300
    assert wake == T0 + 3600 + TTL + LEEWAY  # the first key's drop
    ring = load_ring(keys, "acme")
    new = ring.schedule()[-1].kid
    # The new key is in the published file before it signs.
    assert published(keys) == [first.kid, new]
    assert ring.signer(clock.now).kid == first.kid
    token = mint(ring, T0 + 3600)
    assert token.count(".") == 2
    jwks = json.loads((keys / "acme.jwks.json").read_text())
    verify_felix_token(token, jwks, issuer=ISSUER, audience=AUDIENCE, now=T0 + 3600, leeway=0)
    assert ring_path(keys, "acme").stat().st_mode & 0o777 == 0o600

    # Passes in between change nothing on disk.
    before = ring_path(keys, "acme").stat().st_ino
    clock.now = T0 + 3600
    tick(rotator)
    assert ring_path(keys, "acme").stat().st_ino == before

    clock.now = T0 + 3600 + TTL + LEEWAY
    tick(rotator)
    assert published(keys) == [new]
    assert [k.kid for k in load_ring(keys, "acme").schedule()] == [new]
    clock.now = T0 + 4300
    tick(rotator)
    assert len(load_ring(keys, "other").schedule()) == 2


def test_rotator_sees_a_manual_rotation_and_does_not_add_another(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    clock = Clock(T0)
    save_ring(keys, new_ring(), T0)
    rotator = KeyRotator(keys, POLICY, clock=clock, max_sleep=1e9)
    assert tick(rotator) == T0 + 3300
    # felix token rotate, by hand, at T0 + 3000 (under the lock, as the CLI does).
    with locked(keys):
        ring = load_ring(keys, "acme")
        manual = ring.rotate(T0 + 3000)
        save_ring(keys, ring, T0 + 3000)
    clock.now = T0 + 3300
    # The next look: the first key's drop, then the next rotation, counted from the
    # manual key's activation (T0 + 3060), not from the first key's.
    assert tick(rotator) == T0 + 3060 + TTL + LEEWAY
    assert rotator.rotations == 0
    assert load_ring(keys, "acme").schedule()[-1].kid == manual
    clock.now = T0 + 3060 + TTL + LEEWAY
    assert tick(rotator) == T0 + 3060 + 3300
    assert [k.kid for k in load_ring(keys, "acme").schedule()] == [manual]
    assert rotator.rotations == 0


def test_rotator_waits_for_the_directory_lock(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    save_ring(keys, new_ring(), T0)
    rotator = KeyRotator(keys, POLICY, clock=Clock(T0 + 3300))
    done = threading.Event()

    def one_pass() -> None:
        tick(rotator)
        done.set()

    with locked(keys):  # a concurrent felix token rotate holds it
        worker = threading.Thread(target=one_pass)
        worker.start()
        time.sleep(0.3)
        assert not done.is_set()
        assert len(load_ring(keys, "acme").schedule()) == 1
    worker.join(5)
    assert done.is_set()
    assert len(load_ring(keys, "acme").schedule()) == 2


def test_rotator_skips_a_corrupt_ring_and_serves_the_others(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    save_ring(keys, new_ring(), T0)
    save_ring(keys, TenantKeyRing.create("zeta", T0, max_token_ttl=TTL), T0)
    ring_path(keys, "acme").write_text("{not json")
    rotator = KeyRotator(keys, POLICY, clock=Clock(T0 + 3300))
    tick(rotator)
    assert rotator.rotations == 1
    assert len(load_ring(keys, "zeta").schedule()) == 2


def test_rotator_with_no_directory_does_nothing(tmp_path: Path) -> None:
    rotator = KeyRotator(tmp_path / "missing", POLICY, clock=Clock(T0))
    assert rotator.max_sleep == 60  # a quarter of the interval, at most a minute
    assert tick(rotator) == T0 + 60
    assert KeyRotator(tmp_path, RotationPolicy(interval=8, lead=6)).max_sleep == 2
    assert not (tmp_path / "missing").exists()


def test_parse_duration() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("5m") == 300
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("2d") == 172800
    assert parse_duration("250ms") == 0.25
    assert parse_duration("300") == 300
    assert parse_duration(42) == 42.0
    for bad in ("", "5x", "-1", "h", float("nan"), -3):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_node_config_checks_the_key_flags() -> None:
    config = NodeConfig(key_rotation_interval=0)  # disabled: any lead
    assert config.key_publish_lead == 300
    with pytest.raises(ConfigError, match="key-rotation-interval"):
        NodeConfig(key_rotation_interval=60)  # shorter than the 300 s lead
    with pytest.raises(ConfigError, match="key-publish-lead"):
        NodeConfig(key_publish_lead=0)
    with pytest.raises(ConfigError, match="jwks-refresh"):
        NodeConfig(jwks_refresh=0)


@pytest.mark.timeout(90)
def test_felix_up_auth_rotates_its_rings_and_new_keys_verify(tmp_path: Path) -> None:
    keys = tmp_path / "node" / "auth"

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def kid(token: str) -> str:
        head = token.split(".")[0]
        value: str = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]
        return value

    cli("token", "keygen", "--tenant", "acme", "--dir", str(keys), "--max-ttl", "60")
    first = load_ring(keys, "acme").signer(time.time()).kid
    node = NodeProcess(
        tmp_path / "node",
        "--auth",
        "--key-rotation-interval",
        "5s",
        "--key-publish-lead",
        "4s",
        gateways=1,
        shards=1,
    )
    try:
        deadline = time.monotonic() + 30
        while load_ring(keys, "acme").signer(time.time()).kid == first:
            assert time.monotonic() < deadline, f"no rotation:\n{node.log()}"
            time.sleep(0.1)
        token = cli(
            "token",
            "mint",
            "--tenant",
            "acme",
            "--sub",
            "svc",
            "--dir",
            str(keys),
            "--perm",
            "stream.publish:stream:acme/default/*",
        )
        assert kid(token) != first
        assert first in published(keys)  # kept while its tokens may live

        async def main() -> None:
            url = f"felix://{node.host}:{node.port}"
            async with felix.connect(url, ca=node.ca_file, tenant="acme", token=token) as client:
                assert await client.publish("orders", b"x") is not None

        run(main, timeout=30)
        assert node.metric("felix_key_rotations_total") >= 1
    finally:
        assert node.stop() == 0
