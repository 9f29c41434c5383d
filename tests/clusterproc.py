"""Real `felix up --cluster` nodes for end-to-end tests: one CA for all, a database proxy
that can be cut, and a sampler of every node's /cluster.

Every node's data dir gets the same dev CA before it starts (``tls/ca-cert.pem`` and
``ca-key.pem``), so one CA file verifies whichever node a client is redirected to, as
on Kubernetes with one issuer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from felix.cluster.placement import rendezvous_owner
from felix.tls import ensure_node_certificates
from tests.nodeproc import NodeProcess

LOGICAL_SHARDS = 256
TENANT = "acme"
NAMESPACE = "prod"


def make_ca(root: Path) -> Path:
    """A dev CA under ``root/ca`` (its directory)."""
    ca = root / "ca"
    ensure_node_certificates(ca, hostnames=["localhost"], ips=["127.0.0.1"])
    return ca


def start_node(
    root: Path, ca: Path, dsn: str, node_id: str, lease: float, *extra: str
) -> NodeProcess:
    """`felix up --cluster` as ``node_id`` on ``root/node_id`` (reused when it exists: a
    restart keeps its data dir)."""
    data = root / node_id
    tls = data / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    for name in ("ca-cert.pem", "ca-key.pem"):
        if not (tls / name).exists():
            shutil.copy(ca / name, tls / name)
    return NodeProcess(
        data,
        "--topology", "embedded",
        "--cluster", dsn,
        "--node-id", node_id,
        "--cluster-lease", f"{lease:g}",
        "--logical-shards", str(LOGICAL_SHARDS),
        "--no-auto-create",
        *extra,
        gateways=1,
        shards=2,
        log_path=root / f"{node_id}.{int(time.time() * 1000)}.log",
    )  # fmt: skip


def start_nodes(
    root: Path, ca: Path, dsn: str, ids: list[str], lease: float, *extra: str
) -> list[NodeProcess]:
    """Start the nodes at once (each joins while the others do); raises the first
    failure after stopping the ones that started."""
    with ThreadPoolExecutor(len(ids)) as pool:
        futures = [pool.submit(start_node, root, ca, dsn, i, lease, *extra) for i in ids]
    started = [f.result() for f in futures if f.exception() is None]
    for f in futures:
        if (exc := f.exception()) is not None:
            for node in started:
                node.stop()
            raise exc
    return started


def url(node: NodeProcess) -> str:
    return f"felix://{node.host}:{node.port}"


async def connect(node: NodeProcess, ca: Path, **options: Any) -> Any:
    """felix's client to ``node`` (given only its address), as tenant/namespace
    ``acme/prod``, trusting the CA of :func:`make_ca` (request timeout 5 s unless given)."""
    import felix

    return await felix.connect(
        url(node),
        ca=str(ca / "ca-cert.pem"),
        tenant=TENANT,
        namespace=NAMESPACE,
        **{"request_timeout": 5.0, **options},
    )


def cluster_doc(node: NodeProcess) -> dict[str, Any]:
    status, body = node.http("/cluster")
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def owners(doc: dict[str, Any]) -> list[str | None]:
    return [row[0] for row in doc["shards"]]


def settled(node: NodeProcess, live: list[str]) -> dict[str, Any] | None:
    """``node``'s /cluster once exactly ``live`` are live, it serves, and every shard is
    with its desired owner (its durable node, else the rendezvous winner) with no
    handoff in flight; else None."""
    try:
        doc = cluster_doc(node)
    except (AssertionError, OSError):
        return None
    live_ids = sorted(row[0] for row in doc.get("nodes", []) if row[3])
    if not doc.get("serving") or live_ids != sorted(live):
        return None
    for shard, (owner, _epoch, handoff_to, durable) in enumerate(doc["shards"]):
        want = durable if durable is not None else rendezvous_owner(shard, live_ids)
        if handoff_to is not None or owner != want:
            return None
    return doc


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, logs: str | Callable[[], str] = ""
) -> Any:
    """``check()`` once it is truthy, polled every 0.1 s; else AssertionError naming
    ``what`` with the end of ``logs`` (a callable: read when it fails)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    text = logs() if callable(logs) else logs
    raise AssertionError(f"{what} within {timeout} s (last: {last!r})\n{text[-4000:]}")


def wait_settled(nodes: list[NodeProcess], timeout: float = 30) -> dict[str, Any]:
    """Every node's view settled on these nodes and agreeing; the first one's doc."""
    ids = [n.data_dir.name for n in nodes]
    docs: list[dict[str, Any]] = []
    for node in nodes:

        def check(node: NodeProcess = node) -> dict[str, Any] | None:
            return settled(node, ids)

        docs.append(wait_for(f"{node.data_dir.name} settled on {ids}", check, timeout, node.log))
    first = owners(docs[0])
    wait_for(
        "the nodes to agree on the owners",
        lambda: all(owners(cluster_doc(n)) == first for n in nodes),
        timeout,
    )
    return docs[0]


