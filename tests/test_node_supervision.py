"""Supervision under attack and faults, against real `felix up` process trees.

Each test reproduces a failure seen on a running node (issue 11): descriptors
exhausted through the HTTP ports while a shard dies, a restart that keeps
failing, a frozen shard, a second node on the same data dir, and kill -9 of the
supervisor (orphans, leaked rings).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from felix import wire
from felix.node.datadir import ring_prefix
from tests.aio import run
from tests.nodeproc import NodeProcess
from tests.rawquic import raw_connect
from tests.test_gateway import NS, T, ext

pytestmark = pytest.mark.timeout(180)


def _until(predicate: Callable[[], bool], timeout: float, what: str, node: NodeProcess) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{node.log()[-4000:]}")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running or stopped (a zombie is dead: nobody may have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _rings(data_dir: Path) -> list[str]:
    prefix = ring_prefix(data_dir)
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(prefix))


def _serves(node: NodeProcess, timeout: float = 30) -> None:
    """Cache writes to keys on every shard all succeed (within ``timeout``)."""

    async def main() -> None:
        peer = await raw_connect(node.host, node.port, node.ca_file)
        sid = await peer.auth()
        deadline = time.monotonic() + timeout
        rid = 0
        while True:
            start = len(peer.frames[sid])
            for k in range(16):
                rid += 1
                peer.send(sid, wire.encode_cache_set(rid, T, NS, "c", f"k{k}", b"v"))
            frames = await peer.frames_on(sid, start + 16, timeout=10)
            if all(isinstance(ext(f), wire.CacheResult) for f in frames[start:]):
                break
            assert time.monotonic() < deadline, "the node does not serve every shard"
            await asyncio.sleep(0.2)
        peer.close()

    run(main, timeout=timeout + 20)


@contextlib.contextmanager
def _half_open(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to ``port`` that never send a request."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def _freeze_until_replaced(
    node: NodeProcess,
    name: str,
    status: int,
    report: str,
    while_frozen: Callable[[], None] = lambda: None,
) -> None:
    """SIGSTOP child ``name``; /readyz must answer ``status`` with ``report`` in its
    body, then the supervisor must replace the child."""
    pid = int(node.refresh()["processes"][name])
    os.kill(pid, signal.SIGSTOP)
    try:

        def reported() -> bool:
            got, body = node.http("/readyz")
            return got == status and report in body

        _until(reported, 20, f"/readyz to report the frozen {name}", node)
        while_frozen()
        node.wait_restarted(name, pid, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_descriptor_flood_on_the_http_ports_cannot_starve_a_restart(tmp_path: Path) -> None:
    # A low, fixed descriptor limit (raising it to the hard limit cannot help) so a
    # few hundred idle connections exhaust the supervisor quickly.
    limit = 200
    node = NodeProcess(tmp_path / "node", nofile=(limit, limit))
    try:
        pid = node.info["pid"]
        control_port = int(node.info["control"].rsplit(":", 1)[1])
        health_port = int(node.info["http"].rsplit(":", 1)[1])
        control_pid = int(node.info["processes"]["control-0"])
        with _half_open(control_port, 2 * limit), _half_open(health_port, 2 * limit):
            # The flood is real: the control plane's process has no descriptor left...
            _until(lambda: _fds(control_pid) >= limit - 2, 20, "the flood to land", node)
            old = node.kill_child("shard-0")
            node.wait_restarted("shard-0", old, timeout=30)
            # Health probes still get in (the oldest idle connection makes room).
            status, body = node.http("/readyz")
            assert status in (200, 503), body
            _until(lambda: node.http("/readyz")[0] == 200, 30, "/readyz 200", node)
            _serves(node)
            # ...but the supervisor never ran out.
            assert _fds(pid) < limit - 32
        assert node.refresh()["restarts"]["shard-0"] == 1
    finally:
        node.stop()


def test_supervisor_raises_its_soft_descriptor_limit_to_the_hard_limit(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 16
    node = NodeProcess(tmp_path / "node", nofile=(256, hard), gateways=1, shards=1)
    try:
        limits = Path(f"/proc/{node.info['pid']}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        node.stop()


def test_a_failing_restart_is_retried_reported_and_recovers(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", gateways=1, shards=2)
    try:
        offsets = node.data_dir / "shard-0.offsets"
        old = node.kill_child("shard-0")
        _until(lambda: not _alive(old), 10, "shard-0 to die", node)
        # Every replacement now fails to start: its offset files are unreadable.
        for path in (offsets, offsets.with_name(offsets.name + ".bak")):
            path.write_bytes(b"not an offsets file\n")

        def reported() -> bool:
            status, body = node.http("/readyz")
            return status == 503 and "shard-0: restart failing (attempt" in body

        _until(reported, 30, "/readyz to report the failing restart", node)
        body = node.http("/readyz")[1]
        assert "exited with 1 before it was ready" in body, body
        assert "shard-1" not in body, body  # only the failing child is named
        assert "shard-0: replacement exited with 1 before it was ready" in node.log()
        time.sleep(2)
        # Still retrying (never abandoned): the failures keep counting.
        failures = node.metric("felix_child_restart_failures_total")
        _until(
            lambda: node.metric("felix_child_restart_failures_total") > failures,
            30,
            "another attempt",
            node,
        )
        for path in (offsets, offsets.with_name(offsets.name + ".bak")):
            path.unlink()
        _until(lambda: node.http("/readyz") == (200, "ready\n"), 30, "/readyz ready", node)
        _serves(node)
    finally:
        node.stop()


def test_a_frozen_shard_is_reported_then_killed_and_restarted(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", "--heartbeat-timeout", "6s", gateways=1, shards=2)
    try:
        _freeze_until_replaced(node, "shard-1", 503, "shard-1: unresponsive: no heartbeat for")
        assert "shard-0" not in node.http("/readyz")[1]
        assert "stopped answering" in node.log()
        _until(lambda: node.http("/readyz") == (200, "ready\n"), 30, "/readyz ready", node)
        _serves(node)
    finally:
        node.stop()


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", gateways=1, shards=1)
    try:
        second = subprocess.Popen(
            [
                *(sys.executable, "-m", "felix.cli", "up", "--listen", "127.0.0.1:0"),
                *("--http", "127.0.0.1:0", "--control", "127.0.0.1:0", "--gateways", "1"),
                *("--shards", "1", "--data-dir", str(node.data_dir)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = second.communicate(timeout=60)
        finally:
            if second.poll() is None:
                os.killpg(second.pid, signal.SIGKILL)
                second.wait()
        assert second.returncode == 2, (out, err)
        message = err.decode()
        assert "is in use by another felix node" in message, message
        assert f"pid {node.info['pid']}" in message, message
        assert b"felix ready" not in out
        # The running node is untouched.
        assert node.http("/readyz") == (200, "ready\n")
        _serves(node)
    finally:
        node.stop()


def test_kill_9_of_the_supervisor_takes_its_children_and_the_next_start_reclaims_rings(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "node"
    node = NodeProcess(data_dir)
    children = [int(p) for p in node.info["processes"].values()]
    try:
        rings = _rings(data_dir)
        assert len(rings) == 2 * 2 * 2  # one per (gateway, shard) and direction
        # A frozen child cannot notice anything itself: the kernel must end it.
        os.kill(int(node.info["processes"]["shard-0"]), signal.SIGSTOP)
        os.kill(node.info["pid"], signal.SIGKILL)
        node.proc.wait(10)
        _until(lambda: not any(_alive(p) for p in children), 10, "the children to die", node)
        assert _rings(data_dir) == rings  # kill -9 left them behind...
        node.log_path.rename(tmp_path / "first.log")
        again = NodeProcess(data_dir)
        try:
            assert "reclaimed 8 rings" in again.log()  # ...and the next start took them back
            assert _rings(data_dir) == rings
            _serves(again)
        finally:
            again.stop()
        assert _rings(data_dir) == []
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.stop()


def test_the_control_plane_failing_never_takes_the_data_plane_down(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", "--heartbeat-timeout", "6s", gateways=1, shards=2)
    api = httpx.Client(base_url=node.info["control"], timeout=10)
    streams = "/v1/tenants/default/namespaces/default/streams"

    def defined_streams() -> float:
        return node.metric("felix_streams")

    try:
        assert api.post(streams, json={"name": "before"}).status_code == 201
        _until(lambda: defined_streams() >= 1, 20, "the stream to reach a shard", node)
        # Crashed: the data plane serves, the node stays ready, /readyz says what is wrong.
        old = node.kill_child("control-0")
        _serves(node)
        status, body = node.http("/readyz")
        assert status == 200, body
        node.wait_restarted("control-0", old, timeout=30)
        # Frozen (as a process thrashing or stuck would be): the same, then it is replaced.
        _freeze_until_replaced(
            node, "control-0", 200, "control-0: unresponsive", while_frozen=lambda: _serves(node)
        )
        # The new control process serves on the same port and the node follows it again.
        _until(lambda: node.http("/readyz") == (200, "ready\n"), 30, "/readyz ready", node)
        assert api.post(streams, json={"name": "after"}).status_code == 201
        _until(lambda: defined_streams() >= 2, 30, "the new stream to reach a shard", node)
        assert node.info["pid"] == node.refresh()["pid"]  # the supervisor never went away
    finally:
        api.close()
        node.stop()
