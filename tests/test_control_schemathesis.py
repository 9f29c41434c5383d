"""Schemathesis against the control plane's OpenAPI document, in-process: no 5xx, and every
answer matches the schema it documents (bodies, statuses, problem+json errors).

Every case runs on a freshly seeded store, so the documented path examples (acme,
prod, orders, sessions) name resources that exist and the 2xx answers get checked,
not only the 404s. Long-polls are shortened so the run stays fast.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from felix.control.api import create_app
from felix.control.model import Kind
from felix.control.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(120)

SEED = [
    (Kind.TENANT, ("acme",), {}),
    (Kind.NAMESPACE, ("acme", "prod"), {}),
    (Kind.STREAM, ("acme", "prod", "orders"), {"durable": True}),
    (Kind.CACHE, ("acme", "prod", "sessions"), {}),
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


store = ReseedableStore()
schema = schemathesis.openapi.from_asgi("/v1/openapi.json", create_app(store, region="local"))


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
