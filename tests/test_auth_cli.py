"""``felix token exchange`` and ``felix rbac`` against a real uvicorn-served control plane.

The API runs in a thread on an ephemeral port with a key directory (the tenant's
ring written by :func:`felix.auth.files.save_ring`); the identity provider is
an RSA key generated here, trusted through an issuer with an inline JWK set, so
no network beyond loopback is used.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa

from felix.auth.cli import add_commands as add_token_commands
from felix.auth.files import AUDIENCE, ISSUER, save_ring
from felix.auth.keys import TenantKeyRing
from felix.auth.tokens import verify_felix_token
from felix.client.cli import add_commands as add_client_commands
from felix.control.api import create_app
from felix.control.cli import add_commands as add_control_commands
from felix.control.client import ControlClient
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.errors import ConfigError, NotFound

pytestmark = pytest.mark.timeout(60)

IDP = "https://idp.example"
PUBLISH = "stream.publish:stream:acme/prod/*"
SUBSCRIBE = "stream.subscribe:stream:acme/prod/orders"
READ = "cache.read:cache:acme/prod/sessions"
IDP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def idp_token(sub: str = "alice", groups: list[str] | None = None) -> str:
    now = int(time.time())
    claims = {
        "iss": IDP,
        "aud": "felix-api",
        "sub": sub,
        "groups": ["eng"] if groups is None else groups,
        "iat": now,
        "exp": now + 300,
    }
    return jwt.encode(claims, IDP_KEY, algorithm="RS256", headers={"kid": "idp-1"})


@dataclass
class Server:
    url: str
    ring: TenantKeyRing


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The API (MemoryStore, key directory with acme's ring) under uvicorn in a thread."""
    ring = TenantKeyRing.create("acme", time.time())
    save_ring(tmp_path / "auth", ring, time.time())
    app = create_app(MemoryStore(), keys_dir=tmp_path / "auth")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    public = jwt.algorithms.RSAAlgorithm.to_jwk(IDP_KEY.public_key(), as_dict=True)
    with ControlClient(url) as api:
        api.create(ResourceKind.TENANT, ("acme",))
        api.create(
            ResourceKind.ISSUER,
            ("acme", "idp"),
            {
                "issuer": IDP,
                "audience": "felix-api",
                "algorithms": ["RS256"],
                "jwks": {"keys": [{**public, "kid": "idp-1"}]},
            },
        )
        api.create(
            ResourceKind.POLICY, ("acme", "publishers"), {"permissions": [PUBLISH, SUBSCRIBE]}
        )
        api.create(ResourceKind.POLICY, ("acme", "readers"), {"permissions": [READ]})
    try:
        yield Server(url, ring)
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


def parser() -> argparse.ArgumentParser:
    """The felix command line as felix.cli builds it."""
    root = argparse.ArgumentParser(prog="felix")
    commands = root.add_subparsers(dest="command", required=True)
    add_client_commands(commands)
    add_token_commands(commands)
    add_control_commands(commands)
    return root


