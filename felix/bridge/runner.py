"""The bridge runner: copies each active bridge's source stream to its target.

How it works, per bridge (one task each, at most :data:`MAX_BRIDGES_PER_RUNNER`):

1. Read the checkpoint (the next source offset to copy; :mod:`felix.bridge.checkpoint`)
   or, without one, start at the bridge's ``start`` (earliest or latest).
2. Subscribe to the source stream from there (``credit`` bounds what the source sends
   ahead), take what has arrived (at most :data:`MAX_BATCH` records and
   :data:`MAX_BATCH_BYTES`), drop what the header filter leaves out, and publish the
   rest to the target as ONE publish (stored whole or not at all, so the target gets
   them in source order), each with its original headers plus provenance
   (``felix-source-region``, ``felix-source-stream``, ``felix-source-offset``) and
   ``felix-msg-id`` = ``bridge:<region>/<tenant>/<ns>/<stream>@<offset>``. One publish
   is in flight at a time: the in-flight window is one batch.
3. Only after the target acked the batch with a durable ack (``written`` or
   ``synced``) is the checkpoint moved past it (atomically, fsynced). A crash between
   the ack and the checkpoint copies the batch again: at least once; the target's dedup
   window drops the copies by their ``felix-msg-id``, so a consumer sees each once.

Any error tears down both connections and starts over from the checkpoint after a
backoff (0.2 s doubling to 10 s, jittered). A refusal that retrying cannot fix (the
target says NotFound, PermissionDenied, TooLarge, BadRequest, or acks an in-memory
stream; a missing token file; a token of another region) stops the flow with the error
in the bridge's status (state ``failed``) and is retried every 30 s, so fixing the
target resumes the bridge where it stopped: nothing is skipped.

The runner follows the control plane: one bridge (``felix bridge run NAME``, polled
every second) or all of them (``--all``: the change feed, as the node's ``--bridges``
child). Pausing stops the bridge's task; resuming starts it from the checkpoint;
deleting stops it and removes its checkpoint. An unreachable control plane changes
nothing: flows keep running as last seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import felix
from felix import wire
from felix.bridge.checkpoint import Checkpoint, CheckpointDir
from felix.bridge.status import (
    MAX_BRIDGES_PER_RUNNER,
    BridgeStatus,
    StatusServer,
    write_status_file,
)
from felix.cancel import raise_if_cancelled
from felix.client import Client
from felix.control.client import ControlClient
from felix.control.model import Path as ResPath
from felix.control.model import Resource, ResourceKind, split_stream_ref
from felix.control.store import CursorTooOld
from felix.errors import (
    BadRequest,
    ConfigError,
    CursorError,
    FelixError,
    FelixTimeoutError,
    NotFound,
    PermissionDenied,
    RemoteProtocolError,
    TooLarge,
    Unauthenticated,
)
from felix.unverified_jwt import read_unverified_claims

__all__ = [
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "BridgeRunner",
    "SourceAccess",
    "provenance",
]

log = logging.getLogger("felix.bridge")

#: Records and payload bytes in one publish to the target (the in-flight window).
MAX_BATCH = 512
MAX_BATCH_BYTES = 1 << 20
#: Records the source may send ahead of the runner.
CREDIT = 1024
#: Backoff after a transient error: from BACKOFF_BASE doubling to BACKOFF_CAP.
BACKOFF_BASE = 0.2
BACKOFF_CAP = 10.0
#: Retry period of a bridge stopped by a permanent refusal.
FAILED_RETRY = 30.0
#: Seconds between checkpoints while only filtered records pass (bounds the fsyncs).
FILTERED_SAVE_INTERVAL = 1.0
#: Seconds between reads of the source's end offset (for the lag).
END_PROBE_INTERVAL = 2.0
#: Seconds between status refreshes (rate samples, status.json).
STATUS_INTERVAL = 1.0

#: Tests only: exit (status 75) right after the Nth target ack, before its checkpoint is
#: written, as a crash at the worst moment would (the records are on the target, the
#: checkpoint does not say so: the restarted runner copies them again).
_FAULT_EXIT_AFTER_ACKS = int(os.environ.get("FELIX_FAULT_BRIDGE_EXIT_AFTER_ACKS") or 0)
_fault_acks = 0


def _fault_exit_after_ack() -> None:
    global _fault_acks
    _fault_acks += 1
    if _fault_acks >= _FAULT_EXIT_AFTER_ACKS:
        log.error("FELIX_FAULT_BRIDGE_EXIT_AFTER_ACKS: exiting after ack %d", _fault_acks)
        os._exit(75)


#: Header names felix sets on a copied record (docs/operations.md, "Bridges").
H_REGION = "felix-source-region"
H_STREAM = "felix-source-stream"
H_OFFSET = "felix-source-offset"
H_MSG_ID = "felix-msg-id"

_DURABLE = {wire.DURABILITY_WRITTEN: "written", wire.DURABILITY_SYNCED: "synced"}
#: Errors retrying cannot fix; the flow stops (state failed) until the target changes.
_PERMANENT = (NotFound, PermissionDenied, Unauthenticated, TooLarge, BadRequest, ConfigError)


class _Stopped(FelixError):
    """A bridge's flow stops on a refusal retrying cannot fix (see the module doc)."""


