"""A task's cancellation that ``asyncio.wait_for`` turned into another error.

Python 3.11's ``asyncio.wait_for`` hands a caller that was just cancelled the inner
future's result or error when both arrive together: the cancellation is swallowed, the
task goes on, and a loop that retries on errors retries forever (``felix up`` hung at
exit that way). Loops that catch ``Exception`` call :func:`raise_if_cancelled` first.
"""

from __future__ import annotations

import asyncio

__all__ = ["raise_if_cancelled"]


def raise_if_cancelled() -> None:
    """Raise CancelledError if the running task has a cancellation under way (it was
    cancelled and has not taken that back), whatever error is being handled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
