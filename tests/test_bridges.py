"""Bridges end to end (issue #15): two nodes of different regions on loopback, each with
its own embedded control plane and data dir, real QUIC, and `felix bridge run` as a real
process between them (docs/operations.md, "Bridges").

The restart test asserts exactly-once at the target's consumer: it needs the target's
dedup of ``felix-msg-id`` (branch s15-dedup); without it the copies a crash leaves
behind reach the consumer and the test fails, as it should.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import felix
from felix.errors import FelixTimeoutError
from tests.aio import run
from tests.nodeproc import NodeProcess, free_port

pytestmark = pytest.mark.timeout(240)

TENANT = "acme"


class Region:
    """One region: a node with its own control plane."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.region = node.info["region"]
        self.control = node.info["control"]
        self.url = f"felix://{node.host}:{node.port}"
        self.api = httpx.Client(base_url=self.control, timeout=10)

    def define(self, *streams: str) -> None:
        """Tenant acme, namespace prod and these durable streams (idempotent)."""
        self.api.post("/v1/tenants", json={"name": TENANT})
        self.api.post(f"/v1/tenants/{TENANT}/namespaces", json={"name": "prod"})
        for stream in streams:
            r = self.api.post(
                f"/v1/tenants/{TENANT}/namespaces/prod/streams",
                json={"name": stream, "durable": True},
            )
            assert r.status_code in (201, 409), r.text

    async def publish(self, stream: str, payloads: list[bytes], **headers: str) -> None:
        async with felix.connect(self.url, tenant=TENANT, ca=self.node.ca_file) as c:
            for p in payloads:
                await c.publish(stream, p, headers=headers or None)

    async def read(self, stream: str, *, quiet: float = 1.5) -> list[Any]:
        """Every record of ``stream`` from the start, until none came for ``quiet`` s."""
        out: list[Any] = []
        async with (
            felix.connect(self.url, tenant=TENANT, ca=self.node.ca_file) as c,
            c.subscribe(stream, start="earliest") as sub,
        ):
            while True:
                try:
                    out.append(await sub.next(timeout=quiet))
                except FelixTimeoutError:
                    return out

    async def wait_for(self, stream: str, count: int, timeout: float = 60) -> list[Any]:
        """Read ``stream`` from the start until it holds ``count`` records (or more)."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        async with (
            felix.connect(self.url, tenant=TENANT, ca=self.node.ca_file) as c,
            c.subscribe(stream, start="earliest") as sub,
        ):
            while len(out) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{stream}: {len(out)} of {count} records")
                with contextlib.suppress(FelixTimeoutError):
                    out.append(await sub.next(timeout=left))
            # Anything beyond count (a duplicate) would show within a moment.
            with contextlib.suppress(FelixTimeoutError):
                while True:
                    out.append(await sub.next(timeout=1.5))
        return out


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Region, Region]]:
    base = tmp_path_factory.mktemp("regions")
    eu = NodeProcess(base / "eu", "--region", "eu-1", gateways=1, shards=1)
    try:
        us = NodeProcess(base / "us", "--region", "us-1", gateways=1, shards=1)
    except BaseException:
        eu.stop()
        raise
    try:
        yield Region(eu), Region(us)
    finally:
        assert us.stop() == 0
        assert eu.stop() == 0


def felix_cli(region: Region, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "felix.cli", *args, "--url", region.control],
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_bridge(eu: Region, us: Region, name: str, source: str, target: str, *extra: str) -> None:
    done = felix_cli(
        eu, "bridge", "create", name, "--tenant", TENANT, "--source", f"prod/{source}",
        "--target-url", us.url, "--target-region", us.region,
        "--target-stream", f"prod/{target}", "--target-ca", str(us.node.ca_file), *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


class Runner:
    """`felix bridge run NAME` as a process, its status endpoint, its state dir."""

    def __init__(self, eu: Region, name: str, state: Path, env: dict[str, str] | None = None):
        self.name = name
        self.state = state
        self.port = free_port()
        self.log_path = state.parent / f"{state.name}-{name}.log"
        cmd = [
            sys.executable, "-m", "felix.cli", "bridge", "run", name, "--tenant", TENANT,
            "--url", eu.control, "--source-url", eu.url, "--source-ca", str(eu.node.ca_file),
            "--state-dir", str(state), "--http", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def status(self) -> dict[str, Any] | None:
        try:
            body = httpx.get(f"http://127.0.0.1:{self.port}/bridges", timeout=2).json()
        except httpx.HTTPError:
            return None
        found = [b for b in body["bridges"] if b["name"] == self.name]
        return found[0] if found else None

    def wait_status(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st is not None and predicate(st):
                return st
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"runner status: {self.status()}\n{self.log()}")

    def checkpoint_file(self) -> Path:
        return self.state / TENANT / f"{self.name}.json"

    def checkpoint(self) -> int | None:
        try:
            return int(json.loads(self.checkpoint_file().read_text())["next_offset"])
        except (FileNotFoundError, ValueError):
            return None

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        for line in text.splitlines():
            if line.startswith(f'{name}{{bridge="{self.name}",tenant="{TENANT}"}}'):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in\n{text}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode


def payloads(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def test_only_the_bridged_stream_crosses_in_order_with_provenance(
    regions: tuple[Region, Region], tmp_path: Path
) -> None:
    eu, us = regions
    eu.define("orders", "audit")
    us.define("orders-eu", "audit")
    run(lambda: eu.publish("prod/orders", payloads("early", 30), tier="gold"))
    run(lambda: eu.publish("prod/audit", payloads("audit", 10)))
    # Without a bridge nothing crosses.
    assert run(lambda: us.read("prod/orders-eu")) == []
    assert run(lambda: us.read("prod/audit")) == []

    create_bridge(eu, us, "to-us", "orders", "orders-eu")
    runner = Runner(eu, "to-us", tmp_path / "state")
    try:
        run(lambda: eu.publish("prod/orders", payloads("live", 170), tier="silver"))
        got = run(lambda: us.wait_for("prod/orders-eu", 200), timeout=90)
        assert [m.data for m in got] == payloads("early", 30) + payloads("live", 170)
        assert [m.offset for m in got] == list(range(200))  # in order, nothing else
        for source_offset, m in enumerate(got):
            assert m.headers["tier"] == ("gold" if source_offset < 30 else "silver")
            assert m.headers["felix-source-region"] == "eu-1"
            assert m.headers["felix-source-stream"] == "acme/prod/orders"
            assert m.headers["felix-source-offset"] == str(source_offset)
            assert m.headers["felix-msg-id"] == f"bridge:eu-1/acme/prod/orders@{source_offset}"
        # The other stream of the tenant did not cross.
        assert run(lambda: us.read("prod/audit")) == []
        st = runner.wait_status(lambda s: s["checkpoint"] == 200 and s["lag"] == 0)
        assert st["state"] == "running" and st["forwarded"] == 200 and st["errors"] == 0
        assert st["target_durability"] == "synced"
        assert runner.checkpoint() == 200
        assert runner.metric("felix_bridge_records_total") == 200
        assert runner.metric("felix_bridge_lag_records") == 0
        # felix bridge ls|info show the runner's figures.
        done = felix_cli(
            eu, "bridge", "ls", "--tenant", TENANT, "--runner", f"http://127.0.0.1:{runner.port}"
        )
        assert done.returncode == 0, done.stderr
        assert "to-us" in done.stdout and "running" in done.stdout
        done = felix_cli(
            eu, "bridge", "info", "to-us", "--tenant", TENANT, "--json",
            "--runner", f"http://127.0.0.1:{runner.port}",
        )  # fmt: skip
        info = json.loads(done.stdout)
        assert info["spec"]["target_region"] == "us-1" and info["status"]["checkpoint"] == 200
    finally:
        assert runner.stop() == 0, runner.log()


def test_pause_resume_and_delete(regions: tuple[Region, Region], tmp_path: Path) -> None:
    eu, us = regions
    eu.define("payments")
    us.define("payments-eu")
    create_bridge(eu, us, "pay", "payments", "payments-eu")
    runner = Runner(eu, "pay", tmp_path / "state")
    try:
        run(lambda: eu.publish("prod/payments", payloads("a", 10)))
        assert len(run(lambda: us.wait_for("prod/payments-eu", 10))) == 10
        assert felix_cli(eu, "bridge", "pause", "pay", "--tenant", TENANT).returncode == 0
        runner.wait_status(lambda s: s["state"] == "paused")
        run(lambda: eu.publish("prod/payments", payloads("b", 10)))
        time.sleep(2)
        assert len(run(lambda: us.read("prod/payments-eu", quiet=1))) == 10  # stopped
        assert runner.checkpoint() == 10
        assert felix_cli(eu, "bridge", "resume", "pay", "--tenant", TENANT).returncode == 0
        got = run(lambda: us.wait_for("prod/payments-eu", 20))
        assert [m.data for m in got] == payloads("a", 10) + payloads("b", 10)
        runner.wait_status(lambda s: s["checkpoint"] == 20)
        # Deleting the bridge stops its flow and removes its checkpoint (and the
        # runner of that one bridge then exits).
        assert runner.checkpoint_file().exists()
        assert felix_cli(eu, "bridge", "rm", "pay", "--tenant", TENANT).returncode == 0
        assert runner.proc.wait(20) == 0, runner.log()
        assert not runner.checkpoint_file().exists()
        run(lambda: eu.publish("prod/payments", payloads("c", 5)))
        time.sleep(1)
        assert len(run(lambda: us.read("prod/payments-eu", quiet=1))) == 20
    finally:
        runner.stop()


def test_the_header_filter(regions: tuple[Region, Region], tmp_path: Path) -> None:
    eu, us = regions
    eu.define("events")
    us.define("gold-eu", "tagged-eu")
    create_bridge(
        eu, us, "gold", "events", "gold-eu", "--filter-header", "tier", "--filter-equals", "gold"
    )
    create_bridge(eu, us, "tagged", "events", "tagged-eu", "--filter-header", "tier")
    gold = Runner(eu, "gold", tmp_path / "state")
    tagged = Runner(eu, "tagged", tmp_path / "state")
    try:

        async def publish() -> None:
            async with felix.connect(eu.url, tenant=TENANT, ca=eu.node.ca_file) as c:
                for i in range(30):
                    headers = {"tier": ["gold", "silver"][i % 2]} if i % 3 else None
                    await c.publish("prod/events", f"e{i}".encode(), headers=headers)

        run(publish)
        want_gold = [f"e{i}".encode() for i in range(30) if i % 3 and i % 2 == 0]
        want_tagged = [f"e{i}".encode() for i in range(30) if i % 3]
        got = run(lambda: us.wait_for("prod/gold-eu", len(want_gold)))
        assert [m.data for m in got] == want_gold
        got = run(lambda: us.wait_for("prod/tagged-eu", len(want_tagged)))
        assert [m.data for m in got] == want_tagged
        # Filtered records move the checkpoint too: the lag goes to 0.
        st = gold.wait_status(lambda s: s["checkpoint"] == 30 and s["lag"] == 0)
        assert st["filtered"] == 30 - len(want_gold)
    finally:
        assert gold.stop() == 0
        assert tagged.stop() == 0


def test_a_crash_after_the_ack_and_kill_9_copy_each_record_once(
    regions: tuple[Region, Region], tmp_path: Path
) -> None:
    """Needs the target's dedup of felix-msg-id (s15-dedup): see the module doc."""
    eu, us = regions
    eu.define("ledger")
    us.define("ledger-eu")
    create_bridge(eu, us, "ledger", "ledger", "ledger-eu")
    total = 3000
    run(lambda: eu.publish("prod/ledger", payloads("r", 1000)))
    state = tmp_path / "state"
    # 1. Exit right after the second target ack, before its checkpoint: that batch is
    #    on the target and will be copied again.
    crash = Runner(eu, "ledger", state, env={"FELIX_FAULT_BRIDGE_EXIT_AFTER_ACKS": "2"})
    assert crash.proc.wait(60) == 75, crash.log()
    crash.stop()
    behind = crash.checkpoint()
    assert behind is not None and behind < 1000
    # 2. Kill -9 mid-flow while records are still being published.
    runner = Runner(eu, "ledger", state)

    async def publish_rest() -> None:
        async with felix.connect(eu.url, tenant=TENANT, ca=eu.node.ca_file) as c:
            for i in range(1000, total):
                await c.publish("prod/ledger", f"r-{i}".encode())
                if i == 1500:
                    runner.kill()
                    assert runner.checkpoint() is not None

    run(publish_rest, timeout=120)
    # 3. Start again: it continues from the checkpoint.
    again = Runner(eu, "ledger", state)
    try:
        got = run(lambda: us.wait_for("prod/ledger-eu", total), timeout=120)
        data = [m.data for m in got]
        assert len(data) == len(set(data)), "the target's consumer saw copies"
        assert data == payloads("r", total)
        again.wait_status(lambda s: s["checkpoint"] == total)
    finally:
        assert again.stop() == 0


