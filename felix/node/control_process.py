"""The node's control process: the embedded control plane, apart from the data plane.

``felix up`` (without ``--control-url``) runs the control plane's REST API here,
in a child process of the supervisor (``python -m felix.node.worker`` with role
``control``), never in the supervisor itself: whatever its clients do to it (huge
bodies, floods of connections, a crash, an exception) costs this process at
most. The supervisor keeps the listening socket (so the port survives a
restart), restarts this process like any child, and follows the store through
it: it asks for snapshots and changes over the control socket
(felix/node/messages.py), which this process answers from its store
(:class:`~felix.node.control.StoreFeed`).

The process offers itself first to the kernel's OOM killer (``oom_score_adj``
500): on a host out of memory, the control plane goes before a shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from felix.auth.files import admin_token
from felix.control.model import ResourceKind
from felix.control.registration import register
from felix.control.store import AlreadyExists, CursorTooOld, Store
from felix.control.stores import open_store
from felix.node import messages as msg
from felix.node.config import NodeConfig, is_loopback
from felix.node.control import EmbeddedControl, StoreFeed
from felix.node.worker import ChildSpec, ControlChannel, serve_commands
from felix.tls import node_certificates

log = logging.getLogger("felix.control")

#: How much more likely than others this process is to be chosen by the OOM killer.
OOM_SCORE_ADJ = 500


async def run_control(spec: ChildSpec, channel: ControlChannel) -> None:
    config = spec.config
    _prefer_oom_kill()
    # The store's DSN comes through a pipe of this process's own (config.control_store
    # is a placeholder in every child's copy of the config: it may carry a password).
    url = spec.read_secret()
    if url is None:
        if config.control_store is not None:  # never fall back to another store
            raise RuntimeError("the supervisor gave this control process no store DSN")
        url = f"sqlite:///{config.data_dir / 'control.db'}"
    store = open_store(url)
    await store.open()
    try:
        await ensure_default_namespace(store, config.region)
        control = _api(config, store, socket.socket(fileno=spec.socket_fd))
        await control.start()
        channel.send(msg.Ready())
        feed = StoreFeed(store)

        def on_command(cmd: msg.Command) -> Awaitable[None] | None:
            if isinstance(cmd, msg.SnapshotRequest | msg.ChangesRequest):
                return _answer(feed, channel, cmd)
            if isinstance(cmd, msg.RegisterRequest):
                return _register(store, config, channel, cmd)
            return None

        await serve_commands(channel, dict, on_command)
        await control.stop()
    finally:
        await store.close()


def _api(config: NodeConfig, store: Store, sock: socket.socket) -> EmbeddedControl:
    host = config.control[0]
    # HTTPS beyond loopback, and whenever clients must present certificates.
    tls = None
    if not is_loopback(host) or config.control_client_ca is not None:
        certs = node_certificates(config.data_dir / "tls", cert=config.tls_cert, key=config.tls_key)
        tls = (certs.server_cert, certs.server_key)
    # With --auth the API needs a token: the bootstrap admin one is in the data dir.
    admin = admin_token(config.data_dir / "admin-token") if config.auth else None
    node_json = config.data_dir / "node.json"
    return EmbeddedControl(
        store,
        sock,
        region=config.region,
        tls=tls,
        client_ca=config.control_client_ca,
        node_info=lambda: _read_json(node_json),
        keys_dir=config.data_dir / "auth",
        admin_token=admin,
        require_auth=config.auth,
        quotas=config.quotas,
    )


async def _answer(
    feed: StoreFeed, channel: ControlChannel, cmd: msg.SnapshotRequest | msg.ChangesRequest
) -> None:
    """Answer one of the supervisor's feed requests."""
    try:
        if isinstance(cmd, msg.SnapshotRequest):
            position, resources = await feed.snapshot()
            parts = _parts([r.model_dump(mode="json") for r in resources])
            for i, part in enumerate(parts):
                channel.send(msg.SnapshotPart(cmd.request, position, part, i == len(parts) - 1))
        else:
            changes, nxt = await feed.changes(cmd.since, cmd.limit, cmd.wait)
            page = [c.model_dump(mode="json") for c in changes]
            # One reply is one line: cut the page like a snapshot part (the follower asks
            # again from the last change sent).
            end = _fitting(page, 0)
            if end < len(page):
                page, nxt = page[:end], changes[end - 1].position
            channel.send(msg.ChangesReply(cmd.request, page, nxt))
    except CursorTooOld as exc:
        channel.send(msg.FeedFailed(cmd.request, str(exc), cursor_too_old=True))
    except Exception as exc:  # the store failed: the supervisor's follower retries
        log.warning("feed request failed: %s", exc)
        channel.send(msg.FeedFailed(cmd.request, str(exc)))


async def _register(
    store: Store, config: NodeConfig, channel: ControlChannel, cmd: msg.RegisterRequest
) -> None:
    """Register what the node's shards created on first use (felix/node/registrar.py)."""
    try:
        results = await register(store, config.quotas, config.region, cmd.resources)
    except Exception as exc:  # the store failed: the registrar retries
        log.warning("registration failed: %s", exc)
        channel.send(msg.FeedFailed(cmd.request, str(exc)))
    else:
        channel.send(msg.RegisterReply(cmd.request, results))


def _parts(resources: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split a snapshot into parts of at most SNAPSHOT_PART_BYTES of JSON (at least one
    part, possibly empty; a resource larger than that travels alone)."""
    parts: list[list[dict[str, Any]]] = []
    start = 0
    while start < len(resources) or not parts:
        end = _fitting(resources, start)
        parts.append(resources[start:end])
        start = end
    return parts


def _fitting(items: list[dict[str, Any]], start: int) -> int:
    """The end of the longest run of ``items`` from ``start`` whose JSON is at most
    SNAPSHOT_PART_BYTES, and at least one item (one larger than that travels alone:
    see MAX_LINE_BYTES for what bounds it)."""
    size = 0
    end = start
    while end < len(items):
        size += len(json.dumps(items[end]))
        if end > start and size > msg.SNAPSHOT_PART_BYTES:
            break
        end += 1
    return end


async def ensure_default_namespace(store: Store, region: str | None = None) -> None:
    """A new embedded control plane starts with the ``default`` tenant and namespace,
    the ones clients use when they name none, recorded in ``region`` (the node's)."""
    spec = {} if region is None else {"region": region}
    for kind, path in (
        (ResourceKind.TENANT, ("default",)),
        (ResourceKind.NAMESPACE, ("default", "default")),
    ):
        if await store.get(kind, path) is None:
            with contextlib.suppress(AlreadyExists):
                await store.create(kind, path, spec)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _prefer_oom_kill() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")


__all__ = ["ensure_default_namespace", "run_control"]
