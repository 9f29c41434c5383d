"""Same-host clients over shared memory against a real `felix up` process tree:
cache, pub/sub and a queue over felix+shm://, auth exactly as on QUIC, a client
killed with SIGKILL leaves nothing in the gateway, a client scribbling into its
ring loses its session only, the connection limit refuses clearly, the socket's
mode, and a stale socket file of a killed node is replaced."""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import felix
from felix.client._connection import ClientProtocol
from felix.errors import Overloaded
from felix.shm.client import shm_connect
from felix.shm.transport import ShmTransport
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(120)


def shm_url(node: NodeProcess) -> str:
    return f"felix+shm://{node.info['shm']}"


def gateway_pids(node: NodeProcess) -> list[int]:
    return [int(p) for name, p in node.refresh()["processes"].items() if name.startswith("gateway")]


def fds_of(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def wait_until(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # One gateway: the connection limit and the descriptor count are that process's.
    base = tmp_path_factory.mktemp("shm")
    proc = NodeProcess(
        base / "node",
        "--durable-streams",
        "--shm-max-connections",
        "3",
        gateways=1,
        shards=2,
    )
    try:
        yield proc
    finally:
        proc.stop()


def test_socket_is_in_the_data_dir_with_mode_0600(node: NodeProcess) -> None:
    path = Path(node.info["shm"])
    assert path == node.data_dir / "felix.sock"
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o600


def test_cache_pubsub_and_queue_over_shm(node: NodeProcess) -> None:
    async def main() -> None:
        async with felix.connect(shm_url(node)) as client:
            cache = client.cache("sessions")
            assert await cache.set("user:1", b"alice")
            assert await cache.get("user:1") == b"alice"
            assert await cache.get("missing") is None
            big = os.urandom(1_000_000)  # several ring records
            await cache.set("big", big)
            assert await cache.get("big") == big
            async with client.subscribe("orders", start="earliest") as sub:
                acks = [await client.publish("orders", b"o%d" % i) for i in range(100)]
                assert [a.offset for a in acks if a is not None] == list(range(100))
                got = [(await sub.next(timeout=5)).data for _ in range(100)]
                assert got == [b"o%d" % i for i in range(100)]
            for i in range(20):
                await client.publish("jobs", b"j%d" % i)
            seen: list[bytes] = []
            async with client.consume("jobs", "workers", prefetch=8) as jobs:
                while len(seen) < 20:
                    for job in await jobs.fetch(8, timeout=2):
                        seen.append(job.data)
                        await job.ack()
            assert sorted(seen) == sorted(b"j%d" % i for i in range(20))
        assert node.metric("felix_shm_connections") >= 0

    run(main, timeout=60)


def test_the_cli_takes_a_felix_shm_url(node: NodeProcess) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "felix.cli", *args, "--url", shm_url(node)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    stored = cli("cache", "set", "cli-cache", "user:2", "bob")
    assert stored.returncode == 0, stored.stderr
    got = cli("cache", "get", "cli-cache", "user:2")
    assert (got.returncode, got.stdout) == (0, "bob\n"), got.stderr


#: A client as a client-only install runs it: without the server extra's posix_ipc
#: (named rings only), importing nothing server-side.
CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    sys.modules["posix_ipc"] = None  # import fails, as in a client-only install
    import felix

    async def main():
        client = await felix.connect(sys.argv[1])
        await client.cache("c").set("k", b"v")
        server = [m for m in sys.modules if m.startswith(("felix.gateway", "felix.node",
                                                          "felix.shard", "felix.shm.server"))]
        print("connected" if not server else f"server-side modules: {server}", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_a_client_killed_with_sigkill_leaves_nothing_behind(node: NodeProcess) -> None:
    pids = gateway_pids(node)
    wait_until(lambda: node.metric("felix_shm_connections") == 0, what="no shm connections")
    before = fds_of(pids)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, shm_url(node)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        wait_until(lambda: node.metric("felix_shm_connections") == 1, what="one shm connection")
        # Its socket, two memfd rings (and their mappings' descriptors) and two eventfds.
        assert fds_of(pids) > before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: fds_of(pids) == before, what="the gateway's descriptors back")
    wait_until(lambda: node.metric("felix_shm_connections") == 0, what="no shm connections")


def test_a_client_scribbling_into_its_ring_loses_only_its_session(node: NodeProcess) -> None:
    path = node.info["shm"]

    async def main() -> None:
        async with felix.connect(shm_url(node)) as good:
            await good.cache("c").set("k", b"v")
            for scribble in ("frame", "head"):
                bad = await shm_connect(path, ClientProtocol, 5.0)
                transport = bad.transport
                assert isinstance(transport, ShmTransport)
                ring = transport._out
                if scribble == "frame":
                    ring.write(struct.pack("<BBHIQ", 200, 0, 0, 0, 0) + b"garbage")
                else:
                    shared = mmap.mmap(ring.fd, os.fstat(ring.fd).st_size, flags=mmap.MAP_SHARED)
                    struct.pack_into("<Q", shared, 128, (1 << 40) + 8)  # head far past tail
                    shared.close()
                    os.eventfd_write(ring.doorbell_fd, 1)
                await asyncio.wait_for(transport.wait_closed(), 5)
                assert transport.close_reason is not None
            # The node goes on serving the other client.
            assert await good.cache("c").get("k") == b"v"

    run(main, timeout=30)
    assert node.proc.poll() is None
    assert "corrupt ring" in node.log() and "unknown shm frame kind" in node.log()
    assert node.refresh()["restarts"]["gateway-0"] == 0


def test_more_than_the_connection_limit_is_refused_clearly(node: NodeProcess) -> None:
    async def main() -> None:
        clients = [await felix.connect(shm_url(node)) for _ in range(3)]
        try:
            with pytest.raises(Overloaded, match="limit of 3 shm connections"):
                await felix.connect(shm_url(node), connect_timeout=3)
        finally:
            for client in clients:
                await client.close()

    run(main, timeout=30)


def test_the_client_reconnects_after_its_gateway_is_killed(node: NodeProcess) -> None:
    # Last of the module's tests on this node: its gateway restarts.
    events: list[object] = []

    async def main() -> None:
        async with felix.connect(
            shm_url(node), reconnect_backoff=(0.05, 0.5), on_event=events.append
        ) as client:
            cache = client.cache("c")
            assert await cache.set("again", b"1")
            old = node.kill_child("gateway-0")
            await asyncio.to_thread(node.wait_restarted, "gateway-0", old)
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                try:
                    # (Set again: shards hosted in the killed gateway lost the key.)
                    assert await cache.set("again", b"2")
                    assert await cache.get("again") == b"2"
                    break
                except felix.FelixError as exc:
                    assert exc.retryable, exc
                    assert asyncio.get_running_loop().time() < deadline, exc
                    await asyncio.sleep(0.1)

    run(main, timeout=40)
    names = [type(e).__name__ for e in events]
    assert "Disconnected" in names and "Reconnected" in names, names


def test_auth_runs_over_shm_as_over_quic(tmp_path: Path) -> None:
    auth_dir = tmp_path / "node" / "auth"

    def felix_cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    felix_cli("token", "keygen", "--tenant", "acme", "--dir", str(auth_dir))
    tok = felix_cli(
        "token", "mint", "--tenant", "acme", "--sub", "svc", "--dir", str(auth_dir),
        "--perm", "cache.read:cache:acme/default/*", "--perm", "cache.write:cache:acme/default/*",
    )  # fmt: skip
    node = NodeProcess(tmp_path / "node", "--auth", gateways=1, shards=1)
    try:

        async def main() -> None:
            with pytest.raises(felix.Unauthenticated):
                await felix.connect(shm_url(node), tenant="acme", connect_timeout=3)
            async with felix.connect(shm_url(node), tenant="acme", token=tok) as client:
                assert await client.cache("c").set("k", b"v")
                assert await client.cache("c").get("k") == b"v"
                with pytest.raises(felix.PermissionDenied):
                    await client.publish("orders", b"x")

        run(main, timeout=30)
    finally:
        node.stop()


def test_a_stale_socket_is_replaced_and_a_non_socket_refused(tmp_path: Path) -> None:
    data = tmp_path / "node"
    first = NodeProcess(data, gateways=1, shards=1)
    sock_path = Path(first.info["shm"])
    first.kill_all()  # -9: the socket file stays behind
    assert sock_path.exists()
    second = NodeProcess(data, "--shm-socket-mode", "0660", gateways=1, shards=1)
    try:
        assert sock_path.stat().st_mode & 0o777 == 0o660

        async def main() -> None:
            async with felix.connect(shm_url(second)) as client:
                assert await client.cache("c").set("k", b"v")

        run(main, timeout=30)
        # A second node pointed at the live socket refuses to take it over.
        taken = subprocess.run(
            [sys.executable, "-m", "felix.cli", "up", "--data-dir", str(tmp_path / "other"),
             "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--control", "127.0.0.1:0",
             "--gateways", "1", "--shards", "1", "--shm-socket", str(sock_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert taken.returncode == 2 and "served by another running node" in taken.stderr
    finally:
        second.stop()
    assert not sock_path.exists()  # a clean stop removes it
    plain = tmp_path / "plain-file"
    plain.write_text("not a socket")
    refused = subprocess.run(
        [sys.executable, "-m", "felix.cli", "up", "--data-dir", str(tmp_path / "third"),
         "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--control", "127.0.0.1:0",
         "--gateways", "1", "--shards", "1", "--shm-socket", str(plain)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "is not a socket" in refused.stderr
    assert plain.read_text() == "not a socket"


def test_shm_url_parsing() -> None:
    from felix.client._convert import ShmEndpoint, parse_url
    from felix.errors import ConfigError

    assert parse_url("felix+shm:///run/felix/felix.sock") == ShmEndpoint("/run/felix/felix.sock")
    assert str(ShmEndpoint("/a/b.sock")) == "felix+shm:///a/b.sock"
    for bad in (
        "felix+shm://host/x.sock",
        "felix+shm:relative.sock",
        "felix+shm:///",
        "felix+shm:///a?x=1",
    ):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_shm_settings_are_checked() -> None:
    from felix.errors import ConfigError
    from felix.node.config import NodeConfig

    with pytest.raises(ConfigError, match="longer than a Unix socket path"):
        NodeConfig(shm_socket=Path("/" + "a" * 200))
    with pytest.raises(ConfigError, match="absolute"):
        NodeConfig(shm_socket=Path("relative.sock"))
    with pytest.raises(ConfigError, match="--shm-max-connections"):
        NodeConfig(shm_max_connections=0)
    config = NodeConfig(shm_socket=Path("/run/felix.sock"), shm_socket_mode=0o660)
    assert NodeConfig.from_json(config.to_json()) == config
