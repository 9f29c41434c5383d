"""felix/cancel.py: a cancellation asyncio.wait_for turned into another error is found."""

from __future__ import annotations

import asyncio

import pytest

from felix.cancel import raise_if_cancelled
from tests.aio import run


def test_a_swallowed_cancellation_is_raised_again() -> None:
    async def loop_like(reply: asyncio.Future[None], seen: list[str]) -> None:
        while True:
            try:
                await asyncio.wait_for(reply, 30)
            except ConnectionError:
                seen.append("error")
                raise_if_cancelled()
                await asyncio.sleep(0.01)  # what a retry loop would do next

    async def main() -> None:
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seen: list[str] = []
        task = asyncio.create_task(loop_like(reply, seen))
        await asyncio.sleep(0.01)
        task.cancel()
        reply.set_exception(ConnectionError("gone"))  # arrives with the cancellation
        done, _ = await asyncio.wait([task], timeout=2)
        assert done == {task} and task.cancelled()

    run(main, timeout=10)


def test_nothing_happens_without_a_cancellation() -> None:
    async def main() -> None:
        raise_if_cancelled()  # no error: the task is not being cancelled

    run(main, timeout=10)
    with pytest.raises(asyncio.CancelledError):

        async def cancelled() -> None:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            raise_if_cancelled()

        asyncio.run(cancelled())