def felix(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    code: int = args.func(args)
    return code


def claims_of(server: Server, token: str) -> list[str]:
    claims = verify_felix_token(
        token,
        server.ring.jwks(time.time()),
        issuer=ISSUER,
        audience=AUDIENCE,
        now=time.time(),
        leeway=5,
    )
    assert claims.tid == "acme" and claims.sub == "alice"
    return claims.perms.to_strings()


def test_grant_exchange_check_revoke(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = ("--url", server.url)
    acme = ("--tenant", "acme")

    # grant: creates the subject's binding, then extends it; unknown policies are refused.
    assert felix("rbac", "grant", "group:eng", "--policy", "publishers", *acme, *url) == 0
    assert capsys.readouterr().out == "granted publishers to group:eng (binding group-eng)\n"
    assert felix("rbac", "grant", "group:eng", "--policy", "publishers", *acme, *url) == 0
    assert capsys.readouterr().out == "group:eng already has publishers (binding group-eng)\n"
    assert felix("rbac", "grant", "group:eng", "--policy", "readers", *acme, *url) == 0
    assert "granted readers" in capsys.readouterr().out
    with pytest.raises(NotFound, match="felix policy create nope"):
        felix("rbac", "grant", "alice", "--policy", "nope", *acme, *url)
    with ControlClient(server.url) as api:
        (binding,) = api.list_resources(ResourceKind.BINDING, ("acme",))
    assert binding.name == "group-eng" and binding.spec["policies"] == ["publishers", "readers"]

    # ls: one row per policy of each binding, with its permissions.
    assert felix("rbac", "ls", *acme, *url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SUBJECT", "ISSUER", "BINDING", "POLICY", "PERMISSIONS"]
    assert lines[1].split()[:4] == ["group:eng", "-", "group-eng", "publishers"]
    assert PUBLISH in lines[1] and SUBSCRIBE in lines[1] and READ in lines[2]
    assert felix("rbac", "ls", *acme, *url, "--json") == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row == {
        "binding": "group-eng",
        "subject": "group:eng",
        "issuer": None,
        "policies": {"publishers": [PUBLISH, SUBSCRIBE], "readers": [READ]},
    }

    # exchange: the IdP token from a file; everything granted.
    (tmp_path / "idp.jwt").write_text(idp_token() + "\n")
    assert (
        felix("token", "exchange", "--issuer-token", f"@{tmp_path / 'idp.jwt'}", *acme, *url) == 0
    )
    felix_token = capsys.readouterr().out.strip()
    assert claims_of(server, felix_token) == sorted([PUBLISH, SUBSCRIBE, READ])

    # ... from stdin, narrowed, as JSON.
    monkeypatch.setattr("sys.stdin", io.StringIO(idp_token()))
    assert (
        felix(
            "token",
            "exchange",
            "--issuer-token",
            "-",
            "--permission",
            SUBSCRIBE,
            "--json",
            *acme,
            *url,
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["token_type"] == "Bearer" and answer["expires_in"] > 0
    narrowed = answer["access_token"]
    assert claims_of(server, narrowed) == [SUBSCRIBE]

    # check: decided locally from the token's perms; exit 0 allowed, 1 denied.
    obj = "stream:acme/prod/orders"
    assert felix("rbac", "check", "--token", felix_token, "--action", "stream.publish",
                 "--object", obj) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("allowed: stream.publish on stream:acme/prod/orders for 'alice'")
    assert "signature not verified" in out
    assert felix("rbac", "check", "--token", narrowed, "--action", "stream.publish",
                 "--object", obj, "--json") == 1  # fmt: skip
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["allowed"] is False and verdict["tenant"] == "acme"
    assert verdict["verified"] is False and verdict["expired"] is False
    with pytest.raises(ConfigError):
        felix("rbac", "check", "--token", narrowed, "--action", "fly", "--object", obj)
    with pytest.raises(ConfigError, match="not a Felix token"):
        felix("rbac", "check", "--token", idp_token(), "--action", "stream.publish",
              "--object", obj)  # fmt: skip

    # revoke: the binding loses the policy, then (left empty) goes away.
    assert felix("rbac", "revoke", "group:eng", "--policy", "readers", *acme, *url) == 0
    assert capsys.readouterr().out == "revoked readers from group:eng (binding group-eng)\n"
    assert felix("rbac", "revoke", "group:eng", "--policy", "publishers", *acme, *url) == 0
    assert "binding deleted" in capsys.readouterr().out
    with pytest.raises(NotFound):
        felix("rbac", "revoke", "group:eng", "--policy", "publishers", *acme, *url)
    with ControlClient(server.url) as api:
        assert api.list_resources(ResourceKind.BINDING, ("acme",)) == []

    # Nothing granted any more: the exchange is refused (exit 1, the reason on stderr).
    assert felix("token", "exchange", "--issuer-token", idp_token(), *acme, *url) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "granted no permissions" in captured.err


def test_exchange_failures(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ("--url", server.url)
    # An invalid identity-provider token: 401 from the API, exit 1.
    assert felix("token", "exchange", "--issuer-token", "not.a.jwt", "--tenant", "acme", *url) == 1
    assert capsys.readouterr().err.startswith("felix: ")
    # Usage errors: exit 2.
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for argv in (
        ("--issuer-token", f"@{empty}", "--tenant", "acme"),
        ("--issuer-token", f"@{tmp_path / 'missing'}", "--tenant", "acme"),
        ("--issuer-token", "x", "--tenant", "no/such"),
    ):
        assert felix("token", "exchange", *argv, *url) == 2
        assert capsys.readouterr().err.startswith("felix: ")
    # Unreachable control plane: exit 1.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert felix("token", "exchange", "--issuer-token", "x", "--tenant", "acme",
                 "--url", closed, "--timeout", "2") == 1  # fmt: skip
    assert "unreachable" in capsys.readouterr().err


def test_grant_with_issuer_and_revoke_by_issuer(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ("--url", server.url, "--tenant", "acme")
    assert felix("rbac", "grant", "alice", "--policy", "readers", *url) == 0
    assert felix("rbac", "grant", "alice", "--policy", "readers", "--issuer", IDP, *url) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "granted readers to alice (binding user-alice)",
        "granted readers to alice (binding user-alice-2)",
    ]
    with ControlClient(server.url) as api:
        specs: dict[str, Any] = {
            b.name: b.spec for b in api.list_resources(ResourceKind.BINDING, ("acme",))
        }
    assert specs["user-alice"]["issuer"] is None and specs["user-alice-2"]["issuer"] == IDP
    # --issuer limits revoke to that issuer's binding.
    assert felix("rbac", "revoke", "alice", "--policy", "readers", "--issuer", IDP, *url) == 0
    assert capsys.readouterr().out.endswith("(binding user-alice-2; binding deleted)\n")
    with ControlClient(server.url) as api:
        assert [b.name for b in api.list_resources(ResourceKind.BINDING, ("acme",))] == [
            "user-alice"
        ]