def test_a_target_refusal_stops_the_flow_with_the_error(
    regions: tuple[Region, Region], tmp_path: Path
) -> None:
    """A target stream that is not durable: the bridge stops (state failed, the reason in
    its status) rather than move its checkpoint past records the target may lose."""
    eu, us = regions
    eu.define("metrics")
    us.define()
    r = us.api.post(f"/v1/tenants/{TENANT}/namespaces/prod/streams", json={"name": "metrics-eu"})
    assert r.status_code == 201
    create_bridge(eu, us, "metrics", "metrics", "metrics-eu")
    run(lambda: eu.publish("prod/metrics", payloads("m", 5)))
    runner = Runner(eu, "metrics", tmp_path / "state")
    try:
        st = runner.wait_status(lambda s: s["state"] == "failed")
        assert "not durable" in st["last_error"]
        assert runner.checkpoint() is None
        assert runner.metric("felix_bridge_errors_total") >= 1
    finally:
        assert runner.stop() == 0


def test_the_node_runs_its_bridges_with_tokens_it_mints(
    regions: tuple[Region, Region], tmp_path: Path
) -> None:
    """`felix up --auth --bridges`: the bridges child reads the source through the node
    with a token the node mints from the tenant's key ring, is restarted after kill -9,
    and follows pause and delete."""
    from felix.auth.files import AUDIENCE, ISSUER, save_ring
    from felix.auth.keys import TenantKeyRing
    from felix.auth.perms import PermissionSet

    _, us = regions  # the target: the module's us-1 node, into a stream of this test's own
    port = free_port()
    # The tenant's key ring in the node's key directory before it starts (as after
    # `felix token keygen`): its gateways and the bridges child find it at once.
    now = time.time()
    ring = TenantKeyRing.create(TENANT, now)
    save_ring(tmp_path / "eu" / "auth", ring, now)
    node = NodeProcess(
        tmp_path / "eu", "--auth", "--region", "eu-1", "--bridges", "--bridges-http",
        f"127.0.0.1:{port}", gateways=1, shards=1,
    )  # fmt: skip
    try:
        admin = (node.data_dir / "admin-token").read_text().strip()
        api = httpx.Client(
            base_url=node.info["control"], timeout=10, headers={"Authorization": f"Bearer {admin}"}
        )
        assert api.post("/v1/tenants", json={"name": TENANT}).status_code == 201
        assert (
            api.post(f"/v1/tenants/{TENANT}/namespaces", json={"name": "prod"}).status_code == 201
        )
        r = api.post(
            f"/v1/tenants/{TENANT}/namespaces/prod/streams",
            json={"name": "orders", "durable": True},
        )
        assert r.status_code == 201, r.text
        us.define("orders-minted")
        bridge = {
            "name": "to-us",
            "source_stream": "prod/orders",
            "target_url": us.url,
            "target_region": "us-1",
            "target_stream": "prod/orders-minted",
            "target_ca": str(us.node.ca_file),
        }
        assert api.post(f"/v1/tenants/{TENANT}/bridges", json=bridge).status_code == 201
        token = ring.mint(
            time.time(),
            issuer=ISSUER,
            audience=AUDIENCE,
            sub="app",
            perms=PermissionSet(TENANT, ["stream.publish:stream:acme/prod/orders"]),
            region="eu-1",
        )

        async def publish(prefix: str, n: int) -> None:
            url = f"felix://{node.host}:{node.port}"
            async with felix.connect(url, tenant=TENANT, ca=node.ca_file, token=token) as c:
                for p in payloads(prefix, n):
                    await c.publish("prod/orders", p)

        def status() -> dict[str, Any]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    body = httpx.get(f"http://127.0.0.1:{port}/bridges", timeout=2).json()
                    if body["bridges"]:
                        return dict(body["bridges"][0])
                time.sleep(0.2)
            raise AssertionError(node.log())

        def wait_status(predicate: Any) -> dict[str, Any]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = status()
                if predicate(st):
                    return st
                time.sleep(0.2)
            raise AssertionError(f"{status()}\n{node.log()}")

        run(lambda: publish("a", 50))
        got = run(lambda: us.wait_for("prod/orders-minted", 50))
        assert [m.data for m in got] == payloads("a", 50)
        wait_status(lambda st: st["checkpoint"] == 50)
        checkpoint = node.data_dir / "bridges" / TENANT / "to-us.json"
        assert json.loads(checkpoint.read_text())["next_offset"] == 50
        # kill -9: the supervisor starts it again, and it continues from its checkpoint.
        deadline = time.monotonic() + 10
        while "bridges-0" not in node.refresh()["processes"]:  # written once it started
            assert time.monotonic() < deadline, node.info
            time.sleep(0.1)
        old = node.kill_child("bridges-0")
        node.wait_restarted("bridges-0", old)
        run(lambda: publish("b", 20))
        got = run(lambda: us.wait_for("prod/orders-minted", 70))
        assert [m.data for m in got] == payloads("a", 50) + payloads("b", 20)
        # Paused: nothing flows; deleted: the checkpoint goes.
        assert api.patch(f"/v1/tenants/{TENANT}/bridges/to-us", json={"state": "paused"}).is_success
        wait_status(lambda st: st["state"] == "paused")
        run(lambda: publish("c", 5))
        time.sleep(1.5)
        assert len(run(lambda: us.read("prod/orders-minted", quiet=1))) == 70
        assert api.delete(f"/v1/tenants/{TENANT}/bridges/to-us").is_success
        deadline = time.monotonic() + 20
        while checkpoint.exists():
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.1)
        api.close()
    finally:
        assert node.stop() == 0, node.log()
