"""`felix status` and `felix check` (felix/status_cli.py) over a real node's /status."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import felix
from felix.status_cli import CRITICAL, OK, WARNING, rates, render, verdict
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(180)

THRESHOLDS = {"warn_memory": 80.0, "crit_memory": 95.0, "warn_disk": 80.0, "crit_disk": 95.0}


def _sample(**totals: int) -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "region": "eu-1",
        "pid": 1,
        "uptime_s": 3725.0,
        "ready": True,
        "problems": [],
        "gateways": 1,
        "shards": 2,
        "children": [{"name": "shard-0", "pid": 2, "restarts": 1, "status": "serving"}],
        "budgets": {"memory_bytes": 1000, "disk_bytes": None, "disk_reserve_bytes": 0},
        "rings": {"count": 0},
        "totals": totals,
    }


def test_verdicts_follow_readiness_damage_stalls_and_budgets() -> None:
    code, line = verdict(_sample(memory_used_bytes=100, connections=3), THRESHOLDS)
    assert code == OK and line.startswith("FELIX OK - ready, 2 shard(s), 3 connection(s) | ")
    assert "memory=100B;800;950;0;1000" in line and "restarts=1" in line
    assert verdict(_sample(memory_used_bytes=850), THRESHOLDS)[0] == WARNING
    assert verdict(_sample(memory_used_bytes=960), THRESHOLDS)[0] == CRITICAL
    assert verdict(_sample(queue_stalled_groups=2), THRESHOLDS) == (
        WARNING,
        "FELIX WARNING - 2 stalled queue group(s) | memory=0B;800;950;0;1000 disk=0B "
        "connections=0 restarts=1",
    )
    assert verdict(_sample(log_damaged_streams=1), THRESHOLDS)[0] == CRITICAL
    unready = {**_sample(), "ready": False, "problems": ["shard-0: restarting (exited with -9)"]}
    code, line = verdict(unready, THRESHOLDS)
    assert code == CRITICAL and "not ready: shard-0: restarting (exited with -9)" in line


def test_rates_and_rendering() -> None:
    before = _sample(messages_published=100, requests=50)
    after = _sample(messages_published=300, requests=10)  # requests: a child restarted
    rate = rates(before, after, 2.0)
    assert rate["messages_published"] == 100.0 and rate["requests"] == 5.0
    text = render(after, rate)
    assert "region eu-1" in text and "up 1h2m5s" in text and "ready" in text
    assert "publishes 100.0" in text and "shard-0" in text


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "data", "--durable-streams")
    yield n
    n.stop()


def _cli(node: NodeProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
    env["FELIX_DATA_DIR"] = str(node.data_dir)  # found through node.json
    return subprocess.run(
        [sys.executable, "-m", "felix.cli", *argv],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_status_and_check_of_a_real_node(node: NodeProcess) -> None:
    for i in range(5):
        assert _cli(node, "pub", "orders", f"m{i}").returncode == 0
    deadline = time.monotonic() + 20
    while True:  # the shards report their totals every second
        got = _cli(node, "status", "--json", "--interval", "0.2")
        assert got.returncode == 0, got.stderr
        status = json.loads(got.stdout)
        if status["totals"]["messages_published"] >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status["ready"] and status["started"] and status["region"] == "local"
    assert {c["name"] for c in status["children"]} >= {"shard-0", "shard-1", "gateway-0"}
    assert all(c["status"] == "serving" and c["pid"] for c in status["children"])
    assert status["totals"]["messages_published"] >= 5
    assert status["totals"]["streams"] >= 1
    assert set(status["rates"]) >= {"messages_published", "requests"}
    human = _cli(node, "status", "--interval", "0.2")
    assert human.returncode == 0 and "ready" in human.stdout and "shard-1" in human.stdout
    watch = _cli(node, "status", "--watch", "--count", "2", "--interval", "0.2")
    assert watch.returncode == 0 and watch.stdout.count("PROCESS") == 2
    check = _cli(node, "check")
    assert check.returncode == OK and check.stdout.startswith("FELIX OK - ready"), check.stdout
    tight = _cli(node, "check", "--warn-memory", "0", "--crit-memory", "100")
    assert tight.returncode == WARNING and "memory" in tight.stdout
    node.stop()
    down = _cli(node, "check", "--timeout", "1")
    assert down.returncode == CRITICAL and down.stdout.startswith("FELIX CRITICAL - unreachable")
    assert _cli(node, "status", "--timeout", "1").returncode == 1


async def _traffic(node: NodeProcess) -> None:
    async with felix.connect(f"felix://127.0.0.1:{node.port}", ca=node.ca_file) as client:
        for i in range(5):
            await client.publish("orders", f"m{i}".encode())
        sessions = client.cache("sessions")
        for key in ("a", "b", "c"):
            await sessions.set(key, b"v")
        assert await sessions.get("a") == b"v"


def test_stream_and_cache_info_from_the_node(node: NodeProcess) -> None:
    asyncio.run(_traffic(node))
    http = node.info["http"]
    got = _cli(node, "cache", "info", "sessions", "--node", http, "--json", "--interval", "0")
    assert got.returncode == 0, got.stderr
    cache = json.loads(got.stdout)
    assert cache["cache"] == "default/default/sessions"
    assert (cache["entries"], cache["sets"], cache["hits"], cache["misses"]) == (3, 3, 1, 0)
    assert cache["used_bytes"] > 0 and cache["budget_bytes"] > 0
    # Found through node.json: the control plane's resource (auto-created, registered
    # within a second or so), then the node's view with rates over the interval.
    deadline = time.monotonic() + 20
    while True:
        got = _cli(node, "stream", "info", "orders", "--json", "--interval", "0.2")
        assert got.returncode == 0, got.stderr
        if "not defined in the control plane" not in got.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    resource, stream = (json.loads(line) for line in got.stdout.splitlines())
    assert resource["spec"]["auto_created"] is True
    assert stream["node"] == f"http://{http}" and stream["memory"]["next_offset"] == 5
    assert stream["rates"] == {"records": 0.0} and stream["gateways_watching"] == 0
    missing = _cli(node, "cache", "info", "nope", "--node", http, "--interval", "0")
    assert missing.returncode == 1 and "not held by this node" in missing.stderr
