"""One view of resources: what a node creates on first use shows in its control plane.

A publish to a new stream and a set in a new cache register them (and their tenant
and namespace) in the control plane the node follows, marked ``auto_created``,
with the settings they got; they come back through the feed without disturbing
their data; deleting them through the control plane ends them on the data plane;
registration survives the control plane being away, is bounded, and a restart
registers nothing twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import felix
from tests.aio import run
from tests.nodeproc import NodeProcess, free_port

pytestmark = pytest.mark.timeout(180)


def _wait_for(check: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _get(api: str, path: str) -> dict[str, Any] | None:
    r = httpx.get(f"{api}/v1/{path}", timeout=10)
    return r.json() if r.status_code == 200 else None


def _items(api: str, path: str) -> list[dict[str, Any]]:
    body = _get(api, path)
    return [] if body is None else list(body["items"])


@pytest.fixture(params=["split", "embedded"])
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeProcess]:
    topology = ("--topology", request.param)
    gateways = 1 if request.param == "embedded" else 2
    n = NodeProcess(tmp_path / "node", "--control", "127.0.0.1:0", *topology, gateways=gateways)
    yield n
    n.stop()


def _client(node: NodeProcess, tenant: str = "acme", namespace: str = "prod") -> Any:
    url = f"felix://{node.host}:{node.port}"
    return felix.connect(url, ca=node.ca_file, tenant=tenant, namespace=namespace)


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "felix.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_streams_and_caches_created_on_first_use_appear_in_the_control_plane(
    node: NodeProcess,
) -> None:
    api = node.info["control"]
    stream_path = "tenants/acme/namespaces/prod/streams/orders"
    cache_path = "tenants/acme/namespaces/prod/caches/sessions"

    async def write() -> None:
        async with _client(node) as client:
            for i in range(5):
                await client.publish("orders", b"%d" % i)
            assert await client.cache("sessions").set("k", b"v")

    run(write, timeout=30)
    stream = _wait_for(lambda: _get(api, stream_path), timeout=10)
    assert stream is not None, node.log()
    cache = _wait_for(lambda: _get(api, cache_path), timeout=10)
    assert cache is not None, node.log()
    # Marked, with the settings the node gave them (its defaults).
    assert stream["spec"]["auto_created"] is True
    assert stream["spec"]["replay_max_records"] == 100_000
    assert stream["spec"]["durable"] is False
    assert stream["spec"]["region"] == "local"
    assert cache["spec"]["auto_created"] is True
    assert cache["spec"]["budget_bytes"] == 64 * 1024 * 1024
    # The tenant and namespace came with them, marked the same way.
    assert (_get(api, "tenants/acme") or {})["spec"]["auto_created"] is True
    assert (_get(api, "tenants/acme/namespaces/prod") or {})["spec"]["auto_created"] is True
    # The CLI lists them as auto-created.
    listing = _cli("stream", "ls", "--tenant", "acme", "--namespace", "prod", "--url", api)
    assert "orders" in listing and "auto" in listing, listing
    listing = _cli("cache", "ls", "--tenant", "acme", "--namespace", "prod", "--url", api)
    assert "sessions" in listing and "auto" in listing, listing

    async def unchanged() -> None:
        # Back through the feed, defined with what they had: records and entries stay.
        await asyncio.sleep(0.5)
        async with _client(node) as client:
            async with client.subscribe("orders", start="earliest") as sub:
                assert (await sub.next(timeout=5)).offset == 0
            assert await client.cache("sessions").get("k") == b"v"

    run(unchanged, timeout=30)
    assert node.metric("felix_autocreate_registered_total") >= 2
    assert "cannot apply" not in node.log()


def test_deleting_an_auto_created_stream_or_cache_ends_it_on_the_data_plane(
    tmp_path: Path,
) -> None:
    node = NodeProcess(tmp_path / "node", "--control", "127.0.0.1:0")
    try:
        api = node.info["control"]
        base = "tenants/acme/namespaces/prod"

        async def main() -> None:
            async with _client(node) as client:
                await client.publish("orders", b"first")
                assert await client.cache("sessions").set("k", b"v")
                registered = await asyncio.to_thread(
                    _wait_for,
                    lambda: (
                        _get(api, f"{base}/streams/orders") and _get(api, f"{base}/caches/sessions")
                    ),
                )
                assert registered, node.log()
                async with client.subscribe("orders", start="earliest") as sub:
                    assert (await sub.next(timeout=5)).data == b"first"
                    async with httpx.AsyncClient(timeout=10) as http:
                        r = await http.delete(f"{api}/v1/{base}/streams/orders")
                        assert r.status_code == 200, r.text
                        r = await http.delete(f"{api}/v1/{base}/caches/sessions")
                        assert r.status_code == 200, r.text
                    # Its subscribers end, and writes no longer create it again.
                    with pytest.raises(felix.NotFound):
                        await sub.next(timeout=5)
                with pytest.raises(felix.NotFound):
                    await client.publish("orders", b"again")
                # The cache may be on the other shard, whose copy of the delete can land
                # a moment after the stream's: until then it still holds k, never less.
                deadline = time.monotonic() + 10
                while True:
                    try:
                        value = await client.cache("sessions").get("k")
                    except felix.NotFound:
                        break
                    assert value == b"v" and time.monotonic() < deadline, value
                    await asyncio.sleep(0.05)
            # ...nor does a late registration bring it back in the control plane.
            await asyncio.sleep(1.0)
            assert _get(api, f"{base}/streams/orders") is None
            assert _get(api, f"{base}/caches/sessions") is None

        run(main, timeout=60)
    finally:
        node.stop()


def _felix_control(port: int, store: str, log: Path) -> subprocess.Popen[bytes]:
    """`felix control` on ``port`` (the same one again after a restart)."""
    cmd = [sys.executable, "-m", "felix.cli", "control", "--listen", f"127.0.0.1:{port}"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*cmd, "--store", store], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/v1/system/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    assert _wait_for(up, timeout=20), log.read_text()
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_node_following_felix_control_registers_once_it_is_back(tmp_path: Path) -> None:
    """Auto-created while the separate control plane is down: registered when it is back
    (through POST /v1/registrations), with its settings and marker."""
    port = free_port()
    store = f"sqlite:///{tmp_path / 'control.db'}"
    api = f"http://127.0.0.1:{port}"
    control = _felix_control(port, store, tmp_path / "control.log")
    node = NodeProcess(tmp_path / "node", "--control-url", api)
    try:
        _stop(control)

        async def write() -> None:
            async with _client(node) as client:
                await client.publish("orders", b"while away")
                assert await client.cache("sessions").set("k", b"v")

        run(write, timeout=30)
        assert _wait_for(lambda: node.metric("felix_autocreate_failures_total") >= 1, 20)
        control = _felix_control(port, store, tmp_path / "control.log")
        stream = _wait_for(lambda: _get(api, "tenants/acme/namespaces/prod/streams/orders"), 30)
        assert stream is not None and stream["spec"]["auto_created"] is True, node.log()
        cache = _wait_for(lambda: _get(api, "tenants/acme/namespaces/prod/caches/sessions"))
        assert cache is not None and cache["spec"]["auto_created"] is True
        assert node.metric("felix_autocreate_registered_total") == 2
        assert node.http("/readyz")[0] == 200

        async def still_there() -> None:
            async with _client(node) as client, client.subscribe("orders", start="earliest") as sub:
                assert (await sub.next(timeout=5)).data == b"while away"

        run(still_there, timeout=30)
    finally:
        node.stop()
        _stop(control)


def test_quota_refusals_are_counted_and_many_auto_creates_register_in_batches(
    tmp_path: Path,
) -> None:
    node = NodeProcess(tmp_path / "node", "--control", "127.0.0.1:0")
    try:
        api = node.info["control"]
        # A tenant whose quota cannot hold a default replay ring (64 MiB).
        r = httpx.post(f"{api}/v1/tenants", json={"name": "small", "memory_quota_bytes": 1 << 20})
        assert r.status_code == 201, r.text
        many = 300

        async def write() -> None:
            async with _client(node, tenant="small") as client:
                await client.publish("refused", b"x")  # works on the data plane
            async with _client(node, tenant="busy") as client:
                await asyncio.gather(*(client.publish(f"s{i}", b"x") for i in range(many)))

        run(write, timeout=60)
        assert _wait_for(lambda: node.metric("felix_autocreate_refused_total") == 1), node.log()
        assert "refused to register auto-created stream small/prod/refused" in node.log()
        listed = _wait_for(
            lambda: len(_items(api, "tenants/busy/namespaces/prod/streams")) == many, 30
        )
        assert listed, node.log()
        assert node.metric("felix_autocreate_registered_total") == many
        assert node.metric("felix_autocreate_dropped_total") == 0
        status = httpx.get(f"http://{node.info['http']}/status", timeout=5).json()
        registrations = status["auto_created"]
        assert registrations["pending"] == 0 and registrations["registered"] == many
        # Batched: a few requests to the control plane, not one per stream.
        assert registrations["batches"] <= many // 10, registrations
        assert node.http("/readyz")[0] == 200
    finally:
        node.stop()


def test_a_restart_registers_nothing_twice(tmp_path: Path) -> None:
    """Durable auto-created streams come back from disk after a restart and are reported
    again: already registered, they are left alone (no new version, no new change)."""
    data = tmp_path / "node"
    node = NodeProcess(data, "--control", "127.0.0.1:0", "--durable-streams")
    try:
        api = node.info["control"]
        path = "tenants/acme/namespaces/prod/streams/orders"

        async def write() -> None:
            async with _client(node) as client:
                await client.publish("orders", b"kept")

        run(write, timeout=30)
        stream = _wait_for(lambda: _get(api, path))
        assert stream is not None and stream["spec"]["durable"] is True, node.log()
        assert stream["spec"]["fsync"] == "commit" and stream["version"] == 1
    finally:
        node.stop()
    node = NodeProcess(data, "--control", "127.0.0.1:0", "--durable-streams")
    try:
        api = node.info["control"]
        position = httpx.get(f"{api}/v1/snapshot", timeout=5).json()["position"]
        time.sleep(2)  # the shards' reports of what they found on disk come and go
        assert httpx.get(f"{api}/v1/snapshot", timeout=5).json()["position"] == position
        stream = _get(api, path)
        assert stream is not None and stream["version"] == 1
        assert node.metric("felix_autocreate_registered_total") == 0

        async def read() -> None:
            async with _client(node) as client, client.subscribe("orders", start="earliest") as sub:
                assert (await sub.next(timeout=5)).data == b"kept"

        run(read, timeout=30)
    finally:
        node.stop()


def test_the_embedded_control_plane_frozen_while_auto_creating(tmp_path: Path) -> None:
    """control-0 frozen (then killed by the heartbeat and restarted): the registration
    fails, stays pending and lands once the control process is back."""
    node = NodeProcess(tmp_path / "node", "--control", "127.0.0.1:0", "--heartbeat-timeout", "3")
    try:
        api = node.info["control"]
        pid = int(node.info["processes"]["control-0"])
        os.kill(pid, signal.SIGSTOP)

        async def write() -> None:
            async with _client(node) as client:
                await client.publish("orders", b"while frozen")

        run(write, timeout=30)
        assert _wait_for(lambda: node.metric("felix_autocreate_failures_total") >= 1, 30), (
            node.log()
        )
        node.wait_restarted("control-0", pid, timeout=30)
        stream = _wait_for(lambda: _get(api, "tenants/acme/namespaces/prod/streams/orders"), 30)
        assert stream is not None and stream["spec"]["auto_created"] is True, node.log()
        assert node.metric("felix_autocreate_registered_total") == 1
    finally:
        node.stop()
