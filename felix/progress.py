"""Progress bars for long CLI work (DLQ replays, the perf harness), on stderr and only
when stderr is a terminal: piped or logged output stays exactly as it was."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

__all__ = ["Progress", "progress"]


class Progress(Protocol):
    def advance(self, n: int = 1) -> None:
        """``n`` more units done."""


class _Quiet:
    def advance(self, n: int = 1) -> None:
        pass


class _Bar:
    def __init__(self, bar: object, task: object) -> None:
        self._bar, self._task = bar, task

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)  # type: ignore[attr-defined]


@contextmanager
def progress(
    description: str, total: int | None = None, *, stream: TextIO | None = None
) -> Iterator[Progress]:
    """A bar of ``total`` units (None: a count and a rate, no end) while the block runs;
    nothing when ``stream`` (default stderr) is not a terminal."""
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        yield _Quiet()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    columns = (
        [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
         TaskProgressColumn(), TimeRemainingColumn()]
        if total is not None
        else [SpinnerColumn(), TextColumn("{task.description}"),
              TextColumn("{task.completed} done"), TimeElapsedColumn()]
    )  # fmt: skip
    with RichProgress(*columns, console=Console(file=out), transient=True) as bar:
        yield _Bar(bar, bar.add_task(description, total=total))
