"""The bridge runner's parts without a network: checkpoints, the header filter,
provenance, the target token's checks, and the runner's bound on bridges."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from felix.auth.files import AUDIENCE, ISSUER
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.bridge import runner as r
from felix.bridge.checkpoint import Checkpoint, CheckpointDir
from felix.bridge.status import BridgeStatus, StatusServer
from felix.control.model import Resource, ResourceKind, validate_spec
from felix.errors import BadRequest
from tests.aio import run

SPEC: dict[str, Any] = {
    "source_stream": "prod/orders",
    "target_url": "felix://127.0.0.1:5001",
    "target_region": "us-1",
    "target_stream": "prod/orders-eu",
}


def test_checkpoints_are_replaced_whole_and_removed(tmp_path: Path) -> None:
    cps = CheckpointDir(tmp_path / "state")
    assert cps.load("acme", "b") is None
    cps.save("acme", "b", Checkpoint("2026-01-01T00:00:00+00:00", "prod/orders", 42))
    assert cps.load("acme", "b") == Checkpoint("2026-01-01T00:00:00+00:00", "prod/orders", 42)
    cps.save("acme", "b", Checkpoint("2026-01-01T00:00:00+00:00", "prod/orders", 43))
    assert cps.load("acme", "b").next_offset == 43  # type: ignore[union-attr]
    assert not list((tmp_path / "state" / "acme").glob("*.tmp"))
    assert oct(cps.path("acme", "b").stat().st_mode & 0o777) == "0o600"
    assert cps.stored() == [("acme", "b")]
    # Damaged or foreign files are ignored (the bridge starts at its start setting).
    negative = b'{"next_offset": -1, "incarnation": "x", "source": "a/b"}'
    for junk in (b"", b"{", negative, b"x" * 5000):
        cps.path("acme", "b").write_bytes(junk)
        assert cps.load("acme", "b") is None
    assert cps.remove("acme", "b") and not cps.remove("acme", "b")
    assert cps.stored() == []
    # Names cannot climb out of the directory.
    with pytest.raises(BadRequest):
        cps.path("..", "b")
    with pytest.raises(BadRequest):
        cps.path("acme", "../../etc/passwd")


def test_the_header_filter_and_provenance() -> None:
    assert r.passes(None, {})
    assert r.passes({"header": "tier", "equals": None}, {"tier": ""})
    assert not r.passes({"header": "tier", "equals": None}, {"other": "x"})
    assert r.passes({"header": "tier", "equals": "gold"}, {"tier": "gold"})
    assert not r.passes({"header": "tier", "equals": "gold"}, {"tier": "Gold"})
    assert r.provenance("eu-1", "acme", "prod", "orders", 7) == {
        "felix-source-region": "eu-1",
        "felix-source-stream": "acme/prod/orders",
        "felix-source-offset": "7",
        "felix-msg-id": "bridge:eu-1/acme/prod/orders@7",
    }


def _token(region: str | None) -> str:
    ring = TenantKeyRing.create("acme", time.time())
    return ring.mint(
        time.time(),
        issuer=ISSUER,
        audience=AUDIENCE,
        sub="bridge",
        perms=PermissionSet("acme", ["stream.publish:stream:acme/prod/orders-eu"]),
        region=region,
    )


def test_the_target_token_is_read_where_the_bridge_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "acme").mkdir(parents=True)
    assert r.target_token(SPEC, "acme", secrets) is None
    file = secrets / "acme" / "tok"
    spec = {**SPEC, "target_token_file": "tok"}
    with pytest.raises(r._Stopped, match="cannot read target_token_file"):
        r.target_token(spec, "acme", secrets)
    good = _token("us-1")
    file.write_text(good + "\n")
    assert r.target_token(spec, "acme", secrets) == good
    assert r.target_token({**SPEC, "target_token_file": str(file)}, "acme", secrets) == good
    file.write_text(_token("eu-1"))
    with pytest.raises(r._Stopped, match="issued for region 'eu-1'"):
        r.target_token(spec, "acme", secrets)
    file.write_text(_token(None))  # no region claim: the target's gateway judges it
    assert r.target_token(spec, "acme", secrets)
    env = {**SPEC, "target_token_env": "FELIX_BRIDGE_ACME_TOKEN"}
    monkeypatch.delenv("FELIX_BRIDGE_ACME_TOKEN", raising=False)
    with pytest.raises(r._Stopped, match="is not set"):
        r.target_token(env, "acme", secrets)
    monkeypatch.setenv("FELIX_BRIDGE_ACME_TOKEN", good)
    assert r.target_token(env, "acme", secrets) == good


def test_a_tenant_cannot_point_its_bridge_at_the_runners_other_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tenant picks the file and the host the token goes to: nothing outside its
    own directory of the operator's secrets dir may be read, nor another tenant's or
    the node's environment variables."""
    secrets = tmp_path / "secrets"
    (secrets / "acme").mkdir(parents=True)
    (secrets / "globex").mkdir()
    (secrets / "globex" / "tok").write_text(_token("us-1"))
    admin = tmp_path / "admin-token"
    admin.write_text("the-admin-token")
    (secrets / "acme" / "link").symlink_to(admin)
    (secrets / "acme" / "dirlink").symlink_to(secrets / "globex")
    for ref in (
        str(admin),
        "/proc/self/environ",
        "../globex/tok",
        str(secrets / "globex" / "tok"),
        "link",
        "dirlink/tok",
    ):
        with pytest.raises(r._Stopped) as refused:
            r.target_token({**SPEC, "target_token_file": ref}, "acme", secrets)
        assert "the-admin-token" not in str(refused.value) and str(admin) not in str(refused.value)
    with pytest.raises(r._Stopped, match="needs a runner with --secrets-dir"):
        r.target_token({**SPEC, "target_token_file": "tok"}, "acme", None)
    monkeypatch.setenv("FELIX_CONTROL_TOKEN", "the-admin-token")
    monkeypatch.setenv("FELIX_BRIDGE_GLOBEX_TOKEN", "globex-secret")
    for name in ("FELIX_CONTROL_TOKEN", "FELIX_BRIDGE_GLOBEX_TOKEN", "FELIX_BRIDGE_ACMEX_T"):
        with pytest.raises(r._Stopped, match="must start with FELIX_BRIDGE_ACME_"):
            r.target_token({**SPEC, "target_token_env": name}, "acme", secrets)
    # "acme-x" would read FELIX_BRIDGE_ACME_X_*, a prefix "acme" also has: refused.
    with pytest.raises(r._Stopped, match="only for tenants named with lower-case"):
        r.target_token({**SPEC, "target_token_env": "FELIX_BRIDGE_ACME_X_T"}, "acme-x", secrets)


