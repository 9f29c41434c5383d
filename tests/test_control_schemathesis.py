"""Schemathesis against the control plane's OpenAPI document, in-process: no 5xx, and every
answer matches the schema it documents (bodies, statuses, problem+json errors).

Every case runs on a freshly seeded store, so the documented path examples (acme,
prod, orders, workers, sessions, okta, publishers, eng) name resources that exist and the 2xx
answers get checked, not only the 404s. Long-polls are shortened so the run stays fast.

The node routes (/v1/node/...) read a stand-in health port served from a thread.
The app has a key directory holding acme's key ring (so the JWKS route answers 200)
and a ``fetch_jwks`` that serves an empty key set without any network. Generated
tokens never verify, so the token exchange is exercised here for its 401/404/422
answers only; tests/test_control_auth.py covers its successful path.

Marked ``serial``: each operation is a pytest subtest, and pytest-xdist does not carry
subtest reports back to the controller, so under ``-n`` a failing operation would pass
unseen. ``make test`` runs this module in a pytest process of its own (no ``-n``), and
an xdist worker refuses to run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from felix.auth.files import save_ring
from felix.auth.keys import TenantKeyRing
from felix.auth.tokens import ed25519_jwk
from felix.control.api import create_app
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore

pytestmark = [pytest.mark.timeout(120), pytest.mark.serial]


@pytest.fixture(autouse=True)
def _not_in_an_xdist_worker() -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.fail(
            "tests/test_control_schemathesis.py cannot run under pytest-xdist (its subtests' "
            "failures would be lost): run it without -n, as make test does"
        )


SEED: list[tuple[ResourceKind, tuple[str, ...], dict[str, Any]]] = [
    (ResourceKind.TENANT, ("acme",), {}),
    (ResourceKind.NAMESPACE, ("acme", "prod"), {}),
    (ResourceKind.STREAM, ("acme", "prod", "orders"), {"durable": True}),
    (ResourceKind.GROUP, ("acme", "prod", "orders", "workers"), {"max_ack_pending": 100}),
    (ResourceKind.CACHE, ("acme", "prod", "sessions"), {}),
    (
        ResourceKind.ISSUER,
        ("acme", "okta"),
        {
            "issuer": "https://idp.example",
            "audience": "felix",
            "algorithms": ["EdDSA"],
            "jwks": {
                "keys": [ed25519_jwk(ed25519.Ed25519PrivateKey.generate().public_key(), "k1")]
            },
        },
    ),
    (
        ResourceKind.POLICY,
        ("acme", "publishers"),
        {"permissions": ["stream.publish:stream:acme/prod/*"]},
    ),
    (ResourceKind.BINDING, ("acme", "eng"), {"subject": "group:eng", "policies": ["publishers"]}),
]
#: Longest long-poll a generated case may ask for, in seconds.
MAX_TEST_WAIT = 0.01


class ReseedableStore(MemoryStore):
    """A MemoryStore that :meth:`reset` empties and seeds again (between cases)."""

    def reset(self) -> None:
        MemoryStore.__init__(self, feed_retention=8)
        asyncio.run(self._seed())

    async def _seed(self) -> None:
        for kind, path, spec in SEED:
            await self.create(kind, path, spec)


async def _no_keys(url: str) -> Mapping[str, Any]:
    """The identity provider's key set: empty (generated tokens never verify anyway)."""
    return {"keys": []}


KEYS_DIR = Path(tempfile.mkdtemp(prefix="felix-schemathesis-keys-"))
save_ring(KEYS_DIR, TenantKeyRing.create("acme", time.time()), time.time())


class _HealthPort(BaseHTTPRequestHandler):
    """The node's health port as the /v1/node/... routes read it: the seeded stream and
    cache, and a /status; 404 for anything else (a resource the node does not hold)."""

    ANSWERS: Mapping[str, Any] = {
        "/status": {"ready": True, "totals": {"connections": 0}, "children": []},
        "/streams/acme/prod/orders": {"stream": "acme/prod/orders", "groups": {}},
        "/caches/acme/prod/sessions": {"cache": "acme/prod/sessions", "hits": 0, "misses": 0},
    }

    def do_GET(self) -> None:
        answer = self.ANSWERS.get(self.path)
        body = json.dumps(answer).encode() if answer is not None else b"not found\n"
        self.send_response(200 if answer is not None else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


health = ThreadingHTTPServer(("127.0.0.1", 0), _HealthPort)
threading.Thread(target=health.serve_forever, daemon=True).start()
NODE = {"http": f"127.0.0.1:{health.server_address[1]}"}

store = ReseedableStore()
schema = schemathesis.openapi.from_asgi(
    "/v1/openapi.json",
    create_app(store, region="local", keys_dir=KEYS_DIR, fetch_jwks=_no_keys, node_info=NODE),
)


def _shorten_wait(query: dict[str, Any] | None) -> None:
    wait = (query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > MAX_TEST_WAIT:
        assert query is not None
        query["wait"] = MAX_TEST_WAIT


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_schema(case: schemathesis.Case[Any]) -> None:
    store.reset()
    _shorten_wait(case.query)
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
