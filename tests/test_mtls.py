"""mTLS: client certificates on the QUIC port (aioquic gateways) and on the control plane.

Real handshakes on loopback: a server that requires a client certificate accepts one
chained to its client CA and refuses a client without one, with one from another CA,
and with an expired one; then the same through real `felix up` and `felix control`
processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from felix import wire
from felix.errors import ConnectionLost
from felix.quic import (
    ConnectionHandler,
    QuicEngine,
    StreamTransport,
    bind_udp,
    connect,
    load_engine,
    serve_on_socket,
)
from felix.tls import NodeCerts, ensure_node_certificates, issue_client_certificate
from tests.aio import run
from tests.nodeproc import NodeProcess, control_process
from tests.rawquic import RawPeer

pytestmark = pytest.mark.timeout(90)

#: TLS alerts, as QUIC CRYPTO_ERROR codes (0x100 + alert).
CERTIFICATE_REQUIRED = 0x100 + 116
BAD_CERTIFICATE = 0x100 + 42
CERTIFICATE_EXPIRED = 0x100 + 45


@dataclass(frozen=True)
class Pki:
    """A node's certificates, a second (untrusted) CA, and client certificates."""

    node: NodeCerts
    good: tuple[Path, Path]
    other_ca: tuple[Path, Path]
    expired: tuple[Path, Path]


def _issue(ca: NodeCerts, name: str, out: Path, **kwargs: Any) -> tuple[Path, Path]:
    assert ca.ca_cert is not None and ca.ca_key is not None
    cert, key = out / f"{name}-cert.pem", out / f"{name}-key.pem"
    issue_client_certificate(ca.ca_cert, ca.ca_key, name, cert, key, **kwargs)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    node = ensure_node_certificates(root / "node", hostnames=[], ips=[])
    other = ensure_node_certificates(root / "other", hostnames=[], ips=[])
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    return Pki(
        node=node,
        good=_issue(node, "alice", root / "clients"),
        other_ca=_issue(other, "mallory", root / "clients"),
        expired=_issue(
            node, "old", root / "clients", not_before=long_ago, validity=dt.timedelta(days=1)
        ),
    )


# -- a raw QUIC server that requires client certificates --------------------------------


class Echo(ConnectionHandler):
    """Server: echoes each stream back at FIN. Client: collects replies."""

    def __init__(self, transport: StreamTransport) -> None:
        super().__init__(transport)
        self.buffers: dict[int, bytearray] = {}
        self.replies: dict[int, asyncio.Future[bytes]] = {}
        self.terminated: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        buffer = self.buffers.setdefault(stream_id, bytearray())
        buffer += data
        if not end_stream:
            return
        message = bytes(self.buffers.pop(stream_id))
        reply = self.replies.pop(stream_id, None)
        if reply is not None:
            reply.set_result(message)
        else:
            self.send_stream_data(stream_id, message, end_stream=True)

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        if not self.terminated.done():
            self.terminated.set_result(error_code)

    async def echo(self, message: bytes, timeout: float = 5.0) -> bytes:
        stream_id = self.next_stream_id()
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.replies[stream_id] = reply
        self.send_stream_data(stream_id, message, end_stream=True)
        waiting: set[asyncio.Future[Any]] = {reply, self.terminated}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if reply in done:
            return reply.result()
        raise ConnectionError(f"no reply (terminated: {self.terminated.done()})")


async def _serve(server_engine: QuicEngine, pki: Pki) -> tuple[Any, int]:
    assert pki.node.ca_cert is not None
    sock = bind_udp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = server_engine.server_configuration(pki.node, client_ca=pki.node.ca_cert)
    return await serve_on_socket(server_engine, sock, config, Echo), port


async def _refused(client_engine: QuicEngine, pki: Pki, port: int, cert: Any) -> int:
    """Connect with ``cert`` and expect the server to refuse it; returns the close code.

    In TLS 1.3 the client's handshake completes when it sends its Finished, before
    the server has checked the client's certificate: the refusal arrives right after,
    as a CONNECTION_CLOSE with the TLS alert, before any request is answered.
    """
    config = client_engine.client_configuration(
        ca_file=pki.node.ca_cert, server_name="localhost", client_cert=cert
    )
    client = await connect(
        client_engine, "127.0.0.1", port, configuration=config, create_handler=Echo
    )
    # Refused during the request (no reply), or already before it (ConnectionLost).
    with pytest.raises((ConnectionError, ConnectionLost)):
        await client.echo(b"must not be answered")
    code = await asyncio.wait_for(client.terminated, 5)
    client.close()
    return code