def provenance(region: str, tenant: str, ns: str, stream: str, offset: int) -> dict[str, str]:
    """The headers a copied record carries (they replace those of an earlier hop)."""
    source = f"{tenant}/{ns}/{stream}"
    return {
        H_REGION: region,
        H_STREAM: source,
        H_OFFSET: str(offset),
        H_MSG_ID: f"bridge:{region}/{source}@{offset}",
    }


def passes(spec_filter: Mapping[str, Any] | None, headers: Mapping[str, str]) -> bool:
    """Whether a record with ``headers`` passes the bridge's header filter."""
    if spec_filter is None:
        return True
    value = headers.get(spec_filter["header"])
    if value is None:
        return False
    wanted = spec_filter.get("equals")
    return wanted is None or value == wanted


#: (region, tenant, ns, stream) -> a token that may subscribe to the stream, or None.
TokenFn = Callable[[str, str, str, str], Awaitable[str | None]]


@dataclass(frozen=True)
class SourceAccess:
    """How the runner reaches this region's node: ``url``, ``ca``, and ``token(region,
    tenant, ns, stream)`` giving a token that may subscribe to the stream (None: no auth)."""

    url: str
    token: TokenFn
    ca: Path | None = None


def static_token(read: Callable[[], str | None]) -> TokenFn:
    async def token(region: str, tenant: str, ns: str, stream: str) -> str | None:
        return read()

    return token


def minted_token(keys_dir: Path) -> TokenFn:
    """Tokens the node mints for itself from the tenant's key ring in ``keys_dir``: only
    ``stream.subscribe`` on the bridge's source stream, for this region."""
    from felix.auth.files import AUDIENCE, ISSUER, load_ring
    from felix.auth.perms import PermissionSet

    async def token(region: str, tenant: str, ns: str, stream: str) -> str | None:
        try:
            ring = await asyncio.to_thread(load_ring, keys_dir, tenant)
        except NotFound:
            raise _Stopped(
                f"tenant {tenant} has no key ring in {keys_dir}: the node cannot mint a "
                f"token to read its stream (felix token keygen --tenant {tenant})"
            ) from None
        perms = PermissionSet(tenant, [f"stream.subscribe:stream:{tenant}/{ns}/{stream}"])
        return ring.mint(
            time.time(),
            issuer=ISSUER,
            audience=AUDIENCE,
            sub="felix-bridge",
            perms=perms,
            region=region,
        )

    return token


def env_prefix(tenant: str) -> str:
    """The prefix every environment variable a bridge of ``tenant`` may name starts with:
    ``FELIX_BRIDGE_<TENANT>_``, the tenant's name upper-cased."""
    return f"FELIX_BRIDGE_{tenant.upper()}_"


