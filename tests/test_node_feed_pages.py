"""The node's control process answers the change feed in lines the supervisor can read.

Review finding 4: a page of changes travelled as one line whatever its size; a
batch of big resources (a tenant deleted with its policies) made a line over
MAX_LINE_BYTES, which the supervisor drops, so its follower retried the same
position forever. Driven here through the real pieces: the control process's
answering code writing to a real :class:`ControlChannel` over a socket pair, read
with the supervisor's line limit into a :class:`ChildFeed`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from felix.auth.perms import MAX_PERMISSIONS
from felix.control.limits import HttpLimits
from felix.control.model import Op, ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.node import messages as msg
from felix.node.control import ChildFeed, StoreFeed
from felix.node.control_process import _answer
from felix.node.worker import ControlChannel
from tests.aio import run

pytestmark = pytest.mark.timeout(60)

#: Policies of about 170 KB each: created and deleted, more than 4 MiB of changes.
POLICIES = 16


def big_policy(i: int) -> dict[str, Any]:
    ns = f"n{i:02d}" + "x" * 60
    return {
        "permissions": [
            f"stream.publish:stream:acme/{ns}/s{j:04d}{'y' * 59}" for j in range(MAX_PERMISSIONS)
        ]
    }


async def follow_to_the_end(store: MemoryStore) -> tuple[list[Any], list[int]]:
    """Every change after position 0, through the control channel; and each line's size."""
    child_end, supervisor_end = socket.socketpair()
    channel = ControlChannel(child_end.detach())
    await channel.open()
    reader, writer = await asyncio.open_unix_connection(
        sock=supervisor_end, limit=msg.MAX_LINE_BYTES
    )
    feed = StoreFeed(store)
    answers: set[asyncio.Task[None]] = set()

    def send(cmd: msg.Command) -> bool:
        assert isinstance(cmd, msg.ChangesRequest)
        task = asyncio.create_task(_answer(feed, channel, cmd))
        answers.add(task)
        task.add_done_callback(answers.discard)
        return True

    follower = ChildFeed(send)
    sizes: list[int] = []

    async def read() -> None:
        # The supervisor's reader (felix/node/children.py): a line over the limit raises.
        while line := await reader.readline():
            sizes.append(len(line))
            event = msg.decode(line)
            assert isinstance(event, msg.Event)
            follower.on_event(event)

    reading = asyncio.create_task(read())
    got: list[Any] = []
    position = 0
    try:
        while True:
            changes, nxt = await asyncio.wait_for(follower.changes(position, 500, 0), 20)
            if not changes:
                break
            assert changes[-1].position == nxt
            got.extend(changes)
            position = nxt
    finally:
        reading.cancel()
        writer.close()
    return got, sizes


def test_a_page_of_big_changes_is_cut_to_lines_the_supervisor_reads() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.open()
        await store.create(ResourceKind.TENANT, ("acme",), {})
        for i in range(POLICIES):
            await store.create(ResourceKind.POLICY, ("acme", f"p{i}"), big_policy(i))
        await store.delete(ResourceKind.TENANT, ("acme",), cascade=True)
        got, sizes = await follow_to_the_end(store)
        assert [c.position for c in got] == list(range(1, 2 * (POLICIES + 1) + 1))
        assert sum(c.op is Op.DELETE for c in got) == POLICIES + 1
        assert sum(sizes) > msg.MAX_LINE_BYTES  # one page would not have fitted
        assert max(sizes) < msg.MAX_LINE_BYTES
        await store.close()

    run(main)


def test_one_resource_as_big_as_a_request_allows_fits_a_line() -> None:
    """What bounds one change: the embedded control plane's request body, as JSON at
    most three times longer (each 2-byte character escaped as \\uXXXX)."""
    body = HttpLimits().max_body_bytes
    change = {"position": 1, "op": "update", "resource": {"spec": {"jwks": "é" * (body // 2)}}}
    line = msg.encode(msg.ChangesReply(1, [change], 1))
    assert len(line) > 3 * body - 1024
    assert len(line) < msg.MAX_LINE_BYTES
