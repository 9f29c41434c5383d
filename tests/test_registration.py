"""Registering resources created on first use: the control plane's side
(felix/control/registration.py, POST /v1/registrations), the node's Registrar
(felix/node/registrar.py) and the shard's reports (felix/shard/core.py)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import httpx
import pytest

from felix import ipc, wire
from felix.control.api import create_app
from felix.control.model import ResourceKind
from felix.control.quotas import NodeQuotas
from felix.control.registration import register
from felix.control.stores.memory import MemoryStore
from felix.ipc import RecordType
from felix.node.registrar import Registrar
from felix.shard.cache import CacheSettings
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.resources import cache_settings, durable_settings, stream_settings
from felix.shard.stream_log import StreamSettings
from tests.aio import run

T, NS, ST, CA = (
    ResourceKind.TENANT,
    ResourceKind.NAMESPACE,
    ResourceKind.STREAM,
    ResourceKind.CACHE,
)
QUOTAS = NodeQuotas()


def _item(name: str, since: int = 0, kind: str = "stream", **spec: Any) -> dict[str, Any]:
    return {"kind": kind, "path": ["acme", "prod", name], "spec": spec, "since": since}


def _results(results: list[dict[str, Any]]) -> list[str]:
    return [r["result"] for r in results]


# -- the control plane's side ---------------------------------------------------------------


def test_register_creates_with_parents_marked_and_leaves_defined_ones_alone() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.create(T, ("globex",), {})
        results = await register(
            store,
            QUOTAS,
            "local",
            [_item("orders", replay_max_records=7), _item("sessions", kind="cache")],
        )
        assert _results(results) == ["created", "created"]
        stream = await store.get(ST, ("acme", "prod", "orders"))
        assert stream is not None and stream.spec["auto_created"] is True
        assert stream.spec["replay_max_records"] == 7
        tenant = await store.get(T, ("acme",))
        namespace = await store.get(NS, ("acme", "prod"))
        assert tenant is not None and tenant.spec["auto_created"] is True
        assert namespace is not None and namespace.spec["auto_created"] is True
        cache = await store.get(CA, ("acme", "prod", "sessions"))
        assert cache is not None and cache.spec["auto_created"] is True
        # Again (a restart re-reports): nothing new, no change on the feed.
        position = await store.position()
        again = await register(store, QUOTAS, "local", [_item("orders", replay_max_records=9)])
        assert _results(again) == ["exists"]
        assert await store.position() == position
        # One defined through the API is left alone, whatever the node reports.
        await store.create(ST, ("acme", "prod", "defined"), {"replay_max_records": 3})
        assert _results(await register(store, QUOTAS, "local", [_item("defined")])) == ["exists"]
        defined = await store.get(ST, ("acme", "prod", "defined"))
        assert defined is not None and defined.spec["auto_created"] is False
        assert defined.spec["replay_max_records"] == 3

    run(main)


def test_register_never_undoes_a_delete_the_node_had_not_seen() -> None:
    async def main() -> None:
        store = MemoryStore()
        assert _results(await register(store, QUOTAS, "local", [_item("orders")])) == ["created"]
        seen = await store.position()  # the node's position when its shard reported
        await store.delete(ST, ("acme", "prod", "orders"))
        # A late (retried, or re-reported) registration from before the delete.
        late = await register(store, QUOTAS, "local", [_item("orders", since=seen)])
        assert _results(late) == ["deleted"]
        assert await store.get(ST, ("acme", "prod", "orders")) is None
        # Created after the node saw the delete: registered again.
        after = await store.position()
        assert _results(await register(store, QUOTAS, "local", [_item("orders", after)])) == [
            "created"
        ]
        # A namespace deleted after the report takes its streams' registrations with it.
        seen = await store.position()
        await store.delete(NS, ("acme", "prod"), cascade=True)
        late = await register(store, QUOTAS, "local", [_item("other", since=seen)])
        assert _results(late) == ["deleted"]
        assert await store.get(NS, ("acme", "prod")) is None

    run(main)


def test_register_applies_quotas_and_limits_and_reports_a_stale_position() -> None:
    async def main() -> None:
        store = MemoryStore(feed_retention=2, max_children=3)
        await store.create(T, ("acme",), {"memory_quota_bytes": 1 << 20})
        results = await register(
            store,
            QUOTAS,
            "local",
            [
                _item("big", replay_max_bytes=64 << 20),  # over the tenant's quota
                _item("bad", replay_max_records=0),  # invalid settings
                {"kind": "tenant", "path": ["acme"], "spec": {}, "since": 0},
            ],
        )
        assert _results(results) == ["refused", "refused", "refused"]
        assert "quota" in results[0]["detail"]
        # The feed no longer holds position 0: the delete check cannot be made.
        assert await store.get(NS, ("acme", "prod")) is None  # nothing left by a refusal
        for name in ("a", "b", "c"):
            await store.create(NS, ("acme", name), {})
        assert _results(await register(store, QUOTAS, "local", [_item("x")])) == ["stale"]
        newest = await store.position()
        # A parent full of children refuses (its limit), never raises.
        results = await register(
            store,
            QUOTAS,
            "local",
            [{"kind": "stream", "path": ["acme", "d", "x"], "spec": {}, "since": newest}],
        )
        assert _results(results) == ["refused"]

    run(main)


def test_registrations_route_is_admin_only_and_answers_each_item() -> None:
    async def main() -> None:
        store = MemoryStore()
        app = create_app(store, admin_token="s3cret", require_auth=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            body = {"resources": [_item("orders")]}
            assert (await http.post("/v1/registrations", json=body)).status_code == 401
            headers = {"Authorization": "Bearer s3cret"}
            r = await http.post("/v1/registrations", json=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["results"] == [
                {
                    "kind": "stream",
                    "path": ["acme", "prod", "orders"],
                    "result": "created",
                    "detail": "",
                }
            ]
            r = await http.get("/v1/tenants/acme/namespaces/prod/streams/orders", headers=headers)
            assert r.json()["spec"]["auto_created"] is True
            # A PATCH may adopt it as defined; the marker changes nothing else.
            item = "/v1/tenants/acme/namespaces/prod/streams/orders"
            r = await http.patch(item, json={"auto_created": False}, headers=headers)
            assert r.status_code == 200 and r.json()["spec"]["auto_created"] is False
            bad = {"resources": [{"kind": "tenant", "path": ["acme"]}]}
            r = await http.post("/v1/registrations", json=bad, headers=headers)
            assert r.status_code == 422

    run(main)


# -- the node's registrar ------------------------------------------------------------------


class _Follower:
    def __init__(self) -> None:
        self.position = 5
        self.seeded = asyncio.Event()
        self.seeded.set()
        self.resources: dict[Any, dict[str, Any]] = {}
        self.deleted: OrderedDict[Any, None] = OrderedDict()
        self.ended: list[Any] = []

    def end(self, kind: ResourceKind, path: tuple[str, ...]) -> None:
        self.ended.append((kind, path))


class _Sink:
    def __init__(self, answer: str = "created") -> None:
        self.answer = answer
        self.batches: list[list[dict[str, Any]]] = []
        self.down = False

    async def register(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.down:
            raise ConnectionError("the control plane is away")
        self.batches.append(items)
        return [{"result": self.answer, "detail": "why"} for _ in items]


def test_registrar_bounds_coalesces_and_counts() -> None:
    async def main() -> None:
        registrar = Registrar(region="eu", max_pending=5, max_pending_per_tenant=3, batch=2)
        follower, sink = _Follower(), _Sink()
        for i in range(3):
            registrar.report("stream", ["a", "ns", f"s{i}"], {})
        registrar.report("stream", ["a", "ns", "s0"], {})  # coalesced
        registrar.report("stream", ["a", "ns", "s9"], {})  # over tenant a's share
        registrar.report("cache", ["b", "ns", "c"], {})
        registrar.report("cache", ["b", "ns", "d"], {})
        registrar.report("cache", ["c", "ns", "e"], {})  # over the whole bound
        assert len(registrar.pending) == 5 and registrar.dropped == 2
        registrar.report("group", ["a", "ns", "s", "g"], {})  # not created on first use
        assert len(registrar.pending) == 5
        registrar.attach(sink, follower)
        # Not seeded when reported: stamped with the position at the first batch.
        await registrar.register_once()
        assert [len(b) for b in sink.batches] == [2]
        assert sink.batches[0][0] == {
            "kind": "stream",
            "path": ["a", "ns", "s0"],
            "spec": {"region": "eu"},  # the node's region, where the spec has one
            "since": 5,
        }
        assert sink.batches[0][0]["spec"] == {"region": "eu"}
        sink.down = True
        with pytest.raises(ConnectionError):
            await registrar.register_once()
        assert len(registrar.pending) == 3  # kept for the retry
        sink.down = False
        while registrar.pending:
            await registrar.register_once()
        assert registrar.registered == 5 and registrar.dropped == 2
        assert [c[2] for c in registrar.counters()][:3] == [5, 0, 2]

    run(main)


def test_registrar_skips_defined_and_deleted_ends_refused_counts() -> None:
    async def main() -> None:
        registrar = Registrar()
        follower, sink = _Follower(), _Sink(answer="deleted")
        registrar.attach(sink, follower)
        follower.resources[(ST, ("a", "ns", "defined"))] = {}
        follower.deleted[(ST, ("a", "ns", "gone"))] = None
        registrar.report("stream", ["a", "ns", "defined"], {})
        registrar.report("stream", ["a", "ns", "gone"], {})
        assert not registrar.pending and registrar.deleted == 1
        registrar.report("stream", ["a", "ns", "raced"], {})
        await registrar.register_once()
        # Deleted in the control plane after the report: ended on the data plane.
        assert follower.ended == [(ST, ("a", "ns", "raced"))]
        sink.answer = "refused"
        registrar.report("cache", ["a", "ns", "c"], {})
        await registrar.register_once()
        assert registrar.refused == 1 and not registrar.pending
        # Stale: asked again with the follower's newer position.
        sink.answer = "stale"
        registrar.report("cache", ["a", "ns", "d"], {})
        follower.position = 9
        await registrar.register_once()
        assert registrar.pending[(CA, ("a", "ns", "d"))].since == 9

    run(main)


# -- the shard's side ----------------------------------------------------------------------


def _publish(core: ShardCore, stream: str, now: float = 0.0) -> None:
    frame = wire.encode_publish(1, "acme", "prod", stream, [b"x"])
    core.handle(0, ipc.encode(RecordType.REQUEST, 1, 0, frame), now)
    core.flush()


def _cache_set(core: ShardCore, cache: str, key: str, value: bytes) -> None:
    frame = wire.encode_cache_set(1, "acme", "prod", cache, key, value)
    core.handle(0, ipc.encode(RecordType.REQUEST, 1, 0, frame), 0.0)
    core.flush()


def test_shard_reports_what_it_creates_and_a_definition_with_the_same_settings_is_a_no_op() -> None:
    defaults = StreamSettings(replay_max_records=50)
    cache_defaults = CacheSettings(budget_bytes=1 << 20)
    core = ShardCore(ShardSettings(0, 2, stream_defaults=defaults, cache_defaults=cache_defaults))
    _publish(core, "orders")
    _publish(core, "orders")
    _cache_set(core, "sessions", "k", b"v")
    created = core.take_auto_created()
    assert [(kind, path) for kind, path, _ in created] == [
        ("stream", ("acme", "prod", "orders")),
        ("cache", ("acme", "prod", "sessions")),
    ]
    assert core.take_auto_created() == []
    stream_spec, cache_spec = created[0][2], created[1][2]
    # Defined with the spec it reported (as the feed brings it back): nothing changes.
    key = ipc.stream_key("acme", "prod", "orders")
    log = core.stream_log(key)
    assert log is not None and log.retained_records == 2
    core.define_stream(key, stream_settings(stream_spec, defaults), durable_settings(stream_spec))
    core.define_cache(("acme", "prod", "sessions"), cache_settings(cache_spec, cache_defaults, 2))
    assert core.stream_log(key) is log and log.retained_records == 2
    frame = wire.encode_cache_get(2, "acme", "prod", "sessions", "k")
    core.handle(0, ipc.encode(RecordType.REQUEST, 2, 0, frame), 0.0)
    [reply] = core.flush()[0]
    value = wire.decode_ext(wire.decode_frame(reply[ipc.HEADER_SIZE :], extensions=True))
    assert isinstance(value, wire.CacheValue) and value.value == b"v"
    # Defined through the control plane: not reported.
    core.define_stream(ipc.stream_key("acme", "prod", "defined"), defaults)
    assert core.take_auto_created() == []


def test_a_registration_from_a_node_of_another_region_is_refused() -> None:
    async def main() -> None:
        store = MemoryStore()
        results = await register(store, QUOTAS, "eu-1", [_item("orders", region="us-1")])
        assert _results(results) == ["refused"]
        assert "region 'us-1'" in results[0]["detail"]
        assert await store.get(ST, ("acme", "prod", "orders")) is None
        assert await store.get(T, ("acme",)) is None  # no parent left behind either
        ok = await register(store, QUOTAS, "eu-1", [_item("orders", region="eu-1")])
        assert _results(ok) == ["created"]

    run(main)
