"""felix.control.api in-process (httpx over ASGI) on a MemoryStore: every route and answer."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix.control.api import create_app
from felix.control.model import ResourceKind
from felix.control.schemas import NAME_PATTERN, PROBLEM_TYPES, parse_if_match
from felix.control.stores.memory import MemoryStore
from felix.errors import BadRequest
from felix.names import validate_name
from tests.aio import run

pytestmark = pytest.mark.timeout(60)

T = "/v1/tenants"
NS = f"{T}/acme/namespaces"
STREAMS = f"{NS}/prod/streams"
CACHES = f"{NS}/prod/caches"


@asynccontextmanager
async def api(
    store: MemoryStore | None = None, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, MemoryStore]]:
    store = store or MemoryStore()
    await store.open()
    app = create_app(store, **options)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        yield http, store
    await store.close()


def with_api(
    test: Callable[[httpx.AsyncClient, MemoryStore], Awaitable[None]], **options: Any
) -> None:
    async def main() -> None:
        async with api(**options) as (http, store):
            await test(http, store)

    run(main)


async def seed(http: httpx.AsyncClient) -> None:
    """acme/prod with a stream orders and a cache sessions."""
    for url, name in ((T, "acme"), (NS, "prod"), (STREAMS, "orders"), (CACHES, "sessions")):
        r = await http.post(url, json={"name": name})
        assert r.status_code == 201, r.text


def assert_problem(r: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if slug is not None:
        assert body["type"] == f"/v1/problems/{slug}"
    return body


# -- documents ---------------------------------------------------------------------------


def test_openapi_document_lists_every_route_and_docs_are_served() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        r = await http.get("/v1/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        item = "/v1/tenants/{tenant}/namespaces/{ns}"
        expected = {
            "/v1/tenants": {"get", "post"},
            "/v1/tenants/{tenant}": {"get", "patch", "delete"},
            "/v1/tenants/{tenant}/namespaces": {"get", "post"},
            item: {"get", "patch", "delete"},
            f"{item}/streams": {"get", "post"},
            f"{item}/streams/{{stream}}": {"get", "patch", "delete"},
            f"{item}/streams/{{stream}}/groups": {"get", "post"},
            f"{item}/streams/{{stream}}/groups/{{group}}": {"get", "patch", "delete"},
            f"{item}/caches": {"get", "post"},
            f"{item}/caches/{{cache}}": {"get", "patch", "delete"},
            "/v1/tenants/{tenant}/issuers": {"get", "post"},
            "/v1/tenants/{tenant}/issuers/{issuer}": {"get", "patch", "delete"},
            "/v1/tenants/{tenant}/policies": {"get", "post"},
            "/v1/tenants/{tenant}/policies/{policy}": {"get", "patch", "delete"},
            "/v1/tenants/{tenant}/bindings": {"get", "post"},
            "/v1/tenants/{tenant}/bindings/{binding}": {"get", "patch", "delete"},
            "/v1/tenants/{tenant}/bridges": {"get", "post"},
            "/v1/tenants/{tenant}/bridges/{bridge}": {"get", "patch", "delete"},
            "/v1/tenants/{tenant}/token/exchange": {"post"},
            "/v1/tenants/{tenant}/.well-known/jwks.json": {"get"},
            "/v1/snapshot": {"get"},
            "/v1/changes": {"get"},
            "/v1/registrations": {"post"},
            "/v1/system/info": {"get"},
            "/v1/system/health": {"get"},
            "/v1/regions": {"get"},
            "/v1/problems/{slug}": {"get"},
            "/v1/whoami": {"get"},
            "/v1/node/status": {"get"},
            "/v1/node/streams/{tenant}/{ns}/{stream}": {"get"},
            "/v1/node/caches/{tenant}/{ns}/{cache}": {"get"},
        }
        assert {path: set(ops) for path, ops in doc["paths"].items()} == expected
        assert "Problem" in doc["components"]["schemas"]
        create = doc["paths"]["/v1/tenants"]["post"]["responses"]
        assert set(create) >= {"201", "400", "409", "422"}
        assert "application/problem+json" in create["409"]["content"]
        # The patch body is the spec with everything optional and no invented defaults.
        patch = doc["components"]["schemas"]["StreamPatch"]
        assert "required" not in patch and patch["additionalProperties"] is False
        assert all("default" not in field for field in patch["properties"].values())
        params = doc["paths"]["/v1/tenants/{tenant}"]["patch"]["parameters"]
        if_match = next(p["schema"] for p in params if p["name"] == "if-match")
        assert if_match["type"] == "string" and "anyOf" not in if_match
        assert re.search(if_match["pattern"], '"1", W/"2"')
        docs = await http.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert "/v1/openapi.json" in docs.text

    with_api(test)


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=70) | st.text(max_size=5))
def test_the_documented_name_pattern_is_the_enforced_rule(name: str) -> None:
    try:
        validate_name("stream", name)
        valid = True
    except BadRequest:
        valid = False
    assert valid == (re.fullmatch(NAME_PATTERN.strip("^$"), name) is not None)


# -- resources ---------------------------------------------------------------------------

# (collection URL, item URL, name, a setting and a new value for it)
KINDS = [
    (T, f"{T}/acme", "acme", "description", "team a"),
    (NS, f"{NS}/prod", "prod", "description", "production"),
    (STREAMS, f"{STREAMS}/orders", "orders", "retention_bytes", 1 << 20),
    (CACHES, f"{CACHES}/sessions", "sessions", "default_ttl_s", 60.0),
]


@pytest.mark.parametrize(("collection", "item", "name", "key", "value"), KINDS)
def test_create_get_list_update_delete(
    collection: str, item: str, name: str, key: str, value: Any
) -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        for parent_collection, _, parent_name, _, _ in KINDS:
            if parent_collection == collection:
                break
            await http.post(parent_collection, json={"name": parent_name})
        r = await http.post(collection, json={"name": name, key: value})
        assert r.status_code == 201, r.text
        assert r.headers["location"] == item
        assert r.headers["etag"] == '"1"'
        created = r.json()
        assert created["name"] == name and created["version"] == 1
        assert created["path"] == item.split("/")[3::2]
        assert created["spec"][key] == value
        kind = ResourceKind(created["kind"])
        assert (await store.get(kind, tuple(created["path"]))) is not None

        r = await http.get(item)
        assert r.status_code == 200 and r.headers["etag"] == '"1"'
        assert r.json() == created
        r = await http.get(collection)
        assert r.status_code == 200 and r.json() == {"items": [created]}

        r = await http.patch(item, json={key: None if key.endswith("_s") else value})
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == '"2"' and r.json()["version"] == 2

        r = await http.delete(item)
        assert r.status_code == 200
        assert r.json() == {"deleted": [{"kind": kind.value, "path": created["path"]}]}
        assert_problem(await http.get(item), 404, "not-found")
        assert (await http.get(collection)).json() == {"items": []}

    with_api(test)


def test_create_answers_conflicts_and_missing_parents() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        assert_problem(await http.post(NS, json={"name": "prod"}), 404, "not-found")
        assert_problem(await http.get(NS), 404, "not-found")
        await seed(http)
        body = assert_problem(await http.post(T, json={"name": "acme"}), 409, "already-exists")
        assert "acme" in body["detail"]
        assert_problem(await http.post(STREAMS, json={"name": "orders"}), 409, "already-exists")
        # A stream and a cache may share a name.
        assert (await http.post(CACHES, json={"name": "orders"})).status_code == 201
        assert_problem(await http.get(f"{NS}/nope/streams"), 404, "not-found")
        assert_problem(await http.patch(f"{T}/nope", json={}), 404, "not-found")
        assert_problem(await http.delete(f"{CACHES}/nope"), 404, "not-found")

    with_api(test)


def test_delete_with_children_needs_cascade() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        body = assert_problem(await http.delete(f"{NS}/prod"), 409, "has-children")
        assert "cascade" in body["detail"]
        assert_problem(await http.delete(f"{T}/acme"), 409, "has-children")
        assert_problem(await http.delete(f"{T}/acme?cascade=false"), 409, "has-children")
        assert (await http.get(f"{STREAMS}/orders")).status_code == 200

        r = await http.delete(f"{NS}/prod", params={"cascade": "true"})
        assert r.status_code == 200
        deleted = [(d["kind"], "/".join(d["path"])) for d in r.json()["deleted"]]
        assert deleted[-1] == ("namespace", "acme/prod")  # children first
        assert sorted(deleted[:-1]) == [
            ("cache", "acme/prod/sessions"),
            ("stream", "acme/prod/orders"),
        ]
        r = await http.delete(f"{T}/acme")  # empty now: no cascade needed
        assert r.status_code == 200
        assert (await http.get(T)).json() == {"items": []}

    with_api(test)


def test_tenant_cascade_removes_everything_under_it() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        r = await http.delete(f"{T}/acme", params={"cascade": True})
        assert r.status_code == 200
        assert len(r.json()["deleted"]) == 4
        assert (await store.snapshot())[1] == []

    with_api(test)


def test_queue_groups_of_a_stream() -> None:
    """Groups: CRUD under a durable stream with ETags, the shard's rules as 400, setting
    conflicts as 409, a stream with groups deleted only with cascade; in the feed."""

    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)  # orders: not durable
        groups = f"{STREAMS}/orders/groups"
        body = assert_problem(await http.post(groups, json={"name": "w"}), 409, "setting-conflict")
        assert "durable" in body["detail"]
        assert_problem(await http.post(f"{STREAMS}/nope/groups", json={"name": "w"}), 404)
        assert_problem(await http.get(f"{STREAMS}/nope/groups"), 404, "not-found")
        r = await http.patch(f"{STREAMS}/orders", json={"durable": True})
        assert r.status_code == 200, r.text

        r = await http.post(groups, json={"name": "w", "backoff_ms": [100], "start": "latest"})
        assert r.status_code == 201, r.text
        assert r.headers["location"] == f"{groups}/w" and r.headers["etag"] == '"1"'
        created = r.json()
        assert created["kind"] == "group"
        assert created["path"] == ["acme", "prod", "orders", "w"]
        assert created["spec"] == {
            "start": "latest",
            "lease_ms": 30000,
            "max_deliveries": 5,
            "backoff_ms": [100],
            "max_ack_pending": 10000,
            "max_span": 100000,
            "dead_letter": None,
            "exclusive": False,
        }
        assert (await http.get(f"{groups}/w")).json() == created
        assert (await http.get(groups)).json() == {"items": [created]}
        r = await http.post(groups, json={"name": "o", "start": {"offset": 12}})
        assert r.status_code == 201 and r.json()["spec"]["start"] == {"offset": 12}

        # The shard's rules answer 400 with their text; types 422.
        body = assert_problem(
            await http.post(groups, json={"name": "x", "lease_ms": 10}), 400, "bad-request"
        )
        assert "lease_ms" in body["detail"]
        r = await http.post(groups, json={"name": "x", "max_ack_pending": 9, "max_span": 8})
        assert "max_span" in assert_problem(r, 400)["detail"]
        r = await http.post(groups, json={"name": "x", "dead_letter": "orders"})
        assert "own stream" in assert_problem(r, 400)["detail"]
        assert_problem(await http.post(groups, json={"name": "x", "lease_ms": "5"}), 422)
        assert_problem(await http.post(groups, json={"name": "x", "start": "now"}), 422)
        assert_problem(await http.post(groups, json={"name": "x", "typo": 1}), 422)
        assert_problem(await http.post(groups, json={"name": "w"}), 409, "already-exists")

        # Updates: If-Match, start fixed, others change.
        r = await http.patch(f"{groups}/w", json={"lease_ms": 5000}, headers={"If-Match": '"1"'})
        assert r.status_code == 200 and r.headers["etag"] == '"2"'
        assert r.json()["spec"]["lease_ms"] == 5000 and r.json()["spec"]["backoff_ms"] == [100]
        r = await http.patch(f"{groups}/w", json={"exclusive": True}, headers={"If-Match": '"1"'})
        assert_problem(r, 412, "version-conflict")
        r = await http.patch(f"{groups}/w", json={"start": "earliest"})
        assert "start" in assert_problem(r, 409, "setting-conflict")["detail"]
        assert (await http.patch(f"{groups}/w", json={"start": "latest"})).status_code == 200

        # The stream stays durable, and is deleted with its groups only on cascade.
        r = await http.patch(f"{STREAMS}/orders", json={"durable": False})
        assert_problem(r, 409, "setting-conflict")
        assert_problem(await http.delete(f"{STREAMS}/orders"), 409, "has-children")
        r = await http.delete(f"{groups}/o", headers={"If-Match": '"1"'})
        assert r.json() == {"deleted": [{"kind": "group", "path": ["acme", "prod", "orders", "o"]}]}
        r = await http.delete(f"{STREAMS}/orders", params={"cascade": "true"})
        assert r.status_code == 200, r.text
        assert [d["kind"] for d in r.json()["deleted"]] == ["group", "stream"]

        # Everything went through the feed, groups included.
        page = (await http.get("/v1/changes", params={"limit": 1000})).json()
        kinds = [(c["op"], c["resource"]["kind"]) for c in page["changes"]]
        assert kinds.count(("create", "group")) == 2
        assert kinds.count(("delete", "group")) == 2

    with_api(test)


# -- versions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        (None, None),
        ("*", None),
        (" * ", None),
        ('"3"', {3}),
        ("3", {3}),
        ('"1", "2"', {1, 2}),
        ('W/"3"', set()),  # weak tags never match (strong comparison)
        ('"abc"', set()),  # a tag that is not one of ours matches nothing
        ('"1",W/"2", 7', {1, 7}),
        ('"1",,"2"', {1, 2}),  # empty list elements are ignored (RFC 9110 5.6.1)
        ("", set()),
        ('"a,b", 3', {3}),  # a comma inside a quoted tag does not split it
        ("\t4 ,", {4}),
    ],
)
def test_parse_if_match(header: str | None, allowed: set[int] | None) -> None:
    assert parse_if_match(header) == allowed


@pytest.mark.parametrize(
    "header", ["abc", '"3', "3 4", '"1" "2"', "-1", "1.5", "\u0663", '"a b"', "*, 3", "null"]
)
def test_parse_if_match_refuses_malformed_headers(header: str) -> None:
    with pytest.raises(BadRequest, match="If-Match"):
        parse_if_match(header)


def test_parse_if_match_bounds_its_input() -> None:
    started = time.monotonic()
    hostile = (" " * 100_000 + "x", '"1",' * 300, "1" + " ," * 50_000, "1" + "  ,  " * 200 + "x")
    for value in hostile:
        with pytest.raises(BadRequest, match="If-Match"):
            parse_if_match(value)
    assert time.monotonic() - started < 1
    assert parse_if_match(" " * 1000 + "5") == {5}


def test_if_match_guards_updates_and_deletes() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        item = f"{STREAMS}/orders"
        etag = (await http.get(item)).headers["etag"]
        assert etag == '"1"'
        r = await http.patch(item, json={"replay_max_records": 500}, headers={"If-Match": etag})
        assert r.status_code == 200 and r.headers["etag"] == '"2"'
        # The old tag is stale now.
        stale = await http.patch(item, json={"replay_max_records": 9}, headers={"If-Match": etag})
        body = assert_problem(stale, 412, "version-conflict")
        assert "version 2" in body["detail"]
        # Bare, listed and * forms.
        r = await http.patch(item, json={"replay_max_records": 7}, headers={"If-Match": "2"})
        assert r.status_code == 200 and r.json()["version"] == 3
        r = await http.patch(item, json={"replay_max_records": 8}, headers={"If-Match": '"1", "3"'})
        assert r.status_code == 200 and r.json()["version"] == 4
        r = await http.patch(item, json={}, headers={"If-Match": "*"})
        assert r.status_code == 200 and r.json()["version"] == 5
        assert_problem(await http.patch(item, json={}, headers={"If-Match": 'W/"5"'}), 412)
        assert_problem(await http.patch(item, json={}, headers={"If-Match": "five"}), 400)
        assert_problem(
            await http.patch(f"{STREAMS}/gone", json={}, headers={"If-Match": '"1", "2"'}), 404
        )
        # Deletes too; the resource survives a refused one.
        assert_problem(await http.delete(item, headers={"If-Match": '"4"'}), 412)
        assert (await http.get(item)).json()["spec"]["replay_max_records"] == 8
        assert (await http.delete(item, headers={"If-Match": '"5"'})).status_code == 200
        r = await http.delete(f"{T}/acme", headers={"If-Match": '"9"'}, params={"cascade": 1})
        assert_problem(r, 412, "version-conflict")

    with_api(test)


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "-x", ".", "..", "a b", "caf\u00e9", "a" * 65, "_hidden", "a*", "x\n"]
)
def test_invalid_names_in_bodies_are_refused_with_the_rule(name: str) -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        body = assert_problem(await http.post(T, json={"name": name}), 400, "bad-request")
        assert "1 to 64 characters" in body["detail"]
        assert (await store.snapshot())[1] == []

    with_api(test)


@pytest.mark.parametrize("name", ["-x", "a b", "caf\u00e9", "a" * 65, "_hidden", "a*"])
def test_invalid_names_in_paths_are_refused(name: str) -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        for url in (f"{T}/{name}", f"{NS}/{name}/streams", f"{STREAMS}/{name}"):
            assert_problem(await http.get(url), 400, "bad-request")
        assert_problem(await http.delete(f"{CACHES}/{name}"), 400, "bad-request")
        assert_problem(await http.patch(f"{NS}/{name}", json={}), 400, "bad-request")

    with_api(test)


def test_longest_valid_name_is_accepted() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        name = "a" + "-._9" * 15 + "xyz"
        assert len(name) == 64
        assert (await http.post(T, json={"name": name})).status_code == 201
        assert (await http.get(f"{T}/{name}")).status_code == 200

    with_api(test)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "name"]),
        ({"name": 7}, ["body", "name"]),
        ({"name": "s", "fsync": "sometimes"}, ["body", "fsync"]),
        ({"name": "s", "replay_max_bytes": 1}, ["body", "replay_max_bytes"]),
        # Below a ring the shard can hold: refused here, not dropped by the data plane.
        ({"name": "s", "retention_bytes": 60}, ["body", "retention_bytes"]),
        ({"name": "s", "queue": {"max_deliveries": 0}}, ["body", "queue", "max_deliveries"]),
        ({"name": "s", "duarble": True}, ["body", "duarble"]),  # a typo is not ignored
        ({"name": "s", "durable": "maybe"}, ["body", "durable"]),
        # Strict: no coercion of booleans or strings into numbers and back.
        ({"name": "s", "durable": "true"}, ["body", "durable"]),
        ({"name": "s", "replay_max_records": True}, ["body", "replay_max_records"]),
        ({"name": "s", "retention_bytes": "1024"}, ["body", "retention_bytes"]),
        ({"name": "s", "queue": {"dead_letter": 1}}, ["body", "queue", "dead_letter"]),
    ],
)
def test_invalid_settings_are_refused_with_their_location(
    body: dict[str, Any], loc: list[str]
) -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        problem = assert_problem(await http.post(STREAMS, json=body), 422, "validation-error")
        assert loc in [e["loc"] for e in problem["errors"]]
        assert ".".join(loc) in problem["detail"]
        assert all(set(e) == {"loc", "msg", "type"} for e in problem["errors"])

    with_api(test)


def test_malformed_json_and_wrong_query_types_are_problems() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        r = await http.post(T, content=b"{nope", headers={"content-type": "application/json"})
        assert_problem(r, 422, "validation-error")
        await seed(http)
        assert_problem(await http.delete(f"{T}/acme?cascade=perhaps"), 422, "validation-error")

    with_api(test)


def test_patch_merges_nested_settings_and_checks_types() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        item = f"{STREAMS}/orders"
        r = await http.patch(item, json={"queue": {"max_deliveries": 3}, "retention_bytes": 8192})
        assert r.status_code == 200, r.text
        spec = r.json()["spec"]
        assert spec["queue"] == {"max_deliveries": 3, "ack_deadline_s": 30.0, "dead_letter": True}
        assert spec["retention_bytes"] == 8192
        # null clears a nullable setting; it is refused for one that is not.
        r = await http.patch(item, json={"retention_bytes": None})
        assert r.status_code == 200 and r.json()["spec"]["retention_bytes"] is None
        assert_problem(await http.patch(item, json={"durable": None}), 422, "validation-error")
        assert_problem(await http.patch(item, json={"name": "x"}), 422, "validation-error")
        r = await http.patch(
            item,
            content=b'{"slow_subscriber_policy": "block"}',
            headers={"content-type": "application/merge-patch+json"},
        )
        assert r.status_code == 200 and r.json()["spec"]["slow_subscriber_policy"] == "block"
        assert (await http.get(item)).json()["version"] == 4
        # A whole number is a number: no need to write 60.0.
        r = await http.patch(item, json={"queue": {"ack_deadline_s": 60}})
        assert r.status_code == 200 and r.json()["spec"]["queue"]["ack_deadline_s"] == 60

    with_api(test)


def test_streams_may_only_name_the_clusters_region() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        body = assert_problem(
            await http.post(STREAMS, json={"name": "s", "region": "us-east"}), 400, "bad-request"
        )
        assert "eu-1" in body["detail"]
        r = await http.post(STREAMS, json={"name": "s", "region": "eu-1"})
        assert r.status_code == 201 and r.json()["spec"]["region"] == "eu-1"
        # Left out: the control plane's region, recorded and shown.
        r = await http.post(STREAMS, json={"name": "t"})
        assert r.status_code == 201 and r.json()["spec"]["region"] == "eu-1"
        # A resource's region never changes: not to another, not to null.
        body = assert_problem(await http.patch(f"{STREAMS}/s", json={"region": "mars"}), 400)
        assert "'eu-1'" in body["detail"] and "'mars'" in body["detail"]
        assert_problem(await http.patch(f"{STREAMS}/s", json={"region": None}), 400)
        r = await http.patch(f"{STREAMS}/s", json={"region": "eu-1", "durable": True})
        assert r.status_code == 200 and r.json()["spec"]["region"] == "eu-1"
        stored = await store.get(ResourceKind.STREAM, ("acme", "prod", "s"))
        assert stored is not None and stored.spec["region"] == "eu-1"

    with_api(test, region="eu-1")


def test_a_full_parent_is_overloaded() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        assert (await http.post(T, json={"name": "a"})).status_code == 201
        assert_problem(await http.post(T, json={"name": "b"}), 503, "overloaded")

    with_api(test, store=MemoryStore(max_children=1))


# -- problems ----------------------------------------------------------------------------


def test_problem_types_are_documented_at_their_uri() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        for slug, problem in PROBLEM_TYPES.items():
            r = await http.get(problem.uri)
            assert r.status_code == 200
            assert r.json() == {
                "type": f"/v1/problems/{slug}",
                "title": problem.title,
                "status": problem.status,
                "description": problem.description,
            }
        assert_problem(await http.get("/v1/problems/nope"), 404, "not-found")

    with_api(test)


def test_routing_errors_are_problems_too() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        body = assert_problem(await http.get("/v1/nothing"), 404)
        assert body["type"] == "about:blank" and body["title"] == "Not Found"
        r = await http.put(T, json={})
        body = assert_problem(r, 405)
        assert body["type"] == "about:blank"
        assert r.headers["allow"] == "GET, POST"  # every method of the path, not one route's
        r = await http.post(f"{STREAMS}/orders", json={})
        assert_problem(r, 405)
        assert r.headers["allow"] == "DELETE, GET, PATCH"

    with_api(test)


class BrokenStore(MemoryStore):
    async def position(self) -> int:
        raise ConnectionError("database is down")

    async def list_resources(self, kind: ResourceKind, parent: tuple[str, ...]) -> list[Any]:
        raise RuntimeError("a bug")


def test_unexpected_errors_are_500_problems() -> None:
    async def main() -> None:
        app = create_app(BrokenStore())
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
            body = assert_problem(await http.get(T), 500, "internal-error")
            assert "a bug" not in body["detail"]  # internals are logged, not sent

    run(main)


def test_authentication_comes_before_the_body() -> None:
    """A refused request is answered without reading a byte of its body (ASGI level)."""
    app = create_app(MemoryStore(), require_auth=True, admin_token="admin-secret")
    read: list[str] = []

    async def receive() -> dict[str, Any]:
        read.append("body")
        return {"type": "http.request", "body": b'{"name": "acme"}', "more_body": False}

    async def request(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": T,
            "raw_path": T.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), *headers],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }
        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(
            m.get("body", b"") for m in sent if m["type"] == "http.response.body"
        )

    async def main() -> None:
        assert (await request([]))[0] == 401
        assert (await request([(b"authorization", b"Bearer wrong")]))[0] == 401
        assert read == []  # refused from the headers alone
        status, body = await request([(b"authorization", b"Bearer admin-secret")])
        assert status == 201, body
        assert read == ["body"]

    run(main)


# -- snapshot and feed -------------------------------------------------------------------


def test_snapshot_is_the_state_and_its_position() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        assert (await http.get("/v1/snapshot")).json() == {"position": 0, "resources": []}
        await seed(http)
        await http.patch(f"{STREAMS}/orders", json={"replay_max_records": 5})
        snap = (await http.get("/v1/snapshot")).json()
        assert snap["position"] == 5
        by_path = {"/".join(r["path"]): r for r in snap["resources"]}
        assert set(by_path) == {"acme", "acme/prod", "acme/prod/orders", "acme/prod/sessions"}
        assert by_path["acme/prod/orders"]["spec"]["replay_max_records"] == 5
        assert by_path["acme/prod/sessions"]["kind"] == "cache"
        assert by_path["acme/prod/sessions"]["spec"]["budget_bytes"] == 64 * 1024 * 1024

    with_api(test)


def test_changes_page_in_commit_order() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        await http.delete(f"{NS}/prod", params={"cascade": True})
        seen: list[dict[str, Any]] = []
        since = 0
        while True:
            r = await http.get("/v1/changes", params={"since": since, "limit": 3})
            assert r.status_code == 200
            page = r.json()
            assert page["position"] == 7 and len(page["changes"]) <= 3
            if not page["changes"]:
                assert page["next"] == since
                break
            assert page["next"] == page["changes"][-1]["position"]
            seen += page["changes"]
            since = page["next"]
        assert [c["position"] for c in seen] == list(range(1, 8))
        assert [c["op"] for c in seen] == ["create"] * 4 + ["delete"] * 3
        assert seen[-1]["resource"]["path"] == ["acme", "prod"]
        assert seen[0]["resource"]["kind"] == "tenant"

    with_api(test)


@pytest.mark.parametrize(
    "params",
    [{"since": -1}, {"limit": 0}, {"limit": 1001}, {"wait": -1}, {"wait": 31}, {"since": "x"}],
)
def test_changes_parameters_are_bounded(params: dict[str, Any]) -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        assert_problem(await http.get("/v1/changes", params=params), 422, "validation-error")

    with_api(test)


def test_long_poll_returns_as_soon_as_a_change_is_made() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await http.post(T, json={"name": "acme"})
        poll = asyncio.create_task(http.get("/v1/changes", params={"since": 1, "wait": 20}))
        await asyncio.sleep(0.3)
        assert not poll.done()  # it is waiting: nothing after position 1 yet
        started = time.monotonic()
        await http.post(NS, json={"name": "prod"})
        r = await poll
        assert time.monotonic() - started < 2
        page = r.json()
        assert [(c["position"], c["resource"]["path"]) for c in page["changes"]] == [
            (2, ["acme", "prod"])
        ]
        assert page["next"] == 2 and page["position"] == 2

    with_api(test)


def test_long_poll_returns_empty_after_its_wait() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await http.post(T, json={"name": "acme"})
        started = time.monotonic()
        r = await http.get("/v1/changes", params={"since": 1, "wait": 0.4})
        elapsed = time.monotonic() - started
        assert r.status_code == 200
        assert r.json() == {"changes": [], "next": 1, "position": 1}
        assert 0.35 < elapsed < 3
        # Changes already there: no waiting at all.
        started = time.monotonic()
        r = await http.get("/v1/changes", params={"since": 0, "wait": 20})
        assert len(r.json()["changes"]) == 1 and time.monotonic() - started < 2

    with_api(test)


def test_a_cursor_the_feed_cannot_serve_is_gone() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        for i in range(6):
            await http.post(T, json={"name": f"t{i}"})
        # The feed keeps the newest 3 changes (4..6): since 3 still works, 2 does not.
        assert len((await http.get("/v1/changes", params={"since": 3})).json()["changes"]) == 3
        r = await http.get("/v1/changes", params={"since": 2, "wait": 5})
        body = assert_problem(r, 410, "cursor-too-old")
        assert body["since"] == 2 and body["oldest"] == 4
        # Past the newest position (the store was reset): also re-snapshot.
        body = assert_problem(await http.get("/v1/changes", params={"since": 60}), 410)
        assert body["type"] == "/v1/problems/cursor-too-old"
        assert body["since"] == 60 and body["oldest"] == 4
        assert "reset" in body["detail"]
        assert (await http.get("/v1/changes", params={"since": 6})).json()["changes"] == []

    with_api(test, store=MemoryStore(feed_retention=3))


# -- system ------------------------------------------------------------------------------


def test_system_info_health_and_regions() -> None:
    calls: list[int] = []

    def node_info() -> dict[str, Any]:
        calls.append(1)
        return {"pid": 42, "calls": len(calls)}

    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        info = (await http.get("/v1/system/info")).json()
        assert info["region"] == "eu-1" and info["api"] == "v1"
        assert info["node"] == {"pid": 42, "calls": 1}
        assert (await http.get("/v1/system/info")).json()["node"]["calls"] == 2  # kept current
        await http.post(T, json={"name": "acme"})
        health = await http.get("/v1/system/health")
        assert health.status_code == 200
        assert health.json() == {
            "status": "ok",
            "store": {"reachable": True, "position": 1, "error": None},
        }
        regions = await http.get("/v1/regions")
        assert regions.json() == {"regions": [{"name": "eu-1", "local": True}]}

    with_api(test, region="eu-1", node_info=node_info)


def test_health_is_503_when_the_store_fails() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        r = await http.get("/v1/system/health")
        assert r.status_code == 503
        assert r.json() == {
            "status": "unavailable",
            "store": {"reachable": False, "position": None, "error": "database is down"},
        }
        assert (await http.get("/v1/system/info")).json()["node"] == {}

    with_api(test, store=BrokenStore())


class HangingStore(MemoryStore):
    async def position(self) -> int:
        await asyncio.sleep(3600)
        return 0


def test_health_does_not_hang_on_a_stuck_store(monkeypatch: pytest.MonkeyPatch) -> None:
    import felix.control.api.system

    monkeypatch.setattr(felix.control.api.system, "HEALTH_TIMEOUT", 0.2)

    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        r = await http.get("/v1/system/health")
        assert r.status_code == 503
        assert r.json()["store"]["error"] == "the store did not answer within 0.2 s"

    with_api(test, store=HangingStore())