@pytest.mark.parametrize("client_engine", ["qh3", "aioquic"])
def test_quic_mtls_handshakes(pki: Pki, client_engine: str) -> None:
    server_engine, client = load_engine("aioquic"), load_engine(client_engine)

    async def main() -> None:
        server, port = await _serve(server_engine, pki)
        try:
            config = client.client_configuration(
                ca_file=pki.node.ca_cert, server_name="localhost", client_cert=pki.good
            )
            ok = await connect(client, "127.0.0.1", port, configuration=config, create_handler=Echo)
            assert await ok.echo(b"hello") == b"hello"
            ok.close()

            assert await _refused(client, pki, port, None) == CERTIFICATE_REQUIRED
            assert await _refused(client, pki, port, pki.other_ca) == BAD_CERTIFICATE
            assert await _refused(client, pki, port, pki.expired) == CERTIFICATE_EXPIRED
        finally:
            server.close()

    run(main)


def test_aioquic_private_names_the_mtls_patch_relies_on() -> None:
    """The version pin of felix/quic/mtls.py: every aioquic internal it touches exists."""
    from aioquic import tls as aioquic_tls

    from felix.quic import mtls

    for cls, name in mtls.PRIVATE_METHODS:
        assert callable(getattr(cls, name, None)), f"aioquic {cls.__name__}.{name} is gone"
    context = aioquic_tls.Context(is_client=False)
    for name in mtls.PRIVATE_CONTEXT_FIELDS:
        assert hasattr(context, name), f"aioquic tls.Context().{name} is gone"


def test_qh3_cannot_serve_mtls(pki: Pki) -> None:
    with pytest.raises(ValueError, match="aioquic"):
        load_engine("qh3").server_configuration(pki.node, client_ca=pki.node.ca_cert)


