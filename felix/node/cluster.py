"""The supervisor's side of the cluster (``felix up --cluster``; docs/architecture.md, "Cluster").

How it works: :class:`NodeCluster` runs the :class:`~felix.cluster.agent.ClusterAgent`
on the supervisor's loop and is what the agent calls back:

- ``publish(map)``: the node's newest shard map goes to every gateway process
  (felix/node/messages.py ``Ownership``), and to every gateway that starts later
  (:meth:`NodeCluster.on_gateway_started`): a gateway serves nothing before it has one.
- ``handoff_drained(version)``: returns once every running gateway acknowledged map
  ``version`` (``OwnershipAck``: it applies it, ended the moved shards' subscriptions
  and has no request in flight for them); raises TimeoutError after
  :data:`HANDOFF_DRAIN_TIMEOUT` otherwise, and the handoff is retried later (never
  completed while a gateway may still admit or apply a write for the shard).
- ``durable_shards()``: the logical shards this node holds durable records for
  (:class:`DurableShards`, a scan of ``DATA_DIR/streams`` at most every few seconds).

It also keeps what the health port shows: ``/readyz`` problems (no map yet, lease not
valid), the ``/cluster`` route, the cluster part of ``/status`` and the
``felix_cluster_*`` metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

from felix import ipc
from felix.cluster.archive import IMPORTS_DIR
from felix.cluster.ownership import OwnershipMap, cluster_clock, logical_shard
from felix.errors import ConfigError
from felix.node import messages as msg
from felix.shard.log_format import SEGMENT_HEADER_SIZE

log = logging.getLogger("felix.cluster")

#: How long one attempt of a handoff waits for the gateways' acknowledgements (then it
#: fails and is retried; it never completes without them).
HANDOFF_DRAIN_TIMEOUT = 5.0
#: How long ``durable_shards()`` reuses a scan of the data dir.
DURABLE_RESCAN = 1.0
#: How long the agent may take to join (register, wait out an old lease of this node id,
#: read the map) before ``felix up`` gives up.
JOIN_TIMEOUT = 120.0

__all__ = ["DURABLE_RESCAN", "DurableShards", "NodeCluster"]


class _GatewayChild(Protocol):
    """What the cluster reads and sends of a gateway (felix/node/children.py ``Child``)."""

    @property
    def name(self) -> str: ...

    @property
    def ownership_acked(self) -> int: ...

    def send(self, message: msg.Command) -> bool: ...

    def running(self) -> bool: ...


class DurableShards:
    """The logical shards this node holds durable records for: every stream directory
    under ``DATA_DIR/streams/<tenant>/<ns>/<stream>`` with a segment file holding more
    than its header, hashed to its logical shard (cached; rescanned at most every
    :data:`DURABLE_RESCAN` seconds)."""

    def __init__(
        self,
        root: Path,
        logical_shards: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        rescan: float = DURABLE_RESCAN,
        imports_dir: Path | None = None,
    ) -> None:
        self.root = root
        self.logical_shards = logical_shards
        self._clock = clock
        self._rescan = rescan
        self._at: float | None = None
        self._shards: frozenset[int] = frozenset()
        #: ``DATA_DIR/cluster-imports``: where the shards an operator imported came from.
        self._imports_dir = imports_dir
        #: logical shard -> (source node id, source data id), read with each scan.
        self.imports: dict[int, tuple[str, str]] = {}

    def __call__(self) -> Collection[int]:
        now = self._clock()
        if self._at is None or now - self._at >= self._rescan:
            self._at = now
            if self._imports_dir is not None:
                self.imports = imported_shards(self._imports_dir, self.logical_shards)
            try:
                self._shards = frozenset(self.scan())
            except OSError as exc:
                # Keep the last good answer: an empty one would tell the cluster this
                # node holds no copy any more (and clear its stale-copy marks).
                log.warning("scanning the data dir for durable shards failed: %s", exc)
        return self._shards

    def add(self, shards: Collection[int]) -> None:
        """A shard core just wrote the first durable records of ``shards`` (msg.PinWanted):
        count them now, without waiting for the next scan (which will find them: the
        records were written before the report was sent)."""
        self._shards = self._shards | frozenset(shards)

    def scan(self) -> set[int]:
        shards: set[int] = set()
        for key in durable_stream_keys(self.root):
            shards.add(logical_shard(key, self.logical_shards))
        return shards


def imported_shards(directory: Path, logical_shards: int) -> dict[int, tuple[str, str]]:
    """Where the shards imported into a data dir came from: ``<shard>.json`` records of
    ``felix cluster import-shard`` (felix/cluster/shard_import.py), each
    ``source_node_id`` and ``source_data_id``. Unreadable or odd records are skipped
    (``felix cluster move`` then refuses, naming the missing record); at most one per
    logical shard, each at most 64 KiB."""
    out: dict[int, tuple[str, str]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in names:
        stem = name.removesuffix(".json")
        if stem == name or not stem.isdigit() or not 0 <= int(stem) < logical_shards:
            continue
        try:
            with open(directory / name, "rb") as f:
                record = json.loads(f.read(65_536))
        except (OSError, ValueError):
            continue
        node, data = record.get("source_node_id"), record.get("source_data_id")
        if record.get("shard") == int(stem) and isinstance(node, str) and isinstance(data, str):
            out[int(stem)] = (node, data)
    return out


#: The file naming a data dir to the cluster (created on first join, never changed).
DATA_ID_FILE = "cluster-data-id"


def data_dir_id(data_dir: Path) -> str:
    """The id of ``data_dir`` (a random hex string in ``DATA_DIR/cluster-data-id``, made
    on first use): the cluster ties a node id's durable pins to it, so the same pod name
    on a fresh volume is refused rather than serving those shards empty."""
    path = data_dir / DATA_ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
        return text
    if text:
        raise ConfigError(
            f"{path} is not a data dir id (32 hex digits): remove it only if "
            "this data dir holds no durable streams of the cluster"
        )
    fresh = os.urandom(16).hex()
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{DATA_ID_FILE}.{os.getpid()}")
    with open(tmp, "w") as out:
        out.write(fresh + "\n")
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, path)  # never replaces one another process made meanwhile
    except FileExistsError:
        return data_dir_id(data_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return fresh


def durable_stream_keys(root: Path) -> list[str]:
    """Keys of the durable streams under ``root`` (felix/shard/durable.py's layout) whose
    log holds at least one record's bytes (directories being deleted are skipped)."""
    keys = []
    for tenant in _subdirs(root):
        for ns in _subdirs(root / tenant):
            for stream in _subdirs(root / tenant / ns):
                if stream.startswith("."):  # .deleted.<id>.<name>: a removal under way
                    continue
                if _has_records(root / tenant / ns / stream):
                    keys.append(ipc.stream_key(tenant, ns, stream))
    return keys


def _subdirs(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []  # gone meanwhile (a stream being deleted); other errors: the scan fails


def _has_records(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if (
                    entry.name.endswith(".seg")
                    and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_size > SEGMENT_HEADER_SIZE
                ):
                    return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    return False


def lease_settings(ttl: float) -> Any:
    """``--cluster-lease`` as the agent's lease timing: the fence margin and the placer's
    grace are 2 s (a fifth of the default 10 s lease), a fifth of shorter leases."""
    from felix.cluster.lease import LeaseSettings

    margin = min(2.0, ttl / 5)
    return LeaseSettings(ttl=ttl, fence_margin=margin, placer_grace=margin)


class NodeCluster:
    """The cluster agent of one node and what the supervisor and health port need of it."""

    def __init__(
        self,
        *,
        dsn: str,
        node_id: str,
        address: str,
        health_url: str,
        region: str,
        logical_shards: int,
        lease: float,
        data_dir: Path,
        settle: float = 2.0,
        node_expiry: float = 24 * 3600.0,
        gateways: Callable[[], Sequence[_GatewayChild]],
        clock: Callable[[], float] = cluster_clock,
        drain_timeout: float = HANDOFF_DRAIN_TIMEOUT,
    ) -> None:
        from felix.cluster.agent import ClusterAgent, ClusterSettings

        self.node_id = node_id
        self._drain_timeout = drain_timeout
        self._drain_warned = 0
        self.address = address
        self.logical_shards = logical_shards
        self._gateways = gateways
        self._clock = clock
        #: The newest map the agent published (None: not joined yet), and its message.
        self.map: OwnershipMap | None = None
        self._message: msg.Ownership | None = None
        self.durable = DurableShards(
            data_dir / "streams",
            logical_shards,
            clock=clock,
            imports_dir=data_dir / IMPORTS_DIR,
        )
        #: Owner or epoch changes of logical shards between consecutive maps.
        self.ownership_changes = 0
        self.settings = ClusterSettings(
            dsn=dsn,
            node_id=node_id,
            address=address,
            health_url=health_url,
            region=region,
            logical_shards=logical_shards,
            lease=lease_settings(lease),
            data_id=data_dir_id(data_dir),
            settle=settle,
            node_expiry=node_expiry,
        )
        self.agent = ClusterAgent(
            self.settings,
            publish=self.publish,
            durable_shards=self.durable,
            imports=lambda: self.durable.imports,
            handoff_drained=self.handoff_drained,
            clock=clock,
        )
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Join the cluster (raises ConfigError when the cluster refuses this node), and
        in a fresh cluster wait for its first placement (the placer's settling window:
        the node is ready with its share of the shards, not before), at most until
        ``timeout`` after the start (then it goes on with a warning)."""
        deadline = self._clock() + timeout
        await self.agent.start(timeout)
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.agent.is_placed:  # no wait: a wait of 0 s times out even when placed
            return
        try:
            await asyncio.wait_for(self.agent.placed(), max(0.0, deadline - self._clock()))
        except TimeoutError:
            log.warning("the cluster's shards are not placed yet; going on without them")

    async def _run(self) -> None:
        try:
            await self.agent.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the cluster agent stopped unexpectedly; this node serves no shard")

    async def stop(self) -> None:
        """Leave the cluster (its shards move at once rather than after the lease)."""
        try:
            await asyncio.wait_for(self.agent.stop(leave=True), 5.0)
        except Exception as exc:  # the lease runs out on its own
            log.warning("leaving the cluster failed: %r", exc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # -- what the agent calls --------------------------------------------------------------

    def publish(self, new: OwnershipMap) -> None:
        old = self.map
        if old is not None and old.logical_shards == new.logical_shards:
            self.ownership_changes += sum(
                1
                for a, b in zip(old.shards, new.shards, strict=True)
                if a.owner != b.owner or a.epoch != b.epoch
            )
        if old is None:
            log.info(
                "joined the cluster as %s: map %d, %d of %d logical shards here",
                new.node_id,
                new.version,
                len(new.owned()),
                new.logical_shards,
            )
        self.map = new
        self._message = msg.Ownership(new.to_dict())
        for gateway in self._gateways():
            gateway.send(self._message)

    async def handoff_drained(self, version: int) -> None:
        """Return once every running gateway acknowledged map ``version`` (or a newer
        one): it applies it and has no request in flight for a shard it refuses. Raises
        TimeoutError after :data:`HANDOFF_DRAIN_TIMEOUT` otherwise: the agent then does
        not complete the handoff and tries again later (a gateway never acknowledges on
        a timeout of its own)."""
        deadline = self._clock() + self._drain_timeout
        while True:
            behind = [g for g in self._gateways() if g.running() and g.ownership_acked < version]
            if not behind:
                return
            if self._clock() >= deadline:
                break
            await asyncio.sleep(0.01)
        names = ", ".join(g.name for g in behind)
        message = (
            f"gateways {names} did not acknowledge shard map {version} within "
            f"{self._drain_timeout:g}s (requests still in flight for shards this node gives "
            "up); the handoff is not completed and is retried"
        )
        if self._drain_warned != version:
            self._drain_warned = version
            log.warning("%s", message)
        raise TimeoutError(message)

    # -- what the supervisor calls ----------------------------------------------------------

    def pin_wanted(self, shards: Sequence[int]) -> None:
        """A shard core holds acks of the first durable records of ``shards`` until they
        are pinned to this node (felix/shard/cluster.py ``PinWaits``): count them as
        durable now and have the agent claim the pins at once."""
        valid = [s for s in shards if 0 <= s < self.logical_shards]
        if valid:
            self.durable.add(valid)
            self.agent.wake()

    def on_gateway_started(self, gateway: _GatewayChild) -> None:
        """A gateway (re)started: it gets the current map before anything else."""
        if self._message is not None:
            gateway.send(self._message)

    def serving(self) -> bool:
        return self.map is not None and self._clock() < self.map.serve_until

    def problems(self) -> list[str]:
        """What /readyz says about the cluster (nothing: this node serves its shards)."""
        if self.map is None:
            return ["cluster: joining (no shard map yet)"]
        if not self.serving():
            return ["cluster: this node's lease is not valid (serving no shard; renewing)"]
        return []

    def summary(self) -> dict[str, Any]:
        """The cluster part of /status."""
        current = self.map
        snapshot = self._snapshot()
        return {
            "node_id": self.node_id,
            "address": self.address,
            "logical_shards": self.logical_shards,
            "joined": current is not None,
            "serving": self.serving(),
            "map_version": current.version if current is not None else None,
            "owned": len(current.owned()) if current is not None else 0,
            "nodes": len(current.nodes) if current is not None else 0,
            "live_nodes": sum(1 for n in current.nodes if n.live) if current is not None else 0,
            "placer": bool(snapshot.get("placer")),
        }

    def status(self) -> dict[str, Any]:
        """The /cluster route: the agent's snapshot (this node's map, its lease, placer,
        counters, balance, handoffs) and what this node advertises and holds."""
        return {
            **self._snapshot(),
            "node_id": self.node_id,
            "address": self.address,
            "durable_shards": sorted(self.durable()),
        }

    def _snapshot(self) -> dict[str, Any]:
        try:
            snapshot = self.agent.snapshot()
        except Exception:  # a report must never take the health port down
            log.exception("cluster agent snapshot failed")
            return {}
        return snapshot if isinstance(snapshot, dict) else {}

    def metrics(self) -> dict[str, Any]:
        """Values of the felix_cluster_* metrics (felix/node/health.py renders them)."""
        current = self.map
        snapshot = self._snapshot()
        renewals = _renewals(self.agent, snapshot)
        return {
            "lease_renewals": renewals,
            "shards_owned": len(current.owned()) if current is not None else 0,
            "ownership_changes": _counter(self.agent, "ownership_changes", self.ownership_changes),
            "serving": int(self.serving()),
            "placer": int(bool(snapshot.get("placer"))),
        }


def _counter(agent: Any, name: str, default: int) -> int:
    counters = getattr(agent, "counters", None)
    value = counters.get(name) if isinstance(counters, dict) else None
    return value if isinstance(value, int) else default


def _renewals(agent: Any, snapshot: dict[str, Any]) -> dict[str, int]:
    """Lease renewals by result, from the agent's counters."""
    counters = getattr(agent, "counters", None)
    if callable(counters):
        counters = counters()
    if not isinstance(counters, dict):
        counters = snapshot.get("counters", {})
    out: dict[str, int] = {}
    if isinstance(counters, dict):
        nested = counters.get("lease_renewals")
        if isinstance(nested, dict):
            return {str(k): int(v) for k, v in nested.items() if isinstance(v, int)}
        for name, value in counters.items():
            if isinstance(value, int) and str(name).startswith("renewals_"):
                out[str(name).removeprefix("renewals_")] = value
    return out