def _bridge(name: str, **changes: Any) -> Resource:
    now = datetime.now(UTC)
    spec = validate_spec(ResourceKind.BRIDGE, {**SPEC, **changes})
    return Resource(
        kind=ResourceKind.BRIDGE,
        path=("acme", name),
        spec=spec,
        version=1,
        created_at=now,
        updated_at=now,
    )


def test_a_runner_runs_a_bounded_number_of_bridges(tmp_path: Path) -> None:
    async def main() -> None:
        source = r.SourceAccess("felix://127.0.0.1:1", r.static_token(lambda: None))
        runner = r.BridgeRunner(None, source, tmp_path, max_bridges=2)  # type: ignore[arg-type]
        bridges: dict[tuple[str, ...], Resource] = {
            ("acme", n): _bridge(n, state="paused") for n in ("a", "b", "c")
        }
        runner._apply(bridges)
        states = {k[1]: st.state for k, st in runner.statuses.items()}
        assert states == {"a": "paused", "b": "paused", "c": "refused"}
        assert "at most 2 bridges" in (runner.statuses[("acme", "c")].last_error or "")
        # One deleted: the refused one gets its place.
        del bridges[("acme", "a")]
        runner._apply(bridges)
        await asyncio.sleep(0)
        states = {k[1]: st.state for k, st in runner.statuses.items()}
        assert states == {"b": "paused", "c": "paused"}
        # The status endpoint: JSON and metrics with tenant and bridge labels only.
        server = StatusServer(runner.statuses)
        host, port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /bridges HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await reader.read()
            writer.close()
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert [b["name"] for b in body["bridges"]] == ["b", "c"]
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            text = (await reader.read()).decode()
            writer.close()
            assert 'felix_bridge_running{bridge="b",tenant="acme"} 0.0' in text
        finally:
            await server.stop()

    run(main)


def test_status_rate_and_lag() -> None:
    st = BridgeStatus("acme", "b", checkpoint=90, source_end=100)
    assert st.lag == 10
    st.sample(0.0)
    st.forwarded = 50
    st.sample(2.0)
    assert st.rate == 25.0
    st.error("x" * 10_000)
    assert st.errors == 1 and len(st.last_error or "") == 500
    assert st.to_json()["lag"] == 10


def test_stray_entries_in_the_state_dir_are_not_checkpoints(tmp_path: Path) -> None:
    from felix.bridge.checkpoint import CheckpointDir

    (tmp_path / ".cache").mkdir()
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "to-us.json").write_text("{}")
    (tmp_path / "acme" / ".hidden.json").write_text("{}")
    (tmp_path / "lost+found").mkdir()
    assert CheckpointDir(tmp_path).stored() == [("acme", "to-us")]
