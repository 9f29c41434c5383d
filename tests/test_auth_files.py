"""Tests for felix.auth.files (key rings and JWK sets on disk) and felix.auth.cli (felix token)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import felix.auth.cli as token_cli
import felix.auth.files as files
from felix.auth.files import (
    AUDIENCE,
    ISSUER,
    JwksDirectory,
    jwks_path,
    load_ring,
    ring_path,
    save_ring,
)
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.auth.tokens import Claims, verify_felix_token
from felix.errors import BadRequest, ConfigError, NotFound, Unauthenticated

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0
PERMS = PermissionSet("acme", ["stream.subscribe:tenant:acme"])


def new_ring(tenant: str = "acme", now: float = T0) -> TenantKeyRing:
    return TenantKeyRing.create(tenant, now, max_token_ttl=900, publish_ahead=300.0, leeway=30.0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verify(token: str, jwks: dict[str, Any] | None, now: float) -> Claims:
    assert jwks is not None
    return verify_felix_token(token, jwks, issuer=ISSUER, audience=AUDIENCE, now=now, leeway=5)


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    value: int = getattr(request, "param", 0o022)
    old = os.umask(value)
    try:
        yield value
    finally:
        os.umask(old)


class ReadCounter:
    """Wraps files._read_limited to count the file reads JwksDirectory makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = files._read_limited

        def counting(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
            self.count += 1
            return real(path, limit)

        monkeypatch.setattr(files, "_read_limited", counting)


# -- save_ring / load_ring ------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], indirect=True)
def test_save_load_round_trip_and_modes(tmp_path: Path, umask: int) -> None:
    directory = tmp_path / "data" / "auth"
    ring = new_ring()
    save_ring(directory, ring, T0)
    assert sorted(p.name for p in directory.iterdir()) == ["acme.jwks.json", "acme.ring.json"]
    assert mode(directory) == 0o700
    assert mode(directory / "acme.ring.json") == 0o600
    assert mode(directory / "acme.jwks.json") == 0o644
    loaded = load_ring(directory, "acme")
    assert loaded.to_dict() == ring.to_dict()
    assert json.loads((directory / "acme.jwks.json").read_text()) == ring.jwks(T0)
    # The loaded ring signs tokens the published set verifies.
    token = loaded.mint(T0, issuer=ISSUER, audience=AUDIENCE, sub="alice", perms=PERMS)
    assert verify(token, ring.jwks(T0), T0).tid == "acme"


def test_save_keeps_an_existing_directory_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o750)
    save_ring(tmp_path, new_ring(), T0)
    assert mode(tmp_path) == 0o750
    assert mode(ring_path(tmp_path, "acme")) == 0o600


def test_save_into_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "auth").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        save_ring(tmp_path / "auth", new_ring(), T0)


