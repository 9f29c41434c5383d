"""The whole OIDC flow against real processes: a test identity provider serving its JWK set
over local HTTP, a `felix up --auth` node whose control plane fetches it, the token
exchange, and the exchanged token used on the QUIC data plane.

Bad identity-provider tokens (tampered, expired, wrong audience, wrong issuer,
``alg: none``, HMAC signed with the RSA public key) are refused by the exchange, and
none of them opens a data-plane session either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import felix
from felix.auth.tokens import read_unverified_claims
from felix.errors import PermissionDenied, Unauthenticated
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(90)

AUDIENCE = "felix-prod"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KID = "idp-rsa-1"


class TestIdP:
    """An identity provider: one RSA key, its JWK set served at /jwks.json on loopback."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)
        body = json.dumps({"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}).encode()
        self.fetches = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                idp.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_port}"
        self.jwks_url = f"{self.issuer}/jwks.json"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "alice",
            "groups": ["orders-team"],
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return claims

    def token(self, **overrides: Any) -> str:
        return jwt.encode(
            self.claims(**overrides), RSA_KEY, algorithm="RS256", headers={"kid": KID}
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def bad_tokens(idp: TestIdP) -> dict[str, str]:
    good = idp.token()
    head, payload, signature = good.split(".")
    # Tampered: the same signature over claims that now name another subject and group.
    forged = _b64(json.dumps(idp.claims(sub="mallory", groups=["admins"])).encode())
    # HMAC confusion: HS256 "signed" with the issuer's public key as the secret, in the
    # hope that a verifier picks the algorithm from the header.
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": KID}, idp.claims())
    hs_sig = _b64(hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest())
    return {
        "tampered": f"{head}.{forged}.{signature}",
        "bad signature": f"{head}.{payload}.{signature[:-4]}AAAA",
        "expired": idp.token(iat=int(time.time()) - 900, exp=int(time.time()) - 600),
        "wrong audience": idp.token(aud="someone-else"),
        "wrong issuer": idp.token(iss="http://127.0.0.1:1/evil"),
        "alg none": _unsigned({"alg": "none", "typ": "JWT", "kid": KID}, idp.claims()) + ".",
        "HMAC confusion": f"{hs_input}.{hs_sig}",
    }


@pytest.fixture
def idp() -> Iterator[TestIdP]:
    server = TestIdP()
    try:
        yield server
    finally:
        server.close()


def _felix(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_oidc_exchange_end_to_end(tmp_path: Path, idp: TestIdP) -> None:
    data_dir = tmp_path / "node"
    _felix("token", "keygen", "--tenant", "acme", "--dir", str(data_dir / "auth"))
    node = NodeProcess(data_dir, "--auth", gateways=1, shards=1)
    try:
        admin = (data_dir / "admin-token").read_text().strip()
        api = httpx.Client(
            base_url=node.info["control"],
            headers={"Authorization": f"Bearer {admin}"},
            timeout=10,
        )
        with api:
            for path, body in (
                ("/v1/tenants", {"name": "acme"}),
                ("/v1/tenants/acme/namespaces", {"name": "prod"}),
                (
                    "/v1/tenants/acme/issuers",
                    {
                        "name": "test-idp",
                        "issuer": idp.issuer,
                        "audience": AUDIENCE,
                        "algorithms": ["RS256"],
                        "jwks_url": idp.jwks_url,
                    },
                ),
                (
                    "/v1/tenants/acme/policies",
                    {
                        "name": "orders",
                        "permissions": [
                            "stream.publish:stream:acme/prod/orders",
                            "stream.subscribe:stream:acme/prod/orders",
                        ],
                    },
                ),
                (
                    "/v1/tenants/acme/bindings",
                    {"name": "orders-team", "subject": "group:orders-team", "policies": ["orders"]},
                ),
            ):
                r = api.post(path, json=body)
                assert r.status_code in (201, 409), (path, r.text)  # tenant acme may exist

            exchange = "/v1/tenants/acme/token/exchange"
            # The exchange fetched the issuer's keys over HTTP and signed a Felix token.
            r = httpx.post(
                f"{node.info['control']}{exchange}",
                headers={"Authorization": f"Bearer {idp.token()}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["token_type"] == "Bearer" and 0 < answer["expires_in"] <= 3600
            felix_token = answer["access_token"]
            assert jwt.get_unverified_header(felix_token)["alg"] == "EdDSA"
            claims = read_unverified_claims(felix_token)
            assert claims["tid"] == "acme" and claims["sub"] == "alice"
            assert sorted(claims["perms"]) == [
                "stream.publish:stream:acme/prod/orders",
                "stream.subscribe:stream:acme/prod/orders",
            ]
            assert idp.fetches >= 1

            # Narrowing: ask for less, get exactly that; ask for more, get nothing more.
            r = httpx.post(
                f"{node.info['control']}{exchange}",
                headers={"Authorization": f"Bearer {idp.token()}"},
                json={"permissions": ["stream.subscribe:stream:acme/prod/orders"]},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            narrow = r.json()["access_token"]
            assert read_unverified_claims(narrow)["perms"] == [
                "stream.subscribe:stream:acme/prod/orders"
            ]
            r = httpx.post(
                f"{node.info['control']}{exchange}",
                headers={"Authorization": f"Bearer {idp.token()}"},
                json={"permissions": ["tenant.manage:tenant:acme"]},
                timeout=10,
            )
            assert r.status_code == 403, r.text

            for why, token in bad_tokens(idp).items():
                r = httpx.post(
                    f"{node.info['control']}{exchange}",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=10,
                )
                assert r.status_code == 401, (why, r.text)
                assert token not in r.text, why

        url = f"felix://{node.host}:{node.port}"

        async def data_plane() -> None:
            async with (
                felix.connect(url, ca=node.ca_file, tenant="acme", token=felix_token) as writer,
                felix.connect(url, ca=node.ca_file, tenant="acme", token=narrow) as reader,
            ):
                async with reader.subscribe("prod/orders", start="earliest") as sub:
                    ack = await writer.publish("prod/orders", b"order-1")
                    assert ack is not None
                    message = await sub.__anext__()
                    assert message.data == b"order-1"
                # What the token does not grant is refused, the session goes on.
                with pytest.raises(PermissionDenied):
                    await writer.cache("prod/sessions").get("k")
                with pytest.raises(PermissionDenied):
                    await reader.publish("prod/orders", b"not allowed")
                assert await writer.publish("prod/orders", b"order-2") is not None
            # Identity-provider tokens, good or bad, are not Felix tokens: no session.
            for token in [idp.token(), *bad_tokens(idp).values()]:
                with pytest.raises(Unauthenticated):
                    await felix.connect(
                        url, ca=node.ca_file, tenant="acme", token=token, connect_timeout=5
                    )

        run(data_plane, timeout=60)
    finally:
        assert node.stop() == 0
