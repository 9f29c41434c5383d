"""Running async tests: a fresh uvloop loop, a timeout, and no swallowed exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run ``main`` on a fresh uvloop loop; fail on any exception the loop swallowed."""
    swallowed: list[dict[str, Any]] = []

    async def wrapper() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: swallowed.append(ctx))
        async with asyncio.timeout(timeout):
            return await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(wrapper())
    assert not swallowed, swallowed
    return result