def test_client_configuration_reads_client_cert_from_env(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from felix.client._tls import client_configuration
    from felix.errors import ConfigError

    engine = load_engine("aioquic")
    monkeypatch.setenv("FELIX_CLIENT_CERT", str(pki.good[0]))
    monkeypatch.setenv("FELIX_CLIENT_KEY", str(pki.good[1]))
    assert client_configuration(engine, pki.node.ca_cert, "localhost").certificate is not None
    monkeypatch.delenv("FELIX_CLIENT_KEY")
    with pytest.raises(ConfigError, match="together"):
        client_configuration(engine, pki.node.ca_cert, "localhost")
    monkeypatch.delenv("FELIX_CLIENT_CERT")
    assert client_configuration(engine, pki.node.ca_cert, "localhost").certificate is None
    with pytest.raises(ConfigError, match="not found"):
        client_configuration(
            engine, pki.node.ca_cert, "localhost", client_cert=(tmp_path / "no.pem", pki.good[1])
        )


# -- real processes ------------------------------------------------------------------------


def _felix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_up_tls_client_ca_needs_aioquic(tmp_path: Path, pki: Pki) -> None:
    assert pki.node.ca_cert is not None
    done = _felix(
        "up",
        "--data-dir",
        str(tmp_path),
        "--engine",
        "qh3",
        "--tls-client-ca",
        str(pki.node.ca_cert),
    )
    assert done.returncode == 2
    assert "--engine aioquic" in done.stderr


def test_node_with_client_ca_serves_certificate_holders_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import felix

    data_dir = tmp_path / "node"
    # The node's own CA (generated now; `felix up` reuses it) also signs its clients.
    certs = ensure_node_certificates(data_dir / "tls", hostnames=[], ips=[])
    assert certs.ca_cert is not None
    issued = _felix(
        "ca", "issue-client", "alice", "--data-dir", str(data_dir), "--out-dir", str(tmp_path)
    )
    assert issued.returncode == 0, issued.stderr
    cert, key = tmp_path / "alice-cert.pem", tmp_path / "alice-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    # No --engine: --tls-client-ca picks aioquic (qh3 cannot require client certificates).
    node = NodeProcess(
        data_dir,
        "--tls-client-ca",
        str(certs.ca_cert),
        gateways=1,
        shards=1,
    )
    try:
        assert node.ca_file == certs.ca_cert

        async def main() -> None:
            # No client certificate: refused right after the handshake, nothing served.
            peer = await raw_connect(node.host, node.port, node.ca_file, engine="qh3")
            sid = peer.new_stream()
            # The refusal may already have closed the connection (a loaded machine).
            with contextlib.suppress(ConnectionLost):
                auth = {"type": "auth", "tenant_id": "acme", "token": ""}
                peer.send(sid, wire.encode_message(auth))
            await peer.wait_for(lambda: peer.close_code is not None)
            assert peer.close_code == CERTIFICATE_REQUIRED
            assert not peer.frames[sid]
            peer.close()

            # With one: a raw peer authenticates, and felix.connect publishes (the
            # certificate given as client_cert, then taken from the environment).
            peer = await raw_connect(
                node.host, node.port, node.ca_file, engine="qh3", client_cert=(cert, key)
            )
            sid = await peer.auth()
            assert wire.decode_message(peer.frames[sid][0])["type"] in ("ok", "auth_ok")
            peer.close()

            url = f"felix://{node.host}:{node.port}"
            async with felix.connect(
                url, ca=node.ca_file, tenant="acme", client_cert=(cert, key)
            ) as client:
                ack = await client.publish("events", b"hello")
                assert ack is not None and ack.offset == 0

            monkeypatch.setenv("FELIX_CLIENT_CERT", str(cert))
            monkeypatch.setenv("FELIX_CLIENT_KEY", str(key))
            async with felix.connect(url, ca=node.ca_file, tenant="acme") as client:
                ack = await client.publish("events", b"again")
                assert ack is not None and ack.offset == 1

        run(main, timeout=40)
    finally:
        assert node.stop() == 0


class ClosingPeer(RawPeer):
    """A raw peer that remembers the code its connection was closed with."""

    close_code: int | None = None

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        self.close_code = error_code
        super()._on_connection_terminated(error_code, frame_type, reason_phrase)


async def raw_connect(
    host: str,
    port: int,
    ca_file: Path,
    *,
    engine: str,
    client_cert: tuple[Path, Path] | None = None,
) -> ClosingPeer:
    quic = load_engine(engine)
    config = quic.client_configuration(ca_file=ca_file, server_name=host, client_cert=client_cert)
    return await connect(quic, host, port, configuration=config, create_handler=ClosingPeer)


# -- the control plane over https with client certificates ---------------------------------


@pytest.fixture
def control_mtls(tmp_path: Path) -> Iterator[tuple[str, Pki]]:
    """`felix control` on https, requiring client certificates from its own CA."""
    tls_dir = tmp_path / "control-tls"
    node = ensure_node_certificates(tls_dir, hostnames=[], ips=[])
    other = ensure_node_certificates(tmp_path / "other", hostnames=[], ips=[])
    pki = Pki(
        node=node,
        good=_issue(node, "node-1", tmp_path / "clients"),
        other_ca=_issue(other, "mallory", tmp_path / "clients"),
        expired=_issue(
            node,
            "old",
            tmp_path / "clients",
            not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
            validity=dt.timedelta(days=1),
        ),
    )
    assert node.ca_cert is not None
    with (
        _https(pki, pki.good) as probe,
        control_process(
            tmp_path / "control.log",
            "--store",
            f"sqlite:///{tmp_path / 'control.db'}",
            "--tls-dir",
            str(tls_dir),
            "--tls-client-ca",
            str(node.ca_cert),
            scheme="https",
            http=probe,
        ) as url,
    ):
        yield url, pki


def _https(pki: Pki, cert: tuple[Path, Path] | None) -> httpx.Client:
    assert pki.node.ca_cert is not None
    context = ssl.create_default_context(cafile=str(pki.node.ca_cert))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return httpx.Client(verify=context, timeout=5)


def test_control_over_https_requires_a_client_certificate(
    control_mtls: tuple[str, Pki],
) -> None:
    url, pki = control_mtls
    with _https(pki, pki.good) as http:
        assert http.post(f"{url}/v1/tenants", json={"name": "acme"}).status_code == 201
        assert http.get(f"{url}/v1/tenants").json()["items"][0]["name"] == "acme"
    for cert in (None, pki.other_ca, pki.expired):
        with _https(pki, cert) as http, pytest.raises(httpx.TransportError):
            http.get(f"{url}/v1/tenants")
    # Plain http on the https port is no way around it.
    with pytest.raises(httpx.TransportError):
        httpx.get(url.replace("https", "http") + "/v1/tenants", timeout=5)

    # The ControlClient and the CLI present one too (flags, or the environment).
    from felix.control.client import ControlClient
    from felix.errors import Unavailable

    assert pki.node.ca_cert is not None
    with ControlClient(url, ca=pki.node.ca_cert, cert=pki.good) as api:
        assert api.health()["status"] == "ok"
    with ControlClient(url, ca=pki.node.ca_cert) as api, pytest.raises(Unavailable):
        api.info()
    ca, (cert_file, key_file) = str(pki.node.ca_cert), map(str, pki.good)
    done = _felix("tenant", "ls", "--url", url, "--ca", ca, "--cert", cert_file, "--key", key_file)
    assert done.returncode == 0, done.stderr
    assert "acme" in done.stdout
    assert _felix("tenant", "ls", "--url", url, "--ca", ca).returncode == 1


def test_node_follows_a_control_plane_over_mtls(
    control_mtls: tuple[str, Pki], tmp_path: Path
) -> None:
    import felix

    url, pki = control_mtls
    assert pki.node.ca_cert is not None
    with _https(pki, pki.good) as http:
        base = f"{url}/v1/tenants"
        assert http.post(base, json={"name": "acme"}).status_code == 201
        assert http.post(f"{base}/acme/namespaces", json={"name": "prod"}).status_code == 201
        node = NodeProcess(
            tmp_path / "node",
            "--no-auto-create",
            "--control-url",
            url,
            "--control-ca",
            str(pki.node.ca_cert),
            "--control-client-cert",
            str(pki.good[0]),
            "--control-client-key",
            str(pki.good[1]),
            gateways=1,
            shards=1,
        )
        try:
            assert node.http("/readyz")[0] == 200
            r = http.post(f"{base}/acme/namespaces/prod/streams", json={"name": "events"})
            assert r.status_code == 201

            async def main() -> None:
                address = f"felix://{node.host}:{node.port}"
                async with felix.connect(
                    address, ca=node.ca_file, tenant="acme", namespace="prod"
                ) as client:
                    for _ in range(50):  # the follower long-polls: the stream appears promptly
                        try:
                            ack = await client.publish("events", b"hello")
                            break
                        except felix.NotFound:
                            await asyncio.sleep(0.1)
                    assert ack is not None and ack.offset == 0

            run(main, timeout=30)
        finally:
            assert node.stop() == 0


def test_node_config_mtls_settings(tmp_path: Path) -> None:
    from felix.errors import ConfigError
    from felix.node.config import NodeConfig

    ca = tmp_path / "ca.pem"
    # Every QUIC client is authenticated by its certificate: the port may leave loopback.
    config = NodeConfig(
        listen=("0.0.0.0", 5000),
        region="eu-1",  # beyond loopback a node names its region
        engine="aioquic",
        tls_client_ca=ca,
        control_url="https://control:8443",
        control_ca=tmp_path / "control-ca.pem",
        control_client_cert=tmp_path / "c.pem",
        control_client_key=tmp_path / "k.pem",
    )
    assert NodeConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="aioquic"):
        NodeConfig(engine="qh3", tls_client_ca=ca)
    with pytest.raises(ConfigError, match="go together"):
        NodeConfig(control_client_cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="loopback"):  # the control port is not covered
        NodeConfig(control=("0.0.0.0", 8443), engine="aioquic", tls_client_ca=ca)


def test_embedded_control_plane_requires_client_certificates(tmp_path: Path) -> None:
    """`felix up --control-client-ca`: the embedded API serves HTTPS and asks for a cert."""
    data_dir = tmp_path / "node"
    certs = ensure_node_certificates(data_dir / "tls", hostnames=[], ips=[])
    assert certs.ca_cert is not None
    issued = _felix(
        "ca", "issue-client", "ops", "--data-dir", str(data_dir), "--out-dir", str(tmp_path)
    )
    assert issued.returncode == 0, issued.stderr
    cert = (tmp_path / "ops-cert.pem", tmp_path / "ops-key.pem")
    node = NodeProcess(data_dir, "--control-client-ca", str(certs.ca_cert), gateways=1, shards=1)
    try:
        url = node.info["control"]
        assert url.startswith("https://")
        pki = Pki(node=certs, good=cert, other_ca=cert, expired=cert)
        with _https(pki, cert) as http:
            assert http.get(f"{url}/v1/tenants").status_code == 200
        with _https(pki, None) as http, pytest.raises(httpx.TransportError):
            http.get(f"{url}/v1/tenants")
        # The QUIC port is not affected: no client certificate needed there.
        assert node.http("/readyz")[0] == 200
    finally:
        assert node.stop() == 0