def test_repeated_saves_leave_no_temporary_files(tmp_path: Path) -> None:
    ring = new_ring()
    now = T0
    for _ in range(5):
        save_ring(tmp_path, ring, now)
        now += 1000
        ring.rotate(now)
        ring.prune(now)
    save_ring(tmp_path, ring, now)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme.jwks.json", "acme.ring.json"]
    assert load_ring(tmp_path, "acme").to_dict() == ring.to_dict()


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = new_ring()
    save_ring(tmp_path, ring, T0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    ring.rotate(T0 + 1000)
    with monkeypatch.context() as patch, pytest.raises(ConfigError, match="No space left"):
        patch.setattr(os, "replace", broken_replace)
        save_ring(tmp_path, ring, T0 + 1000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_jwks_is_written_before_the_ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the two writes may publish an unused key, never hide a held one."""
    order: list[str] = []
    real = files._write_atomically

    def recording(path: Path, data: bytes, mode: int) -> None:
        order.append(path.name)
        real(path, data, mode)

    monkeypatch.setattr(files, "_write_atomically", recording)
    save_ring(tmp_path, new_ring(), T0)
    assert order == ["acme.jwks.json", "acme.ring.json"]


def test_load_missing_ring_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="acme"):
        load_ring(tmp_path, "acme")
    with pytest.raises(NotFound):
        load_ring(tmp_path / "nowhere", "acme")


@pytest.mark.parametrize("tenant", ["../acme", "", ".hidden", "a/b", "x" * 65])
def test_load_refuses_invalid_tenant_names_before_any_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tenant: str
) -> None:
    def no_io(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("touched the filesystem")

    with monkeypatch.context() as patch, pytest.raises(BadRequest):
        patch.setattr(os, "open", no_io)
        patch.setattr(os, "stat", no_io)
        load_ring(tmp_path, tenant)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b'{"version": 99}'])
def test_load_corrupt_ring_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "acme.ring.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"acme\.ring\.json"):
        load_ring(tmp_path, "acme")


def test_load_refuses_another_tenants_ring(tmp_path: Path) -> None:
    save_ring(tmp_path, new_ring("other"), T0)
    os.rename(ring_path(tmp_path, "other"), ring_path(tmp_path, "acme"))
    with pytest.raises(ConfigError, match="'other', not 'acme'"):
        load_ring(tmp_path, "acme")


# -- JwksDirectory --------------------------------------------------------------------------


def test_jwks_directory_serves_the_published_set(tmp_path: Path) -> None:
    ring = new_ring()
    save_ring(tmp_path, ring, T0)
    jwks = JwksDirectory(tmp_path).jwks("acme", 0.0)
    assert jwks == ring.jwks(T0)


def test_jwks_directory_caches_and_rechecks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = ReadCounter(monkeypatch)
    ring = new_ring()
    save_ring(tmp_path, ring, T0)
    directory = JwksDirectory(tmp_path, recheck=2.0)
    first = directory.jwks("acme", 100.0)
    assert first == ring.jwks(T0) and reads.count == 1
    assert directory.jwks("acme", 101.0) is first  # within recheck: no stat, no read
    assert directory.jwks("acme", 102.5) is first  # checked: unchanged, not read
    assert reads.count == 1

    ring.rotate(T0 + 10)
    save_ring(tmp_path, ring, T0 + 10)
    assert directory.jwks("acme", 103.0) is first  # changed, but checked 0.5 s ago
    assert reads.count == 1
    rotated = directory.jwks("acme", 104.5)
    assert rotated == ring.jwks(T0 + 10) and len(rotated["keys"]) == 2
    assert reads.count == 2
    assert directory.jwks("acme", 110.0) is rotated
    assert reads.count == 2


def test_jwks_directory_sees_a_same_size_rewrite(tmp_path: Path) -> None:
    """A replaced file is re-read even if its size and mtime did not change."""
    path = jwks_path(tmp_path, "acme")
    save_ring(tmp_path, new_ring(), T0)
    directory = JwksDirectory(tmp_path, recheck=1.0)
    before = directory.jwks("acme", 0.0)
    st = path.stat()
    other = new_ring()  # same key type: same file size
    save_ring(tmp_path, other, T0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    after = directory.jwks("acme", 1.0)
    assert after == other.jwks(T0) and after != before


def test_jwks_directory_missing_file_denies_until_created(tmp_path: Path) -> None:
    directory = JwksDirectory(tmp_path / "auth", recheck=2.0)
    assert directory.jwks("acme", 0.0) is None
    ring = new_ring()
    save_ring(tmp_path / "auth", ring, T0)
    assert directory.jwks("acme", 1.0) is None  # the miss is cached too
    assert directory.jwks("acme", 2.0) == ring.jwks(T0)


def test_jwks_directory_removed_file_denies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_ring(tmp_path, new_ring(), T0)
    directory = JwksDirectory(tmp_path, recheck=2.0)
    assert directory.jwks("acme", 0.0) is not None
    jwks_path(tmp_path, "acme").unlink()
    with caplog.at_level(logging.WARNING, logger="felix.auth.files"):
        assert directory.jwks("acme", 2.0) is None
    assert "denying tenant 'acme'" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"keys": "x"}',
        '{"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}',
    ],
)
def test_jwks_directory_corrupt_file_keeps_the_last_good_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    ring = new_ring()
    save_ring(tmp_path, ring, T0)
    directory = JwksDirectory(tmp_path, recheck=2.0)
    good = directory.jwks("acme", 0.0)
    assert good is not None
    reads = ReadCounter(monkeypatch)
    jwks_path(tmp_path, "acme").write_text(content)
    with caplog.at_level(logging.WARNING, logger="felix.auth.files"):
        assert directory.jwks("acme", 2.0) is good
    assert "keeping the last good JWK set of tenant 'acme'" in caplog.text
    assert reads.count == 1
    # The bad file is not re-read (nor re-logged) until it changes.
    caplog.clear()
    assert directory.jwks("acme", 10.0) is good
    assert reads.count == 1 and caplog.text == ""
    # A fixed file is picked up.
    ring.rotate(T0 + 10)
    save_ring(tmp_path, ring, T0 + 10)
    assert directory.jwks("acme", 12.0) == ring.jwks(T0 + 10)


def test_jwks_directory_corrupt_file_without_a_good_one_denies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_path(tmp_path, "acme").write_text("{")
    with caplog.at_level(logging.WARNING, logger="felix.auth.files"):
        assert JwksDirectory(tmp_path).jwks("acme", 0.0) is None
    assert "denying tenant 'acme'" in caplog.text


def test_jwks_directory_refuses_private_keys(tmp_path: Path) -> None:
    """A ring file copied over the JWK set (private keys) is not served."""
    save_ring(tmp_path, new_ring(), T0)
    jwks_path(tmp_path, "acme").write_text(
        json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "AA", "d": "AA"}]})
    )
    assert JwksDirectory(tmp_path).jwks("acme", 0.0) is None


def test_jwks_directory_refuses_a_huge_file(tmp_path: Path) -> None:
    jwks_path(tmp_path, "acme").write_bytes(b" " * (files.MAX_JWKS_FILE_BYTES + 1))
    assert JwksDirectory(tmp_path).jwks("acme", 0.0) is None


@pytest.mark.parametrize("tenant", ["../acme", "", "acme/x", ".acme", "x" * 65, "a b"])
def test_jwks_directory_invalid_tenant_denies_without_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tenant: str
) -> None:
    def no_io(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("touched the filesystem")

    directory = JwksDirectory(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(os, "stat", no_io)
        patch.setattr(os, "open", no_io)
        assert directory.jwks(tenant, 0.0) is None
    assert len(directory) == 0


def test_jwks_directory_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for tenant in ("t1", "t2", "t3"):
        save_ring(tmp_path, new_ring(tenant), T0)
    directory = JwksDirectory(tmp_path, recheck=60.0, max_tenants=2)
    assert directory.jwks("t1", 0.0) is not None
    assert directory.jwks("t2", 0.0) is not None
    assert directory.jwks("t1", 1.0) is not None  # t1 used last: t2 is the oldest
    assert directory.jwks("t3", 1.0) is not None
    assert len(directory) == 2
    reads = ReadCounter(monkeypatch)
    directory.jwks("t1", 2.0)
    assert reads.count == 0  # still cached
    directory.jwks("t2", 2.0)
    assert reads.count == 1  # was evicted


def test_jwks_directory_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        JwksDirectory(tmp_path, recheck=-1)
    with pytest.raises(ConfigError):
        JwksDirectory(tmp_path, max_tenants=0)


def test_rotation_is_visible_through_jwks_directory(tmp_path: Path) -> None:
    ring = new_ring()
    save_ring(tmp_path, ring, T0)
    directory = JwksDirectory(tmp_path, recheck=2.0)
    old_token = ring.mint(T0, issuer=ISSUER, audience=AUDIENCE, sub="alice", perms=PERMS)
    old_kid = verify(old_token, directory.jwks("acme", 0.0), T0).kid

    rotated_at = T0 + 600
    new_kid = ring.rotate(rotated_at)
    ring.prune(rotated_at)
    save_ring(tmp_path, ring, rotated_at)
    # Once the new key signs (publish_ahead later), the broker already has it...
    signs_at = rotated_at + ring.publish_ahead
    new_token = ring.mint(signs_at, issuer=ISSUER, audience=AUDIENCE, sub="bob", perms=PERMS)
    jwks = directory.jwks("acme", 2.0)
    assert verify(new_token, jwks, signs_at).kid == new_kid
    # ...and tokens of the old key keep verifying until they expire.
    assert verify(old_token, jwks, T0 + 800).kid == old_kid

    # After the old key's tokens have all expired, a prune drops it from the file.
    later = signs_at + ring.max_token_ttl + ring.leeway
    assert ring.prune(later) == [old_kid]
    save_ring(tmp_path, ring, later)
    jwks = directory.jwks("acme", 4.0)
    assert jwks is not None and [k["kid"] for k in jwks["keys"]] == [new_kid]
    with pytest.raises(Unauthenticated, match="unknown key"):
        verify(old_token, jwks, T0 + 800)


# -- felix token ----------------------------------------------------------------------------


class Cli:
    """``felix token ...`` through a parser built with add_commands, at a settable time."""

    def __init__(
        self, directory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.directory = directory
        self.now = T0
        self.capsys = capsys
        monkeypatch.setattr(token_cli, "_now", lambda: self.now)
        parser = argparse.ArgumentParser(prog="felix")
        token_cli.add_commands(parser.add_subparsers(dest="command", required=True))
        self.parser = parser

    def run(self, *argv: str, dir_flag: bool = True) -> tuple[int, str, str]:
        full = ["token", *argv] + (["--dir", str(self.directory)] if dir_flag else [])
        args = self.parser.parse_args(full)
        code = args.func(args)
        assert isinstance(code, int)
        out, err = self.capsys.readouterr()
        return code, out, err

    def mint(self, *perms: str, sub: str = "alice", tenant: str = "acme") -> str:
        flags = [f"--perm={p}" for p in perms]
        code, out, err = self.run("mint", "--tenant", tenant, "--sub", sub, *flags)
        assert code == 0, err
        return out.strip()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "auth", monkeypatch, capsys)


def test_cli_keygen_mint_verify(cli: Cli) -> None:
    code, out, _ = cli.run("keygen", "--tenant", "acme")
    assert code == 0 and "acme" in out
    assert mode(cli.directory) == 0o700
    assert mode(ring_path(cli.directory, "acme")) == 0o600
    token = cli.mint("stream.publish:namespace:acme/orders", "cache.read:cache:acme/prod/*")
    claims = verify(token, JwksDirectory(cli.directory).jwks("acme", 0.0), T0)
    assert claims.tid == "acme" and claims.sub == "alice"
    assert sorted(claims.perms.to_strings()) == [
        "cache.read:cache:acme/prod/*",
        "stream.publish:namespace:acme/orders",
    ]
    assert claims.perms.allows_stream("stream.publish", "acme", "orders", "eu")
    assert not claims.perms.allows_stream("stream.subscribe", "acme", "orders", "eu")
    assert claims.iat == int(T0) and claims.exp == int(T0) + 900


def test_cli_mint_ttl_and_max_ttl(cli: Cli) -> None:
    assert cli.run("keygen", "--tenant", "acme", "--max-ttl", "120")[0] == 0
    perm = "--perm=stream.subscribe:tenant:acme"
    code, out, _ = cli.run("mint", "--tenant", "acme", "--sub", "a", perm, "--ttl", "60")
    assert code == 0
    jwks = JwksDirectory(cli.directory).jwks("acme", 0.0)
    assert verify(out.strip(), jwks, T0).exp == int(T0) + 60
    code, _, err = cli.run("mint", "--tenant", "acme", "--sub", "a", perm, "--ttl", "121")
    assert code == 2 and "ttl" in err
    code, _, err = cli.run("keygen", "--tenant", "other", "--max-ttl", "0")
    assert code == 2 and "max_token_ttl" in err


def test_cli_rotate_keeps_old_tokens_verifying(cli: Cli) -> None:
    assert cli.run("keygen", "--tenant", "acme")[0] == 0
    old_token = cli.mint("stream.subscribe:tenant:acme")
    directory = JwksDirectory(cli.directory, recheck=2.0)
    old_kid = verify(old_token, directory.jwks("acme", 0.0), T0).kid

    cli.now = T0 + 100
    code, out, _ = cli.run("rotate", "--tenant", "acme")
    assert code == 0 and "published key" in out
    jwks = directory.jwks("acme", 2.0)
    assert verify(old_token, jwks, cli.now).kid == old_kid
    # Until publish_ahead has passed the old key still signs; then the new one does.
    assert verify(cli.mint("stream.subscribe:tenant:acme"), jwks, cli.now).kid == old_kid
    cli.now = T0 + 100 + 300
    new_kid = verify(cli.mint("stream.subscribe:tenant:acme"), jwks, cli.now).kid
    assert new_kid != old_kid
    assert verify(old_token, jwks, cli.now).kid == old_kid

    # A second rotation while one is pending is refused (a felix error: exit 1).
    cli.now = T0 + 200
    code, _, err = cli.run("rotate", "--tenant", "acme")
    assert code == 1 and "pending" in err

    # Much later a rotation drops the old key, whose tokens have all expired.
    cli.now = T0 + 10_000
    code, out, _ = cli.run("rotate", "--tenant", "acme")
    assert code == 0 and f"dropped expired key {old_kid}" in out
    kids = [k.kid for k in load_ring(cli.directory, "acme").schedule()]
    assert old_kid not in kids and new_kid in kids


def test_cli_keygen_refuses_to_overwrite_without_force(cli: Cli) -> None:
    assert cli.run("keygen", "--tenant", "acme")[0] == 0
    before = load_ring(cli.directory, "acme").to_dict()
    code, _, err = cli.run("keygen", "--tenant", "acme")
    assert code in (1, 2) and "--force" in err
    assert load_ring(cli.directory, "acme").to_dict() == before
    code, _, _ = cli.run("keygen", "--tenant", "acme", "--force")
    assert code == 0
    assert load_ring(cli.directory, "acme").to_dict() != before


def test_cli_jwks_prints_the_published_set(cli: Cli) -> None:
    assert cli.run("keygen", "--tenant", "acme")[0] == 0
    code, out, _ = cli.run("jwks", "--tenant", "acme")
    assert code == 0
    assert json.loads(out) == json.loads(jwks_path(cli.directory, "acme").read_text())
    assert "private_key" not in out and '"d"' not in out


def test_cli_errors(cli: Cli) -> None:
    # No key ring yet: a felix error (1) that says what to do.
    code, _, err = cli.run(
        "mint", "--tenant", "acme", "--sub", "a", "--perm=tenant.manage:tenant:acme"
    )
    assert code == 1 and "felix token keygen --tenant acme" in err
    assert cli.run("rotate", "--tenant", "acme")[0] == 1
    assert cli.run("jwks", "--tenant", "acme")[0] == 1
    # Bad usage (2): an invalid tenant, a malformed or foreign permission, a bad subject.
    code, _, err = cli.run("keygen", "--tenant", "../acme")
    assert code == 2 and "--tenant" in err
    assert not cli.directory.exists()
    assert cli.run("keygen", "--tenant", "acme")[0] == 0
    for perm in ("nonsense", "stream.publish:namespace:other/orders"):
        code, _, err = cli.run("mint", "--tenant", "acme", "--sub", "a", f"--perm={perm}")
        assert code == 2 and "--perm" in err
    code, _, _ = cli.run(
        "mint", "--tenant", "acme", "--sub", "", "--perm=tenant.manage:tenant:acme"
    )
    assert code == 2
    # argparse itself refuses missing required options.
    with pytest.raises(SystemExit) as exc:
        cli.parser.parse_args(["token", "mint", "--tenant", "acme", "--sub", "a"])
    assert exc.value.code == 2


def test_cli_dir_defaults(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FELIX_AUTH_DIR", raising=False)
    assert cli.run("keygen", "--tenant", "acme", dir_flag=False)[0] == 0
    assert ring_path(tmp_path / "data" / "auth", "acme").exists()
    monkeypatch.setenv("FELIX_AUTH_DIR", str(tmp_path / "elsewhere"))
    assert cli.run("keygen", "--tenant", "acme", dir_flag=False)[0] == 0
    assert ring_path(tmp_path / "elsewhere", "acme").exists()
    # --dir wins over the environment.
    assert cli.run("keygen", "--tenant", "acme")[0] == 0
    assert ring_path(cli.directory, "acme").exists()