def define(
    node: NodeProcess,
    durable: list[str],
    memory: list[str],
    caches: list[str] = (),  # type: ignore[assignment]
    groups: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> None:
    """Tenant, namespace, streams (durable or in memory), caches and queue groups
    ``(stream, group)`` through ``node``'s control API (the cluster's database is every
    node's control store)."""
    base = f"{node.info['control']}/v1/tenants"
    with httpx.Client(timeout=10) as http:
        r = http.post(base, json={"name": TENANT})
        assert r.status_code in (201, 409), r.text
        r = http.post(f"{base}/{TENANT}/namespaces", json={"name": NAMESPACE})
        assert r.status_code in (201, 409), r.text
        ns = f"{base}/{TENANT}/namespaces/{NAMESPACE}"
        for name in durable:
            r = http.post(f"{ns}/streams", json={"name": name, "durable": True})
            assert r.status_code == 201, r.text
        for name in memory:
            r = http.post(f"{ns}/streams", json={"name": name})
            assert r.status_code == 201, r.text
        for name in caches:
            r = http.post(f"{ns}/caches", json={"name": name})
            assert r.status_code == 201, r.text
        for stream, group in groups:
            r = http.post(f"{ns}/streams/{stream}/groups", json={"name": group})
            assert r.status_code == 201, r.text


def redirects_total(nodes: list[NodeProcess]) -> float:
    return sum(n.metric("felix_cluster_redirects_total") for n in nodes)


# -- a database proxy that can be cut ----------------------------------------------------


class DbProxy:
    """A TCP proxy to the PostgreSQL server, on a thread of its own, that can be cut:
    while cut it forwards nothing and answers nothing (a partition), new connections
    included; healing drops every connection held meanwhile, as a router's reset would
    (tests/test_cluster_agent.py and tests/test_cluster_e2e_faults.py)."""

    def __init__(self, dsn: str) -> None:
        self.parts = urlsplit(dsn)
        self.cut = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> str:
        """Start it; the DSN to give the nodes."""
        self._thread.start()
        port = self._call(self._start())
        netloc = self.parts.netloc.rsplit("@", 1)
        user = netloc[0] + "@" if len(netloc) == 2 else ""
        return urlunsplit(self.parts._replace(netloc=f"{user}127.0.0.1:{port}"))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        if self.cut:
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.parts.hostname, self.parts.port or 5432
            )
        except OSError:
            writer.close()
            return
        self._held.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if self.cut:
                    continue  # swallowed: the peer waits for an answer that never comes
                dst.write(data)
                await dst.drain()
        if not self.cut:
            dst.close()

    def set_cut(self) -> None:
        self.cut = True

    def heal(self) -> None:
        self._call(self._heal())

    async def _heal(self) -> None:
        self.cut = False
        held, self._held = self._held, []
        for writer in held:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            await self._heal()
            for task in list(self._tasks):
                task.cancel()
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# -- who serves what, sampled ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One node's /cluster, asked at ``began`` and answered by ``ended`` (monotonic): the
    shards it would serve then (owner, serving, no handoff), with their epochs."""

    began: float
    ended: float
    node_id: str
    serving: bool
    incarnation: int | None
    served: dict[int, int]

    @property
    def at(self) -> float:
        return self.ended


class Sampler:
    """Reads every node's /cluster in a loop on a thread, to check afterwards that no shard
    ever had two serving owners."""

    def __init__(self, nodes: Callable[[], list[NodeProcess]], every: float = 0.05) -> None:
        self._nodes = nodes
        self._every = every
        self.samples: list[Sample] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in self._nodes():
                if node.proc.poll() is not None:
                    continue
                began = time.monotonic()
                try:
                    status, body = node.http("/cluster")
                except OSError:
                    continue
                if status != 200:
                    continue
                ended = time.monotonic()
                doc = json.loads(body)
                me = doc["node_id"]
                serving = bool(doc.get("serving"))
                served = {
                    i: epoch
                    for i, (owner, epoch, handoff_to, _d) in enumerate(doc.get("shards", []))
                    if serving and owner == me and handoff_to is None
                }
                incarnation = next((r[4] for r in doc.get("nodes", []) if r[0] == me), None)
                self.samples.append(Sample(began, ended, me, serving, incarnation, served))
            self.rounds += 1
            self._stop.wait(self._every)

    def check_single_owner(self) -> None:
        """No shard had two serving owners: each (shard, epoch) was served by one node only,
        and no node was seen serving a shard at an epoch after another node had been seen
        serving it at a newer one (the older owner had stopped before the newer began).

        Samples of different nodes are not simultaneous: a sample seen *before* a newer
        epoch's proves nothing, one asked for after the newer one was answered does."""
        by_epoch: dict[tuple[int, int], str] = {}
        # shard -> epoch -> (latest "asked" time, earliest "answered" time) serving it.
        spans: dict[int, dict[int, tuple[float, float]]] = {}
        for sample in self.samples:
            for shard, epoch in sample.served.items():
                first = by_epoch.setdefault((shard, epoch), sample.node_id)
                assert first == sample.node_id, (
                    f"shard {shard} epoch {epoch} served by {first} and {sample.node_id}"
                )
                latest, earliest = spans.setdefault(shard, {}).get(epoch, (-1.0, float("inf")))
                spans[shard][epoch] = (max(latest, sample.began), min(earliest, sample.ended))
        for shard, epochs in spans.items():
            newer_seen = float("inf")  # earliest answer serving any newer epoch
            for epoch in sorted(epochs, reverse=True):
                latest, earliest = epochs[epoch]
                assert latest <= newer_seen, (
                    f"shard {shard}: {by_epoch[(shard, epoch)]} served epoch {epoch} after a "
                    "newer epoch was served"
                )
                newer_seen = min(newer_seen, earliest)


