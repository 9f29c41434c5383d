"""The control plane's HTTP limits against a real uvicorn server on loopback (raw sockets).

Each test reproduces an attack from the hardening review: unauthenticated and oversized
bodies (the API read whole bodies before checking who sent them), half-open and
slowloris connections (never closed), and what the REST API told or accepted that it
should not (duplicate JSON keys, server paths, process ids).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from felix.auth.files import AUDIENCE, ISSUER, save_ring
from felix.auth.keys import TenantKeyRing
from felix.auth.minting import TenantKeys
from felix.auth.perms import PermissionSet
from felix.control.api import create_app
from felix.control.api.serving import ConnectionGuard, HttpLimits, server_config
from felix.control.stores.memory import MemoryStore
from felix.errors import Unavailable
from tests.aio import run

pytestmark = pytest.mark.timeout(60)

ADMIN = "admin-secret-token"
AUTH = f"Authorization: Bearer {ADMIN}\r\n".encode()
#: How long a raw socket waits for the server; an answer that needs longer is a failure.
WAIT = 10.0


class BodyMeter:
    """ASGI: counts the body bytes the app reads (what the server buffered for it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.read = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@dataclass
class Served:
    port: int
    meter: BodyMeter
    guard: ConnectionGuard

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve(limits: HttpLimits | None = None, **app_options: Any) -> Iterator[Served]:
    """The API (auth required, admin token ADMIN) served by uvicorn in a thread."""
    app = create_app(
        MemoryStore(), admin_token=ADMIN, require_auth=True, limits=limits, **app_options
    )
    meter = BodyMeter(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(
        meter,
        "127.0.0.1",
        port,
        limits=limits,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    assert isinstance(config.app, ConnectionGuard)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Served(port, meter, config.app)
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-case headers, body); TimeoutError if none comes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer (got {data[:80]!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def assert_closed(sock: socket.socket, within: float) -> None:
    """The server closed ``sock`` (FIN or RST) within ``within`` seconds."""
    sock.settimeout(max(within, 0.1))
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):
            pass


def problem(body: bytes, slug: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    assert doc["type"] == f"/v1/problems/{slug}", doc
    return doc


def post_head(framing: bytes, *, auth: bytes = b"") -> bytes:
    return (
        b"POST /v1/tenants HTTP/1.1\r\nHost: control\r\nContent-Type: application/json\r\n"
        + auth
        + framing
        + b"\r\n"
    )


# -- item 5: authentication before the body, and a body limit while it streams -----------


def test_an_unauthenticated_post_is_refused_before_its_body_is_read() -> None:
    chunk = b"x" * 16384
    with serve() as server:
        for framing, start in (
            (b"Content-Length: 1073741824\r\n", chunk * 4),  # claims 1 GiB
            (b"Transfer-Encoding: chunked\r\n", b"4000\r\n" + chunk + b"\r\n"),  # never ends
        ):
            with connect(server.port) as sock:
                sock.sendall(post_head(framing) + start)
                status, headers, body = read_response(sock)
                assert status == 401, body
                problem(body, "unauthenticated")
                assert headers["connection"] == "close"
                assert_closed(sock, WAIT)
        assert server.meter.read == 0  # not a byte of either body reached the app


def test_an_oversized_body_is_refused_while_it_streams() -> None:
    limit = 64 * 1024
    with serve(HttpLimits(max_body_bytes=limit)) as server:
        # Declared too large: refused from the headers, nothing read.
        with connect(server.port) as sock:
            sock.sendall(post_head(b"Content-Length: 10485760\r\n", auth=AUTH))
            status, headers, body = read_response(sock)
            assert status == 413, body
            assert "larger than 65536 bytes" in problem(body, "too-large")["detail"]
            assert headers["connection"] == "close"
        assert server.meter.read == 0

        # Chunked, so undeclared: refused once what arrived passes the limit.
        sent = [0]
        budget = 32 << 20

        with connect(server.port) as sock:
            sock.sendall(post_head(b"Transfer-Encoding: chunked\r\n", auth=AUTH))

            def push() -> None:
                frame = b"4000\r\n" + b"x" * 16384 + b"\r\n"
                with contextlib.suppress(OSError):
                    while sent[0] < budget:
                        sock.sendall(frame)
                        sent[0] += 16384

            pusher = threading.Thread(target=push, daemon=True)
            pusher.start()
            status, headers, body = read_response(sock)
            assert status == 413, body
            problem(body, "too-large")
            assert headers["connection"] == "close"
            pusher.join(WAIT)
            assert not pusher.is_alive()
        # At most the limit plus what the server had buffered for one receive: uvicorn
        # stops reading past 64 KiB of unread body, after a socket read of up to 256 KiB.
        assert limit < server.meter.read <= limit + 512 * 1024
        assert sent[0] < budget  # the server stopped taking it

        # A body within the limit still works.
        r = httpx.post(f"{server.url}/v1/tenants", json={"name": "acme"}, headers=bearer(ADMIN))
        assert r.status_code == 201, r.text


# -- item 6: half-open and slowloris connections ----------------------------------------


def test_half_open_connections_are_closed_and_a_valid_client_still_gets_in() -> None:
    limits = HttpLimits(header_timeout=1.0, max_connections=32)
    with serve(limits) as server:
        attackers = [connect(server.port) for _ in range(100)]  # far over max_connections
        for sock in attackers[::2]:  # half of them start a request head and stall (slowloris)
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /v1/system/health HTTP/1.1\r\nHost: control\r\n")
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=WAIT) as client:
            for _ in range(3):
                r = client.get("/v1/system/health")
                assert r.status_code == 200, r.text
                assert client.get("/v1/regions", headers=bearer(ADMIN)).status_code == 200
        assert len(server.guard) <= limits.max_connections
        for sock in attackers:
            assert_closed(sock, started + 4 * WAIT - time.monotonic())
            sock.close()
        counts = server.guard.counts
        # However the machine's load split them between the two bounds, every attacker
        # was closed by one: evicted to admit a newer connection, or timed out.
        assert counts["timed_out"] >= 1
        assert counts["evicted"] + counts["timed_out"] >= 100


def test_an_oversized_request_head_is_refused() -> None:
    with serve(HttpLimits(max_header_bytes=8192)) as server, connect(server.port) as sock:
        sock.sendall(b"GET /v1/system/health HTTP/1.1\r\nHost: control\r\nX-Pad: " + b"p" * 12000)
        status, _, _ = read_response(sock)
        assert status == 400
        assert_closed(sock, WAIT)


# -- low: duplicate keys, server paths, process ids --------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_rest_refuses_json_the_wire_refuses() -> None:
    with serve() as server, httpx.Client(base_url=server.url, headers=bearer(ADMIN)) as http:
        for text, why in (
            ('{"name": "acme", "name": "other"}', "duplicate key 'name'"),
            ('{"name": "acme", "spec": {"a": 1, "a": 2}}', "duplicate key 'a'"),
            ('{"name": "acme", "x": NaN}', "invalid JSON number NaN"),
        ):
            r = http.post("/v1/tenants", content=text, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            assert why in problem(r.content, "bad-request")["detail"]
        assert http.get("/v1/tenants").json()["items"] == []  # nothing was created


def test_the_jwks_route_answers_alike_for_unknown_and_keyless_tenants(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    keys.mkdir()
    with serve(keys_dir=keys) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/tenants", json={"name": "acme"}, headers=bearer(ADMIN)).is_success
        answers = []
        for tenant in ("acme", "ghost"):  # exists without keys; does not exist
            r = http.get(f"/v1/tenants/{tenant}/.well-known/jwks.json")
            assert r.status_code == 404, r.text
            assert (
                str(tmp_path) not in r.text and "/" not in problem(r.content, "not-found")["detail"]
            )
            answers.append(r.text.replace(tenant, "T"))
        assert answers[0] == answers[1]


def test_minting_without_keys_names_no_server_path(tmp_path: Path) -> None:
    keys = TenantKeys(tmp_path / "auth")
    perms = PermissionSet("acme", ["stream.publish:stream:acme/prod/*"])

    async def main() -> None:
        with pytest.raises(Unavailable) as refused:
            await keys.mint("acme", "alice", perms, time.time())
        assert str(tmp_path) not in str(refused.value)

    run(main)


def test_system_info_shows_the_node_to_the_admin_only(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    now = time.time()
    ring = TenantKeyRing.create("acme", now)
    save_ring(keys, ring, now)
    perms = PermissionSet("acme", ["tenant.manage:tenant:acme"])
    tenant_token = ring.mint(now, issuer=ISSUER, audience=AUDIENCE, sub="alice", perms=perms)
    node = {"pid": 4242, "processes": {"shard-0": 4243}, "ca": str(tmp_path / "ca.pem")}
    with serve(keys_dir=keys, node_info=node) as server, httpx.Client(base_url=server.url) as http:
        r = http.get("/v1/system/info", headers=bearer(tenant_token))
        assert r.status_code == 200, r.text
        assert r.json()["node"] == {}
        assert "4242" not in r.text and str(tmp_path) not in r.text
        r = http.get("/v1/system/info", headers=bearer(ADMIN))
        assert r.json()["node"] == node