def _read_confined(secrets_dir: Path | None, tenant: str, reference: str) -> bytes:
    """The file a bridge of ``tenant`` names, which must lie in ``secrets_dir/<tenant>/``.

    A tenant picks the path and the host the token is sent to: anything else the
    runner can read (the node's admin token, other tenants' key rings, the region key,
    /proc/self/environ) must be out of its reach. So: the operator's directory only,
    the tenant's own subdirectory, no symlink anywhere below it, a regular file.
    """
    if secrets_dir is None:
        raise _Stopped(
            "target_token_file needs a runner with --secrets-dir (the operator puts each "
            "tenant's bridge tokens in DIR/<tenant>/); this one has none"
        )
    root = (secrets_dir / tenant).resolve()
    path = Path(reference)
    try:
        relative = path.relative_to(root) if path.is_absolute() else path
    except ValueError:
        relative = None
    if relative is None or not relative.parts or ".." in relative.parts:
        raise _Stopped(
            f"target_token_file must name a file in this runner's {secrets_dir}/{tenant}/ "
            "(a name relative to it, or a path inside it)"
        )
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in relative.parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open(relative.parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)
    with os.fdopen(leaf, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _Stopped("target_token_file is not a regular file")
        raw = f.read(64 * 1024 + 1)
    if len(raw) > 64 * 1024:
        raise _Stopped("target_token_file is larger than 64 KiB")
    return raw


def target_token(
    spec: Mapping[str, Any], tenant: str = "", secrets_dir: Path | None = None
) -> str | None:
    """The target token bridge ``spec`` of ``tenant`` names, read now: a file in the
    runner's ``secrets_dir/<tenant>/``, or an environment variable whose name starts
    with :func:`env_prefix` (``FELIX_BRIDGE_<TENANT>_``).

    Raises _Stopped when it is named and cannot be had, is out of the tenant's
    reach, or names another region.
    """
    if spec.get("target_token_file"):
        try:
            raw = _read_confined(secrets_dir, tenant, spec["target_token_file"])
        except OSError as exc:
            # No path in the message: a tenant must not probe the runner's files.
            raise _Stopped(
                f"cannot read target_token_file in the runner's secrets dir: {exc.strerror}"
            ) from None
        token = raw.decode("utf-8", "replace").strip()
    elif spec.get("target_token_env"):
        name = spec["target_token_env"]
        if not (tenant.isascii() and tenant.isalnum() and tenant.islower()):
            # Only such names map to variable names one to one: "acme-x", "acme_x" and
            # "Acme" would share (or prefix) another tenant's variables.
            raise _Stopped(
                "target_token_env is only for tenants named with lower-case letters and "
                f"digits; tenant {tenant!r} names its token with target_token_file"
            )
        if not name.startswith(env_prefix(tenant)):
            raise _Stopped(
                f"target_token_env must start with {env_prefix(tenant)} (a bridge reads only "
                "its own tenant's variables)"
            )
        token = (os.environ.get(name) or "").strip()
        if not token:
            raise _Stopped(
                f"environment variable {name} (target_token_env) is not set in the runner"
            )
    else:
        return None
    if not token:
        raise _Stopped("the target token is empty")
    try:
        region = read_unverified_claims(token).get("region")
    except Unauthenticated:
        region = None  # not a JWT (a dev node's admin token?): the target judges it
    if region is not None and region != spec["target_region"]:
        raise _Stopped(
            f"the target token was issued for region {region!r}, the bridge's "
            f"target_region is {spec['target_region']!r}"
        )
    return token


async def publish_records(
    client: Client, ns: str, stream: str, records: Sequence[tuple[bytes, dict[str, str]]]
) -> Any:
    """Publish ``records`` (payload, headers) as one frame; the broker's PUBLISH_OFFSETS.

    Each record has its own headers, which ``Client.publish_batch`` cannot say: this
    builds the same PUBLISH frame with per-record headers through the client's request
    path (its timeouts, in-flight bound and control-stream choice by stream).
    """
    tenant = client.tenant
    payloads = [data for data, _ in records]
    headers = [h for _, h in records]
    reply = await client._request(
        lambda rid: wire.encode_publish(rid, tenant, ns, stream, payloads, headers=headers),
        wire.PublishOffsets,
        wire.OP_PUBLISH_OFFSETS,
        key=(ns, stream),
    )
    if reply.count != len(records):
        raise RemoteProtocolError(
            f"PUBLISH_OFFSETS for {reply.count} records, {len(records)} were sent"
        )
    return reply


async def stream_end(client: Client, ns: str, stream: str) -> int | None:
    """The source stream's end offset: where a subscription at "latest" starts."""
    probe = client.subscribe(f"{ns}/{stream}", start="latest", credit=2)
    async with probe:
        end = probe._flow.next_offset  # set by SUBSCRIBED before start() returns
    return end


class BridgeRunner:
    """Runs the bridges of one control plane (all, or ``only`` one) until stopped."""

    def __init__(
        self,
        control: ControlClient,
        source: SourceAccess,
        state_dir: Path,
        *,
        only: tuple[str, str] | None = None,
        poll: float = 1.0,
        http: tuple[str, int] | None = None,
        max_bridges: int = MAX_BRIDGES_PER_RUNNER,
        secrets_dir: Path | None = None,
    ) -> None:
        #: Where target token files are (one subdirectory per tenant); None: none.
        self.secrets_dir = secrets_dir
        self.control = control
        self.source = source
        self.checkpoints = CheckpointDir(state_dir)
        self.state_dir = Path(state_dir)
        self.only = only
        self.poll = poll
        self.http = http
        self.max_bridges = max_bridges
        self.region = ""
        self.statuses: dict[tuple[str, str], BridgeStatus] = {}
        self._flows: dict[tuple[str, str], tuple[Resource, asyncio.Task[None] | None]] = {}
        self.http_address: tuple[str, int] | None = None
        #: Set when the one bridge of ``only`` was deleted (the runner then returns).
        self.deleted = asyncio.Event()
        #: Checkpoint removals of deleted bridges, awaited before the runner returns.
        self._removals: set[asyncio.Task[None]] = set()

    # -- the control plane ------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        # ControlClient is synchronous (httpx): one call at a time, on a worker thread.
        return await asyncio.to_thread(fn, *args)

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (or the one bridge is deleted); the exit code."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = await self._call(self.control.info)
        self.region = str(info["region"])
        server = None
        if self.http is not None:
            server = StatusServer(self.statuses)
            self.http_address = await server.start(*self.http)
            log.info("bridge status on http://%s:%d/bridges", *self.http_address)
        follow = asyncio.create_task(self._follow_one() if self.only else self._follow_all())
        reporter = asyncio.create_task(self._report())
        stopped = asyncio.create_task(stop.wait())
        deleted = asyncio.create_task(self.deleted.wait())
        try:
            done, _ = await asyncio.wait(
                {follow, stopped, deleted}, return_when=asyncio.FIRST_COMPLETED
            )
            if follow in done:
                follow.result()  # raises what ended it
        finally:
            for task in (follow, reporter, stopped, deleted):
                task.cancel()
            for key in list(self._flows):
                await self._stop_flow(key)
            if self._removals:
                await asyncio.gather(*self._removals, return_exceptions=True)
            write_status_file(self.state_dir / "status.json", self.statuses)
            if server is not None:
                await server.stop()
        return 0

    async def _follow_one(self) -> None:
        assert self.only is not None
        tenant, name = self.only
        first = True
        while True:
            try:
                res = await self._call(self.control.get, ResourceKind.BRIDGE, (tenant, name))
            except NotFound:
                if first:
                    raise
                self._apply({})
                log.info("bridge %s/%s was deleted: its flow stopped, checkpoint removed",
                         tenant, name)  # fmt: skip
                self.deleted.set()
                return
            except FelixError as exc:
                log.warning("control plane: %s (flows keep running as last seen)", exc)
            else:
                self._apply({res.path: res})
            first = False
            await asyncio.sleep(self.poll)

    async def _follow_all(self) -> None:
        failures = 0
        while True:
            try:
                position, resources = await self._call(self.control.snapshot)
                desired = {r.path: r for r in resources if r.kind is ResourceKind.BRIDGE}
                self._apply(desired)
                self._drop_stale_checkpoints(desired)
                failures = 0
                while True:
                    changes, position = await self._call(self.control.changes, position, 1000, 5.0)
                    for change in changes:
                        r = change.resource
                        if r.kind is not ResourceKind.BRIDGE:
                            continue
                        if change.op.value == "delete":
                            desired.pop(r.path, None)
                        else:
                            desired[r.path] = r
                    if changes:
                        self._apply(desired)
            except CursorTooOld:
                continue  # re-snapshot at once
            except FelixError as exc:
                failures += 1
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**failures)
                log.warning("control plane: %s; again in %.1f s (flows keep running)", exc, delay)
                await asyncio.sleep(delay)

    def _drop_stale_checkpoints(self, desired: Mapping[ResPath, Resource]) -> None:
        """Checkpoints of bridges deleted while no runner ran (only with --all: then every
        bridge of the control plane is this runner's)."""
        for tenant, name in self.checkpoints.stored():
            if (tenant, name) not in desired:
                self.checkpoints.remove(tenant, name)
                log.info("removed the checkpoint of deleted bridge %s/%s", tenant, name)

    def _apply(self, desired: Mapping[ResPath, Resource]) -> None:
        """Start, restart (settings changed), pause and stop flows to match ``desired``."""
        for key in list(self._flows):
            if key not in desired:
                self._forget(key)
        for path, res in sorted(desired.items()):
            key = (path[0], path[1])
            current = self._flows.get(key)
            if current is not None and current[0] == res:
                continue
            if current is None and len(self._flows) >= self.max_bridges:
                st = self.statuses.setdefault(key, BridgeStatus(*key))
                if st.state != "refused":
                    st.state = "refused"
                    st.error(f"this runner runs at most {self.max_bridges} bridges")
                    log.error("bridge %s/%s refused: over %d bridges", *key, self.max_bridges)
                continue
            self._restart(key, res)

    def _restart(self, key: tuple[str, str], res: Resource) -> None:
        old = self._flows.pop(key, None)
        if old is not None and old[1] is not None:
            old[1].cancel()
        st = self.statuses.get(key)
        if st is None or st.state == "refused":
            st = self.statuses[key] = BridgeStatus(*key)
        spec = res.spec
        st.source = f"{key[0]}/{spec['source_stream']}"
        st.target = (
            f"{spec['target_url']} {spec['target_region']} "
            f"{spec['target_tenant'] or key[0]}/{spec['target_stream']}"
        )
        if spec["state"] == "paused":
            st.state = "paused"
            self._flows[key] = (res, None)
            log.info("bridge %s/%s paused", *key)
            return
        st.state = "starting"
        task = asyncio.create_task(self._flow(res, st), name=f"bridge {key[0]}/{key[1]}")
        self._flows[key] = (res, task)

    def _forget(self, key: tuple[str, str]) -> None:
        """The bridge was deleted: stop its flow, remove its checkpoint and status."""
        old = self._flows.pop(key, None)
        if old is not None and old[1] is not None:
            old[1].cancel()
        self.statuses.pop(key, None)
        # The task may still be writing a checkpoint: remove after it has stopped.
        task = old[1] if old is not None else None

        async def remove() -> None:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.checkpoints.remove(*key):
                log.info("bridge %s/%s deleted: checkpoint removed", *key)

        removal = asyncio.get_running_loop().create_task(remove())
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)

    async def _stop_flow(self, key: tuple[str, str]) -> None:
        res_task = self._flows.pop(key, None)
        if res_task is not None and res_task[1] is not None:
            res_task[1].cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await res_task[1]

    async def _report(self) -> None:
        path = self.state_dir / "status.json"
        while True:
            now = time.monotonic()
            for st in self.statuses.values():
                st.sample(now)
            await asyncio.to_thread(write_status_file, path, dict(self.statuses))
            await asyncio.sleep(STATUS_INTERVAL)

    # -- one bridge -------------------------------------------------------------------

    async def _flow(self, res: Resource, st: BridgeStatus) -> None:
        """Copy until cancelled, starting over after every error (see the module doc)."""
        failures = 0
        while True:
            before = st.forwarded
            try:
                await self._copy(res, st)
            except asyncio.CancelledError:
                raise
            except (_Stopped, *_PERMANENT) as exc:
                st.state = "failed"
                st.error(f"{type(exc).__name__}: {exc}")
                log.error("bridge %s/%s stopped: %s (retried every %g s)",
                          st.tenant, st.name, exc, FAILED_RETRY)  # fmt: skip
                delay = FAILED_RETRY
            except Exception as exc:  # transient (Unavailable, timeouts, lost connections)
                raise_if_cancelled()
                failures = 0 if st.forwarded > before else failures + 1
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**failures) * random.uniform(0.5, 1)
                st.state = "retrying"
                st.error(f"{type(exc).__name__}: {exc}")
                if isinstance(exc, FelixError | OSError):
                    log.warning("bridge %s/%s: %s; again in %.1f s",
                                st.tenant, st.name, exc, delay)  # fmt: skip
                else:
                    log.exception("bridge %s/%s failed unexpectedly", st.tenant, st.name)
            await asyncio.sleep(delay)

    async def _copy(self, res: Resource, st: BridgeStatus) -> None:
        spec = res.spec
        tenant, name = res.path
        src_ns, src_stream = split_stream_ref(spec["source_stream"])
        dst_ns, dst_stream = split_stream_ref(spec["target_stream"])
        if spec["target_region"] == self.region:
            raise _Stopped(f"target_region {self.region!r} is this region")
        target_token(spec, tenant, self.secrets_dir)  # fail now, not in a handshake
        incarnation = res.created_at.isoformat()
        cp = self.checkpoints.load(tenant, name)
        start: int | Literal["earliest", "latest"] = spec["start"]
        if cp is not None and cp.incarnation == incarnation and cp.source == spec["source_stream"]:
            start = cp.next_offset
            st.checkpoint = cp.next_offset

        async def source_token() -> str:
            return await self.source.token(self.region, tenant, src_ns, src_stream) or ""

        async def dest_token() -> str:
            return target_token(spec, tenant, self.secrets_dir) or ""

        region, spec_filter = self.region, spec["filter"]
        async with (
            felix.connect(
                self.source.url,
                tenant=tenant,
                token_provider=source_token,
                ca=self.source.ca,
                reconnect_backoff=(BACKOFF_BASE, BACKOFF_CAP),
            ) as src,
            felix.connect(
                spec["target_url"],
                tenant=spec["target_tenant"] or tenant,
                token_provider=dest_token,
                ca=spec["target_ca"],
                reconnect_backoff=(BACKOFF_BASE, BACKOFF_CAP),
            ) as dst,
        ):
            sub = src.subscribe(f"{src_ns}/{src_stream}", start=start, credit=CREDIT)
            try:
                await sub.start()
            except CursorError as exc:
                if exc.reason != "too_old":
                    raise
                # Retention dropped records before they were copied: count them, go on.
                sub = src.subscribe(f"{src_ns}/{src_stream}", start=exc.available, credit=CREDIT)
                await sub.start()
            try:
                expected = start if isinstance(start, int) else None
                saved_at = time.monotonic()
                probed_at = 0.0
                unsaved: int | None = None  # a checkpoint moved over filtered records only
                st.state = "running"
                while True:
                    now = time.monotonic()
                    if now - probed_at >= END_PROBE_INTERVAL:
                        probed_at = now
                        st.source_end = await stream_end(src, src_ns, src_stream)
                        if st.checkpoint is None and expected is not None:
                            st.checkpoint = expected
                    try:
                        first = await sub.next(timeout=1.0)
                    except FelixTimeoutError:
                        if unsaved is not None:
                            self._save(tenant, name, incarnation, spec, unsaved, st)
                            unsaved, saved_at = None, time.monotonic()
                        continue
                    batch = [first]
                    size = len(first.data)
                    while sub.pending and len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                        message = await sub.next()
                        batch.append(message)
                        size += len(message.data)
                    out: list[tuple[int, bytes, dict[str, str]]] = []
                    for m in batch:
                        if expected is not None and m.offset > expected:
                            st.skipped += m.offset - expected
                        expected = m.offset + 1
                        if passes(spec_filter, m.headers):
                            headers = dict(m.headers)
                            headers.update(provenance(region, tenant, src_ns, src_stream, m.offset))
                            out.append((m.offset, m.data, headers))
                    st.filtered += len(batch) - len(out)
                    next_offset = batch[-1].offset + 1

                    def save(offset: int) -> None:
                        self._save(tenant, name, incarnation, spec, offset, st)

                    if out:
                        await self._forward(dst, dst_ns, dst_stream, out, st, save)
                        save(next_offset)
                        unsaved, saved_at = None, time.monotonic()
                    elif time.monotonic() - saved_at >= FILTERED_SAVE_INTERVAL:
                        save(next_offset)
                        unsaved, saved_at = None, time.monotonic()
                    else:
                        unsaved = next_offset
            finally:
                await sub.close()

    async def _forward(
        self,
        dst: Client,
        ns: str,
        stream: str,
        out: Sequence[tuple[int, bytes, dict[str, str]]],
        st: BridgeStatus,
        save: Callable[[int], None],
    ) -> None:
        """Publish ``out`` (source offset, payload, headers) to the target as one batch.

        A batch the target refuses as a bad request is sent again record by record (the
        target may refuse a batch that is part copies it already stored and part new
        records, as after a crash between an ack and the checkpoint: each copy is then
        acked alone). A record refused alone stops the flow; the checkpoint first moves
        past the records before it, which the target stored.
        """
        records = [(data, headers) for _, data, headers in out]
        try:
            reply = await publish_records(dst, ns, stream, records)
        except BadRequest:
            if len(out) == 1:
                raise
            for i, (offset, data, headers) in enumerate(out):
                try:
                    reply = await publish_records(dst, ns, stream, [(data, headers)])
                except BadRequest:
                    if i:
                        save(offset)
                    raise
                self._check_durable(reply, ns, stream, st)
                st.forwarded += 1
                st.forwarded_bytes += len(data)
            return
        self._check_durable(reply, ns, stream, st)
        st.forwarded += len(out)
        st.forwarded_bytes += sum(len(data) for _, data, _ in out)
        if _FAULT_EXIT_AFTER_ACKS:
            _fault_exit_after_ack()

    @staticmethod
    def _check_durable(reply: Any, ns: str, stream: str, st: BridgeStatus) -> None:
        durability = _DURABLE.get(reply.durability)
        if durability is None:
            st.target_durability = "memory"
            raise _Stopped(
                f"target stream {ns}/{stream} is not durable (its acks say memory): make "
                "it durable; the bridge only moves its checkpoint past records the target keeps"
            )
        st.target_durability = durability

    def _save(
        self,
        tenant: str,
        name: str,
        incarnation: str,
        spec: Mapping[str, Any],
        next_offset: int,
        st: BridgeStatus,
    ) -> None:
        cp = Checkpoint(incarnation, spec["source_stream"], next_offset)
        self.checkpoints.save(tenant, name, cp)
        st.checkpoint = next_offset