# -- client traffic ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One call of :class:`Traffic`: when it started and ended, its key, its error."""

    began: float
    ended: float
    key: str
    error: BaseException | None


class Traffic:
    """Steady traffic through one client: a task per stream publishing with acks, and a
    task per cache key setting a new value and reading it back (a different value read
    back is an error), each recording every outcome."""

    def __init__(
        self, client: Any, streams: list[str], cache: str = "", keys: list[str] = (),  # type: ignore[assignment]
        pause: float = 0.01,
    ) -> None:  # fmt: skip
        self.client = client
        self.streams = streams
        self.cache = cache
        self.keys = keys
        self.pause = pause
        self.outcomes: list[Outcome] = []
        #: stream -> (offset, payload) of every acknowledged publish, in order.
        self.acked: dict[str, list[tuple[int, bytes]]] = {s: [] for s in streams}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._publish(s)) for s in self.streams]
        self._tasks += [asyncio.create_task(self._cache(k)) for k in self.keys]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _publish(self, stream: str) -> None:
        from felix.errors import FelixError

        seq = 0
        while not self._stop.is_set():
            payload = f"{stream}:{seq}".encode()
            seq += 1
            began = time.monotonic()
            try:
                ack = await self.client.publish(stream, payload)
            except FelixError as exc:
                self.outcomes.append(Outcome(began, time.monotonic(), stream, exc))
                await asyncio.sleep(0.05)
                continue
            self.acked[stream].append((ack.offset, payload))
            self.outcomes.append(Outcome(began, time.monotonic(), stream, None))
            await asyncio.sleep(self.pause)

    async def _cache(self, key: str) -> None:
        from felix.errors import FelixError

        cache = self.client.cache(self.cache)
        seq = 0
        while not self._stop.is_set():
            value = f"{key}:{seq}".encode()
            seq += 1
            began = time.monotonic()
            error: BaseException | None = None
            try:
                await cache.set(key, value)
                got = await cache.get(key)
                if got != value:
                    error = AssertionError(f"cache {key}: set {value!r}, got {got!r}")
            except FelixError as exc:
                error = exc
            self.outcomes.append(Outcome(began, time.monotonic(), key, error))
            await asyncio.sleep(0.05 if error else self.pause)

    def errors(self, keys: Any = None, after: float = 0.0) -> list[Outcome]:
        """Failed calls (of ``keys``, ended after ``after``)."""
        return [
            o for o in self.outcomes
            if o.error is not None and (keys is None or o.key in keys) and o.ended > after
        ]  # fmt: skip

    def successes(self, key: str, after: float) -> int:
        return sum(1 for o in self.outcomes if o.error is None and o.key == key and o.began > after)


async def read_all(client: Any, stream: str, through: int, timeout: float = 20) -> dict[int, bytes]:
    """Every record of ``stream`` from its earliest through offset ``through`` (offset ->
    payload); fails on a duplicate offset or one out of order."""
    got: dict[int, bytes] = {}
    last = -1
    async with asyncio.timeout(timeout), client.subscribe(stream, start="earliest") as sub:
        while last < through:
            message = await sub.next(timeout=timeout)
            assert message.offset > last, f"{stream}: offset {message.offset} after {last}"
            last = message.offset
            got[message.offset] = message.data
    return got
